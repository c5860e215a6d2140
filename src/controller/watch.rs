//! The watches and their wiring: the NetbirdInstance watch (which forgets instances that went
//! away), the Secrets' metadata watch (which keeps the Secret cache current and wakes the passes of
//! the instances that reference a Secret), the controller that runs the passes, the error policy
//! of a failed pass, and the held token writes stored at shutdown.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::pass::reconcile;
use super::{Context, Error, namespaces, refs, secrets, trim};
use crate::crd::NetbirdInstance;
use crate::metrics::{ReasonLabels, ResultLabels};

/// Runs the controller until `ctx.shutdown` is cancelled. `on_synced` is called once the
/// NetbirdInstance watch has listed everything.
pub async fn run(
    ctx: Arc<Context>,
    store_slot: Arc<std::sync::OnceLock<Store<NetbirdInstance>>>,
    on_synced: impl FnOnce() + Send + 'static,
) {
    spawn_shutdown_clock(&ctx);
    let (store, writer) = reflector::store();
    let instance_events = instance_events(&ctx, writer);
    let controller = Controller::for_stream(instance_events, store.clone());
    let _ = store_slot.set(store.clone());

    // Secrets are watched by metadata only: memory does not grow with the Secrets of the cluster.
    // The watch keeps the cache of the Secrets passes use current (see `secrets`), and an event for
    // a Secret that a NetbirdInstance references triggers its pass.
    let secret_events = secret_events(&ctx);
    let mapper = instances_referencing(&ctx);

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

/// Notes the moment the shutdown begins, for the deadline of pending token writes.
fn spawn_shutdown_clock(ctx: &Arc<Context>) {
    let began_ctx = ctx.clone();
    tokio::spawn(async move {
        began_ctx.shutdown.cancelled().await;
        began_ctx
            .shutdown_began
            .get_or_init(tokio::time::Instant::now);
    });
}

/// The Secrets' metadata watch, which keeps the Secret cache current.
fn secret_events(
    ctx: &Arc<Context>,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send + 'static
{
    let cache_ctx = ctx.clone();
    watch_each::<PartialObjectMeta<Secret>>(&ctx.client, &ctx.settings.namespaces)
        .modify(trim::secret_meta)
        .inspect(move |event| {
            if let Ok(event) = event {
                cache_ctx.secret_cache.observe(event);
            }
        })
        .touched_objects()
}

/// The instances whose pass a Secret's event triggers (not for the echo of an own write).
fn instances_referencing(
    ctx: &Arc<Context>,
) -> impl Fn(PartialObjectMeta<Secret>) -> Vec<ObjectRef<NetbirdInstance>> + Send + Sync + 'static {
    let mapper_ctx = ctx.clone();
    move |secret: PartialObjectMeta<Secret>| {
        let (Some(ns), Some(name)) = (&secret.metadata.namespace, &secret.metadata.name) else {
            return Vec::new();
        };
        // the echo of an own token Secret write brings that instance nothing new
        let own = mapper_ctx.secret_cache.own_write(&secret.metadata);
        mapper_ctx
            .secret_refs
            .referencing(ns, name, own.then_some(refs::Role::Token))
    }
}

/// The retries of a held token write at shutdown (short: the deadline is near).
const SHUTDOWN_RETRY: super::backoff::Backoff = super::backoff::Backoff {
    first: Duration::from_millis(200),
    max: Duration::from_secs(5),
};

/// At shutdown: the token writes held in memory are tried until the shutdown deadline; what is
/// still not written is said loudly, instance by instance. Public for the history explorer, whose
/// SIGTERM ends the way `run` does.
pub async fn store_held_writes(ctx: &Context) {
    for mut held in ctx.memory.take_all_held_writes() {
        let secrets = secrets::Secrets::new(ctx.client.clone(), &held.namespace, &ctx.secret_cache);
        let mut failures = 0;
        loop {
            let deadline = ctx
                .shutdown_deadline()
                .unwrap_or_else(tokio::time::Instant::now);
            let attempt = tokio::time::timeout_at(deadline, held.attempt(&secrets)).await;
            let wait = SHUTDOWN_RETRY.delay(failures + 1);
            match attempt {
                Ok(Ok(_)) => {
                    info!(namespace = %held.namespace, instance = %held.instance, "stored the held \
                                                                                   token Secret \
                                                                                   write at \
                                                                                   shutdown");
                    break;
                }
                _ if tokio::time::Instant::now() + wait >= deadline => {
                    if held.holds_token {
                        error!(
                            namespace = %held.namespace,
                            instance = %held.instance,
                            secret = %held.secret,
                            "shutting down with the token not stored: the token NetBird issued is \
                             LOST (NetBird shows a token only once). Log in to the dashboard as \
                             the owner, create a personal access token and put it under the token \
                             Secret's key"
                        );
                    }
                    break;
                }
                _ => {
                    failures += 1;
                    tokio::time::sleep(wait).await;
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
