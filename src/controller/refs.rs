//! Which instances reference which Secret, kept from the NetbirdInstance watch.
//!
//! Every event of the Secrets' watch asks which instances it concerns. Scanning the whole fleet for
//! each event costs the fleet's size per event, and a bootstrap makes several Secret events: at
//! 10,000 instances that scan was most of the operator's CPU growth. This index answers with one
//! hash lookup, and is kept current by the instance watch events (an instance whose references did
//! not change, e.g. after a status write, costs one comparison).
//!
//! A relist (`Init` .. `InitDone`) re-adds every instance it lists and drops the ones it did not.
//! Each change returns the Secrets no instance references any more, so that the Secret cache
//! forgets them (its size then follows the fleet's Secrets, not the history of the cluster).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

use super::lock;
use crate::crd::NetbirdInstance;

/// What a Secret is to an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Credentials,
    Token,
    Ca,
}

/// (namespace, name)
type Key = (String, String);

#[derive(Default)]
struct Index {
    /// Secret -> instance name -> roles (an instance may use one Secret for several).
    by_secret: HashMap<Key, HashMap<String, Vec<Role>>>,
    /// Instance -> the Secrets it references, with their role.
    by_instance: HashMap<Key, Vec<(String, Role)>>,
    /// Instances listed by a relist in progress.
    listing: Option<HashSet<Key>>,
}

impl Index {
    /// Records the references of an instance; returns the Secrets no instance references any more.
    fn set(&mut self, ns: &str, instance: &str, refs: Vec<(String, Role)>) -> Vec<Key> {
        let key = (ns.to_string(), instance.to_string());
        if let Some(l) = self.listing.as_mut() {
            l.insert(key.clone());
        }
        if self.by_instance.get(&key) == Some(&refs) {
            return Vec::new();
        }
        let mut unreferenced = self.remove(&key);
        for (secret, role) in &refs {
            self.by_secret
                .entry((ns.to_string(), secret.clone()))
                .or_default()
                .entry(instance.to_string())
                .or_default()
                .push(*role);
        }
        unreferenced.retain(|k| !self.by_secret.contains_key(k));
        self.by_instance.insert(key, refs);
        unreferenced
    }

    /// Forgets an instance; returns the Secrets no instance references any more.
    fn remove(&mut self, key: &Key) -> Vec<Key> {
        let Some(old) = self.by_instance.remove(key) else {
            return Vec::new();
        };
        let mut unreferenced = Vec::new();
        for (secret, _) in old {
            let skey = (key.0.clone(), secret);
            if let Some(users) = self.by_secret.get_mut(&skey) {
                users.remove(&key.1);
                if users.is_empty() {
                    self.by_secret.remove(&skey);
                    unreferenced.push(skey);
                }
            }
        }
        unreferenced
    }
}

/// The Secrets an instance references, each with its role.
fn references(nbi: &NetbirdInstance) -> Vec<(String, Role)> {
    let mut refs = vec![
        (
            nbi.spec.credentials_secret_ref.name.clone(),
            Role::Credentials,
        ),
        (nbi.token_secret_name(), Role::Token),
    ];
    if let Some(ca) = nbi.spec.tls.as_ref().and_then(|t| t.ca_secret_ref.as_ref()) {
        refs.push((ca.name.clone(), Role::Ca));
    }
    refs
}

/// The index; shared by the instance watch (writes) and the Secrets' watch mapper (reads).
#[derive(Default)]
pub struct SecretRefs {
    index: Mutex<Index>,
}

impl SecretRefs {
    /// Takes note of an event of the NetbirdInstance watch; returns the Secrets (namespace, name)
    /// that no instance references any more.
    pub fn observe(&self, event: &watcher::Event<NetbirdInstance>) -> Vec<(String, String)> {
        let mut index = lock(&self.index);
        match event {
            watcher::Event::Apply(nbi) | watcher::Event::InitApply(nbi) => match nbi.namespace() {
                Some(ns) => index.set(&ns, &nbi.name_any(), references(nbi)),
                None => Vec::new(),
            },
            watcher::Event::Delete(nbi) => match nbi.namespace() {
                Some(ns) => index.remove(&(ns, nbi.name_any())),
                None => Vec::new(),
            },
            watcher::Event::Init => {
                index.listing = Some(HashSet::new());
                Vec::new()
            }
            watcher::Event::InitDone => {
                let Some(listed) = index.listing.take() else {
                    return Vec::new();
                };
                let gone: Vec<Key> = index
                    .by_instance
                    .keys()
                    .filter(|k| !listed.contains(*k))
                    .cloned()
                    .collect();
                gone.iter().flat_map(|key| index.remove(key)).collect()
            }
        }
    }

