//! The status as a JSON merge patch that says what is: a merge patch keeps every field it does not
//! mention, so a field the new status leaves out (the previous token once it is deleted, the
//! latest versions once the server no longer tells, the whole token without a token) is sent as
//! an explicit null. Which fields exist is read from the CRD's own status schema, so a field added
//! to the status later is covered without a list to keep in step.

use std::sync::LazyLock;

use kube::CustomResourceExt;
use serde_json::Value;

use crate::crd::{NetbirdInstance, NetbirdInstanceStatus};

/// The properties of `status` in the generated CRD's schema (JSON), read once.
static STATUS_SCHEMA: LazyLock<Value> = LazyLock::new(|| {
    let crd = serde_json::to_value(NetbirdInstance::crd()).unwrap_or_default();
    crd.pointer("/spec/versions/0/schema/openAPIV3Schema/properties/status")
        .cloned()
        .unwrap_or_default()
});

/// `status` as JSON, with a null for every field of the schema it leaves out (in objects it has;
/// lists are replaced whole by a merge patch and need none).
pub fn with_nulls(status: &NetbirdInstanceStatus) -> Value {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    add_nulls(&STATUS_SCHEMA, &mut value);
    value
}

fn add_nulls(schema: &Value, value: &mut Value) {
    let (Some(properties), Value::Object(object)) =
        (schema.get("properties").and_then(Value::as_object), value)
    else {
        return;
    };
    for (key, property) in properties {
        match object.get_mut(key) {
            Some(inner) => add_nulls(property, inner),
            None => {
                object.insert(key.clone(), Value::Null);
            }
        }
    }
}

/// The fields of `status` (dotted paths) the schema knows: for tests.
#[cfg(test)]
fn known_fields() -> Vec<String> {
    fn walk(schema: &Value, prefix: &str, out: &mut Vec<String>) {
        let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
            return;
        };
        for (key, property) in properties {
            let path = format!("{prefix}{key}");
            out.push(path.clone());
            walk(property, &format!("{path}."), out);
        }
    }
    let mut out = Vec::new();
    walk(&STATUS_SCHEMA, "", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{TokenStatus, VersionStatus};

    #[test]
    fn the_schema_is_found() {
        let fields = known_fields();
        for f in [
            "token.previousTokenID",
            "token.previousTokenDeletionAt",
            "version.managementAvailable",
            "version.dashboardAvailable",
            "token",
            "setup.ownerUserID",
        ] {
            assert!(fields.iter().any(|k| k == f), "{f} not in {fields:?}");
        }
    }

    #[test]
    fn absent_fields_are_nulls_present_ones_are_values() {
        let status = NetbirdInstanceStatus {
            observed_generation: Some(2),
            token: Some(TokenStatus {
                secret_name: "t".into(),
                token_id: Some("id".into()),
                ..Default::default()
            }),
            version: Some(VersionStatus {
                management: Some("0.77.1".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = with_nulls(&status);
        assert_eq!(v["observedGeneration"], 2);
        assert_eq!(v["token"]["tokenID"], "id");
        assert!(v["token"]["previousTokenID"].is_null());
        assert!(
            v["token"]
                .as_object()
                .unwrap()
                .contains_key("previousTokenID")
        );
        assert!(
            v["token"]
                .as_object()
                .unwrap()
                .contains_key("previousTokenDeletionAt")
        );
        assert!(
            v["version"]
                .as_object()
                .unwrap()
                .contains_key("managementAvailable")
        );
        assert!(
            v["version"]
                .as_object()
                .unwrap()
                .contains_key("dashboardAvailable")
        );
        assert!(v.as_object().unwrap().contains_key("setup"));
        assert!(v["setup"].is_null());

        let without_token = NetbirdInstanceStatus::default();
        let v = with_nulls(&without_token);
        assert!(v.as_object().unwrap().contains_key("token"));
        assert!(v["token"].is_null());
    }
}
