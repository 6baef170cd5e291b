//! Measures pg-recorder: rows per second into `pgws_audit.messages` and the latency from a
//! message's acceptance (`message_delivered_at`, set when the gateway read the frame) to its
//! committed row (`recorded_at`).
//!
//! `pgws-audit-bench publish <records>`: publishes records straight into the audit stream as fast
//! as JetStream acknowledges them (a window of outstanding acks), with a recorder running;
//! reports the publish rate and the recorder's sustained rate (records / time from the first
//! to the last committed row).
//! `pgws-audit-bench sockets <sockets> <messages/s> <seconds>`: real websockets send through the
//! gateway (`PGWS_URL`, default `ws://127.0.0.1:3000`) at a steady total rate; reports the
//! acceptance-to-row latency percentiles.
//! `pgws-audit-bench remove-stream`: deletes the audit stream of `PGWS_NATS_PREFIX` (the end of
//! a benchmark run).
//! Settings from the environment as the stack's: `PGWS_NATS_URL`, `PGWS_NATS_PREFIX`,
//! `PGWS_DB_URI`, `PGWS_JWT_SECRET`, `PGWS_LISTEN_CHANNEL`.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use futures::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_default();
    if mode == "remove-stream" {
        let client = async_nats::connect(var("PGWS_NATS_URL", "nats://127.0.0.1:4222")).await?;
        let stream = subjects()?.audit_stream();
        async_nats::jetstream::new(client)
            .delete_stream(&stream)
            .await
            .with_context(|| format!("deleting stream {stream}"))?;
        return Ok(());
    }
    let channel = format!("bench{}", (unix() * 1000.0) as u64);
    let db_uri = var("PGWS_DB_URI", "postgres://postgres@127.0.0.1:5432/postgres");
    let (db, conn) = tokio_postgres::connect(&db_uri, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let expected = match mode.as_str() {
        "publish" => publish(&channel, arg(2, 100_000)).await?,
        "sockets" => sockets(&channel, arg(2, 100), arg(3, 1000), arg(4, 10)).await?,
        _ => bail!(
            "usage: pgws-audit-bench publish <records> | sockets <sockets> <messages/s> <seconds>"
        ),
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM pgws_audit.messages WHERE channel = $1",
                &[&channel],
            )
            .await?
            .get(0);
        if n as u64 >= expected || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let row = db
        .query_one(
            "SELECT count(*), count(DISTINCT id),
                    extract(epoch FROM max(recorded_at) - min(recorded_at))::float8,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM recorded_at - received_at))::float8,
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM recorded_at - received_at))::float8,
                    max(extract(epoch FROM recorded_at - received_at))::float8
             FROM pgws_audit.messages WHERE channel = $1",
            &[&channel],
        )
        .await?;
    let (rows, distinct, span): (i64, i64, f64) = (
        row.get(0),
        row.get(1),
        row.get::<_, Option<f64>>(2).unwrap_or(0.0),
    );
    let (p50, p99, max): (f64, f64, f64) = (
        row.get::<_, Option<f64>>(3).unwrap_or(0.0),
        row.get::<_, Option<f64>>(4).unwrap_or(0.0),
        row.get::<_, Option<f64>>(5).unwrap_or(0.0),
    );
    println!(
        "mode={mode} expected={expected} rows={rows} distinct={distinct} commit_span={span:.2}s \
         recorder_rows/s={:.0} accept_to_row p50={:.1}ms p99={:.1}ms max={:.1}ms",
        if span > 0.0 { rows as f64 / span } else { 0.0 },
        p50 * 1000.0,
        p99 * 1000.0,
        max * 1000.0
    );
    Ok(())
}

/// The subjects of `PGWS_NATS_PREFIX`.
fn subjects() -> anyhow::Result<pgws_proto::Subjects> {
    let prefix = pgws_proto::Prefix::new(&var("PGWS_NATS_PREFIX", "pgws"))?;
    Ok(pgws_proto::Subjects::new(prefix))
}

/// Publishes `n` envelopes into the audit stream; returns `n`.
async fn publish(channel: &str, n: u64) -> anyhow::Result<u64> {
    let client = async_nats::connect(var("PGWS_NATS_URL", "nats://127.0.0.1:4222")).await?;
    let js = async_nats::jetstream::new(client);
    let subject = subjects()?.audit();
    let listen = var("PGWS_LISTEN_CHANNEL", "postgres-websockets-listener");
    let run = format!("{:x}", (unix() * 1e6) as u64);
    let started = Instant::now();
    let mut window = VecDeque::new();
    for i in 0..n {
        let envelope =
            json!({"event": "WebsocketMessage", "channel": channel, "payload": format!("m{i}"),
            "claims": {"mode": "rw", "message_delivered_at": unix()}})
            .to_string();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("bench-{run}-{i}").as_str());
        headers.insert("Pgws-Notify-Channel", listen.as_str());
        window.push_back(
            js.publish_with_headers(subject.clone(), headers, envelope.into())
                .await?,
        );
        if window.len() >= 4096 {
            if let Some(ack) = window.pop_front() {
                ack.await.context("publish ack")?;
            }
        }
    }
    for ack in window {
        ack.await.context("publish ack")?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("published={n} in {secs:.2}s ({:.0}/s)", n as f64 / secs);
    Ok(n)
}

/// Sends `rate` messages per second in total from `count` sockets for `seconds`.
async fn sockets(channel: &str, count: u64, rate: u64, seconds: u64) -> anyhow::Result<u64> {
    let url = var("PGWS_URL", "ws://127.0.0.1:3000");
    let secret = var("PGWS_JWT_SECRET", "reallyreallyreallyreallyverysafe");
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"mode": "w"}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?;
    let mut socks = Vec::new();
    for _ in 0..count {
        let (ws, _) = tokio_tungstenite::connect_async(format!("{url}/{channel}/{token}")).await?;
        socks.push(ws);
    }
    let total = rate * seconds;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    for i in 0..total {
        tick.tick().await;
        let ws = &mut socks[(i % count) as usize];
        ws.send(Message::text(format!("m{i}"))).await?;
    }
    Ok(total)
}
