//! Handshakes: where tokens come from, the reference's refusals, and keys from a JWKS URL.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use pgws_tests::{eventually, now, token, Service, ServiceKind, Stack, WsClient};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

async fn refusal(url: &str) -> String {
    WsClient::refusal(url, &[]).await
}

#[tokio::test]
async fn refusals_are_http_400_with_the_reference_messages() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let base = stack.ws_url(0);
    let cases = [
        (
            format!(
                "{base}/chat/{}",
                token(&json!({"mode": "r", "exp": now() - 10}))
            ),
            "refused 400: Token expired",
        ),
        (
            format!("{base}/chat/{}", token(&json!({"channel": "chat"}))),
            "refused 400: Missing mode",
        ),
        (
            format!("{base}/{}", token(&json!({"mode": "rw"}))),
            "refused 400: No allowed channels",
        ),
        (
            format!(
                "{base}/chat/{}",
                token(&json!({"mode": "rw", "channels": ["a"]}))
            ),
            "refused 400: No allowed channels",
        ),
        (
            format!("{base}/chat/{}", token(&json!({"mode": "x"}))),
            "refused 400: Invalid mode",
        ),
    ];
    for (url, expected) in &cases {
        assert_eq!(&refusal(url).await, expected, "{url}");
    }
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"mode": "rw"}),
        &jsonwebtoken::EncodingKey::from_secret(b"another secret"),
    )?;
    assert!(refusal(&format!("{base}/chat/{forged}"))
        .await
        .starts_with("refused 400: Error: "));
    // alg "none": header {"alg":"none"} and no signature.
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJtb2RlIjoicncifQ.";
    assert!(refusal(&format!("{base}/chat/{none}"))
        .await
        .starts_with("refused 400: Error: "));
    assert!(refusal(&format!("{base}/chat/not-a-token"))
        .await
        .starts_with("refused 400: Error: "));
    let refused = stack.gateways[0]
        .metric("pgws_gateway_handshakes_refused_total{reason=\"expired\"}")
        .await;
    assert_eq!(refused, Some(1.0));
    Ok(())
}

#[tokio::test]
async fn tokens_can_stay_out_of_the_path() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let base = stack.ws_url(0);
    let jwt = token(&json!({"mode": "rw"}));
    let mut query = WsClient::connect(&format!("{base}/chat?token={jwt}")).await?;
    let bearer = format!("Bearer {jwt}");
    let mut header =
        WsClient::connect_with(&format!("{base}/chat"), &[("authorization", &bearer)]).await?;
    let offer = format!("pgws, {jwt}");
    let mut proto = WsClient::connect_with(
        &format!("{base}/chat"),
        &[("sec-websocket-protocol", &offer)],
    )
    .await?;
    assert_eq!(proto.protocol.as_deref(), Some("pgws"));
    query.send_text("q").await?;
    for ws in [&mut query, &mut header, &mut proto] {
        let msg = ws.next_json(T).await?;
        assert_eq!(
            (msg["channel"].as_str(), msg["payload"].as_str()),
            (Some("chat"), Some("q"))
        );
    }
    Ok(())
}

