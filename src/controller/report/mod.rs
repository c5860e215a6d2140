//! The report: the status a pass writes, computed from its verdict and what it learned. Pure.
//!
//! This module holds the status and its fields (`status`, `initial`, `storing_token`; the setup,
//! token and version status, `previous_last_used`, `last_verified_at`); the conditions, their
//! closed sets of reasons and `merge` are in `conditions`.

mod conditions;

pub use conditions::{
    CLOSED_REASONS, ConditionStatus, PREVIOUS_TOKEN_STILL_IN_USE, READY, RECONCILING,
    SETUP_COMPLETE, STALLED, TOKEN_AVAILABLE, UPDATE_AVAILABLE, outside_closed_sets, ready_of,
    verdict_reason,
};

use self::conditions::{
    condition, merge, progress_conditions, ready_condition, set, setup_complete_condition,
    token_available_condition, update_available_condition,
};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::decide::{Findings, SetupOutcome, Stall, Verdict, Verified};
use crate::crd::{NetbirdInstanceStatus, SetupState, SetupStatus, TokenStatus, VersionStatus};
use crate::token_secret::{
    ANN_EXPIRES_AT, ANN_PREVIOUS_DELETE_AT, ANN_PREVIOUS_TOKEN_ID, ANN_ROTATED_AT,
    ANN_SETUP_COMPLETED_AT, ANN_SETUP_OUTCOME, ANN_SETUP_STARTED_AT, ANN_USER_ID, OwnedSecret,
    TokenSecret,
};

/// Inputs of the report.
pub struct ReportInput<'a> {
    pub generation: Option<i64>,
    pub previous: Option<&'a NetbirdInstanceStatus>,
    pub verdict: &'a Verdict,
    pub findings: &'a Findings,
    pub token_secret: &'a TokenSecret,
    pub secret_name: &'a str,
    /// The credentials Secret no longer matches the fingerprint recorded on the token Secret.
    pub credentials_changed: bool,
    /// The credentials Secret does not exist (removed after the bootstrap: nothing stops, the
    /// Ready message says so).
    pub credentials_gone: bool,
    pub version_check_enabled: bool,
    /// spec.token.rotation.enabled
    pub rotation_enabled: bool,
    /// Now, truncated to seconds (what the apiserver keeps).
    pub now: Timestamp,
    /// How often the token is checked (`versionCheck.interval`): `lastVerifiedAt` moves at most
    /// this often for one token.
    pub verify_interval: std::time::Duration,
    /// The last look at the previous token's use (this pass's or an earlier one's).
    pub previous_use: Option<&'a super::previous_use::Observation>,
    /// spec.token.rotation.retireAfterUnused
    pub retire_after: std::time::Duration,
}

/// A timestamp as the apiserver stores it (whole seconds), so that an unchanged status compares
/// equal.
pub fn to_time(t: Timestamp) -> Time {
    Time(Timestamp::from_second(t.as_second()).unwrap_or(t))
}

fn parse_time(s: Option<&str>) -> Option<Time> {
    s.and_then(|s| s.parse::<Timestamp>().ok()).map(to_time)
}

/// The status for the first pass of a new object: work begins, nothing is known yet.
pub fn initial(generation: Option<i64>, now: Timestamp) -> NetbirdInstanceStatus {
    let mut conditions = Vec::new();
    set(
        &mut conditions,
        condition(
            READY,
            ConditionStatus::Unknown,
            "Progressing",
            "reconciling for the first time",
            generation,
            now,
        ),
    );
    set(
        &mut conditions,
        condition(
            RECONCILING,
            ConditionStatus::True,
            "Progressing",
            "reconciling for the first time",
            generation,
            now,
        ),
    );
    NetbirdInstanceStatus {
        observed_generation: generation,
        conditions,
        setup: Some(SetupStatus {
            state: SetupState::Pending,
            owner_user_id: None,
            owner_email: None,
            started_at: None,
            completed_at: None,
        }),
        ..Default::default()
    }
}

/// What the report reads from the token Secret and the findings, once.
pub(super) struct Evidence<'a> {
    pub(super) owned: Option<&'a OwnedSecret>,
    pub(super) verified: Option<&'a Verified>,
    /// (user id, email) of the setup this pass performed.
    pub(super) setup_result: Option<(String, String)>,
    /// The operator performed the setup (this pass or before).
    pub(super) performed_by_us: bool,
}

