//! The NetbirdInstance controller: watches, the reconcile pass, requeue and backoff.
//!
//! A pass reads the world (the instance and its Secrets), asks [`decide::decide`] for the next
//! step,
//! does that one step, and asks again until the decision is a verdict; then it writes the status
//! (only when it changed) and Events for transitions.

pub mod cleanup;
pub mod decide;
mod memory;
mod namespaces;
mod pass;
mod previous_use;
mod publish;
mod recorder;
mod refs;
pub mod report;
mod schedule;
mod secrets;
mod status_patch;
mod steps;
mod trim;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::crd::NetbirdInstance;
use crate::metrics::{Metrics, ReasonLabels, ResultLabels};
use crate::netbird::ClientOptions;
pub use pass::reconcile;
pub use publish::instance_gauges;
pub use recorder::Recorder;
pub use schedule::{backoff_delay, set_jitter_source};

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
    memory: memory::Memory,
    /// HTTP clients for NetBird by TLS settings (digest), shared by all instances and passes.
    clients: Mutex<HashMap<[u8; 32], reqwest::Client>>,
    /// The Secrets passes read and wrote, used again while the watch reports them unchanged.
    secret_cache: secrets::SecretCache,
    /// Which instances reference which Secret (the Secret watch's mapper asks it).
    secret_refs: refs::SecretRefs,
    pub shutdown: CancellationToken,
    /// When the shutdown began (set by [`run`] as `shutdown` is cancelled): the deadline of a
    /// token write still pending counts from it, not from that write's next failure.
    shutdown_began: std::sync::OnceLock<tokio::time::Instant>,
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

    /// How many instances the passes remember something about.
    pub fn remembered(&self) -> usize {
        self.memory.remembered()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs the controller until `ctx.shutdown` is cancelled. `on_synced` is called once the
/// NetbirdInstance watch has listed everything.
pub async fn run(
    ctx: Arc<Context>,
    store_slot: Arc<std::sync::OnceLock<Store<NetbirdInstance>>>,
    on_synced: impl FnOnce() + Send + 'static,
) {
    let client = ctx.client.clone();
    // the moment the shutdown begins, for the deadline of pending token writes
    let began_ctx = ctx.clone();
    tokio::spawn(async move {
        began_ctx.shutdown.cancelled().await;
        began_ctx
            .shutdown_began
            .get_or_init(tokio::time::Instant::now);
    });
    let (store, writer) = reflector::store();
    let instance_events = instance_events(&ctx, writer);
    let controller = Controller::for_stream(instance_events, store.clone());
    let _ = store_slot.set(store.clone());

    // Secrets are watched by metadata only: memory does not grow with the Secrets of the cluster.
    // The watch keeps the cache of the Secrets passes use current (see `secrets`), and an event for
    // a Secret that a NetbirdInstance references triggers its pass.
    let cache_ctx = ctx.clone();
    let secret_events = watch_each::<PartialObjectMeta<Secret>>(&client, &ctx.settings.namespaces)
        .modify(trim::secret_meta)
        .inspect(move |event| {
            if let Ok(event) = event {
                cache_ctx.secret_cache.observe(event);
            }
        })
        .touched_objects();
    let mapper_ctx = ctx.clone();
    let mapper = move |secret: PartialObjectMeta<Secret>| {
        let (Some(ns), Some(name)) = (&secret.metadata.namespace, &secret.metadata.name) else {
            return Vec::new();
        };
        // the echo of an own token Secret write brings that instance nothing new
        let own = mapper_ctx.secret_cache.own_write(&secret.metadata);
        mapper_ctx
            .secret_refs
            .referencing(ns, name, own.then_some(refs::Role::Token))
    };

    tokio::spawn(notify_when_synced(
        store.clone(),
        ctx.shutdown.clone(),
        on_synced,
    ));

    let shutdown = ctx.shutdown.clone();
    controller
        .watches_stream(secret_events, mapper)
        .with_config(
            kube::runtime::controller::Config::default().concurrency(ctx.settings.concurrency),
        )
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|res| {
            let ctx = ctx.clone();
            async move {
                match res {
                    Ok(_) => {}
                    Err(kube::runtime::controller::Error::ObjectNotFound(obj)) => {
                        // deleted: drop what the passes remembered about it
                        if let Some(uid) = obj.extra.uid.as_deref() {
                            ctx.forget(uid);
                        }
                    }
                    Err(e) => warn!(error = %e, "reconcile failed"),
                }
            }
        })
        .await;
    store_held_writes(&ctx).await;
}

