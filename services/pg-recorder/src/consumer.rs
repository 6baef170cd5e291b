//! The recording loop: take a batch from the audit log's shared consumer
//! ([`pgws_bus::Log`]: a durable JetStream pull consumer with explicit acks, or a log in
//! memory), write it in one transaction, and acknowledge it only after the commit.
//!
//! Batches are bounded by `PGWS_RECORDER_BATCH_SIZE` records and `PGWS_RECORDER_BATCH_WAIT`.
//! A database failure leaves the batch unacknowledged: the loop reconnects with backoff and
//! writes the same batch again (ids make it idempotent; if the ack wait passes meanwhile, the
//! server redelivers and the ids absorb that too). On shutdown the batch in hand is finished,
//! and what a fetch brought after shutdown began is handed back to the log (a fetch is never
//! abandoned midway, so nothing waits for the ack wait because this recorder stopped).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgws_bus::{BusError, Log, Record};
use pgws_config::DbConfig;
use pgws_service::telemetry::{self, TARGET as TRACE};
use tokio_postgres::{Client, Config as PgConfig, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::RecorderMetrics;
use crate::record::{Batch, Meta};
use crate::schema::{self, day_of, Partitions};
use crate::store::{self, Mode, Path};

/// Most records the shared consumer holds delivered and unacknowledged, for batches of
/// `batch_size`: the batch being acknowledged, the one waiting for the acker, the one being
/// written, the one waiting for the writer, the one being pulled, and slack.
pub(crate) fn max_ack_pending(batch_size: usize) -> i64 {
    i64::try_from(batch_size * 6).unwrap_or(i64::MAX)
}

/// The database side of the loop: one connection, re-established with backoff.
pub(crate) struct Database {
    pub(crate) pg: PgConfig,
    pub(crate) client: Option<Client>,
    pub(crate) up: Arc<AtomicBool>,
    pub(crate) partitions: Partitions,
    pub(crate) attempt: u32,
}

impl Database {
    /// Waits (with backoff) until there is a connected client with the schema migrated;
    /// false when `token` was cancelled first.
    pub(crate) async fn connected(&mut self, token: &CancellationToken) -> bool {
        while self.client.as_ref().is_none_or(Client::is_closed) {
            self.up.store(false, Ordering::Relaxed);
            self.partitions.forget();
            match self.connect().await {
                Ok(client) => {
                    self.attempt = 0;
                    self.client = Some(client);
                    self.up.store(true, Ordering::Relaxed);
                    tracing::info!("database connected");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "database unavailable");
                    let wait = DbConfig::backoff(self.attempt).min(Duration::from_secs(5));
                    self.attempt += 1;
                    tokio::select! {
                        _ = token.cancelled() => return false,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        true
    }

    async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (mut client, conn) = self.pg.connect(NoTls).await?;
        let up = Arc::clone(&self.up);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!(error = %e, "database connection lost");
            }
            up.store(false, Ordering::Relaxed);
        });
        schema::migrate(&mut client).await?;
        Ok(client)
    }
}

/// Where the records come from: the log and the consumer every replica shares.
#[derive(Clone)]
pub(crate) struct Source {
    pub(crate) log: Arc<dyn Log>,
    pub(crate) consumer: String,
}

