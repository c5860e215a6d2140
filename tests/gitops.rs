//! The Argo CD health check, run by a real Lua interpreter on its test cases, the way Argo CD's own
//! `health_test.yaml` convention lays them out.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/gitops/argocd/bootstrap.netbird.io/NetbirdInstance"
);

/// A JSON value as a Lua table constructor.
fn lua(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!("{{{}}}", a.iter().map(lua).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => {
            format!(
                "{{{}}}",
                o.iter()
                    .map(|(k, v)| format!("[{k:?}] = {}", lua(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }
}

fn run_health(obj: &Value) -> (String, String) {
    let script = format!(
        "obj = {}\nlocal check = assert(loadfile({:?}))\nlocal hs = check()\nio.write(hs.status, \"\\n\", hs.message or \"\")\n",
        lua(obj),
        Path::new(DIR).join("health.lua").display().to_string()
    );
    let out = Command::new("lua5.4")
        .arg("-e")
        .arg(&script)
        .output()
        .expect("lua5.4 is needed: run tests/tools/install");
    assert!(
        out.status.success(),
        "lua failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text.split_once('\n').unwrap_or((&text, ""));
    (status.to_string(), message.to_string())
}

#[test]
fn argocd_health_check_passes_its_test_cases() {
    let tests: Value = serde_norway::from_str(
        &std::fs::read_to_string(Path::new(DIR).join("health_test.yaml")).unwrap(),
    )
    .unwrap();
    let cases = tests["tests"].as_array().unwrap();
    assert!(cases.len() >= 4);
    let mut seen = std::collections::BTreeSet::new();
    for case in cases {
        let path = Path::new(DIR).join(case["inputPath"].as_str().unwrap());
        let obj: Value = serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let (status, message) = run_health(&obj);
        assert_eq!(
            status,
            case["healthStatus"]["status"].as_str().unwrap(),
            "{}",
            path.display()
        );
        assert_eq!(
            message,
            case["healthStatus"]["message"].as_str().unwrap(),
            "{}",
            path.display()
        );
        seen.insert(status);
    }
    for s in ["Healthy", "Progressing", "Degraded", "Suspended"] {
        assert!(seen.contains(s), "no test case for {s}");
    }
}
