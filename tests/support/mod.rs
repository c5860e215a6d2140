//! Test support: a real kube-apiserver on a real etcd (one per test binary), a namespace per test,
//! the real NetBird server (one per test that needs a fresh instance), a fake NetBird server for
//! faults, and the operator running in-process against all of them.
//!
//! Binaries come from `tests/tools/install` (a cache outside the repository). A missing binary is a
//! failure; set NBOP_SKIP_E2E=1 to skip the tests that need them (loudly).
#![allow(dead_code)]

pub mod chart;
pub mod consumer;
pub mod fake_netbird;
pub mod kube_faults;
pub mod node;
pub mod proxy;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use netbird_operator::controller::{self, Context, Settings};
use netbird_operator::crd::NetbirdInstance;
use netbird_operator::metrics::Metrics;
use tokio_util::sync::CancellationToken;

/// Paths of the pinned tools.
pub struct Tools {
    pub kube_bin: PathBuf,
    pub etcd_bin: PathBuf,
    pub helm_bin: PathBuf,
    pub netbird_bin: PathBuf,
    pub promtool_bin: PathBuf,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tools, or None when NBOP_SKIP_E2E=1 and they are missing (after a loud message).
pub fn tools() -> Option<&'static Tools> {
    static TOOLS: OnceLock<Option<Tools>> = OnceLock::new();
    TOOLS
        .get_or_init(|| {
            let out = Command::new(repo_root().join("tests/tools/install"))
                .arg("--print")
                .output()
                .expect("cannot run tests/tools/install --print");
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let get = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{k}=")))
                    .map(PathBuf::from)
                    .unwrap_or_default()
            };
            if !out.status.success() {
                if std::env::var("NBOP_SKIP_E2E").as_deref() == Ok("1") {
                    eprintln!(
                        "\n!!!!! NBOP_SKIP_E2E=1: SKIPPING end-to-end tests, the tools are not built (run tests/tools/install) !!!!!\n"
                    );
                    return None;
                }
                panic!(
                    "the end-to-end tools are missing; run tests/tools/install (or `make test`), or set NBOP_SKIP_E2E=1 to skip these tests\n{text}"
                );
            }
            Some(Tools {
                kube_bin: get("KUBE_BIN"),
                etcd_bin: get("ETCD_BIN"),
                helm_bin: get("HELM_BIN"),
                netbird_bin: get("NETBIRD_BIN"),
                promtool_bin: get("PROMTOOL_BIN"),
            })
        })
        .as_ref()
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// Starts `program` under a watchdog that kills it, and removes `cleanup_dir`, when this test
/// process ends for any reason (a panic, an abort or SIGKILL included).
pub fn spawn_watched(
    program: &Path,
    args: &[String],
    env: &[(&str, String)],
    log: &Path,
    cleanup_dir: Option<&Path>,
) -> u32 {
    let script = r#"
parent=$1; dir=$2; log=$3; shift 3
"$@" >>"$log" 2>&1 &
child=$!
trap 'kill $child 2>/dev/null; sleep 0.2; kill -9 $child 2>/dev/null; [ -n "$dir" ] && rm -rf "$dir"' EXIT
trap 'exit 0' TERM INT
while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.3; done
"#;
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(script)
        .arg("watchdog")
        .arg(std::process::id().to_string())
        .arg(
            cleanup_dir
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
        )
        .arg(log)
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("cannot start the watchdog").id()
}

/// Polls `f` until it returns Some, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// etcd and kube-apiserver for this test binary.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// A user ("limited") with no permissions but what a test grants through RBAC.
    pub limited_kubeconfig: PathBuf,
    /// kube-apiserver: binary, arguments, watchdog pid, port (for restarts).
    apiserver: std::sync::Mutex<(PathBuf, Vec<String>, u32, u16)>,
    pub url: String,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
}

