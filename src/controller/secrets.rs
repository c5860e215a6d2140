//! The Secrets a pass reads and writes, through a cache of the ones passes use.
//!
//! Secrets are watched by metadata only, so memory does not grow with the cluster's Secrets. A
//! Secret a pass has read or written is kept (as its JSON, without managedFields: see `trim.rs`)
//! and used again while the metadata watch reports that very resourceVersion; a pass woken by the
//! operator's own writes then reads nothing from the apiserver. Anything else is a GET: a version the watch has not reported
//! yet (the operator's own write included: a write response is kept, but only trusted once the
//! watch confirms it), a moved version, a deletion, a relist of the watch, an absent Secret.
//!
//! Absence is known from the watch too: once it has listed every Secret, a Secret it never
//! reported does not exist (as of the watch), and [`Secrets::lookup`] says so without a GET. The
//! watch may lag a creation by someone else; a caller takes such an absence for what it is (see
//! [`Lookup::Unseen`]). The names of the Secrets the watch reports are kept for that (about 50
//! bytes a Secret).
//!
//! Written here rather than with a kube reflector: a reflector caches every Secret it watches (all
//! of the cluster's, or a label selector's, which the user's credentials Secret does not carry),
//! while this keeps only the Secrets that instances reference.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

use super::lock;

/// More entries than this and the cache starts over. A safety net only: entries are the Secrets
/// that instances reference (a Secret no instance references any more is forgotten, see
/// `refs.rs`, and a deleted Secret's entry goes with its watch event), up to three per instance.
const MAX_ENTRIES: usize = 65_536;

#[derive(Default)]
struct Entry {
    /// The resourceVersion the metadata watch last reported (None: not reported since the entry
    /// was made).
    seen: Option<String>,
    /// The Secret as last read or written.
    secret: Option<Kept>,
    /// `secret` is this operator's own write.
    written: bool,
}

/// A cached Secret, kept as its JSON: one allocation of about 1 KiB for a token Secret, where the
/// parsed Secret (a map per labels, annotations and data, a string per key and value) takes about
/// 3 KiB. A pass that uses it parses it again (microseconds). The JSON is kept packed (see
/// [`packed`]): about 0.6 KiB for a token Secret.
struct Kept {
    version: Option<String>,
    json: Box<[u8]>,
}

impl Kept {
    fn new(mut secret: Secret) -> Option<Self> {
        super::trim::secret(&mut secret);
        let json = packed::pack(&serde_json::to_vec(&secret).ok()?);
        Some(Self {
            version: secret.metadata.resource_version,
            json,
        })
    }
}

impl Entry {
    /// The kept Secret's JSON, when it is the version the watch reports.
    fn current(&self) -> Option<Vec<u8>> {
        let kept = self.secret.as_ref()?;
        (self.seen.is_some() && kept.version == self.seen).then(|| packed::unpack(&kept.json))
    }
}

/// A Secret's JSON with the substrings every token Secret repeats replaced by one byte each: a
/// control character, which serde_json never writes unescaped (it writes `\u0001`), so the
/// replacement is undone exactly. About half of a token Secret's JSON (its annotation and label
/// keys, the metadata's keys).
mod packed {
    use crate::token_secret::*;

    /// Replaced by byte 1, 2, ... (at most 31: bytes below 0x20): where one word begins with
    /// another, the longer one first.
    pub(super) const WORDS: [&[u8]; 30] = [
        b"{\"apiVersion\":\"v1\",\"kind\":\"Secret\",",
        b"\"metadata\":{",
        b"\"annotations\":{",
        b"\"labels\":{",
        b"\"creationTimestamp\":\"",
        b"\"resourceVersion\":\"",
        b"\"namespace\":\"",
        b"\"name\":\"",
        b"\"uid\":\"",
        b"\"data\":{",
        b"\"type\":\"Opaque\"",
        b"\"ownerReferences\":[",
        b"\"app.kubernetes.io/managed-by\":\"netbird-operator\"",
        b"\"NB_API_KEY\"",
        LABEL_INSTANCE.as_bytes(),
        ANN_USER_ID.as_bytes(),
        ANN_EXPIRES_AT.as_bytes(),
        ANN_SETUP_STARTED_AT.as_bytes(),
        ANN_SETUP_COMPLETED_AT.as_bytes(),
        ANN_SETUP_OUTCOME.as_bytes(),
        ANN_FINGERPRINT.as_bytes(),
        ANN_CREDENTIALS_CHECKED.as_bytes(),
        ANN_TOKEN_ID.as_bytes(),
        ANN_TOKEN_KEY.as_bytes(),
        ANN_ISSUED_AT.as_bytes(),
        ANN_ROTATED_AT.as_bytes(),
        ANN_PREVIOUS_TOKEN_ID.as_bytes(),
        ANN_PREVIOUS_DELETE_AT.as_bytes(),
        ANN_SERVICE_USER.as_bytes(),
        // the other annotations' prefix, after the keys it begins
        b"bootstrap.netbird.io/",
    ];

