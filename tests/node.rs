//! The operator as users run it: the OCI image (built here from the release binary, with the
//! Dockerfile's final stage), installed with `helm install` and with `kubectl apply` of crds/ and
//! deploy/, running as the chart's pod on a real kubelet (containerd, runc, the bridge CNI,
//! kube-proxy): read-only root filesystem, no capabilities, seccomp, uid 65532, the memory limit,
//! the probes, the projected ServiceAccount token and in-cluster configuration, SIGTERM from the
//! kubelet, two replicas electing a leader; against the real NetBird server, reached from the pod.
//!
//! Needs root and overlayfs (`tests/support/node.rs`); skipped with one loud line elsewhere.
//! The tests share one cluster and run one at a time (2 cores).

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use netbird_operator::crd::NetbirdInstance;
use netbird_operator::netbird::{ClientOptions, NetbirdClient};
use secrecy::SecretString;
use serde_json::json;
use support::node::{self, Cleanup, HOST_IP, Node};
use support::{NetbirdServer, ready_is};
use tokio::sync::Mutex;

/// One test at a time: pods, NetBird servers and the operator share 2 cores.
static SERIAL: Mutex<()> = Mutex::const_new(());
const CHART: &str = support::chart::CHART;
const PASSWORD: &str = "s3cret-Passw0rd";

/// A namespace name of its own for a test.
fn unique(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    format!("{prefix}-{:05x}", h.finish() & 0xf_ffff)
}

/// Runs kubectl with these arguments when dropped (a test's cluster-scoped leftovers).
struct KubectlOnDrop(&'static Node, Vec<String>);

impl Drop for KubectlOnDrop {
    fn drop(&mut self) {
        let args: Vec<&str> = self.1.iter().map(String::as_str).collect();
        let _ = self.0.run(&self.0.kubectl, &args, None);
    }
}

async fn create_namespace(client: &Client, ns: &str) {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
    )
    .await
    .expect("create namespace");
}

async fn create_admin_secret(client: &Client, ns: &str) {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "admin"},
            "stringData": {"email": "admin@example.com", "password": PASSWORD}}))
        .unwrap(),
    )
    .await
    .expect("create the credentials Secret");
}

async fn create_instance(client: &Client, ns: &str, name: &str, url: &str) {
    let api: Api<NetbirdInstance> = Api::namespaced(client.clone(), ns);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "bootstrap.netbird.io/v1alpha1", "kind": "NetbirdInstance",
            "metadata": {"name": name},
            "spec": {"managementURL": url, "allowInsecureHTTP": true,
                "credentialsSecretRef": {"name": "admin"}},
        }))
        .unwrap(),
    )
    .await
    .expect("create the NetbirdInstance");
}

