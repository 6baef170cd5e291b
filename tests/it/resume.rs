//! Resuming sockets (`?resume`): every frame carries a position; a socket that comes back with
//! its last position gets exactly what it missed, in order, on any gateway, then live
//! messages; a position that cannot be served is a `Gap`; one that is not a position, a 400.

use std::time::{Duration, Instant};

use pgws_tests::{token, unique, Stack, Topology, WsClient};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);

/// A postgres-websockets socket on `channel` of gateway `i`, resuming from `from` (`""`: now).
async fn resuming(stack: &Stack, i: usize, channel: &str, from: &str) -> anyhow::Result<WsClient> {
    let jwt = token(&json!({"mode": "r"}));
    WsClient::connect(&format!(
        "{}/{channel}/{jwt}?resume={from}",
        stack.ws_url(i)
    ))
    .await
}

/// NOTIFYs `{"channel":channel,"n":n}` for each `n`.
async fn notify_range(
    stack: &Stack,
    channel: &str,
    range: std::ops::Range<u32>,
) -> anyhow::Result<()> {
    let db = stack.pg().await?;
    for n in range {
        stack
            .notify(&db, &json!({"channel": channel, "n": n}).to_string())
            .await?;
    }
    Ok(())
}

/// The next positioned frame: (position, message).
async fn next_positioned(ws: &mut WsClient, timeout: Duration) -> anyhow::Result<(String, Value)> {
    let frame = ws.next_json(timeout).await?;
    let position = frame["position"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("a frame without a position: {frame}"))?
        .to_owned();
    Ok((position, frame["message"].clone()))
}

/// The `n` of the next `count` frames, and the last position.
async fn take_ns(ws: &mut WsClient, count: usize) -> anyhow::Result<(Vec<u64>, String)> {
    let mut ns = Vec::new();
    let mut last = String::new();
    for _ in 0..count {
        let (position, message) = next_positioned(ws, T).await?;
        assert!(
            position > last,
            "positions increase: {last} then {position}"
        );
        ns.push(message["n"].as_u64().unwrap_or(u64::MAX));
        last = position;
    }
    Ok((ns, last))
}

/// Asserts that nothing more arrives within a short while.
async fn nothing_more(ws: &mut WsClient) {
    if let Ok(frame) = ws.next_text(Duration::from_millis(700)).await {
        panic!("an extra frame: {frame}");
    }
}

/// 30 notifications while the client is away, resumed on `back_on`: exactly those, in order,
/// then live ones.
async fn missed_come_back(stack: &Stack, back_on: usize) -> anyhow::Result<()> {
    let channel = unique("resume-");
    let mut ws = resuming(stack, 0, &channel, "").await?;
    notify_range(stack, &channel, 0..5).await?;
    let (ns, last) = take_ns(&mut ws, 5).await?;
    assert_eq!(ns, (0..5).collect::<Vec<_>>());
    drop(ws);

    notify_range(stack, &channel, 5..35).await?;
    let mut ws = resuming(stack, back_on, &channel, &last).await?;
    let (ns, _) = take_ns(&mut ws, 30).await?;
    assert_eq!(ns, (5..35).collect::<Vec<_>>(), "exactly the missed ones");
    notify_range(stack, &channel, 35..38).await?;
    let (ns, _) = take_ns(&mut ws, 3).await?;
    assert_eq!(ns, [35, 36, 37], "then live ones");
    nothing_more(&mut ws).await;
    Ok(())
}

#[tokio::test]
async fn missed_notifications_come_back_on_another_gateway() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    stack.add_gateway(&[]).await?;
    missed_come_back(&stack, 1).await
}

#[tokio::test]
async fn missed_notifications_come_back_in_one_process() -> anyhow::Result<()> {
    let stack = Stack::start_as(Topology::One, &[]).await?;
    missed_come_back(&stack, 0).await
}

