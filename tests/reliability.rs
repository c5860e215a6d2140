//! The crash matrix of the bootstrap: the operator is killed (its task aborted, as SIGKILL would)
//! at each step and at random moments, then restarted, against the real apiserver and the fake
//! NetBird. Invariants: setup succeeds at most once per instance; the token is lost only when the
//! kill fell between the server's answer and the Secret write, and then the instance reports
//! Stalled/TokenLost at once; never a loop.
//!
//! Trials per crash point: NBOP_TRIALS (default 3; `make reliability` runs 50).

mod support;

use std::time::Duration;

use serde_json::json;
use support::fake_netbird::{FakeNetbird, Fault};
use support::{TestEnv, condition, ready_is};

const T: Duration = Duration::from_secs(30);

fn trials() -> usize {
    std::env::var("NBOP_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// A number in [0, n) (no extra dependency for test randomness).
fn random(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    h.finish() % n.max(1)
}

#[derive(Debug, Clone, Copy)]
enum Kill {
    /// setup is sent but the server never handles it
    BeforeSetupHandled,
    /// the server completes setup, its answer never arrives
    AfterSetupHandled,
    /// at a random moment of the bootstrap (0 to 400 ms after the instance is created, with the
    /// setup answer delayed 0 to 200 ms)
    Random,
}

/// Outcome of one trial: (ended Ready, ended TokenLost).
async fn trial(env: &TestEnv, i: usize, kill: Kill) -> (bool, bool) {
    let fake = FakeNetbird::start().await;
    let name = format!("t{i}");
    let admin = format!("admin-{i}");
    env.create_secret(
        &admin,
        &[
            ("email", "admin@example.com"),
            ("password", "s3cret-Passw0rd"),
        ],
    )
    .await;
    match kill {
        Kill::BeforeSetupHandled => fake.fault("setup", Fault::Hang),
        Kill::AfterSetupHandled => fake.fault("setup", Fault::Delay(Duration::from_secs(30))),
        Kill::Random => fake.fault("setup", Fault::Delay(Duration::from_millis(random(200)))),
    }
    let op = env.start_operator().await;
    let spec = json!({"managementURL": fake.url, "allowInsecureHTTP": true, "credentialsSecretRef": {"name": admin}});
    env.create_instance(&name, spec).await.unwrap();
    match kill {
        Kill::Random => tokio::time::sleep(Duration::from_millis(random(400))).await,
        _ => {
            support::wait_for("the setup call", T, || async {
                (fake.calls("setup") > 0).then_some(())
            })
            .await
        }
    }
    op.kill();
    fake.clear_fault("setup");

    let _op = env.start_operator().await;
    let n = env
        .wait_instance(&name, "Ready or TokenLost", T, |n| {
            ready_is(n, "True", "Bootstrapped")
                || condition(n, "Stalled").is_some_and(|(_, r, _)| r == "TokenLost")
        })
        .await;
    let ready = ready_is(&n, "True", "Bootstrapped");
    let calls = fake.calls("setup");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        fake.calls("setup"),
        calls,
        "trial {i} ({kill:?}): setup is not called in a loop"
    );
    assert!(
        fake.state().setups_ok <= 1,
        "trial {i} ({kill:?}): setup succeeded {} times",
        fake.state().setups_ok
    );
    match kill {
        Kill::BeforeSetupHandled => assert!(
            ready,
            "trial {i}: a setup the server never handled is retried once"
        ),
        Kill::AfterSetupHandled => assert!(!ready, "trial {i}: the answer was lost: TokenLost"),
        Kill::Random => {}
    }
    (ready, !ready)
}

async fn matrix(kill: Kill) {
    let Some(env) = TestEnv::new(&format!("crash-{kill:?}").to_lowercase()).await else {
        return;
    };
    let (mut ready, mut lost) = (0, 0);
    for i in 0..trials() {
        let (r, l) = trial(&env, i, kill).await;
        ready += usize::from(r);
        lost += usize::from(l);
    }
    eprintln!(
        "crash matrix {kill:?}: {} trials, {ready} Ready, {lost} TokenLost, setup succeeded at most once in each",
        trials()
    );
}

#[tokio::test]
async fn kill_before_the_server_handles_setup() {
    matrix(Kill::BeforeSetupHandled).await;
}

#[tokio::test]
async fn kill_after_the_server_handled_setup() {
    matrix(Kill::AfterSetupHandled).await;
}

#[tokio::test]
async fn kill_at_random_moments() {
    matrix(Kill::Random).await;
}

/// A user who may only create NetbirdInstances in one namespace (impersonated, under RBAC) cannot
/// make the operator read another namespace's Secret, overwrite a Secret it does not own, or send
/// the credentials over plain http.
#[tokio::test]
async fn a_namespace_user_cannot_turn_the_operator_against_the_cluster() {
    let Some(env) = TestEnv::new("deputy").await else {
        return;
    };
    let Some(other) = TestEnv::new("deputy-other").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    // the victim's Secrets: credentials in another namespace, and an unrelated Secret in this one
    other
        .create_secret(
            "admin",
            &[
                ("email", "victim@example.com"),
                ("password", "victim-Passw0rd"),
            ],
        )
        .await;
    env.create_secret("db-password", &[("password", "do-not-touch")])
        .await;
    env.grant_role(
        "nbi-author",
        "alice",
        json!([{"apiGroups": ["bootstrap.netbird.io"], "resources": ["netbirdinstances"], "verbs": ["create", "get", "list"]}]),
    )
    .await;
    // alice, impersonated by the admin
    let kc = kube::config::Kubeconfig::read_from(&env.cp.kubeconfig).unwrap();
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    cfg.auth_info.impersonate = Some("alice".into());
    let alice = support::TestEnv {
        ns: env.ns.clone(),
        client: kube::Client::try_from(cfg).unwrap(),
        cp: env.cp,
    };
    let _op = env.start_operator().await;

    // 1. no way to name another namespace: "admin" is looked up in alice's namespace only
    alice
        .create_instance("steal", json!({"managementURL": fake.url, "allowInsecureHTTP": true, "credentialsSecretRef": {"name": "admin"}}))
        .await
        .unwrap();
    env.wait_instance("steal", "WaitingForCredentials", T, |n| {
        condition(n, "Reconciling").is_some_and(|(_, r, _)| r == "WaitingForCredentials")
    })
    .await;
    assert_eq!(
        fake.calls("setup"),
        0,
        "the other namespace's credentials were never used"
    );
    // 2. a token Secret name that is someone else's Secret: never overwritten
    alice.create_secret_denied("mine").await;
    let spec = json!({"managementURL": fake.url, "allowInsecureHTTP": true, "credentialsSecretRef": {"name": "db-password"},
        "token": {"secretName": "db-password"}});
    alice.create_instance("overwrite", spec).await.unwrap();
    env.wait_instance("overwrite", "InvalidSpec or SecretConflict", T, |n| {
        condition(n, "Stalled").is_some()
    })
    .await;
    let untouched = env.secrets().get("db-password").await.unwrap();
    assert_eq!(untouched.data.unwrap()["password"].0, b"do-not-touch");
    assert!(
        untouched
            .metadata
            .annotations
            .unwrap_or_default()
            .is_empty(),
        "not even annotated"
    );
    // 3. plain http without the opt-in is refused at admission
    let e = alice
        .create_instance(
            "plain",
            json!({"managementURL": fake.url, "credentialsSecretRef": {"name": "x"}}),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("allowInsecureHTTP"), "{e}");
}

/// A fake server, the operator, and instance "nb" bootstrapped against them (Ready).
async fn bootstrapped(env: &TestEnv) -> (FakeNetbird, support::Operator) {
    let fake = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let op = env.start_operator().await;
    let spec = json!({"managementURL": fake.url, "allowInsecureHTTP": true, "credentialsSecretRef": {"name": "admin"}});
    env.create_instance("nb", spec).await.unwrap();
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    (fake, op)
}

/// The token Secret deleted by hand while the operator runs: reported (TokenLost), never a second
/// setup; putting a token back recovers.
#[tokio::test]
async fn the_token_secret_deleted_by_hand_is_reported() {
    let Some(env) = TestEnv::new("secret-deleted").await else {
        return;
    };
    let (fake, _op) = bootstrapped(&env).await;
    env.secrets()
        .delete("nb-token", &Default::default())
        .await
        .unwrap();
    let n = env
        .wait_instance("nb", "TokenLost", T, |n| {
            condition(n, "Stalled").is_some_and(|(_, r, _)| r == "TokenLost")
        })
        .await;
    assert!(
        condition(&n, "Ready").unwrap().2.contains("gone"),
        "{:?}",
        condition(&n, "Ready")
    );
    assert_eq!(fake.calls("setup"), 1);
    assert_eq!(fake.state().setups_ok, 1);
}

/// The token Secret edited by hand while the operator runs: a broken token is reported
/// (TokenRejected) and never sent, putting the token back recovers; the ownership label removed by
/// hand makes it a Secret the operator does not touch (SecretConflict) until it is back; setup is
/// never called again.
#[tokio::test]
async fn the_token_secret_edited_by_hand_is_reported_and_repaired() {
    let Some(env) = TestEnv::new("secret-edited").await else {
        return;
    };
    let (fake, _op) = bootstrapped(&env).await;
    let original = env.secrets().get("nb-token").await.unwrap();
    let token = original.data.as_ref().unwrap()["NB_API_KEY"].clone();
    let patch = |v: serde_json::Value| {
        let secrets = env.secrets();
        async move {
            secrets
                .patch(
                    "nb-token",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&v),
                )
                .await
                .unwrap()
        }
    };

    // a token that is not one: reported, never sent
    let verified = fake.calls("users_current");
    patch(json!({"stringData": {"NB_API_KEY": "not-a-token"}})).await;
    env.wait_instance("nb", "TokenRejected", T, |n| {
        condition(n, "Stalled").is_some_and(|(_, r, _)| r == "TokenRejected")
    })
    .await;
    assert_eq!(
        fake.calls("users_current"),
        verified,
        "a malformed token is never sent"
    );

    // the token put back: Ready again
    patch(json!({"data": {"NB_API_KEY": token}})).await;
    env.wait_instance("nb", "Ready again", T, |n| {
        ready_is(n, "True", "Bootstrapped")
    })
    .await;

    // our label removed by hand: the Secret is no longer ours, so it is left untouched and the
    // conflict reported; the label put back ends it
    patch(json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": null}}})).await;
    env.wait_instance("nb", "SecretConflict", T, |n| {
        condition(n, "Stalled").is_some_and(|(_, r, _)| r == "SecretConflict")
    })
    .await;
    patch(json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": "netbird-operator"}}}))
        .await;
    env.wait_instance("nb", "Ready after the label", T, |n| {
        ready_is(n, "True", "Bootstrapped")
    })
    .await;
    assert_eq!(fake.calls("setup"), 1, "setup is never called again");
    assert_eq!(fake.state().setups_ok, 1);
}
