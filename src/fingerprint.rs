//! `status.credentialsFingerprint`: an argon2id hash of the email and password used for setup.
//! Hashing is slow by design, so it runs on the blocking thread pool, never on the async runtime,
//! and at most one per core: each hash allocates its memory cost, and many concurrent hashes on
//! blocking threads would leave that memory in as many allocator arenas (measured: 1.2 GiB resident
//! after 210 bootstraps with the default 19 MiB cost, unbounded; more than one per core would not
//! finish sooner anyway).

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

/// OWASP's second argon2id configuration: 7 MiB, 5 passes, 1 lane (as strong as 19 MiB with 2
/// passes, with a third of the memory).
fn hasher() -> Argon2<'static> {
    let params = Params::new(7 * 1024, 5, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

fn gate() -> &'static Semaphore {
    static GATE: std::sync::OnceLock<Semaphore> = std::sync::OnceLock::new();
    GATE.get_or_init(|| {
        let cores = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(4);
        Semaphore::new(cores)
    })
}

/// Hashes `input` with argon2id and a random salt; returns the PHC string.
pub async fn hash(input: SecretString) -> Result<String, FingerprintError> {
    let _turn = gate()
        .acquire()
        .await
        .map_err(|e| FingerprintError(e.to_string()))?;
    tokio::task::spawn_blocking(move || {
        hasher()
            .hash_password(input.expose_secret().as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| FingerprintError(e.to_string()))
    })
    .await
    .map_err(|e| FingerprintError(e.to_string()))?
}

/// Whether `input` matches the PHC string `phc`. An unparsable `phc` does not match.
pub async fn matches(phc: String, input: SecretString) -> bool {
    let Ok(_turn) = gate().acquire().await else {
        return false;
    };
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&phc)
            .map(|h| {
                // the parameters come from the PHC string
                hasher()
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
