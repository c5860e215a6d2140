//! The `NetbirdInstance` custom resource (bootstrap.netbird.io/v1alpha1).
//!
//! Doc comments on the fields below are user documentation: they become `kubectl explain` text.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

/// API group of the operator's resources; also the prefix of its labels and annotations.
pub const GROUP: &str = "bootstrap.netbird.io";

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
fn copier_keys_rule(field: &str) -> kube::core::Rule {
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
fn key_syntax_rule(field: &str, lower: bool) -> kube::core::Rule {
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

/// Observed state, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NetbirdInstanceStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready, Reconciling, Stalled, SetupComplete, TokenAvailable and UpdateAvailable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The one-time setup of the management server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup: Option<SetupStatus>,

    /// The token kept in the token Secret (never the token itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenStatus>,

    /// Running and latest versions, from the last version check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<VersionStatus>,
}

/// Where the one-time setup stands.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetupState {
    /// Setup has not been attempted.
    Pending,
    /// The operator claimed the token Secret and is calling setup.
    InProgress,
    /// This operator set the server up.
    Completed,
    /// The server was set up before (by hand, another tool, or an earlier NetbirdInstance).
    AlreadySetUp,
    /// The server cannot be set up here (already set up, or no embedded identity provider) and no
    /// token is available.
    Unavailable,
}

/// The one-time setup of the management server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SetupStatus {
    /// Pending, InProgress, Completed, AlreadySetUp or Unavailable.
    pub state: SetupState,
    /// NetBird user id of the owner account.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "ownerUserID"
    )]
    pub owner_user_id: Option<String>,
    /// Email of the owner account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_email: Option<String>,
    /// When the operator claimed the token Secret to run setup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When setup answered successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
}

/// The token kept in the token Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TokenStatus {
    /// Name of the token Secret.
    pub secret_name: String,
    /// NetBird user the token belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "userID")]
    pub user_id: Option<String>,
    /// NetBird id of the token, when known.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "tokenID")]
    pub token_id: Option<String>,
    /// When the token expires, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// When the server last accepted the token. Moved by the checks every versionCheck.interval
    /// and when the token changes; the check after an operator restart leaves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified_at: Option<Time>,
    /// When the token was last replaced by a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotated_at: Option<Time>,
    /// NetBird id of the token the last rotation replaced, while it is still valid (its grace
    /// period).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "previousTokenID"
    )]
    pub previous_token_id: Option<String>,
    /// When the operator deletes the previous token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_token_deletion_at: Option<Time>,
    /// When NetBird last saw the previous token used (by the server's clock), as the operator last
    /// looked (at most once a minute): a consumer that has not restarted onto the new token still
    /// holds it. Absent before the first use, and after the service-user exchange (not followed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_token_last_used_at: Option<Time>,
}

/// Versions reported by the management server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VersionStatus {
    /// The running management server version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management: Option<String>,
    /// The latest management release, when the server could tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_available: Option<String>,
    /// The latest dashboard release, when the server could tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dashboard_available: Option<String>,
    /// Whether a newer management release exists; absent when the server could not tell (it
    /// reports no latest release, e.g. without internet access).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_available: Option<bool>,
    /// When the versions were last read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<Time>,
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
                        tokenSecret.refusedKeyPrefixes: a Secret copier of this cluster reads \
                        such keys and would copy the token into other namespaces). Remove the \
                        key; the token Secret is not written until then"
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

/// The CustomResourceDefinition as YAML, as committed in `crds/netbirdinstance.yaml`.
pub fn crd_yaml() -> String {
    let crd = NetbirdInstance::crd();
    let body =
        serde_norway::to_string(&crd).unwrap_or_else(|e| format!("# cannot render the CRD: {e}\n"));
    format!("# Generated by `netbird-operator crd`; do not edit by hand.\n---\n{body}")
}

/// The CRD as a Helm template (`charts/netbird-operator/templates/crds.yaml`): installed with the
/// chart and upgraded with it (Helm never upgrades a chart's `crds/` folder), kept on uninstall so
/// that deleting the release never deletes the NetbirdInstances.
pub fn crd_helm_template() -> String {
    let mut crd = NetbirdInstance::crd();
    crd.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("helm.sh/resource-policy".into(), "keep".into());
    let body =
        serde_norway::to_string(&crd).unwrap_or_else(|e| format!("# cannot render the CRD: {e}\n"));
    format!(
        "# Generated by `netbird-operator crd --helm`; do not edit by hand.\n{{{{- if \
            .Values.crds.install }}}}\n{body}{{{{- end }}}}\n"
    )
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
