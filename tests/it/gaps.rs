//! Gap signals: a socket whose token says `"gaps": true` learns that database -> socket
//! delivery was interrupted (the listener reconnected, NATS came back); other sockets see
//! nothing new.

use std::time::{Duration, Instant};

use pgws_tests::{db_uri, pg, unique, PrivateNats, Stack, WsClient};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);

/// The next frame of `ws` that is a gap signal, skipping notifications.
async fn next_gap(ws: &mut WsClient) -> anyhow::Result<Value> {
    let deadline = Instant::now() + T;
    loop {
        let v = ws
            .next_json(deadline.saturating_duration_since(Instant::now()))
            .await?;
        if v["event"] == "Gap" {
            return Ok(v);
        }
    }
}

/// Notifies `channel` until `ws` gets it; asserts that no gap signal came first.
async fn gets_notification_not_gap(
    stack: &Stack,
    ws: &mut WsClient,
    channel: &str,
) -> anyhow::Result<()> {
    let db = stack.pg().await?;
    let payload = json!({"channel": channel, "check": unique("")}).to_string();
    stack.notify(&db, &payload).await?;
    let v = ws.next_json(T).await?;
    assert_ne!(
        v["event"], "Gap",
        "a socket that did not ask got a gap signal"
    );
    assert_eq!(v, serde_json::from_str::<Value>(&payload)?);
    Ok(())
}

#[tokio::test]
async fn opted_in_sockets_learn_of_listener_and_nats_interruptions() -> anyhow::Result<()> {
    let mut nats = PrivateNats::start().await?;
    let app = unique("gapbridge-");
    let uri = format!("{}?application_name={app}", db_uri());
    let url = nats.url();
    let stack = Stack::start_with(&[("PGWS_DB_URI", &uri), ("PGWS_NATS_URL", &url)]).await?;
    let channel = unique("gaps-");
    let mut opted = stack
        .connect(0, &channel, &json!({"mode": "r", "gaps": true}))
        .await?;
    let mut plain = stack.connect(0, &channel, &json!({"mode": "r"})).await?;

    // The listener loses its connection; the bridge listens again and says so.
    let killed: i64 = pg()
        .await?
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await?
        .get(0);
    assert!(killed >= 1, "no bridge session found");
    let t = Instant::now();
    let gap = next_gap(&mut opted).await?;
    let listener_gap = t.elapsed();
    assert_eq!(gap, json!({"event": "Gap", "reason": "listener"}));
    stack.wait_flowing(0).await?;
    gets_notification_not_gap(&stack, &mut plain, &channel).await?;

    // NATS restarts: the gateway's connection comes back and it says so.
    nats.kill()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.restart().await?;
    let t = Instant::now();
    let gap = next_gap(&mut opted).await?;
    let nats_gap = t.elapsed();
    assert_eq!(gap, json!({"event": "Gap", "reason": "nats"}));
    stack.wait_flowing(0).await?;
    gets_notification_not_gap(&stack, &mut plain, &channel).await?;
    eprintln!(
        "gap signal: {listener_gap:?} after pg_terminate_backend of the listener, \
         {nats_gap:?} after nats-server restarted"
    );
    Ok(())
}
