//! Start-up: invalid configuration fails at once with every problem listed; what
//! postgres-websockets accepts starts the gateway.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use pgws_tests::{eventually, http_get, Service, ServiceKind, Stack, WsClient};
use serde_json::json;

/// The settings of postgres-websockets' `sample-env` (github.com/diogob/postgres-websockets),
/// values as a shell sourcing it sets them.
const SAMPLE_ENV: &[(&str, &str)] = &[
    ("PGWS_DB_URI", "@./database-uri.txt"),
    ("PGWS_POOL_SIZE", "10"),
    ("PGWS_ROOT_PATH", "./client-example"),
    ("PGWS_LISTEN_CHANNEL", "postgres-websockets-listener"),
    ("PGWS_META_CHANNEL", "server-info"),
    ("PGWS_HOST", "*4"),
    ("PGWS_PORT", "3000"),
    (
        "PGWS_JWT_SECRET",
        "auwhfdnskjhewfi34uwehdlaehsfkuaeiskjnfduierhfsiweskjcnzeiluwhskdewishdnpwe",
    ),
    ("PGWS_JWT_SECRET_BASE64", "False"),
    ("PGWS_CHECK_LISTENER_INTERVAL", "10000"),
];

async fn run_to_exit(kind: ServiceKind, env: &[(&str, &str)]) -> anyhow::Result<(i32, String)> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Service::command(kind, &env)
            .stderr(std::process::Stdio::piped())
            .output(),
    )
    .await??;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn the_gateway_lists_every_configuration_problem() -> anyhow::Result<()> {
    let (code, err) = run_to_exit(
        ServiceKind::Gateway,
        &[
            ("PGWS_CERTIFICATE_FILE", "/nonexistent.pem"),
            ("PGWS_PORT", "http"),
            ("PGWS_HOST", "no-such-host.invalid"),
            // A file is a mistake; a folder that does not exist only a warning (below).
            ("PGWS_ROOT_PATH", "Cargo.toml"),
        ],
    )
    .await?;
    assert_eq!(code, 64, "{err}");
    for needle in [
        "PGWS_JWT_SECRET is required",
        "TLS needs both",
        "PGWS_PORT",
        "PGWS_HOST: invalid value \"no-such-host.invalid\"",
        "PGWS_ROOT_PATH: \"Cargo.toml\" is not a directory",
    ] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
    Ok(())
}

#[tokio::test]
async fn the_bridge_needs_a_database_uri_and_gives_up_after_its_retries() -> anyhow::Result<()> {
    let (code, err) = run_to_exit(ServiceKind::Bridge, &[]).await?;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("PGWS_DB_URI is required"), "{err}");
    let (code, err) = run_to_exit(
        ServiceKind::Bridge,
        &[
            ("PGWS_DB_URI", "postgres://postgres@127.0.0.1:1/postgres"),
            ("PGWS_RETRIES", "2"),
            ("PGWS_ADMIN_PORT", "0"),
        ],
    )
    .await?;
    assert_ne!(code, 0, "{err}");
    assert_ne!(code, 64, "{err}");
    Ok(())
}

