//! The bootstrap: claiming the token Secret, `POST /api/setup` with the token stored before
//! anything else, and releasing the claim after a refusal; and whether the credentials Secret
//! still matches the fingerprint NetBird was set up with ([`credentials_changed`], the comparison
//! recorded on the token Secret by [`record_credentials_check`]).

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::Stepper;
use super::store::write_until_stored;
use super::world::{World, progressing};
use crate::controller::context::Context;
use crate::controller::decide::{Input, SetupOutcome, Verdict, Waiting};
use crate::controller::secrets::Secrets;
use crate::controller::setup_gates;
use crate::crd::NetbirdInstance;
use crate::credentials::Credentials;
use crate::fingerprint;
use crate::netbird::pat::{self, PatFormatError};
use crate::netbird::{NetbirdClient, SetupRequest};
use crate::token_secret::{self, ANN_FINGERPRINT, TokenSecret};

impl Stepper<'_, '_> {
    pub(super) async fn claim_secret(&mut self) -> Result<(), Verdict> {
        let (nbi, ctx, secrets) = (self.nbi, self.ctx, self.secrets);
        let Input::Ready(creds) = &self.world.credentials else {
            return Ok(());
        };
        let fp = fingerprint::hash(creds.fingerprint_input())
            .await
            .map_err(|e| Verdict::Waiting {
                reason: Waiting::Progressing,
                message: e.to_string(),
                retry: true,
            })?;
        // the fingerprint was just made from these credentials: no need to compare them again
        ctx.memory.remember_fingerprint_check(
            &nbi.uid().unwrap_or_default(),
            fingerprint_key(&fp, &creds.fingerprint_input()),
            true,
        );
        let started = ctx.now().to_string();
        let check = self
            .world
            .credentials_rv
            .as_deref()
            .map(|rv| token_secret::credentials_check(rv, &fp, true));
        let secret_name = nbi.token_secret_name();
        let result = match (&self.world.token_secret, &self.world.token_secret_rv) {
            (TokenSecret::Ours(s), Some(rv)) => {
                let patch = token_secret::claim_patch(nbi, s, rv, &started, &fp, check.as_deref());
                secrets.patch(&secret_name, &patch).await
            }
            _ => {
                let fresh = token_secret::new_claimed_checked(nbi, &started, &fp, check.as_deref());
                secrets.create(&fresh).await
            }
        };
        let claimed = match result {
            // created a moment ago by someone else (the watch had not reported it): read it and
            // decide again
            Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "AlreadyExists" => {
                return self.world.written(nbi, secrets, None).await;
            }
            r => r.map_err(|e| {
                progressing(
                    &format!("failed to claim Secret {secret_name} before setup"),
                    &e,
                )
            })?,
        };
        // the claim recorded its own comparison: one made earlier in this pass is out of date
        self.world.unrecorded_check = None;
        info!(secret = %secret_name, "claimed the token Secret for setup");
        self.world.set_token_secret(nbi, Some(claimed));
        self.findings.claimed = true;
        Ok(())
    }

    pub(super) async fn setup(&mut self) -> Result<(), Verdict> {
        let Input::Ready(creds) = &self.world.credentials else {
            return Ok(());
        };
        // a replaced token the Secret still records belongs to another server's life: setup's
        // write drops the record (see token_secret::setup_store_patch), and says so here
        let earlier = self
            .world
            .token_secret
            .owned()
            .and_then(|s| s.annotation(token_secret::ANN_PREVIOUS_TOKEN_ID))
            .map(str::to_string);
        // one setup call at a time per server: when another instance's pass called setup there
        // since this pass asked whether the server needs one, it asks again first
        let gate = self.ctx.setup_gates.gate(&self.nbi.spec.management_url);
        let mut last_setup = gate.lock().await;
        if setup_gates::set_up_since(*last_setup, self.findings.instance_asked_at) {
            self.findings.instance_asked_at = Some(tokio::time::Instant::now());
            let fresh = self.client.instance_status().await;
            let required = matches!(&fresh, Ok(i) if i.setup_required);
            if !required {
                if fresh.is_ok() {
                    info!(
                        "another NetbirdInstance's setup of this server came first; not calling \
                         setup"
                    );
                    self.findings.setup = Some(SetupOutcome::SetUpMeanwhile);
                }
                self.findings.instance = Some(fresh);
                return Ok(());
            }
        }
        *last_setup = Some(tokio::time::Instant::now());
        let (outcome, written, malformed) = setup(
            self.nbi,
            self.ctx,
            self.urgent,
            &self.client,
            creds,
            self.secrets,
            self.world.token_secret_rv.as_deref(),
        )
        .await?;
        if let (Some(id), SetupOutcome::TokenStored { .. }) = (&earlier, &outcome) {
            warn!(token_id = %id, "setup stored a new token in a Secret that recorded a replaced \
                                   token of an earlier setup; that token is no longer followed and \
                                   stays valid on its own server until it expires");
        }
        match &outcome {
            // no answer: the server may have done it; a later "already set up" is then not taken
            // for someone else's setup
            SetupOutcome::Failed(e) if e.status().is_none() => {
                let at = self.ctx.now().to_string();
                self.patch(&token_secret::setup_unanswered_patch(&at))
                    .await?;
            }
            SetupOutcome::Failed(_) | SetupOutcome::TokenLost { .. } => {}
            _ => self.written(written).await?,
        }
        self.findings.setup = Some(outcome);
        self.findings.malformed_token = malformed.map(|why| ("setup", why));
        Ok(())
    }

