//! The read-once consumer (tests/support/consumer.rs, a stand-in for the official NetBird
//! operator) against a real NetBird server bootstrapped by the operator: it works with the token
//! from the operator's Secret, and once that token is deleted on the server, the consumer, still
//! holding it, is refused. Also the per-instance condition gauges the chart's alerts read.

mod support;

use std::time::{Duration, Instant};

use kube::api::DeleteParams;
use netbird_operator::netbird::{ClientOptions, NetbirdClient};
use secrecy::SecretString;
use serde_json::json;
use support::consumer::ReadOnceConsumer;
use support::{NetbirdServer, TestEnv, condition, ready_is};

const T: Duration = Duration::from_secs(30);
/// The Secret and key the official operator's chart reads (`netbirdAPI.keyFromSecret`).
const SECRET: &str = "netbird-mgmt-api-key";
const KEY: &str = "NB_API_KEY";

fn spec(url: &str) -> serde_json::Value {
    json!({
        "managementURL": url,
        "allowInsecureHTTP": true,
        "credentialsSecretRef": {"name": "admin"},
        "token": {"secretName": SECRET},
        "versionCheck": {"interval": "1h"},
    })
}

fn condition_line(ns: &str, name: &str, condition: &str, value: u8) -> String {
    format!(
        r#"netbird_operator_instance_condition{{namespace="{ns}",name="{name}",condition="{condition}"}} {value}"#
    )
}

