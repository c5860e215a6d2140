//! Errors of the NetBird client. They keep what a person needs to act (HTTP status, the server's
//! message, the `X-Request-Id` to find the server's log line) and never a password or a token.

use std::fmt;

/// The API call that failed; a closed set, used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Instance,
    Setup,
    Version,
    CurrentUser,
    ListTokens,
    CreateToken,
    DeleteToken,
    ListUsers,
    CreateUser,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Instance => "instance",
            Endpoint::Setup => "setup",
            Endpoint::Version => "version",
            Endpoint::CurrentUser => "users_current",
            Endpoint::ListTokens => "tokens_list",
            Endpoint::ListUsers => "users_list",
            Endpoint::CreateUser => "users_create",
            Endpoint::CreateToken => "tokens_create",
            Endpoint::DeleteToken => "tokens_delete",
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Endpoint::Instance => "GET /api/instance",
            Endpoint::Setup => "POST /api/setup",
            Endpoint::Version => "GET /api/instance/version",
            Endpoint::CurrentUser => "GET /api/users/current",
            Endpoint::ListTokens => "GET /api/users/{id}/tokens",
            Endpoint::ListUsers => "GET /api/users",
            Endpoint::CreateUser => "POST /api/users",
            Endpoint::CreateToken => "POST /api/users/{id}/tokens",
            Endpoint::DeleteToken => "DELETE /api/users/{id}/tokens/{id}",
        })
    }
}

/// How a request failed before an HTTP answer arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Dns,
    Connect,
    Tls,
    Timeout,
    Other,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransportKind::Dns => "the host name does not resolve",
            TransportKind::Connect => "the connection was refused or could not be made",
            TransportKind::Tls => "the TLS handshake failed",
            TransportKind::Timeout => "the request timed out",
            TransportKind::Other => "the connection failed",
        })
    }
}

/// A failed NetBird API call.
#[derive(Debug, thiserror::Error)]
pub enum NetbirdError {
    /// The server answered with an error status and (usually) a JSON message. The request id
    /// changes on every answer: it is kept for logs and Events (see [`NetbirdError::request_id`]),
    /// never printed into a condition, so a failure that repeats writes no new status.
    #[error("{endpoint} answered {status}: {message}")]
    Api {
        endpoint: Endpoint,
        status: u16,
        message: String,
        request_id: Option<String>,
        /// The body was NetBird's JSON error (`{"message":..., "code":...}`), not a page of
        /// something in front of it (a reverse proxy's 404 for a wrong path prefix).
        from_netbird: bool,
    },
    /// No HTTP answer: DNS, connect, TLS or timeout.
    #[error("{endpoint} failed: {kind} ({detail})")]
    Transport {
        endpoint: Endpoint,
        kind: TransportKind,
        detail: String,
    },
    /// The server answered with a redirect, which the operator never follows (credentials must not
    /// be sent to another host). `location` is the target's origin only: its path and query (an SSO
    /// gateway's `state=`) change from answer to answer.
    #[error(
        "{endpoint} answered {status} redirecting to {location}: managementURL must point at the \
         server itself, not at a redirect"
    )]
    Redirect {
        endpoint: Endpoint,
        status: u16,
        location: String,
    },
    /// The answer is not what NetBird sends.
    #[error("{endpoint} answered {status} with a body that is not NetBird's JSON ({detail})")]
    Decode {
        endpoint: Endpoint,
        status: u16,
        detail: String,
        request_id: Option<String>,
    },
    /// The answer is larger than the operator reads.
    #[error("{endpoint} answered with a body over {limit} bytes")]
    TooLarge { endpoint: Endpoint, limit: usize },
    /// The token is not a NetBird personal access token (checked before sending it).
    #[error("the stored token is not a NetBird personal access token: {0}")]
    MalformedToken(super::pat::PatFormatError),
}

impl From<super::pat::PatFormatError> for NetbirdError {
    fn from(e: super::pat::PatFormatError) -> Self {
        NetbirdError::MalformedToken(e)
    }
}

impl NetbirdError {
    /// The `X-Request-Id` of the answer, to find the server's log line.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            NetbirdError::Api { request_id, .. } | NetbirdError::Decode { request_id, .. } => {
                request_id.as_deref()
            }
            _ => None,
        }
    }

    /// The error with its request id, for logs and Events (not for conditions).
    pub fn with_request_id(&self) -> String {
        match self.request_id() {
            Some(id) => format!("{self} (request id {id})"),
            None => self.to_string(),
        }
    }

    /// HTTP status of the answer, if one arrived.
    pub fn status(&self) -> Option<u16> {
        match self {
            NetbirdError::Api { status, .. }
            | NetbirdError::Decode { status, .. }
            | NetbirdError::Redirect { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's message for an API error.
    pub fn server_message(&self) -> Option<&str> {
        match self {
            NetbirdError::Api { message, .. } => Some(message),
            _ => None,
        }
    }

    /// True when the token was refused: 401 (invalid or expired) or NetBird's own 404 (deleted).
    /// A 404 page that is not NetBird's JSON is about the URL, not the token
    /// ([`NetbirdError::is_wrong_path`]).
    pub fn is_token_rejected(&self) -> bool {
        matches!(self, NetbirdError::MalformedToken(_))
            || matches!(self.status(), Some(401))
            || self.is_not_found()
    }

    /// NetBird itself answered 404: the object (a token, a user) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            NetbirdError::Api {
                status: 404,
                from_netbird: true,
                ..
            }
        )
    }

    /// A 404 that is not NetBird's JSON: something in front of the server (a reverse proxy with
    /// another path prefix) does not know the path, so spec.managementURL is likely wrong.
    pub fn is_wrong_path(&self) -> bool {
        matches!(
            self,
            NetbirdError::Api {
                status: 404,
                from_netbird: false,
                ..
            } | NetbirdError::Decode { status: 404, .. }
        )
    }

    /// True when retrying the same call later may succeed (network trouble, 5xx, 429).
    pub fn is_transient(&self) -> bool {
        match self {
            NetbirdError::Transport { .. } | NetbirdError::TooLarge { .. } => true,
            NetbirdError::Api { status, .. } | NetbirdError::Decode { status, .. } => {
                *status >= 500 || *status == 429
            }
            NetbirdError::Redirect { .. } | NetbirdError::MalformedToken(_) => false,
        }
    }

    /// Status class for metrics: 2xx is never an error; `error` means no answer.
    pub fn status_class(&self) -> &'static str {
        status_class(self.status())
    }
}

/// "2xx", "4xx", "5xx", "3xx" or "error" (no answer), a bounded metric label.
pub fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        _ => "error",
    }
}
