//! A flood of connections: many sockets open at once while a reader receives a steady stream
//! of notifications; every handshake completes, the reader is not held up, and the gateway's
//! memory grows by a bounded amount per socket and returns when they close.

use std::time::{Duration, Instant};

use futures::future::join_all;
use pgws_tests::{token, unique, Stack, WsClient};
use serde_json::json;

const FLOOD: usize = 1500;

/// `VmRSS` of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_flood_of_connections_completes_and_does_not_hold_up_a_reader() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let pid = stack.gateways[0].pid().expect("gateway pid");
    let channel = unique("steady-");
    let mut reader = stack.connect(0, &channel, &json!({"mode": "r"})).await?;
    let db = stack.pg().await?;
    let before = rss_kib(pid);

    // A notification every 10 ms on the reader's channel, for as long as the flood lasts.
    let publisher = {
        let (db, listen, channel) = (db, stack.listen_channel.clone(), channel.clone());
        tokio::spawn(async move {
            let mut sent = 0u64;
            let until = Instant::now() + Duration::from_secs(4);
            while Instant::now() < until {
                let payload = json!({"channel": channel, "payload": sent.to_string()}).to_string();
                if db
                    .execute("SELECT pg_notify($1, $2)", &[&listen, &payload])
                    .await
                    .is_err()
                {
                    break;
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sent
        })
    };
    let reading = tokio::spawn(async move {
        let mut got = 0u64;
        let mut worst = Duration::ZERO;
        let mut last = Instant::now();
        while let Ok(text) = reader.next_text(Duration::from_secs(2)).await {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            assert_eq!(v["payload"], got.to_string(), "in order, none missing");
            got += 1;
            worst = worst.max(last.elapsed());
            last = Instant::now();
        }
        (got, worst)
    });

    // The flood: FLOOD handshakes at once, on many channels.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let url = stack.ws_url(0);
    let opened = join_all((0..FLOOD).map(|i| {
        let url = format!("{url}/flood-{}/{}", i % 50, token(&json!({"mode": "r"})));
        async move { WsClient::connect(&url).await }
    }))
    .await;
    let flood_secs = started.elapsed().as_secs_f64();
    let failed = opened.iter().filter(|r| r.is_err()).count();
    let during = rss_kib(pid);
    let sockets: Vec<WsClient> = opened.into_iter().filter_map(Result::ok).collect();

    let sent = publisher.await?;
    let (got, worst) = reading.await?;
    eprintln!(
        "flood: {FLOOD} handshakes in {flood_secs:.2} s ({:.0}/s), {failed} failed; gateway RSS \
         {before} KiB -> {during} KiB ({:.1} KiB per socket); reader got {got}/{sent}, longest \
         gap {} ms",
        FLOOD as f64 / flood_secs,
        (during.saturating_sub(before)) as f64 / FLOOD as f64,
        worst.as_millis()
    );
    assert_eq!(failed, 0, "every handshake of the flood completes");
    assert_eq!(got, sent, "the reader got every notification");
    assert!(
        worst < Duration::from_millis(1500),
        "the reader was held up {} ms",
        worst.as_millis()
    );
    assert!(
        during.saturating_sub(before) < (FLOOD as u64) * 64,
        "more than 64 KiB per socket: {before} -> {during} KiB"
    );

    // Closing them gives the sockets back: the open-connection gauge returns to one (the reader
    // has gone too by now, so zero).
    drop(sockets);
    let gw = &stack.gateways[0];
    let back = pgws_tests::eventually(Duration::from_secs(10), || async {
        gw.metric("pgws_gateway_connections_open{protocol=\"postgres-websockets\"}")
            .await
            .is_some_and(|v| v == 0.0)
    })
    .await;
    assert!(back, "the flood's sockets were not released");
    Ok(())
}