    /// `json` (serde_json's output: no unescaped control characters) with the words replaced.
    pub(super) fn pack(json: &[u8]) -> Box<[u8]> {
        let mut out = Vec::with_capacity(json.len());
        let mut rest = json;
        'next: while let Some(&b) = rest.first() {
            for (i, word) in WORDS.iter().enumerate() {
                if rest.starts_with(word) {
                    out.push(i as u8 + 1);
                    rest = &rest[word.len()..];
                    continue 'next;
                }
            }
            out.push(b);
            rest = &rest[1..];
        }
        out.into_boxed_slice()
    }

    /// The JSON `pack` was given.
    pub(super) fn unpack(packed: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(packed.len() * 2);
        for &b in packed {
            match WORDS.get(usize::from(b).wrapping_sub(1)) {
                Some(word) => out.extend_from_slice(word),
                None => out.push(b),
            }
        }
        out
    }
}

/// Held while a Secret is read (see [`Secrets::get`]).
type ReadGate = Arc<tokio::sync::Mutex<()>>;

/// Referenced Secrets by namespace and name, and the names of all Secrets the watch reported.
#[derive(Default)]
pub struct SecretCache {
    entries: Mutex<HashMap<(String, String), Entry>>,
    names: Mutex<Names>,
    /// One read of a Secret at a time: the passes that want it meanwhile wait and take what it
    /// read (the first passes after a start all want the shared credentials Secret).
    reads: Mutex<HashMap<(String, String), ReadGate>>,
}

/// The names of the Secrets that exist as far as the watch knows, by namespace.
#[derive(Default)]
struct Names {
    /// Complete once the watch has listed everything (false before the first list and during a
    /// relist: absence is then unknown).
    synced: bool,
    current: HashMap<String, HashSet<Box<str>>>,
    /// A relist in progress: replaces `current` when it is done.
    listing: Option<HashMap<String, HashSet<Box<str>>>>,
}

impl Names {
    fn insert(&mut self, ns: &str, name: &str) {
        for map in std::iter::once(&mut self.current).chain(self.listing.as_mut()) {
            if let Some(names) = map.get_mut(ns) {
                if !names.contains(name) {
                    names.insert(name.into());
                }
            } else {
                map.insert(ns.to_string(), HashSet::from([name.into()]));
            }
        }
    }

    fn remove(&mut self, ns: &str, name: &str) {
        for map in std::iter::once(&mut self.current).chain(self.listing.as_mut()) {
            if let Some(names) = map.get_mut(ns) {
                names.remove(name);
                if names.is_empty() {
                    map.remove(ns);
                }
            }
        }
    }

    /// Known not to exist: the listed watch never reported it.
    fn unseen(&self, ns: &str, name: &str) -> bool {
        self.synced && !self.current.get(ns).is_some_and(|n| n.contains(name))
    }
}

fn key(ns: &str, name: &str) -> (String, String) {
    (ns.to_string(), name.to_string())
}

