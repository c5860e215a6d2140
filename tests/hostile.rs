//! Hostile input against the real apiserver: each bad spec is refused at admission, and each bad
//! Secret ends in a specific condition, with no panic, no setup call and nothing sent where it must
//! not go. The table in docs/reliability.md lists these cases.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::fake_netbird::FakeNetbird;
use support::{TestEnv, condition};

const T: Duration = Duration::from_secs(30);
const EMAIL: &str = "admin@example.com";
const PASSWORD: &str = "s3cret-Passw0rd";

fn merge(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// Specs the apiserver must refuse, with a word of the message it must give.
#[tokio::test]
async fn bad_specs_are_refused_at_admission() {
    let Some(env) = TestEnv::new("hostile-specs").await else {
        return;
    };
    let long_url = format!("https://{}.example.com", "a".repeat(2100));
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "url too long",
            json!({"managementURL": long_url}),
            "managementURL",
        ),
        (
            "url with credentials",
            json!({"managementURL": "https://admin:pw@127.0.0.1"}),
            "user:password@",
        ),
        (
            "url with fragment",
            json!({"managementURL": "https://127.0.0.1/#x"}),
            "fragment",
        ),
        (
            "url with query",
            json!({"managementURL": "https://127.0.0.1/?a=b"}),
            "query",
        ),
        (
            "javascript url",
            json!({"managementURL": "javascript:alert(1)"}),
            "https://",
        ),
        (
            "file url",
            json!({"managementURL": "file:///etc/passwd"}),
            "https://",
        ),
        ("relative url", json!({"managementURL": "/api"}), "https://"),
        (
            "http without opt-in",
            json!({"managementURL": "http://127.0.0.1"}),
            "allowInsecureHTTP",
        ),
        (
            "url not a string",
            json!({"managementURL": 42}),
            "managementURL",
        ),
        (
            "expiresInDays as string",
            json!({"token": {"expiresInDays": "30"}}),
            "expiresInDays",
        ),
        (
            "expiresInDays negative",
            json!({"token": {"expiresInDays": -1}}),
            "expiresInDays",
        ),
        (
            "secretKey with slash",
            json!({"token": {"secretKey": "a/b"}}),
            "secretKey",
        ),
        (
            "secretKey the operator keeps a replaced token under",
            json!({"token": {"secretKey": "previous-token"}}),
            "previous-token",
        ),
        (
            "secretName too long",
            json!({"token": {"secretName": "a".repeat(254)}}),
            "secretName",
        ),
        (
            "secretName with unicode",
            json!({"token": {"secretName": "tökén"}}),
            "secretName",
        ),
        (
            "interval negative",
            json!({"versionCheck": {"interval": "-1h"}}),
            "interval",
        ),
        (
            "interval absurd",
            json!({"versionCheck": {"interval": "1h".repeat(20)}}),
            "interval",
        ),
        (
            "credentials name with slash",
            json!({"credentialsSecretRef": {"name": "../x"}}),
            "credentialsSecretRef.name",
        ),
        (
            "credentials key with newline",
            json!({"credentialsSecretRef": {"passwordKey": "pass\nword"}}),
            "passwordKey",
        ),
        (
            "ca name empty",
            json!({"tls": {"caSecretRef": {"name": ""}}}),
            "caSecretRef.name",
        ),
        (
            "deletionPolicy unknown",
            json!({"token": {"deletionPolicy": "Shred"}}),
            "deletionPolicy",
        ),
        (
            "serviceUser empty",
            json!({"token": {"serviceUser": {"name": ""}}}),
            "serviceUser.name",
        ),
        (
            "own labels overridden",
            json!({"token": {"secretLabels": {"bootstrap.netbird.io/instance": "other"}}}),
            "secretLabels",
        ),
        // Secret copiers: whoever may edit the NetbirdInstance would have the token copied into a
        // namespace they read
        (
            "reflector annotation",
            json!({"token": {"secretAnnotations": {
                "reflector.v1.k8s.emberstack.com/reflection-allowed": "true",
                "reflector.v1.k8s.emberstack.com/reflection-auto-enabled": "true"}}}),
            "reflector.v1.k8s.emberstack.com/",
        ),
        (
            "replicator annotation",
            json!({"token": {"secretAnnotations": {
                "replicator.v1.mittwald.de/replicate-to": "attacker"}}}),
            "replicator.v1.mittwald.de/",
        ),
        (
            "kubed annotation",
            json!({"token": {"secretAnnotations": {"kubed.appscode.com/sync": ""}}}),
            "kubed.appscode.com/",
        ),
        (
            "copier label",
            json!({"token": {"secretLabels": {"kubed.appscode.com/sync": "true"}}}),
            "kubed.appscode.com/",
        ),
        // what the apiserver would refuse on the Secret, refused on the NetbirdInstance
        (
            "label value with spaces",
            json!({"token": {"secretLabels": {"team": "not a label value"}}}),
            "secretLabels",
        ),
        (
            "label value too long",
            json!({"token": {"secretLabels": {"team": "a".repeat(64)}}}),
            "secretLabels",
        ),
        (
            "label key with a space",
            json!({"token": {"secretLabels": {"my team": "net"}}}),
            "secretLabels",
        ),
        (
            "label key with two slashes",
            json!({"token": {"secretLabels": {"a/b/c": "net"}}}),
            "secretLabels",
        ),
        (
            "label key name too long",
            json!({"token": {"secretLabels": {format!("example.com/{}", "n".repeat(64)): "net"}}}),
            "secretLabels",
        ),
        (
            "annotation key with a space",
            json!({"token": {"secretAnnotations": {"my note": "x"}}}),
            "secretAnnotations",
        ),
        (
            "annotation key with an empty prefix",
            json!({"token": {"secretAnnotations": {"/note": "x"}}}),
            "secretAnnotations",
        ),
    ];
    let mut base =
        json!({"managementURL": "https://127.0.0.1", "credentialsSecretRef": {"name": "admin"}});
    base["allowInsecureHTTP"] = json!(false);
    for (i, (what, overlay, want)) in cases.iter().enumerate() {
        let mut spec = base.clone();
        merge(&mut spec, overlay);
        match env.create_instance(&format!("bad{i}"), spec).await {
            Ok(_) => panic!("{what}: accepted"),
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 422, "{what}: {s:?}");
                assert!(
                    s.message.contains(want),
                    "{what}: {:?} should mention {want:?}",
                    s.message
                );
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
    // a name over the limit is refused by the apiserver itself
    let long_name = "n".repeat(254);
    assert!(env.create_instance(&long_name, base.clone()).await.is_err());
    // what the rules let through
    let mut fine = base.clone();
    merge(
        &mut fine,
        &json!({"token": {
            "secretLabels": {"team": "net", "example.com/tier": "a.b_c-1", "empty": ""},
            "secretAnnotations": {"note": "any text at all: spaces, 'quotes', /slashes/",
                "Example.COM/Mixed": "x", "reflector.example.com/x": "not a copier"},
        }}),
    );
    env.create_instance("fine", fine)
        .await
        .expect("valid labels and annotations are accepted");
}

