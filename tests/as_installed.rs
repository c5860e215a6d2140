//! The operator as installed: in each mode of the Helm chart (cluster-wide, one watched namespace,
//! several watched namespaces, two replicas with leader election) the rendered objects are applied
//! to the real kube-apiserver and the operator runs with a token of the chart's own ServiceAccount,
//! so it has the chart's RBAC and nothing else. Every user-facing feature runs here at least once:
//! bootstrap (the real NetBird server and the fake), service user exchange, rotation, adoption of a
//! hand-made token, Retain and Delete deletion, leader takeover; and a watched-namespaces operator
//! never touches an instance elsewhere.
//!
//! The cluster-wide operator sees every namespace of this test binary's control plane, so it runs
//! alone: the other tests share a read lock, it takes the write lock.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use netbird_operator::netbird::{ClientOptions, NetbirdClient};
use netbird_operator::token_secret::{ANN_PREVIOUS_TOKEN_ID, ANN_SERVICE_USER, ANN_USER_ID};
use secrecy::SecretString;
use serde_json::json;
use support::chart::{self, Release};
use support::fake_netbird::FakeNetbird;
use support::{NetbirdServer, TestEnv, condition, ready_is};
use tokio::sync::RwLock;

const T: Duration = Duration::from_secs(30);
const FINALIZER: &str = "bootstrap.netbird.io/token-cleanup";
/// The password of `TestEnv::create_admin_secret`.
const PASSWORD: &str = "s3cret-Passw0rd";

/// Held shared by the namespaced tests, exclusively by the cluster-wide one.
static CLUSTER_WIDE: RwLock<()> = RwLock::const_new(());

fn spec(url: &str) -> serde_json::Value {
    json!({"managementURL": url, "allowInsecureHTTP": true, "credentialsSecretRef": {"name": "admin"}})
}

fn delete_spec(url: &str) -> serde_json::Value {
    let mut s = spec(url);
    s["token"] = json!({"deletionPolicy": "Delete"});
    s
}

/// The token and annotations of a token Secret.
async fn stored(
    env: &TestEnv,
    secret: &str,
) -> Option<(String, std::collections::BTreeMap<String, String>)> {
    let s = env.secrets().get_opt(secret).await.ok()??;
    let token = String::from_utf8(s.data?.get("NB_API_KEY")?.0.clone()).ok()?;
    Some((token, s.metadata.annotations.unwrap_or_default()))
}

fn has_finalizer(n: &netbird_operator::crd::NetbirdInstance) -> bool {
    n.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
}

/// Waits until the instance is Ready after a bootstrap (setup performed).
async fn bootstrapped(env: &TestEnv, name: &str) -> netbird_operator::crd::NetbirdInstance {
    env.wait_instance(name, "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await
}

/// Asserts that an instance no operator may see keeps no status while the others are reconciled.
async fn never_reconciled(env: &TestEnv, name: &str, since: Instant) {
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(since.elapsed())).await;
    let n = env.instances().get(name).await.unwrap();
    assert!(
        n.status.is_none() && n.metadata.finalizers.is_none(),
        "{}/{name} is outside the watched namespaces but was reconciled: {:?}",
        env.ns,
        n.status
    );
}

/// Asserts that the ServiceAccount may not read a Secret of `env`'s namespace.
async fn secret_forbidden(sa: &kube::Client, env: &TestEnv) {
    env.create_secret("elsewhere", &[("k", "v")]).await;
    let foreign: Api<Secret> = Api::namespaced(sa.clone(), &env.ns);
    match foreign.get("elsewhere").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("reading a Secret of an unwatched namespace was allowed: {other:?}"),
    }
}

