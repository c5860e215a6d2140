//! The checks of a spec that the schema cannot make (or that an object stored before the schema
//! had the rule escaped): key prefixes this cluster refuses, and the problems of a spec.

use super::NetbirdInstanceSpec;

impl NetbirdInstanceSpec {
    /// A key of `token.secretLabels` or `token.secretAnnotations` under one of `refused` (prefixes
    /// this cluster's operator is configured to refuse, besides the built-in ones): the message
    /// for Stalled/InvalidSpec.
    pub fn refused_secret_key(&self, refused: &[String]) -> Option<String> {
        let token = &self.token;
        let keys = token
            .secret_labels
            .keys()
            .map(|k| ("secretLabels", k))
            .chain(
                token
                    .secret_annotations
                    .keys()
                    .map(|k| ("secretAnnotations", k)),
            );
        for (field, key) in keys {
            let lower = key.to_ascii_lowercase();
            if let Some(prefix) = refused
                .iter()
                .find(|p| !p.is_empty() && lower.starts_with(&p.to_ascii_lowercase()))
            {
                return Some(format!(
                    "spec.token.{field} sets {key:?}, under {prefix:?}, which this cluster's \
                     operator refuses (--refused-secret-key-prefixes, chart value \
                     tokenSecret.refusedKeyPrefixes: a Secret copier of this cluster reads such \
                     keys and would copy the token into other namespaces). Remove the key; the \
                     token Secret is not written until then"
                ));
            }
        }
        None
    }

    /// A problem the schema could not catch (or an object stored before the schema had the rule).
    pub fn problem(&self) -> Option<String> {
        let url = match url::Url::parse(&self.management_url) {
            Ok(u) => u,
            Err(e) => {
                return Some(format!(
                    "managementURL {:?} is not a valid URL: {e}",
                    self.management_url
                ));
            }
        };
        match url.scheme() {
            "https" => {}
            "http" if self.allow_insecure_http => {}
            "http" => {
                return Some(
                    "managementURL uses http://, which would send the admin password unencrypted: \
                     use https:// or set allowInsecureHTTP: true"
                        .into(),
                );
            }
            other => {
                return Some(format!(
                    "managementURL must use https (or http), not {other}"
                ));
            }
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Some("managementURL must name a host".into());
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Some(
                "managementURL must not carry user:password@; the credentials come from \
                 credentialsSecretRef"
                    .into(),
            );
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Some("managementURL must not have a query or fragment".into());
        }
        if self.token.secret_key == crate::token_secret::PREVIOUS_TOKEN_KEY {
            return Some(format!(
                "token.secretKey {} is the key the operator keeps a replaced token under during \
                 the service-user exchange; choose another key",
                crate::token_secret::PREVIOUS_TOKEN_KEY
            ));
        }
        if !(1..=365).contains(&self.token.expires_in_days) {
            return Some(format!(
                "token.expiresInDays is {}; it must be 1 to 365",
                self.token.expires_in_days
            ));
        }
        match crate::duration::parse(&self.version_check.interval) {
            Err(e) => return Some(format!("versionCheck.interval: {e}")),
            Ok(d) if d < std::time::Duration::from_secs(60) => {
                return Some(format!(
                    "versionCheck.interval is {}; it must be at least 1m",
                    self.version_check.interval
                ));
            }
            Ok(_) => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> NetbirdInstanceSpec {
        let mut s: NetbirdInstanceSpec = serde_json::from_value(serde_json::json!({
            "managementURL": "https://nb.example.com",
            "credentialsSecretRef": {"name": "admin"},
        }))
        .unwrap();
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        s.token.secret_labels = map(labels);
        s.token.secret_annotations = map(annotations);
        s
    }

    #[test]
    fn prefixes_a_cluster_refuses_stall_with_the_key_named() {
        let refused = vec!["copier.example.com/".to_string()];
        let none = spec(&[("team", "net")], &[("note", "x")]);
        assert_eq!(none.refused_secret_key(&refused), None);
        let label = spec(&[("Copier.example.com/to", "all")], &[]);
        let message = label.refused_secret_key(&refused).expect("refused");
        assert!(message.contains("secretLabels"), "{message}");
        assert!(message.contains("Copier.example.com/to"), "{message}");
        assert!(
            message.contains("tokenSecret.refusedKeyPrefixes"),
            "{message}"
        );
        let annotation = spec(&[], &[("copier.example.com/replicate-to", "ns")]);
        assert!(
            annotation
                .refused_secret_key(&refused)
                .is_some_and(|m| m.contains("secretAnnotations"))
        );
        // nothing configured: nothing refused here (the built-in prefixes are the schema's and
        // token_secret's)
        assert_eq!(annotation.refused_secret_key(&[]), None);
        assert_eq!(annotation.refused_secret_key(&[String::new()]), None);
    }
}
