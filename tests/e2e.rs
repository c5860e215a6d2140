//! End-to-end: the operator in-process against a real kube-apiserver on real etcd, and against the
//! real NetBird server or the fake one (for faults).

mod support;

use std::time::Duration;

use kube::api::{DeleteParams, Patch, PatchParams};
use netbird_operator::crd::NetbirdInstance;
use netbird_operator::netbird::{ClientOptions, NetbirdClient};
use netbird_operator::token_secret::{ANN_SETUP_STARTED_AT, LABEL_MANAGED_BY, MANAGED_BY};
use secrecy::SecretString;
use serde_json::json;
use support::fake_netbird::{FakeNetbird, Fault};
use support::{NetbirdServer, TestEnv, condition, ready_is};

const PASSWORD: &str = "s3cret-Passw0rd";
const EMAIL: &str = "admin@example.com";
const T: Duration = Duration::from_secs(30);

fn spec(url: &str) -> serde_json::Value {
    json!({
        "managementURL": url,
        "allowInsecureHTTP": true,
        "credentialsSecretRef": {"name": "admin"},
        "versionCheck": {"interval": "1h"},
    })
}

async fn admin_secret(env: &TestEnv) {
    env.create_secret(
        "admin",
        &[("email", EMAIL), ("password", PASSWORD), ("name", "Admin")],
    )
    .await;
}

async fn token_of(env: &TestEnv, secret: &str) -> Option<String> {
    let s = env.secrets().get_opt(secret).await.ok()??;
    let v = s.data?.get("NB_API_KEY")?.0.clone();
    String::from_utf8(v).ok()
}

/// Nothing the run produced that a user can read holds the password or the token.
async fn assert_no_secret_leaks(
    env: &TestEnv,
    name: &str,
    op: &support::Operator,
    secrets: &[&str],
) {
    let nbi = env.instances().get(name).await.unwrap();
    let status = serde_json::to_string(&nbi.status).unwrap();
    let events = format!("{:?}", env.events().await);
    let metrics = op.metrics.encode();
    let logs = support::captured_logs();
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "logs are captured at the most verbose level"
    );
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        assert!(!status.contains(s), "status leaks a secret");
        assert!(!events.contains(s), "events leak a secret");
        assert!(!metrics.contains(s), "metrics leak a secret");
        assert!(!logs.contains(s), "logs leak a secret");
    }
}

#[tokio::test]
async fn real_netbird_bootstrap_adoption_and_second_instance() {
    let Some(env) = TestEnv::new("real-bootstrap").await else {
        return;
    };
    let _guard = support::netbird_lock().await;
    let Some(nb) = NetbirdServer::start().await else {
        return;
    };
    admin_secret(&env).await;
    let op = env.start_operator().await;
    env.create_instance("nb", spec(&nb.url))
        .await
        .expect("create");

    let nbi = env
        .wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    let status = nbi.status.clone().unwrap();
    assert_eq!(status.observed_generation, nbi.metadata.generation);
    assert_eq!(
        status.version.as_ref().unwrap().management.as_deref(),
        Some("0.77.1")
    );
    assert_eq!(
        condition(&nbi, "SetupComplete").unwrap().1,
        "SetupPerformed"
    );
    assert_eq!(condition(&nbi, "TokenAvailable").unwrap().1, "TokenStored");
    // the fingerprint of the credentials lives on the token Secret only, never in the status
    assert!(!serde_json::to_string(&status).unwrap().contains("argon2"));
    let fingerprint = env
        .secrets()
        .get("nb-token")
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap()[netbird_operator::token_secret::ANN_FINGERPRINT]
        .clone();
    assert!(fingerprint.starts_with("$argon2id$"));
    assert_eq!(op.setup_calls(), 1);

    // the stored token is one the real server accepts, and it belongs to the owner
    let token = token_of(&env, "nb-token").await.expect("token in Secret");
    let client = NetbirdClient::new(&nb.url, &ClientOptions::default()).unwrap();
    let me = client
        .current_user(&SecretString::from(token.clone()))
        .await
        .expect("real server accepts the token");
    assert_eq!(me.email, EMAIL);
    assert_eq!(me.role, "owner");
    let secret = env.secrets().get("nb-token").await.unwrap();
    let ann = secret.metadata.annotations.unwrap();
    assert!(!ann.contains_key(ANN_SETUP_STARTED_AT));
    assert!(ann.contains_key("bootstrap.netbird.io/expires-at"));
    assert_eq!(
        secret
            .metadata
            .labels
            .unwrap()
            .get(LABEL_MANAGED_BY)
            .map(String::as_str),
        Some(MANAGED_BY)
    );
    assert!(
        secret.metadata.owner_references.is_none(),
        "Retain: no owner reference"
    );
    let events = env.events().await;
    assert!(
        events.iter().any(|(r, _)| r == "SetupPerformed"),
        "{events:?}"
    );
    assert_no_secret_leaks(&env, "nb", &op, &[PASSWORD, &token]).await;

    // delete and re-create: the token is adopted, setup is not called again
    env.instances()
        .delete("nb", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_instance_gone("nb").await;
    env.create_instance("nb", spec(&nb.url))
        .await
        .expect("re-create");
    let nbi = env
        .wait_instance("nb", "Ready again", T, |n| {
            ready_is(n, "True", "Bootstrapped")
        })
        .await;
    assert_eq!(condition(&nbi, "SetupComplete").unwrap().0, "True");
    assert_eq!(op.setup_calls(), 1, "no second setup call");
    assert_eq!(
        token_of(&env, "nb-token").await.as_deref(),
        Some(token.as_str())
    );

    // a second instance on the same server: Stalled/SetupUnavailable, no loop
    env.create_instance("second", spec(&nb.url))
        .await
        .expect("create second");
    let second = env
        .wait_instance("second", "Stalled/SetupUnavailable", T, |n| {
            condition(n, "Stalled").is_some_and(|(s, r, _)| s == "True" && r == "SetupUnavailable")
        })
        .await;
    assert!(
        condition(&second, "Ready")
            .unwrap()
            .2
            .contains("NB_API_KEY"),
        "message says what to do"
    );
    // the pass that follows its own status write may still run; after that, silence
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reconciles = op.metrics.encode();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        op.metrics.encode(),
        reconciles,
        "a stalled instance does not loop"
    );
    assert_eq!(op.setup_calls(), 1);
}

