//! HTTP client for the NetBird management API.

use std::time::Duration;

use reqwest::{Method, StatusCode, header};
use secrecy::{ExposeSecret, SecretString};
use serde::{Serialize, de::DeserializeOwned};
use url::Url;

use super::error::{Endpoint, NetbirdError, TransportKind};
use super::pat;
use super::types::*;

/// Answers larger than this are refused: every NetBird answer the operator reads is a few KiB.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How the client connects to the management server.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    /// Whole-request timeout. The first version check can take ~10 s on a server without internet.
    pub request_timeout: Duration,
    /// Extra PEM roots (spec.tls.caSecretRef).
    pub extra_ca_pem: Option<Vec<u8>>,
    /// spec.tls.insecureSkipVerify.
    pub insecure_skip_verify: bool,
    /// The egress proxy. The default is none: the operator's binary reads it from its environment
    /// ([`ProxySettings::from_env`]); a library user or a test passes it explicitly, so the
    /// environment of a test run never reroutes calls made in-process.
    pub proxy: ProxySettings,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            extra_ca_pem: None,
            insecure_skip_verify: false,
            proxy: ProxySettings::default(),
        }
    }
}

/// The egress proxy for calls to NetBird, as `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY` (or their
/// lower-case spellings) give it: https:// servers through `https`, http:// servers through
/// `http`, and the hosts `no_proxy` names directly (comma-separated host names, domains matching
/// their subdomains, IP addresses, CIDRs; `*` for all).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ProxySettings {
    pub https: Option<String>,
    pub http: Option<String>,
    pub no_proxy: Option<String>,
}

impl std::fmt::Debug for ProxySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl ProxySettings {
    /// From the process environment: upper-case names first, then lower-case ones.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// From a lookup of environment variables (tests pass their own).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let var = |names: [&str; 2]| {
            names
                .iter()
                .filter_map(|n| get(n))
                .map(|v| v.trim().to_string())
                .find(|v| !v.is_empty())
        };
        Self {
            https: var(["HTTPS_PROXY", "https_proxy"]),
            http: var(["HTTP_PROXY", "http_proxy"]),
            no_proxy: var(["NO_PROXY", "no_proxy"]),
        }
    }

    /// Whether any proxy is set.
    pub fn is_set(&self) -> bool {
        self.https.is_some() || self.http.is_some()
    }

    /// Where calls go, for a log line: the proxies without any user:password.
    pub fn describe(&self) -> String {
        let shown = |v: &Option<String>| v.as_deref().map_or("none".to_string(), redact_proxy);
        format!(
            "HTTPS_PROXY={} HTTP_PROXY={} NO_PROXY={}",
            shown(&self.https),
            shown(&self.http),
            self.no_proxy.as_deref().unwrap_or("none")
        )
    }

    /// Checks that the proxies are URLs a client can use (at start-up, before any call).
    pub fn check(&self) -> Result<(), ClientBuildError> {
        self.apply(reqwest::Client::builder()).map(|_| ())
    }

    fn apply(
        &self,
        builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, ClientBuildError> {
        // never the system's proxies, read behind the operator's back: these only
        let mut builder = builder.no_proxy();
        let no_proxy = || {
            self.no_proxy
                .as_deref()
                .and_then(reqwest::NoProxy::from_string)
        };
        let bad = |var: &str, url: &str| {
            ClientBuildError::Proxy(format!("{var} {} is not a proxy URL", redact_proxy(url)))
        };
        if let Some(url) = &self.https {
            let proxy = reqwest::Proxy::https(url).map_err(|_| bad("HTTPS_PROXY", url))?;
            builder = builder.proxy(proxy.no_proxy(no_proxy()));
        }
        if let Some(url) = &self.http {
            let proxy = reqwest::Proxy::http(url).map_err(|_| bad("HTTP_PROXY", url))?;
            builder = builder.proxy(proxy.no_proxy(no_proxy()));
        }
        Ok(builder)
    }
}