async fn wait_instance_ready(client: &Client, ns: &str, name: &str, timeout: Duration) {
    let api: Api<NetbirdInstance> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    loop {
        let n = api.get_opt(name).await.ok().flatten();
        if n.as_ref()
            .is_some_and(|n| ready_is(n, "True", "Bootstrapped"))
        {
            return;
        }
        if start.elapsed() > timeout {
            panic!(
                "{ns}/{name} not Ready after {timeout:?}; status: {:#?}",
                n.and_then(|n| n.status)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The pods of the namespace once `count` of them are Ready (and none is being deleted).
async fn ready_pods(
    node: &Node,
    client: &Client,
    ns: &str,
    count: usize,
    timeout: Duration,
) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    loop {
        let pods = api
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let ready: Vec<Pod> = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p))
            .cloned()
            .collect();
        if ready.len() == count {
            return ready;
        }
        if start.elapsed() > timeout {
            let describe = node.run(&node.kubectl, &["-n", ns, "describe", "pods"], None);
            let logs = node.run(
                &node.kubectl,
                &[
                    "-n",
                    ns,
                    "logs",
                    "--all-containers",
                    "-l",
                    "app.kubernetes.io/name=netbird-operator",
                    "--tail",
                    "40",
                ],
                None,
            );
            panic!(
                "{count} Ready pod(s) in {ns} not there after {timeout:?}:\n{}\n{}{}",
                String::from_utf8_lossy(&describe.stdout),
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|c| c.iter().map(|c| c.restart_count).sum())
        .unwrap_or(0)
}

/// The token in the token Secret.
async fn stored_token(client: &Client, ns: &str, secret: &str) -> Option<String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s = api.get_opt(secret).await.ok()??;
    String::from_utf8(s.data?.get("NB_API_KEY")?.0.clone()).ok()
}

/// Asserts the token in `<instance>-token` is accepted by the server.
async fn token_accepted(client: &Client, ns: &str, instance: &str, nb: &NetbirdServer) -> String {
    let token = stored_token(client, ns, &format!("{instance}-token"))
        .await
        .expect("the token Secret holds a token");
    let nb_client = NetbirdClient::new(&nb.url, &ClientOptions::default()).unwrap();
    nb_client
        .current_user(&SecretString::from(token.clone()))
        .await
        .expect("the server accepts the stored token");
    token
}

/// The Deployment the release rendered (`helm get manifest`), as JSON.
fn rendered_deployment(node: &Node, release: &str, ns: &str) -> serde_json::Value {
    let manifest = node.helm(&["get", "manifest", release, "-n", ns]);
    for doc in serde_norway::Deserializer::from_str(&manifest) {
        let Ok(v) = <serde_json::Value as serde::Deserialize>::deserialize(doc) else {
            continue;
        };
        if v["kind"] == "Deployment" {
            return v;
        }
    }
    panic!("no Deployment in the release's manifest");
}

/// What the kernel says about the operator's process in a running pod: the pod spec's promises,
/// checked where they are enforced. Returns a line for the record.
fn check_process(node: &Node, pod: &Pod) -> String {
    let id = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.clone())
        .expect("a container id");
    let id = id.trim_start_matches("containerd://");
    let pid = node.container_pid(id).expect("the container's task");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, std::path::Path::new("/usr/local/bin/netbird-operator"));
    assert_eq!(field("Uid"), "65532 65532 65532 65532", "uid");
    assert_eq!(field("Gid"), "65532 65532 65532 65532", "gid");
    assert_eq!(
        field("CapEff"),
        "0000000000000000",
        "no effective capabilities"
    );
    assert_eq!(
        field("CapPrm"),
        "0000000000000000",
        "no permitted capabilities"
    );
    assert_eq!(
        field("CapBnd"),
        "0000000000000000",
        "capabilities dropped: ALL"
    );
    assert_eq!(field("NoNewPrivs"), "1", "allowPrivilegeEscalation: false");
    assert_eq!(field("Seccomp"), "2", "seccomp RuntimeDefault: a filter");
    // the root filesystem as the process sees it: read-only, and its overlay's upper layer holds
    // nothing but the mount points runc made before the remount
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("a root mount");
    let opts = root.split_whitespace().nth(5).unwrap();
    assert!(
        opts.split(',').any(|o| o == "ro"),
        "the root filesystem is not read-only: {root}"
    );
    let upper = root
        .split(" - ")
        .nth(1)
        .and_then(|s| s.split(',').find_map(|o| o.strip_prefix("upperdir=")))
        .map(std::path::PathBuf::from);
    let mut written = Vec::new();
    if let Some(upper) = &upper {
        let mut stack = vec![upper.clone()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let meta = e.metadata().unwrap();
                if meta.is_dir() {
                    stack.push(e.path());
                } else if meta.len() > 0 {
                    written.push(e.path());
                }
            }
        }
    }
    assert!(
        written.is_empty(),
        "files written to the root filesystem: {written:?}"
    );
    // the memory limit is the kernel's
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let memcg = cgroup
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
        .expect("a memory cgroup");
    let limit = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory{memcg}/memory.limit_in_bytes"
    ))
    .unwrap();
    // the chart's default (charts/netbird-operator/values.yaml: `limits: {memory: <n>Mi}`)
    let values = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("charts/netbird-operator/values.yaml"),
    )
    .unwrap();
    let mebibytes: u64 = values
        .lines()
        .find_map(|l| l.trim().strip_prefix("limits: {memory: "))
        .and_then(|v| v.strip_suffix("Mi}"))
        .and_then(|v| v.parse().ok())
        .expect("the chart's memory limit in Mi");
    assert_eq!(
        limit.trim(),
        (mebibytes << 20).to_string(),
        "the chart's {mebibytes}Mi memory limit"
    );
    let rss = field("VmRSS");
    format!(
        "pid {pid}: uid 65532, no capabilities, NoNewPrivs, seccomp filter, / read-only (upper layer empty), memory limit 128 MiB, RSS {rss}"
    )
}