/// Deletes a `deletionPolicy: Delete` instance and waits until its finalizer has deleted the token
/// on the server and let go.
async fn delete_through_the_finalizer(env: &TestEnv, name: &str) {
    env.instances()
        .delete(name, &Default::default())
        .await
        .unwrap();
    env.wait_instance_gone_within(name, T).await;
    let events = env.events().await;
    assert!(
        events.iter().any(|(r, _)| r == "TokenDeleted"),
        "{events:?}"
    );
}

/// Default values: a ClusterRole. The real NetBird server: bootstrap, the service user exchange, a
/// rotation (the operator's clock ahead), and deletion with `deletionPolicy: Delete`; in a namespace
/// other than the release's.
#[tokio::test]
async fn cluster_wide_bootstrap_service_user_rotation_and_delete_on_the_real_server() {
    let _alone = CLUSTER_WIDE.write().await;
    let Some(home) = TestEnv::new("as-installed-cluster").await else {
        return;
    };
    let env = TestEnv::new("as-installed-cluster-apps").await.unwrap();
    let release = chart::apply(home.cp, "nbop", &home.ns, &[]);
    assert!(release.rendered.contains("kind: ClusterRole\n"));
    let sa = release.client(home.cp).await;
    let _nb_lock = support::netbird_lock().await;
    let Some(nb) = NetbirdServer::start().await else {
        return;
    };
    env.create_admin_secret().await;
    let op = env
        .start_operator_watching(sa.clone(), &[], Duration::ZERO)
        .await;
    let mut s = delete_spec(&nb.url);
    s["token"]["expiresInDays"] = json!(1);
    s["token"]["serviceUser"] = json!({"name": "netbird-operator"});
    // the hand-over is followed step by step: no grace period (tests/day2.rs has it)
    s["token"]["rotation"] = json!({"gracePeriod": "0s"});
    env.create_instance("nb", s).await.unwrap();
    let n = env
        .wait_instance("nb", "Ready", Duration::from_secs(60), |n| {
            ready_is(n, "True", "Bootstrapped")
        })
        .await;
    assert!(has_finalizer(&n), "Delete: the finalizer is added");
    let (first, ann) = support::wait_for("the service user exchange", T, || {
        let env = &env;
        async move {
            let (t, a) = stored(env, "nb-token").await?;
            (a.contains_key(ANN_SERVICE_USER) && !a.contains_key(ANN_PREVIOUS_TOKEN_ID))
                .then_some((t, a))
        }
    })
    .await;
    let svc_id = ann[ANN_USER_ID].clone();
    let client = NetbirdClient::new(&nb.url, &ClientOptions::default()).unwrap();
    let works = |token: String| {
        let client = &client;
        let svc_id = svc_id.clone();
        async move {
            client
                .list_service_users(&SecretString::from(token))
                .await
                .map(|users| users.iter().any(|u| u.id == svc_id))
        }
    };
    assert!(
        works(first.clone())
            .await
            .expect("the service user's token works")
    );
    env.wait_instance("nb", "token identified", T, |n| {
        n.status
            .as_ref()
            .and_then(|s| s.token.as_ref())
            .is_some_and(|t| t.token_id.is_some() && t.user_id.as_deref() == Some(&svc_id))
    })
    .await;
    op.stop().await;

    // a one-day token, 17 hours later: renewed, the old one deleted on the server
    let op = env
        .start_operator_watching(sa.clone(), &[], Duration::from_secs(17 * 3600))
        .await;
    env.wait_instance("nb", "TokenRotated", T, |n| {
        condition(n, "TokenAvailable").is_some_and(|(_, r, _)| r == "TokenRotated")
    })
    .await;
    let second = support::wait_for("the previous token to be deleted", T, || {
        let env = &env;
        let first = first.clone();
        async move {
            let (t, a) = stored(env, "nb-token").await?;
            (t != first && !a.contains_key(ANN_PREVIOUS_TOKEN_ID)).then_some(t)
        }
    })
    .await;
    assert!(works(second.clone()).await.expect("the new token works"));
    let old = works(first.clone()).await.unwrap_err();
    assert!(old.is_token_rejected(), "the old token is deleted: {old}");

    let logs = support::captured_logs();
    for secret in [first.as_str(), second.as_str(), PASSWORD] {
        assert!(
            !logs.contains(secret),
            "a log line holds a token or the password"
        );
    }

    // deletionPolicy Delete: the token is deleted on the server, then the finalizer lets go
    delete_through_the_finalizer(&env, "nb").await;
    let gone = works(second).await.unwrap_err();
    assert!(gone.is_token_rejected(), "the token is deleted: {gone}");
    op.stop().await;
}

