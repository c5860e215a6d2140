//! What every pass shares ([`Context`]): the clients, the settings, the per-instance memory, the
//! Secret cache and its references, the setup gates, the shutdown and the clock; and the
//! [`Error`]s that end a pass early. Every floor of the controller (the pass, its steps, the
//! watches) reads it; it calls none of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::core::PartialObjectMeta;
use kube::runtime::events::Reporter;
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;

use super::{Recorder, memory, previous_use, refs, report, secrets, setup_gates};
use crate::metrics::Metrics;
use crate::netbird::ClientOptions;

/// Errors that end a pass early (the Kubernetes API failed); retried with backoff. Each message
/// names what failed and the Kubernetes error once (the error is not also a `source`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read Secret {name}: {error}")]
    ReadSecret { name: String, error: kube::Error },
    #[error("failed to write the status: {0}")]
    WriteStatus(kube::Error),
    #[error("failed to update the finalizers: {0}")]
    WriteFinalizer(kube::Error),
    #[error("the NetbirdInstance has no namespace")]
    NoNamespace,
}

impl Error {
    /// A bounded label for metrics and logs: one per kind of failure, never the error text.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::ReadSecret { .. } => "ReadSecretFailed",
            Error::WriteStatus(_) => "WriteStatusFailed",
            Error::WriteFinalizer(_) => "WriteFinalizerFailed",
            Error::NoNamespace => "NoNamespace",
        }
    }
}

/// Settings of the controller.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Watch these namespaces (one namespaced watch each), or all when empty.
    pub namespaces: Vec<String>,
    /// Reconciles run at once.
    pub concurrency: u16,
    /// Connect and request timeouts for NetBird.
    pub netbird: ClientOptions,
    /// Identity in Events (pod name).
    pub instance_id: Option<String>,
    /// Longest backoff between retries of a failing instance.
    pub max_backoff: Duration,
    /// How long the finalizer of `deletionPolicy: Delete` keeps trying to delete the token on the
    /// server (from the deletion request) before it lets go.
    pub finalizer_timeout: Duration,
    /// How long a token write still in flight keeps trying after a shutdown began (within the
    /// pod's termination grace period).
    pub shutdown_timeout: Duration,
    /// Key prefixes of `spec.token.secretLabels`/`secretAnnotations` refused besides the built-in
    /// ones (a Secret copier of this cluster): such an instance is Stalled/InvalidSpec.
    pub refused_secret_key_prefixes: Vec<String>,
    /// The shortest time between two looks at a replaced token's use (a minute; tests shorten
    /// it, as they move the clock to reach a rotation).
    pub previous_use_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            concurrency: 32,
            netbird: ClientOptions::default(),
            instance_id: None,
            max_backoff: Duration::from_secs(300),
            finalizer_timeout: Duration::from_secs(900),
            shutdown_timeout: Duration::from_secs(50),
            refused_secret_key_prefixes: Vec::new(),
            previous_use_interval: previous_use::MIN_INTERVAL,
        }
    }
}

/// Shared state of all passes.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// What passes remember about each instance, by uid; forgotten in one piece when the
    /// instance goes away (see [`Context::forget`]).
    pub(super) memory: memory::Memory,
    /// HTTP clients for NetBird by TLS settings (digest), shared by all instances and passes.
    pub(super) clients: Mutex<HashMap<[u8; 32], reqwest::Client>>,
    /// The Secrets passes read and wrote, used again while the watch reports them unchanged.
    pub(super) secret_cache: secrets::SecretCache,
    /// Which instances reference which Secret (the Secret watch's mapper asks it).
    pub(super) secret_refs: refs::SecretRefs,
    /// One setup call at a time per NetBird server (two instances may name one server).
    pub(super) setup_gates: setup_gates::SetupGates,
    pub shutdown: CancellationToken,
    /// When the shutdown began (set by [`run`] as `shutdown` is cancelled): the deadline of a
    /// token write still pending counts from it, not from that write's next failure.
    pub(super) shutdown_began: std::sync::OnceLock<tokio::time::Instant>,
    /// The clock (tests move it forward to reach a token's rotation time).
    pub clock: Arc<dyn Fn() -> jiff::Timestamp + Send + Sync>,
    /// Test seam: NetBird servers simulated in memory instead of reqwest (the history explorer).
    pub netbird_network: Option<Arc<dyn crate::netbird::SimulatedNetwork>>,
}

impl Context {
    /// Now, in whole seconds (what the apiserver keeps in timestamps).
    pub fn now(&self) -> jiff::Timestamp {
        report::to_time((self.clock)()).0
    }

    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> Self {
        let reporter = Reporter {
            controller: "netbird-operator".into(),
            instance: settings.instance_id.clone(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            settings,
            memory: memory::Memory::default(),
            clients: Mutex::default(),
            secret_cache: secrets::SecretCache::default(),
            secret_refs: refs::SecretRefs::default(),
            setup_gates: setup_gates::SetupGates::default(),
            shutdown,
            shutdown_began: std::sync::OnceLock::new(),
            clock: Arc::new(jiff::Timestamp::now),
            netbird_network: None,
        }
    }

    /// Test seam: an event of the Secrets' metadata watch, delivered by a simulation.
    pub fn observe_secret(&self, event: &watcher::Event<PartialObjectMeta<Secret>>) {
        self.secret_cache.observe(event);
    }

    /// When a write that holds a token must give up: `shutdown_timeout` after the shutdown began
    /// (None while the process is not shutting down).
    pub(crate) fn shutdown_deadline(&self) -> Option<tokio::time::Instant> {
        if !self.shutdown.is_cancelled() {
            return None;
        }
        let began = *self.shutdown_began.get_or_init(tokio::time::Instant::now);
        Some(began + self.settings.shutdown_timeout)
    }

    /// Drops everything remembered about an instance that went away, and its metric series.
    pub fn forget(&self, uid: &str) {
        self.memory.forget(uid, &self.metrics);
    }

    /// Whether a token Secret write carrying a token NetBird issued is held in memory for the
    /// instance (its Secret could not be written; the status says StoringToken). For the history
    /// explorer: such a token is held, not lost.
    pub fn holds_token(&self, uid: &str) -> bool {
        self.memory.holds_token(uid)
    }

    /// How many instances the passes remember something about.
    pub fn remembered(&self) -> usize {
        self.memory.remembered()
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_own_reason() {
        let kube = || kube::Error::LinesCodecMaxLineLengthExceeded;
        let reasons: std::collections::HashSet<_> = [
            Error::ReadSecret {
                name: "s".into(),
                error: kube(),
            },
            Error::WriteStatus(kube()),
            Error::WriteFinalizer(kube()),
            Error::NoNamespace,
        ]
        .iter()
        .map(Error::reason)
        .collect();
        assert_eq!(reasons.len(), 4);
    }
}