/// The Service's ClusterIP and port.
async fn service_address(client: &Client, ns: &str, name: &str) -> String {
    let svc: Service = Api::namespaced(client.clone(), ns)
        .get(name)
        .await
        .expect("the metrics Service");
    let spec = svc.spec.unwrap();
    format!(
        "{}:{}",
        spec.cluster_ip.unwrap(),
        spec.ports.unwrap()[0].port
    )
}

/// GET /metrics through the Service (kube-proxy's rules in the node's namespace).
async fn metrics_through_service(client: &Client, ns: &str, service: &str) -> String {
    let addr = service_address(client, ns, service).await;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    support::wait_for(
        "/metrics through the Service",
        Duration::from_secs(30),
        || {
            let http = http.clone();
            let url = format!("http://{addr}/metrics");
            async move {
                let r = http.get(&url).send().await.ok()?;
                if !r.status().is_success() {
                    return None;
                }
                r.text().await.ok()
            }
        },
    )
    .await
}

fn helm_install_args<'a>(release: &'a str, ns: &'a str, values: &'a [String]) -> Vec<&'a str> {
    let mut args = vec!["install", release, CHART, "-n", ns, "--wait=false"];
    for v in values {
        args.extend(["--set", v.as_str()]);
    }
    args
}

/// `helm install` with the image built here, watching the release's namespace. The pod becomes
/// Ready through its probes, runs with the chart's securityContext as the kernel enforces it, a
/// NetbirdInstance against the real NetBird server becomes Ready, the token Secret holds a token
/// the server accepts, and /metrics answers through the chart's Service.
#[tokio::test]
async fn helm_install_runs_the_operator_as_the_charts_pod() {
    let _serial = SERIAL.lock().await;
    let Some(node) = Node::shared() else {
        return;
    };
    let client = node.client().await;
    let ns = unique("node-helm");
    let _cleanup = Cleanup {
        node,
        namespace: ns.clone(),
        release: Some("nbop".into()),
    };
    create_namespace(&client, &ns).await;
    let _nb_lock = support::netbird_lock().await;
    let nb = NetbirdServer::start_on(HOST_IP, &[])
        .await
        .expect("netbird-server");

    let mut values = node::image_values();
    values.extend([
        "crds.install=false".to_string(),
        format!("watchNamespace={ns}"),
    ]);
    let t0 = Instant::now();
    node.helm(&helm_install_args("nbop", &ns, &values));
    let pods = ready_pods(node, &client, &ns, 1, Duration::from_secs(120)).await;
    let pod_ready = t0.elapsed();

    create_admin_secret(&client, &ns).await;
    let t1 = Instant::now();
    create_instance(&client, &ns, "nb", &nb.url).await;
    wait_instance_ready(&client, &ns, "nb", Duration::from_secs(60)).await;
    let instance_ready = t1.elapsed();
    let token = token_accepted(&client, &ns, "nb", &nb).await;

    // the pod as the chart wrote it, and as the kernel runs it
    let deployment = rendered_deployment(node, "nbop", &ns);
    let pod = Api::<Pod>::namespaced(client.clone(), &ns)
        .get(&pods[0].name_any())
        .await
        .unwrap();
    let spec = serde_json::to_value(pod.spec.as_ref().unwrap()).unwrap();
    let template = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        spec["securityContext"], template["securityContext"],
        "pod securityContext"
    );
    assert_eq!(
        spec["containers"][0]["securityContext"], template["containers"][0]["securityContext"],
        "container securityContext"
    );
    assert_eq!(
        spec["containers"][0]["resources"],
        template["containers"][0]["resources"]
    );
    assert_eq!(
        spec["automountServiceAccountToken"],
        serde_json::Value::Null
    );
    let process = check_process(node, &pod);

    let metrics = metrics_through_service(&client, &ns, "nbop-netbird-operator-metrics").await;
    assert!(
        metrics.contains("# TYPE netbird_operator_"),
        "the operator's metrics: {metrics}"
    );
    assert!(!metrics.contains(&token) && !metrics.contains(PASSWORD));
    let logs = node.kubectl(&["-n", &ns, "logs", &pods[0].name_any()]);
    assert!(
        !logs.contains(&token) && !logs.contains(PASSWORD),
        "a secret in the pod's log"
    );
    assert!(logs.starts_with('{'), "the chart's JSON logs: {logs}");
    assert_eq!(restarts(&pod), 0, "the pod restarted");
    eprintln!(
        "node: helm install to pod Ready {pod_ready:?}; NetbirdInstance created to Ready {instance_ready:?}; {process}"
    );
}

