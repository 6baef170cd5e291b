//! The in-transaction writer: for a process where the bridge writes the audit in the very
//! transaction that NOTIFYs the messages (no audit stream, no consumer), what records a set of
//! messages: one statement and its parameters, or a binary `COPY` and its data.
//!
//! Each message is parsed as the recorder parses an audit record (its id as `Nats-Msg-Id`, the
//! channel NOTIFYed as `Pgws-Notify-Channel`, the envelope as the body), so it makes the same
//! row: same columns, claims, `received_at`, channel, event, payload and notify channel. A
//! message written again (a retried request) changes nothing: the row's key is the id and
//! `received_at`, both the same again (`ON CONFLICT DO NOTHING`); in dispatcher mode the ledger
//! `pgws_audit.dispatched` keeps the function from being called twice.
//!
//! What the recorder would make a dead letter (no id, not an envelope, a NUL...) goes to
//! `pgws_audit.dead_letters` in the same statement, with the recorder's reason: `stream` is
//! [`STREAM`] and `stream_seq` a hash of the id (of the envelope when there is no id), so a
//! dead letter written again is one too. A message whose day has no partition of
//! `pgws_audit.messages` becomes a dead letter too, with the envelope as its data: PostgreSQL
//! cannot create a partition of a table the running statement writes, and the NOTIFY must not
//! fail for it. The upkeep makes yesterday's, today's and tomorrow's partitions ahead
//! ([`crate::prepare_in_process`]), so that happens only to a message stamped further away.
//!
//! Messages that all make new rows go in faster by binary `COPY` ([`InTransaction::copy`]);
//! the bridge runs the transaction again with the statement when the `COPY` meets a row
//! written before or one whose day has no partition.
//!
//! Unlike the recorder, nothing is retried record by record here: a row the database refuses
//! (a constraint of yours) or a dispatcher function that raises fails the statement, and with
//! it the NOTIFY transaction, as any error in it would.

use bytes::Bytes;
use pgws_bus::Headers;
use pgws_proto::{headers, Notification};
use std::collections::HashSet;
use std::time::SystemTime;
use tokio_postgres::types::ToSql;

use crate::metrics::InProcessMetrics;
use crate::record::{self, DeadLetter, Meta, Record};
use crate::store::{self, Mode};

/// The `stream` of the dead letters written in NOTIFY transactions.
pub(crate) const STREAM: &str = "in-transaction";

/// The statement that records a set of messages in the transaction that NOTIFYs them, and its
/// parameters ([`crate::prepare_in_process`] makes it).
///
/// Execute [`InTransaction::sql`] with [`InTransaction::params`] of the transaction's messages
/// (prepared once per connection, if you like: the statement is the same for every set). It
/// returns one row: in table mode the rows written and the dead letters written; in dispatcher
/// mode a column of no meaning, the function calls made and the dead letters written.
#[derive(Debug, Clone)]
pub struct InTransaction {
    mode: Mode,
    sql: String,
    metrics: InProcessMetrics,
}

/// Parameters `$1`..`$9` of the table statement: the rows, each with its dead-letter key.
fn table_sql() -> String {
    let ids = headers::MSG_ID;
    let channels = headers::NOTIFY_CHANNEL;
    format!(
        "WITH r AS (
            SELECT t.*, to_regclass('pgws_audit.messages_' || to_char(t.at AT TIME ZONE 'UTC', 'YYYYMMDD')) IS NOT NULL AS placed
            FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::text[], $8::text[], $9::int8[])
                AS t(id, channel, event, payload, claims, at, nc, envelope, seq)),
         written AS (
            INSERT INTO pgws_audit.messages (id, channel, event, payload, claims, received_at, notify_channel)
            SELECT id, channel, event, payload, claims::jsonb, at, nc FROM r WHERE placed
            ON CONFLICT DO NOTHING RETURNING 1),
         dead AS (
            INSERT INTO pgws_audit.dead_letters (stream, stream_seq, part, msg_id, reason, data, headers)
            SELECT '{STREAM}', d.seq, 0, d.id, d.reason, d.data, d.headers::jsonb
            FROM unnest($10::int8[], $11::text[], $12::text[], $13::text[], $14::text[]) AS d(seq, id, reason, data, headers)
            UNION ALL
            SELECT '{STREAM}', r.seq, 0, r.id,
                'no partition of pgws_audit.messages for ' || to_char(r.at AT TIME ZONE 'UTC', 'YYYY-MM-DD')
                    || ' (UTC), and none can be created in a NOTIFY transaction',
                r.envelope,
                jsonb_build_object('{ids}', jsonb_build_array(r.id), '{channels}', jsonb_build_array(r.nc))
            FROM r WHERE NOT r.placed
            ON CONFLICT DO NOTHING RETURNING 1)
         SELECT (SELECT count(*) FROM written), (SELECT count(*) FROM dead)"
    )
}

/// The dead letters' common table expression of the dispatcher statement (`$4`..`$8`).
fn dispatch_dead() -> String {
    format!(
        ",
         dead AS (
            INSERT INTO pgws_audit.dead_letters (stream, stream_seq, part, msg_id, reason, data, headers)
            SELECT '{STREAM}', d.seq, 0, d.id, d.reason, d.data, d.headers::jsonb
            FROM unnest($4::int8[], $5::text[], $6::text[], $7::text[], $8::text[]) AS d(seq, id, reason, data, headers)
            ON CONFLICT DO NOTHING RETURNING 1)"
    )
}

/// The parameters of a statement.
type Params = Vec<Box<dyn ToSql + Sync + Send>>;

