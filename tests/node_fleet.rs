//! Does the chart's memory limit hold the fleet it claims? The operator's image as the chart's pod
//! (`helm install` with the chart's defaults: resources, concurrency, cluster-wide watch; only the
//! image and `crds.install=false` set) on the real one-node cluster of tests/support/node.rs,
//! against a fleet of fake NetBird servers (tests/support/fake_netbird.rs, `FakeFleet`) listening on
//! the node's host address, which the pod reaches as it reaches the real server in tests/node.rs.
//! N NetbirdInstances are applied server-side at once (16 writers, Flux's field manager and labels,
//! as `make bench` applies its fleets) until all are Ready; then, once the pod is idle and
//! `NBOP_NODE_FLEET_SETTLE` seconds (30) passed, the pod's restarts and last state, the OOM kills
//! and the memory of the container's memory cgroup (peak, current, RSS) beside the limit; then the
//! pod is deleted and its replacement's peak (a start with the fleet present) is read the same way.
//!
//! Runs only with `NBOP_NODE_FLEET=<n>` (`<n>:own`: a credentials Secret per instance), e.g.
//! `NBOP_NODE_FLEET=10000 cargo test --release --test node_fleet -- --nocapture`; skipped with one
//! loud line otherwise, and where the node tests cannot run. `NBOP_NODE_FLEET_TIMEOUT` seconds
//! (7200) bounds the wait for all Ready.

mod support;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use netbird_operator::crd::NetbirdInstance;
use serde_json::json;
use support::fake_netbird::FakeFleet;
use support::node::{self, Cleanup, HOST_IP, Node};

const RELEASE: &str = "nbop";
const CHART: &str = support::chart::CHART;

/// A line on stderr that `cargo test` does not capture (progress of a run that takes minutes).
macro_rules! say {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

fn env_secs(key: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(key)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// NBOP_NODE_FLEET: the size, and whether each instance has a credentials Secret of its own.
fn fleet_spec() -> Option<(usize, bool)> {
    let v = std::env::var("NBOP_NODE_FLEET").ok()?;
    let (size, own) = match v.split_once(':') {
        Some((s, "own")) => (s, true),
        Some(_) => panic!("NBOP_NODE_FLEET={v}: expected <n> or <n>:own"),
        None => (v.as_str(), false),
    };
    let size = size
        .trim()
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .unwrap_or_else(|| panic!("NBOP_NODE_FLEET={v}: expected <n> or <n>:own"));
    Some((size, own))
}

/// The chart's default memory limit in MiB (`resources.limits.memory` of values.yaml).
fn chart_limit_mib() -> u64 {
    let values = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/netbird-operator/values.yaml"
    ))
    .unwrap();
    values
        .lines()
        .find_map(|l| l.trim().strip_prefix("limits: {memory: "))
        .and_then(|v| v.strip_suffix("Mi}"))
        .and_then(|v| v.parse().ok())
        .expect("the chart's memory limit in Mi (`limits: {memory: <n>Mi}`)")
}

/// An instance as its manifest says it (as `make bench` writes them).
fn instance_json(name: &str, url: &str, credentials: &str) -> serde_json::Value {
    json!({
        "apiVersion": "bootstrap.netbird.io/v1alpha1", "kind": "NetbirdInstance",
        "metadata": {"name": name, "labels": flux_labels()},
        "spec": {"managementURL": url, "allowInsecureHTTP": true,
                 "credentialsSecretRef": {"name": credentials},
                 "versionCheck": {"interval": "1h"}},
    })
}

/// The labels Flux's kustomize-controller puts on what it applies.
fn flux_labels() -> serde_json::Value {
    json!({"kustomize.toolkit.fluxcd.io/name": "fleet", "kustomize.toolkit.fluxcd.io/namespace": "flux-system"})
}

