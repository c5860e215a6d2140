//! A real one-node Kubernetes cluster for the operator as a pod (tests/node.rs): etcd,
//! kube-apiserver, kube-controller-manager and kube-scheduler on the host; containerd, kubelet,
//! kube-proxy and the pods in a network namespace of their own (`tests/support/node/up.sh` says
//! how, `down.sh` undoes it), and the operator's OCI image built from the release binary
//! (`image.sh`).
//!
//! One cluster per machine at a time: a watchdog process holds a file lock for the cluster's whole
//! life and tears it down (`down.sh`) when this test process ends, however it ends (a panic, an
//! abort, SIGKILL). A cluster left by a run that died before its watchdog could act is torn down
//! before the next one starts.
//!
//! The node tests need root and overlayfs: elsewhere, or with `NBOP_SKIP_NODE=1`, they are skipped
//! with one loud line.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

use super::{free_port, repo_root, tools};

/// The host's end of the veth: kube-apiserver listens here, and so does a NetBird server that pods
/// must reach.
pub const HOST_IP: &str = "10.250.0.1";
/// The image reference of the operator (never pulled: `imagePullPolicy: Never`).
pub const IMAGE_REPOSITORY: &str = "nbop.local/netbird-operator";
pub const IMAGE_TAG: &str = "test";
const PAUSE_IMAGE: &str = "nbop.local/pause:1";
/// The chart's default image repository (deploy/ names it with the chart's appVersion).
pub const CHART_IMAGE: &str = "ghcr.io/netbird-operator/netbird-operator";

/// The chart's appVersion.
pub fn chart_app_version() -> String {
    let chart = std::fs::read_to_string(repo_root().join("charts/netbird-operator/Chart.yaml"))
        .expect("Chart.yaml");
    chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .expect("appVersion in Chart.yaml")
}

/// The running node.
pub struct Node {
    /// Everything of the cluster lives here (fixed, so that a later run finds a stale one).
    pub run_dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    /// The operator's OCI image archive and its config (`image.sh`).
    pub image: PathBuf,
    /// containerd's ctr and socket, to look at tasks.
    ctr: PathBuf,
    /// Measured: from the start of up.sh to the node Ready.
    pub start_time: Duration,
}

/// Why the node tests cannot run here, if they cannot.
fn unsupported() -> Option<String> {
    if std::env::var("NBOP_SKIP_NODE").as_deref() == Ok("1") {
        return Some("NBOP_SKIP_NODE=1".into());
    }
    // SAFETY-free check of the effective uid: /proc/self/status
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("");
    if euid != "0" {
        return Some("not root (a node needs root: network namespaces, cgroups, mounts)".into());
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs.lines().any(|l| l.trim_end().ends_with("overlay")) {
        return Some("no overlayfs in /proc/filesystems".into());
    }
    if !Path::new("/sys/fs/cgroup/memory").is_dir()
        && !Path::new("/sys/fs/cgroup/cgroup.controllers").is_file()
    {
        return Some("no memory cgroup".into());
    }
    let print = Command::new(repo_root().join("tests/tools/install"))
        .arg("--print")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&print.stdout);
    if !text.contains("NODE_PACKAGES=present") {
        return Some(
            "runc, the CNI plugins or iptables are missing (tests/tools/install installs them as root)"
                .into(),
        );
    }
    None
}

fn tool_dir(key: &str) -> PathBuf {
    let out = Command::new(repo_root().join("tests/tools/install"))
        .arg("--print")
        .output()
        .expect("tests/tools/install --print");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("tests/tools/install --print names no {key}"))
}

/// The release binary (built here when missing or stale; `make test` builds it first), or
/// NBOP_OPERATOR_RELEASE_BIN.
pub fn release_binary() -> PathBuf {
    if let Ok(p) = std::env::var("NBOP_OPERATOR_RELEASE_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // the environment of the shell that ran `cargo test`, not the one cargo gives a test (its
    // CARGO_* variables and LD_LIBRARY_PATH would make the release build start over)
    let keep = |k: &str| {
        matches!(
            k,
            "PATH"
                | "HOME"
                | "USER"
                | "TMPDIR"
                | "CARGO_HOME"
                | "RUSTUP_HOME"
                | "RUSTUP_TOOLCHAIN"
                | "RUSTFLAGS"
                | "CC"
                | "CFLAGS"
        ) || k.starts_with("CARGO_PROFILE_")
            || k.starts_with("CARGO_BUILD_")
    };
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "--bin",
            "netbird-operator",
        ])
        .current_dir(repo_root())
        .env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| k.to_str().is_some_and(keep)))
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .expect("cargo build --release");
    assert!(status.success(), "cargo build --release failed");
    target.join("release/netbird-operator")
}