impl ControlPlane {
    /// The control plane of this test binary, started on first use (None: skipped).
    pub fn shared() -> Option<&'static ControlPlane> {
        static CP: OnceLock<Option<ControlPlane>> = OnceLock::new();
        CP.get_or_init(|| {
            let tools = tools()?;
            // started on a thread of its own: the caller may be inside a tokio runtime
            Some(
                std::thread::spawn(move || ControlPlane::start(tools))
                    .join()
                    .expect("control plane start panicked"),
            )
        })
        .as_ref()
    }

    fn start(tools: &Tools) -> ControlPlane {
        let dir = tempfile::Builder::new()
            .prefix("nbop-cp-")
            .tempdir()
            .expect("tempdir")
            .keep();
        let etcd_port = free_port();
        let peer_port = free_port();
        let api_port = free_port();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        spawn_watched(
            &tools.etcd_bin.join("etcd"),
            &[
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
            &[],
            &dir.join("etcd.log"),
            Some(&dir),
        );

        // certificates: a CA, the serving certificate, the service account key
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "nbop-test-ca");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let srv_key = rcgen::KeyPair::generate().expect("key");
        let mut srv_params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("params");
        srv_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-apiserver");
        let srv_cert = srv_params
            .signed_by(&srv_key, &issuer)
            .expect("server cert");
        let sa_key = rcgen::KeyPair::generate().expect("sa key");
        let w = |name: &str, body: String| {
            std::fs::write(dir.join(name), body).expect("write");
            dir.join(name)
        };
        let ca_pem = ca_cert.pem();
        let ca_file = w("ca.crt", ca_pem.clone());
        let crt = w("apiserver.crt", srv_cert.pem());
        let key = w("apiserver.key", srv_key.serialize_pem());
        let sa = w("sa.key", sa_key.serialize_pem());
        let sa_pub = w("sa.pub", sa_key.public_key_pem());
        let admin_token = format!("admin-{}", std::process::id());
        let limited_token = format!("limited-{}", std::process::id());
        let tokens = w(
            "tokens.csv",
            format!(
                "{admin_token},admin,admin-uid,\"system:masters\"\n{limited_token},limited,limited-uid\n"
            ),
        );

        let url = format!("https://127.0.0.1:{api_port}");
        let apiserver_args: Vec<String> = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={}", crt.display()),
            format!("--tls-private-key-file={}", key.display()),
            format!("--client-ca-file={}", ca_file.display()),
            format!("--token-auth-file={}", tokens.display()),
            "--authorization-mode=RBAC".into(),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--allow-privileged=true".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            format!("--service-account-issuer=https://127.0.0.1:{api_port}/"),
            format!("--service-account-key-file={}", sa_pub.display()),
            format!("--service-account-signing-key-file={}", sa.display()),
            "--endpoint-reconciler-type=none".into(),
            format!("--cert-dir={}", dir.join("certs").display()),
            "--v=0".into(),
        ];
        let apiserver_bin = tools.kube_bin.join("kube-apiserver");
        let apiserver_pid = spawn_watched(
            &apiserver_bin,
            &apiserver_args,
            &[],
            &dir.join("apiserver.log"),
            None,
        );

        let kubeconfig = w(
            "kubeconfig",
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: {admin_token}\ncontexts:\n- name: test\n  context: {{cluster: test, user: admin}}\ncurrent-context: test\n",
                ca_file.display()
            ),
        );
        let limited_kubeconfig = w(
            "kubeconfig-limited",
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {}\nusers:\n- name: limited\n  user:\n    token: {limited_token}\ncontexts:\n- name: test\n  context: {{cluster: test, user: limited}}\ncurrent-context: test\n",
                ca_file.display()
            ),
        );
        let cp = ControlPlane {
            apiserver: std::sync::Mutex::new((
                apiserver_bin,
                apiserver_args,
                apiserver_pid,
                api_port,
            )),
            dir: dir.clone(),
            kubeconfig,
            limited_kubeconfig,
            url,
            kubectl: tools.kube_bin.join("kubectl"),
            helm: tools.helm_bin.join("helm"),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let client = cp.client().await;
            let start = Instant::now();
            loop {
                let req = http::Request::get("/readyz")
                    .body(Vec::new())
                    .expect("request");
                if let Ok(body) = client.request_text(req).await
                    && body.trim() == "ok"
                {
                    break;
                }
                let log = std::fs::read_to_string(dir.join("apiserver.log")).unwrap_or_default();
                if start.elapsed() > Duration::from_secs(90) || log.contains("\"command failed\"") {
                    let tail: String = log.lines().rev().take(30).collect::<Vec<_>>().join("\n");
                    panic!("kube-apiserver did not become ready; log tail (newest first):\n{tail}");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            install_crd(&client).await;
        });
        eprintln!(
            "control plane ready at {} (kubeconfig {})",
            cp.url,
            cp.kubeconfig.display()
        );
        cp
    }

    /// Stops kube-apiserver, keeps it down for `down`, starts it again (same etcd, port and
    /// certificates) and waits until it is ready. Disrupts every test of this binary.
    pub async fn restart_apiserver(&self, down: Duration) {
        let (bin, args, pid, port) = self.apiserver.lock().unwrap().clone();
        let _ = Command::new("kill").arg(pid.to_string()).status();
        wait_for(
            "kube-apiserver to stop",
            Duration::from_secs(30),
            || async move {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .is_err()
                    .then_some(())
            },
        )
        .await;
        tokio::time::sleep(down).await;
        let pid = spawn_watched(&bin, &args, &[], &self.dir.join("apiserver.log"), None);
        self.apiserver.lock().unwrap().2 = pid;
        let client = self.client().await;
        wait_for(
            "kube-apiserver to be ready again",
            Duration::from_secs(90),
            || {
                let client = client.clone();
                async move {
                    let req = http::Request::get("/readyz").body(Vec::new()).ok()?;
                    (client.request_text(req).await.ok()?.trim() == "ok").then_some(())
                }
            },
        )
        .await;
    }

    /// A new admin client (clients are bound to the tokio runtime that made them).
    pub async fn client(&self) -> Client {
        self.client_from(&self.kubeconfig).await
    }

    /// A new client from a kubeconfig file.
    pub async fn client_from(&self, kubeconfig: &Path) -> Client {
        netbird_operator::tls::install_crypto_provider();
        let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
        let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("config");
        Client::try_from(cfg).expect("client")
    }
}

