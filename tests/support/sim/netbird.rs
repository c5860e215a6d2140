//! NetBird management servers in memory, answering at the HTTP level as the real one does
//! (shared/netbird-api.md): users, an owner, service users, tokens with names, expiry and
//! last_used, the setup state; JSON error bodies with X-Request-Id; a reverse proxy's plain-text
//! 404 for a wrong path prefix; faults injected per call, including "handled, but no answer".
//! It records what the invariants need: who sent which token where, with which trust, and every
//! password received.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use netbird_operator::netbird::{SimRequest, SimResponse, SimulatedNetwork, TransportKind, pat};
use serde_json::{Value, json};

use super::Calls;

/// What the next call to a server gets instead of its normal answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Fault {
    /// NetBird's JSON error with this status (401, 404, 412, 422, 429, 500).
    Status(u16),
    /// A reverse proxy's plain-text 404 page.
    ProxyNotFound,
    /// No answer in time; the server did nothing.
    Timeout,
    /// The server did the work, but the answer never arrived.
    NoAnswer,
    /// Connection refused.
    Refused,
    /// A 200 whose JSON has another shape than NetBird's: [`CANARY`] where NetBird has a bool, a
    /// date or an object (a server of another version, or something in front of it answering for
    /// it; the work is not done). What the operator makes of the answer must never quote it
    /// (shared/netbird-api.md: a server's answer may hold anything, a token included). Calls
    /// whose answer the operator does not decode (setup, a DELETE) are answered as usual.
    WrongShape,
}

/// The value a [`Fault::WrongShape`] answer carries: it must never show up in a status, an Event,
/// a Secret or a log line.
pub const CANARY: &str = "nbcanary-0f3a9e5d";

/// How long a token a lagging server issued stays unknown to it (see [`Server::lag`]).
pub const LAG_SECONDS: i64 = 5;

/// How a server is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Mode {
    /// The embedded IdP with NB_SETUP_PAT_ENABLED=true.
    Normal,
    /// Setup answers 200 without a token.
    NoPat,
    /// Local users disabled: setup answers 500 every time.
    LocalUsersDisabled,
    /// An external IdP: setup_required is false from the start.
    ExternalIdp,
}

#[derive(Clone, Debug)]
pub struct User {
    pub id: String,
    pub email: String,
    pub name: String,
    pub role: String,
    pub service: bool,
}

#[derive(Clone, Debug)]
pub struct Token {
    pub id: String,
    pub user: String,
    pub name: String,
    pub plain: String,
    pub created_at: jiff::Timestamp,
    pub expires_at: jiff::Timestamp,
    pub last_used: Option<jiff::Timestamp>,
    /// Made by a person in the dashboard.
    pub by_hand: bool,
    /// Until then the server does not find it (a lagging replica, see [`Server::lag`]).
    pub visible_at: jiff::Timestamp,
}

/// A token a server issued to the operator (setup or token creation).
#[derive(Clone, Debug)]
pub struct Issued {
    pub server: usize,
    pub plain: String,
    pub delivered: bool,
    /// The instance (namespace, name) whose pass asked for it.
    pub instance: Option<(String, String)>,
}

pub struct Server {
    pub host: String,
    /// The path the API is under ("" or "/prefix").
    pub prefix: String,
    pub mode: Mode,
    pub setup_required: bool,
    /// The operator performed this server's setup (since the last wipe).
    pub set_up_by_operator: bool,
    /// GET /api/instance answered since that setup.
    pub checked_since_setup: bool,
    pub users: Vec<User>,
    pub tokens: Vec<Token>,
    /// Whether the version answer tells the latest release.
    pub tells_latest: bool,
    pub faults: VecDeque<Fault>,
    /// Passwords received in setup calls.
    pub passwords: Vec<String>,
    /// Setup calls answered 500 since the spec, the credentials or the process last changed, by
    /// the instance (namespace/name) whose pass called.
    pub setup_500s: std::collections::HashMap<String, u32>,
    /// A replicated deployment (several management replicas on one database, reads from a replica
    /// or a cache that catches up a moment later): a token it issues is not found by the requests
    /// of its first [`LAG_SECONDS`] seconds, which answer as for a token that does not exist (404
    /// `invalid token: pat: <hash> not found`, shared/netbird-api.md), and is not in token
    /// listings until then. A single NetBird on its own database does not lag; the operator must
    /// not count on that (a new token is verified before the one it replaces is deleted).
    pub lag: bool,
}

