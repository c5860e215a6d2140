//! `deletionPolicy: Delete`: a finalizer that deletes the token on the NetBird server when the
//! NetbirdInstance is deleted (the token Secret goes with it through its owner reference). It never
//! blocks deletion forever: it retries with backoff, an Event per failure, for `finalizer_timeout`
//! after the deletion request, then lets go.

use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use secrecy::SecretString;
use serde_json::json;
use tracing::{info, warn};

use super::steps::{Deleter, World, delete_replaced, verify};
use super::{Context, Error};
use crate::crd::{DeletionPolicy, NetbirdInstance};
use crate::netbird::NetbirdClient;
use crate::token_secret;

/// The finalizer's name (domain-qualified).
pub const FINALIZER: &str = "bootstrap.netbird.io/token-cleanup";

fn has_finalizer(nbi: &NetbirdInstance) -> bool {
    nbi.finalizers().iter().any(|f| f == FINALIZER)
}

/// Adds or removes the finalizer to match `deletionPolicy`.
pub async fn ensure_finalizer(
    nbi: &NetbirdInstance,
    api: &Api<NetbirdInstance>,
) -> Result<(), Error> {
    let want = nbi.spec.token.deletion_policy == DeletionPolicy::Delete;
    if want == has_finalizer(nbi) {
        return Ok(());
    }
    let mut finalizers: Vec<String> = nbi
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if want {
        finalizers.push(FINALIZER.to_string());
    }
    set_finalizers(nbi, api, finalizers).await
}

async fn set_finalizers(
    nbi: &NetbirdInstance,
    api: &Api<NetbirdInstance>,
    finalizers: Vec<String>,
) -> Result<(), Error> {
    // resourceVersion: never overwrite another controller's concurrent finalizer change
    let patch =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": nbi.resource_version()}});
    api.patch(
        &nbi.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
    .map_err(Error::WriteFinalizer)
}

/// A pass for a NetbirdInstance being deleted.
pub async fn on_delete(
    nbi: &NetbirdInstance,
    ctx: &Context,
    api: &Api<NetbirdInstance>,
    secrets: &super::secrets::Secrets<'_>,
    attempt: u32,
) -> Result<Action, Error> {
    if !has_finalizer(nbi) {
        return Ok(Action::await_change());
    }
    // every token the instance's Secrets hold goes: the one the spec names, and those it wrote
    // under an earlier spec.token.secretName or secretKey (its owner reference takes those
    // Secrets with it), each like the first (found by the history explorer: seed 3, history 4357,
    // a secretName or a secretKey changed while the instance was deleted, and the token left valid
    // with nothing said)
    for (name, key) in token_places(nbi, ctx).await? {
        let mut place = nbi.clone();
        place.spec.token.secret_name = name;
        place.spec.token.secret_key = key;
        if let Some(retry_in) = clean_up(&place, ctx, secrets, attempt).await? {
            return Ok(Action::requeue(retry_in));
        }
    }
    remove_finalizer(nbi, api).await
}

/// Where the instance's tokens are, as (Secret, key): the Secret and key the spec names (first,
/// whatever they hold: a Secret taken over or gone is reported as before), then every other
/// Secret of the instance (the operator's labels, owned by this instance) and key (the one its
/// records name, the spec's) that holds a token.
async fn token_places(
    nbi: &NetbirdInstance,
    ctx: &Context,
) -> Result<Vec<(String, String)>, Error> {
    let spec_key = nbi.spec.token.secret_key.clone();
    let mut places = vec![(nbi.token_secret_name(), spec_key.clone())];
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(
        ctx.client.clone(),
        nbi.metadata.namespace.as_deref().unwrap_or_default(),
    );
    let selector = format!(
        "{}={},{}={}",
        token_secret::LABEL_MANAGED_BY,
        token_secret::MANAGED_BY,
        token_secret::LABEL_INSTANCE,
        nbi.name_any()
    );
    let listed = api
        .list(&kube::api::ListParams::default().labels(&selector))
        .await
        .map_err(|error| Error::ReadSecret {
            name: format!("({selector})"),
            error,
        })?;
    let uid = nbi.uid();
    for s in listed.items {
        let owned = s
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| Some(&o.uid) == uid.as_ref());
        let (Some(name), Some(data)) = (s.metadata.name.as_ref(), s.data.as_ref()) else {
            continue;
        };
        if !owned {
            continue;
        }
        let recorded = s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(token_secret::ANN_TOKEN_KEY))
            .cloned();
        for key in recorded.into_iter().chain([spec_key.clone()]) {
            let place = (name.clone(), key);
            if data.contains_key(&place.1) && !places.contains(&place) {
                places.push(place);
            }
        }
    }
    Ok(places)
}