    /// The instances that reference Secret `name` in `ns`; `except` a role whose events bring
    /// nothing new (the echo of the operator's own token write).
    pub fn referencing(
        &self,
        ns: &str,
        name: &str,
        except: Option<Role>,
    ) -> Vec<ObjectRef<NetbirdInstance>> {
        let index = lock(&self.index);
        let Some(users) = index.by_secret.get(&(ns.to_string(), name.to_string())) else {
            return Vec::new();
        };
        users
            .iter()
            .filter(|(_, roles)| roles.iter().any(|r| Some(*r) != except))
            .map(|(instance, _)| ObjectRef::new(instance).within(ns))
            .collect()
    }

    #[cfg(test)]
    fn sizes(&self) -> (usize, usize) {
        let index = lock(&self.index);
        (index.by_secret.len(), index.by_instance.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::NetbirdInstanceSpec;

    fn nbi(name: &str, credentials: &str, token: &str) -> NetbirdInstance {
        let mut spec: NetbirdInstanceSpec = serde_json::from_value(serde_json::json!({
            "managementURL": "http://127.0.0.1:1",
            "credentialsSecretRef": {"name": credentials},
            "token": {"secretName": token},
        }))
        .unwrap();
        spec.token.secret_name = token.to_string();
        let mut n = NetbirdInstance::new(name, spec);
        n.metadata.namespace = Some("ns".into());
        n
    }

    fn names(r: &SecretRefs, secret: &str, except: Option<Role>) -> Vec<String> {
        let mut v: Vec<String> = r
            .referencing("ns", secret, except)
            .into_iter()
            .map(|o| o.name)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn finds_the_instances_of_a_secret_in_its_namespace() {
        let r = SecretRefs::default();
        r.observe(&watcher::Event::Apply(nbi("a", "admin", "a-token")));
        r.observe(&watcher::Event::Apply(nbi("b", "admin", "b-token")));
        assert_eq!(names(&r, "admin", None), ["a", "b"]);
        assert_eq!(names(&r, "a-token", None), ["a"]);
        assert!(r.referencing("other", "admin", None).is_empty());
        assert!(
            names(&r, "a-token", Some(Role::Token)).is_empty(),
            "own token write"
        );
        assert_eq!(names(&r, "admin", Some(Role::Token)), ["a", "b"]);
    }

    #[test]
    fn a_secret_used_for_two_roles_is_found_unless_both_are_excepted() {
        let r = SecretRefs::default();
        r.observe(&watcher::Event::Apply(nbi("a", "both", "both")));
        assert_eq!(names(&r, "both", Some(Role::Token)), ["a"]);
    }

    #[test]
    fn changes_deletions_and_relists_are_followed() {
        let r = SecretRefs::default();
        r.observe(&watcher::Event::Apply(nbi("a", "admin", "a-token")));
        let unreferenced = r.observe(&watcher::Event::Apply(nbi("a", "admin2", "a-token")));
        assert_eq!(unreferenced, [("ns".to_string(), "admin".to_string())]);
        assert!(names(&r, "admin", None).is_empty());
        assert_eq!(names(&r, "admin2", None), ["a"]);
        let mut unreferenced = r.observe(&watcher::Event::Delete(nbi("a", "admin2", "a-token")));
        unreferenced.sort();
        assert_eq!(unreferenced.len(), 2, "{unreferenced:?}");
        assert_eq!(r.sizes(), (0, 0));

        r.observe(&watcher::Event::Apply(nbi("a", "admin", "a-token")));
        r.observe(&watcher::Event::Apply(nbi("b", "admin", "b-token")));
        // b was deleted while the watch was away
        r.observe(&watcher::Event::Init);
        r.observe(&watcher::Event::InitApply(nbi("a", "admin", "a-token")));
        assert_eq!(names(&r, "admin", None), ["a", "b"], "relisting: kept");
        let unreferenced = r.observe(&watcher::Event::InitDone);
        assert_eq!(unreferenced, [("ns".to_string(), "b-token".to_string())]);
        assert_eq!(names(&r, "admin", None), ["a"]);
        assert_eq!(r.sizes(), (2, 1));
    }
}
