//! What a pass reports outward: the status write, the Events of transitions, the per-instance
//! metrics of a pass, and the gauges of instances by Ready state.

use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::Store;
use kube::{Api, Resource, ResourceExt};
use tracing::warn;

use super::decide::{self, Findings, Verdict};
use super::{Context, Error, report, status_patch, steps};
use crate::crd::{NetbirdInstance, NetbirdInstanceStatus};
use crate::metrics::{InstanceLabels, ReasonLabels};

pub(super) async fn write_status(
    api: &Api<NetbirdInstance>,
    name: &str,
    status: &NetbirdInstanceStatus,
) -> Result<Option<String>, Error> {
    let patch = serde_json::json!({ "status": status_patch::with_nulls(status) });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|written| written.metadata.resource_version)
        .map_err(Error::WriteStatus)
}

/// Puts a failing token write in the status at once (Ready False, Reconciling/StoringToken),
/// while the step that holds the token keeps retrying it (see [`steps::UrgentReport`]).
pub(super) async fn storing_token(ctx: &Context, nbi: &NetbirdInstance, message: &str) {
    let status = report::storing_token(
        nbi.status.as_ref(),
        nbi.metadata.generation,
        message,
        ctx.now(),
    );
    let api: Api<NetbirdInstance> = Api::namespaced(
        ctx.client.clone(),
        nbi.metadata.namespace.as_deref().unwrap_or_default(),
    );
    // the initial status of a first pass waits for this write, and is not written after it,
    // whether it succeeded or not: while the token is held, no status may say Progressing (found
    // by the history explorer: seed 3, history 3929, the urgent write answered 409)
    let gate = ctx.memory.side_status(&nbi.uid().unwrap_or_default());
    let mut urgent_tried = gate.lock().await;
    *urgent_tried = true;
    if let Err(e) = write_status(&api, &nbi.name_any(), &status).await {
        warn!(error = %e, "failed to report the failing token write in the status");
    }
}

/// An Event a pass publishes: its type, reason and note.
type EventOf = (EventType, &'static str, String);

pub(super) async fn publish_events(
    nbi: &NetbirdInstance,
    ctx: &Context,
    previous: Option<&NetbirdInstanceStatus>,
    status: &NetbirdInstanceStatus,
    verdict: &Verdict,
    findings: &Findings,
) {
    let mut events = Vec::new();
    let setup_performed = matches!(
        &findings.setup,
        Some(decide::SetupOutcome::TokenStored { .. })
    );
    if setup_performed {
        events.push(setup_performed_event(verdict));
    }
    if report::ready_of(previous) != report::ready_of(Some(status))
        && !(setup_performed && matches!(verdict, Verdict::Ready))
    {
        // a suspended instance's change of Ready publishes no Event at all
        let Some(event) = ready_event(status, verdict) else {
            return;
        };
        events.push(event);
    }
    if findings.abandoned_setup_ended {
        events.push(token_lost_event(nbi));
    }
    if findings.previous_retired {
        events.push(previous_retired_event(nbi));
    }
    events.extend(previous_still_in_use_event(previous, status));
    let reference = nbi.object_ref(&());
    for (type_, reason, note) in events {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
            warn!(error = %e, reason, "failed to publish an Event");
        }
    }
}

/// SetupPerformed: the one-time setup succeeded (and, in the usual case, made the instance Ready).
fn setup_performed_event(verdict: &Verdict) -> EventOf {
    // the usual case: the same pass made the instance Ready, and one Event tells both
    let note = match verdict {
        Verdict::Ready => {
            "the one-time setup succeeded; its token is stored and verified, and the instance is \
             Ready"
        }
        _ => "the one-time setup succeeded and its token is stored",
    };
    (EventType::Normal, "SetupPerformed", note.to_string())
}