/// The image is the Dockerfile's final stage: base, binary path, user, port, entrypoint and
/// command. Fails when the Dockerfile changes and the harness (tests/support/node/image.sh) does not.
#[tokio::test]
async fn the_image_is_the_dockerfiles_final_stage() {
    let Some(node) = Node::shared() else {
        return;
    };
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    // the final stage: from the last FROM on, continuation lines joined, comments dropped
    let joined = dockerfile.replace("\\\n", " ");
    let lines: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let last_from = lines
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("a FROM");
    let mut stage: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for l in &lines[last_from..] {
        let (instr, rest) = l.split_once(' ').unwrap_or((l, ""));
        stage.entry(instr).or_default().push(rest.trim());
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{}.config.json", node.image.display())).unwrap(),
    )
    .unwrap();
    let config = &config["config"];
    let known = ["FROM", "COPY", "USER", "EXPOSE", "ENTRYPOINT", "CMD"];
    for instr in stage.keys() {
        assert!(
            known.contains(instr),
            "the Dockerfile's final stage has {instr}, which tests/support/node/image.sh does not reproduce"
        );
    }
    assert_eq!(
        stage["FROM"],
        ["gcr.io/distroless/cc-debian12:nonroot"],
        "image.sh lays out distroless/cc-debian12:nonroot (glibc, CA certificates, nonroot 65532, WorkingDir /home/nonroot)"
    );
    assert_eq!(
        stage["COPY"],
        ["--from=build /netbird-operator /usr/local/bin/netbird-operator"],
        "the binary's path"
    );
    assert_eq!(config["User"], stage["USER"][0], "USER");
    let ports: Vec<String> = stage["EXPOSE"]
        .iter()
        .flat_map(|e| e.split_whitespace())
        .map(|p| {
            if p.contains('/') {
                p.to_string()
            } else {
                format!("{p}/tcp")
            }
        })
        .collect();
    let image_ports: Vec<String> = config["ExposedPorts"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    assert_eq!(image_ports, ports, "EXPOSE");
    let exec = |v: &str| serde_json::from_str::<serde_json::Value>(v).expect("exec form");
    assert_eq!(
        config["Entrypoint"],
        exec(stage["ENTRYPOINT"][0]),
        "ENTRYPOINT"
    );
    assert_eq!(config["Cmd"], exec(stage["CMD"][0]), "CMD");
    // the layer: the binary where the COPY puts it, the libraries it links, the base's files
    let listing = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "d=$(mktemp -d) && tar -xf {} -C $d && for b in $d/blobs/sha256/*; do tar -tvf $b 2>/dev/null; done; rm -rf $d",
            node.image.display()
        ))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for path in [
        "./usr/local/bin/netbird-operator",
        "./etc/passwd",
        "./etc/ssl/certs/ca-certificates.crt",
        "x86_64-linux-gnu/libc.so.6",
        "./lib64/ld-linux-x86-64.so.2",
        "./home/nonroot",
        "./tmp/",
    ] {
        assert!(
            listing.contains(path),
            "{path} missing from the image:\n{listing}"
        );
    }
    assert!(listing.contains("65532/65532") && listing.contains("./home/nonroot"));
}

/// The condition (status, reason) of a type, if the instance has a status.
async fn condition_of(client: &Client, ns: &str, name: &str, ty: &str) -> Option<(String, String)> {
    let api: Api<NetbirdInstance> = Api::namespaced(client.clone(), ns);
    let n = api.get_opt(name).await.ok()??;
    support::condition(&n, ty).map(|(s, r, _)| (s, r))
}

async fn lease_spec(
    client: &Client,
    ns: &str,
) -> Option<k8s_openapi::api::coordination::v1::LeaseSpec> {
    Api::<Lease>::namespaced(client.clone(), ns)
        .get_opt(netbird_operator::cli::LEASE_NAME)
        .await
        .ok()??
        .spec
}

