//! An in-memory Kubernetes apiserver, as a tower service under a real `kube::Client`: Secrets,
//! NetbirdInstances (with the status subresource, finalizers and deletionTimestamp) and Events,
//! with resourceVersions, `metadata.resourceVersion` preconditions (409 Conflict), JSON merge
//! patches (RFC 7386: null deletes) and injected faults. It records every write for the
//! invariants, and the Secrets' watch events for a delivery the history controls.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::core::v1::Secret;
use kube::client::Body;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use serde_json::{Value, json};

use super::Calls;

pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const INSTANCE_LABEL: &str = "bootstrap.netbird.io/instance";

/// A fault the next matching requests get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KubeFault {
    /// The next write of a Secret answers 409 Conflict.
    ConflictSecretWrite,
    /// The next `n` Secret writes answer 403 (RBAC taken away, then given back).
    ForbidSecretWrites(u8),
    /// The next request answers 500.
    ServerError,
    /// The next status write answers 409 Conflict.
    ConflictStatus,
    /// The next `n` Secret patches answer 403, creates go through: a Role with `create` but
    /// without `patch` on secrets (tests/lifecycle.rs), fixed after a while. A new instance's
    /// claim creates its Secret, and the token write after setup is refused: the token is held
    /// in memory.
    ForbidSecretPatches(u8),
}

impl KubeFault {
    /// What is left of a counted fault once it answered a request.
    fn rest(self) -> Option<KubeFault> {
        match self {
            KubeFault::ForbidSecretWrites(n) if n > 1 => Some(KubeFault::ForbidSecretWrites(n - 1)),
            KubeFault::ForbidSecretPatches(n) if n > 1 => {
                Some(KubeFault::ForbidSecretPatches(n - 1))
            }
            _ => None,
        }
    }
}

/// What the apiserver checks of a Secret's metadata (k8s.io/apimachinery validation:
/// `ValidateLabels`, `ValidateAnnotations`): label keys and annotation keys (in lower case) are
/// qualified names (an optional DNS subdomain prefix of at most 253 characters and `/`, then a
/// name of at most 63 characters of `[A-Za-z0-9_.-]` beginning and ending with a letter or
/// digit); label values at most 63 characters of the same alphabet, empty or beginning and ending
/// with a letter or digit; the annotations' keys and values together at most 262144 bytes. The
/// answer: 422 Invalid, as the real apiserver's (tests/hostile.rs
/// `a_secret_the_apiserver_refuses_is_an_invalid_spec` meets it).
/// The length of the over-long passwords a person puts in (bytes): a number no message has
/// another reason to hold (a history makes far fewer calls, objects and versions).
pub const LONG_PASSWORD: usize = 7919;

/// Whether `text` names [`LONG_PASSWORD`] as a word of its own (not inside a hex name or a longer
/// number).
pub fn names_long_password_length(text: &str) -> bool {
    let n = LONG_PASSWORD.to_string();
    text.match_indices(&n).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + n.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric())
            && !after.is_some_and(|c| c.is_ascii_alphanumeric())
    })
}

/// The words a person reads in a write: an Event's note and the conditions' messages.
fn messages(body: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let mut out: Vec<String> = v["note"].as_str().map(str::to_string).into_iter().collect();
    if let Some(conditions) = v["status"]["conditions"].as_array() {
        out.extend(
            conditions
                .iter()
                .filter_map(|c| c["message"].as_str().map(str::to_string)),
        );
    }
    out
}

/// Key prefixes of well-known Secret copiers (reflector, replicator, kubed): a token Secret that
/// carries one is copied into other namespaces. The model's own list (not the operator's), so a
/// prefix the operator forgot is found.
const COPIER_PREFIXES: [&str; 3] = [
    "reflector.v1.k8s.emberstack.com/",
    "replicator.v1.mittwald.de/",
    "kubed.appscode.com/",
];

/// A Secret copier's key on the Secret `obj` (no person in the model puts one there).
fn copier_key(obj: &Value) -> Option<String> {
    ["labels", "annotations"]
        .iter()
        .filter_map(|m| obj["metadata"][m].as_object())
        .flat_map(|m| m.iter())
        .filter(|(_, v)| !v.is_null())
        .map(|(k, _)| k)
        .find(|k| {
            COPIER_PREFIXES
                .iter()
                .any(|p| k.to_ascii_lowercase().starts_with(p))
        })
        .cloned()
}