#[tokio::test]
async fn jwks_from_a_file_and_base64_secrets_work_end_to_end() -> anyhow::Result<()> {
    let keys =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../libs/pgws-auth/tests/keys");
    let jwks = format!("@{}", keys.join("jwks.json").to_string_lossy());
    let mut stack = Stack::new();
    stack.add_bridge(&[]).await?;
    stack.add_gateway(&[("PGWS_JWT_SECRET", &jwks)]).await?;
    use base64::Engine as _;
    let raw = b"\x00binary\xffsecret bytes for hmac";
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    stack
        .add_gateway(&[
            ("PGWS_JWT_SECRET", &b64),
            ("PGWS_JWT_SECRET_BASE64", "true"),
        ])
        .await?;
    // A third gateway with the stack's usual secret, for the readiness probe.
    stack.add_gateway(&[]).await?;
    stack.wait_flowing(2).await?;

    let pem = std::fs::read(keys.join("rsa_private.pem"))?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("rsa-1".to_owned());
    let rs256 = jsonwebtoken::encode(
        &header,
        &json!({"mode": "rw"}),
        &jsonwebtoken::EncodingKey::from_rsa_pem(&pem)?,
    )?;
    let mut a = WsClient::connect(&format!("{}/jwk/{rs256}", stack.ws_url(0))).await?;
    // The same token against the base64 HMAC gateway is refused; an HMAC token is accepted.
    assert!(refusal(&format!("{}/jwk/{rs256}", stack.ws_url(1)))
        .await
        .starts_with("refused 400: Error: "));
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"mode": "rw"}),
        &jsonwebtoken::EncodingKey::from_secret(raw),
    )?;
    let mut b = WsClient::connect(&format!("{}/jwk/{hs}", stack.ws_url(1))).await?;
    a.send_text("signed with RSA").await?;
    assert_eq!(b.next_json(T).await?["payload"], "signed with RSA");
    // Algorithm confusion: HS256 signed with the RSA public key's PEM is refused.
    let public = std::fs::read(keys.join("rsa_public.pem"))?;
    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"mode": "rw"}),
        &jsonwebtoken::EncodingKey::from_secret(&public),
    )?;
    assert!(refusal(&format!("{}/jwk/{confused}", stack.ws_url(0)))
        .await
        .starts_with("refused 400: Error: "));
    Ok(())
}

#[tokio::test]
async fn audience_issuer_and_clock_skew_can_be_required() -> anyhow::Result<()> {
    // A flowing stack, and a second gateway with the requirements.
    let mut stack = Stack::start().await?;
    let strict = stack
        .add_gateway(&[
            ("PGWS_JWT_AUD", "pgws"),
            ("PGWS_JWT_ISS", "https://auth.example"),
            ("PGWS_JWT_LEEWAY", "30"),
        ])
        .await?;
    let base = stack.ws_url(strict);
    let url = |claims: serde_json::Value| format!("{base}/chat/{}", token(&claims));
    let iss = "https://auth.example";
    let cases = [
        (
            json!({"mode": "r", "iss": iss, "aud": "other"}),
            "refused 400: Error: JWT not in audience",
        ),
        (
            json!({"mode": "r", "aud": "pgws"}),
            "refused 400: Error: JWT issuer not accepted",
        ),
        (
            json!({"mode": "r", "iss": "https://evil.example"}),
            "refused 400: Error: JWT issuer not accepted",
        ),
        (
            json!({"mode": "r", "iss": iss, "exp": now() - 60}),
            "refused 400: Token expired",
        ),
    ];
    for (claims, expected) in cases {
        assert_eq!(refusal(&url(claims.clone())).await, expected, "{claims}");
    }
    // Within the leeway: a token that expired 10 s ago or becomes valid in 10 s; an `aud`
    // array naming us; no `aud` at all (PostgREST's rule).
    for claims in [
        json!({"mode": "r", "iss": iss, "aud": "pgws", "exp": now() - 10}),
        json!({"mode": "r", "iss": iss, "aud": ["x", "pgws"], "nbf": now() + 10}),
        json!({"mode": "r", "iss": iss}),
    ] {
        let mut ws = WsClient::connect(&url(claims.clone())).await?;
        let db = stack.pg().await?;
        let payload = json!({"channel": "chat", "n": 1}).to_string();
        stack.notify(&db, &payload).await?;
        assert_eq!(ws.next_text(T).await?, payload, "{claims}");
    }
    Ok(())
}

fn test_keys() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../libs/pgws-auth/tests/keys")
}

/// An RS256 token for channel `chat` with `kid`, signed with the private key in `pem_file`.
fn rs256(pem_file: &str, kid: &str) -> anyhow::Result<String> {
    let pem = std::fs::read(test_keys().join(pem_file))?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    Ok(jsonwebtoken::encode(
        &header,
        &json!({"mode": "rw", "channel": "chat"}),
        &jsonwebtoken::EncodingKey::from_rsa_pem(&pem)?,
    )?)
}

