//! The token Secret: who owns it, and the objects and patches the operator writes to it.
//!
//! The operator writes only Secrets that carry its managed-by label and its instance label. A
//! Secret of the token Secret's name without them belongs to someone else and is never changed.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use crate::binding::{self, ANN_MANAGEMENT_TLS, ANN_MANAGEMENT_URL, Trust};
use crate::crd::{DeletionPolicy, NetbirdInstance, copier_prefix};

pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "netbird-operator";
pub const LABEL_INSTANCE: &str = "bootstrap.netbird.io/instance";
pub const ANN_USER_ID: &str = "bootstrap.netbird.io/user-id";
pub const ANN_EXPIRES_AT: &str = "bootstrap.netbird.io/expires-at";
pub const ANN_SETUP_STARTED_AT: &str = "bootstrap.netbird.io/setup-started-at";
pub const ANN_SETUP_COMPLETED_AT: &str = "bootstrap.netbird.io/setup-completed-at";
/// Set to `token-not-issued` when setup succeeded without returning a token.
pub const ANN_SETUP_OUTCOME: &str = "bootstrap.netbird.io/setup-outcome";
pub const ANN_FINGERPRINT: &str = "bootstrap.netbird.io/credentials-fingerprint";
/// NetBird id of the stored token, when known.
pub const ANN_TOKEN_ID: &str = "bootstrap.netbird.io/token-id";
/// The key of the token the records (id, issued-at, expires-at) describe: after a change of
/// `spec.token.secretKey` they describe a token the spec no longer names.
pub const ANN_TOKEN_KEY: &str = "bootstrap.netbird.io/token-key";
/// When the stored token was issued (its lifetime runs from here to expires-at).
pub const ANN_ISSUED_AT: &str = "bootstrap.netbird.io/issued-at";
/// Set before a new token is created, removed when it is stored: a crash in between leaves an
/// extra token on the server, found by name and deleted on the next pass.
pub const ANN_ROTATION_STARTED_AT: &str = "bootstrap.netbird.io/rotation-started-at";
/// Id of the token a rotation replaced, until it is deleted on the server.
pub const ANN_PREVIOUS_TOKEN_ID: &str = "bootstrap.netbird.io/previous-token-id";
/// Name of the NetBird service user the stored token belongs to (set by the exchange).
pub const ANN_SERVICE_USER: &str = "bootstrap.netbird.io/service-user";
/// When the token a rotation replaced is deleted (its grace period ends; never after its expiry).
pub const ANN_PREVIOUS_DELETE_AT: &str = "bootstrap.netbird.io/previous-token-delete-at";
/// User of the replaced token, when it is not the stored token's user (a service-user exchange).
pub const ANN_PREVIOUS_USER_ID: &str = "bootstrap.netbird.io/previous-user-id";
/// When the token was last replaced.
pub const ANN_ROTATED_AT: &str = "bootstrap.netbird.io/rotated-at";
/// Data key of the token a service-user exchange replaced, kept until it is deleted on the server:
/// only that token itself may delete it (a service user may not delete the owner's tokens), so a
/// failed or interrupted deletion can be retried, after a restart too.
pub const PREVIOUS_TOKEN_KEY: &str = "previous-token";
/// Set when a server answered a token creation (rotation or service-user exchange) with something
/// that is not a NetBird token: `<generation> <what> <why>`. Nothing was stored; the instance
/// stalls until the spec changes.
pub const ANN_MALFORMED_TOKEN: &str = "bootstrap.netbird.io/malformed-token";
/// Prefix of the operator's own annotations: never taken from `spec.token.secretAnnotations`.
pub const OWN_ANNOTATION_PREFIX: &str = "bootstrap.netbird.io/";
/// Name NetBird gives the token setup creates.
pub const SETUP_TOKEN_NAME: &str = "setup-token";
pub const OUTCOME_TOKEN_NOT_ISSUED: &str = "token-not-issued";
/// Setup answered 200 with something that is not a NetBird token (never stored).
pub const OUTCOME_TOKEN_MALFORMED: &str = "token-malformed";
/// Set when a setup call got no answer (timeout, reset): the server may have completed it. A later
/// "already set up" is then reported as TokenLost, never as someone else's setup.
pub const ANN_SETUP_UNANSWERED: &str = "bootstrap.netbird.io/setup-unanswered";
/// Set when NetBird refused setup (400/412/422): `<generation> <status> <message>`. Setup is not
/// tried again until the spec or the credentials change.
pub const ANN_SETUP_REJECTED: &str = "bootstrap.netbird.io/setup-rejected";
/// The last comparison of the credentials Secret with the fingerprint:
/// `<its resourceVersion> <same|changed> <tag of the fingerprint>`. A restarted operator then
/// repeats the argon2 comparison only for credentials that changed since. No password material:
/// a resourceVersion, a word and a digest of the (public) fingerprint.
pub const ANN_CREDENTIALS_CHECKED: &str = "bootstrap.netbird.io/credentials-checked";

fn fingerprint_tag(fingerprint: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(fingerprint.as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The value of [`ANN_CREDENTIALS_CHECKED`] for a comparison.
pub fn credentials_check(credentials_rv: &str, fingerprint: &str, same: bool) -> String {
    let result = if same { "same" } else { "changed" };
    format!("{credentials_rv} {result} {}", fingerprint_tag(fingerprint))
}

/// The recorded result (same: true) when `value` was recorded for this version of the credentials
/// Secret and this fingerprint.
pub fn recorded_check(value: &str, credentials_rv: &str, fingerprint: &str) -> Option<bool> {
    let mut parts = value.split(' ');
    let (rv, result, tag) = (parts.next()?, parts.next()?, parts.next()?);
    if rv != credentials_rv || tag != fingerprint_tag(fingerprint) || parts.next().is_some() {
        return None;
    }
    match result {
        "same" => Some(true),
        "changed" => Some(false),
        _ => None,
    }
}

/// What the key of the token Secret holds.
#[derive(Clone)]
pub enum TokenValue {
    Missing,
    /// The key holds bytes that are not UTF-8 text.
    NotText,
    Present(SecretString),
}

impl std::fmt::Debug for TokenValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenValue::Missing => "Missing",
            TokenValue::NotText => "NotText",
            TokenValue::Present(_) => "Present([redacted])",
        })
    }
}

