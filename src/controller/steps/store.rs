//! Writing the token Secret: a patch whose failure becomes a verdict (`patch_token_secret`), and
//! a write that carries what NetBird issued, retried until stored (`write_until_stored`): reported
//! in the status at once when refused, held in memory between passes after a while
//! ([`HeldWrite`], [`store_held`]), and given up loudly at the shutdown deadline.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use secrecy::SecretString;
use tracing::{info, warn};

use super::world::{World, progressing};
use crate::controller::backoff::Backoff;
use crate::controller::context::Context;
use crate::controller::decide::{Verdict, Waiting};
use crate::controller::secrets::Secrets;
use crate::crd::NetbirdInstance;
use crate::token_secret;

pub(super) async fn patch_token_secret(
    secrets: &Secrets<'_>,
    name: &str,
    patch: &serde_json::Value,
) -> Result<Secret, Verdict> {
    secrets
        .patch(name, patch)
        .await
        .map_err(|e| progressing(&format!("failed to update Secret {name}"), &e))
}

/// Writes `patch` to the token Secret, retrying with backoff: the token exists nowhere else. When
/// the Secret vanished, it is created again with the token. A refusal that looks permanent (RBAC,
/// validation) is put in the status at once, and retried all the same (an admin may fix it). After
/// a shutdown began it keeps trying for `--shutdown-timeout`, then gives up and says loudly what
/// is lost; it never holds the process beyond that.
pub(super) async fn write_until_stored(
    ctx: &Context,
    urgent: &dyn super::UrgentReport,
    secrets: &Secrets<'_>,
    nbi: &NetbirdInstance,
    based_on: Option<&str>,
    patch: &serde_json::Value,
    token: Option<&SecretString>,
) -> Result<Option<Secret>, Verdict> {
    let name = nbi.token_secret_name();
    let began = tokio::time::Instant::now();
    let mut write = HeldWrite {
        namespace: nbi.metadata.namespace.clone().unwrap_or_default(),
        instance: nbi.name_any(),
        secret: name.clone(),
        based_on: based_on.map(str::to_string),
        patch: patch.clone(),
        recreate: token_secret::recreated(nbi, patch),
        holds_token: token.is_some(),
    };
    let mut failures = 0;
    let mut reported = false;
    loop {
        let answered = write.attempt_before_deadline(ctx, secrets).await;
        let error = match answered {
            Some(Ok(s)) => return Ok(Some(s)),
            Some(Err(e)) => {
                if token.is_some() && !reported && looks_permanent(&e) {
                    reported = true;
                    urgent
                        .storing_token(storing_token_message(nbi, &name, &e))
                        .await;
                }
                e.to_string()
            }
            None => "the apiserver did not answer before the shutdown deadline".to_string(),
        };
        failures += 1;
        let delay = WRITE_RETRY.delay(failures);
        warn!(
            error = %error,
            retry_in = ?delay,
            secret = %name,
            held_token = token.is_some(),
            "failed to write the token Secret; retrying"
        );
        let deadline = ctx.shutdown_deadline();
        if let Some(at) = deadline
            && tokio::time::Instant::now() >= at
        {
            give_up_at_shutdown(nbi, &name, &error, token.is_some());
            return Ok(None);
        }
        // not shutting down: the write is held in memory and retried by the instance's next
        // passes (with backoff), so a Secret that cannot be written never holds a controller slot
        if deadline.is_none() && began.elapsed() >= HOLD_AFTER {
            ctx.memory.hold_write(&nbi.uid().unwrap_or_default(), write);
            return Err(storing_token(&name, &error));
        }
        wait_before_retry(ctx, delay, deadline).await;
    }
}

/// Says what a shutdown loses: the setup outcome only, or (loudly) the token NetBird issued.
fn give_up_at_shutdown(nbi: &NetbirdInstance, name: &str, error: &str, holds_token: bool) {
    if !holds_token {
        warn!(
            secret = %name,
            error = %error,
            "shutting down with the setup outcome not recorded on the token Secret"
        );
        return;
    }
    tracing::error!(
        namespace = nbi.metadata.namespace.as_deref().unwrap_or_default(),
        instance = %nbi.name_any(),
        secret = %name,
        error = %error,
        "shutting down with the token not stored: the token NetBird issued is LOST (NetBird shows \
         a token only once). Log in to the dashboard as the owner, create a personal access token \
         and put it under the token Secret's key"
    );
}

/// Sleeps `delay` before the next attempt, never past the shutdown deadline.
async fn wait_before_retry(ctx: &Context, delay: Duration, deadline: Option<tokio::time::Instant>) {
    let mut wait = delay;
    if let Some(at) = deadline {
        // never sleep past the deadline
        wait = wait.min(at.saturating_duration_since(tokio::time::Instant::now()));
    }
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        // a shutdown starts the deadline at once
        () = ctx.shutdown.cancelled(), if deadline.is_none() => {}
    }
}

/// The retries of a failing token write within a pass (and at shutdown).
pub(crate) const WRITE_RETRY: Backoff = Backoff {
    first: Duration::from_millis(200),
    max: Duration::from_secs(30),
};