/// A JWKS document holding the public JWKs in `files`.
fn jwks_of(files: &[&str]) -> anyhow::Result<String> {
    let mut keys = Vec::new();
    for f in files {
        keys.push(serde_json::from_slice::<serde_json::Value>(
            &std::fs::read(test_keys().join(f))?,
        )?);
    }
    Ok(json!({ "keys": keys }).to_string())
}

/// What the JWKS endpoint answers.
#[derive(Clone)]
enum Served {
    Document(String),
    Status(StatusCode),
    Garbage,
    /// Answers after a minute.
    Hang,
}

/// A JWKS endpoint in the test process, counting the requests it gets.
#[derive(Clone)]
struct JwksServer {
    served: Arc<Mutex<Served>>,
    hits: Arc<AtomicUsize>,
    addr: SocketAddr,
}

impl JwksServer {
    async fn start(first: Served) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let server = JwksServer {
            served: Arc::new(Mutex::new(first)),
            hits: Arc::default(),
            addr: listener.local_addr()?,
        };
        let app = axum::Router::new()
            .route("/.well-known/jwks.json", axum::routing::get(Self::answer))
            .with_state(server.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(server)
    }

    async fn answer(State(server): State<JwksServer>) -> Response {
        server.hits.fetch_add(1, Ordering::SeqCst);
        let served = server.served.lock().expect("served").clone();
        match served {
            Served::Document(doc) => ([("content-type", "application/json")], doc).into_response(),
            Served::Status(status) => (status, "unavailable").into_response(),
            Served::Garbage => "<html>not a key set</html>".into_response(),
            Served::Hang => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                "too late".into_response()
            }
        }
    }

    fn serve(&self, what: Served) {
        *self.served.lock().expect("served") = what;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }
}

/// The settings of `stack` for a gateway whose keys come from `url` instead of the stack's
/// secret, refreshed every `refresh` seconds.
fn jwks_gateway_env(stack: &Stack, url: &str, refresh: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = stack
        .env()
        .into_iter()
        .filter(|(k, _)| k != "PGWS_JWT_SECRET")
        .collect();
    env.push(("PGWS_JWKS_URL".to_owned(), url.to_owned()));
    env.push(("PGWS_JWKS_REFRESH".to_owned(), refresh.to_owned()));
    env
}

