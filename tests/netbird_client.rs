//! The NetBird client against the in-process fake server (behaviour of shared/netbird-api.md).

mod support;

use std::time::Duration;

use netbird_operator::netbird::{
    ClientOptions, NetbirdClient, NetbirdError, ProxySettings, SetupRequest, TransportKind, pat,
};
use secrecy::{ExposeSecret, SecretString};
use support::fake_netbird::{FakeNetbird, Fault};

fn client(url: &str) -> NetbirdClient {
    NetbirdClient::new(
        url,
        &ClientOptions {
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .unwrap()
}

fn req(email: &str, password: &str, name: &str, days: i32) -> SetupRequest {
    SetupRequest {
        email: email.into(),
        password: SecretString::from(password),
        name: name.into(),
        create_pat: true,
        pat_expire_in: days,
    }
}

#[tokio::test]
async fn setup_returns_a_valid_token_once_then_412() {
    let fake = FakeNetbird::start().await;
    let c = client(&fake.url);
    assert!(c.instance_status().await.unwrap().setup_required);
    let r = c
        .setup(&req("a@example.com", "password1", "A", 30))
        .await
        .unwrap();
    let token = r.personal_access_token.expect("token");
    pat::check(token.expose_secret()).unwrap();
    assert!(
        !format!(
            "{:?}",
            c.setup(&req("a@example.com", "password1", "A", 30)).await
        )
        .contains("password1")
    );
    let user = c.current_user(&token).await.unwrap();
    assert_eq!(user.email, "a@example.com");
    let v = c.version(&token).await.unwrap();
    assert_eq!(v.management_current_version, "0.77.1");
    assert!(v.management_update_available);
    match c.setup(&req("a@example.com", "password1", "A", 30)).await {
        Err(NetbirdError::Api {
            status: 412,
            message,
            request_id,
            ..
        }) => {
            assert_eq!(message, "setup already completed");
            // a new request id on every answer, as NetBird sends
            assert!(request_id.is_some_and(|id| id.starts_with("fake-")));
        }
        other => panic!("{other:?}"),
    }
    assert!(!c.instance_status().await.unwrap().setup_required);
    let tokens = c.list_tokens(&token, &user.id).await.unwrap();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].name, "setup-token");
    // a user whose tokens carry no metadata: the server answers null, the client an empty list
    let bare = SecretString::from(fake.state().mint("someone"));
    assert!(
        c.list_tokens(&bare, "someone").await.unwrap().is_empty(),
        "null body is an empty list"
    );
    // create and delete
    let created = c
        .create_token(
            &token,
            &user.id,
            &netbird_operator::netbird::CreateTokenRequest {
                name: "x".into(),
                expires_in: 2,
            },
        )
        .await
        .unwrap();
    pat::check(created.plain_token.expose_secret()).unwrap();
    assert!(!format!("{created:?}").contains(created.plain_token.expose_secret()));
    c.delete_token(&token, &user.id, &created.personal_access_token.id)
        .await
        .unwrap();
    let e = c
        .delete_token(&token, &user.id, &created.personal_access_token.id)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404));
}

