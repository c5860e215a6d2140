//! The conditions of the status: one builder per condition type (Ready, Reconciling and Stalled
//! from the verdict, SetupComplete, TokenAvailable, UpdateAvailable), `merge` (the one place for
//! transition times), and the closed set of reasons of each type (`CLOSED_REASONS`,
//! `outside_closed_sets`); `ready_of` and `verdict_reason` for transitions, Events and metrics.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use super::{Evidence, ReportInput, previous_still_in_use, to_time};
use crate::controller::decide::Verdict;
use crate::crd::{NetbirdInstanceStatus, SetupState, SetupStatus, VersionStatus};
use crate::token_secret::{
    ANN_EXPIRES_AT, ANN_PREVIOUS_DELETE_AT, ANN_PREVIOUS_TOKEN_ID, ANN_ROTATED_AT, ANN_USER_ID,
};

pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";
pub const SETUP_COMPLETE: &str = "SetupComplete";
pub const TOKEN_AVAILABLE: &str = "TokenAvailable";
pub const UPDATE_AVAILABLE: &str = "UpdateAvailable";

/// The TokenAvailable reason (and Warning Event) while a consumer still uses the previous token
/// near the end of its grace period.
pub const PREVIOUS_TOKEN_STILL_IN_USE: &str = "PreviousTokenStillInUse";

/// The status of a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

/// One condition as a pass sees it: its type and what it says (the generation and the transition
/// time are added where the conditions are merged, see [`merge`]).
pub(super) struct ConditionUpdate {
    type_: &'static str,
    status: ConditionStatus,
    reason: String,
    message: String,
}

pub(super) fn update(
    type_: &'static str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
) -> ConditionUpdate {
    ConditionUpdate {
        type_,
        status,
        reason: reason.into(),
        message: message.into(),
    }
}

/// Sets the conditions that are present and removes those that are absent, in that order. The one
/// place that handles transition times: a condition keeps its lastTransitionTime when its status
/// did not change.
pub(super) fn merge<const N: usize>(
    mut conditions: Vec<Condition>,
    updates: [(&str, Option<ConditionUpdate>); N],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    for (type_, update) in updates {
        match update {
            Some(u) => set(
                &mut conditions,
                condition(u.type_, u.status, &u.reason, &u.message, generation, now),
            ),
            None => remove(&mut conditions, type_),
        }
    }
    conditions
}

pub(super) fn ready_condition(r: &ReportInput<'_>) -> ConditionUpdate {
    use ConditionStatus::{False, Unknown};
    match r.verdict {
        Verdict::Ready => {
            let mut m = format!(
                "NetBird is set up and a verified token is in Secret {}",
                r.secret_name
            );
            if r.credentials_gone {
                m.push_str(
                    "; note: the credentials Secret is gone (it is needed for setup only), so \
                     whether the owner's credentials changed is not checked",
                );
            }
            if r.credentials_changed {
                m.push_str(
                    "; note: the credentials Secret no longer matches the credentials NetBird was \
                     set up with. The operator never changes the owner's password: change it in \
                     the NetBird dashboard",
                );
            }
            update(READY, ConditionStatus::True, "Bootstrapped", &m)
        }
        Verdict::Waiting {
            reason, message, ..
        } => update(READY, False, reason.as_str(), message),
        Verdict::Stalled { reason, message } => update(READY, False, reason.as_str(), message),
        // handled by the caller: a suspended pass keeps the previous status
        Verdict::Suspended => update(READY, Unknown, "Suspended", "reconciling is suspended"),
    }
}

/// Reconciling while the operator works on it, Stalled when it needs a person (never both).
pub(super) fn progress_conditions(
    verdict: &Verdict,
) -> (Option<ConditionUpdate>, Option<ConditionUpdate>) {
    match verdict {
        Verdict::Waiting {
            reason, message, ..
        } => (
            Some(update(
                RECONCILING,
                ConditionStatus::True,
                reason.as_str(),
                message,
            )),
            None,
        ),
        Verdict::Stalled { reason, message } => (
            None,
            Some(update(
                STALLED,
                ConditionStatus::True,
                reason.as_str(),
                message,
            )),
        ),
        _ => (None, None),
    }
}

