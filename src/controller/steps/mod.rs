//! The steps the decision asks for, each one side effect: [`run`] does one [`Step`] through a
//! `Stepper` (what a step borrows: the instance, the context, the Secrets, the NetBird client, and
//! what the pass read and found so far). The small steps (metadata sync, instance and version
//! checks) are here; the others are `impl Stepper` blocks in the module of their concern: `setup`
//! (the bootstrap, and the credentials comparison), `token` (the stored token's upkeep), `mint`
//! (every token creation) and `store` (writing the token Secret, [`HeldWrite`]). What a pass read
//! is a [`World`] (`world`).

use k8s_openapi::api::core::v1::Secret;
use secrecy::SecretString;

use super::decide::{Findings, Step, Verdict, Waiting};
use super::secrets::Secrets;
use crate::controller::context::Context;
use crate::crd::NetbirdInstance;
use crate::netbird::NetbirdClient;
use crate::token_secret;

mod mint;
mod setup;
mod store;
mod token;
mod world;

pub use setup::{credentials_changed, record_credentials_check};
pub use store::{HeldWrite, store_held};
pub(super) use token::verify;
pub(crate) use token::{Deleter, delete_replaced};
pub use world::World;

/// How a step says, while it still runs, what cannot wait for the end of its pass: a token
/// NetBird issued that is held in memory only because its Secret cannot be written. The pass
/// provides it (it writes the status); steps never write the status themselves.
pub trait UrgentReport: Sync {
    fn storing_token(&self, message: String) -> futures::future::BoxFuture<'_, ()>;
}

/// Does one step. A Kubernetes failure ends the pass with a verdict that retries.
pub async fn run(
    step: Step,
    nbi: &NetbirdInstance,
    ctx: &Context,
    secrets: &Secrets<'_>,
    world: &mut World,
    findings: &mut Findings,
    urgent: &dyn UrgentReport,
) -> Result<(), Verdict> {
    let Some(client) = world
        .client
        .clone()
        .map(|c| c.with_observer(ctx.metrics.clone()))
    else {
        return Err(Verdict::Waiting {
            reason: Waiting::Progressing,
            message: "no NetBird client could be built".into(),
            retry: true,
        });
    };
    let mut s = Stepper {
        nbi,
        ctx,
        secrets,
        client,
        world,
        findings,
        urgent,
    };
    match step {
        Step::SyncSecretMetadata => s.sync_secret_metadata().await,
        Step::VerifyToken => s.verify_token().await,
        Step::CheckInstance => {
            s.findings.instance_asked_at = Some(tokio::time::Instant::now());
            s.findings.instance = Some(s.client.instance_status().await);
            Ok(())
        }
        Step::CheckVersion => {
            s.findings.version = Some(s.client.version(&s.stored_token()).await);
            Ok(())
        }
        Step::ClaimSecret => s.claim_secret().await,
        Step::Setup => s.setup().await,
        Step::CleanOrphans => s.clean_orphans().await,
        Step::IdentifyToken => s.identify_token().await,
        Step::DeletePreviousToken => s.delete_previous_token().await,
        Step::CheckPreviousTokenUse => s.check_previous_token_use().await,
        Step::RetirePreviousToken => {
            s.delete_previous_token().await?;
            s.findings.previous_retired = matches!(s.findings.previous_deleted, Some(Ok(())));
            Ok(())
        }
        Step::RotateToken => s.rotate_token().await,
        Step::ExchangeForServiceUser => s.exchange_for_service_user().await,
        Step::EndAbandonedSetup => s.end_abandoned_setup().await,
        Step::ForgetOtherKeyRecords => {
            let key = &s.nbi.spec.token.secret_key;
            s.patch(&token_secret::other_key_records_patch(key)).await?;
            s.findings.other_key_records_forgotten = true;
            Ok(())
        }
        Step::ReleaseClaim => s.release_claim().await,
    }
}

/// What one step borrows: the instance, the shared context, the Secrets, the NetBird client, and
/// what the pass read and found so far. One method per step.
struct Stepper<'a, 's> {
    nbi: &'a NetbirdInstance,
    ctx: &'a Context,
    secrets: &'a Secrets<'s>,
    client: NetbirdClient,
    world: &'a mut World,
    findings: &'a mut Findings,
    urgent: &'a dyn UrgentReport,
}

/// What became of a token creation (rotation, service-user exchange).
enum Minted {
    /// Stored: the Secret as written (None when the write gave up at shutdown).
    Stored { written: Option<Box<Secret>> },
    /// The server answered with a malformed token: refused, and recorded on the Secret.
    Malformed,
    /// NetBird refused or did not answer.
    Failed(crate::netbird::NetbirdError),
}

impl Stepper<'_, '_> {
    /// Patches the token Secret and takes the result as the new state.
    async fn patch(&mut self, patch: &serde_json::Value) -> Result<(), Verdict> {
        self.world.patch(self.nbi, self.secrets, patch).await
    }

    /// Takes the Secret as a write returned it, or reads it again.
    async fn written(&mut self, written: Option<Secret>) -> Result<(), Verdict> {
        self.world.written(self.nbi, self.secrets, written).await
    }

    /// The stored token, or an empty one (calls that work without a token).
    fn stored_token(&self) -> SecretString {
        self.world
            .token()
            .cloned()
            .unwrap_or_else(|| SecretString::from(""))
    }

    async fn sync_secret_metadata(&mut self) -> Result<(), Verdict> {
        if let Some(s) = self.world.token_secret.owned() {
            let patch = token_secret::metadata_patch(self.nbi, s);
            self.patch(&patch).await?;
        }
        self.findings.metadata_synced = true;
        Ok(())
    }
}

/// The stored token and its verified user, for token calls.
fn token_and_user(world: &World, findings: &Findings) -> Result<(SecretString, String), Verdict> {
    match (world.token(), &findings.verify) {
        (Some(t), Some(Ok(v))) => Ok((t.clone(), v.user.id.clone())),
        _ => Err(Verdict::Waiting {
            reason: Waiting::Progressing,
            message: "the token must be verified before it is managed".into(),
            retry: true,
        }),
    }
}
