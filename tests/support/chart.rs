//! The Helm chart as a user installs it: rendered by the real `helm template`, applied to the test
//! control plane with the real `kubectl`, and clients that hold a token of the chart's own
//! ServiceAccount (TokenRequest API), so the operator runs with the chart's RBAC and nothing else.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Client;
use kube::api::{Api, PostParams};

use super::ControlPlane;

/// The chart's directory.
pub const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/netbird-operator");

/// Runs helm or kubectl (`program`) with the admin kubeconfig and helm's directories under the
/// control plane's.
pub fn run(cp: &ControlPlane, program: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("KUBECONFIG", &cp.kubeconfig)
        .env("HELM_CACHE_HOME", cp.dir.join("helm/cache"))
        .env("HELM_CONFIG_HOME", cp.dir.join("helm/config"))
        .env("HELM_DATA_HOME", cp.dir.join("helm/data"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("wait")
}

/// The standard output of a command that must succeed.
pub fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `helm template <release> <chart> --namespace <namespace> --set <each of sets>`.
pub fn template(cp: &ControlPlane, release: &str, namespace: &str, sets: &[&str]) -> String {
    let mut args = vec!["template", release, CHART, "--namespace", namespace];
    for s in sets {
        args.extend(["--set", s]);
    }
    ok(
        run(cp, &cp.helm, &args, None),
        &format!("helm template {sets:?}"),
    )
}

/// A release of the chart applied to the control plane.
pub struct Release {
    pub name: String,
    /// The release namespace (where the ServiceAccount and the leader Lease live).
    pub namespace: String,
    pub service_account: String,
    /// What `helm template` rendered.
    pub rendered: String,
}

/// Renders the chart with `sets` (and `crds.install=false`: the harness installed the CRD) and
/// applies every object, as `helm template | kubectl apply -f -` does. The Deployment never runs
/// (no kubelet): tests run the operator with [`Release::client`] or [`Release::kubeconfig`].
pub fn apply(cp: &ControlPlane, release: &str, namespace: &str, sets: &[&str]) -> Release {
    let mut all = vec!["crds.install=false"];
    all.extend(sets);
    let rendered = template(cp, release, namespace, &all);
    ok(
        run(
            cp,
            &cp.kubectl,
            // every object names its namespace (the release's, or a watched one)
            &["apply", "-f", "-"],
            Some(rendered.as_bytes()),
        ),
        &format!("kubectl apply of the chart rendered with {sets:?}"),
    );
    let name = if release.contains("netbird-operator") {
        release.to_string()
    } else {
        format!("{release}-netbird-operator")
    };
    Release {
        name: release.into(),
        namespace: namespace.into(),
        service_account: name,
        rendered,
    }
}

impl Release {
    /// A token of the release's ServiceAccount from the TokenRequest API (one hour).
    pub async fn token(&self, admin: &Client) -> String {
        let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), &self.namespace);
        let tr = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        sas.create_token_request(&self.service_account, &PostParams::default(), &tr)
            .await
            .expect("token request")
            .status
            .expect("a token request status")
            .token
            .expect("a token")
    }

    /// A kubeconfig for the control plane with a token of the release's ServiceAccount.
    pub async fn kubeconfig(&self, cp: &ControlPlane) -> PathBuf {
        let token = self.token(&cp.client().await).await;
        let path = cp
            .dir
            .join(format!("kubeconfig-sa-{}-{}", self.namespace, self.name));
        let admin = std::fs::read_to_string(&cp.kubeconfig).unwrap();
        let user_start = admin.find("users:").unwrap();
        let ctx_start = admin.find("contexts:").unwrap();
        let sa_config = format!(
            "{}users:\n- name: admin\n  user:\n    token: {token}\n{}",
            &admin[..user_start],
            &admin[ctx_start..]
        );
        std::fs::write(&path, sa_config).unwrap();
        path
    }

    /// A client with the release's ServiceAccount identity.
    pub async fn client(&self, cp: &ControlPlane) -> Client {
        cp.client_from(&self.kubeconfig(cp).await).await
    }

    /// The value of an environment variable of the operator container in the rendered Deployment.
    pub fn deployment_env(&self, var: &str) -> Option<String> {
        for doc in serde_norway::Deserializer::from_str(&self.rendered) {
            let Ok(v) = <serde_json::Value as serde::Deserialize>::deserialize(doc) else {
                continue;
            };
            if v["kind"] != "Deployment" {
                continue;
            }
            let env = v["spec"]["template"]["spec"]["containers"][0]["env"].as_array()?;
            return env
                .iter()
                .find(|e| e["name"] == var)
                .and_then(|e| e["value"].as_str())
                .map(str::to_string);
        }
        None
    }
}