impl SecretCache {
    /// Takes note of an event of the Secrets' metadata watch.
    pub fn observe(&self, event: &watcher::Event<PartialObjectMeta<Secret>>) {
        let mut entries = lock(&self.entries);
        let mut names = lock(&self.names);
        match event {
            watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                let (Some(ns), name) = (s.namespace(), s.name_any()) else {
                    return;
                };
                names.insert(&ns, &name);
                if let Some(e) = entries.get_mut(&key(&ns, &name)) {
                    e.seen.clone_from(&s.metadata.resource_version);
                }
            }
            watcher::Event::Delete(s) => {
                if let Some(ns) = s.namespace() {
                    names.remove(&ns, &s.name_any());
                    entries.remove(&key(&ns, &s.name_any()));
                }
            }
            // a relist: deletions during the gap are not reported one by one
            watcher::Event::Init => {
                entries.clear();
                names.synced = false;
                names.listing = Some(HashMap::new());
            }
            watcher::Event::InitDone => {
                if let Some(listed) = names.listing.take() {
                    names.current = listed;
                }
                names.synced = true;
            }
        }
    }

    /// Known not to exist: the watch has listed every Secret and never reported this one, and no
    /// write of this operator made it.
    fn unseen(&self, ns: &str, name: &str) -> bool {
        let written = lock(&self.entries)
            .get(&key(ns, name))
            .is_some_and(|e| e.secret.is_some());
        !written && lock(&self.names).unseen(ns, name)
    }

    /// The Secret exists though the watch may not have said so yet (an own create, or one that
    /// failed because the Secret exists).
    fn exists(&self, ns: &str, name: &str) {
        lock(&self.names).insert(ns, name);
    }

    fn current(&self, ns: &str, name: &str) -> Option<Secret> {
        let json = lock(&self.entries)
            .get(&key(ns, name))
            .and_then(Entry::current)?;
        serde_json::from_slice(&json).ok()
    }

    /// The lock that lets one read of this Secret happen at a time.
    fn read_gate(&self, ns: &str, name: &str) -> ReadGate {
        lock(&self.reads).entry(key(ns, name)).or_default().clone()
    }

    /// Done with the read lock: it goes when nobody else holds or waits for it.
    fn release_read_gate(&self, ns: &str, name: &str, gate: ReadGate) {
        let mut reads = lock(&self.reads);
        // the map's reference and this one
        if Arc::strong_count(&gate) <= 2 {
            reads.remove(&key(ns, name));
        }
    }

    /// Before a GET: from now on the watch's reports for this Secret are kept.
    fn expect(&self, ns: &str, name: &str) {
        let mut entries = lock(&self.entries);
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.entry(key(ns, name)).or_default();
    }

    /// After a GET. The version read counts as reported by the watch only when the watch reported
    /// nothing during the GET (a report during it may be newer; then the next pass reads again).
    fn read(&self, ns: &str, name: &str, got: Option<&Secret>) {
        if let Some(e) = lock(&self.entries).get_mut(&key(ns, name)) {
            if e.seen.is_none() {
                e.seen = got.and_then(|s| s.metadata.resource_version.clone());
            }
            e.secret = got.cloned().and_then(Kept::new);
            e.written = false;
        }
    }

    /// After a write: kept, and used once the watch reports its version.
    fn wrote(&self, ns: &str, name: &str, written: &Secret) {
        let mut entries = lock(&self.entries);
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        let e = entries.entry(key(ns, name)).or_default();
        e.secret = Kept::new(written.clone());
        e.written = true;
    }

    /// No instance references the Secret any more: its entry goes (its name stays, the Secret
    /// exists).
    pub fn forget(&self, ns: &str, name: &str) {
        lock(&self.entries).remove(&key(ns, name));
    }

    /// The watch reports a version this operator wrote itself: the pass that wrote it went on with
    /// it, so the event brings that instance nothing new.
    pub fn own_write(&self, meta: &ObjectMeta) -> bool {
        let (Some(ns), Some(name), Some(rv)) =
            (&meta.namespace, &meta.name, &meta.resource_version)
        else {
            return false;
        };
        lock(&self.entries).get(&key(ns, name)).is_some_and(|e| {
            e.written && e.secret.as_ref().and_then(|s| s.version.as_ref()) == Some(rv)
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.entries).len()
    }
}

/// The Secrets of one namespace as a pass sees them: reads through the cache, writes recorded in
/// it.
pub struct Secrets<'a> {
    api: Api<Secret>,
    ns: String,
    cache: &'a SecretCache,
}

impl<'a> Secrets<'a> {
    pub fn new(client: kube::Client, ns: &str, cache: &'a SecretCache) -> Self {
        Self {
            api: Api::namespaced(client, ns),
            ns: ns.to_string(),
            cache,
        }
    }

