//! The credentials fingerprint: an argon2id hash of the email and password used for setup, kept
//! only on the token Secret (annotation `bootstrap.netbird.io/credentials-fingerprint`). Hashing is
//! slow by design, so it runs on a few dedicated threads (one per core, at most 4), never on the
//! async runtime nor on tokio's blocking pool: each hash allocates its memory cost, and hashes
//! spread over many short-lived blocking threads leave that memory in as many allocator arenas
//! (measured: 1.2 GiB resident after 210 bootstraps with the default 19 MiB cost on the blocking
//! pool; 214 MiB after 1040 with 7 MiB and one hash per core on the blocking pool).

use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use secrecy::{ExposeSecret, SecretString};

/// OWASP's second argon2id configuration: 7 MiB, 5 passes, 1 lane (as strong as 19 MiB with 2
/// passes, with a third of the memory).
fn hasher() -> Argon2<'static> {
    let params = if SIMULATION.load(std::sync::atomic::Ordering::Relaxed) {
        Params::new(Params::MIN_M_COST, 1, 1, None).unwrap_or_default()
    } else {
        Params::new(7 * 1024, 5, 1, None).unwrap_or_default()
    };
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

type Job = Box<dyn FnOnce() + Send>;

/// Test seam: hash at the least cost, on the caller's thread (a deterministic simulation runs
/// thousands of bootstraps; the comparison logic stays the same).
static SIMULATION: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Test seam: see [`SIMULATION`]. For the whole process, from now on.
pub fn simulate() {
    SIMULATION.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Runs `f` on one of the hashing threads and waits for its result.
async fn on_hashing_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    if SIMULATION.load(std::sync::atomic::Ordering::Relaxed) {
        return Some(f());
    }
    static POOL: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(4);
        for i in 0..threads {
            let rx = rx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
        }
        Mutex::new(tx)
    });
    let (done, result) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = done.send(f());
    });
    pool.lock().ok()?.send(job).ok()?;
    result.await.ok()
}

/// Hashes `input` with argon2id and a random salt; returns the PHC string.
pub async fn hash(input: SecretString) -> Result<String, FingerprintError> {
    on_hashing_thread(move || {
        hasher()
            .hash_password(input.expose_secret().as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| FingerprintError(e.to_string()))
    })
    .await
    .ok_or_else(|| FingerprintError("the hashing threads are gone".into()))?
}

/// Whether `input` matches the PHC string `phc` (its parameters come from the string). An
/// unparsable `phc` does not match.
pub async fn matches(phc: String, input: SecretString) -> bool {
    on_hashing_thread(move || {
        PasswordHash::new(&phc)
            .map(|h| {
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