/// Builds the operator's image archive into `dir` (`image.sh`); returns the archive's path (its
/// config is beside it, `<archive>.config.json`).
pub fn build_image(dir: &Path) -> PathBuf {
    let bin = release_binary();
    let out = dir.join("netbird-operator-image.tar");
    run_script(
        "image.sh",
        &[
            bin.display().to_string(),
            format!("{IMAGE_REPOSITORY}:{IMAGE_TAG}"),
            out.display().to_string(),
        ],
        &[],
    );
    out
}

fn run_script(script: &str, args: &[String], env: &[(&str, String)]) -> String {
    let path = repo_root().join("tests/support/node").join(script);
    let out = Command::new("bash")
        .arg(&path)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script} failed:\n{text}");
    text
}

/// Removes what a test installed on the node, even when it fails: the helm release (when named)
/// and its namespace (the node itself goes when the process ends).
pub struct Cleanup {
    pub node: &'static Node,
    pub namespace: String,
    pub release: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(r) = &self.release {
            let _ = self.node.run(
                &self.node.helm,
                &["uninstall", r, "-n", &self.namespace, "--wait=false"],
                None,
            );
        }
        let _ = self.node.run(
            &self.node.kubectl,
            &["delete", "namespace", &self.namespace, "--wait=false"],
            None,
        );
    }
}