pub fn invalid_metadata(obj: &Value) -> Option<String> {
    fn name_part(n: &str) -> bool {
        let b = n.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    }
    fn subdomain(p: &str) -> bool {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                let b = l.as_bytes();
                !b.is_empty()
                    && b[0].is_ascii_alphanumeric()
                    && b[b.len() - 1].is_ascii_alphanumeric()
                    && b.iter()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            })
    }
    fn qualified(k: &str) -> bool {
        match k.split_once('/') {
            Some((prefix, name)) => subdomain(prefix) && name_part(name),
            None => name_part(k),
        }
    }
    let meta = &obj["metadata"];
    for (k, v) in meta["labels"].as_object().into_iter().flatten() {
        let v = v.as_str().unwrap_or_default();
        if !qualified(k) {
            return Some(format!(
                "metadata.labels: Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
            ));
        }
        if !(v.is_empty() || name_part(v)) {
            return Some(format!(
                "metadata.labels: Invalid value: {v:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
            ));
        }
    }
    let mut total = 0;
    for (k, v) in meta["annotations"].as_object().into_iter().flatten() {
        if !qualified(&k.to_lowercase()) {
            return Some(format!(
                "metadata.annotations: Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
            ));
        }
        total += k.len() + v.as_str().map_or(0, str::len);
    }
    (total > 262_144)
        .then(|| "metadata.annotations: Too long: may not be more than 262144 bytes".to_string())
}

/// The tokens (not the previous one) a Secret's `data` in a write holds, decoded.
fn tokens_in(obj: &Value) -> Vec<String> {
    obj["data"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| *k != "previous-token")
        .filter_map(|(_, v)| serde_json::from_value::<k8s_openapi::ByteString>(v.clone()).ok())
        .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
        .filter(|t| t.starts_with("nbp_"))
        .collect()
}

#[derive(Default)]
pub struct KubeState {
    rv: u64,
    uid: u64,
    /// (resource, namespace, name) -> object
    pub objects: BTreeMap<(String, String, String), Value>,
    pub events: Vec<Value>,
    pub faults: VecDeque<KubeFault>,
    /// How many injected faults answered a request.
    pub faults_fired: u64,
    /// The query of the request being handled (a list's `labelSelector`).
    query: String,
    /// Writes by the operator (through the service), for the quiet-world check.
    pub writes: Vec<String>,
    /// Secret watch events not delivered yet.
    pub secret_events: Vec<watcher::Event<PartialObjectMeta<Secret>>>,
    /// Violations seen at the moment of a write.
    pub violations: Vec<String>,
    /// Token ids whose previous-token record a write replaced by another before it was deleted.
    pub overwritten_previous: Vec<String>,
    /// Tokens of instances removed under deletionPolicy Delete (the finalizer's to delete).
    pub deleted_with_instance: Vec<String>,
    /// Everything that happened, when `recording`.
    pub log: Vec<Rec>,
    /// Instances (namespace, name) whose last status write failed: the operator retries it after
    /// its backoff, and until then the status may be behind.
    pub status_write_failed: std::collections::BTreeSet<(String, String)>,
    pub recording: bool,
    /// Inside a request or a composite change (its parts are not recorded on their own).
    depth: u32,
    /// Instances removed (uid, namespace, name), for the watch's Delete.
    pub removed: Vec<(String, String, String)>,
    /// Tokens NetBird issued that the operator holds in memory only: a write of the Secret
    /// (namespace, name) carrying it was refused in a way retrying will not change (403, 422),
    /// and no write stored it since (a new process holds nothing).
    pub in_memory: Vec<(String, String, String)>,
    /// SIGTERM: the shutdown gives held tokens up (and says so), so their status may say that.
    pub shutting_down: bool,
}

pub type Shared = Arc<Mutex<KubeState>>;