    /// The Secret, from the cache when the watch confirms it is current; [`Lookup::Unseen`] when
    /// the watch says it does not exist; else from the apiserver.
    pub async fn lookup(&self, name: &str) -> Result<Lookup, kube::Error> {
        if self.cache.current(&self.ns, name).is_none() && self.cache.unseen(&self.ns, name) {
            return Ok(Lookup::Unseen);
        }
        Ok(match self.get(name).await? {
            Some(s) => Lookup::Found(Box::new(s)),
            None => Lookup::Gone,
        })
    }

    /// The Secret, from the cache when the watch confirms it is current, else from the apiserver
    /// (one read of a Secret at a time; a pass that waited for another's read takes its result
    /// when it is current).
    pub async fn get(&self, name: &str) -> Result<Option<Secret>, kube::Error> {
        if let Some(s) = self.cache.current(&self.ns, name) {
            return Ok(Some(s));
        }
        let gate = self.cache.read_gate(&self.ns, name);
        let got = async {
            let _one_at_a_time = gate.lock().await;
            if let Some(s) = self.cache.current(&self.ns, name) {
                return Ok(Some(s));
            }
            self.cache.expect(&self.ns, name);
            let got = self.api.get_opt(name).await?;
            self.cache.read(&self.ns, name, got.as_ref());
            Ok(got)
        }
        .await;
        self.cache.release_read_gate(&self.ns, name, gate);
        got
    }

    /// The Secret as the apiserver has it now, whatever the cache holds (a lagging watch cannot
    /// tell that its copy is old).
    pub async fn get_uncached(&self, name: &str) -> Result<Option<Secret>, kube::Error> {
        self.api.get_opt(name).await
    }

    /// Drops the kept copy of a Secret: the next get reads it from the apiserver (a lagging watch
    /// cannot tell that its copy is old).
    pub fn read_fresh_next(&self, name: &str) {
        self.cache.forget(&self.ns, name);
    }

    /// A JSON merge patch; returns the Secret as written. A conflict (the patch named a version
    /// that is not the current one) drops the kept copy.
    pub async fn patch(
        &self,
        name: &str,
        patch: &serde_json::Value,
    ) -> Result<Secret, kube::Error> {
        let written = match self
            .api
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                if let kube::Error::Api(s) = &e
                    && s.code == 409
                {
                    // changed since the version the patch named: the kept copy is old, whatever
                    // the watch says yet (the next get reads it)
                    self.cache.forget(&self.ns, name);
                }
                return Err(e);
            }
        };
        self.cache.wrote(&self.ns, name, &written);
        Ok(written)
    }

    /// Creates the Secret; returns it as written.
    pub async fn create(&self, secret: &Secret) -> Result<Secret, kube::Error> {
        let written = match self.api.create(&PostParams::default(), secret).await {
            Ok(s) => s,
            Err(e) => {
                if let kube::Error::Api(s) = &e
                    && s.code == 409
                {
                    // it exists, whatever the watch says yet: the next lookup reads it
                    self.cache.exists(&self.ns, &secret.name_any());
                }
                return Err(e);
            }
        };
        self.cache.exists(&self.ns, &written.name_any());
        self.cache.wrote(&self.ns, &written.name_any(), &written);
        Ok(written)
    }
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    Found(Box<Secret>),
    /// Read from the apiserver: it does not exist.
    Gone,
    /// Not read: the watch, which has listed every Secret, never reported it. A Secret created a
    /// moment ago by someone else may not be reported yet; its watch event follows and wakes the
    /// instances that reference it. So an absence that decides a verdict is read again first.
    Unseen,
}

