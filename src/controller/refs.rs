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
    Credentials = 1,
    Token = 2,
    Ca = 4,
}

/// The roles one Secret has for one instance (an instance may use one Secret for several).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Roles(u8);

impl Roles {
    fn with(self, role: Role) -> Self {
        Roles(self.0 | role as u8)
    }

    /// Any role but `except`.
    fn any_but(self, except: Option<Role>) -> bool {
        self.0 & !except.map_or(0, |r| r as u8) != 0
    }
}

/// The instances that reference one Secret: most Secrets have one (a token Secret), a shared
/// credentials Secret may have thousands.
enum Users {
    One(Box<str>, Roles),
    Many(HashMap<Box<str>, Roles>),
}

impl Users {
    fn add(&mut self, instance: &str, role: Role) {
        match self {
            Users::One(name, roles) if **name == *instance => *roles = roles.with(role),
            Users::One(name, roles) => {
                let mut many = HashMap::from([(std::mem::take(name), *roles)]);
                many.insert(instance.into(), Roles::default().with(role));
                *self = Users::Many(many);
            }
            Users::Many(many) => {
                let roles = many.entry(instance.into()).or_default();
                *roles = roles.with(role);
            }
        }
    }

    /// Removes an instance; whether nobody is left.
    fn remove(&mut self, instance: &str) -> bool {
        match self {
            Users::One(name, _) => **name == *instance,
            Users::Many(many) => {
                many.remove(instance);
                many.is_empty()
            }
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = (&str, Roles)> + '_> {
        match self {
            Users::One(name, roles) => Box::new(std::iter::once((&**name, *roles))),
            Users::Many(many) => Box::new(many.iter().map(|(n, r)| (&**n, *r))),
        }
    }
}

/// The references of one instance: (Secret name, role), two or three.
type Refs = Box<[(Box<str>, Role)]>;

/// Maps by namespace, then by name (a namespace's name is kept once).
type ByNamespace<T> = HashMap<Box<str>, HashMap<Box<str>, T>>;

#[derive(Default)]
struct Index {
    /// Secret -> the instances that reference it.
    by_secret: ByNamespace<Users>,
    /// Instance -> the Secrets it references.
    by_instance: ByNamespace<Refs>,
    /// Instances (namespace, name) listed by a relist in progress.
    listing: Option<HashSet<(String, String)>>,
}

impl Index {
    /// Records the references of an instance; returns the Secrets no instance references any more.
    fn set(&mut self, ns: &str, instance: &str, refs: Refs) -> Vec<(String, String)> {
        if let Some(l) = self.listing.as_mut() {
            l.insert((ns.to_string(), instance.to_string()));
        }
        if self.by_instance.get(ns).and_then(|m| m.get(instance)) == Some(&refs) {
            return Vec::new();
        }
        let mut unreferenced = self.remove(ns, instance);
        let secrets = self.by_secret.entry(ns.into()).or_default();
        for (secret, role) in &refs {
            match secrets.get_mut(&**secret) {
                Some(users) => users.add(instance, *role),
                None => {
                    let users = Users::One(instance.into(), Roles::default().with(*role));
                    secrets.insert(secret.clone(), users);
                }
            }
        }
        unreferenced.retain(|(_, name)| !secrets.contains_key(name.as_str()));
        self.by_instance
            .entry(ns.into())
            .or_default()
            .insert(instance.into(), refs);
        unreferenced
    }

    /// Forgets an instance; returns the Secrets no instance references any more.
    fn remove(&mut self, ns: &str, instance: &str) -> Vec<(String, String)> {
        let Some(old) = self
            .by_instance
            .get_mut(ns)
            .and_then(|m| m.remove(instance))
        else {
            return Vec::new();
        };
        let mut unreferenced = Vec::new();
        if let Some(secrets) = self.by_secret.get_mut(ns) {
            for (secret, _) in old.iter() {
                if secrets
                    .get_mut(&**secret)
                    .is_some_and(|users| users.remove(instance))
                {
                    secrets.remove(&**secret);
                    unreferenced.push((ns.to_string(), secret.to_string()));
                }
            }
        }
        unreferenced
    }
}

/// The Secrets an instance references, each with its role.
fn references(nbi: &NetbirdInstance) -> Refs {
    let mut refs = vec![
        (
            nbi.spec.credentials_secret_ref.name.as_str().into(),
            Role::Credentials,
        ),
        (nbi.token_secret_name().into(), Role::Token),
    ];
    if let Some(ca) = nbi.spec.tls.as_ref().and_then(|t| t.ca_secret_ref.as_ref()) {
        refs.push((ca.name.as_str().into(), Role::Ca));
    }
    refs.into_boxed_slice()
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
                Some(ns) => index.remove(&ns, &nbi.name_any()),
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
                let gone: Vec<(String, String)> = index
                    .by_instance
                    .iter()
                    .flat_map(|(ns, m)| m.keys().map(|n| (ns.to_string(), n.to_string())))
                    .filter(|k| !listed.contains(k))
                    .collect();
                gone.iter()
                    .flat_map(|(ns, name)| index.remove(ns, name))
                    .collect()
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
        let Some(users) = index.by_secret.get(ns).and_then(|m| m.get(name)) else {
            return Vec::new();
        };
        users
            .iter()
            .filter(|(_, roles)| roles.any_but(except))
            .map(|(instance, _)| ObjectRef::new(instance).within(ns))
            .collect()
    }

    #[cfg(test)]
    fn sizes(&self) -> (usize, usize) {
        fn count<T>(m: &ByNamespace<T>) -> usize {
            m.values().map(HashMap::len).sum()
        }
        let index = lock(&self.index);
        (count(&index.by_secret), count(&index.by_instance))
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