/// The token Secret as the operator sees it.
#[derive(Debug, Clone)]
pub enum TokenSecret {
    Absent,
    /// Exists but is not the operator's (why, for the condition message).
    Foreign(String),
    Ours(OwnedSecret),
}

/// A token Secret the operator owns.
#[derive(Debug, Clone)]
pub struct OwnedSecret {
    pub token: TokenValue,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub owner_references: Vec<OwnerReference>,
    /// The token a service-user exchange replaced, until it is deleted on the server.
    pub previous_token: Option<SecretString>,
}

impl OwnedSecret {
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }

    fn time(&self, key: &str) -> Option<jiff::Timestamp> {
        self.annotation(key)?.parse().ok()
    }

    /// When the stored token was issued and when it expires, when both are known.
    pub fn lifetime(&self) -> Option<(jiff::Timestamp, jiff::Timestamp)> {
        let issued = self.time(ANN_ISSUED_AT)?;
        let expires = self.time(ANN_EXPIRES_AT)?;
        (expires > issued).then_some((issued, expires))
    }

    /// When less than a third of the token's lifetime is left.
    pub fn renew_at(&self) -> Option<jiff::Timestamp> {
        let (issued, expires) = self.lifetime()?;
        let third = expires.duration_since(issued) / 3;
        expires.checked_sub(third).ok()
    }

    /// The NetBird id of the stored token, when known ("unknown" records that it cannot be told).
    pub fn token_id(&self) -> Option<&str> {
        self.annotation(ANN_TOKEN_ID)
            .filter(|id| !id.is_empty() && *id != "unknown")
    }
    /// The records describe the token under another key than `key` (the spec's key changed, and
    /// a token was put under the new one). Secrets written before the key was recorded describe
    /// the spec's key.
    pub fn records_describe_another_key(&self, key: &str) -> bool {
        self.annotation(ANN_TOKEN_KEY).is_some_and(|k| k != key)
    }

    pub fn setup_started(&self) -> bool {
        self.annotations.contains_key(ANN_SETUP_STARTED_AT)
    }

    /// When the replaced token is to be deleted (absent: at once).
    pub fn previous_delete_at(&self) -> Option<jiff::Timestamp> {
        self.time(ANN_PREVIOUS_DELETE_AT)
    }

    /// Whether the previous token's use can be followed: it belongs to the current token's user (a
    /// rotation). The service-user exchange records the owner as the previous user, and the
    /// service user may not read the owner's tokens (reading them with the old token itself would
    /// mark it used).
    pub fn previous_use_followable(&self) -> bool {
        self.annotation(ANN_PREVIOUS_TOKEN_ID).is_some()
            && self.annotation(ANN_PREVIOUS_USER_ID).is_none()
    }

    /// When the token was last replaced (by the operator's clock).
    pub fn rotated_at(&self) -> Option<jiff::Timestamp> {
        self.time(ANN_ROTATED_AT)
    }

    /// A setup call of the current claim got no answer.
    pub fn setup_unanswered(&self) -> bool {
        self.setup_started() && self.annotations.contains_key(ANN_SETUP_UNANSWERED)
    }

    /// The server the stored token belongs to, when recorded.
    pub fn home_server(&self) -> Option<&str> {
        self.annotation(ANN_MANAGEMENT_URL)
            .filter(|u| !u.is_empty())
    }

    /// Whether the stored token may be sent to `url`: the Secret records no server yet (it is then
    /// recorded at the first verification) or records this one.
    pub fn may_send_token_to(&self, url: &str) -> bool {
        self.home_server()
            .is_none_or(|home| binding::same_server(home, url))
    }

    /// How the stored token's server was trusted when it was bound, when recorded. A Secret
    /// without the record (written before the operator recorded it, or a token put in by hand) is
    /// bound at its next verification, as the spec then has it: verified unless
    /// insecureSkipVerify is on (the operator sent it that way before too).
    pub fn bound_trust(&self) -> Option<Trust> {
        self.annotation(ANN_MANAGEMENT_TLS).map(Trust::parse)
    }

    /// Whether the stored token may be sent with the TLS trust `trust`: never with weaker trust
    /// than it was bound with (a token bound to a verified https server is not sent without
    /// verification).
    pub fn may_send_token_with(&self, url: &str, trust: Trust) -> bool {
        !(binding::uses_tls(url)
            && trust == Trust::SkipVerify
            && self.bound_trust() == Some(Trust::Verified))
    }

    /// Whether the stored token may be sent to `url` with `trust` (server and trust).
    pub fn may_send_token(&self, url: &str, trust: Trust) -> bool {
        self.may_send_token_to(url) && self.may_send_token_with(url, trust)
    }

    /// Whether the binding records fall short of what a verification with `nbi`'s spec binds:
    /// no server recorded, no trust recorded for an https server, or a token bound without
    /// verification now verified (it is then bound as verified from here on).
    pub fn binding_outdated(&self, nbi: &NetbirdInstance) -> bool {
        let url = &nbi.spec.management_url;
        self.home_server().is_none()
            || (binding::uses_tls(url)
                && self.bound_trust() != Some(Trust::Verified)
                && self.bound_trust() != Some(spec_trust(nbi)))
    }
}

impl TokenSecret {
    pub fn owned(&self) -> Option<&OwnedSecret> {
        match self {
            TokenSecret::Ours(s) => Some(s),
            _ => None,
        }
    }
}

