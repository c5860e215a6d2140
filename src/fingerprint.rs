//! `status.credentialsFingerprint`: an argon2id hash of the email and password used for setup.
//! Hashing is slow by design, so it runs on the blocking thread pool, never on the async runtime.

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use secrecy::{ExposeSecret, SecretString};

/// Hashes `input` with argon2id and a random salt; returns the PHC string.
pub async fn hash(input: SecretString) -> Result<String, FingerprintError> {
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password(input.expose_secret().as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| FingerprintError(e.to_string()))
    })
    .await
    .map_err(|e| FingerprintError(e.to_string()))?
}

/// Whether `input` matches the PHC string `phc`. An unparsable `phc` does not match.
pub async fn matches(phc: String, input: SecretString) -> bool {
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&phc)
            .map(|h| {
                Argon2::default()
                    .verify_password(input.expose_secret().as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

#[derive(Debug, thiserror::Error)]
#[error("failed to hash the credentials fingerprint: {0}")]
pub struct FingerprintError(String);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_salted_argon2id_and_verify() {
        let a = hash(SecretString::from("a@b.c\npassword1")).await.unwrap();
        let b = hash(SecretString::from("a@b.c\npassword1")).await.unwrap();
        assert!(a.starts_with("$argon2id$v=19$"), "{a}");
        assert_ne!(a, b, "a random salt makes each hash different");
        assert!(!a.contains("password1"));
        assert!(matches(a.clone(), SecretString::from("a@b.c\npassword1")).await);
        assert!(!matches(a, SecretString::from("a@b.c\npassword2")).await);
        assert!(!matches("garbage".into(), SecretString::from("x")).await);
    }
}
