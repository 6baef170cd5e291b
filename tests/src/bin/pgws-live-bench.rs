//! Measures `/live` table topics end to end: plain SQL inserts -> the leader bridge's change
//! capture (slot, visibility checks per permission class, NATS) -> the gateway -> websockets.
//!
//! `pgws-live-bench setup <schema>`: creates `<schema>.items (id bigserial primary key, tenant
//! int not null, body text)` with row-level security (a reader sees the rows of the `tenant`
//! claim of its token) and the role `<schema>_reader` (NOLOGIN, USAGE + SELECT). The policy
//! reads the claim `tenant` only, so sockets with the same role and tenant share a class.
//!
//! `pgws-live-bench deliver <sockets> <classes> <rows> [txn_rows]`: opens `sockets` websockets at
//! `$PGWS_URL/live?token=<jwt>` (claims: `sub` "s<i>", `role` "<schema>_reader", `tenant`
//! i % classes, and an `iat`/`jti` of its own so that no two tokens are equal), subscribes each
//! to the table's topic and waits for every `ok`; waits `BENCH_SETTLE` seconds (default 3);
//! then a warm-up: one row per tenant, until every socket received its row (the whole path is
//! live for every class). The measured part: `rows` rows (tenant = row % classes) inserted from
//! one connection as fast as PostgreSQL takes them, `txn_rows` rows per transaction (default
//! 500, `INSERT ... SELECT FROM generate_series`), while every socket counts its events, until
//! each socket received its rows or nothing arrived for `BENCH_QUIET` seconds (default 20).
//!
//! With `BENCH_RATE` (rows/s), the measured rows are inserted at that rate instead, `txn_rows`
//! per transaction, over `BENCH_WRITERS` connections (default 4) in turn, each row carrying the
//! time its transaction was sent (microseconds since the epoch, in `body`), and the report adds
//! `latency_ms` (p50, p90, p99, max: the event's arrival minus its row's send time, this
//! process's clock both: commit-to-socket plus the insert and its commit), `rate_per_s` and
//! `inserted_per_s` (the rate reached).
//!
//! `pgws-live-bench throughput <rows> [txn_rows]`: the same with one socket and one class,
//! 1,000 rows per transaction by default: row changes per second from SQL to a socket.
//!
//! Output: one JSON object on stdout: `sockets`, `classes`, `rows`, `expected_events`,
//! `received_events`, `foreign_events` (events of another tenant's row: must be 0),
//! `out_of_order` (an id not above the socket's previous one: a repeat or a reordering; 0 with
//! one writer, and with several writers rows may commit in another order than their ids were
//! taken), `repeated_events` (an id the socket received already: must be 0), `closed_sockets`,
//! `complete_sockets`, `seconds` (first insert to last event),
//! `insert_seconds`, `drain_seconds` (last commit to last event), `events_per_s`, `complete`
//! (every event arrived and no socket was closed), `rows_per_s` (0 unless complete); with `BRIDGE_ADMIN` (the bridge's admin address, `host:port`) the deltas of
//! the bridge's capture counters over the measured part (`capture_checks`: visibility queries),
//! with `GATEWAY_ADMIN` the gateway's (deliveries, slow-consumer disconnects); `stale_events`:
//! events of rows written before the run (an earlier run's rows left in the slot), ignored;
//! `cpu_seconds` over the measured part: this process, every `postgres` process of the machine,
//! and the processes named in `BENCH_PIDS` (`name=pid,...`).
//!
//! `pgws-live-bench remove-stream`: deletes the audit stream the gateway created for
//! `PGWS_NATS_PREFIX` (the end of a benchmark run).
//!
//! Settings from the environment: `PGWS_URL` (default `ws://127.0.0.1:3000`), `PGWS_DB_URI`,
//! `PGWS_JWT_SECRET` (the sample's by default), `BENCH_SCHEMA` (default `live_bench`),
//! `BENCH_TOPIC` (default `items`), `PGWS_CAPTURE_SLOT` (waited for before the warm-up when
//! set), `BENCH_CONNECT_CONCURRENCY` (default 64).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn var_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn ident(s: &str) -> anyhow::Result<&str> {
    if s.is_empty()
        || s.len() > 40
        || !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        bail!("{s:?}: lower-case letters, digits and _ only, at most 40");
    }
    Ok(s)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let report = match mode.as_str() {
        "setup" => {
            let schema = std::env::args()
                .nth(2)
                .unwrap_or_else(|| var("BENCH_SCHEMA", "live_bench"));
            return setup(ident(&schema)?).await;
        }
        "deliver" => {
            let (sockets, classes, rows) = (arg(2, 1000), arg(3, 10), arg(4, 20_000));
            deliver(sockets, classes.max(1), rows, arg(5, 500).max(1)).await?
        }
        "throughput" => deliver(1, 1, arg(2, 100_000), arg(3, 1000).max(1)).await?,
        "remove-stream" => {
            let nats = async_nats::connect(var("PGWS_NATS_URL", "nats://127.0.0.1:4222")).await?;
            let prefix = pgws_proto::Prefix::new(&var("PGWS_NATS_PREFIX", "pgws"))?;
            let stream = pgws_proto::Subjects::new(prefix).audit_stream();
            async_nats::jetstream::new(nats)
                .delete_stream(&stream)
                .await
                .with_context(|| format!("deleting stream {stream}"))?;
            return Ok(());
        }
        _ => bail!(
            "usage: pgws-live-bench setup <schema> | deliver <sockets> <classes> <rows> [txn_rows] \
             | throughput <rows> [txn_rows] | remove-stream"
        ),
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

async fn db() -> anyhow::Result<tokio_postgres::Client> {
    let uri = var("PGWS_DB_URI", "postgres://postgres@127.0.0.1:5432/postgres");
    let (db, conn) = tokio_postgres::connect(&uri, tokio_postgres::NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::spawn(conn);
    Ok(db)
}

async fn setup(schema: &str) -> anyhow::Result<()> {
    db().await?
        .batch_execute(&format!(
            "CREATE SCHEMA {s};
             CREATE TABLE {s}.items (id bigserial PRIMARY KEY, tenant int NOT NULL, body text);
             ALTER TABLE {s}.items ENABLE ROW LEVEL SECURITY;
             CREATE POLICY tenant ON {s}.items FOR SELECT
               USING (tenant = (current_setting('request.jwt.claims', true)::json ->> 'tenant')::int);
             CREATE ROLE {s}_reader NOLOGIN;
             GRANT USAGE ON SCHEMA {s} TO {s}_reader;
             GRANT SELECT ON {s}.items TO {s}_reader;",
            s = schema
        ))
        .await
        .context("creating the schema")?;
    Ok(())
}

/// What the socket tasks share.
#[derive(Default)]
struct Stats {
    /// Events received (warm-up included).
    events: AtomicU64,
    /// Events of rows written before this run (left in the slot by an earlier one): ignored.
    stale: AtomicU64,
    /// Events of a row whose tenant is not the socket's.
    foreign: AtomicU64,
    /// Events whose id was not above the socket's previous one: a repeat, or rows committed
    /// in another order than their ids were taken (several writers).
    out_of_order: AtomicU64,
    /// Events whose id the socket had received already.
    repeated: AtomicU64,
    /// Sockets that received their warm-up row.
    warm: AtomicU64,
    /// Sockets that received all their rows.
    complete: AtomicU64,
    /// Sockets closed by the gateway or failed.
    closed: AtomicU64,
    /// Nanoseconds since `origin` of the latest event.
    last_event: AtomicU64,
    /// Insert-to-event latencies in microseconds (`BENCH_RATE` runs).
    latencies: std::sync::Mutex<Vec<u64>>,
}

/// Microseconds since the epoch.
fn micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// The digits after `key` in `frame` (`"tenant":3`, `"id":"42"`).
fn number_after(frame: &[u8], key: &[u8]) -> Option<u64> {
    let at = frame.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: Vec<u8> = frame[at..]
        .iter()
        .copied()
        .skip_while(|&b| b == b'"')
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// CPU seconds (user + system) of a process so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 of stat (utime, stime), counted from the state (field 3).
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// CPU seconds so far of this process, all `postgres` processes and `BENCH_PIDS`.
fn cpu_sample() -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    out.insert(
        "bench".to_owned(),
        cpu_seconds(std::process::id()).unwrap_or(0.0),
    );
    let mut pg = 0.0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
            {
                pg += cpu_seconds(pid).unwrap_or(0.0);
            }
        }
    }
    out.insert("postgres".to_owned(), pg);
    for item in var("BENCH_PIDS", "").split(',').filter(|s| !s.is_empty()) {
        if let Some((name, pid)) = item.split_once('=') {
            if let Some(s) = pid.trim().parse().ok().and_then(cpu_seconds) {
                out.insert(name.trim().to_owned(), s);
            }
        }
    }
    out
}

