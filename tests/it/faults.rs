//! Faults injected for real: a NATS restart, a PostgreSQL restart, a client that never reads.
//! Each test prints what it measured (`--nocapture`), the figures of `docs/reliability.md`.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgws_tests::{http_get, memory_kib, unique, PrivateNats, Stack, WsClient};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(10);

/// A session LISTENing on a channel, yielding each payload.
pub(crate) struct PgWatch {
    _client: tokio_postgres::Client,
    rx: mpsc::UnboundedReceiver<String>,
}

impl PgWatch {
    pub(crate) async fn start(uri: &str, channel: &str) -> anyhow::Result<Self> {
        let (client, mut conn) = tokio_postgres::connect(uri, tokio_postgres::NoTls).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(Ok(msg)) = futures::StreamExt::next(&mut stream).await {
                if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                    drop(tx.send(n.payload().to_owned()));
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN \"{channel}\""))
            .await?;
        Ok(Self {
            _client: client,
            rx,
        })
    }

    /// The next notification's payload, if one comes within `timeout`.
    pub(crate) async fn next(&mut self, timeout: Duration) -> Option<String> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Waits for an envelope whose `payload` is `text`.
    pub(crate) async fn expect_payload(&mut self, text: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while let Ok(Some(p)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            let v: Value = serde_json::from_str(&p).unwrap_or_default();
            if v["payload"] == text {
                return true;
            }
        }
        false
    }
}

/// Sends `{"channel": channel, "seq": n}` every `every` until stopped; returns how many.
fn numbered_notifications(
    stack: &Stack,
    channel: &str,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<u64>> {
    let (uri, listen, channel) = (
        stack.db_uri(),
        stack.listen_channel.clone(),
        channel.to_owned(),
    );
    tokio::spawn(async move {
        let mut sent = 0u64;
        let mut db: Option<tokio_postgres::Client> = None;
        while !stop.load(Ordering::Relaxed) {
            if db.as_ref().is_none_or(|c| c.is_closed()) {
                db = match tokio_postgres::connect(&uri, tokio_postgres::NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(conn);
                        Some(c)
                    }
                    Err(_) => None,
                };
            }
            if let Some(c) = &db {
                let payload = json!({"channel": channel, "seq": sent}).to_string();
                if c.execute("SELECT pg_notify($1, $2)", &[&listen, &payload])
                    .await
                    .is_ok()
                {
                    sent += 1;
                }
            }
            tokio::time::sleep(every).await;
        }
        Ok(sent)
    })
}

/// Reads a numbered stream for `period`: each frame's `seq`, with when it arrived.
async fn read_numbered(ws: &mut WsClient, got: &mut Vec<(u64, Instant)>, period: Duration) {
    let deadline = Instant::now() + period;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Ok(text) = ws.next_text(left).await else {
            break;
        };
        let v: Value = serde_json::from_str(&text).unwrap_or_default();
        if let Some(seq) = v["seq"].as_u64() {
            got.push((seq, Instant::now()));
        }
    }
}

/// `(lost, duplicates)` of `sent` numbered messages given what arrived.
fn losses(sent: u64, got: &[(u64, Instant)]) -> (u64, u64) {
    let distinct: BTreeSet<u64> = got.iter().map(|(s, _)| *s).collect();
    (
        sent - distinct.len() as u64,
        got.len() as u64 - distinct.len() as u64,
    )
}

async fn all_ready(stack: &Stack) -> bool {
    for svc in stack.gateways.iter().chain(&stack.bridges) {
        if !matches!(http_get(svc.admin, "/readyz").await, Ok((200, _))) {
            return false;
        }
    }
    true
}

