//! Leadership and delivery against the real PostgreSQL and NATS (through the bus).

use std::time::Duration;

use pgws_proto::Prefix;
use pgws_service::{Metrics, Shutdown};

use std::sync::atomic::Ordering;

use pgws_bus::Subscription;
use pgws_proto::Presence;

use super::*;
use crate::db;
use crate::leader::{Election, LeaderState};
use crate::test_support::{bus, client, db_uri, eventually, unique, WAIT};

struct Bridge {
    state: Arc<LeaderState>,
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
    let bus = bus().await;
    let app = unique("listener");
    let mut pg = db::pg_config(&db_uri()).expect("uri");
    pg.application_name(&app);
    let metrics = BridgeMetrics::register(&Metrics::new());
    let first = db::connect_listening(&pg, &metrics.notifications_mended)
        .await
        .expect("connects");
    let state = Arc::new(LeaderState::default());
    let election = Election {
        pg,
        key: subjects.leader_lock_key(),
        metrics: metrics.clone(),
        state: state.clone(),
        duty: Listener {
            channel: channel.to_owned(),
            check_interval: check,
            subjects: subjects.clone(),
            bus,
            metrics: metrics.clone(),
            grace: Duration::from_secs(1),
            direct: pgws_config::DirectChannels::All,
            linger: Duration::ZERO,
            classes: tokio::sync::watch::channel(std::sync::Arc::default()).0,
            capture: None,
            settling: Arc::default(),
        },
    };
    let token = shutdown.token.child_token();
    shutdown.spawn(election.run(first, token.clone()));
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

async fn next(sub: &mut Subscription) -> String {
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
    let nats = bus().await;
    let mut room = nats
        .subscribe(subjects.deliver("room.1"))
        .await
        .expect("sub");
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

async fn report(nats: &Bus, subjects: &Subjects, channels: &[&str]) {
    let request = RegistryRequest {
        gateway: "g1".into(),
        op: RegistryOp::Report {
            presence: Presence {
                channels: channels.iter().map(|c| (*c).to_owned()).collect(),
                ..Presence::default()
            },
            part: None,
            version: None,
        },
    };
    let body = serde_json::to_vec(&request).expect("encodes");
    let answer = timeout(WAIT, nats.request(subjects.registry(), body.into()))
        .await
        .expect("answered in time")
        .expect("a leader answers");
    let reply: RegistryReply = serde_json::from_slice(&answer.payload).expect("reply");
    assert_eq!(reply, RegistryReply::Ok);
}

#[tokio::test]
async fn direct_channels_are_listened_while_reported() {
    let shutdown = Shutdown::new();
    let subjects = Subjects::new(Prefix::new(&unique("t")).expect("prefix"));
    let channel = unique("listen");
    let direct = unique("direct");
    let nats = bus().await;
    let mut deliveries = nats.subscribe(subjects.direct(&direct)).await.expect("sub");
    let db = client().await;
    let a = start(&shutdown, &subjects, &channel, None).await;
    eventually("a leads", || is_leader(&a)).await;

    // Answered only once LISTEN ran: a NOTIFY right after the answer is delivered.
    report(&nats, &subjects, &[&direct, &channel]).await;
    notify(&db, &direct, "not json at all").await;
    assert_eq!(next(&mut deliveries).await, "not json at all");
    assert_eq!(a.metrics.direct_channels.get(), 2);

    // Not reported any more: UNLISTENed, and the listen channel still delivers.
    report(&nats, &subjects, &[]).await;
    notify(&db, &direct, "after").await;
    assert!(
        timeout(Duration::from_millis(500), deliveries.next())
            .await
            .is_err(),
        "nothing after UNLISTEN"
    );
    let mut room = nats.subscribe(subjects.deliver("r")).await.expect("sub");
    notify(&db, &channel, r#"{"channel":"r"}"#).await;
    assert_eq!(next(&mut room).await, r#"{"channel":"r"}"#);

    shutdown.token.cancel();
    assert!(shutdown.drain(WAIT).await, "listeners stop");
}
