//! The operator against a hostile spec editor: whoever may edit a NetbirdInstance must never be able
//! to send a stored token, or the admin password, to a server of their choosing. Against the real
//! kube-apiserver, the real NetBird server where the case needs it, and fake servers that keep
//! everything they are sent (a second real NetBird server cannot run beside the first here: both
//! bind TCP 33073), so "nothing reached it" is counted at the server.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use netbird_operator::binding::{ANN_ALLOWED_URLS, ANN_MANAGEMENT_URL};
use netbird_operator::netbird::{ClientOptions, CreateTokenRequest, NetbirdClient, pat};
use netbird_operator::token_secret::{
    ANN_PREVIOUS_TOKEN_ID, ANN_ROTATION_STARTED_AT, ANN_SERVICE_USER, ANN_TOKEN_ID, ANN_USER_ID,
    PREVIOUS_TOKEN_KEY,
};
use secrecy::SecretString;
use serde_json::json;
use support::fake_netbird::{FakeNetbird, Fault};
use support::{NetbirdServer, TestEnv, condition, ready_is};

const T: Duration = Duration::from_secs(30);
const PASSWORD: &str = "s3cret-Passw0rd";

fn spec(url: &str) -> serde_json::Value {
    json!({
        "managementURL": url,
        "allowInsecureHTTP": true,
        "credentialsSecretRef": {"name": "admin"},
    })
}

fn stalled_with(n: &netbird_operator::crd::NetbirdInstance, reason: &str) -> bool {
    condition(n, "Stalled").is_some_and(|(s, r, _)| s == "True" && r == reason)
}

async fn secret(env: &TestEnv, name: &str) -> Secret {
    env.secrets().get(name).await.expect("Secret")
}

fn token_in(s: &Secret) -> Option<String> {
    let v = s.data.as_ref()?.get("NB_API_KEY")?.0.clone();
    String::from_utf8(v).ok()
}

fn annotation(s: &Secret, key: &str) -> Option<String> {
    s.metadata.annotations.as_ref()?.get(key).cloned()
}

async fn patch_spec(env: &TestEnv, name: &str, spec: serde_json::Value) {
    env.instances()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "spec": spec })),
        )
        .await
        .expect("patch spec");
}

async fn annotate(env: &TestEnv, secret: &str, annotations: serde_json::Value) {
    env.secrets()
        .patch(
            secret,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": annotations}})),
        )
        .await
        .expect("annotate Secret");
}

/// How many requests carrying `token` a fake received.
fn received(fake: &FakeNetbird, token: &str) -> usize {
    fake.state()
        .authorizations
        .iter()
        .filter(|a| a.contains(token))
        .count()
}

