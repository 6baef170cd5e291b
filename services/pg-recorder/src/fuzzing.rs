//! Entry points for the fuzz targets in `fuzz/` (`cargo fuzz`; see `docs/security.md`), not
//! an API: hidden from the documentation, and the only door they have into the recorder.
//!
//! An audit record comes from JetStream, from whoever can publish on `<prefix>.audit`: its
//! body, id and headers are parsed by [`push`] (`record::Batch::push`, unchanged) into rows for
//! PostgreSQL, NOTIFY failures or dead letters; [`parse_both`] runs the two parsers of one
//! envelope (the fast path and the checked one) so that a target can hold them to agreeing.
//! What they make is handed back as plain data.

use crate::record::{self, Batch, DeadLetter, OwnedMeta, Record};

/// A row for `pgws_audit.messages`.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: String,
    pub channel: String,
    pub event: String,
    pub payload: String,
    /// Sent to PostgreSQL as `jsonb`.
    pub claims: String,
    pub received_at: f64,
    pub notify_channel: String,
    pub envelope: String,
    /// The envelope's position in its record.
    pub part: i32,
}

/// A row for `pgws_audit.dead_letters`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dead {
    pub part: i32,
    pub msg_id: Option<String>,
    pub reason: String,
    pub data: String,
    /// Sent to PostgreSQL as `jsonb`.
    pub headers: String,
}

/// A NOTIFY failure reported by a gateway (an outcome record), for
/// `pgws_audit.notify_failures`.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub ids: Vec<String>,
    pub reason: String,
}

/// What one record became.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pushed {
    pub rows: Vec<Row>,
    pub dead: Vec<Dead>,
    pub failures: Vec<Failure>,
}

/// Headers as a record of the audit log carries them: names and values NATS would refuse (a
/// value holding a line break, a name with a space or a `:`...) are left out, as it never
/// hands such a header over; of a repeated name the first value counts, as the log keeps one
/// per name; `Nats-Msg-Id` is the record's id.
fn header_map(headers: &[(&str, &str)]) -> OwnedMeta {
    let mut meta = OwnedMeta::default();
    for (name, value) in headers {
        let valid = !name.contains(|c: char| !c.is_ascii_graphic() || c == ':')
            && !value.contains(['\r', '\n']);
        let first = if *name == pgws_proto::headers::MSG_ID {
            meta.id.is_none()
        } else {
            !meta.headers.contains_key(*name)
        };
        if valid && first {
            meta.insert(name, value);
        }
    }
    meta
}

fn row(r: Record, part: i32) -> Row {
    Row {
        id: r.id,
        channel: r.channel,
        event: r.event,
        payload: r.payload,
        claims: r.claims,
        received_at: r.received_at,
        notify_channel: r.notify_channel,
        envelope: r.envelope,
        part,
    }
}

fn dead(d: DeadLetter) -> Dead {
    Dead {
        part: d.part,
        msg_id: d.msg_id,
        reason: d.reason,
        data: d.data,
        headers: d.headers,
    }
}

/// Parses one stream message with `headers` as the recorder does.
pub fn push(data: &[u8], headers: &[(&str, &str)]) -> Pushed {
    let mut batch = Batch::default();
    batch.push("fuzz", 1, data, header_map(headers).meta());
    let rows = batch
        .records
        .into_iter()
        .zip(batch.positions)
        .map(|(r, (_, _, part))| row(r, part))
        .collect();
    let failures = batch.failures.into_iter().map(|f| Failure {
        ids: f.ids,
        reason: f.reason,
    });
    Pushed {
        rows,
        dead: batch.dead.into_iter().map(dead).collect(),
        failures: failures.collect(),
    }
}

/// One envelope through the fast parse (`None`: left to the checked one) and through the
/// checked parse (`Err`: the dead letter's reason).
pub fn parse_both(data: &[u8], headers: &[(&str, &str)]) -> (Option<Row>, Result<Row, String>) {
    let map = header_map(headers);
    let fast = record::fast_parse(data, map.meta()).map(|r| row(r, 0));
    let checked = record::checked_parse("fuzz", 1, data, map.meta())
        .map(|r| row(r, 0))
        .map_err(|d| d.reason);
    (fast, checked)
}