/// A proxy URL without its user:password (for logs and errors).
fn redact_proxy(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.as_str().trim_end_matches('/').to_string()
        }
        Err(_) => "(not a URL)".into(),
    }
}

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

    /// `GET /api/users/current`: the token's user; the cheapest way to verify a token.
    pub async fn current_user(&self, token: &SecretString) -> Result<User, NetbirdError> {
        self.call(
            Endpoint::CurrentUser,
            Method::GET,
            "users/current",
            Some(token),
            None::<&()>,
        )
        .await
    }

    /// `GET /api/users/{id}/tokens` (the server answers `null` for none).
    pub async fn list_tokens(
        &self,
        token: &SecretString,
        user_id: &str,
    ) -> Result<Vec<PersonalAccessToken>, NetbirdError> {
        self.list_tokens_dated(token, user_id)
            .await
            .map(|(list, _)| list)
    }

    /// `GET /api/users/{id}/tokens`, with the server's time of the answer (its `Date` header): a
    /// token's `last_used` is compared with the server's own clock, never the operator's.
    pub async fn list_tokens_dated(
        &self,
        token: &SecretString,
        user_id: &str,
    ) -> Result<(Vec<PersonalAccessToken>, Option<jiff::Timestamp>), NetbirdError> {
        let path = format!("users/{}/tokens", segment(user_id));
        let (list, date): (Option<Vec<PersonalAccessToken>>, _) = self
            .call_dated(
                Endpoint::ListTokens,
                Method::GET,
                &path,
                Some(token),
                None::<&()>,
            )
            .await?;
        Ok((list.unwrap_or_default(), date))
    }

    /// `POST /api/users/{id}/tokens`.
    pub async fn create_token(
        &self,
        token: &SecretString,
        user_id: &str,
        req: &CreateTokenRequest,
    ) -> Result<CreatedToken, NetbirdError> {
        let path = format!("users/{}/tokens", segment(user_id));
        self.call(
            Endpoint::CreateToken,
            Method::POST,
            &path,
            Some(token),
            Some(req),
        )
        .await
    }

    /// `GET /api/users?service_user=true`: the account's service users.
    pub async fn list_service_users(
        &self,
        token: &SecretString,
    ) -> Result<Vec<User>, NetbirdError> {
        let users: Option<Vec<User>> = self
            .call(
                Endpoint::ListUsers,
                Method::GET,
                "users?service_user=true",
                Some(token),
                None::<&()>,
            )
            .await?;
        Ok(users
            .unwrap_or_default()
            .into_iter()
            .filter(|u| u.is_service_user)
            .collect())
    }

    /// `POST /api/users`: a service user with the admin role.
    pub async fn create_service_user(
        &self,
        token: &SecretString,
        name: &str,
    ) -> Result<User, NetbirdError> {
        let body = serde_json::json!({
            "name": name,
            "role": "admin",
            "auto_groups": [],
            "is_service_user": true,
        });
        self.call(
            Endpoint::CreateUser,
            Method::POST,
            "users",
            Some(token),
            Some(&body),
        )
        .await
    }

    /// `DELETE /api/users/{id}/tokens/{tokenId}`.
    pub async fn delete_token(
        &self,
        token: &SecretString,
        user_id: &str,
        token_id: &str,
    ) -> Result<(), NetbirdError> {
        let path = format!("users/{}/tokens/{}", segment(user_id), segment(token_id));
        let _: serde_json::Value = self
            .call(
                Endpoint::DeleteToken,
                Method::DELETE,
                &path,
                Some(token),
                None::<&()>,
            )
            .await?;
        Ok(())
    }

    async fn call<T: DeserializeOwned, B: Serialize>(
        &self,
        endpoint: Endpoint,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<&B>,
    ) -> Result<T, NetbirdError> {
        self.call_dated(endpoint, method, path, token, body)
            .await
            .map(|(value, _)| value)
    }

    /// A call, with the time the server's answer carries (its `Date` header), when it has one.
    async fn call_dated<T: DeserializeOwned, B: Serialize>(
        &self,
        endpoint: Endpoint,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<&B>,
    ) -> Result<(T, Option<jiff::Timestamp>), NetbirdError> {
        let result = self.call_inner(endpoint, method, path, token, body).await;
        if let Some(obs) = &self.observer {
            let status = match &result {
                Ok(_) => Some(200),
                Err(e) => e.status(),
            };
            obs.observe(endpoint, status);
        }
        result
    }

    async fn call_inner<T: DeserializeOwned, B: Serialize>(
        &self,
        endpoint: Endpoint,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<&B>,
    ) -> Result<(T, Option<jiff::Timestamp>), NetbirdError> {
        let url = self.api.join(path).map_err(|e| NetbirdError::Transport {
            endpoint,
            kind: TransportKind::Other,
            detail: format!("cannot build the request URL: {e}"),
        })?;
        let mut auth = None;
        if let Some(token) = token {
            pat::check(token.expose_secret())?;
            let mut value =
                header::HeaderValue::from_str(&format!("Token {}", token.expose_secret()))
                    .map_err(|_| NetbirdError::MalformedToken(pat::PatFormatError::Charset))?;
            value.set_sensitive(true);
            auth = Some(value);
        }
        let body = match body {
            Some(b) => Some(serde_json::to_vec(b).map_err(|e| NetbirdError::Transport {
                endpoint,
                kind: TransportKind::Other,
                detail: format!("cannot encode the request: {e}"),
            })?),
            None => None,
        };
        let (status, request_id, location, date, buf) = match &self.http {
            Transport::Http(http) => {
                let mut req = http
                    .request(method, url)
                    .header(header::ACCEPT, "application/json");
                if let Some(value) = auth {
                    req = req.header(header::AUTHORIZATION, value);
                }
                if let Some(body) = body {
                    req = req
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(body);
                }
                let mut resp = req
                    .send()
                    .await
                    .map_err(|e| transport_error(endpoint, &e))?;
                let status = resp.status();
                let header = |name| {
                    resp.headers()
                        .get(name)
                        .and_then(|v: &header::HeaderValue| v.to_str().ok())
                        .map(str::to_string)
                };
                let (request_id, location) = (header("x-request-id"), header("location"));
                let date = header("date");
                let mut buf = Vec::new();
                if !status.is_redirection() {
                    while let Some(chunk) = resp
                        .chunk()
                        .await
                        .map_err(|e| transport_error(endpoint, &e))?
                    {
                        if buf.len() + chunk.len() > MAX_BODY_BYTES {
                            return Err(NetbirdError::TooLarge {
                                endpoint,
                                limit: MAX_BODY_BYTES,
                            });
                        }
                        buf.extend_from_slice(&chunk);
                    }
                }
                (status, request_id, location, date, buf)
            }
            Transport::Simulated { network, opts } => {
                let mut headers = vec![("accept".to_string(), "application/json".to_string())];
                if let Some(value) = auth {
                    let value = value.to_str().unwrap_or_default().to_string();
                    headers.push(("authorization".into(), value));
                }
                if body.is_some() {
                    headers.push(("content-type".into(), "application/json".into()));
                }
                let resp = network
                    .send(SimRequest {
                        method: method.to_string(),
                        url: url.to_string(),
                        headers,
                        body: body.unwrap_or_default(),
                        insecure_skip_verify: opts.insecure_skip_verify,
                        extra_ca_pem: opts.extra_ca_pem.clone(),
                        request_timeout: opts.request_timeout,
                    })
                    .await
                    .map_err(|kind| NetbirdError::Transport {
                        endpoint,
                        kind,
                        detail: "simulated network failure".into(),
                    })?;
                let header = |name: &str| {
                    resp.headers
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| v.clone())
                };
                let (request_id, location) = (header("x-request-id"), header("location"));
                let date = header("date");
                if resp.body.len() > MAX_BODY_BYTES {
                    return Err(NetbirdError::TooLarge {
                        endpoint,
                        limit: MAX_BODY_BYTES,
                    });
                }
                let status =
                    StatusCode::from_u16(resp.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                (status, request_id, location, date, resp.body)
            }
        };
        let request_id = request_id.map(|s| s.chars().take(128).collect::<String>());

        if status.is_redirection() {
            let location = location
                .as_deref()
                .map(redact_url)
                .unwrap_or_else(|| "(no location)".into());
            return Err(NetbirdError::Redirect {
                endpoint,
                status: status.as_u16(),
                location,
            });
        }

        if !status.is_success() {
            return Err(api_error(endpoint, status, &buf, request_id));
        }
        let value = serde_json::from_slice(&buf).map_err(|e| NetbirdError::Decode {
            endpoint,
            status: status.as_u16(),
            detail: decode_detail(&e),
            request_id,
        })?;
        Ok((value, date.as_deref().and_then(http_date)))
    }
}

