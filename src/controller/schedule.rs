//! When the next pass runs: the schedule a pass ends with (from its verdict, its status, the token
//! Secret and the clock), what counts as a failure, and when the version check is due (the
//! backoff itself is `backoff.rs`).

use std::time::Duration;

use kube::runtime::controller::Action;
use tracing::info;

use super::decide::{Findings, Verdict};
use super::pass::{PassInputs, PassOutcome};
use super::{Context, report, steps};
use crate::crd::{NetbirdInstance, NetbirdInstanceStatus};

/// Schedules the next pass: counts or resets the backoff, keeps the retry for the retry gate with
/// what this pass read (after its own writes: see `retry_pending`), and logs the verdict.
pub(super) fn schedule(
    nbi: &NetbirdInstance,
    ctx: &Context,
    pass_inputs: &PassInputs,
    outcome: &PassOutcome,
    status: &NetbirdInstanceStatus,
    world: &steps::World,
) -> Action {
    let (verdict, uid) = (&outcome.verdict, &pass_inputs.uid);
    let backoff = match counts_as_failure(verdict, &outcome.findings) {
        Some(true) => Some(ctx.memory.backoff(uid, ctx.settings.max_backoff)),
        Some(false) => {
            ctx.memory.reset_backoff(uid);
            None
        }
        None => None,
    };
    let next = requeue(&RequeueInput {
        verdict,
        status,
        token_secret: world.token_secret.owned(),
        rotation_enabled: nbi.spec.token.rotation.enabled,
        started: pass_inputs.started,
        now: ctx.now(),
        interval: pass_inputs.interval,
        backoff,
        max_backoff: ctx.settings.max_backoff,
        previous_use_next: ctx.memory.previous_use_watch(uid).map(|w| w.next),
    });
    if let Some(log) = next.log {
        info!(reason = report::verdict_reason(verdict), requeue_in = ?next.after, "{log}");
    }
    ctx.memory
        .schedule_retry(uid, next.retry, world.inputs_digest(pass_inputs.generation));
    ctx.metrics
        .remembered_instances
        .set(ctx.remembered() as i64);
    next.after
        .map_or_else(Action::await_change, Action::requeue)
}

/// Whether a pass counts as a failure for the backoff (Some(true)), resets it (Some(false)), or
/// leaves it (None: suspended).
fn counts_as_failure(verdict: &Verdict, findings: &Findings) -> Option<bool> {
    match verdict {
        Verdict::Ready => Some(
            matches!(findings.version, Some(Err(_)))
                || findings.rotation_error.is_some()
                || findings.exchange_error.is_some()
                || matches!(findings.token_list, Some(Err(_))),
        ),
        Verdict::Suspended => None,
        Verdict::Waiting { retry, .. } => Some(*retry),
        Verdict::Stalled { .. } => Some(false),
    }
}

/// What the schedule of the next pass depends on.
struct RequeueInput<'a> {
    verdict: &'a Verdict,
    status: &'a NetbirdInstanceStatus,
    token_secret: Option<&'a crate::token_secret::OwnedSecret>,
    rotation_enabled: bool,
    /// When the pass started, and now.
    started: jiff::Timestamp,
    now: jiff::Timestamp,
    /// The version check and verification interval.
    interval: Duration,
    /// The backoff after this pass's failure ([`counts_as_failure`]).
    backoff: Option<Duration>,
    max_backoff: Duration,
    /// The next look at the previous token's use.
    previous_use_next: Option<jiff::Timestamp>,
}

/// When the next pass runs.
#[derive(Debug, PartialEq)]
struct Requeue {
    /// After this long; None: when something changes.
    after: Option<Duration>,
    /// The retry kept through the retry gate ([`super::memory::Memory::retry_pending`]).
    retry: Option<Duration>,
    /// What the log says.
    log: Option<&'static str>,
}

/// The schedule of the next pass, from the verdict, the status, the token Secret and the clock.
fn requeue(r: &RequeueInput<'_>) -> Requeue {
    match r.verdict {
        Verdict::Ready => {
            // a failed check or upkeep is retried after a minute at the earliest (or the
            // configured maximum backoff, if shorter), never later than the interval
            let retry = r.backoff.map(|backoff| {
                let floor = Duration::from_secs(60).min(r.max_backoff);
                backoff.max(floor).min(r.interval)
            });
            let mut next = retry.unwrap_or_else(|| next_check(r.status, r.started, r.interval));
            let wake = |at: jiff::Timestamp| {
                r.now
                    .duration_until(at)
                    .unsigned_abs()
                    .max(Duration::from_secs(1))
            };
            // the renewal is scheduled for its time, not found by polling
            if r.rotation_enabled
                && let Some(at) = r.token_secret.and_then(|s| s.renew_at())
            {
                next = next.min(wake(at));
            }
            // and so is the end of the replaced token's grace period
            if let Some(at) = r
                .token_secret
                .filter(|s| {
                    s.annotation(crate::token_secret::ANN_PREVIOUS_TOKEN_ID)
                        .is_some()
                })
                .and_then(|s| s.previous_delete_at())
            {
                next = next.min(wake(at));
            }
            // and the next look at its use
            if let Some(at) = r.previous_use_next {
                next = next.min(wake(at));
            }
            Requeue {
                after: Some(next),
                retry,
                log: Some("ready"),
            }
        }
        Verdict::Suspended => Requeue {
            after: None,
            retry: None,
            log: None,
        },
        Verdict::Waiting { retry: true, .. } => Requeue {
            after: Some(r.backoff.unwrap_or_default()),
            retry: Some(r.backoff.unwrap_or_default()),
            log: Some("not ready, retrying"),
        },
        // a watch event normally wakes the pass; this is a safety net
        Verdict::Waiting { retry: false, .. } => Requeue {
            after: Some(Duration::from_secs(600)),
            retry: Some(Duration::from_secs(600)),
            log: Some("waiting for a Secret"),
        },
        // through the retry gate like every verdict: the pass its own status write wakes changes
        // nothing and calls nobody, until the spec or a Secret changes
        Verdict::Stalled { .. } => Requeue {
            after: None,
            retry: Some(STALLED_UNTIL_CHANGED),
            log: Some("stalled: needs a person"),
        },
    }
}