/// Server-side apply, as Flux applies.
async fn apply<K>(api: &Api<K>, obj: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let name = obj["metadata"]["name"].as_str().unwrap().to_string();
    let pp = PatchParams::apply("kustomize-controller").force();
    // a write the loaded apiserver times out is applied again (apply is idempotent)
    for attempt in 1..=5 {
        match api.patch(&name, &pp, &Patch::Apply(&obj)).await {
            Ok(_) => return,
            Err(e) if attempt < 5 => {
                say!("node fleet: apply {name} failed ({e}), again");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => panic!("apply {name}: {e}"),
        }
    }
}

/// The operator's pod: the one of the release not being deleted.
async fn operator_pod(client: &Client, ns: &str) -> Option<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels("app.kubernetes.io/name=netbird-operator");
    api.list(&lp)
        .await
        .ok()?
        .items
        .into_iter()
        .find(|p| p.metadata.deletion_timestamp.is_none())
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The Ready operator pod that is not `not` (a replaced pod's name).
async fn wait_pod_ready(client: &Client, ns: &str, not: Option<&str>, timeout: Duration) -> Pod {
    let start = Instant::now();
    loop {
        if let Some(p) = operator_pod(client, ns).await
            && pod_ready(&p)
            && Some(p.name_any().as_str()) != not
        {
            return p;
        }
        assert!(
            start.elapsed() < timeout,
            "no Ready operator pod in {ns} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The container's restarts, and its last termination's reason and exit code.
fn container_state(p: &Pod) -> (i32, Option<String>) {
    let Some(c) = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
    else {
        return (0, None);
    };
    let last = c
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .map(|t| {
            format!(
                "{} (exit {})",
                t.reason.clone().unwrap_or_default(),
                t.exit_code
            )
        });
    (c.restart_count, last)
}

/// The container's host pid and its memory cgroup's directory (cgroup v1, as the node runs).
fn container_cgroup(node: &Node, p: &Pod) -> (u32, PathBuf) {
    let id = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.clone())
        .expect("a container id");
    let pid = node
        .container_pid(id.trim_start_matches("containerd://"))
        .expect("the container's task");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let memcg = cgroup
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
        .expect("a memory cgroup (the node runs cgroup v1)");
    (pid, PathBuf::from(format!("/sys/fs/cgroup/memory{memcg}")))
}

/// What a memory cgroup says (cgroup v1): bytes, and the OOM kills of its processes.
#[derive(Debug, Default, Clone)]
struct Memcg {
    limit: u64,
    usage: u64,
    peak: u64,
    rss: u64,
    cache: u64,
    oom_kills: u64,
    failcnt: u64,
}

fn read_memcg(dir: &std::path::Path) -> Memcg {
    let num = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let keyed = |f: &str, k: &str| {
        std::fs::read_to_string(dir.join(f))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k} "))?.trim().parse().ok())
            .unwrap_or(0)
    };
    Memcg {
        limit: num("memory.limit_in_bytes"),
        usage: num("memory.usage_in_bytes"),
        peak: num("memory.max_usage_in_bytes"),
        rss: keyed("memory.stat", "total_rss"),
        cache: keyed("memory.stat", "total_cache"),
        oom_kills: keyed("memory.oom_control", "oom_kill"),
        failcnt: num("memory.failcnt"),
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn describe(m: &Memcg) -> String {
    format!(
        "peak {:.1} MiB, current {:.1} MiB (rss {:.1}, cache {:.1}), limit {:.0} MiB, OOM kills {}, limit hits {}",
        mib(m.peak),
        mib(m.usage),
        mib(m.rss),
        mib(m.cache),
        mib(m.limit),
        m.oom_kills,
        m.failcnt
    )
}

/// CPU seconds (user + system) of a process.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum::<f64>())
        .unwrap_or(0.0)
        / 100.0
}

/// Until two seconds in a row use under 2% of a core (at most `limit`); the time it took.
async fn until_idle(pid: u32, limit: Duration) -> Duration {
    let t0 = Instant::now();
    let mut quiet = 0;
    let mut last = cpu_secs(pid);
    while quiet < 2 && t0.elapsed() < limit {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cpu_secs(pid);
        quiet = if now - last < 0.02 { quiet + 1 } else { 0 };
        last = now;
    }
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_pod_holds_a_fleet() {
    let Some((size, own)) = fleet_spec() else {
        say!(
            "\n!!!!! SKIPPING tests/node_fleet.rs (a fleet against the chart's pod): set NBOP_NODE_FLEET=<n> or <n>:own !!!!!\n"
        );
        return;
    };
    let Some(node) = Node::shared() else {
        return;
    };
    let settle = env_secs("NBOP_NODE_FLEET_SETTLE", 30);
    let timeout = env_secs("NBOP_NODE_FLEET_TIMEOUT", 7200);
    let chart_limit = chart_limit_mib();
    let what = format!(
        "{size} instances{}",
        if own {
            ", a credentials Secret each"
        } else {
            ""
        }
    );
    let client = node.client().await;
    let ns = format!("node-fleet-{size}{}", if own { "-own" } else { "" });
    let _cleanup = Cleanup {
        node,
        namespace: ns.clone(),
        release: Some(RELEASE.to_string()),
    };
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .expect("create the namespace");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let instances: Api<NetbirdInstance> = Api::namespaced(client.clone(), &ns);
    if !own {
        apply(
            &secrets,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "admin"},
                "stringData": {"email": "admin@example.com", "password": "s3cret-Passw0rd"}}),
        )
        .await;
    }
    let fleet = FakeFleet::start_on(HOST_IP, size).await;

    // the chart with its defaults: only the image built here, and the CRD the node installed
    let mut args = vec!["install", RELEASE, CHART, "-n", &ns, "--wait=false"];
    let mut values = node::image_values();
    values.push("crds.install=false".into());
    for v in &values {
        args.extend(["--set", v.as_str()]);
    }
    let t_install = Instant::now();
    node.helm(&args);
    let pod = wait_pod_ready(&client, &ns, None, Duration::from_secs(300)).await;
    let (pid, memcg) = container_cgroup(node, &pod);
    let idle = read_memcg(&memcg);
    say!(
        "node fleet: pod {} Ready {:?} after helm install; chart limit {chart_limit} MiB, cgroup {}; idle: {}",
        pod.name_any(),
        t_install.elapsed(),
        memcg.display(),
        describe(&idle)
    );
    assert_eq!(
        idle.limit,
        chart_limit << 20,
        "the container's memory limit is the chart's default"
    );

    // the fleet, applied at once; progress every 30 s
    let mut ready = support::ready_names(instances.clone());
    let t0 = Instant::now();
    let applying = {
        let (instances, secrets) = (instances.clone(), secrets.clone());
        let urls: Vec<String> = (0..size).map(|i| fleet.url(i)).collect();
        tokio::spawn(async move {
            stream::iter(urls.into_iter().enumerate())
                .for_each_concurrent(16, |(i, url)| {
                    let (instances, secrets) = (instances.clone(), secrets.clone());
                    async move {
                        let credentials = if own {
                            let name = format!("admin-s{i}");
                            apply(
                                &secrets,
                                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "labels": flux_labels()},
                                    "stringData": {"email": format!("admin-{i}@example.com"), "password": "s3cret-Passw0rd"}}),
                            )
                            .await;
                            name
                        } else {
                            "admin".to_string()
                        };
                        apply(&instances, instance_json(&format!("s{i}"), &url, &credentials))
                            .await;
                    }
                })
                .await;
        })
    };
    let mut applied_at = None;
    let mut last_report = Instant::now();
    let all_ready = loop {
        let n = ready.borrow().len();
        if n >= size {
            break true;
        }
        if applied_at.is_none() && applying.is_finished() {
            applied_at = Some(t0.elapsed());
            say!("node fleet: {size} applied in {:?}", t0.elapsed());
        }
        if t0.elapsed() > timeout {
            break false;
        }
        if last_report.elapsed() >= Duration::from_secs(30) {
            last_report = Instant::now();
            let p = operator_pod(&client, &ns).await;
            let (restarts, last) = p.as_ref().map(container_state).unwrap_or_default();
            say!(
                "node fleet: {:>5.0} s: {n}/{size} Ready; restarts {restarts}{}; container: {}",
                t0.elapsed().as_secs_f64(),
                last.map(|l| format!(" (last: {l})")).unwrap_or_default(),
                describe(&read_memcg(&memcg))
            );
        }
        if let Ok(Err(_)) = tokio::time::timeout(Duration::from_secs(1), ready.changed()).await {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let fleet_time = t0.elapsed();
    let ready_count = ready.borrow().len();
    say!(
        "node fleet: {ready_count}/{size} Ready after {fleet_time:?} (all: {all_ready}); fake servers answered {} calls",
        fleet.total_calls()
    );

    // settled: the pod idle, then `settle` more seconds
    let busy = if all_ready {
        until_idle(pid, Duration::from_secs(600)).await
    } else {
        Duration::ZERO
    };
    tokio::time::sleep(settle).await;
    let pod = operator_pod(&client, &ns)
        .await
        .expect("the operator's pod");
    let (restarts, last) = container_state(&pod);
    let settled = read_memcg(&memcg);
    let pod_memcg = read_memcg(memcg.parent().unwrap());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| "gone".into())
    };
    say!(
        "node fleet RESULT ({what}, chart default limit {chart_limit} MiB): all Ready in {fleet_time:?} ({ready_count}/{size}); idle {busy:?} later plus {settle:?}; restarts {restarts}, last state {}; container: {}; pod cgroup: {}; process RSS {} (anonymous {}: the cgroup's rss; the binary's file pages are charged where they were first read), peak RSS {}",
        last.as_deref().unwrap_or("none"),
        describe(&settled),
        describe(&pod_memcg),
        field("VmRSS"),
        field("RssAnon"),
        field("VmHWM")
    );

    // a start with the fleet present: the pod deleted, its replacement's peak
    let mut restart_line = String::from("not run (the fleet did not become Ready)");
    let mut restart_figures = None;
    if all_ready {
        let old = pod.name_any();
        let t1 = Instant::now();
        node.kubectl(&["-n", &ns, "delete", "pod", &old, "--wait=false"]);
        let pod2 = wait_pod_ready(&client, &ns, Some(&old), Duration::from_secs(300)).await;
        let ready_after = t1.elapsed();
        let (pid2, memcg2) = container_cgroup(node, &pod2);
        let busy2 = until_idle(pid2, Duration::from_secs(600)).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let pod2 = operator_pod(&client, &ns)
            .await
            .expect("the operator's pod");
        let (restarts2, last2) = container_state(&pod2);
        let m2 = read_memcg(&memcg2);
        let still_ready = instances
            .list(&ListParams::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|n| support::ready_is(n, "True", "Bootstrapped"))
                    .count()
            })
            .unwrap_or(0);
        restart_line = format!(
            "replacement pod Ready {ready_after:?} after the delete, idle {busy2:?} later; restarts {restarts2}, last state {}; container: {}; {still_ready}/{size} Ready",
            last2.as_deref().unwrap_or("none"),
            describe(&m2)
        );
        restart_figures = Some((restarts2, last2, m2, still_ready));
    }
    say!("node fleet RESTART ({what}): {restart_line}");
    if let Some(applied) = applied_at {
        say!("node fleet: applying took {applied:?}");
    }

    assert!(
        all_ready,
        "{ready_count}/{size} Ready after {timeout:?} (NBOP_NODE_FLEET_TIMEOUT)"
    );
    assert_eq!(restarts, 0, "the operator's container restarted ({last:?})");
    assert_eq!(settled.oom_kills, 0, "OOM kills in the container's cgroup");
    assert_eq!(pod_memcg.oom_kills, 0, "OOM kills in the pod's cgroup");
    if let Some((restarts2, last2, m2, still_ready)) = restart_figures {
        assert_eq!(restarts2, 0, "the replacement restarted ({last2:?})");
        assert_eq!(m2.oom_kills, 0, "OOM kills in the replacement's cgroup");
        assert_eq!(still_ready, size, "instances Ready after the replacement");
    }
}