/// Classifies the Secret read from the API (None: not found).
pub fn classify(secret: Option<Secret>, instance: &str, key: &str) -> TokenSecret {
    let Some(secret) = secret else {
        return TokenSecret::Absent;
    };
    if let Some(why) = not_ours(&secret, instance) {
        // a setup of this operator was in flight when a person took the Secret over: its token,
        // if the call reached NetBird, can never be stored (the message says so)
        let lost = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANN_SETUP_STARTED_AT))
            .map(|at| {
                format!(
                    "; it records a setup of this operator in flight since {at}: the token that \
                     setup may have issued was never stored and is lost (delete the owner's \
                     token named {SETUP_TOKEN_NAME} in the NetBird dashboard)"
                )
            })
            .unwrap_or_default();
        return TokenSecret::Foreign(format!("{why}{lost}"));
    }
    let labels = secret.metadata.labels.clone().unwrap_or_default();
    let token = match secret.data.as_ref().and_then(|d| d.get(key)) {
        None => TokenValue::Missing,
        Some(v) if v.0.is_empty() => TokenValue::Missing,
        Some(v) => match std::str::from_utf8(&v.0) {
            Ok(s) if s.trim().is_empty() => TokenValue::Missing,
            Ok(s) => TokenValue::Present(SecretString::from(s.trim().to_string())),
            Err(_) => TokenValue::NotText,
        },
    };
    let previous_token = secret
        .data
        .as_ref()
        .and_then(|d| d.get(PREVIOUS_TOKEN_KEY))
        .and_then(|v| std::str::from_utf8(&v.0).ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| SecretString::from(t.to_string()));
    TokenSecret::Ours(OwnedSecret {
        token,
        previous_token,
        labels,
        annotations: secret.metadata.annotations.unwrap_or_default(),
        owner_references: secret.metadata.owner_references.unwrap_or_default(),
    })
}

/// Why a Secret is not the operator's for `instance` (None: it is).
fn not_ours(secret: &Secret, instance: &str) -> Option<String> {
    let labels = secret.metadata.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    if label(LABEL_MANAGED_BY) != Some(MANAGED_BY) {
        return Some(format!(
            "it lacks the label {LABEL_MANAGED_BY}={MANAGED_BY}"
        ));
    }
    match label(LABEL_INSTANCE) {
        Some(owner) if owner == instance => None,
        Some(other) => Some(format!(
            "it belongs to NetbirdInstance {other:?} ({LABEL_INSTANCE}={other})"
        )),
        None => Some(format!("it lacks the label {LABEL_INSTANCE}={instance}")),
    }
}

/// The annotations `spec.token.secretAnnotations` adds: those under `bootstrap.netbird.io/` are
/// the operator's own records and never taken from the spec, and those of Secret copiers would
/// copy the token into other namespaces (the schema refuses both; an object stored before those
/// rules must not be able to set them either).
pub fn spec_annotations(nbi: &NetbirdInstance) -> BTreeMap<String, String> {
    nbi.spec
        .token
        .secret_annotations
        .iter()
        .filter(|(k, _)| !k.starts_with(OWN_ANNOTATION_PREFIX) && copier_prefix(k).is_none())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Labels the token Secret must carry: the operator's two and `spec.token.secretLabels` but those
/// of Secret copiers (refused by the schema; ignored for objects stored before that rule).
pub fn desired_labels(nbi: &NetbirdInstance) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = nbi
        .spec
        .token
        .secret_labels
        .iter()
        .filter(|(k, _)| copier_prefix(k).is_none())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(LABEL_MANAGED_BY.into(), MANAGED_BY.into());
    labels.insert(
        LABEL_INSTANCE.into(),
        nbi.metadata.name.clone().unwrap_or_default(),
    );
    labels
}

/// Owner references the token Secret must carry: the NetbirdInstance's only with
/// `deletionPolicy: Delete`; references to other owners are kept.
pub fn desired_owner_references(
    nbi: &NetbirdInstance,
    current: &[OwnerReference],
) -> Vec<OwnerReference> {
    let uid = nbi.metadata.uid.clone().unwrap_or_default();
    let mut refs: Vec<OwnerReference> = current.iter().filter(|r| r.uid != uid).cloned().collect();
    if nbi.spec.token.deletion_policy == DeletionPolicy::Delete
        && let Some(mine) = nbi.controller_owner_ref(&())
    {
        refs.push(OwnerReference {
            block_owner_deletion: Some(false),
            ..mine
        });
    }
    refs
}

/// Copier keys (labels, annotations) the spec still asks for and the Secret carries with the same
/// value: put there from the spec by an operator older than the rule that refuses them, so taken
/// off again. A copier key the spec does not ask for is left alone: whoever may write the Secret
/// may share its token.
fn copier_keys_from_spec(nbi: &NetbirdInstance, s: &OwnedSecret) -> (Vec<String>, Vec<String>) {
    let from = |spec: &BTreeMap<String, String>, on: &BTreeMap<String, String>| -> Vec<String> {
        spec.iter()
            .filter(|(k, v)| copier_prefix(k).is_some() && on.get(*k) == Some(*v))
            .map(|(k, _)| k.clone())
            .collect()
    };
    (
        from(&nbi.spec.token.secret_labels, &s.labels),
        from(&nbi.spec.token.secret_annotations, &s.annotations),
    )
}

/// Whether labels, annotations and owner references of an owned Secret follow the spec.
pub fn metadata_in_sync(nbi: &NetbirdInstance, s: &OwnedSecret) -> bool {
    let labels_ok = desired_labels(nbi)
        .iter()
        .all(|(k, v)| s.labels.get(k) == Some(v));
    let ann_ok = spec_annotations(nbi)
        .iter()
        .all(|(k, v)| s.annotations.get(k) == Some(v));
    let refs_ok = desired_owner_references(nbi, &s.owner_references) == s.owner_references;
    let (copier_labels, copier_annotations) = copier_keys_from_spec(nbi, s);
    labels_ok && ann_ok && refs_ok && copier_labels.is_empty() && copier_annotations.is_empty()
}

