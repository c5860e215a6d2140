//! One setup at a time per NetBird server, in this process: two NetbirdInstances naming one server
//! may both find it needing setup (each pass asks `GET /api/instance` first); the second must not
//! call `POST /api/setup` once the first has (invariant 2), even when the server would only answer
//! 412.
//!
//! A pass takes its server's gate for the call, and learns whether this process called setup on
//! that server since the pass asked whether it needs one: then it asks again instead of calling.
//! Gates are kept by server (its normalized URL), and dropped a while after their last setup
//! (a pass asks and calls within seconds; an entry per server ever set up would grow without end).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::lock;

/// How long a gate is kept after its last setup call: far longer than a pass takes from its
/// `GET /api/instance` to its setup call.
const KEEP: Duration = Duration::from_secs(600);

/// The gate of one server: when this process last called setup there.
pub type Gate = Arc<tokio::sync::Mutex<Option<Instant>>>;

#[derive(Default)]
pub struct SetupGates {
    gates: Mutex<HashMap<String, Gate>>,
}

impl SetupGates {
    /// The gate of the server at `management_url` (made when there is none; gates nobody holds
    /// whose last setup is long past are dropped on the way).
    pub fn gate(&self, management_url: &str) -> Gate {
        let server = crate::binding::normalize(management_url);
        let mut gates = lock(&self.gates);
        gates.retain(|_, g| {
            Arc::strong_count(g) > 1
                || g.try_lock()
                    .is_ok_and(|last| last.is_some_and(|at| at.elapsed() < KEEP))
        });
        gates.entry(server).or_default().clone()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.gates).len()
    }
}

/// Whether a setup call made at `last` (this process, same server) came after the pass asked the
/// server at `asked`: the pass's answer may be old, so it asks again before calling.
pub fn set_up_since(last: Option<Instant>, asked: Option<Instant>) -> bool {
    match (last, asked) {
        (Some(last), Some(asked)) => last >= asked,
        // never asked in this pass: ask
        (Some(_), None) => true,
        (None, _) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_setup_after_the_question_asks_again() {
        let gates = SetupGates::default();
        let asked = Some(Instant::now());
        let gate = gates.gate("https://NB.example:443/");
        assert!(!set_up_since(*gate.lock().await, asked), "no setup yet");
        *gate.lock().await = Some(Instant::now());
        // the same server, written another way
        let same = gates.gate("https://nb.example");
        assert!(set_up_since(*same.lock().await, asked));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!set_up_since(*same.lock().await, Some(Instant::now())));
        assert!(!set_up_since(
            *gates.gate("https://other.example").lock().await,
            asked
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn gates_go_a_while_after_their_last_setup() {
        let gates = SetupGates::default();
        *gates.gate("https://a.example").lock().await = Some(Instant::now());
        drop(gates.gate("https://b.example"));
        tokio::time::advance(KEEP + Duration::from_secs(1)).await;
        let held = gates.gate("https://c.example");
        assert_eq!(gates.len(), 1, "only the gate someone holds is left");
        drop(held);
    }
}