/// An HTTP `Date` header (`Fri, 04 Dec 2026 12:25:43 GMT`, RFC 9110's IMF-fixdate, a form of RFC
/// 2822 that jiff reads), as a timestamp.
fn http_date(value: &str) -> Option<jiff::Timestamp> {
    jiff::fmt::rfc2822::parse(value).ok().map(|z| z.timestamp())
}

/// What a decode error says, without any part of the body: serde's own message quotes the value it
/// could not take (`invalid type: string "..."`), and a server's answer may hold anything, a token
/// included. Only the kind of failure, the position, and a missing field's name (one of the
/// operator's own types) are kept.
fn decode_detail(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Syntax => "not valid JSON".to_string(),
        Category::Eof => "the JSON ends early".to_string(),
        Category::Io => "the body could not be read".to_string(),
        Category::Data => {
            let text = e.to_string();
            match text
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split_once('`'))
                .map(|(field, _)| field)
                .filter(|f| f.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
            {
                Some(field) => format!("the field {field} is missing"),
                None => "a value has another type or shape than NetBird's".to_string(),
            }
        }
    };
    format!("{what}, at line {} column {}", e.line(), e.column())
}

/// An error answer: NetBird's JSON message, or a short excerpt of a non-JSON body.
fn api_error(
    endpoint: Endpoint,
    status: StatusCode,
    body: &[u8],
    request_id: Option<String>,
) -> NetbirdError {
    let parsed = serde_json::from_slice::<ErrorBody>(body);
    let from_netbird = parsed.as_ref().is_ok_and(|b| b.code == status.as_u16());
    let message = match parsed {
        Ok(b) => b.message,
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text: String = text
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect::<String>()
                .trim()
                .to_string();
            if text.is_empty() {
                status
                    .canonical_reason()
                    .unwrap_or("no message")
                    .to_lowercase()
            } else {
                text
            }
        }
    };
    NetbirdError::Api {
        endpoint,
        status: status.as_u16(),
        message: scrub(&message),
        request_id,
        from_netbird,
    }
}

