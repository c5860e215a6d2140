//! An in-process fake of the NetBird management API, written from `shared/netbird-api.md`: the same
//! status codes, messages, order of checks and PAT format as the real server, plus faults the real
//! server cannot produce on demand.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use netbird_operator::netbird::pat;
use serde_json::{Value, json};

/// A fault injected for one endpoint.
#[derive(Clone, Debug)]
pub enum Fault {
    /// An error status with NetBird's JSON body.
    Status(u16, &'static str),
    /// A body that is not JSON, with this status.
    NonJson(u16),
    /// A redirect to this location.
    Redirect(&'static str),
    /// A redirect to this location with a query that is new on every answer (an SSO gateway's
    /// `?rd=...&state=...`).
    RedirectWithState(&'static str),
    /// A body larger than the client accepts.
    Huge,
    /// Accept the request and never answer.
    Hang,
    /// Answer normally after a delay.
    Delay(Duration),
    /// Close the connection without an answer.
    Close,
    /// Do the work, then close the connection: the caller never learns the outcome.
    ServeThenClose,
    /// A fixed JSON answer with this status (a stale cache in front of the server, say).
    Json(u16, &'static str),
}

/// The fake's state, shared with the test.
#[derive(Debug)]
pub struct State {
    pub setup_required: bool,
    /// NB_SETUP_PAT_ENABLED=true
    pub pat_enabled: bool,
    /// token -> user id
    pub tokens: HashMap<String, String>,
    /// user id -> email
    pub users: HashMap<String, String>,
    /// service user id -> name
    pub service_users: HashMap<String, String>,
    /// token -> (id, name, created, expires)
    pub pats: HashMap<String, (String, String, jiff::Timestamp, jiff::Timestamp)>,
    /// token -> when a request last authenticated with it (NetBird's `last_used`)
    pub last_used: HashMap<String, jiff::Timestamp>,
    /// calls per endpoint name
    pub calls: HashMap<String, u32>,
    /// faults per endpoint name (instance, setup, version, users_current, tokens_list, ...)
    pub faults: HashMap<String, Fault>,
    pub version: &'static str,
    pub available: Option<&'static str>,
    /// setup calls that succeeded (200)
    pub setups_ok: u32,
    /// Every Authorization header value received, in order (a hostile server keeps what it is
    /// sent: tests read this to prove a token never reached it).
    pub authorizations: Vec<String>,
    /// Every setup request body received (to prove a password never reached a server).
    pub setup_bodies: Vec<String>,
    /// Answer setup and token creation with a token whose checksum is wrong (a broken or hostile
    /// server).
    pub malformed_tokens: bool,
    /// Answer 500 to the users endpoints when the caller is a service user (a new service user's
    /// token that cannot be verified yet).
    pub service_user_calls_fail: bool,
    counter: u64,
}

impl Default for State {
    fn default() -> Self {
        State {
            setup_required: true,
            pat_enabled: true,
            tokens: HashMap::new(),
            users: HashMap::new(),
            pats: HashMap::new(),
            last_used: HashMap::new(),
            service_users: HashMap::new(),
            calls: HashMap::new(),
            faults: HashMap::new(),
            version: "0.77.1",
            available: Some("0.78.0"),
            setups_ok: 0,
            authorizations: Vec::new(),
            setup_bodies: Vec::new(),
            malformed_tokens: false,
            service_user_calls_fail: false,
            counter: 0,
        }
    }
}

impl State {
    pub fn calls(&self, endpoint: &str) -> u32 {
        self.calls.get(endpoint).copied().unwrap_or(0)
    }

    fn next_id(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    /// Mints a well-formed PAT for `user`, valid for `days`, with a name.
    pub fn mint_named(&mut self, user: &str, name: &str, days: i64) -> String {
        let t = self.mint(user);
        let id = format!("pat{}", self.next_id());
        let now = jiff::Timestamp::now();
        let expires = now
            .checked_add(jiff::SignedDuration::from_hours(24 * days))
            .unwrap();
        self.pats
            .insert(t.clone(), (id, name.to_string(), now, expires));
        t
    }

    /// Tokens a user holds on the server.
    pub fn tokens_of(&self, user: &str) -> Vec<String> {
        self.tokens
            .iter()
            .filter(|(_, u)| *u == user)
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Mints a well-formed PAT for `user`.
    pub fn mint(&mut self, user: &str) -> String {
        let n = self.next_id();
        let secret: String = format!("{n:0>10}{:0>20}", user.len() * 7919 + n as usize)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { 'x' })
            .take(30)
            .collect();
        let t = pat::from_secret(&secret);
        self.tokens.insert(t.clone(), user.to_string());
        t
    }
}

/// The fake server, listening on 127.0.0.1 until dropped.
pub struct FakeNetbird {
    pub url: String,
    pub state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for FakeNetbird {
    fn drop(&mut self) {
        self.task.abort();
        self.stop.cancel();
    }
}

impl FakeNetbird {
    pub async fn start() -> FakeNetbird {
        Self::start_with(None).await
    }

    /// The fake behind TLS with a certificate for `names`, signed by a CA it returns as PEM.
    pub async fn start_tls(names: &[&str]) -> (FakeNetbird, String) {
        netbird_operator::tls::install_crypto_provider();
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fake-netbird-ca");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        let cert = params.signed_by(&key, &issuer).expect("cert");
        let config = tokio_rustls::rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("tls config");
        let fake = Self::start_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await;
        (fake, ca_cert.pem())
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> FakeNetbird {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let stop = tokio_util::sync::CancellationToken::new();
        let stop_conns = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                let tls = tls.clone();
                // open connections end with the server: a client's pooled connection must not keep
                // a "gone" server answering
                let stop = stop_conns.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let http = hyper::server::conn::http1::Builder::new();
                    let serve = async {
                        match tls {
                            Some(acceptor) => {
                                if let Ok(stream) = acceptor.accept(stream).await {
                                    let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                                }
                            }
                            None => {
                                let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                    };
                    tokio::select! {
                        _ = serve => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        FakeNetbird {
            url,
            state,
            task,
            stop,
        }
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    pub fn fault(&self, endpoint: &str, fault: Fault) {
        self.state().faults.insert(endpoint.to_string(), fault);
    }

    pub fn clear_fault(&self, endpoint: &str) {
        self.state().faults.remove(endpoint);
    }

    pub fn calls(&self, endpoint: &str) -> u32 {
        self.state().calls(endpoint)
    }
}

type Resp = Response<Full<Bytes>>;

fn reply(status: u16, body: Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r.headers_mut()
        .insert("x-request-id", request_id().parse().unwrap());
    r
}

/// A new request id for every answer, as the real server sends (anything that copies it into a
/// Kubernetes object turns each answer into a write).
fn request_id() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("fake-{:x}-{n}", std::process::id())
}

fn error(status: u16, message: &str) -> Resp {
    reply(status, json!({"message": message, "code": status}))
}

fn endpoint_of(method: &hyper::Method, path: &str) -> Option<&'static str> {
    let p = path.strip_prefix("/api/")?;
    let parts: Vec<&str> = p.split('/').collect();
    Some(match (method.as_str(), parts.as_slice()) {
        ("GET", ["instance"]) => "instance",
        ("POST", ["setup"]) => "setup",
        ("GET", ["instance", "version"]) => "version",
        ("GET", ["users", "current"]) => "users_current",
        ("GET", ["users"]) => "users_list",
        ("POST", ["users"]) => "users_create",
        ("GET", ["users", _, "tokens"]) => "tokens_list",
        ("POST", ["users", _, "tokens"]) => "tokens_create",
        ("DELETE", ["users", _, "tokens", _]) => "tokens_delete",
        _ => return None,
    })
}

async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if let Some(a) = &auth {
        state.lock().unwrap().authorizations.push(a.clone());
    }
    let Some(endpoint) = endpoint_of(&method, &path) else {
        let mut r = Response::new(Full::new(Bytes::from("404 page not found")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return Ok(r);
    };
    let fault = {
        let mut s = state.lock().unwrap();
        *s.calls.entry(endpoint.to_string()).or_default() += 1;
        if endpoint == "setup" {
            s.setup_bodies
                .push(String::from_utf8_lossy(&body).into_owned());
        }
        s.faults.get(endpoint).cloned()
    };
    match fault {
        Some(Fault::Status(code, msg)) => return Ok(error(code, msg)),
        Some(Fault::NonJson(code)) => {
            let mut r = Response::new(Full::new(Bytes::from("<html>bad gateway</html>")));
            *r.status_mut() = StatusCode::from_u16(code).unwrap();
            r.headers_mut()
                .insert("content-type", "text/html".parse().unwrap());
            return Ok(r);
        }
        Some(Fault::Redirect(to)) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::FOUND;
            r.headers_mut().insert("location", to.parse().unwrap());
            return Ok(r);
        }
        Some(Fault::RedirectWithState(to)) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::FOUND;
            let location = format!("{to}?rd=%2Fapi&state={}", request_id());
            r.headers_mut()
                .insert("location", location.parse().unwrap());
            return Ok(r);
        }
        Some(Fault::Huge) => {
            let big = format!(
                "{{\"setup_required\": true, \"pad\": \"{}\"}}",
                "x".repeat(3 * 1024 * 1024)
            );
            return Ok(Response::new(Full::new(Bytes::from(big))));
        }
        Some(Fault::Hang) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Some(Fault::Delay(d)) => {
            // the server does the work, then answers late (or never, if the caller is gone)
            let resp = serve(
                &mut state.lock().unwrap(),
                endpoint,
                &path,
                auth.as_deref(),
                &body,
            );
            tokio::time::sleep(d).await;
            return Ok(resp);
        }
        Some(Fault::Close) => return Ok(panic_free_close()),
        Some(Fault::ServeThenClose) => {
            let _ = serve(
                &mut state.lock().unwrap(),
                endpoint,
                &path,
                auth.as_deref(),
                &body,
            );
            return Ok(panic_free_close());
        }
        Some(Fault::Json(code, body)) => {
            return Ok(reply(
                code,
                serde_json::from_str(body).unwrap_or(Value::Null),
            ));
        }
        None => {}
    }
    let mut s = state.lock().unwrap();
    Ok(serve(&mut s, endpoint, &path, auth.as_deref(), &body))
}

/// A token with one character of its secret part changed: its checksum no longer matches.
fn corrupt(token: &str) -> String {
    let mut chars: Vec<char> = token.chars().collect();
    chars[5] = if chars[5] == 'z' { 'y' } else { 'z' };
    chars.into_iter().collect()
}

/// A response that makes hyper drop the connection: a content-length that the body does not meet.
fn panic_free_close() -> Resp {
    let mut r = Response::new(Full::new(Bytes::from("{")));
    r.headers_mut()
        .insert("content-length", "100".parse().unwrap());
    r
}

/// The user of the request's token, or the error answer (status, message).
fn authenticate<'a>(s: &'a State, auth: Option<&str>) -> Result<&'a String, (u16, &'static str)> {
    let token = auth
        .and_then(|a| {
            a.strip_prefix("Token ")
                .or_else(|| a.strip_prefix("Bearer "))
        })
        .ok_or((401, "no valid authentication provided"))?;
    if pat::check(token).is_err() {
        return Err((401, "token invalid"));
    }
    s.tokens
        .get(token)
        .ok_or((404, "invalid token: pat: hash not found"))
}

fn serve(s: &mut State, endpoint: &str, path: &str, auth: Option<&str>, body: &[u8]) -> Resp {
    // as the real server's auth middleware: a request with a known token marks it used before
    // anything else
    if let Ok(user) = authenticate(s, auth)
        && !user.is_empty()
        && let Some(token) = auth
            .and_then(|a| a.split_once(' '))
            .map(|(_, t)| t.to_string())
    {
        s.last_used.insert(token, jiff::Timestamp::now());
    }
    match endpoint {
        "instance" => reply(200, json!({"setup_required": s.setup_required})),
        "setup" => setup(s, body),
        "version" => match authenticate(s, auth) {
            Err((code, msg)) => error(code, msg),
            Ok(_) => {
                let mut v = json!({
                    "management_current_version": s.version,
                    "management_update_available": s.available.is_some_and(|a| a != s.version),
                });
                if let Some(a) = s.available {
                    v["management_available_version"] = json!(a);
                    v["dashboard_available_version"] = json!("2.10.0");
                }
                reply(200, v)
            }
        },
        "users_current" | "users_list"
            if s.service_user_calls_fail
                && authenticate(s, auth).is_ok_and(|u| s.service_users.contains_key(u)) =>
        {
            error(500, "internal server error")
        }
        "users_current" => match authenticate(s, auth) {
            Err((code, msg)) => error(code, msg),
            Ok(user) => match s.service_users.get(user) {
                // as the real server (v0.77.1): service users may not read "the current user"
                Some(_) => error(403, "permission denied"),
                None => {
                    let email = s.users.get(user).cloned().unwrap_or_default();
                    reply(
                        200,
                        json!({"id": user, "email": email, "name": email, "role": "owner", "is_service_user": false, "status": "active"}),
                    )
                }
            },
        },
        "tokens_list" => match authenticate(s, auth).cloned() {
            Err((code, msg)) => error(code, msg),
            Ok(caller) => {
                let user = path.split('/').nth(3).unwrap_or_default().to_string();
                if user != caller && !s.service_users.contains_key(&user) {
                    return error(403, "permission denied");
                }
                let list: Vec<Value> = s
                    .tokens
                    .iter()
                    .filter(|(_, u)| **u == user)
                    .filter_map(|(t, _)| s.pats.get(t).map(|p| (t, p)))
                    .map(|(t, (id, name, created, expires))| {
                        let mut pat = json!({"id": id, "name": name,
                            "expiration_date": expires.to_string(),
                            "created_by": user, "created_at": created.to_string()});
                        if let Some(used) = s.last_used.get(t) {
                            pat["last_used"] = json!(used.to_string());
                        }
                        pat
                    })
                    .collect();
                reply(
                    200,
                    if list.is_empty() {
                        Value::Null
                    } else {
                        Value::Array(list)
                    },
                )
            }
        },
        "users_list" => match authenticate(s, auth) {
            Err((code, msg)) => error(code, msg),
            Ok(_) => {
                let list: Vec<Value> = s
                    .service_users
                    .iter()
                    .map(|(id, name)| json!({"id": id, "email": "", "name": name, "role": "admin", "is_service_user": true, "status": "active"}))
                    .collect();
                reply(200, Value::Array(list))
            }
        },
        "users_create" => match authenticate(s, auth) {
            Err((code, msg)) => error(code, msg),
            Ok(_) => {
                let Ok(req) = serde_json::from_slice::<Value>(body) else {
                    return error(400, "invalid request body");
                };
                let name = req["name"].as_str().unwrap_or_default().to_string();
                let id = format!("svc{}", s.next_id());
                s.service_users.insert(id.clone(), name.clone());
                reply(
                    200,
                    json!({"id": id, "email": "", "name": name, "role": "admin", "is_service_user": true, "status": "active"}),
                )
            }
        },
        "tokens_create" => match authenticate(s, auth).cloned() {
            Err((code, msg)) => error(code, msg),
            Ok(caller) => {
                // the caller acts on itself, or (owner/admin) on a service user
                let target = path.split('/').nth(3).unwrap_or_default().to_string();
                if target != caller && !s.service_users.contains_key(&target) {
                    return error(403, "permission denied");
                }
                let user = target;
                let Ok(req) = serde_json::from_slice::<Value>(body) else {
                    return error(400, "invalid request body");
                };
                let name = req["name"].as_str().unwrap_or_default().to_string();
                let days = req["expires_in"].as_i64().unwrap_or(0);
                if name.is_empty() {
                    return error(422, "token name can't be empty");
                }
                if !(1..=365).contains(&days) {
                    return error(422, "expiration has to be between 1 and 365");
                }
                let t = s.mint_named(&user, &name, days);
                let (id, name, created, expires) = s.pats[&t].clone();
                let t = if s.malformed_tokens { corrupt(&t) } else { t };
                reply(
                    200,
                    json!({"plain_token": t, "personal_access_token": {
                    "id": id, "name": name, "expiration_date": expires.to_string(),
                    "created_by": user, "created_at": created.to_string()}}),
                )
            }
        },
        "tokens_delete" => match authenticate(s, auth).cloned() {
            Err((code, msg)) => error(code, msg),
            Ok(caller) => {
                let target = path.split('/').nth(3).unwrap_or_default().to_string();
                if target != caller && !s.service_users.contains_key(&target) {
                    return error(403, "permission denied");
                }
                let id = path.rsplit('/').next().unwrap_or_default();
                let Some(t) = s
                    .pats
                    .iter()
                    .find(|(_, (pid, ..))| pid == id)
                    .map(|(t, _)| t.clone())
                else {
                    return error(404, "token not found");
                };
                s.pats.remove(&t);
                s.tokens.remove(&t);
                reply(200, json!({}))
            }
        },
        _ => {
            let _ = path;
            error(500, "internal server error")
        }
    }
}

fn setup(s: &mut State, body: &[u8]) -> Resp {
    // 1. decodable body
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return error(400, "invalid request body");
    };
    if !req.is_object() {
        return error(400, "invalid request body");
    }
    let text = |k: &str| {
        req.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let create_pat = req
        .get("create_pat")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // 2. pat_expire_in, only with the server feature and create_pat
    let expire = req.get("pat_expire_in").and_then(Value::as_i64);
    if s.pat_enabled && create_pat && expire.is_some_and(|d| !(1..=365).contains(&d)) {
        return error(422, "pat_expire_in must be between 1 and 365");
    }
    // 4. validation, before the already-done check
    let (email, name, password) = (text("email"), text("name"), text("password"));
    if email.is_empty() {
        return error(422, "email is required");
    }
    if !email.contains('@') || email.starts_with('@') || email.ends_with('@') {
        return error(422, "invalid email format");
    }
    if name.is_empty() {
        return error(422, "name is required");
    }
    if password.is_empty() {
        return error(422, "password is required");
    }
    if password.len() < 8 {
        return error(422, "password must be at least 8 characters");
    }
    if password.len() > 72 {
        return error(422, "password must be at most 72 characters");
    }
    // 5. already set up
    if !s.setup_required {
        return error(412, "setup already completed");
    }
    s.setup_required = false;
    s.setups_ok += 1;
    let user_id = format!("user{:056}", s.next_id());
    s.users.insert(user_id.clone(), email.clone());
    let mut r = json!({"user_id": user_id, "email": email});
    if s.pat_enabled && create_pat {
        let t = s.mint_named(&user_id, "setup-token", expire.unwrap_or(1));
        r["personal_access_token"] = json!(if s.malformed_tokens { corrupt(&t) } else { t });
    }
    let mut resp = reply(200, r);
    resp.headers_mut()
        .insert("cache-control", "no-store".parse().unwrap());
    resp
}

/// Many fake NetBird servers behind one listener, one per path prefix `/i/<n>` (managementURL may
/// carry a path prefix). For the benchmark's fleet of instances.
pub struct FakeFleet {
    pub base: String,
    pub states: Arc<Vec<Arc<Mutex<State>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeFleet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeFleet {
    pub async fn start(n: usize) -> FakeFleet {
        Self::start_on("127.0.0.1", n).await
    }

    /// The fleet listening on `host` (an address of this machine: the node's host address for
    /// pods to reach it, tests/node_fleet.rs), on a port of its own.
    pub async fn start_on(host: &str, n: usize) -> FakeFleet {
        let listener = tokio::net::TcpListener::bind((host, 0))
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let states: Arc<Vec<_>> = Arc::new(
            (0..n)
                .map(|_| Arc::new(Mutex::new(State::default())))
                .collect(),
        );
        let st = states.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                        let st = st.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let rest = path.strip_prefix("/i/").unwrap_or("");
                            let (idx, tail) = rest.split_once('/').unwrap_or((rest, ""));
                            let Some(state) =
                                idx.parse::<usize>().ok().and_then(|i| st.get(i)).cloned()
                            else {
                                return Ok::<_, Infallible>(error(404, "no such instance"));
                            };
                            let query = req
                                .uri()
                                .query()
                                .map(|q| format!("?{q}"))
                                .unwrap_or_default();
                            *req.uri_mut() = format!("/{tail}{query}").parse().unwrap();
                            handle(state, req).await
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeFleet { base, states, task }
    }

    pub fn url(&self, i: usize) -> String {
        format!("{}/i/{i}", self.base)
    }

    /// Calls made to all servers of the fleet.
    pub fn total_calls(&self) -> u32 {
        self.states
            .iter()
            .map(|s| s.lock().unwrap().calls.values().sum::<u32>())
            .sum()
    }
}
