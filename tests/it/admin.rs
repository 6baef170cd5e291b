//! Admin listeners: health, readiness, metrics; graceful shutdown; slow consumers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgws_tests::{http_get, pg, unique, Service, ServiceKind, Stack};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn health_readiness_and_metrics_answer() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    for svc in stack.gateways.iter().chain(&stack.bridges) {
        assert_eq!(http_get(svc.admin, "/healthz").await?.0, 200);
        assert_eq!(http_get(svc.admin, "/readyz").await?.0, 200);
    }
    let mut ws = stack.connect(0, "chat", &json!({"mode": "rw"})).await?;
    ws.send_text("count me").await?;
    ws.next_json(T).await?;
    let (status, body) = http_get(stack.gateways[0].admin, "/metrics").await?;
    assert_eq!(status, 200);
    for family in [
        "pgws_gateway_connections_open{protocol=\"postgres-websockets\"} ",
        "pgws_gateway_client_messages_total 1",
        "pgws_gateway_slow_consumer_disconnects_total 0",
        "pgws_gateway_channels ",
    ] {
        assert!(body.contains(family), "missing {family} in\n{body}");
    }
    let (_, body) = http_get(stack.bridges[0].admin, "/metrics").await?;
    assert!(body.contains("pgws_bridge_"), "{body}");
    Ok(())
}

#[tokio::test]
async fn a_gateway_without_nats_is_alive_but_not_ready() -> anyhow::Result<()> {
    let env = vec![
        ("PGWS_JWT_SECRET".to_owned(), pgws_tests::SECRET.to_owned()),
        ("PGWS_NATS_URL".to_owned(), "nats://127.0.0.1:1".to_owned()),
        ("PGWS_PORT".to_owned(), "0".to_owned()),
        ("PGWS_ADMIN_PORT".to_owned(), "0".to_owned()),
    ];
    let gw = Service::start(ServiceKind::Gateway, &env).await?;
    assert_eq!(http_get(gw.admin, "/healthz").await?.0, 200);
    let (status, body) = http_get(gw.admin, "/readyz").await?;
    assert_eq!((status, body.trim()), (503, "not ready: nats, audit"));
    Ok(())
}

#[tokio::test]
async fn sigterm_closes_sockets_with_1001_and_loses_no_accepted_message() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    let db = pg().await?;
    // Watch the listen channel directly in PostgreSQL.
    let (listener, mut conn) =
        tokio_postgres::connect(&pgws_tests::db_uri(), tokio_postgres::NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(msg)) = futures::StreamExt::next(&mut stream).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                drop(tx.send(n.payload().to_owned()));
            }
        }
    });
    listener
        .batch_execute(&format!("LISTEN \"{}\"", stack.listen_channel))
        .await?;
    drop(db);
    let mut ws = stack.connect(0, "chat", &json!({"mode": "w"})).await?;
    let n = 300;
    for i in 0..n {
        ws.send_text(&format!("m{i}")).await?;
    }
    stack.gateways[0].signal("TERM")?;
    let (code, _) = ws.expect_close(T).await?;
    assert_eq!(code, 1001);
    let status = stack.gateways[0].wait_exit(Duration::from_secs(40)).await?;
    assert!(status.success(), "{status}");
    let mut got = Vec::new();
    while got.len() < n {
        let Ok(Some(p)) = tokio::time::timeout(T, rx.recv()).await else {
            break;
        };
        let v: serde_json::Value = serde_json::from_str(&p)?;
        if v["channel"] == "chat" {
            got.push(v["payload"].as_str().unwrap_or_default().to_owned());
        }
    }
    let expected: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    assert_eq!(
        got, expected,
        "accepted messages lost or reordered on shutdown"
    );
    Ok(())
}

#[tokio::test]
async fn a_reader_that_stops_reading_is_disconnected_not_buffered() -> anyhow::Result<()> {
    let stack = Stack::start_with(&[("PGWS_SEND_QUEUE", "16")]).await?;
    let channel = unique("flood-");
    // This client never reads.
    let _stalled = stack.connect(0, &channel, &json!({"mode": "r"})).await?;
    let mut healthy = stack.connect(0, &channel, &json!({"mode": "r"})).await?;
    let db = pg().await?;
    let body = "y".repeat(7000);
    let total = 1500;
    // The healthy reader keeps up, in a task of its own; the notifications wait for it to be
    // within a few messages (on a busy machine a 16-message queue is soon full otherwise).
    let received = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&received);
    let reader = tokio::spawn(async move {
        while count.load(Ordering::Relaxed) < total {
            healthy.next_text(T).await?;
            count.fetch_add(1, Ordering::Relaxed);
        }
        anyhow::Ok(())
    });
    for i in 0..total {
        let payload = json!({"channel": channel, "i": i, "body": body}).to_string();
        stack.notify(&db, &payload).await?;
        let caught_up = pgws_tests::eventually(T, || async {
            (i + 1).saturating_sub(received.load(Ordering::Relaxed)) <= 4
        })
        .await;
        assert!(caught_up, "the healthy reader stopped at {received:?}");
    }
    reader.await??;
    let kicked = pgws_tests::eventually(T, || async {
        stack.gateways[0]
            .metric("pgws_gateway_slow_consumer_disconnects_total")
            .await
            == Some(1.0)
    })
    .await;
    assert!(kicked, "the stalled reader was not disconnected");
    Ok(())
}