/// What happened to the apiserver, in order (replayed on the real one to keep the model honest).
#[derive(Clone, Debug)]
pub enum Rec {
    /// A request of the operator and the model's answer (status, resourceVersion, uid).
    Http {
        method: String,
        path: String,
        body: Vec<u8>,
        code: u16,
        rv: Option<String>,
        uid: Option<String>,
    },
    /// The history wrote the object (a person, kubectl): as stored.
    Put {
        resource: String,
        ns: String,
        name: String,
        obj: Value,
    },
    /// The history or the garbage collector removed it.
    Remove {
        resource: String,
        ns: String,
        name: String,
    },
    /// `kubectl delete` of an instance.
    DeleteInstance { ns: String, name: String },
    /// An object as the history left it.
    Final {
        resource: String,
        ns: String,
        name: String,
        obj: Value,
    },
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

/// RFC 7386.
pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// The apiserver's answer to a Secret it refuses as invalid.
fn invalid(name: &str, why: &str) -> (u16, Value) {
    let mut body = status_body(
        422,
        "Invalid",
        &format!("Secret \"{name}\" is invalid: {why}"),
    );
    body["details"] = json!({"name": name, "kind": "secrets"});
    (422, body)
}

fn meta_of(v: &Value) -> PartialObjectMeta<Secret> {
    PartialObjectMeta {
        types: None,
        metadata: serde_json::from_value(v["metadata"].clone()).unwrap_or_default(),
        _phantom: std::marker::PhantomData,
    }
}

fn has_labels(secret: &Value) -> bool {
    let labels = &secret["metadata"]["labels"];
    labels[MANAGED_BY] == "netbird-operator" && labels[INSTANCE_LABEL].is_string()
}

impl KubeState {
    fn next_rv(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    /// Stores `obj` (new version), records the Secret watch event.
    pub fn put(&mut self, resource: &str, ns: &str, name: &str, mut obj: Value) -> Value {
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv);
        obj["metadata"]["namespace"] = json!(ns);
        obj["metadata"]["name"] = json!(name);
        // as the apiserver stores them: empty maps are no maps (found by the comparison with
        // the real apiserver)
        if let Some(m) = obj["metadata"].as_object_mut() {
            for k in ["labels", "annotations", "finalizers"] {
                if m.get(k).is_some_and(|v| {
                    v.as_object().is_some_and(|o| o.is_empty())
                        || v.as_array().is_some_and(|a| a.is_empty())
                }) {
                    m.remove(k);
                }
            }
        }
        if obj["metadata"]["uid"].is_null() {
            self.uid += 1;
            obj["metadata"]["uid"] = json!(format!("uid-{}", self.uid));
            obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        if resource == "secrets" {
            if obj["type"].is_null() {
                obj["type"] = json!("Opaque");
            }
            if obj["data"].as_object().is_some_and(|d| d.is_empty()) {
                obj.as_object_mut().unwrap().remove("data");
            }
            self.secret_events
                .push(watcher::Event::Apply(meta_of(&obj)));
        }
        self.objects
            .insert((resource.into(), ns.into(), name.into()), obj.clone());
        if self.recording && self.depth == 0 {
            self.log.push(Rec::Put {
                resource: resource.into(),
                ns: ns.into(),
                name: name.into(),
                obj: obj.clone(),
            });
        }
        obj
    }

    pub fn get(&self, resource: &str, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(resource.into(), ns.into(), name.into()))
    }

