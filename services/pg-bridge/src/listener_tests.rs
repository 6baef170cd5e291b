//! Leadership and delivery against the real PostgreSQL and NATS.

use std::time::Duration;

use pgws_proto::Prefix;
use pgws_service::{Metrics, Shutdown};

use super::*;
use crate::test_support::{client, eventually, unique, DB_URI, NATS_URL, WAIT};

struct Bridge {
    state: Arc<ListenerState>,
    metrics: BridgeMetrics,
    token: CancellationToken,
    app: String,
}

/// Starts a listener task on `shutdown`, with its own stop token and application name.
async fn start(
    shutdown: &Shutdown,
    subjects: &Subjects,
    channel: &str,
    check: Option<Duration>,
) -> Bridge {
    let nats = async_nats::connect(NATS_URL)
        .await
        .expect("NATS at 127.0.0.1:4222");
    let app = unique("listener");
    let mut pg = db::pg_config(DB_URI).expect("uri");
    pg.application_name(&app);
    let first = db::connect(&pg).await.expect("connects");
    let state = Arc::new(ListenerState::default());
    let metrics = BridgeMetrics::register(&Metrics::new());
    let listener = Listener {
        pg,
        channel: channel.to_owned(),
        check_interval: check,
        subjects: subjects.clone(),
        nats,
        metrics: metrics.clone(),
        state: state.clone(),
    };
    let token = shutdown.token.child_token();
    shutdown.spawn(listener.run(first, token.clone()));
    Bridge {
        state,
        metrics,
        token,
        app,
    }
}

fn is_leader(b: &Bridge) -> bool {
    b.state.leader.load(Ordering::Acquire)
}

async fn notify(db: &Client, channel: &str, payload: &str) {
    db.execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await
        .expect("notify");
}

async fn next(sub: &mut async_nats::Subscriber) -> String {
    let message = timeout(WAIT, sub.next())
        .await
        .expect("a delivery in time")
        .expect("subscription open");
    String::from_utf8(message.payload.to_vec()).expect("utf-8")
}

#[tokio::test]
async fn one_leader_delivers_and_leadership_moves() {
    let shutdown = Shutdown::new();
    let subjects = Subjects::new(Prefix::new(&unique("t")).expect("prefix"));
    let channel = unique("listen");
    let nats = async_nats::connect(NATS_URL).await.expect("NATS");
    let mut room = nats
        .subscribe(subjects.deliver("room.1"))
        .await
        .expect("sub");
    nats.flush().await.expect("flush");
    let db = client().await;

    let a = start(&shutdown, &subjects, &channel, None).await;
    eventually("a leads", || is_leader(&a)).await;
    let b = start(
        &shutdown,
        &subjects,
        &channel,
        Some(Duration::from_millis(200)),
    )
    .await;
    eventually("b connected", || b.state.connected.load(Ordering::Acquire)).await;
    assert!(!is_leader(&b), "only one leader");
    assert!(a.state.ready() && b.state.ready());

    let first = r#"{"event":"WebsocketMessage","channel":"room.1","payload":"hi"}"#;
    notify(&db, &channel, "not json").await;
    notify(&db, &channel, first).await;
    notify(&db, &channel, first).await;
    assert_eq!(next(&mut room).await, first);
    assert_eq!(
        next(&mut room).await,
        first,
        "repeats in separate transactions arrive"
    );
    assert_eq!(a.metrics.unroutable.get(), 1);
    assert_eq!(a.metrics.published.get(), 2);
    assert_eq!(a.metrics.leader.get(), 1);

    // The leader stops: b takes over within about a second and delivers.
    a.token.cancel();
    eventually("a steps down", || !is_leader(&a)).await;
    eventually("b leads", || is_leader(&b)).await;
    let second = r#"{"channel":"room.1","n":2}"#;
    notify(&db, &channel, second).await;
    assert_eq!(next(&mut room).await, second);

    // b's session is killed: it reconnects and leads again.
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        &[&b.app],
    )
    .await
    .expect("terminate");
    eventually("b loses the lead", || !is_leader(&b)).await;
    eventually("b leads again", || is_leader(&b)).await;
    assert_eq!(b.metrics.listener_reconnects.get(), 1);
    let third = r#"{"channel":"room.1","n":3}"#;
    notify(&db, &channel, third).await;
    assert_eq!(next(&mut room).await, third);

    shutdown.token.cancel();
    assert!(shutdown.drain(WAIT).await, "listeners stop");
    assert!(!is_leader(&b));
    assert_eq!(b.metrics.listener_connected.get(), 0);
}