#[tokio::test]
async fn plain_sockets_see_no_change_and_direct_channels_carry_text() -> anyhow::Result<()> {
    let direct = unique("direct-");
    let stack = Stack::start_with(&[("PGWS_DIRECT_CHANNELS", &direct)]).await?;
    let channel = unique("plain-");
    let mut plain = stack.connect(0, &channel, &json!({"mode": "r"})).await?;
    let mut positioned = resuming(&stack, 0, &channel, "").await?;
    let raw = json!({"channel": channel, "n": 1}).to_string();
    let db = stack.pg().await?;
    stack.notify(&db, &raw).await?;
    assert_eq!(plain.next_text(T).await?, raw, "verbatim, as before");
    let (position, message) = next_positioned(&mut positioned, T).await?;
    assert_eq!(message, serde_json::from_str::<Value>(&raw)?);

    // A direct channel: the payload as a JSON string, resumable likewise.
    let jwt = token(&json!({"channel": direct, "mode": "r"}));
    let url = format!("{}/{jwt}?resume=", stack.ws_url(0));
    let mut dws = WsClient::connect(&url).await?;
    db.execute("SELECT pg_notify($1, 'first')", &[&direct])
        .await?;
    let (first, message) = next_positioned(&mut dws, T).await?;
    assert_eq!(message, json!("first"));
    // No socket reads the channel now: the leader still LISTENs on it for the history's age,
    // so what is notified meanwhile is kept for the socket that comes back.
    drop(dws);
    tokio::time::sleep(Duration::from_secs(1)).await;
    db.execute("SELECT pg_notify($1, 'missed')", &[&direct])
        .await?;
    let url = format!("{}/{jwt}?resume={first}", stack.ws_url(0));
    let mut dws = WsClient::connect(&url).await?;
    let (later, message) = next_positioned(&mut dws, T).await?;
    assert_eq!(message, json!("missed"));
    assert!(later > first && later > position);
    Ok(())
}

#[tokio::test]
async fn unservable_positions_are_gaps_and_malformed_ones_refused() -> anyhow::Result<()> {
    let stack = Stack::start_with(&[("PGWS_HISTORY_SECONDS", "2")]).await?;
    let channel = unique("expiry-");

    // Not a position at all: HTTP 400 saying so.
    let jwt = token(&json!({"mode": "r"}));
    let url = format!("{}/{channel}/{jwt}?resume=yesterday", stack.ws_url(0));
    let refusal = WsClient::refusal(&url, &[]).await;
    assert!(refusal.contains("400"), "{refusal}");

    // A position of another history: a gap, then live messages.
    let mut ws = resuming(&stack, 0, &channel, "abc123-000000000001").await?;
    assert_eq!(
        ws.next_json(T).await?,
        json!({"event": "Gap", "reason": "history"})
    );
    notify_range(&stack, &channel, 0..3).await?;
    let (ns, _) = take_ns(&mut ws, 3).await?;
    assert_eq!(ns, [0, 1, 2]);
    drop(ws);

    // Positions whose successors expired: a gap, no replay, then live messages.
    let mut ws = resuming(&stack, 0, &channel, "").await?;
    notify_range(&stack, &channel, 3..6).await?;
    let (first, _) = next_positioned(&mut ws, T).await?;
    take_ns(&mut ws, 2).await?;
    drop(ws);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut ws = resuming(&stack, 0, &channel, &first).await?;
    assert_eq!(
        ws.next_json(T).await?,
        json!({"event": "Gap", "reason": "history"})
    );
    notify_range(&stack, &channel, 6..7).await?;
    let (ns, _) = take_ns(&mut ws, 1).await?;
    assert_eq!(ns, [6], "live, with nothing replayed");
    Ok(())
}