impl<'a> Evidence<'a> {
    fn new(r: &ReportInput<'a>) -> Self {
        let owned = r.token_secret.owned();
        let setup_result = match &r.findings.setup {
            Some(SetupOutcome::TokenStored { user_id, email })
            | Some(SetupOutcome::TokenLost { user_id, email })
            | Some(SetupOutcome::NoToken { user_id, email }) => {
                Some((user_id.clone(), email.clone()))
            }
            _ => None,
        };
        let performed_by_us = owned
            .and_then(|s| s.annotation(ANN_SETUP_COMPLETED_AT))
            .is_some()
            || setup_result.is_some();
        Evidence {
            owned,
            verified: r.findings.verify.as_ref().and_then(|v| v.as_ref().ok()),
            setup_result,
            performed_by_us,
        }
    }

    pub(super) fn ann(&self, key: &str) -> Option<&'a str> {
        self.owned.and_then(|s| s.annotation(key))
    }
}

/// The status a pass writes.
pub fn status(r: &ReportInput<'_>) -> NetbirdInstanceStatus {
    let prev = r.previous.cloned().unwrap_or_default();
    if *r.verdict == Verdict::Suspended {
        return NetbirdInstanceStatus {
            observed_generation: r.generation,
            ..prev
        };
    }
    let evidence = Evidence::new(r);
    let setup = setup_status(r, &evidence, prev.setup.as_ref());
    // only while the Secret holds a token (a claim before setup holds none)
    let token = evidence
        .owned
        .filter(|s| matches!(s.token, crate::token_secret::TokenValue::Present(_)))
        .map(|_| token_status(r, &evidence, prev.token.clone()));
    let version = version_status(r, prev.version.clone());
    let ready = ready_condition(r);
    let (reconciling, stalled) = progress_conditions(r.verdict);
    let setup_complete = setup_complete_condition(&setup);
    let token_available = token_available_condition(r, &evidence, &prev);
    let update_available = update_available_condition(r, version.as_ref());
    let conditions = merge(
        prev.conditions,
        [
            (READY, Some(ready)),
            (RECONCILING, reconciling),
            (STALLED, stalled),
            (SETUP_COMPLETE, setup_complete),
            (TOKEN_AVAILABLE, token_available),
            (UPDATE_AVAILABLE, Some(update_available)),
        ],
        r.generation,
        r.now,
    );
    NetbirdInstanceStatus {
        observed_generation: r.generation,
        conditions,
        setup: Some(setup),
        token,
        version,
    }
}

fn setup_status(
    r: &ReportInput<'_>,
    evidence: &Evidence<'_>,
    prev: Option<&SetupStatus>,
) -> SetupStatus {
    let state = match r.verdict {
        Verdict::Ready if evidence.performed_by_us => SetupState::Completed,
        Verdict::Ready => SetupState::AlreadySetUp,
        Verdict::Stalled {
            reason: Stall::TokenLost,
            ..
        } => SetupState::Completed,
        // setup answered without a usable token (a rotation answered with a malformed one leaves
        // the setup state as it was)
        Verdict::Stalled {
            reason: Stall::TokenNotIssued,
            ..
        } if evidence.ann(ANN_SETUP_OUTCOME).is_some() || evidence.setup_result.is_some() => {
            SetupState::Completed
        }
        Verdict::Stalled {
            reason: Stall::SetupUnavailable,
            ..
        } => SetupState::Unavailable,
        _ if evidence.owned.is_some_and(|s| s.setup_started()) => SetupState::InProgress,
        _ => prev.map_or(SetupState::Pending, |s| s.state),
    };
    let owner_from_verify = evidence.verified.filter(|v| v.user.role == "owner");
    let result = evidence.setup_result.as_ref();
    SetupStatus {
        state,
        owner_user_id: result
            .map(|(id, _)| id.clone())
            .or_else(|| owner_from_verify.map(|v| v.user.id.clone()))
            .or_else(|| prev.and_then(|s| s.owner_user_id.clone())),
        owner_email: result
            .map(|(_, e)| e.clone())
            .filter(|e| !e.is_empty())
            .or_else(|| owner_from_verify.map(|v| v.user.email.clone()))
            .or_else(|| prev.and_then(|s| s.owner_email.clone())),
        started_at: parse_time(evidence.ann(ANN_SETUP_STARTED_AT))
            .or_else(|| prev.and_then(|s| s.started_at.clone())),
        completed_at: parse_time(evidence.ann(ANN_SETUP_COMPLETED_AT))
            .or_else(|| prev.and_then(|s| s.completed_at.clone())),
    }
}