/// A server message as the operator keeps it: at most 200 characters, and long opaque words (a
/// token's hash in "invalid token: pat: <hash> not found") replaced, so no function of a token
/// reaches a condition, an Event or a log line.
fn scrub(message: &str) -> String {
    let opaque = |w: &str| {
        w.len() >= 24
            && w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=_-".contains(&b))
            && w.bytes().any(|b| b.is_ascii_digit())
    };
    message
        .split(' ')
        .map(|w| if opaque(w) { "[redacted]" } else { w })
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect()
}

/// A path segment with everything but unreserved characters percent-encoded.
fn segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A URL with any user:password removed (for error messages).
/// A redirect target as reported: its origin only (no credentials, path or query, which an SSO
/// gateway makes new on every answer); a relative target without its query.
fn redact_url(s: &str) -> String {
    match Url::parse(s) {
        Ok(u) if u.origin().is_tuple() => u.origin().ascii_serialization(),
        Ok(u) => format!("{}:", u.scheme()),
        Err(_) => s
            .split(['?', '#'])
            .next()
            .unwrap_or_default()
            .chars()
            .take(200)
            .filter(|c| !c.is_control())
            .collect(),
    }
}

fn transport_error(endpoint: Endpoint, e: &reqwest::Error) -> NetbirdError {
    let chain = error_chain(e);
    let lower = chain.to_lowercase();
    let kind = if e.is_timeout() || lower.contains("timed out") {
        TransportKind::Timeout
    } else if lower.contains("dns error")
        || lower.contains("failed to lookup")
        || lower.contains("name or service not known")
    {
        TransportKind::Dns
    } else if has_source::<rustls::Error>(e)
        || [
            "certificate",
            "tls",
            "handshake",
            "corrupt message",
            "peer is incompatible",
            "peer misbehaved",
            "alert",
        ]
        .iter()
        .any(|w| lower.contains(w))
    {
        TransportKind::Tls
    } else if e.is_connect() {
        TransportKind::Connect
    } else {
        TransportKind::Other
    };
    NetbirdError::Transport {
        endpoint,
        kind,
        detail: chain,
    }
}