/// Runs the loop until `token` is cancelled. Three stages, each a batch at a time: this one
/// pulls batches and parses them, a writer task writes them in order, an acker task
/// acknowledges what was committed. One batch may wait between two stages, so the next batch
/// is pulled and parsed while one is written, and written while the last one is acknowledged.
pub(crate) async fn run(
    source: Source,
    mut db: Database,
    mode: Mode,
    batch_size: usize,
    batch_wait: Duration,
    metrics: RecorderMetrics,
    token: CancellationToken,
) {
    // Take nothing while the database is away: records wait in the log.
    if !db.connected(&token).await {
        return;
    }
    let (acks, mut committed) = tokio::sync::mpsc::channel::<Vec<Record>>(1);
    let acker = tokio::spawn(async move {
        while let Some(records) = committed.recv().await {
            for r in records {
                if let Err(e) = r.ack().await {
                    tracing::warn!(error = %e, "ack failed; the record will be redelivered");
                }
            }
        }
    });
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Batch, Vec<Record>)>(1);
    let writer_token = token.clone();
    let writer = tokio::spawn(async move {
        while let Some((batch, records)) = rx.recv().await {
            // The batch in hand is written even when shutdown has begun (bounded by the
            // grace period); false means shutdown found the database away.
            if !record_batch(&mut db, &mode, &batch, &records, &metrics, &writer_token).await {
                break;
            }
            if acks.send(records).await.is_err() {
                break;
            }
        }
    });
    while !token.is_cancelled() {
        match next_batch(&source, batch_size, batch_wait, &token).await {
            Ok(records) => {
                if !records.is_empty() && tx.send((parse(&records), records)).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot pull from the audit stream");
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
    drop(tx);
    drop(writer.await);
    drop(acker.await);
}

/// How long one fetch waits for a first record: how soon the pull notices shutdown.
const POLL: Duration = Duration::from_millis(500);

/// Hands back, with a short delay, records fetched after shutdown began: the log delivers them
/// again after the delay instead of the ack wait (to another replica, or the next start). The
/// delay keeps them from coming back to this very consumer as it stops.
async fn hand_back(records: Vec<Record>) {
    let mut returned = 0_u32;
    for r in records {
        if r.hand_back(HAND_BACK_DELAY).await.is_ok() {
            returned += 1;
        }
    }
    if returned > 0 {
        tracing::info!(returned, "unwritten records handed back for redelivery");
    }
}

/// How long the server holds a handed-back record before redelivering it.
const HAND_BACK_DELAY: Duration = Duration::from_secs(1);

/// Waits for first records (or shutdown), then takes what follows within `wait`, up to `max`.
/// Empty when shutdown came first.
async fn next_batch(
    Source { log, consumer }: &Source,
    max: usize,
    wait: Duration,
    token: &CancellationToken,
) -> Result<Vec<Record>, BusError> {
    let mut batch = loop {
        // Never dropped midway: on JetStream what a pull brought would otherwise wait for the
        // ack wait.
        let records = log.fetch(consumer, max, POLL).await?;
        if token.is_cancelled() {
            hand_back(records).await;
            return Ok(Vec::new());
        }
        if !records.is_empty() {
            break records;
        }
    };
    let deadline = tokio::time::Instant::now() + wait;
    while batch.len() < max {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left < Duration::from_millis(1) {
            break;
        }
        match log.fetch(consumer, max - batch.len(), left).await {
            Ok(more) if more.is_empty() => break,
            Ok(more) => batch.extend(more),
            Err(e) => {
                tracing::debug!(error = %e, "pull status");
                break;
            }
        }
    }
    Ok(batch)
}

/// Parses the envelopes of pulled records, in order.
fn parse(records: &[Record]) -> Batch {
    let mut batch = Batch::default();
    for m in records {
        batch.redelivered |= m.redelivered();
        batch.push(
            &m.stream,
            m.seq,
            &m.payload,
            Meta::new(m.id.as_deref(), &m.headers),
        );
    }
    batch
}

/// Writes the batch parsed from `messages`, retrying until it commits; false when shutdown
/// interrupted the retries.
async fn record_batch(
    db: &mut Database,
    mode: &Mode,
    batch: &Batch,
    messages: &[Record],
    metrics: &RecorderMetrics,
    token: &CancellationToken,
) -> bool {
    // One span per batch, linked to the traces of (at most MAX_LINKS of) its records.
    let span = tracing::info_span!(
        target: TRACE,
        "recorder.batch",
        otel.kind = "consumer",
        messaging.system = "nats",
        messaging.batch.message_count = messages.len(),
        trace_id = tracing::field::Empty,
    );
    if telemetry::tracing_enabled() {
        for m in messages.iter().take(MAX_LINKS) {
            telemetry::link_remote(&span, &m.headers);
        }
        telemetry::mark(&span);
    }
    write_batch(db, mode, batch, metrics, token)
        .instrument(span)
        .await
}

/// At most this many links from a batch's span to its records' traces.
const MAX_LINKS: usize = 128;

/// How many times a batch is retried after shutdown began (the grace period bounds it too).
const RETRIES_IN_SHUTDOWN: u32 = 3;

/// Writes a batch in one transaction, retrying until it commits: after a transient failure as
/// it is (reconnecting when the connection is gone), after any other failure record by record,
/// so the records the database refuses become dead letters. Returns false when shutdown
/// interrupted the retries (the batch stays unacknowledged, to be redelivered).
pub(crate) async fn write_batch(
    db: &mut Database,
    mode: &Mode,
    batch: &Batch,
    metrics: &RecorderMetrics,
    token: &CancellationToken,
) -> bool {
    let days: Vec<i32> = batch
        .records
        .iter()
        .map(|r| day_of(r.received_at))
        .collect();
    let mut one_by_one = false;
    let mut path = if batch.redelivered {
        Path::Insert
    } else {
        Path::Copy
    };
    let mut failures: u32 = 0;
    loop {
        // During shutdown the batch is still written if the database answers; if it is down,
        // the batch is left unacknowledged, to be redelivered.
        if !db.connected(token).await {
            return false;
        }
        let (Some(client), partitions) = (db.client.as_mut(), &mut db.partitions) else {
            continue;
        };
        let started = Instant::now();
        let result = match db_partitions(partitions, client, mode, &days).await {
            Err(e) => Err(e),
            Ok(()) if one_by_one => store::write_one_by_one(client, mode, batch).await,
            Ok(()) => store::write(client, mode, batch, path).await,
        };
        let e = match result {
            Ok(outcome) => {
                metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                metrics.batch_size.observe(batch.len() as f64);
                metrics
                    .batches
                    .get_or_create(&[("outcome", "committed")])
                    .inc();
                match mode {
                    Mode::Table => metrics.rows.inc_by(outcome.written),
                    Mode::Dispatcher(_) => metrics.dispatched.inc_by(outcome.written),
                };
                metrics.duplicates.inc_by(outcome.duplicates);
                metrics.dead_letters.inc_by(outcome.dead);
                metrics.notify_failures.inc_by(outcome.failures);
                tracing::debug!(
                    written = outcome.written,
                    duplicates = outcome.duplicates,
                    dead = outcome.dead,
                    "batch committed"
                );
                return true;
            }
            Err(e) => e,
        };
        if path == Path::Copy && store::is_unique_violation(&e) {
            // Some row exists already: the same batch, skipping what is there.
            metrics
                .batches
                .get_or_create(&[("outcome", "conflict")])
                .inc();
            path = Path::Insert;
            continue;
        }
        metrics
            .batches
            .get_or_create(&[("outcome", "retried")])
            .inc();
        // A partition may have gone (retention) or the database may have been replaced.
        db.partitions.forget();
        if !one_by_one && !store::is_transient(&e) {
            tracing::warn!(error = %e, "batch refused; writing it record by record");
            one_by_one = true;
            continue;
        }
        tracing::warn!(error = %e, failures, "batch not written; retrying");
        if e.as_db_error().is_none() {
            // A connection problem: reconnect before the retry.
            db.client = None;
        }
        if token.is_cancelled() && failures >= RETRIES_IN_SHUTDOWN {
            return false;
        }
        let pause = Duration::from_millis(200 << failures.min(5));
        failures += 1;
        tokio::time::sleep(pause).await;
    }
}

async fn db_partitions(
    partitions: &mut Partitions,
    client: &Client,
    mode: &Mode,
    days: &[i32],
) -> Result<(), tokio_postgres::Error> {
    match mode {
        Mode::Table => partitions.ensure(client, days.iter().copied()).await,
        Mode::Dispatcher(_) => Ok(()),
    }
}

#[cfg(test)]
#[path = "consumer_tests.rs"]
mod tests;
