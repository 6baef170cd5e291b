//! Writing a batch in one transaction: rows (or dispatcher calls) and dead letters together,
//! idempotent by message id, so a redelivered batch changes nothing.
//!
//! Rows go in with a binary `COPY` (the fast path, about a third cheaper for PostgreSQL than
//! `INSERT ... SELECT FROM unnest(...)`). `COPY` cannot skip rows that exist already, so a batch
//! holding a redelivered record (the server's delivery count says so) goes straight to
//! `INSERT ... ON CONFLICT DO NOTHING`, and a `COPY` that meets an existing id anyway (a unique
//! violation: the gateway published one id twice, more than the stream's duplicate window
//! apart) is rolled back and the batch written that way.
//!
//! When a batch fails inside PostgreSQL for a reason that will not pass by itself (not a lost
//! connection, a deadlock or a full disk: see [`is_transient`]), it is written again one record
//! at a time under savepoints, and the record that fails becomes a dead letter with the
//! database's error: one bad record never blocks the stream.
//!
//! Dispatcher mode calls the function in stream order: the statement feeds the aggregate from a
//! subquery sorted by the records' position (`WITH ORDINALITY`). PostgreSQL does not flatten a
//! subquery that has an `ORDER BY`, and an aggregate consumes its input in the order it comes,
//! so the calls happen in that order (the documented way to feed an order-sensitive aggregate;
//! `count(f(..) ORDER BY ord)` would not do, since the arguments are evaluated before that
//! sort). A record id repeated within a batch is called once (the first occurrence).

use std::collections::HashSet;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{pin_mut, SinkExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Transaction};

use crate::record::{Batch, DeadLetter, Failure, Record};

/// Whether a failure may pass by itself, so the batch is retried as it is and no record is
/// blamed: a lost connection, a deadlock or serialization failure, a lock timeout, exhausted
/// resources (disk, memory, connections), a server shutting down, an I/O error. Anything else
/// (a constraint, a bad value, the dispatcher function raising, `statement_timeout`) is the
/// record's fault and makes it a dead letter.
pub(crate) fn is_transient(e: &tokio_postgres::Error) -> bool {
    let Some(db) = e.as_db_error() else {
        return true;
    };
    let code = db.code().code();
    matches!(code, "40001" | "40P01" | "40003" | "55P03" | "55006")
        || (code != "57014" && ["08", "53", "57", "58"].iter().any(|c| code.starts_with(c)))
}

/// Whether `COPY` met a row that exists already: the batch is written again with
/// `ON CONFLICT DO NOTHING`.
pub(crate) fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// How a batch's rows go in (dispatcher mode always calls the function through the ledger).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// Binary `COPY`: no row of the batch can exist yet.
    Copy,
    /// `INSERT ... ON CONFLICT DO NOTHING`: some may.
    Insert,
}

/// What a committed batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Rows inserted, or dispatcher calls made.
    pub(crate) written: u64,
    /// Records already written before (redeliveries).
    pub(crate) duplicates: u64,
    /// Dead letters stored.
    pub(crate) dead: u64,
    /// NOTIFY failures stored (new ones: a redelivered report changes nothing).
    pub(crate) failures: u64,
}

/// Messages go to `pgws_audit.messages`, or to a dispatcher function.
#[derive(Debug, Clone)]
pub(crate) enum Mode {
    /// `pgws_audit.messages`.
    Table,
    /// `SELECT f(notify_channel, envelope)` per new record; the quoted function name.
    Dispatcher(String),
}

impl Mode {
    pub(crate) fn is_dispatcher(&self) -> bool {
        matches!(self, Self::Dispatcher(_))
    }
}

const INSERT_ROWS: &str = "INSERT INTO pgws_audit.messages
        (id, channel, event, payload, claims, received_at, notify_channel)
    SELECT id, channel, event, payload, claims::jsonb, at, nc
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::text[])
        AS t(id, channel, event, payload, claims, at, nc)
    ON CONFLICT DO NOTHING";

pub(crate) const COPY_ROWS: &str = "COPY pgws_audit.messages
        (id, channel, event, payload, claims, received_at, notify_channel)
    FROM STDIN (FORMAT binary)";

