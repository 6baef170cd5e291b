//! `/live` (Daptin's websocket API): every method and every error, custom topics across two
//! gateways and a bridge restart, seen from websocket clients.

use std::time::Duration;

use pgws_tests::{token, unique, Stack, WsClient};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);

/// A stack of one bridge and two gateways where the role `admin` is an admin.
async fn live_stack() -> anyhow::Result<Stack> {
    let mut stack = Stack::new();
    stack.extra = vec![("PGWS_ADMIN_ROLES".into(), "admin, ops".into())];
    stack.add_bridge(&[]).await?;
    stack.add_gateway(&[]).await?;
    stack.add_gateway(&[]).await?;
    Ok(stack)
}

/// A `/live` socket on gateway `i` for `sub` with `role`.
async fn live(stack: &Stack, i: usize, sub: &str, role: &str) -> anyhow::Result<WsClient> {
    let jwt = token(&json!({"sub": sub, "role": role}));
    WsClient::connect(&format!("{}/live?token={jwt}", stack.ws_url(i))).await
}

/// Sends a request and returns the next frame (its reply).
async fn ask(ws: &mut WsClient, request: Value) -> anyhow::Result<Value> {
    ws.send_text(&request.to_string()).await?;
    ws.next_json(T).await
}

async fn call(ws: &mut WsClient, method: &str, attributes: Value) -> anyhow::Result<Value> {
    ask(
        ws,
        json!({"id": method, "method": method, "attributes": attributes}),
    )
    .await
}

fn assert_ok(reply: &Value) {
    assert_eq!(reply["type"], "response", "{reply}");
    assert_eq!(reply["ok"], true, "{reply}");
}

fn assert_error(reply: &Value, needle: &str) {
    assert_eq!(reply["type"], "response", "{reply}");
    assert_eq!(reply["ok"], false, "{reply}");
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(error.contains(needle), "{needle:?} not in {reply}");
}

/// No frame arrives within a short while.
async fn assert_quiet(ws: &mut WsClient, what: &str) {
    if let Ok(frame) = ws.next_text(Duration::from_millis(500)).await {
        panic!("{what}: unexpected frame {frame}");
    }
}

