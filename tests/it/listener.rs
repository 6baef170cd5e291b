//! The bridge's LISTEN connection heals itself, and leadership moves when a leader dies.

use std::time::{Duration, Instant};

use pgws_tests::{db_uri, pg, unique, Stack, TempDb};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

/// A stack whose bridges' database sessions carry a unique `application_name`.
async fn stack_with_app_name() -> anyhow::Result<(Stack, String)> {
    let app = unique("bridge-");
    let uri = format!("{}?application_name={app}", db_uri());
    let stack = Stack::start_with(&[("PGWS_DB_URI", &uri)]).await?;
    Ok((stack, app))
}

#[tokio::test]
async fn a_terminated_listener_comes_back_without_dropping_sockets() -> anyhow::Result<()> {
    let (stack, app) = stack_with_app_name().await?;
    let mut ws = stack
        .connect(0, "steady", &serde_json::json!({"mode": "r"}))
        .await?;
    let db = pg().await?;
    let killed: i64 = db
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await?
        .get(0);
    assert!(killed >= 1, "no bridge session found");
    let started = Instant::now();
    stack.wait_flowing(0).await?;
    println!("listener recovered in {:?}", started.elapsed());
    // The socket opened before the fault still receives.
    let payload = serde_json::json!({"channel": "steady", "n": 1}).to_string();
    stack.notify(&db, &payload).await?;
    assert_eq!(ws.next_text(Duration::from_secs(10)).await?, payload);
    Ok(())
}

#[tokio::test]
async fn a_killed_leader_hands_listen_to_another_bridge() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    stack.add_bridge(&[]).await?;
    let mut ws = stack
        .connect(0, "failover", &serde_json::json!({"mode": "r"}))
        .await?;
    stack.bridges[0].signal("KILL")?;
    let started = Instant::now();
    stack.wait_flowing(0).await?;
    println!("failover in {:?}", started.elapsed());
    let db = pg().await?;
    let payload = serde_json::json!({"channel": "failover"}).to_string();
    stack.notify(&db, &payload).await?;
    assert_eq!(ws.next_text(Duration::from_secs(10)).await?, payload);
    Ok(())
}

/// In a `SQL_ASCII` database PostgreSQL passes NOTIFY payload bytes through unchecked, so any
/// database user can send one that is not UTF-8. It must cost only itself: delivered with its
/// bad bytes replaced, while the notifications around it, on every channel, all arrive.
#[tokio::test]
async fn a_notification_that_is_not_utf8_costs_only_itself() -> anyhow::Result<()> {
    let db = TempDb::create_with(
        "WITH ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    )
    .await?;
    let direct = unique("direct-");
    let stack = Stack::start_with(&[
        ("PGWS_DB_URI", db.uri.as_str()),
        ("PGWS_DIRECT_CHANNELS", direct.as_str()),
    ])
    .await?;
    let listened = unique("bytes-");
    let mut on_listen = stack
        .connect(0, &listened, &json!({"mode": "r", "gaps": true}))
        .await?;
    let mut on_direct = stack
        .connect(0, &direct, &json!({"mode": "r", "gaps": true}))
        .await?;
    let sql = stack.pg().await?;
    const N: usize = 150;
    for i in 0..N {
        if i == N / 2 {
            // One bad byte on each channel, in the middle of the stream.
            let mut bad_json = format!(r#"{{"channel":"{listened}","bad":""#).into_bytes();
            bad_json.extend_from_slice(b"\xff\"}");
            sql.execute(
                "SELECT pg_notify($1, convert_from($2::bytea, 'SQL_ASCII'))",
                &[&stack.listen_channel, &bad_json],
            )
            .await?;
            sql.execute(
                "SELECT pg_notify($1, convert_from('\\x41ff42'::bytea, 'SQL_ASCII'))",
                &[&direct],
            )
            .await?;
        }
        let payload = json!({"channel": listened, "n": i}).to_string();
        stack.notify(&sql, &payload).await?;
        sql.execute("SELECT pg_notify($1, $2)", &[&direct, &i.to_string()])
            .await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut got = (Vec::new(), Vec::new());
    for _ in 0..=N {
        got.0.push(on_listen.next_text(T).await?);
        got.1.push(on_direct.next_text(T).await?);
    }
    let bad = (got.0.remove(N / 2), got.1.remove(N / 2));
    assert_eq!(
        bad.0,
        format!("{{\"channel\":\"{listened}\",\"bad\":\"\u{fffd}\"}}")
    );
    assert_eq!(bad.1, "A\u{fffd}B");
    for (i, (l, d)) in got.0.iter().zip(&got.1).enumerate() {
        assert_eq!(*l, json!({"channel": listened, "n": i}).to_string());
        assert_eq!(*d, i.to_string(), "no gap, nothing lost");
    }
    let bridge = &stack.bridges[0];
    let mended = bridge
        .metric("pgws_bridge_notifications_mended_total")
        .await;
    assert_eq!(mended, Some(2.0));
    // The bad notifications did not fail the LISTEN connection (a reconnect for another
    // reason, such as a slow listener check on a loaded machine, would not lose these
    // notifications either: the gap assertions above hold regardless).
    let log = bridge.log();
    for failure in ["db error", "error parsing", "invalid byte sequence"] {
        assert!(
            !log.contains(failure),
            "the bridge logged {failure:?}:\n{log}"
        );
    }
    Ok(())
}
