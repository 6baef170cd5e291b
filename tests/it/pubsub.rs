//! wspubsub topics: API-key publishers, subscribers on every gateway, one publisher per topic,
//! the grace period, seen from websocket clients.

use std::time::{Duration, Instant};

use pgws_tests::{unique, Frame, Service, ServiceKind, Stack, WsClient};

const T: Duration = Duration::from_secs(10);
pub(crate) const KEY: &str = "f47ac10b-58cc-4372-a567-0e02b2c3d479";

/// A stack with its own `apikeys` table (the seed's DDL) holding one key, active for
/// `domain`, and `extra` settings; one bridge, `gateways` gateways.
async fn pubsub_stack(
    gateways: usize,
    extra: &[(&str, &str)],
) -> anyhow::Result<(Stack, String, String)> {
    pubsub_stack_of(1, gateways, extra).await
}

/// An `apikeys` table of its own (the seed's DDL) holding [`KEY`], active for a fresh domain:
/// `(table, domain)`.
pub(crate) async fn keys_table() -> anyhow::Result<(String, String)> {
    let table = unique("apikeys_");
    let domain = unique("dom-");
    let db = pgws_tests::pg().await?;
    db.batch_execute(&format!(
        r#"create table "{table}" (
            "id" serial primary key,
            "domain" varchar(64) not null,
            "username" varchar(254) not null,
            "apikey" varchar(36) not null,
            "insert_ts" timestamp not null default now(),
            "active" boolean not null default false
        );
        create unique index on "{table}" ("domain");
        create unique index on "{table}" ("apikey");"#
    ))
    .await?;
    db.execute(
        &format!(r#"insert into "{table}" (domain, username, apikey, active) values ($1, 'hello@world.com', $2, true)"#),
        &[&domain, &KEY],
    )
    .await?;
    Ok((table, domain))
}

async fn pubsub_stack_of(
    bridges: usize,
    gateways: usize,
    extra: &[(&str, &str)],
) -> anyhow::Result<(Stack, String, String)> {
    let (table, domain) = keys_table().await?;
    let mut env = vec![("PGWS_PUBSUB_KEYS_TABLE", table.as_str())];
    env.extend_from_slice(extra);
    let stack = Stack::start_sized(&env, bridges, gateways).await?;
    if gateways > 0 {
        stack.wait_flowing(0).await?;
    }
    Ok((stack, table, domain))
}

async fn publisher(
    stack: &Stack,
    i: usize,
    key: &str,
    domain: &str,
    topic: &str,
) -> anyhow::Result<WsClient> {
    WsClient::connect(&format!(
        "{}/ws/pub/{key}/{domain}/{topic}",
        stack.ws_url(i)
    ))
    .await
}

async fn subscriber(
    stack: &Stack,
    i: usize,
    domain: &str,
    topic: &str,
) -> anyhow::Result<WsClient> {
    WsClient::connect(&format!("{}/ws/sub/{domain}/{topic}", stack.ws_url(i))).await
}

