//! The spec: `NetbirdInstanceSpec` and the types it holds, as users write them (the printer
//! columns and the CEL rules come with them), their defaults, and the accessors that read them.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::schema::{copier_keys_rule, key_syntax_rule};
use super::status::NetbirdInstanceStatus;

/// A NetBird management server that the operator sets up once and whose API token it keeps in a
/// Secret.
// the printer columns repeat `type_ = "string"`, which this lint mistakes for a duplicate
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "bootstrap.netbird.io",
    version = "v1alpha1",
    kind = "NetbirdInstance",
    plural = "netbirdinstances",
    shortname = "nbi",
    category = "netbird",
    namespaced,
    status = "NetbirdInstanceStatus",
    doc = "A NetBird management server that the operator sets up once (owner account from a \
        credentials Secret) and whose API token it stores in a Secret.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].reason"#
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".status.version.management"
    ),
    printcolumn(
        name = "Update",
        type_ = "boolean",
        json_path = ".status.version.updateAvailable"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[kube(validation = Rule::new("size(self.metadata.name) <= 63").message("metadata.name must be at \
    most 63 characters: it becomes the value of the token Secret's bootstrap.netbird.io/instance \
        label"))]
#[x_kube(validation = Rule::new("self.allowInsecureHTTP || \
    !self.managementURL.startsWith('http://')").message("managementURL uses http://, which would \
        send the admin password unencrypted: use https:// or set allowInsecureHTTP: true"))]
#[serde(rename_all = "camelCase")]
pub struct NetbirdInstanceSpec {
    /// Base URL of the NetBird management server, for example https://netbird.example.com.
    /// The operator appends /api/... to it; a path prefix is allowed (reverse proxies).
    /// No query, fragment or user:password@ part.
    #[serde(rename = "managementURL")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(
        validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')")
            .message("managementURL must start with https:// (or http:// together with \
                allowInsecureHTTP: true)"),
        validation = Rule::new("!self.contains('?') && !self.contains('#')")
            .message("managementURL must not have a query (?...) or fragment (#...): it is a \
                base URL, the operator appends /api/... itself"),
        validation = Rule::new("!self.matches('^[a-zA-Z]+://[^/]*@')").message("managementURL must \
            not carry user:password@: the admin credentials come from credentialsSecretRef"),
        validation = Rule::new("isURL(self) && url(self).getHostname() != ''")
            .message("managementURL must be an absolute URL with a host name, for example \
                https://netbird.example.com"),
    )]
    pub management_url: String,

    /// Allow a plain http:// managementURL. The admin password and the token then travel
    /// unencrypted; meant for a server reached over loopback or inside a trusted network.
    #[serde(default, rename = "allowInsecureHTTP")]
    pub allow_insecure_http: bool,

    /// TLS settings for the connection to managementURL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// The Secret, in the namespace of this NetbirdInstance, that holds the email, password and
    /// display name of the owner account that setup creates. It may be created after this
    /// resource: the operator waits for it.
    pub credentials_secret_ref: CredentialsSecretRef,

    /// Where and how the operator keeps the API token (personal access token) that setup returns.
    #[serde(default)]
    pub token: TokenSpec,

    /// Periodic check of the running and the latest NetBird versions.
    #[serde(default)]
    pub version_check: VersionCheckSpec,

    /// Stop reconciling this instance: no calls to NetBird, no writes to Secrets.
    #[serde(default)]
    pub suspend: bool,
}

/// TLS settings for the connection to the management server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A Secret key, in this namespace, holding extra PEM certificate authorities to trust (added
    /// to the public roots). Use it for a server with a private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<CaSecretRef>,

    /// Do not verify the server's certificate. Anyone on the path can then read the admin
    /// password and the token; prefer caSecretRef.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// A key of a Secret in the namespace of the NetbirdInstance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CaSecretRef {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key of the PEM bundle in the Secret.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// The Secret that holds the owner account's credentials.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Name of the Secret, in the namespace of this NetbirdInstance.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key holding the owner's email address.
    #[serde(default = "default_email_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub email_key: String,
    /// Key holding the owner's password (8 to 72 bytes).
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub password_key: String,
    /// Key holding the owner's display name. When the key is absent or empty, the email is used.
    #[serde(default = "default_name_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub name_key: String,
}