#[tokio::test]
async fn a_nats_restart_keeps_sockets_open_and_delivery_resumes() -> anyhow::Result<()> {
    let mut nats = PrivateNats::start().await?;
    let url = nats.url();
    let mut stack = Stack::start_with(&[("PGWS_NATS_URL", &url)]).await?;
    stack.add_bridge(&[]).await?;
    let channel = unique("nats-");
    let mut reader = stack.connect(0, &channel, &json!({"mode": "r"})).await?;
    let mut writer = stack.connect(0, "writer", &json!({"mode": "w"})).await?;
    let mut watch = PgWatch::start(&stack.db_uri(), &stack.listen_channel).await?;
    writer.send_text("before").await?;
    assert!(watch.expect_payload("before", T).await);

    let stop = Arc::new(AtomicBool::new(false));
    let sender = numbered_notifications(&stack, &channel, Duration::from_millis(20), stop.clone());
    let mut got = Vec::new();
    read_numbered(&mut reader, &mut got, Duration::from_millis(500)).await;
    assert!(!got.is_empty(), "nothing delivered before the fault");

    nats.kill()?;
    let killed = Instant::now();
    // A client message sent while NATS is down waits for a bridge (PGWS_NOTIFY_TIMEOUT).
    writer.send_text("during").await?;
    let gw = stack.gateways[0].admin;
    let unready = pgws_tests::eventually(Duration::from_secs(1), || async {
        matches!(http_get(gw, "/readyz").await, Ok((503, _)))
    })
    .await;
    assert!(unready, "the gateway stayed ready without NATS");
    // What was delivered before the fault is read now, not counted as resumed delivery.
    let left = (killed + Duration::from_secs(1)).saturating_duration_since(Instant::now());
    read_numbered(&mut reader, &mut got, left).await;
    nats.restart().await?;
    let restarted = Instant::now();
    // Delivery resumes on the socket opened before the fault.
    let before = got.len();
    while restarted.elapsed() < Duration::from_secs(15) && got.len() == before {
        read_numbered(&mut reader, &mut got, Duration::from_millis(20)).await;
    }
    let resumed_after = got[before..].first().map(|(_, at)| *at - restarted);
    assert!(
        resumed_after.is_some(),
        "no delivery after the NATS restart"
    );
    let ready = pgws_tests::eventually(Duration::from_secs(15), || all_ready(&stack)).await;
    let ready_after = restarted.elapsed();
    assert!(ready, "services not ready again after the NATS restart");
    // Client messages reach NOTIFY: the one sent during the outage and one sent after.
    let during = watch
        .expect_payload("during", Duration::from_secs(15))
        .await;
    let t = Instant::now();
    writer.send_text("after").await?;
    assert!(
        watch.expect_payload("after", T).await,
        "a message sent after the restart was lost"
    );
    let after_rtt = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let sent = sender.await??;
    read_numbered(&mut reader, &mut got, Duration::from_millis(1000)).await;
    let (lost, dups) = losses(sent, &got);
    eprintln!(
        "nats restart: down {:?}; ready again {ready_after:?} after restart; db->socket resumed {resumed_after:?} after restart; \
         notifications sent {sent}, lost {lost}, duplicates {dups}; message sent while down reached NOTIFY: {during}; \
         message after restart reached NOTIFY in {after_rtt:?}",
        restarted - killed
    );
    assert!(
        during,
        "the message sent while NATS was down never reached NOTIFY"
    );
    assert_eq!(dups, 0, "duplicate deliveries");
    Ok(())
}

#[tokio::test]
async fn a_postgres_restart_keeps_the_bridge_and_sockets_and_delivery_resumes() -> anyhow::Result<()>
{
    let pg = pgws_tests::PrivatePg::start()?;
    let uri = pg.uri();
    let stack = Stack::start_with(&[("PGWS_DB_URI", &uri)]).await?;
    let channel = unique("pgr-");
    let mut reader = stack.connect(0, &channel, &json!({"mode": "r"})).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let sender = numbered_notifications(&stack, &channel, Duration::from_millis(20), stop.clone());
    let mut got = Vec::new();
    read_numbered(&mut reader, &mut got, Duration::from_millis(500)).await;
    assert!(!got.is_empty(), "nothing delivered before the fault");

    pg.stop()?;
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    pg.restart()?;
    let restarted = Instant::now();
    let before = got.len();
    let deadline = restarted + Duration::from_secs(15);
    while Instant::now() < deadline && got[before..].is_empty() {
        read_numbered(&mut reader, &mut got, Duration::from_millis(20)).await;
    }
    let resumed_after = got[before..].first().map(|(_, at)| *at - restarted);
    assert!(
        resumed_after.is_some(),
        "no delivery after the PostgreSQL restart"
    );
    let bridge = &stack.bridges[0];
    assert_eq!(http_get(bridge.admin, "/healthz").await?.0, 200);
    let ready = pgws_tests::eventually(T, || all_ready(&stack)).await;
    assert!(ready, "not ready again after the PostgreSQL restart");
    stop.store(true, Ordering::Relaxed);
    let sent = sender.await??;
    read_numbered(&mut reader, &mut got, Duration::from_millis(500)).await;
    let (lost, dups) = losses(sent, &got);
    let reconnects = bridge
        .metric("pgws_bridge_listener_reconnects_total")
        .await
        .unwrap_or(0.0);
    eprintln!(
        "postgres restart: down {:?}; db->socket resumed {resumed_after:?} after restart; \
         notifications committed {sent}, lost {lost}, duplicates {dups}; listener reconnects {reconnects}",
        restarted - stopped
    );
    assert_eq!(dups, 0, "duplicate deliveries");
    assert!(reconnects >= 1.0, "the listener did not reconnect");
    Ok(())
}