/// How long a Stalled verdict holds while nothing it depends on changes (in effect: until then).
pub(super) const STALLED_UNTIL_CHANGED: Duration = Duration::from_secs(365 * 24 * 3600);

pub(super) fn version_due(nbi: &NetbirdInstance, now: jiff::Timestamp, interval: Duration) -> bool {
    let Some(status) = &nbi.status else {
        return true;
    };
    if status.observed_generation != nbi.metadata.generation {
        return true;
    }
    match status.version.as_ref().and_then(|v| v.checked_at.as_ref()) {
        None => true,
        Some(t) => now.duration_since(t.0).unsigned_abs() >= interval || t.0 > now,
    }
}

/// Time until the next version check (and token verification) is due.
fn next_check(
    status: &NetbirdInstanceStatus,
    now: jiff::Timestamp,
    interval: Duration,
) -> Duration {
    let last = status
        .version
        .as_ref()
        .and_then(|v| v.checked_at.as_ref())
        .map(|t| t.0)
        .unwrap_or(now);
    let elapsed = now.duration_since(last).unsigned_abs();
    interval.saturating_sub(elapsed).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::decide;

    fn requeue_of(verdict: &Verdict, backoff: Option<Duration>) -> Requeue {
        let now = jiff::Timestamp::UNIX_EPOCH;
        requeue(&RequeueInput {
            verdict,
            status: &NetbirdInstanceStatus::default(),
            token_secret: None,
            rotation_enabled: true,
            started: now,
            now,
            interval: Duration::from_secs(3600),
            backoff,
            max_backoff: Duration::from_secs(300),
            previous_use_next: None,
        })
    }

    fn waiting(retry: bool) -> Verdict {
        Verdict::Waiting {
            reason: decide::Waiting::Progressing,
            message: String::new(),
            retry,
        }
    }

    #[test]
    fn requeue_follows_the_verdict() {
        let s = Duration::from_secs;
        let ready = requeue_of(&Verdict::Ready, None);
        assert_eq!((ready.after, ready.retry), (Some(s(3600)), None));
        // a failed upkeep: a minute at the earliest, kept through the retry gate
        let failed = requeue_of(&Verdict::Ready, Some(s(5)));
        assert_eq!((failed.after, failed.retry), (Some(s(60)), Some(s(60))));
        let retrying = requeue_of(&waiting(true), Some(s(8)));
        assert_eq!((retrying.after, retrying.retry), (Some(s(8)), Some(s(8))));
        let waiting = requeue_of(&waiting(false), None);
        assert_eq!((waiting.after, waiting.retry), (Some(s(600)), Some(s(600))));
        let stalled = requeue_of(
            &Verdict::Stalled {
                reason: decide::Stall::InvalidSpec,
                message: String::new(),
            },
            None,
        );
        assert_eq!(
            (stalled.after, stalled.retry),
            (None, Some(STALLED_UNTIL_CHANGED))
        );
        let suspended = requeue_of(&Verdict::Suspended, None);
        assert_eq!(
            (suspended.after, suspended.retry, suspended.log),
            (None, None, None)
        );
    }

    #[test]
    fn what_counts_as_a_failure() {
        let mut findings = Findings::default();
        assert_eq!(counts_as_failure(&Verdict::Ready, &findings), Some(false));
        assert_eq!(counts_as_failure(&waiting(true), &findings), Some(true));
        assert_eq!(counts_as_failure(&waiting(false), &findings), Some(false));
        assert_eq!(counts_as_failure(&Verdict::Suspended, &findings), None);
        findings.rotation_error = Some(crate::netbird::NetbirdError::Transport {
            endpoint: crate::netbird::Endpoint::Instance,
            kind: crate::netbird::TransportKind::Connect,
            detail: String::new(),
        });
        assert_eq!(counts_as_failure(&Verdict::Ready, &findings), Some(true));
    }
}
