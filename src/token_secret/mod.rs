//! The token Secret: who owns it, and the objects and patches the operator writes to it.
//!
//! The operator writes only Secrets that carry its managed-by label and its instance label. A
//! Secret of the token Secret's name without them belongs to someone else and is never changed.
//!
//! This file owns the Secret's format and its reading: the label and annotation names,
//! [`classify`] ([`TokenSecret`], [`OwnedSecret`] and what its records say), and the parsers of
//! recorded values. `metadata.rs` holds what the spec asks of the Secret's labels, annotations and
//! owner references; `patches.rs` every patch and every Secret the operator writes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use secrecy::SecretString;

use crate::binding::{self, ANN_MANAGEMENT_TLS, ANN_MANAGEMENT_URL, Trust};
use crate::crd::NetbirdInstance;

mod metadata;
mod patches;

pub use metadata::{
    desired_labels, desired_owner_references, metadata_in_sync, spec_annotations, spec_trust,
};
pub use patches::{
    Exchange, NewToken, abandoned_setup_patch, claim_patch, credentials_checked_patch, data_value,
    guarded, home_server_patch, identified_patch, invalid_write_message, malformed_token_patch,
    metadata_patch, new_claimed, new_claimed_checked, no_token_patch, other_key_records_patch,
    previous_deleted_patch, recreated, release_patch, rotated_patch, rotation_ended_patch,
    rotation_marker_patch, setup_store_patch, setup_unanswered_patch, store_patch,
};

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

/// What became of a setup's token when its answer can never be stored: one sentence for the log,
/// the TokenLost Event and the SecretConflict message.
pub fn setup_token_lost() -> String {
    format!(
        "the token that setup may have issued was never stored and is lost: it stays valid on the \
         server until it expires (delete the owner's token named {SETUP_TOKEN_NAME} in the NetBird \
         dashboard)"
    )
}
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

    /// When the stored token was issued, when known.
    pub fn issued_at(&self) -> Option<jiff::Timestamp> {
        self.time(ANN_ISSUED_AT)
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
                    "; it records a setup of this operator in flight since {at}: {}",
                    setup_token_lost()
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

/// A recorded malformed token: (generation, what, why).
pub fn parse_malformed(value: &str) -> Option<(i64, &str, &str)> {
    let mut parts = value.splitn(3, ' ');
    let generation = parts.next()?.parse().ok()?;
    Some((generation, parts.next()?, parts.next().unwrap_or("")))
}

/// A recorded refusal: (generation, status, message).
/// A server's message as a recorded rejection keeps it (and as a live answer is reported, so that
/// the two say the same): no control characters, at most 200 characters.
pub fn recorded_message(message: &str) -> String {
    message
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect()
}

pub fn parse_rejection(value: &str) -> Option<(i64, u16, &str)> {
    let mut parts = value.splitn(3, ' ');
    let generation = parts.next()?.parse().ok()?;
    let status = parts.next()?.parse().ok()?;
    Some((generation, status, parts.next().unwrap_or("")))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use secrecy::ExposeSecret;
    use serde_json::json;

    use super::*;
    use crate::crd::{DeletionPolicy, NetbirdInstanceSpec};

    pub(super) fn nbi(policy: DeletionPolicy) -> NetbirdInstance {
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

    pub(super) fn secret(labels: &[(&str, &str)], data: Option<&[u8]>) -> Secret {
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
}