/// `watchNamespace`: a Role in one namespace (not the release's). Adoption of a hand-made token,
/// a bootstrap, Retain deletion and re-adoption; an instance elsewhere is never touched.
#[tokio::test]
async fn one_watched_namespace_adoption_bootstrap_and_retain() {
    let _shared = CLUSTER_WIDE.read().await;
    let Some(home) = TestEnv::new("as-installed-one").await else {
        return;
    };
    let env = TestEnv::new("as-installed-one-watched").await.unwrap();
    let other = TestEnv::new("as-installed-one-other").await.unwrap();
    let watch = format!("watchNamespace={}", env.ns);
    let release = chart::apply(home.cp, "nbop", &home.ns, &[&watch]);
    assert!(!release.rendered.contains("kind: ClusterRole"));
    let sa = release.client(home.cp).await;
    secret_forbidden(&sa, &other).await;
    secret_forbidden(&sa, &home).await;

    // a server set up by hand, and a token made by hand in the operator's Secret
    let by_hand = FakeNetbird::start().await;
    let hand_made = {
        let mut s = by_hand.state();
        s.setup_required = false;
        s.users.insert("owner1".into(), "ops@example.com".into());
        s.mint_named("owner1", "made-by-hand", 30)
    };
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "adopted-token", "labels": {
            "app.kubernetes.io/managed-by": "netbird-operator", "bootstrap.netbird.io/instance": "adopted"}},
        "stringData": {"NB_API_KEY": hand_made},
    }))
    .unwrap();
    env.secrets()
        .create(&Default::default(), &secret)
        .await
        .unwrap();
    let fresh = FakeNetbird::start().await;
    env.create_admin_secret().await;
    other.create_admin_secret().await;
    let _op = env
        .start_operator_watching(sa, &[&env.ns], Duration::ZERO)
        .await;
    let t0 = Instant::now();
    other.create_instance("nb", spec(&fresh.url)).await.unwrap();
    env.create_instance("adopted", spec(&by_hand.url))
        .await
        .unwrap();
    env.create_instance("nb", spec(&fresh.url)).await.unwrap();

    let n = env
        .wait_instance("adopted", "Ready", T, |n| {
            ready_is(n, "True", "Bootstrapped")
        })
        .await;
    assert_eq!(condition(&n, "TokenAvailable").unwrap().1, "TokenAdopted");
    assert_eq!(by_hand.calls("setup"), 0);
    let n = bootstrapped(&env, "nb").await;
    assert_eq!(condition(&n, "TokenAvailable").unwrap().1, "TokenStored");
    assert!(!has_finalizer(&n), "Retain: no finalizer");
    let (token, _) = stored(&env, "nb-token").await.unwrap();

    // Retain: the instance goes at once; the Secret and the token stay, and are adopted again
    env.instances()
        .delete("nb", &Default::default())
        .await
        .unwrap();
    env.wait_instance_gone_within("nb", Duration::from_secs(5))
        .await;
    assert_eq!(stored(&env, "nb-token").await.unwrap().0, token);
    assert!(fresh.state().tokens.contains_key(&token));
    env.create_instance("nb", spec(&fresh.url)).await.unwrap();
    env.wait_instance("nb", "Ready again", T, |n| {
        ready_is(n, "True", "Bootstrapped")
    })
    .await;
    assert_eq!(stored(&env, "nb-token").await.unwrap().0, token);
    assert_eq!(fresh.calls("setup"), 1, "setup is never called twice");
    never_reconciled(&other, "nb", t0).await;
}