/// Deletes the token of the Secret the spec of `nbi` names, if it may be sent: None when done (or
/// when retrying cannot change the answer: let go), Some(delay) to retry.
async fn clean_up(
    nbi: &NetbirdInstance,
    ctx: &Context,
    secrets: &super::secrets::Secrets<'_>,
    attempt: u32,
) -> Result<Option<Duration>, Error> {
    // the token to delete is the one the Secret holds now, not the one a lagging watch last
    // reported (a person may have put another in)
    secrets.read_fresh_next(&nbi.token_secret_name());
    let world = World::read(nbi, secrets, ctx).await?;
    if let Some(note) = foreign_secret(nbi, &world)
        .or_else(|| weaker_trust(nbi, &world))
        .or_else(|| another_server(nbi, &world))
    {
        publish(ctx, nbi, EventType::Warning, "TokenNotDeleted", note).await;
        return Ok(None);
    }
    let outcome = delete_token(nbi, &world, ctx.now()).await;
    match &outcome {
        Ok(what) => info!(what = %what, "token cleanup done"),
        Err(e) if !e.is_transient() => {
            // an answer that retrying will not change: let go now, not after finalizerTimeout
            warn!(error = %e, "could not delete the token on the server; letting go");
            let note = format!(
                "could not delete the token on the NetBird server: {e}. Retrying cannot change this \
                 answer, so the NetbirdInstance is deleted now; delete the token in the NetBird \
                 dashboard"
            );
            publish(ctx, nbi, EventType::Warning, "TokenNotDeleted", note).await;
        }
        Err(e) => {
            if let Some(retry_in) = deletion_failed(nbi, ctx, attempt, e).await {
                return Ok(Some(retry_in));
            }
        }
    }
    // (a Secret without a token has nothing to report)
    if outcome.is_ok() && world.token().is_some() {
        publish(
            ctx,
            nbi,
            EventType::Normal,
            "TokenDeleted",
            format!(
                "the token of Secret {} was deleted on the NetBird server",
                nbi.token_secret_name()
            ),
        )
        .await;
    }
    Ok(None)
}

/// A token not sent because a person took the Secret over: logs it, and returns the Event's note.
fn foreign_secret(nbi: &NetbirdInstance, world: &World) -> Option<String> {
    let crate::token_secret::TokenSecret::Foreign(why) = &world.token_secret else {
        return None;
    };
    // a person took the Secret over (removed the operator's labels): its token is not the
    // operator's to send any more, and whoever holds it is told it stays valid
    let note = format!(
        "Secret {} no longer carries this operator's labels ({why}): its token was not sent to be \
         deleted and stays valid on the NetBird server. Delete it in the NetBird dashboard if \
         nothing uses it",
        nbi.token_secret_name()
    );
    warn!("the token Secret is no longer the operator's; the token is not deleted");
    Some(note)
}

/// A token not sent because the spec skips verification: logs it, returns the Event's note.
fn weaker_trust(nbi: &NetbirdInstance, world: &World) -> Option<String> {
    let s = world.token_secret.owned().filter(|s| {
        s.may_send_token_to(&nbi.spec.management_url)
            && !s.may_send_token_with(
                &nbi.spec.management_url,
                crate::token_secret::spec_trust(nbi),
            )
    })?;
    // bound to a verified server, and the spec skips verification: not sent either
    let note = format!(
        "{} It was not sent to be deleted: delete it in the NetBird dashboard, or let it expire",
        crate::binding::weaker_trust_message(
            &nbi.token_secret_name(),
            s.home_server().unwrap_or(&nbi.spec.management_url),
        )
    );
    warn!("the token is bound to a verified server and the spec skips verification; not deleted");
    Some(note)
}

/// A token not sent because it is another server's: logs it, and returns the Event's note.
fn another_server(nbi: &NetbirdInstance, world: &World) -> Option<String> {
    let home = world
        .token_secret
        .owned()
        .filter(|s| !s.may_send_token_to(&nbi.spec.management_url))
        .and_then(|s| s.home_server())?;
    // the token belongs to another server than the spec names now: it is not sent anywhere
    let note = format!(
        "the token in Secret {} belongs to the NetBird server at {home}, and spec.managementURL is \
         {}: it was not sent there to be deleted. Delete it in the dashboard of {home}",
        nbi.token_secret_name(),
        nbi.spec.management_url
    );
    warn!(home = %home, "the token belongs to another server; not deleted");
    Some(note)
}