#[tokio::test]
async fn the_gateway_takes_its_token_keys_from_one_place() -> anyhow::Result<()> {
    let cases: [(&[(&str, &str)], &str); 3] = [
        (
            &[
                ("PGWS_JWT_SECRET", "reallyreallyreallyreallyverysafe"),
                ("PGWS_JWKS_URL", "https://idp.example/.well-known/jwks.json"),
            ],
            "PGWS_JWT_SECRET and PGWS_JWKS_URL are both set",
        ),
        (
            &[("PGWS_JWKS_URL", "ftp://idp.example/jwks.json")],
            "PGWS_JWKS_URL: scheme \"ftp\": only http and https",
        ),
        (
            &[
                ("PGWS_JWT_SECRET", "reallyreallyreallyreallyverysafe"),
                ("PGWS_JWKS_REFRESH", "60"),
            ],
            "PGWS_JWKS_REFRESH is set but PGWS_JWKS_URL is not",
        ),
    ];
    for (env, needle) in cases {
        let (code, err) = run_to_exit(ServiceKind::Gateway, env).await?;
        assert_eq!(code, 64, "{err}");
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
    Ok(())
}

/// `port` on the loopback address of `addr`'s family (the gateway logs `0.0.0.0` or `[::]`).
fn loopback(addr: SocketAddr) -> SocketAddr {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    addr
}

#[tokio::test]
async fn postgres_websockets_sample_env_starts_the_stack_unchanged() -> anyhow::Result<()> {
    // Relative to the working directory, as in postgres-websockets' checkout: not here.
    assert!(!std::path::Path::new("./client-example").exists());
    let mut env: Vec<(String, String)> = SAMPLE_ENV
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    // Only what must differ in a test: its database, its NATS namespace, free ports.
    for (k, v) in [
        ("PGWS_DB_URI", pgws_tests::db_uri()),
        ("PGWS_PORT", "0".to_owned()),
        ("PGWS_ADMIN_PORT", "0".to_owned()),
        ("PGWS_NATS_URL", pgws_tests::nats_url()),
        ("PGWS_NATS_PREFIX", pgws_tests::unique("t")),
    ] {
        env.retain(|(name, _)| name != k);
        env.push((k.to_owned(), v));
    }
    let bridge = Service::start(ServiceKind::Bridge, &env).await?;
    bridge.wait_ready().await?;
    let gateway = Service::start(ServiceKind::Gateway, &env).await?;
    gateway.wait_ready().await?;
    let addr = gateway.addr.context("listening")?;
    assert!(
        addr.is_ipv4() && addr.ip().is_unspecified(),
        "*4 bound {addr}"
    );
    let addr = loopback(addr);
    assert!(
        eventually(Duration::from_secs(5), || async {
            gateway.log().contains("no static files are served")
        })
        .await,
        "no warning about the missing root path:\n{}",
        gateway.log()
    );
    assert_eq!(http_get(addr, "/client.html").await?.0, 404);
    for log in [gateway.log(), bridge.log()] {
        assert!(!log.contains("unknown setting"), "{log}");
    }

    let channel = pgws_tests::unique("sample-");
    let claims = json!({"mode": "rw", "channel": channel, "exp": pgws_tests::now() + 300});
    // PGWS_JWT_SECRET_BASE64=False: the secret is the text itself.
    let secret = SAMPLE_ENV
        .iter()
        .find(|(k, _)| *k == "PGWS_JWT_SECRET")
        .map(|(_, v)| *v)
        .unwrap_or_default();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?;
    let url = format!("ws://{addr}/{channel}/{token}");
    let mut ws = WsClient::connect(&url).await?;
    let wrong = format!("ws://{addr}/{channel}/{}", pgws_tests::token(&claims));
    assert!(WsClient::connect(&wrong).await.is_err(), "another secret");
    // Through the bridge and PostgreSQL's "postgres-websockets-listener" and back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        ws.send_text("hello from sample-env").await?;
        if let Ok(msg) = ws.next_json(Duration::from_secs(2)).await {
            assert_eq!(msg["channel"], channel.as_str());
            assert_eq!(msg["payload"], "hello from sample-env");
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the message never came back:\n{}\n{}",
            gateway.log(),
            bridge.log()
        );
    }
    Ok(())
}

#[tokio::test]
async fn the_gateway_listens_on_any_host_and_on_a_host_name() -> anyhow::Result<()> {
    let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    let mut stack = Stack::new();
    stack.add_gateway(&[("PGWS_HOST", "*")]).await?;
    stack.add_gateway(&[("PGWS_HOST", "localhost")]).await?;
    let any = stack.gateways[0].addr.context("listening")?;
    assert!(any.ip().is_unspecified(), "* bound {any}");
    let mut reach = vec![SocketAddr::from(([127, 0, 0, 1], any.port()))];
    if ipv6 {
        assert!(any.is_ipv6(), "* bound {any} on a host with IPv6");
        reach.push((std::net::Ipv6Addr::LOCALHOST, any.port()).into());
    }
    let named = stack.gateways[1].addr.context("listening")?;
    assert!(named.ip().is_loopback(), "localhost bound {named}");
    reach.push(named);
    let token = pgws_tests::token(&json!({"mode": "r"}));
    for addr in reach {
        let mut ws = WsClient::connect(&format!("ws://{addr}/chat/{token}")).await?;
        assert!(
            ws.next_text(Duration::from_millis(200)).await.is_err(),
            "{addr}: nothing to read yet"
        );
    }
    Ok(())
}