/// The binary `COPY` data of `records` for [`COPY_ROWS`]: the header, one tuple per record
/// (text as its bytes, `jsonb` as a version byte and the text, `timestamptz` as microseconds
/// since 2000-01-01 UTC, rounded as [`timestamp`] rounds), the trailer. Every value of a record
/// has a binary form, so this cannot fail.
pub(crate) fn copy_data(records: &[Record]) -> Bytes {
    /// Microseconds from 1970-01-01 to 2000-01-01, PostgreSQL's epoch.
    const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
    fn field(buf: &mut BytesMut, prefix: Option<u8>, text: &str) {
        let len = text.len() + usize::from(prefix.is_some());
        buf.put_i32(i32::try_from(len).unwrap_or(i32::MAX));
        if let Some(byte) = prefix {
            buf.put_u8(byte);
        }
        buf.put_slice(text.as_bytes());
    }
    let size: usize = records
        .iter()
        .map(|r| {
            r.id.len()
                + r.channel.len()
                + r.event.len()
                + r.payload.len()
                + r.claims.len()
                + r.notify_channel.len()
                + 64
        })
        .sum();
    let mut buf = BytesMut::with_capacity(size + 21);
    buf.put_slice(b"PGCOPY\n\xff\r\n\0");
    buf.put_i32(0); // flags
    buf.put_i32(0); // header extension
    for r in records {
        buf.put_i16(7);
        field(&mut buf, None, &r.id);
        field(&mut buf, None, &r.channel);
        field(&mut buf, None, &r.event);
        field(&mut buf, None, &r.payload);
        field(&mut buf, Some(1), &r.claims);
        buf.put_i32(8);
        buf.put_i64(unix_micros(r.received_at) - PG_EPOCH_MICROS);
        field(&mut buf, None, &r.notify_channel);
    }
    buf.put_i16(-1);
    buf.freeze()
}

/// Unix seconds in microseconds, rounded; never before 1970 (both parsers keep
/// `message_delivered_at` between 1970 and 9999).
fn unix_micros(unix: f64) -> i64 {
    (unix * 1e6).round().max(0.0) as i64
}

/// Unix seconds as a timestamp, rounded to the microsecond: the one conversion of
/// `message_delivered_at` for every path that writes rows.
pub(crate) fn timestamp(unix: f64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(unix_micros(unix).unsigned_abs())
}

const INSERT_DEAD: &str =
    "INSERT INTO pgws_audit.dead_letters (stream, stream_seq, part, msg_id, reason, data, headers)
    SELECT stream, seq, part, id, reason, data, headers::jsonb
    FROM unnest($1::text[], $2::int8[], $7::int4[], $3::text[], $4::text[], $5::text[], $6::text[])
        AS t(stream, seq, part, id, reason, data, headers)
    ON CONFLICT DO NOTHING";

/// The dispatcher statement: records not seen before are claimed in the ledger, then the
/// function is called for each, in stream order (the ordered subquery feeds the aggregate).
fn dispatch_sql(function: &str) -> String {
    dispatch_sql_with(function, "", "")
}

/// [`dispatch_sql`] with more common table expressions (`also`, each starting with a comma)
/// and more output columns (`and`, each starting with a comma): `$1` ids, `$2` notify
/// channels, `$3` envelopes, without a repeated id.
pub(crate) fn dispatch_sql_with(function: &str, also: &str, and: &str) -> String {
    format!(
        "WITH new AS (
            INSERT INTO pgws_audit.dispatched (id) SELECT unnest($1::text[])
            ON CONFLICT DO NOTHING RETURNING id){also}
         SELECT count({function}(t.c, t.p)), (SELECT count(*) FROM new){and} FROM (
            SELECT u.c, u.p FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS u(id, c, p, ord)
            WHERE u.id IN (SELECT id FROM new) ORDER BY u.ord) AS t"
    )
}

/// Writes the batch's records and dead letters in one transaction.
pub(crate) async fn write(
    db: &mut Client,
    mode: &Mode,
    batch: &Batch,
    path: Path,
) -> Result<Outcome, tokio_postgres::Error> {
    let tx = db.transaction().await?;
    let mut outcome = match (mode, path) {
        (Mode::Table, Path::Copy) => Outcome {
            written: copy_rows(&tx, &batch.records).await?,
            ..Outcome::default()
        },
        _ => write_in(&tx, mode, &batch.records).await?,
    };
    outcome.dead = write_dead(&tx, &batch.dead).await?;
    outcome.failures = write_failures(&tx, &batch.failures).await?;
    tx.commit().await?;
    Ok(outcome)
}

/// The fallback: one savepoint per record; a record the database refuses (for a reason that is
/// not transient) becomes a dead letter carrying the error. A transient failure aborts the
/// whole transaction, to be retried.
pub(crate) async fn write_one_by_one(
    db: &mut Client,
    mode: &Mode,
    batch: &Batch,
) -> Result<Outcome, tokio_postgres::Error> {
    let mut tx = db.transaction().await?;
    let mut outcome = Outcome::default();
    let mut more_dead: Vec<DeadLetter> = batch.dead.clone();
    let mut seen = HashSet::new();
    for (record, (stream, seq, part)) in batch.records.iter().zip(&batch.positions) {
        if mode.is_dispatcher() && !seen.insert(record.id.as_str()) {
            outcome.duplicates += 1;
            continue;
        }
        let sp = tx.savepoint("record").await?;
        match write_in(&sp, mode, std::slice::from_ref(record)).await {
            Ok(o) => {
                sp.commit().await?;
                outcome.written += o.written;
                outcome.duplicates += o.duplicates;
            }
            Err(e) if !is_transient(&e) => {
                sp.rollback().await?;
                more_dead.push(DeadLetter {
                    stream: stream.clone(),
                    stream_seq: i64::try_from(*seq).unwrap_or(i64::MAX),
                    part: *part,
                    msg_id: Some(record.id.clone()),
                    reason: format!(
                        "database refused it: {}",
                        e.as_db_error()
                            .map_or_else(String::new, |d| d.message().to_owned())
                    ),
                    data: record.envelope.clone(),
                    headers: serde_json::json!({
                        (pgws_proto::headers::MSG_ID): [record.id],
                        (pgws_proto::headers::NOTIFY_CHANNEL): [record.notify_channel],
                    })
                    .to_string(),
                });
            }
            Err(e) => return Err(e),
        }
    }
    outcome.dead = write_dead(&tx, &more_dead).await?;
    outcome.failures = write_failures(&tx, &batch.failures).await?;
    tx.commit().await?;
    Ok(outcome)
}