    /// A token was put into the Secret while the operator's setup was in flight (its answer lost
    /// in a crash, or not yet given): that setup is over, and its token, if the call reached
    /// NetBird, exists only on the server. Said loudly here and in an Event (see `publish.rs`).
    pub(super) async fn end_abandoned_setup(&mut self) -> Result<(), Verdict> {
        let started = self
            .world
            .token_secret
            .owned()
            .and_then(|s| s.annotation(token_secret::ANN_SETUP_STARTED_AT))
            .unwrap_or_default()
            .to_string();
        self.patch(&token_secret::abandoned_setup_patch()).await?;
        tracing::error!(
            namespace = self.nbi.metadata.namespace.as_deref().unwrap_or_default(),
            instance = %self.nbi.name_any(),
            setup_started_at = %started,
            "a token was put into the token Secret while a setup was in flight: {}",
            token_secret::setup_token_lost()
        );
        self.findings.abandoned_setup_ended = true;
        Ok(())
    }

    pub(super) async fn release_claim(&mut self) -> Result<(), Verdict> {
        let rejection = match &self.findings.setup {
            // the decision asks for this step after a definitive answer only
            Some(SetupOutcome::Failed(e)) if e.status().is_some() => Some((
                self.nbi.metadata.generation.unwrap_or_default(),
                e.status().unwrap_or_default(),
                e.server_message().unwrap_or_default(),
            )),
            _ => None,
        };
        let patch = token_secret::release_patch(rejection);
        self.patch(&patch).await?;
        self.findings.claim_released = true;
        Ok(())
    }
}

/// `POST /api/setup`, and on success the token into the Secret before anything else (the Secret as
/// written is returned beside the outcome).
async fn setup(
    nbi: &NetbirdInstance,
    ctx: &Context,
    urgent: &dyn super::UrgentReport,
    client: &NetbirdClient,
    creds: &Credentials,
    secrets: &Secrets<'_>,
    claimed: Option<&str>,
) -> Result<(SetupOutcome, Option<Secret>, Option<PatFormatError>), Verdict> {
    let req = SetupRequest {
        email: creds.email.clone(),
        password: creds.password.clone(),
        name: creds.name.clone(),
        create_pat: true,
        pat_expire_in: nbi.spec.token.expires_in_days,
    };
    info!(email = %creds.email, "calling setup");
    let resp = match client.setup(&req).await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e.with_request_id(), "setup failed");
            return Ok((SetupOutcome::Failed(e), None, None));
        }
    };
    let completed = ctx.now();
    // what the server returns is checked as strictly as what the client sends: a malformed token is
    // never stored
    let malformed = resp
        .personal_access_token
        .as_ref()
        .and_then(|t| pat::check(t.expose_secret()).err());
    let token = match resp.personal_access_token {
        Some(token) if malformed.is_none() => token,
        _ => {
            let patch = no_token_patch(&resp.user_id, completed, malformed.is_some());
            let written =
                write_until_stored(ctx, urgent, secrets, nbi, claimed, &patch, None).await?;
            let outcome = SetupOutcome::NoToken {
                user_id: resp.user_id,
                email: resp.email,
            };
            return Ok((outcome, written, malformed));
        }
    };
    let patch = token_patch(nbi, &token, &resp.user_id, completed);
    let written =
        write_until_stored(ctx, urgent, secrets, nbi, claimed, &patch, Some(&token)).await?;
    if written.is_none() {
        // given up at shutdown, and said loudly there: never also reported stored
        let outcome = SetupOutcome::TokenLost {
            user_id: resp.user_id,
            email: resp.email,
        };
        return Ok((outcome, None, None));
    }
    info!(user_id = %resp.user_id, secret = %nbi.token_secret_name(),
        "setup succeeded; token stored");
    let outcome = SetupOutcome::TokenStored {
        user_id: resp.user_id,
        email: resp.email,
    };
    Ok((outcome, written, None))
}

