//! Kubernetes faults the real apiserver cannot produce on demand, injected between the operator's
//! client and the real apiserver: watches cut and answered with 410 Gone (what an expired
//! resourceVersion gets), and 409 Conflict on chosen writes. Everything else goes through to the
//! real apiserver unchanged.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use kube::Client;
use kube::client::Body;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Which writes get a 409 Conflict while the rule holds.
type WriteRule = Box<dyn Fn(&Method, &str) -> bool + Send + Sync>;

/// The faults to inject, shared between the test and the client it made.
#[derive(Default)]
pub struct KubeFaults {
    /// The next this many watch requests are answered with a 410 Expired event.
    expire_watches: AtomicU32,
    /// Ends every open watch stream when cancelled (then replaced by a fresh token).
    cut: Mutex<CancellationToken>,
    /// While set, new watch requests (of paths ending with the suffix, when given) wait until it
    /// is cancelled (released).
    hold: Mutex<Option<(CancellationToken, Option<String>)>>,
    /// Writes answered with this status (409 Conflict, 403 Forbidden, ...) while the rule holds.
    conflict_on: Mutex<Option<(WriteRule, u16)>>,
    /// Writes never answered while the rule holds (an apiserver that stopped answering).
    hang_on: Mutex<Option<WriteRule>>,
    pub watches: AtomicU32,
    pub lists: AtomicU32,
    pub expired: AtomicU32,
    pub conflicts: AtomicU32,
    /// Method and path of every write, in order.
    pub write_log: Mutex<Vec<String>>,
    /// Path of every read that is not a watch (gets and lists), in order.
    pub read_log: Mutex<Vec<String>>,
}

impl KubeFaults {
    /// Answers the next `n` watch requests with 410 Gone (open watches go on).
    pub fn expire_next_watches(&self, n: u32) {
        self.expire_watches.store(n, Ordering::SeqCst);
    }

    /// Ends every open watch and keeps new watches waiting until `release_watches`: events of
    /// that time reach the operator only through the relist that follows.
    pub fn hold_watches(&self) {
        self.hold(None);
    }

    /// Ends every open watch and keeps new watches of paths ending with `suffix` waiting (the
    /// others start again at once, from where they were).
    pub fn hold_watches_of(&self, suffix: &str) {
        self.hold(Some(suffix.to_string()));
    }

    fn hold(&self, only: Option<String>) {
        *self.hold.lock().unwrap() = Some((CancellationToken::new(), only));
        let old = std::mem::take(&mut *self.cut.lock().unwrap());
        old.cancel();
    }

    pub fn release_watches(&self) {
        if let Some((gate, _)) = self.hold.lock().unwrap().take() {
            gate.cancel();
        }
    }

    /// Answers writes matching `rule` (method, path) with 409 Conflict until cleared.
    pub fn conflict_on(&self, rule: impl Fn(&Method, &str) -> bool + Send + Sync + 'static) {
        self.refuse_on(409, rule);
    }

    /// Answers writes matching `rule` (method, path) with `code` (403, 422, 409) until cleared.
    pub fn refuse_on(
        &self,
        code: u16,
        rule: impl Fn(&Method, &str) -> bool + Send + Sync + 'static,
    ) {
        *self.conflict_on.lock().unwrap() = Some((Box::new(rule), code));
    }

    /// Never answers writes matching `rule` until cleared (`clear_conflicts`).
    pub fn hang_on(&self, rule: impl Fn(&Method, &str) -> bool + Send + Sync + 'static) {
        *self.hang_on.lock().unwrap() = Some(Box::new(rule));
    }

    pub fn clear_conflicts(&self) {
        *self.conflict_on.lock().unwrap() = None;
        *self.hang_on.lock().unwrap() = None;
    }

    pub fn count(&self, c: &AtomicU32) -> u32 {
        c.load(Ordering::SeqCst)
    }

    /// Writes seen so far.
    pub fn writes(&self) -> usize {
        self.write_log.lock().unwrap().len()
    }

