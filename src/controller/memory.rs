//! What the operator remembers about each instance between passes, in this process only (never
//! stored anywhere): the backoff and the retry gate, the cached verification, the status it wrote
//! last, held token writes, the looks at a previous token's use; and the uids of instances that
//! went away, so a late pass cannot bring their memory back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::ResourceExt;
use tracing::error;

use super::backoff::backoff_delay;
use super::decide::Verified;
use super::{lock, previous_use, steps};
use crate::crd::{NetbirdInstance, NetbirdInstanceStatus};
use crate::metrics::{InstanceLabels, Metrics};

/// What the passes remember about one instance between passes (never stored anywhere).
#[derive(Default)]
struct InstanceMemory {
    /// Namespace and name, to remove the instance's metric series when it is forgotten.
    key: (String, String),
    /// Consecutive failures, for backoff.
    failures: u32,
    /// Failed attempts of the finalizer's token deletion.
    delete_failures: u32,
    /// A retry scheduled: not before this instant, unless the inputs (digest of generation and
    /// Secret resourceVersions) changed. A pass woken by the operator's own status write then waits
    /// for its retry instead of calling NetBird again. Boxed: a Ready instance has none.
    retry: Option<Box<(tokio::time::Instant, [u8; 32])>>,
    /// The token verified recently: digest of the token, the generation and the server, and the
    /// result. A pass that changes nothing makes no call to NetBird; a new token or a spec change
    /// verifies again.
    verified: Option<([u8; 32], Verified)>,
    /// The last fingerprint comparison: digest of (fingerprint, credentials), and whether they
    /// matched.
    fingerprint_check: Option<([u8; 32], bool)>,
    /// The status the last pass wrote, and the resourceVersions that write superseded: a pass that
    /// gets the instance at one of those (the watch has not delivered the write yet) takes this
    /// status as the instance's, instead of writing the same status and Event again. Dropped once
    /// a pass gets a newer copy (boxed: most instances hold none, about 1.5 KiB less each).
    own_status: Option<Box<(Vec<String>, NetbirdInstanceStatus)>>,
    /// Server errors (5xx) setup answered in a row, for the digest of the generation and the
    /// credentials Secret's resourceVersion they were answered for. Boxed: most instances have
    /// none.
    setup_server_errors: Option<Box<([u8; 32], u32)>>,
    /// Held across the status writes made during a pass besides its outcome (the initial status,
    /// the report of a token held in memory); true once the urgent one was tried, so the routine
    /// one never replaces it (nor says Progressing while the token is held: when the urgent write
    /// failed, the pass's outcome says StoringToken). Made when first needed (most instances never need it).
    side_status: Option<Arc<tokio::sync::Mutex<bool>>>,
    /// A token Secret write that kept failing, held for the next passes (and the shutdown); boxed:
    /// most instances hold none.
    held_write: Option<Box<steps::HeldWrite>>,
    /// The looks at a replaced token's use while it is in its grace period (boxed: most instances
    /// have no previous token).
    previous_use: Option<Box<previous_use::Watch>>,
}

/// The memory of every instance, and the uids of instances that went away (a uid is never used
/// again, so a pass that ends after its instance's deletion cannot bring its memory back).
#[derive(Default)]
struct Memories {
    /// Boxed: the table then holds a pointer per slot, not a whole memory (a table of 10,000 has
    /// 16,384 slots).
    live: HashMap<String, Box<InstanceMemory>>,
    gone: std::collections::HashSet<String>,
    /// The order `gone` was filled in, to keep it bounded.
    gone_order: std::collections::VecDeque<String>,
}

impl Memories {
    /// Enough for passes still in flight when their instances were deleted: a pass ends within
    /// minutes, long before this many deletions follow it.
    const MAX_GONE: usize = 16_384;

    fn bury(&mut self, uid: &str) {
        if self.gone.insert(uid.to_string()) {
            self.gone_order.push_back(uid.to_string());
        }
        while self.gone_order.len() > Self::MAX_GONE {
            if let Some(old) = self.gone_order.pop_front() {
                self.gone.remove(&old);
            }
        }
    }
}

/// What the passes remember about each instance, by uid; forgotten in one piece when the instance
/// goes away (see [`Memory::forget`]).
#[derive(Default)]
pub(super) struct Memory {
    memories: Mutex<Memories>,
}

