//! [`ReadOnceConsumer`]: a test stand-in for the official NetBird Kubernetes operator
//! (github.com/netbirdio/kubernetes-operator v0.8.0), the most common user of the token Secret.
//!
//! That operator cannot be built here (its Go module is not served by the module proxy these
//! machines reach), so this reproduces the one behaviour that matters for the token's life: its
//! Helm chart puts Secret `netbirdAPI.keyFromSecret.name`, key `netbirdAPI.keyFromSecret.key`
//! (`netbird-mgmt-api-key` / `NB_API_KEY`) into the environment variable `NB_API_KEY` through a
//! `secretKeyRef`, and starts the manager with `--netbird-api-key=$(NB_API_KEY)`. The kubelet
//! resolves that once, when the container starts: the process keeps the token it started with
//! until it is restarted, whatever happens to the Secret afterwards.
//!
//! So the consumer reads the Secret ONCE in [`ReadOnceConsumer::start`], then works against the
//! real NetBird server on a timer as the official operator does for its custom resources: each
//! round creates a group, creates a setup key that puts peers into that group, and lists groups
//! and setup keys (checking that its own appear). Every API call is counted as a success, a 401,
//! a token the server no longer knows, or another failure. The token is held in a
//! [`SecretString`] and never printed; the failure note keeps only status and server message.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// What a consumer has seen so far, call by call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsumerCounts {
    /// Calls answered 2xx (with the expected content, for the lists).
    pub successes: u64,
    /// Calls answered 401: the token is malformed, expired, or unknown to the server's auth.
    pub unauthorized: u64,
    /// Calls answered 404 `invalid token ...`: NetBird's answer for a well-formed PAT it no longer
    /// has (deleted). As fatal to the consumer as a 401.
    pub token_not_found: u64,
    /// Anything else: other statuses, transport errors, a list missing what was just created.
    pub other_failures: u64,
    /// Rounds started (one round is four calls).
    pub rounds: u64,
}

impl ConsumerCounts {
    /// Calls refused because of the token (401, or 404 for a deleted token).
    pub fn rejected(&self) -> u64 {
        self.unauthorized + self.token_not_found
    }
}

#[derive(Default)]
struct Counters {
    successes: AtomicU64,
    unauthorized: AtomicU64,
    token_not_found: AtomicU64,
    other_failures: AtomicU64,
    rounds: AtomicU64,
    last_failure: Mutex<Option<String>>,
}