/// What the world checks at the moment of a call (it knows the Kubernetes side).
pub enum Check<'a> {
    /// A token deleted on a server: the token as it was (its `last_used` included), and the
    /// server's tokens left.
    Delete {
        plain: &'a str,
        token: &'a Token,
        left: &'a [Token],
    },
    /// `GET /api/users/{id}/tokens` arrived (before any fault), authenticated with `plain`; the
    /// server's tokens as they are then.
    List { plain: &'a str, tokens: &'a [Token] },
    /// A password sent to `url`.
    Password { url: &'a str, password: &'a str },
}

/// The instance (namespace, name) whose pass runs, shared with the world that sets it.
pub type Caller = std::sync::Arc<std::sync::Mutex<Option<(String, String)>>>;

type Checker = Box<dyn Fn(Check<'_>) -> Vec<String> + Send + Sync>;

pub struct NetbirdState {
    pub servers: Vec<Server>,
    pub next: u64,
    pub issued: Vec<Issued>,
    /// Where each token was first sent with (insecure_skip_verify): its trust binding.
    pub first_trust: Vec<(String, bool)>,
    /// Tokens put in by hand, and the server each was first sent to: its home as the contract
    /// defines it ("the managementURL it was issued by or first verified against"; the operator
    /// cannot know which dashboard a person made it in).
    pub hand_homes: Vec<(String, usize)>,
    /// The instance (namespace, name) whose pass runs, as the world sets it.
    pub caller: Option<Caller>,
    pub violations: Vec<String>,
    /// Calls answered (for the quiet-world check).
    pub calls: u64,
    /// Valid tokens a fault answered 401 or 404 for (NetBird would not have): what the operator
    /// concluded about them rests on a lie.
    pub lied_about: Vec<String>,
    /// Each version answer: whether it told the latest release.
    pub version_answers: Vec<bool>,
    /// Each call's answer: its status, or None (no answer: refused, timed out, lost).
    pub answers: Vec<Option<u16>>,
    pub checker: Option<Checker>,
    pub now: Arc<dyn Fn() -> jiff::Timestamp + Send + Sync>,
}

pub type Shared = Arc<Mutex<NetbirdState>>;

fn json_error(code: u16, message: &str) -> (u16, Value) {
    (code, json!({"message": message, "code": code}))
}

impl Server {
    pub fn new(host: &str, prefix: &str) -> Self {
        Server {
            host: host.into(),
            prefix: prefix.into(),
            mode: Mode::Normal,
            setup_required: true,
            set_up_by_operator: false,
            checked_since_setup: false,
            users: Vec::new(),
            tokens: Vec::new(),
            tells_latest: true,
            faults: VecDeque::new(),
            passwords: Vec::new(),
            setup_500s: Default::default(),
            lag: false,
        }
    }

    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
        if self.users.is_empty() {
            self.setup_required = mode != Mode::ExternalIdp;
        }
    }

    /// A wiped server: a new database.
    pub fn wipe(&mut self) {
        self.users.clear();
        self.tokens.clear();
        self.set_up_by_operator = false;
        self.setup_required = self.mode != Mode::ExternalIdp;
    }
}

fn token_json(t: &Token) -> Value {
    let mut v = json!({"id": t.id, "name": t.name, "expiration_date": t.expires_at.to_string(),
        "created_by": t.user, "created_at": t.created_at.to_string()});
    if let Some(u) = t.last_used {
        v["last_used"] = json!(u.to_string());
    }
    v
}

fn user_json(u: &User) -> Value {
    json!({"id": u.id, "email": u.email, "name": u.name, "role": u.role,
        "is_service_user": u.service, "status": "active", "permissions": {}})
}

impl NetbirdState {
    pub fn new(now: Arc<dyn Fn() -> jiff::Timestamp + Send + Sync>) -> Self {
        NetbirdState {
            servers: Vec::new(),
            next: 0,
            issued: Vec::new(),
            first_trust: Vec::new(),
            hand_homes: Vec::new(),
            caller: None,
            violations: Vec::new(),
            calls: 0,
            version_answers: Vec::new(),
            answers: Vec::new(),
            lied_about: Vec::new(),
            checker: None,
            now,
        }
    }

