//! The token's life: expiry tracking, rotation before expiry (time driven by the operator's clock),
//! crashes during rotation, against the fake and the real NetBird server.

mod support;

use std::time::Duration;

use netbird_operator::netbird::{ClientOptions, NetbirdClient, pat};
use netbird_operator::token_secret::{
    ANN_EXPIRES_AT, ANN_PREVIOUS_TOKEN_ID, ANN_ROTATION_STARTED_AT, ANN_TOKEN_ID,
};
use secrecy::SecretString;
use serde_json::json;
use support::fake_netbird::{FakeNetbird, Fault};
use support::{NetbirdServer, TestEnv, condition, ready_is};

const T: Duration = Duration::from_secs(30);
const DAY: Duration = Duration::from_secs(24 * 3600);

fn spec(url: &str, days: i32, rotation: bool) -> serde_json::Value {
    json!({
        "managementURL": url,
        "allowInsecureHTTP": true,
        "credentialsSecretRef": {"name": "admin"},
        // these tests follow the hand-over step by step: no grace period (tests/day2.rs has it)
        "token": {"expiresInDays": days, "rotation": {"enabled": rotation, "gracePeriod": "0s"}},
    })
}

async fn stored(env: &TestEnv) -> (String, std::collections::BTreeMap<String, String>) {
    stored_opt(env).await.expect("a token in Secret nb-token")
}

async fn stored_opt(env: &TestEnv) -> Option<(String, std::collections::BTreeMap<String, String>)> {
    let s = env.secrets().get_opt("nb-token").await.ok()??;
    let token = String::from_utf8(s.data?.get("NB_API_KEY")?.0.clone()).ok()?;
    Some((token, s.metadata.annotations.unwrap_or_default()))
}

#[tokio::test]
async fn expiry_is_tracked_and_rotation_replaces_the_token_before_it_expires() {
    let Some(env) = TestEnv::new("rotation").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let op = env.start_operator().await;
    env.create_instance("nb", spec(&fake.url, 30, true))
        .await
        .unwrap();
    let n = env
        .wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    let (first, ann) = stored(&env).await;
    let token_status = n.status.as_ref().unwrap().token.clone().unwrap();
    assert!(token_status.expires_at.is_some());
    assert_eq!(
        token_status.expires_at.unwrap().0.to_string(),
        ann[ANN_EXPIRES_AT]
    );
    let identified = env
        .wait_instance("nb", "token identified", T, |n| {
            n.status
                .as_ref()
                .and_then(|s| s.token.as_ref())
                .is_some_and(|t| t.token_id.is_some())
        })
        .await;
    let first_id = identified.status.unwrap().token.unwrap().token_id.unwrap();
    let metrics = op.metrics.encode();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("netbird_operator_token_expiry_seconds{"))
        .expect("expiry metric");
    let secs: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((29 * 86400..=30 * 86400).contains(&secs), "{line}");
    op.stop().await;

    // 21 of 30 days later (less than a third left): a new token, the old one deleted
    let op = env.start_operator_ahead(21 * DAY).await;
    let n = env
        .wait_instance("nb", "TokenRotated", T, |n| {
            condition(n, "TokenAvailable").is_some_and(|(_, r, _)| r == "TokenRotated")
                && n.status
                    .as_ref()
                    .and_then(|s| s.token.as_ref())
                    .and_then(|t| t.token_id.as_ref())
                    != Some(&first_id)
        })
        .await;
    assert!(ready_is(&n, "True", "Bootstrapped"));
    assert!(
        n.status
            .as_ref()
            .unwrap()
            .token
            .as_ref()
            .unwrap()
            .last_rotated_at
            .is_some()
    );
    let (second, _) = stored(&env).await;
    assert_ne!(second, first);
    pat::check(&second).unwrap();
    support::wait_for("the old token to be deleted", T, || async {
        (!fake.state().tokens.contains_key(&first)).then_some(())
    })
    .await;
    let user = fake.state().tokens[&second].clone();
    assert_eq!(
        fake.state().tokens_of(&user),
        vec![second.clone()],
        "exactly one token left on the server"
    );
    let ann = support::wait_for("the previous-token marker to clear", T, || {
        let env = &env;
        async move {
            let (_, a) = stored(env).await;
            (!a.contains_key(ANN_PREVIOUS_TOKEN_ID)).then_some(a)
        }
    })
    .await;
    assert!(!ann.contains_key(ANN_ROTATION_STARTED_AT));
    assert!(ann.contains_key(ANN_TOKEN_ID));
    drop(ann);
    assert_eq!(fake.calls("setup"), 1);
    drop(op);
}

