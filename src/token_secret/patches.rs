//! Every write to the token Secret: the merge patches (claim, store, rotation, records, metadata)
//! and the Secrets created new (claimed for setup, or created again under a token write), made to
//! apply to the version they were decided on.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::metadata::{
    copier_keys_from_spec, desired_labels, desired_owner_references, spec_annotations, spec_trust,
};
use super::{
    ANN_CREDENTIALS_CHECKED, ANN_EXPIRES_AT, ANN_FINGERPRINT, ANN_ISSUED_AT, ANN_MALFORMED_TOKEN,
    ANN_PREVIOUS_DELETE_AT, ANN_PREVIOUS_TOKEN_ID, ANN_PREVIOUS_USER_ID, ANN_ROTATED_AT,
    ANN_ROTATION_STARTED_AT, ANN_SERVICE_USER, ANN_SETUP_COMPLETED_AT, ANN_SETUP_OUTCOME,
    ANN_SETUP_REJECTED, ANN_SETUP_STARTED_AT, ANN_SETUP_UNANSWERED, ANN_TOKEN_ID, ANN_TOKEN_KEY,
    ANN_USER_ID, OwnedSecret, PREVIOUS_TOKEN_KEY,
};
use crate::binding::{self, ANN_MANAGEMENT_TLS, ANN_MANAGEMENT_URL};
use crate::crd::NetbirdInstance;

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

/// Records a comparison of the credentials (see [`credentials_check`](super::credentials_check)).
pub fn credentials_checked_patch(check: &str) -> Value {
    json!({"metadata": {"annotations": {ANN_CREDENTIALS_CHECKED: check}}})
}

/// Marks a token creation in flight (rotation, exchange): a crash before the new token is stored
/// leaves an extra token on the server, found by its name and deleted on the next pass.
pub fn rotation_marker_patch(started_at: &str) -> Value {
    json!({"metadata": {"annotations": {ANN_ROTATION_STARTED_AT: started_at}}})
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
    // the whole record of the replaced token, every field written: a field left out would keep
    // the value of an earlier record (another user's id, another token) in the merge
    ann[ANN_PREVIOUS_USER_ID] = Value::Null;
    let mut previous_token = Value::Null;
    if let Some(x) = exchange {
        ann[ANN_USER_ID] = json!(x.service_user_id);
        ann[ANN_SERVICE_USER] = json!(x.service_user);
        if new.previous.is_some() {
            ann[ANN_PREVIOUS_USER_ID] = json!(x.previous_user);
            previous_token = data_value(x.previous_token);
        }
    }
    if nbi.spec.token.secret_key != PREVIOUS_TOKEN_KEY {
        patch["data"][PREVIOUS_TOKEN_KEY] = previous_token;
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
/// so the same spec and credentials are never sent again.
pub fn release_patch(rejection: Option<(i64, u16, &str)>) -> Value {
    let rejected = rejection.map_or(Value::Null, |(generation, status, message)| {
        let message = super::recorded_message(message);
        json!(format!("{generation} {status} {message}"))
    });
    json!({"metadata": {"annotations": {
        ANN_SETUP_STARTED_AT: Value::Null,
        ANN_SETUP_REJECTED: rejected,
    }}})
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
    use crate::crd::DeletionPolicy;
    use crate::token_secret::tests::nbi;

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

    #[test]
    fn a_rotation_writes_the_whole_record_of_the_replaced_token() {
        let token = SecretString::from("nbp_abc");
        let new = NewToken {
            token: &token,
            id: "tok5",
            expires_at: "2027-02-01T00:00:00Z",
            issued_at: "now",
            previous: Some(("tok4", "later")),
        };
        // a rotation's replaced token is the current user's, and the Secret keeps no copy: the
        // fields of an earlier record (an exchange's owner and its token) are removed
        let p = rotated_patch(&nbi(DeletionPolicy::Retain), &new, None);
        let ann = &p["metadata"]["annotations"];
        assert_eq!(ann[ANN_PREVIOUS_TOKEN_ID], json!("tok4"));
        assert_eq!(ann[ANN_PREVIOUS_DELETE_AT], json!("later"));
        assert_eq!(ann[ANN_PREVIOUS_USER_ID], Value::Null);
        assert_eq!(p["data"][PREVIOUS_TOKEN_KEY], Value::Null);
        // the exchange records the owner and keeps the owner's token for its own deletion
        let old = SecretString::from("nbp_old");
        let x = Exchange {
            service_user_id: "svc",
            service_user: "netbird-operator",
            previous_user: "owner",
            previous_token: &old,
        };
        let p = rotated_patch(&nbi(DeletionPolicy::Retain), &new, Some(&x));
        assert_eq!(
            p["metadata"]["annotations"][ANN_PREVIOUS_USER_ID],
            json!("owner")
        );
        assert_eq!(p["data"][PREVIOUS_TOKEN_KEY], json!("bmJwX29sZA=="));
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