/// `replicaCount: 2`: both pods Ready, one holds the Lease; `kubectl delete pod` of the leader (the
/// kubelet's SIGTERM) and another replica (the follower, or the Deployment's replacement pod when
/// it starts first) takes over at once, because the stopped leader released the
/// Lease (shown on the Lease: acquired before the old holder's would have expired), and reconciles.
#[tokio::test]
async fn two_replicas_the_leader_pod_deleted_the_other_takes_over() {
    let _serial = SERIAL.lock().await;
    let Some(node) = Node::shared() else {
        return;
    };
    let client = node.client().await;
    let ns = unique("node-leader");
    let _cleanup = Cleanup {
        node,
        namespace: ns.clone(),
        release: Some("nbop".into()),
    };
    create_namespace(&client, &ns).await;
    let _nb_lock = support::netbird_lock().await;
    let nb = NetbirdServer::start_on(HOST_IP, &[])
        .await
        .expect("netbird-server");
    let mut values = node::image_values();
    values.extend([
        "crds.install=false".to_string(),
        format!("watchNamespace={ns}"),
        "replicaCount=2".into(),
    ]);
    node.helm(&helm_install_args("nbop", &ns, &values));
    let pods = ready_pods(node, &client, &ns, 2, Duration::from_secs(120)).await;
    let names: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
    let leader = support::wait_for("a Lease holder", Duration::from_secs(60), || {
        let client = client.clone();
        let ns = ns.clone();
        async move { lease_spec(&client, &ns).await?.holder_identity }
    })
    .await;
    assert!(
        names.contains(&leader),
        "the Lease holder {leader} is one of {names:?}"
    );
    create_admin_secret(&client, &ns).await;
    create_instance(&client, &ns, "one", &nb.url).await;
    wait_instance_ready(&client, &ns, "one", Duration::from_secs(60)).await;

    // delete the leader right after one of its renewals: its Lease is valid for 15 s more
    let before = lease_spec(&client, &ns).await.and_then(|s| s.renew_time);
    let renewed = support::wait_for("a renewal", Duration::from_secs(30), || {
        let client = client.clone();
        let ns = ns.clone();
        let before = before.clone();
        async move {
            let s = lease_spec(&client, &ns).await?;
            (s.renew_time != before).then_some(s)
        }
    })
    .await;
    let expiry = renewed.renew_time.unwrap().0
        + jiff::SignedDuration::from_secs(renewed.lease_duration_seconds.unwrap().into());
    let t0 = Instant::now();
    node.kubectl(&["-n", &ns, "delete", "pod", &leader, "--wait=false"]);
    // the follower, or the Deployment's replacement pod when it starts first: any replica but the
    // deleted one
    let taken = support::wait_for(
        "another replica to hold the Lease",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            let ns = ns.clone();
            let leader = leader.clone();
            async move {
                let s = lease_spec(&client, &ns).await?;
                let holder = s.holder_identity.clone()?;
                (holder != leader).then_some((holder, s))
            }
        },
    )
    .await;
    let (new_leader, taken) = taken;
    let takeover = t0.elapsed();
    let acquired = taken.acquire_time.expect("acquireTime").0;
    assert!(
        acquired < expiry,
        "{new_leader} acquired the Lease at {acquired}, after the deleted leader's would have expired ({expiry}): it was not released"
    );
    // the new leader reconciles: a second instance on the same (already set up) server gets a
    // status from it
    create_instance(&client, &ns, "two", &nb.url).await;
    support::wait_for(
        "the new leader to reconcile",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            let ns = ns.clone();
            async move { condition_of(&client, &ns, "two", "Ready").await }
        },
    )
    .await;
    let reconciled = t0.elapsed();
    wait_instance_ready(&client, &ns, "one", Duration::from_secs(10)).await;
    // the Deployment's replacement pod joins as a follower
    let pods = ready_pods(node, &client, &ns, 2, Duration::from_secs(120)).await;
    assert!(pods.iter().all(|p| restarts(p) == 0), "a pod restarted");
    let holder = lease_spec(&client, &ns)
        .await
        .and_then(|s| s.holder_identity);
    assert!(
        holder
            .as_deref()
            .is_some_and(|h| h != leader && pods.iter().any(|p| p.name_any() == h)),
        "the Lease holder {holder:?} is a live replica"
    );
    let by = if names.contains(&new_leader) {
        "the follower"
    } else {
        "the replacement pod"
    };
    eprintln!(
        "node: leader pod deleted: {by} held the Lease after {takeover:?}, reconciled a new instance after {reconciled:?}"
    );
}