impl InTransaction {
    pub(crate) fn new(mode: Mode, metrics: InProcessMetrics) -> Self {
        let sql = match &mode {
            Mode::Table => table_sql(),
            Mode::Dispatcher(function) => store::dispatch_sql_with(
                function,
                &dispatch_dead(),
                ", (SELECT count(*) FROM dead)",
            ),
        };
        Self { mode, sql, metrics }
    }

    /// The statement: it records a set of messages given as arrays, in one statement.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The statement's parameters for `records`: each the message id, the channel NOTIFYed
    /// and the envelope (the notification's payload).
    pub fn params(&self, records: &[Notification]) -> Vec<Box<dyn ToSql + Sync + Send>> {
        let mut rows: Vec<(Record, i64)> = Vec::with_capacity(records.len());
        let mut dead: Vec<DeadLetter> = Vec::new();
        let mut seen = HashSet::new();
        for n in records {
            let (key, parsed) = parse(n);
            match parsed {
                // The dispatcher is called once per id, the first time it comes (as the
                // recorder's batch does).
                Ok(r) if self.mode.is_dispatcher() && !seen.insert(r.id.clone()) => {}
                Ok(r) => rows.push((r, i64::try_from(key).unwrap_or(i64::MAX))),
                Err(d) => dead.push(*d),
            }
        }
        self.count("recorded", rows.len());
        self.count("dead_letter", dead.len());
        let mut params: Params = match self.mode {
            Mode::Table => table_params(&rows),
            Mode::Dispatcher(_) => dispatch_params(&rows),
        };
        params.extend(dead_params(&dead));
        params
    }

    /// The binary `COPY` that writes rows when none of them exists yet: a third cheaper for
    /// PostgreSQL than the statement. `None` in dispatcher mode.
    pub fn copy_sql(&self) -> Option<&'static str> {
        (!self.mode.is_dispatcher()).then_some(store::COPY_ROWS)
    }

    /// The data of [`InTransaction::copy_sql`] for `records`, when each of them makes a row
    /// (table mode, no dead letter); `None` when the statement must write them.
    ///
    /// The `COPY` fails where the statement skips or diverts: a row that exists already (a
    /// retried request: unique violation, `23505`) or one whose day has no partition (check
    /// violation, `23514`). Its transaction is then to be rolled back and run again with
    /// [`InTransaction::sql`], which writes what the `COPY` could not.
    pub fn copy(&self, records: &[Notification]) -> Option<Bytes> {
        if self.mode.is_dispatcher() {
            return None;
        }
        let mut rows = Vec::with_capacity(records.len());
        for n in records {
            rows.push(parse(n).1.ok()?);
        }
        self.count("recorded", rows.len());
        Some(store::copy_data(&rows))
    }

    fn count(&self, outcome: &'static str, n: usize) {
        if n > 0 {
            self.metrics
                .records
                .get_or_create(&[("outcome", outcome)])
                .inc_by(n as u64);
        }
    }
}

/// A message as the recorder parses an audit record, with its dead-letter key ([`key`]).
fn parse(n: &Notification) -> (u64, Result<Record, Box<DeadLetter>>) {
    let key = key(n.id.as_deref(), &n.payload);
    let mut h = Headers::new();
    h.insert(headers::NOTIFY_CHANNEL.to_owned(), n.channel.clone());
    let meta = Meta::new(n.id.as_deref(), &h);
    (key, record::parse(STREAM, key, n.payload.as_bytes(), meta))
}

/// A message's dead-letter key: a hash of its id (of its envelope when it has none), 63 bits.
fn key(id: Option<&str>, envelope: &str) -> u64 {
    // FNV-1a: stable across builds and platforms, unlike the standard library's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let (tag, text) = match id {
        Some(id) => (1_u8, id),
        None => (0_u8, envelope),
    };
    for byte in std::iter::once(tag).chain(text.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash & (i64::MAX as u64)
}

fn column<T>(rows: &[(Record, i64)], f: impl Fn(&Record) -> T) -> Vec<T> {
    rows.iter().map(|(r, _)| f(r)).collect()
}

fn table_params(rows: &[(Record, i64)]) -> Params {
    // The conversion of `message_delivered_at` the recorder's rows get.
    let at: Vec<SystemTime> = column(rows, |r| store::timestamp(r.received_at));
    vec![
        Box::new(column(rows, |r| r.id.clone())),
        Box::new(column(rows, |r| r.channel.clone())),
        Box::new(column(rows, |r| r.event.clone())),
        Box::new(column(rows, |r| r.payload.clone())),
        Box::new(column(rows, |r| r.claims.clone())),
        Box::new(at),
        Box::new(column(rows, |r| r.notify_channel.clone())),
        Box::new(column(rows, |r| r.envelope.clone())),
        Box::new(rows.iter().map(|(_, key)| *key).collect::<Vec<i64>>()),
    ]
}

fn dispatch_params(rows: &[(Record, i64)]) -> Params {
    vec![
        Box::new(column(rows, |r| r.id.clone())),
        Box::new(column(rows, |r| r.notify_channel.clone())),
        Box::new(column(rows, |r| r.envelope.clone())),
    ]
}

fn dead_params(dead: &[DeadLetter]) -> Params {
    let column = |f: &dyn Fn(&DeadLetter) -> String| dead.iter().map(f).collect::<Vec<String>>();
    vec![
        Box::new(dead.iter().map(|d| d.stream_seq).collect::<Vec<i64>>()),
        Box::new(
            dead.iter()
                .map(|d| d.msg_id.clone())
                .collect::<Vec<Option<String>>>(),
        ),
        Box::new(column(&|d| d.reason.clone())),
        Box::new(column(&|d| d.data.clone())),
        Box::new(column(&|d| d.headers.clone())),
    ]
}

#[cfg(test)]
#[path = "in_transaction_tests.rs"]
mod tests;