/// Writes rows none of which exists yet with one binary `COPY`; returns how many.
async fn copy_rows(tx: &Transaction<'_>, records: &[Record]) -> Result<u64, tokio_postgres::Error> {
    if records.is_empty() {
        return Ok(0);
    }
    let sink = tx.copy_in(COPY_ROWS).await?;
    pin_mut!(sink);
    sink.send(copy_data(records)).await?;
    sink.finish().await
}

async fn write_in(
    tx: &Transaction<'_>,
    mode: &Mode,
    records: &[Record],
) -> Result<Outcome, tokio_postgres::Error> {
    if records.is_empty() {
        return Ok(Outcome::default());
    }
    let total = records.len() as u64;
    let written = match mode {
        Mode::Table => {
            let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
            let channels: Vec<&str> = records.iter().map(|r| r.channel.as_str()).collect();
            let events: Vec<&str> = records.iter().map(|r| r.event.as_str()).collect();
            let payloads: Vec<&str> = records.iter().map(|r| r.payload.as_str()).collect();
            let claims: Vec<&str> = records.iter().map(|r| r.claims.as_str()).collect();
            // The same conversion as the COPY path: a row written one way and redelivered the
            // other must meet its primary key (id, received_at) to the microsecond.
            let at: Vec<SystemTime> = records.iter().map(|r| timestamp(r.received_at)).collect();
            let nc: Vec<&str> = records.iter().map(|r| r.notify_channel.as_str()).collect();
            tx.execute(
                INSERT_ROWS,
                &[&ids, &channels, &events, &payloads, &claims, &at, &nc],
            )
            .await?
        }
        Mode::Dispatcher(function) => {
            let mut seen = HashSet::new();
            let fresh: Vec<&Record> = records
                .iter()
                .filter(|r| seen.insert(r.id.as_str()))
                .collect();
            let ids: Vec<&str> = fresh.iter().map(|r| r.id.as_str()).collect();
            let nc: Vec<&str> = fresh.iter().map(|r| r.notify_channel.as_str()).collect();
            let envelopes: Vec<&str> = fresh.iter().map(|r| r.envelope.as_str()).collect();
            // Column 1: the calls made (the records claimed in the ledger); column 0 only makes
            // the calls happen (`count` skips a function's NULL results).
            let n: i64 = tx
                .query_one(&dispatch_sql(function), &[&ids, &nc, &envelopes])
                .await?
                .get(1);
            u64::try_from(n).unwrap_or(0)
        }
    };
    Ok(Outcome {
        written,
        duplicates: total.saturating_sub(written),
        ..Outcome::default()
    })
}

const INSERT_FAILURES: &str = "INSERT INTO pgws_audit.notify_failures (id, reason)
    SELECT id, reason FROM unnest($1::text[], $2::text[]) AS t(id, reason)
    ON CONFLICT DO NOTHING";

/// Records which messages were not NOTIFYed, idempotent by message id.
async fn write_failures(
    tx: &Transaction<'_>,
    failures: &[Failure],
) -> Result<u64, tokio_postgres::Error> {
    if failures.is_empty() {
        return Ok(0);
    }
    let (ids, reasons): (Vec<&str>, Vec<&str>) = failures
        .iter()
        .flat_map(|f| f.ids.iter().map(|id| (id.as_str(), f.reason.as_str())))
        .unzip();
    tx.execute(INSERT_FAILURES, &[&ids, &reasons]).await
}

async fn write_dead(
    tx: &Transaction<'_>,
    dead: &[DeadLetter],
) -> Result<u64, tokio_postgres::Error> {
    if dead.is_empty() {
        return Ok(0);
    }
    let streams: Vec<&str> = dead.iter().map(|d| d.stream.as_str()).collect();
    let seqs: Vec<i64> = dead.iter().map(|d| d.stream_seq).collect();
    let ids: Vec<Option<&str>> = dead.iter().map(|d| d.msg_id.as_deref()).collect();
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    let data: Vec<&str> = dead.iter().map(|d| d.data.as_str()).collect();
    let headers: Vec<&str> = dead.iter().map(|d| d.headers.as_str()).collect();
    let parts: Vec<i32> = dead.iter().map(|d| d.part).collect();
    tx.execute(
        INSERT_DEAD,
        &[&streams, &seqs, &ids, &reasons, &data, &headers, &parts],
    )
    .await
}
