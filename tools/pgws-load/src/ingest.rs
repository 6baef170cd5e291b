//! `ingest`: N write-mode sockets send small frames as fast as the gateway takes them; a
//! LISTEN connection on the listen channel counts the envelopes that reach NOTIFY. Then, for
//! the same number of seconds, the baseline: `--baseline-connections` connections each
//! looping on an autocommit `SELECT pg_notify(...)` (one NOTIFY per transaction), counted
//! by the same LISTEN. Reports both rates and their ratio.
//!
//! Two ingest figures: the rate in a window after a second of warm-up, and the exact one. For
//! the exact one the sockets stop after the window and the run waits (up to `--drain`, or
//! `--quiet` without progress) until every frame sent has reached NOTIFY; the rate is the
//! frames sent over the time from the first frame to the last notification. Each frame is
//! `s<socket>m<n>`, and the LISTEN checks that each socket's frames arrive once, in order.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_postgres::AsyncMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::args::Opts;
use crate::client;
use crate::procfs;
use crate::report::{round, Report};

#[derive(Default)]
struct Counts {
    ingest: AtomicU64,
    baseline: AtomicU64,
    /// When the last ingest notification arrived, in µs after the run's epoch.
    last_us: AtomicU64,
    /// Per socket, the next frame number expected.
    next: std::sync::Mutex<Vec<u64>>,
    /// Ingest notifications that were not the next frame of their socket (a gap, a repeat or
    /// an unreadable payload).
    out_of_order: AtomicU64,
}

impl Counts {
    /// Counts an ingest notification that arrived `at` µs after the epoch: in order when it
    /// holds the next frame of its socket.
    fn ingested(&self, payload: &str, at: u64) {
        let in_order = frame_of(payload).is_some_and(|(socket, n)| {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            match next.get_mut(socket) {
                Some(expected) if *expected == n => {
                    *expected += 1;
                    true
                }
                _ => false,
            }
        });
        if !in_order {
            self.out_of_order.fetch_add(1, Ordering::Relaxed);
        }
        self.ingest.fetch_add(1, Ordering::Relaxed);
        self.last_us.store(at, Ordering::Relaxed);
    }
}