/// `kubectl delete pod` while a token NetBird issued cannot be written (the Role no longer lets the
/// operator write Secrets): the kubelet's SIGTERM starts the shutdown, which keeps retrying the
/// write for terminationGracePeriodSeconds - 10 s, then says what was lost and exits 0 before the
/// grace period ends (no SIGKILL).
#[tokio::test]
async fn pod_deleted_while_a_token_write_is_held() {
    use futures::StreamExt;
    let _serial = SERIAL.lock().await;
    let Some(node) = Node::shared() else {
        return;
    };
    let client = node.client().await;
    let ns = unique("node-sigterm");
    let _cleanup = Cleanup {
        node,
        namespace: ns.clone(),
        release: Some("nbop".into()),
    };
    create_namespace(&client, &ns).await;
    let _nb_lock = support::netbird_lock().await;
    let nb = NetbirdServer::start_on(HOST_IP, &[])
        .await
        .expect("netbird-server");
    let grace = 20u64;
    let mut values = node::image_values();
    values.extend([
        "crds.install=false".to_string(),
        format!("watchNamespace={ns}"),
        format!("terminationGracePeriodSeconds={grace}"),
    ]);
    node.helm(&helm_install_args("nbop", &ns, &values));
    let pod = ready_pods(node, &client, &ns, 1, Duration::from_secs(120))
        .await
        .remove(0);
    let pod_name = pod.name_any();
    // Secret writes after setup refused: the Role keeps get, list, watch and create on Secrets (the
    // claim before setup creates the token Secret), not patch (the token's write)
    let role = node.kubectl(&[
        "-n",
        &ns,
        "get",
        "role",
        "nbop-netbird-operator",
        "-o",
        "json",
    ]);
    let role: serde_json::Value = serde_json::from_str(&role).unwrap();
    let idx = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .position(|r| r["resources"] == json!(["secrets"]))
        .expect("a secrets rule");
    node.kubectl(&[
        "-n", &ns, "patch", "role", "nbop-netbird-operator", "--type=json", "-p",
        &json!([{"op": "replace", "path": format!("/rules/{idx}/verbs"), "value": ["get", "list", "watch", "create"]}]).to_string(),
    ]);
    create_admin_secret(&client, &ns).await;
    create_instance(&client, &ns, "held", &nb.url).await;
    support::wait_for(
        "the token write to be held",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            let ns = ns.clone();
            async move {
                let (_, reason) = condition_of(&client, &ns, "held", "Reconciling").await?;
                (reason == "StoringToken").then_some(())
            }
        },
    )
    .await;

    // every state of the pod until it is gone, and its log until the container ends
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let cfg =
        kube::runtime::watcher::Config::default().fields(&format!("metadata.name={pod_name}"));
    let mut events = kube::runtime::watcher(pods, cfg).boxed();
    let mut logs = std::process::Command::new(&node.kubectl)
        .env("KUBECONFIG", &node.kubeconfig)
        .args(["-n", &ns, "logs", "-f", &pod_name])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let log_stdout = logs.stdout.take().unwrap();
    let log_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut { log_stdout }, &mut s);
        s
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    node.kubectl(&["-n", &ns, "delete", "pod", &pod_name, "--wait=false"]);
    let mut terminated = None;
    let deadline = Duration::from_secs(grace + 30);
    while t0.elapsed() < deadline {
        let next = tokio::time::timeout(Duration::from_secs(1), events.next()).await;
        let Ok(Some(Ok(ev))) = next else { continue };
        let gone = matches!(ev, kube::runtime::watcher::Event::Delete(_));
        if let kube::runtime::watcher::Event::Apply(p)
        | kube::runtime::watcher::Event::InitApply(p) = &ev
        {
            let state = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.terminated.clone());
            if let Some(t) = state
                && terminated.is_none()
            {
                terminated = Some((t, t0.elapsed()));
            }
        }
        if gone {
            break;
        }
    }
    let gone = t0.elapsed();
    let _ = logs.kill();
    let _ = logs.wait();
    let log = log_reader.join().unwrap();
    let (state, seen_at) = terminated.expect("the container's terminated state");
    assert_eq!(
        state.exit_code, 0,
        "the operator did not end by itself: {state:?}\n{log}"
    );
    assert!(
        log.contains("the token NetBird issued is LOST") && log.contains("\"instance\":\"held\""),
        "the shutdown says what was lost:\n{log}"
    );
    assert!(!log.contains(PASSWORD));
    let lost_line = log
        .lines()
        .find(|l| l.contains("is LOST"))
        .unwrap_or_default();
    eprintln!(
        "node: pod deleted with a held token write (grace {grace} s, shutdown timeout {} s): container ended (exit 0) within {seen_at:?}, pod gone after {gone:?}; {lost_line}",
        grace - 10
    );
}