/// A Secret write the apiserver refuses as invalid (annotations over its 256 KiB total, which the
/// schema cannot add up) is Stalled/InvalidSpec with the apiserver's word, not a retry loop, and
/// setup is never called.
#[tokio::test]
async fn a_secret_the_apiserver_refuses_is_an_invalid_spec() {
    let Some(env) = TestEnv::new("secret-invalid").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    env.create_secret("admin", &[("email", EMAIL), ("password", PASSWORD)])
        .await;
    let op = env.start_operator().await;
    let big = "x".repeat(140 * 1024);
    let spec = json!({"managementURL": fake.url, "allowInsecureHTTP": true,
        "credentialsSecretRef": {"name": "admin"},
        "token": {"secretAnnotations": {"one": big, "two": big}}});
    env.create_instance("nb", spec).await.unwrap();
    let n = env
        .wait_instance("nb", "Stalled/InvalidSpec", T, |n| {
            condition(n, "Stalled").is_some_and(|(s, r, _)| s == "True" && r == "InvalidSpec")
        })
        .await;
    let message = condition(&n, "Stalled").unwrap().2;
    assert!(
        message.contains("262144"),
        "the apiserver's word: {message}"
    );
    assert!(message.contains("nb-token"), "{message}");
    assert!(
        condition(&n, "Reconciling").is_none(),
        "no retry loop: {n:?}"
    );
    assert_eq!(fake.calls("setup"), 0);
    assert_eq!(op.setup_calls(), 0);
    // and it stays so: nothing is tried again until the spec changes
    let calls = fake.state().calls.clone();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fake.state().calls, calls);
    // the spec fixed: it goes on
    env.instances()
        .patch(
            "nb",
            &Default::default(),
            &kube::api::Patch::Merge(&json!({"spec": {"token": {"secretAnnotations": null}}})),
        )
        .await
        .unwrap();
    env.wait_instance("nb", "Ready", T, |n| {
        support::ready_is(n, "True", "Bootstrapped")
    })
    .await;
}