/// `watchNamespaces`: a Role in each of two namespaces, one watch each. Delete deletion in one, a
/// late credentials Secret in the other (the Secret watch of that namespace wakes the instance);
/// an instance in a third namespace is never touched.
#[tokio::test]
async fn several_watched_namespaces_delete_policy_and_a_late_secret() {
    let _shared = CLUSTER_WIDE.read().await;
    let Some(home) = TestEnv::new("as-installed-many").await else {
        return;
    };
    let a = TestEnv::new("as-installed-many-a").await.unwrap();
    let b = TestEnv::new("as-installed-many-b").await.unwrap();
    let other = TestEnv::new("as-installed-many-other").await.unwrap();
    let watch = format!("watchNamespaces={{{},{}}}", a.ns, b.ns);
    let release = chart::apply(home.cp, "nbop", &home.ns, &[&watch]);
    assert_eq!(release.rendered.matches("\nkind: Role\n").count(), 2);
    let sa = release.client(home.cp).await;
    secret_forbidden(&sa, &other).await;

    let fake_a = FakeNetbird::start().await;
    let fake_b = FakeNetbird::start().await;
    a.create_admin_secret().await;
    other.create_admin_secret().await;
    // instances in both namespaces before the operator starts: found by each namespace's first
    // list (how lists of several namespaces are merged is tested in src/controller/namespaces.rs)
    let t0 = Instant::now();
    other
        .create_instance("nb", spec(&fake_a.url))
        .await
        .unwrap();
    a.create_instance("nb", delete_spec(&fake_a.url))
        .await
        .unwrap();
    b.create_instance("nb", spec(&fake_b.url)).await.unwrap();
    let _op = a
        .start_operator_watching(sa, &[&a.ns, &b.ns], Duration::ZERO)
        .await;

    let n = bootstrapped(&a, "nb").await;
    assert!(has_finalizer(&n), "Delete: the finalizer is added");
    b.wait_instance("nb", "WaitingForCredentials", T, |n| {
        condition(n, "Reconciling").is_some_and(|(_, r, _)| r == "WaitingForCredentials")
    })
    .await;
    b.create_admin_secret().await;
    bootstrapped(&b, "nb").await;

    let (token, _) = stored(&a, "nb-token").await.unwrap();
    assert!(fake_a.state().tokens.contains_key(&token));
    delete_through_the_finalizer(&a, "nb").await;
    assert!(
        !fake_a.state().tokens.contains_key(&token),
        "the token was deleted on the server"
    );
    assert_eq!(fake_a.calls("setup"), 1);
    never_reconciled(&other, "nb", t0).await;
}

/// An operator process, killed when dropped (a failing test leaves none behind).
struct Replica(Child);

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn operator_process(
    kubeconfig: &std::path::Path,
    release: &Release,
    name: &str,
    log: &std::path::Path,
) -> Replica {
    let env_of = |var: &str| {
        release
            .deployment_env(var)
            .unwrap_or_else(|| panic!("the Deployment sets {var}"))
    };
    // NBOP_OPERATOR_BIN overrides the binary (a target directory shared by several checkouts holds
    // only the binary built last)
    let binary = std::env::var("NBOP_OPERATOR_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_netbird-operator").to_string());
    let child = Command::new(binary)
        .args(["run", "--http-addr", "127.0.0.1:0", "--max-backoff", "5"])
        .env("KUBECONFIG", kubeconfig)
        // what the chart's Deployment sets (POD_NAMESPACE from the downward API)
        .env("WATCH_NAMESPACE", env_of("WATCH_NAMESPACE"))
        .env("LEADER_ELECTION", env_of("LEADER_ELECTION"))
        .env("POD_NAMESPACE", &release.namespace)
        .env("POD_NAME", name)
        .env("LOG_FORMAT", "text")
        .env("LOG_LEVEL", "info")
        // the operator takes its egress proxy from these: none from the environment of the run
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("operator binary");
    Replica(child)
}