/// `kubectl apply` of crds/ and deploy/ as the README says (the cluster-wide operator in namespace
/// netbird-operator, the chart's default image reference, `IfNotPresent`: the image built here is
/// already on the node): the pod becomes Ready and bootstraps an instance in another namespace.
#[tokio::test]
async fn kubectl_apply_of_crds_and_deploy() {
    let _serial = SERIAL.lock().await;
    let Some(node) = Node::shared() else {
        return;
    };
    let client = node.client().await;
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/netbird-operator.yaml");
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/");
    let _remove = KubectlOnDrop(
        node,
        ["delete", "-f", deploy, "--wait=false", "--ignore-not-found"]
            .map(String::from)
            .to_vec(),
    );
    let ns = unique("node-apply");
    let _cleanup = Cleanup {
        node,
        namespace: ns.clone(),
        release: None,
    };
    create_namespace(&client, &ns).await;
    let _nb_lock = support::netbird_lock().await;
    let nb = NetbirdServer::start_on(HOST_IP, &[])
        .await
        .expect("netbird-server");
    let t0 = Instant::now();
    node.kubectl(&["apply", "-f", crds]);
    node.kubectl(&["apply", "-f", deploy]);
    let pod = ready_pods(
        node,
        &client,
        "netbird-operator",
        1,
        Duration::from_secs(120),
    )
    .await
    .remove(0);
    let pod_ready = t0.elapsed();
    create_admin_secret(&client, &ns).await;
    create_instance(&client, &ns, "nb", &nb.url).await;
    wait_instance_ready(&client, &ns, "nb", Duration::from_secs(60)).await;
    token_accepted(&client, &ns, "nb", &nb).await;
    let process = check_process(node, &pod);
    let metrics =
        metrics_through_service(&client, "netbird-operator", "netbird-operator-metrics").await;
    assert!(metrics.contains("# TYPE netbird_operator_"), "{metrics}");
    eprintln!("node: kubectl apply of deploy/ to pod Ready {pod_ready:?}; {process}");
}

