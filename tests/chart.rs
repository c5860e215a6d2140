//! The Helm chart and the plain manifests against the real control plane: lint, render into a
//! server-side dry run, install and upgrade (the CRD follows), and the operator running with the
//! chart's ServiceAccount token: enough to bootstrap, nothing more.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use serde_json::json;
use support::chart::{CHART, Release, ok, run};
use support::fake_netbird::FakeNetbird;
use support::{ControlPlane, TestEnv, condition, ready_is};

const CRD_NAME: &str = "netbirdinstances.bootstrap.netbird.io";

#[tokio::test]
async fn chart_lints_renders_and_passes_a_server_side_dry_run() {
    let Some(env) = TestEnv::new("chart-render").await else {
        return;
    };
    let cp = env.cp;
    ok(
        run(cp, &cp.helm, &["lint", CHART, "--strict"], None),
        "helm lint",
    );
    let value_sets: Vec<Vec<String>> = vec![
        vec![],
        vec!["replicaCount=2".into()],
        vec![format!("watchNamespace={}", env.ns)],
        vec![
            format!("watchNamespaces={{{}}}", env.ns),
            format!("watchNamespace={}", env.ns),
            "replicaCount=2".into(),
        ],
        vec![
            "networkPolicy.enabled=true".into(),
            "metrics.service.enabled=false".into(),
            "logFormat=text".into(),
        ],
        vec![
            "instance.enabled=true".into(),
            "instance.managementURL=https://nb.example.com".into(),
        ],
        vec![
            "crds.install=false".into(),
            "serviceAccount.create=false".into(),
            "serviceAccount.name=custom".into(),
        ],
    ];
    for set in value_sets {
        let mut args = vec!["template", "nbop", CHART, "--namespace", env.ns.as_str()];
        for s in &set {
            args.push("--set");
            args.push(s);
        }
        let rendered = ok(
            run(cp, &cp.helm, &args, None),
            &format!("helm template {set:?}"),
        );
        ok(
            run(
                cp,
                &cp.kubectl,
                &["apply", "--dry-run=server", "-n", &env.ns, "-f", "-"],
                Some(rendered.as_bytes()),
            ),
            &format!("kubectl apply --dry-run=server for {set:?}"),
        );
    }
    // the ServiceMonitor renders (its CRD is not in this cluster, so no dry run)
    let sm = ok(
        run(
            cp,
            &cp.helm,
            &[
                "template",
                "nbop",
                CHART,
                "--set",
                "metrics.serviceMonitor.enabled=true",
            ],
            None,
        ),
        "helm template with a ServiceMonitor",
    );
    assert!(sm.contains("kind: ServiceMonitor"));
    // values.schema.json refuses unknown keys at every level
    for bad in [
        "bogus=1",
        "image.bogus=1",
        "metrics.serviceMonitor.bogus=1",
        "instance.bogus=1",
        "logFormat=xml",
        "watchNamespaces={Not_A_Namespace}",
        "watchNamespaces={a,a}",
        "watchNamespace=Bad",
    ] {
        let out = run(
            cp,
            &cp.helm,
            &["template", "nbop", CHART, "--set", bad],
            None,
        );
        assert!(!out.status.success(), "helm accepted --set {bad}");
    }
    // restricted Pod Security by default
    let rendered = ok(
        run(cp, &cp.helm, &["template", "nbop", CHART], None),
        "helm template",
    );
    for needle in [
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "drop: [\"ALL\"]",
        "RuntimeDefault",
    ] {
        assert!(rendered.contains(needle), "missing {needle}");
    }
    let rbac = ok(
        run(
            cp,
            &cp.helm,
            &[
                "template",
                "nbop",
                CHART,
                "--set",
                "replicaCount=2",
                "--show-only",
                "templates/rbac.yaml",
            ],
            None,
        ),
        "helm template rbac",
    );
    assert!(!rbac.contains("\"*\""), "no wildcard in RBAC");
    let verbs: Vec<&str> = rbac
        .lines()
        .filter(|l| l.trim_start().starts_with("verbs:"))
        .collect();
    assert!(!verbs.is_empty());
    assert!(
        verbs.iter().all(|l| !l.contains("delete")),
        "the operator never deletes: {verbs:?}"
    );
    assert!(
        rbac.contains("leases"),
        "leader election RBAC with replicas > 1"
    );
}