impl Memory {
    /// Runs `f` on the memory of instance `uid` (created empty when there is none). An instance
    /// that went away is not remembered again by a pass that ends after its deletion: `f` then
    /// runs on a memory that is dropped at once.
    fn remember<T>(&self, uid: &str, f: impl FnOnce(&mut InstanceMemory) -> T) -> T {
        let mut memory = lock(&self.memories);
        if memory.gone.contains(uid) {
            return f(&mut InstanceMemory::default());
        }
        f(memory.live.entry(uid.to_string()).or_default())
    }

    /// Reads the memory of instance `uid`, if there is any (never creates it).
    fn recall<T>(&self, uid: &str, f: impl FnOnce(&InstanceMemory) -> Option<T>) -> Option<T> {
        lock(&self.memories).live.get(uid).and_then(|m| f(m))
    }

    /// Runs `f` (which sets the instance's metric series) unless the instance went away: checked
    /// and done under the memory's lock, so a deletion cannot fall between the two.
    pub(super) fn unless_gone(&self, uid: &str, f: impl FnOnce()) {
        let memory = lock(&self.memories);
        if !memory.gone.contains(uid) {
            f();
        }
    }

    pub(super) fn backoff(&self, uid: &str, max_backoff: Duration) -> Duration {
        let n = self.remember(uid, |m| {
            m.failures = m.failures.saturating_add(1);
            m.failures
        });
        backoff_delay(n, max_backoff)
    }

    /// The backoff the next failure will get (what `backoff` is about to return), without
    /// counting one.
    pub(super) fn next_backoff(&self, uid: &str, max_backoff: Duration) -> Duration {
        let n = self.recall(uid, |m| Some(m.failures)).unwrap_or_default();
        backoff_delay(n.saturating_add(1), max_backoff)
    }

    pub(super) fn reset_backoff(&self, uid: &str) {
        if let Some(m) = lock(&self.memories).live.get_mut(uid) {
            m.failures = 0;
        }
    }

    /// How long a pass with these inputs still has to wait for its scheduled retry.
    pub(super) fn retry_pending(&self, uid: &str, inputs: &[u8; 32]) -> Option<Duration> {
        let (at, scheduled_for) = self.recall(uid, |m| m.retry.as_deref().copied())?;
        let left = at.saturating_duration_since(tokio::time::Instant::now());
        (scheduled_for == *inputs && !left.is_zero()).then_some(left)
    }

    pub(super) fn schedule_retry(&self, uid: &str, after: Option<Duration>, inputs: [u8; 32]) {
        self.remember(uid, |m| {
            m.retry = after.map(|d| Box::new((tokio::time::Instant::now() + d, inputs)));
        });
    }

    pub(super) fn cached_verification(
        &self,
        uid: &str,
        digest: &[u8; 32],
        max_age: Duration,
        now: jiff::Timestamp,
    ) -> Option<Verified> {
        let (d, v) = self.recall(uid, |m| m.verified.clone())?;
        let age = now.duration_since(v.at).unsigned_abs();
        (d == *digest && age < max_age).then_some(v)
    }

    pub(super) fn remember_verification(&self, uid: &str, digest: [u8; 32], v: &Verified) {
        self.remember(uid, |m| m.verified = Some((digest, v.clone())));
    }

    pub(super) fn forget_verification(&self, uid: &str) {
        if let Some(m) = lock(&self.memories).live.get_mut(uid) {
            m.verified = None;
        }
    }

    /// The gate of the status writes a pass makes besides its outcome (see
    /// [`InstanceMemory::side_status`]).
    pub(crate) fn side_status(&self, uid: &str) -> Arc<tokio::sync::Mutex<bool>> {
        self.remember(uid, |m| {
            m.side_status.get_or_insert_with(Arc::default).clone()
        })
    }

    /// Holds a token Secret write that kept failing, for the instance's next pass.
    pub(crate) fn hold_write(&self, uid: &str, write: steps::HeldWrite) {
        self.remember(uid, |m| m.held_write = Some(Box::new(write)));
    }

    /// The write held for the instance, taken out of memory.
    pub(super) fn take_held_write(&self, uid: &str) -> Option<steps::HeldWrite> {
        lock(&self.memories)
            .live
            .get_mut(uid)
            .and_then(|m| m.held_write.take())
            .map(|held| *held)
    }

