//! Every token creation: rotation and the service-user exchange, both through `mint_and_store`
//! (a marker first, the creation, the format check, then the token stored with the one it
//! replaces); a malformed answer is refused and recorded.

use kube::ResourceExt;
use secrecy::{ExposeSecret, SecretString};
use tracing::{info, warn};

use super::store::write_until_stored;
use super::token::seconds;
use super::world::World;
use super::{Minted, Stepper, token_and_user};
use crate::controller::decide::Verdict;
use crate::crd::NetbirdInstance;
use crate::netbird::NetbirdClient;
use crate::netbird::pat::{self, PatFormatError};
use crate::token_secret;

impl Stepper<'_, '_> {
    pub(super) async fn rotate_token(&mut self) -> Result<(), Verdict> {
        let (token, user) = token_and_user(self.world, self.findings)?;
        match self.mint_and_store(&token, &user, None).await? {
            Minted::Stored { written, .. } => {
                self.written(written.map(|s| *s)).await?;
                self.findings.rotated = true;
                // the new token is verified before the old one is deleted
                self.findings.verify = None;
            }
            Minted::Malformed => {}
            Minted::Failed(e) => {
                warn!(error = %e.with_request_id(),
                    "failed to create a new token; the current one stays");
                self.findings.rotation_error = Some(e);
            }
        }
        Ok(())
    }

    pub(super) async fn exchange_for_service_user(&mut self) -> Result<(), Verdict> {
        let (token, user) = token_and_user(self.world, self.findings)?;
        let name = self
            .nbi
            .spec
            .token
            .service_user
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        match self.exchange(&token, &user, &name).await? {
            Minted::Stored { written, .. } => {
                self.findings.exchanged = true;
                self.findings.verify = None;
                self.written(written.map(|s| *s)).await
            }
            Minted::Malformed => Ok(()),
            Minted::Failed(e) => {
                warn!(error = %e.with_request_id(), service_user = %name,
                    "the service-user exchange failed; the current token stays");
                self.findings.exchange_error = Some(e);
                self.written(None).await
            }
        }
    }

    /// Marks a token creation in flight, creates a token for `user` (or for the service user
    /// `svc`, id and name, trading the current token of `user` for it) named for this instance,
    /// and stores it with the id of the token it replaces. A malformed answer is refused and
    /// recorded.
    async fn mint_and_store(
        &mut self,
        token: &SecretString,
        user: &str,
        svc: Option<(&str, &str)>,
    ) -> Result<Minted, Verdict> {
        let (nbi, ctx) = (self.nbi, self.ctx);
        let now = ctx.now();
        // the write's result is the new state: the retry gate then recognises the pass this write
        // wakes, and a failed creation is not tried again at once
        self.patch(&token_secret::rotation_marker_patch(&now.to_string()))
            .await?;
        let owner = svc.map_or(user, |(id, _)| id);
        let req = crate::netbird::CreateTokenRequest {
            name: own_token_name(nbi, now),
            expires_in: nbi.spec.token.expires_in_days,
        };
        let created = match self.client.create_token(token, owner, &req).await {
            Ok(c) => c,
            Err(e) => return Ok(Minted::Failed(e)),
        };
        if let Err(why) = well_formed(&created) {
            let what = if svc.is_some() {
                "service-user exchange"
            } else {
                "rotation"
            };
            refuse_malformed(&self.client, token, owner, &created, why).await;
            self.findings.malformed_token = Some((what, why));
            self.patch(&malformed_patch(nbi, what, why)).await?;
            return Ok(Minted::Malformed);
        }
        let patch = stored_patch(nbi, self.world, &created, now, token, user, svc);
        let written = write_until_stored(
            ctx,
            self.urgent,
            self.secrets,
            nbi,
            self.world.token_secret_rv.as_deref(),
            &patch,
            Some(&created.plain_token),
        )
        .await?
        .map(Box::new);
        let pat = &created.personal_access_token;
        // a token given up at shutdown was reported lost (ERROR) and is never also "stored"
        match (svc, &written) {
            (_, None) => {}
            (Some((_, name)), Some(_)) => {
                info!(service_user = %name, token_id = %pat.id, "stored the service user's token")
            }
            (None, Some(_)) => {
                info!(token_id = %pat.id, expires_at = %pat.expiration_date, "rotated the token")
            }
        }
        Ok(Minted::Stored { written })
    }

