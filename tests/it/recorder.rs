//! pg-recorder: readiness, and every accepted client message recorded exactly once through
//! a recorder killed mid-stream, a PostgreSQL restart, and two replicas at once.

use std::time::Duration;

use pgws_tests::{http_get, Service, ServiceKind, Stack};

#[tokio::test]
async fn the_recorder_is_ready_with_its_dependencies_and_says_which_is_missing(
) -> anyhow::Result<()> {
    let stack = Stack::new();
    let rec = Service::start(ServiceKind::Recorder, &stack.env()).await?;
    rec.wait_ready().await?;
    let mut env = stack.env();
    env.retain(|(k, _)| k != "PGWS_DB_URI");
    env.push((
        "PGWS_DB_URI".to_owned(),
        "postgres://postgres@127.0.0.1:1/postgres".to_owned(),
    ));
    let broken = Service::start(ServiceKind::Recorder, &env).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = http_get(broken.admin, "/readyz").await?;
    assert_eq!((status, body.trim()), (503, "not ready: database"));
    Ok(())
}

/// `(rows, distinct ids)` recorded for `channel`, 0 while the schema does not exist yet.
async fn recorded(db_uri: &str, channel: &str) -> (i64, i64) {
    let Ok((db, conn)) = tokio_postgres::connect(db_uri, tokio_postgres::NoTls).await else {
        return (0, 0);
    };
    tokio::spawn(conn);
    db.query_one(
        "SELECT count(*), count(DISTINCT id) FROM pgws_audit.messages WHERE channel = $1",
        &[&channel],
    )
    .await
    .map(|row| (row.get(0), row.get(1)))
    .unwrap_or((0, 0))
}

/// Waits until `n` rows of `channel` are recorded (or the deadline passes) and returns the
/// final `(rows, distinct ids)`.
async fn wait_recorded(db_uri: &str, channel: &str, n: i64) -> (i64, i64) {
    pgws_tests::eventually(Duration::from_secs(60), || async {
        recorded(db_uri, channel).await.0 >= n
    })
    .await;
    // Anything still in flight would show up as a duplicate now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    recorded(db_uri, channel).await
}

/// Sends `n` numbered messages, pausing every `every` messages so that faults land mid-stream.
async fn send_paced(
    ws: &mut pgws_tests::WsClient,
    n: usize,
    every: usize,
    pause: Duration,
) -> anyhow::Result<()> {
    for i in 0..n {
        ws.send_text(&format!("r{i}")).await?;
        if i % every == every - 1 {
            tokio::time::sleep(pause).await;
        }
    }
    Ok(())
}

/// Starts a recorder and a writer sending `n` paced messages on `channel`; returns once part
/// of the stream is recorded, so that the caller's fault lands mid-stream.
async fn recording_mid_stream(
    stack: &Stack,
    channel: &str,
    n: usize,
) -> anyhow::Result<(
    Service,
    tokio::task::JoinHandle<anyhow::Result<pgws_tests::WsClient>>,
)> {
    let rec = Service::start(ServiceKind::Recorder, &stack.env()).await?;
    rec.wait_ready().await?;
    let mut ws = stack
        .connect(0, channel, &serde_json::json!({"mode": "w"}))
        .await?;
    let sender = tokio::spawn(async move {
        send_paced(&mut ws, n, 100, Duration::from_millis(20)).await?;
        Ok(ws)
    });
    let db_uri = stack.db_uri();
    let started = pgws_tests::eventually(Duration::from_secs(30), || async {
        recorded(&db_uri, channel).await.0 > 300
    })
    .await;
    anyhow::ensure!(started, "nothing recorded");
    Ok((rec, sender))
}

#[tokio::test]
async fn a_recorder_killed_mid_stream_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let channel = pgws_tests::unique("kill-");
    let n = 3000;
    let (rec, sender) = recording_mid_stream(&stack, &channel, n).await?;
    rec.signal("KILL")?;
    let _ws = sender.await??;
    let _again = Service::start(ServiceKind::Recorder, &stack.env()).await?;
    let (rows, distinct) = wait_recorded(&stack.db_uri(), &channel, n as i64).await;
    assert_eq!((rows, distinct), (n as i64, n as i64));
    Ok(())
}

