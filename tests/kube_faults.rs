//! Kubernetes faults injected between the operator and the real apiserver (tests/support/kube_faults):
//! watches that expire (410 Gone) and must be relisted, and 409 Conflicts on the status and token
//! Secret writes. Invariants: nothing the apiserver accepted is lost, what happened while the watch
//! was gone is seen after the relist, setup is called once, and no fault makes a loop.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde_json::json;
use support::fake_netbird::{FakeNetbird, Fault};
use support::kube_faults::{self, KubeFaults};
use support::{TestEnv, ready_is};

const T: Duration = Duration::from_secs(30);

fn spec(url: &str) -> serde_json::Value {
    json!({"managementURL": url, "allowInsecureHTTP": true, "credentialsSecretRef": {"name": "admin"}})
}

/// The credentials Secret, and the operator running with a client that goes through the faults.
async fn operator_behind_faults(env: &TestEnv) -> (Arc<KubeFaults>, support::Operator) {
    env.create_admin_secret().await;
    let faults = Arc::new(KubeFaults::default());
    let client = kube_faults::client(env.cp.client().await, faults.clone());
    (faults, env.start_operator_with(client).await)
}

#[tokio::test]
async fn an_expired_watch_is_relisted_and_nothing_is_missed() {
    let Some(env) = TestEnv::new("watch-expired").await else {
        return;
    };
    let (faults, _op) = operator_behind_faults(&env).await;
    let first = FakeNetbird::start().await;
    env.create_instance("first", spec(&first.url))
        .await
        .unwrap();
    env.wait_instance("first", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;

    // every watch ends; while the operator cannot watch, a new instance appears and the first
    // one's credentials Secret changes; then its watches come back with 410 Gone (what the
    // apiserver answers for a compacted resourceVersion)
    faults.hold_watches();
    faults.expire_next_watches(4);
    let lists_before = faults.count(&faults.lists);
    let second = FakeNetbird::start().await;
    env.create_instance("second", spec(&second.url))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = env.instances().get("second").await.unwrap();
    assert!(
        n.status.is_none(),
        "the new instance cannot be seen while the watches are down: {:?}",
        n.status
    );
    assert_eq!(second.calls("instance"), 0);
    faults.release_watches();

    env.wait_instance("second", "Ready", T, |n| {
        ready_is(n, "True", "Bootstrapped")
    })
    .await;
    // the last restarted watch may be answered after the instance is already Ready
    let expired = support::wait_for("the four injected 410s", T, || async {
        let n = faults.count(&faults.expired);
        (n >= 4).then_some(n)
    })
    .await;
    let relists = faults.count(&faults.lists) - lists_before;
    eprintln!("watch expiry: {expired} watches answered 410, {relists} lists after it");
    assert_eq!(expired, 4, "every injected 410 was delivered");
    assert!(
        relists >= 2,
        "both watches relisted after 410 ({relists} lists)"
    );

    // the watches work again and nothing loops: the bootstrap of the second instance settles
    // (its token identified and described) and then 3 s pass with no write and no watch restart
    let watches = settle(&faults).await;
    assert!(watches <= 2, "watch restarts in a quiet 3 s: {watches}");
    assert_eq!(first.state().setups_ok, 1);
    assert_eq!(first.calls("setup"), 1);
    assert_eq!(second.calls("setup"), 1);
}

/// Waits for 3 s in which the operator makes no write (fails after 20 s: that would be a loop);
/// returns the watch requests made in those 3 s.
async fn settle(faults: &KubeFaults) -> u32 {
    let start = std::time::Instant::now();
    loop {
        let (writes, watches) = (faults.writes(), faults.count(&faults.watches));
        tokio::time::sleep(Duration::from_secs(3)).await;
        if faults.writes() == writes {
            return faults.count(&faults.watches) - watches;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the operator keeps writing: {:?}",
            faults.write_log.lock().unwrap()
        );
    }
}

fn status_write(m: &Method, path: &str) -> bool {
    *m == Method::PATCH && path.ends_with("/status")
}

fn token_secret_write(m: &Method, path: &str) -> bool {
    *m != Method::POST && path.ends_with("/secrets/nb-token")
}

#[tokio::test]
async fn conflicts_on_status_and_token_writes_lose_nothing() {
    let Some(env) = TestEnv::new("write-conflicts").await else {
        return;
    };
    let (faults, _op) = operator_behind_faults(&env).await;
    let fake = FakeNetbird::start().await;
    // setup answers after 2.5 s (the tests' request timeout is 3 s): the first pass writes its
    // initial status after 1 s meanwhile
    fake.fault("setup", Fault::Delay(Duration::from_millis(2500)));

    // 1: every status write conflicts for 2 s from the start
    faults.conflict_on(status_write);
    env.create_instance("nb", spec(&fake.url)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status_conflicts = faults.count(&faults.conflicts);
    faults.clear_conflicts();
    assert!(status_conflicts >= 1, "status writes were refused");

    // 2: the token write after setup conflicts for 3 s: the operator holds the token and retries
    support::wait_for("the setup call", T, || async {
        (fake.calls("setup") > 0).then_some(())
    })
    .await;
    faults.conflict_on(token_secret_write);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let token_conflicts = faults.count(&faults.conflicts) - status_conflicts;
    faults.clear_conflicts();
    assert!(
        token_conflicts >= 2,
        "the token write was refused and retried ({token_conflicts} conflicts)"
    );

    let n = env
        .wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    eprintln!(
        "conflicts: {status_conflicts} on status writes, {token_conflicts} on the token Secret; Ready with generation {:?}",
        n.status.as_ref().and_then(|s| s.observed_generation)
    );
    let secret = env.secrets().get("nb-token").await.unwrap();
    let token = String::from_utf8(secret.data.unwrap()["NB_API_KEY"].0.clone()).unwrap();
    assert!(
        fake.state().tokens.contains_key(&token),
        "the stored token is the one the server issued"
    );
    assert_eq!(fake.calls("setup"), 1, "setup called once");
    assert_eq!(fake.state().setups_ok, 1);
}

fn status_writes_of(faults: &KubeFaults, name: &str) -> usize {
    let suffix = format!("/netbirdinstances/{name}/status");
    let log = faults.write_log.lock().unwrap();
    log.iter().filter(|w| w.ends_with(&suffix)).count()
}

#[tokio::test]
async fn the_first_status_is_written_once_unless_the_first_pass_is_slow() {
    let Some(env) = TestEnv::new("first-status").await else {
        return;
    };
    let (faults, _op) = operator_behind_faults(&env).await;
    // a bootstrap that ends within a second: its outcome is its first status, one write
    let fake = FakeNetbird::start().await;
    env.create_instance("quick", spec(&fake.url)).await.unwrap();
    env.wait_instance("quick", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(status_writes_of(&faults, "quick"), 1);

    // a first pass that waits on its server: kstatus clients get observedGeneration and Ready
    // Unknown after a second, while the pass goes on
    let slow = FakeNetbird::start().await;
    slow.fault("instance", Fault::Delay(Duration::from_millis(2500)));
    env.create_instance("slow", spec(&slow.url)).await.unwrap();
    let n = env
        .wait_instance("slow", "Ready Unknown", Duration::from_secs(2), |n| {
            ready_is(n, "Unknown", "Progressing")
        })
        .await;
    let observed = n.status.as_ref().and_then(|s| s.observed_generation);
    assert_eq!(observed, n.metadata.generation);
    assert_eq!(
        slow.calls("setup"),
        0,
        "written while the pass waits on the server"
    );
    env.wait_instance("slow", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    assert_eq!(status_writes_of(&faults, "slow"), 2);
    assert_eq!(slow.calls("setup"), 1);
}

/// The operator behind the faults and one instance "nb" bootstrapped against a fake server.
async fn bootstrapped_behind_faults(
    env: &TestEnv,
) -> (Arc<KubeFaults>, support::Operator, FakeNetbird) {
    let (faults, op) = operator_behind_faults(env).await;
    let fake = FakeNetbird::start().await;
    env.create_instance("nb", spec(&fake.url)).await.unwrap();
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    (faults, op, fake)
}

/// A JSON merge patch of `name`.
async fn merge<K>(api: &kube::Api<K>, name: &str, patch: serde_json::Value) -> K
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .unwrap()
}

/// Passes that ended without a Kubernetes error so far.
fn passes(op: &support::Operator) -> u64 {
    op.metrics
        .reconciles
        .get_or_create(&netbird_operator::metrics::ResultLabels { result: "ok" })
        .get()
}

async fn next_pass(op: &support::Operator, after: u64) {
    support::wait_for("a pass", T, || async { (passes(op) > after).then_some(()) }).await;
}

#[tokio::test]
async fn secrets_are_read_again_only_when_the_watch_reports_a_change() {
    let Some(env) = TestEnv::new("secret-reads").await else {
        return;
    };
    let (faults, op, fake) = bootstrapped_behind_faults(&env).await;
    settle(&faults).await;
    let reads = || {
        (
            faults.reads_of("/secrets/admin"),
            faults.reads_of("/secrets/nb-token"),
        )
    };
    let before = reads();
    eprintln!("Secret reads during the bootstrap (credentials, token): {before:?}");

    // a pass woken by a change outside its Secrets reads none of them
    let n = passes(&op);
    let touch = json!({"metadata": {"annotations": {"example.com/touched": "1"}}});
    merge(&env.instances(), "nb", touch).await;
    next_pass(&op, n).await;
    assert_eq!(reads(), before, "nothing changed: no Secret read");

    // the credentials Secret changes: that one is read again, once
    let n = passes(&op);
    merge(
        &env.secrets(),
        "admin",
        json!({"stringData": {"unrelated": "x"}}),
    )
    .await;
    next_pass(&op, n).await;
    settle(&faults).await;
    assert_eq!(reads(), (before.0 + 1, before.1), "only the changed Secret");
    let n = env.instances().get("nb").await.unwrap();
    assert!(ready_is(&n, "True", "Bootstrapped"));
    assert_eq!(fake.calls("setup"), 1);
}

/// Waits until the operator's Secret metadata watch has listed every Secret.
async fn secrets_listed(faults: &KubeFaults) {
    support::wait_for("the Secrets listed", T, || async {
        let log = faults.read_log.lock().unwrap().clone();
        log.iter().any(|p| p.ends_with("/secrets")).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn the_token_secret_is_not_read_before_it_exists() {
    let Some(env) = TestEnv::new("absent-token").await else {
        return;
    };
    let (faults, _op) = operator_behind_faults(&env).await;
    // from now on the watch knows which Secrets do not exist
    secrets_listed(&faults).await;
    let fake = FakeNetbird::start().await;
    env.create_instance("nb", spec(&fake.url)).await.unwrap();
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    // absent by the watch's word, then known from the operator's own writes
    assert_eq!(faults.reads_of("/secrets/nb-token"), 0);
    assert_eq!(fake.calls("setup"), 1);
}

#[tokio::test]
async fn a_secret_the_watch_has_not_reported_yet_is_read_when_the_claim_meets_it() {
    let Some(env) = TestEnv::new("claim-race").await else {
        return;
    };
    let (faults, _op) = operator_behind_faults(&env).await;
    secrets_listed(&faults).await;
    // the Secrets' watch is down (it keeps its list: no relist); the instances' watch goes on
    faults.hold_watches_of("/secrets");
    env.create_secret("nb-token", &[("NB_API_KEY", "mine")])
        .await; // someone else's Secret, which the watch does not report
    let fake = FakeNetbird::start().await;
    env.create_instance("nb", spec(&fake.url)).await.unwrap();
    // the claim (a create) meets the Secret: the pass reads it and decides again
    let n = env
        .wait_instance("nb", "SecretConflict", T, |n| {
            support::condition(n, "Stalled").is_some_and(|(_, r, _)| r == "SecretConflict")
        })
        .await;
    assert!(
        support::condition(&n, "Ready")
            .is_some_and(|(_, _, m)| m.contains("not managed by this operator"))
    );
    assert!(faults.reads_of("/secrets/nb-token") >= 1);
    assert_eq!(fake.calls("setup"), 0);
    faults.release_watches();
    let foreign = env.secrets().get("nb-token").await.unwrap();
    assert_eq!(foreign.data.unwrap()["NB_API_KEY"].0, b"mine", "untouched");
}

/// The annotation recording the last credentials comparison, and the token Secret's version.
async fn credentials_checked(env: &TestEnv) -> (String, String) {
    let s = env.secrets().get("nb-token").await.unwrap();
    let ann = s.metadata.annotations.unwrap_or_default();
    (
        ann.get(netbird_operator::token_secret::ANN_CREDENTIALS_CHECKED)
            .cloned()
            .unwrap_or_default(),
        s.metadata.resource_version.unwrap_or_default(),
    )
}

#[tokio::test]
async fn the_credentials_comparison_is_recorded_and_not_repeated_after_a_restart() {
    let Some(env) = TestEnv::new("credentials-checked").await else {
        return;
    };
    let (faults, op, fake) = bootstrapped_behind_faults(&env).await;
    let admin_rv = env
        .secrets()
        .get("admin")
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let (checked, _) = credentials_checked(&env).await;
    assert!(
        checked.starts_with(&format!("{admin_rv} same ")),
        "recorded with the claim: {checked:?}"
    );

    // another password: compared once, reported, recorded
    let other = json!({"stringData": {"password": "another-Passw0rd"}});
    let changed = merge(&env.secrets(), "admin", other).await;
    let changed_rv = changed.metadata.resource_version.unwrap();
    env.wait_instance("nb", "the note on changed credentials", T, |n| {
        support::condition(n, "Ready").is_some_and(|(_, _, m)| m.contains("no longer matches"))
    })
    .await;
    support::wait_for("the comparison recorded", T, || async {
        let (checked, _) = credentials_checked(&env).await;
        checked
            .starts_with(&format!("{changed_rv} changed "))
            .then_some(())
    })
    .await;
    settle(&faults).await;
    op.stop().await;

    // a restarted operator takes the recorded result: no write, the note stays
    let (checked, rv) = credentials_checked(&env).await;
    let before = env.instances().get("nb").await.unwrap();
    let checks = fake.calls("users_current");
    let op = env.start_operator().await;
    next_pass(&op, 0).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(credentials_checked(&env).await, (checked, rv), "no write");
    let n = env.instances().get("nb").await.unwrap();
    // it checks the token again, and that writes no status (lastVerifiedAt stays)
    assert!(
        fake.calls("users_current") > checks,
        "the token checked after the restart"
    );
    assert_eq!(
        n.metadata.resource_version, before.metadata.resource_version,
        "no status write after a restart"
    );
    assert!(
        support::condition(&n, "Ready")
            .is_some_and(|(s, _, m)| s == "True" && m.contains("no longer matches"))
    );
    assert_eq!(fake.calls("setup"), 1);
}