/// SetupComplete, once the instance has its owner. Its reasons are a closed set that has no word
/// for "not yet": until then the condition is absent (Ready says why).
pub(super) fn setup_complete_condition(setup: &SetupStatus) -> Option<ConditionUpdate> {
    match setup.state {
        SetupState::Completed => Some(update(
            SETUP_COMPLETE,
            ConditionStatus::True,
            "SetupPerformed",
            "this operator ran the one-time setup",
        )),
        SetupState::AlreadySetUp | SetupState::Unavailable => Some(update(
            SETUP_COMPLETE,
            ConditionStatus::True,
            "AlreadySetUp",
            "NetBird was set up before this operator looked at it",
        )),
        SetupState::Pending | SetupState::InProgress => None,
    }
}

/// TokenAvailable while a verified token is in the token Secret: set by a Ready pass, kept as it
/// was through a pass that waits (the server unreachable a moment) while the Secret still holds a
/// token, and absent otherwise (its closed set of reasons has no word for "no token": Ready says
/// why).
pub(super) fn token_available_condition(
    r: &ReportInput<'_>,
    evidence: &Evidence<'_>,
    prev: &NetbirdInstanceStatus,
) -> Option<ConditionUpdate> {
    if *r.verdict != Verdict::Ready {
        return kept_token_available(r, evidence, prev);
    }
    let (reason, message) = token_reason(r, evidence);
    let rotation_failed = r
        .findings
        .rotation_error
        .as_ref()
        .map(|e| format!("; renewing it failed ({e}), retrying"));
    let message = format!("{message}{}", rotation_failed.unwrap_or_default());
    Some(update(
        TOKEN_AVAILABLE,
        ConditionStatus::True,
        reason,
        &message,
    ))
}

/// TokenAvailable in a pass not Ready: kept while it waits and the Secret holds a token.
fn kept_token_available(
    r: &ReportInput<'_>,
    evidence: &Evidence<'_>,
    prev: &NetbirdInstanceStatus,
) -> Option<ConditionUpdate> {
    let holds_token = evidence
        .owned
        .is_some_and(|s| matches!(s.token, crate::token_secret::TokenValue::Present(_)));
    let waiting = matches!(r.verdict, Verdict::Waiting { .. });
    prev.conditions
        .iter()
        .find(|c| c.type_ == TOKEN_AVAILABLE && c.status == "True")
        .filter(|_| waiting && holds_token)
        .map(|old| ConditionUpdate {
            type_: TOKEN_AVAILABLE,
            status: ConditionStatus::True,
            reason: old.reason.clone(),
            message: old.message.clone(),
        })
}

/// TokenAvailable's reason and message in a Ready pass (the first case that holds).
fn token_reason(r: &ReportInput<'_>, evidence: &Evidence<'_>) -> (&'static str, String) {
    let expiring = !r.rotation_enabled
        && evidence
            .owned
            .and_then(|s| s.renew_at())
            .is_some_and(|at| r.now >= at);
    if expiring {
        (
            "TokenExpiringSoon",
            format!(
                "less than a third of the token's lifetime is left (it expires at {}) and rotation \
                 is off: put a new token in the Secret or set spec.token.rotation.enabled",
                evidence.ann(ANN_EXPIRES_AT).unwrap_or("?")
            ),
        )
    } else if previous_still_in_use(r) {
        (
            PREVIOUS_TOKEN_STILL_IN_USE,
            format!(
                "the previous token {} is still in use: NetBird saw it used at {} and it is \
                 deleted at {}. Restart the programs that read Secret {} (or give them Reloader's \
                 annotation) so that they take the new token before then",
                evidence.ann(ANN_PREVIOUS_TOKEN_ID).unwrap_or("?"),
                r.previous_use
                    .and_then(|o| o.last_used)
                    .map_or_else(|| "?".to_string(), |t| to_time(t).0.to_string()),
                evidence.ann(ANN_PREVIOUS_DELETE_AT).unwrap_or("?"),
                r.secret_name
            ),
        )
    } else if evidence.ann(ANN_ROTATED_AT).is_some() {
        (
            "TokenRotated",
            "the token was renewed before it expired; the new one is stored and verified"
                .to_string(),
        )
    } else if evidence.performed_by_us
        && evidence
            .ann(ANN_USER_ID)
            .is_some_and(|u| evidence.verified.is_none_or(|v| v.user.id == u))
    {
        (
            "TokenStored",
            "the token from setup is stored and verified".to_string(),
        )
    } else {
        (
            "TokenAdopted",
            "a token put into the Secret was verified and adopted".to_string(),
        )
    }
}

