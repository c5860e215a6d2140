//! The decision: from what is known about one NetbirdInstance, the next step. Pure: no I/O, no
//! clock. The reconcile calls it again after each step until it returns a verdict.
//!
//! This module holds the decision itself (`decide` and the rules it goes through in order:
//! `check_inputs`, `from_token_secret`, `after_setup_call`, `towards_setup`, `token_upkeep`);
//! the types it works on are in `types`, the verdicts' messages in `messages`.

mod messages;
mod types;

pub use types::{
    Decision, Facts, Findings, Input, SetupOutcome, Stall, Step, Verdict, Verified, Waiting,
};

use std::ops::ControlFlow::{Break, Continue};

use self::messages::{
    malformed_token_message, password_not_allowed_message, rejected, setup_server_error_message,
    setup_unavailable_message, stalled, token_lost_at_shutdown_message, token_lost_message,
    token_not_allowed_message, token_not_issued_message, unreachable_or_stalled,
};
use crate::netbird::NetbirdError;
use crate::token_secret::{
    ANN_MALFORMED_TOKEN, ANN_PREVIOUS_TOKEN_ID, ANN_ROTATION_STARTED_AT, ANN_SETUP_OUTCOME,
    ANN_SETUP_REJECTED, ANN_TOKEN_ID, OUTCOME_TOKEN_MALFORMED, OUTCOME_TOKEN_NOT_ISSUED,
    OwnedSecret, TokenSecret, TokenValue, parse_rejection,
};

/// The next step for one NetbirdInstance.
pub fn decide(f: &Facts<'_>) -> Decision {
    if let Some(d) = check_inputs(f) {
        return d;
    }
    let owned = match f.token_secret {
        TokenSecret::Foreign(why) => {
            return stalled(
                Stall::SecretConflict,
                format!(
                    "Secret {} exists but is not managed by this operator ({why}); it is left \
                     untouched. Delete or rename it, or set spec.token.secretName to another name",
                    f.secret_name
                ),
            );
        }
        TokenSecret::Ours(s) => Some(s),
        TokenSecret::Absent => None,
    };
    if let Some(d) = owned.and_then(|s| from_token_secret(f, s)) {
        return d;
    }
    if let Some(d) = after_setup_call(f, owned) {
        return d;
    }
    towards_setup(f, owned)
}

/// Suspension, the spec, and the inputs read from Secrets: checked before any call.
fn check_inputs(f: &Facts<'_>) -> Option<Decision> {
    if f.suspended {
        return Some(Break(Verdict::Suspended));
    }
    if let Some(problem) = f.spec_problem {
        return Some(stalled(Stall::InvalidSpec, problem.to_string()));
    }
    // the credentials are needed for setup only: once the token Secret holds a token, a removed
    // (or broken) credentials Secret stops nothing
    let holds_token = f
        .token_secret
        .owned()
        .is_some_and(|s| matches!(s.token, TokenValue::Present(_)));
    // nor does it stop the instance check after a setup in flight (a crash before its token was
    // stored): that check tells whether the token is lost, which is said whatever the credentials
    let setup_in_flight = f.token_secret.owned().is_some_and(|s| s.setup_started());
    if !holds_token
        && !setup_in_flight
        && let Some(wait) = without_credentials(f)
    {
        return Some(wait);
    }
    // the credentials Secret's owner decides where its password may go: checked before any call,
    // but for the instance check after a setup in flight (no password, no token: it tells whether
    // that setup's token is lost, which is said whatever the allow-list says now; found by the
    // history explorer: seed 3, an allow-list changed after a setup whose token was never stored)
    if (!setup_in_flight || holds_token)
        && let Some(refused) = password_not_allowed(f)
    {
        return Some(refused);
    }
    match f.ca {
        Input::Missing(m) => {
            return Some(Break(Verdict::Waiting {
                reason: Waiting::WaitingForCredentials,
                message: m.clone(),
                retry: false,
            }));
        }
        Input::Invalid(m) => return Some(stalled(Stall::InvalidSpec, m.clone())),
        Input::NotNeeded | Input::Ready(_) => {}
    }
    None
}

/// What the operator's own token Secret decides: its metadata, the stored token (verified, kept
/// up), or a recorded setup outcome.
fn from_token_secret(f: &Facts<'_>, s: &OwnedSecret) -> Option<Decision> {
    let p = f.findings;
    if !f.secret_metadata_in_sync && !p.metadata_synced {
        return Some(Continue(Step::SyncSecretMetadata));
    }
    // something under the key beside the marker of a setup in flight: a person put it in while
    // (or after) the operator's setup ran, whatever it is; that setup's own token, if the call
    // reached NetBird, was never stored
    if !matches!(s.token, TokenValue::Missing)
        && s.setup_started()
        && p.setup.is_none()
        && !p.abandoned_setup_ended
    {
        return Some(Continue(Step::EndAbandonedSetup));
    }
    stored_token(f, s).or_else(|| recorded_setup_outcome(f, s))
}

/// What the token under the key decides (where it may go, its verification); `None`: none.
fn stored_token(f: &Facts<'_>, s: &OwnedSecret) -> Option<Decision> {
    match &s.token {
        TokenValue::Present(_) if !s.may_send_token_to(f.management_url) => Some(stalled(
            Stall::ServerNotAllowed,
            token_not_allowed_message(f, s.home_server().unwrap_or_default()),
        )),
        TokenValue::Present(_)
            if !s.may_send_token_with(
                f.management_url,
                crate::binding::Trust::of(f.insecure_skip_verify),
            ) =>
        {
            Some(stalled(
                Stall::ServerNotAllowed,
                crate::binding::weaker_trust_message(
                    f.secret_name,
                    s.home_server().unwrap_or(f.management_url),
                ),
            ))
        }
        TokenValue::Present(_) => Some(verified_token(f, s)),
        TokenValue::NotText => Some(stalled(
            Stall::TokenRejected,
            format!(
                "key {} of Secret {} holds binary data, not a token. Put a personal access token \
                 (nbp_...) there; the operator adopts it",
                f.secret_key, f.secret_name
            ),
        )),
        TokenValue::Missing => None,
    }
}

