//! Leader election: two operator processes (the real binary) against the real control plane; only
//! the Lease holder reconciles, and when it is killed the other takes over.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;
use support::fake_netbird::FakeNetbird;
use support::{TestEnv, ready_is};

fn operator(env: &TestEnv, name: &str, log: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_netbird-operator"))
        .args([
            "run",
            "--leader-election=true",
            "--http-addr",
            "127.0.0.1:0",
            "--max-backoff",
            "5",
        ])
        .env("KUBECONFIG", &env.cp.kubeconfig)
        .env("WATCH_NAMESPACE", &env.ns)
        .env("POD_NAMESPACE", &env.ns)
        .env("POD_NAME", name)
        .env("LOG_LEVEL", "info")
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("operator binary")
}

async fn holder(env: &TestEnv) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    leases
        .get_opt("netbird-operator-leader")
        .await
        .ok()??
        .spec?
        .holder_identity
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_follower_takes_over() {
    let Some(env) = TestEnv::new("leader").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeNetbird::start().await;
    let mut a = operator(&env, "replica-a", &dir.path().join("a.log"));
    let leader =
        support::wait_for("a Lease holder", Duration::from_secs(30), || holder(&env)).await;
    assert_eq!(leader, "replica-a");
    let mut b = operator(&env, "replica-b", &dir.path().join("b.log"));

    env.create_secret(
        "admin",
        &[
            ("email", "admin@example.com"),
            ("password", "s3cret-Passw0rd"),
        ],
    )
    .await;
    let spec = |url: &str| json!({"managementURL": url, "allowInsecureHTTP": true, "credentialsSecretRef": {"name": "admin"}});
    env.create_instance("one", spec(&fake.url)).await.unwrap();
    env.wait_instance("one", "Ready", Duration::from_secs(30), |n| {
        ready_is(n, "True", "Bootstrapped")
    })
    .await;
    assert_eq!(fake.calls("setup"), 1);
    let b_log = std::fs::read_to_string(dir.path().join("b.log")).unwrap();
    assert!(
        !b_log.contains("calling setup"),
        "the follower reconciled:\n{b_log}"
    );
    assert!(!b_log.contains("became leader"));

    // the leader dies without a word; the follower takes the Lease once it expires (15 s)
    a.kill().unwrap();
    let _ = a.wait();
    let t0 = Instant::now();
    let fake2 = FakeNetbird::start().await;
    env.create_instance("two", spec(&fake2.url)).await.unwrap();
    env.wait_instance("two", "Ready", Duration::from_secs(60), |n| {
        ready_is(n, "True", "Bootstrapped")
    })
    .await;
    let takeover = t0.elapsed();
    assert_eq!(holder(&env).await.as_deref(), Some("replica-b"));
    assert_eq!(fake2.calls("setup"), 1);
    assert_eq!(
        fake.calls("setup"),
        1,
        "the first instance is not set up again by the new leader"
    );
    eprintln!("takeover after the leader was killed: {takeover:?}");
    assert!(
        takeover < Duration::from_secs(40),
        "takeover took {takeover:?}"
    );
    let _ = b.kill();
    let _ = b.wait();
}