/// A Ready instance whose spec.managementURL is changed to another server: the token stays home,
/// for every call (verification, versions, rotation, and the finalizer's deletion), until whoever
/// may write the token Secret moves it.
#[tokio::test]
async fn a_changed_url_keeps_the_token_home() {
    let Some(env) = TestEnv::new("url-changed").await else {
        return;
    };
    let _guard = support::netbird_lock().await;
    let Some(home) = NetbirdServer::start().await else {
        return;
    };
    let elsewhere = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let op = env.start_operator().await;
    let mut s = spec(&home.url);
    s["token"] = json!({"deletionPolicy": "Delete"});
    env.create_instance("nb", s).await.unwrap();
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    let stored = secret(&env, "nb-token").await;
    let token = token_in(&stored).expect("token");
    assert_eq!(
        annotation(&stored, ANN_MANAGEMENT_URL).as_deref(),
        Some(home.url.as_str()),
        "the token Secret records the server that issued the token"
    );

    // the spec editor points the instance at their own server
    patch_spec(&env, "nb", json!({"managementURL": elsewhere.url})).await;
    let n = env
        .wait_instance("nb", "Stalled/ServerNotAllowed", T, |n| {
            stalled_with(n, "ServerNotAllowed")
        })
        .await;
    let message = condition(&n, "Stalled").unwrap().2;
    assert!(message.contains(&home.url), "{message}");
    assert!(message.contains(&elsewhere.url), "{message}");
    assert!(message.contains(ANN_MANAGEMENT_URL), "{message}");
    assert!(message.contains("spec.token.secretName"), "{message}");
    // a forced re-check (new generation) and time: still nothing goes there
    patch_spec(&env, "nb", json!({"versionCheck": {"interval": "1m"}})).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        received(&elsewhere, &token),
        0,
        "the token reached the other server"
    );
    assert!(
        elsewhere.state().calls.values().sum::<u32>() == 0,
        "{:?}",
        elsewhere.state().calls
    );
    assert_eq!(
        token_in(&secret(&env, "nb-token").await).as_deref(),
        Some(token.as_str())
    );

    // the same server under another address: whoever may write the Secret moves the token
    let alias = home.url.replace("127.0.0.1", "localhost");
    patch_spec(&env, "nb", json!({"managementURL": alias})).await;
    env.wait_instance("nb", "Stalled for the alias", T, |n| {
        stalled_with(n, "ServerNotAllowed")
            && condition(n, "Stalled").is_some_and(|(_, _, m)| m.contains(&alias))
    })
    .await;
    annotate(&env, "nb-token", json!({ ANN_MANAGEMENT_URL: alias })).await;
    env.wait_instance("nb", "Ready at the new address", T, |n| {
        ready_is(n, "True", "Bootstrapped") && condition(n, "Stalled").is_none()
    })
    .await;

    // deleting while the spec points elsewhere: the finalizer does not send the token either
    patch_spec(&env, "nb", json!({"managementURL": elsewhere.url})).await;
    env.wait_instance("nb", "Stalled again", T, |n| {
        stalled_with(n, "ServerNotAllowed")
    })
    .await;
    env.instances()
        .delete("nb", &Default::default())
        .await
        .unwrap();
    env.wait_instance_gone("nb").await;
    assert_eq!(received(&elsewhere, &token), 0);
    let events = env.events().await;
    assert!(
        events
            .iter()
            .any(|(r, n)| r == "TokenNotDeleted" && n.contains(&alias)),
        "{events:?}"
    );
    let client = NetbirdClient::new(&home.url, &ClientOptions::default()).unwrap();
    client
        .current_user(&SecretString::from(token.clone()))
        .await
        .expect("the token was never sent away, so it still works at home");
    assert_eq!(op.setup_calls(), 1);
}

