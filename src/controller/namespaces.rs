//! Watching several namespaces with one reflector.
//!
//! A namespaced watch per namespace is what a Role in each namespace allows (a cluster-wide watch
//! needs a ClusterRole). Their events cannot simply be interleaved into one reflector: the
//! reflector treats every `Init … InitDone` as a complete list of all objects and swaps its store
//! for it, so the first namespace to finish its list would hide the others, and a relist of one
//! namespace would drop every other namespace's objects. [`merge`] turns the per-namespace streams
//! into one stream with the reflector's meaning: one `Init … InitDone` covering all namespaces at
//! the start (ready only once every namespace has been listed), and after that a namespace's relist
//! as plain `Apply` events plus a `Delete` for each object that the relist no longer has.

use std::collections::HashMap;

use futures::{Stream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::watcher::{self, Event};

/// One stream of watcher events for several namespaces, in the reflector's terms. `streams` holds
/// one watcher stream per namespace, each with the namespace it watches.
pub fn merge<K, S>(streams: Vec<(String, S)>) -> impl Stream<Item = watcher::Result<Event<K>>>
where
    K: Resource + Clone + Send + 'static,
    S: Stream<Item = watcher::Result<Event<K>>> + Send + 'static,
{
    let mut state = Merge::new(streams.iter().map(|(ns, _)| ns.clone()).collect());
    let tagged = streams
        .into_iter()
        .enumerate()
        .map(|(i, (_, s))| s.map(move |e| (i, e)).boxed());
    futures::stream::select_all(tagged).flat_map(move |(i, event)| {
        let out: Vec<watcher::Result<Event<K>>> = match event {
            Ok(event) => state.step(i, event).into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e)],
        };
        futures::stream::iter(out)
    })
}

/// What the merged stream has told the reflector so far, by namespace (stream index).
struct Merge<K> {
    namespaces: Vec<String>,
    /// Names (with uids) the reflector holds, or buffers before the first complete list, per
    /// namespace.
    names: Vec<HashMap<String, Option<String>>>,
    /// Names (with uids) seen so far in a namespace's list in progress.
    listing: Vec<Option<HashMap<String, Option<String>>>>,
    /// Namespaces whose first list is complete.
    listed: Vec<bool>,
    /// Deletions seen before every namespace was listed: the reflector's buffer cannot forget an
    /// object, so they are sent right after the first `InitDone`.
    deferred: Vec<HashMap<String, Option<String>>>,
    started: bool,
    synced: bool,
    /// Any object seen: a `Delete` needs an object, and only its name, namespace and uid matter
    /// downstream (a copy of this one with its metadata replaced).
    template: Option<K>,
}

impl<K: Resource + Clone> Merge<K> {
    fn new(namespaces: Vec<String>) -> Self {
        let n = namespaces.len();
        Self {
            namespaces,
            names: vec![HashMap::new(); n],
            listing: vec![None; n],
            listed: vec![false; n],
            deferred: vec![HashMap::new(); n],
            started: false,
            synced: false,
            template: None,
        }
    }

    /// The events to pass on for `event` of namespace `i`.
    fn step(&mut self, i: usize, event: Event<K>) -> Vec<Event<K>> {
        match event {
            Event::Init => {
                self.listing[i] = Some(HashMap::new());
                if self.started {
                    Vec::new()
                } else {
                    self.started = true;
                    vec![Event::Init]
                }
            }
            Event::InitApply(obj) => {
                let (name, uid) = self.note(&obj);
                if let Some(l) = self.listing[i].as_mut() {
                    l.insert(name.clone(), uid.clone());
                }
                self.applied(i, name, uid, obj)
            }
            Event::Apply(obj) => {
                let (name, uid) = self.note(&obj);
                self.applied(i, name, uid, obj)
            }
            Event::Delete(obj) => {
                let (name, uid) = self.note(&obj);
                self.names[i].remove(&name);
                if self.synced {
                    vec![Event::Delete(obj)]
                } else {
                    self.deferred[i].insert(name, uid);
                    Vec::new()
                }
            }
            Event::InitDone => {
                let listed = self.listing[i].take().unwrap_or_default();
                let gone: Vec<(String, Option<String>)> = self.names[i]
                    .iter()
                    .filter(|(name, _)| !listed.contains_key(*name))
                    .map(|(name, uid)| (name.clone(), uid.clone()))
                    .collect();
                self.names[i] = listed;
                if self.synced {
                    return gone
                        .iter()
                        .filter_map(|(name, uid)| self.tombstone(i, name, uid))
                        .collect();
                }
                self.deferred[i].extend(gone);
                self.listed[i] = true;
                if !self.listed.iter().all(|l| *l) {
                    return Vec::new();
                }
                self.synced = true;
                let mut out = vec![Event::InitDone];
                for j in 0..self.deferred.len() {
                    for (name, uid) in std::mem::take(&mut self.deferred[j]) {
                        out.extend(self.tombstone(j, &name, &uid));
                    }
                }
                out
            }
        }
    }

    fn applied(&mut self, i: usize, name: String, uid: Option<String>, obj: K) -> Vec<Event<K>> {
        self.names[i].insert(name.clone(), uid);
        if self.synced {
            vec![Event::Apply(obj)]
        } else {
            // before the first complete list everything goes into the reflector's buffer
            self.deferred[i].remove(&name);
            vec![Event::InitApply(obj)]
        }
    }

