//! Address patterns of the `access` plugin: `user@example.com`, `@example.com` (any user of a
//! domain), `*@*.example.com`, `postmaster@*` (glob with `*`), compared case-insensitively.

use thiserror::Error;

/// A parsed address pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPattern {
    glob: String,
}

/// Why a pattern is not valid.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PatternError {
    /// Empty pattern.
    #[error("empty pattern")]
    Empty,
    /// Whitespace or control characters.
    #[error("pattern {0:?} contains whitespace or control characters")]
    BadCharacter(String),
}

impl AddressPattern {
    /// Parses a pattern. `@domain` means `*@domain`; a pattern without `@` matches a HELO name or a
    /// whole address as a glob.
    pub fn parse(pattern: &str) -> Result<Self, PatternError> {
        let p = pattern.trim();
        if p.is_empty() {
            return Err(PatternError::Empty);
        }
        if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(PatternError::BadCharacter(pattern.to_string()));
        }
        let glob = if let Some(domain) = p.strip_prefix('@') {
            format!("*@{domain}")
        } else {
            p.to_string()
        };
        Ok(AddressPattern {
            glob: glob.to_lowercase(),
        })
    }

    /// True when `value` (an address or a name) matches, ignoring case.
    pub fn matches(&self, value: &str) -> bool {
        glob_match(self.glob.as_bytes(), value.to_lowercase().as_bytes())
    }
}

/// Iterative glob matching with `*` (any run of bytes); linear-time backtracking on the last star.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == b'*' {
        p += 1;
    }
    p == pattern.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_documented() {
        let cases = [
            ("user@example.com", "USER@Example.com", true),
            ("user@example.com", "other@example.com", false),
            ("@example.com", "anyone@example.com", true),
            ("@example.com", "anyone@sub.example.com", false),
            ("*@*.example.com", "a@sub.example.com", true),
            ("*@*.example.com", "a@example.com", false),
            ("postmaster@*", "postmaster@x.test", true),
            ("*.bad.test", "host.bad.test", true),
            ("*.bad.test", "bad.test", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
        ];
        for (pattern, value, expected) in cases {
            let p = AddressPattern::parse(pattern).expect("valid pattern");
            assert_eq!(p.matches(value), expected, "{pattern} vs {value}");
        }
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert_eq!(AddressPattern::parse(""), Err(PatternError::Empty));
        assert!(matches!(
            AddressPattern::parse("a b@c"),
            Err(PatternError::BadCharacter(_))
        ));
    }
}