/// What the token's verification decides: verify, stop, or its upkeep, the version, Ready.
fn verified_token(f: &Facts<'_>, s: &OwnedSecret) -> Decision {
    let p = f.findings;
    match &p.verify {
        None => Continue(Step::VerifyToken),
        Some(Err(e)) if e.is_token_rejected() => stalled(
            Stall::TokenRejected,
            format!(
                "the token in key {} of Secret {} was rejected: {e}. Create a personal access \
                 token in the NetBird dashboard and put it under that key; the operator adopts it",
                f.secret_key, f.secret_name
            ),
        ),
        Some(Err(e)) => unreachable_or_stalled(e, "could not verify the stored token"),
        Some(Ok(_)) => token_upkeep(f, s).unwrap_or_else(|| {
            if f.version_due && p.version.is_none() {
                Continue(Step::CheckVersion)
            } else {
                Break(Verdict::Ready)
            }
        }),
    }
}

/// What a setup outcome recorded on the Secret decides (no token, malformed, refused).
fn recorded_setup_outcome(f: &Facts<'_>, s: &OwnedSecret) -> Option<Decision> {
    let p = f.findings;
    if s.annotation(ANN_SETUP_OUTCOME) == Some(OUTCOME_TOKEN_NOT_ISSUED) {
        return Some(stalled(Stall::TokenNotIssued, token_not_issued_message(f)));
    }
    if s.annotation(ANN_SETUP_OUTCOME) == Some(OUTCOME_TOKEN_MALFORMED) {
        return Some(stalled(
            Stall::TokenNotIssued,
            malformed_token_message(f, "setup", "it is not a NetBird token"),
        ));
    }
    // a refusal answered this very spec and these credentials: not sent again
    if p.setup.is_none()
        && let Some((generation, status, message)) =
            s.annotation(ANN_SETUP_REJECTED).and_then(parse_rejection)
        && generation == f.generation
        && f.credentials_unchanged
    {
        return Some(match status {
            412 => stalled(Stall::SetupUnavailable, setup_unavailable_message(f, true)),
            500..=599 => stalled(
                Stall::SetupUnavailable,
                setup_server_error_message(f, &format!("{status}: {message}")),
            ),
            _ => rejected(status, message),
        });
    }
    None
}

/// What a setup call of this pass (or a malformed token it or a rotation returned) decides.
fn after_setup_call(f: &Facts<'_>, owned: Option<&OwnedSecret>) -> Option<Decision> {
    let p = f.findings;
    if let Some((what, why)) = &p.malformed_token {
        return Some(stalled(
            Stall::TokenNotIssued,
            malformed_token_message(f, what, &why.to_string()),
        ));
    }
    match &p.setup {
        Some(SetupOutcome::NoToken { .. }) => {
            return Some(stalled(Stall::TokenNotIssued, token_not_issued_message(f)));
        }
        Some(SetupOutcome::TokenLost { .. }) => {
            return Some(stalled(Stall::TokenLost, token_lost_at_shutdown_message(f)));
        }
        Some(SetupOutcome::TokenStored { .. }) => {
            // the world now holds the token; reaching here means it could not be read back
            return Some(Break(Verdict::Waiting {
                reason: Waiting::ManagementUnreachable,
                message: "setup succeeded and the token was stored; verifying it".into(),
                retry: true,
            }));
        }
        Some(SetupOutcome::SetUpMeanwhile) => {
            if owned.is_some_and(|s| s.setup_started()) && !p.claim_released {
                return Some(Continue(Step::ReleaseClaim));
            }
            return Some(stalled(
                Stall::SetupUnavailable,
                setup_unavailable_message(f, true),
            ));
        }
        Some(SetupOutcome::Failed(e)) => return Some(setup_failed(f, owned, e)),
        None => {}
    }
    None
}

/// What a failed setup call decides: token lost, claim released, or the stall it calls for.
fn setup_failed(f: &Facts<'_>, owned: Option<&OwnedSecret>, e: &NetbirdError) -> Decision {
    let p = f.findings;
    // "already set up" after an unanswered call of this claim: that call may have been the
    // one that set it up, and its token is lost; the claim is kept as the evidence
    if e.status() == Some(412) && owned.is_some_and(|s| s.setup_unanswered()) {
        return stalled(Stall::TokenLost, token_lost_message(f, true));
    }
    let gives_up = server_error_gives_up(f, e);
    let definitive = matches!(e.status(), Some(400 | 412 | 422)) || gives_up;
    if definitive && owned.is_some_and(|s| s.setup_started()) && !p.claim_released {
        return Continue(Step::ReleaseClaim);
    }
    match e.status() {
        // in the words the recorded refusal keeps, so that the passes after it say the same
        _ if gives_up => stalled(
            Stall::SetupUnavailable,
            setup_server_error_message(
                f,
                &format!(
                    "{}: {}",
                    e.status().unwrap_or_default(),
                    crate::token_secret::recorded_message(e.server_message().unwrap_or_default())
                ),
            ),
        ),
        Some(412) => stalled(Stall::SetupUnavailable, setup_unavailable_message(f, true)),
        Some(422)
            if e.server_message()
                .is_some_and(|m| m.contains("pat_expire_in")) =>
        {
            stalled(
                Stall::InvalidSpec,
                format!("spec.token.expiresInDays was refused by NetBird: {e}"),
            )
        }
        Some(400 | 422) => stalled(
            Stall::CredentialsRejected,
            format!(
                "NetBird refused the credentials: {e}. Fix the credentials Secret; the operator \
                 retries when it changes"
            ),
        ),
        _ => unreachable_or_stalled(e, "setup failed"),
    }
}