/// The counters named `names` (`pgws_<name>_total`) of the admin listener at address `var`.
async fn counters(var: &str, names: &[&str]) -> Option<BTreeMap<String, f64>> {
    let admin = std::env::var(var).ok()?;
    let addr: SocketAddr = admin
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .ok()?;
    let (status, body) = pgws_tests::http_get(addr, "/metrics").await.ok()?;
    if status != 200 {
        return None;
    }
    let mut out = BTreeMap::new();
    for line in body.lines() {
        for name in names {
            if let Some(v) = line.strip_prefix(&format!("pgws_{name}_total ")) {
                out.insert((*name).to_owned(), v.trim().parse().unwrap_or(0.0));
            }
        }
    }
    Some(out)
}

/// The bridge's capture counters and the gateway's delivery counters, when `BRIDGE_ADMIN` and
/// `GATEWAY_ADMIN` are set.
async fn service_counters() -> BTreeMap<String, f64> {
    let mut all = counters(
        "BRIDGE_ADMIN",
        &[
            "bridge_capture_checks",
            "bridge_capture_changes",
            "bridge_capture_events",
        ],
    )
    .await
    .unwrap_or_default();
    all.extend(
        counters(
            "GATEWAY_ADMIN",
            &[
                "gateway_deliveries",
                "gateway_slow_consumer_disconnects",
                "gateway_send_budget_disconnects",
                "gateway_table_events_repeated",
            ],
        )
        .await
        .unwrap_or_default(),
    );
    all
}

