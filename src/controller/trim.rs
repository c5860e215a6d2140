//! What the operator keeps of the objects its watches deliver: only what it reads.
//!
//! Every NetbirdInstance stays in the reflector's store for as long as it exists, so whatever
//! the store keeps of it is paid once per instance. A pass reads the spec, the status (to write it
//! only when it changed), and of the metadata the identity (name, namespace, uid,
//! resourceVersion: Events, owner references, the echo of its own status write), the generation,
//! the finalizers and the deletion time. The rest of the metadata is the apiserver's and the
//! user's: managedFields (under server-side apply often larger than the rest of the object),
//! labels and annotations (GitOps tools' tracking labels, kubectl's last-applied-configuration),
//! owner references. The operator never reads them: the token Secret copies none of them, and
//! every write to a NetbirdInstance is a merge patch of the status or of the finalizers, so what
//! the store lacks is never written back.
//!
//! The Secrets' metadata watch is read for namespace, name and resourceVersion (and the uid, by
//! the merge of several namespaces' watches); its objects are trimmed to those before anything
//! else sees them. A cached Secret (`secrets.rs`) is kept whole but for managedFields and, on a
//! Secret the operator does not own (credentials, CA), kubectl's last-applied-configuration: a
//! client-side applied credentials Secret carries its whole content, the password included, in
//! that annotation.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use kube::core::PartialObjectMeta;

use crate::crd::NetbirdInstance;
use crate::token_secret::{LABEL_MANAGED_BY, MANAGED_BY};

/// kubectl's copy of the object as last applied client-side.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// A NetbirdInstance as the store keeps it: spec, status, identity, generation, finalizers and
/// timestamps.
pub fn instance(nbi: &mut NetbirdInstance) {
    let ObjectMeta {
        name,
        namespace,
        uid,
        resource_version,
        generation,
        finalizers,
        creation_timestamp,
        deletion_timestamp,
        deletion_grace_period_seconds,
        ..
    } = std::mem::take(&mut nbi.metadata);
    nbi.metadata = ObjectMeta {
        name,
        namespace,
        uid,
        resource_version,
        generation,
        finalizers,
        creation_timestamp,
        deletion_timestamp,
        deletion_grace_period_seconds,
        ..ObjectMeta::default()
    };
}

/// A Secret's metadata as the watch's readers use it: namespace, name, uid and resourceVersion.
pub fn secret_meta(s: &mut PartialObjectMeta<Secret>) {
    let ObjectMeta {
        name,
        namespace,
        uid,
        resource_version,
        ..
    } = std::mem::take(&mut s.metadata);
    s.metadata = ObjectMeta {
        name,
        namespace,
        uid,
        resource_version,
        ..ObjectMeta::default()
    };
}

/// A Secret as the cache keeps it: without managedFields, and without kubectl's last applied copy
/// unless the operator owns it (a token Secret's annotations are compared with the ones its spec
/// asks for, and the operator never applies one client-side).
pub fn secret(s: &mut Secret) {
    s.metadata.managed_fields = None;
    let owned = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_MANAGED_BY))
        .is_some_and(|v| v == MANAGED_BY);
    if !owned {
        remove_annotation(&mut s.metadata.annotations, LAST_APPLIED);
    }
}