#[tokio::test]
async fn plain_manifests_are_the_rendered_chart() {
    let Some(cp) = ControlPlane::shared() else {
        return;
    };
    let body = ok(
        run(
            cp,
            &cp.helm,
            &[
                "template",
                "netbird-operator",
                CHART,
                "--namespace",
                "netbird-operator",
                "--set",
                "crds.install=false",
            ],
            None,
        ),
        "helm template",
    );
    let expected = format!(
        "# Generated by `make manifests` from charts/netbird-operator; apply crds/ first.\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: netbird-operator\n{body}"
    );
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/netbird-operator.yaml"
    ))
    .unwrap();
    assert!(
        committed == expected,
        "deploy/netbird-operator.yaml is stale: run `make manifests`"
    );
    ok(
        run(
            cp,
            &cp.kubectl,
            &[
                "apply",
                "--dry-run=client",
                "-f",
                concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/netbird-operator.yaml"),
            ],
            None,
        ),
        "kubectl apply of the plain manifests",
    );
}

fn chart_with_old_crd(dir: &Path) -> PathBuf {
    let copy = dir.join("chart-old");
    ok(
        Command::new("cp")
            .args(["-r", CHART, copy.to_str().unwrap()])
            .output()
            .unwrap(),
        "copy chart",
    );
    let crds = copy.join("templates/crds.yaml");
    let text = std::fs::read_to_string(&crds).unwrap();
    let old = text.replace("Stop reconciling this instance", "OLD DESCRIPTION");
    assert_ne!(old, text);
    std::fs::write(&crds, old).unwrap();
    copy
}

fn suspend_description(crd: &CustomResourceDefinition) -> String {
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap();
    let spec = &schema.properties.as_ref().unwrap()["spec"];
    spec.properties.as_ref().unwrap()["suspend"]
        .description
        .clone()
        .unwrap_or_default()
}

#[tokio::test]
async fn install_upgrade_and_the_chart_rbac_is_enough_and_no_more() {
    let Some(env) = TestEnv::new("chart-install").await else {
        return;
    };
    let cp = env.cp;
    let tmp = tempfile::tempdir().unwrap();
    // The harness installed the CRD already, by server-side apply: as on a cluster that had the CRD
    // before the chart, clear its field managers and hand it to the release.
    ok(
        run(
            cp,
            &cp.kubectl,
            &[
                "patch",
                "crd",
                CRD_NAME,
                "--type=json",
                "-p",
                r#"[{"op":"replace","path":"/metadata/managedFields","value":[{}]}]"#,
            ],
            None,
        ),
        "clear the CRD's field managers",
    );
    for args in [
        vec![
            "label",
            "crd",
            CRD_NAME,
            "app.kubernetes.io/managed-by=Helm",
            "--overwrite",
        ],
        vec![
            "annotate",
            "crd",
            CRD_NAME,
            "meta.helm.sh/release-name=nbop",
            "--overwrite",
        ],
        vec![
            "annotate",
            "crd",
            CRD_NAME,
            &format!("meta.helm.sh/release-namespace={}", env.ns),
            "--overwrite",
        ],
    ] {
        ok(run(cp, &cp.kubectl, &args, None), "adopt CRD");
    }
    let old = chart_with_old_crd(tmp.path());
    let values = [
        "--namespace",
        env.ns.as_str(),
        "--set",
        &format!("watchNamespace={}", env.ns),
        // the CRD that was there before differs from the chart's: the chart's wins
        "--force-conflicts",
    ];
    let mut install = vec!["install", "nbop", old.to_str().unwrap()];
    install.extend(values);
    ok(run(cp, &cp.helm, &install, None), "helm install");
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    assert!(suspend_description(&crds.get(CRD_NAME).await.unwrap()).starts_with("OLD DESCRIPTION"));
    let mut upgrade = vec!["upgrade", "nbop", CHART];
    upgrade.extend(values);
    ok(run(cp, &cp.helm, &upgrade, None), "helm upgrade");
    let crd = crds.get(CRD_NAME).await.unwrap();
    assert!(
        suspend_description(&crd).starts_with("Stop reconciling"),
        "helm upgrade applied the CRD change"
    );
    assert_eq!(
        crd.metadata
            .annotations
            .unwrap()
            .get("helm.sh/resource-policy")
            .map(String::as_str),
        Some("keep")
    );

    // the operator with a token of the chart's ServiceAccount (TokenRequest API)
    let release = Release {
        name: "nbop".into(),
        namespace: env.ns.clone(),
        service_account: "nbop-netbird-operator".into(),
        rendered: String::new(),
    };
    let sa_client = release.client(cp).await;

    let fake = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let _op = env.start_operator_with(sa_client.clone()).await;
    env.create_instance(
        "nb",
        json!({"managementURL": fake.url, "allowInsecureHTTP": true, "credentialsSecretRef": {"name": "admin"}}),
    )
    .await
    .unwrap();
    let n = env
        .wait_instance("nb", "Ready", Duration::from_secs(30), |n| {
            ready_is(n, "True", "Bootstrapped")
        })
        .await;
    assert_eq!(condition(&n, "TokenAvailable").unwrap().1, "TokenStored");
    assert_eq!(support::kstatus(&n), "Current");

    // and nothing beyond its namespace: a Secret of another namespace is forbidden
    let Some(other) = TestEnv::new("chart-other").await else {
        return;
    };
    other.create_secret("elsewhere", &[("k", "v")]).await;
    let foreign: Api<Secret> = Api::namespaced(sa_client.clone(), &other.ns);
    match foreign.get("elsewhere").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("reading a Secret of another namespace was not forbidden: {other:?}"),
    }
    let all: Api<Secret> = Api::all(sa_client);
    assert!(
        matches!(all.list(&Default::default()).await, Err(kube::Error::Api(s)) if s.code == 403)
    );
}

