//! Day 2 beside a consumer that reads the token once (the official NetBird operator reads it from an
//! environment variable at start-up; tests/support/consumer.rs behaves the same): through a
//! rotation, the previous token keeps working for `gracePeriod`, then it is deleted; with
//! `gracePeriod: 0s` the consumer breaks at once. Against the real NetBird server; the rotation is
//! brought forward by running the operator with its clock 17 hours ahead (1-day tokens are renewed
//! when less than a third of their lifetime is left).

mod support;

use std::time::Duration;

use netbird_operator::netbird::{ClientOptions, NetbirdClient};
use netbird_operator::token_secret::{ANN_PREVIOUS_DELETE_AT, ANN_PREVIOUS_TOKEN_ID};
use secrecy::SecretString;
use serde_json::json;
use support::consumer::ReadOnceConsumer;
use support::{NetbirdServer, TestEnv, ready_is};

const T: Duration = Duration::from_secs(30);
const SECRET: &str = "netbird-mgmt-api-key";
const KEY: &str = "NB_API_KEY";
const AHEAD: Duration = Duration::from_secs(17 * 3600);

fn spec(url: &str, grace: &str) -> serde_json::Value {
    json!({
        "managementURL": url,
        "allowInsecureHTTP": true,
        "credentialsSecretRef": {"name": "admin"},
        "token": {"secretName": SECRET, "expiresInDays": 1, "rotation": {"gracePeriod": grace}},
    })
}

async fn stored(env: &TestEnv) -> (String, std::collections::BTreeMap<String, String>) {
    let s = env.secrets().get(SECRET).await.unwrap();
    let token = String::from_utf8(s.data.unwrap()[KEY].0.clone()).unwrap();
    (token, s.metadata.annotations.unwrap_or_default())
}

async fn consumer(env: &TestEnv, nb: &NetbirdServer, name: &str) -> ReadOnceConsumer {
    ReadOnceConsumer::start(
        &env.secrets(),
        SECRET,
        KEY,
        &nb.url,
        Duration::from_millis(250),
        name,
    )
    .await
}

/// Bootstraps, starts a consumer with the first token, then rotates (operator clock ahead).
async fn rotated(env: &TestEnv, nb: &NetbirdServer, grace: &str) -> (ReadOnceConsumer, String) {
    env.create_admin_secret().await;
    let op = env.start_operator().await;
    env.create_instance("nb", spec(&nb.url, grace))
        .await
        .unwrap();
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    let (first, _) = stored(env).await;
    let old = consumer(env, nb, "started-before-the-rotation").await;
    let working = old
        .wait_until("the consumer works", T, |c| c.successes >= 8)
        .await;
    assert_eq!(working.rejected(), 0, "{:?}", old.last_failure());
    op.stop().await;
    (old, first)
}

#[tokio::test]
async fn a_read_once_consumer_keeps_working_through_a_rotation_for_the_grace_period() {
    let Some(env) = TestEnv::new("day2-grace").await else {
        return;
    };
    let _guard = support::netbird_lock().await;
    let Some(nb) = NetbirdServer::start().await else {
        return;
    };
    let (old, first) = rotated(&env, &nb, "20s").await;
    let _op = env.start_operator_ahead(AHEAD).await;
    let (second, ann) = support::wait_for("the rotation", T, || {
        let env = &env;
        let first = first.clone();
        async move {
            let (t, a) = stored(env).await;
            (t != first).then_some((t, a))
        }
    })
    .await;
    // what is pending is visible on the Secret and in the status
    assert!(ann.contains_key(ANN_PREVIOUS_TOKEN_ID), "{ann:?}");
    assert!(ann.contains_key(ANN_PREVIOUS_DELETE_AT), "{ann:?}");
    let n = env
        .wait_instance("nb", "the pending deletion in the status", T, |n| {
            n.status
                .as_ref()
                .and_then(|s| s.token.as_ref())
                .is_some_and(|t| t.previous_token_deletion_at.is_some())
        })
        .await;
    assert!(ready_is(&n, "True", "Bootstrapped"));

    // during the grace period the consumer that read the old token once keeps working
    let before = old.counts();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during = old.counts();
    assert!(
        during.successes >= before.successes + 10,
        "{before:?} -> {during:?}"
    );
    assert_eq!(during.rejected(), 0, "{:?}", old.last_failure());

    // restarted (as a rollout would), it reads the new token and works with it
    let restarted = consumer(&env, &nb, "restarted-after-the-rotation").await;
    let fresh = restarted
        .wait_until("the restarted consumer works", T, |c| c.successes >= 8)
        .await;
    assert_eq!(fresh.rejected(), 0, "{:?}", restarted.last_failure());

    // after the grace period the old token is gone from the server, and a consumer still holding
    // it is refused
    old.wait_until("the old token refused", T, |c| c.rejected() >= 3)
        .await;
    let client = NetbirdClient::new(&nb.url, &ClientOptions::default()).unwrap();
    let gone = client
        .current_user(&SecretString::from(first.clone()))
        .await;
    assert!(gone.is_err_and(|e| e.is_token_rejected()));
    let me = client
        .current_user(&SecretString::from(second.clone()))
        .await
        .expect("the new token works");
    let tokens = client
        .list_tokens(&SecretString::from(second), &me.id)
        .await
        .unwrap();
    assert_eq!(tokens.len(), 1, "only the new token is left: {tokens:?}");
    let (_, ann) = stored(&env).await;
    assert!(!ann.contains_key(ANN_PREVIOUS_TOKEN_ID), "{ann:?}");
    let after = restarted.stop().await;
    assert_eq!(after.rejected(), 0, "the restarted consumer never broke");
    let old = old.stop().await;
    eprintln!(
        "read-once consumer through a rotation with 20s grace: {old:?}; restarted: {after:?}"
    );
}

/// `gracePeriod: 0s`: the previous token is deleted at once, and a consumer that read it once
/// breaks until it restarts (what the README warns about).
#[tokio::test]
async fn without_a_grace_period_a_read_once_consumer_breaks_at_the_rotation() {
    let Some(env) = TestEnv::new("day2-no-grace").await else {
        return;
    };
    let _guard = support::netbird_lock().await;
    let Some(nb) = NetbirdServer::start().await else {
        return;
    };
    let (old, first) = rotated(&env, &nb, "0s").await;
    let _op = env.start_operator_ahead(AHEAD).await;
    support::wait_for("the rotation", T, || {
        let env = &env;
        let first = first.clone();
        async move { (stored(env).await.0 != first).then_some(()) }
    })
    .await;
    let broken = old
        .wait_until("the old token refused", Duration::from_secs(10), |c| {
            c.rejected() >= 3
        })
        .await;
    eprintln!("read-once consumer through a rotation without grace: {broken:?}");
    let restarted = consumer(&env, &nb, "restarted").await;
    let fresh = restarted
        .wait_until("the restarted consumer works", T, |c| c.successes >= 5)
        .await;
    assert_eq!(fresh.rejected(), 0);
}