#[tokio::test]
async fn credentials_secret_created_later_is_picked_up_at_once() {
    let Some(env) = TestEnv::new("late-credentials").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    let _op = env.start_operator().await;
    env.create_instance("nb", spec(&fake.url)).await.unwrap();
    let n = env
        .wait_instance("nb", "waiting for credentials", T, |n| {
            condition(n, "Reconciling").is_some_and(|(_, r, _)| r == "WaitingForCredentials")
        })
        .await;
    assert_eq!(condition(&n, "Ready").unwrap().0, "False");
    assert_eq!(support::kstatus(&n), "InProgress");
    assert_eq!(fake.calls("setup"), 0);
    let t0 = std::time::Instant::now();
    admin_secret(&env).await;
    env.wait_instance("nb", "Ready", Duration::from_secs(10), |n| {
        ready_is(n, "True", "Bootstrapped")
    })
    .await;
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "Ready follows the Secret, not a periodic resync"
    );
    assert_eq!(fake.calls("setup"), 1);
}

#[tokio::test]
async fn token_secret_is_claimed_before_setup_and_token_lost_is_reported() {
    let Some(env) = TestEnv::new("claim-before-setup").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    admin_secret(&env).await;
    fake.fault("setup", Fault::Delay(Duration::from_secs(2)));
    let op = env.start_operator().await;
    env.create_instance("nb", spec(&fake.url)).await.unwrap();
    // while setup is in flight, the Secret exists and carries setup-started-at
    support::wait_for("the setup call", T, || async {
        (fake.calls("setup") > 0).then_some(())
    })
    .await;
    let claimed = env
        .secrets()
        .get("nb-token")
        .await
        .expect("claimed before setup");
    assert!(
        claimed
            .metadata
            .annotations
            .unwrap()
            .contains_key(ANN_SETUP_STARTED_AT)
    );
    assert!(claimed.data.is_none_or(|d| d.is_empty()), "no token yet");
    // crash in flight: the server completes setup, the operator never sees the answer
    op.kill();
    support::wait_for("setup to complete on the server", T, || async {
        (!fake.state().setup_required).then_some(())
    })
    .await;
    fake.clear_fault("setup");
    let op = env.start_operator().await;
    let n = env
        .wait_instance("nb", "Stalled/TokenLost", T, |n| {
            condition(n, "Stalled").is_some_and(|(s, r, _)| s == "True" && r == "TokenLost")
        })
        .await;
    assert!(
        condition(&n, "Ready")
            .unwrap()
            .2
            .contains("create a personal access token")
    );
    assert_eq!(fake.calls("setup"), 1, "never a second setup call");
    assert_eq!(op.setup_calls(), 0);

    // a person puts a token made by hand into the Secret: adopted
    let user = fake.state().users.keys().next().cloned().unwrap();
    let hand_made = fake.state().mint(&user);
    let patch = json!({"stringData": {"NB_API_KEY": hand_made}});
    env.secrets()
        .patch("nb-token", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let n = env
        .wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    assert_eq!(condition(&n, "TokenAvailable").unwrap().1, "TokenAdopted");
}

/// Each failure mode of the NetBird API ends in its condition, with an Event, and no second setup.
#[tokio::test]
async fn failure_modes_end_in_specific_conditions() {
    let Some(env) = TestEnv::new("failure-modes").await else {
        return;
    };
    admin_secret(&env).await;
    let op = env.start_operator().await;

    struct Case {
        name: &'static str,
        prepare: fn(&FakeNetbird),
        condition: &'static str,
        reason: &'static str,
        message: &'static str,
    }
    let cases = [
        Case {
            name: "invalid",
            prepare: |f| f.fault("setup", Fault::Status(422, "invalid email format")),
            condition: "Stalled",
            reason: "CredentialsRejected",
            message: "invalid email format",
        },
        Case {
            name: "taken",
            prepare: |f| f.state().setup_required = false,
            condition: "Stalled",
            reason: "SetupUnavailable",
            message: "already set up",
        },
        Case {
            name: "raced",
            prepare: |f| f.fault("setup", Fault::Status(412, "setup already completed")),
            condition: "Stalled",
            reason: "SetupUnavailable",
            message: "someone else",
        },
        Case {
            name: "no-pat",
            prepare: |f| f.state().pat_enabled = false,
            condition: "Stalled",
            reason: "TokenNotIssued",
            message: "NB_SETUP_PAT_ENABLED",
        },
        Case {
            name: "server-error",
            prepare: |f| f.fault("setup", Fault::Status(500, "internal server error")),
            condition: "Reconciling",
            reason: "ManagementUnreachable",
            message: "500",
        },
        Case {
            name: "non-json",
            prepare: |f| f.fault("instance", Fault::NonJson(502)),
            condition: "Reconciling",
            reason: "ManagementUnreachable",
            message: "502",
        },
        Case {
            name: "bad-request",
            prepare: |f| f.fault("setup", Fault::Status(400, "invalid request body")),
            condition: "Stalled",
            reason: "CredentialsRejected",
            message: "invalid request body",
        },
        Case {
            name: "redirect",
            prepare: |f| f.fault("instance", Fault::Redirect("https://elsewhere.example/")),
            condition: "Stalled",
            reason: "InvalidSpec",
            message: "redirect",
        },
        Case {
            name: "rate-limited",
            prepare: |f| f.fault("instance", Fault::Status(429, "too many requests")),
            condition: "Reconciling",
            reason: "ManagementUnreachable",
            message: "429",
        },
        Case {
            name: "slow",
            prepare: |f| f.fault("instance", Fault::Hang),
            condition: "Reconciling",
            reason: "ManagementUnreachable",
            message: "timed out",
        },
    ];
    // nothing listens on this port: connection refused
    env.create_instance(
        "refused",
        spec(&format!("http://127.0.0.1:{}", support::free_port())),
    )
    .await
    .unwrap();
    let mut fakes = Vec::new();
    for c in &cases {
        let fake = FakeNetbird::start().await;
        (c.prepare)(&fake);
        env.create_instance(c.name, spec(&fake.url)).await.unwrap();
        fakes.push(fake);
    }
    for (c, fake) in cases.iter().zip(&fakes) {
        let n = env
            .wait_instance(c.name, &format!("{}/{}", c.condition, c.reason), T, |n| {
                condition(n, c.condition).is_some_and(|(s, r, _)| s == "True" && r == c.reason)
            })
            .await;
        let (_, ready_reason, message) = condition(&n, "Ready").unwrap();
        assert_eq!(ready_reason, c.reason, "{}", c.name);
        assert!(message.contains(c.message), "{}: {message}", c.name);
        if c.condition == "Stalled" {
            assert!(
                fake.calls("setup") <= 1,
                "{}: setup called {} times",
                c.name,
                fake.calls("setup")
            );
        }
    }
    let n = env
        .wait_instance("refused", "ManagementUnreachable", T, |n| {
            condition(n, "Reconciling").is_some_and(|(_, r, _)| r == "ManagementUnreachable")
        })
        .await;
    assert!(
        condition(&n, "Ready").unwrap().2.contains("refused"),
        "{:?}",
        condition(&n, "Ready")
    );
    // retrying cases back off: a few calls in some seconds, not a hot loop
    let before = fakes[4].calls("setup");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = fakes[4].calls("setup");
    assert!(
        after - before <= 3,
        "500 on setup retried {} times in 4 s",
        after - before
    );
    let events = env.events().await;
    for reason in [
        "CredentialsRejected",
        "SetupUnavailable",
        "TokenNotIssued",
        "ManagementUnreachable",
        "InvalidSpec",
    ] {
        assert!(
            events.iter().any(|(r, _)| r == reason),
            "no Event {reason}: {events:?}"
        );
    }
    assert_no_secret_leaks(&env, "invalid", &op, &[PASSWORD]).await;
}

#[tokio::test]
async fn bad_inputs_stall_with_a_reason_before_any_call() {
    let Some(env) = TestEnv::new("bad-inputs").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    let _op = env.start_operator().await;
    env.create_secret("short", &[("email", EMAIL), ("password", "short")])
        .await;
    env.create_secret("nokey", &[("email", EMAIL)]).await;
    env.create_secret(
        "bademail",
        &[("email", "not-an-email"), ("password", PASSWORD)],
    )
    .await;
    env.create_secret("nb3-token", &[("NB_API_KEY", "mine")])
        .await; // someone else's Secret
    env.create_secret("good", &[("email", EMAIL), ("password", PASSWORD)])
        .await;
    let with = |name: &str| {
        let mut s = spec(&fake.url);
        s["credentialsSecretRef"]["name"] = json!(name);
        s
    };
    env.create_instance("nb0", with("short")).await.unwrap();
    env.create_instance("nb1", with("nokey")).await.unwrap();
    env.create_instance("nb2", with("bademail")).await.unwrap();
    env.create_instance("nb3", with("good")).await.unwrap();
    for (name, reason, text) in [
        ("nb0", "InvalidSpec", "is shorter than 8 bytes"),
        ("nb1", "InvalidSpec", "has no key \"password\""),
        ("nb2", "InvalidSpec", "not a valid email"),
        ("nb3", "SecretConflict", "not managed by this operator"),
    ] {
        let n = env
            .wait_instance(name, reason, T, |n| {
                condition(n, "Stalled").is_some_and(|(_, r, _)| r == reason)
            })
            .await;
        assert!(
            condition(&n, "Ready").unwrap().2.contains(text),
            "{name}: {:?}",
            condition(&n, "Ready")
        );
    }
    assert_eq!(fake.calls("setup"), 0);
    let foreign = env.secrets().get("nb3-token").await.unwrap();
    assert_eq!(
        foreign.data.unwrap().get("NB_API_KEY").unwrap().0,
        b"mine",
        "a foreign Secret is untouched"
    );
}

#[tokio::test]
async fn rejected_token_is_reported() {
    let Some(env) = TestEnv::new("rejected-token").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    admin_secret(&env).await;
    let _op = env.start_operator().await;
    env.create_instance("nb", spec(&fake.url)).await.unwrap();
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    // the token is deleted on the server, then the operator looks again (a spec change)
    fake.state().tokens.clear();
    let patch = json!({"spec": {"versionCheck": {"interval": "2h"}}});
    env.instances()
        .patch("nb", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let n = env
        .wait_instance("nb", "Stalled/TokenRejected", T, |n| {
            condition(n, "Stalled").is_some_and(|(_, r, _)| r == "TokenRejected")
        })
        .await;
    assert!(condition(&n, "Ready").unwrap().2.contains("adopts it"));
    assert_eq!(fake.calls("setup"), 1);
}

#[tokio::test]
async fn quiet_when_nothing_changes() {
    let Some(env) = TestEnv::new("quiet").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    admin_secret(&env).await;
    let _op = env.start_operator().await;
    env.create_instance("nb", spec(&fake.url)).await.unwrap();
    let n = env
        .wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rv = env
        .instances()
        .get("nb")
        .await
        .unwrap()
        .metadata
        .resource_version;
    let calls: u32 = fake.state().calls.values().sum();
    // an unrelated change to a referenced Secret triggers a pass that changes nothing
    let patch = json!({"metadata": {"labels": {"touched": "yes"}}});
    env.secrets()
        .patch("admin", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = env.instances().get("nb").await.unwrap();
    assert_eq!(
        after.metadata.resource_version, rv,
        "no status write when nothing changed"
    );
    assert_eq!(
        fake.state().calls.values().sum::<u32>(),
        calls,
        "no NetBird call when nothing changed"
    );
    assert_eq!(
        after.status,
        env.instances().get("nb").await.unwrap().status
    );
    let _ = n;
}

#[tokio::test]
async fn crd_validation_refuses_bad_specs_at_admission() {
    let Some(env) = TestEnv::new("crd-validation").await else {
        return;
    };
    let base = spec("https://nb.example.com");
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            json!({"managementURL": "http://nb.example.com"}),
            "allowInsecureHTTP",
        ),
        (
            json!({"managementURL": "ftp://nb.example.com"}),
            "must start with https://",
        ),
        (
            json!({"managementURL": "https://nb.example.com/?x=1"}),
            "query",
        ),
        (
            json!({"managementURL": "https://nb.example.com/#frag"}),
            "fragment",
        ),
        (
            json!({"managementURL": "https://user:pw@nb.example.com"}),
            "user:password@",
        ),
        (json!({"managementURL": ""}), "managementURL"),
        (json!({"token": {"expiresInDays": 0}}), "expiresInDays"),
        (json!({"token": {"expiresInDays": 366}}), "expiresInDays"),
        (
            json!({"token": {"deletionPolicy": "Sometimes"}}),
            "deletionPolicy",
        ),
        (json!({"token": {"secretName": "Not_Valid"}}), "secretName"),
        (
            json!({"token": {"secretLabels": {"app.kubernetes.io/managed-by": "me"}}}),
            "secretLabels",
        ),
        (json!({"versionCheck": {"interval": "30s"}}), "at least 1m"),
        (json!({"versionCheck": {"interval": "soon"}}), "interval"),
        (
            json!({"credentialsSecretRef": {"name": ""}}),
            "credentialsSecretRef.name",
        ),
    ];
    for (i, (overlay, want)) in cases.iter().enumerate() {
        let mut s = base.clone();
        s["allowInsecureHTTP"] = json!(false);
        for (k, v) in overlay.as_object().unwrap() {
            if v.is_object() && s.get(k).is_some_and(|x| x.is_object()) {
                for (k2, v2) in v.as_object().unwrap() {
                    s[k][k2] = v2.clone();
                }
            } else {
                s[k] = v.clone();
            }
        }
        match env.create_instance(&format!("bad{i}"), s).await {
            Ok(_) => panic!("case {i} ({want}) was accepted"),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "case {i}");
                assert!(
                    status.message.contains(want),
                    "case {i}: {:?} should mention {want:?}",
                    status.message
                );
            }
            Err(e) => panic!("case {i}: {e}"),
        }
    }
    // and a good one passes, with defaults filled in by the schema
    let created: NetbirdInstance = env.create_instance("good", base).await.unwrap();
    assert_eq!(created.spec.token.secret_key, "NB_API_KEY");
    assert_eq!(created.spec.token.expires_in_days, 30);
}

