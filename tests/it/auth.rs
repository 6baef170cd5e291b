//! Handshakes: where tokens come from, and the reference's refusals.

use std::time::Duration;

use pgws_tests::{now, token, Stack, WsClient};
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