/// Delete a Retain instance and re-create one of the same name pointing elsewhere: the kept token
/// Secret is found by its name, but its token does not follow the new URL.
#[tokio::test]
async fn a_re_created_instance_pointing_elsewhere_gets_no_token() {
    let Some(env) = TestEnv::new("recreated-elsewhere").await else {
        return;
    };
    let home = FakeNetbird::start().await;
    let elsewhere = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let _op = env.start_operator().await;
    env.create_instance("nb", spec(&home.url)).await.unwrap();
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    let token = token_in(&secret(&env, "nb-token").await).unwrap();
    env.instances()
        .delete("nb", &Default::default())
        .await
        .unwrap();
    env.wait_instance_gone("nb").await;

    env.create_instance("nb", spec(&elsewhere.url))
        .await
        .unwrap();
    env.wait_instance("nb", "Stalled/ServerNotAllowed", T, |n| {
        stalled_with(n, "ServerNotAllowed")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(received(&elsewhere, &token), 0);
    assert_eq!(elsewhere.state().setup_bodies.len(), 0);
    assert_eq!(
        token_in(&secret(&env, "nb-token").await).as_deref(),
        Some(token.as_str())
    );
}

/// The credentials Secret's owner limits where its password may go; anything else is refused
/// before any call.
#[tokio::test]
async fn the_password_goes_only_where_the_credentials_secret_allows() {
    let Some(env) = TestEnv::new("password-allow-list").await else {
        return;
    };
    let allowed = FakeNetbird::start().await;
    let elsewhere = FakeNetbird::start().await;
    env.create_admin_secret().await;
    annotate(
        &env,
        "admin",
        json!({ ANN_ALLOWED_URLS: format!("https://netbird.example.com, {}/", allowed.url) }),
    )
    .await;
    let op = env.start_operator().await;
    env.create_instance("hostile", spec(&elsewhere.url))
        .await
        .unwrap();
    let n = env
        .wait_instance("hostile", "Stalled/ServerNotAllowed", T, |n| {
            stalled_with(n, "ServerNotAllowed")
        })
        .await;
    let message = condition(&n, "Stalled").unwrap().2;
    assert!(message.contains(ANN_ALLOWED_URLS), "{message}");
    assert!(message.contains(&elsewhere.url), "{message}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        elsewhere.state().calls.values().sum::<u32>(),
        0,
        "no call at all reached a server the credentials Secret does not allow"
    );
    assert!(
        elsewhere
            .state()
            .setup_bodies
            .iter()
            .all(|b| !b.contains(PASSWORD))
    );

    // the allowed server is set up as always
    env.create_instance("nb", spec(&allowed.url)).await.unwrap();
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    assert_eq!(allowed.calls("setup"), 1);
    assert_eq!(op.setup_calls(), 1);
}

/// A server that answers setup, or a token creation, with something that is not a NetBird token:
/// nothing is stored, the instance stalls with a reason, and nothing is asked again in a loop.
#[tokio::test]
async fn malformed_tokens_from_the_server_are_never_stored() {
    let Some(env) = TestEnv::new("malformed-token").await else {
        return;
    };
    let broken = FakeNetbird::start().await;
    broken.state().malformed_tokens = true;
    env.create_admin_secret().await;
    let op = env.start_operator().await;
    env.create_instance("setup", spec(&broken.url))
        .await
        .unwrap();
    let n = env
        .wait_instance("setup", "Stalled/TokenNotIssued", T, |n| {
            stalled_with(n, "TokenNotIssued")
        })
        .await;
    assert!(
        condition(&n, "Stalled")
            .unwrap()
            .2
            .contains("not a NetBird token"),
        "{:?}",
        condition(&n, "Stalled")
    );
    let s = secret(&env, "setup-token").await;
    assert_eq!(token_in(&s), None, "a malformed token is never stored");
    let calls = broken.state().calls.clone();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(broken.state().calls, calls, "nothing is asked again");
    assert_eq!(broken.calls("setup"), 1);
    assert_eq!(op.setup_calls(), 1);
    drop(op);

    // a rotation answered with a malformed token: the current token stays, nothing loops
    let rotating = FakeNetbird::start().await;
    let op = env.start_operator().await;
    let mut s = spec(&rotating.url);
    s["token"] = json!({"expiresInDays": 30});
    env.create_instance("rotation", s).await.unwrap();
    env.wait_instance("rotation", "Ready", T, |n| {
        ready_is(n, "True", "Bootstrapped")
    })
    .await;
    let good = token_in(&secret(&env, "rotation-token").await).unwrap();
    op.stop().await;
    rotating.state().malformed_tokens = true;
    let op = env
        .start_operator_ahead(Duration::from_secs(21 * 24 * 3600))
        .await;
    env.wait_instance("rotation", "Stalled/TokenNotIssued", T, |n| {
        stalled_with(n, "TokenNotIssued")
    })
    .await;
    let s = secret(&env, "rotation-token").await;
    assert_eq!(token_in(&s).as_deref(), Some(good.as_str()));
    assert!(annotation(&s, ANN_ROTATION_STARTED_AT).is_none());
    let created = rotating.calls("tokens_create");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rotating.calls("tokens_create"), created, "no rotation loop");
    assert_eq!(created, 1);
    // the malformed token's record was deleted on the server: only the good token is left
    let user = rotating.state().tokens[&good].clone();
    assert_eq!(rotating.state().tokens_of(&user), vec![good.clone()]);
    drop(op);
}

/// `secretAnnotations` may not set the operator's own records: refused at admission, and ignored in
/// code for objects stored before the rule existed. Names longer than a label value are refused.
#[tokio::test]
async fn pinned_operator_annotations_are_refused_and_ignored() {
    let Some(env) = TestEnv::new("pinned-annotations").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let pinned = json!({
        "bootstrap.netbird.io/expires-at": "2000-01-02T00:00:00Z",
        "bootstrap.netbird.io/issued-at": "2000-01-01T00:00:00Z",
        "bootstrap.netbird.io/previous-token-id": "someone-elses-token",
        "bootstrap.netbird.io/previous-user-id": "someone-else",
        "team": "net",
    });
    let mut s = spec(&fake.url);
    s["token"] = json!({"secretAnnotations": pinned});
    match env.create_instance("nb", s.clone()).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422, "{e:?}");
            assert!(e.message.contains("bootstrap.netbird.io/"), "{}", e.message);
        }
        other => panic!("pinned annotations were accepted: {other:?}"),
    }
    match env.create_instance(&"n".repeat(64), spec(&fake.url)).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422, "{e:?}");
            assert!(e.message.contains("63"), "{}", e.message);
        }
        other => panic!("a 64-character name was accepted: {other:?}"),
    }
    env.create_instance(&"n".repeat(63), spec(&fake.url))
        .await
        .expect("63 characters are fine");
    env.instances()
        .delete(&"n".repeat(63), &Default::default())
        .await
        .unwrap();

    // an object stored before the rule existed (the rule is lifted for a moment, as an old CRD
    // would have it)
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(env.client.clone());
    let mut crd = serde_json::to_value(
        crds.get("netbirdinstances.bootstrap.netbird.io")
            .await
            .unwrap(),
    )
    .unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["token"]["properties"]["secretAnnotations"]
        .as_object_mut()
        .unwrap()
        .remove("x-kubernetes-validations")
        .expect("the rule is there");
    crds.replace(
        "netbirdinstances.bootstrap.netbird.io",
        &Default::default(),
        &serde_json::from_value(crd).unwrap(),
    )
    .await
    .expect("lift the rule");
    let created = support::wait_for("the old object to be stored", T, || {
        let env = &env;
        let s = s.clone();
        async move { env.create_instance("nb", s).await.ok() }
    })
    .await;
    support::install_crd(&env.client).await;
    assert!(
        created
            .spec
            .token
            .secret_annotations
            .contains_key("bootstrap.netbird.io/expires-at")
    );

    let op = env.start_operator().await;
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stored = secret(&env, "nb-token").await;
    assert_eq!(annotation(&stored, "team").as_deref(), Some("net"));
    assert_ne!(
        annotation(&stored, "bootstrap.netbird.io/expires-at").as_deref(),
        Some("2000-01-02T00:00:00Z"),
        "the spec cannot pin the operator's records"
    );
    assert!(annotation(&stored, "bootstrap.netbird.io/previous-token-id").is_none());
    assert_eq!(fake.calls("tokens_create"), 0, "no token minted in a loop");
    assert_eq!(
        fake.calls("tokens_delete"),
        0,
        "no token deleted on the spec's word"
    );
    drop(op);
}