/// A failed deletion of the token: retried with backoff until `finalizerTimeout` after the deletion
/// request (Some(delay)), then let go (None). Each attempt is reported in an Event.
async fn deletion_failed(
    nbi: &NetbirdInstance,
    ctx: &Context,
    attempt: u32,
    e: &DeleteTokenError,
) -> Option<Duration> {
    // the time counts from the deletion request, so a restart does not start it again
    let requested = nbi
        .metadata
        .deletion_timestamp
        .as_ref()
        .map_or(ctx.now(), |t| t.0);
    let elapsed = ctx.now().duration_since(requested).unsigned_abs();
    let timeout = ctx.settings.finalizer_timeout;
    if elapsed >= timeout {
        warn!(error = %e, attempt, "could not delete the token on the server; letting go");
        let note = format!(
            "could not delete the token on the NetBird server in {} ({attempt} attempts; last: \
             {e}); the NetbirdInstance is deleted anyway. Delete the token in the NetBird \
             dashboard",
            crate::duration::format(timeout)
        );
        publish(ctx, nbi, EventType::Warning, "TokenNotDeleted", note).await;
        return None;
    }
    let retry_in = super::backoff_delay(attempt, ctx.settings.max_backoff)
        .max(Duration::from_millis(500))
        .min(timeout - elapsed);
    warn!(error = %e, attempt, ?retry_in, "could not delete the token on the server; retrying");
    let note = format!(
        "attempt {attempt} to delete the token on the NetBird server failed ({e}); retrying in \
         {}s, for at most {} after the deletion request, then the NetbirdInstance is deleted \
         anyway",
        retry_in.as_secs().max(1),
        crate::duration::format(timeout)
    );
    publish(ctx, nbi, EventType::Warning, "TokenNotDeleted", note).await;
    Some(retry_in)
}

async fn remove_finalizer(
    nbi: &NetbirdInstance,
    api: &Api<NetbirdInstance>,
) -> Result<Action, Error> {
    let finalizers = nbi
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    set_finalizers(nbi, api, finalizers).await?;
    Ok(Action::await_change())
}

/// Why the finalizer could not delete the token on the server (retried until its timeout).
#[derive(Debug, thiserror::Error)]
enum DeleteTokenError {
    #[error("no NetBird client for this spec")]
    NoClient,
    #[error("the token's id is unknown (the user has several tokens)")]
    UnknownId,
    #[error(
        "the token the Secret holds still works after the operator deleted the token its records \
         name: it is not the token the operator recorded (put in by hand?)"
    )]
    NotTheRecordedToken,
    #[error(
        "NetBird does not know the token yet (issued {0} s ago: a replicated server may not have \
         it everywhere); looking again"
    )]
    NotYetKnown(i64),
    /// NetBird's error says which call failed.
    #[error(transparent)]
    Netbird(#[from] crate::netbird::NetbirdError),
}

impl DeleteTokenError {
    /// Whether retrying may succeed (network trouble, 5xx, 429); the rest is an answer that stays.
    fn is_transient(&self) -> bool {
        match self {
            DeleteTokenError::Netbird(e) => e.is_transient(),
            DeleteTokenError::NotYetKnown(_) => true,
            DeleteTokenError::NoClient
            | DeleteTokenError::UnknownId
            | DeleteTokenError::NotTheRecordedToken => false,
        }
    }
}

/// Deletes the stored token on the server. Ok(description) when there is nothing (more) to do.
/// How long after a token was issued a server that does not know it may just not have it yet (a
/// replicated NetBird): the finalizer does not take such an answer for "already invalid" then.
const NEW_TOKEN_LAG: i64 = 60;

