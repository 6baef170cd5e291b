//! The same cases on both adapters: the in-process bus and NATS (the machine's nats-server,
//! `PGWS_TEST_NATS_URL`), each case on subjects of its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pgws_bus::{Bus, BusError, Headers, Local, Nats, SUBSCRIPTION_CAPACITY};

const T: Duration = Duration::from_secs(5);

async fn nats() -> Arc<dyn Bus> {
    let client = async_nats::connect(pgws_testkit::nats_url())
        .await
        .expect("the machine's NATS (scripts/ensure-services.sh)");
    Arc::new(Nats::new(client))
}

fn local() -> Arc<dyn Bus> {
    Arc::new(Local::new())
}

/// Runs `case` on both adapters, naming which failed.
macro_rules! on_both {
    ($name:ident, $case:ident) => {
        mod $name {
            #[tokio::test]
            async fn local() {
                super::$case(super::local(), &pgws_testkit::unique("bus")).await;
            }
            #[tokio::test]
            async fn nats() {
                super::$case(super::nats().await, &pgws_testkit::unique("bus")).await;
            }
        }
    };
}

fn text(b: &Bytes) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn next(sub: &mut pgws_bus::Subscription) -> pgws_bus::Message {
    tokio::time::timeout(T, sub.next())
        .await
        .expect("a message in time")
        .expect("the subscription is open")
}

async fn quiet(sub: &mut pgws_bus::Subscription) {
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        panic!("unexpected message on {}: {}", m.subject, text(&m.payload));
    }
}

async fn order_per_subject(bus: Arc<dyn Bus>, p: &str) {
    let subject = format!("{p}.order");
    let mut sub = bus.subscribe(&subject, None).await.expect("subscribed");
    for i in 0..1000 {
        bus.publish(&subject, Headers::new(), Bytes::from(i.to_string()))
            .await
            .expect("published");
    }
    bus.flush().await.expect("flushed");
    for i in 0..1000 {
        assert_eq!(text(&next(&mut sub).await.payload), i.to_string());
    }
}
on_both!(messages_keep_their_order_per_subject, order_per_subject);

async fn wildcards(bus: Arc<dyn Bus>, p: &str) {
    let mut one = bus.subscribe(&format!("{p}.*.x"), None).await.unwrap();
    let mut rest = bus.subscribe(&format!("{p}.>"), None).await.unwrap();
    for s in ["a.x", "a.y", "a.b.x"] {
        bus.publish(&format!("{p}.{s}"), Headers::new(), Bytes::from(s))
            .await
            .unwrap();
    }
    bus.flush().await.unwrap();
    assert_eq!(next(&mut one).await.subject, format!("{p}.a.x"));
    quiet(&mut one).await;
    let got: Vec<String> = [
        next(&mut rest).await,
        next(&mut rest).await,
        next(&mut rest).await,
    ]
    .iter()
    .map(|m| text(&m.payload))
    .collect();
    assert_eq!(got, ["a.x", "a.y", "a.b.x"]);
}
on_both!(wildcards_match_one_token_or_the_rest, wildcards);

async fn queue_groups(bus: Arc<dyn Bus>, p: &str) {
    let subject = format!("{p}.work");
    let mut a = bus.subscribe(&subject, Some("workers")).await.unwrap();
    let mut b = bus.subscribe(&subject, Some("workers")).await.unwrap();
    let mut all = bus.subscribe(&subject, None).await.unwrap();
    for i in 0..200 {
        bus.publish(&subject, Headers::new(), Bytes::from(i.to_string()))
            .await
            .unwrap();
    }
    bus.flush().await.unwrap();
    for _ in 0..200 {
        next(&mut all).await;
    }
    let (mut in_a, mut in_b) = (0, 0);
    while in_a + in_b < 200 {
        tokio::select! {
            Some(_) = a.next() => in_a += 1,
            Some(_) = b.next() => in_b += 1,
            _ = tokio::time::sleep(T) => panic!("{} of 200 reached the group", in_a + in_b),
        }
    }
    assert!(in_a > 0 && in_b > 0, "one member took all: {in_a} / {in_b}");
    quiet(&mut a).await;
    quiet(&mut b).await;
}
on_both!(a_queue_group_gets_each_message_once, queue_groups);