impl Node {
    /// The node of this test process, started on first use; None (after one loud line) where node
    /// tests cannot run.
    pub fn shared() -> Option<&'static Node> {
        static NODE: OnceLock<Option<Node>> = OnceLock::new();
        NODE.get_or_init(|| {
            if let Some(why) = unsupported() {
                // written to stderr directly: the test harness captures eprintln!, and a skip must
                // show in a plain `cargo test`
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "\n!!!!! SKIPPING the node tests (the operator as a pod on a real kubelet): {why} !!!!!\n"
                );
                return None;
            }
            tools()?;
            Some(
                std::thread::spawn(Node::start)
                    .join()
                    .expect("node start panicked"),
            )
        })
        .as_ref()
    }

    fn start() -> Node {
        let tmp = std::env::temp_dir();
        let run_dir = tmp.join("nbop-node");
        let lock = tmp.join("nbop-node.lock");
        let kube_bin = tool_dir("KUBE_BIN");
        let containerd_bin = tool_dir("CONTAINERD_BIN");
        let down = repo_root().join("tests/support/node/down.sh");

        // the watchdog: takes the machine's lock, says so, waits for this process to end, then
        // tears the cluster down (and only then lets the lock go)
        let ready = tempfile::NamedTempFile::new().expect("tempfile");
        let script = r#"
parent=$1; ready=$2; down=$3; run=$4
trap '' INT TERM HUP
echo locked >"$ready"
while kill -0 "$parent" 2>/dev/null; do sleep 0.3; done
R="$run" bash "$down" >"$run.down.log" 2>&1
"#;
        // it outlives this process by design (it is what runs after it): its pid is all we keep
        let _watchdog = Command::new("setsid")
            .args(["flock", "-x"])
            .arg(&lock)
            .args(["bash", "-c", script, "node-watchdog"])
            .arg(std::process::id().to_string())
            .arg(ready.path())
            .arg(&down)
            .arg(&run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start the node watchdog")
            .id();
        let waited = Instant::now();
        while std::fs::read_to_string(ready.path())
            .unwrap_or_default()
            .trim()
            != "locked"
        {
            if waited.elapsed() > Duration::from_secs(600) {
                panic!("another node cluster held {} for 10 min", lock.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }

        // a cluster left by a run that died before its watchdog acted
        if run_dir.exists() {
            eprintln!("node: tearing down a cluster left in {}", run_dir.display());
            run_script("down.sh", &[], &[("R", run_dir.display().to_string())]);
        }
        std::fs::create_dir_all(&run_dir).expect("run dir");
        let images = run_dir.join("images");
        std::fs::create_dir_all(&images).expect("images dir");
        let image = build_image(&images);
        let pause = images.join("pause.tar");
        run_script(
            "image.sh",
            &[
                "--pause".into(),
                containerd_bin.join("pause").display().to_string(),
                PAUSE_IMAGE.into(),
                pause.display().to_string(),
            ],
            &[],
        );

        let t0 = Instant::now();
        let etcd_port = free_port();
        let env = vec![
            ("R", run_dir.display().to_string()),
            ("KUBE_BIN", kube_bin.display().to_string()),
            ("ETCD_BIN", tool_dir("ETCD_BIN").display().to_string()),
            ("NODE_BIN", tool_dir("NODE_BIN").display().to_string()),
            ("CONTAINERD_BIN", containerd_bin.display().to_string()),
            ("API_PORT", "16443".to_string()),
            // etcd's peer port is the next one
            ("ETCD_PORT", etcd_port.to_string()),
            ("KCM_PORT", free_port().to_string()),
            ("SCHED_PORT", free_port().to_string()),
            ("IMAGES", format!("{} {}", pause.display(), image.display())),
        ];
        let log = run_script("up.sh", &[], &env);
        let start_time = t0.elapsed();
        eprint!("{log}");
        eprintln!("node: Ready {start_time:?} after up.sh started");
        let node = Node {
            kubeconfig: run_dir.join("admin.kubeconfig"),
            kubectl: kube_bin.join("kubectl"),
            helm: tool_dir("HELM_BIN").join("helm"),
            image,
            ctr: containerd_bin.join("ctr"),
            run_dir,
            start_time,
        };
        // the CRD as `kubectl apply -f crds/` installs it (releases use crds.install=false, so
        // that no release owns it), and the image also under the chart's default reference, for
        // deploy/ (IfNotPresent: never pulled)
        let crd = repo_root().join("crds/netbirdinstance.yaml");
        node.kubectl(&["apply", "-f", &crd.display().to_string()]);
        node.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/netbirdinstances.bootstrap.netbird.io",
            "--timeout=60s",
        ]);
        let tagged = Command::new(&node.ctr)
            .arg("--address")
            .arg(node.run_dir.join("containerd/containerd.sock"))
            .args([
                "-n",
                "k8s.io",
                "images",
                "tag",
                &format!("{IMAGE_REPOSITORY}:{IMAGE_TAG}"),
            ])
            .arg(format!("{CHART_IMAGE}:{}", chart_app_version()))
            .output()
            .expect("ctr images tag");
        assert!(
            tagged.status.success(),
            "ctr images tag: {}",
            String::from_utf8_lossy(&tagged.stderr)
        );
        node
    }

    /// An admin client (clients are bound to the tokio runtime that made them).
    pub async fn client(&self) -> Client {
        netbird_operator::tls::install_crypto_provider();
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("config");
        Client::try_from(cfg).expect("client")
    }

    /// Runs kubectl or helm (`program`) against the node's apiserver.
    pub fn run(&self, program: &Path, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
        use std::io::Write;
        let mut child = Command::new(program)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.run_dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.run_dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.run_dir.join("helm/data"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input).unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().expect("wait")
    }

    /// kubectl with these arguments; its standard output (panics when it fails).
    pub fn kubectl(&self, args: &[&str]) -> String {
        super::chart::ok(
            self.run(&self.kubectl, args, None),
            &format!("kubectl {args:?}"),
        )
    }

    /// helm with these arguments; its standard output (panics when it fails).
    pub fn helm(&self, args: &[&str]) -> String {
        super::chart::ok(self.run(&self.helm, args, None), &format!("helm {args:?}"))
    }

    /// The host pid of a running container (containerd's task), by container id.
    pub fn container_pid(&self, container_id: &str) -> Option<u32> {
        let out = Command::new(&self.ctr)
            .arg("--address")
            .arg(self.run_dir.join("containerd/containerd.sock"))
            .args(["-n", "k8s.io", "tasks", "ls"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == container_id).then(|| f.next()?.parse().ok())?
        })
    }

    /// The log file the kubelet writes for a container (kept while the pod exists).
    pub fn pod_log_dir(&self) -> PathBuf {
        self.run_dir.join("pod-logs")
    }
}

/// The `--set` values that make the chart run the image built here.
pub fn image_values() -> Vec<String> {
    vec![
        format!("image.repository={IMAGE_REPOSITORY}"),
        format!("image.tag={IMAGE_TAG}"),
        "image.pullPolicy=Never".into(),
    ]
}