/// The HTTP status of a refused handshake.
fn status(result: anyhow::Result<WsClient>) -> String {
    match result {
        Ok(_) => "accepted".to_owned(),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn publisher_frames_reach_every_subscriber_verbatim() -> anyhow::Result<()> {
    let (stack, _table, domain) = pubsub_stack(2, &[]).await?;
    let mut publ = publisher(&stack, 0, KEY, &domain, "news").await?;
    let mut near = subscriber(&stack, 0, &domain, "news").await?;
    let mut far = subscriber(&stack, 1, &domain, "news").await?;
    let mut other = subscriber(&stack, 1, &domain, "news").await?;
    publ.send_text("one").await?;
    publ.send_binary(&[0, 159, 146, 150, 255]).await?;
    publ.send_text("{\"three\":3}").await?;
    for ws in [&mut near, &mut far, &mut other] {
        assert_eq!(ws.next_data(T).await?, Frame::text("one"));
        assert_eq!(
            ws.next_data(T).await?,
            Frame::binary(vec![0u8, 159, 146, 150, 255])
        );
        assert_eq!(ws.next_data(T).await?, Frame::text("{\"three\":3}"));
    }
    // Subscribers' frames are ignored: nobody receives them.
    far.send_text("from a subscriber").await?;
    for ws in [&mut near, &mut other, &mut publ] {
        assert!(ws.next_data(Duration::from_millis(500)).await.is_err());
    }
    // Many frames stay in order.
    for i in 0..200 {
        publ.send_text(&i.to_string()).await?;
    }
    for i in 0..200 {
        assert_eq!(far.next_text(T).await?, i.to_string());
    }
    Ok(())
}

#[tokio::test]
async fn keys_topics_and_publishers_are_checked() -> anyhow::Result<()> {
    let (stack, table, domain) = pubsub_stack(2, &[]).await?;
    // No publisher: 404.
    let refused = status(subscriber(&stack, 0, &domain, "t").await);
    assert!(refused.contains("404"), "{refused}");
    // Unknown key, key of another domain: 403, and nothing is created.
    let refused = status(publisher(&stack, 0, "nope", &domain, "t").await);
    assert!(refused.contains("403"), "{refused}");
    let refused = status(publisher(&stack, 0, KEY, "another", "t").await);
    assert!(refused.contains("403"), "{refused}");
    let refused = status(subscriber(&stack, 0, &domain, "t").await);
    assert!(refused.contains("404"), "{refused}");
    // A malformed path is a 400.
    let refused =
        status(WsClient::connect(&format!("{}/ws/pub/{KEY}/{domain}", stack.ws_url(0))).await);
    assert!(refused.contains("400"), "{refused}");
    // A NUL in the key or the domain never reaches the database (its query would fail: 503).
    let refused = status(publisher(&stack, 0, "k%00", &domain, "t").await);
    assert!(refused.contains("403"), "{refused}");
    let refused = status(publisher(&stack, 0, KEY, "d%00", "t").await);
    assert!(refused.contains("400"), "{refused}");

    // One publisher per topic across gateways: the second gets 409, the first keeps it.
    let mut first = publisher(&stack, 0, KEY, &domain, "t").await?;
    let refused = status(publisher(&stack, 1, KEY, &domain, "t").await);
    assert!(refused.contains("409"), "{refused}");
    let mut sub = subscriber(&stack, 1, &domain, "t").await?;
    first.send_text("still mine").await?;
    assert_eq!(sub.next_text(T).await?, "still mine");

    // A key made inactive stops new publishers at once.
    let db = stack.pg().await?;
    db.execute(&format!(r#"update "{table}" set active = false"#), &[])
        .await?;
    let refused = status(publisher(&stack, 1, KEY, &domain, "other").await);
    assert!(refused.contains("403"), "{refused}");
    Ok(())
}

#[tokio::test]
async fn a_topic_waits_for_a_new_publisher_then_closes() -> anyhow::Result<()> {
    let (stack, _table, domain) = pubsub_stack(2, &[("PGWS_PUBSUB_GRACE", "2")]).await?;
    let publ = publisher(&stack, 0, KEY, &domain, "g").await?;
    let mut sub = subscriber(&stack, 1, &domain, "g").await?;
    // The publisher leaves; within the grace period another takes the topic over and the
    // subscriber, still connected, hears it.
    drop(publ);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut next = publisher(&stack, 1, KEY, &domain, "g").await?;
    next.send_text("took over").await?;
    assert_eq!(sub.next_text(T).await?, "took over");
    // It leaves too and nobody comes: after the grace period the subscriber is closed with a
    // close frame that says why, and the topic is gone.
    drop(next);
    let left = Instant::now();
    let (code, reason) = sub.expect_close(T).await?;
    let waited = left.elapsed();
    assert_eq!(code, 4004, "{reason}");
    assert!(reason.contains("publisher"), "{reason}");
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(6),
        "closed after {waited:?} (grace 2 s)"
    );
    let refused = status(subscriber(&stack, 0, &domain, "g").await);
    assert!(refused.contains("404"), "{refused}");
    Ok(())
}

#[tokio::test]
async fn a_subscriber_that_does_not_read_is_a_slow_consumer() -> anyhow::Result<()> {
    let (stack, _table, domain) = pubsub_stack(1, &[("PGWS_SEND_QUEUE", "256")]).await?;
    let mut publ = publisher(&stack, 0, KEY, &domain, "flood").await?;
    let mut stalled = subscriber(&stack, 0, &domain, "flood").await?;
    let mut reader = subscriber(&stack, 0, &domain, "flood").await?;
    let frame = "x".repeat(1024);
    // 20 MB in steps of 50 frames that the reader takes in before the next step, so only
    // the stalled subscriber falls behind.
    for _ in 0..400 {
        for _ in 0..50 {
            publ.send_text(&frame).await?;
        }
        for _ in 0..50 {
            reader.next_text(T).await?;
        }
    }
    // The subscriber that never read is disconnected: with close 1008 when the frame could
    // still be written, otherwise dropped (it finds the end once it reads past what the
    // network held); the one that read got everything.
    match stalled.expect_end(T).await? {
        Some((code, reason)) => {
            assert_eq!(code, 1008, "{reason}");
            assert!(reason.contains("slow consumer"), "{reason}");
        }
        None => {
            let gw = &stack.gateways[0];
            let abandoned = gw.metric("pgws_gateway_abandoned_sockets_total").await;
            assert_eq!(abandoned, Some(1.0), "dropped without being counted");
        }
    }
    Ok(())
}

#[tokio::test]
async fn topics_survive_a_leader_failover() -> anyhow::Result<()> {
    let (mut stack, _table, domain) = pubsub_stack_of(2, 2, &[]).await?;
    let mut publ = publisher(&stack, 0, KEY, &domain, "live").await?;
    let mut sub = subscriber(&stack, 1, &domain, "live").await?;
    publ.send_text("before").await?;
    assert_eq!(sub.next_text(T).await?, "before");
    let leader = stack.leader().await.expect("one bridge leads");
    stack.bridges[leader].signal("KILL")?;
    stack.bridges.remove(leader);
    let started = Instant::now();
    // Frames do not pass through a bridge: they keep flowing.
    publ.send_text("during").await?;
    assert_eq!(sub.next_text(T).await?, "during");
    // The new leader learns the topic from the gateways: a second publisher is still refused,
    // and a new subscriber still finds the topic. (Until the new leader knows, the handshake
    // answers 503 "try again", as a client would: on a loaded machine that can outlast the
    // handshake's 10 s wait.)
    let mut refused = status(publisher(&stack, 1, KEY, &domain, "live").await);
    while refused.contains("503") && started.elapsed() < Duration::from_secs(30) {
        refused = status(publisher(&stack, 1, KEY, &domain, "live").await);
    }
    assert!(refused.contains("409"), "{refused}");
    let mut late = subscriber(&stack, 0, &domain, "live").await?;
    println!(
        "registry answered {:?} after the leader died",
        started.elapsed()
    );
    publ.send_text("after").await?;
    assert_eq!(sub.next_text(T).await?, "after");
    assert_eq!(late.next_text(T).await?, "after");
    Ok(())
}

#[tokio::test]
async fn a_gateway_that_stops_hands_its_topics_back_at_once() -> anyhow::Result<()> {
    let (stack, _table, domain) = pubsub_stack(2, &[("PGWS_PUBSUB_GRACE", "2")]).await?;
    let _publ = publisher(&stack, 0, KEY, &domain, "bye").await?;
    let mut sub = subscriber(&stack, 1, &domain, "bye").await?;
    // A stopping gateway tells the leader, so the grace period starts now, not after the
    // 15 s a silent gateway takes to be forgotten.
    let stopped = Instant::now();
    stack.gateways[0].signal("TERM")?;
    let (code, reason) = sub.expect_close(Duration::from_secs(30)).await?;
    let waited = stopped.elapsed();
    assert_eq!(code, 4004, "{reason}");
    assert!(
        waited < Duration::from_secs(pgws_proto::PRESENCE_EXPIRY_SECS),
        "closed after {waited:?}"
    );
    Ok(())
}

#[tokio::test]
async fn big_frames_for_stalled_subscribers_are_bounded_in_bytes() -> anyhow::Result<()> {
    let (stack, _table, domain) =
        pubsub_stack(1, &[("PGWS_SEND_QUEUE_BYTES", &(1 << 20).to_string())]).await?;
    let pid = stack.gateways[0].pid().unwrap_or(0);
    let mut publ = publisher(&stack, 0, KEY, &domain, "big").await?;
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(subscriber(&stack, 0, &domain, "big").await?);
    }
    let mut reader = subscriber(&stack, 0, &domain, "big").await?;
    let (peak_before, _) = pgws_tests::memory_kib(pid);
    // 1,500 frames of 60 KiB (88 MiB), paced by the reader. Counted in messages only, each
    // stalled socket could hold 1,024 of them (60 MiB); in bytes, 1 MiB.
    let frame = vec![7u8; 60 << 10];
    for _ in 0..150 {
        for _ in 0..10 {
            publ.send_binary(&frame).await?;
        }
        for _ in 0..10 {
            reader.next_data(T).await?;
        }
    }
    let (peak, _) = pgws_tests::memory_kib(pid);
    let grew_mib = peak.saturating_sub(peak_before) as f64 / 1024.0;
    eprintln!("gateway peak RSS grew {grew_mib:.1} MiB with 4 stalled subscribers");
    for ws in &mut stalled {
        // A close frame 1008, or none when even that could not be written.
        if let Some((code, reason)) = ws.expect_end(T).await? {
            assert_eq!(code, 1008, "{reason}");
        }
    }
    assert!(grew_mib < 48.0, "gateway peak RSS grew {grew_mib:.1} MiB");
    Ok(())
}

#[tokio::test]
async fn a_second_publisher_on_the_same_gateway_is_refused() -> anyhow::Result<()> {
    let (stack, _table, domain) = pubsub_stack(2, &[("PGWS_PUBSUB_GRACE", "2")]).await?;
    let mut first = publisher(&stack, 0, KEY, &domain, "one").await?;
    let mut near = subscriber(&stack, 0, &domain, "one").await?;
    let mut far = subscriber(&stack, 1, &domain, "one").await?;
    // Same URL, same gateway, and on the other gateway: 409 every time.
    for i in [0, 0, 1, 0] {
        let refused = status(publisher(&stack, i, KEY, &domain, "one").await);
        assert!(refused.contains("409"), "gateway {i}: {refused}");
    }
    // The refused ones leaving did not release the topic: past the grace period the
    // subscribers are still there, hear the first publisher, and the topic is still taken.
    tokio::time::sleep(Duration::from_secs(3)).await;
    first.send_text("still mine").await?;
    for ws in [&mut near, &mut far] {
        assert_eq!(ws.next_text(T).await?, "still mine");
    }
    let refused = status(publisher(&stack, 1, KEY, &domain, "one").await);
    assert!(refused.contains("409"), "{refused}");
    let refused = status(subscriber(&stack, 0, &domain, "one").await);
    assert_eq!(refused, "accepted");
    Ok(())
}

/// Guessing API keys from one address gets slower with each refusal: two are free, then the
/// address waits (answered 429 at once, no key checked), twice as long after each refusal; a
/// right key once it may try again is accepted and clears the count.
#[tokio::test]
async fn refused_api_keys_cost_an_address_more_each_time() -> anyhow::Result<()> {
    let (stack, _table, domain) = pubsub_stack(1, &[]).await?;
    let started = Instant::now();
    let (mut forbidden, mut waiting) = (0, 0);
    while started.elapsed() < Duration::from_secs(2) {
        let wrong = format!("{:0>36}", forbidden + waiting);
        let refused = status(publisher(&stack, 0, &wrong, &domain, "guess").await);
        if refused.starts_with("refused 403") {
            forbidden += 1;
        } else {
            assert!(refused.starts_with("refused 429"), "{refused}");
            assert!(refused.contains("try again in"), "{refused}");
            waiting += 1;
        }
    }
    eprintln!("in 2 s: {forbidden} keys checked and refused, {waiting} handshakes told to wait");
    // 250 ms, 500 ms, 1 s after the 3rd, 4th and 5th: at most 6 checks in 2 s.
    assert!((4..=6).contains(&forbidden), "{forbidden} keys checked");
    assert!(waiting > 10, "{waiting}");
    let gw = &stack.gateways[0];
    let metric = "pgws_gateway_handshakes_refused_total{reason=\"apikey_backoff\"}";
    assert_eq!(gw.metric(metric).await, Some(waiting as f64));
    // Once the wait is over, the right key is accepted and the count starts again.
    let mut right = None;
    while right.is_none() && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        right = publisher(&stack, 0, KEY, &domain, "guess").await.ok();
    }
    assert!(right.is_some(), "the right key was never accepted");
    let refused = status(publisher(&stack, 0, "wrong", &domain, "other").await);
    assert!(refused.contains("403"), "{refused}");
    Ok(())
}

/// A stack no leader has known topics in has nothing to wait for: once its services are
/// ready, the first publisher's handshake is answered at once (it waited for a new leader's
/// settling period, 6 s, before). A leader that takes over a stack whose earlier leader knew
/// topics waits for the gateways' reports, and says so on `/readyz` meanwhile; then it
/// refuses a second publisher of a topic it learned from them.
#[tokio::test]
async fn a_fresh_stack_answers_at_once_and_a_new_leader_says_when_it_cannot() -> anyhow::Result<()>
{
    let (mut stack, _table, domain) = pubsub_stack_of(0, 0, &[]).await?;
    let started = Instant::now();
    let bridge = Service::start(ServiceKind::Bridge, &stack.env()).await?;
    while !(bridge.metric("pgws_bridge_leader").await == Some(1.0)
        && matches!(
            pgws_tests::http_get(bridge.admin, "/readyz").await,
            Ok((200, _))
        ))
    {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = started.elapsed();
    stack.bridges.push(bridge);
    stack.add_gateway(&[]).await?;
    stack.add_gateway(&[]).await?;
    let started = Instant::now();
    let _first = publisher(&stack, 0, KEY, &domain, "first").await?;
    let waited = started.elapsed();
    eprintln!(
        "fresh stack: leader ready {ready:?} after its start, first publisher handshake {waited:?}"
    );
    assert!(ready < Duration::from_secs(3), "{ready:?}");
    assert!(waited < Duration::from_millis(1500), "{waited:?}");

    // The leader dies with a topic held; its successor does not know the topic yet.
    stack.bridges[0].signal("KILL")?;
    stack.bridges.remove(0);
    let restarted = Instant::now();
    let bridge = Service::start(ServiceKind::Bridge, &stack.env()).await?;
    let mut saw_settling = false;
    loop {
        // Ready as a standby at first; then the leader, settling, then ready. Leadership is
        // read first: a 200 read before it may be the standby's.
        let leader = bridge.metric("pgws_bridge_leader").await == Some(1.0);
        match pgws_tests::http_get(bridge.admin, "/readyz").await {
            Ok((200, _)) if leader => break,
            Ok((503, body)) if body.contains("registry") => saw_settling = true,
            _ => {}
        }
        anyhow::ensure!(restarted.elapsed() < Duration::from_secs(30), "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("new leader ready after {:?}", restarted.elapsed());
    assert!(saw_settling, "/readyz never said the registry was settling");
    stack.bridges.push(bridge);
    let refused = status(publisher(&stack, 1, KEY, &domain, "first").await);
    assert!(refused.contains("409"), "{refused}");
    Ok(())
}