/// `replicaCount: 2` (with `watchNamespaces` and `watchNamespace` together: their union): two
/// operator processes with the chart's environment and the ServiceAccount's kubeconfig; the Lease
/// lives in the release namespace; the leader is killed and the other takes over.
#[tokio::test]
async fn two_replicas_take_over_from_a_killed_leader() {
    let _shared = CLUSTER_WIDE.read().await;
    let Some(home) = TestEnv::new("as-installed-leader").await else {
        return;
    };
    let w1 = TestEnv::new("as-installed-leader-w1").await.unwrap();
    let w2 = TestEnv::new("as-installed-leader-w2").await.unwrap();
    let list = format!("watchNamespaces={{{}}}", w1.ns);
    let single = format!("watchNamespace={}", w2.ns);
    let release = chart::apply(
        home.cp,
        "nbop",
        &home.ns,
        &["replicaCount=2", &list, &single],
    );
    let mut both = [w1.ns.clone(), w2.ns.clone()];
    both.sort();
    assert_eq!(
        release.deployment_env("WATCH_NAMESPACE").as_deref(),
        Some(both.join(",").as_str())
    );
    let kubeconfig = release.kubeconfig(home.cp).await;
    let dir = tempfile::Builder::new()
        .prefix("as-installed-leader-")
        .tempdir()
        .unwrap()
        .keep();
    eprintln!("operator logs in {}", dir.display());
    let leases: Api<Lease> = Api::namespaced(home.client.clone(), &home.ns);
    let holder = || {
        let leases = leases.clone();
        async move {
            leases
                .get_opt("netbird-operator-leader")
                .await
                .ok()??
                .spec?
                .holder_identity
        }
    };
    let first = operator_process(&kubeconfig, &release, "replica-a", &dir.join("a.log"));
    let leader = support::wait_for("a Lease holder", T, holder).await;
    assert_eq!(leader, "replica-a");
    let second = operator_process(&kubeconfig, &release, "replica-b", &dir.join("b.log"));

    let fake1 = FakeNetbird::start().await;
    w1.create_admin_secret().await;
    w1.create_instance("nb", spec(&fake1.url)).await.unwrap();
    bootstrapped(&w1, "nb").await;

    // the leader dies without a word; the follower takes the Lease once it expires
    drop(first);
    let t0 = Instant::now();
    let fake2 = FakeNetbird::start().await;
    w2.create_admin_secret().await;
    w2.create_instance("nb", spec(&fake2.url)).await.unwrap();
    w2.wait_instance("nb", "Ready", Duration::from_secs(60), |n| {
        ready_is(n, "True", "Bootstrapped")
    })
    .await;
    eprintln!("takeover after the leader was killed: {:?}", t0.elapsed());
    assert_eq!(holder().await.as_deref(), Some("replica-b"));
    assert_eq!(fake1.calls("setup"), 1);
    assert_eq!(fake2.calls("setup"), 1);
    drop(second);
    let logs = [
        std::fs::read_to_string(dir.join("a.log")).unwrap_or_default(),
        std::fs::read_to_string(dir.join("b.log")).unwrap_or_default(),
    ];
    let tokens = [
        stored(&w1, "nb-token").await.unwrap().0,
        stored(&w2, "nb-token").await.unwrap().0,
    ];
    for log in &logs {
        assert!(
            !log.to_lowercase().contains("forbidden"),
            "a request was forbidden:\n{log}"
        );
        for secret in tokens.iter().map(String::as_str).chain([PASSWORD]) {
            assert!(
                !log.contains(secret),
                "a log line holds a token or the password"
            );
        }
    }
}
