//! Loading: YAML text -> [`Config`] -> normalised -> validated. Parse errors carry the YAML
//! path of the failing field (tracked with `serde_path_to_error` around serde-saphyr's
//! deserializer) and the line and column serde-saphyr reports; validation problems carry their
//! path. Both end up in one [`ConfigError`] that prints one line per problem.

use std::fmt;
use std::path::Path;

use crate::config::Config;

/// A configuration that could not be loaded: where it came from and every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    /// Where the configuration came from, usually its file name.
    pub origin: String,
    /// What is wrong, at least one entry.
    pub problems: Vec<Problem>,
}

impl ConfigError {
    /// An error from `origin` with the given problems.
    pub fn new(origin: impl Into<String>, problems: Vec<Problem>) -> Self {
        Self {
            origin: origin.into(),
            problems,
        }
    }

    fn render(&self) -> String {
        self.problems
            .iter()
            .map(|problem| format!("{}: {problem}", self.origin))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One problem of a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// camelCase YAML path of the field, e.g. `listeners[0].limits.maxMessageSize`; empty when
    /// the problem concerns the whole document (for example a YAML syntax error).
    pub path: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl Problem {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Reads, parses, normalises and validates the configuration file at `path`.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(&origin, vec![Problem::new("", format!("cannot read: {e}"))])
    })?;
    load_str(&text, &origin)
}

/// Parses, normalises ([`Config::normalize`]) and validates ([`Config::validate`]) YAML text;
/// `origin` names it in error messages (usually the file name).
pub fn load_str(yaml: &str, origin: &str) -> Result<Config, ConfigError> {
    let mut config = parse(yaml).map_err(|problem| ConfigError::new(origin, vec![problem]))?;
    config.normalize();
    config
        .validate()
        .map_err(|problems| ConfigError::new(origin, problems))?;
    Ok(config)
}

/// Deserialises YAML text into a [`Config`] without validating it. An empty document (or one
/// holding only comments) is an empty mapping: every default, no listener.
pub fn parse(yaml: &str) -> Result<Config, Problem> {
    if yaml.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---"
    }) {
        return Ok(Config::default());
    }
    let mut path = String::new();
    let options = serde_saphyr::options! { with_snippet: false };
    let result = serde_saphyr::with_deserializer_from_str_with_options(yaml, options, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = yaml_path(e.path());
            e.into_inner()
        })
    });
    result.map_err(|e| Problem::new(path, describe(&e)))
}

/// The path as YAML keys and indices (`listeners[0].limits`); empty at the root. Segments
/// serde cannot name (`?`) end the path.
fn yaml_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => break,
        }
    }
    out
}

/// A one-line message for users, ending with the position when serde-saphyr knows it.
fn describe(error: &serde_saphyr::Error) -> String {
    if let serde_saphyr::Error::InvalidScalar { ty, .. } = error.without_snippet() {
        let expected = match *ty {
            "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number".to_owned(),
            "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer".to_owned(),
            "bool" => "true or false".to_owned(),
            "f32" | "f64" => "a number".to_owned(),
            other => format!("a value of type {other}"),
        };
        return match error.location() {
            Some(at) => format!(
                "invalid value: expected {expected} at line {}, column {}",
                at.line(),
                at.column()
            ),
            None => format!("invalid value: expected {expected}"),
        };
    }
    let options = serde_saphyr::render_options! {
        formatter: &serde_saphyr::UserMessageFormatter,
        snippets: serde_saphyr::SnippetMode::Off,
    };
    error.render_with_options(options)
}
