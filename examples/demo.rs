//! `make demo`: a local control plane (or the cluster $KUBECONFIG names), a real NetBird server,
//! the CRD, the examples, and the operator as a real process, until Ctrl-C.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::Duration;

use kube::api::Api;
use netbird_operator::crd::NetbirdInstance;
use netbird_operator::netbird::{ClientOptions, NetbirdClient};
use secrecy::SecretString;

fn say(s: &str) {
    println!("\n==> {s}");
}

#[tokio::main]
async fn main() {
    netbird_operator::tls::install_crypto_provider();
    let root = env!("CARGO_MANIFEST_DIR");
    let kubeconfig = match std::env::var("KUBECONFIG").ok().filter(|k| !k.is_empty()) {
        Some(k) => {
            say(&format!("using the cluster of KUBECONFIG={k}"));
            std::path::PathBuf::from(k)
        }
        None => {
            say("starting etcd and kube-apiserver on loopback");
            let cp =
                support::ControlPlane::shared().expect("tools missing: run tests/tools/install");
            cp.kubeconfig.clone()
        }
    };
    let tools = support::tools().expect("tools missing: run tests/tools/install");
    let kubectl = tools.kube_bin.join("kubectl");
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kube config");
    let client = kube::Client::try_from(cfg).expect("kube client");
    support::install_crd(&client).await;

    say("starting a real NetBird server (netbird-server) on loopback");
    let nb = support::NetbirdServer::start()
        .await
        .expect("netbird-server missing");
    println!("NetBird management API: {}", nb.url);

    say("applying examples/ (managementURL pointed at the local server)");
    let run = |args: &[&str], input: Option<String>| {
        let mut c = Command::new(&kubectl);
        c.arg("--kubeconfig").arg(&kubeconfig).args(args);
        if let Some(input) = input {
            c.stdin(std::process::Stdio::piped());
            let mut child = c.spawn().expect("kubectl");
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
            child.wait().expect("kubectl")
        } else {
            c.status().expect("kubectl")
        }
    };
    let ns = "{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{\"name\":\"netbird\"}}"
        .to_string();
    run(&["apply", "-f", "-"], Some(ns));
    run(
        &[
            "apply",
            "-f",
            &format!("{root}/examples/netbird-admin-secret.yaml"),
        ],
        None,
    );
    let instance = std::fs::read_to_string(format!("{root}/examples/netbirdinstance.yaml"))
        .unwrap()
        .replace(
            "managementURL: https://netbird.example.com",
            &format!("managementURL: {}\n  allowInsecureHTTP: true", nb.url),
        );
    run(&["apply", "-f", "-"], Some(instance));

    say("running the operator: netbird-operator run");
    let log = std::env::temp_dir().join("netbird-operator-demo.log");
    let mut operator = Command::new(format!("{root}/target/debug/netbird-operator"))
        .args(["run", "--http-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", &kubeconfig)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("build the operator first: cargo build");
    println!("operator log: {}", log.display());

    let api: Api<NetbirdInstance> = Api::namespaced(client.clone(), "netbird");
    let nbi = support::wait_for(
        "the instance to become Ready",
        Duration::from_secs(120),
        || {
            let api = api.clone();
            async move {
                let n = api.get("netbird").await.ok()?;
                support::ready_is(&n, "True", "Bootstrapped").then_some(n)
            }
        },
    )
    .await;
    say("the NetbirdInstance is Ready");
    run(&["get", "netbirdinstances", "-n", "netbird"], None);
    run(
        &[
            "get",
            "netbirdinstance",
            "netbird",
            "-n",
            "netbird",
            "-o",
            "jsonpath={.status}",
        ],
        None,
    );
    println!();

    say("the token in Secret netbird/netbird-token works against NetBird (GET /api/users/current)");
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), "netbird");
    let s = secrets.get("netbird-token").await.expect("token Secret");
    let token = String::from_utf8(s.data.unwrap()["NB_API_KEY"].0.clone()).unwrap();
    let me = NetbirdClient::new(&nb.url, &ClientOptions::default())
        .unwrap()
        .current_user(&SecretString::from(token))
        .await
        .expect("token accepted");
    println!(
        "authenticated as {} (role {}), server version {:?}",
        me.email,
        me.role,
        nbi.status
            .and_then(|s| s.version)
            .and_then(|v| v.management)
    );

    say("running until Ctrl-C (everything started here stops and is removed then)");
    let _ = tokio::signal::ctrl_c().await;
    let _ = operator.kill();
    let _ = operator.wait();
    drop(nb);
}
