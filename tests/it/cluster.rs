//! The stack on a three-node NATS cluster (routes between the nodes, clustered JetStream, the
//! audit stream with three replicas): under steady client load, the node leading the audit
//! stream is SIGKILLed and later restarted. Every message a client got accepted is recorded
//! exactly once, and delivery to listeners resumes. Prints its figures (`--nocapture`), those
//! of `docs/reliability.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgws_tests::{eventually, unique, Frame, NatsCluster, Service, ServiceKind, Stack, WsClient};
use serde_json::{json, Value};

/// Client sockets sending numbered messages, two per gateway.
const SOCKETS: usize = 6;
/// One message per socket every this long (20/s each, 120/s in all).
const PERIOD: Duration = Duration::from_millis(50);
/// How long the clients send.
const LOAD: Duration = Duration::from_secs(20);
/// When the node is killed and restarted, from the start of the load.
const KILL_AT: Duration = Duration::from_secs(6);
const RESTART_AT: Duration = Duration::from_secs(14);
/// At most this many messages per socket.
const MAX_PER_SOCKET: u64 = 400;
/// A database NOTIFY on the probe channel this often.
const PROBE_EVERY: Duration = Duration::from_millis(100);

/// What one client socket sent and got back.
#[derive(Default)]
struct Tally {
    sent: u64,
    /// Error frames (a message refused: not accepted).
    errors: u64,
    /// Its own messages delivered back (delivery is at most once: not proof of acceptance).
    echoes: BTreeSet<u64>,
    /// When each message was sent, and how long each echo took.
    sent_at: Vec<Instant>,
    latencies: Vec<Duration>,
    /// How the socket ended, if it did.
    ended: Option<String>,
}

/// Sends `<tag>-<n>` every [`PERIOD`] until `send_until`, and reads until `stop`.
async fn drive(
    mut ws: WsClient,
    tag: String,
    tally: Arc<Mutex<Tally>>,
    send_until: Instant,
    stop: Arc<AtomicBool>,
) {
    let mut next = Instant::now();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let sending = now < send_until && seq < MAX_PER_SOCKET;
        if sending && now >= next {
            if let Err(e) = ws.send_text(&format!("{tag}-{seq}")).await {
                set(&tally, |t| t.ended = Some(e.to_string()));
                return;
            }
            seq += 1;
            set(&tally, |t| {
                t.sent = seq;
                t.sent_at.push(Instant::now());
            });
            next += PERIOD;
            continue;
        }
        let wait = if sending {
            next.saturating_duration_since(now)
        } else {
            Duration::from_millis(100)
        };
        let frame = tokio::time::timeout(wait, ws.next_frame(Duration::from_secs(3600))).await;
        match frame {
            Err(_) | Ok(Ok(Frame::Ping(_) | Frame::Pong(_))) => {}
            Ok(Ok(Frame::Text(text))) => {
                let v: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
                let payload = v["payload"].as_str().unwrap_or_default();
                if v["event"] == "Error" {
                    set(&tally, |t| t.errors += 1);
                } else if let Some(n) = payload.strip_prefix(&format!("{tag}-")) {
                    let n: u64 = n.parse().unwrap_or(u64::MAX);
                    set(&tally, |t| {
                        if let Some(at) = t.sent_at.get(n as usize) {
                            t.latencies.push(at.elapsed());
                        }
                        t.echoes.insert(n);
                    });
                }
            }
            Ok(Ok(other)) => {
                set(&tally, |t| t.ended = Some(format!("{other:?}")));
                return;
            }
            Ok(Err(e)) => {
                set(&tally, |t| t.ended = Some(e.to_string()));
                return;
            }
        }
    }
}

fn set(tally: &Mutex<Tally>, f: impl FnOnce(&mut Tally)) {
    if let Ok(mut t) = tally.lock() {
        f(&mut t);
    }
}

/// `payload -> rows` recorded in `pgws_audit.messages` for `channel`.
async fn recorded(db: &tokio_postgres::Client, channel: &str) -> BTreeMap<String, i64> {
    db.query(
        "SELECT payload, count(*) FROM pgws_audit.messages WHERE channel = $1 GROUP BY payload",
        &[&channel],
    )
    .await
    .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    .unwrap_or_default()
}

/// Reads the probe channel on one socket: each notification's `seq` and when it arrived;
/// how the socket ended, if it did before `stop`.
async fn read_probes(
    mut ws: WsClient,
    got: Arc<Mutex<Vec<(u64, Instant)>>>,
    stop: Arc<AtomicBool>,
) -> Option<String> {
    while !stop.load(Ordering::Relaxed) {
        let frame = tokio::time::timeout(
            Duration::from_millis(200),
            ws.next_frame(Duration::from_secs(3600)),
        )
        .await;
        match frame {
            Err(_) | Ok(Ok(Frame::Ping(_) | Frame::Pong(_))) => {}
            Ok(Ok(Frame::Text(text))) => {
                let v: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
                if let (Some(seq), Ok(mut got)) = (v["seq"].as_u64(), got.lock()) {
                    got.push((seq, Instant::now()));
                }
            }
            Ok(Ok(other)) => return Some(format!("{other:?}")),
            Ok(Err(e)) => return Some(e.to_string()),
        }
    }
    None
}

