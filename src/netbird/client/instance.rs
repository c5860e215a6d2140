//! The calls about the server itself: whether setup is still required, the one-time setup, and
//! the running and latest versions.

use reqwest::Method;
use secrecy::SecretString;

use super::NetbirdClient;
use crate::netbird::error::{Endpoint, NetbirdError};
use crate::netbird::types::{InstanceStatus, SetupRequest, SetupResponse, VersionInfo};

impl NetbirdClient {
    /// `GET /api/instance`: whether setup is still required. No authentication.
    pub async fn instance_status(&self) -> Result<InstanceStatus, NetbirdError> {
        self.call(
            Endpoint::Instance,
            Method::GET,
            "instance",
            None,
            None::<&()>,
        )
        .await
    }

    /// `POST /api/setup`: creates the owner; with `create_pat` and a server that allows it, returns
    /// a token exactly once.
    pub async fn setup(&self, req: &SetupRequest) -> Result<SetupResponse, NetbirdError> {
        self.call(Endpoint::Setup, Method::POST, "setup", None, Some(req))
            .await
    }

    /// `GET /api/instance/version`.
    pub async fn version(&self, token: &SecretString) -> Result<VersionInfo, NetbirdError> {
        self.call(
            Endpoint::Version,
            Method::GET,
            "instance/version",
            Some(token),
            None::<&()>,
        )
        .await
    }
}