/// Service user + deletionPolicy Delete: the finalizer verifies the service user's token the way
/// passes do (NetBird answers 403 to /api/users/current for service users) and deletes it.
#[tokio::test]
async fn service_user_and_delete_policy_delete_the_token() {
    let Some(env) = TestEnv::new("svc-delete").await else {
        return;
    };
    let _guard = support::netbird_lock().await;
    let Some(nb) = NetbirdServer::start().await else {
        return;
    };
    env.create_admin_secret().await;
    let _op = env.start_operator().await;
    let mut s = spec(&nb.url);
    s["token"] = json!({"deletionPolicy": "Delete", "serviceUser": {"name": "netbird-operator"},
        "rotation": {"gracePeriod": "0s"}});
    env.create_instance("nb", s).await.unwrap();
    let stored = support::wait_for("the service user's token", T, || {
        let env = &env;
        async move {
            let s = env.secrets().get_opt("nb-token").await.ok()??;
            (annotation(&s, ANN_SERVICE_USER).is_some()
                && annotation(&s, ANN_PREVIOUS_TOKEN_ID).is_none())
            .then_some(s)
        }
    })
    .await;
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    let token = SecretString::from(token_in(&stored).unwrap());
    let client = NetbirdClient::new(&nb.url, &ClientOptions::default()).unwrap();
    client
        .list_service_users(&token)
        .await
        .expect("the service user's token works");
    env.instances()
        .delete("nb", &Default::default())
        .await
        .unwrap();
    env.wait_instance_gone("nb").await;
    let after = client.list_service_users(&token).await;
    assert!(
        after.as_ref().is_err_and(|e| e.is_token_rejected()),
        "the token was deleted on the real server: {after:?}"
    );
    let events = env.events().await;
    assert!(
        events.iter().any(|(r, _)| r == "TokenDeleted"),
        "{events:?}"
    );
}

