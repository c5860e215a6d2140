//! Events on NetbirdInstances, with repeats counted in a series, keeping little per Event.
//!
//! kube's `Recorder` keeps every Event it publishes whole, with its key (the Event, two copies of
//! the object reference, about 3 KiB), for six minutes, and forgets old ones only when it
//! publishes the next: after a fleet bootstraps, one Event per instance stays in memory until the
//! operator publishes again (measured: 3.0 KiB per Event, 29 MiB for a fleet of 10,000). This
//! recorder publishes the same Events (same name, fields and series) and keeps, per Event of the
//! last six minutes, a digest of its key, its name and its count.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use sha2::{Digest, Sha256};

use super::lock;

/// A repeat of an Event within this time joins its series (kube's Recorder: the same).
const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// Publishes Events; clones share what was published.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    recent: Arc<Mutex<Recent>>,
}

/// The Events of the last [`SERIES_WINDOW`], by digest of what makes two Events the same.
#[derive(Default)]
struct Recent {
    events: HashMap<[u8; 16], Published>,
    swept: Option<Timestamp>,
}

struct Published {
    name: Box<str>,
    count: i32,
    last: Timestamp,
}

impl Recent {
    /// Name and count of the same Event published within the window.
    fn get(&self, key: &[u8; 16], now: Timestamp) -> Option<(String, i32)> {
        self.events
            .get(key)
            .filter(|p| p.last + SERIES_WINDOW > now)
            .map(|p| (p.name.to_string(), p.count))
    }