/// Whether every replica of `stream` is current, as the node leading it reports.
async fn replicas_current(cluster: &NatsCluster, stream: &str) -> bool {
    let Some(leader) = cluster.stream_leader(stream).await else {
        return false;
    };
    let Ok(jsz) = cluster.nodes[leader]
        .monitor("/jsz?accounts=true&streams=true")
        .await
    else {
        return false;
    };
    let accounts = jsz["account_details"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    accounts
        .iter()
        .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
        .filter(|s| s["name"] == stream)
        .any(|s| {
            let replicas = s["cluster"]["replicas"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            replicas.len() == cluster.nodes.len() - 1
                && replicas.iter().all(|r| r["current"] == true)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_killed_under_load_loses_and_duplicates_no_accepted_message(
) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(180), kill_a_node_under_load())
        .await
        .map_err(|_| anyhow::anyhow!("the test took over 180 s"))?
}

async fn kill_a_node_under_load() -> anyhow::Result<()> {
    let mut cluster = NatsCluster::start(3).await?;
    let url = |i: usize| cluster.nodes[i].url();
    // Each service is given one node; it learns the others from the cluster.
    let mut stack = Stack::new();
    stack.extra = vec![("PGWS_AUDIT_REPLICAS".into(), "3".into())];
    let mut env = stack.env();
    env.push(("PGWS_NATS_URL".into(), url(0)));
    let recorder = Service::start(ServiceKind::Recorder, &env).await?;
    recorder.wait_ready().await?;
    stack.add_bridge(&[("PGWS_NATS_URL", &url(1))]).await?;
    stack.add_bridge(&[("PGWS_NATS_URL", &url(2))]).await?;
    for i in 0..3 {
        stack.add_gateway(&[("PGWS_NATS_URL", &url(i))]).await?;
        stack.wait_flowing(i).await?;
    }
    let stream = format!("{}-audit", stack.prefix);
    let target = cluster
        .stream_leader(&stream)
        .await
        .ok_or_else(|| anyhow::anyhow!("the audit stream has no leader"))?;
    let meta = cluster.meta_leader().await;

    // Listeners: a probe socket per gateway, a NOTIFY on the probe channel every 100 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let probe = unique("probe-");
    let mut probes = Vec::new();
    for i in 0..3 {
        let ws = stack.connect(i, &probe, &json!({"mode": "r"})).await?;
        let got = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(read_probes(ws, Arc::clone(&got), Arc::clone(&stop)));
        probes.push((got, task));
    }
    let issued: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let notifier = {
        let (db, issued, stop) = (stack.pg().await?, Arc::clone(&issued), Arc::clone(&stop));
        let (listen, probe) = (stack.listen_channel.clone(), probe.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let seq = issued.lock().map(|v| v.len()).unwrap_or(0);
                let payload = json!({"channel": probe, "seq": seq}).to_string();
                let at = Instant::now();
                if db
                    .execute("SELECT pg_notify($1, $2)", &[&listen, &payload])
                    .await
                    .is_ok()
                {
                    drop(issued.lock().map(|mut v| v.push(at)));
                }
                tokio::time::sleep(PROBE_EVERY).await;
            }
        })
    };

    // The clients: two sockets per gateway, each on a channel of its own.
    let start = Instant::now();
    let mut clients = Vec::new();
    for s in 0..SOCKETS {
        let channel = unique("cluster-");
        let ws = stack
            .connect(s % 3, &channel, &json!({"mode": "rw"}))
            .await?;
        let tally = Arc::new(Mutex::new(Tally::default()));
        let task = tokio::spawn(drive(
            ws,
            format!("m{s}"),
            Arc::clone(&tally),
            start + LOAD,
            Arc::clone(&stop),
        ));
        clients.push((channel, tally, task));
    }

    tokio::time::sleep_until((start + KILL_AT).into()).await;
    cluster.nodes[target].kill()?;
    let killed = Instant::now();
    let moved = eventually(Duration::from_secs(20), || async {
        cluster
            .stream_leader(&stream)
            .await
            .is_some_and(|l| l != target)
    })
    .await;
    anyhow::ensure!(moved, "no new leader of the audit stream");
    let new_leader = killed.elapsed();
    tokio::time::sleep_until((start + RESTART_AT).into()).await;
    cluster.nodes[target].restart().await?;
    let restarted = Instant::now();
    let current = eventually(Duration::from_secs(30), || async {
        replicas_current(&cluster, &stream).await
    })
    .await;
    let caught_up = restarted.elapsed();
    anyhow::ensure!(current, "the restarted node's replica never caught up");

    // Wait until every message is recorded or refused (bounded), then read the verdict.
    tokio::time::sleep_until((start + LOAD).into()).await;
    let db = stack.pg().await?;
    let accounted = eventually(Duration::from_secs(40), || async {
        for (channel, tally, _) in &clients {
            let rows = recorded(&db, channel).await.len() as u64;
            let (sent, errors) = tally.lock().map(|t| (t.sent, t.errors)).unwrap_or_default();
            if rows + errors < sent {
                return false;
            }
        }
        true
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    drop(notifier.await);
    let (mut sent, mut errors, mut rows, mut dup, mut missing, mut echoes) = (0, 0, 0, 0, 0, 0);
    let mut latencies = Vec::new();
    for (s, (channel, tally, task)) in clients.into_iter().enumerate() {
        drop(task.await);
        let got = recorded(&db, &channel).await;
        let t = tally
            .lock()
            .map_err(|_| anyhow::anyhow!("tally poisoned"))?;
        let expected: BTreeSet<String> = (0..t.sent).map(|n| format!("m{s}-{n}")).collect();
        let strangers: Vec<&String> = got.keys().filter(|p| !expected.contains(*p)).collect();
        assert!(
            strangers.is_empty(),
            "socket {s}: recorded but never sent: {strangers:?}"
        );
        let lost = expected.iter().filter(|p| !got.contains_key(*p)).count() as u64;
        let twice = got.values().filter(|n| **n > 1).count() as u64;
        assert_eq!(
            twice, 0,
            "socket {s}: {twice} messages recorded more than once"
        );
        // Error frames do not say which message they refuse: a socket may lack at most as
        // many records as it got error frames (none when it got none).
        assert!(
            lost <= t.errors,
            "socket {s}: {lost} messages not recorded but only {} refused",
            t.errors
        );
        assert!(t.ended.is_none(), "socket {s} ended: {:?}", t.ended);
        sent += t.sent;
        errors += t.errors;
        rows += got.values().sum::<i64>();
        dup += twice;
        missing += lost;
        echoes += t.echoes.len() as u64;
        latencies.extend_from_slice(&t.latencies);
    }
    assert!(
        accounted,
        "messages neither recorded nor refused after 40 s"
    );

    // Delivery resumed: each gateway got probes issued after the kill, and a round trip
    // works on each now.
    let issued = issued.lock().map(|v| v.clone()).unwrap_or_default();
    let mut silences = Vec::new();
    for (i, (got, task)) in probes.into_iter().enumerate() {
        let ended = task.await?;
        assert!(ended.is_none(), "probe socket {i} ended: {ended:?}");
        let got = got.lock().map(|g| g.clone()).unwrap_or_default();
        let after_kill = got
            .iter()
            .filter(|(seq, _)| issued.get(*seq as usize).is_some_and(|at| *at > killed))
            .map(|(_, at)| *at)
            .min();
        let resumed = after_kill
            .map(|at| at.duration_since(killed))
            .ok_or_else(|| anyhow::anyhow!("gateway {i}: no delivery after the kill"))?;
        // The longest wait for a notification while the node was down.
        let mut times: Vec<Instant> = got
            .iter()
            .map(|(_, at)| *at)
            .filter(|at| *at > killed && *at < restarted)
            .collect();
        times.push(killed);
        times.push(restarted);
        times.sort();
        let silence = times
            .windows(2)
            .map(|w| w[1].duration_since(w[0]))
            .max()
            .unwrap_or_default();
        let distinct: BTreeSet<u64> = got.iter().map(|(s, _)| *s).collect();
        let lost = issued.len().saturating_sub(distinct.len());
        silences.push(format!(
            "gateway {i} (node {i}): first delivery {:.2} s after the kill, longest silence \
             while the node was down {:.2} s, {lost} of {} probes lost",
            resumed.as_secs_f64(),
            silence.as_secs_f64(),
            issued.len()
        ));
    }
    for i in 0..3 {
        stack.wait_flowing(i).await?;
    }
    let meta = meta.map_or("unknown".to_owned(), |m| format!("node {m}"));
    println!(
        "killed node {target} (leader of {stream}; meta leader: {meta}): new stream leader \
         after {:.2} s; restarted {} s later, replicas current {:.2} s after the restart",
        new_leader.as_secs_f64(),
        (RESTART_AT - KILL_AT).as_secs(),
        caught_up.as_secs_f64()
    );
    latencies.sort();
    let at = |q: f64| {
        let i = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies.get(i).map_or(0.0, Duration::as_secs_f64)
    };
    let slow = latencies
        .iter()
        .filter(|l| **l > Duration::from_secs(1))
        .count();
    println!(
        "client messages: {sent} sent, {} accepted, {errors} refused (error frames), {rows} \
         rows recorded, {missing} not recorded, {dup} recorded twice; {echoes} delivered back, \
         send to echo p50 {:.3} s, p99 {:.3} s, max {:.2} s, {slow} over 1 s",
        sent - errors,
        at(0.5),
        at(0.99),
        at(1.0)
    );
    for line in silences {
        println!("{line}");
    }
    Ok(())
}