async fn delete_token(
    nbi: &NetbirdInstance,
    world: &World,
    now: jiff::Timestamp,
) -> Result<String, DeleteTokenError> {
    let Some(token) = world.token() else {
        return Ok("no token in the Secret".into());
    };
    let Some(client) = world.client() else {
        return Err(DeleteTokenError::NoClient);
    };
    let secret = world.token_secret.owned();
    // a service user's token is verified the way every pass verifies it (NetBird answers 403 to
    // GET /api/users/current for service users)
    let service_user_id = secret
        .filter(|s| s.annotation(token_secret::ANN_SERVICE_USER).is_some())
        .and_then(|s| s.annotation(token_secret::ANN_USER_ID));
    delete_exchange_replaced(client, world).await?;
    let user = match verify(client, token, service_user_id).await {
        Ok(u) => u,
        // a token issued moments ago that the server does not know yet is not taken for gone
        // (its rotation's previous token would be left valid too; found by the history explorer:
        // seed 13, history 1805, a rotation on a lagging server, then the deletion)
        Err(e) if e.is_token_rejected() => {
            let age = secret
                .and_then(token_secret::OwnedSecret::issued_at)
                .map(|at| now.duration_since(at).as_secs());
            if let Some(age) = age.filter(|a| (0..NEW_TOKEN_LAG).contains(a)) {
                return Err(DeleteTokenError::NotYetKnown(age));
            }
            return Ok("the token was already invalid".into());
        }
        Err(e) => return Err(e.into()),
    };
    delete_rotation_replaced(client, world, token, &user.id).await?;
    let id = token_id(client, world, token, &user.id).await?;
    match client.delete_token(token, &user.id, &id).await {
        // the records may describe a token a person replaced (same key): the held token must be
        // gone now, or it is not the one deleted
        Ok(()) => match verify(client, token, service_user_id).await {
            Err(e) if e.is_token_rejected() => {
                Ok(format!("deleted token {id} of {}", nbi.name_any()))
            }
            Ok(_) => Err(DeleteTokenError::NotTheRecordedToken),
            Err(e) => Err(e.into()),
        },
        Err(e) if e.is_token_rejected() => Ok("the token was already deleted".into()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes the token a service-user exchange replaced, if still pending (with itself).
async fn delete_exchange_replaced(
    client: &NetbirdClient,
    world: &World,
) -> Result<(), DeleteTokenError> {
    let secret = world.token_secret.owned();
    // a token a service-user exchange replaced and that is still pending: deleted with itself
    if let (Some(old), Some(old_id)) = (
        world.previous_token(),
        secret.and_then(|s| s.annotation(token_secret::ANN_PREVIOUS_TOKEN_ID)),
    ) {
        let old_user = secret
            .and_then(|s| s.annotation(token_secret::ANN_PREVIOUS_USER_ID))
            .unwrap_or_default();
        delete_replaced(client, Deleter::Itself(old), old_user, old_id).await?;
        info!(token_id = %old_id, "deleted the replaced token (or it was gone)");
    }
    Ok(())
}

/// Deletes the token the last rotation replaced, if still in its grace period.
async fn delete_rotation_replaced(
    client: &NetbirdClient,
    world: &World,
    token: &SecretString,
    user_id: &str,
) -> Result<(), DeleteTokenError> {
    let secret = world.token_secret.owned();
    // a rotation's replaced token still in its grace period: the Secret that holds the current
    // token goes with the instance, so the grace promised its consumers ends here too; left
    // behind it would stay valid, recorded nowhere
    if world.previous_token().is_none()
        && let Some(old_id) = secret.and_then(|s| s.annotation(token_secret::ANN_PREVIOUS_TOKEN_ID))
    {
        let owner = secret
            .and_then(|s| s.annotation(token_secret::ANN_PREVIOUS_USER_ID))
            .unwrap_or(user_id);
        delete_replaced(client, Deleter::Current(token), owner, old_id).await?;
        info!(token_id = %old_id, "deleted the token the last rotation replaced (or it was gone)");
    }
    Ok(())
}

/// The id of the token to delete: the one the Secret records, else the user's only token.
async fn token_id(
    client: &NetbirdClient,
    world: &World,
    token: &SecretString,
    user_id: &str,
) -> Result<String, DeleteTokenError> {
    if let Some(id) = world
        .token_secret
        .owned()
        .and_then(|s| s.token_id())
        .map(str::to_string)
    {
        return Ok(id);
    }
    // identify it: the only token of the user
    let tokens = client.list_tokens(token, user_id).await?;
    match tokens.as_slice() {
        [t] => Ok(t.id.clone()),
        _ => Err(DeleteTokenError::UnknownId),
    }
}

async fn publish(
    ctx: &Context,
    nbi: &NetbirdInstance,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Delete".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &nbi.object_ref(&())).await {
        if reason == "TokenNotDeleted" {
            // the instance goes, and with it the only place this was said: the log keeps it
            tracing::error!(error = %e, reason, note = %ev.note.as_deref().unwrap_or_default(),
                "failed to publish the Event that says a token stays valid on the server");
        } else {
            warn!(error = %e, "failed to publish an Event");
        }
    }
}