    fn put(&mut self, key: [u8; 16], name: &str, count: i32, now: Timestamp) {
        // forget what left the window, at most once a minute (each sweep reads every entry)
        if self
            .swept
            .is_none_or(|t| t + SignedDuration::from_mins(1) <= now)
        {
            self.events.retain(|_, p| p.last + SERIES_WINDOW > now);
            self.events.shrink_to_fit();
            self.swept = Some(now);
        }
        self.events.insert(
            key,
            Published {
                name: name.into(),
                count,
                last: now,
            },
        );
    }
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            recent: Arc::default(),
        }
    }

    /// What makes two Events the same (kube's `EventKey`): type, action, reason, reporter, the
    /// object and the related object; not the note.
    fn key(&self, ev: &Event, regarding: &ObjectReference) -> [u8; 16] {
        let mut h = Sha256::new();
        let mut field = |s: Option<&str>| {
            // present or not, then length-prefixed: no two keys write the same bytes
            match s {
                Some(s) => {
                    h.update([1]);
                    h.update((s.len() as u64).to_le_bytes());
                    h.update(s.as_bytes());
                }
                None => h.update([0]),
            }
        };
        field(Some(match ev.type_ {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }));
        field(Some(&ev.action));
        field(Some(&ev.reason));
        field(Some(&self.reporter.controller));
        field(self.reporter.instance.as_deref());
        for r in std::iter::once(Some(regarding)).chain([ev.secondary.as_ref()]) {
            match r {
                Some(r) => {
                    field(Some("ref"));
                    for f in [
                        &r.api_version,
                        &r.kind,
                        &r.name,
                        &r.namespace,
                        &r.uid,
                        &r.resource_version,
                        &r.field_path,
                    ] {
                        field(f.as_deref());
                    }
                }
                None => field(None),
            }
        }
        let digest = h.finalize();
        let mut key = [0; 16];
        key.copy_from_slice(&digest[..16]);
        key
    }

    /// A new Event (as kube's Recorder makes it).
    fn event(&self, ev: &Event, reference: &ObjectReference, now: Timestamp) -> K8sEvent {
        K8sEvent {
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            event_time: Some(MicroTime(now)),
            regarding: Some(reference.clone()),
            note: ev.note.clone(),
            metadata: ObjectMeta {
                namespace: reference.namespace.clone(),
                name: Some(format!(
                    "{}.{:x}",
                    reference.name.as_ref().unwrap_or(&self.reporter.controller),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            type_: Some(
                match ev.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            related: ev.secondary.clone(),
            ..Default::default()
        }
    }

    /// Publishes `ev` on the object `reference`: a new Event, or the same Event of the last six
    /// minutes with its series count raised.
    pub async fn publish(
        &self,
        ev: &Event,
        reference: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = self.key(ev, reference);
        let events: Api<K8sEvent> = Api::namespaced(
            self.client.clone(),
            reference.namespace.as_deref().unwrap_or("default"),
        );
        let repeat = lock(&self.recent).get(&key, now);
        let (name, count) = match repeat {
            Some((name, count)) => {
                let series = EventSeries {
                    count: count + 1,
                    last_observed_time: MicroTime(now),
                };
                let patch = serde_json::json!({ "series": series });
                events
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                (name, count + 1)
            }
            None => {
                let event = self.event(ev, reference, now);
                events.create(&PostParams::default(), &event).await?;
                (event.metadata.name.unwrap_or_default(), 1)
            }
        };
        lock(&self.recent).put(key, &name, count, now);
        Ok(())
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        lock(&self.recent).events.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;

    type Seen = Arc<Mutex<Vec<(String, String, serde_json::Value)>>>;

    /// A client whose apiserver answers every request with its own body, and what it was sent.
    fn client() -> (Client, Seen) {
        let seen = Seen::default();
        let log = seen.clone();
        let svc = tower::service_fn(move |req: Request<Body>| {
            let log = log.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect_bytes().await?;
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                lock(&log).push((parts.method.to_string(), parts.uri.path().into(), json));
                let mut resp = Response::new(Body::from(body.to_vec()));
                *resp.status_mut() = http::StatusCode::CREATED;
                Ok::<_, kube::Error>(resp)
            }
        });
        (Client::new(svc, "default"), seen)
    }

    fn reference(name: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("bootstrap.netbird.io/v1alpha1".into()),
            kind: Some("NetbirdInstance".into()),
            name: Some(name.into()),
            namespace: Some("ns".into()),
            uid: Some(format!("uid-{name}")),
            resource_version: Some("1".into()),
            field_path: None,
        }
    }

    fn event(reason: &str, note: &str) -> Event {
        Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note.into()),
            action: "Reconcile".into(),
            secondary: None,
        }
    }

    fn recorder(client: Client) -> Recorder {
        Recorder::new(
            client,
            Reporter {
                controller: "netbird-operator".into(),
                instance: Some("pod-1".into()),
            },
        )
    }

    #[tokio::test]
    async fn a_repeat_joins_the_first_events_series() {
        let (client, seen) = client();
        let r = recorder(client);
        for _ in 0..3 {
            r.publish(&event("WriteStatusFailed", "forbidden"), &reference("a"))
                .await
                .unwrap();
        }
        let seen = lock(&seen).clone();
        let (method, path, created) = &seen[0];
        assert_eq!(
            (method.as_str(), path.as_str()),
            ("POST", "/apis/events.k8s.io/v1/namespaces/ns/events")
        );
        let name = created["metadata"]["name"].as_str().unwrap();
        assert!(name.starts_with("a."));
        assert_eq!(created["reason"], "WriteStatusFailed");
        assert_eq!(created["note"], "forbidden");
        assert_eq!(created["type"], "Warning");
        assert_eq!(created["action"], "Reconcile");
        assert_eq!(created["reportingController"], "netbird-operator");
        assert_eq!(created["reportingInstance"], "pod-1");
        assert_eq!(created["regarding"]["name"], "a");
        assert!(created.get("series").is_none());
        for (i, (method, path, patch)) in seen[1..].iter().enumerate() {
            assert_eq!(method, "PATCH");
            assert_eq!(
                path,
                &format!("/apis/events.k8s.io/v1/namespaces/ns/events/{name}")
            );
            assert_eq!(patch["series"]["count"], i as i64 + 2);
            assert!(patch["series"]["lastObservedTime"].is_string());
        }
        assert_eq!(r.remembered(), 1);
    }

    #[tokio::test]
    async fn another_reason_or_object_is_another_event_and_the_note_is_not_the_key() {
        let (client, seen) = client();
        let r = recorder(client);
        r.publish(&event("A", "one"), &reference("a"))
            .await
            .unwrap();
        r.publish(&event("A", "two"), &reference("a"))
            .await
            .unwrap();
        r.publish(&event("B", "one"), &reference("a"))
            .await
            .unwrap();
        r.publish(&event("A", "one"), &reference("b"))
            .await
            .unwrap();
        let methods: Vec<String> = lock(&seen).iter().map(|s| s.0.clone()).collect();
        assert_eq!(methods, ["POST", "PATCH", "POST", "POST"]);
        assert_eq!(r.remembered(), 3);
    }

    #[test]
    fn the_window_ends_six_minutes_after_the_last_repeat_and_old_events_are_forgotten() {
        let mut recent = Recent::default();
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        recent.put([1; 16], "e1", 1, t0);
        let at = |m: i64| t0 + SignedDuration::from_mins(m);
        assert_eq!(recent.get(&[1; 16], at(5)), Some(("e1".into(), 1)));
        recent.put([1; 16], "e1", 2, at(5));
        assert_eq!(recent.get(&[1; 16], at(10)), Some(("e1".into(), 2)));
        assert_eq!(recent.get(&[1; 16], at(11)), None);
        recent.put([2; 16], "e2", 1, at(12));
        assert!(!recent.events.contains_key(&[1; 16]), "swept");
        assert_eq!(recent.events.len(), 1);
    }

    #[tokio::test]
    async fn a_failed_publish_is_not_remembered() {
        let svc = tower::service_fn(|_req: Request<Body>| async {
            let body = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "forbidden", "reason": "Forbidden", "code": 403});
            let mut resp = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
            *resp.status_mut() = http::StatusCode::FORBIDDEN;
            Ok::<_, kube::Error>(resp)
        });
        let r = recorder(Client::new(svc, "default"));
        assert!(r.publish(&event("A", "x"), &reference("a")).await.is_err());
        assert_eq!(r.remembered(), 0);
    }
}