#[tokio::test]
async fn read_once_consumer_works_with_the_stored_token_and_is_refused_once_it_is_deleted() {
    let Some(env) = TestEnv::new("consumer").await else {
        return;
    };
    let _guard = support::netbird_lock().await;
    let Some(nb) = NetbirdServer::start().await else {
        return;
    };
    env.create_admin_secret().await;
    let op = env.start_operator().await;
    env.create_instance("nb", spec(&nb.url))
        .await
        .expect("create");
    let nbi = env
        .wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;

    // the per-instance gauges the alerts read (set just after the status write that made the
    // instance Ready: waited for, not raced)
    let lines = [
        condition_line(&env.ns, "nb", "Ready", 1),
        condition_line(&env.ns, "nb", "Stalled", 0),
        condition_line(&env.ns, "nb", "UpdateAvailable", 0),
    ];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while !lines.iter().all(|l| op.metrics.encode().contains(l)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let metrics = op.metrics.encode();
    for line in [
        condition_line(&env.ns, "nb", "Ready", 1),
        condition_line(&env.ns, "nb", "Stalled", 0),
        condition_line(&env.ns, "nb", "UpdateAvailable", 0),
    ] {
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }

    // started with the token read once from the operator's Secret, it works
    let started = Instant::now();
    let consumer = ReadOnceConsumer::start(
        &env.secrets(),
        SECRET,
        KEY,
        &nb.url,
        Duration::from_millis(200),
        "read-once",
    )
    .await;
    let working = consumer
        .wait_until("10 successful calls", T, |c| c.successes >= 10)
        .await;
    eprintln!(
        "consumer working: {working:?} after {:?}",
        started.elapsed()
    );
    assert_eq!(working.rejected(), 0, "{:?}", consumer.last_failure());
    assert_eq!(working.other_failures, 0, "{:?}", consumer.last_failure());

    // the token is deleted on the server (as a rotation without grace period does): the consumer,
    // still holding it, is refused from then on and never succeeds again
    let status = nbi.status.unwrap().token.expect("token status");
    let user_id = status.user_id.expect("user id");
    let token_id = status.token_id.expect("token id");
    let token = {
        let s = env.secrets().get(SECRET).await.unwrap();
        String::from_utf8(s.data.unwrap()[KEY].0.clone()).unwrap()
    };
    NetbirdClient::new(&nb.url, &ClientOptions::default())
        .unwrap()
        .delete_token(&SecretString::from(token), &user_id, &token_id)
        .await
        .expect("delete the token on the server");
    let deleted_at = Instant::now();
    let before = consumer.counts();
    consumer
        .wait_until("5 refused calls", T, |c| {
            c.rejected() >= before.rejected() + 5
        })
        .await;
    let last = consumer.last_failure();
    let after = consumer.stop().await;
    eprintln!(
        "consumer after the deletion: {after:?} ({:?} after it; last failure {last:?})",
        deleted_at.elapsed(),
    );
    // one round may have been in flight when the token was deleted
    assert!(
        after.successes <= before.successes + 3,
        "the consumer kept succeeding with a deleted token: {before:?} -> {after:?}"
    );
    assert_eq!(after.other_failures, 0, "only the token is refused");
    // NetBird answers a deleted (well-formed) PAT with 404 `invalid token: pat: ... not found`;
    // 401 is its answer to a malformed or expired one
    assert!(
        after.token_not_found >= 5,
        "{after:?}, last failure {last:?}"
    );
    assert_eq!(after.unauthorized, 0, "{after:?}");

    // a second instance on the same server cannot be set up: Stalled, and so says its gauge
    env.create_instance(
        "second",
        spec(&nb.url)
            .as_object()
            .cloned()
            .map(|mut s| {
                s.insert("token".into(), json!({"secretName": "second-token"}));
                serde_json::Value::Object(s)
            })
            .unwrap(),
    )
    .await
    .expect("create second");
    env.wait_instance("second", "Stalled", T, |n| {
        condition(n, "Stalled").is_some_and(|(s, _, _)| s == "True")
    })
    .await;
    let metrics = op.metrics.encode();
    for line in [
        condition_line(&env.ns, "second", "Ready", 0),
        condition_line(&env.ns, "second", "Stalled", 1),
    ] {
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
    // deleted, its series go
    env.instances()
        .delete("second", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_instance_gone("second").await;
    support::wait_for("the deleted instance's series to go", T, || {
        let text = op.metrics.encode();
        let ns = env.ns.clone();
        async move { (!text.contains(&format!(r#"namespace="{ns}",name="second""#))).then_some(()) }
    })
    .await;
}

/// examples/with-official-operator.yaml is a valid NetbirdInstance (a server-side dry run against
/// the CRD), and names the Secret and key that examples/official-operator-values.yaml makes the
/// official chart read.
#[tokio::test]
async fn the_official_operator_example_is_valid_and_consistent() {
    let Some(env) = TestEnv::new("official-example").await else {
        return;
    };
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/examples/with-official-operator.yaml"))
        .expect("example");
    let mut obj: serde_json::Value = serde_norway::from_str(&text).expect("YAML");
    assert_eq!(obj["kind"], "NetbirdInstance");
    obj["metadata"]["namespace"] = json!(env.ns);
    let ar = kube::api::ApiResource::erase::<netbird_operator::crd::NetbirdInstance>(&());
    let api: kube::Api<kube::api::DynamicObject> =
        kube::Api::namespaced_with(env.client.clone(), &env.ns, &ar);
    // a server-side apply, dry run, strict: an unknown field fails as a schema error does
    let params = kube::api::PatchParams::apply("example-check")
        .dry_run()
        .validation_strict();
    api.patch(
        obj["metadata"]["name"].as_str().unwrap(),
        &params,
        &kube::api::Patch::Apply(&obj),
    )
    .await
    .expect("the example passes the CRD's validation");
    let mut bogus = obj.clone();
    bogus["spec"]["token"]["bogus"] = json!(true);
    assert!(
        api.patch("netbird", &params, &kube::api::Patch::Apply(&bogus))
            .await
            .is_err(),
        "the strict dry run refuses an unknown field"
    );

    let values: serde_json::Value = serde_norway::from_str(
        &std::fs::read_to_string(format!("{root}/examples/official-operator-values.yaml"))
            .expect("values"),
    )
    .expect("YAML");
    let from = &values["netbirdAPI"]["keyFromSecret"];
    assert_eq!(from["name"], obj["spec"]["token"]["secretName"]);
    assert_eq!(from["name"], SECRET);
    assert_eq!(from["key"], KEY);
    assert_eq!(
        values["operator"]["podAnnotations"]["secret.reloader.stakater.com/reload"],
        SECRET
    );
}