#[tokio::test]
async fn a_bridge_started_while_postgres_is_down_becomes_ready_when_it_comes_up(
) -> anyhow::Result<()> {
    let pg = pgws_tests::PrivatePg::start()?;
    pg.stop()?;
    let uri = pg.uri();
    let mut stack = Stack::new();
    stack.extra = vec![
        ("PGWS_DB_URI".to_owned(), uri),
        ("PGWS_RETRIES".to_owned(), "5".to_owned()),
    ];
    let bridge = pgws_tests::Service::start(pgws_tests::ServiceKind::Bridge, &stack.env()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = http_get(bridge.admin, "/readyz").await?;
    assert_eq!(status, 503, "ready without a database: {body}");
    pg.restart()?;
    let up = Instant::now();
    bridge.wait_ready().await?;
    let ready_after = up.elapsed();
    stack.bridges.push(bridge);
    stack.add_gateway(&[]).await?;
    stack.wait_flowing(0).await?;
    eprintln!(
        "bridge started with the database down: ready {ready_after:?} after PostgreSQL came up, \
         delivering {:?} after",
        up.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_and_memory_stays_bounded() -> anyhow::Result<()>
{
    let stack = Stack::start().await?;
    let pid = stack.gateways[0].pid().unwrap_or(0);
    let channel = unique("stall-");
    // Never read: the kernel's buffers fill, then the socket's send queue (1024 messages).
    let mut stalled = stack.connect(0, &channel, &json!({"mode": "r"})).await?;
    let mut healthy = stack.connect(0, &channel, &json!({"mode": "r"})).await?;
    let (peak_before, rss_before) = memory_kib(pid);
    let db = stack.pg().await?;
    let (per_tx, txs, size) = (500i64, 20i64, 5000i32);
    let total = (per_tx * txs) as usize;
    let reading = tokio::spawn(async move {
        let mut next = 0i64;
        let mut worst = Duration::ZERO;
        let mut last = Instant::now();
        while (next as usize) < total {
            let text = healthy.next_text(T).await?;
            let v: Value = serde_json::from_str(&text)?;
            anyhow::ensure!(v["i"] == next, "healthy reader out of order at {next}");
            worst = worst.max(last.elapsed());
            last = Instant::now();
            next += 1;
        }
        Ok((worst, Instant::now()))
    });
    let started = Instant::now();
    for t in 0..txs {
        db.execute(
            "SELECT count(pg_notify($1, json_build_object('channel', $2::text, 'i', g, 'body', repeat('y', $3))::text))
             FROM generate_series($4::bigint, $5::bigint) g",
            &[&stack.listen_channel, &channel, &size, &(t * per_tx), &(t * per_tx + per_tx - 1)],
        )
        .await?;
        // About 10,000 notifications/s: a high rate the gateway and NATS keep up with.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let committed = Instant::now();
    let (worst_gap, done) = reading.await??;
    let gw = &stack.gateways[0];
    let kicked = pgws_tests::eventually(T, || async {
        gw.metric("pgws_gateway_slow_consumer_disconnects_total")
            .await
            == Some(1.0)
    })
    .await;
    // The gateway gives the socket up while its client still does not read (its task and
    // queue go), and the client, once it reads, finds the end after what the network held.
    let open = || async {
        gw.metric("pgws_gateway_connections_open{protocol=\"postgres-websockets\"}")
            .await
    };
    // (The healthy reader's socket closed when its task ended.)
    let released = pgws_tests::eventually(Duration::from_secs(5), || async {
        open().await == Some(0.0)
    })
    .await;
    // Nor does its kernel keep what could not be written: the connection is reset, not left
    // in FIN-WAIT-1 with a full send buffer until TCP gives up on the peer.
    let port = gw.addr.map_or(0, |a| a.port());
    let unsent = || {
        pgws_tests::tcp_connections(port)
            .into_iter()
            .filter(|(_, bytes)| *bytes > 0)
            .collect::<Vec<_>>()
    };
    let freed =
        pgws_tests::eventually(Duration::from_secs(5), || async { unsent().is_empty() }).await;
    let held = unsent();
    let (peak, rss) = memory_kib(pid);
    let ended = stalled.expect_end(T).await?;
    eprintln!("stalled client: found the end after what the network held: {ended:?}");
    assert!(
        released,
        "the gateway kept the non-reading socket ({:?} open)",
        open().await
    );
    assert!(
        freed,
        "the gateway's kernel still holds unsent bytes for the dropped socket: {held:?}"
    );
    let mib = |k: u64| k as f64 / 1024.0;
    eprintln!(
        "non-reading client: {total} notifications of {size} B ({:.0} MiB) in {:?}; healthy reader got all, \
         {:?} after the last commit, longest wait between frames {worst_gap:?}; \
         gateway RSS {:.1} MiB before, peak {:.1} MiB, {:.1} MiB after; stalled socket disconnected: {kicked}",
        mib(total as u64 * size as u64 / 1024),
        committed - started,
        done.saturating_duration_since(committed),
        mib(rss_before),
        mib(peak.max(peak_before)),
        mib(rss)
    );
    assert!(
        kicked,
        "the non-reading socket was not disconnected as a slow consumer"
    );
    assert!(
        peak.saturating_sub(rss_before) < 32 * 1024,
        "gateway memory grew by {:.1} MiB",
        mib(peak.saturating_sub(rss_before))
    );
    Ok(())
}
