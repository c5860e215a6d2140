//! Calls to NetBird through an egress proxy: the operator binary honours `HTTP_PROXY` (and
//! `HTTPS_PROXY`, shown with the client in `netbird_client.rs`) and `NO_PROXY` from its
//! environment, as the chart sets them. A proxy on loopback counts what goes through it.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use support::fake_netbird::FakeNetbird;
use support::proxy::Proxy;
use support::{TestEnv, ready_is};

const T: Duration = Duration::from_secs(60);

/// Every spelling of the proxy variables: none is inherited from the environment the tests run in.
const PROXY_VARS: [&str; 8] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The operator binary with these proxy variables (and no others).
fn operator(env: &TestEnv, log: &std::path::Path, proxy_env: &[(&str, &str)]) -> Running {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netbird-operator"));
    cmd.args(["run", "--http-addr", "127.0.0.1:0", "--max-backoff", "5"])
        .env("KUBECONFIG", &env.cp.kubeconfig)
        .env("WATCH_NAMESPACE", &env.ns)
        .env("POD_NAMESPACE", &env.ns)
        .env("LOG_LEVEL", "info");
    for var in PROXY_VARS {
        cmd.env_remove(var);
    }
    for (k, v) in proxy_env {
        cmd.env(k, v);
    }
    Running(
        cmd.stdout(std::fs::File::create(log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("operator binary"),
    )
}

/// `HTTP_PROXY` only: kube-rs takes `HTTPS_PROXY` for the apiserver of a kubeconfig (in a cluster
/// it does not), `HTTP_PROXY` is the NetBird client's alone.
#[tokio::test]
async fn calls_to_netbird_go_through_the_proxy_unless_no_proxy_names_the_server() {
    let Some(env) = TestEnv::new("proxy").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start().await;
    env.create_admin_secret().await;
    let spec = |url: &str| json!({"managementURL": url, "allowInsecureHTTP": true, "credentialsSecretRef": {"name": "admin"}});

    let proxied = FakeNetbird::start().await;
    let op = operator(
        &env,
        &dir.path().join("proxied.log"),
        &[("HTTP_PROXY", &proxy.url)],
    );
    env.create_instance("proxied", spec(&proxied.url))
        .await
        .unwrap();
    env.wait_instance("proxied", "Ready", T, |n| {
        ready_is(n, "True", "Bootstrapped")
    })
    .await;
    drop(op);
    let authority = proxied.url.trim_start_matches("http://");
    let total: u32 = proxied.state().calls.values().sum();
    assert!(total >= 3, "{:?}", proxied.state().calls);
    assert_eq!(
        proxy.count_to(authority),
        total as usize,
        "every call went through the proxy: {:?}",
        proxy.seen()
    );

    // NO_PROXY names the server: the calls go straight to it
    let direct = FakeNetbird::start().await;
    let _op = operator(
        &env,
        &dir.path().join("direct.log"),
        &[
            ("HTTP_PROXY", &proxy.url),
            ("NO_PROXY", "example.com,127.0.0.1"),
        ],
    );
    env.create_instance("direct", spec(&direct.url))
        .await
        .unwrap();
    env.wait_instance("direct", "Ready", T, |n| {
        ready_is(n, "True", "Bootstrapped")
    })
    .await;
    assert!(direct.calls("setup") == 1);
    assert_eq!(
        proxy.count_to(direct.url.trim_start_matches("http://")),
        0,
        "{:?}",
        proxy.seen()
    );
}
