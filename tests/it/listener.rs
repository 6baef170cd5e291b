//! The bridge's LISTEN connection heals itself, and leadership moves when a leader dies.

use std::time::{Duration, Instant};

use pgws_tests::{db_uri, pg, unique, Stack};

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