fn remove_annotation(annotations: &mut Option<BTreeMap<String, String>>, key: &str) {
    if let Some(a) = annotations.as_mut() {
        a.remove(key);
        if a.is_empty() {
            *annotations = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn applied_instance() -> NetbirdInstance {
        serde_json::from_value(json!({
            "apiVersion": "bootstrap.netbird.io/v1alpha1", "kind": "NetbirdInstance",
            "metadata": {
                "name": "nb", "namespace": "ns", "uid": "u1", "resourceVersion": "7",
                "generation": 2, "creationTimestamp": "2026-12-01T00:00:00Z",
                "deletionTimestamp": "2026-12-02T00:00:00Z", "deletionGracePeriodSeconds": 0,
                "finalizers": ["bootstrap.netbird.io/token-cleanup"],
                "labels": {"app.kubernetes.io/instance": "fleet"},
                "annotations": {LAST_APPLIED: "{\"spec\":{}}", "argocd.argoproj.io/sync-wave": "1"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "o", "uid": "u0"}],
                "managedFields": [{"manager": "kustomize-controller", "operation": "Apply",
                    "apiVersion": "bootstrap.netbird.io/v1alpha1", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": {"f:managementURL": {}}}}],
            },
            "spec": {"managementURL": "https://nb.example.com", "credentialsSecretRef": {"name": "admin"}},
            "status": {"observedGeneration": 2, "conditions": [{"type": "Ready", "status": "True",
                "reason": "Bootstrapped", "message": "", "lastTransitionTime": "2026-12-01T00:00:00Z"}]},
        }))
        .unwrap()
    }

    #[test]
    fn an_instance_keeps_what_passes_read() {
        let before = applied_instance();
        let mut nbi = before.clone();
        instance(&mut nbi);
        let (m, b) = (&nbi.metadata, &before.metadata);
        assert_eq!(m.name, b.name);
        assert_eq!(m.namespace, b.namespace);
        assert_eq!(m.uid, b.uid);
        assert_eq!(m.resource_version, b.resource_version);
        assert_eq!(m.generation, b.generation);
        assert_eq!(m.finalizers, b.finalizers);
        assert_eq!(m.creation_timestamp, b.creation_timestamp);
        assert_eq!(m.deletion_timestamp, b.deletion_timestamp);
        assert_eq!(
            m.deletion_grace_period_seconds,
            b.deletion_grace_period_seconds
        );
        assert_eq!(nbi.spec, before.spec);
        assert_eq!(nbi.status, before.status);
        assert!(m.managed_fields.is_none());
        assert!(m.labels.is_none());
        assert!(m.annotations.is_none());
        assert!(m.owner_references.is_none());
    }

    #[test]
    fn a_trimmed_instance_gives_the_same_references_and_token_secret() {
        use kube::Resource;
        let before = applied_instance();
        let mut nbi = before.clone();
        instance(&mut nbi);
        assert_eq!(nbi.object_ref(&()), before.object_ref(&()));
        assert_eq!(
            nbi.controller_owner_ref(&()),
            before.controller_owner_ref(&())
        );
        let claim = |n: &NetbirdInstance| crate::token_secret::new_claimed(n, "now", "fp");
        assert_eq!(claim(&nbi), claim(&before));
    }

    #[test]
    fn secret_metadata_keeps_identity_and_version() {
        let mut s: PartialObjectMeta<Secret> = PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                name: Some("s".into()),
                namespace: Some("ns".into()),
                uid: Some("u".into()),
                resource_version: Some("3".into()),
                labels: Some([("a".to_string(), "b".to_string())].into()),
                annotations: Some([(LAST_APPLIED.to_string(), "{}".to_string())].into()),
                managed_fields: Some(vec![Default::default()]),
                ..Default::default()
            },
            _phantom: std::marker::PhantomData,
        };
        secret_meta(&mut s);
        assert_eq!(
            s.metadata,
            ObjectMeta {
                name: Some("s".into()),
                namespace: Some("ns".into()),
                uid: Some("u".into()),
                resource_version: Some("3".into()),
                ..Default::default()
            }
        );
    }

    fn secret_with(labels: &[(&str, &str)]) -> Secret {
        let map = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        Secret {
            metadata: ObjectMeta {
                name: Some("s".into()),
                labels: Some(map(labels)),
                annotations: Some(map(&[(LAST_APPLIED, "{\"stringData\":{}}"), ("keep", "1")])),
                managed_fields: Some(vec![Default::default()]),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_foreign_secret_loses_last_applied_and_managed_fields() {
        let mut s = secret_with(&[]);
        secret(&mut s);
        assert!(s.metadata.managed_fields.is_none());
        let a = s.metadata.annotations.unwrap();
        assert!(!a.contains_key(LAST_APPLIED));
        assert_eq!(a.get("keep").map(String::as_str), Some("1"));
    }

    #[test]
    fn an_owned_secret_keeps_its_annotations() {
        let mut s = secret_with(&[(LABEL_MANAGED_BY, MANAGED_BY)]);
        secret(&mut s);
        assert!(s.metadata.managed_fields.is_none());
        assert!(s.metadata.annotations.unwrap().contains_key(LAST_APPLIED));
    }

    /// What the types of a stored instance take inline (the store keeps each instance in an `Arc`
    /// of this size, whatever it holds).
    #[test]
    fn inline_size_of_a_stored_instance() {
        use std::mem::size_of;
        let mut nbi = applied_instance();
        instance(&mut nbi);
        let (_, bytes) = crate::footprint::kept_by(|| std::sync::Arc::new(nbi.clone()));
        eprintln!(
            "a stored instance: {bytes} bytes with one condition; inline: NetbirdInstance {} \
             (ObjectMeta {}, spec {}, status {}), in its Arc {}",
            size_of::<NetbirdInstance>(),
            size_of::<ObjectMeta>(),
            size_of::<crate::crd::NetbirdInstanceSpec>(),
            size_of::<Option<crate::crd::NetbirdInstanceStatus>>(),
            crate::footprint::size_class(size_of::<NetbirdInstance>() + 16),
        );
    }
}