fn token(secret: &str, claims: &Value) -> anyhow::Result<String> {
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens socket `i` and subscribes it to `topic`.
async fn open(url: &str, topic: &str) -> anyhow::Result<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let request = json!({"id": 1, "method": "subscribe", "attributes": {"topicName": topic}});
    ws.send(Message::text(request.to_string())).await?;
    let reply = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(frame) = ws.next().await {
            if let Message::Text(t) = frame? {
                return Ok(serde_json::from_str::<Value>(&t)?);
            }
        }
        bail!("closed before the subscribe reply")
    })
    .await
    .context("no subscribe reply in 30 s")??;
    if reply["ok"] != true {
        bail!("subscribe refused: {reply}");
    }
    Ok(ws)
}

/// Reads socket events: `tenant` is the socket's, `expected` the measured rows it must get
/// after its warm-up row.
async fn read(
    mut ws: Ws,
    (tenant, expected, first_id): (u64, u64, u64),
    stats: Arc<Stats>,
    origin: Instant,
    timed: bool,
) {
    let tenant_key = b"\"tenant\":";
    let id_key = b"\"id\":\"";
    let body_key = b"\"body\":\"";
    let mut got = 0u64;
    let mut last_id = 0u64;
    let mut seen = std::collections::HashSet::new();
    while let Some(frame) = ws.next().await {
        let bytes = match frame {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let bytes = bytes.as_bytes();
        if !bytes.windows(8).any(|w| w == b"\"event\":") {
            continue;
        }
        let id = number_after(bytes, id_key).unwrap_or(0);
        if id < first_id {
            stats.stale.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        stats
            .last_event
            .fetch_max(origin.elapsed().as_nanos() as u64, Ordering::Relaxed);
        stats.events.fetch_add(1, Ordering::Relaxed);
        if timed {
            if let Some(sent) = number_after(bytes, body_key) {
                let mut l = stats.latencies.lock().unwrap_or_else(|e| e.into_inner());
                l.push(micros().saturating_sub(sent));
            }
        }
        if number_after(bytes, tenant_key) != Some(tenant) {
            stats.foreign.fetch_add(1, Ordering::Relaxed);
        }
        if id <= last_id {
            stats.out_of_order.fetch_add(1, Ordering::Relaxed);
        }
        if !seen.insert(id) {
            stats.repeated.fetch_add(1, Ordering::Relaxed);
        }
        last_id = last_id.max(id);
        got += 1;
        if got == 1 {
            stats.warm.fetch_add(1, Ordering::Relaxed);
        }
        if got == 1 + expected {
            stats.complete.fetch_add(1, Ordering::Relaxed);
        }
    }
    stats.closed.fetch_add(1, Ordering::Relaxed);
}

async fn wait_slot(db: &tokio_postgres::Client) -> anyhow::Result<()> {
    let Ok(slot) = std::env::var("PGWS_CAPTURE_SLOT") else {
        return Ok(());
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = db
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?;
        if found.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no replication slot {slot} after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn deliver(sockets: u64, classes: u64, rows: u64, txn_rows: u64) -> anyhow::Result<Value> {
    let schema = var("BENCH_SCHEMA", "live_bench");
    let schema = ident(&schema)?.to_owned();
    let topic = var("BENCH_TOPIC", "items");
    let base = var("PGWS_URL", "ws://127.0.0.1:3000");
    let secret = var("PGWS_JWT_SECRET", pgws_tests::SECRET);
    let quiet = Duration::from_secs(var_u64("BENCH_QUIET", 20));
    let settle = Duration::from_secs(var_u64("BENCH_SETTLE", 3));
    let concurrency = var_u64("BENCH_CONNECT_CONCURRENCY", 64) as usize;
    let pace: Option<f64> = std::env::var("BENCH_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|r: &f64| *r > 0.0);
    let db = db().await?;
    let role = format!("{schema}_reader");
    let run = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();

    // Rows of each tenant among 1..=rows (the measured rows are numbered from 1).
    let per_tenant = |t: u64| (1..=rows).filter(|r| r % classes == t).count() as u64;
    let expected: Vec<u64> = (0..classes).map(per_tenant).collect();
    let expected_events: u64 = (0..sockets).map(|i| expected[(i % classes) as usize]).sum();

    let connect_started = Instant::now();
    let urls: Vec<(u64, String)> = (0..sockets)
        .map(|i| {
            let claims = json!({
                "sub": format!("s{i}"), "role": role, "tenant": i % classes,
                "iat": run, "jti": format!("{run}-{i}"),
            });
            token(&secret, &claims).map(|t| (i, format!("{base}/live?token={t}")))
        })
        .collect::<anyhow::Result<_>>()?;
    let opened: Vec<(u64, Ws)> = futures::stream::iter(urls)
        .map(|(i, url)| {
            let topic = topic.clone();
            async move { open(&url, &topic).await.map(|ws| (i, ws)) }
        })
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()
        .context("opening and subscribing the sockets")?;
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    eprintln!("{sockets} sockets subscribed in {connect_seconds:.1} s");

    // Rows of earlier runs that the slot may still hold are not counted.
    let table = format!("{schema}.items");
    let first_id: i64 = db
        .query_one(
            &format!("SELECT coalesce(max(id), 0) + 1 FROM {table}"),
            &[],
        )
        .await?
        .get(0);
    let first_id = first_id as u64;
    let stats = Arc::new(Stats::default());
    let origin = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, ws) in opened {
        let tenant = i % classes;
        tasks.spawn(read(
            ws,
            (tenant, expected[tenant as usize], first_id),
            Arc::clone(&stats),
            origin,
            pace.is_some(),
        ));
    }
    tokio::time::sleep(settle).await;
    wait_slot(&db).await?;

    // Warm-up: one row per tenant, until every socket got its row.
    db.batch_execute(&format!(
        "INSERT INTO {table} (tenant, body) SELECT g, 'warm-up' FROM generate_series(0, {}) g",
        classes - 1
    ))
    .await?;
    let warm_deadline = Instant::now() + Duration::from_secs(120);
    while stats.warm.load(Ordering::Relaxed) < sockets {
        if Instant::now() > warm_deadline {
            bail!(
                "warm-up: {} of {sockets} sockets received their row in 120 s",
                stats.warm.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let warm_seconds = origin.elapsed().as_secs_f64() - settle.as_secs_f64();
    eprintln!("warm-up done; inserting {rows} rows");

    let counters_before = service_counters().await;
    let cpu_before = cpu_sample();
    let started = origin.elapsed();
    let mut from = 1;
    if let Some(rate) = pace {
        // `txn_rows` rows per transaction, on schedule, each carrying its send time; the
        // transactions go out over `BENCH_WRITERS` connections so that a slow commit does not
        // hold the next one back.
        let writers = var_u64("BENCH_WRITERS", 4).max(1);
        let mut pool = Vec::new();
        for _ in 0..writers {
            pool.push(Arc::new(self::db().await?));
        }
        let mut sent = tokio::task::JoinSet::new();
        let begun = Instant::now();
        let mut n = 0u64;
        while from <= rows {
            let to = (from + txn_rows - 1).min(rows);
            let due = begun + Duration::from_secs_f64((from - 1) as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
            let sql = format!(
                "INSERT INTO {table} (tenant, body) SELECT g % {classes}, '{}'
                   FROM generate_series({from}, {to}) g",
                micros()
            );
            let writer = Arc::clone(&pool[(n % writers) as usize]);
            sent.spawn(async move { writer.batch_execute(&sql).await });
            n += 1;
            from = to + 1;
        }
        while let Some(done) = sent.join_next().await {
            done??;
        }
    }
    while from <= rows {
        let to = (from + txn_rows - 1).min(rows);
        db.batch_execute(&format!(
            "INSERT INTO {table} (tenant, body) SELECT g % {classes}, md5(g::text)
               FROM generate_series({from}, {to}) g"
        ))
        .await?;
        from = to + 1;
    }
    let inserted = origin.elapsed();
    let insert_seconds = (inserted - started).as_secs_f64();
    eprintln!("inserted in {insert_seconds:.2} s");
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if stats.complete.load(Ordering::Relaxed) + stats.closed.load(Ordering::Relaxed) >= sockets
        {
            break;
        }
        let last = Duration::from_nanos(stats.last_event.load(Ordering::Relaxed)).max(inserted);
        if origin.elapsed() > last + quiet {
            eprintln!("nothing for {} s: counting what arrived", quiet.as_secs());
            break;
        }
    }
    let cpu_after = cpu_sample();
    let counters_after = service_counters().await;
    let last = Duration::from_nanos(stats.last_event.load(Ordering::Relaxed));
    let seconds = last.saturating_sub(started).as_secs_f64();
    let drain_seconds = last.saturating_sub(inserted).as_secs_f64();
    let received = stats
        .events
        .load(Ordering::Relaxed)
        .saturating_sub(stats.warm.load(Ordering::Relaxed));
    let closed = stats.closed.load(Ordering::Relaxed);
    tasks.abort_all();

    let rate = |n: u64| {
        if seconds > 0.0 {
            (n as f64 / seconds).round()
        } else {
            0.0
        }
    };
    let mut report = json!({
        "mode": if sockets == 1 && classes == 1 { "throughput" } else { "deliver" },
        "sockets": sockets,
        "classes": classes,
        "rows": rows,
        "txn_rows": txn_rows,
        "expected_events": expected_events,
        "received_events": received,
        "foreign_events": stats.foreign.load(Ordering::Relaxed),
        "stale_events": stats.stale.load(Ordering::Relaxed),
        "out_of_order": stats.out_of_order.load(Ordering::Relaxed),
        "repeated_events": stats.repeated.load(Ordering::Relaxed),
        "complete_sockets": stats.complete.load(Ordering::Relaxed),
        "closed_sockets": closed,
        "connect_seconds": (connect_seconds * 100.0).round() / 100.0,
        "warm_up_seconds": (warm_seconds * 100.0).round() / 100.0,
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "insert_seconds": (insert_seconds * 1000.0).round() / 1000.0,
        "drain_seconds": (drain_seconds * 1000.0).round() / 1000.0,
        "events_per_s": rate(received),
        // Only a run where every event arrived has a row rate.
        "complete": received == expected_events && closed == 0,
        "rows_per_s": if received == expected_events { rate(rows) } else { 0.0 },
        "live_classes": var("PGWS_LIVE_CLASSES", "policy"),
    });
    for (k, v) in counters_after {
        let name = k.trim_start_matches("bridge_");
        report[name] = json!(v - counters_before.get(&k).copied().unwrap_or(0.0));
    }
    let cpu: BTreeMap<String, f64> = cpu_after
        .iter()
        .map(|(k, v)| {
            let d = v - cpu_before.get(k).copied().unwrap_or(0.0);
            (k.clone(), (d * 100.0).round() / 100.0)
        })
        .collect();
    report["cpu_seconds"] = json!(cpu);
    if let Some(rate) = pace {
        let mut l = stats
            .latencies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // The median of each tenth of the run, in arrival order: a backlog shows as a rise.
        let tenths: Vec<f64> = l
            .chunks(l.len().div_ceil(10).max(1))
            .map(|c| {
                let mut c = c.to_vec();
                c.sort_unstable();
                (c[c.len() / 2] as f64 / 10.0).round() / 100.0
            })
            .collect();
        report["latency_p50_by_tenth_ms"] = json!(tenths);
        l.sort_unstable();
        let at = |q: f64| {
            l.get(((l.len() as f64 * q) as usize).min(l.len().saturating_sub(1)))
                .map_or(0.0, |us| (*us as f64 / 10.0).round() / 100.0)
        };
        report["rate_per_s"] = json!(rate);
        report["inserted_per_s"] = json!((rows as f64 / insert_seconds).round());
        report["latency_ms"] = json!({
            "samples": l.len(), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99),
            "max": l.last().map_or(0.0, |us| (*us as f64 / 10.0).round() / 100.0),
        });
    }
    Ok(report)
}