pub(super) fn update_available_condition(
    r: &ReportInput<'_>,
    version: Option<&VersionStatus>,
) -> ConditionUpdate {
    use ConditionStatus::{False, True, Unknown};
    let (status, reason, message) = match (version, &r.findings.version) {
        _ if !r.version_check_enabled => (
            Unknown,
            "Unknown",
            "the version check is disabled".to_string(),
        ),
        (_, Some(Err(e))) => (
            Unknown,
            "Unknown",
            format!("the last version check failed: {e}"),
        ),
        (Some(v), _) if v.update_available == Some(true) => (
            True,
            "UpdateAvailable",
            format!(
                "management {} is available (running {})",
                v.management_available.as_deref().unwrap_or("?"),
                v.management.as_deref().unwrap_or("?")
            ),
        ),
        (Some(v), _) if v.management_available.is_some() => (
            False,
            "UpToDate",
            format!(
                "running the latest management release {}",
                v.management.as_deref().unwrap_or("?")
            ),
        ),
        (Some(_), _) => (
            Unknown,
            "Unknown",
            "the server could not tell the latest release (it may have no internet access)"
                .to_string(),
        ),
        (None, _) => (Unknown, "Unknown", "versions not checked yet".to_string()),
    };
    update(UPDATE_AVAILABLE, status, reason, &message)
}

pub(super) fn condition(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.as_str().into(),
        reason: reason.into(),
        message: message.chars().take(32768).collect(),
        observed_generation: generation,
        last_transition_time: to_time(now),
    }
}

/// Sets a condition; keeps its lastTransitionTime when its status did not change.
pub(super) fn set(conditions: &mut Vec<Condition>, mut c: Condition) {
    if let Some(old) = conditions.iter_mut().find(|o| o.type_ == c.type_) {
        if old.status == c.status {
            c.last_transition_time = old.last_transition_time.clone();
        }
        *old = c;
    } else {
        conditions.push(c);
    }
}

pub(super) fn remove(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

/// Every condition type with its closed set of reasons (the contract's table; Ready also takes the
/// reason of the condition that blocks it, and StoringToken while a token is held in memory).
pub const CLOSED_REASONS: [(&str, &[&str]); 6] = [
    (
        READY,
        &[
            "Bootstrapped",
            "Progressing",
            "WaitingForCredentials",
            "ManagementUnreachable",
            "SettingUp",
            "StoringToken",
            "RotatingToken",
            "InvalidSpec",
            "CredentialsRejected",
            "SetupUnavailable",
            "TokenNotIssued",
            "TokenLost",
            "TokenRejected",
            "SecretConflict",
            "ServerNotAllowed",
        ],
    ),
    (
        RECONCILING,
        &[
            "Progressing",
            "WaitingForCredentials",
            "ManagementUnreachable",
            "SettingUp",
            "StoringToken",
            "RotatingToken",
        ],
    ),
    (
        STALLED,
        &[
            "InvalidSpec",
            "CredentialsRejected",
            "SetupUnavailable",
            "TokenNotIssued",
            "TokenLost",
            "TokenRejected",
            "SecretConflict",
            "ServerNotAllowed",
        ],
    ),
    (SETUP_COMPLETE, &["SetupPerformed", "AlreadySetUp"]),
    (
        TOKEN_AVAILABLE,
        &[
            "TokenStored",
            "TokenAdopted",
            "TokenRotated",
            "TokenExpiringSoon",
            PREVIOUS_TOKEN_STILL_IN_USE,
        ],
    ),
    (
        UPDATE_AVAILABLE,
        &["UpdateAvailable", "UpToDate", "Unknown"],
    ),
];

/// The first condition whose type or reason is outside the closed sets, if any.
pub fn outside_closed_sets(status: &NetbirdInstanceStatus) -> Option<(String, String)> {
    status
        .conditions
        .iter()
        .find(|c| {
            !CLOSED_REASONS
                .iter()
                .any(|(ty, reasons)| *ty == c.type_ && reasons.contains(&c.reason.as_str()))
        })
        .map(|c| (c.type_.clone(), c.reason.clone()))
}

/// The Ready condition's (status, reason), to detect transitions.
pub fn ready_of(status: Option<&NetbirdInstanceStatus>) -> Option<(String, String)> {
    status?
        .conditions
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Reason of the Reconciling condition for a verdict (for Events and metrics).
pub fn verdict_reason(v: &Verdict) -> &'static str {
    match v {
        Verdict::Ready => "Bootstrapped",
        Verdict::Suspended => "Suspended",
        Verdict::Waiting { reason, .. } => reason.as_str(),
        Verdict::Stalled { reason, .. } => reason.as_str(),
    }
}