fn token_status(
    r: &ReportInput<'_>,
    evidence: &Evidence<'_>,
    prev: Option<TokenStatus>,
) -> TokenStatus {
    let p = prev.unwrap_or_default();
    let token_id = evidence
        .owned
        .and_then(|s| s.token_id())
        .map(str::to_string)
        .or_else(|| p.token_id.clone());
    let verified_at = last_verified_at(evidence, &p, token_id.as_deref(), r.verify_interval);
    let previous_token_last_used_at = previous_last_used(r, evidence, &p);
    TokenStatus {
        secret_name: r.secret_name.to_string(),
        user_id: evidence
            .verified
            .map(|v| v.user.id.clone())
            .or_else(|| evidence.ann(ANN_USER_ID).map(str::to_string))
            .or(p.user_id),
        last_verified_at: verified_at,
        token_id,
        expires_at: parse_time(evidence.ann(ANN_EXPIRES_AT)).or(p.expires_at),
        last_rotated_at: parse_time(evidence.ann(ANN_ROTATED_AT)).or(p.last_rotated_at),
        // what is pending: the replaced token until it is deleted
        previous_token_id: evidence.ann(ANN_PREVIOUS_TOKEN_ID).map(str::to_string),
        previous_token_deletion_at: evidence
            .ann(ANN_PREVIOUS_TOKEN_ID)
            .and(parse_time(evidence.ann(ANN_PREVIOUS_DELETE_AT))),
        previous_token_last_used_at,
    }
}

/// When NetBird last saw the pending previous token used: from the last look at it, or (before
/// the first look after a restart) as the status had it for the same token.
fn previous_last_used(
    r: &ReportInput<'_>,
    evidence: &Evidence<'_>,
    prev: &TokenStatus,
) -> Option<Time> {
    let previous = evidence.ann(ANN_PREVIOUS_TOKEN_ID)?;
    match r.previous_use.filter(|o| o.token_id == previous) {
        Some(o) => o.last_used.map(to_time),
        None => prev
            .previous_token_last_used_at
            .clone()
            .filter(|_| prev.previous_token_id.as_deref() == Some(previous)),
    }
}

/// Whether a consumer still uses the pending previous token near the end of its grace period.
pub fn previous_still_in_use(r: &ReportInput<'_>) -> bool {
    let Some(s) = r.token_secret.owned() else {
        return false;
    };
    let (Some(previous), Some(rotated), Some(delete_at)) = (
        s.annotation(ANN_PREVIOUS_TOKEN_ID),
        s.rotated_at(),
        s.previous_delete_at(),
    ) else {
        return false;
    };
    r.previous_use
        .filter(|o| o.token_id == previous)
        .is_some_and(|o| {
            super::previous_use::still_in_use(
                o,
                r.now,
                rotated,
                delete_at,
                super::previous_use::window(r.retire_after),
            )
        })
}

/// When the server last accepted the token. A check of the same token less than one interval after
/// the recorded one (the first pass after an operator restart) leaves it where it is: a restart
/// writes no status for tokens that are as they were; the scheduled checks move it.
fn last_verified_at(
    evidence: &Evidence<'_>,
    prev: &TokenStatus,
    token_id: Option<&str>,
    interval: std::time::Duration,
) -> Option<Time> {
    let Some(v) = evidence.verified else {
        return prev.last_verified_at.clone();
    };
    match &prev.last_verified_at {
        Some(last)
            if token_id == prev.token_id.as_deref()
                && v.at.duration_since(last.0).as_secs() < interval.as_secs() as i64 =>
        {
            Some(last.clone())
        }
        _ => Some(to_time(v.at)),
    }
}

