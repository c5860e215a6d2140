//! HTTP client for the NetBird management API: the client type, how it is built (TLS roots,
//! proxy, shared connection pool) and how its requests travel (reqwest, or a simulated network).
//!
//! The calls are grouped by concern: `instance.rs` (instance status, setup, version) and
//! `users.rs` (users and their tokens). `request.rs` sends one request and reads its answer;
//! `failures.rs` turns a failed one into an error that quotes nothing secret; `options.rs` holds
//! the connection options and the egress proxy.

use std::time::Duration;

use url::Url;

use super::error::{Endpoint, TransportKind};

mod failures;
mod instance;
mod options;
mod request;
mod users;

use failures::error_chain;
pub use options::{ClientOptions, ProxySettings};
pub use request::MAX_BODY_BYTES;

/// Observes each call's outcome (for metrics); `status` is `None` when no answer arrived.
pub trait CallObserver: Send + Sync {
    fn observe(&self, endpoint: Endpoint, status: Option<u16>);
}

impl From<url::ParseError> for ClientBuildError {
    fn from(e: url::ParseError) -> Self {
        ClientBuildError::Url(e)
    }
}

/// Why a client could not be built from the spec.
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("managementURL is not a valid URL: {0}")]
    Url(url::ParseError),
    #[error("managementURL must use http or https, not {0}")]
    Scheme(String),
    #[error("the CA bundle is not valid PEM: {0}")]
    CaBundle(String),
    #[error("failed to build the HTTP client: {0}")]
    Http(String),
    #[error("the egress proxy is unusable: {0}")]
    Proxy(String),
}

/// A client bound to one management server.
#[derive(Clone)]
pub struct NetbirdClient {
    http: Transport,
    api: Url,
    observer: Option<std::sync::Arc<dyn CallObserver>>,
}

/// How requests travel: reqwest (production), or a simulated network (the history explorer's
/// NetBird model, tests/explorer.rs); the same code builds every request and reads every answer.
#[derive(Clone)]
enum Transport {
    Http(reqwest::Client),
    Simulated {
        network: std::sync::Arc<dyn SimulatedNetwork>,
        opts: ClientOptions,
    },
}

/// Test seam: a network of simulated NetBird servers, answering at the HTTP level.
pub trait SimulatedNetwork: Send + Sync {
    /// One request; `Err` is a failure with no answer (connection refused, timeout, ...).
    fn send(
        &self,
        request: SimRequest,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<SimResponse, TransportKind>> + Send>>;
}

/// A request as it would go on the wire, with the TLS settings it would go with.
#[derive(Clone, Debug)]
pub struct SimRequest {
    pub method: String,
    pub url: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub insecure_skip_verify: bool,
    pub extra_ca_pem: Option<Vec<u8>>,
    pub request_timeout: Duration,
}

/// An answer of a simulated server.
#[derive(Clone, Debug, Default)]
pub struct SimResponse {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for NetbirdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetbirdClient")
            .field("api", &self.api.as_str())
            .finish()
    }
}

impl NetbirdClient {
    /// A client for `management_url` (the operator appends `/api/...` to it).
    pub fn new(management_url: &str, opts: &ClientOptions) -> Result<Self, ClientBuildError> {
        Self::with_http(management_url, Self::http(opts)?)
    }

    /// The HTTP client for these options. It holds the TLS roots and the connection pool: share it
    /// between all servers with the same TLS settings (see `with_http`).
    pub fn http(opts: &ClientOptions) -> Result<reqwest::Client, ClientBuildError> {
        crate::tls::install_crypto_provider();
        let builder = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .timeout(opts.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("netbird-operator/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(30));
        let mut builder = opts.proxy.apply(builder)?;
        if let Some(pem) = &opts.extra_ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| ClientBuildError::CaBundle(e.to_string()))?;
            if certs.is_empty() {
                return Err(ClientBuildError::CaBundle("no certificate found".into()));
            }
            builder = builder.tls_certs_merge(certs);
        }
        if opts.insecure_skip_verify {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        builder
            .build()
            .map_err(|e| ClientBuildError::Http(error_chain(&e)))
    }

    /// A client for `management_url` over a shared HTTP client.
    pub fn with_http(
        management_url: &str,
        http: reqwest::Client,
    ) -> Result<Self, ClientBuildError> {
        Self::over(management_url, Transport::Http(http))
    }

    fn over(management_url: &str, http: Transport) -> Result<Self, ClientBuildError> {
        let mut api = Url::parse(management_url)?;
        if api.scheme() != "https" && api.scheme() != "http" {
            return Err(ClientBuildError::Scheme(api.scheme().to_string()));
        }
        // base + "api/": keep a path prefix, add exactly one slash
        let path = format!("{}/api/", api.path().trim_end_matches('/'));
        api.set_path(&path);
        api.set_query(None);
        api.set_fragment(None);
        Ok(Self {
            http,
            api,
            observer: None,
        })
    }

    /// A client for `management_url` whose requests go to a simulated network (tests).
    pub fn simulated(
        management_url: &str,
        network: std::sync::Arc<dyn SimulatedNetwork>,
        opts: &ClientOptions,
    ) -> Result<Self, ClientBuildError> {
        if let Some(pem) = &opts.extra_ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| ClientBuildError::CaBundle(e.to_string()))?;
            if certs.is_empty() {
                return Err(ClientBuildError::CaBundle("no certificate found".into()));
            }
        }
        let opts = opts.clone();
        Self::over(management_url, Transport::Simulated { network, opts })
    }

    /// Reports every call to `observer`.
    pub fn with_observer(mut self, observer: std::sync::Arc<dyn CallObserver>) -> Self {
        self.observer = Some(observer);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_url_keeps_a_path_prefix_and_adds_one_slash() {
        for (base, want) in [
            (
                "https://nb.example.com",
                "https://nb.example.com/api/instance",
            ),
            (
                "https://nb.example.com/",
                "https://nb.example.com/api/instance",
            ),
            (
                "https://nb.example.com/netbird",
                "https://nb.example.com/netbird/api/instance",
            ),
            (
                "https://nb.example.com/netbird/",
                "https://nb.example.com/netbird/api/instance",
            ),
        ] {
            let c = NetbirdClient::new(base, &ClientOptions::default()).unwrap();
            assert_eq!(c.api.join("instance").unwrap().as_str(), want, "{base}");
        }
    }

    #[test]
    fn refuses_other_schemes_and_bad_ca() {
        assert!(matches!(
            NetbirdClient::new("ftp://x", &ClientOptions::default()),
            Err(ClientBuildError::Scheme(_))
        ));
        let opts = ClientOptions {
            extra_ca_pem: Some(b"not pem".to_vec()),
            ..Default::default()
        };
        assert!(matches!(
            NetbirdClient::new("https://x", &opts),
            Err(ClientBuildError::CaBundle(_))
        ));
    }
}