impl Lookup {
    pub fn into_option(self) -> Option<Secret> {
        match self {
            Lookup::Found(s) => Some(*s),
            Lookup::Gone | Lookup::Unseen => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn secret(rv: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("s".into()),
                namespace: Some("ns".into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn meta(rv: &str) -> PartialObjectMeta<Secret> {
        PartialObjectMeta {
            types: None,
            metadata: secret(rv).metadata,
            _phantom: std::marker::PhantomData,
        }
    }

    fn cached_rv(c: &SecretCache) -> Option<String> {
        c.current("ns", "s")
            .and_then(|s| s.metadata.resource_version)
    }

    #[test]
    fn a_read_is_used_until_the_watch_reports_another_version() {
        let c = SecretCache::default();
        assert_eq!(cached_rv(&c), None);
        c.expect("ns", "s");
        c.read("ns", "s", Some(&secret("1")));
        assert_eq!(cached_rv(&c).as_deref(), Some("1"));
        c.observe(&watcher::Event::Apply(meta("2")));
        assert_eq!(cached_rv(&c), None, "moved: read again");
        c.read("ns", "s", Some(&secret("2")));
        assert_eq!(cached_rv(&c).as_deref(), Some("2"));
    }

    #[test]
    fn a_report_during_the_read_wins_over_the_read() {
        let c = SecretCache::default();
        c.expect("ns", "s");
        c.observe(&watcher::Event::Apply(meta("2")));
        c.read("ns", "s", Some(&secret("1")));
        assert_eq!(cached_rv(&c), None);
    }

    #[test]
    fn an_own_write_is_trusted_once_the_watch_reports_it() {
        let c = SecretCache::default();
        c.wrote("ns", "s", &secret("5"));
        assert_eq!(cached_rv(&c), None);
        c.observe(&watcher::Event::Apply(meta("4")));
        assert_eq!(cached_rv(&c), None);
        c.observe(&watcher::Event::Apply(meta("5")));
        assert_eq!(cached_rv(&c).as_deref(), Some("5"));
    }

    #[test]
    fn deletions_relists_and_unread_secrets_are_forgotten() {
        let c = SecretCache::default();
        c.observe(&watcher::Event::Apply(meta("1")));
        assert_eq!(c.len(), 0, "a Secret no pass read is not kept");
        c.expect("ns", "s");
        c.read("ns", "s", Some(&secret("1")));
        c.observe(&watcher::Event::Delete(meta("2")));
        assert_eq!((cached_rv(&c), c.len()), (None, 0));
        c.expect("ns", "s");
        c.read("ns", "s", Some(&secret("3")));
        c.observe(&watcher::Event::Init);
        assert_eq!((cached_rv(&c), c.len()), (None, 0));
    }

    fn unseen(c: &SecretCache) -> bool {
        c.unseen("ns", "s")
    }

    #[test]
    fn absence_is_known_once_the_watch_has_listed_everything() {
        let c = SecretCache::default();
        assert!(!unseen(&c), "before the first list: unknown");
        c.observe(&watcher::Event::Init);
        assert!(!unseen(&c), "listing: unknown");
        c.observe(&watcher::Event::InitDone);
        assert!(unseen(&c), "listed, never reported");
        c.observe(&watcher::Event::Apply(meta("1")));
        assert!(!unseen(&c), "reported: it exists");
        c.observe(&watcher::Event::Delete(meta("2")));
        assert!(unseen(&c), "deleted");
    }

    #[test]
    fn a_relist_replaces_the_names_when_it_is_done() {
        let c = SecretCache::default();
        c.observe(&watcher::Event::Init);
        c.observe(&watcher::Event::InitApply(meta("1")));
        c.observe(&watcher::Event::InitDone);
        assert!(!unseen(&c));
        // deleted while the watch was away: the relist does not list it
        c.observe(&watcher::Event::Init);
        assert!(!unseen(&c), "relisting: unknown");
        c.observe(&watcher::Event::InitDone);
        assert!(unseen(&c));
    }

    #[test]
    fn an_own_create_exists_before_the_watch_reports_it() {
        let c = SecretCache::default();
        c.observe(&watcher::Event::Init);
        c.observe(&watcher::Event::InitDone);
        assert!(unseen(&c));
        c.exists("ns", "s");
        c.wrote("ns", "s", &secret("5"));
        assert!(!unseen(&c));
        // an own write is known even when a relist dropped the names it was added to
        c.observe(&watcher::Event::Init);
        c.wrote("ns", "s", &secret("6"));
        c.observe(&watcher::Event::InitDone);
        assert!(!unseen(&c));
    }

    #[test]
    fn only_the_version_of_an_own_write_is_its_echo() {
        let c = SecretCache::default();
        c.wrote("ns", "s", &secret("5"));
        assert!(c.own_write(&secret("5").metadata));
        assert!(!c.own_write(&secret("6").metadata), "someone else's write");
        c.expect("ns", "s");
        c.read("ns", "s", Some(&secret("6")));
        assert!(!c.own_write(&secret("6").metadata), "a read is no write");
    }

    #[test]
    fn an_absent_secret_is_read_every_time() {
        let c = SecretCache::default();
        c.expect("ns", "s");
        c.read("ns", "s", None);
        assert_eq!(cached_rv(&c), None);
    }

    /// A token Secret as the apiserver returns it after a bootstrap.
    fn token_secret() -> Secret {
        use crate::token_secret::*;
        let annotations = [
            (ANN_SETUP_STARTED_AT, "2026-12-04T10:00:00Z"),
            (ANN_SETUP_COMPLETED_AT, "2026-12-04T10:00:01Z"),
            (ANN_SETUP_OUTCOME, "Completed"),
            (
                ANN_FINGERPRINT,
                "$argon2id$v=19$m=7168,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$\
                 2QpmB8x7m0x1yKqv5sR3dV0mJfX0m5r9b8o4qS1f3yE",
            ),
            (ANN_CREDENTIALS_CHECKED, "4711:same"),
            (ANN_USER_ID, "d2a1c6c8-6a5b-4c3e-9f47-2b1e0a9d7c11"),
            (ANN_TOKEN_ID, "d4n1g4k1bq8s73a0p5tg"),
            (ANN_TOKEN_KEY, "NB_API_KEY"),
            (ANN_ISSUED_AT, "2026-12-04T10:00:01Z"),
            (ANN_EXPIRES_AT, "2027-01-03T10:00:01Z"),
        ];
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {
                "name": "s4711-token", "namespace": "scale-10000",
                "uid": "6f1c2b9e-0d4a-4e8b-9c3f-000000004711", "resourceVersion": "123456",
                "creationTimestamp": "2026-12-04T10:00:00Z",
                "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_INSTANCE: "s4711"},
                "annotations": annotations.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                "managedFields": [{"manager": "netbird-operator", "operation": "Update",
                    "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {}}}],
            },
            "data": {"NB_API_KEY": "bmJwX0FiQ2RFZkdoSWpLbE1uT3BRclN0VXZXeFl6MDEyMzQ1Njc4OWFi"},
            "type": "Opaque",
        }))
        .unwrap()
    }

    #[test]
    fn a_kept_secret_is_read_back_as_it_was() {
        let mut want = token_secret();
        crate::controller::trim::secret(&mut want);
        let kept = Kept::new(token_secret()).unwrap();
        let back: Secret = serde_json::from_slice(&packed::unpack(&kept.json)).unwrap();
        assert_eq!(back, want);
        assert_eq!(
            packed::unpack(&kept.json),
            serde_json::to_vec(&want).unwrap()
        );
    }

    proptest::proptest! {
        /// Whatever the Secret holds (control characters, the packed words themselves), its JSON
        /// comes back byte for byte.
        #[test]
        fn packing_is_undone_exactly(
            key in "[a-z./-]{1,40}",
            value in proptest::prelude::any::<String>(),
            word in 0..packed::WORDS.len(),
        ) {
            let mut s = token_secret();
            let word = String::from_utf8_lossy(packed::WORDS[word]).into_owned();
            let annotations = s.metadata.annotations.get_or_insert_default();
            annotations.insert(key.clone(), value.clone());
            annotations.insert(format!("{key}{word}"), format!("{word}{value}{word}"));
            let json = serde_json::to_vec(&s).unwrap();
            proptest::prop_assert_eq!(packed::unpack(&packed::pack(&json)), json);
        }
    }

    #[test]
    fn packed_words_are_control_characters_in_order() {
        assert!(packed::WORDS.len() < 0x20);
        for (i, word) in packed::WORDS.iter().enumerate() {
            // a word that begins with a later one is found first
            assert!(
                !packed::WORDS[..i].iter().any(|w| word.starts_with(w)),
                "{}",
                String::from_utf8_lossy(word)
            );
        }
    }

    /// A token Secret in the cache: its entry, its JSON, and the name the watch reported.
    #[test]
    fn footprint_of_a_cached_token_secret() {
        use crate::footprint::kept_by;
        let mut plain = token_secret();
        crate::controller::trim::secret(&mut plain);
        let json = serde_json::to_vec(&plain).unwrap();
        let (kept, bytes) = kept_by(|| Kept::new(token_secret()).unwrap());
        eprintln!(
            "a kept token Secret: {bytes} bytes ({} of JSON packed from {}; unpacked: {})",
            kept.json.len(),
            json.len(),
            crate::footprint::size_class(json.len()),
        );
        assert!(kept.json.len() < json.len() * 3 / 4);
    }
}