/// Applies crds/netbirdinstance.yaml (the committed file) and waits until it is Established.
pub async fn install_crd(client: &Client) {
    let yaml =
        std::fs::read_to_string(repo_root().join("crds/netbirdinstance.yaml")).expect("crd file");
    let crd: CustomResourceDefinition = serde_norway::from_str(&yaml).expect("crd yaml");
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(
        &crd.name_any(),
        &PatchParams::apply("nbop-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("apply CRD");
    let name = crd.name_any();
    wait_for("the CRD to be Established", Duration::from_secs(30), || {
        let api = api.clone();
        let name = name.clone();
        async move {
            let crd = api.get(&name).await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        }
    })
    .await;
}

/// One test's world: its namespace and a client.
pub struct TestEnv {
    pub ns: String,
    pub client: Client,
    pub cp: &'static ControlPlane,
}

impl TestEnv {
    /// A fresh namespace for `test`; None when end-to-end tests are skipped.
    pub async fn new(test: &str) -> Option<TestEnv> {
        let cp = ControlPlane::shared()?;
        let client = cp.client().await;
        let ns = format!(
            "{}-{}",
            test.replace('_', "-").chars().take(40).collect::<String>(),
            rand_suffix()
        );
        let api: Api<Namespace> = Api::all(client.clone());
        let obj: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).expect("ns");
        api.create(&PostParams::default(), &obj)
            .await
            .expect("create namespace");
        Some(TestEnv { ns, client, cp })
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn instances(&self) -> Api<NetbirdInstance> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates a Secret with string data.
    pub async fn create_secret(&self, name: &str, data: &[(&str, &str)]) -> Secret {
        let obj: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "stringData": data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
        }))
        .expect("secret");
        self.secrets()
            .create(&PostParams::default(), &obj)
            .await
            .expect("create secret")
    }

    /// The credentials Secret most tests use: Secret "admin" with a valid email and password.
    pub async fn create_admin_secret(&self) -> Secret {
        self.create_secret(
            "admin",
            &[
                ("email", "admin@example.com"),
                ("password", "s3cret-Passw0rd"),
            ],
        )
        .await
    }

    /// Grants `user` a Role with `rules` in this namespace (a Role and a RoleBinding named `role`).
    pub async fn grant_role(&self, role: &str, user: &str, rules: serde_json::Value) {
        use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
        let r: Role =
            serde_json::from_value(serde_json::json!({"metadata": {"name": role}, "rules": rules}))
                .expect("role");
        let b: RoleBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": role},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}],
        }))
        .expect("role binding");
        Api::<Role>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &r)
            .await
            .expect("create Role");
        Api::<RoleBinding>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &b)
            .await
            .expect("create RoleBinding");
    }

    /// Asserts that this client may not create a Secret here (RBAC).
    pub async fn create_secret_denied(&self, name: &str) {
        let obj: Secret = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))
            .expect("secret");
        match self.secrets().create(&PostParams::default(), &obj).await {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
            other => panic!("creating a Secret was not forbidden: {other:?}"),
        }
    }

    /// Creates a NetbirdInstance from a spec given as JSON (untyped, so invalid specs reach the
    /// apiserver as written).
    pub async fn create_instance(
        &self,
        name: &str,
        spec: serde_json::Value,
    ) -> Result<NetbirdInstance, kube::Error> {
        let ar = kube::api::ApiResource::erase::<NetbirdInstance>(&());
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.ns, &ar);
        let obj: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "bootstrap.netbird.io/v1alpha1",
            "kind": "NetbirdInstance",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": spec,
        }))
        .expect("instance");
        let created = api.create(&PostParams::default(), &obj).await?;
        Ok(
            serde_json::from_value(serde_json::to_value(created).expect("json"))
                .expect("typed instance"),
        )
    }

    /// Runs the operator in-process, watching this namespace, until the handle is dropped.
    pub async fn start_operator(&self) -> Operator {
        self.start_operator_with(self.cp.client().await).await
    }

    /// Runs the operator in-process with its clock `ahead` of the real one.
    pub async fn start_operator_ahead(&self, ahead: Duration) -> Operator {
        let clock: Arc<dyn Fn() -> jiff::Timestamp + Send + Sync> = Arc::new(move || {
            jiff::Timestamp::now() + jiff::SignedDuration::try_from(ahead).unwrap()
        });
        self.start_operator_full(self.cp.client().await, clock)
            .await
    }

    /// Runs the operator in-process with this client's identity.
    pub async fn start_operator_with(&self, client: Client) -> Operator {
        self.start_operator_full(client, Arc::new(jiff::Timestamp::now))
            .await
    }

    /// Runs the operator in-process with this client's identity, watching `namespaces` (all when
    /// empty), with its clock `ahead` of the real one.
    pub async fn start_operator_watching(
        &self,
        client: Client,
        namespaces: &[&str],
        ahead: Duration,
    ) -> Operator {
        let clock: Arc<dyn Fn() -> jiff::Timestamp + Send + Sync> = Arc::new(move || {
            jiff::Timestamp::now() + jiff::SignedDuration::try_from(ahead).unwrap()
        });
        let namespaces = namespaces.iter().map(|ns| ns.to_string()).collect();
        start_operator_in(client, namespaces, clock).await
    }

    async fn start_operator_full(
        &self,
        client: Client,
        clock: Arc<dyn Fn() -> jiff::Timestamp + Send + Sync>,
    ) -> Operator {
        start_operator_in(client, vec![self.ns.clone()], clock).await
    }

    /// The NetbirdInstance once `pred` holds for it.
    pub async fn wait_instance(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&NetbirdInstance) -> bool,
    ) -> NetbirdInstance {
        let api = self.instances();
        let last = std::sync::Mutex::new(None::<NetbirdInstance>);
        let start = Instant::now();
        loop {
            if let Ok(Some(n)) = api.get_opt(name).await {
                if pred(&n) {
                    return n;
                }
                *last.lock().unwrap() = Some(n);
            }
            if start.elapsed() > timeout {
                let status = last.lock().unwrap().as_ref().and_then(|n| n.status.clone());
                panic!(
                    "timed out after {timeout:?} waiting for {name} to be {what}; last status: {status:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the NetbirdInstance is gone.
    pub async fn wait_instance_gone(&self, name: &str) {
        self.wait_instance_gone_within(name, Duration::from_secs(30))
            .await
    }

    /// Waits until the NetbirdInstance is gone, at most `timeout`.
    pub async fn wait_instance_gone_within(&self, name: &str, timeout: Duration) {
        let api = self.instances();
        wait_for("the NetbirdInstance to be deleted", timeout, || {
            let api = api.clone();
            let name = name.to_string();
            async move { matches!(api.get_opt(&name).await, Ok(None)).then_some(()) }
        })
        .await;
    }

    /// Events recorded for objects in this namespace: (reason, note).
    pub async fn events(&self) -> Vec<(String, String)> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.ns);
        api.list(&Default::default())
            .await
            .map(|l| {
                l.items
                    .into_iter()
                    .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Runs the operator in-process with the test timeouts.
async fn start_operator_in(
    client: Client,
    namespaces: Vec<String>,
    clock: Arc<dyn Fn() -> jiff::Timestamp + Send + Sync>,
) -> Operator {
    start_operator_in_with(client, namespaces, clock, Settings::default().concurrency).await
}

impl TestEnv {
    /// Runs the operator in-process with this client's identity and at most `concurrency` passes
    /// at once.
    pub async fn start_operator_concurrency(&self, client: Client, concurrency: u16) -> Operator {
        start_operator_in_with(
            client,
            vec![self.ns.clone()],
            Arc::new(jiff::Timestamp::now),
            concurrency,
        )
        .await
    }
}

async fn start_operator_in_with(
    client: Client,
    namespaces: Vec<String>,
    clock: Arc<dyn Fn() -> jiff::Timestamp + Send + Sync>,
    concurrency: u16,
) -> Operator {
    capture_logs();
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::default());
    let settings = Settings {
        namespaces,
        concurrency,
        max_backoff: Duration::from_secs(5),
        // the finalizer lets go after 10 s here (15 min by default)
        finalizer_timeout: Duration::from_secs(10),
        shutdown_timeout: Duration::from_secs(5),
        // a look at a replaced token's use every 5 s at most (a minute by default)
        previous_use_interval: Duration::from_secs(5),
        netbird: netbird_operator::netbird::ClientOptions {
            request_timeout: Duration::from_secs(3),
            ..Default::default()
        },
        ..Settings::default()
    };
    let mut ctx = Context::new(client, metrics.clone(), settings, shutdown.clone());
    ctx.clock = clock;
    let ctx = Arc::new(ctx);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(controller::run(ctx.clone(), Arc::default(), move || {
        let _ = tx.send(());
    }));
    tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .expect("watches sync")
        .expect("synced");
    Operator {
        shutdown,
        task: Some(task),
        metrics,
    }
}

/// The operator running in-process.
pub struct Operator {
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    pub metrics: Arc<Metrics>,
}

impl Operator {
    pub fn setup_calls(&self) -> u64 {
        self.metrics.setup_calls.get()
    }

    /// Stops as a crash would: no graceful shutdown.
    pub fn kill(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Stops gracefully.
    pub async fn stop(self) {
        self.stop_within(Duration::from_secs(10)).await;
    }

    /// Stops gracefully; whether the operator ended within `limit`.
    pub async fn stop_within(mut self, limit: Duration) -> bool {
        self.shutdown.cancel();
        match self.task.take() {
            Some(t) => tokio::time::timeout(limit, t).await.is_ok(),
            None => true,
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn rand_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    format!("{:06x}", h.finish() & 0xff_ffff)
}

/// Condition (status, reason, message) of a type.
pub fn condition(n: &NetbirdInstance, ty: &str) -> Option<(String, String, String)> {
    n.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == ty)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Whether the Ready condition has this status and reason.
pub fn ready_is(n: &NetbirdInstance, status: &str, reason: &str) -> bool {
    condition(n, "Ready").is_some_and(|(s, r, _)| s == status && r == reason)
}

/// The names of the Ready instances, kept by a watch: a run waits on it instead of polling, so the
/// measuring does not load the apiserver it measures (a list of a thousand instances every 200 ms
/// did). Used by the benchmark and the fleet on the node.
pub fn ready_names(
    api: kube::Api<NetbirdInstance>,
) -> tokio::sync::watch::Receiver<std::collections::HashSet<String>> {
    use futures::StreamExt;
    use kube::ResourceExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let (tx, rx) = tokio::sync::watch::channel(std::collections::HashSet::new());
    tokio::spawn(async move {
        let mut events = std::pin::pin!(
            watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects()
        );
        while let Some(Ok(nbi)) = events.next().await {
            let name = nbi.name_any();
            let ready = ready_is(&nbi, "True", "Bootstrapped");
            tx.send_if_modified(|names| {
                if ready {
                    names.insert(name)
                } else {
                    names.remove(&name)
                }
            });
        }
    });
    rx
}

/// A real NetBird combined server with its data in a temp dir; stopped when dropped (and by the
/// watchdog when the test process ends).
pub struct NetbirdServer {
    pub url: String,
    /// The server's own Prometheus endpoint (requests and responses by endpoint and status).
    pub metrics_url: String,
    dir: PathBuf,
    log: PathBuf,
    watchdog_pid: u32,
}

impl NetbirdServer {
    pub async fn start() -> Option<NetbirdServer> {
        Self::start_with_env(&[]).await
    }

    /// Starts the server with extra environment (for example its API rate limiter).
    pub async fn start_with_env(extra: &[(&str, &str)]) -> Option<NetbirdServer> {
        Self::start_on("127.0.0.1", extra).await
    }

    /// Starts the server listening on `host` (a loopback address, or an address of an interface a
    /// test created, such as the node's veth: see `node`).
    pub async fn start_on(host: &str, extra: &[(&str, &str)]) -> Option<NetbirdServer> {
        let tools = tools()?;
        // A server exits at once when TCP 33073 is taken (the previous test's server may still be
        // stopping): wait for the port, and try again with new ports when a start dies early.
        let mut logs = String::new();
        for attempt in 1..=3 {
            wait_for_management_port().await;
            match Self::start_once(&tools.netbird_bin, host, extra).await {
                Ok(server) => return Some(server),
                Err(log) => {
                    eprintln!("netbird-server start {attempt} of 3 failed; its log:\n{log}");
                    logs.push_str(&log);
                }
            }
        }
        panic!("netbird-server did not start in 3 attempts:\n{logs}");
    }

    /// One start: the server answering GET /api/instance, or the server's log when it exited
    /// early or did not answer within 60 s.
    async fn start_once(
        bin: &Path,
        host: &str,
        extra: &[(&str, &str)],
    ) -> Result<NetbirdServer, String> {
        let port = free_port();
        let metrics = free_port();
        let dir = tempfile::Builder::new()
            .prefix("nbop-netbird-")
            .tempdir()
            .expect("tempdir")
            .keep();
        // the log lives beside the directory (the watchdog removes the directory when the server
        // ends, and the log is what tells why it ended)
        let log = dir.with_extension("log");
        std::fs::create_dir_all(dir.join("data")).expect("data dir");
        let config = format!(
            r#"server:
  listenAddress: "{host}:{port}"
  exposedAddress: "http://{host}:{port}"
  authSecret: "nbop-test-auth-secret-0123456789"
  dataDir: "{data}"
  disableAnonymousMetrics: true
  disableGeoliteUpdate: true
  healthcheckAddress: "127.0.0.1:{health}"
  metricsPort: {metrics}
  stuns:
    - uri: "stun:127.0.0.1:3478"
  auth:
    issuer: "http://{host}:{port}/oauth2"
  store:
    engine: "sqlite"
    encryptionKey: "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
"#,
            data = dir.join("data").display(),
            health = free_port(),
        );
        std::fs::write(dir.join("config.yaml"), config).expect("config");
        let mut env: Vec<(&str, String)> = extra.iter().map(|(k, v)| (*k, v.to_string())).collect();
        env.extend([
            ("NB_SETUP_PAT_ENABLED", "true".into()),
            ("NB_DISABLE_GEOLOCATION", "true".into()),
            // the server's own release check goes to an unreachable loopback proxy: no
            // traffic leaves the machine, and the version answer comes at once
            ("HTTPS_PROXY", "http://127.0.0.1:9".into()),
            ("HTTP_PROXY", "http://127.0.0.1:9".into()),
            ("NO_PROXY", format!("127.0.0.1,localhost,{host}")),
        ]);
        let watchdog_pid = spawn_watched(
            &bin.join("netbird-server"),
            &[
                "--config".into(),
                dir.join("config.yaml").display().to_string(),
            ],
            &env,
            &log,
            Some(&dir),
        );
        let url = format!("http://{host}:{port}");
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let probe = format!("{url}/api/instance");
        let start = Instant::now();
        loop {
            if let Ok(r) = client.get(&probe).send().await
                && r.status().is_success()
            {
                break;
            }
            // the watchdog removes the directory once the server has ended
            let ended = !dir.exists();
            if ended || start.elapsed() > Duration::from_secs(60) {
                let _ = Command::new("kill").arg(watchdog_pid.to_string()).status();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let _ = std::fs::remove_file(&log);
                let why = if ended {
                    "exited before answering"
                } else {
                    "did not answer within 60 s"
                };
                return Err(format!("({why})\n{text}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(NetbirdServer {
            url,
            metrics_url: format!("http://127.0.0.1:{metrics}/metrics"),
            dir,
            log,
            watchdog_pid,
        })
    }
}

/// Waits (up to 30 s) until TCP 33073, which every NetBird server binds on all addresses, is free.
async fn wait_for_management_port() {
    let start = Instant::now();
    while TcpListener::bind("0.0.0.0:33073").is_err() && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for NetbirdServer {
    fn drop(&mut self) {
        // ending the watchdog stops the server and removes its directory; wait for that (up to
        // 10 s), so that the next test's server finds TCP 33073 free
        let _ = Command::new("kill")
            .arg(self.watchdog_pid.to_string())
            .status();
        let start = Instant::now();
        while self.dir.exists() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A lock for tests that start a real NetBird server (it always binds TCP 33073): held across the
/// test binaries of this machine (a file lock), not only within one.
pub struct NetbirdLock {
    _in_process: tokio::sync::MutexGuard<'static, ()>,
    _machine: std::fs::File,
}

/// Takes the [`NetbirdLock`].
pub async fn netbird_lock() -> NetbirdLock {
    static LOCK: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    let in_process = LOCK
        .get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await;
    let path = std::env::temp_dir().join("nbop-netbird-server.lock");
    let machine = tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .expect("lock file");
        f.lock().expect("lock");
        f
    })
    .await
    .expect("lock task");
    NetbirdLock {
        _in_process: in_process,
        _machine: machine,
    }
}

/// The kstatus status of an object (sigs.k8s.io/cli-utils rules, as Flux and Helm 4 compute it):
/// Terminating, InProgress, Failed or Current.
pub fn kstatus(n: &NetbirdInstance) -> &'static str {
    if n.metadata.deletion_timestamp.is_some() {
        return "Terminating";
    }
    let observed = n.status.as_ref().and_then(|s| s.observed_generation);
    if observed != n.metadata.generation {
        return "InProgress";
    }
    let is_true = |ty: &str| condition(n, ty).is_some_and(|(s, _, _)| s == "True");
    if is_true("Reconciling") {
        return "InProgress";
    }
    if is_true("Stalled") {
        return "Failed";
    }
    match condition(n, "Ready").map(|(s, _, _)| s) {
        Some(s) if s == "True" => "Current",
        Some(_) => "InProgress",
        None => "Current",
    }
}

/// Everything the operator logged in this test process, at the most verbose level (capped at 64 MiB),
/// for the secret-hygiene checks. With NBOP_TEST_LOG set, logs also go to stderr at that level.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&log_buffer().lock().unwrap()).into_owned()
}

fn log_buffer() -> &'static std::sync::Mutex<Vec<u8>> {
    static BUF: OnceLock<std::sync::Mutex<Vec<u8>>> = OnceLock::new();
    BUF.get_or_init(Default::default)
}

struct BufferWriter;

impl std::io::Write for BufferWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut buf = log_buffer().lock().unwrap();
        if buf.len() + data.len() <= 64 * 1024 * 1024 {
            buf.extend_from_slice(data);
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the test subscriber once: trace level for the operator into the buffer.
pub fn capture_logs() {
    use tracing_subscriber::prelude::*;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let capture = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(|| BufferWriter)
            .with_filter(tracing_subscriber::EnvFilter::new(
                "trace,hyper=debug,h2=info,tower=debug,rustls=info",
            ));
        let stderr = std::env::var("NBOP_TEST_LOG").ok().map(|level| {
            tracing_subscriber::fmt::layer().with_filter(tracing_subscriber::EnvFilter::new(level))
        });
        let _ = tracing_subscriber::registry()
            .with(capture)
            .with(stderr)
            .try_init();
    });
}