/// The patch recording a setup answered without a (well-formed) token; logs which.
fn no_token_patch(user_id: &str, completed: jiff::Timestamp, malformed: bool) -> serde_json::Value {
    let outcome = if malformed {
        warn!(user_id = %user_id,
            "setup succeeded but returned a malformed token; not stored");
        token_secret::OUTCOME_TOKEN_MALFORMED
    } else {
        warn!(user_id = %user_id,
            "setup succeeded without a token (server lacks NB_SETUP_PAT_ENABLED=true)");
        token_secret::OUTCOME_TOKEN_NOT_ISSUED
    };
    token_secret::no_token_patch(user_id, &completed.to_string(), outcome)
}

/// The patch that stores setup's token, with its expiry (`spec.token.expiresInDays` after setup).
fn token_patch(
    nbi: &NetbirdInstance,
    token: &SecretString,
    user_id: &str,
    completed: jiff::Timestamp,
) -> serde_json::Value {
    let expires = completed
        .checked_add(jiff::SignedDuration::from_hours(
            24 * i64::from(nbi.spec.token.expires_in_days),
        ))
        .unwrap_or(completed);
    token_secret::setup_store_patch(
        nbi,
        token,
        user_id,
        &expires.to_string(),
        &completed.to_string(),
    )
}

/// What the in-memory cache of fingerprint comparisons is keyed by (never stored anywhere).
fn fingerprint_key(fp: &str, input: &SecretString) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(fp.as_bytes());
    h.update([0]);
    h.update(input.expose_secret().as_bytes());
    h.finalize().into()
}

/// Whether the credentials Secret now differs from the credentials NetBird was set up with. The
/// argon2 comparison runs only when the fingerprint or the credentials changed since the last one,
/// in this process (memory) or before (recorded on the token Secret, then kept for recording).
pub async fn credentials_changed(nbi: &NetbirdInstance, ctx: &Context, world: &mut World) -> bool {
    let Input::Ready(creds) = &world.credentials else {
        return false;
    };
    let fp = world
        .token_secret
        .owned()
        .and_then(|s| s.annotation(ANN_FINGERPRINT).map(str::to_string));
    let Some(fp) = fp.filter(|f| !f.is_empty()) else {
        return false;
    };
    let input = creds.fingerprint_input();
    let key = fingerprint_key(&fp, &input);
    let uid = nbi.uid().unwrap_or_default();
    if let Some(same) = ctx.memory.fingerprint_check(&uid, &key) {
        return !same;
    }
    let credentials_rv = world.credentials_rv.clone().unwrap_or_default();
    let recorded = world
        .token_secret
        .owned()
        .and_then(|s| s.annotation(token_secret::ANN_CREDENTIALS_CHECKED))
        .and_then(|v| token_secret::recorded_check(v, &credentials_rv, &fp));
    let same = match recorded {
        Some(same) => same,
        None => {
            let same = fingerprint::matches(fp.clone(), input).await;
            world.unrecorded_check = (!credentials_rv.is_empty())
                .then(|| token_secret::credentials_check(&credentials_rv, &fp, same));
            same
        }
    };
    ctx.memory.remember_fingerprint_check(&uid, key, same);
    !same
}

/// Records on the token Secret a comparison this pass made (a restart then need not repeat it).
/// Bookkeeping: a failure is logged and the comparison is made again after a restart.
pub async fn record_credentials_check(
    nbi: &NetbirdInstance,
    secrets: &Secrets<'_>,
    world: &mut World,
) {
    let Some(check) = world.unrecorded_check.take() else {
        return;
    };
    if nbi.spec.suspend {
        return;
    }
    let recorded = world
        .token_secret
        .owned()
        .map(|s| s.annotation(token_secret::ANN_CREDENTIALS_CHECKED) == Some(check.as_str()));
    if recorded != Some(false) {
        return;
    }
    let patch = token_secret::guarded(
        &token_secret::credentials_checked_patch(&check),
        world.token_secret_rv.as_deref(),
    );
    match secrets.patch(&nbi.token_secret_name(), &patch).await {
        Ok(written) => world.set_token_secret(nbi, Some(written)),
        Err(e) => {
            warn!(error = %e, "failed to record the credentials comparison on the token Secret")
        }
    }
}