#[tokio::test]
async fn two_recorders_share_the_stream_exactly_once() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let channel = pgws_tests::unique("pair-");
    let a = Service::start(ServiceKind::Recorder, &stack.env()).await?;
    let b = Service::start(ServiceKind::Recorder, &stack.env()).await?;
    a.wait_ready().await?;
    b.wait_ready().await?;
    let mut ws = stack
        .connect(0, &channel, &serde_json::json!({"mode": "w"}))
        .await?;
    let n = 4000;
    send_paced(&mut ws, n, 200, Duration::from_millis(5)).await?;
    let (rows, distinct) = wait_recorded(&pgws_tests::db_uri(), &channel, n as i64).await;
    assert_eq!((rows, distinct), (n as i64, n as i64));
    let by_a = a.metric("pgws_recorder_rows_total").await.unwrap_or(0.0);
    let by_b = b.metric("pgws_recorder_rows_total").await.unwrap_or(0.0);
    assert_eq!(by_a + by_b, n as f64, "a={by_a} b={by_b}");
    Ok(())
}

#[tokio::test]
async fn a_postgres_restart_mid_stream_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let pg = pgws_tests::PrivatePg::start()?;
    let uri = pg.uri();
    let stack = Stack::start_with(&[("PGWS_DB_URI", &uri), ("PGWS_NOTIFY_TIMEOUT", "30")]).await?;
    let channel = pgws_tests::unique("restart-");
    let n = 3000;
    let (_rec, sender) = recording_mid_stream(&stack, &channel, n).await?;
    pg.stop()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.restart()?;
    let _ws = sender.await??;
    let (rows, distinct) = wait_recorded(&uri, &channel, n as i64).await;
    assert_eq!((rows, distinct), (n as i64, n as i64));
    Ok(())
}

#[tokio::test]
async fn malformed_records_become_dead_letters_and_block_nothing() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let rec = Service::start(ServiceKind::Recorder, &stack.env()).await?;
    rec.wait_ready().await?;
    let js = async_nats::jetstream::new(async_nats::connect(pgws_tests::nats_url()).await?);
    let subject = format!("{}.audit", stack.prefix);
    let channel = pgws_tests::unique("dead-");
    let good = |i: u32| {
        serde_json::json!({"event": "WebsocketMessage", "channel": channel, "payload": format!("g{i}"),
            "claims": {"mode": "w", "message_delivered_at": pgws_tests::now() as f64}})
        .to_string()
    };
    let with_id = |id: &str| {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", id);
        h.insert("Pgws-Notify-Channel", "listen");
        h
    };
    let run = pgws_tests::unique("");
    for (headers, body) in [
        (with_id(&format!("{run}-1")), good(1)),
        (with_id(&format!("{run}-2")), "not json".to_owned()),
        (async_nats::HeaderMap::new(), good(3)),
        (with_id(&format!("{run}-4")), good(4)),
    ] {
        js.publish_with_headers(subject.clone(), headers, body.into())
            .await?
            .await?;
    }
    let (rows, _) = wait_recorded(&stack.db_uri(), &channel, 2).await;
    assert_eq!(rows, 2);
    let db = stack.pg().await?;
    let reasons: Vec<String> = db
        .query(
            "SELECT reason FROM pgws_audit.dead_letters WHERE stream = $1 ORDER BY stream_seq",
            &[&format!("{}-audit", stack.prefix)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(reasons, ["not a JSON object", "no Nats-Msg-Id header"]);
    assert_eq!(
        rec.metric("pgws_recorder_dead_letters_total").await,
        Some(2.0)
    );
    Ok(())
}

#[tokio::test]
async fn dispatcher_mode_calls_the_function_once_per_message_in_order() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    let name = pgws_tests::unique("disp_");
    let db = stack.pg().await?;
    db.batch_execute(&format!(
        "CREATE TABLE {name}_log (n serial PRIMARY KEY, channel text, payload text);
         CREATE FUNCTION {name}(c text, p text) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             IF p::json->>'payload' = 'boom' THEN RAISE EXCEPTION 'boom refused'; END IF;
             INSERT INTO {name}_log (channel, payload) VALUES (c, p::json->>'payload');
         END $$;"
    ))
    .await?;
    stack
        .extra
        .push(("PGWS_RECORDER_DISPATCHER".to_owned(), name.clone()));
    let rec = Service::start(ServiceKind::Recorder, &stack.env()).await?;
    rec.wait_ready().await?;
    let mut ws = stack
        .connect(0, "dispatch", &serde_json::json!({"mode": "w"}))
        .await?;
    for i in 0..50 {
        ws.send_text(&format!("d{i}")).await?;
        if i == 25 {
            ws.send_text("boom").await?;
        }
    }
    let log_query = format!("SELECT channel, payload FROM {name}_log ORDER BY n");
    let done = pgws_tests::eventually(Duration::from_secs(30), || async {
        db.query(&log_query, &[])
            .await
            .map(|r| r.len())
            .unwrap_or(0)
            >= 50
    })
    .await;
    assert!(done, "dispatcher did not run");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows = db.query(&log_query, &[]).await?;
    let payloads: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
    let expected: Vec<String> = (0..50).map(|i| format!("d{i}")).collect();
    assert_eq!(payloads, expected);
    let channel: String = rows[0].get(0);
    assert_eq!(channel, stack.listen_channel);
    let reason: String = db
        .query_one(
            "SELECT reason FROM pgws_audit.dead_letters WHERE stream = $1",
            &[&format!("{}-audit", stack.prefix)],
        )
        .await?
        .get(0);
    assert!(reason.contains("boom refused"), "{reason}");
    drop(rec);
    db.batch_execute(&format!("DROP FUNCTION {name}; DROP TABLE {name}_log"))
        .await?;
    Ok(())
}

