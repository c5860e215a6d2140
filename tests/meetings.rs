//! Where two features meet: each test here is a defect found where one feature met another (a
//! rotation's grace period and the status's merge patch, the service-user exchange and a grace
//! period, the credentials Secret removed and a rotation due, a setup that fails the same way
//! every time, a proxy in front of NetBird, a token write the apiserver refuses or never answers,
//! the finalizer and an answer that will not change). Against the real apiserver and the fake
//! NetBird (faults on demand); each failed on the code before its fix.

mod support;

use std::time::Duration;

use netbird_operator::token_secret::{ANN_PREVIOUS_TOKEN_ID, ANN_SERVICE_USER};
use serde_json::json;
use support::fake_netbird::{FakeNetbird, Fault};
use support::kube_faults::{self, KubeFaults};
use support::{TestEnv, condition, ready_is};

const T: Duration = Duration::from_secs(30);
const DAY: Duration = Duration::from_secs(24 * 3600);

fn spec(url: &str, grace: &str) -> serde_json::Value {
    json!({
        "managementURL": url,
        "allowInsecureHTTP": true,
        "credentialsSecretRef": {"name": "admin"},
        "token": {"expiresInDays": 30, "rotation": {"gracePeriod": grace}},
    })
}

async fn annotations(env: &TestEnv) -> std::collections::BTreeMap<String, String> {
    env.secrets()
        .get("nb-token")
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap_or_default()
}

async fn token(env: &TestEnv) -> String {
    let s = env.secrets().get("nb-token").await.unwrap();
    String::from_utf8(s.data.unwrap()["NB_API_KEY"].0.clone()).unwrap()
}

async fn bootstrapped(env: &TestEnv, fake: &FakeNetbird, spec: serde_json::Value) {
    env.create_admin_secret().await;
    let op = env.start_operator().await;
    env.create_instance("nb", spec).await.unwrap();
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    // identified (the rotation and the exchange replace a token by its id)
    support::wait_for("the token id", T, || async {
        annotations(env)
            .await
            .contains_key(netbird_operator::token_secret::ANN_TOKEN_ID)
            .then_some(())
    })
    .await;
    op.stop().await;
    assert_eq!(fake.calls("setup"), 1);
}

/// Edits the instance to the spec `base` with a service user.
async fn ask_for_service_user(env: &TestEnv, mut base: serde_json::Value) {
    base["token"]["serviceUser"] = json!({"name": "netbird-operator"});
    env.instances()
        .patch(
            "nb",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": base})),
        )
        .await
        .unwrap();
}

/// The status is a merge patch: a field it leaves out stays. Once the previous token is deleted,
/// `status.token.previousTokenID` and `previousTokenDeletionAt` must go (they stayed forever).
#[tokio::test]
async fn the_previous_token_leaves_the_status_when_it_is_deleted() {
    let Some(env) = TestEnv::new("meet-stale").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    bootstrapped(&env, &fake, spec(&fake.url, "1h")).await;
    let op = env.start_operator_ahead(21 * DAY).await;
    let n = env
        .wait_instance("nb", "rotated, previous token kept", T, |n| {
            n.status
                .as_ref()
                .and_then(|s| s.token.as_ref())
                .is_some_and(|t| t.previous_token_id.is_some())
        })
        .await;
    let previous = n.status.unwrap().token.unwrap().previous_token_id.unwrap();
    op.stop().await;
    // past the grace period: the previous token is deleted, and the status says so
    let _op = env
        .start_operator_ahead(21 * DAY + Duration::from_secs(2 * 3600))
        .await;
    let n = env
        .wait_instance("nb", "without a previous token", T, |n| {
            n.status
                .as_ref()
                .and_then(|s| s.token.as_ref())
                .is_some_and(|t| {
                    t.previous_token_id.is_none() && t.previous_token_deletion_at.is_none()
                })
        })
        .await;
    assert!(ready_is(&n, "True", "Bootstrapped"));
    assert!(!annotations(&env).await.contains_key(ANN_PREVIOUS_TOKEN_ID));
    assert!(
        !fake.state().pats.values().any(|(id, ..)| *id == previous),
        "the previous token is deleted on the server"
    );
}