#[tokio::test]
async fn validation_runs_before_the_already_done_check() {
    let fake = FakeNetbird::start().await;
    fake.state().setup_required = false;
    let c = client(&fake.url);
    for (r, msg) in [
        (
            req("a@example.com", "short", "A", 30),
            "password must be at least 8 characters",
        ),
        (req("nope", "password1", "A", 30), "invalid email format"),
        (
            req("a@example.com", "password1", "A", 400),
            "pat_expire_in must be between 1 and 365",
        ),
    ] {
        match c.setup(&r).await {
            Err(e @ NetbirdError::Api { status: 422, .. }) => {
                assert_eq!(e.server_message(), Some(msg))
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn setup_without_the_pat_feature_has_no_token() {
    let fake = FakeNetbird::start().await;
    fake.state().pat_enabled = false;
    let r = client(&fake.url)
        .setup(&req("a@example.com", "password1", "A", 30))
        .await
        .unwrap();
    assert!(r.personal_access_token.is_none());
}

#[tokio::test]
async fn token_errors_are_401_or_404_and_malformed_tokens_never_leave() {
    let fake = FakeNetbird::start().await;
    let c = client(&fake.url);
    let unknown = SecretString::from(pat::from_secret("abcdefghijabcdefghijabcdefghij"));
    let e = c.current_user(&unknown).await.unwrap_err();
    assert_eq!(e.status(), Some(404));
    assert!(e.is_token_rejected());
    let before = fake.calls("users_current");
    let e = c
        .current_user(&SecretString::from("nbp_tooshort"))
        .await
        .unwrap_err();
    assert!(matches!(e, NetbirdError::MalformedToken(_)));
    assert_eq!(
        fake.calls("users_current"),
        before,
        "a malformed token is not sent"
    );
    assert!(!e.to_string().contains("nbp_tooshort"));
}

#[tokio::test]
async fn faults_become_typed_errors() {
    let fake = FakeNetbird::start().await;
    let c = client(&fake.url);

    fake.fault("instance", Fault::Status(500, "internal server error"));
    let e = c.instance_status().await.unwrap_err();
    assert_eq!(e.status(), Some(500));
    assert!(e.is_transient());
    // the request id is for logs and Events, never in the message a condition carries
    assert!(!e.to_string().contains("request id"), "{e}");
    assert!(e.with_request_id().contains("(request id fake-"), "{e}");

    fake.fault("instance", Fault::NonJson(502));
    let e = c.instance_status().await.unwrap_err();
    assert_eq!(e.status(), Some(502));
    assert!(e.to_string().contains("bad gateway"), "{e}");

    fake.fault(
        "instance",
        Fault::Redirect("https://user:secret@elsewhere.example/api/instance"),
    );
    let e = c.instance_status().await.unwrap_err();
    assert!(
        matches!(e, NetbirdError::Redirect { status: 302, .. }),
        "{e:?}"
    );
    assert!(!e.to_string().contains("secret"), "{e}");

    fake.fault("instance", Fault::Huge);
    assert!(matches!(
        c.instance_status().await.unwrap_err(),
        NetbirdError::TooLarge { .. }
    ));

    fake.fault("instance", Fault::Hang);
    let e = c.instance_status().await.unwrap_err();
    assert!(
        matches!(
            e,
            NetbirdError::Transport {
                kind: TransportKind::Timeout,
                ..
            }
        ),
        "{e:?}"
    );

    fake.fault("instance", Fault::Close);
    assert!(matches!(
        c.instance_status().await.unwrap_err(),
        NetbirdError::Transport { .. }
    ));

    fake.fault("setup", Fault::Status(200, "not a setup answer"));
    let e = c
        .setup(&req("a@example.com", "password1", "A", 30))
        .await
        .unwrap_err();
    assert!(
        matches!(e, NetbirdError::Decode { status: 200, .. }),
        "{e:?}"
    );
    assert!(!e.to_string().contains("password1"));
}

#[tokio::test]
async fn connection_refused_is_a_connect_error() {
    let port = support::free_port();
    let e = client(&format!("http://127.0.0.1:{port}"))
        .instance_status()
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            NetbirdError::Transport {
                kind: TransportKind::Connect,
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn tls_to_a_plain_http_server_is_a_tls_error() {
    let fake = FakeNetbird::start().await;
    let e = client(&fake.url.replace("http://", "https://"))
        .instance_status()
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            NetbirdError::Transport {
                kind: TransportKind::Tls,
                ..
            }
        ),
        "{e:?}"
    );
}

/// `HTTPS_PROXY`: an https:// server is reached through a CONNECT tunnel to its host (TLS verified
/// end to end: the proxy sees the host and port only); `NO_PROXY` naming the host goes straight to
/// it, and `HTTP_PROXY` alone is not used for https://.
#[tokio::test]
async fn https_goes_through_the_proxy_unless_no_proxy_names_the_host() {
    let (fake, ca) = FakeNetbird::start_tls(&["127.0.0.1"]).await;
    let proxy = support::proxy::Proxy::start().await;
    let client = |proxy: ProxySettings| {
        NetbirdClient::new(
            &fake.url,
            &ClientOptions {
                extra_ca_pem: Some(ca.clone().into_bytes()),
                request_timeout: Duration::from_secs(5),
                proxy,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let authority = fake.url.trim_start_matches("https://").to_string();
    client(ProxySettings {
        https: Some(proxy.url.clone()),
        ..Default::default()
    })
    .instance_status()
    .await
    .expect("through the tunnel");
    assert_eq!(proxy.seen().tunnels, vec![authority.clone()]);
    assert_eq!(fake.calls("instance"), 1);

    for direct in [
        ProxySettings {
            https: Some(proxy.url.clone()),
            no_proxy: Some("nb.example.com, 127.0.0.1".into()),
            ..Default::default()
        },
        ProxySettings {
            http: Some(proxy.url.clone()),
            ..Default::default()
        },
    ] {
        client(direct).instance_status().await.expect("direct");
    }
    assert_eq!(fake.calls("instance"), 3);
    assert_eq!(proxy.seen().tunnels.len(), 1, "{:?}", proxy.seen());
    assert!(proxy.seen().requests.is_empty());
}