/// After the exchange, the owner's setup token is deleted for sure: when the deletion fails, the
/// Secret keeps what is needed to retry it (the token itself: only it may delete itself), across
/// a restart, until it is gone.
#[tokio::test]
async fn the_setup_token_is_deleted_for_sure_after_the_exchange() {
    let Some(env) = TestEnv::new("exchange-retry").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    fake.fault("tokens_delete", Fault::Status(500, "internal server error"));
    env.create_admin_secret().await;
    let op = env.start_operator().await;
    let mut s = spec(&fake.url);
    s["token"] =
        json!({"serviceUser": {"name": "netbird-operator"}, "rotation": {"gracePeriod": "0s"}});
    env.create_instance("nb", s).await.unwrap();
    let pending = support::wait_for("the exchange with a pending deletion", T, || {
        let env = &env;
        async move {
            let s = env.secrets().get_opt("nb-token").await.ok()??;
            (annotation(&s, ANN_SERVICE_USER).is_some()
                && s.data.as_ref()?.contains_key(PREVIOUS_TOKEN_KEY))
            .then_some(s)
        }
    })
    .await;
    let owner = fake.state().users.keys().next().cloned().unwrap();
    assert_eq!(
        fake.state().tokens_of(&owner).len(),
        1,
        "the setup token is still valid"
    );
    assert!(annotation(&pending, ANN_PREVIOUS_TOKEN_ID).is_some());
    op.kill(); // a crash while the deletion is pending

    fake.clear_fault("tokens_delete");
    let _op = env.start_operator().await;
    support::wait_for("the setup token to be deleted", T, || async {
        fake.state().tokens_of(&owner).is_empty().then_some(())
    })
    .await;
    let done = support::wait_for("the hand-over to end", T, || {
        let env = &env;
        async move {
            let s = env.secrets().get_opt("nb-token").await.ok()??;
            (!s.data.as_ref()?.contains_key(PREVIOUS_TOKEN_KEY)).then_some(s)
        }
    })
    .await;
    assert!(annotation(&done, ANN_PREVIOUS_TOKEN_ID).is_none());
    let svc = annotation(&done, ANN_USER_ID).unwrap();
    assert_eq!(fake.state().tokens_of(&svc).len(), 1);
}