#[tokio::test]
async fn the_audit_says_which_messages_were_not_notified_and_why() -> anyhow::Result<()> {
    // No bridge at first: the message is recorded, then its NOTIFY fails.
    let mut stack = Stack::new();
    let _rec = Service::start(ServiceKind::Recorder, &stack.env()).await?;
    stack.add_gateway(&[("PGWS_NOTIFY_TIMEOUT", "2")]).await?;
    let channel = pgws_tests::unique("outcome-");
    let mut ws = stack
        .connect(0, &channel, &serde_json::json!({"mode": "rw"}))
        .await?;
    ws.send_text("lost").await?;
    let error = ws.next_json(Duration::from_secs(10)).await?;
    assert_eq!(error["event"], "Error", "{error}");
    stack.add_bridge(&[]).await?;
    stack.wait_flowing(0).await?;
    ws.send_text("kept").await?;
    let echo = ws.next_json(Duration::from_secs(10)).await?;
    assert_eq!(echo["payload"], "kept", "{echo}");

    let db = stack.pg().await?;
    let query = "SELECT payload, notified, notify_error FROM pgws_audit.message_outcomes
                 WHERE channel = $1 ORDER BY received_at";
    let read = || async {
        match db.query(query, &[&channel]).await {
            Ok(rows) => rows
                .iter()
                .map(|r| {
                    let error: Option<String> = r.get(2);
                    (r.get::<_, String>(0), r.get::<_, bool>(1), error)
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    };
    let complete = pgws_tests::eventually(Duration::from_secs(30), || async {
        let rows = read().await;
        rows.len() == 2 && !rows[0].1 && rows[0].2.is_some()
    })
    .await;
    let rows = read().await;
    assert!(complete, "outcomes not recorded: {rows:?}");
    let (payload, notified, error) = &rows[0];
    assert_eq!((payload.as_str(), *notified), ("lost", false));
    let error = error.as_deref().unwrap_or_default();
    assert!(error.contains("no bridge committed"), "{error}");
    assert_eq!(
        (rows[1].0.as_str(), rows[1].1, &rows[1].2),
        ("kept", true, &None)
    );
    Ok(())
}