/// Secrets with hostile content end in a specific condition before any setup call.
#[tokio::test]
async fn bad_secrets_end_in_a_condition_without_a_setup_call() {
    let Some(env) = TestEnv::new("hostile-secrets").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    let op = env.start_operator().await;
    let huge = "p".repeat(512 * 1024);
    type Case<'a> = (&'a str, Vec<(&'a str, Vec<u8>)>, &'a str, &'a str);
    let secrets: Vec<Case> = vec![
        (
            "binary-email",
            vec![
                ("email", vec![0xff, 0xfe, 0x00]),
                ("password", PASSWORD.into()),
            ],
            "InvalidSpec",
            "not UTF-8",
        ),
        (
            "huge-password",
            vec![("email", EMAIL.into()), ("password", huge.into_bytes())],
            "InvalidSpec",
            "longer than 72 bytes",
        ),
        (
            "long-password",
            vec![
                ("email", EMAIL.into()),
                ("password", "€".repeat(25).into_bytes()),
            ],
            "InvalidSpec",
            "longer than 72 bytes",
        ),
        (
            "zero-width-email",
            vec![
                ("email", "adm\u{200b}in@example.com".into()),
                ("password", PASSWORD.into()),
            ],
            "InvalidSpec",
            "invisible",
        ),
        (
            "rtl-email",
            vec![
                ("email", "admin@\u{202e}moc.elpmaxe".into()),
                ("password", PASSWORD.into()),
            ],
            "InvalidSpec",
            "invisible",
        ),
        (
            "newline-email",
            vec![
                ("email", "admin@example.com\n".into()),
                ("password", PASSWORD.into()),
            ],
            "InvalidSpec",
            "newline",
        ),
        (
            "control-name",
            vec![
                ("email", EMAIL.into()),
                ("password", PASSWORD.into()),
                ("name", "a\u{7}b".into()),
            ],
            "InvalidSpec",
            "control",
        ),
        (
            "long-name",
            vec![
                ("email", EMAIL.into()),
                ("password", PASSWORD.into()),
                ("name", "x".repeat(300).into_bytes()),
            ],
            "InvalidSpec",
            "255",
        ),
        (
            "no-password",
            vec![("email", EMAIL.into())],
            "InvalidSpec",
            "no key \"password\"",
        ),
        (
            "two-at",
            vec![
                ("email", "a@b@example.com".into()),
                ("password", PASSWORD.into()),
            ],
            "InvalidSpec",
            "more than one @",
        ),
    ];
    for (name, data, _, _) in &secrets {
        let obj: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
            "metadata": {"name": name},
            "data": data.iter().map(|(k, v)| (k.to_string(), k8s_openapi::ByteString(v.clone()))).collect::<std::collections::BTreeMap<_, _>>(),
        }))
        .unwrap();
        env.secrets()
            .create(&Default::default(), &obj)
            .await
            .unwrap();
        let spec = json!({"managementURL": fake.url, "allowInsecureHTTP": true, "credentialsSecretRef": {"name": name}});
        env.create_instance(name, spec).await.unwrap();
    }
    for (name, _, reason, text) in &secrets {
        let n = env
            .wait_instance(name, reason, T, |n| {
                condition(n, "Stalled").is_some_and(|(s, r, _)| s == "True" && r == *reason)
            })
            .await;
        let message = condition(&n, "Ready").unwrap().2;
        assert!(message.contains(text), "{name}: {message}");
        assert!(
            !message.contains(PASSWORD),
            "{name}: the message carries the password"
        );
        // nor a function of it: the length of a password is not said
        for length in ["524288", "75 bytes"] {
            assert!(!message.contains(length), "{name}: {message}");
        }
    }
    for (reason, note) in env.events().await {
        for length in ["524288", "75 bytes"] {
            assert!(!note.contains(length), "Event {reason}: {note}");
        }
    }
    assert_eq!(fake.calls("setup"), 0, "no bad Secret reached NetBird");
    assert_eq!(op.setup_calls(), 0);
}