#[tokio::test]
async fn after_a_restart_of_one_process_old_positions_are_gaps() -> anyhow::Result<()> {
    let mut stack = Stack::start_as(Topology::One, &[]).await?;
    let channel = unique("restart-");
    let mut ws = resuming(&stack, 0, &channel, "").await?;
    notify_range(&stack, &channel, 0..2).await?;
    let (_, first) = take_ns(&mut ws, 1).await?;
    take_ns(&mut ws, 1).await?;
    drop(ws);
    stack.gateways[0].signal("KILL")?;
    stack.gateways.clear();
    stack.add_gateway(&[]).await?;
    stack.wait_flowing(0).await?;
    let mut ws = resuming(&stack, 0, &channel, &first).await?;
    assert_eq!(
        ws.next_json(T).await?,
        json!({"event": "Gap", "reason": "history"})
    );
    notify_range(&stack, &channel, 2..3).await?;
    let (ns, _) = take_ns(&mut ws, 1).await?;
    assert_eq!(ns, [2]);
    Ok(())
}

#[tokio::test]
async fn a_client_of_a_killed_gateway_resumes_elsewhere_with_nothing_lost_or_repeated(
) -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    stack.add_gateway(&[]).await?;
    let channel = unique("flow-");
    let mut ws = resuming(&stack, 0, &channel, "").await?;
    // 400 notifications at 100/s, while the gateway is killed and the client comes back.
    let db = stack.pg().await?;
    let listen_channel = stack.listen_channel.clone();
    let flow_channel = channel.clone();
    let flow = tokio::spawn(async move {
        let start = Instant::now();
        for n in 0..400u32 {
            let at = start + Duration::from_millis(10 * u64::from(n));
            tokio::time::sleep_until(at.into()).await;
            let payload = json!({"channel": flow_channel, "n": n}).to_string();
            db.execute("SELECT pg_notify($1, $2)", &[&listen_channel, &payload])
                .await?;
        }
        anyhow::Ok(())
    });
    let mut ns = Vec::new();
    let mut last = String::new();
    while ns.len() < 100 {
        let (position, message) = next_positioned(&mut ws, T).await?;
        ns.push(message["n"].as_u64().unwrap_or(u64::MAX));
        last = position;
    }
    stack.gateways[0].signal("KILL")?;
    drop(ws);
    let mut ws = resuming(&stack, 1, &channel, &last).await?;
    while ns.len() < 400 {
        let (position, message) = next_positioned(&mut ws, T).await?;
        assert!(
            position > last,
            "positions increase: {last} then {position}"
        );
        ns.push(message["n"].as_u64().unwrap_or(u64::MAX));
        last = position;
    }
    flow.await??;
    assert_eq!(
        ns,
        (0..400).collect::<Vec<_>>(),
        "all 400, once each, in order"
    );
    nothing_more(&mut ws).await;
    Ok(())
}

