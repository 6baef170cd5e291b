//! The intake and workers together, through the real NATS (the bus on it) and PostgreSQL.

use std::collections::HashMap;
use std::time::Duration;

use pgws_bus::BusError;
use pgws_proto::{Notification, NotifyRequest, Prefix};
use pgws_service::Metrics;

use super::*;
use crate::db;
use crate::test_support::{bus, db_uri, eventually, listen, take, unique, Proxy, WAIT};

async fn ask(nats: &Bus, subject: &str, body: Vec<u8>) -> NotifyReply {
    let reply = tokio::time::timeout(WAIT, nats.request(subject, body.into()))
        .await
        .expect("a reply in time")
        .expect("a reply");
    serde_json::from_slice(&reply.payload).expect("a NotifyReply")
}

fn body(channel: &str, payloads: &[String]) -> Vec<u8> {
    let request = NotifyRequest::new(
        payloads
            .iter()
            .map(|p| Notification {
                id: None,
                channel: channel.to_owned(),
                payload: p.clone(),
            })
            .collect(),
    );
    serde_json::to_vec(&request).expect("encodes")
}

#[tokio::test]
async fn requests_over_nats_are_executed_in_order_and_answered() {
    let nats = bus().await;
    let subjects = Subjects::new(Prefix::new(&unique("t")).expect("prefix"));
    let metrics = BridgeMetrics::register(&Metrics::new());
    let shutdown = Shutdown::new();
    let (fatal, _fatal_rx) = mpsc::channel(1);
    let notifier = Notifier {
        pg: db::pg_config(&db_uri()).expect("uri"),
        subjects: subjects.clone(),
        pool_size: 2,
        batch_size: 12,
        bus: nats.clone(),
        metrics: metrics.clone(),
        dedup: true,
        audit: None,
    };
    let up = notifier.spawn(&shutdown, fatal);
    eventually("both workers connected", || *up.borrow() == 2).await;
    let notify = subjects.notify();
    // The intake subscribes once a worker is up: ask until someone answers.
    let deadline = Instant::now() + WAIT;
    while nats
        .request(notify.clone(), body("unused", &[]).into())
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the intake never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let channel = unique("chan");
    let (_listener, mut notes) = listen(&channel).await;
    let requests = 20;
    let mut calls = Vec::new();
    for r in 0..requests {
        let payloads = [
            format!("r{r}-0"),
            "dup".to_owned(),
            format!("r{r}-1"),
            "dup".to_owned(),
        ];
        calls.push(ask(&nats, &notify, body(&channel, &payloads)));
    }
    calls.push(ask(&nats, &notify, body("", &["x".to_owned()])));
    calls.push(ask(&nats, &notify, b"not json".to_vec()));
    let replies = futures::future::join_all(calls).await;
    for reply in &replies[..requests] {
        assert_eq!(reply, &NotifyReply::ok());
    }
    let invalid = &replies[requests];
    assert!(!invalid.ok);
    assert_eq!(
        invalid.error.as_deref(),
        Some("notification 0: empty channel")
    );
    assert!(!replies[requests + 1].ok);

    let got = take(&mut notes, requests * 4).await;
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for payload in &got {
        *seen.entry(payload.as_str()).or_default() += 1;
    }
    assert_eq!(
        seen.get("dup"),
        Some(&(2 * requests)),
        "every repeated payload arrives"
    );
    for r in 0..requests {
        let own: Vec<&String> = got
            .iter()
            .filter(|p| p.starts_with(&format!("r{r}-")))
            .collect();
        assert_eq!(
            own,
            [&format!("r{r}-0"), &format!("r{r}-1")],
            "order inside a request"
        );
    }
    assert_eq!(metrics.requests_invalid.get(), 2);
    // Each request repeats "dup" itself, so it takes at least two transactions.
    assert!(metrics.transactions.get() >= 2 * requests as u64);

    shutdown.token.cancel();
    assert!(shutdown.drain(WAIT).await, "every task ends");
    let after = nats.request(notify, body(&channel, &["late".to_owned()]).into());
    assert!(
        after.await.is_err(),
        "nobody serves requests after shutdown"
    );
}

#[tokio::test]
async fn requests_pause_while_the_database_is_away() {
    let nats = bus().await;
    let subjects = Subjects::new(Prefix::new(&unique("t")).expect("prefix"));
    let proxy = Proxy::start(0, true).await;
    let uri = proxy.uri(&db_uri());
    let pg = db::pg_config(&uri).expect("uri");
    let metrics = BridgeMetrics::register(&Metrics::new());
    let shutdown = Shutdown::new();
    let (fatal, _fatal_rx) = mpsc::channel(1);
    let notifier = Notifier {
        pg,
        subjects: subjects.clone(),
        pool_size: 2,
        batch_size: 10,
        bus: nats.clone(),
        metrics,
        dedup: true,
        audit: None,
    };
    let up = notifier.spawn(&shutdown, fatal);
    let notify = subjects.notify();
    let ok = || async {
        let reply = nats.request(notify.clone(), body("c", &["x".to_owned()]).into());
        matches!(reply.await, Ok(m) if serde_json::from_slice::<NotifyReply>(&m.payload).is_ok_and(|r| r.ok))
    };
    let deadline = Instant::now() + WAIT;
    while !ok().await {
        assert!(Instant::now() < deadline, "never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    proxy.cut();
    eventually("every worker to see its connection gone", || {
        *up.borrow() == 0
    })
    .await;
    // The intake unsubscribes: the queue group is left to the other bridges (none here).
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = nats
            .request(notify.clone(), body("c", &["x".to_owned()]).into())
            .await;
        match reply {
            Err(BusError::NoResponders) => break,
            Ok(m) => {
                let reply: NotifyReply = serde_json::from_slice(&m.payload).expect("reply");
                assert!(!reply.ok, "nothing can succeed while the database is away");
            }
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(Instant::now() < deadline, "the intake never unsubscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let _back = Proxy::start(proxy.port, true).await;
    let deadline = Instant::now() + WAIT;
    while !ok().await {
        assert!(Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.token.cancel();
    assert!(shutdown.drain(WAIT).await, "every task ends");
}