    fn id(&mut self, what: &str) -> String {
        self.next += 1;
        format!("{what}{}", self.next)
    }

    /// A new well-formed token on server `s` for `user`.
    pub fn mint(&mut self, s: usize, user: &str, name: &str, days: i64, by_hand: bool) -> Token {
        self.next += 1;
        let plain = pat::from_secret(&format!("s{s}{:0>28}", self.next));
        let now = (self.now)();
        let lag = if self.servers[s].lag {
            jiff::SignedDuration::from_secs(LAG_SECONDS)
        } else {
            jiff::SignedDuration::ZERO
        };
        let t = Token {
            id: format!("tok{}", self.next),
            user: user.into(),
            name: name.into(),
            plain,
            created_at: now,
            expires_at: now + jiff::SignedDuration::from_hours(24 * days),
            last_used: None,
            by_hand,
            visible_at: now + lag,
        };
        self.servers[s].tokens.push(t.clone());
        t
    }

    /// The server whose host the URL names, and the path after its prefix (None: the proxy's).
    fn route(&self, url: &str) -> Option<(usize, Option<String>)> {
        let u = url::Url::parse(url).ok()?;
        let host = u.host_str()?;
        let s = self.servers.iter().position(|s| s.host == host)?;
        let prefix = format!("{}/api/", self.servers[s].prefix);
        let rest = u.path().strip_prefix(&prefix).map(|p| match u.query() {
            Some(q) => format!("{p}?{q}"),
            None => p.to_string(),
        });
        Some((s, rest))
    }

    /// Answers one request; also returns whether the fault asks for no answer after the work.
    fn handle(&mut self, req: &SimRequest) -> Result<(u16, Value, bool), TransportKind> {
        let Some((s, path)) = self.route(&req.url) else {
            return Err(TransportKind::Dns);
        };
        self.calls += 1;
        let token = req
            .headers
            .iter()
            .find(|(n, _)| n == "authorization")
            .and_then(|(_, v)| {
                v.strip_prefix("Token ")
                    .or_else(|| v.strip_prefix("Bearer "))
            })
            .map(str::to_string);
        // a listing of a user's tokens, as it arrives (a fault's answer included): the operator's
        // look at a replaced token's use is one
        if req.method == "GET"
            && let Some(p) = &path
            && let ["users", _, "tokens"] = p
                .split('?')
                .next()
                .unwrap_or("")
                .split('/')
                .collect::<Vec<_>>()[..]
            && let (Some(check), Some(plain)) = (&self.checker, &token)
        {
            let v = check(Check::List {
                plain,
                tokens: &self.servers[s].tokens,
            });
            self.violations.extend(v);
        }
        let mut no_answer = false;
        let mut wrong_shape = false;
        match self.servers[s].faults.pop_front() {
            Some(Fault::Timeout) => return Err(TransportKind::Timeout),
            Some(Fault::Refused) => return Err(TransportKind::Connect),
            Some(Fault::ProxyNotFound) => return Ok((404, Value::Null, false)),
            Some(Fault::Status(code)) => {
                if matches!(code, 401 | 404)
                    && let Some((_, v)) = req.headers.iter().find(|(n, _)| n == "authorization")
                {
                    let plain = v.trim_start_matches("Token ").to_string();
                    self.lied_about.push(plain);
                }
                let msg = match code {
                    401 => "token invalid",
                    404 => "not found",
                    412 => "setup already completed",
                    422 => "invalid argument",
                    429 => "too many requests",
                    _ => "internal server error",
                };
                return Ok((code, json_error(code, msg).1, false));
            }
            Some(Fault::NoAnswer) => no_answer = true,
            Some(Fault::WrongShape) => wrong_shape = true,
            None => {}
        }
        let Some(path) = path else {
            // a reverse proxy in front: the wrong prefix is its plain page
            return Ok((404, Value::Null, no_answer));
        };
        if let Some(t) = &token {
            // a DELETE of the token itself (how a replaced token of the service-user exchange
            // is deleted)
            let target = match path.split('/').collect::<Vec<_>>()[..] {
                ["users", _, "tokens", id] if req.method == "DELETE" => Some(id),
                _ => None,
            };
            self.check_token_travel(s, t, req.insecure_skip_verify, target);
        }
        if wrong_shape && let Some(answer) = wrong_shape_answer(&req.method, &path) {
            return Ok((200, answer, no_answer));
        }
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let (code, value) = self.api(s, &req.method, &path, token.as_deref(), &body, &req.url);
        Ok((code, value, no_answer))
    }