/// Stalled/ServerNotAllowed when the credentials Secret's allow-list does not name the server.
fn password_not_allowed(f: &Facts<'_>) -> Option<Decision> {
    let list = f.allowed_servers?;
    (!crate::binding::allowed(list, f.management_url)).then(|| {
        stalled(
            Stall::ServerNotAllowed,
            password_not_allowed_message(f, list),
        )
    })
}

/// The way to the one-time setup: the instance status, the claim, the call.
fn towards_setup(f: &Facts<'_>, owned: Option<&OwnedSecret>) -> Decision {
    let p = f.findings;
    // the limit of server errors reached for these credentials, but the refusal's record on the
    // token Secret refused (found by the history explorer): neither setup nor the instance check
    // is called again; this process remembers the count until the spec or the credentials change
    // (a restart forgets it)
    if f.setup_server_errors >= SETUP_SERVER_ERRORS_LIMIT {
        return stalled(
            Stall::SetupUnavailable,
            setup_server_error_message(f, "the refusal could not be recorded on the token Secret"),
        );
    }
    let instance = match &p.instance {
        None => return Continue(Step::CheckInstance),
        Some(Err(e)) => return unreachable_or_stalled(e, "could not read the instance status"),
        Some(Ok(i)) => i,
    };
    let started = owned.is_some_and(|s| s.setup_started());
    if !instance.setup_required {
        if started || f.setup_done_before {
            return stalled(Stall::TokenLost, token_lost_message(f, started));
        }
        return stalled(Stall::SetupUnavailable, setup_unavailable_message(f, false));
    }
    if let Some(refused) = password_not_allowed(f) {
        return refused;
    }
    // the claim records the fingerprint of the credentials setup sends: when they changed since
    // an earlier claim (setup reads them fresh before it calls), they are claimed again first, so
    // that a refusal holds for the credentials it answered (found by the history explorer: behind
    // a lagging watch, a refusal recorded against the old fingerprint let the same password be
    // sent a fourth time once the watch delivered the change)
    if !p.claimed && (!started || !f.credentials_unchanged) {
        return Continue(Step::ClaimSecret);
    }
    without_credentials(f).unwrap_or(Continue(Step::Setup))
}

/// What the decision is while the credentials cannot be used: missing (wait for them) or invalid.
fn without_credentials(f: &Facts<'_>) -> Option<Decision> {
    match f.credentials {
        Input::Missing(m) => Some(Break(Verdict::Waiting {
            reason: Waiting::WaitingForCredentials,
            message: m.clone(),
            retry: false,
        })),
        Input::Invalid(m) => Some(stalled(Stall::InvalidSpec, m.clone())),
        _ => None,
    }
}

/// The work a verified token may need: cleanup after a crash, identification, rotation.
fn token_upkeep(f: &Facts<'_>, s: &crate::token_secret::OwnedSecret) -> Option<Decision> {
    let p = f.findings;
    if let Some(d) = leftovers(f, s) {
        return Some(d);
    }
    // the replaced token is deleted when its grace period ends (the pass is scheduled for then),
    // never before: consumers that read it once keep working until then
    let previous_pending = s.annotation(ANN_PREVIOUS_TOKEN_ID).is_some();
    let in_grace = previous_pending && s.previous_delete_at().is_some_and(|at| f.now < at);
    if let Some(d) = previous_token(f, s, previous_pending, in_grace) {
        return Some(d);
    }
    // a token creation this spec asked for answered with a malformed token: not asked again until
    // the spec changes
    if let Some((generation, what, why)) = s
        .annotation(ANN_MALFORMED_TOKEN)
        .and_then(crate::token_secret::parse_malformed)
        && generation == f.generation
    {
        return Some(stalled(
            Stall::TokenNotIssued,
            malformed_token_message(f, what, why),
        ));
    }
    // right after setup too: the pass that reports Ready reports the whole token (one status write
    // and no second pass, where identifying it later cost a pass, a status write and its Event)
    if s.annotation(ANN_TOKEN_ID).is_none() && p.token_list.is_none() {
        return Some(Continue(Step::IdentifyToken));
    }
    // the Secret records whose token it holds: a server that describes users unexpectedly can never
    // make the exchange run again
    // (after identification: the exchange deletes the old token by its id)
    // A new token waits while the Secret records a replaced token: in its grace period (the pass
    // is scheduled for its end), or past it with its deletion failed in this pass (retried with
    // backoff). The Secret keeps the record of one previous token, and overwriting it would leave
    // that token valid until its own expiry, unwatched (found by the history explorer: seed 3,
    // history 3798)
    if previous_pending {
        return None;
    }
    new_token(f, s)
}

/// What an earlier key or an interrupted rotation left: records to forget, orphans to clean.
fn leftovers(f: &Facts<'_>, s: &OwnedSecret) -> Option<Decision> {
    let p = f.findings;
    // the records describe the token under the key the spec named before: the token under the
    // spec's key now is another (put in by a person), and a rotation would take the old one for
    // "the previous token" and delete it while the Secret still holds it under the old key
    if s.records_describe_another_key(f.secret_key) && !p.other_key_records_forgotten {
        return Some(Continue(Step::ForgetOtherKeyRecords));
    }
    let listing_failed = matches!(p.token_list, Some(Err(_)));
    if s.annotation(ANN_ROTATION_STARTED_AT).is_some() && !p.orphans_cleaned && !listing_failed {
        return Some(Continue(Step::CleanOrphans));
    }
    None
}

/// The replaced token: deleted after its grace period, or within it followed and retired.
fn previous_token(
    f: &Facts<'_>,
    s: &OwnedSecret,
    previous_pending: bool,
    in_grace: bool,
) -> Option<Decision> {
    let p = f.findings;
    if previous_pending && !in_grace && p.previous_deleted.is_none() {
        return Some(Continue(Step::DeletePreviousToken));
    }
    // within the grace period, its use is followed (a rotation's previous token only: after the
    // exchange it is the owner's, which the service user may not read), and once nothing used it
    // for retireAfterUnused, as this pass's own look shows, it is retired early
    if in_grace && s.previous_use_followable() {
        match &p.previous_use {
            None if f.previous_use_due => return Some(Continue(Step::CheckPreviousTokenUse)),
            Some(Ok(seen))
                if p.previous_deleted.is_none()
                    && super::previous_use::retire(seen, f.retire_after_unused) =>
            {
                return Some(Continue(Step::RetirePreviousToken));
            }
            _ => {}
        }
    }
    None
}

