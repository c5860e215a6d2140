//! The stored token's upkeep: verifying it (and binding it to its server), identifying it on the
//! server, deleting what an interrupted rotation left, and following and deleting the token a
//! rotation or exchange replaced.

use kube::ResourceExt;
use secrecy::SecretString;
use tracing::{info, warn};

use super::{Stepper, token_and_user};
use crate::controller::decide::{Verdict, Verified};
use crate::netbird::{NetbirdClient, NetbirdError};
use crate::token_secret;

impl Stepper<'_, '_> {
    pub(super) async fn verify_token(&mut self) -> Result<(), Verdict> {
        // a token no server is recorded for (put in by hand, or written before the operator
        // recorded servers) is bound to this server before its first use: when the binding cannot
        // be written, the token is not sent at all (a spec edited later could otherwise send a
        // token already used here to another server)
        if self
            .world
            .token_secret
            .owned()
            .is_some_and(|s| s.home_server().is_none())
        {
            self.patch(&token_secret::home_server_patch(self.nbi))
                .await?;
        }
        let token = self.stored_token();
        let service_user_id = self
            .world
            .token_secret
            .owned()
            .filter(|s| s.annotation(token_secret::ANN_SERVICE_USER).is_some())
            .and_then(|s| s.annotation(token_secret::ANN_USER_ID))
            .map(str::to_string);
        let verified = verify(&self.client, &token, service_user_id.as_deref()).await;
        let ctx = self.ctx;
        self.findings.verify = Some(verified.map(|user| Verified {
            user,
            at: ctx.now(),
        }));
        // a token bound without TLS verification and now verified is bound as verified
        if matches!(self.findings.verify, Some(Ok(_)))
            && self
                .world
                .token_secret
                .owned()
                .is_some_and(|s| s.binding_outdated(self.nbi))
        {
            self.patch(&token_secret::home_server_patch(self.nbi))
                .await?;
        }
        Ok(())
    }

    pub(super) async fn clean_orphans(&mut self) -> Result<(), Verdict> {
        let (token, user) = token_and_user(self.world, self.findings)?;
        // the interrupted step minted for the token's own user (rotation) or for the service user
        // of the spec (exchange)
        let mut users = vec![user.clone()];
        if let Some(name) = self
            .nbi
            .spec
            .token
            .service_user
            .as_ref()
            .map(|s| s.name.as_str())
            && let Ok(svcs) = self.client.list_service_users(&token).await
            && let Some(svc) = svcs.into_iter().find(|u| u.name == name && u.id != user)
        {
            users.push(svc.id);
        }
        let keep = self
            .world
            .token_secret
            .owned()
            .and_then(|s| s.token_id())
            .map(str::to_string);
        let mut list = Ok(());
        for owner in &users {
            list = self.delete_own_tokens(&token, owner, keep.as_deref()).await;
            if list.is_err() {
                break;
            }
        }
        if list.is_ok() {
            self.patch(&token_secret::rotation_ended_patch()).await?;
        }
        self.findings.token_list = Some(list.map(|()| Vec::new()));
        self.findings.orphans_cleaned = true;
        Ok(())
    }

    /// Deletes the tokens of `owner` this instance created, but `keep` (best effort: a failed
    /// deletion is logged). Only a failure to list them is returned.
    async fn delete_own_tokens(
        &self,
        token: &SecretString,
        owner: &str,
        keep: Option<&str>,
    ) -> Result<(), crate::netbird::NetbirdError> {
        let tokens = self.client.list_tokens(token, owner).await?;
        let ns = self.nbi.namespace().unwrap_or_default();
        // only tokens this instance created: another NetbirdInstance on the same server, or
        // sharing the service user, keeps its own
        for t in tokens
            .iter()
            .filter(|t| crate::binding::is_own_token(&t.name, &ns, &self.nbi.name_any()))
            .filter(|t| Some(t.id.as_str()) != keep)
        {
            match self.client.delete_token(token, owner, &t.id).await {
                Ok(()) => {
                    info!(token_id = %t.id,
                        "deleted a token left on the server by an interrupted rotation")
                }
                Err(e) => {
                    warn!(token_id = %t.id, error = %e.with_request_id(),
                        "failed to delete a leftover token")
                }
            }
        }
        Ok(())
    }

    pub(super) async fn identify_token(&mut self) -> Result<(), Verdict> {
        let (token, user) = token_and_user(self.world, self.findings)?;
        let list = self.client.list_tokens(&token, &user).await;
        if let (Ok(tokens), Some(s)) = (&list, self.world.token_secret.owned()) {
            let from_setup = s.annotation(token_secret::ANN_SETUP_COMPLETED_AT).is_some()
                && s.annotation(token_secret::ANN_ROTATED_AT).is_none();
            let candidates: Vec<_> = tokens
                .iter()
                .filter(|t| !from_setup || t.name == token_secret::SETUP_TOKEN_NAME)
                .collect();
            let patch = match candidates.as_slice() {
                [t] => token_secret::identified_patch(
                    &self.nbi.spec.token.secret_key,
                    &t.id,
                    Some(&seconds(t.created_at)),
                    Some(&seconds(t.expiration_date)),
                ),
                _ => token_secret::identified_patch(
                    &self.nbi.spec.token.secret_key,
                    "unknown",
                    None,
                    None,
                ),
            };
            self.patch(&patch).await?;
        }
        self.findings.token_list = Some(list);
        Ok(())
    }