#[tokio::test]
async fn bad_requests_get_an_error_reply_and_the_socket_stays() -> anyhow::Result<()> {
    let stack = live_stack().await?;
    let mut ws = live(&stack, 0, "ann", "web_user").await?;
    let cases: Vec<(&str, Option<Value>, &str)> = vec![
        ("{not json", None, "malformed JSON"),
        ("[1,2]", None, "a request is a JSON object"),
        (r#"{"id":1}"#, Some(json!(1)), "missing \"method\""),
        (
            r#"{"id":"x","method":"fly"}"#,
            Some(json!("x")),
            "unknown method",
        ),
        (
            r#"{"id":{"n":2},"method":"subscribe","attributes":"t"}"#,
            Some(json!({"n":2})),
            "\"attributes\" must be an object",
        ),
        (
            r#"{"id":3,"method":"subscribe","attributes":{}}"#,
            Some(json!(3)),
            "missing attribute \"topicName\"",
        ),
        (
            r#"{"id":4,"method":"subscribe","attributes":{"topicName":7}}"#,
            Some(json!(4)),
            "must be a string",
        ),
        (
            r#"{"id":5,"method":"new-message","attributes":{"topicName":"t"}}"#,
            Some(json!(5)),
            "missing attribute \"message\"",
        ),
        (
            r#"{"id":6,"method":"create-topic","attributes":{"name":"a,b"}}"#,
            Some(json!(6)),
            "invalid topic name",
        ),
        (
            r#"{"id":7,"method":"create-topic","attributes":{"name":"t","public":"yes"}}"#,
            Some(json!(7)),
            "must be true or false",
        ),
        (
            r#"{"id":8,"method":"get-topic","attributes":{"topicName":"nope-nothing"}}"#,
            Some(json!(8)),
            "no topic named",
        ),
        (
            r#"{"id":9,"method":"unsubscribe","attributes":{"topicName":"never"}}"#,
            Some(json!(9)),
            "not subscribed",
        ),
        (
            r#"{"id":10,"method":"destroy-topic","attributes":{"name":"nope-nothing"}}"#,
            Some(json!(10)),
            "no topic named",
        ),
    ];
    for (text, id, needle) in cases {
        ws.send_text(text).await?;
        let reply = ws.next_json(T).await?;
        assert_error(&reply, needle);
        assert_eq!(reply.get("id").cloned(), id, "{text}: {reply}");
    }
    ws.send_binary(&[0xff, 0xfe]).await?;
    assert_error(&ws.next_json(T).await?, "UTF-8");
    // Still open and answering.
    let pong = ask(&mut ws, json!({"id": [1], "method": "ping"})).await?;
    assert_ok(&pong);
    assert_eq!(pong["id"], json!([1]));
    assert_eq!(pong["method"], "ping");
    Ok(())
}

#[tokio::test]
async fn tokens_are_checked_at_the_handshake() -> anyhow::Result<()> {
    let stack = live_stack().await?;
    let base = stack.ws_url(0);
    let refusal = WsClient::refusal(&format!("{base}/live"), &[]).await;
    assert!(refusal.contains("401"), "{refusal}");
    let refusal = WsClient::refusal(&format!("{base}/live?token=not.a.jwt"), &[]).await;
    assert!(refusal.contains("401"), "{refusal}");
    let expired = token(&json!({"sub": "ann", "exp": 1}));
    let refusal = WsClient::refusal(&format!("{base}/live?token={expired}"), &[]).await;
    assert!(refusal.contains("401"), "{refusal}");
    // The Bearer header works as well as the query.
    let jwt = token(&json!({"sub": "ann"}));
    let auth = format!("Bearer {jwt}");
    let mut ws =
        WsClient::connect_with(&format!("{base}/live"), &[("Authorization", auth.as_str())])
            .await?;
    assert_ok(&call(&mut ws, "ping", json!({})).await?);
    Ok(())
}

#[tokio::test]
async fn private_topics_belong_to_their_owner_and_admins_on_every_gateway() -> anyhow::Result<()> {
    let stack = live_stack().await?;
    let topic = unique("room-");
    let mut ann = live(&stack, 0, "ann", "web_user").await?;
    let mut admin = live(&stack, 1, "root", "admin").await?;
    let mut bob = live(&stack, 1, "bob", "web_user").await?;

    let created = call(&mut ann, "create-topic", json!({"name": topic})).await?;
    assert_ok(&created);
    assert_eq!(created["data"]["owner"], "ann");
    assert_eq!(created["data"]["type"], "custom");
    // One reply per topic, in order.
    ann.send_text(&json!({"id": 1, "method": "subscribe", "attributes": {"topicName": format!("{topic}, nothing-here")}}).to_string()).await?;
    let first = ann.next_json(T).await?;
    assert_ok(&first);
    assert_eq!(first["data"]["topic"], topic.as_str());
    assert_error(&ann.next_json(T).await?, "no topic named \"nothing-here\"");
    assert_ok(&call(&mut admin, "subscribe", json!({"topicName": topic})).await?);
    // A private topic does not show to others, and they cannot use it.
    assert_error(
        &call(&mut bob, "subscribe", json!({"topicName": topic})).await?,
        "no topic named",
    );
    assert_error(
        &call(
            &mut bob,
            "new-message",
            json!({"topicName": topic, "message": "x"}),
        )
        .await?,
        "no topic named",
    );
    assert_error(
        &call(&mut bob, "get-topic", json!({"topicName": topic})).await?,
        "no topic named",
    );

    // A message reaches the subscribers on both gateways, with its source; a sender that did
    // not subscribe gets no event.
    let mut sender = live(&stack, 1, "ann", "web_user").await?;
    let sent = call(
        &mut sender,
        "new-message",
        json!({"topicName": topic, "message": {"text": "hello", "n": 1}}),
    )
    .await?;
    assert_ok(&sent);
    let expected = json!({"type": "event", "topic": topic, "event": "new-message", "source": "ann", "data": {"text": "hello", "n": 1}});
    // Every event carries its position in the history too (resume.rs).
    for ws in [&mut ann, &mut admin] {
        let mut event = ws.next_json(T).await?;
        let position = event.as_object_mut().and_then(|e| e.remove("position"));
        assert!(position.is_some_and(|p| p.is_string()), "{event}");
        assert_eq!(event, expected);
    }
    assert_quiet(&mut sender, "the sender did not subscribe").await;
    assert_quiet(&mut bob, "bob may not read the topic").await;

    let info = call(&mut admin, "get-topic", json!({"topicName": topic})).await?;
    assert_ok(&info);
    assert_eq!(info["data"]["name"], topic.as_str());
    assert_eq!(info["data"]["owner"], "ann");
    assert_eq!(info["data"]["subscribers"], 1, "admin's gateway: {info}");

    // Unsubscribed: no more events.
    assert_ok(&call(&mut admin, "unsubscribe", json!({"topicName": topic})).await?);
    assert_ok(
        &call(
            &mut sender,
            "new-message",
            json!({"topicName": topic, "message": 2}),
        )
        .await?,
    );
    assert_eq!(ann.next_json(T).await?["data"], 2);
    assert_quiet(&mut admin, "unsubscribed").await;
    Ok(())
}

#[tokio::test]
async fn public_topics_lists_and_destroy() -> anyhow::Result<()> {
    let mut stack = live_stack().await?;
    let open = unique("open-");
    let mine = unique("mine-");
    let mut ann = live(&stack, 0, "ann", "web_user").await?;
    let mut bob = live(&stack, 1, "bob", "web_user").await?;
    let mut admin = live(&stack, 0, "root", "ops").await?;
    // Daptin's later spelling works too.
    assert_ok(
        &call(
            &mut ann,
            "create-topicName",
            json!({"name": open, "public": true}),
        )
        .await?,
    );
    assert_ok(&call(&mut ann, "create-topic", json!({"name": mine})).await?);

    let names = |reply: &Value| -> Vec<String> {
        reply["data"]["topics"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let seen_by_bob = names(&call(&mut bob, "list-topic", json!({})).await?);
    assert!(
        seen_by_bob.contains(&open) && !seen_by_bob.contains(&mine),
        "{seen_by_bob:?}"
    );
    let seen_by_ann = names(&call(&mut ann, "list-topic", json!({})).await?);
    assert!(
        seen_by_ann.contains(&open) && seen_by_ann.contains(&mine),
        "{seen_by_ann:?}"
    );
    let seen_by_admin = names(&call(&mut admin, "list-topic", json!({})).await?);
    assert!(seen_by_admin.contains(&mine), "{seen_by_admin:?}");

    // A public topic: anyone authenticated subscribes and publishes.
    assert_ok(&call(&mut bob, "subscribe", json!({"topicName": open})).await?);
    assert_ok(
        &call(
            &mut ann,
            "new-message",
            json!({"topicName": open, "message": "hi bob"}),
        )
        .await?,
    );
    let event = bob.next_json(T).await?;
    assert_eq!(
        (event["source"].clone(), event["data"].clone()),
        (json!("ann"), json!("hi bob"))
    );

    // Topics live in the database: a bridge restart keeps them.
    stack.bridges[0].signal("TERM")?;
    stack.bridges[0].wait_exit(T).await?;
    stack.bridges.clear();
    stack.add_bridge(&[]).await?;
    let info = call(&mut bob, "get-topic", json!({"topicName": open})).await?;
    assert_ok(&info);
    assert_eq!(info["data"]["public"], true);

    // Only the owner or an admin destroys; subscribers hear it.
    assert_error(
        &call(&mut bob, "destroy-topic", json!({"name": open})).await?,
        "only the owner",
    );
    assert_ok(&call(&mut admin, "destroy-topicName", json!({"topicName": open})).await?);
    let gone = bob.next_json(T).await?;
    assert_eq!(gone["event"], "destroy-topic", "{gone}");
    assert_eq!(gone["topic"], open.as_str());
    // The name can be taken again, and the old subscribers hear nothing of the new topic.
    assert_ok(&call(&mut admin, "create-topic", json!({"name": open})).await?);
    assert_ok(
        &call(
            &mut admin,
            "new-message",
            json!({"topicName": open, "message": "secret"}),
        )
        .await?,
    );
    assert_quiet(&mut bob, "a subscriber of the destroyed topic").await;
    assert_ok(&call(&mut ann, "destroy-topic", json!({"name": mine})).await?);
    Ok(())
}

#[tokio::test]
async fn creating_topics_needs_a_subject_and_is_bounded_per_owner() -> anyhow::Result<()> {
    let stack = live_stack().await?;
    let jwt = token(&json!({"role": "web_user"}));
    let mut anon = WsClient::connect(&format!("{}/live?token={jwt}", stack.ws_url(0))).await?;
    assert_error(
        &call(&mut anon, "create-topic", json!({"name": unique("t-")})).await?,
        "\"sub\" claim",
    );
    // One owner may have 1,000 topics (a flood of creations cannot fill the database; one
    // socket's flood is slowed down by its lookup rate first, so the rest are made in SQL).
    let owner = unique("flood-");
    let mut flood = live(&stack, 0, &owner, "web_user").await?;
    for i in 0..100 {
        let request =
            json!({"method": "create-topic", "attributes": {"name": format!("{owner}-{i}")}});
        flood.send_text(&request.to_string()).await?;
    }
    for _ in 0..100 {
        assert_ok(&flood.next_json(T).await?);
    }
    let db = stack.pg().await?;
    db.execute(
        "INSERT INTO pgws_live.topics (name, owner) \
         SELECT $1 || '-' || i, $1 FROM generate_series(100, 999) i",
        &[&owner],
    )
    .await?;
    assert_error(
        &call(
            &mut flood,
            "create-topic",
            json!({"name": format!("{owner}-more")}),
        )
        .await?,
        "at most 1000 topics",
    );
    db.execute("DELETE FROM pgws_live.topics WHERE owner = $1", &[&owner])
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_refreshed_token_moves_the_expiry_and_cannot_change_the_claims() -> anyhow::Result<()> {
    let stack = live_stack().await?;
    let now = pgws_tests::now();
    let claims = |exp: u64| json!({"sub": "ann", "role": "web_user", "exp": exp});
    let mut kept = WsClient::connect(&format!(
        "{}/live?token={}",
        stack.ws_url(0),
        token(&claims(now + 3))
    ))
    .await?;
    let mut lapsing = WsClient::connect(&format!(
        "{}/live?token={}",
        stack.ws_url(0),
        token(&claims(now + 3))
    ))
    .await?;

    // Refusals leave the socket as it was.
    let other = token(&json!({"sub": "bob", "role": "web_user", "exp": now + 60}));
    let wider = token(&json!({"sub": "ann", "role": "admin", "exp": now + 60}));
    let expired = token(&claims(now - 120));
    for (attributes, needle) in [
        (json!({}), "missing attribute \"token\""),
        (json!({"token": 7}), "must be a string"),
        (json!({"token": "garbage"}), "token refused"),
        (json!({"token": expired}), "token refused"),
        (json!({"token": other}), "carries the socket's claims"),
        (json!({"token": wider}), "carries the socket's claims"),
    ] {
        let reply = call(&mut lapsing, "refresh", attributes).await?;
        assert_error(&reply, needle);
    }

    let later = now + 60;
    let reply = call(
        &mut kept,
        "refresh",
        json!({"token": token(&claims(later))}),
    )
    .await?;
    assert_ok(&reply);
    assert_eq!(reply["data"]["expires_at"], later);

    // The lapsing socket closes at its token's expiry (3001), the refreshed one stays.
    let started = std::time::Instant::now();
    let (code, _) = lapsing.expect_close(Duration::from_secs(8)).await?;
    assert_eq!(code, 3001);
    assert!(started.elapsed() < Duration::from_secs(5));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pong = call(&mut kept, "ping", json!({})).await?;
    assert_ok(&pong);
    Ok(())
}

/// A socket cannot make the bridges look topics up without bound, nor multiply its frame with
/// a large `id` echoed in every reply.
#[tokio::test]
async fn lookups_and_ids_are_bounded_per_socket() -> anyhow::Result<()> {
    let stack = live_stack().await?;
    let mut ws = live(&stack, 0, "mallory", "user").await?;
    // 64 absent topics a request: two requests are within the burst (one reply per topic),
    // the next ones are refused at once with one reply each, and the socket stays.
    let absent: Vec<String> = (0..64).map(|i| unique(&format!("absent{i}-"))).collect();
    let request =
        json!({"id": 1, "method": "subscribe", "attributes": {"topicName": absent.join(",")}});
    for _ in 0..2 {
        ws.send_text(&request.to_string()).await?;
        for _ in 0..64 {
            assert_error(&ws.next_json(T).await?, "no topic named");
        }
    }
    for _ in 0..3 {
        ws.send_text(&request.to_string()).await?;
        let reply = ws.next_json(T).await?;
        assert_error(&reply, "too many requests");
        assert_eq!(reply["id"], 1, "{reply}");
    }
    assert_quiet(&mut ws, "one reply per refused request").await;
    // The bucket refills: a second later, lookups are served again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reply = call(&mut ws, "get-topic", json!({"topicName": "nothing-here"})).await?;
    assert_error(&reply, "no topic named");
    // A 60 kB id is refused, not echoed.
    let id = "i".repeat(60_000);
    ws.send_text(
        &json!({"id": id, "method": "subscribe", "attributes": {"topicName": absent.join(",")}})
            .to_string(),
    )
    .await?;
    let reply = ws.next_text(T).await?;
    assert!(reply.len() < 300, "{} bytes", reply.len());
    let reply: Value = serde_json::from_str(&reply)?;
    assert_error(&reply, "at most 256 bytes");
    assert!(reply.get("id").is_none(), "{reply}");
    assert_quiet(&mut ws, "one reply to a refused id").await;
    assert_ok(&call(&mut ws, "ping", json!({})).await?);
    Ok(())
}

/// `list-topic` pages: an admin with more topics than a page gets `more` and `next`, and
/// following `after` walks every topic once.
#[tokio::test]
async fn list_topic_pages_and_says_when_more_follow() -> anyhow::Result<()> {
    let db = pgws_tests::TempDb::create().await?;
    let mut stack = Stack::new();
    stack.extra = vec![
        ("PGWS_ADMIN_ROLES".into(), "admin".into()),
        ("PGWS_DB_URI".into(), db.uri.clone()),
    ];
    stack.add_bridge(&[]).await?;
    stack.add_gateway(&[]).await?;
    let mut admin = live(&stack, 0, "root", "admin").await?;
    assert_ok(&call(&mut admin, "create-topic", json!({"name": "t0000"})).await?);
    let sql = stack.pg().await?;
    sql.execute(
        "INSERT INTO pgws_live.topics (name, owner) \
         SELECT 't' || lpad(i::text, 4, '0'), 'bulk' FROM generate_series(1, 2499) i",
        &[],
    )
    .await?;
    let mut seen = Vec::new();
    let mut pages = Vec::new();
    let mut after = Value::Null;
    loop {
        let reply = call(&mut admin, "list-topic", json!({"after": after})).await?;
        assert_ok(&reply);
        let data = &reply["data"];
        let names = data["topics"].as_array().cloned().unwrap_or_default();
        pages.push((names.len(), data["more"].clone()));
        seen.extend(names.iter().filter_map(|n| n.as_str().map(str::to_owned)));
        if data["more"] != true {
            break;
        }
        assert_eq!(data["next"], *names.last().expect("a full page"), "{data}");
        after = data["next"].clone();
    }
    assert_eq!(
        pages,
        [
            (1000, json!(true)),
            (1000, json!(true)),
            (500, json!(false))
        ]
    );
    let expected: Vec<String> = (0..2500).map(|i| format!("t{i:0>4}")).collect();
    assert_eq!(seen, expected);
    Ok(())
}

/// Another owner's private topic does not show, in any answer: `get-topic` says there is no
/// such topic, and `create-topic` of the same name succeeds (a topic of its own), so nothing
/// tells the name exists; each owner's messages stay on its own topic. A public topic's name
/// is taken for all.
#[tokio::test]
async fn a_private_topic_does_not_show_its_existence() -> anyhow::Result<()> {
    let stack = live_stack().await?;
    let mut ann = live(&stack, 0, "ann", "user").await?;
    let mut bob = live(&stack, 1, "bob", "user").await?;
    let name = unique("secret-");
    assert_ok(&call(&mut ann, "create-topic", json!({"name": name})).await?);
    assert_ok(&call(&mut ann, "subscribe", json!({"topicName": name})).await?);
    let absent = format!("no topic named {name:?}");
    assert_error(
        &call(&mut bob, "get-topic", json!({"topicName": name})).await?,
        &absent,
    );
    assert_error(
        &call(&mut bob, "destroy-topic", json!({"name": name})).await?,
        &absent,
    );
    let created = call(&mut bob, "create-topic", json!({"name": name})).await?;
    assert_ok(&created);
    assert_eq!(created["data"]["owner"], "bob", "{created}");
    assert_ok(&call(&mut bob, "subscribe", json!({"topicName": name})).await?);
    let message = json!({"topicName": name, "message": "bob's"});
    assert_ok(&call(&mut bob, "new-message", message).await?);
    assert_eq!(bob.next_json(T).await?["data"], "bob's");
    assert_quiet(&mut ann, "ann's topic is another").await;
    let message = json!({"topicName": name, "message": "ann's"});
    assert_ok(&call(&mut ann, "new-message", message).await?);
    assert_eq!(ann.next_json(T).await?["data"], "ann's");
    assert_quiet(&mut bob, "bob's topic is another").await;
    // Each sees its own in get-topic and list-topic.
    let mine = call(&mut ann, "get-topic", json!({"topicName": name})).await?;
    assert_eq!(mine["data"]["owner"], "ann", "{mine}");
    // A public name is taken for everyone, and says so.
    let open = unique("open-");
    let public = json!({"name": open, "public": true});
    assert_ok(&call(&mut ann, "create-topic", public.clone()).await?);
    assert_error(&call(&mut bob, "create-topic", public).await?, "exists");
    assert_error(
        &call(&mut bob, "create-topic", json!({"name": open})).await?,
        "exists",
    );
    Ok(())
}