/// The socket and frame number of an envelope whose payload is `s<socket>m<n>`.
fn frame_of(payload: &str) -> Option<(usize, u64)> {
    let rest = &payload[payload.find(r#""payload":"s"#)? + 12..];
    let (socket, rest) = rest.split_once('m')?;
    let n = &rest[..rest.find('"')?];
    Some((socket.parse().ok()?, n.parse().ok()?))
}

/// LISTENs on the listen channel and counts notifications of the two tagged channels. The
/// connection runs on a thread and runtime of its own, so that the sending sockets cannot
/// delay reading notifications (the count is of what reached NOTIFY, not of what this
/// process found time to read).
async fn listen(
    opts: &Opts,
    ingest_tag: String,
    baseline_tag: String,
    epoch: Instant,
) -> anyhow::Result<Arc<Counts>> {
    let counts = Arc::new(Counts {
        next: std::sync::Mutex::new(vec![1; opts.sockets as usize]),
        ..Counts::default()
    });
    let c = Arc::clone(&counts);
    let (db_uri, channel) = (opts.db_uri.clone(), opts.listen_channel.clone());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
    std::thread::Builder::new()
        .name("listen".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let (client, mut conn) =
                    match tokio_postgres::connect(&db_uri, tokio_postgres::NoTls).await {
                        Ok(x) => x,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                let reader = tokio::spawn(async move {
                    let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
                    while let Some(Ok(msg)) = messages.next().await {
                        if let AsyncMessage::Notification(n) = msg {
                            let p = n.payload();
                            if p.contains(&ingest_tag) {
                                c.ingested(p, epoch.elapsed().as_micros() as u64);
                            } else if p.contains(&baseline_tag) {
                                c.baseline.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
                let listened = client
                    .batch_execute(&format!("LISTEN {}", client::quote_ident(&channel)))
                    .await;
                let _ = ready_tx.send(listened.map_err(Into::into));
                let _ = reader.await;
                drop(client);
            });
        })?;
    ready_rx.await.context("the LISTEN thread ended")??;
    Ok(counts)
}

/// Waits until `counter` reaches `target`; gives up after `--drain` seconds, or `--quiet`
/// seconds without progress.
async fn drain(counter: &AtomicU64, target: u64, opts: &Opts) {
    let deadline = Instant::now() + Duration::from_secs_f64(opts.drain);
    let quiet = Duration::from_secs_f64(opts.quiet);
    let mut last = counter.load(Ordering::Relaxed);
    let mut since = Instant::now();
    while last < target && Instant::now() < deadline && since.elapsed() < quiet {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = counter.load(Ordering::Relaxed);
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
}

/// Runs `ingest`.
pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    anyhow::ensure!(
        opts.sockets <= opts.per_process,
        "ingest runs in one process: at most --per-process ({}) sockets",
        opts.per_process
    );
    let mut report = Report::new(opts);
    report.param("sockets", opts.sockets);
    report.param("seconds", opts.seconds);
    report.param("baseline_connections", opts.baseline_connections as u64);
    report.param("listen_channel", opts.listen_channel.as_str());
    let pids = client::server_pids(opts);
    report.servers(&pids);
    let channel = format!("{}-ingest", opts.run_id);
    let baseline_channel = format!("{}-baseline", opts.run_id);
    let epoch = Instant::now();
    let counts = listen(
        opts,
        format!("\"channel\":\"{channel}\""),
        format!("\"channel\":\"{baseline_channel}\""),
        epoch,
    )
    .await?;

    // --- the sockets
    let eps = client::resolve_all(opts).await?;
    let token = client::token(opts, &json!({"mode": "w"}))?;
    let connect_start = Instant::now();
    let mut sockets = Vec::new();
    for g in 0..opts.sockets {
        let ep = &eps[opts.gateway_of(g)];
        let config = WebSocketConfig::default().read_buffer_size(4096);
        let ws = client::open(
            ep,
            &format!("/{channel}/{token}"),
            client::source_of(g, &ep.addr),
            config,
        )
        .await?;
        sockets.push(ws);
    }
    let connect_secs = connect_start.elapsed().as_secs_f64();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut senders = Vec::new();
    let send_start = epoch.elapsed();
    for (g, ws) in sockets.into_iter().enumerate() {
        let (mut sink, mut stream) = ws.split();
        let errs = Arc::clone(&errors);
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                if let Message::Text(t) = msg {
                    if t.as_str().contains("\"Error\"") {
                        errs.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
        let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
        senders.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..32 {
                    i += 1;
                    if sink.feed(Message::text(format!("s{g}m{i}"))).await.is_err() {
                        return sink;
                    }
                }
                if sink.flush().await.is_err() {
                    return sink;
                }
                sent.fetch_add(32, Ordering::Relaxed);
            }
            sink
        }));
    }
    // One second of warm-up, then the window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = procfs::total_cpu_secs(&pids);
    let (c0, t0) = (counts.ingest.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(opts.seconds)).await;
    let (c1, t1) = (counts.ingest.load(Ordering::Relaxed), Instant::now());
    let cpu1 = procfs::total_cpu_secs(&pids);
    stop.store(true, Ordering::Relaxed);
    let window = (t1 - t0).as_secs_f64();
    let ingest_rate = (c1 - c0) as f64 / window;
    // The senders stop after their current flush (the sockets stay open); then every frame
    // sent must reach NOTIFY.
    let mut sinks = Vec::new();
    for s in senders {
        sinks.push(s.await?);
    }
    let stopped = epoch.elapsed();
    let total_sent = sent.load(Ordering::Relaxed);
    drain(&counts.ingest, total_sent, opts).await;
    for t in &tasks {
        t.abort();
    }
    drop(sinks);
    let total_notified = counts.ingest.load(Ordering::Relaxed);
    let last = Duration::from_micros(counts.last_us.load(Ordering::Relaxed));
    let exact_secs = last.saturating_sub(send_start).as_secs_f64();
    let exact_rate = total_notified as f64 / exact_secs.max(1e-9);
    let out_of_order = counts.out_of_order.load(Ordering::Relaxed);
    let exact = total_notified == total_sent && out_of_order == 0;

    // --- the baseline: one NOTIFY per transaction
    let mut clients = Vec::new();
    for _ in 0..opts.baseline_connections.max(1) {
        clients.push(client::postgres(opts).await?);
    }
    let b_stop = Arc::new(AtomicBool::new(false));
    let mut b_tasks = Vec::new();
    for (k, db) in clients.into_iter().enumerate() {
        let stop = Arc::clone(&b_stop);
        let listen = opts.listen_channel.clone();
        let ch = baseline_channel.clone();
        b_tasks.push(tokio::spawn(async move {
            let stmt = db.prepare("SELECT pg_notify($1, $2)").await?;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let payload = format!(r#"{{"channel":"{ch}","k":{k},"i":{i}}}"#);
                db.execute(&stmt, &[&listen, &payload]).await?;
            }
            anyhow::Ok(())
        }));
    }
    let b0 = counts.baseline.load(Ordering::Relaxed);
    let bt0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(opts.seconds)).await;
    let b1 = counts.baseline.load(Ordering::Relaxed);
    let b_window = bt0.elapsed().as_secs_f64();
    b_stop.store(true, Ordering::Relaxed);
    for t in b_tasks {
        t.await??;
    }
    let baseline_rate = (b1 - b0) as f64 / b_window;

    report.figure("connect_secs", round(connect_secs, 3));
    report.figure("window_secs", round(window, 3));
    report.figure("notified_in_window", c1 - c0);
    report.figure("ingest_msgs_per_s", round(ingest_rate, 0));
    report.figure("frames_sent", total_sent);
    report.figure("notified_total", total_notified);
    report.figure("out_of_order", out_of_order);
    report.figure("exact", exact);
    report.figure(
        "drain_secs",
        round(last.saturating_sub(stopped).as_secs_f64(), 3),
    );
    report.figure("exact_secs", round(exact_secs, 3));
    report.figure("exact_msgs_per_s", round(exact_rate, 0));
    report.figure("error_frames", errors.load(Ordering::Relaxed));
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        report.figure("server_cpu_share", round((b - a) / window, 3));
        if c1 > c0 {
            report.figure(
                "server_cpu_us_per_msg",
                round((b - a) * 1e6 / (c1 - c0) as f64, 3),
            );
        }
    }
    report.figure("baseline_notified", b1 - b0);
    report.figure("baseline_msgs_per_s", round(baseline_rate, 0));
    report.figure(
        "ratio_to_baseline",
        round(ingest_rate / baseline_rate.max(1e-9), 2),
    );
    report.figure(
        "exact_ratio_to_baseline",
        round(exact_rate / baseline_rate.max(1e-9), 2),
    );
    report.finish(opts.json.as_deref())?;
    anyhow::ensure!(c1 > c0, "no client message reached NOTIFY");
    Ok(())
}
