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

fn spec(url: &str, grace: &str, retire: &str) -> serde_json::Value {
    json!({
        "managementURL": url,
        "allowInsecureHTTP": true,
        "credentialsSecretRef": {"name": "admin"},
        "token": {"secretName": SECRET, "expiresInDays": 1,
                  "rotation": {"gracePeriod": grace, "retireAfterUnused": retire}},
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
    rotated_with(env, nb, grace, "15m").await
}

/// Bootstraps with `retireAfterUnused: retire`, starts a consumer with the first token (not yet
/// rotated: the caller starts the operator with its clock ahead).
async fn rotated_with(
    env: &TestEnv,
    nb: &NetbirdServer,
    grace: &str,
    retire: &str,
) -> (ReadOnceConsumer, String) {
    env.create_admin_secret().await;
    let op = env.start_operator().await;
    env.create_instance("nb", spec(&nb.url, grace, retire))
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

/// The instance's `netbird_operator_previous_token_in_use` sample, if the series exists.
fn in_use_metric(op: &support::Operator, ns: &str) -> Option<String> {
    let prefix =
        format!("netbird_operator_previous_token_in_use{{namespace=\"{ns}\",name=\"nb\"}} ");
    op.metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
}

/// Waits for the rotation (the operator's clock ahead) and returns the new token and when the
/// rotation was seen.
async fn the_rotation(env: &TestEnv, first: &str) -> (String, std::time::Instant) {
    let second = support::wait_for("the rotation", T, || async {
        let (t, _) = stored(env).await;
        (t != first).then_some(t)
    })
    .await;
    (second, std::time::Instant::now())
}

/// Consumers that restart onto the new token let the operator retire the previous one once NetBird
/// saw no use of it for `retireAfterUnused` (10 s here), long before the grace period (10 minutes)
/// ends; nothing that moved breaks.
#[tokio::test]
async fn a_consumer_that_restarts_lets_the_previous_token_retire_early() {
    let Some(env) = TestEnv::new("day2-retire").await else {
        return;
    };
    let _guard = support::netbird_lock().await;
    let Some(nb) = NetbirdServer::start().await else {
        return;
    };
    let (old, first) = rotated_with(&env, &nb, "10m", "10s").await;
    let op = env.start_operator_ahead(AHEAD).await;
    let (second, rotated) = the_rotation(&env, &first).await;
    // the rollout: the consumer restarts onto the new token, the old one stops
    let restarted = consumer(&env, &nb, "restarted-onto-the-new-token").await;
    let old = old.stop().await;
    assert_eq!(old.rejected(), 0, "the old consumer never broke");
    let n = env
        .wait_instance("nb", "without a previous token", T * 2, |n| {
            n.status
                .as_ref()
                .and_then(|s| s.token.as_ref())
                .is_some_and(|t| t.previous_token_id.is_none() && t.last_rotated_at.is_some())
        })
        .await;
    let took = rotated.elapsed();
    assert!(ready_is(&n, "True", "Bootstrapped"));
    let events = env.events().await;
    assert!(
        events.iter().any(|(r, _)| r == "PreviousTokenRetired"),
        "{events:?}"
    );
    // gone from the server, before the grace period's end
    let client = NetbirdClient::new(&nb.url, &ClientOptions::default()).unwrap();
    let gone = client.current_user(&SecretString::from(first)).await;
    assert!(gone.is_err_and(|e| e.is_token_rejected()));
    assert!(took < Duration::from_secs(60), "retired after {took:?}");
    let (_, ann) = stored(&env).await;
    assert!(!ann.contains_key(ANN_PREVIOUS_TOKEN_ID), "{ann:?}");
    assert_eq!(
        in_use_metric(&op, &env.ns),
        None,
        "no series once it is gone"
    );
    let after = restarted.stop().await;
    assert_eq!(after.rejected(), 0, "the restarted consumer never broke");
    assert!(stored(&env).await.0 == second);
    eprintln!(
        "previous token retired {took:?} after the rotation (retireAfterUnused 10s, grace 10m)"
    );
}

/// A consumer that keeps using the previous token keeps it alive through the grace period (60 s
/// here), and before the end the operator says so: TokenAvailable PreviousTokenStillInUse, a
/// Warning Event naming the Secret, the metric at 1, and `previousTokenLastUsedAt` in the status.
/// At the grace period's end the token is deleted as promised.
#[tokio::test]
async fn a_consumer_still_on_the_previous_token_is_warned_about_before_the_end() {
    let Some(env) = TestEnv::new("day2-in-use").await else {
        return;
    };
    let _guard = support::netbird_lock().await;
    let Some(nb) = NetbirdServer::start().await else {
        return;
    };
    let (old, first) = rotated_with(&env, &nb, "60s", "10s").await;
    let op = env.start_operator_ahead(AHEAD).await;
    let (_, rotated) = the_rotation(&env, &first).await;
    let n = env
        .wait_instance("nb", "TokenAvailable PreviousTokenStillInUse", T * 3, |n| {
            support::condition(n, "TokenAvailable")
                .is_some_and(|(_, r, _)| r == "PreviousTokenStillInUse")
        })
        .await;
    let warned = rotated.elapsed();
    let token = n.status.as_ref().and_then(|s| s.token.clone()).unwrap();
    assert!(token.previous_token_id.is_some(), "{token:?}");
    assert!(token.previous_token_last_used_at.is_some(), "{token:?}");
    let (_, _, message) = support::condition(&n, "TokenAvailable").unwrap();
    assert!(message.contains(SECRET), "{message}");
    assert_eq!(in_use_metric(&op, &env.ns).as_deref(), Some("1"));
    let events = support::wait_for("the Warning Event", T, || async {
        let events = env.events().await;
        events
            .iter()
            .any(|(r, note)| r == "PreviousTokenStillInUse" && note.contains(SECRET))
            .then_some(events)
    })
    .await;
    assert!(!events.iter().any(|(r, _)| r == "PreviousTokenRetired"));
    // the consumer kept working all along; at the end of the grace period it breaks
    assert_eq!(old.counts().rejected(), 0, "{:?}", old.last_failure());
    let broken = old
        .wait_until("the old token refused", T * 2, |c| c.rejected() >= 3)
        .await;
    let ended = rotated.elapsed();
    assert!(warned < ended, "warned {warned:?}, deleted {ended:?}");
    assert!(
        ended >= Duration::from_secs(55),
        "deleted at the grace period's end, not early: {ended:?}"
    );
    env.wait_instance("nb", "back to TokenRotated", T, |n| {
        support::condition(n, "TokenAvailable").is_some_and(|(_, r, _)| r == "TokenRotated")
    })
    .await;
    assert_eq!(in_use_metric(&op, &env.ns), None);
    eprintln!(
        "consumer on the previous token: warned {warned:?} after the rotation, token deleted \
         after {ended:?} (grace 60s); {broken:?}"
    );
}