/// How long a pass retries a failing token write before it holds the write in memory and ends
/// (the instance's next passes retry it with backoff).
const HOLD_AFTER: Duration = Duration::from_secs(10);

/// A token Secret write held in memory between passes: the patch (which may carry the token) and
/// the Secret to create when the Secret is gone. Never stored anywhere.
pub struct HeldWrite {
    pub namespace: String,
    pub instance: String,
    pub secret: String,
    /// The version of the Secret the write applies to (see [`token_secret::guarded`]).
    based_on: Option<String>,
    patch: serde_json::Value,
    recreate: Secret,
    /// The patch carries a token NetBird issued (lost if the process ends before it is written).
    pub holds_token: bool,
}

impl HeldWrite {
    /// One attempt of the write, on the version of the Secret it was decided on; the Secret is
    /// created again when it is gone. When the Secret changed meanwhile (a conflict), it is read
    /// again and the next attempt applies to what it is now, but only while it still carries the
    /// operator's labels: the operator never writes into a Secret that lacks them.
    pub async fn attempt(&mut self, secrets: &Secrets<'_>) -> Result<Secret, kube::Error> {
        let patch = token_secret::guarded(&self.patch, self.based_on.as_deref());
        let conflict = match secrets.patch(&self.secret, &patch).await {
            Err(kube::Error::Api(s)) if s.code == 404 => {
                return secrets.create(&self.recreate).await;
            }
            Err(kube::Error::Api(s)) if s.code == 409 => kube::Error::Api(s),
            other => return other,
        };
        match secrets.get(&self.secret).await? {
            None => secrets.create(&self.recreate).await,
            Some(now) => {
                let labelled = token_secret::classify(Some(now.clone()), &self.instance, "")
                    .owned()
                    .is_some();
                if labelled {
                    self.based_on = now.metadata.resource_version;
                    Err(conflict)
                } else {
                    Err(unlabelled(&self.secret))
                }
            }
        }
    }

    /// One attempt, cut off at the shutdown deadline if unanswered by then (`None`).
    async fn attempt_before_deadline(
        &mut self,
        ctx: &Context,
        secrets: &Secrets<'_>,
    ) -> Option<Result<Secret, kube::Error>> {
        // a write the apiserver does not answer is cut off at the shutdown deadline too
        let attempt = self.attempt(secrets);
        tokio::pin!(attempt);
        let answered = tokio::select! {
            r = &mut attempt => Some(r),
            () = ctx.shutdown.cancelled() => None,
        };
        match answered {
            Some(r) => Some(r),
            None => match ctx.shutdown_deadline() {
                Some(at) => tokio::time::timeout_at(at, &mut attempt).await.ok(),
                None => Some(attempt.await),
            },
        }
    }
}

/// The answer of a write the operator will not make: the Secret lost its labels.
fn unlabelled(secret: &str) -> kube::Error {
    kube::Error::Api(
        kube::core::Status::failure(
            &format!(
                "Secret {secret} no longer carries the labels {}={} and {}=<instance>; the \
                 operator writes only into Secrets that do (put them back)",
                token_secret::LABEL_MANAGED_BY,
                token_secret::MANAGED_BY,
                token_secret::LABEL_INSTANCE
            ),
            "Conflict",
        )
        .with_code(409)
        .boxed(),
    )
}

/// The verdict while a token is held in memory because its Secret cannot be written.
fn storing_token(secret: &str, error: &str) -> Verdict {
    Verdict::Waiting {
        reason: Waiting::StoringToken,
        message: format!(
            "the token NetBird returned is held in memory only: writing Secret {secret} failed \
             ({error}); retrying with backoff, and the token is lost if the process ends first. \
             The operator needs get, create and patch on secrets in this namespace"
        ),
        retry: true,
    }
}

/// Writes a write held by an earlier pass, once; the world takes the Secret as written. A failure
/// holds it again and ends the pass (StoringToken, with backoff).
pub async fn store_held(
    ctx: &Context,
    nbi: &NetbirdInstance,
    secrets: &Secrets<'_>,
    world: &mut World,
    mut held: HeldWrite,
) -> Result<(), Verdict> {
    match held.attempt(secrets).await {
        Ok(written) => {
            info!(secret = %held.secret, "stored the token Secret write held from an earlier pass");
            world.set_token_secret(nbi, Some(written));
            Ok(())
        }
        Err(e) => {
            let verdict = storing_token(&held.secret, &e.to_string());
            ctx.memory.hold_write(&nbi.uid().unwrap_or_default(), held);
            Err(verdict)
        }
    }
}

/// A refusal that retrying as is will not change (an admin has to act): RBAC, validation.
fn looks_permanent(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if matches!(s.code, 400 | 401 | 403 | 422))
}

/// What the status says at once when a token write fails in a way retrying will not change
/// (Ready False, Reconciling/StoringToken).
fn storing_token_message(nbi: &NetbirdInstance, secret: &str, e: &kube::Error) -> String {
    format!(
        "the token NetBird returned is held in memory only: writing Secret {secret} failed ({e}). \
         The operator needs get, create and patch on secrets in namespace {}; it keeps retrying \
         with backoff, and the token is lost if the process ends first",
        nbi.metadata.namespace.as_deref().unwrap_or_default()
    )
}
