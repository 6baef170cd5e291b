//! A first fan-out measurement: N sockets on one channel of a running gateway, M notifications
//! issued with `pg_notify` at a steady rate, each carrying its send time; prints deliveries per
//! second and latency percentiles from `pg_notify` to socket receipt.
//!
//! Usage: `pgws-fanout [sockets] [messages] [rate/s]` with the stack's settings in the
//! environment (`PGWS_URL`, default `ws://127.0.0.1:3000`; `PGWS_DB_URI`; `PGWS_JWT_SECRET`;
//! `PGWS_LISTEN_CHANNEL`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (sockets, messages, rate) = (arg(1, 1000), arg(2, 200), arg(3, 100));
    let url = var("PGWS_URL", "ws://127.0.0.1:3000");
    let secret = var("PGWS_JWT_SECRET", "reallyreallyreallyreallyverysafe");
    let listen = var("PGWS_LISTEN_CHANNEL", "postgres-websockets-listener");
    let db_uri = var("PGWS_DB_URI", "postgres://postgres@127.0.0.1:5432/postgres");
    let channel = format!("fanout{}", micros());
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"mode": "r"}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?;
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(
        (sockets * messages) as usize,
    )));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..sockets {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}/{channel}/{token}"))
            .await
            .context("connecting")?;
        let lat = Arc::clone(&latencies);
        tasks.push(tokio::spawn(async move {
            let mut got = 0;
            while got < messages {
                let Ok(Some(Ok(msg))) =
                    tokio::time::timeout(Duration::from_secs(60), ws.next()).await
                else {
                    break;
                };
                if let Message::Text(t) = msg {
                    let now = micros();
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    if let Some(sent) = v["t"].as_u64() {
                        if let Ok(mut l) = lat.lock() {
                            l.push(now.saturating_sub(sent));
                        }
                        got += 1;
                    }
                }
            }
        }));
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let (db, conn) = tokio_postgres::connect(&db_uri, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let send_start = Instant::now();
    for i in 0..messages {
        tick.tick().await;
        let payload = json!({"channel": channel, "i": i, "t": micros()}).to_string();
        db.execute("SELECT pg_notify($1, $2)", &[&listen, &payload])
            .await?;
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = send_start.elapsed().as_secs_f64();
    let mut l = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort_unstable();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "sockets={sockets} messages={messages} rate={rate}/s connect={connect_secs:.2}s \
         deliveries={} expected={} deliveries/s={:.0} p50={:.2}ms p99={:.2}ms p99.9={:.2}ms max={:.2}ms",
        l.len(),
        sockets * messages,
        l.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        pct(0.999),
        l.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
    Ok(())
}