fn has_source<E: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<E>() {
            return true;
        }
        // io::Error hides its inner error from source(): look inside
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && inner.is::<E>()
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The messages of an error and its sources, joined, without repeats.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let msg = err.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cur = err.source();
    }
    parts.join(": ")
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

    #[test]
    fn proxies_come_from_either_spelling_of_the_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            ProxySettings::from_lookup(move |k| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            })
        };
        let p = env(&[
            ("HTTPS_PROXY", "http://user:pw@proxy:3128"),
            ("http_proxy", "http://proxy:3129"),
            ("NO_PROXY", " .svc,10.0.0.0/8 "),
        ]);
        assert_eq!(p.https.as_deref(), Some("http://user:pw@proxy:3128"));
        assert_eq!(p.http.as_deref(), Some("http://proxy:3129"));
        assert_eq!(p.no_proxy.as_deref(), Some(".svc,10.0.0.0/8"));
        assert!(p.check().is_ok());
        let shown = p.describe();
        assert!(!shown.contains("pw") && !shown.contains("user"), "{shown}");
        assert!(shown.contains("http://proxy:3128"), "{shown}");
        // upper case wins; empty means unset
        let p = env(&[("HTTP_PROXY", "http://a:1"), ("http_proxy", "http://b:1")]);
        assert_eq!(p.http.as_deref(), Some("http://a:1"));
        assert!(!env(&[("HTTPS_PROXY", " ")]).is_set());
        // a proxy that is not a URL is refused, without echoing it
        let e = env(&[("HTTPS_PROXY", "::not a url::secret")])
            .check()
            .unwrap_err()
            .to_string();
        assert!(e.contains("HTTPS_PROXY") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn redirect_location_is_its_origin_only() {
        assert_eq!(
            redact_url("https://u:p@evil.example/x"),
            "https://evil.example"
        );
        assert_eq!(
            redact_url("https://sso.example:8443/oauth2/start?rd=%2F&state=4f9a"),
            "https://sso.example:8443"
        );
    }

    #[test]
    fn server_messages_lose_token_hashes() {
        assert_eq!(
            scrub("invalid token: pat: jqethtqbbwixwx67ozgcwf1huu5pcsl1eztseukpkoq= not found"),
            "invalid token: pat: [redacted] not found"
        );
        assert_eq!(scrub("setup already completed"), "setup already completed");
        assert_eq!(scrub(&"x".repeat(500)).len(), 200);
    }

    #[test]
    fn decode_errors_quote_nothing_of_the_body() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct T {
            id: u64,
            kind: K,
        }
        #[derive(Debug, serde::Deserialize)]
        enum K {
            A,
        }
        for (body, want) in [
            (r#"{"id": "nbp_echoed_value", "kind": "A"}"#, "another type"),
            (r#"{"id": 1, "kind": "nbp_echoed_value"}"#, "another type"),
            (r#"{"kind": "A"}"#, "the field id is missing"),
            (r#"{"id": 1, "nbp_echoed_value"#, "ends early"),
            ("nbp_echoed_value", "not valid JSON"),
        ] {
            let e = serde_json::from_str::<T>(body).unwrap_err();
            let d = decode_detail(&e);
            assert!(d.contains(want), "{body}: {d}");
            assert!(!d.contains("echoed"), "{body}: {d}");
        }
    }

    #[test]
    fn user_ids_are_escaped_in_paths() {
        assert_eq!(segment("a/b?c"), "a%2Fb%3Fc");
    }
}