async fn requests(bus: Arc<dyn Bus>, p: &str) {
    let subject = format!("{p}.echo");
    assert_eq!(
        bus.request(&subject, Headers::new(), Bytes::new(), T).await,
        Err(BusError::NoResponders)
    );
    let mut server = bus.subscribe(&subject, Some("servers")).await.unwrap();
    let responder = Arc::clone(&bus);
    tokio::spawn(async move {
        while let Some(m) = server.next().await {
            let mut h = Headers::new();
            h.insert(
                "Seen".into(),
                m.headers.get("Asked").cloned().unwrap_or_default(),
            );
            let reply = m.reply.expect("a reply subject");
            responder.publish(&reply, h, m.payload).await.unwrap();
        }
    });
    let mut h = Headers::new();
    h.insert("Asked".into(), "yes".into());
    let answer = bus
        .request(&subject, h, Bytes::from_static(b"ping"), T)
        .await
        .expect("answered");
    assert_eq!(text(&answer.payload), "ping");
    assert_eq!(answer.headers.get("Seen").map(String::as_str), Some("yes"));

    // A subscriber that never answers: the request times out, not sooner.
    let _mute = bus.subscribe(&format!("{p}.mute"), None).await.unwrap();
    let started = Instant::now();
    let result = bus
        .request(
            &format!("{p}.mute"),
            Headers::new(),
            Bytes::new(),
            Duration::from_millis(300),
        )
        .await;
    assert_eq!(result, Err(BusError::TimedOut));
    assert!(started.elapsed() >= Duration::from_millis(250));
}
on_both!(requests_are_answered_refused_or_timed_out, requests);

async fn slow_subscriber(bus: Arc<dyn Bus>, p: &str) {
    // One subscriber never reads: publishing does not wait for it, and the other gets all.
    let subject = format!("{p}.slow");
    let _stalled = bus.subscribe(&subject, None).await.unwrap();
    let mut reader = bus.subscribe(&subject, None).await.unwrap();
    let n = SUBSCRIPTION_CAPACITY.min(5_000);
    let started = Instant::now();
    for i in 0..n {
        bus.publish(&subject, Headers::new(), Bytes::from(i.to_string()))
            .await
            .unwrap();
    }
    bus.flush().await.unwrap();
    assert!(
        started.elapsed() < T,
        "publishing waited for a stalled subscriber"
    );
    for i in 0..n {
        assert_eq!(text(&next(&mut reader).await.payload), i.to_string());
    }
}
on_both!(a_stalled_subscriber_holds_nobody_up, slow_subscriber);

async fn headers_and_bad_subjects(bus: Arc<dyn Bus>, p: &str) {
    let subject = format!("{p}.h");
    let mut sub = bus.subscribe(&subject, None).await.unwrap();
    let mut h = Headers::new();
    h.insert("Pgws-Frame".into(), "binary".into());
    bus.publish(&subject, h.clone(), Bytes::from_static(b"\x00\x01"))
        .await
        .unwrap();
    bus.flush().await.unwrap();
    let m = next(&mut sub).await;
    assert_eq!(m.headers, h);
    assert_eq!(&m.payload[..], b"\x00\x01");
    assert_eq!(m.reply, None);
    for bad in ["", "a..b", "a b", "a.*", "a.>"] {
        assert!(matches!(
            bus.publish(bad, Headers::new(), Bytes::new()).await,
            Err(BusError::InvalidSubject(_))
        ));
    }
    assert!(matches!(
        bus.subscribe("a.>.b", None).await,
        Err(BusError::InvalidSubject(_))
    ));
}
on_both!(
    headers_travel_and_bad_subjects_are_refused,
    headers_and_bad_subjects
);

async fn dropped_subscription(bus: Arc<dyn Bus>, p: &str) {
    let subject = format!("{p}.gone");
    let sub = bus.subscribe(&subject, None).await.unwrap();
    drop(sub);
    // The server may hear of the unsubscription a moment later.
    let deadline = Instant::now() + T;
    loop {
        match bus
            .request(
                &subject,
                Headers::new(),
                Bytes::new(),
                Duration::from_millis(200),
            )
            .await
        {
            Err(BusError::NoResponders) => break,
            other => assert!(Instant::now() < deadline, "still subscribed: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
on_both!(a_dropped_subscription_ends, dropped_subscription);