/// An answer of the wrong shape is reported by what failed, never by the value it held: serde's
/// own message quotes the value, and a server's answer may hold anything.
#[tokio::test]
async fn decode_errors_echo_nothing_of_the_answer() {
    let Some(env) = TestEnv::new("decode-echo").await else {
        return;
    };
    const ECHO: &str = "nbp_EchoedFromTheServersAnswer0123456789";
    let fake = FakeNetbird::start().await;
    fake.fault(
        "instance",
        support::fake_netbird::Fault::Json(
            200,
            r#"{"setup_required": "nbp_EchoedFromTheServersAnswer0123456789"}"#,
        ),
    );
    env.create_secret("admin", &[("email", EMAIL), ("password", PASSWORD)])
        .await;
    let _op = env.start_operator().await;
    let spec = json!({"managementURL": fake.url, "allowInsecureHTTP": true, "credentialsSecretRef": {"name": "admin"}});
    env.create_instance("nb", spec).await.unwrap();
    let n = env
        .wait_instance("nb", "ManagementUnreachable", T, |n| {
            condition(n, "Ready").is_some_and(|(_, r, _)| r == "ManagementUnreachable")
        })
        .await;
    let message = condition(&n, "Ready").unwrap().2;
    assert!(message.contains("not NetBird's JSON"), "{message}");
    let status = serde_json::to_string(&n.status).unwrap();
    assert!(
        !status.contains(ECHO),
        "the status echoes the answer: {status}"
    );
    let events = support::wait_for("an Event", T, || {
        let env = &env;
        async move {
            let e = env.events().await;
            (!e.is_empty()).then_some(e)
        }
    })
    .await;
    for (reason, note) in events {
        assert!(
            !note.contains(ECHO),
            "Event {reason} echoes the answer: {note}"
        );
    }
}

/// Token Secrets with hostile content, and a CA that is not one.
#[tokio::test]
async fn bad_tokens_and_cas_are_reported_and_never_sent_malformed() {
    let Some(env) = TestEnv::new("hostile-tokens").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    env.create_secret("admin", &[("email", EMAIL), ("password", PASSWORD)])
        .await;
    let _op = env.start_operator().await;
    let ours = |instance: &str, token: Vec<u8>| -> k8s_openapi::api::core::v1::Secret {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{instance}-token"), "labels": {
                "app.kubernetes.io/managed-by": "netbird-operator", "bootstrap.netbird.io/instance": instance}},
            "data": {"NB_API_KEY": k8s_openapi::ByteString(token)},
        }))
        .unwrap()
    };
    let good = netbird_operator::netbird::pat::from_secret("abcdefghijabcdefghijabcdefghij");
    let mut bad_checksum = good.clone().into_bytes();
    bad_checksum[39] = if bad_checksum[39] == b'A' { b'B' } else { b'A' };
    for (instance, token) in [
        ("binary", vec![0u8, 159, 146, 150]),
        ("checksum", bad_checksum),
        ("injection", format!("{good}\r\nX-Evil: 1").into_bytes()),
    ] {
        env.secrets()
            .create(&Default::default(), &ours(instance, token))
            .await
            .unwrap();
        let spec = json!({"managementURL": fake.url, "allowInsecureHTTP": true, "credentialsSecretRef": {"name": "admin"}});
        env.create_instance(instance, spec).await.unwrap();
    }
    for instance in ["binary", "checksum", "injection"] {
        env.wait_instance(instance, "TokenRejected", T, |n| {
            condition(n, "Stalled").is_some_and(|(_, r, _)| r == "TokenRejected")
        })
        .await;
    }
    assert_eq!(
        fake.calls("users_current"),
        0,
        "a malformed token is never sent"
    );
    assert_eq!(fake.calls("setup"), 0);

    // a CA that is not PEM, and a CA Secret without the key
    env.create_secret("garbage-ca", &[("ca.crt", "not a certificate")])
        .await;
    env.create_secret("empty-ca", &[("other", "x")]).await;
    for (instance, ca) in [("garbage", "garbage-ca"), ("nokey", "empty-ca")] {
        let spec = json!({"managementURL": fake.url.replace("http://", "https://"), "credentialsSecretRef": {"name": "admin"},
            "tls": {"caSecretRef": {"name": ca}}});
        env.create_instance(instance, spec).await.unwrap();
        env.wait_instance(instance, "InvalidSpec", T, |n| {
            condition(n, "Stalled").is_some_and(|(_, r, _)| r == "InvalidSpec")
        })
        .await;
    }
}