/// A process that read the token once at start and uses it on a timer (see the module docs).
pub struct ReadOnceConsumer {
    counters: Arc<Counters>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ReadOnceConsumer {
    /// Reads `key` of Secret `secret` once (panics when it is missing, as a container whose
    /// `secretKeyRef` cannot be resolved never starts) and starts a round every `period` against
    /// the NetBird server at `management_url`. `name` prefixes what it creates.
    pub async fn start(
        secrets: &Api<Secret>,
        secret: &str,
        key: &str,
        management_url: &str,
        period: Duration,
        name: &str,
    ) -> ReadOnceConsumer {
        let s = secrets
            .get(secret)
            .await
            .unwrap_or_else(|e| panic!("consumer: cannot read Secret {secret}: {e}"));
        let bytes = s
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .unwrap_or_else(|| panic!("consumer: Secret {secret} has no key {key}"))
            .0
            .clone();
        let token = SecretString::from(String::from_utf8(bytes).expect("token is UTF-8"));
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let work = Work {
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("http client"),
            base: format!("{}/api", management_url.trim_end_matches('/')),
            token,
            name: name.to_string(),
            counters: counters.clone(),
        };
        let until = stop.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = until.cancelled() => break,
                    _ = tick.tick() => work.round().await,
                }
            }
        });
        ReadOnceConsumer {
            counters,
            stop,
            task: Some(task),
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> ConsumerCounts {
        let c = &self.counters;
        ConsumerCounts {
            successes: c.successes.load(Ordering::SeqCst),
            unauthorized: c.unauthorized.load(Ordering::SeqCst),
            token_not_found: c.token_not_found.load(Ordering::SeqCst),
            other_failures: c.other_failures.load(Ordering::SeqCst),
            rounds: c.rounds.load(Ordering::SeqCst),
        }
    }

    /// Status and server message of the last failed call (never the token).
    pub fn last_failure(&self) -> Option<String> {
        self.counters.last_failure.lock().unwrap().clone()
    }

    /// The counts once `pred` holds for them; panics after `timeout`.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&ConsumerCounts) -> bool,
    ) -> ConsumerCounts {
        let start = Instant::now();
        loop {
            let c = self.counts();
            if pred(&c) {
                return c;
            }
            assert!(
                start.elapsed() < timeout,
                "consumer: timed out after {timeout:?} waiting for {what}; counts {c:?}, last failure {:?}",
                self.last_failure()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops after the round in flight (as a pod is stopped for a rollout) and returns the counts.
    pub async fn stop(mut self) -> ConsumerCounts {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.counts()
    }
}

impl Drop for ReadOnceConsumer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

struct Work {
    http: reqwest::Client,
    base: String,
    token: SecretString,
    name: String,
    counters: Arc<Counters>,
}

impl Work {
    /// Create a group, a setup key for it, list both; stops at the first failed call.
    async fn round(&self) {
        let n = self.counters.rounds.fetch_add(1, Ordering::SeqCst);
        let group_name = format!("{}-group-{n}", self.name);
        let Some(group) = self
            .call(
                reqwest::Method::POST,
                "groups",
                Some(json!({"name": group_name})),
            )
            .await
        else {
            return;
        };
        let Some(group_id) = group["id"].as_str().map(str::to_string) else {
            return self.failed("POST /api/groups answered without an id".into());
        };
        self.succeeded();
        let key_name = format!("{}-key-{n}", self.name);
        let body = json!({
            "name": key_name,
            "type": "reusable",
            "expires_in": 86400,
            "auto_groups": [group_id],
            "usage_limit": 0,
            "ephemeral": false,
        });
        let Some(key) = self
            .call(reqwest::Method::POST, "setup-keys", Some(body))
            .await
        else {
            return;
        };
        let key_groups = key["auto_groups"].as_array().cloned().unwrap_or_default();
        if !key_groups
            .iter()
            .any(|g| g.as_str() == Some(group_id.as_str()))
        {
            return self.failed("the setup key does not carry its group".into());
        }
        self.succeeded();
        for (path, name) in [("groups", &group_name), ("setup-keys", &key_name)] {
            let Some(list) = self.call(reqwest::Method::GET, path, None).await else {
                return;
            };
            let listed = list
                .as_array()
                .is_some_and(|items| items.iter().any(|i| i["name"].as_str() == Some(name)));
            if !listed {
                return self.failed(format!("GET /api/{path} does not list {name}"));
            }
            self.succeeded();
        }
    }

    /// One API call: the answer's JSON on 2xx (the caller checks it and counts the success), or
    /// None after counting the failure.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Option<Value> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}/{path}", self.base))
            .header(
                "Authorization",
                format!("Token {}", self.token.expose_secret()),
            );
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                self.failed(format!("{method} /api/{path}: no answer ({e})"));
                return None;
            }
        };
        let status = resp.status().as_u16();
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        // NetBird's message for a deleted PAT ends with the hash of the token: left out
        let message = value["message"].as_str().unwrap_or_default();
        let message = message
            .split(": pat:")
            .next()
            .unwrap_or_default()
            .to_string();
        let note = format!("{method} /api/{path}: {status} {message}");
        match status {
            200..=299 => return Some(value),
            401 => self.counters.unauthorized.fetch_add(1, Ordering::SeqCst),
            404 if message.starts_with("invalid token") => {
                self.counters.token_not_found.fetch_add(1, Ordering::SeqCst)
            }
            _ => self.counters.other_failures.fetch_add(1, Ordering::SeqCst),
        };
        *self.counters.last_failure.lock().unwrap() = Some(note);
        None
    }

    fn succeeded(&self) {
        self.counters.successes.fetch_add(1, Ordering::SeqCst);
    }

    fn failed(&self, note: String) {
        self.counters.other_failures.fetch_add(1, Ordering::SeqCst);
        *self.counters.last_failure.lock().unwrap() = Some(note);
    }
}