/// The credentials Secret is needed for setup only: removed after the bootstrap (a hardening
/// step), the token is still rotated when due and the instance stays Ready (it became
/// WaitingForCredentials and the token expired).
#[tokio::test]
async fn the_token_is_rotated_after_the_credentials_secret_is_removed() {
    let Some(env) = TestEnv::new("meet-nocreds").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    bootstrapped(&env, &fake, spec(&fake.url, "0s")).await;
    let first = token(&env).await;
    env.secrets()
        .delete("admin", &Default::default())
        .await
        .unwrap();
    let _op = env.start_operator_ahead(21 * DAY).await;
    let n = env
        .wait_instance("nb", "rotated without credentials", T, |n| {
            condition(n, "TokenAvailable").is_some_and(|(_, r, _)| r == "TokenRotated")
        })
        .await;
    let (status, reason, message) = condition(&n, "Ready").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Bootstrapped"));
    assert!(message.contains("credentials Secret is gone"), "{message}");
    assert_ne!(token(&env).await, first);
    assert_eq!(fake.calls("setup"), 1);
}

/// The service-user exchange with `gracePeriod: 0s` deleted the old token right after storing the
/// new one, before the new one was verified: a new token NetBird then refused left nothing that
/// works. The old one stays until the new one is verified.
#[tokio::test]
async fn the_exchange_keeps_the_old_token_until_the_new_one_is_verified() {
    let Some(env) = TestEnv::new("meet-exchange").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    bootstrapped(&env, &fake, spec(&fake.url, "0s")).await;
    let owner_token = token(&env).await;
    let _op = env.start_operator().await;
    // the new (service user's) token cannot be verified for now
    fake.state().service_user_calls_fail = true;
    ask_for_service_user(&env, spec(&fake.url, "0s")).await;
    support::wait_for("the service user's token stored", T, || async {
        annotations(&env)
            .await
            .contains_key(ANN_SERVICE_USER)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        fake.state().tokens.contains_key(&owner_token),
        "the old token is deleted only after the new one is verified"
    );
    // verification works again: the old token goes
    fake.state().service_user_calls_fail = false;
    support::wait_for("the old token deleted", Duration::from_secs(60), || async {
        (!fake.state().tokens.contains_key(&owner_token)).then_some(())
    })
    .await;
}

/// An exchange during a rotation's grace period overwrote the record of the previous token: that
/// token then stayed valid until its own expiry, unwatched. The exchange waits for the grace
/// period to end.
#[tokio::test]
async fn the_exchange_waits_for_a_rotation_grace_period() {
    let Some(env) = TestEnv::new("meet-grace").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    bootstrapped(&env, &fake, spec(&fake.url, "1h")).await;
    let op = env.start_operator_ahead(21 * DAY).await;
    let previous = support::wait_for("rotated", T, || async {
        annotations(&env).await.get(ANN_PREVIOUS_TOKEN_ID).cloned()
    })
    .await;
    ask_for_service_user(&env, spec(&fake.url, "1h")).await;
    env.wait_instance("nb", "the new generation observed", T, |n| {
        n.status.as_ref().and_then(|s| s.observed_generation) == n.metadata.generation
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ann = annotations(&env).await;
    assert_eq!(ann.get(ANN_PREVIOUS_TOKEN_ID), Some(&previous));
    assert!(
        !ann.contains_key(ANN_SERVICE_USER),
        "no exchange inside the grace period"
    );
    assert!(fake.state().pats.values().any(|(id, ..)| *id == previous));
    op.stop().await;
    // after the grace period: the previous token is deleted, then the exchange runs
    let _op = env
        .start_operator_ahead(21 * DAY + Duration::from_secs(2 * 3600))
        .await;
    support::wait_for("the exchange", T, || async {
        annotations(&env)
            .await
            .contains_key(ANN_SERVICE_USER)
            .then_some(())
    })
    .await;
    assert!(!fake.state().pats.values().any(|(id, ..)| *id == previous));
}

/// A setup that answers 500 every time (NetBird with local users disabled) was retried forever,
/// each time with the password, as "ManagementUnreachable". A few tries, then Stalled.
#[tokio::test]
async fn setup_answering_500_every_time_stalls_after_a_few_tries() {
    let Some(env) = TestEnv::new("meet-setup500").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    fake.fault("setup", Fault::Status(500, "internal server error"));
    env.create_admin_secret().await;
    let _op = env.start_operator().await;
    env.create_instance("nb", spec(&fake.url, "0s"))
        .await
        .unwrap();
    let n = env
        .wait_instance("nb", "SetupUnavailable", Duration::from_secs(60), |n| {
            ready_is(n, "False", "SetupUnavailable")
        })
        .await;
    let (_, _, message) = condition(&n, "Ready").unwrap();
    assert!(message.contains("local users disabled"), "{message}");
    let calls = fake.calls("setup");
    assert_eq!(calls, 3);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(fake.calls("setup"), calls, "the password is not sent again");
}

/// A reverse proxy's plain 404 (a wrong path prefix) was read as "token rejected". It is a wrong
/// URL, retried, and the token is not called rejected.
#[tokio::test]
async fn a_proxy_404_is_a_wrong_url_not_a_rejected_token() {
    let Some(env) = TestEnv::new("meet-proxy404").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    bootstrapped(&env, &fake, spec(&fake.url, "0s")).await;
    fake.fault("users_current", Fault::NonJson(404));
    // a new process verifies the token again
    let _op = env.start_operator().await;
    let n = env
        .wait_instance("nb", "not Ready", T, |n| {
            ready_is(n, "False", "ManagementUnreachable")
        })
        .await;
    let (_, _, message) = condition(&n, "Ready").unwrap();
    assert!(message.contains("path prefix"), "{message}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = env.instances().get("nb").await.unwrap();
    assert!(!ready_is(&n, "False", "TokenRejected"));
}

/// The finalizer retried an answer that will not change (403) until its timeout: it lets go at
/// once, and says why.
#[tokio::test]
async fn the_finalizer_lets_go_of_an_answer_that_will_not_change() {
    let Some(env) = TestEnv::new("meet-finalizer").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    let mut with_delete = spec(&fake.url, "0s");
    with_delete["token"]["deletionPolicy"] = json!("Delete");
    bootstrapped(&env, &fake, with_delete).await;
    let _op = env.start_operator().await;
    fake.fault("tokens_delete", Fault::Status(403, "permission denied"));
    env.instances()
        .delete("nb", &Default::default())
        .await
        .unwrap();
    // the tests' finalizer timeout is 10 s: well before it
    env.wait_instance_gone_within("nb", Duration::from_secs(5))
        .await;
    let events = env.events().await;
    assert!(
        events
            .iter()
            .any(|(r, n)| r == "TokenNotDeleted" && n.contains("Retrying cannot change")),
        "{events:?}"
    );
}

/// On a new instance whose token Secret cannot be written, the initial status (written after a
/// second) replaced the most urgent message the operator has: "token held in memory only".
#[tokio::test]
async fn the_initial_status_never_replaces_a_token_held_in_memory() {
    let Some(env) = TestEnv::new("meet-urgent").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let faults = std::sync::Arc::new(KubeFaults::default());
    // the claim (a create) goes through; writing the token into it is refused
    faults.refuse_on(403, |m, p| {
        m == http::Method::PATCH && p.ends_with("/secrets/nb-token")
    });
    let client = kube_faults::client(env.client.clone(), faults.clone());
    let _op = env.start_operator_with(client).await;
    env.create_instance("nb", spec(&fake.url, "0s"))
        .await
        .unwrap();
    env.wait_instance("nb", "StoringToken", T, |n| {
        ready_is(n, "False", "StoringToken")
    })
    .await;
    // past the initial status's second
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = env.instances().get("nb").await.unwrap();
    assert!(ready_is(&n, "False", "StoringToken"), "{:?}", n.status);
    faults.clear_conflicts();
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    assert_eq!(fake.calls("setup"), 1);
}

/// A token write the apiserver never answers: at a shutdown, the write gives up at the deadline
/// counted from the shutdown (it waited for the apiserver's answer first), says loudly that the
/// token is lost, and never also reports it stored.
#[tokio::test]
async fn an_unanswered_token_write_ends_at_the_shutdown_deadline_as_lost() {
    let Some(env) = TestEnv::new("meet-deadline").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let faults = std::sync::Arc::new(KubeFaults::default());
    faults.hang_on(|m, p| m == http::Method::PATCH && p.ends_with("/secrets/nb-token"));
    let client = kube_faults::client(env.client.clone(), faults.clone());
    let op = env.start_operator_with(client).await;
    env.create_instance("nb", spec(&fake.url, "0s"))
        .await
        .unwrap();
    support::wait_for("setup", T, || async {
        (fake.calls("setup") == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // the tests' shutdown timeout is 5 s
    let started = std::time::Instant::now();
    assert!(
        op.stop_within(Duration::from_secs(9)).await,
        "the shutdown ends"
    );
    let took = started.elapsed();
    println!("shutdown with an unanswered token write took {took:?}");
    // this test's lines (the log is shared by the tests of this binary)
    let logs: Vec<String> = support::captured_logs()
        .lines()
        .filter(|l| l.contains(&env.ns))
        .map(str::to_string)
        .collect();
    assert!(
        logs.iter().any(|l| l.contains("is LOST")),
        "the loss is said loudly"
    );
    assert!(
        !logs
            .iter()
            .any(|l| l.contains("setup succeeded; token stored"))
    );
    let events = env.events().await;
    assert!(
        !events.iter().any(|(r, _)| r == "SetupPerformed"),
        "{events:?}"
    );
}

/// A token write that kept failing held one of the controller's slots for as long as the process
/// lived: with every slot so held, no other instance got a pass. With one slot, an instance whose
/// token Secret cannot be written leaves room for another, and its token is written once allowed.
#[tokio::test]
async fn a_failing_token_write_does_not_hold_a_controller_slot() {
    let Some(env) = TestEnv::new("meet-slot").await else {
        return;
    };
    let first = FakeNetbird::start().await;
    let second = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let faults = std::sync::Arc::new(KubeFaults::default());
    faults.refuse_on(403, |m, p| {
        m == http::Method::PATCH && p.ends_with("/secrets/stuck-token")
    });
    let client = kube_faults::client(env.client.clone(), faults.clone());
    let _op = env.start_operator_concurrency(client, 1).await;
    env.create_instance("stuck", spec(&first.url, "0s"))
        .await
        .unwrap();
    env.wait_instance("stuck", "StoringToken", T, |n| {
        ready_is(n, "False", "StoringToken")
    })
    .await;
    env.create_instance("other", spec(&second.url, "0s"))
        .await
        .unwrap();
    env.wait_instance("other", "Ready", Duration::from_secs(60), |n| {
        ready_is(n, "True", "Bootstrapped")
    })
    .await;
    // the write is allowed again: the held token is written by the next pass, setup ran once
    faults.clear_conflicts();
    env.wait_instance("stuck", "Ready", Duration::from_secs(60), |n| {
        ready_is(n, "True", "Bootstrapped")
    })
    .await;
    assert_eq!(first.calls("setup"), 1);
}

/// A Delete-policy instance whose `secretName` was changed after its bootstrap: the finalizer
/// looked only at the Secret the spec names now (empty), and the token of the Secret it had written
/// stayed valid on the server, with nothing said (found by the history explorer: seed 3, history
/// 4357; the Secret goes with the instance through its owner reference).
#[tokio::test]
async fn the_finalizer_deletes_the_token_of_a_secret_the_spec_no_longer_names() {
    let Some(env) = TestEnv::new("meet-renamed").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    let mut with_delete = spec(&fake.url, "0s");
    with_delete["token"]["deletionPolicy"] = json!("Delete");
    bootstrapped(&env, &fake, with_delete.clone()).await;
    assert_eq!(fake.state().pats.len(), 1, "the setup token");
    let _op = env.start_operator().await;
    with_delete["token"]["secretName"] = json!("nb-token-2");
    env.instances()
        .patch(
            "nb",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": with_delete})),
        )
        .await
        .unwrap();
    // the new Secret holds no token (the server was set up by this operator): a token by hand
    env.wait_instance("nb", "not Ready on the new Secret", T, |n| {
        ready_is(n, "False", "TokenLost")
    })
    .await;
    env.instances()
        .delete("nb", &Default::default())
        .await
        .unwrap();
    env.wait_instance_gone("nb").await;
    assert!(
        fake.state().pats.is_empty(),
        "the token of Secret nb-token was deleted on the server"
    );
}