    pub(super) async fn delete_previous_token(&mut self) -> Result<(), Verdict> {
        let (token, user) = token_and_user(self.world, self.findings)?;
        let annotation = |key| {
            self.world
                .token_secret
                .owned()
                .and_then(|s| s.annotation(key))
                .map(str::to_string)
        };
        let previous = annotation(token_secret::ANN_PREVIOUS_TOKEN_ID).unwrap_or_default();
        let owner = annotation(token_secret::ANN_PREVIOUS_USER_ID).unwrap_or(user);
        let deleter = match self.world.previous_token() {
            Some(old) => Deleter::Itself(old),
            None => Deleter::Current(&token),
        };
        let result = match delete_replaced(&self.client, deleter, &owner, &previous).await {
            // another user's token this one may not delete (a service user's token cannot delete
            // the owner's): it is left to expire
            Err(e) if e.status() == Some(403) => {
                warn!(token_id = %previous, error = %e.with_request_id(),
                    "the replaced token cannot be deleted with the new one; it is left to expire");
                Ok(())
            }
            other => other,
        };
        match &result {
            Ok(()) => {
                info!(token_id = %previous, "deleted the replaced token");
                self.patch(&token_secret::previous_deleted_patch()).await?;
            }
            Err(e) => {
                warn!(token_id = %previous, error = %e.with_request_id(),
                    "failed to delete the replaced token; retrying later")
            }
        }
        self.findings.previous_deleted = Some(result);
        Ok(())
    }

    /// Lists the user's tokens with the current token (never the previous one: a use would move
    /// its `last_used`) to see when NetBird last saw the previous token used.
    pub(super) async fn check_previous_token_use(&mut self) -> Result<(), Verdict> {
        let (token, user) = token_and_user(self.world, self.findings)?;
        let Some(s) = self.world.token_secret.owned() else {
            return Ok(());
        };
        let previous = s
            .annotation(token_secret::ANN_PREVIOUS_TOKEN_ID)
            .unwrap_or_default()
            .to_string();
        let (current, rotated_at) = (s.token_id().map(str::to_string), s.rotated_at());
        let now = self.ctx.now();
        let result = self
            .client
            .list_tokens_dated(&token, &user)
            .await
            .map(|(tokens, date)| {
                crate::controller::previous_use::observe(
                    &tokens,
                    &previous,
                    current.as_deref(),
                    rotated_at,
                    date,
                    now,
                )
            });
        match &result {
            Ok(seen) => tracing::debug!(token_id = %previous, last_used = ?seen.last_used,
                idle = ?seen.idle, "looked at the previous token's use"),
            Err(e) => warn!(token_id = %previous, error = %e.with_request_id(),
                "failed to look at the previous token's use; looking again later"),
        }
        self.findings.previous_use = Some(result);
        Ok(())
    }
}

/// A timestamp in whole seconds, as annotations and the status keep it.
pub(super) fn seconds(t: jiff::Timestamp) -> String {
    crate::controller::report::to_time(t).0.to_string()
}

/// Verifies a token: `GET /api/users/current`. NetBird answers 403 there for service users, so the
/// token of the service user the Secret names is verified by reading that user from
/// `GET /api/users?service_user=true` (admin only) instead.
pub(in crate::controller) async fn verify(
    client: &NetbirdClient,
    token: &SecretString,
    service_user_id: Option<&str>,
) -> Result<crate::netbird::User, crate::netbird::NetbirdError> {
    match (client.current_user(token).await, service_user_id) {
        (Err(e), Some(id)) if e.status() == Some(403) => client
            .list_service_users(token)
            .await?
            .into_iter()
            .find(|u| u.id == id)
            .ok_or(e),
        (result, _) => result,
    }
}

/// Which token deletes a token a rotation or an exchange replaced.
pub(crate) enum Deleter<'a> {
    /// The replaced token itself, while the Secret still keeps it (the exchange's: the new
    /// token belongs to a service user, which may not delete the owner's tokens).
    Itself(&'a SecretString),
    /// The current token, of the same user (a rotation's).
    Current(&'a SecretString),
}

/// Deletes a token a rotation or an exchange replaced, by the one rule of what counts as gone
/// (used by the step and by the finalizer): deleting itself, a rejection means it no longer
/// works (expired, or deleted already); deleted by the current token, which was just verified,
/// NetBird's own 404 is about the replaced token, gone already.
pub(crate) async fn delete_replaced(
    client: &NetbirdClient,
    deleter: Deleter<'_>,
    owner: &str,
    id: &str,
) -> Result<(), NetbirdError> {
    match deleter {
        Deleter::Itself(old) => match client.delete_token(old, owner, id).await {
            Err(e) if e.is_token_rejected() => Ok(()),
            other => other,
        },
        Deleter::Current(current) => match client.delete_token(current, owner, id).await {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        },
    }
}
