//! The audit stream: every accepted client message captured once, with its id; a full stream
//! refuses new messages instead of losing records.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream::RetentionPolicy};
use futures::StreamExt;
use pgws_tests::{nats_url, Stack};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);

/// Reads every envelope of the stack's audit stream (an ephemeral consumer that acks nothing),
/// and how many stream messages held several envelopes.
async fn records(
    stack: &Stack,
    expected: usize,
) -> anyhow::Result<(Vec<(Value, String, String)>, usize)> {
    let js = jetstream::new(async_nats::connect(nats_url()).await?);
    let stream = js.get_stream(format!("{}-audit", stack.prefix)).await?;
    let consumer = stream
        .create_consumer(pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let mut out = Vec::new();
    let mut several = 0;
    let mut batch = consumer
        .fetch()
        .max_messages(expected + 10)
        .expires(Duration::from_secs(2))
        .messages()
        .await?;
    while let Some(msg) = batch.next().await {
        let msg = msg.map_err(|e| anyhow::anyhow!(e))?;
        let headers = msg.headers.clone().unwrap_or_default();
        let id = headers
            .get("Nats-Msg-Id")
            .map(|v| v.to_string())
            .unwrap_or_default();
        let channel = headers
            .get("Pgws-Notify-Channel")
            .map(|v| v.to_string())
            .unwrap_or_default();
        // A record of several envelopes lists their ids (proto/CONTRACT.md).
        match headers.get("Pgws-Msg-Ids") {
            None => out.push((serde_json::from_slice(&msg.payload)?, id, channel)),
            Some(ids) => {
                several += 1;
                let parts: Vec<&[u8]> = msg.payload.split(|b| *b == b'\n').collect();
                let ids: Vec<&str> = ids.as_str().split(',').collect();
                assert_eq!(ids.len(), parts.len(), "ids and envelopes pair up");
                assert_eq!(ids[0], id, "Nats-Msg-Id is the first id");
                for (id, part) in ids.into_iter().zip(parts) {
                    out.push((
                        serde_json::from_slice(part)?,
                        id.to_owned(),
                        channel.clone(),
                    ));
                }
            }
        }
    }
    Ok((out, several))
}

#[tokio::test]
async fn every_accepted_message_is_recorded_once_with_its_id() -> anyhow::Result<()> {
    let stack = Stack::start_with(&[("PGWS_META_CHANNEL", "meta")]).await?;
    // The stream exists as soon as a gateway is ready, before any message.
    let js = jetstream::new(async_nats::connect(nats_url()).await?);
    let mut stream = js.get_stream(format!("{}-audit", stack.prefix)).await?;
    let info = stream.info().await?;
    assert_eq!(info.config.retention, RetentionPolicy::WorkQueue);
    let mut ws = stack
        .connect(0, "audited", &json!({"mode": "rw", "who": "dora"}))
        .await?;
    for i in 0..20 {
        ws.send_text(&format!("a{i}")).await?;
    }
    for _ in 0..20 {
        ws.next_json(T).await?;
    }
    drop(ws);
    // The probe socket's and this socket's connection events are recorded too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (all, several) = records(&stack, 30).await?;
    // Frames sent back to back wait for the request in flight and go as one record.
    assert!(several >= 1, "no record of several envelopes");
    let messages: Vec<&(Value, String, String)> = all
        .iter()
        .filter(|(v, _, _)| v["event"] == "WebsocketMessage")
        .collect();
    let payloads: Vec<&str> = messages
        .iter()
        .map(|(v, _, _)| v["payload"].as_str().unwrap_or_default())
        .collect();
    let expected: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
    assert_eq!(payloads, expected);
    for (v, _, channel) in &messages {
        assert_eq!(v["channel"], "audited");
        assert_eq!(v["claims"]["who"], "dora");
        assert_eq!(channel, &stack.listen_channel);
    }
    let ids: HashSet<&String> = all.iter().map(|(_, id, _)| id).collect();
    assert_eq!(ids.len(), all.len(), "ids are not unique");
    assert!(ids.iter().all(|id| !id.is_empty()));
    let events: Vec<&str> = all
        .iter()
        .filter(|(v, _, _)| v["claims"]["who"] == "dora")
        .map(|(v, _, _)| v["event"].as_str().unwrap_or_default())
        .filter(|e| *e != "WebsocketMessage")
        .collect();
    assert_eq!(events, ["ConnectionOpen", "ConnectionClose"]);
    Ok(())
}

#[tokio::test]
async fn a_full_audit_stream_refuses_new_messages_with_an_error() -> anyhow::Result<()> {
    let stack = Stack::start_with(&[
        ("PGWS_AUDIT_MAX_BYTES", "4000"),
        ("PGWS_NOTIFY_TIMEOUT", "1"),
    ])
    .await?;
    let mut ws = stack.connect(0, "full", &json!({"mode": "rw"})).await?;
    let body = "z".repeat(500);
    let mut accepted = 0;
    let mut refused = None;
    for _ in 0..30 {
        ws.send_text(&body).await?;
        let msg = ws.next_json(T).await?;
        if msg["event"] == "Error" {
            refused = Some(msg["error"].as_str().unwrap_or_default().to_owned());
            break;
        }
        accepted += 1;
    }
    let refused = refused.expect("the stream never filled");
    assert!(refused.contains("audit stream"), "{refused}");
    assert!(accepted >= 1);
    // Everything the database got is in the stream.
    let (recorded, _) = records(&stack, accepted + 5).await?;
    let full: Vec<_> = recorded
        .iter()
        .filter(|(v, _, _)| v["channel"] == "full")
        .collect();
    assert_eq!(full.len(), accepted);
    Ok(())
}

#[tokio::test]
async fn direct_channel_messages_are_audited_as_envelopes() -> anyhow::Result<()> {
    let direct = pgws_tests::unique("direct-");
    let stack = Stack::start_with(&[("PGWS_DIRECT_CHANNELS", &direct)]).await?;
    let claims = json!({"mode": "rw", "user": "ann"});
    let mut ws = stack.connect(0, &direct, &claims).await?;
    ws.send_text("one").await?;
    ws.send_text("two").await?;
    // Both NOTIFYed (the socket reads its own channel), so both were recorded before.
    for _ in 0..2 {
        ws.next_text(T).await?;
    }
    let (recorded, _) = records(&stack, 2).await?;
    let mine: Vec<_> = recorded.iter().filter(|(_, _, c)| *c == direct).collect();
    assert_eq!(mine.len(), 2, "{recorded:?}");
    for ((envelope, id, _), text) in mine.into_iter().zip(["one", "two"]) {
        assert!(!id.is_empty());
        assert_eq!(envelope["event"], "WebsocketMessage");
        assert_eq!(envelope["channel"], direct.as_str());
        assert_eq!(envelope["payload"], text);
        assert_eq!(envelope["claims"]["user"], "ann");
        assert!(envelope["claims"]["message_delivered_at"].is_number());
    }
    Ok(())
}