#[tokio::test]
async fn keys_from_a_jwks_url_rotate_without_a_restart() -> anyhow::Result<()> {
    let server = JwksServer::start(Served::Document(jwks_of(&["rsa_public.jwk.json"])?)).await?;
    let mut stack = Stack::new();
    stack.add_bridge(&[]).await?;
    // An hour: within the test, only tokens with unknown key ids make the gateway fetch.
    let env = jwks_gateway_env(&stack, &server.url(), "3600");
    let gateway = Service::start(ServiceKind::Gateway, &env).await?;
    gateway.wait_ready().await?;
    let pid = gateway.pid();
    stack.gateways.push(gateway);
    let gw = &stack.gateways[0];
    let base = stack.ws_url(0);
    let url = |jwt: &str| format!("{base}/chat/{jwt}");
    let metric = |name: &'static str| async move { gw.metric(name).await.unwrap_or(0.0) };
    assert_eq!(server.hits(), 1, "one fetch at start");

    // Key A, published at start.
    let a = rs256("rsa_private.pem", "rsa-1")?;
    let mut ws_a = WsClient::connect(&url(&a)).await?;
    assert_eq!(server.hits(), 1, "a known key id needs no fetch");

    // Rotation: the endpoint now publishes B only. A token with kid B makes the gateway fetch.
    server.serve(Served::Document(jwks_of(&["rsa2_public.jwk.json"])?));
    let b = rs256("rsa2_private.pem", "rsa-2")?;
    let mut ws_b = WsClient::connect(&url(&b)).await?;
    assert_eq!(server.hits(), 2);
    assert_eq!(
        metric("pgws_gateway_jwks_refreshes_total{trigger=\"unknown_kid\"}").await,
        1.0
    );
    ws_b.send_text("signed with B").await?;
    assert_eq!(ws_a.next_json(T).await?["payload"], "signed with B");

    // A flood of made-up key ids: refused, and the endpoint is not hammered (at most one more
    // fetch, should the interval have passed meanwhile).
    let before = server.hits();
    for i in 0..20 {
        let forged = rs256("rsa_private.pem", &format!("forged-{i}"))?;
        assert_eq!(
            refusal(&url(&forged)).await,
            "refused 400: Error: unknown key id"
        );
    }
    assert!(
        server.hits() <= before + 1,
        "{} fetches",
        server.hits() - before
    );
    // A was withdrawn.
    assert_eq!(
        refusal(&url(&a)).await,
        "refused 400: Error: unknown key id"
    );

    // The endpoint fails, answers garbage, answers a document over 1 MiB (holding A only:
    // were it taken, B would be refused), then hangs: B keeps working, never-published kids
    // are refused without waiting for the endpoint (at most 2 s), and each failed refresh
    // (asked for by an unknown kid once the interval has passed) is counted.
    let never = rs256("rsa_private.pem", "never-published")?;
    let oversized = jwks_of(&["rsa_public.jwk.json"])?.replacen(
        "{",
        &format!("{{\"padding\": \"{}\", ", "x".repeat(2 << 20)),
        1,
    );
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    for (round, what) in [
        Served::Status(StatusCode::INTERNAL_SERVER_ERROR),
        Served::Garbage,
        Served::Document(oversized),
        Served::Hang,
    ]
    .into_iter()
    .enumerate()
    {
        server.serve(what);
        let failures = (round + 1) as f64;
        let failed = eventually(Duration::from_secs(40), || async {
            let started = tokio::time::Instant::now();
            let refused = refusal(&url(&never)).await == "refused 400: Error: unknown key id";
            let took = started.elapsed();
            {
                let mut slowest = slowest.lock().expect("slowest");
                *slowest = (*slowest).max(took);
            }
            refused && metric("pgws_gateway_jwks_refresh_failures_total").await >= failures
        })
        .await;
        assert!(
            failed,
            "round {round}: no failed refresh counted:\n{}",
            gw.log()
        );
        assert_eq!(refusal(&url(&b)).await, "accepted", "round {round}");
    }
    // 2 s of waiting for the endpoint, and a generous margin for a loaded machine.
    let slowest = *slowest.lock().expect("slowest");
    assert!(
        slowest < Duration::from_secs(8),
        "a refusal took {slowest:?}"
    );
    assert_eq!(metric("pgws_gateway_jwks_keys").await, 1.0);
    assert!(gw
        .log()
        .contains("jwks refresh failed, keeping the last good keys"));
    assert_eq!(gw.pid(), pid, "the same gateway process throughout");
    Ok(())
}

#[tokio::test]
async fn keys_from_a_jwks_url_are_refreshed_on_schedule() -> anyhow::Result<()> {
    let server = JwksServer::start(Served::Document(jwks_of(&["rsa_public.jwk.json"])?)).await?;
    let mut stack = Stack::new();
    stack.add_bridge(&[]).await?;
    let env = jwks_gateway_env(&stack, &server.url(), "1");
    let gateway = Service::start(ServiceKind::Gateway, &env).await?;
    gateway.wait_ready().await?;
    stack.gateways.push(gateway);
    let gw = &stack.gateways[0];
    // B is published beside A; the gateway learns it with no token asking.
    server.serve(Served::Document(jwks_of(&[
        "rsa_public.jwk.json",
        "rsa2_public.jwk.json",
    ])?));
    let learned = eventually(Duration::from_secs(20), || async {
        gw.metric("pgws_gateway_jwks_keys").await == Some(2.0)
    })
    .await;
    assert!(learned, "the new key never arrived:\n{}", gw.log());
    let b = rs256("rsa2_private.pem", "rsa-2")?;
    assert_eq!(
        refusal(&format!("{}/chat/{b}", stack.ws_url(0))).await,
        "accepted"
    );
    let by_kid = gw
        .metric("pgws_gateway_jwks_refreshes_total{trigger=\"unknown_kid\"}")
        .await;
    assert_eq!(by_kid, None, "no refresh for an unknown kid was needed");
    assert!(gw
        .metric("pgws_gateway_jwks_refreshes_total{trigger=\"schedule\"}")
        .await
        .is_some_and(|n| n >= 1.0));
    Ok(())
}

