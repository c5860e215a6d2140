//! What the schema's rules on the token Secret's labels and annotations are built from: the key
//! prefixes of well-known Secret copiers (refused), and the key syntax the apiserver takes.

/// Key prefixes of well-known Secret copiers. An annotation or a label under one of them on the
/// token Secret makes the copier put the token into other namespaces (or pull another Secret into
/// it): `spec.token.secretAnnotations` and `secretLabels` may not set them, since whoever may edit
/// a NetbirdInstance is not trusted with the token. Compared in lower case.
pub const SECRET_COPIER_PREFIXES: &[&str] = &[
    // emberstack Reflector
    "reflector.v1.k8s.emberstack.com/",
    // mittwald kubernetes-replicator
    "replicator.v1.mittwald.de/",
    // AppsCode kubed and its successor Config Syncer
    "kubed.appscode.com/",
    // IBM secret-sync-operator
    "secretsync.ibm.com/",
    // Synator
    "synator/",
    // k8s-duplicator
    "duplicator.k8s.nicktriller.com/",
    // Replizieren
    "replizieren.dev/",
    // kube-syncer
    "kube-syncer/",
];

/// The Secret copier prefix `key` is under, if any.
pub fn copier_prefix(key: &str) -> Option<&'static str> {
    let key = key.to_ascii_lowercase();
    SECRET_COPIER_PREFIXES
        .iter()
        .find(|p| key.starts_with(*p))
        .copied()
}

/// A label or annotation key as the apiserver takes it: an optional DNS subdomain prefix (at most
/// 253 characters) and `/`, then a name of at most 63 characters (letters, digits, `-`, `_`, `.`,
/// beginning and ending with a letter or digit). Annotation keys are checked in lower case.
const QUALIFIED_NAME: &str = "^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?\
    [A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";

/// The rule that refuses keys of Secret copiers in the map `field`.
pub(super) fn copier_keys_rule(field: &str) -> kube::core::Rule {
    let checks: Vec<String> = SECRET_COPIER_PREFIXES
        .iter()
        .map(|p| format!("!k.lowerAscii().startsWith('{p}')"))
        .collect();
    let message = format!(
        "{field} must not set keys of Secret copiers ({}): they would copy the token into other \
            namespaces, to whoever may read there",
        SECRET_COPIER_PREFIXES.join(", ")
    );
    kube::core::Rule::new(format!("self.all(k, {})", checks.join(" && ")))
        .message(kube::core::Message::Message(message))
}

/// The rule that refuses keys the apiserver would refuse on the token Secret (`lower`: annotation
/// keys, checked in lower case as the apiserver does).
pub(super) fn key_syntax_rule(field: &str, lower: bool) -> kube::core::Rule {
    let key = if lower { "k.lowerAscii()" } else { "k" };
    kube::core::Rule::new(format!(
        "self.all(k, {key}.matches('{QUALIFIED_NAME}') && (!k.contains('/') || k.indexOf('/') <= \
            253))"
    ))
    .message(kube::core::Message::Message(format!(
        "{field} keys must be valid {}: an optional DNS subdomain prefix of at most 253 \
            characters and '/', then a name of at most 63 letters, digits, '-', '_' or '.', \
            beginning and ending with a letter or digit",
        if lower {
            "annotation keys"
        } else {
            "label keys"
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copier_keys_are_known_in_any_case() {
        assert_eq!(
            copier_prefix("Reflector.v1.k8s.emberstack.com/reflection-allowed"),
            Some("reflector.v1.k8s.emberstack.com/")
        );
        assert_eq!(
            copier_prefix("kubed.appscode.com/sync"),
            Some("kubed.appscode.com/")
        );
        assert_eq!(copier_prefix("reflector.example.com/x"), None);
        assert_eq!(copier_prefix("team"), None);
    }
}
