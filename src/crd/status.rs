//! The status: the observed state the operator writes (conditions, setup, token, versions).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

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