fn version_status(r: &ReportInput<'_>, prev: Option<VersionStatus>) -> Option<VersionStatus> {
    match &r.findings.version {
        Some(Ok(v)) => Some(VersionStatus {
            management: Some(v.management_current_version.clone()),
            management_available: v.management_available_version.clone(),
            dashboard_available: v.dashboard_available_version.clone(),
            // the server could tell only when it names the latest release
            update_available: v
                .management_available_version
                .is_some()
                .then_some(v.management_update_available),
            checked_at: Some(to_time(r.now)),
        }),
        _ => prev,
    }
}

/// The status while a token the operator holds in memory cannot be written to its Secret: Ready
/// False and Reconciling True with reason StoringToken and what failed, so a person knows before
/// the process ends. The rest of the previous status is kept.
pub fn storing_token(
    previous: Option<&NetbirdInstanceStatus>,
    generation: Option<i64>,
    message: &str,
    now: Timestamp,
) -> NetbirdInstanceStatus {
    let mut status = previous.cloned().unwrap_or_default();
    set(
        &mut status.conditions,
        condition(
            READY,
            ConditionStatus::False,
            "StoringToken",
            message,
            generation,
            now,
        ),
    );
    set(
        &mut status.conditions,
        condition(
            RECONCILING,
            ConditionStatus::True,
            "StoringToken",
            message,
            generation,
            now,
        ),
    );
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::decide::Verified;
    use crate::netbird::{User, VersionInfo};
    use crate::token_secret::{OwnedSecret, TokenValue};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use secrecy::SecretString;
    use std::collections::BTreeMap;

    const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn owned(annotations: &[(&str, &str)]) -> TokenSecret {
        TokenSecret::Ours(OwnedSecret {
            previous_token: None,
            token: TokenValue::Present(SecretString::from("nbp_x")),
            labels: BTreeMap::new(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            owner_references: vec![],
        })
    }

    fn verified(at: Timestamp) -> Verified {
        Verified {
            user: User {
                id: "u1".into(),
                email: "a@b.c".into(),
                name: "A".into(),
                role: "owner".into(),
                is_service_user: false,
                status: "active".into(),
            },
            at,
        }
    }

    fn get<'a>(s: &'a NetbirdInstanceStatus, ty: &str) -> Option<&'a Condition> {
        s.conditions.iter().find(|c| c.type_ == ty)
    }

    /// Every verdict, with and without a token, before and after a Ready status: each condition's
    /// reason is in its closed set (SetupComplete and TokenAvailable used to take Ready's reason).
    #[test]
    fn every_reason_is_in_its_closed_set() {
        use crate::controller::decide::{Stall, Waiting};
        let mut verdicts = vec![Verdict::Ready];
        for reason in [
            Waiting::Progressing,
            Waiting::WaitingForCredentials,
            Waiting::ManagementUnreachable,
            Waiting::StoringToken,
        ] {
            verdicts.push(Verdict::Waiting {
                reason,
                message: "m".into(),
                retry: true,
            });
        }
        for reason in [
            Stall::InvalidSpec,
            Stall::CredentialsRejected,
            Stall::SetupUnavailable,
            Stall::TokenNotIssued,
            Stall::TokenLost,
            Stall::TokenRejected,
            Stall::SecretConflict,
            Stall::ServerNotAllowed,
        ] {
            verdicts.push(Verdict::Stalled {
                reason,
                message: "m".into(),
            });
        }
        let secrets = [TokenSecret::Absent, owned(&[(ANN_USER_ID, "u1")])];
        let findings = Findings {
            verify: Some(Ok(verified(t(0)))),
            ..Default::default()
        };
        let input = |verdict, secret, previous| ReportInput {
            generation: Some(1),
            previous,
            verdict,
            findings: &findings,
            token_secret: secret,
            secret_name: "nb-token",
            credentials_changed: false,
            credentials_gone: false,
            version_check_enabled: true,
            rotation_enabled: true,
            now: t(1),
            verify_interval: HOUR,
            previous_use: None,
            retire_after: std::time::Duration::ZERO,
        };
        let ready = status(&input(&Verdict::Ready, &secrets[1], None));
        for v in &verdicts {
            for secret in &secrets {
                for previous in [None, Some(&ready)] {
                    let s = status(&input(v, secret, previous));
                    assert_eq!(outside_closed_sets(&s), None, "{v:?}");
                }
            }
        }
        let storing = storing_token(Some(&ready), Some(1), "m", t(2));
        assert_eq!(outside_closed_sets(&storing), None);
    }

    #[test]
    fn ready_after_setup_reports_everything() {
        let secret = owned(&[
            (ANN_SETUP_COMPLETED_AT, "2027-01-15T08:00:00Z"),
            (ANN_USER_ID, "u1"),
            (ANN_EXPIRES_AT, "2027-02-14T08:00:00Z"),
            (crate::token_secret::ANN_FINGERPRINT, "$argon2id$v=19$x"),
        ]);
        let findings = Findings {
            verify: Some(Ok(verified(t(0)))),
            version: Some(Ok(VersionInfo {
                management_current_version: "0.77.1".into(),
                management_update_available: true,
                dashboard_available_version: Some("2.10.0".into()),
                management_available_version: Some("0.78.0".into()),
            })),
            ..Default::default()
        };
        let s = status(&ReportInput {
            generation: Some(3),
            previous: None,
            verdict: &Verdict::Ready,
            findings: &findings,
            token_secret: &secret,
            secret_name: "nb-token",
            credentials_changed: false,
            credentials_gone: false,
            version_check_enabled: true,
            rotation_enabled: true,
            now: t(1),
            verify_interval: HOUR,
            previous_use: None,
            retire_after: std::time::Duration::ZERO,
        });
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(get(&s, READY).unwrap().status, "True");
        assert_eq!(get(&s, READY).unwrap().observed_generation, Some(3));
        assert!(get(&s, RECONCILING).is_none() && get(&s, STALLED).is_none());
        assert_eq!(get(&s, SETUP_COMPLETE).unwrap().reason, "SetupPerformed");
        assert_eq!(get(&s, TOKEN_AVAILABLE).unwrap().reason, "TokenStored");
        assert_eq!(get(&s, UPDATE_AVAILABLE).unwrap().reason, "UpdateAvailable");
        assert_eq!(s.setup.as_ref().unwrap().state, SetupState::Completed);
        assert_eq!(
            s.version.as_ref().unwrap().management_available.as_deref(),
            Some("0.78.0")
        );
        assert_eq!(
            s.token
                .as_ref()
                .unwrap()
                .expires_at
                .as_ref()
                .unwrap()
                .0
                .to_string(),
            "2027-02-14T08:00:00Z"
        );
        // no function of the password where readers of the NetbirdInstance can see it
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("argon2"), "{json}");

        // the same pass again later (cached verification, no version check): identical status
        let again = status(&ReportInput {
            generation: Some(3),
            previous: Some(&s),
            verdict: &Verdict::Ready,
            findings: &Findings {
                verify: Some(Ok(verified(t(0)))),
                ..Default::default()
            },
            token_secret: &secret,
            secret_name: "nb-token",
            credentials_changed: false,
            credentials_gone: false,
            version_check_enabled: true,
            rotation_enabled: true,
            now: t(500),
            verify_interval: HOUR,
            previous_use: None,
            retire_after: std::time::Duration::ZERO,
        });
        assert_eq!(
            again, s,
            "an unchanged world gives an identical status, so nothing is written"
        );
    }

    #[test]
    fn last_verified_at_moves_once_per_interval_or_with_another_token() {
        let secret = |id: &str| owned(&[(crate::token_secret::ANN_TOKEN_ID, id)]);
        let at = |prev: Option<&NetbirdInstanceStatus>, secret: &TokenSecret, when: i64| {
            let findings = Findings {
                verify: Some(Ok(verified(t(when)))),
                ..Default::default()
            };
            status(&ReportInput {
                generation: Some(1),
                previous: prev,
                verdict: &Verdict::Ready,
                findings: &findings,
                token_secret: secret,
                secret_name: "nb-token",
                credentials_changed: false,
                credentials_gone: false,
                version_check_enabled: true,
                rotation_enabled: true,
                now: t(when),
                verify_interval: HOUR,
                previous_use: None,
                retire_after: std::time::Duration::ZERO,
            })
        };
        let verified_at = |s: &NetbirdInstanceStatus| {
            s.token
                .as_ref()
                .and_then(|t| t.last_verified_at.clone())
                .map(|t| t.0)
        };
        let first = at(None, &secret("t1"), 0);
        assert_eq!(verified_at(&first), Some(t(0)));
        // checked again after a restart, 10 minutes later: nothing to write
        let restarted = at(Some(&first), &secret("t1"), 600);
        assert_eq!(restarted, first);
        // the scheduled check an interval later moves it
        let scheduled = at(Some(&first), &secret("t1"), 3600);
        assert_eq!(verified_at(&scheduled), Some(t(3600)));
        // another token (a rotation) moves it at once
        let rotated = at(Some(&first), &secret("t2"), 600);
        assert_eq!(verified_at(&rotated), Some(t(600)));
    }

    #[test]
    fn stalled_sets_stalled_and_keeps_transition_times() {
        let verdict = Verdict::Stalled {
            reason: Stall::SetupUnavailable,
            message: "m".into(),
        };
        let findings = Findings::default();
        let input = |prev, now| ReportInput {
            generation: Some(1),
            previous: prev,
            verdict: &verdict,
            findings: &findings,
            token_secret: &TokenSecret::Absent,
            secret_name: "nb-token",
            credentials_changed: false,
            credentials_gone: false,
            version_check_enabled: true,
            rotation_enabled: true,
            now,
            verify_interval: HOUR,
            previous_use: None,
            retire_after: std::time::Duration::ZERO,
        };
        let first = initial(Some(1), t(0));
        let s = status(&input(Some(&first), t(10)));
        let stalled = get(&s, STALLED).unwrap();
        assert_eq!(
            (stalled.status.as_str(), stalled.reason.as_str()),
            ("True", "SetupUnavailable")
        );
        assert!(get(&s, RECONCILING).is_none());
        assert_eq!(get(&s, READY).unwrap().reason, "SetupUnavailable");
        assert_eq!(get(&s, SETUP_COMPLETE).unwrap().reason, "AlreadySetUp");
        assert_eq!(s.setup.as_ref().unwrap().state, SetupState::Unavailable);
        let later = status(&input(Some(&s), t(99)));
        assert_eq!(
            get(&later, STALLED).unwrap().last_transition_time,
            to_time(t(10))
        );
    }

    #[test]
    fn changed_credentials_are_mentioned_on_ready() {
        let secret = owned(&[
            (ANN_SETUP_COMPLETED_AT, "2027-01-15T08:00:00Z"),
            (ANN_USER_ID, "u1"),
        ]);
        let s = status(&ReportInput {
            generation: Some(1),
            previous: None,
            verdict: &Verdict::Ready,
            findings: &Findings {
                verify: Some(Ok(verified(t(0)))),
                ..Default::default()
            },
            token_secret: &secret,
            secret_name: "nb-token",
            credentials_changed: true,
            credentials_gone: false,
            version_check_enabled: false,
            rotation_enabled: true,
            now: t(1),
            verify_interval: HOUR,
            previous_use: None,
            retire_after: std::time::Duration::ZERO,
        });
        assert!(get(&s, READY).unwrap().message.contains("set up with"));
        assert_eq!(get(&s, UPDATE_AVAILABLE).unwrap().status, "Unknown");
    }

    #[test]
    fn adopted_token_and_offline_version() {
        let secret = owned(&[]);
        let findings = Findings {
            verify: Some(Ok(verified(t(0)))),
            version: Some(Ok(VersionInfo {
                management_current_version: "0.77.1".into(),
                management_update_available: false,
                dashboard_available_version: None,
                management_available_version: None,
            })),
            ..Default::default()
        };
        let s = status(&ReportInput {
            generation: Some(1),
            previous: None,
            verdict: &Verdict::Ready,
            findings: &findings,
            token_secret: &secret,
            secret_name: "nb-token",
            credentials_changed: false,
            credentials_gone: false,
            version_check_enabled: true,
            rotation_enabled: true,
            now: t(1),
            verify_interval: HOUR,
            previous_use: None,
            retire_after: std::time::Duration::ZERO,
        });
        assert_eq!(get(&s, TOKEN_AVAILABLE).unwrap().reason, "TokenAdopted");
        assert_eq!(get(&s, SETUP_COMPLETE).unwrap().reason, "AlreadySetUp");
        assert_eq!(get(&s, UPDATE_AVAILABLE).unwrap().status, "Unknown");
        assert!(s.version.unwrap().management_available.is_none());
    }
}
