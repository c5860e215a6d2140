//! Request and response bodies of the NetBird management API, as the operator uses them.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

/// `GET /api/instance`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct InstanceStatus {
    pub setup_required: bool,
}

/// `POST /api/setup` request. Debug output hides the password.
#[derive(Serialize)]
pub struct SetupRequest {
    pub email: String,
    #[serde(serialize_with = "expose")]
    pub password: SecretString,
    pub name: String,
    pub create_pat: bool,
    pub pat_expire_in: i32,
}

impl std::fmt::Debug for SetupRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetupRequest")
            .field("email", &self.email)
            .field("password", &"[redacted]")
            .field("name", &self.name)
            .field("create_pat", &self.create_pat)
            .field("pat_expire_in", &self.pat_expire_in)
            .finish()
    }
}

fn expose<S: Serializer>(s: &SecretString, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.expose_secret())
}

/// `POST /api/setup` answer. Debug output hides the token.
#[derive(Deserialize)]
pub struct SetupResponse {
    pub user_id: String,
    #[serde(default)]
    pub email: String,
    #[serde(default)]
    pub personal_access_token: Option<SecretString>,
}

impl std::fmt::Debug for SetupResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetupResponse")
            .field("user_id", &self.user_id)
            .field("email", &self.email)
            .field(
                "personal_access_token",
                &self.personal_access_token.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

/// `GET /api/instance/version`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct VersionInfo {
    pub management_current_version: String,
    #[serde(default)]
    pub management_update_available: bool,
    #[serde(default)]
    pub dashboard_available_version: Option<String>,
    #[serde(default)]
    pub management_available_version: Option<String>,
}

/// `GET /api/users/current` (the fields the operator reads).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct User {
    pub id: String,
    #[serde(default)]
    pub email: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub is_service_user: bool,
    #[serde(default)]
    pub status: String,
}

/// One entry of `GET /api/users/{id}/tokens` (never holds the token itself).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct PersonalAccessToken {
    pub id: String,
    pub name: String,
    pub expiration_date: jiff::Timestamp,
    #[serde(default)]
    pub created_by: String,
    pub created_at: jiff::Timestamp,
    #[serde(default)]
    pub last_used: Option<jiff::Timestamp>,
}

/// `POST /api/users/{id}/tokens` request.
#[derive(Debug, Clone, Serialize)]
pub struct CreateTokenRequest {
    pub name: String,
    pub expires_in: i32,
}

/// `POST /api/users/{id}/tokens` answer. Debug output hides the token.
#[derive(Deserialize)]
pub struct CreatedToken {
    pub plain_token: SecretString,
    pub personal_access_token: PersonalAccessToken,
}

impl std::fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedToken")
            .field("plain_token", &"[redacted]")
            .field("personal_access_token", &self.personal_access_token)
            .finish()
    }
}

/// Error body of every endpoint: `{"message": "...", "code": 422}`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ErrorBody {
    pub message: String,
    /// The HTTP status again: NetBird always sends it, a proxy's JSON page rarely does.
    pub code: u16,
}