/// Two NetbirdInstances on one real NetBird server, both rotating tokens of the same service user:
/// through several rotations (and an interrupted one, which makes the clean-up run), neither ever
/// loses a valid token.
#[tokio::test]
async fn two_instances_share_a_server_and_a_service_user_through_rotations() {
    let Some(env) = TestEnv::new("shared-service-user").await else {
        return;
    };
    let _guard = support::netbird_lock().await;
    let Some(nb) = NetbirdServer::start().await else {
        return;
    };
    let client = NetbirdClient::new(&nb.url, &ClientOptions::default()).unwrap();
    env.create_admin_secret().await;
    let op = env.start_operator().await;
    let shared = |url: &str| {
        let mut s = spec(url);
        s["token"] = json!({"expiresInDays": 1, "serviceUser": {"name": "shared"},
            "rotation": {"gracePeriod": "0s"}});
        s
    };
    env.create_instance("a", shared(&nb.url)).await.unwrap();
    let a_secret = support::wait_for("a's service-user token", T, || {
        let env = &env;
        async move {
            let s = env.secrets().get_opt("a-token").await.ok()??;
            (annotation(&s, ANN_SERVICE_USER).is_some()
                && annotation(&s, ANN_PREVIOUS_TOKEN_ID).is_none())
            .then_some(s)
        }
    })
    .await;
    let a_token = SecretString::from(token_in(&a_secret).unwrap());
    let svc = annotation(&a_secret, ANN_USER_ID).unwrap();

    // b shares the service user: its token Secret is prepared by whoever may write Secrets there
    let made = client
        .create_token(
            &a_token,
            &svc,
            &CreateTokenRequest {
                name: "hand-made-for-b".into(),
                expires_in: 1,
            },
        )
        .await
        .expect("an admin creates a token for the service user");
    let b_secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "b-token", "labels": {
            "app.kubernetes.io/managed-by": "netbird-operator", "bootstrap.netbird.io/instance": "b"},
            "annotations": {
                ANN_SERVICE_USER: "shared", ANN_USER_ID: svc, ANN_TOKEN_ID: made.personal_access_token.id,
                "bootstrap.netbird.io/issued-at": made.personal_access_token.created_at.to_string(),
                "bootstrap.netbird.io/expires-at": made.personal_access_token.expiration_date.to_string(),
            }},
        "stringData": {"NB_API_KEY": secrecy::ExposeSecret::expose_secret(&made.plain_token)},
    }))
    .unwrap();
    env.secrets()
        .create(&Default::default(), &b_secret)
        .await
        .unwrap();
    env.create_instance("b", shared(&nb.url)).await.unwrap();
    for name in ["a", "b"] {
        env.wait_instance(name, "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
            .await;
    }
    drop(op);

    // rounds of rotations (the operator's clock moved on each time), the second one interrupted
    // for b as a crash would leave it: b's clean-up then lists the shared user's tokens
    let mut rotated = 0;
    // (with 1-day tokens a rotation is due when less than a third of what is left remains)
    for (round, minutes) in [17 * 60u64, 22 * 60, 23 * 60 + 30].into_iter().enumerate() {
        if round == 1 {
            annotate(
                &env,
                "b-token",
                json!({ ANN_ROTATION_STARTED_AT: "2026-01-01T00:00:00Z" }),
            )
            .await;
        }
        let mut before = Vec::new();
        for s in ["a-token", "b-token"] {
            before.push(token_in(&secret(&env, s).await).unwrap());
        }
        let op = env
            .start_operator_ahead(Duration::from_secs(minutes * 60))
            .await;
        for (i, name) in ["a", "b"].iter().enumerate() {
            let old = before[i].clone();
            let secret_name = format!("{name}-token");
            support::wait_for(&format!("{name} rotated in round {round}"), T, || {
                let env = &env;
                let old = old.clone();
                let secret_name = secret_name.clone();
                async move {
                    let s = env.secrets().get_opt(&secret_name).await.ok()??;
                    (token_in(&s)? != old && annotation(&s, ANN_PREVIOUS_TOKEN_ID).is_none())
                        .then_some(())
                }
            })
            .await;
            env.wait_instance(name, "Ready after the rotation", T, |n| {
                ready_is(n, "True", "Bootstrapped")
            })
            .await;
        }
        rotated += 1;
        // both stored tokens work on the real server, now and a moment later
        for _ in 0..2 {
            for s in ["a-token", "b-token"] {
                let t = SecretString::from(token_in(&secret(&env, s).await).unwrap());
                pat::check(secrecy::ExposeSecret::expose_secret(&t)).unwrap();
                client
                    .list_service_users(&t)
                    .await
                    .unwrap_or_else(|e| panic!("{s} lost its valid token in round {round}: {e}"));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        drop(op);
    }
    assert_eq!(rotated, 3);
    for name in ["a", "b"] {
        let n = env.instances().get(name).await.unwrap();
        assert!(ready_is(&n, "True", "Bootstrapped"), "{name}");
    }
}

/// The binding covers how the server is trusted too: a token first used with TLS verification on
/// is not sent once `spec.tls.insecureSkipVerify` is turned on (anyone on the path could then take
/// it), for any call, the finalizer's included; whoever may write the token Secret can accept the
/// weaker trust on its annotation.
#[tokio::test]
async fn turning_tls_verification_off_keeps_the_token_home() {
    let Some(env) = TestEnv::new("tls-trust").await else {
        return;
    };
    const ANN_TLS: &str = "bootstrap.netbird.io/management-tls";
    let (fake, ca) = support::fake_netbird::FakeNetbird::start_tls(&["127.0.0.1"]).await;
    env.create_admin_secret().await;
    env.create_secret("ca", &[("ca.crt", &ca)]).await;
    let _op = env.start_operator().await;
    let verified = json!({"caSecretRef": {"name": "ca"}});
    let skipped = json!({"caSecretRef": {"name": "ca"}, "insecureSkipVerify": true});
    env.create_instance(
        "nb",
        json!({"managementURL": fake.url, "credentialsSecretRef": {"name": "admin"},
            "tls": verified, "token": {"deletionPolicy": "Delete"}}),
    )
    .await
    .unwrap();
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    let token = token_in(&secret(&env, "nb-token").await).expect("token");

    // the spec editor turns verification off (a machine in the middle is theirs)
    patch_spec(&env, "nb", json!({"tls": skipped})).await;
    let n = env
        .wait_instance("nb", "Stalled/ServerNotAllowed", T, |n| {
            stalled_with(n, "ServerNotAllowed")
        })
        .await;
    let message = condition(&n, "Stalled").unwrap().2;
    assert!(message.contains("insecureSkipVerify"), "{message}");
    assert!(message.contains(ANN_TLS), "{message}");
    let stored = secret(&env, "nb-token").await;
    assert_eq!(
        annotation(&stored, ANN_TLS).as_deref(),
        Some("verified"),
        "the token Secret records how the server was trusted"
    );
    let sent = received(&fake, &token);
    patch_spec(&env, "nb", json!({"versionCheck": {"interval": "1m"}})).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        received(&fake, &token),
        sent,
        "the token was sent without verification"
    );

    // whoever may write the Secret accepts the weaker trust
    annotate(&env, "nb-token", json!({ ANN_TLS: "insecure-skip-verify" })).await;
    env.wait_instance("nb", "Ready without verification", T, |n| {
        ready_is(n, "True", "Bootstrapped") && condition(n, "Stalled").is_none()
    })
    .await;

    // bound to verification again: the finalizer does not send it either
    annotate(&env, "nb-token", json!({ ANN_TLS: "verified" })).await;
    env.wait_instance("nb", "Stalled again", T, |n| {
        stalled_with(n, "ServerNotAllowed")
    })
    .await;
    let sent = received(&fake, &token);
    env.instances()
        .delete("nb", &Default::default())
        .await
        .unwrap();
    env.wait_instance_gone("nb").await;
    assert_eq!(received(&fake, &token), sent);
    let events = env.events().await;
    assert!(
        events
            .iter()
            .any(|(r, n)| r == "TokenNotDeleted" && n.contains("insecureSkipVerify")),
        "{events:?}"
    );
}