    /// A consumer of a token Secret (not the operator) makes a request with `plain` to the server
    /// that knows it, `GET /api/users/current`, straight to the handler (no fault, not counted
    /// among the operator's calls); returns the answer's status, None when no server knows it.
    pub fn consume(&mut self, plain: &str) -> Option<u16> {
        let s = self
            .servers
            .iter()
            .position(|srv| srv.tokens.iter().any(|t| t.plain == plain))?;
        let url = format!(
            "https://{}{}/api/users/current",
            self.servers[s].host, self.servers[s].prefix
        );
        Some(
            self.api(s, "GET", "users/current", Some(plain), &Value::Null, &url)
                .0,
        )
    }

    /// Invariant 3: a token only to the server that issued it, never with weaker trust.
    fn check_token_travel(&mut self, s: usize, plain: &str, insecure: bool, deleted: Option<&str>) {
        let home = self
            .servers
            .iter()
            .position(|srv| srv.tokens.iter().any(|t| t.plain == plain))
            .or_else(|| {
                self.issued
                    .iter()
                    .find(|i| i.plain == plain)
                    .map(|i| i.server)
            });
        let by_hand = home.is_some_and(|h| {
            self.servers[h]
                .tokens
                .iter()
                .any(|t| t.plain == plain && t.by_hand)
        });
        let home = if by_hand {
            match self.hand_homes.iter().find(|(p, _)| p == plain) {
                Some((_, first)) => Some(*first),
                None => {
                    self.hand_homes.push((plain.to_string(), s));
                    Some(s)
                }
            }
        } else {
            home
        };
        if let Some(home) = home
            && home != s
        {
            let itself = self.servers[home]
                .tokens
                .iter()
                .any(|t| t.plain == plain && Some(t.id.as_str()) == deleted);
            self.violations.push(format!(
                "invariant 3: a token of server {} was sent to server {}{}",
                self.servers[home].host,
                self.servers[s].host,
                match (by_hand, itself) {
                    (true, _) => " (a token put in by hand, used before)",
                    (false, true) => " (to delete itself: a replaced token the Secret keeps)",
                    _ => "",
                }
            ));
        }
        match self.first_trust.iter().find(|(p, _)| p == plain) {
            Some((_, false)) if insecure => self.violations.push(
                "invariant 3: a token first sent with TLS verification was sent with \
                 insecureSkipVerify"
                    .into(),
            ),
            Some(_) => {}
            None => self.first_trust.push((plain.to_string(), insecure)),
        }
    }

    /// The user a request authenticates as (the auth middleware).
    /// The instance whose pass makes the call being handled.
    fn calling(&self) -> Option<(String, String)> {
        self.caller.as_ref().and_then(|c| c.lock().unwrap().clone())
    }

    fn caller(&mut self, s: usize, token: Option<&str>) -> Result<User, (u16, Value)> {
        let Some(token) = token else {
            return Err(json_error(401, "no valid authentication provided"));
        };
        if pat::check(token).is_err() {
            return Err(json_error(401, "token invalid"));
        }
        let now = (self.now)();
        let srv = &mut self.servers[s];
        // a lagging replica does not know a new token yet: as for one that does not exist
        let Some(t) = srv
            .tokens
            .iter_mut()
            .find(|t| t.plain == token && t.visible_at <= now)
        else {
            return Err(json_error(
                404,
                "invalid token: pat: jqethtqbbwixwx67ozgcwf1huu5pcsl1eztseukpkoq= not found",
            ));
        };
        if t.expires_at <= now {
            return Err(json_error(401, "token invalid"));
        }
        let user = srv
            .users
            .iter()
            .find(|u| u.id == t.user)
            .cloned()
            .ok_or_else(|| json_error(401, "token invalid"))?;
        // as NetBird's auth middleware: a known, unexpired token of a known user is marked used
        // (`last_used`), whatever the handler then answers
        t.last_used = Some(now);
        Ok(user)
    }

    fn may_act_on(srv: &Server, caller: &User, target: &str) -> bool {
        caller.id == target
            || (matches!(caller.role.as_str(), "owner" | "admin")
                && srv.users.iter().any(|u| u.id == target && u.service))
    }