    /// Whether a write that carries a token is held for the instance.
    pub(super) fn holds_token(&self, uid: &str) -> bool {
        lock(&self.memories)
            .live
            .get(uid)
            .and_then(|m| m.held_write.as_ref())
            .is_some_and(|held| held.holds_token)
    }

    /// Every held write, taken out of memory (at shutdown).
    pub(super) fn take_all_held_writes(&self) -> Vec<steps::HeldWrite> {
        lock(&self.memories)
            .live
            .values_mut()
            .filter_map(|m| m.held_write.take())
            .map(|held| *held)
            .collect()
    }

    /// Server errors setup answered in a row for this spec and these credentials (`key`).
    pub(super) fn setup_server_errors(&self, uid: &str, key: &[u8; 32]) -> u32 {
        self.recall(uid, |m| m.setup_server_errors.as_deref().copied())
            .filter(|(k, _)| k == key)
            .map_or(0, |(_, n)| n)
    }

    /// Counts a server error of setup for `key` (or starts the count again after another answer).
    pub(super) fn count_setup_server_error(&self, uid: &str, key: [u8; 32], server_error: bool) {
        let before = self.setup_server_errors(uid, &key);
        self.remember(uid, |m| {
            m.setup_server_errors = server_error.then(|| Box::new((key, before.saturating_add(1))));
        });
    }

    /// The last fingerprint comparison for `uid`, when it was made for `key`.
    pub(crate) fn fingerprint_check(&self, uid: &str, key: &[u8; 32]) -> Option<bool> {
        self.recall(uid, |m| {
            m.fingerprint_check
                .filter(|(k, _)| k == key)
                .map(|(_, same)| same)
        })
    }

    pub(crate) fn remember_fingerprint_check(&self, uid: &str, key: [u8; 32], same: bool) {
        self.remember(uid, |m| m.fingerprint_check = Some((key, same)));
    }

    /// The instance with the status this process wrote last, when `nbi` is a copy from before that
    /// write (see [`InstanceMemory::own_status`]).
    pub(super) fn newer_own_status(&self, nbi: &NetbirdInstance) -> Option<NetbirdInstance> {
        let rv = nbi.metadata.resource_version.as_ref()?;
        let mut memory = lock(&self.memories);
        let own = &mut memory.live.get_mut(&nbi.uid()?)?.own_status;
        if !own.as_ref().is_some_and(|o| o.0.contains(rv)) {
            // none, or this copy is from after the write and holds it
            *own = None;
            return None;
        }
        let status = own.as_ref()?.1.clone();
        drop(memory);
        Some(NetbirdInstance {
            status: Some(status),
            ..nbi.clone()
        })
    }

    /// What the passes know about the previous token's use, if anything.
    pub(super) fn previous_use_watch(&self, uid: &str) -> Option<previous_use::Watch> {
        self.recall(uid, |m| m.previous_use.as_deref().cloned())
    }

    pub(super) fn set_previous_use_watch(&self, uid: &str, watch: Option<previous_use::Watch>) {
        let had = self
            .recall(uid, |m| m.previous_use.as_ref().map(|_| ()))
            .is_some();
        if had || watch.is_some() {
            self.remember(uid, |m| m.previous_use = watch.map(Box::new));
        }
    }

    /// Keeps the status a pass wrote and the resourceVersions that write superseded (see
    /// [`InstanceMemory::own_status`]).
    pub(super) fn remember_own_status(
        &self,
        uid: &str,
        superseded: Vec<String>,
        status: NetbirdInstanceStatus,
    ) {
        self.remember(uid, |m| {
            m.own_status = Some(Box::new((superseded, status)));
        });
    }

    /// Counts a failed attempt of the finalizer's token deletion; returns the count.
    pub(super) fn delete_attempt(&self, uid: &str) -> u32 {
        self.remember(uid, |m| {
            m.delete_failures = m.delete_failures.saturating_add(1);
            m.delete_failures
        })
    }

    /// Records where the instance lives (for its metric series).
    pub(super) fn remember_key(&self, uid: &str, namespace: &str, name: &str) {
        self.remember(uid, |m| m.key = (namespace.to_string(), name.to_string()));
    }