/// A merge patch that brings labels, annotations and owner references in line with the spec.
pub fn metadata_patch(nbi: &NetbirdInstance, s: &OwnedSecret) -> Value {
    let mut labels = serde_json::to_value(desired_labels(nbi)).unwrap_or_default();
    let mut annotations = serde_json::to_value(spec_annotations(nbi)).unwrap_or_default();
    let (copier_labels, copier_annotations) = copier_keys_from_spec(nbi, s);
    for k in copier_labels {
        labels[k] = Value::Null;
    }
    for k in copier_annotations {
        annotations[k] = Value::Null;
    }
    json!({"metadata": {
        "labels": labels,
        "annotations": annotations,
        "ownerReferences": desired_owner_references(nbi, &s.owner_references),
    }})
}

/// A new token Secret, claimed for setup (`setup-started-at` set, no token yet).
pub fn new_claimed(nbi: &NetbirdInstance, started_at: &str, fingerprint: &str) -> Secret {
    let mut annotations = spec_annotations(nbi);
    annotations.insert(ANN_SETUP_STARTED_AT.into(), started_at.into());
    annotations.insert(ANN_FINGERPRINT.into(), fingerprint.into());
    let refs = desired_owner_references(nbi, &[]);
    Secret {
        metadata: ObjectMeta {
            name: Some(nbi.token_secret_name()),
            namespace: nbi.metadata.namespace.clone(),
            labels: Some(desired_labels(nbi)),
            annotations: Some(annotations),
            owner_references: (!refs.is_empty()).then_some(refs),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// A new token Secret claimed for setup, with the comparison of the credentials the claim made
/// (see [`ANN_CREDENTIALS_CHECKED`]) when there is one.
pub fn new_claimed_checked(
    nbi: &NetbirdInstance,
    started_at: &str,
    fingerprint: &str,
    check: Option<&str>,
) -> Secret {
    let mut fresh = new_claimed(nbi, started_at, fingerprint);
    if let (Some(a), Some(check)) = (fresh.metadata.annotations.as_mut(), check) {
        a.insert(ANN_CREDENTIALS_CHECKED.into(), check.into());
    }
    fresh
}

/// The token Secret created again from `patch` when it vanished under a token write: the Secret's
/// name, labels and owner references, and what the patch writes.
pub fn recreated(nbi: &NetbirdInstance, patch: &Value) -> Secret {
    let mut fresh = new_claimed(nbi, "", "");
    if let Some(a) = fresh.metadata.annotations.as_mut() {
        a.clear();
    }
    let mut obj = serde_json::to_value(&fresh).unwrap_or_default();
    merge(&mut obj, patch);
    serde_json::from_value(obj).unwrap_or(fresh)
}

/// JSON merge patch semantics (RFC 7386), for creating a Secret from a patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// `patch` made to apply only to the version of the Secret it was decided on: a Secret changed
/// since (a person removed its labels behind a lagging watch) makes the write fail with a
/// conflict instead of writing into it. A patch that names a version already keeps its own.
pub fn guarded(patch: &Value, resource_version: Option<&str>) -> Value {
    let mut patch = patch.clone();
    if let Some(rv) = resource_version
        && patch["metadata"]["resourceVersion"].is_null()
    {
        patch["metadata"]["resourceVersion"] = json!(rv);
    }
    patch
}

/// Claims an existing owned Secret for setup. `resource_version` makes the write fail on a
/// concurrent change, so the claim is known to hold before the one-time call. `check` is the
/// comparison of the credentials the claim made (see [`ANN_CREDENTIALS_CHECKED`]).
pub fn claim_patch(
    nbi: &NetbirdInstance,
    s: &OwnedSecret,
    resource_version: &str,
    started_at: &str,
    fingerprint: &str,
    check: Option<&str>,
) -> Value {
    let mut patch = metadata_patch(nbi, s);
    patch["metadata"]["resourceVersion"] = json!(resource_version);
    patch["metadata"]["annotations"][ANN_SETUP_STARTED_AT] = json!(started_at);
    patch["metadata"]["annotations"][ANN_FINGERPRINT] = json!(fingerprint);
    patch["metadata"]["annotations"][ANN_CREDENTIALS_CHECKED] = json!(check);
    patch["metadata"]["annotations"][ANN_SETUP_OUTCOME] = Value::Null;
    patch["metadata"]["annotations"][ANN_SETUP_REJECTED] = Value::Null;
    patch["metadata"]["annotations"][ANN_SETUP_UNANSWERED] = Value::Null;
    patch
}

/// Ends the in-flight marker of a setup that a token put in by hand replaced.
pub fn abandoned_setup_patch() -> Value {
    json!({"metadata": {"annotations": {
        ANN_SETUP_STARTED_AT: Value::Null,
        ANN_SETUP_UNANSWERED: Value::Null,
    }}})
}

/// Records of a token under another key forgotten: the token under `key` (put there by a person)
/// is one the operator cannot tell among its user's tokens, so it is recorded as "unknown" (kept
/// and verified, never rotated or deleted by its id).
pub fn other_key_records_patch(key: &str) -> Value {
    json!({"metadata": {"annotations": {
        ANN_TOKEN_KEY: key,
        ANN_TOKEN_ID: "unknown",
        ANN_ISSUED_AT: Value::Null,
        ANN_EXPIRES_AT: Value::Null,
    }}})
}

/// Records that a setup call got no answer (its outcome is unknown).
pub fn setup_unanswered_patch(at: &str) -> Value {
    json!({"metadata": {"annotations": {ANN_SETUP_UNANSWERED: at}}})
}

/// Writes the token that setup returned, and ends the in-flight marker.
pub fn store_patch(
    nbi: &NetbirdInstance,
    token: &SecretString,
    user_id: &str,
    expires_at: &str,
    completed_at: &str,
) -> Value {
    let mut data = serde_json::Map::new();
    data.insert(nbi.spec.token.secret_key.clone(), data_value(token));
    json!({
        "metadata": {
            "labels": desired_labels(nbi),
            "annotations": {
                ANN_USER_ID: user_id,
                ANN_TOKEN_KEY: nbi.spec.token.secret_key,
                ANN_EXPIRES_AT: expires_at,
                ANN_ISSUED_AT: completed_at,
                ANN_SETUP_COMPLETED_AT: completed_at,
                ANN_SETUP_STARTED_AT: Value::Null,
                ANN_SETUP_UNANSWERED: Value::Null,
                ANN_MANAGEMENT_URL: binding::normalize(&nbi.spec.management_url),
                ANN_MANAGEMENT_TLS: trust_record(nbi),
            },
        },
        "data": data,
    })
}

/// The write of setup's token: [`store_patch`], and the records of any earlier token's life
/// removed (its id, rotation, service user, and a replaced token the Secret kept). Setup gives the
/// Secret a new token of a new server binding; records left from a token of another server would
/// describe a token that is not there, and a replaced token kept for its own deletion would be sent
/// to the new server (found by the history explorer). Such a token stays valid on its own server
/// until it expires.
pub fn setup_store_patch(
    nbi: &NetbirdInstance,
    token: &SecretString,
    user_id: &str,
    expires_at: &str,
    completed_at: &str,
) -> Value {
    let mut patch = store_patch(nbi, token, user_id, expires_at, completed_at);
    let ann = &mut patch["metadata"]["annotations"];
    for key in [
        ANN_TOKEN_ID,
        ANN_ROTATED_AT,
        ANN_ROTATION_STARTED_AT,
        ANN_SERVICE_USER,
        ANN_PREVIOUS_TOKEN_ID,
        ANN_PREVIOUS_USER_ID,
        ANN_PREVIOUS_DELETE_AT,
        ANN_MALFORMED_TOKEN,
    ] {
        ann[key] = Value::Null;
    }
    if nbi.spec.token.secret_key != PREVIOUS_TOKEN_KEY {
        patch["data"][PREVIOUS_TOKEN_KEY] = Value::Null;
    }
    patch
}

/// The message of a token Secret write the apiserver refused as invalid (422): `what` failed, and
/// the apiserver's reason. Such a refusal answers the spec (labels, annotations, the Secret's name or
/// key), so the instance stalls until the spec changes.
pub fn invalid_write_message(what: &str, apiserver: &str) -> String {
    let apiserver: String = apiserver
        .chars()
        .filter(|c| !c.is_control())
        .take(500)
        .collect();
    format!(
        "{what}: the Kubernetes API refused the Secret as invalid: {apiserver}. Fix what it names \
            in spec.token (secretLabels, secretAnnotations, secretName or secretKey); the operator \
            tries again when the spec changes"
    )
}

/// A token as a Secret's data value (base64).
pub fn data_value(token: &SecretString) -> Value {
    serde_json::to_value(ByteString(token.expose_secret().as_bytes().to_vec()))
        .unwrap_or(Value::Null)
}

/// Ends the hand-over after the replaced token was deleted on the server.
pub fn previous_deleted_patch() -> Value {
    json!({
        "metadata": {"annotations": {
            ANN_PREVIOUS_TOKEN_ID: Value::Null,
            ANN_PREVIOUS_USER_ID: Value::Null,
            ANN_PREVIOUS_DELETE_AT: Value::Null,
        }},
        "data": {PREVIOUS_TOKEN_KEY: Value::Null},
    })
}

/// Ends the in-flight marker of a token creation once the tokens it may have left are cleaned up.
pub fn rotation_ended_patch() -> Value {
    json!({"metadata": {"annotations": {ANN_ROTATION_STARTED_AT: Value::Null}}})
}

/// Records a comparison of the credentials (see [`credentials_check`]).
pub fn credentials_checked_patch(check: &str) -> Value {
    json!({"metadata": {"annotations": {ANN_CREDENTIALS_CHECKED: check}}})
}

/// Marks a token creation in flight (rotation, exchange): a crash before the new token is stored
/// leaves an extra token on the server, found by its name and deleted on the next pass.
pub fn rotation_marker_patch(started_at: &str) -> Value {
    json!({"metadata": {"annotations": {ANN_ROTATION_STARTED_AT: started_at}}})
}

/// How the spec has the server trusted.
pub fn spec_trust(nbi: &NetbirdInstance) -> Trust {
    Trust::of(
        nbi.spec
            .tls
            .as_ref()
            .is_some_and(|t| t.insecure_skip_verify),
    )
}

/// The trust record for a token bound now (https servers only; null removes a stale one).
fn trust_record(nbi: &NetbirdInstance) -> Value {
    if binding::uses_tls(&nbi.spec.management_url) {
        json!(spec_trust(nbi).as_str())
    } else {
        Value::Null
    }
}

/// Records the server the stored token was first verified against, and how it was trusted
/// (Secrets written before the operator recorded them: the upgrade path; a token first used
/// without verification and now verified is bound as verified).
pub fn home_server_patch(nbi: &NetbirdInstance) -> Value {
    json!({"metadata": {"annotations": {
        ANN_MANAGEMENT_URL: binding::normalize(&nbi.spec.management_url),
        ANN_MANAGEMENT_TLS: trust_record(nbi),
    }}})
}

/// Records that a token creation answered with a malformed token (nothing else is written).
pub fn malformed_token_patch(generation: i64, what: &str, why: &str) -> Value {
    json!({"metadata": {"annotations": {
        ANN_MALFORMED_TOKEN: format!("{generation} {what} {why}"),
        ANN_ROTATION_STARTED_AT: Value::Null,
    }}})
}

/// A recorded malformed token: (generation, what, why).
pub fn parse_malformed(value: &str) -> Option<(i64, &str, &str)> {
    let mut parts = value.splitn(3, ' ');
    let generation = parts.next()?.parse().ok()?;
    Some((generation, parts.next()?, parts.next().unwrap_or("")))
}

/// A token just created on the server, as a rotation or a service-user exchange stores it.
pub struct NewToken<'a> {
    pub token: &'a SecretString,
    pub id: &'a str,
    pub expires_at: &'a str,
    pub issued_at: &'a str,
    /// The id of the token it replaces, and when that one is deleted at the latest.
    pub previous: Option<(&'a str, &'a str)>,
}

/// A service-user exchange: whose the new token is, and the owner's token it replaces.
pub struct Exchange<'a> {
    pub service_user_id: &'a str,
    pub service_user: &'a str,
    /// The user of the replaced token.
    pub previous_user: &'a str,
    /// The replaced token: only it may delete itself (a service user may not delete the owner's
    /// tokens), so it is kept until it is gone and a failed deletion or a crash is retried.
    pub previous_token: &'a SecretString,
}

/// Writes a rotated token: the new token and its facts, and the id of the token it replaces (to be
/// deleted once the new one is verified). An exchange also records the service user, and the
/// replaced token's user and the token itself when there is one.
pub fn rotated_patch(
    nbi: &NetbirdInstance,
    new: &NewToken<'_>,
    exchange: Option<&Exchange<'_>>,
) -> Value {
    let mut patch = store_patch(nbi, new.token, "", new.expires_at, new.issued_at);
    let ann = &mut patch["metadata"]["annotations"];
    if let Some(map) = ann.as_object_mut() {
        map.remove(ANN_USER_ID);
        map.remove(ANN_SETUP_COMPLETED_AT);
        map.remove(ANN_SETUP_STARTED_AT);
    }
    ann[ANN_TOKEN_ID] = json!(new.id);
    ann[ANN_ROTATED_AT] = json!(new.issued_at);
    ann[ANN_ROTATION_STARTED_AT] = Value::Null;
    ann[ANN_PREVIOUS_TOKEN_ID] = new.previous.map_or(Value::Null, |(id, _)| json!(id));
    ann[ANN_PREVIOUS_DELETE_AT] = new.previous.map_or(Value::Null, |(_, at)| json!(at));
    if let Some(x) = exchange {
        ann[ANN_USER_ID] = json!(x.service_user_id);
        ann[ANN_SERVICE_USER] = json!(x.service_user);
        if new.previous.is_some() {
            ann[ANN_PREVIOUS_USER_ID] = json!(x.previous_user);
            patch["data"][PREVIOUS_TOKEN_KEY] = data_value(x.previous_token);
        }
    }
    patch
}

/// Records that setup succeeded without a usable token: none (`OUTCOME_TOKEN_NOT_ISSUED`, the
/// server lacks NB_SETUP_PAT_ENABLED=true) or a malformed one (`OUTCOME_TOKEN_MALFORMED`).
pub fn no_token_patch(user_id: &str, completed_at: &str, outcome: &str) -> Value {
    json!({"metadata": {"annotations": {
        ANN_USER_ID: user_id,
        ANN_SETUP_COMPLETED_AT: completed_at,
        ANN_SETUP_OUTCOME: outcome,
        ANN_SETUP_STARTED_AT: Value::Null,
    }}})
}

/// Ends a claim after setup definitively failed (4xx), so the next attempt is not mistaken for a
/// lost token. A refusal of the request (400/412/422) is recorded with the generation it answered,
/// so
/// the same spec and credentials are never sent again.
pub fn release_patch(rejection: Option<(i64, u16, &str)>) -> Value {
    let rejected = rejection.map_or(Value::Null, |(generation, status, message)| {
        let message: String = message
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        json!(format!("{generation} {status} {message}"))
    });
    json!({"metadata": {"annotations": {
        ANN_SETUP_STARTED_AT: Value::Null,
        ANN_SETUP_REJECTED: rejected,
    }}})
}

/// A recorded refusal: (generation, status, message).
pub fn parse_rejection(value: &str) -> Option<(i64, u16, &str)> {
    let mut parts = value.splitn(3, ' ');
    let generation = parts.next()?.parse().ok()?;
    let status = parts.next()?.parse().ok()?;
    Some((generation, status, parts.next().unwrap_or("")))
}

/// Records what the token list told about the stored token.
pub fn identified_patch(
    key: &str,
    token_id: &str,
    issued_at: Option<&str>,
    expires_at: Option<&str>,
) -> Value {
    let mut ann = json!({ANN_TOKEN_ID: token_id, ANN_TOKEN_KEY: key});
    if let Some(i) = issued_at {
        ann[ANN_ISSUED_AT] = json!(i);
    }
    if let Some(e) = expires_at {
        ann[ANN_EXPIRES_AT] = json!(e);
    }
    json!({"metadata": {"annotations": ann}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::NetbirdInstanceSpec;

    fn nbi(policy: DeletionPolicy) -> NetbirdInstance {
        let mut spec: NetbirdInstanceSpec = serde_json::from_value(json!({
            "managementURL": "https://nb.example.com",
            "credentialsSecretRef": {
                "name": "admin",
                "emailKey": "email",
                "passwordKey": "password",
                "nameKey": "name",
            },
        }))
        .unwrap();
        spec.token.deletion_policy = policy;
        spec.token.secret_labels.insert("team".into(), "net".into());
        let mut n = NetbirdInstance::new("nb", spec);
        n.metadata.namespace = Some("ns".into());
        n.metadata.uid = Some("uid-1".into());
        n.metadata.labels = Some(
            [(
                "app.kubernetes.io/instance".to_string(),
                "argo-app".to_string(),
            )]
            .into(),
        );
        n
    }

    fn secret(labels: &[(&str, &str)], data: Option<&[u8]>) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("nb-token".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            data: data.map(|d| [("NB_API_KEY".to_string(), ByteString(d.to_vec()))].into()),
            ..Default::default()
        }
    }

    #[test]
    fn classifies_by_both_labels() {
        assert!(matches!(
            classify(None, "nb", "NB_API_KEY"),
            TokenSecret::Absent
        ));
        assert!(matches!(
            classify(Some(secret(&[], None)), "nb", "NB_API_KEY"),
            TokenSecret::Foreign(_)
        ));
        let other = secret(
            &[(LABEL_MANAGED_BY, MANAGED_BY), (LABEL_INSTANCE, "other")],
            None,
        );
        match classify(Some(other), "nb", "NB_API_KEY") {
            TokenSecret::Foreign(why) => assert!(why.contains("\"other\""), "{why}"),
            s => panic!("{s:?}"),
        }
        let ours = secret(
            &[(LABEL_MANAGED_BY, MANAGED_BY), (LABEL_INSTANCE, "nb")],
            Some(b"nbp_x\n"),
        );
        match classify(Some(ours), "nb", "NB_API_KEY") {
            TokenSecret::Ours(s) => match s.token {
                TokenValue::Present(t) => assert_eq!(t.expose_secret(), "nbp_x"),
                t => panic!("{t:?}"),
            },
            s => panic!("{s:?}"),
        }
        let binary = secret(
            &[(LABEL_MANAGED_BY, MANAGED_BY), (LABEL_INSTANCE, "nb")],
            Some(&[0xff, 0]),
        );
        assert!(matches!(
            classify(Some(binary), "nb", "NB_API_KEY")
                .owned()
                .map(|s| s.token.clone()),
            Some(TokenValue::NotText)
        ));
    }

    #[test]
    fn never_copies_the_resources_own_labels() {
        let s = new_claimed(&nbi(DeletionPolicy::Retain), "t", "fp");
        let labels = s.metadata.labels.unwrap();
        assert!(!labels.contains_key("app.kubernetes.io/instance"));
        assert_eq!(labels.get("team").map(String::as_str), Some("net"));
        assert_eq!(labels.get(LABEL_INSTANCE).map(String::as_str), Some("nb"));
        assert!(s.metadata.owner_references.is_none());
    }

    #[test]
    fn secret_copier_keys_never_reach_the_token_secret() {
        let mut n = nbi(DeletionPolicy::Retain);
        let copiers = [
            "reflector.v1.k8s.emberstack.com/reflection-allowed",
            "reflector.v1.k8s.emberstack.com/reflection-auto-enabled",
            "replicator.v1.mittwald.de/replicate-to",
            "kubed.appscode.com/sync",
        ];
        for k in copiers {
            // an object stored before the admission rule existed
            n.spec
                .token
                .secret_annotations
                .insert(k.into(), "true".into());
            n.spec.token.secret_labels.insert(k.into(), "true".into());
        }
        n.spec
            .token
            .secret_annotations
            .insert("note".into(), "kept".into());
        let s = new_claimed(&n, "t", "fp");
        let (labels, annotations) = (s.metadata.labels.unwrap(), s.metadata.annotations.unwrap());
        for k in copiers {
            assert!(!labels.contains_key(k), "{k}");
            assert!(!annotations.contains_key(k), "{k}");
        }
        assert_eq!(annotations.get("note").map(String::as_str), Some("kept"));
        assert_eq!(labels.get("team").map(String::as_str), Some("net"));

        // a Secret an older version wrote them to: taken off; one a person put there: kept
        let mut old = match classify(Some(s_with(&copiers)), "nb", "NB_API_KEY") {
            TokenSecret::Ours(o) => o,
            other => panic!("{other:?}"),
        };
        old.annotations.insert(
            "replicator.v1.mittwald.de/replicate-from".into(),
            "x/y".into(),
        );
        assert!(!metadata_in_sync(&n, &old));
        let patch = metadata_patch(&n, &old);
        for k in copiers {
            assert_eq!(patch["metadata"]["annotations"][k], Value::Null, "{k}");
            assert_eq!(patch["metadata"]["labels"][k], Value::Null, "{k}");
        }
        assert!(
            patch["metadata"]["annotations"]
                .get("replicator.v1.mittwald.de/replicate-from")
                .is_none()
        );
    }

    /// An owned Secret carrying these keys as labels and annotations, set to "true".
    fn s_with(keys: &[&str]) -> Secret {
        let mut s = secret(
            &[(LABEL_MANAGED_BY, MANAGED_BY), (LABEL_INSTANCE, "nb")],
            None,
        );
        for k in keys {
            s.metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert(k.to_string(), "true".into());
            s.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(k.to_string(), "true".into());
        }
        s
    }

    #[test]
    fn owner_reference_only_with_delete_policy() {
        let s = new_claimed(&nbi(DeletionPolicy::Delete), "t", "fp");
        let refs = s.metadata.owner_references.unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].uid, "uid-1");
        // switching back to Retain removes ours and keeps others
        let other = OwnerReference {
            uid: "other".into(),
            ..refs[0].clone()
        };
        let kept = desired_owner_references(
            &nbi(DeletionPolicy::Retain),
            &[refs[0].clone(), other.clone()],
        );
        assert_eq!(kept, vec![other]);
    }

    #[test]
    fn store_patch_clears_the_in_flight_marker() {
        let p = store_patch(
            &nbi(DeletionPolicy::Retain),
            &SecretString::from("nbp_abc"),
            "u1",
            "2027-01-01T00:00:00Z",
            "now",
        );
        assert_eq!(
            p["metadata"]["annotations"][ANN_SETUP_STARTED_AT],
            Value::Null
        );
        assert_eq!(p["data"]["NB_API_KEY"], json!("bmJwX2FiYw=="));
    }

    #[test]
    fn setup_store_drops_the_records_of_an_earlier_token() {
        let p = setup_store_patch(
            &nbi(DeletionPolicy::Retain),
            &SecretString::from("nbp_abc"),
            "u1",
            "2027-01-01T00:00:00Z",
            "now",
        );
        let ann = &p["metadata"]["annotations"];
        for key in [
            ANN_TOKEN_ID,
            ANN_PREVIOUS_TOKEN_ID,
            ANN_PREVIOUS_USER_ID,
            ANN_PREVIOUS_DELETE_AT,
            ANN_SERVICE_USER,
        ] {
            assert_eq!(ann[key], Value::Null, "{key}");
        }
        assert_eq!(p["data"][PREVIOUS_TOKEN_KEY], Value::Null);
        assert_eq!(p["data"]["NB_API_KEY"], json!("bmJwX2FiYw=="));
        assert_eq!(ann[ANN_USER_ID], json!("u1"));
    }

    fn owned_with(annotations: &[(&str, &str)]) -> OwnedSecret {
        let mut s = secret(
            &[(LABEL_MANAGED_BY, MANAGED_BY), (LABEL_INSTANCE, "nb")],
            Some(b"nbp_x"),
        );
        s.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        match classify(Some(s), "nb", "NB_API_KEY") {
            TokenSecret::Ours(o) => o,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_token_bound_with_verification_is_not_sent_without() {
        let url = "https://nb.example.com";
        let verified = owned_with(&[(ANN_MANAGEMENT_URL, url), (ANN_MANAGEMENT_TLS, "verified")]);
        assert!(verified.may_send_token(url, Trust::Verified));
        assert!(!verified.may_send_token(url, Trust::SkipVerify));
        let skip = owned_with(&[
            (ANN_MANAGEMENT_URL, url),
            (ANN_MANAGEMENT_TLS, "insecure-skip-verify"),
        ]);
        assert!(skip.may_send_token(url, Trust::SkipVerify));
        assert!(skip.may_send_token(url, Trust::Verified));
        // an unreadable record binds to verification
        let odd = owned_with(&[(ANN_MANAGEMENT_URL, url), (ANN_MANAGEMENT_TLS, "Verified ")]);
        assert!(!odd.may_send_token(url, Trust::SkipVerify));
        // plain http has no certificate: the record does not apply
        let http = owned_with(&[
            (ANN_MANAGEMENT_URL, "http://nb.local"),
            (ANN_MANAGEMENT_TLS, "verified"),
        ]);
        assert!(http.may_send_token("http://nb.local", Trust::SkipVerify));
    }

    #[test]
    fn secrets_without_the_trust_record_are_bound_at_their_next_verification() {
        let url = "https://nb.example.com";
        let mut n = nbi(DeletionPolicy::Retain);
        // written before the record existed: sent as the spec says, then recorded so
        let legacy = owned_with(&[(ANN_MANAGEMENT_URL, url)]);
        assert!(legacy.may_send_token(url, Trust::Verified));
        assert!(legacy.may_send_token(url, Trust::SkipVerify));
        assert!(legacy.binding_outdated(&n));
        assert_eq!(
            home_server_patch(&n)["metadata"]["annotations"][ANN_MANAGEMENT_TLS],
            json!("verified")
        );
        n.spec.tls = Some(crate::crd::TlsSpec {
            ca_secret_ref: None,
            insecure_skip_verify: true,
        });
        assert_eq!(
            home_server_patch(&n)["metadata"]["annotations"][ANN_MANAGEMENT_TLS],
            json!("insecure-skip-verify")
        );
        // bound without verification, now verified: bound as verified from here on
        let skip = owned_with(&[
            (ANN_MANAGEMENT_URL, url),
            (ANN_MANAGEMENT_TLS, "insecure-skip-verify"),
        ]);
        assert!(!skip.binding_outdated(&n));
        n.spec.tls = None;
        assert!(skip.binding_outdated(&n));
        let verified = owned_with(&[(ANN_MANAGEMENT_URL, url), (ANN_MANAGEMENT_TLS, "verified")]);
        assert!(!verified.binding_outdated(&n));
        // a setup or rotation records it with the server
        let p = store_patch(&n, &SecretString::from("nbp_abc"), "u1", "e", "i");
        assert_eq!(
            p["metadata"]["annotations"][ANN_MANAGEMENT_TLS],
            json!("verified")
        );
    }

    #[test]
    fn a_credentials_check_holds_for_its_version_and_fingerprint_only() {
        let v = credentials_check("41", "$argon2id$fp", false);
        assert_eq!(recorded_check(&v, "41", "$argon2id$fp"), Some(false));
        assert_eq!(recorded_check(&v, "42", "$argon2id$fp"), None);
        assert_eq!(recorded_check(&v, "41", "$argon2id$other"), None);
        let same = credentials_check("41", "$argon2id$fp", true);
        assert_eq!(recorded_check(&same, "41", "$argon2id$fp"), Some(true));
        assert_eq!(recorded_check("41 same", "41", "$argon2id$fp"), None);
        assert_eq!(recorded_check("garbage", "41", "$argon2id$fp"), None);
    }

    #[test]
    fn a_guarded_patch_applies_to_the_version_it_was_decided_on() {
        let patch = json!({"metadata": {"labels": {"a": "b"}}});
        let guarded = guarded(&patch, Some("7"));
        assert_eq!(guarded["metadata"]["resourceVersion"], "7");
        assert_eq!(guarded["metadata"]["labels"], patch["metadata"]["labels"]);
        // a claim names its own version; nothing known, nothing added
        let claim = json!({"metadata": {"resourceVersion": "3"}});
        assert_eq!(guarded_rv(&claim, Some("7")), "3");
        assert!(super::guarded(&patch, None)["metadata"]["resourceVersion"].is_null());
    }

    fn guarded_rv(patch: &Value, rv: Option<&str>) -> String {
        guarded(patch, rv)["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn merge_patch_semantics() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "d": 1});
        merge(&mut t, &json!({"a": {"b": null, "e": 3}, "d": 2}));
        assert_eq!(t, json!({"a": {"c": 2, "e": 3}, "d": 2}));
    }
}