#[tokio::test]
async fn rotation_off_reports_token_expiring_soon() {
    let Some(env) = TestEnv::new("expiring").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let op = env.start_operator().await;
    env.create_instance("nb", spec(&fake.url, 30, false))
        .await
        .unwrap();
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    let (first, _) = stored(&env).await;
    op.stop().await;
    let _op = env.start_operator_ahead(21 * DAY).await;
    let n = env
        .wait_instance("nb", "TokenExpiringSoon", T, |n| {
            condition(n, "TokenAvailable").is_some_and(|(_, r, _)| r == "TokenExpiringSoon")
        })
        .await;
    assert!(
        condition(&n, "TokenAvailable")
            .unwrap()
            .2
            .contains("rotation is off")
    );
    assert_eq!(
        stored(&env).await.0,
        first,
        "rotation off: the token is kept"
    );
}

/// A crash right after the new token was created on the server and before it was stored: the token
/// in the Secret still works, and the extra token is found by name and deleted.
#[tokio::test]
async fn a_crash_during_rotation_leaves_one_working_token() {
    let Some(env) = TestEnv::new("rotation-crash").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let op = env.start_operator().await;
    env.create_instance("nb", spec(&fake.url, 30, true))
        .await
        .unwrap();
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    let (first, _) = stored(&env).await;
    op.stop().await;

    // the server creates the new token but answers late; the operator dies before the answer
    fake.fault("tokens_create", Fault::Delay(Duration::from_secs(3)));
    let op = env.start_operator_ahead(21 * DAY).await;
    support::wait_for("the new token to be created", T, || async {
        (fake.calls("tokens_create") > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    op.kill();
    let user = fake.state().tokens[&first].clone();
    assert_eq!(
        fake.state().tokens_of(&user).len(),
        2,
        "an extra token now exists on the server"
    );
    let (still, ann) = stored(&env).await;
    assert_eq!(still, first, "the Secret still holds the working token");
    assert!(ann.contains_key(ANN_ROTATION_STARTED_AT));

    fake.clear_fault("tokens_create");
    let _op = env.start_operator_ahead(21 * DAY).await;
    env.wait_instance("nb", "TokenRotated", T, |n| {
        condition(n, "TokenAvailable").is_some_and(|(_, r, _)| r == "TokenRotated")
    })
    .await;
    let (token, _) = support::wait_for("one token on the server", T, || {
        let env = &env;
        let fake = &fake;
        let user = user.clone();
        async move {
            let (t, a) = stored(env).await;
            (fake.state().tokens_of(&user) == vec![t.clone()]
                && !a.contains_key(ANN_PREVIOUS_TOKEN_ID))
            .then_some((t, a))
        }
    })
    .await;
    assert_ne!(token, first);
}

#[tokio::test]
async fn rotation_against_the_real_netbird_server() {
    let Some(env) = TestEnv::new("real-rotation").await else {
        return;
    };
    let _guard = support::netbird_lock().await;
    let Some(nb) = NetbirdServer::start().await else {
        return;
    };
    env.create_admin_secret().await;
    let op = env.start_operator().await;
    env.create_instance("nb", spec(&nb.url, 1, true))
        .await
        .unwrap();
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    env.wait_instance("nb", "token identified", T, |n| {
        n.status
            .as_ref()
            .and_then(|s| s.token.as_ref())
            .is_some_and(|t| t.token_id.is_some())
    })
    .await;
    let (first, _) = stored(&env).await;
    op.stop().await;

    // a one-day token, 17 hours later: renewed
    let _op = env
        .start_operator_ahead(Duration::from_secs(17 * 3600))
        .await;
    env.wait_instance("nb", "TokenRotated", T, |n| {
        condition(n, "TokenAvailable").is_some_and(|(_, r, _)| r == "TokenRotated")
    })
    .await;
    let second = support::wait_for("the previous token to be deleted", T, || {
        let env = &env;
        let first = first.clone();
        async move {
            let (t, a) = stored(env).await;
            (t != first && !a.contains_key(ANN_PREVIOUS_TOKEN_ID)).then_some(t)
        }
    })
    .await;
    let client = NetbirdClient::new(&nb.url, &ClientOptions::default()).unwrap();
    let me = client
        .current_user(&SecretString::from(second.clone()))
        .await
        .expect("the new token works");
    assert_eq!(me.email, "admin@example.com");
    let old = client
        .current_user(&SecretString::from(first))
        .await
        .unwrap_err();
    assert!(
        old.is_token_rejected(),
        "the old token was deleted on the server: {old}"
    );
    let tokens = client
        .list_tokens(&SecretString::from(second), &me.id)
        .await
        .unwrap();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert!(tokens[0].name.starts_with("netbird-operator."));
}

fn delete_spec(url: &str) -> serde_json::Value {
    let mut s = spec(url, 30, true);
    s["token"]["deletionPolicy"] = json!("Delete");
    s
}

#[tokio::test]
async fn delete_policy_deletes_the_token_on_the_server_through_a_finalizer() {
    let Some(env) = TestEnv::new("delete-policy").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let _op = env.start_operator().await;
    env.create_instance("nb", delete_spec(&fake.url))
        .await
        .unwrap();
    let n = env
        .wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    assert!(
        n.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"bootstrap.netbird.io/token-cleanup".to_string())
    );
    let secret = env.secrets().get("nb-token").await.unwrap();
    let refs = secret.metadata.owner_references.unwrap_or_default();
    assert_eq!(
        refs.len(),
        1,
        "Delete: the Secret is owned by the NetbirdInstance"
    );
    assert_eq!(refs[0].uid, n.metadata.uid.clone().unwrap());
    let (token, _) = stored(&env).await;
    assert!(fake.state().tokens.contains_key(&token));

    env.instances()
        .delete("nb", &Default::default())
        .await
        .unwrap();
    env.wait_instance_gone("nb").await;
    assert!(
        !fake.state().tokens.contains_key(&token),
        "the token was deleted on the server"
    );
    let events = env.events().await;
    assert!(
        events.iter().any(|(r, _)| r == "TokenDeleted"),
        "{events:?}"
    );
}

#[tokio::test]
async fn delete_policy_never_blocks_deletion_when_the_server_is_gone() {
    let Some(env) = TestEnv::new("delete-gone").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let _op = env.start_operator().await;
    env.create_instance("nb", delete_spec(&fake.url))
        .await
        .unwrap();
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    drop(fake); // the server is gone
    let t0 = std::time::Instant::now();
    env.instances()
        .delete("nb", &Default::default())
        .await
        .unwrap();
    env.wait_instance_gone_within("nb", Duration::from_secs(60))
        .await;
    eprintln!("let go after {:?}", t0.elapsed());
    let events = env.events().await;
    assert!(
        events.iter().any(|(r, _)| r == "TokenNotDeleted"),
        "{events:?}"
    );
}

/// The service user whose token the Secret holds, once the exchange has finished (the old token
/// deleted).
async fn service_user_holding_the_token(env: &TestEnv, fake: &FakeNetbird, what: &str) -> String {
    support::wait_for(what, T, || async move {
        let (t, a) = stored_opt(env).await?;
        let user = fake.state().tokens.get(&t).cloned()?;
        (fake.state().service_users.contains_key(&user) && !a.contains_key(ANN_PREVIOUS_TOKEN_ID))
            .then_some(user)
    })
    .await
}

fn service_user_spec(url: &str) -> serde_json::Value {
    let mut s = spec(url, 30, true);
    s["token"]["serviceUser"] = json!({"name": "netbird-operator"});
    s
}

#[tokio::test]
async fn the_setup_token_is_traded_for_a_service_user_token() {
    let Some(env) = TestEnv::new("service-user").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let _op = env.start_operator().await;
    env.create_instance("nb", service_user_spec(&fake.url))
        .await
        .unwrap();
    let svc = service_user_holding_the_token(&env, &fake, "the service user's token").await;
    let n = env
        .wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    assert_eq!(
        n.status.unwrap().token.unwrap().user_id.as_deref(),
        Some(svc.as_str())
    );
    let owner = fake.state().users.keys().next().cloned().unwrap();
    assert!(
        fake.state().tokens_of(&owner).is_empty(),
        "the setup token was deleted"
    );
    assert_eq!(fake.state().tokens_of(&svc).len(), 1);
    assert_eq!(fake.state().service_users.len(), 1);
    assert_eq!(fake.calls("setup"), 1);
}

#[tokio::test]
async fn service_user_exchange_against_the_real_netbird_server() {
    let Some(env) = TestEnv::new("real-service-user").await else {
        return;
    };
    let _guard = support::netbird_lock().await;
    let Some(nb) = NetbirdServer::start().await else {
        return;
    };
    env.create_admin_secret().await;
    let _op = env.start_operator().await;
    env.create_instance("nb", service_user_spec(&nb.url))
        .await
        .unwrap();
    let client = NetbirdClient::new(&nb.url, &ClientOptions::default()).unwrap();
    let n = env
        .wait_instance("nb", "Ready", Duration::from_secs(60), |n| {
            ready_is(n, "True", "Bootstrapped")
        })
        .await;
    let (token, ann) = support::wait_for("the exchange to finish", T, || {
        let env = &env;
        async move {
            let (t, a) = stored_opt(env).await?;
            (a.contains_key("bootstrap.netbird.io/service-user")
                && !a.contains_key(ANN_PREVIOUS_TOKEN_ID))
            .then_some((t, a))
        }
    })
    .await;
    let token = SecretString::from(token);
    // the real server refuses "current user" to service users; the token reads the service users
    let e = client.current_user(&token).await.unwrap_err();
    assert_eq!(e.status(), Some(403));
    let svc_id = &ann["bootstrap.netbird.io/user-id"];
    let me = client
        .list_service_users(&token)
        .await
        .expect("the service user's token works")
        .into_iter()
        .find(|u| &u.id == svc_id)
        .expect("the service user exists");
    assert_eq!(me.name, "netbird-operator");
    assert_eq!(me.role, "admin");
    let _ = n;
    env.wait_instance("nb", "the service user in status", T, |n| {
        n.status
            .as_ref()
            .and_then(|s| s.token.as_ref())
            .and_then(|t| t.user_id.as_deref())
            == Some(svc_id.as_str())
    })
    .await;
    let tokens = client.list_tokens(&token, &me.id).await.unwrap();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
}

/// Where a rotation is interrupted (the operator is killed while the server holds the named call).
#[derive(Clone, Copy, Debug)]
enum CrashPoint {
    /// the marker is written, the create call never reaches the server's handler
    BeforeCreate,
    /// the new token exists on the server, the answer never arrives
    AfterCreate,
    /// the new token is stored, its verification never answers
    AfterStore,
    /// the new token is verified, the old one's deletion never answers
    BeforeDeleteOld,
}

async fn crash_rotation_at(point: CrashPoint) {
    let Some(env) = TestEnv::new(&format!("crash-{point:?}").to_lowercase()).await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let op = env.start_operator().await;
    env.create_instance("nb", spec(&fake.url, 30, true))
        .await
        .unwrap();
    env.wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    env.wait_instance("nb", "token identified", T, |n| {
        n.status
            .as_ref()
            .and_then(|s| s.token.as_ref())
            .is_some_and(|t| t.token_id.is_some())
    })
    .await;
    let (first, _) = stored(&env).await;
    let user = fake.state().tokens[&first].clone();
    op.stop().await;

    match point {
        CrashPoint::BeforeCreate => fake.fault("tokens_create", Fault::Hang),
        CrashPoint::AfterCreate => {
            fake.fault("tokens_create", Fault::Delay(Duration::from_secs(30)))
        }
        CrashPoint::AfterStore => fake.fault("tokens_create", Fault::Delay(Duration::from_secs(1))),
        CrashPoint::BeforeDeleteOld => fake.fault("tokens_delete", Fault::Hang),
    }
    let op = env.start_operator_ahead(21 * DAY).await;
    let (endpoint, calls) = match point {
        CrashPoint::BeforeCreate | CrashPoint::AfterCreate => ("tokens_create", 1),
        CrashPoint::AfterStore => {
            // once the create went out, the verification that follows the store never answers
            support::wait_for("the create call", T, || async {
                (fake.calls("tokens_create") > 0).then_some(())
            })
            .await;
            fake.fault("users_current", Fault::Hang);
            ("users_current", fake.calls("users_current") + 1)
        }
        CrashPoint::BeforeDeleteOld => ("tokens_delete", 1),
    };
    support::wait_for("the crash point", T, || async {
        (fake.calls(endpoint) >= calls).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    op.kill();
    // at the crash: the Secret holds a token the server accepts
    let (held, _) = stored(&env).await;
    assert!(
        fake.state().tokens.contains_key(&held),
        "{point:?}: the Secret's token must work at every crash point"
    );

    for e in ["tokens_create", "tokens_delete", "users_current"] {
        fake.clear_fault(e);
    }
    let _op = env.start_operator_ahead(21 * DAY).await;
    let token = support::wait_for("exactly one working token", T, || {
        let env = &env;
        let fake = &fake;
        let user = user.clone();
        let first = first.clone();
        async move {
            let (t, a) = stored_opt(env).await?;
            let done = fake.state().tokens_of(&user) == vec![t.clone()]
                && t != first
                && !a.contains_key(ANN_PREVIOUS_TOKEN_ID)
                && !a.contains_key(ANN_ROTATION_STARTED_AT);
            done.then_some(t)
        }
    })
    .await;
    pat::check(&token).unwrap();
    env.wait_instance("nb", "TokenRotated", T, |n| {
        ready_is(n, "True", "Bootstrapped")
            && condition(n, "TokenAvailable").is_some_and(|(_, r, _)| r == "TokenRotated")
    })
    .await;
    assert_eq!(fake.calls("setup"), 1);
}

#[tokio::test]
async fn crash_before_the_new_token_is_created() {
    crash_rotation_at(CrashPoint::BeforeCreate).await;
}

#[tokio::test]
async fn crash_after_the_new_token_is_created() {
    crash_rotation_at(CrashPoint::AfterCreate).await;
}

#[tokio::test]
async fn crash_after_the_new_token_is_stored() {
    crash_rotation_at(CrashPoint::AfterStore).await;
}

#[tokio::test]
async fn crash_before_the_old_token_is_deleted() {
    crash_rotation_at(CrashPoint::BeforeDeleteOld).await;
}

#[tokio::test]
async fn changing_the_service_user_moves_the_token() {
    let Some(env) = TestEnv::new("service-user-change").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    env.create_admin_secret().await;
    let _op = env.start_operator().await;
    env.create_instance("nb", service_user_spec(&fake.url))
        .await
        .unwrap();
    let first_svc =
        service_user_holding_the_token(&env, &fake, "the first service user's token").await;
    let patch = json!({"spec": {"token": {"serviceUser": {"name": "another"}}}});
    env.instances()
        .patch(
            "nb",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let second_svc = support::wait_for("the second service user's token", T, || {
        let env = &env;
        let fake = &fake;
        let first_svc = first_svc.clone();
        async move {
            let (t, a) = stored_opt(env).await?;
            let user = fake.state().tokens.get(&t).cloned()?;
            (user != first_svc && !a.contains_key(ANN_PREVIOUS_TOKEN_ID)).then_some(user)
        }
    })
    .await;
    assert_eq!(fake.state().service_users[&second_svc], "another");
    assert!(
        fake.state().tokens_of(&first_svc).is_empty(),
        "the first service user's token was deleted"
    );
    assert_eq!(fake.state().tokens_of(&second_svc).len(), 1);
}

/// The exchange interrupted after the service user's token was created and before it was stored:
/// the setup token still works, and the extra service-user token is found and deleted.
#[tokio::test]
async fn a_crash_during_the_service_user_exchange_leaves_one_working_token() {
    let Some(env) = TestEnv::new("exchange-crash").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    env.create_admin_secret().await;
    fake.fault("tokens_create", Fault::Delay(Duration::from_secs(30)));
    let op = env.start_operator().await;
    env.create_instance("nb", service_user_spec(&fake.url))
        .await
        .unwrap();
    support::wait_for("the service user's token to be created", T, || async {
        (fake.calls("tokens_create") > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    op.kill();
    let (held, _) = stored(&env).await;
    assert!(
        fake.state().tokens.contains_key(&held),
        "the setup token still works"
    );
    let svc = fake.state().service_users.keys().next().cloned().unwrap();
    assert_eq!(
        fake.state().tokens_of(&svc).len(),
        1,
        "an extra service-user token exists"
    );

    fake.clear_fault("tokens_create");
    let _op = env.start_operator().await;
    support::wait_for(
        "one service-user token in the Secret, none left over",
        T,
        || {
            let env = &env;
            let fake = &fake;
            let svc = svc.clone();
            async move {
                let (t, a) = stored_opt(env).await?;
                let owner = fake.state().users.keys().next().cloned()?;
                let done = fake.state().tokens_of(&svc) == vec![t.clone()]
                    && fake.state().tokens_of(&owner).is_empty()
                    && !a.contains_key(ANN_PREVIOUS_TOKEN_ID)
                    && !a.contains_key(ANN_ROTATION_STARTED_AT);
                done.then_some(())
            }
        },
    )
    .await;
}

/// An instance set up by hand (or by another tool, or without the embedded IdP): a token put into
/// the operator's Secret is adopted, versions are recorded, and the token is rotated like any other.
#[tokio::test]
async fn a_hand_made_token_is_adopted_and_rotated() {
    let Some(env) = TestEnv::new("adopt-rotate").await else {
        return;
    };
    let fake = FakeNetbird::start().await;
    let hand_made = {
        let mut s = fake.state();
        s.setup_required = false;
        s.users.insert("owner1".into(), "ops@example.com".into());
        s.mint_named("owner1", "made-by-hand", 30)
    };
    env.create_admin_secret().await;
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "nb-token", "labels": {
            "app.kubernetes.io/managed-by": "netbird-operator", "bootstrap.netbird.io/instance": "nb"}},
        "stringData": {"NB_API_KEY": hand_made},
    }))
    .unwrap();
    env.secrets()
        .create(&Default::default(), &secret)
        .await
        .unwrap();
    let op = env.start_operator().await;
    env.create_instance("nb", spec(&fake.url, 30, true))
        .await
        .unwrap();
    let n = env
        .wait_instance("nb", "Ready", T, |n| ready_is(n, "True", "Bootstrapped"))
        .await;
    assert_eq!(condition(&n, "TokenAvailable").unwrap().1, "TokenAdopted");
    assert_eq!(condition(&n, "SetupComplete").unwrap().1, "AlreadySetUp");
    assert_eq!(
        n.status
            .as_ref()
            .unwrap()
            .version
            .as_ref()
            .unwrap()
            .management
            .as_deref(),
        Some("0.77.1")
    );
    env.wait_instance("nb", "token identified", T, |n| {
        n.status
            .as_ref()
            .and_then(|s| s.token.as_ref())
            .is_some_and(|t| t.expires_at.is_some() && t.token_id.is_some())
    })
    .await;
    op.stop().await;
    let _op = env.start_operator_ahead(21 * DAY).await;
    support::wait_for("the adopted token to be rotated", T, || {
        let env = &env;
        let fake = &fake;
        let hand_made = hand_made.clone();
        async move {
            let (t, a) = stored_opt(env).await?;
            let done = t != hand_made
                && fake.state().tokens_of("owner1") == vec![t.clone()]
                && !a.contains_key(ANN_PREVIOUS_TOKEN_ID);
            done.then_some(())
        }
    })
    .await;
    assert_eq!(fake.calls("setup"), 0);
}