#[tokio::test]
async fn a_gateway_without_its_jwks_does_not_start() -> anyhow::Result<()> {
    let server = JwksServer::start(Served::Status(StatusCode::SERVICE_UNAVAILABLE)).await?;
    let stack = Stack::new();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Service::command(
            ServiceKind::Gateway,
            &jwks_gateway_env(&stack, &server.url(), "300"),
        )
        .stderr(std::process::Stdio::piped())
        .output(),
    )
    .await??;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("fetching the JWKS from http://")
            && err.contains("(3 attempts)")
            && err.contains("503"),
        "{err}"
    );
    assert_eq!(server.hits(), 3);
    Ok(())
}

#[tokio::test]
async fn an_https_jwks_url_needs_a_trusted_certificate() -> anyhow::Result<()> {
    // A test CA and a certificate for localhost signed by it.
    let dir = pgws_tests::test_certificates("pgws-jwks-tls-", "DNS:localhost")?;
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::write(
        dir.join("www/jwks.json"),
        jwks_of(&["rsa_public.jwk.json"])?,
    )?;
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();

    // The HTTPS endpoint: a gateway serving the folder as static files over TLS.
    let mut stack = Stack::new();
    stack.add_bridge(&[]).await?;
    let (cert, key, www) = (path("leaf.pem"), path("leaf.key"), path("www"));
    let https = stack
        .add_gateway(&[
            ("PGWS_CERTIFICATE_FILE", &cert),
            ("PGWS_KEY_FILE", &key),
            ("PGWS_ROOT_PATH", &www),
        ])
        .await?;
    let port = stack.gateways[https].addr.expect("listening").port();
    let url = format!("https://localhost:{port}/jwks.json");

    // Without the CA the certificate is not trusted: no keys, no start.
    let env = jwks_gateway_env(&stack, &url, "300");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Service::command(ServiceKind::Gateway, &env)
            .stderr(std::process::Stdio::piped())
            .output(),
    )
    .await??;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("fetching the JWKS from https://localhost:"),
        "{err}"
    );

    // With it (SSL_CERT_FILE), the keys are fetched and a token signed with A is accepted.
    let mut env = env;
    env.push(("SSL_CERT_FILE".to_owned(), path("ca.pem")));
    let gateway = Service::start(ServiceKind::Gateway, &env).await?;
    gateway.wait_ready().await?;
    stack.gateways.push(gateway);
    let a = rs256("rsa_private.pem", "rsa-1")?;
    let base = stack.ws_url(stack.gateways.len() - 1);
    assert_eq!(refusal(&format!("{base}/chat/{a}")).await, "accepted");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// Runs `pgws-token` with the stack's settings and `args`: (exit code, stdout, stderr).
