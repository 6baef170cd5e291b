//! The recording loop: take a batch from the shared durable consumer, write it in one
//! transaction, and acknowledge it only after the commit.
//!
//! Batches are bounded by `PGWS_RECORDER_BATCH_SIZE` records and `PGWS_RECORDER_BATCH_WAIT`.
//! A database failure leaves the batch unacknowledged: the loop reconnects with backoff and
//! writes the same batch again (ids make it idempotent; if the ack wait passes meanwhile, the
//! server redelivers and the ids absorb that too). On shutdown the batch in hand is finished
//! and what the pull buffered beyond it is handed back to the server.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, Consumer};
use async_nats::jetstream::AckKind;
use async_nats::jetstream::{self, Message};
use futures::StreamExt;
use pgws_config::DbConfig;
use pgws_service::telemetry::{self, TARGET as TRACE};
use tokio_postgres::{Client, Config as PgConfig, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::RecorderMetrics;
use crate::record::Batch;
use crate::schema::{self, day_of, Partitions};
use crate::store::{self, Mode, Path};

/// How long the server waits for an ack before redelivering.
const ACK_WAIT: Duration = Duration::from_secs(30);

/// Creates (or finds) the durable consumer every replica shares.
pub(crate) async fn consumer(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    batch_size: usize,
) -> Result<Consumer<pull::Config>, String> {
    let stream = js.get_stream(stream).await.map_err(|e| e.to_string())?;
    stream
        .get_or_create_consumer(
            name,
            pull::Config {
                durable_name: Some(name.to_owned()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                max_ack_pending: i64::try_from(batch_size * 4).unwrap_or(i64::MAX),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())
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

/// Runs the loop until `token` is cancelled. Two stages: this one pulls batches, a writer
/// task writes and acknowledges them in order; one batch may wait between them, so the next
/// batch is pulled while the previous one is written.
pub(crate) async fn run(
    consumer: Consumer<pull::Config>,
    mut db: Database,
    mode: Mode,
    batch_size: usize,
    batch_wait: Duration,
    metrics: RecorderMetrics,
    token: CancellationToken,
) {
    // Take nothing while the database is away: records wait in the stream.
    if !db.connected(&token).await {
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Message>>(1);
    let writer_token = token.clone();
    let writer = tokio::spawn(async move {
        while let Some(messages) = rx.recv().await {
            // The batch in hand is written even when shutdown has begun (bounded by the
            // grace period); false means shutdown found the database away.
            if !record_batch(&mut db, &mode, &messages, &metrics, &writer_token).await {
                break;
            }
            for m in &messages {
                if let Err(e) = m.ack().await {
                    tracing::warn!(error = %e, "ack failed; the record will be redelivered");
                }
            }
        }
    });
    let mut stream = None;
    while !token.is_cancelled() {
        let messages = match stream.as_mut() {
            None => {
                match consumer
                    .stream()
                    .max_messages_per_batch(batch_size * 2)
                    .messages()
                    .await
                {
                    Ok(s) => stream = Some(s),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot pull from the audit stream");
                        tokio::select! {
                            _ = token.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                    }
                }
                continue;
            }
            Some(s) => match next_batch(s, batch_size, batch_wait, &token).await {
                Ok(messages) => messages,
                Err(e) => {
                    tracing::warn!(error = %e, "pull failed; starting a new one");
                    stream = None;
                    continue;
                }
            },
        };
        if !messages.is_empty() && tx.send(messages).await.is_err() {
            break;
        }
    }
    drop(tx);
    // What the pull already brought but no batch took goes back now, rather than after the ack
    // wait, so another replica (or the next start) gets it soon.
    if let Some(mut s) = stream {
        hand_back(&mut s).await;
    }
    drop(writer.await);
}

/// Negatively acknowledges, with a short delay, the messages the pull has buffered (those
/// arriving within [`HAND_BACK_WAIT`] of each other, for at most [`HAND_BACK_DELAY`] / 2): the
/// server redelivers them after the delay instead of the ack wait. The delay keeps them from
/// coming back to this very pull while it is drained. A message the server sends after the
/// drain stopped is redelivered after the ack wait, as after a crash.
async fn hand_back(stream: &mut pull::Stream) {
    let mut returned = 0_u32;
    let until = tokio::time::Instant::now() + HAND_BACK_DELAY / 2;
    while tokio::time::Instant::now() < until {
        let Ok(Some(Ok(m))) = tokio::time::timeout(HAND_BACK_WAIT, stream.next()).await else {
            break;
        };
        if m.ack_with(AckKind::Nak(Some(HAND_BACK_DELAY)))
            .await
            .is_ok()
        {
            returned += 1;
        }
    }
    if returned > 0 {
        tracing::info!(returned, "unwritten records handed back for redelivery");
    }
}

/// How long the server holds a handed-back record before redelivering it.
const HAND_BACK_DELAY: Duration = Duration::from_secs(1);
/// How long [`hand_back`] waits for one more buffered message.
const HAND_BACK_WAIT: Duration = Duration::from_millis(50);

/// Waits for a first message (or shutdown), then takes what follows within `wait`, up to `max`.
async fn next_batch(
    stream: &mut pull::Stream,
    max: usize,
    wait: Duration,
    token: &CancellationToken,
) -> Result<Vec<Message>, String> {
    let first = tokio::select! {
        _ = token.cancelled() => return Ok(Vec::new()),
        m = stream.next() => m,
    };
    let Some(first) = first else {
        return Err("the pull ended".to_owned());
    };
    let mut batch = vec![first.map_err(|e| e.to_string())?];
    let deadline = tokio::time::Instant::now() + wait;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(m))) => batch.push(m),
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "pull status");
                break;
            }
            Ok(None) | Err(_) => break,
        }
    }
    Ok(batch)
}

/// Writes one pulled batch, retrying until it commits; false when shutdown interrupted the
/// retries.
async fn record_batch(
    db: &mut Database,
    mode: &Mode,
    messages: &[Message],
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
            telemetry::link_remote(&span, m.headers.as_ref());
        }
        telemetry::mark(&span);
    }
    let mut batch = Batch::default();
    for m in messages {
        let (stream, seq, delivered) = m
            .info()
            .map(|i| (i.stream.to_owned(), i.stream_sequence, i.delivered))
            .unwrap_or_default();
        batch.redelivered |= delivered != 1;
        batch.push(&stream, seq, &m.payload, m.headers.as_ref());
    }
    write_batch(db, mode, &batch, metrics, token)
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