    /// Reads so far whose path ends with `suffix`.
    pub fn reads_of(&self, suffix: &str) -> usize {
        let log = self.read_log.lock().unwrap();
        log.iter().filter(|p| p.ends_with(suffix)).count()
    }

    fn inject(&self, req: &Request<Body>) -> Option<Response<Body>> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default();
        let is_watch = query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1");
        if req.method() == Method::GET {
            if is_watch {
                self.watches.fetch_add(1, Ordering::SeqCst);
                let left = self.expire_watches.load(Ordering::SeqCst);
                if left > 0
                    && self
                        .expire_watches
                        .compare_exchange(left, left - 1, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                {
                    self.expired.fetch_add(1, Ordering::SeqCst);
                    // what the apiserver sends for a watch from a compacted resourceVersion
                    let event = serde_json::json!({
                        "type": "ERROR",
                        "object": status(410, "Expired", "too old resource version: 1 (2)"),
                    });
                    let mut line = serde_json::to_vec(&event).unwrap();
                    line.push(b'\n');
                    return Some(Response::new(Body::from(line)));
                }
            } else {
                self.lists.fetch_add(1, Ordering::SeqCst);
                self.read_log.lock().unwrap().push(path);
            }
            return None;
        }
        self.write_log
            .lock()
            .unwrap()
            .push(format!("{} {path}", req.method()));
        let code = self
            .conflict_on
            .lock()
            .unwrap()
            .as_ref()
            .filter(|(rule, _)| rule(req.method(), &path))
            .map(|(_, code)| *code)?;
        self.conflicts.fetch_add(1, Ordering::SeqCst);
        let body = match code {
            409 => status(
                409,
                "Conflict",
                "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again",
            ),
            403 => status(
                403,
                "Forbidden",
                "secrets is forbidden: the test refuses this write",
            ),
            other => status(other, "Invalid", "the test refuses this write"),
        };
        let mut resp = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
        *resp.status_mut() = StatusCode::from_u16(code).unwrap();
        resp.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        Some(resp)
    }
}

fn status(code: u16, reason: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    })
}

/// A client that sends through `faults` to the apiserver `inner` talks to.
pub fn client(inner: Client, faults: Arc<KubeFaults>) -> Client {
    let ns = inner.default_namespace().to_string();
    let svc = tower::service_fn(move |req: Request<Body>| {
        let inner = inner.clone();
        let faults = faults.clone();
        async move {
            let is_watch = req.uri().query().is_some_and(|q| q.contains("watch="));
            let gate = faults.hold.lock().unwrap().clone();
            let path = req.uri().path().to_string();
            if let Some((gate, _)) = gate.filter(|(_, only)| {
                is_watch
                    && only
                        .as_ref()
                        .is_none_or(|suffix| path.ends_with(suffix.as_str()))
            }) {
                gate.cancelled().await;
            }
            let hangs = req.method() != Method::GET
                && faults
                    .hang_on
                    .lock()
                    .unwrap()
                    .as_ref()
                    .is_some_and(|rule| rule(req.method(), &path));
            if hangs {
                std::future::pending::<()>().await;
            }
            if let Some(resp) = faults.inject(&req) {
                return Ok::<_, kube::Error>(resp.map(|b| Cuttable {
                    inner: b,
                    cut: None,
                }));
            }
            let cut =
                is_watch.then(|| Box::pin(faults.cut.lock().unwrap().clone().cancelled_owned()));
            let resp = inner.send(req).await?;
            Ok(resp.map(|b| Cuttable { inner: b, cut }))
        }
    });
    Client::new(svc, ns)
}

/// A response body that ends early when its watch is cut.
pub struct Cuttable {
    inner: Body,
    cut: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl HttpBody for Cuttable {
    type Data = Bytes;
    type Error = kube::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, kube::Error>>> {
        if let Some(cut) = self.cut.as_mut()
            && cut.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
