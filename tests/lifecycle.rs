//! The edges of an instance's life: a setup whose answer never arrived, a finalizer against a
//! server that fails for a while, a token write the RBAC refuses, a shutdown while a token waits to
//! be written, and what the operator remembers about instances that went away.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::fake_netbird::{FakeFleet, FakeNetbird, Fault};
use support::{TestEnv, condition, ready_is};

const T: Duration = Duration::from_secs(30);

fn spec(url: &str) -> serde_json::Value {
    json!({
        "managementURL": url,
        "allowInsecureHTTP": true,
        "credentialsSecretRef": {"name": "admin"},
    })
}

/// The operator's per-instance memory, as its debugging gauge reports it.
fn remembered(op: &support::Operator) -> i64 {
    op.metrics.remembered_instances.get()
}

/// Series of the per-instance token expiry gauge.
fn expiry_series(op: &support::Operator) -> usize {
    op.metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("netbird_operator_token_expiry_seconds{"))
        .count()
}

/// Setup's answer is lost after the server did it; a server that still claims "setup required"
/// (a stale cache in front) then answers the next call with 412: TokenLost, with the claim kept,
/// never "someone else set it up" with the claim released.
#[tokio::test]
async fn an_unanswered_setup_followed_by_already_set_up_is_token_lost() {
    let Some(env) = TestEnv::new("setup-unanswered").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    fake.fault("setup", Fault::ServeThenClose);
    fake.fault("instance", Fault::Json(200, r#"{"setup_required": true}"#));
    env.create_admin_secret().await;
    let _op = env.start_operator().await;
    env.create_instance("nb", spec(&fake.url)).await.unwrap();
    support::wait_for("the first setup call", T, || async {
        (fake.calls("setup") >= 1).then_some(())
    })
    .await;
    fake.clear_fault("setup");
    let n = env
        .wait_instance("nb", "Stalled/TokenLost", T, |n| {
            condition(n, "Stalled").is_some_and(|(_, r, _)| r == "TokenLost")
        })
        .await;
    let message = condition(&n, "Stalled").unwrap().2;
    assert!(message.contains("someone else"), "{message}");
    assert!(message.contains("NB_API_KEY"), "{message}");
    assert_eq!(
        fake.state().setups_ok,
        1,
        "the server was set up once, by the lost call"
    );
    let secret = env.secrets().get("nb-token").await.unwrap();
    let ann = secret.metadata.annotations.unwrap_or_default();
    assert!(
        ann.contains_key("bootstrap.netbird.io/setup-started-at"),
        "the claim is kept as the evidence: {ann:?}"
    );
    let calls = fake.calls("setup");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fake.calls("setup"), calls, "no further setup call");
}

/// deletionPolicy Delete against a server that fails for a while: the finalizer keeps trying with
/// backoff, one TokenNotDeleted Event per failure, and deletes the token once the server is back.
#[tokio::test]
async fn the_finalizer_keeps_trying_until_the_server_is_back() {
    let Some(env) = TestEnv::new("finalizer-retries").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let _op = env.start_operator().await;
    let mut s = spec(&fake.url);
    s["token"] = json!({"deletionPolicy": "Delete"});
    env.create_instance("nb", s).await.unwrap();
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    fake.fault("tokens_delete", Fault::Status(503, "service unavailable"));
    env.instances()
        .delete("nb", &Default::default())
        .await
        .unwrap();
    let failures = support::wait_for("two failed attempts, each with an Event", T, || {
        let env = &env;
        async move {
            let n = env
                .events()
                .await
                .into_iter()
                .filter(|(r, note)| r == "TokenNotDeleted" && note.contains("retrying"))
                .count();
            (n >= 2).then_some(n)
        }
    })
    .await;
    assert!(
        env.instances().get_opt("nb").await.unwrap().is_some(),
        "still waiting"
    );
    fake.clear_fault("tokens_delete");
    env.wait_instance_gone("nb").await;
    assert!(
        fake.state().pats.is_empty(),
        "the token was deleted on the server"
    );
    let events = env.events().await;
    assert!(
        events.iter().any(|(r, _)| r == "TokenDeleted"),
        "{events:?}"
    );
    eprintln!("{failures} TokenNotDeleted Events before the server came back");
}

/// 200 instances in every state (Ready, Stalled, suspended, waiting for credentials, Delete policy)
/// created and deleted: the operator's per-instance memory and metric series return to where they
/// were.
#[tokio::test]
async fn memory_and_series_of_deleted_instances_are_forgotten() {
    let Some(env) = TestEnv::new("forget").await else {
        return;
    };
    let fleet = FakeFleet::start(80).await;
    env.create_admin_secret().await;
    let op = env.start_operator().await;
    let (before, series_before) = (remembered(&op), expiry_series(&op));
    let mut names = Vec::new();
    for i in 0..200usize {
        let name = format!("nb-{i}");
        let group = i / 40;
        let server = match group {
            0 => i,       // Ready
            1 => i - 40,  // Stalled: group 0 set its server up already (one of each pair wins)
            4 => i - 120, // Delete policy, on servers of their own: Ready with a finalizer
            _ => 0,
        };
        let mut s = spec(&fleet.url(server));
        match group {
            2 => s["suspend"] = json!(true),
            3 => s["credentialsSecretRef"] = json!({"name": "missing"}),
            4 => s["token"] = json!({"deletionPolicy": "Delete"}),
            _ => {}
        }
        env.create_instance(&name, s).await.unwrap();
        names.push(name);
    }
    support::wait_for(
        "every instance reconciled",
        Duration::from_secs(120),
        || {
            let env = &env;
            async move {
                let list = env.instances().list(&Default::default()).await.ok()?;
                let done = list
                    .items
                    .iter()
                    .filter(|n| {
                        n.spec.suspend
                            || condition(n, "Ready").is_some_and(|(_, r, _)| r != "Progressing")
                    })
                    .count();
                (done == 200).then_some(())
            }
        },
    )
    .await;
    let during = remembered(&op);
    let series = expiry_series(&op);
    eprintln!("remembered {during} instances, {series} expiry series with 200 present");
    assert!(during >= 150, "{during}");
    assert!(series >= 40, "{series}");
    for name in &names {
        env.instances()
            .delete(name, &Default::default())
            .await
            .unwrap();
    }
    support::wait_for("every instance gone", Duration::from_secs(120), || {
        let env = &env;
        async move {
            let list = env.instances().list(&Default::default()).await.ok()?;
            list.items.is_empty().then_some(())
        }
    })
    .await;
    support::wait_for("the memory to return", T, || async {
        (remembered(&op) == before && expiry_series(&op) == series_before).then_some(())
    })
    .await;
}

/// The role the operator runs under in the next tests: everything but patching Secrets, so the claim
/// (a create) works and the token write (a patch) is refused by the real apiserver.
async fn without_secret_patch(env: &TestEnv) -> support::Operator {
    env.grant_role(
        "operator-without-secret-patch",
        "limited",
        json!([
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "create"]},
            {"apiGroups": ["bootstrap.netbird.io"], "resources": ["netbirdinstances"], "verbs": ["get", "list", "watch", "patch"]},
            {"apiGroups": ["bootstrap.netbird.io"], "resources": ["netbirdinstances/status"], "verbs": ["patch", "update"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        ]),
    )
    .await;
    let limited = env.cp.client_from(&env.cp.limited_kubeconfig).await;
    env.start_operator_with(limited).await
}

/// A token write refused by RBAC: the token stays in memory, the status says so at once (naming the
/// Secret and the refusal), and the write succeeds as soon as an admin grants the permission.
#[tokio::test]
async fn a_token_write_refused_by_rbac_is_reported_and_retried() {
    let Some(env) = TestEnv::new("token-write-403").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let _op = without_secret_patch(&env).await;
    env.create_instance("nb", spec(&fake.url)).await.unwrap();
    let n = env
        .wait_instance("nb", "Reconciling/StoringToken", T, |n| {
            condition(n, "Reconciling").is_some_and(|(_, r, _)| r == "StoringToken")
        })
        .await;
    let message = condition(&n, "Reconciling").unwrap().2;
    assert!(message.contains("nb-token"), "{message}");
    assert!(message.contains("forbidden"), "{message}");
    assert!(message.contains("held in memory"), "{message}");
    env.grant_role(
        "secret-patch",
        "limited",
        json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["patch"]}]),
    )
    .await;
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    assert_eq!(fake.calls("setup"), 1);
}

/// A shutdown while a token write keeps failing: the operator keeps trying for its shutdown timeout
/// (5 s in tests), then stops with a loud error naming the instance; it never hangs.
#[tokio::test]
async fn a_shutdown_with_a_pending_token_write_ends_in_time() {
    let Some(env) = TestEnv::new("shutdown-pending").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let op = without_secret_patch(&env).await;
    env.create_instance("held", spec(&fake.url)).await.unwrap();
    env.wait_instance("held", "Reconciling/StoringToken", T, |n| {
        condition(n, "Reconciling").is_some_and(|(_, r, _)| r == "StoringToken")
    })
    .await;
    let t0 = Instant::now();
    let stopped = op.stop_within(Duration::from_secs(20)).await;
    let took = t0.elapsed();
    eprintln!("stopped after {took:?}");
    assert!(stopped, "the operator did not stop within 20 s");
    assert!(
        took >= Duration::from_secs(4),
        "it kept trying for its shutdown timeout: {took:?}"
    );
    let logs = support::captured_logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("LOST") && l.contains("held") && l.contains("ERROR")),
        "a loud error names the instance"
    );
}
