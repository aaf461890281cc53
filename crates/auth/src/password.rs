//! Password and secret hashing. New hashes are Argon2id (memory-hard, the current OWASP
//! recommendation); bcrypt hashes are accepted so that users imported from a
//! Distribution htpasswd file can log in, and are replaced by Argon2id on their first
//! successful login.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use crate::AuthError;

/// The outcome of checking a password against a stored hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordCheck {
    /// Wrong password, or an unreadable hash.
    Invalid,
    /// Right password, modern hash.
    Valid,
    /// Right password, legacy (bcrypt) hash: store a fresh Argon2id hash.
    ValidNeedsRehash,
}

/// Where password hashing runs: Argon2id costs tens of milliseconds of CPU and about 19 MiB
/// per hash by design, so it never runs on the async workers (a flood of wrong passwords
/// would stall every other request) but on the blocking pool, at most `permits` at once,
/// leaving the other cores to the registry. Past `max_waiting` queued checks, new ones
/// are refused at once (rate limited) instead of queueing without bound.
pub(crate) struct HashPool {
    permits: tokio::sync::Semaphore,
    waiting: std::sync::atomic::AtomicUsize,
    max_waiting: usize,
}

impl HashPool {
    /// A pool using half the cores (at least one).
    pub(crate) fn for_this_machine() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        HashPool::new((cores / 2).max(1), 64)
    }

    pub(crate) fn new(permits: usize, max_waiting: usize) -> Self {
        HashPool {
            permits: tokio::sync::Semaphore::new(permits),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            max_waiting,
        }
    }

    /// Runs `work` (a hash or a check) on the blocking pool when a permit is free.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        use std::sync::atomic::Ordering;
        let queued = self.waiting.fetch_add(1, Ordering::Relaxed);
        let _left = scopeguard(|| {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        });
        if queued >= self.max_waiting {
            return Err(AuthError::RateLimited {
                retry_after_secs: 1,
            });
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| AuthError::Crypto(e.to_string()))?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| AuthError::Crypto(e.to_string()))
    }
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Hashes a password (or robot secret) with Argon2id and a random salt, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| AuthError::Crypto(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Crypto(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Crypto(e.to_string()))
}

/// Checks `candidate` against a stored Argon2id or bcrypt hash, in constant time for the
/// hash's algorithm.
pub fn verify_password(stored: &str, candidate: &str) -> PasswordCheck {
    if is_bcrypt(stored) {
        return match bcrypt::verify(candidate, stored) {
            Ok(true) => PasswordCheck::ValidNeedsRehash,
            _ => PasswordCheck::Invalid,
        };
    }
    let Ok(parsed) = PasswordHash::new(stored) else {
        return PasswordCheck::Invalid;
    };
    match Argon2::default().verify_password(candidate.as_bytes(), &parsed) {
        Ok(()) => PasswordCheck::Valid,
        Err(_) => PasswordCheck::Invalid,
    }
}

fn is_bcrypt(hash: &str) -> bool {
    ["$2a$", "$2b$", "$2x$", "$2y$"]
        .iter()
        .any(|p| hash.starts_with(p))
}

/// One user of an htpasswd file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HtpasswdEntry {
    /// The login name.
    pub user: String,
    /// The bcrypt hash, kept as is.
    pub bcrypt_hash: String,
}

/// Parses an htpasswd file as Distribution reads it: `user:hash` lines, bcrypt only
/// (Distribution refuses the other htpasswd formats too). Blank lines and `#` comments
/// are skipped; any other line that is not `user:bcrypt` is an error naming the line.
pub fn parse_htpasswd(text: &str) -> Result<Vec<HtpasswdEntry>, AuthError> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            return Err(AuthError::Invalid(format!(
                "htpasswd line {}: expected user:hash",
                i + 1
            )));
        };
        if !is_bcrypt(hash) {
            return Err(AuthError::Invalid(format!(
                "htpasswd line {}: only bcrypt hashes are supported (htpasswd -B)",
                i + 1
            )));
        }
        entries.push(HtpasswdEntry {
            user: user.to_owned(),
            bcrypt_hash: hash.to_owned(),
        });
    }
    Ok(entries)
}

/// A random secret of 32 URL-safe characters (192 bits): generated passwords and robot
/// secrets, shown once.
pub fn random_secret() -> Result<String, AuthError> {
    use base64::Engine;
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| AuthError::Crypto(e.to_string()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2_round_trip() {
        let hash = hash_password("s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert_eq!(verify_password(&hash, "s3cret"), PasswordCheck::Valid);
        assert_eq!(verify_password(&hash, "S3cret"), PasswordCheck::Invalid);
        assert_ne!(hash, hash_password("s3cret").unwrap(), "salted");
        assert_eq!(verify_password("garbage", "x"), PasswordCheck::Invalid);
    }

    #[test]
    fn htpasswd_bcrypt_users_verify_and_ask_for_rehash() {
        // Generated with `htpasswd -nbB -C 5 alice wonderland`.
        let file =
            "# users\nalice:$2y$05$XkuvP9aMYIv.Qf1R4lQUcuEQ1ZzqiqIWupx5hcf6jeuoLQWIsHU/q\n\n";
        let entries = parse_htpasswd(file).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].user, "alice");
        assert_eq!(
            verify_password(&entries[0].bcrypt_hash, "wonderland"),
            PasswordCheck::ValidNeedsRehash
        );
        assert_eq!(
            verify_password(&entries[0].bcrypt_hash, "wrong"),
            PasswordCheck::Invalid
        );
        assert!(parse_htpasswd("bob:{SHA}abc").is_err());
        assert!(parse_htpasswd("nocolon").is_err());
    }

    #[test]
    fn secrets_are_random() {
        let a = random_secret().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_secret().unwrap());
    }
}