    /// Removes an object (a Secret's Delete event; an instance's dependents go with it).
    pub fn remove(&mut self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let gone = self
            .objects
            .remove(&(resource.into(), ns.into(), name.into()))?;
        if self.recording && self.depth == 0 {
            self.log.push(Rec::Remove {
                resource: resource.into(),
                ns: ns.into(),
                name: name.into(),
            });
        }
        if resource == "secrets" {
            self.secret_events
                .push(watcher::Event::Delete(meta_of(&gone)));
        } else if resource == "netbirdinstances" {
            let uid = gone["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            // the finalizer's: the instance was deleted with it in place
            if gone["spec"]["token"]["deletionPolicy"] == "Delete"
                && !gone["metadata"]["deletionTimestamp"].is_null()
            {
                let secret = match gone["spec"]["token"]["secretName"].as_str() {
                    Some(n) if !n.is_empty() => n.to_string(),
                    _ => format!("{name}-token"),
                };
                let key = gone["spec"]["token"]["secretKey"]
                    .as_str()
                    .unwrap_or("NB_API_KEY");
                if let Some(v) = self
                    .get("secrets", ns, &secret)
                    .and_then(|s| s["data"][key].as_str())
                {
                    self.deleted_with_instance.push(v.to_string());
                }
            }
            self.removed.push((uid.clone(), ns.into(), name.into()));
            // a token it held in memory is lost with it (the operator says so when the watch
            // delivers the deletion); an instance created again under the name holds nothing
            let secret = match gone["spec"]["token"]["secretName"].as_str() {
                Some(n) if !n.is_empty() => n.to_string(),
                _ => format!("{name}-token"),
            };
            self.in_memory
                .retain(|(n, s, _)| !(n == ns && *s == secret));
            // the garbage collector: Secrets owned by it go too
            let owned: Vec<_> = self
                .objects
                .iter()
                .filter(|((r, n, _), v)| {
                    r == "secrets"
                        && n == ns
                        && v["metadata"]["ownerReferences"]
                            .as_array()
                            .is_some_and(|o| o.iter().any(|r| r["uid"] == uid.as_str()))
                })
                .map(|((_, _, name), _)| name.clone())
                .collect();
            // (the real test apiserver runs no garbage collector: recorded as its own removal)
            let depth = std::mem::replace(&mut self.depth, 0);
            for name in owned {
                self.remove("secrets", ns, &name);
            }
            self.depth = depth;
        }
        Some(gone)
    }

    /// Deletes an instance as `kubectl delete` does: with finalizers it gets a deletionTimestamp.
    pub fn delete_instance(&mut self, ns: &str, name: &str, now: &str) {
        let Some(obj) = self.get("netbirdinstances", ns, name).cloned() else {
            return;
        };
        if self.recording {
            self.log.push(Rec::DeleteInstance {
                ns: ns.into(),
                name: name.into(),
            });
        }
        self.depth += 1;
        self.delete_instance_inner(ns, name, now, obj);
        self.depth -= 1;
    }

    fn delete_instance_inner(&mut self, ns: &str, name: &str, now: &str, obj: Value) {
        let finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if finalizers {
            if obj["metadata"]["deletionTimestamp"].is_null() {
                let mut obj = obj;
                obj["metadata"]["deletionTimestamp"] = json!(now);
                self.put("netbirdinstances", ns, name, obj);
            }
        } else {
            self.remove("netbirdinstances", ns, name);
        }
    }

    /// The namespace's Secrets that carry every label of the request's `labelSelector` (only
    /// `key=value` terms, what the operator sends).
    fn list_secrets(&self, ns: &str) -> Value {
        let selector = self
            .query
            .split('&')
            .find_map(|kv| kv.strip_prefix("labelSelector="))
            .map(|v| {
                url::form_urlencoded::parse(format!("s={v}").as_bytes())
                    .map(|(_, v)| v.into_owned())
                    .next()
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        let terms: Vec<(&str, &str)> = selector
            .split(',')
            .filter_map(|t| t.split_once('='))
            .collect();
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|((r, n, _), _)| r == "secrets" && n == ns)
            .map(|(_, v)| v)
            .filter(|v| {
                terms
                    .iter()
                    .all(|(k, want)| v["metadata"]["labels"][*k].as_str() == Some(*want))
            })
            .cloned()
            .collect();
        json!({"apiVersion": "v1", "kind": "SecretList",
            "metadata": {"resourceVersion": self.rv.to_string()}, "items": items})
    }

    /// Trust (no spec field can make a token travel): a Secret the operator writes never carries
    /// a Secret copier's key, whatever an instance stored before the CRD's rule asks for.
    fn check_copier(&mut self, ns: &str, name: &str, secret: &Value) {
        if let Some(key) = copier_key(secret) {
            self.violations.push(format!(
                "copier annotations: the operator wrote Secret {ns}/{name} with {key}: a Secret \
                 copier would put the token into other namespaces"
            ));
        }
    }

    fn take_fault(&mut self, f: impl Fn(&KubeFault) -> bool) -> Option<KubeFault> {
        let i = self.faults.iter().position(f)?;
        let fault = self.faults.remove(i)?;
        self.faults_fired += 1;
        if let Some(rest) = fault.rest() {
            self.faults.insert(i, rest);
        }
        Some(fault)
    }

    /// Handles one request; (status, body).
    pub fn handle(&mut self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        if method != "GET" {
            self.check_echo(path, body);
        }
        self.depth += 1;
        let (code, value) = self.handle_inner(method, path, body);
        self.depth -= 1;
        self.follow_held_tokens(method, path, body, code, &value);
        if method == "PATCH"
            && let [
                "apis",
                _,
                _,
                "namespaces",
                ns,
                "netbirdinstances",
                name,
                "status",
            ] = path
                .trim_matches('/')
                .split('/')
                .collect::<Vec<_>>()
                .as_slice()
        {
            let key = (ns.to_string(), name.to_string());
            if code >= 400 {
                self.status_write_failed.insert(key);
            } else {
                self.status_write_failed.remove(&key);
            }
        }
        if self.recording && !path.contains("/events") {
            self.log.push(Rec::Http {
                method: method.into(),
                path: path.into(),
                body: body.to_vec(),
                code,
                rv: value["metadata"]["resourceVersion"]
                    .as_str()
                    .map(str::to_string),
                uid: value["metadata"]["uid"].as_str().map(str::to_string),
            });
        }
        (code, value)
    }

    /// Nothing of a NetBird answer of another shape ([`super::netbird::CANARY`]) goes into any
    /// write; no token or password into a status or an Event (a Secret's `data` holds the token,
    /// base64-encoded).
    fn check_echo(&mut self, path: &str, body: &[u8]) {
        let text = String::from_utf8_lossy(body);
        if text.contains(super::netbird::CANARY) {
            self.violations.push(format!(
                "decode error's text: a value of a NetBird answer of another shape went into the \
                 write of {path}"
            ));
        }
        if !path.contains("/secrets") && (text.contains("nbp_s") || text.contains("-long-enough")) {
            self.violations.push(format!(
                "secret hygiene: a token or a password went into the write of {path}"
            ));
        }
        if !path.contains("/secrets")
            && messages(body).iter().any(|m| names_long_password_length(m))
        {
            self.violations.push(format!(
                "secret hygiene: the password's length (a function of it) went into the write of \
                 {path}"
            ));
        }
    }

    /// Tokens held in memory (refused writes of the token Secret), and the status written while
    /// one is: the most urgent message wins (shared/crd-api.md, "Status that says what is": while
    /// a token NetBird issued is held only in memory, Ready says so, `StoringToken`, until it is
    /// stored or reported lost; no routine write replaces that message).
    fn follow_held_tokens(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
        code: u16,
        answer: &Value,
    ) {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, parts.as_slice()) {
            ("POST" | "PATCH", ["api", "v1", "namespaces", ns, "secrets", rest @ ..]) => {
                let sent: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let name = rest
                    .first()
                    .map(|n| n.to_string())
                    .or_else(|| sent["metadata"]["name"].as_str().map(str::to_string))
                    .unwrap_or_default();
                if matches!(code, 403 | 422) {
                    for t in tokens_in(&sent) {
                        let entry = (ns.to_string(), name.clone(), t);
                        if !self.in_memory.contains(&entry) {
                            self.in_memory.push(entry);
                        }
                    }
                } else if code < 300 {
                    let stored = tokens_in(answer);
                    self.in_memory
                        .retain(|(n, s, t)| !(n == ns && *s == name && stored.contains(t)));
                }
            }
            (
                "PATCH",
                [
                    "apis",
                    _,
                    _,
                    "namespaces",
                    ns,
                    "netbirdinstances",
                    name,
                    "status",
                ],
            ) if code < 300 && !self.shutting_down => {
                let secret = match answer["spec"]["token"]["secretName"].as_str() {
                    Some(n) if !n.is_empty() => n.to_string(),
                    _ => format!("{name}-token"),
                };
                if !self
                    .in_memory
                    .iter()
                    .any(|(n, s, _)| n == ns && *s == secret)
                {
                    return;
                }
                let ready = answer["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|c| c["type"] == "Ready");
                let reason = ready.and_then(|c| c["reason"].as_str()).unwrap_or("none");
                if reason != "StoringToken" {
                    self.violations.push(format!(
                        "which message won: the status of {ns}/{name} was written with Ready \
                         reason {reason} while the token NetBird issued is held in memory only \
                         (writes of Secret {ns}/{secret} refused): it must say StoringToken"
                    ));
                }
            }
            _ => {}
        }
    }

    fn handle_inner(&mut self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        // /api/v1/namespaces/{ns}/secrets[/{name}]
        // /apis/{group}/{version}/namespaces/{ns}/{resource}[/{name}[/status]]
        let (ns, resource, name, sub) = match parts.as_slice() {
            ["api", "v1", "namespaces", ns, r, rest @ ..] => (*ns, *r, rest.first(), rest.get(1)),
            ["apis", _, _, "namespaces", ns, r, rest @ ..] => (*ns, *r, rest.first(), rest.get(1)),
            _ => return (404, status_body(404, "NotFound", "unknown path")),
        };
        let write = method != "GET";
        if self.take_fault(|f| *f == KubeFault::ServerError).is_some() {
            return (500, status_body(500, "InternalError", "injected"));
        }
        if resource == "secrets" && write {
            let patch = method == "PATCH";
            match self.take_fault(|f| {
                matches!(
                    f,
                    KubeFault::ConflictSecretWrite | KubeFault::ForbidSecretWrites(_)
                ) || (patch && matches!(f, KubeFault::ForbidSecretPatches(_)))
            }) {
                Some(KubeFault::ConflictSecretWrite) => {
                    return (
                        409,
                        status_body(409, "Conflict", "the object has been modified"),
                    );
                }
                Some(KubeFault::ForbidSecretWrites(_) | KubeFault::ForbidSecretPatches(_)) => {
                    return (403, status_body(403, "Forbidden", "secrets is forbidden"));
                }
                _ => {}
            }
        }
        if resource == "netbirdinstances"
            && sub == Some(&"status")
            && self
                .take_fault(|f| *f == KubeFault::ConflictStatus)
                .is_some()
        {
            return (
                409,
                status_body(409, "Conflict", "the object has been modified"),
            );
        }
        let patch: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        match (method, resource, name) {
            ("POST", "events", _) => {
                let mut ev = patch;
                let n = self.events.len();
                ev["metadata"]["name"] = json!(format!("ev-{n}"));
                ev["metadata"]["namespace"] = json!(ns);
                ev["metadata"]["resourceVersion"] = json!("1");
                self.events.push(ev.clone());
                (201, ev)
            }
            ("PATCH", "events", Some(name)) => {
                let mut ev = self
                    .events
                    .iter()
                    .find(|e| e["metadata"]["name"] == **name)
                    .cloned()
                    .unwrap_or_else(|| json!({"metadata": {"name": name, "namespace": ns}}));
                merge(&mut ev, &patch);
                (200, ev)
            }
            (_, "events", _) => (200, json!({})),
            ("GET", "secrets", None) => (200, self.list_secrets(ns)),
            ("GET", r, Some(name)) => match self.get(r, ns, name) {
                Some(v) => (200, v.clone()),
                None => (
                    404,
                    status_body(404, "NotFound", &format!("{r} \"{name}\" not found")),
                ),
            },
            ("POST", "secrets", None) => {
                let name = patch["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                // validation comes before storage (where AlreadyExists is found)
                if let Some(why) = invalid_metadata(&patch) {
                    self.writes.push(format!("create Secret {ns}/{name}"));
                    return invalid(&name, &why);
                }
                if self.get("secrets", ns, &name).is_some() {
                    return (
                        409,
                        status_body(
                            409,
                            "AlreadyExists",
                            &format!("secrets \"{name}\" already exists"),
                        ),
                    );
                }
                self.writes.push(format!("create Secret {ns}/{name}"));
                self.check_copier(ns, &name, &patch);
                let mut obj = patch;
                obj["metadata"]
                    .as_object_mut()
                    .map(|m| m.remove("resourceVersion"));
                (201, self.put("secrets", ns, &name, obj))
            }
            ("PATCH", r, Some(name)) => {
                let Some(mut obj) = self.get(r, ns, name).cloned() else {
                    return (
                        404,
                        status_body(404, "NotFound", &format!("{r} \"{name}\" not found")),
                    );
                };
                if let Some(want) = patch["metadata"]["resourceVersion"].as_str()
                    && obj["metadata"]["resourceVersion"] != want
                {
                    return (
                        409,
                        status_body(409, "Conflict", "the object has been modified"),
                    );
                }
                let status = sub == Some(&"status");
                if r == "secrets" && !has_labels(&obj) {
                    self.violations.push(format!(
                        "invariant 4: the operator wrote into Secret {ns}/{name}, which lacks its labels"
                    ));
                }
                self.writes.push(format!(
                    "patch {r} {ns}/{name}{}",
                    if status { "/status" } else { "" }
                ));
                let mut patch = patch;
                if let Some(m) = patch["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                if r == "netbirdinstances" {
                    if status {
                        let mut st = obj["status"].clone();
                        merge(&mut st, &patch["status"]);
                        obj["status"] = st;
                    } else {
                        // the main resource: status is ignored
                        patch.as_object_mut().map(|p| p.remove("status"));
                        let spec_before = obj["spec"].clone();
                        merge(&mut obj, &patch);
                        if obj["spec"] != spec_before {
                            let g = obj["metadata"]["generation"].as_i64().unwrap_or(1);
                            obj["metadata"]["generation"] = json!(g + 1);
                        }
                    }
                    let deleting = !obj["metadata"]["deletionTimestamp"].is_null();
                    let finalizers = obj["metadata"]["finalizers"]
                        .as_array()
                        .is_some_and(|f| !f.is_empty());
                    if deleting && !finalizers {
                        self.remove(r, ns, name);
                        return (200, obj);
                    }
                } else {
                    const PREV: &str = "bootstrap.netbird.io/previous-token-id";
                    let before = obj["metadata"]["annotations"][PREV]
                        .as_str()
                        .map(str::to_string);
                    merge(&mut obj, &patch);
                    if let Some(why) = invalid_metadata(&obj) {
                        return invalid(name, &why);
                    }
                    self.check_copier(ns, name, &obj);
                    let after = obj["metadata"]["annotations"][PREV].as_str();
                    if let (Some(b), Some(a)) = (&before, after)
                        && b != a
                    {
                        self.violations.push(format!(
                            "invariant 5: Secret {ns}/{name}: the previous-token record of {b} \
                             was replaced by {a} before {b} was deleted (it is never deleted now)"
                        ));
                        self.overwritten_previous.push(b.clone());
                    }
                }
                (200, self.put(r, ns, name, obj))
            }
            ("DELETE", "secrets", Some(name)) => match self.remove("secrets", ns, name) {
                Some(v) => (200, v),
                None => (404, status_body(404, "NotFound", "not found")),
            },
            _ => (
                405,
                status_body(405, "MethodNotAllowed", "not supported here"),
            ),
        }
    }
}

/// The apiserver as a `kube::Client`.
pub fn client(state: Shared, calls: Arc<Calls>, epoch: u64) -> kube::Client {
    let svc = tower::service_fn(move |req: Request<Body>| {
        let state = state.clone();
        let calls = calls.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let method = parts.method.to_string();
            let path = parts.uri.path().to_string();
            let query = parts.uri.query().unwrap_or_default().to_string();
            let counts = method != "GET" && !path.contains("/events");
            let crash = if counts {
                calls.tick(epoch)
            } else if calls.tick_read(epoch) {
                Some(false)
            } else {
                None
            };
            if crash == Some(false) {
                futures::future::pending::<()>().await;
            }
            let (code, value) = {
                let mut st = state.lock().unwrap();
                st.query = query;
                st.handle(&method, &path, &body)
            };
            if method != "GET" || code != 200 {
                super::trace(|| {
                    format!(
                        "kube {method} {path} {} -> {code}",
                        String::from_utf8_lossy(&body)
                    )
                });
            }
            if crash == Some(true) {
                futures::future::pending::<()>().await;
            }
            let resp = Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(serde_json::to_vec(&value).unwrap())))
                .unwrap();
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    kube::Client::new(svc, "default")
}