    /// Trades the current token for a token of the service user `name` (created when missing):
    /// the new token is stored with the old one as the previous token. The old one is deleted by a
    /// later step, with itself (a service user may not delete the owner's tokens), once the new
    /// one is verified and the grace period is over (with `gracePeriod: 0s` in the same pass); a
    /// new token that could not be stored leaves the old one untouched.
    async fn exchange(
        &mut self,
        token: &SecretString,
        user: &str,
        name: &str,
    ) -> Result<Minted, Verdict> {
        let svc = match self.service_user(token, name).await {
            Ok(u) => u,
            Err(e) => return Ok(Minted::Failed(e)),
        };
        self.mint_and_store(token, user, Some((&svc.id, name)))
            .await
    }

    /// The service user `name`, created when missing.
    async fn service_user(
        &self,
        token: &SecretString,
        name: &str,
    ) -> Result<crate::netbird::User, crate::netbird::NetbirdError> {
        let found = self.client.list_service_users(token).await?;
        if let Some(u) = found.into_iter().find(|u| u.name == name) {
            return Ok(u);
        }
        let u = self.client.create_service_user(token, name).await?;
        info!(service_user = %name, user_id = %u.id, "created the service user");
        Ok(u)
    }
}

/// The patch storing a created token with the record of the one it replaces (and the exchange).
fn stored_patch(
    nbi: &NetbirdInstance,
    world: &World,
    created: &crate::netbird::CreatedToken,
    now: jiff::Timestamp,
    token: &SecretString,
    user: &str,
    svc: Option<(&str, &str)>,
) -> serde_json::Value {
    let replaced = world
        .token_secret
        .owned()
        .and_then(|s| s.token_id())
        .map(str::to_string);
    let pat = &created.personal_access_token;
    let delete_at = previous_delete_at(nbi, world, now);
    let new = token_secret::NewToken {
        token: &created.plain_token,
        id: &pat.id,
        expires_at: &seconds(pat.expiration_date),
        issued_at: &now.to_string(),
        previous: replaced.as_deref().map(|id| (id, delete_at.as_str())),
    };
    let exchange = svc.map(|(id, name)| token_secret::Exchange {
        service_user_id: id,
        service_user: name,
        previous_user: user,
        previous_token: token,
    });
    token_secret::rotated_patch(nbi, &new, exchange.as_ref())
}

/// When the token being replaced is deleted: after the grace period, never after its own expiry
/// (when known), and never after the new token is due for renewal (a new token waits for the grace
/// to end, so a grace longer than that would let the new token expire).
fn previous_delete_at(nbi: &NetbirdInstance, world: &World, now: jiff::Timestamp) -> String {
    let grace = jiff::SignedDuration::try_from(nbi.spec.token.rotation.grace())
        .unwrap_or(jiff::SignedDuration::ZERO);
    let after_grace = now.checked_add(grace).unwrap_or(now);
    let expires = world
        .token_secret
        .owned()
        .and_then(|s| s.lifetime())
        .map(|(_, expires)| expires);
    let new_renewal = now
        .checked_add(jiff::SignedDuration::from_hours(
            16 * i64::from(nbi.spec.token.expires_in_days),
        ))
        .unwrap_or(now);
    let at = expires
        .map_or(after_grace, |e| e.min(after_grace))
        .min(new_renewal);
    seconds(at)
}

/// The name of a token this instance creates: it identifies the instance, so the clean-up never
/// touches another instance's tokens.
fn own_token_name(nbi: &NetbirdInstance, now: jiff::Timestamp) -> String {
    crate::binding::token_name(
        &nbi.namespace().unwrap_or_default(),
        &nbi.name_any(),
        now.as_second(),
    )
}

/// Whether a created token is a NetBird token (format and checksum).
fn well_formed(created: &crate::netbird::CreatedToken) -> Result<(), PatFormatError> {
    pat::check(created.plain_token.expose_secret())
}

/// A created token that is not well-formed is not stored; the server's record of it is deleted
/// (best effort: it is this instance's own, by its name).
async fn refuse_malformed(
    client: &NetbirdClient,
    token: &SecretString,
    user: &str,
    created: &crate::netbird::CreatedToken,
    why: PatFormatError,
) {
    let id = &created.personal_access_token.id;
    warn!(token_id = %id, error = %why,
        "the server answered the token creation with a malformed token; not stored");
    if !id.is_empty()
        && let Err(e) = client.delete_token(token, user, id).await
    {
        warn!(token_id = %id, error = %e.with_request_id(),
            "failed to delete the malformed token's record on the server");
    }
}

/// Records a malformed answer for this generation, so the same spec does not ask again.
fn malformed_patch(nbi: &NetbirdInstance, what: &str, why: PatFormatError) -> serde_json::Value {
    token_secret::malformed_token_patch(
        nbi.metadata.generation.unwrap_or_default(),
        what,
        &why.to_string(),
    )
}
