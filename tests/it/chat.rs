//! A postgres-websockets client chats through the stack, byte-compatible.

use std::time::Duration;

use pgws_tests::{now, pg, Stack};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_message_reaches_every_reader_with_the_reference_envelope() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let claims = json!({"mode": "rw", "channel": "chat", "user": "ann", "exp": now() + 300});
    let mut alice = stack.connect(0, "chat", &claims).await?;
    let mut bob = stack.connect(0, "chat", &json!({"mode": "r"})).await?;
    let mut other = stack.connect(0, "other", &json!({"mode": "r"})).await?;
    alice.send_text("hello \"world\"").await?;
    for ws in [&mut alice, &mut bob] {
        let msg = ws.next_json(T).await?;
        assert_eq!(msg["event"], "WebsocketMessage");
        assert_eq!(msg["channel"], "chat");
        assert_eq!(msg["payload"], "hello \"world\"");
        assert_eq!(msg["claims"]["mode"], "rw");
        assert_eq!(msg["claims"]["user"], "ann");
        assert_eq!(msg["claims"]["channel"], "chat");
        let at = msg["claims"]["message_delivered_at"]
            .as_f64()
            .expect("a number");
        assert!(
            (at - now() as f64).abs() < 60.0,
            "message_delivered_at {at}"
        );
        let keys: Vec<&str> = msg
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 4, "{keys:?}");
    }
    assert!(
        other.next_text(Duration::from_millis(500)).await.is_err(),
        "leaked to another channel"
    );
    Ok(())
}

#[tokio::test]
async fn a_database_notify_reaches_sockets_verbatim() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut ws = stack.connect(0, "room%201", &json!({"mode": "r"})).await?;
    let db = pg().await?;
    // Not an envelope of ours: any JSON object with a string channel is routed, verbatim.
    let payload = r#"{"channel":"room 1", "payload":"from sql", "extra":[1,2,3]}"#;
    stack.notify(&db, payload).await?;
    assert_eq!(ws.next_text(T).await?, payload);
    // Unroutable payloads are ignored and do not stop delivery.
    stack.notify(&db, "not json").await?;
    stack.notify(&db, r#"{"channel":5}"#).await?;
    let second = json!({"channel": "room 1", "n": 2}).to_string();
    stack.notify(&db, &second).await?;
    assert_eq!(ws.next_text(T).await?, second);
    Ok(())
}

#[tokio::test]
async fn a_token_for_several_channels_writes_to_each_and_reads_all() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let claims = json!({"mode": "rw", "channels": ["a", "b"], "channel": "c"});
    let url = format!("{}/{}", stack.ws_url(0), pgws_tests::token(&claims));
    let mut ws = pgws_tests::WsClient::connect(&url).await?;
    let mut reader_b = stack.connect(0, "b", &json!({"mode": "r"})).await?;
    ws.send_text("to all").await?;
    let mut channels = Vec::new();
    for _ in 0..3 {
        let msg = ws.next_json(T).await?;
        assert_eq!(msg["payload"], "to all");
        channels.push(msg["channel"].as_str().unwrap_or_default().to_owned());
    }
    channels.sort();
    assert_eq!(channels, ["a", "b", "c"]);
    assert_eq!(reader_b.next_json(T).await?["channel"], "b");
    Ok(())
}

#[tokio::test]
async fn read_only_and_write_only_sockets() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut reader = stack.connect(0, "chat", &json!({"mode": "r"})).await?;
    let mut writer = stack.connect(0, "chat", &json!({"mode": "w"})).await?;
    reader.send_text("not allowed").await?;
    let err = reader.next_json(T).await?;
    assert_eq!(err["event"], "Error");
    assert!(
        err["error"]
            .as_str()
            .unwrap_or_default()
            .contains("read-only"),
        "{err}"
    );
    writer.send_text("allowed").await?;
    assert_eq!(reader.next_json(T).await?["payload"], "allowed");
    // The writer does not read.
    assert!(writer.next_text(Duration::from_millis(500)).await.is_err());
    Ok(())
}

#[tokio::test]
async fn meta_channel_announces_open_and_close() -> anyhow::Result<()> {
    let stack = Stack::start_with(&[("PGWS_META_CHANNEL", "server-info")]).await?;
    let mut watcher = stack
        .connect(0, "server-info", &json!({"mode": "r"}))
        .await?;
    let claims = json!({"mode": "rw", "channels": ["x", "y"], "who": "carol"});
    let url = format!("{}/{}", stack.ws_url(0), pgws_tests::token(&claims));
    let ws = pgws_tests::WsClient::connect(&url).await?;
    let open = next_event(&mut watcher, "ConnectionOpen").await?;
    assert_eq!(open["channel"], "server-info");
    assert_eq!(open["payload"], "x,y");
    assert_eq!(open["claims"]["who"], "carol");
    drop(ws);
    let close = next_event(&mut watcher, "ConnectionClose").await?;
    assert_eq!(close["payload"], "x,y");
    assert_eq!(close["claims"]["who"], "carol");
    Ok(())
}

/// Skips the watcher's own connection events.
async fn next_event(ws: &mut pgws_tests::WsClient, event: &str) -> anyhow::Result<Value> {
    loop {
        let msg = ws.next_json(T).await?;
        if msg["event"] == event && msg["claims"]["who"] == "carol" {
            return Ok(msg);
        }
    }
}