/// What happens to the token Secret when the NetbirdInstance is deleted.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum DeletionPolicy {
    /// Keep the token Secret (the default): re-creating the NetbirdInstance adopts it.
    #[default]
    Retain,
    /// Delete the token Secret with the NetbirdInstance (the Secret gets an owner reference).
    Delete,
}

/// The token Secret and the token's lifetime.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TokenSpec {
    /// Name of the Secret the token is written to, in this namespace. Empty means
    /// "<metadata.name>-token".
    #[serde(default)]
    #[schemars(length(max = 253))]
    #[x_kube(
        validation = Rule::new("self == '' || self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')")
            .message("secretName must be a valid Secret name (lower-case letters, digits, '-' \
                and '.')")
    )]
    pub secret_name: String,

    /// Key of the token in the Secret. NB_API_KEY is what the official NetBird operator reads.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    #[x_kube(
        validation = Rule::new("self != 'previous-token'")
            .message("secretKey previous-token is the key the operator keeps a replaced token \
                under during the service-user exchange; choose another key")
    )]
    pub secret_key: String,

    /// Lifetime of the token in days (1 to 365), sent to NetBird when the token is created.
    #[serde(default = "default_expires_in_days")]
    #[schemars(range(min = 1, max = 365))]
    pub expires_in_days: i32,

    /// Labels added to the token Secret (at most 64; values of at most 63 characters). Keys of
    /// Secret copiers (reflector.v1.k8s.emberstack.com/, replicator.v1.mittwald.de/,
    /// kubed.appscode.com/, ...) are refused: they would copy the token into other namespaces.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = {
            "type": "string",
            "maxLength": 63,
            "pattern": "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
        }
    ))]
    #[x_kube(
        validation = Rule::new("!('app.kubernetes.io/managed-by' in self) && \
            !('bootstrap.netbird.io/instance' in self)").message("secretLabels must not set \
                app.kubernetes.io/managed-by or bootstrap.netbird.io/instance: the operator sets \
                them"),
        validation = copier_keys_rule("secretLabels"),
        validation = key_syntax_rule("secretLabels", false),
    )]
    pub secret_labels: BTreeMap<String, String>,

    /// Annotations added to the token Secret (at most 64). Keys under bootstrap.netbird.io/ are
    /// refused: they are the operator's own records (which server the token belongs to, when it
    /// expires, ...). So are keys of Secret copiers (reflector.v1.k8s.emberstack.com/,
    /// replicator.v1.mittwald.de/, kubed.appscode.com/, ...): they would copy the token into
    /// other namespaces.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(
        validation = Rule::new("self.all(k, !k.startsWith('bootstrap.netbird.io/'))")
            .message("secretAnnotations must not set keys under bootstrap.netbird.io/: they are \
                the operator's own records"),
        validation = copier_keys_rule("secretAnnotations"),
        validation = key_syntax_rule("secretAnnotations", true),
    )]
    pub secret_annotations: BTreeMap<String, String>,

    /// What happens to the token Secret when this NetbirdInstance is deleted: Retain (default)
    /// keeps it, Delete removes it with the NetbirdInstance.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Renewal of the token before it expires.
    #[serde(default)]
    pub rotation: RotationSpec,

    /// Trade the setup token for a token of a NetBird service user (role admin), as NetBird's docs
    /// recommend: after setup the operator creates the service user if it does not exist, stores and
    /// verifies its token, then deletes the setup token. Rotation then renews the service user's
    /// token. Changing the name moves to a new service user the same way; removing this field keeps
    /// the current token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_user: Option<ServiceUserSpec>,
}

/// A NetBird service user.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ServiceUserSpec {
    /// Name of the service user in NetBird.
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
}