/// The operator as a user whose RBAC allows these verbs on Secrets, and what it needs on its own
/// resources and Events.
async fn operator_with_secret_verbs(env: &TestEnv, verbs: &[&str]) -> support::Operator {
    env.grant_role(
        &format!("operator-secrets-{}", verbs.join("-")),
        "limited",
        json!([
            {"apiGroups": [""], "resources": ["secrets"], "verbs": verbs},
            {"apiGroups": ["bootstrap.netbird.io"], "resources": ["netbirdinstances"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["bootstrap.netbird.io"], "resources": ["netbirdinstances/status"], "verbs": ["patch", "update"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        ]),
    )
    .await;
    let limited = env.cp.client_from(&env.cp.limited_kubeconfig).await;
    env.start_operator_with(limited).await
}

/// A first pass that fails at once (here: its Secrets may be listed but not read) still writes the
/// initial status, so kstatus clients do not take the instance for done.
#[tokio::test]
async fn a_first_pass_that_fails_leaves_the_initial_status() {
    let Some(env) = TestEnv::new("rbac-read").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    admin_secret(&env).await;
    let _op = operator_with_secret_verbs(&env, &["list", "watch"]).await;
    env.create_instance("nb", spec(&fake.url)).await.unwrap();
    let n = env
        .wait_instance("nb", "Ready Unknown", T, |n| {
            ready_is(n, "Unknown", "Progressing")
        })
        .await;
    let observed = n.status.as_ref().and_then(|s| s.observed_generation);
    assert_eq!(observed, n.metadata.generation);
    // and why the operator is stuck, on the instance
    let note = support::wait_for("a ReadSecretFailed Event", T, || async {
        env.events()
            .await
            .into_iter()
            .find(|(reason, _)| reason == "ReadSecretFailed")
            .map(|(_, note)| note)
    })
    .await;
    assert!(
        note.contains("admin") && note.contains("forbidden"),
        "{note}"
    );
    assert_eq!(fake.calls("setup"), 0);
}

/// Under RBAC without permission to create Secrets, the operator finds out when it claims the token
/// Secret, before the one-time setup call, and says so.
#[tokio::test]
async fn a_secret_it_cannot_write_is_found_before_setup() {
    let Some(env) = TestEnv::new("rbac-claim").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    admin_secret(&env).await;
    let _op = operator_with_secret_verbs(&env, &["get", "list", "watch"]).await;
    env.create_instance("nb", spec(&fake.url)).await.unwrap();
    let n = env
        .wait_instance("nb", "Reconciling/Progressing", T, |n| {
            condition(n, "Reconciling")
                .is_some_and(|(_, r, m)| r == "Progressing" && m.contains("claim"))
        })
        .await;
    assert!(
        condition(&n, "Ready").unwrap().2.contains("forbidden"),
        "{:?}",
        condition(&n, "Ready")
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        fake.calls("setup"),
        0,
        "setup is never called without a claimed Secret"
    );
    assert!(fake.calls("instance") >= 1);
}

/// Responses with this status code counted by the real server's own metrics endpoint.
async fn server_responses(nb: &NetbirdServer, code: u16) -> u64 {
    let text = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(&nb.metrics_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("management_http_response_counter_code_total{"))
        .filter(|l| l.contains(&format!("code=\"{code}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The real server's API rate limiter (NB_API_RATE_LIMITING_ENABLED, 6 requests a minute per token,
/// burst 1) answers the operator's token calls with 429: the operator backs off (bounded calls, as
/// the server counts them), says so in its condition, and finishes once the limiter lets it through.
/// (Before the retry gate, each failed check's status write woke a pass that called again at once:
/// 1,799 answers of 429 in 20 s.)
#[tokio::test]
async fn the_real_servers_rate_limiter_is_met_with_backoff() {
    let Some(env) = TestEnv::new("real-rate-limit").await else {
        return;
    };
    let _guard = support::netbird_lock().await;
    let Some(nb) = NetbirdServer::start_with_env(&[
        ("NB_API_RATE_LIMITING_ENABLED", "true"),
        ("NB_API_RATE_LIMITING_RPM", "6"),
        ("NB_API_RATE_LIMITING_BURST", "1"),
    ])
    .await
    else {
        return;
    };
    admin_secret(&env).await;
    let op = env.start_operator().await;
    env.create_instance("nb", spec(&nb.url)).await.unwrap();
    let limited = env
        .wait_instance("nb", "a condition naming the rate limit", T, |n| {
            n.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.message.contains("too many requests"))
            })
        })
        .await;
    eprintln!(
        "rate limited: {:?}",
        limited.status.as_ref().unwrap().conditions
    );
    let start = std::time::Instant::now();
    let n = env
        .wait_instance(
            "nb",
            "Ready with the version checked",
            Duration::from_secs(90),
            |n| {
                ready_is(n, "True", "Bootstrapped")
                    && n.status.as_ref().is_some_and(|s| s.version.is_some())
                    && condition(n, "TokenAvailable").is_some_and(|(_, r, _)| r == "TokenStored")
            },
        )
        .await;
    let refused = server_responses(&nb, 429).await;
    let ok = server_responses(&nb, 200).await;
    eprintln!(
        "rate limit: Ready {:.1} s after the first 429; the server answered 429 {refused} times and 200 {ok} times",
        start.elapsed().as_secs_f64()
    );
    assert!(refused >= 1, "the server's limiter answered 429");
    assert!(
        refused <= 2 + start.elapsed().as_secs() / 2,
        "bounded retries: {refused} refused calls in {:?}",
        start.elapsed()
    );
    assert_eq!(op.setup_calls(), 1);
    assert!(n.status.unwrap().version.unwrap().management.is_some());
    // once through, quiet: no call in the next 5 s
    let before = server_responses(&nb, 429).await + server_responses(&nb, 200).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        server_responses(&nb, 429).await + server_responses(&nb, 200).await,
        before,
        "no calls once Ready"
    );
}