#[tokio::test]
async fn a_long_replay_joins_live_messages_without_gap_or_repeat() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    stack.add_gateway(&[]).await?;
    let channel = unique("seam-");
    let mut ws = resuming(&stack, 0, &channel, "").await?;
    notify_range(&stack, &channel, 0..1).await?;
    let (_, last) = take_ns(&mut ws, 1).await?;
    drop(ws);
    // 3,000 missed at once, then live ones at 1,000/s while the client resumes.
    let mut watcher = resuming(&stack, 0, &channel, "").await?;
    let db = stack.pg().await?;
    db.execute(
        "SELECT pg_notify($1, json_build_object('channel', $2::text, 'n', n)::text) \
         FROM generate_series(1, 3000) AS n",
        &[&stack.listen_channel, &channel],
    )
    .await?;
    // The 3,000 were delivered (so they are history, not live messages that a resuming socket
    // would have to hold while it replays).
    take_ns(&mut watcher, 3000).await?;
    drop(watcher);
    let listen_channel = stack.listen_channel.clone();
    let flow_channel = channel.clone();
    let flow = tokio::spawn(async move {
        for n in 3001..4001u32 {
            let payload = json!({"channel": flow_channel, "n": n}).to_string();
            db.execute("SELECT pg_notify($1, $2)", &[&listen_channel, &payload])
                .await?;
            if n % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        anyhow::Ok(())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut ws = resuming(&stack, 1, &channel, &last).await?;
    let (ns, _) = take_ns(&mut ws, 4000).await?;
    flow.await??;
    let expected: Vec<u64> = (1..4001).collect();
    if ns != expected {
        let first_bad = ns.iter().zip(&expected).position(|(a, b)| a != b);
        panic!("not 1..=4000 once each in order; first difference at {first_bad:?}");
    }
    nothing_more(&mut ws).await;
    Ok(())
}

/// A `/live` request's reply.
async fn live_call(ws: &mut WsClient, method: &str, attributes: Value) -> anyhow::Result<Value> {
    ws.send_text(&json!({"id": method, "method": method, "attributes": attributes}).to_string())
        .await?;
    loop {
        let frame = ws.next_json(T).await?;
        if frame["type"] != "event" {
            return Ok(frame);
        }
    }
}

/// The next `/live` event: (position, data).
async fn next_event(ws: &mut WsClient) -> anyhow::Result<(String, Value)> {
    let frame = ws.next_json(T).await?;
    anyhow::ensure!(frame["type"] == "event", "not an event: {frame}");
    let position = frame["position"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("an event without a position: {frame}"))?;
    Ok((position.to_owned(), frame["data"].clone()))
}

#[tokio::test]
async fn a_live_topic_subscribed_since_a_position_gets_what_it_missed() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    stack.add_gateway(&[]).await?;
    let url = |i: usize| {
        let jwt = token(&json!({"sub": "ann"}));
        format!("{}/live?token={jwt}", stack.ws_url(i))
    };
    let topic = unique("room-");
    let mut writer = WsClient::connect(&url(0)).await?;
    let created = live_call(&mut writer, "create-topic", json!({"name": topic})).await?;
    assert_eq!(created["ok"], true, "{created}");
    let send = |n: u32| json!({"topicName": topic, "message": {"n": n}});

    let mut reader = WsClient::connect(&url(0)).await?;
    let plain = live_call(&mut reader, "subscribe", json!({"topicName": topic})).await?;
    assert_eq!(plain["ok"], true, "{plain}");
    assert!(plain["data"].get("recovered").is_none(), "{plain}");
    live_call(&mut writer, "new-message", send(0)).await?;
    let (position, data) = next_event(&mut reader).await?;
    assert_eq!(data, json!({"n": 0}));
    drop(reader);

    for n in 1..6 {
        live_call(&mut writer, "new-message", send(n)).await?;
    }
    let mut reader = WsClient::connect(&url(1)).await?;
    let since = json!({"topicName": topic, "since": position});
    let reply = live_call(&mut reader, "subscribe", since).await?;
    assert_eq!(
        reply["data"],
        json!({"topic": topic, "recovered": true}),
        "{reply}"
    );
    let mut got = Vec::new();
    let mut last = position;
    for _ in 1..6 {
        let (p, data) = next_event(&mut reader).await?;
        assert!(p > last, "positions increase");
        got.push(data["n"].as_u64().unwrap_or(99));
        last = p;
    }
    assert_eq!(got, [1, 2, 3, 4, 5]);
    live_call(&mut writer, "new-message", send(6)).await?;
    assert_eq!(next_event(&mut reader).await?.1, json!({"n": 6}));

    // A position of another history: not recovered, live events only.
    let mut other = WsClient::connect(&url(1)).await?;
    let since = json!({"topicName": topic, "since": "abc-000000000001"});
    let reply = live_call(&mut other, "subscribe", since).await?;
    assert_eq!(reply["data"]["recovered"], false, "{reply}");
    live_call(&mut writer, "new-message", send(7)).await?;
    assert_eq!(next_event(&mut other).await?.1, json!({"n": 7}));
    let bad = json!({"topicName": topic, "since": "yesterday"});
    let reply = live_call(&mut other, "subscribe", bad).await?;
    assert_eq!(reply["ok"], false, "{reply}");
    Ok(())
}

#[tokio::test]
async fn a_table_topic_replays_only_the_rows_the_subscriber_may_see() -> anyhow::Result<()> {
    let fx = crate::live_tables::Fixture::create(&pgws_tests::db_uri()).await?;
    let stack = fx.stack(1, 2, &[]).await?;
    let web = fx.role("web");
    let url = |i: usize, sub: &str| {
        let jwt = token(&json!({"sub": sub, "role": web}));
        format!("{}/live?token={jwt}", stack.ws_url(i))
    };
    let db = fx.db().await?;
    let insert = format!(
        "INSERT INTO {}.orders (owner, note) VALUES ($1, $2)",
        fx.schema
    );
    // Each reads its first row, then goes away.
    let mut positions = Vec::new();
    for (sub, note) in [("ann", "a0"), ("bob", "b0")] {
        let mut ws = WsClient::connect(&url(0, sub)).await?;
        let reply = live_call(&mut ws, "subscribe", json!({"topicName": "orders"})).await?;
        assert_eq!(reply["ok"], true, "{reply}");
        fx.slot_ready().await?;
        db.execute(&insert, &[&sub, &note]).await?;
        let (position, data) = next_event(&mut ws).await?;
        assert_eq!(data["attributes"]["note"], note, "{data}");
        positions.push(position);
    }
    // While both are away: their rows, one transaction each.
    for (owner, note) in [
        ("ann", "a1"),
        ("bob", "b1"),
        ("ann", "a2"),
        ("bob", "b2"),
        ("ann", "a3"),
    ] {
        db.execute(&insert, &[&owner, &note]).await?;
    }
    // Each comes back on the other gateway with its position: its own rows only, in commit
    // order, then live ones.
    for ((sub, expected), position) in [("ann", vec!["a1", "a2", "a3"]), ("bob", vec!["b1", "b2"])]
        .into_iter()
        .zip(positions)
    {
        let mut ws = WsClient::connect(&url(1, sub)).await?;
        let since = json!({"topicName": "orders", "since": position});
        let reply = live_call(&mut ws, "subscribe", since).await?;
        assert_eq!(reply["data"]["recovered"], true, "{reply}");
        let mut notes = Vec::new();
        for _ in 0..expected.len() {
            notes.push(next_event(&mut ws).await?.1["attributes"]["note"].clone());
        }
        assert_eq!(notes, expected, "{sub}: only its rows, in commit order");
        db.execute(&insert, &[&sub, &"live"]).await?;
        let (_, data) = next_event(&mut ws).await?;
        assert_eq!(data["attributes"]["note"], "live", "then live rows");
        nothing_more(&mut ws).await;
    }
    Ok(())
}

/// Reads a resuming socket on `channel` until `until` frames were taken in all, reconnecting
/// (to gateway 0, from the last position) whenever the socket ends; returns each frame's
/// (position, n).
async fn read_resuming(
    stack: &Stack,
    channel: &str,
    got: &mut Vec<(String, u64)>,
    until: usize,
    deadline: Instant,
) -> anyhow::Result<()> {
    let mut ws: Option<WsClient> = None;
    while got.len() < until {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {until} in time",
            got.len()
        );
        let socket = match ws.as_mut() {
            Some(socket) => socket,
            None => {
                let from = got.last().map(|(p, _)| p.clone()).unwrap_or_default();
                match resuming(stack, 0, channel, &from).await {
                    Ok(socket) => ws.insert(socket),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
        };
        match next_positioned(socket, Duration::from_secs(3)).await {
            Ok((position, message)) => {
                got.push((position, message["n"].as_u64().unwrap_or(u64::MAX)));
            }
            // Closed (1012 when the history's tail failed), or quiet: come back.
            Err(_) => ws = None,
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_leader_failover_and_a_nats_restart_lose_and_repeat_nothing_that_was_kept(
) -> anyhow::Result<()> {
    let mut nats = pgws_tests::PrivateNats::start().await?;
    let url = nats.url();
    let mut stack = Stack::start_with(&[("PGWS_NATS_URL", &url)]).await?;
    stack.add_bridge(&[]).await?;
    let channel = unique("faults-");
    let mut got = Vec::new();
    // A first position, then 600 notifications at 100/s.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut first = resuming(&stack, 0, &channel, "").await?;
    notify_range(&stack, &channel, 0..1).await?;
    let (start, _) = next_positioned(&mut first, T).await?;
    drop(first);
    got.push((start.clone(), 0));
    let db = stack.pg().await?;
    let (listen_channel, flow_channel) = (stack.listen_channel.clone(), channel.clone());
    let flow = tokio::spawn(async move {
        let begin = Instant::now();
        for n in 1..=600u32 {
            tokio::time::sleep_until((begin + Duration::from_millis(10 * u64::from(n))).into())
                .await;
            let payload = json!({"channel": flow_channel, "n": n}).to_string();
            // NOTIFY works while the bridges or NATS are away; nobody may be listening.
            drop(
                db.execute("SELECT pg_notify($1, $2)", &[&listen_channel, &payload])
                    .await,
            );
        }
    });
    read_resuming(&stack, &channel, &mut got, 100, deadline).await?;
    let leader = stack.leader().await.unwrap_or(0);
    stack.bridges[leader].signal("KILL")?;
    read_resuming(&stack, &channel, &mut got, 250, deadline).await?;
    let before_restart = got.last().map_or(0, |(_, n)| *n);
    nats.kill()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.restart().await?;
    flow.await?;
    // Everything the history kept after the start, read once more from the start.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut check = resuming(&stack, 0, &channel, &start).await?;
    let mut kept = vec![(start.clone(), 0)];
    while let Ok((position, message)) = next_positioned(&mut check, Duration::from_secs(2)).await {
        kept.push((position, message["n"].as_u64().unwrap_or(u64::MAX)));
    }
    let total = kept.len();
    read_resuming(&stack, &channel, &mut got, total, deadline).await?;
    let kept_ns: Vec<u64> = kept.iter().map(|(_, n)| *n).collect();
    let missing: Vec<u64> = (0..=600).filter(|n| !kept_ns.contains(n)).collect();
    eprintln!(
        "kept {total} of 601 notifications across the failover and the NATS restart; \
         not kept: {missing:?}"
    );
    assert!(
        total > 400,
        "most notifications reached the history: {total}"
    );
    // Only what PostgreSQL notified while no bridge held LISTEN is lost: what reached the new
    // leader before, during and after the NATS restart is all kept.
    assert!(
        missing.iter().all(|n| *n < before_restart),
        "lost around the NATS restart (after {before_restart}): {missing:?}"
    );
    let ns: Vec<u64> = got.iter().map(|(_, n)| *n).collect();
    assert!(
        ns.windows(2).all(|w| w[0] < w[1]),
        "in order, none twice: {ns:?}"
    );
    assert_eq!(got, kept, "the resumed client got exactly what was kept");
    Ok(())
}

#[tokio::test]
async fn a_live_topic_resumes_in_one_process() -> anyhow::Result<()> {
    let stack = Stack::start_as(Topology::One, &[]).await?;
    let url = format!(
        "{}/live?token={}",
        stack.ws_url(0),
        token(&json!({"sub": "ann"}))
    );
    let topic = unique("room-");
    let mut writer = WsClient::connect(&url).await?;
    let created = live_call(&mut writer, "create-topic", json!({"name": topic})).await?;
    assert_eq!(created["ok"], true, "{created}");
    let mut reader = WsClient::connect(&url).await?;
    live_call(&mut reader, "subscribe", json!({"topicName": topic})).await?;
    let send = |n: u32| json!({"topicName": topic, "message": n});
    live_call(&mut writer, "new-message", send(0)).await?;
    let (position, _) = next_event(&mut reader).await?;
    drop(reader);
    for n in 1..4 {
        live_call(&mut writer, "new-message", send(n)).await?;
    }
    let mut reader = WsClient::connect(&url).await?;
    let since = json!({"topicName": topic, "since": position});
    let reply = live_call(&mut reader, "subscribe", since).await?;
    assert_eq!(reply["data"]["recovered"], true, "{reply}");
    for n in 1..4 {
        assert_eq!(next_event(&mut reader).await?.1, json!(n));
    }
    nothing_more(&mut reader).await;
    Ok(())
}