    /// The object's name and uid; the first object becomes the template of tombstones.
    fn note(&mut self, obj: &K) -> (String, Option<String>) {
        if self.template.is_none() {
            self.template = Some(obj.clone());
        }
        let meta = obj.meta();
        (meta.name.clone().unwrap_or_default(), meta.uid.clone())
    }

    fn tombstone(&self, i: usize, name: &str, uid: &Option<String>) -> Option<Event<K>> {
        let mut obj = self.template.clone()?;
        *obj.meta_mut() = ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(self.namespaces[i].clone()),
            uid: uid.clone(),
            ..ObjectMeta::default()
        };
        Some(Event::Delete(obj))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector::{self, Store, store::Writer};

    fn cm(ns: &str, name: &str, rv: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                resource_version: Some(rv.into()),
                uid: Some(format!("uid-{ns}-{name}")),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        }
    }

    struct Harness {
        merge: Merge<ConfigMap>,
        writer: Writer<ConfigMap>,
        store: Store<ConfigMap>,
    }

    impl Harness {
        fn new() -> Self {
            let (store, writer) = reflector::store();
            Self {
                merge: Merge::new(vec!["a".into(), "b".into()]),
                writer,
                store,
            }
        }
        /// Feeds an event; returns the uids of the deletions passed on.
        fn feed(&mut self, i: usize, event: Event<ConfigMap>) -> Vec<String> {
            let mut deleted = Vec::new();
            for e in self.merge.step(i, event) {
                if let Event::Delete(c) = &e {
                    deleted.extend(c.metadata.uid.clone());
                }
                self.writer.apply_watcher_event(&e);
            }
            deleted
        }
        /// A complete list of namespace `i`; returns the uids of the deletions passed on.
        fn list(&mut self, i: usize, objs: &[ConfigMap]) -> Vec<String> {
            let mut deleted = self.feed(i, Event::Init);
            for o in objs {
                deleted.extend(self.feed(i, Event::InitApply(o.clone())));
            }
            deleted.extend(self.feed(i, Event::InitDone));
            deleted
        }
        fn state(&self) -> Vec<(String, String, String)> {
            let mut v: Vec<_> = self
                .store
                .state()
                .iter()
                .map(|c| {
                    (
                        c.metadata.namespace.clone().unwrap(),
                        c.metadata.name.clone().unwrap(),
                        c.metadata.resource_version.clone().unwrap_or_default(),
                    )
                })
                .collect();
            v.sort();
            v
        }
        async fn ready(&self) -> bool {
            tokio::time::timeout(
                std::time::Duration::from_millis(10),
                self.store.wait_until_ready(),
            )
            .await
            .is_ok()
        }
    }

    fn t(ns: &str, name: &str, rv: &str) -> (String, String, String) {
        (ns.into(), name.into(), rv.into())
    }

    #[tokio::test]
    async fn ready_only_when_every_namespace_is_listed_and_none_hides_another() {
        let mut h = Harness::new();
        h.list(0, &[cm("a", "x", "1"), cm("a", "y", "1")]);
        assert!(!h.ready().await, "ready after one namespace of two");
        assert!(h.state().is_empty());
        // a change in the listed namespace while the other still lists is not lost
        h.feed(0, Event::Apply(cm("a", "x", "2")));
        h.feed(0, Event::Delete(cm("a", "y", "1")));
        h.list(1, &[cm("b", "z", "1")]);
        assert!(h.ready().await);
        assert_eq!(h.state(), vec![t("a", "x", "2"), t("b", "z", "1")]);
    }

    #[tokio::test]
    async fn a_relist_of_one_namespace_keeps_the_others_and_drops_its_gone_objects() {
        let mut h = Harness::new();
        h.list(0, &[cm("a", "x", "1"), cm("a", "y", "1")]);
        h.list(1, &[cm("b", "z", "1")]);
        h.feed(1, Event::Apply(cm("b", "w", "1")));
        // namespace a relists (its watch expired): y was deleted meanwhile, x changed, v is new
        let deleted = h.list(0, &[cm("a", "x", "3"), cm("a", "v", "1")]);
        assert_eq!(deleted, ["uid-a-y"], "the deletion names the object's uid");
        assert_eq!(
            h.state(),
            vec![
                t("a", "v", "1"),
                t("a", "x", "3"),
                t("b", "w", "1"),
                t("b", "z", "1")
            ]
        );
        h.feed(1, Event::Delete(cm("b", "z", "1")));
        assert_eq!(h.state().len(), 3);
    }

    #[tokio::test]
    async fn a_namespace_relisting_before_the_first_sync_forgets_what_it_lost() {
        let mut h = Harness::new();
        h.list(0, &[cm("a", "x", "1"), cm("a", "y", "1")]);
        // a's watch failed and relisted before b was listed: y is gone
        h.list(0, &[cm("a", "x", "2")]);
        // a deleted and re-created object before the first sync is kept
        h.feed(0, Event::Delete(cm("a", "x", "2")));
        h.feed(0, Event::Apply(cm("a", "x", "3")));
        let deleted = h.list(1, &[]);
        assert_eq!(
            deleted,
            ["uid-a-y"],
            "y is forgotten once everything is listed"
        );
        assert_eq!(h.state(), vec![t("a", "x", "3")]);
    }
}