fn token_tool(stack: &Stack, args: &[&str]) -> anyhow::Result<(Option<i32>, String, String)> {
    let out = std::process::Command::new(pgws_tests::binary_path("pgws-token"))
        .args(args)
        .env_clear()
        .envs(stack.env())
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn the_token_tool_mints_what_the_gateway_accepts() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    // The test stack runs the public sample secret: refused without --local.
    let (code, out, err) = token_tool(&stack, &["--channels", "chat", "--mode", "rw"])?;
    assert_eq!((code, out.as_str()), (Some(1), ""), "{err}");
    assert!(err.contains("--local"), "{err}");

    let args = [
        "--channels",
        "chat",
        "--mode",
        "rw",
        "--exp",
        "10m",
        "--claim",
        "sub=alice",
        "--local",
    ];
    let (code, jwt, err) = token_tool(&stack, &args)?;
    assert_eq!(code, Some(0), "{err}");
    let base = stack.ws_url(0);
    let mut ws = WsClient::connect(&format!("{base}/chat/{jwt}")).await?;
    ws.send_text("minted").await?;
    let message = ws.next_json(T).await?;
    assert_eq!(message["payload"], "minted");
    assert_eq!(message["claims"]["sub"], "alice");
    // The token names its channels: another one is refused, as for any token.
    assert_eq!(
        WsClient::refusal(&format!("{base}/other/{jwt}"), &[]).await,
        "refused 400: No allowed channels"
    );
    // A bad option: usage and exit status 2.
    let (code, _, err) = token_tool(&stack, &["--mode", "x"])?;
    assert_eq!(code, Some(2));
    assert!(
        err.contains("r, w or rw") && err.contains("usage:"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn a_refresh_frame_moves_the_expiry_and_only_narrows_the_socket() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let pg = stack.pg().await?;
    let now = now();
    let claims = |mode: &str, channels: &[&str], exp: u64| json!({"sub": "alice", "mode": mode, "channels": channels, "refresh": true, "exp": exp});
    let first = token(&claims("rw", &["chat", "room"], now + 3));
    let mut ws = WsClient::connect(&format!("{}/{first}", stack.ws_url(0))).await?;
    let refresh = |t: String| format!("\0refresh {t}");

    // Refusals: the socket stays as it was.
    for (t, needle) in [
        ("garbage".to_owned(), "token refused"),
        (
            token(
                &json!({"sub": "bob", "mode": "r", "channels": ["chat"], "refresh": true,
                           "exp": now + 60}),
            ),
            "carries the socket's claims",
        ),
        (token(&claims("rw", &["other"], now + 60)), "allows none"),
    ] {
        ws.send_text(&refresh(t)).await?;
        let reply = ws.next_json(T).await?;
        assert_eq!(reply["event"], "Error", "{reply}");
        assert_eq!(reply["request"], "refresh", "{reply}");
        assert!(
            reply["error"].as_str().unwrap_or("").contains(needle),
            "{reply}"
        );
    }

    // Narrower (read-only, one channel) and later: accepted.
    ws.send_text(&refresh(token(&claims("r", &["chat"], now + 60))))
        .await?;
    let reply = ws.next_json(T).await?;
    assert_eq!(
        reply,
        json!({"event": "TokenRefreshed", "expires_at": now + 60, "channels": ["chat"], "mode": "r"})
    );
    // It cannot widen again.
    ws.send_text(&refresh(token(&claims("rw", &["chat"], now + 90))))
        .await?;
    let reply = ws.next_json(T).await?;
    assert!(
        reply["error"].as_str().unwrap_or("").contains("widen"),
        "{reply}"
    );

    // Past the first token's expiry the socket lives, reads chat only and writes nothing.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let room = json!({"channel": "room", "n": 1}).to_string();
    let chat = json!({"channel": "chat", "n": 2}).to_string();
    stack.notify(&pg, &room).await?;
    stack.notify(&pg, &chat).await?;
    assert_eq!(ws.next_text(T).await?, chat);
    ws.send_text("hello").await?;
    let reply = ws.next_json(T).await?;
    assert!(
        reply["error"].as_str().unwrap_or("").contains("read-only"),
        "{reply}"
    );

    // Without the refresh claim the frame is a message like any other (refused: it holds NUL).
    let plain = token(&json!({"mode": "rw", "channels": ["chat"]}));
    let mut old = WsClient::connect(&format!("{}/{plain}", stack.ws_url(0))).await?;
    old.send_text(&refresh(token(&claims("r", &["chat"], now + 60))))
        .await?;
    let reply = old.next_json(T).await?;
    assert!(
        reply["error"].as_str().unwrap_or("").contains("NUL"),
        "{reply}"
    );
    Ok(())
}