/// The Event of a change of Ready (the verdict's reason); `None` when suspended.
fn ready_event(status: &NetbirdInstanceStatus, verdict: &Verdict) -> Option<EventOf> {
    let ready = status.conditions.iter().find(|c| c.type_ == report::READY);
    let message = ready.map(|c| c.message.clone()).unwrap_or_default();
    let (ty, reason) = match verdict {
        Verdict::Ready => (EventType::Normal, "Bootstrapped"),
        Verdict::Suspended => return None,
        Verdict::Waiting { reason, retry, .. } => (
            if *retry {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason.as_str(),
        ),
        Verdict::Stalled { reason, .. } => (EventType::Warning, reason.as_str()),
    };
    Some((ty, reason, message))
}

/// TokenLost: a token was stored while a setup was in flight, whose token was never stored.
fn token_lost_event(nbi: &NetbirdInstance) -> EventOf {
    (
        EventType::Warning,
        "TokenLost",
        format!(
            "a token was put into Secret {} while a setup of this operator was in flight; {}",
            nbi.token_secret_name(),
            crate::token_secret::setup_token_lost()
        ),
    )
}

/// PreviousTokenRetired: the previous token, unused, was deleted before its grace period ended.
fn previous_retired_event(nbi: &NetbirdInstance) -> EventOf {
    (
        EventType::Normal,
        "PreviousTokenRetired",
        format!(
            "NetBird saw no use of the previous token for spec.token.rotation.retireAfterUnused \
             ({}) since Secret {} changed, or no longer lists it: every consumer took the new \
             token, and the previous one was deleted before its grace period ended",
            nbi.spec.token.rotation.retire_after_unused,
            nbi.token_secret_name()
        ),
    )
}

/// PreviousTokenStillInUse, when TokenAvailable has just taken that reason, with its message.
fn previous_still_in_use_event(
    previous: Option<&NetbirdInstanceStatus>,
    status: &NetbirdInstanceStatus,
) -> Option<EventOf> {
    let reason_of = |s: Option<&NetbirdInstanceStatus>| {
        s.and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == report::TOKEN_AVAILABLE)
                .map(|c| c.reason.clone())
        })
    };
    let in_use = Some(report::PREVIOUS_TOKEN_STILL_IN_USE.to_string());
    if reason_of(Some(status)) != in_use || reason_of(previous) == in_use {
        return None;
    }
    let note = status
        .conditions
        .iter()
        .find(|c| c.type_ == report::TOKEN_AVAILABLE)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    Some((
        EventType::Warning,
        report::PREVIOUS_TOKEN_STILL_IN_USE,
        note,
    ))
}

/// Per-instance gauges (the chart's alerts) from the status this pass wrote, and the count of
/// passes that did not end Ready.
pub(super) fn observe(
    nbi: &NetbirdInstance,
    ctx: &Context,
    ns: &str,
    status: &NetbirdInstanceStatus,
    world: &steps::World,
    verdict: &Verdict,
    previous_in_use: bool,
) {
    let labels = InstanceLabels {
        namespace: ns.to_string(),
        name: nbi.name_any(),
    };
    let expires = world.token_secret.owned().and_then(|s| s.lifetime());
    // 1 while a consumer still uses the previous token near its grace period's end, 0 while a
    // followed previous token is pending, absent otherwise
    let previous_followed = world
        .token_secret
        .owned()
        .is_some_and(|s| s.previous_use_followable());
    ctx.memory.unless_gone(&nbi.uid().unwrap_or_default(), || {
        ctx.metrics.set_conditions(&labels, &status.conditions);
        if previous_followed {
            ctx.metrics
                .previous_token_in_use
                .get_or_create(&labels)
                .set(i64::from(previous_in_use));
        } else {
            ctx.metrics.previous_token_in_use.remove(&labels);
        }
        let seconds = expires.map(|(_, expires)| ctx.now().duration_until(expires).as_secs());
        ctx.metrics.set_token_expiry(&labels, seconds);
    });
    if !matches!(verdict, Verdict::Ready | Verdict::Suspended) {
        let reason = report::verdict_reason(verdict);
        ctx.metrics
            .reconcile_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

/// Gauges of instances by Ready state, from the watch cache.
pub fn instance_gauges(store: &Store<NetbirdInstance>) -> (i64, i64, i64, i64) {
    let (mut ready, mut not_ready, mut unknown, mut update) = (0, 0, 0, 0);
    for nbi in store.state() {
        match report::ready_of(nbi.status.as_ref()).map(|(s, _)| s) {
            Some(s) if s == report::ConditionStatus::True.as_str() => ready += 1,
            Some(s) if s == report::ConditionStatus::False.as_str() => not_ready += 1,
            _ => unknown += 1,
        }
        if nbi
            .status
            .as_ref()
            .and_then(|s| s.version.as_ref())
            .is_some_and(|v| v.update_available == Some(true))
        {
            update += 1;
        }
    }
    (ready, not_ready, unknown, update)
}
