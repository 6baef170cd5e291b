//! Frames the reference mishandles: too large, binary, invalid UTF-8; pings; expiry.

use std::time::Duration;

use pgws_tests::{now, Stack};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn an_oversized_message_gets_an_error_and_the_socket_stays_usable() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut ws = stack.connect(0, "chat", &json!({"mode": "rw"})).await?;
    ws.send_text(&"x".repeat(7900)).await?;
    let err = ws.next_json(T).await?;
    assert_eq!(err["event"], "Error");
    let text = err["error"].as_str().unwrap_or_default();
    assert!(
        text.contains("too large") && text.contains("7999"),
        "{text}"
    );
    ws.send_text("small").await?;
    assert_eq!(ws.next_json(T).await?["payload"], "small");
    let metric = stack.gateways[0]
        .metric("pgws_gateway_client_messages_refused_total{reason=\"too_large\"}")
        .await;
    assert_eq!(metric, Some(1.0));
    Ok(())
}

#[tokio::test]
async fn binary_frames_are_text_when_utf8_and_refused_otherwise() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut ws = stack.connect(0, "chat", &json!({"mode": "rw"})).await?;
    ws.send_binary("héllo".as_bytes()).await?;
    assert_eq!(ws.next_json(T).await?["payload"], "héllo");
    ws.send_binary(&[0xff, 0xfe, 0x00]).await?;
    let err = ws.next_json(T).await?;
    assert_eq!(err["event"], "Error");
    assert!(err["error"].as_str().unwrap_or_default().contains("UTF-8"));
    ws.send_text("nul \u{0} inside").await?;
    let err = ws.next_json(T).await?;
    assert!(
        err["error"].as_str().unwrap_or_default().contains("NUL"),
        "{err}"
    );
    ws.send_text("after").await?;
    assert_eq!(ws.next_json(T).await?["payload"], "after");
    Ok(())
}

#[tokio::test]
async fn an_expiring_token_closes_the_socket_with_3001() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut ws = stack
        .connect(0, "chat", &json!({"mode": "r", "exp": now() + 2}))
        .await?;
    let (code, reason) = ws.expect_close(Duration::from_secs(10)).await?;
    assert_eq!((code, reason.as_str()), (3001, "JWT expired"));
    Ok(())
}

#[tokio::test]
async fn pings_keep_live_peers_and_drop_silent_ones() -> anyhow::Result<()> {
    let stack = Stack::start_with(&[("PGWS_PING_INTERVAL", "1")]).await?;
    let mut live = stack.connect(0, "chat", &json!({"mode": "rw"})).await?;
    let mut silent = stack.connect(0, "chat", &json!({"mode": "r"})).await?;
    // The live client keeps reading, so tungstenite answers every ping.
    let mut pings = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(3500);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Message::Ping(_)) = live.next_frame(Duration::from_millis(200)).await {
            pings += 1;
        }
    }
    assert!(pings >= 2, "only {pings} pings");
    live.send_text("still here").await?;
    assert_eq!(live.next_json(T).await?["payload"], "still here");
    // The silent client read nothing for 3.5 s: no pongs, so the server dropped it.
    let mut ended = false;
    for _ in 0..50 {
        match silent.next_frame(Duration::from_secs(2)).await {
            Ok(Message::Ping(_)) | Ok(Message::Text(_)) => continue,
            _ => {
                ended = true;
                break;
            }
        }
    }
    assert!(ended, "a peer that never answered pings is still connected");
    Ok(())
}

#[tokio::test]
async fn without_a_bridge_the_client_gets_an_error_not_silence() -> anyhow::Result<()> {
    let mut stack = Stack::new();
    stack.add_gateway(&[("PGWS_NOTIFY_TIMEOUT", "1")]).await?;
    let mut ws = stack.connect(0, "chat", &json!({"mode": "rw"})).await?;
    ws.send_text("nobody listens").await?;
    let err = ws.next_json(T).await?;
    assert_eq!(err["event"], "Error");
    let text = err["error"].as_str().unwrap_or_default();
    assert!(
        text.contains("1 message(s) could not be delivered"),
        "{text}"
    );
    assert_eq!(
        stack.gateways[0]
            .metric("pgws_gateway_notify_failures_total")
            .await,
        Some(1.0)
    );
    Ok(())
}

/// RFC 6455 7.4.1: a text frame that is not UTF-8 is answered with close 1007, on every
/// protocol (here postgres-websockets and `/live`), not a dropped connection.
#[tokio::test]
async fn a_text_frame_that_is_not_utf8_gets_close_1007() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let live_url = format!(
        "{}/live?token={}",
        stack.ws_url(0),
        pgws_tests::token(&json!({"sub": "ann"}))
    );
    let chat = stack.connect(0, "chat", &json!({"mode": "rw"})).await?;
    let live = pgws_tests::WsClient::connect(&live_url).await?;
    for mut ws in [chat, live] {
        ws.send_raw_text(&[b'{', 0xff, b'}']).await?;
        let (code, reason) = ws.expect_close(T).await?;
        assert_eq!(code, 1007, "{reason}");
        assert!(reason.contains("UTF-8"), "{reason}");
    }
    Ok(())
}
