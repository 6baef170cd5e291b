//! A worker against the real PostgreSQL: order, repeated payloads, replies, lost connections.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::Subject;
use futures::StreamExt as _;
use pgws_proto::{Notification, NotifyReply};
use pgws_service::{Metrics, Shutdown};
use tokio::sync::watch;

use super::*;
use crate::batch::Request;
use crate::test_support::{client, eventually, listen, take, unique, DB_URI, NATS_URL, WAIT};

struct Setup {
    worker: Worker,
    metrics: BridgeMetrics,
    shutdown: Shutdown,
    app: String,
    replies: async_nats::Subscriber,
    inbox: Subject,
}

async fn setup() -> Setup {
    let nats = async_nats::connect(NATS_URL)
        .await
        .expect("NATS at 127.0.0.1:4222");
    let inbox = nats.new_inbox();
    let replies = nats.subscribe(inbox.clone()).await.expect("subscribe");
    nats.flush().await.expect("flush");
    let metrics = BridgeMetrics::register(&Metrics::new());
    let shutdown = Shutdown::new();
    let app = unique("worker");
    let mut pg = db::pg_config(DB_URI).expect("uri");
    pg.application_name(&app);
    let (up, _) = watch::channel(0);
    let mut worker = Worker::new(
        0,
        pg,
        Arc::new(up),
        nats,
        metrics.clone(),
        shutdown.clone(),
        true,
    );
    worker.conn = Some(worker.connect().await.expect("worker connects"));
    Setup {
        worker,
        metrics,
        shutdown,
        app,
        replies,
        inbox: Subject::from(inbox),
    }
}

fn request(channel: &str, payloads: &[&str], reply: &Subject) -> Request {
    Request {
        id: None,
        deadline: None,
        notifications: payloads
            .iter()
            .map(|p| Notification {
                id: None,
                channel: channel.to_owned(),
                payload: (*p).to_owned(),
            })
            .collect(),
        reply: Some(reply.clone()),
        span: tracing::Span::none(),
    }
}

async fn next_reply(replies: &mut async_nats::Subscriber) -> NotifyReply {
    let message = tokio::time::timeout(WAIT, replies.next())
        .await
        .expect("a reply in time")
        .expect("subscription open");
    serde_json::from_slice(&message.payload).expect("a NotifyReply")
}

#[tokio::test]
async fn a_batch_keeps_order_and_repeated_payloads() {
    let mut s = setup().await;
    let channel = unique("chan");
    let (_listener, mut notes) = listen(&channel).await;
    let mut batch = Batch::default();
    batch.push(request(&channel, &["a", "b"], &s.inbox));
    batch.push(request(&channel, &["a"], &s.inbox));
    batch.push(request(&channel, &["c", "c"], &s.inbox));
    s.worker.execute(batch).await;
    for _ in 0..3 {
        assert_eq!(next_reply(&mut s.replies).await, NotifyReply::ok());
    }
    assert_eq!(take(&mut notes, 5).await, ["a", "b", "a", "c", "c"]);
    assert_eq!(s.metrics.transactions.get(), 3);
    assert_eq!(s.metrics.requests_ok.get(), 3);

    // A second batch on the same connection: nothing left over from the first.
    let mut batch = Batch::default();
    batch.push(request(&channel, &["a", "a"], &s.inbox));
    s.worker.execute(batch).await;
    assert_eq!(next_reply(&mut s.replies).await, NotifyReply::ok());
    assert_eq!(take(&mut notes, 2).await, ["a", "a"]);
    drop(s.worker);
    s.shutdown.token.cancel();
    assert!(s.shutdown.drain(WAIT).await, "connection tasks end");
}

#[tokio::test]
async fn a_lost_connection_fails_the_batch() {
    let mut s = setup().await;
    let channel = unique("chan");
    let admin = client().await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&s.app],
        )
        .await
        .expect("terminate");
    let gone = s
        .worker
        .conn
        .as_ref()
        .map(|c| c.gone.clone())
        .expect("conn");
    eventually("the connection to be seen gone", || gone.is_cancelled()).await;
    let mut batch = Batch::default();
    batch.push(request(&channel, &["x"], &s.inbox));
    s.worker.execute(batch).await;
    let reply = next_reply(&mut s.replies).await;
    assert!(!reply.ok);
    assert_eq!(reply.error.as_deref(), Some(crate::batch::UNAVAILABLE));
    assert_eq!(s.metrics.requests_failed.get(), 1);
    assert_eq!(s.metrics.notify_errors.get(), 1);
}

/// A request with an id, as a gateway sends it, due in `due`.
fn with_id(mut request: Request, id: &str, due: Duration) -> Request {
    request.id = Some(id.to_owned());
    request.deadline = Some(SystemTime::now() + due);
    request
}

#[tokio::test]
async fn a_retried_request_is_notified_once_even_through_another_worker() {
    let mut s = setup().await;
    let mut other = setup().await;
    let channel = unique("chan");
    let id = unique("req");
    let (_listener, mut notes) = listen(&channel).await;
    let due = Duration::from_secs(30);
    // Repeats a pair itself, so it takes two transactions: each part is keyed on its own.
    let retried = || with_id(request(&channel, &["a", "b", "a"], &s.inbox), &id, due);
    let mut batch = Batch::default();
    batch.push(retried());
    s.worker.execute(batch).await;
    assert_eq!(next_reply(&mut s.replies).await, NotifyReply::ok());
    // The retry, alone and then behind a new request, on another connection.
    let mut batch = Batch::default();
    batch.push(retried());
    other.worker.execute(batch).await;
    let mut batch = Batch::default();
    batch.push(retried());
    batch.push(with_id(
        request(&channel, &["next"], &s.inbox),
        &unique("req"),
        due,
    ));
    other.worker.execute(batch).await;
    for _ in 0..3 {
        assert_eq!(next_reply(&mut s.replies).await, NotifyReply::ok());
    }
    assert_eq!(take(&mut notes, 4).await, ["a", "b", "a", "next"]);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), notes.recv())
            .await
            .is_err(),
        "a retried request was notified again"
    );
    assert_eq!(other.metrics.duplicates.get(), 6);
    // Without an id, a request is executed each time.
    let mut batch = Batch::default();
    batch.push(request(&channel, &["plain"], &s.inbox));
    batch.push(request(&channel, &["plain"], &s.inbox));
    other.worker.execute(batch).await;
    assert_eq!(take(&mut notes, 2).await, ["plain", "plain"]);
}

#[tokio::test]
async fn an_expired_request_is_answered_failed_and_not_notified() {
    let mut s = setup().await;
    let channel = unique("chan");
    let (_listener, mut notes) = listen(&channel).await;
    let mut batch = Batch::default();
    let mut late = with_id(
        request(&channel, &["late"], &s.inbox),
        &unique("req"),
        Duration::ZERO,
    );
    late.deadline = Some(SystemTime::now() - Duration::from_millis(1));
    batch.push(late);
    batch.push(with_id(
        request(&channel, &["on time"], &s.inbox),
        &unique("req"),
        Duration::from_secs(30),
    ));
    s.worker.execute(batch).await;
    let expired = next_reply(&mut s.replies).await;
    assert_eq!(expired.error.as_deref(), Some(crate::batch::EXPIRED));
    assert_eq!(next_reply(&mut s.replies).await, NotifyReply::ok());
    assert_eq!(take(&mut notes, 1).await, ["on time"]);
    assert_eq!(s.metrics.requests_expired.get(), 1);
}