/// The chart owning the CRD (`crds.install=true`): `helm upgrade` to a new chart version whose CRD
/// changed (a printer column more) updates the CRD and keeps the NetbirdInstances Ready and the
/// operator reconciling; `helm uninstall` keeps the CRD, the NetbirdInstances and the token Secret.
#[tokio::test]
async fn helm_upgrade_with_a_changed_crd_then_uninstall_keeps_the_instances() {
    let _serial = SERIAL.lock().await;
    let Some(node) = Node::shared() else {
        return;
    };
    let client = node.client().await;
    let ns = unique("node-upgrade");
    // the harness's CRD back as crds/ has it, whatever this test leaves
    let crd_file = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/netbirdinstance.yaml");
    let _restore_crd = KubectlOnDrop(node, ["replace", "-f", crd_file].map(String::from).to_vec());
    let _cleanup = Cleanup {
        node,
        namespace: ns.clone(),
        release: Some("nbop".into()),
    };
    create_namespace(&client, &ns).await;
    let _nb_lock = support::netbird_lock().await;
    let nb = NetbirdServer::start_on(HOST_IP, &[])
        .await
        .expect("netbird-server");
    let mut values = node::image_values();
    values.extend([
        "crds.install=true".to_string(),
        format!("watchNamespace={ns}"),
    ]);
    let mut args = helm_install_args("nbop", &ns, &values);
    // the CRD exists (applied from crds/, as after a kubectl install): the release adopts it
    args.push("--take-ownership");
    node.helm(&args);
    ready_pods(node, &client, &ns, 1, Duration::from_secs(120)).await;
    create_admin_secret(&client, &ns).await;
    create_instance(&client, &ns, "nb", &nb.url).await;
    wait_instance_ready(&client, &ns, "nb", Duration::from_secs(60)).await;

    // the next chart version: its CRD has one more printer column
    let dir = tempfile::tempdir().unwrap();
    let chart = dir.path().join("netbird-operator");
    let copied = std::process::Command::new("cp")
        .args(["-r", CHART])
        .arg(&chart)
        .status()
        .unwrap();
    assert!(copied.success());
    let chart_yaml = std::fs::read_to_string(chart.join("Chart.yaml")).unwrap();
    let version = chart_yaml
        .lines()
        .find_map(|l| l.strip_prefix("version: "))
        .unwrap()
        .trim()
        .to_string();
    std::fs::write(
        chart.join("Chart.yaml"),
        chart_yaml.replace(&format!("version: {version}"), "version: 99.0.0"),
    )
    .unwrap();
    let crd_template = std::fs::read_to_string(chart.join("templates/crds.yaml")).unwrap();
    let changed = crd_template.replacen(
        "  - additionalPrinterColumns:\n",
        "  - additionalPrinterColumns:\n    - jsonPath: .spec.managementURL\n      name: URL\n      type: string\n      priority: 1\n",
        1,
    );
    assert_ne!(
        changed, crd_template,
        "the CRD template's printer columns moved"
    );
    std::fs::write(chart.join("templates/crds.yaml"), changed).unwrap();
    let mut up = vec![
        "upgrade",
        "nbop",
        chart.to_str().unwrap(),
        "-n",
        &ns,
        "--wait=false",
        // the CRD's fields are still owned by the `kubectl apply` that created it (--take-ownership
        // moved only Helm's ownership annotations): without this the upgrade fails with a
        // server-side apply conflict on .spec.versions
        "--force-conflicts",
    ];
    for v in &values {
        up.extend(["--set", v.as_str()]);
    }
    node.helm(&up);
    let crd = node.kubectl(&[
        "get",
        "crd",
        "netbirdinstances.bootstrap.netbird.io",
        "-o",
        "json",
    ]);
    assert!(
        crd.contains(".spec.managementURL"),
        "the upgrade changed the CRD"
    );
    assert!(
        node.helm(&["list", "-n", &ns])
            .contains("netbird-operator-99.0.0")
    );
    // still Ready, and the operator still reconciles (a new instance on the set-up server gets a
    // status)
    wait_instance_ready(&client, &ns, "nb", Duration::from_secs(10)).await;
    create_instance(&client, &ns, "after-upgrade", &nb.url).await;
    support::wait_for(
        "a reconcile after the upgrade",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            let ns = ns.clone();
            async move { condition_of(&client, &ns, "after-upgrade", "Ready").await }
        },
    )
    .await;
    let pods = ready_pods(node, &client, &ns, 1, Duration::from_secs(120)).await;
    assert_eq!(restarts(&pods[0]), 0);
    wait_instance_ready(&client, &ns, "nb", Duration::from_secs(10)).await;

    // uninstall: the CRD (helm.sh/resource-policy: keep), the instances and the token stay
    node.helm(&["uninstall", "nbop", "-n", &ns, "--wait"]);
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    assert!(
        crds.get_opt("netbirdinstances.bootstrap.netbird.io")
            .await
            .unwrap()
            .is_some(),
        "the CRD was deleted"
    );
    let instances: Api<NetbirdInstance> = Api::namespaced(client.clone(), &ns);
    let left: Vec<String> = instances
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|n| n.name_any())
        .collect();
    assert_eq!(
        left,
        ["after-upgrade", "nb"],
        "the NetbirdInstances were deleted"
    );
    token_accepted(&client, &ns, "nb", &nb).await;
    support::wait_for(
        "the operator's pod to be gone",
        Duration::from_secs(90),
        || {
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
            async move {
                pods.list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .is_empty()
                    .then_some(())
            }
        },
    )
    .await;
}