    /// Drops everything remembered about an instance that went away, and its metric series.
    pub(super) fn forget(&self, uid: &str, metrics: &Metrics) {
        let mut memory = lock(&self.memories);
        let gone = memory.live.remove(uid);
        memory.bury(uid);
        if let Some(held) = gone.as_ref().and_then(|m| m.held_write.as_ref())
            && held.holds_token
        {
            error!(
                namespace = %held.namespace,
                instance = %held.instance,
                secret = %held.secret,
                "the NetbirdInstance was deleted while its token could not be written: the token \
                 NetBird issued is LOST (NetBird shows a token only once)"
            );
        }
        if let Some(m) = gone {
            metrics.forget_instance(&InstanceLabels {
                namespace: m.key.0,
                name: m.key.1,
            });
        }
        drop(memory);
        metrics.remembered_instances.set(self.remembered() as i64);
    }

    /// Forgets every instance not in `live` (uids), after a relist may have missed deletions.
    pub(super) fn forget_all_but(
        &self,
        live: &std::collections::HashSet<String>,
        metrics: &Metrics,
    ) {
        let gone: Vec<String> = lock(&self.memories)
            .live
            .keys()
            .filter(|uid| !live.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            self.forget(&uid, metrics);
        }
    }

    /// How many instances the passes remember something about.
    pub(super) fn remembered(&self) -> usize {
        lock(&self.memories).live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{Context, Settings};
    use kube::Client;
    use tokio_util::sync::CancellationToken;

    /// A pass that ends after its instance's Delete event (which forgot it) brings back neither
    /// its memory nor its metric series (the Stalled alert kept firing for deleted instances).
    #[tokio::test]
    async fn a_pass_after_the_deletion_remembers_nothing() {
        crate::tls::install_crypto_provider();
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let metrics = Arc::new(Metrics::default());
        let ctx = Context::new(
            client,
            metrics.clone(),
            Settings::default(),
            CancellationToken::new(),
        );
        ctx.memory.remember_key("uid-1", "ns", "nb");
        assert_eq!(ctx.remembered(), 1);
        ctx.forget("uid-1");
        assert_eq!(ctx.remembered(), 0);
        // what a late pass does: its schedule, its backoff, its gauges
        ctx.memory.remember_key("uid-1", "ns", "nb");
        let _ = ctx.memory.backoff("uid-1", ctx.settings.max_backoff);
        let mut set = false;
        ctx.memory.unless_gone("uid-1", || set = true);
        assert_eq!(
            ctx.remembered(),
            0,
            "the deleted instance is not remembered again"
        );
        assert!(!set, "no metric series for a deleted instance");
        // another instance is remembered as before
        ctx.memory.remember_key("uid-2", "ns", "nb2");
        ctx.memory.unless_gone("uid-2", || set = true);
        assert_eq!(ctx.remembered(), 1);
        assert!(set);
    }

    /// The memory of a Ready instance (its key, a verification, a fingerprint comparison, no
    /// retry), with 10,000 instances.
    #[test]
    fn footprint_of_the_memory_of_a_ready_instance() {
        use crate::footprint::kept_by;
        const N: usize = 10_000;
        let memory = Memory::default();
        let verified = Verified {
            user: crate::netbird::User {
                id: "d2a1c6c8-6a5b-4c3e-9f47-2b1e0a9d7c11".into(),
                email: "admin@example.com".into(),
                name: "admin".into(),
                role: "owner".into(),
                is_service_user: false,
                status: "active".into(),
            },
            at: jiff::Timestamp::UNIX_EPOCH,
        };
        let uid = |i: usize| format!("6f1c2b9e-0d4a-4e8b-9c3f-{i:012}");
        let ((), bytes) = kept_by(|| {
            for i in 0..N {
                let uid = uid(i);
                memory.remember_key(&uid, "scale-10000", &format!("s{i}"));
                memory.remember_verification(&uid, [1; 32], &verified);
                memory.remember_fingerprint_check(&uid, [2; 32], true);
                memory.schedule_retry(&uid, None, [3; 32]);
            }
        });
        eprintln!(
            "per-instance memory: {} bytes per instance ({} inline)",
            bytes / N as isize,
            std::mem::size_of::<InstanceMemory>()
        );
    }
}
