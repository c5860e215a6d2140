//! What the spec asks of the token Secret's metadata: the labels, the annotations and the owner
//! references it must carry (never the keys of Secret copiers), whether an owned Secret follows
//! them, and how the spec has the server trusted.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;

use super::{LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGED_BY, OWN_ANNOTATION_PREFIX, OwnedSecret};
use crate::binding::Trust;
use crate::crd::{DeletionPolicy, NetbirdInstance, copier_prefix};

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
pub(super) fn copier_keys_from_spec(
    nbi: &NetbirdInstance,
    s: &OwnedSecret,
) -> (Vec<String>, Vec<String>) {
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

/// How the spec has the server trusted.
pub fn spec_trust(nbi: &NetbirdInstance) -> Trust {
    Trust::of(
        nbi.spec
            .tls
            .as_ref()
            .is_some_and(|t| t.insecure_skip_verify),
    )
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Secret;
    use serde_json::Value;

    use super::*;
    use crate::token_secret::tests::{nbi, secret};
    use crate::token_secret::{TokenSecret, classify, metadata_patch, new_claimed};

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
}