    fn api(
        &mut self,
        s: usize,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &Value,
        url: &str,
    ) -> (u16, Value) {
        let segments: Vec<&str> = path.split('?').next().unwrap_or("").split('/').collect();
        match (method, segments.as_slice()) {
            ("GET", ["instance"]) => {
                return (
                    200,
                    json!({"setup_required": self.servers[s].setup_required}),
                );
            }
            ("POST", ["setup"]) => return self.setup(s, body, url),
            (_, ["instance", "version"] | ["users", ..]) => {}
            // no route: the middleware does not run
            _ => return (404, Value::Null),
        }
        // the auth middleware: every other route authenticates the request, and marks its token
        // used, before the handler runs
        let caller = self.caller(s, token);
        match (method, segments.as_slice()) {
            ("GET", ["instance", "version"]) => match caller {
                Err(e) => e,
                Ok(_) => {
                    let mut v = json!({"management_current_version": "0.77.1",
                        "management_update_available": false});
                    let tells = self.servers[s].tells_latest;
                    if tells {
                        v["management_update_available"] = json!(true);
                        v["management_available_version"] = json!("0.78.0");
                        v["dashboard_available_version"] = json!("2.10.0");
                    }
                    self.version_answers.push(tells);
                    (200, v)
                }
            },
            ("GET", ["users", "current"]) => match caller {
                Err(e) => e,
                Ok(u) if u.service => json_error(403, "service users cannot use this endpoint"),
                Ok(u) => (200, user_json(&u)),
            },
            ("GET", ["users"]) => match caller {
                Err(e) => e,
                Ok(u) if !matches!(u.role.as_str(), "owner" | "admin") => {
                    json_error(403, "permission denied")
                }
                Ok(_) => {
                    let list: Vec<Value> = self.servers[s]
                        .users
                        .iter()
                        .filter(|u| u.service)
                        .map(user_json)
                        .collect();
                    (200, json!(list))
                }
            },
            ("POST", ["users"]) => match caller {
                Err(e) => e,
                Ok(u) if !matches!(u.role.as_str(), "owner" | "admin") => {
                    json_error(403, "permission denied")
                }
                Ok(_) => {
                    let id = self.id("svc");
                    let user = User {
                        id,
                        email: String::new(),
                        name: body["name"].as_str().unwrap_or_default().into(),
                        role: "admin".into(),
                        service: true,
                    };
                    self.servers[s].users.push(user.clone());
                    (200, user_json(&user))
                }
            },
            ("GET", ["users", target, "tokens"]) => match caller {
                Err(e) => e,
                Ok(u) if !Self::may_act_on(&self.servers[s], &u, target) => {
                    json_error(403, "permission denied")
                }
                Ok(_) => {
                    let now = (self.now)();
                    let list: Vec<Value> = self.servers[s]
                        .tokens
                        .iter()
                        .filter(|t| t.user == *target && t.visible_at <= now)
                        .map(token_json)
                        .collect();
                    (
                        200,
                        if list.is_empty() {
                            Value::Null
                        } else {
                            json!(list)
                        },
                    )
                }
            },
            ("POST", ["users", target, "tokens"]) => match caller {
                Err(e) => e,
                Ok(u) if !Self::may_act_on(&self.servers[s], &u, target) => {
                    json_error(403, "permission denied")
                }
                Ok(_) => {
                    let name = body["name"].as_str().unwrap_or_default().to_string();
                    let days = body["expires_in"].as_i64().unwrap_or(0);
                    if name.is_empty() {
                        return json_error(422, "token name can't be empty");
                    }
                    if !(1..=365).contains(&days) {
                        return json_error(422, "expiration has to be between 1 and 365");
                    }
                    let t = self.mint(s, target, &name, days, false);
                    self.issued.push(Issued {
                        server: s,
                        plain: t.plain.clone(),
                        delivered: false,
                        instance: self.calling(),
                    });
                    (
                        200,
                        json!({"plain_token": t.plain, "personal_access_token": token_json(&t)}),
                    )
                }
            },
            ("DELETE", ["users", target, "tokens", id]) => match caller {
                Err(e) => e,
                Ok(u) if !Self::may_act_on(&self.servers[s], &u, target) => {
                    json_error(403, "permission denied")
                }
                Ok(_) => {
                    let srv = &mut self.servers[s];
                    let Some(i) = srv
                        .tokens
                        .iter()
                        .position(|t| t.id == *id && t.user == *target)
                    else {
                        return json_error(404, "token not found");
                    };
                    let gone = srv.tokens.remove(i);
                    if let Some(check) = &self.checker {
                        let v = check(Check::Delete {
                            plain: &gone.plain,
                            token: &gone,
                            left: &self.servers[s].tokens,
                        });
                        self.violations.extend(v);
                    }
                    (200, json!({}))
                }
            },
            ("GET", ["users", _, "tokens", _]) => match caller {
                Err(e) => e,
                Ok(_) => json_error(405, "not used by the operator"),
            },
            _ => (404, Value::Null),
        }
    }

