//! SMTP AUTH (RFC 4954) credentials: a users file of `name:hash` lines, where the hash is an
//! argon2 PHC string (`$argon2id$...`) or a bcrypt hash (`$2b$...`). Verification runs on the
//! blocking pool (both hashes are deliberately slow) and an unknown user costs as much as a
//! known one, so timing does not reveal which names exist.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use argon2::PasswordVerifier;

use crate::InboundError;

/// A dummy argon2 hash verified for unknown users, so both paths take the same time.
static DUMMY_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    use argon2::PasswordHasher;
    argon2::password_hash::SaltString::encode_b64(b"mailroom-dummy-salt")
        .ok()
        .and_then(|salt| {
            argon2::Argon2::default()
                .hash_password(b"unused", &salt)
                .ok()
                .map(|h| h.to_string())
        })
        .unwrap_or_default()
});

/// The users allowed to authenticate on a listener.
#[derive(Debug, Default)]
pub struct UserDb {
    users: HashMap<String, String>,
}

impl UserDb {
    /// Reads a users file; errors name the config field (`field`, e.g.
    /// `listeners[0].auth.usersFile`), the file and the line.
    pub fn load(path: &Path, listener: &str, field: &str) -> Result<Self, InboundError> {
        let text = std::fs::read_to_string(path).map_err(|e| InboundError::Auth {
            listener: listener.to_string(),
            reason: format!(
                "{field}: {}: cannot read the users file: {e}",
                path.display()
            ),
        })?;
        Self::parse(&text).map_err(|reason| InboundError::Auth {
            listener: listener.to_string(),
            reason: format!("{field}: {}: {reason}", path.display()),
        })
    }

    /// Parses `name:hash` lines; `#` comments and blank lines are skipped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((name, hash)) = line.split_once(':') else {
                return Err(format!("line {}: expected name:hash", n + 1));
            };
            if !(hash.starts_with("$argon2")
                || hash.starts_with("$2a$")
                || hash.starts_with("$2b$")
                || hash.starts_with("$2y$"))
            {
                return Err(format!(
                    "line {}: user {name:?}: the hash must be argon2 ($argon2id$...) or bcrypt ($2b$...)",
                    n + 1
                ));
            }
            users.insert(name.to_string(), hash.to_string());
        }
        Ok(UserDb { users })
    }

    /// Checks a password; true only for a known user with a matching password.
    pub async fn verify(self: &Arc<Self>, user: &str, password: &str) -> bool {
        let known = self.users.get(user).cloned();
        let password = password.to_string();
        tokio::task::spawn_blocking(move || match known {
            Some(hash) => verify_hash(&hash, &password),
            None => {
                let _ = verify_hash(&DUMMY_HASH, &password);
                false
            }
        })
        .await
        .unwrap_or(false)
    }
}

fn verify_hash(hash: &str, password: &str) -> bool {
    if hash.starts_with("$argon2") {
        match argon2::PasswordHash::new(hash) {
            Ok(parsed) => argon2::Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok(),
            Err(_) => false,
        }
    } else {
        bcrypt::verify(password, hash).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verifies_bcrypt_and_argon2() {
        use argon2::PasswordHasher;
        let salt =
            argon2::password_hash::SaltString::encode_b64(b"0123456789abcdef").expect("salt");
        let a = argon2::Argon2::default()
            .hash_password(b"secret1", &salt)
            .expect("hash")
            .to_string();
        let b = bcrypt::hash("secret2", 4).expect("bcrypt");
        let db = Arc::new(UserDb::parse(&format!("# users\nalice:{a}\nbob:{b}\n")).expect("parse"));
        assert!(db.verify("alice", "secret1").await);
        assert!(!db.verify("alice", "wrong").await);
        assert!(db.verify("bob", "secret2").await);
        assert!(!db.verify("carol", "secret1").await);
    }

    #[test]
    fn refuses_plaintext_passwords() {
        assert!(UserDb::parse("alice:secret\n").is_err());
        assert!(UserDb::parse("no-colon\n").is_err());
    }
}