/// A new token outside a grace period: the service-user exchange, then the due renewal.
fn new_token(f: &Facts<'_>, s: &OwnedSecret) -> Option<Decision> {
    let p = f.findings;
    if let Some(name) = f.service_user
        && s.annotation(ANN_TOKEN_ID).is_some()
        && s.annotation(crate::token_secret::ANN_SERVICE_USER) != Some(name)
        && !p.exchanged
        && p.exchange_error.is_none()
    {
        return Some(Continue(Step::ExchangeForServiceUser));
    }
    let renewal_due = f.rotation_enabled && s.renew_at().is_some_and(|at| f.now >= at);
    if renewal_due && !p.rotated && p.rotation_error.is_none() {
        return Some(Continue(Step::RotateToken));
    }
    None
}

/// How many server errors (5xx) in a row setup may answer before the operator stops sending the
/// password: a NetBird with local users disabled answers 500 every time.
pub const SETUP_SERVER_ERRORS_LIMIT: u32 = 3;

/// Whether a setup failure is a server error that retrying with the same spec and credentials will
/// not change: NetBird's own word for it, or the limit of errors in a row reached.
fn server_error_gives_up(f: &Facts<'_>, e: &NetbirdError) -> bool {
    let Some(500..=599) = e.status() else {
        return false;
    };
    e.server_message()
        .is_some_and(|m| m.contains("local user creation is disabled"))
        || f.setup_server_errors + 1 >= SETUP_SERVER_ERRORS_LIMIT
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::Credentials;
    use crate::netbird::{InstanceStatus, User};
    use crate::token_secret::{ANN_SETUP_STARTED_AT, OwnedSecret};
    use secrecy::SecretString;
    use std::collections::BTreeMap;

    fn creds() -> Input<Credentials> {
        Input::Ready(Credentials {
            email: "a@b.c".into(),
            password: SecretString::from("password1"),
            name: "A".into(),
        })
    }

    fn owned(token: Option<&str>, started: bool) -> TokenSecret {
        let mut annotations = BTreeMap::new();
        annotations.insert(ANN_TOKEN_ID.to_string(), "unknown".to_string());
        if started {
            annotations.insert(ANN_SETUP_STARTED_AT.to_string(), "t".to_string());
        }
        TokenSecret::Ours(OwnedSecret {
            previous_token: None,
            token: token.map_or(TokenValue::Missing, |t| {
                TokenValue::Present(SecretString::from(t))
            }),
            labels: BTreeMap::new(),
            annotations,
            owner_references: vec![],
        })
    }

    struct World {
        credentials: Input<Credentials>,
        ca: Input<Vec<u8>>,
        secret: TokenSecret,
        findings: Findings,
        setup_done_before: bool,
        version_due: bool,
        suspended: bool,
        spec_problem: Option<&'static str>,
        in_sync: bool,
        credentials_unchanged: bool,
        allowed_servers: Option<&'static str>,
        setup_server_errors: u32,
        service_user: Option<&'static str>,
        insecure_skip_verify: bool,
        retire_after: std::time::Duration,
        previous_use_due: bool,
    }

    impl World {
        fn new(secret: TokenSecret) -> Self {
            World {
                credentials: creds(),
                ca: Input::NotNeeded,
                secret,
                findings: Findings::default(),
                setup_done_before: false,
                version_due: true,
                suspended: false,
                spec_problem: None,
                in_sync: true,
                credentials_unchanged: true,
                allowed_servers: None,
                setup_server_errors: 0,
                service_user: None,
                insecure_skip_verify: false,
                retire_after: std::time::Duration::from_secs(900),
                previous_use_due: false,
            }
        }
        fn decide(&self) -> Decision {
            decide(&Facts {
                generation: 1,
                credentials_unchanged: self.credentials_unchanged,
                suspended: self.suspended,
                spec_problem: self.spec_problem,
                credentials: &self.credentials,
                ca: &self.ca,
                token_secret: &self.secret,
                secret_metadata_in_sync: self.in_sync,
                setup_done_before: self.setup_done_before,
                setup_server_errors: self.setup_server_errors,
                version_due: self.version_due,
                rotation_enabled: true,
                service_user: self.service_user,
                retire_after_unused: self.retire_after,
                previous_use_due: self.previous_use_due,
                now: jiff::Timestamp::UNIX_EPOCH,
                findings: &self.findings,
                allowed_servers: self.allowed_servers,
                secret_name: "nb-token",
                secret_key: "NB_API_KEY",
                management_url: "https://nb.example.com",
                insecure_skip_verify: self.insecure_skip_verify,
            })
        }
    }

    fn api(status: u16, message: &str) -> NetbirdError {
        NetbirdError::Api {
            endpoint: crate::netbird::Endpoint::Setup,
            status,
            message: message.into(),
            request_id: Some("r1".into()),
            from_netbird: true,
        }
    }

    fn transport() -> NetbirdError {
        NetbirdError::Transport {
            endpoint: crate::netbird::Endpoint::Instance,
            kind: crate::netbird::TransportKind::Connect,
            detail: "connection refused".into(),
        }
    }

    fn user() -> User {
        User {
            id: "u1".into(),
            email: "a@b.c".into(),
            name: "A".into(),
            role: "owner".into(),
            is_service_user: false,
            status: "active".into(),
        }
    }

    fn reason(step: Decision) -> String {
        match step {
            Break(Verdict::Stalled { reason, .. }) => reason.as_str().to_string(),
            Break(Verdict::Waiting { reason, .. }) => reason.as_str().to_string(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn credentials_changed_since_the_claim_are_claimed_again_before_setup() {
        // a claim of an earlier pass (setup answered it with a server error), and the credentials
        // read fresh for setup differ from its fingerprint
        let mut w = World::new(owned(None, true));
        w.findings.instance = Some(Ok(InstanceStatus {
            setup_required: true,
        }));
        assert_eq!(w.decide(), Continue(Step::Setup), "unchanged: setup again");
        w.credentials_unchanged = false;
        assert_eq!(w.decide(), Continue(Step::ClaimSecret));
        w.findings.claimed = true;
        assert_eq!(
            w.decide(),
            Continue(Step::Setup),
            "claimed in this pass: setup"
        );
    }

    #[test]
    fn fresh_instance_walks_check_claim_setup() {
        let mut w = World::new(TokenSecret::Absent);
        assert_eq!(w.decide(), Continue(Step::CheckInstance));
        w.findings.instance = Some(Ok(InstanceStatus {
            setup_required: true,
        }));
        assert_eq!(w.decide(), Continue(Step::ClaimSecret));
        w.findings.claimed = true;
        w.secret = owned(None, true);
        assert_eq!(w.decide(), Continue(Step::Setup));
        // setup stored the token: the world now has it, and it gets verified, then versions read
        w.findings.setup = Some(SetupOutcome::TokenStored {
            user_id: "u1".into(),
            email: "a@b.c".into(),
        });
        w.secret = owned(Some("nbp_x"), false);
        if let TokenSecret::Ours(s) = &mut w.secret {
            s.annotations.remove(ANN_TOKEN_ID);
        }
        assert_eq!(w.decide(), Continue(Step::VerifyToken));
        w.findings.verify = Some(Ok(Verified {
            user: user(),
            at: jiff::Timestamp::UNIX_EPOCH,
        }));
        assert_eq!(
            w.decide(),
            Continue(Step::IdentifyToken),
            "in the same pass"
        );
        w.findings.token_list = Some(Ok(Vec::new()));
        assert_eq!(w.decide(), Continue(Step::CheckVersion));
        w.findings.version = Some(Err(transport()));
        assert_eq!(
            w.decide(),
            Break(Verdict::Ready),
            "a failed version check never un-Readies"
        );
    }

    #[test]
    fn suspend_and_invalid_spec_come_first() {
        let mut w = World::new(TokenSecret::Absent);
        w.suspended = true;
        assert_eq!(w.decide(), Break(Verdict::Suspended));
        w.suspended = false;
        w.spec_problem = Some("bad");
        assert_eq!(reason(w.decide()), "InvalidSpec");
    }

    #[test]
    fn missing_or_bad_inputs_wait_or_stall_before_any_call() {
        let mut w = World::new(TokenSecret::Absent);
        w.credentials = Input::Missing("waiting for Secret admin".into());
        match w.decide() {
            Break(Verdict::Waiting {
                reason: Waiting::WaitingForCredentials,
                retry: false,
                ..
            }) => {}
            s => panic!("{s:?}"),
        }
        w.credentials = Input::Invalid("password is 5 bytes".into());
        assert_eq!(reason(w.decide()), "InvalidSpec");
        w.credentials = creds();
        w.ca = Input::Missing("waiting for CA Secret".into());
        assert_eq!(reason(w.decide()), "WaitingForCredentials");
        w.ca = Input::Invalid("not PEM".into());
        assert_eq!(reason(w.decide()), "InvalidSpec");
    }

    /// The credentials are needed for setup only: a token in the Secret goes on without them.
    #[test]
    fn a_stored_token_goes_on_without_the_credentials_secret() {
        let mut w = World::new(owned(Some("nbp_x"), false));
        w.credentials = Input::Missing("waiting for Secret admin".into());
        assert_eq!(w.decide(), Continue(Step::VerifyToken));
        w.credentials = Input::Invalid("password is missing".into());
        assert_eq!(w.decide(), Continue(Step::VerifyToken));
    }

    /// A 404 page that is not NetBird's is about the URL, never "token rejected".
    #[test]
    fn a_proxy_404_is_not_a_rejected_token() {
        let mut w = World::new(owned(Some("nbp_x"), false));
        w.findings.verify = Some(Err(NetbirdError::Api {
            endpoint: crate::netbird::Endpoint::CurrentUser,
            status: 404,
            message: "404 page not found".into(),
            request_id: None,
            from_netbird: false,
        }));
        let d = w.decide();
        assert_eq!(reason(d.clone()), "ManagementUnreachable");
        match d {
            Break(Verdict::Waiting { message, .. }) => {
                assert!(message.contains("path prefix"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// Setup answering 500 again and again is given up after a few tries (the claim released and
    /// the answer recorded, so a restart does not send the password again either).
    #[test]
    fn setup_server_errors_stall_after_the_limit() {
        let mut w = World::new(owned(None, true));
        w.findings.instance = Some(Ok(InstanceStatus {
            setup_required: true,
        }));
        w.findings.claimed = true;
        w.findings.setup = Some(SetupOutcome::Failed(api(500, "internal server error")));
        w.setup_server_errors = 0;
        assert_eq!(reason(w.decide()), "ManagementUnreachable");
        w.setup_server_errors = SETUP_SERVER_ERRORS_LIMIT - 1;
        assert_eq!(w.decide(), Continue(Step::ReleaseClaim));
        w.findings.claim_released = true;
        assert_eq!(reason(w.decide()), "SetupUnavailable");
        // the limit reached in this process but its record refused: the next pass does not call
        let mut w = World::new(owned(None, true));
        w.findings.instance = Some(Ok(InstanceStatus {
            setup_required: true,
        }));
        w.setup_server_errors = SETUP_SERVER_ERRORS_LIMIT;
        assert_eq!(reason(w.decide()), "SetupUnavailable");
        // NetBird's own word that it cannot create local users: at once
        let mut w = World::new(owned(None, true));
        w.findings.setup = Some(SetupOutcome::Failed(api(
            500,
            "local user creation is disabled",
        )));
        assert_eq!(w.decide(), Continue(Step::ReleaseClaim));
        // recorded: not sent again for this spec and these credentials
        let mut w = World::new(owned(None, false));
        if let TokenSecret::Ours(s) = &mut w.secret {
            s.annotations.insert(
                ANN_SETUP_REJECTED.into(),
                "1 500 internal server error".into(),
            );
        }
        assert_eq!(reason(w.decide()), "SetupUnavailable");
    }

    /// A setup whose token was given up at shutdown is lost, never "stored".
    #[test]
    fn a_setup_token_lost_at_shutdown_is_token_lost() {
        let mut w = World::new(owned(None, true));
        w.findings.setup = Some(SetupOutcome::TokenLost {
            user_id: "u".into(),
            email: "a@b.c".into(),
        });
        assert_eq!(reason(w.decide()), "TokenLost");
    }

    /// A replaced token inside its grace period is never deleted, and no new token (rotation,
    /// service-user exchange) replaces its record meanwhile.
    #[test]
    fn nothing_replaces_a_previous_token_in_its_grace_period() {
        let mut annotations = BTreeMap::new();
        annotations.insert(ANN_TOKEN_ID.to_string(), "t2".to_string());
        annotations.insert(ANN_PREVIOUS_TOKEN_ID.to_string(), "t1".to_string());
        annotations.insert(
            crate::token_secret::ANN_PREVIOUS_DELETE_AT.to_string(),
            "1970-01-01T01:00:00Z".to_string(),
        );
        // issued long ago: a renewal is due
        annotations.insert(
            crate::token_secret::ANN_ISSUED_AT.to_string(),
            "1969-12-01T00:00:00Z".to_string(),
        );
        annotations.insert(
            crate::token_secret::ANN_EXPIRES_AT.to_string(),
            "1970-01-02T00:00:00Z".to_string(),
        );
        let secret = TokenSecret::Ours(OwnedSecret {
            previous_token: None,
            token: TokenValue::Present(SecretString::from("nbp_x")),
            labels: BTreeMap::new(),
            annotations,
            owner_references: vec![],
        });
        let mut w = World::new(secret);
        w.version_due = false;
        w.service_user = Some("svc");
        w.findings.verify = Some(Ok(Verified {
            user: user(),
            at: jiff::Timestamp::UNIX_EPOCH,
        }));
        // now (the epoch) is inside the grace period: neither a deletion nor a new token
        assert_eq!(w.decide(), Break(Verdict::Ready));
    }

    /// A rotated-away token in its grace period: verified current token, previous token pending
    /// until an hour after the epoch (the tests' now).
    fn pending_previous(exchanged: bool) -> World {
        let mut annotations = BTreeMap::new();
        annotations.insert(ANN_TOKEN_ID.to_string(), "t2".to_string());
        annotations.insert(ANN_PREVIOUS_TOKEN_ID.to_string(), "t1".to_string());
        annotations.insert(
            crate::token_secret::ANN_PREVIOUS_DELETE_AT.to_string(),
            "1970-01-01T01:00:00Z".to_string(),
        );
        if exchanged {
            annotations.insert(
                crate::token_secret::ANN_PREVIOUS_USER_ID.to_string(),
                "owner".to_string(),
            );
        }
        let mut w = World::new(TokenSecret::Ours(OwnedSecret {
            previous_token: None,
            token: TokenValue::Present(SecretString::from("nbp_x")),
            labels: BTreeMap::new(),
            annotations,
            owner_references: vec![],
        }));
        w.version_due = false;
        w.findings.verify = Some(Ok(Verified {
            user: user(),
            at: jiff::Timestamp::UNIX_EPOCH,
        }));
        w
    }

    fn look(idle_secs: u64, listed: bool) -> super::super::previous_use::Observation {
        super::super::previous_use::Observation {
            token_id: "t1".into(),
            at: jiff::Timestamp::UNIX_EPOCH,
            listed,
            last_used: None,
            idle: std::time::Duration::from_secs(idle_secs),
            used_since_change: false,
        }
    }

    /// The previous token is retired early only on this pass's own look showing it unused for
    /// retireAfterUnused (or gone), never with retireAfterUnused 0s, and never followed after the
    /// service-user exchange.
    #[test]
    fn a_previous_token_is_retired_early_only_when_a_fresh_look_shows_it_unused() {
        let mut w = pending_previous(false);
        assert_eq!(
            w.decide(),
            Break(Verdict::Ready),
            "no look due: nothing to do"
        );
        w.previous_use_due = true;
        assert_eq!(w.decide(), Continue(Step::CheckPreviousTokenUse));
        w.findings.previous_use = Some(Ok(look(899, true)));
        assert_eq!(w.decide(), Break(Verdict::Ready), "used 899 s ago: kept");
        w.findings.previous_use = Some(Err(api(500, "boom")));
        assert_eq!(w.decide(), Break(Verdict::Ready), "a failed look: kept");
        w.findings.previous_use = Some(Ok(look(900, true)));
        assert_eq!(w.decide(), Continue(Step::RetirePreviousToken));
        w.findings.previous_use = Some(Ok(look(0, false)));
        assert_eq!(
            w.decide(),
            Continue(Step::RetirePreviousToken),
            "gone: records cleared"
        );
        w.findings.previous_deleted = Some(Err(api(500, "boom")));
        assert_eq!(w.decide(), Break(Verdict::Ready), "one try per pass");
        w.findings.previous_deleted = None;
        w.retire_after = std::time::Duration::ZERO;
        w.findings.previous_use = Some(Ok(look(86_400, true)));
        assert_eq!(w.decide(), Break(Verdict::Ready), "0s: never early");

        let mut x = pending_previous(true);
        x.previous_use_due = true;
        assert_eq!(
            x.decide(),
            Break(Verdict::Ready),
            "after the exchange: not followed"
        );
        x.findings.previous_use = Some(Ok(look(86_400, true)));
        assert_eq!(x.decide(), Break(Verdict::Ready));
    }

    #[test]
    fn a_foreign_secret_is_never_touched() {
        let w = World::new(TokenSecret::Foreign("no label".into()));
        assert_eq!(reason(w.decide()), "SecretConflict");
    }

    #[test]
    fn stored_token_is_verified_and_adopted_without_setup() {
        let mut w = World::new(owned(Some("nbp_x"), false));
        assert_eq!(w.decide(), Continue(Step::VerifyToken));
        w.findings.verify = Some(Ok(Verified {
            user: user(),
            at: jiff::Timestamp::UNIX_EPOCH,
        }));
        w.version_due = false;
        assert_eq!(w.decide(), Break(Verdict::Ready));
    }

    #[test]
    fn rejected_token_stalls_and_unreachable_retries() {
        let mut w = World::new(owned(Some("nbp_x"), false));
        w.findings.verify = Some(Err(api(401, "token invalid")));
        assert_eq!(reason(w.decide()), "TokenRejected");
        w.findings.verify = Some(Err(api(404, "invalid token: pat: x not found")));
        assert_eq!(reason(w.decide()), "TokenRejected");
        w.findings.verify = Some(Err(api(500, "internal server error")));
        assert_eq!(reason(w.decide()), "ManagementUnreachable");
        w.findings.verify = Some(Err(transport()));
        assert_eq!(reason(w.decide()), "ManagementUnreachable");
        let w = World::new(TokenSecret::Ours(OwnedSecret {
            previous_token: None,
            token: TokenValue::NotText,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            owner_references: vec![],
        }));
        assert_eq!(reason(w.decide()), "TokenRejected");
    }

    #[test]
    fn already_set_up_without_token() {
        let mut w = World::new(TokenSecret::Absent);
        w.findings.instance = Some(Ok(InstanceStatus {
            setup_required: false,
        }));
        assert_eq!(reason(w.decide()), "SetupUnavailable");
        // our own claim marker: the setup call went through, its token was lost
        w.secret = owned(None, true);
        assert_eq!(reason(w.decide()), "TokenLost");
        // status remembers that setup was ours, the Secret was emptied since
        w.secret = owned(None, false);
        w.setup_done_before = true;
        assert_eq!(reason(w.decide()), "TokenLost");
    }

    #[test]
    fn a_claimed_secret_with_setup_still_required_calls_setup_without_reclaiming() {
        let mut w = World::new(owned(None, true));
        w.findings.instance = Some(Ok(InstanceStatus {
            setup_required: true,
        }));
        assert_eq!(w.decide(), Continue(Step::Setup));
    }

    #[test]
    fn setup_failures_map_to_reasons_and_never_a_second_call() {
        for (err, want) in [
            (api(412, "setup already completed"), "SetupUnavailable"),
            (
                api(422, "password must be at least 8 characters"),
                "CredentialsRejected",
            ),
            (api(422, "invalid email format"), "CredentialsRejected"),
            (api(400, "invalid request body"), "CredentialsRejected"),
            (
                api(422, "pat_expire_in must be between 1 and 365"),
                "InvalidSpec",
            ),
            (api(500, "internal server error"), "ManagementUnreachable"),
            (transport(), "ManagementUnreachable"),
        ] {
            let mut w = World::new(owned(None, true));
            w.findings.instance = Some(Ok(InstanceStatus {
                setup_required: true,
            }));
            w.findings.claimed = true;
            let definitive = matches!(err.status(), Some(400 | 412 | 422));
            w.findings.setup = Some(SetupOutcome::Failed(err));
            if definitive {
                assert_eq!(w.decide(), Continue(Step::ReleaseClaim), "{want}");
                w.findings.claim_released = true;
                w.secret = owned(None, false);
            }
            let step = w.decide();
            assert_ne!(step, Continue(Step::Setup));
            assert_eq!(reason(step), want);
        }
    }

    #[test]
    fn setup_without_token_is_remembered() {
        let mut w = World::new(owned(None, false));
        w.findings.setup = Some(SetupOutcome::NoToken {
            user_id: "u".into(),
            email: "e".into(),
        });
        assert_eq!(reason(w.decide()), "TokenNotIssued");
        let mut annotations = BTreeMap::new();
        annotations.insert(
            ANN_SETUP_OUTCOME.to_string(),
            OUTCOME_TOKEN_NOT_ISSUED.to_string(),
        );
        let w = World::new(TokenSecret::Ours(OwnedSecret {
            previous_token: None,
            token: TokenValue::Missing,
            labels: BTreeMap::new(),
            annotations,
            owner_references: vec![],
        }));
        assert_eq!(
            reason(w.decide()),
            "TokenNotIssued",
            "a later pass makes no call"
        );
    }

    #[test]
    fn a_recorded_refusal_is_not_sent_again_until_something_changes() {
        let mut annotations = BTreeMap::new();
        annotations.insert(
            ANN_SETUP_REJECTED.to_string(),
            "1 422 invalid email format".to_string(),
        );
        let secret = TokenSecret::Ours(OwnedSecret {
            previous_token: None,
            token: TokenValue::Missing,
            labels: BTreeMap::new(),
            annotations,
            owner_references: vec![],
        });
        let mut w = World::new(secret);
        w.findings.instance = Some(Ok(InstanceStatus {
            setup_required: true,
        }));
        assert_eq!(reason(w.decide()), "CredentialsRejected");
        // new credentials: a new attempt (claim first)
        w.credentials_unchanged = false;
        assert_eq!(w.decide(), Continue(Step::ClaimSecret));
    }

    #[test]
    fn redirects_are_a_spec_problem() {
        let mut w = World::new(TokenSecret::Absent);
        w.findings.instance = Some(Err(NetbirdError::Redirect {
            endpoint: crate::netbird::Endpoint::Instance,
            status: 302,
            location: "https://elsewhere/".into(),
        }));
        assert_eq!(reason(w.decide()), "InvalidSpec");
    }

    #[test]
    fn secret_metadata_is_synced_once() {
        let mut w = World::new(owned(Some("nbp_x"), false));
        w.in_sync = false;
        assert_eq!(w.decide(), Continue(Step::SyncSecretMetadata));
        w.findings.metadata_synced = true;
        assert_eq!(w.decide(), Continue(Step::VerifyToken));
    }

    #[test]
    fn a_token_bound_to_another_server_is_never_sent() {
        let mut secret = owned(Some("nbp_x"), false);
        if let TokenSecret::Ours(s) = &mut secret {
            s.annotations.insert(
                crate::binding::ANN_MANAGEMENT_URL.into(),
                "https://home.example.com".into(),
            );
        }
        let w = World::new(secret);
        match w.decide() {
            Break(Verdict::Stalled { reason, message }) => {
                assert_eq!(reason, Stall::ServerNotAllowed);
                assert!(message.contains("https://home.example.com"), "{message}");
                assert!(message.contains("https://nb.example.com"), "{message}");
                assert!(message.contains("spec.token.secretName"), "{message}");
            }
            s => panic!("{s:?}"),
        }
        // the same server under another spelling is the same server
        let mut secret = owned(Some("nbp_x"), false);
        if let TokenSecret::Ours(s) = &mut secret {
            s.annotations.insert(
                crate::binding::ANN_MANAGEMENT_URL.into(),
                "https://NB.example.com:443/".into(),
            );
        }
        assert_eq!(World::new(secret).decide(), Continue(Step::VerifyToken));
        // no record yet (a Secret written before the operator recorded it): verified, then recorded
        assert_eq!(
            World::new(owned(Some("nbp_x"), false)).decide(),
            Continue(Step::VerifyToken)
        );
    }

    #[test]
    fn a_token_bound_with_verification_is_not_sent_without() {
        let mut secret = owned(Some("nbp_x"), false);
        if let TokenSecret::Ours(s) = &mut secret {
            s.annotations
                .insert(crate::binding::ANN_MANAGEMENT_TLS.into(), "verified".into());
        }
        let mut w = World::new(secret);
        assert_eq!(w.decide(), Continue(Step::VerifyToken));
        w.insecure_skip_verify = true;
        match w.decide() {
            Break(Verdict::Stalled { reason, message }) => {
                assert_eq!(reason, Stall::ServerNotAllowed);
                assert!(message.contains("insecureSkipVerify"), "{message}");
                assert!(
                    message.contains(crate::binding::ANN_MANAGEMENT_TLS),
                    "{message}"
                );
            }
            s => panic!("{s:?}"),
        }
        // no record (an older Secret): verified, then recorded as the spec has it
        let mut w = World::new(owned(Some("nbp_x"), false));
        w.insecure_skip_verify = true;
        assert_eq!(w.decide(), Continue(Step::VerifyToken));
    }

    #[test]
    fn the_password_goes_only_where_its_secret_allows() {
        let mut w = World::new(TokenSecret::Absent);
        w.allowed_servers = Some("https://other.example.com, https://third.example.com");
        assert_eq!(reason(w.decide()), "ServerNotAllowed");
        w.allowed_servers = Some("https://other.example.com https://nb.example.com/");
        assert_eq!(w.decide(), Continue(Step::CheckInstance));
    }

    #[test]
    fn a_malformed_token_from_setup_or_a_rotation_stalls_without_a_loop() {
        let mut w = World::new(TokenSecret::Absent);
        w.findings.malformed_token = Some(("setup", crate::netbird::pat::PatFormatError::Checksum));
        assert_eq!(reason(w.decide()), "TokenNotIssued");

        let mut secret = owned(None, false);
        if let TokenSecret::Ours(s) = &mut secret {
            s.annotations.insert(
                crate::token_secret::ANN_SETUP_OUTCOME.into(),
                OUTCOME_TOKEN_MALFORMED.into(),
            );
        }
        assert_eq!(reason(World::new(secret).decide()), "TokenNotIssued");

        let mut secret = owned(Some("nbp_x"), false);
        if let TokenSecret::Ours(s) = &mut secret {
            s.annotations.insert(
                ANN_MALFORMED_TOKEN.into(),
                "1 rotation the token does not start with nbp_".into(),
            );
        }
        let mut w = World::new(secret.clone());
        w.findings.verify = Some(Ok(Verified {
            user: user(),
            at: jiff::Timestamp::UNIX_EPOCH,
        }));
        w.version_due = false;
        assert_eq!(reason(w.decide()), "TokenNotIssued");
        // another generation asks again
        if let TokenSecret::Ours(s) = &mut secret {
            s.annotations
                .insert(ANN_MALFORMED_TOKEN.into(), "0 rotation x".into());
        }
        w.secret = secret;
        assert_eq!(w.decide(), Break(Verdict::Ready));
    }

    #[test]
    fn already_set_up_after_an_unanswered_call_is_token_lost_and_keeps_the_claim() {
        let mut secret = owned(None, true);
        if let TokenSecret::Ours(s) = &mut secret {
            s.annotations
                .insert(crate::token_secret::ANN_SETUP_UNANSWERED.into(), "t".into());
        }
        let mut w = World::new(secret);
        w.findings.instance = Some(Ok(InstanceStatus {
            setup_required: true,
        }));
        w.findings.claimed = true;
        w.findings.setup = Some(SetupOutcome::Failed(api(412, "setup already completed")));
        match w.decide() {
            Break(Verdict::Stalled { reason, message }) => {
                assert_eq!(reason, Stall::TokenLost);
                assert!(message.contains("someone else"), "{message}");
            }
            s => panic!("{s:?}"),
        }
        // without an unanswered call, a 412 is someone else's setup: the claim is released
        let mut w = World::new(owned(None, true));
        w.findings.setup = Some(SetupOutcome::Failed(api(412, "setup already completed")));
        assert_eq!(w.decide(), Continue(Step::ReleaseClaim));
    }
}
