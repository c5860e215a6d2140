//! The chart's alerts with the real tools: `helm template` renders the PrometheusRule, its `spec`
//! becomes a Prometheus rule file, `promtool check rules` validates it and `promtool test rules`
//! runs tests/alerts/alerts-test.yaml against it (every alert with a case that fires and one that
//! does not). A missing tool fails; NBOP_SKIP_E2E=1 skips loudly.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/netbird-operator");
/// The release and namespace the unit tests in tests/alerts/alerts-test.yaml expect.
const RELEASE: &str = "nbop";
const NAMESPACE: &str = "ops";

fn run(program: &Path, args: &[&str], home: &Path) -> Output {
    Command::new(program)
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn helm_template(helm: &Path, home: &Path, sets: &[&str]) -> Output {
    let mut args = vec!["template", RELEASE, CHART, "--namespace", NAMESPACE];
    for s in sets {
        args.extend(["--set", s]);
    }
    run(helm, &args, home)
}

fn rules_of(rendered: &str) -> Vec<Value> {
    let rule: Value = serde_norway::from_str(rendered).expect("the PrometheusRule is YAML");
    assert_eq!(rule["kind"], "PrometheusRule");
    rule["spec"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").clone())
        .collect()
}

#[test]
fn chart_alerts_pass_promtool_check_and_unit_tests() {
    let Some(tools) = support::tools() else {
        return;
    };
    let helm = tools.helm_bin.join("helm");
    let promtool = tools.promtool_bin.join("promtool");
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("helm");

    // off by default: the default render (and so deploy/netbird-operator.yaml) has no PrometheusRule
    let default = ok(helm_template(&helm, &home, &[]), "helm template");
    assert!(!default.contains("PrometheusRule"));

    let rendered = ok(
        helm_template(
            &helm,
            &home,
            &[
                "metrics.prometheusRule.enabled=true",
                "metrics.prometheusRule.labels.release=kube-prometheus-stack",
            ],
        ),
        "helm template with the PrometheusRule",
    );
    let doc = rendered
        .split("\n---")
        .find(|d| d.contains("kind: PrometheusRule"))
        .expect("a PrometheusRule is rendered");
    assert!(doc.contains("release: kube-prometheus-stack"), "{doc}");
    let rule: Value = serde_norway::from_str(doc).expect("YAML");
    let rules_file = dir.path().join("rules.yaml");
    std::fs::write(
        &rules_file,
        serde_norway::to_string(&rule["spec"]).expect("rule file"),
    )
    .expect("write rules.yaml");
    let rules = rules_of(doc);

    // what an on-call person needs on every alert, and the runbook section it points at
    let readme = std::fs::read_to_string(format!("{ROOT}/README.md")).expect("README");
    let names: BTreeSet<String> = rules
        .iter()
        .map(|r| r["alert"].as_str().expect("alert name").to_string())
        .collect();
    assert_eq!(
        names,
        [
            "NetbirdInstanceNotReady",
            "NetbirdInstanceStalled",
            "NetbirdOperatorDown",
            "NetbirdOperatorReconcileErrors",
            "NetbirdPreviousTokenStillInUse",
            "NetbirdTokenExpiringSoon",
            "NetbirdUpdateAvailable",
        ]
        .map(String::from)
        .into(),
    );
    for r in &rules {
        let name = r["alert"].as_str().unwrap();
        let ann = &r["annotations"];
        assert!(
            ann["summary"].as_str().is_some_and(|s| !s.is_empty()),
            "{name}"
        );
        let description = ann["description"].as_str().expect("description");
        if !matches!(
            name,
            "NetbirdOperatorDown" | "NetbirdOperatorReconcileErrors"
        ) {
            assert!(
                description.contains("{{ $labels.namespace }}/{{ $labels.name }}"),
                "{name}: the description names the instance: {description}"
            );
        }
        let severity = r["labels"]["severity"].as_str().expect("severity");
        assert!(
            ["info", "warning", "critical"].contains(&severity),
            "{name}"
        );
        let url = ann["runbook_url"].as_str().expect("runbook_url");
        let anchor = url.rsplit_once('#').expect("an anchor").1;
        assert_eq!(anchor, name.to_lowercase(), "{name}");
        assert!(
            readme.contains(&format!("\n#### {name}\n")),
            "README has no runbook section for {name}"
        );
    }

    let check = ok(
        run(
            &promtool,
            &["check", "rules", rules_file.to_str().unwrap()],
            &home,
        ),
        "promtool check rules",
    );
    assert!(check.contains("SUCCESS: 7 rules found"), "{check}");

    // every alert has a case that fires and a case that does not
    let tests_file = format!("{ROOT}/tests/alerts/alerts-test.yaml");
    let tests: Value =
        serde_norway::from_str(&std::fs::read_to_string(&tests_file).expect("alerts-test.yaml"))
            .expect("YAML");
    let (mut fires, mut silent) = (BTreeSet::new(), BTreeSet::new());
    for case in tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
    {
        let name = case["alertname"].as_str().unwrap().to_string();
        match case["exp_alerts"].as_array().map(Vec::len) {
            Some(0) | None => silent.insert(name),
            Some(_) => fires.insert(name),
        };
    }
    assert_eq!(fires, names, "alerts without a firing case");
    assert_eq!(silent, names, "alerts without a not-firing case");

    std::fs::copy(&tests_file, dir.path().join("alerts-test.yaml")).expect("copy");
    let started = std::time::Instant::now();
    ok(
        run(
            &promtool,
            &[
                "test",
                "rules",
                dir.path().join("alerts-test.yaml").to_str().unwrap(),
            ],
            &home,
        ),
        "promtool test rules",
    );
    eprintln!("promtool test rules: {:?}", started.elapsed());
}

#[test]
fn chart_alert_values_are_checked_and_used() {
    let Some(tools) = support::tools() else {
        return;
    };
    let helm = tools.helm_bin.join("helm");
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("helm");
    // values.schema.json refuses unknown keys and malformed durations
    for bad in [
        "metrics.prometheusRule.bogus=1",
        "metrics.prometheusRule.for.bogus=1m",
        "metrics.prometheusRule.for.stalled=soon",
        "metrics.prometheusRule.tokenExpiryDays=0",
    ] {
        let out = helm_template(&helm, &home, &["metrics.prometheusRule.enabled=true", bad]);
        assert!(!out.status.success(), "helm accepted --set {bad}");
    }
    let rendered = ok(
        helm_template(
            &helm,
            &home,
            &[
                "metrics.prometheusRule.enabled=true",
                "metrics.prometheusRule.job=custom-job",
                "metrics.prometheusRule.tokenExpiryDays=3",
                "metrics.prometheusRule.for.operatorDown=2m",
                "metrics.prometheusRule.runbookURL=https://wiki.example.com/netbird",
            ],
        ),
        "helm template",
    );
    let doc = rendered
        .split("\n---")
        .find(|d| d.contains("kind: PrometheusRule"))
        .expect("a PrometheusRule");
    let rules = rules_of(doc);
    let by_name = |n: &str| {
        rules
            .iter()
            .find(|r| r["alert"] == n)
            .unwrap_or_else(|| panic!("{n}"))
            .clone()
    };
    let expiring = by_name("NetbirdTokenExpiringSoon");
    assert!(
        expiring["expr"].as_str().unwrap().contains("< 259200"),
        "{expiring}"
    );
    let down = by_name("NetbirdOperatorDown");
    assert_eq!(down["for"], "2m");
    assert!(
        down["expr"]
            .as_str()
            .unwrap()
            .contains(r#"absent(up{job="custom-job", namespace="ops"})"#),
        "{down}"
    );
    assert_eq!(
        down["annotations"]["runbook_url"],
        "https://wiki.example.com/netbird#netbirdoperatordown"
    );
    // the ServiceMonitor keeps the instances' own namespace label, which the alerts name
    let sm = ok(
        helm_template(&helm, &home, &["metrics.serviceMonitor.enabled=true"]),
        "helm template with a ServiceMonitor",
    );
    assert!(sm.contains("honorLabels: true"), "{sm}");
}