/// Renewal of the token before it expires.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RotationSpec {
    /// Replace the token when less than a third of its lifetime is left: a new token is created
    /// for the same user, written to the Secret and verified, and only then is the old one deleted.
    /// When false, the TokenAvailable condition turns to TokenExpiringSoon instead.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// How long the previous token stays valid after a rotation before the operator deletes it,
    /// as a duration such as 24h, 90m or 0s (0s: at once). Never longer than the previous token's
    /// own expiry. Programs that read the token once at start-up (the official NetBird operator
    /// reads it from an environment variable) keep working until they restart within this time.
    /// The service-user exchange keeps the same overlap for the setup token.
    #[serde(default = "default_grace_period")]
    #[schemars(
        length(min = 2, max = 32),
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub grace_period: String,

    /// Delete the previous token before the grace period ends once NetBird's record of its use
    /// (`last_used`) shows that nothing used it for this long since the token Secret changed:
    /// every consumer has moved to the new token. A duration such as 15m (0s: never early; the
    /// grace period alone decides). While the previous token is still used when less than a
    /// quarter of the grace period is left, the Warning Event PreviousTokenStillInUse, the
    /// TokenAvailable reason of that name and the metric netbird_operator_previous_token_in_use
    /// say so. Not followed after the service-user exchange: the service user may not read the
    /// owner's tokens.
    #[serde(default = "default_retire_after_unused")]
    #[schemars(
        length(min = 2, max = 32),
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub retire_after_unused: String,
}

impl Default for RotationSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            grace_period: default_grace_period(),
            retire_after_unused: default_retire_after_unused(),
        }
    }
}

impl RotationSpec {
    /// The grace period (24h when unparsable: the schema refuses such values).
    pub fn grace(&self) -> std::time::Duration {
        crate::duration::parse(&self.grace_period)
            .unwrap_or(std::time::Duration::from_secs(24 * 3600))
    }

    /// How long the previous token must go unused before it is retired early (15m when
    /// unparsable: the schema refuses such values); zero: never early.
    pub fn retire_after(&self) -> std::time::Duration {
        crate::duration::parse(&self.retire_after_unused)
            .unwrap_or(std::time::Duration::from_secs(15 * 60))
    }
}

impl Default for TokenSpec {
    fn default() -> Self {
        Self {
            secret_name: String::new(),
            secret_key: default_secret_key(),
            expires_in_days: default_expires_in_days(),
            secret_labels: BTreeMap::new(),
            secret_annotations: BTreeMap::new(),
            deletion_policy: DeletionPolicy::Retain,
            rotation: RotationSpec::default(),
            service_user: None,
        }
    }
}

/// The periodic version check.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VersionCheckSpec {
    /// Check the running and the latest versions (GET /api/instance/version).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How often to check, as a duration such as 30m, 1h or 1h30m; at least 1m.
    #[serde(default = "default_interval")]
    #[schemars(
        length(min = 2, max = 32),
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    #[x_kube(
        validation = Rule::new("duration(self) >= duration('1m')")
            .message("versionCheck.interval must be at least 1m")
    )]
    pub interval: String,
}

impl Default for VersionCheckSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: default_interval(),
        }
    }
}

fn default_email_key() -> String {
    "email".into()
}
fn default_password_key() -> String {
    "password".into()
}
fn default_name_key() -> String {
    "name".into()
}
fn default_ca_key() -> String {
    "ca.crt".into()
}
fn default_secret_key() -> String {
    "NB_API_KEY".into()
}
fn default_expires_in_days() -> i32 {
    30
}
fn default_true() -> bool {
    true
}
fn default_interval() -> String {
    "1h".into()
}
fn default_retire_after_unused() -> String {
    "15m".into()
}

fn default_grace_period() -> String {
    "24h".into()
}

impl NetbirdInstance {
    /// Name of the token Secret: `spec.token.secretName`, or `<name>-token`.
    pub fn token_secret_name(&self) -> String {
        if self.spec.token.secret_name.is_empty() {
            format!(
                "{}-token",
                self.metadata.name.as_deref().unwrap_or_default()
            )
        } else {
            self.spec.token.secret_name.clone()
        }
    }
}

impl NetbirdInstance {
    /// How often versions are checked (and the token re-verified); 1h when unparsable.
    pub fn version_interval(&self) -> std::time::Duration {
        crate::duration::parse(&self.spec.version_check.interval)
            .unwrap_or(std::time::Duration::from_secs(3600))
            .max(std::time::Duration::from_secs(60))
    }
}