    fn setup(&mut self, s: usize, body: &Value, url: &str) -> (u16, Value) {
        let password = body["password"].as_str().unwrap_or_default().to_string();
        if let Some(check) = &self.checker {
            let v = check(Check::Password {
                url,
                password: &password,
            });
            self.violations.extend(v);
        }
        self.servers[s].passwords.push(password.clone());
        if self.servers[s].set_up_by_operator {
            self.violations.push(format!(
                "invariant 2: setup called again on {}, whose setup the operator performed{}",
                self.servers[s].host,
                if self.servers[s].checked_since_setup {
                    ""
                } else {
                    " (two passes raced: no instance check since that setup)"
                }
            ));
        }
        let create_pat = body["create_pat"].as_bool().unwrap_or(false);
        let days = body["pat_expire_in"].as_i64().unwrap_or(1);
        let pat_on = self.servers[s].mode != Mode::NoPat;
        if pat_on && create_pat && !(1..=365).contains(&days) {
            return json_error(422, "pat_expire_in must be between 1 and 365");
        }
        let email = body["email"].as_str().unwrap_or_default().to_string();
        let name = body["name"].as_str().unwrap_or_default().to_string();
        if email.is_empty() {
            return json_error(422, "email is required");
        }
        if name.is_empty() {
            return json_error(422, "name is required");
        }
        if password.len() < 8 {
            return json_error(422, "password must be at least 8 characters");
        }
        if password.len() > 72 {
            return json_error(422, "password must be at most 72 characters");
        }
        if !self.servers[s].setup_required {
            return json_error(412, "setup already completed");
        }
        if self.servers[s].mode == Mode::LocalUsersDisabled {
            // each instance gives up after a few tries of its own
            let caller = self
                .caller
                .as_ref()
                .and_then(|c| c.lock().unwrap().clone())
                .map(|(ns, name)| format!("{ns}/{name}"))
                .unwrap_or_default();
            let tries = self.servers[s]
                .setup_500s
                .entry(caller.clone())
                .or_default();
            *tries += 1;
            if *tries == 4 {
                self.violations.push(format!(
                    "answers that will not change: setup on {} answered 500 three times to the \
                     same credentials of {caller} and is tried again",
                    self.servers[s].host
                ));
            }
            return json_error(500, "internal server error");
        }
        let id = self.id("owner");
        self.servers[s].users.push(User {
            id: id.clone(),
            email: email.clone(),
            name,
            role: "owner".into(),
            service: false,
        });
        self.servers[s].setup_required = false;
        self.servers[s].set_up_by_operator = true;
        self.servers[s].checked_since_setup = false;
        let mut out = json!({"user_id": id, "email": email});
        if pat_on && create_pat {
            let t = self.mint(s, &id, "setup-token", days, false);
            self.issued.push(Issued {
                server: s,
                plain: t.plain.clone(),
                delivered: false,
                instance: self.calling(),
            });
            out["personal_access_token"] = json!(t.plain);
        }
        (200, out)
    }
}