/// managementURL pointing at the Kubernetes apiserver itself: the operator gets no NetBird answer,
/// reports it, and never sends the credentials there (setup needs a NetBird "setup required" first).
#[tokio::test]
async fn a_url_pointing_at_the_apiserver_gets_nothing() {
    let Some(env) = TestEnv::new("hostile-apiserver").await else {
        return;
    };
    env.create_secret("admin", &[("email", EMAIL), ("password", PASSWORD)])
        .await;
    let op = env.start_operator().await;
    for (name, insecure) in [("plain", false), ("skipverify", true)] {
        let spec = json!({"managementURL": env.cp.url, "credentialsSecretRef": {"name": "admin"},
            "tls": {"insecureSkipVerify": insecure}});
        env.create_instance(name, spec).await.unwrap();
        let n = env
            .wait_instance(name, "ManagementUnreachable", T, |n| {
                condition(n, "Reconciling").is_some_and(|(_, r, _)| r == "ManagementUnreachable")
            })
            .await;
        let message = condition(&n, "Ready").unwrap().2;
        if insecure {
            assert!(message.contains("GET /api/instance answered"), "{message}");
        } else {
            assert!(message.contains("TLS"), "{message}");
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        op.setup_calls(),
        0,
        "the credentials never went to the apiserver"
    );
}

/// TLS: an unknown CA and a wrong host name are refused (Reconciling/ManagementUnreachable saying
/// TLS); the CA from caSecretRef makes the same server trusted; insecureSkipVerify skips the check.
#[tokio::test]
async fn tls_is_verified_and_the_ca_secret_is_used() {
    let Some(env) = TestEnv::new("tls").await else {
        return;
    };
    let (good, ca) = FakeNetbird::start_tls(&["127.0.0.1"]).await;
    let (wrong_name, wrong_ca) = FakeNetbird::start_tls(&["netbird.example.com"]).await;
    env.create_secret("admin", &[("email", EMAIL), ("password", PASSWORD)])
        .await;
    env.create_secret("ca", &[("ca.crt", &ca)]).await;
    env.create_secret("wrong-ca", &[("ca.crt", &wrong_ca)])
        .await;
    let op = env.start_operator().await;
    let spec = |url: &str, tls: Value| json!({"managementURL": url, "credentialsSecretRef": {"name": "admin"}, "tls": tls});
    env.create_instance("unknown-ca", spec(&good.url, json!({})))
        .await
        .unwrap();
    env.create_instance(
        "wrong-name",
        spec(
            &wrong_name.url,
            json!({"caSecretRef": {"name": "wrong-ca"}}),
        ),
    )
    .await
    .unwrap();
    for name in ["unknown-ca", "wrong-name"] {
        let n = env
            .wait_instance(name, "ManagementUnreachable", T, |n| {
                condition(n, "Reconciling").is_some_and(|(_, r, _)| r == "ManagementUnreachable")
            })
            .await;
        let message = condition(&n, "Ready").unwrap().2;
        assert!(message.contains("TLS"), "{name}: {message}");
    }
    assert_eq!(
        good.calls("instance") + wrong_name.calls("instance"),
        0,
        "nothing was sent over an unverified connection"
    );
    env.create_instance(
        "with-ca",
        spec(&good.url, json!({"caSecretRef": {"name": "ca"}})),
    )
    .await
    .unwrap();
    env.wait_instance("with-ca", "Ready", T, |n| {
        support::ready_is(n, "True", "Bootstrapped")
    })
    .await;
    let (skip, _) = FakeNetbird::start_tls(&["elsewhere.example"]).await;
    env.create_instance("skip", spec(&skip.url, json!({"insecureSkipVerify": true})))
        .await
        .unwrap();
    env.wait_instance("skip", "Ready", T, |n| {
        support::ready_is(n, "True", "Bootstrapped")
    })
    .await;
    assert_eq!(op.setup_calls(), 2);
}
