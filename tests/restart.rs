//! Kubernetes faults: kube-apiserver restarted while bootstraps are in flight. Setup answers arrive
//! while the apiserver is down, so the operator holds tokens it cannot write yet: it keeps retrying,
//! and nothing the apiserver had accepted is lost.

mod support;

use std::time::Duration;

use serde_json::json;
use support::fake_netbird::{FakeNetbird, Fault};
use support::{TestEnv, condition, ready_is};

#[tokio::test]
async fn an_apiserver_restart_during_bootstraps_loses_nothing() {
    let Some(env) = TestEnv::new("apiserver-restart").await else {
        return;
    };
    env.create_admin_secret().await;
    let op = env.start_operator().await;
    let mut fakes = Vec::new();
    for i in 0..5 {
        let fake = FakeNetbird::start().await;
        // setup answers 1.5 s late: they arrive while the apiserver is down
        fake.fault("setup", Fault::Delay(Duration::from_millis(1500)));
        let spec = json!({"managementURL": fake.url, "allowInsecureHTTP": true, "credentialsSecretRef": {"name": "admin"}});
        env.create_instance(&format!("nb{i}"), spec).await.unwrap();
        fakes.push(fake);
    }
    support::wait_for(
        "every setup call to be in flight",
        Duration::from_secs(30),
        || {
            let fakes = &fakes;
            async move { fakes.iter().all(|f| f.calls("setup") > 0).then_some(()) }
        },
    )
    .await;
    env.cp.restart_apiserver(Duration::from_secs(3)).await;

    for i in 0..5 {
        let n = env
            .wait_instance(&format!("nb{i}"), "Ready", Duration::from_secs(120), |n| {
                ready_is(n, "True", "Bootstrapped") || condition(n, "Stalled").is_some()
            })
            .await;
        assert!(
            ready_is(&n, "True", "Bootstrapped"),
            "nb{i}: {:?}",
            condition(&n, "Stalled")
        );
    }
    for (i, f) in fakes.iter().enumerate() {
        assert_eq!(f.state().setups_ok, 1, "nb{i}");
        assert_eq!(f.calls("setup"), 1, "nb{i}: one setup call");
    }
    assert_eq!(op.setup_calls(), 5);
}