/// The answer of a [`Fault::WrongShape`]: NetBird's answer to that call with [`CANARY`] where
/// NetBird has a bool, a date or an object (serde's own message for it quotes the value); None
/// for the calls whose answer the operator does not decode (setup, DELETE), answered as usual.
fn wrong_shape_answer(method: &str, path: &str) -> Option<Value> {
    let user = json!({"id": "user-x", "email": "x@example.com", "name": "x", "role": "owner",
        "is_service_user": CANARY, "status": "active", "permissions": {}});
    let segments: Vec<&str> = path.split('?').next().unwrap_or("").split('/').collect();
    Some(match (method, segments.as_slice()) {
        ("GET", ["instance"]) => json!({"setup_required": CANARY}),
        ("GET", ["instance", "version"]) => json!({"management_current_version": "0.77.1",
            "management_update_available": CANARY}),
        ("GET", ["users", "current"]) | ("POST", ["users"]) => user,
        ("GET", ["users"]) => json!([user]),
        ("GET", ["users", _, "tokens"]) => json!([{"id": "tok-x", "name": "x",
            "expiration_date": CANARY, "created_by": "user-x", "created_at": CANARY,
            "last_used": CANARY}]),
        ("POST", ["users", _, "tokens"]) => json!({"plain_token": 7,
            "personal_access_token": CANARY}),
        _ => return None,
    })
}

/// The servers as the operator's network.
pub struct Network {
    pub state: Shared,
    pub calls: Arc<Calls>,
    pub epoch: u64,
}

impl SimulatedNetwork for Network {
    fn send(
        &self,
        request: SimRequest,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<SimResponse, TransportKind>> + Send>> {
        let state = self.state.clone();
        let calls = self.calls.clone();
        let epoch = self.epoch;
        Box::pin(async move {
            let crash = calls.tick(epoch);
            if crash == Some(false) {
                futures::future::pending::<()>().await;
            }
            let (handled, date) = {
                let mut st = state.lock().unwrap();
                let out = st.handle(&request);
                let answer = match &out {
                    Ok((code, _, false)) if crash.is_none() => Some(*code),
                    _ => None,
                };
                st.answers.push(answer);
                let date = http_date((st.now)());
                if let Ok((200, body, false)) = &out {
                    let plain = body["personal_access_token"]
                        .as_str()
                        .or_else(|| body["plain_token"].as_str())
                        .map(str::to_string);
                    if let Some(plain) = plain
                        && crash.is_none()
                    {
                        for i in st.issued.iter_mut().filter(|i| i.plain == plain) {
                            i.delivered = true;
                        }
                    }
                }
                (out, date)
            };
            super::trace(|| {
                let auth = request.headers.iter().any(|(n, _)| n == "authorization");
                format!(
                    "netbird {} {} (auth: {auth}) -> {:?}{}",
                    request.method,
                    request.url,
                    handled.as_ref().map(|(c, b, n)| (
                        c,
                        if *n { " (no answer)" } else { "" },
                        b.to_string().chars().take(160).collect::<String>()
                    )),
                    if crash.is_some() { " CRASH" } else { "" }
                )
            });
            if crash == Some(true) {
                futures::future::pending::<()>().await;
            }
            let (code, body, no_answer) = match handled {
                Err(kind) => {
                    if kind == TransportKind::Timeout {
                        tokio::time::sleep(request.request_timeout).await;
                    }
                    return Err(kind);
                }
                Ok(x) => x,
            };
            if no_answer {
                tokio::time::sleep(request.request_timeout).await;
                return Err(TransportKind::Timeout);
            }
            let rid = format!(
                "req-{}",
                calls.count.load(std::sync::atomic::Ordering::SeqCst)
            );
            if code == 404 && body.is_null() {
                return Ok(SimResponse {
                    status: 404,
                    headers: vec![
                        ("content-type".into(), "text/plain".into()),
                        ("date".into(), date),
                    ],
                    body: b"404 page not found\n".to_vec(),
                });
            }
            Ok(SimResponse {
                status: code,
                headers: vec![
                    ("content-type".into(), "application/json".into()),
                    ("x-request-id".into(), rid),
                    ("date".into(), date),
                ],
                body: serde_json::to_vec(&body).unwrap(),
            })
        })
    }
}

/// An HTTP `Date` header of `t` (RFC 9110's IMF-fixdate, `Fri, 04 Dec 2026 12:25:43 GMT`): the
/// whole seconds, as a real server's (never ahead of its clock).
pub fn http_date(t: jiff::Timestamp) -> String {
    let whole = jiff::Timestamp::from_second(t.as_second()).unwrap_or(t);
    jiff::fmt::rfc2822::DateTimePrinter::new()
        .timestamp_to_rfc9110_string(&whole)
        .expect("a timestamp of the simulation prints")
}
