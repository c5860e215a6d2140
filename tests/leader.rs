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

    env.create_admin_secret().await;
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

/// Leaders SIGKILLed at random moments while many instances bootstrap: each server is set up exactly
/// once, and no extra token is left on any server. Rounds: NBOP_LEADER_KILLS (default 1).
#[tokio::test]
async fn leaders_killed_during_a_bootstrap_of_many_instances() {
    let Some(env) = TestEnv::new("leader-kills").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    env.create_admin_secret().await;
    let rounds: usize = std::env::var("NBOP_LEADER_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut fakes = Vec::new();
    for i in 0..10 {
        let fake = FakeNetbird::start().await;
        fake.fault(
            "setup",
            support::fake_netbird::Fault::Delay(Duration::from_millis(100 * (i as u64 % 5))),
        );
        fakes.push(fake);
    }
    let mut replicas = vec![
        operator(&env, "r0", &dir.path().join("r0.log")),
        operator(&env, "r1", &dir.path().join("r1.log")),
    ];
    for (i, fake) in fakes.iter().enumerate() {
        let spec = json!({"managementURL": fake.url, "allowInsecureHTTP": true, "credentialsSecretRef": {"name": "admin"}});
        env.create_instance(&format!("nb{i}"), spec).await.unwrap();
    }
    let mut killed: Vec<String> = Vec::new();
    for (next, round) in (2..).zip(0..rounds) {
        let leader = support::wait_for("a live leader", Duration::from_secs(60), || {
            let killed = killed.clone();
            let env = &env;
            async move { holder(env).await.filter(|h| !killed.contains(h)) }
        })
        .await;
        killed.push(leader.clone());
        // kill it at a random moment of its work
        let jitter = std::collections::hash_map::RandomState::new();
        let delay = std::hash::BuildHasher::hash_one(&jitter, round) % 1000;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let idx: usize = leader.trim_start_matches('r').parse().unwrap();
        if let Some(child) = replicas.get_mut(idx) {
            let _ = child.kill();
            let _ = child.wait();
        }
        let name = format!("r{next}");
        replicas.push(operator(
            &env,
            &name,
            &dir.path().join(format!("{name}.log")),
        ));
    }
    for i in 0..10 {
        env.wait_instance(&format!("nb{i}"), "Ready", Duration::from_secs(120), |n| {
            ready_is(n, "True", "Bootstrapped") || support::condition(n, "Stalled").is_some()
        })
        .await;
    }
    let mut lost = 0;
    for (i, f) in fakes.iter().enumerate() {
        let s = f.state();
        assert!(
            s.setups_ok <= 1,
            "nb{i}: setup succeeded {} times",
            s.setups_ok
        );
        assert!(
            s.tokens.len() <= 1,
            "nb{i}: {} tokens left on the server",
            s.tokens.len()
        );
        lost += usize::from(s.setups_ok == 1 && s.tokens.is_empty());
    }
    for r in replicas.iter_mut() {
        let _ = r.kill();
        let _ = r.wait();
    }
    eprintln!(
        "leader kills: {rounds} round(s), 10 instances, setup at most once each, {lost} token(s) lost between answer and store"
    );
}

/// A leader stopped normally (SIGTERM) releases the Lease once its controller has drained, so the
/// follower takes over at once instead of waiting for the Lease to expire (15 s after the last
/// renewal). Shown on the Lease itself: the follower acquires it before the stopped leader's last
/// renewal would have expired, which a Lease left held never allows.
#[tokio::test]
async fn a_leader_stopped_normally_releases_the_lease() {
    let Some(env) = TestEnv::new("leader-release").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let mut a = operator(&env, "replica-a", &dir.path().join("a.log"));
    let leader =
        support::wait_for("a Lease holder", Duration::from_secs(30), || holder(&env)).await;
    assert_eq!(leader, "replica-a");
    let mut b = operator(&env, "replica-b", &dir.path().join("b.log"));
    // b is a follower once it is ready (it answers /readyz); its log says so
    support::wait_for("replica-b waiting", Duration::from_secs(30), || {
        let log = std::fs::read_to_string(dir.path().join("b.log")).unwrap_or_default();
        async move { log.contains("waiting to become leader").then_some(()) }
    })
    .await;

    // stop a right after a renewal: its Lease is then valid for the full 15 s
    let renew_time = |l: &Lease| l.spec.as_ref().and_then(|s| s.renew_time.clone());
    let before = renew_time(&leases.get("netbird-operator-leader").await.unwrap());
    let renewed = support::wait_for("a renewal", Duration::from_secs(30), || {
        let leases = leases.clone();
        let before = before.clone();
        async move {
            let l = leases.get("netbird-operator-leader").await.ok()?;
            (renew_time(&l) != before).then_some(l)
        }
    })
    .await;
    let spec = renewed.spec.clone().unwrap();
    let expiry = spec.renew_time.unwrap().0
        + jiff::SignedDuration::from_secs(spec.lease_duration_seconds.unwrap().into());
    let t0 = Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &a.id().to_string()])
        .status();
    let status = a.wait().unwrap();
    let stopped = t0.elapsed();
    assert!(status.success(), "replica-a exited with {status}");
    let taken = support::wait_for(
        "replica-b to hold the Lease",
        Duration::from_secs(40),
        || {
            let leases = leases.clone();
            async move {
                let l = leases.get("netbird-operator-leader").await.ok()?;
                let s = l.spec?;
                (s.holder_identity.as_deref() == Some("replica-b")).then_some(s)
            }
        },
    )
    .await;
    let takeover = t0.elapsed();
    let acquired = taken.acquire_time.expect("acquireTime").0;
    let a_log = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
    assert!(
        acquired < expiry,
        "replica-b acquired the Lease at {acquired}, after replica-a's would have expired ({expiry}): it was not released\n{a_log}"
    );
    assert!(a_log.contains("released the leader Lease"), "{a_log}");
    eprintln!(
        "SIGTERM to the leader: exited after {stopped:?}, follower holds the Lease {takeover:?} after SIGTERM"
    );
    let _ = b.kill();
    let _ = b.wait();
}