/// `tokenSecret.refusedKeyPrefixes` reaches the operator as `REFUSED_SECRET_KEY_PREFIXES`.
#[tokio::test]
async fn refused_key_prefixes_become_the_operators_environment() {
    let Some(cp) = ControlPlane::shared() else {
        return;
    };
    let rendered = support::chart::template(
        cp,
        "nbop",
        "ops",
        &["tokenSecret.refusedKeyPrefixes={copier.example.com/,team.example.com/}"],
    );
    let release = Release {
        name: "nbop".into(),
        namespace: "ops".into(),
        service_account: "nbop-netbird-operator".into(),
        rendered,
    };
    assert_eq!(
        release
            .deployment_env("REFUSED_SECRET_KEY_PREFIXES")
            .as_deref(),
        Some("copier.example.com/,team.example.com/")
    );
    let defaults = support::chart::template(cp, "nbop", "ops", &[]);
    assert!(!defaults.contains("REFUSED_SECRET_KEY_PREFIXES"));
    let bad = run(
        cp,
        &cp.helm,
        &[
            "template",
            "nbop",
            CHART,
            "--set",
            "tokenSecret.refusedKeyPrefixes={a\\,b}",
        ],
        None,
    );
    assert!(!bad.status.success(), "a prefix with a comma was accepted");
}

/// `proxy.*` reaches the operator as `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY`; unset values
/// set nothing.
#[tokio::test]
async fn proxy_values_become_the_operators_environment() {
    let Some(cp) = ControlPlane::shared() else {
        return;
    };
    let rendered = support::chart::template(
        cp,
        "nbop",
        "ops",
        &[
            "proxy.httpsProxy=http://proxy.example.com:3128",
            "proxy.noProxy=.svc\\,10.0.0.0/8",
        ],
    );
    let release = Release {
        name: "nbop".into(),
        namespace: "ops".into(),
        service_account: "nbop-netbird-operator".into(),
        rendered,
    };
    assert_eq!(
        release.deployment_env("HTTPS_PROXY").as_deref(),
        Some("http://proxy.example.com:3128")
    );
    assert_eq!(
        release.deployment_env("NO_PROXY").as_deref(),
        Some(".svc,10.0.0.0/8")
    );
    assert_eq!(release.deployment_env("HTTP_PROXY"), None);
    let defaults = support::chart::template(cp, "nbop", "ops", &[]);
    assert!(!defaults.contains("_PROXY"));
    let bad = run(
        cp,
        &cp.helm,
        &[
            "template",
            "nbop",
            CHART,
            "--set",
            "proxy.httpsProxy=proxy:3128",
        ],
        None,
    );
    assert!(
        !bad.status.success(),
        "a proxy without a scheme was accepted"
    );
}