/// At shutdown: the token writes held in memory are tried until the shutdown deadline; what is
/// still not written is said loudly, instance by instance.
async fn store_held_writes(ctx: &Context) {
    for held in ctx.memory.take_all_held_writes() {
        let secrets = secrets::Secrets::new(ctx.client.clone(), &held.namespace, &ctx.secret_cache);
        let mut delay = Duration::from_millis(200);
        loop {
            let deadline = ctx
                .shutdown_deadline()
                .unwrap_or_else(tokio::time::Instant::now);
            let attempt = tokio::time::timeout_at(deadline, held.attempt(&secrets)).await;
            match attempt {
                Ok(Ok(_)) => {
                    info!(namespace = %held.namespace, instance = %held.instance, "stored the \
                        held token Secret write at shutdown");
                    break;
                }
                _ if tokio::time::Instant::now() + delay >= deadline => {
                    if held.holds_token {
                        error!(
                            namespace = %held.namespace,
                            instance = %held.instance,
                            secret = %held.secret,
                            "shutting down with the token not stored: the token NetBird issued \
                             is LOST (NetBird shows a token only once). Log in to the dashboard \
                             as the owner, create a personal access token and put it under the \
                             token Secret's key"
                        );
                    }
                    break;
                }
                _ => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// The NetbirdInstance watch, stored in the reflector `writer`. Every way an instance goes away
/// forgets it: a deletion the watch reports (whatever state the instance was in: Stalled and
/// suspended ones have no pass left to notice), and one a relist reveals by its absence. The events
/// also keep the index of which instances reference which Secret.
fn instance_events(
    ctx: &Arc<Context>,
    writer: reflector::store::Writer<NetbirdInstance>,
) -> impl futures::Stream<Item = Result<NetbirdInstance, watcher::Error>> + Send + 'static {
    let forget_ctx = ctx.clone();
    let refs_ctx = ctx.clone();
    let mut listed = std::collections::HashSet::new();
    watch_each::<NetbirdInstance>(&ctx.client, &ctx.settings.namespaces)
        .inspect(move |event| {
            if let Ok(event) = event {
                for (ns, name) in refs_ctx.secret_refs.observe(event) {
                    refs_ctx.secret_cache.forget(&ns, &name);
                }
            }
        })
        .inspect(move |event| match event {
            Ok(watcher::Event::Delete(nbi)) => {
                if let Some(uid) = nbi.uid() {
                    forget_ctx.forget(&uid);
                }
            }
            Ok(watcher::Event::Init) => listed.clear(),
            Ok(watcher::Event::InitApply(nbi)) => {
                listed.extend(nbi.uid());
            }
            Ok(watcher::Event::InitDone) => forget_ctx.memory.forget_all_but(&listed, &forget_ctx.metrics),
            _ => {}
        })
        // the store keeps what the passes read and nothing more
        .modify(trim::instance)
        .reflect(writer)
        .applied_objects()
}

/// Calls `on_synced` once the instance store has listed everything.
async fn notify_when_synced(
    store: Store<NetbirdInstance>,
    shutdown: CancellationToken,
    on_synced: impl FnOnce() + Send + 'static,
) {
    // The controller's own runner waits on the same store; a second waiter is not always woken
    // (kube-runtime's DelayedInit), so each wait is bounded and retried.
    loop {
        tokio::select! {
            res = tokio::time::timeout(
                Duration::from_millis(100),
                store.wait_until_ready(),
            ) => match res {
                Ok(Ok(())) => { on_synced(); return; }
                Ok(Err(_)) => return,
                Err(_) => continue,
            },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The watch events of `K` in `namespaces` (all when empty), with backoff: one watch for all
/// namespaces or a single one, one namespaced watch per namespace merged otherwise (what a Role per
/// namespace allows).
fn watch_each<K>(
    client: &Client,
    namespaces: &[String],
) -> futures::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
    K: Clone + std::fmt::Debug + serde::de::DeserializeOwned,
    K: Send + Sync + 'static,
{
    let watch = |api: Api<K>| {
        watcher(api, watcher::Config::default().any_semantic())
            .default_backoff()
            .boxed()
    };
    match namespaces {
        [] => watch(Api::all(client.clone())),
        [ns] => watch(Api::namespaced(client.clone(), ns)),
        many => namespaces::merge(
            many.iter()
                .map(|ns| (ns.clone(), watch(Api::namespaced(client.clone(), ns))))
                .collect(),
        )
        .boxed(),
    }
}

fn error_policy(nbi: Arc<NetbirdInstance>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabels { result: "error" })
        .inc();
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ReasonLabels {
            reason: err.reason(),
        })
        .inc();
    let delay = ctx.memory.backoff(
        nbi.uid().as_deref().unwrap_or_default(),
        ctx.settings.max_backoff,
    );
    warn!(
        namespace = nbi.namespace().unwrap_or_default(),
        name = %nbi.name_any(),
        reason = err.reason(),
        error = %err,
        retry_in = ?delay,
        "pass failed"
    );
    // on the instance too, where `kubectl describe` shows it (the recorder counts a repeated Event
    // in its series); published on the side: the policy itself cannot wait
    let ev = Event {
        type_: EventType::Warning,
        reason: err.reason().into(),
        // the same note each time (the retry delay is in the log), so repeats join one series
        note: Some(err.to_string().chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    let (recorder, reference) = (ctx.recorder.clone(), nbi.object_ref(&()));
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&ev, &reference).await {
            warn!(error = %e, reason = ev.reason, "failed to publish an Event");
        }
    });
    Action::requeue(delay)
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
