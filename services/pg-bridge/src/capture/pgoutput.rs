//! A decoder of PostgreSQL's logical replication messages (the `pgoutput` plugin), pure: bytes
//! in, [`Message`] out, no I/O.
//!
//! The bridge reads changes with SQL on an ordinary connection,
//! `pg_logical_slot_peek_binary_changes(slot, NULL, n, 'proto_version', '1',
//! 'publication_names', pub)`: each row's `data` is one message, decoded by [`decode`]. The
//! format (PostgreSQL's "Logical Replication Message Formats"; integers big-endian, strings
//! NUL-terminated) starts with a type byte:
//!
//! - `B` Begin: final LSN, commit time, xid. `C` Commit: flags, commit LSN, end LSN, time.
//! - `R` Relation: oid, namespace, name, replica identity, then per column flags (1: part of
//!   the key), name, type oid and type modifier. It precedes the first change of a relation in
//!   each decoding session (every peek) and again after the relation changed (a truncate
//!   included), so the caller keeps the latest one by oid.
//! - `I` Insert (`N` new tuple), `U` Update (optional `K` key or `O` old tuple, then `N`), `D`
//!   Delete (`K` or `O`), `T` Truncate (relations, CASCADE and RESTART IDENTITY).
//! - A tuple is a column count then per column `n` (NULL), `u` (an unchanged TOASTed value,
//!   not sent) or `t` (the value in text form, length-prefixed).
//!
//! Supported: protocol version 1 as PostgreSQL 15 writes it with the options above. Values are
//! text and are read as UTF-8 (the database encoding pgws expects); an invalid one is an error.
//! Not supported, and errors: binary values (`b`, only sent with the `binary` option), the
//! messages of streamed and two-phase transactions (protocol versions 2 and 3: `S`, `E`, `c`,
//! `A`, `b`, `P`, `K`, `r`, `p`), and anything truncated, malformed or followed by extra bytes.
//! Origin (`O`), Type (`Y`), logical decoding messages (`M`, only sent with the `messages`
//! option) and any other type byte decode as [`Message::Other`], for the caller to skip.
//!
//! What the captures of a real PostgreSQL 15 showed (the tests hold them): with `REPLICA
//! IDENTITY FULL` every column of the Relation message is flagged as key, and updates and
//! deletes carry the whole old row (`O`), TOASTed values included; an update that leaves a
//! TOASTed value alone sends it as `u` in the new tuple.

use serde::Serialize;
use serde_json::{Number, Value};

/// A PostgreSQL object id (a relation's, a type's).
pub(crate) type Oid = u32;

/// A column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Column {
    pub(crate) name: String,
    pub(crate) type_oid: Oid,
    /// Part of the replica identity (every column with `REPLICA IDENTITY FULL`).
    pub(crate) key: bool,
}

/// A table as a Relation message describes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Relation {
    pub(crate) oid: Oid,
    /// The namespace (`pg_catalog` when the message names none).
    pub(crate) schema: String,
    pub(crate) table: String,
    /// `relreplident`: `b'd'` default (the primary key), `b'n'` nothing, `b'f'` full, `b'i'`
    /// an index.
    pub(crate) replica_identity: u8,
    /// In the order of the tuples' values (generated columns are not sent).
    pub(crate) columns: Vec<Column>,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) enum Datum {
    Null,
    /// A TOASTed value the change left as it was: its value is not sent.
    UnchangedToast,
    /// The value in PostgreSQL's text form.
    Text(String),
}

/// A row's values, in the order of its [`Relation`]'s columns.
pub(crate) type Tuple = Vec<Datum>;

/// One pgoutput message. Times are microseconds since 2000-01-01 00:00 UTC.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) enum Message {
    Begin {
        /// The LSN of the transaction's commit record (Commit's `commit_lsn`).
        final_lsn: u64,
        commit_time_us: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: u64,
        /// Where the transaction ends: a slot confirmed up to here does not send it again.
        end_lsn: u64,
        commit_time_us: i64,
    },
    Relation(Relation),
    Insert {
        relation: Oid,
        new: Tuple,
    },
    Update {
        relation: Oid,
        /// The old row (`O`, `REPLICA IDENTITY FULL`) or its key (`K`, when the update
        /// changed the key; other columns NULL); `None` otherwise.
        old: Option<Tuple>,
        new: Tuple,
    },
    Delete {
        relation: Oid,
        /// The old row (`O`) or its key (`K`, other columns NULL).
        old: Tuple,
    },
    Truncate {
        relations: Vec<Oid>,
        cascade: bool,
        restart_identity: bool,
    },
    /// Origin `O`, Type `Y`, Message `M` or any other type byte: nothing the capture uses.
    Other(u8),
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("pgoutput message: {what} (at byte {at})")]
pub(crate) struct DecodeError {
    /// The offset in the message where decoding stopped.
    pub(crate) at: usize,
    pub(crate) what: String,
}

/// Decodes one pgoutput message (one row's `data`). Never panics.
pub(crate) fn decode(data: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { data, at: 0 };
    let tag = r.u8("the message type")?;
    let message = match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64("the final LSN")?,
            commit_time_us: r.i64("the commit time")?,
            xid: r.u32("the xid")?,
        },
        b'C' => {
            // Flags: unused, 0 so far.
            r.u8("the commit flags")?;
            Message::Commit {
                commit_lsn: r.u64("the commit LSN")?,
                end_lsn: r.u64("the end LSN")?,
                commit_time_us: r.i64("the commit time")?,
            }
        }
        b'R' => Message::Relation(relation(&mut r)?),
        b'I' => {
            let relation = r.u32("the relation oid")?;
            r.expect_tag(b'N', "the new tuple")?;
            Message::Insert {
                relation,
                new: tuple(&mut r)?,
            }
        }
        b'U' => {
            let relation = r.u32("the relation oid")?;
            let old = match r.u8("the tuple kind")? {
                b'K' | b'O' => {
                    let old = tuple(&mut r)?;
                    r.expect_tag(b'N', "the new tuple")?;
                    Some(old)
                }
                b'N' => None,
                other => return Err(r.error(format!("unexpected tuple kind {}", show(other)))),
            };
            Message::Update {
                relation,
                old,
                new: tuple(&mut r)?,
            }
        }
        b'D' => {
            let relation = r.u32("the relation oid")?;
            match r.u8("the tuple kind")? {
                b'K' | b'O' => {}
                other => return Err(r.error(format!("unexpected tuple kind {}", show(other)))),
            }
            Message::Delete {
                relation,
                old: tuple(&mut r)?,
            }
        }
        b'T' => {
            let count = r.count32("the relation count")?;
            let options = r.u8("the truncate options")?;
            let mut relations = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                relations.push(r.u32("a relation oid")?);
            }
            Message::Truncate {
                relations,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
            }
        }
        b'S' | b'E' | b'c' | b'A' | b'b' | b'P' | b'K' | b'r' | b'p' => {
            return Err(DecodeError {
                at: 0,
                what: format!(
                    "message type {} belongs to streamed or two-phase transactions \
                     (protocol version 2 or later), not requested",
                    show(tag)
                ),
            })
        }
        other => return Ok(Message::Other(other)),
    };
    if r.remaining() > 0 {
        return Err(r.error(format!("{} bytes after the message", r.remaining())));
    }
    Ok(message)
}

fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let oid = r.u32("the relation oid")?;
    let mut schema = r.string("the namespace")?;
    if schema.is_empty() {
        schema = "pg_catalog".to_owned();
    }
    let table = r.string("the relation name")?;
    let replica_identity = r.u8("the replica identity")?;
    let count = r.count16("the column count")?;
    // Each column takes at least 10 bytes.
    let mut columns = Vec::with_capacity(count.min(r.remaining() / 10));
    for _ in 0..count {
        let flags = r.u8("the column flags")?;
        let name = r.string("the column name")?;
        let type_oid = r.u32("the column type")?;
        // The type modifier: not needed to read text values.
        r.u32("the column type modifier")?;
        columns.push(Column {
            name,
            type_oid,
            key: flags & 1 != 0,
        });
    }
    Ok(Relation {
        oid,
        schema,
        table,
        replica_identity,
        columns,
    })
}

fn tuple(r: &mut Reader<'_>) -> Result<Tuple, DecodeError> {
    let count = r.count16("the column count")?;
    let mut values = Vec::with_capacity(count.min(r.remaining()));
    for _ in 0..count {
        values.push(match r.u8("the value kind")? {
            b'n' => Datum::Null,
            b'u' => Datum::UnchangedToast,
            b't' => {
                let len = r.count32("the value length")?;
                let bytes = r.take(len, "the value")?;
                match std::str::from_utf8(bytes) {
                    Ok(text) => Datum::Text(text.to_owned()),
                    Err(e) => {
                        return Err(DecodeError {
                            at: r.at - len + e.valid_up_to(),
                            what: "a text value is not UTF-8".to_owned(),
                        })
                    }
                }
            }
            b'b' => return Err(r.error("a binary value (binary values were not requested)")),
            other => return Err(r.error(format!("unexpected value kind {}", show(other)))),
        });
    }
    Ok(values)
}

/// A byte as a character when printable (`'N'`), else as a number.
fn show(byte: u8) -> String {
    if byte.is_ascii_graphic() {
        format!("'{}'", char::from(byte))
    } else {
        format!("0x{byte:02x}")
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.at
    }

    fn error(&self, what: impl Into<String>) -> DecodeError {
        DecodeError {
            at: self.at,
            what: what.into(),
        }
    }

    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < len {
            return Err(self.error(format!("truncated: {what} needs {len} bytes")));
        }
        let bytes = &self.data[self.at..self.at + len];
        self.at += len;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    /// An Int16 count, which must not be negative.
    fn count16(&mut self, what: &str) -> Result<usize, DecodeError> {
        let n = i16::from_be_bytes(self.array(what)?);
        usize::try_from(n).map_err(|_| self.error(format!("{what} is negative ({n})")))
    }

    /// An Int32 count or length, which must not be negative.
    fn count32(&mut self, what: &str) -> Result<usize, DecodeError> {
        let n = i32::from_be_bytes(self.array(what)?);
        usize::try_from(n).map_err(|_| self.error(format!("{what} is negative ({n})")))
    }

    fn expect_tag(&mut self, tag: u8, what: &str) -> Result<(), DecodeError> {
        let got = self.u8(what)?;
        if got != tag {
            self.at -= 1;
            return Err(self.error(format!(
                "expected {} ({what}), found {}",
                show(tag),
                show(got)
            )));
        }
        Ok(())
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        let rest = &self.data[self.at..];
        let Some(end) = rest.iter().position(|&b| b == 0) else {
            return Err(self.error(format!("truncated: {what} has no terminating NUL")));
        };
        let text = std::str::from_utf8(&rest[..end])
            .map_err(|e| DecodeError {
                at: self.at + e.valid_up_to(),
                what: format!("{what} is not UTF-8"),
            })?
            .to_owned();
        self.at += end + 1;
        Ok(text)
    }
}

/// Parses an LSN in PostgreSQL's text form, two hexadecimal halves (`16/B374D848`).
#[cfg(test)]
pub(crate) fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    let half = |s: &str| {
        if s.is_empty() || s.len() > 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u32::from_str_radix(s, 16).ok()
    };
    Some((u64::from(half(hi)?) << 32) | u64::from(half(lo)?))
}

/// An LSN in PostgreSQL's text form (`16/B374D848`, as `pg_lsn` prints it).
#[cfg(test)]
pub(crate) fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Type oids of PostgreSQL's built-in types that [`to_json`] reads.
mod types {
    pub(super) const BOOL: u32 = 16;
    pub(super) const INT8: u32 = 20;
    pub(super) const INT2: u32 = 21;
    pub(super) const INT4: u32 = 23;
    pub(super) const OID: u32 = 26;
    pub(super) const JSON: u32 = 114;
    pub(super) const FLOAT4: u32 = 700;
    pub(super) const FLOAT8: u32 = 701;
    pub(super) const NUMERIC: u32 = 1700;
    pub(super) const JSONB: u32 = 3802;
}

/// A column's text value as JSON the way PostgREST shows it: `int2`/`int4`/`int8`/`oid` ->
/// a JSON integer; `float4`/`float8`/`numeric` -> a JSON number (an `f64`: a `numeric` with
/// more digits than an `f64` holds is rounded) when finite, `NaN` and `Infinity` stay strings;
/// `bool` `t`/`f` -> `true`/`false`; `json`/`jsonb` -> the parsed JSON (a string if it does
/// not parse); everything else (text, timestamps, uuid, arrays, enums, ...) -> a JSON string.
/// A text that does not read as its type stays a string.
pub(crate) fn to_json(type_oid: Oid, text: &str) -> Value {
    let parsed = match type_oid {
        types::INT2 | types::INT4 | types::INT8 => text.parse::<i64>().ok().map(Value::from),
        types::OID => text.parse::<u32>().ok().map(Value::from),
        // A whole number stays an integer (`3`, not `3.0`), as PostgREST shows it; `-0`
        // keeps its sign as a float.
        types::FLOAT4 | types::FLOAT8 | types::NUMERIC => text
            .parse::<i64>()
            .ok()
            .filter(|_| text != "-0")
            .map(Value::from)
            .or_else(|| {
                text.parse::<f64>()
                    .ok()
                    .and_then(Number::from_f64)
                    .map(Value::Number)
            }),
        types::BOOL => match text {
            "t" => Some(Value::Bool(true)),
            "f" => Some(Value::Bool(false)),
            _ => None,
        },
        types::JSON | types::JSONB => serde_json::from_str(text).ok(),
        _ => None,
    };
    parsed.unwrap_or_else(|| Value::String(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Every row of one peek, `(lsn, encode(data, 'hex'))`, captured from PostgreSQL 15.20
    /// (wal_level=logical) after:
    ///
    /// ```sql
    /// CREATE TYPE mood AS ENUM ('calm', 'busy');
    /// CREATE TABLE public.items (
    ///   id int8 PRIMARY KEY, name text, done bool, doc jsonb, price numeric, at timestamptz,
    ///   extra text, big text, state mood);
    /// ALTER TABLE items ALTER COLUMN big SET STORAGE EXTERNAL;  -- out of line, uncompressed
    /// ALTER TABLE items REPLICA IDENTITY FULL;
    /// CREATE TABLE public.tags (id int4 PRIMARY KEY, label text);
    /// CREATE PUBLICATION pgo_pub FOR TABLE items, tags;
    /// SELECT pg_create_logical_replication_slot('pgo_slot', 'pgoutput');
    /// BEGIN;
    /// INSERT INTO items VALUES (1, 'first', true, '{"a": [1, 2], "b": null}', 12.50,
    ///   '2024-01-02 03:04:05.678+00', NULL, 'small', 'calm');
    /// COMMIT;
    /// BEGIN; UPDATE items SET name = 'renamed', done = false WHERE id = 1; COMMIT;
    /// BEGIN;
    /// INSERT INTO items (id, name, big) VALUES (2, 'large', repeat('0123456789', 1000));
    /// COMMIT;
    /// BEGIN; UPDATE items SET done = true WHERE id = 2; COMMIT;
    /// BEGIN; DELETE FROM items WHERE id = 1; COMMIT;
    /// BEGIN; INSERT INTO tags VALUES (7, 'é ☃'); UPDATE tags SET label = 'plain' WHERE id = 7;
    ///   DELETE FROM tags WHERE id = 7; COMMIT;
    /// BEGIN; TRUNCATE items, tags RESTART IDENTITY CASCADE; COMMIT;
    /// SELECT lsn::text, encode(data, 'hex') FROM pg_logical_slot_peek_binary_changes(
    ///   'pgo_slot', NULL, NULL, 'proto_version', '1', 'publication_names', 'pgo_pub');
    /// ```
    ///
    /// The two messages holding the 10,000-character value are in `testdata/`.
    const PEEK: &[(&str, &str)] = &[
        ("0/1546EA0", "420000000001546fe80003049627492a64000002da"),
        ("0/1546EA0", "59000040017075626c6963006d6f6f6400"),
        ("0/1546EA0", ITEMS_RELATION),
        ("0/1546EA0", "49000040054e00097400000001317400000005666972737474000000017474000000187b2261223a205b312c20325d2c202262223a206e756c6c7d740000000531322e3530740000001a323032342d30312d30322030333a30343a30352e3637382b30306e7400000005736d616c6c740000000463616c6d"),
        ("0/1547018", "43000000000001546fe800000000015470180003049627492a64"),
        ("0/1547018", "4200000000015471380003049627493520000002db"),
        ("0/1547018", "55000040054f00097400000001317400000005666972737474000000017474000000187b2261223a205b312c20325d2c202262223a206e756c6c7d740000000531322e3530740000001a323032342d30312d30322030333a30343a30352e3637382b30306e7400000005736d616c6c740000000463616c6d4e0009740000000131740000000772656e616d656474000000016674000000187b2261223a205b312c20325d2c202262223a206e756c6c7d740000000531322e3530740000001a323032342d30312d30322030333a30343a30352e3637382b30306e7400000005736d616c6c740000000463616c6d"),
        ("0/1547168", "4300000000000154713800000000015471680003049627493520"),
        ("0/1549C08", "420000000001549ca80003049627493d93000002dc"),
        ("0/1549C08", include_str!("testdata/insert_10k.hex")),
        ("0/1549CD8", "43000000000001549ca80000000001549cd80003049627493d93"),
        ("0/1549D10", "42000000000154c4e000030496274944ae000002dd"),
        ("0/1549D10", include_str!("testdata/update_unchanged_toast.hex")),
        ("0/154C510", "4300000000000154c4e0000000000154c51000030496274944ae"),
        ("0/154C510", "42000000000154c5b80003049627494a2f000002de"),
        ("0/154C510", "44000040054f0009740000000131740000000772656e616d656474000000016674000000187b2261223a205b312c20325d2c202262223a206e756c6c7d740000000531322e3530740000001a323032342d30312d30322030333a30343a30352e3637382b30306e7400000005736d616c6c740000000463616c6d"),
        ("0/154C5E8", "4300000000000154c5b8000000000154c5e80003049627494a2f"),
        ("0/154C5E8", "42000000000154c760000304962749530d000002df"),
        ("0/154C5E8", TAGS_RELATION),
        ("0/154C5E8", "490000400c4e00027400000001377400000006c3a920e29883"),
        ("0/154C6D0", "550000400c4e00027400000001377400000005706c61696e"),
        ("0/154C720", "440000400c4b00027400000001376e"),
        ("0/154C790", "4300000000000154c760000000000154c790000304962749530d"),
        ("0/154DE40", "42000000000154de70000304962749a1fb000002e0"),
        ("0/154DE40", "59000040017075626c6963006d6f6f6400"),
        ("0/154DE40", ITEMS_RELATION),
        ("0/154DE40", TAGS_RELATION),
        ("0/154DE40", "540000000203000040050000400c"),
        ("0/154E128", "4300000000000154de70000000000154e128000304962749a1fb"),
    ];

    const ITEMS_RELATION: &str = "52000040057075626c6963006974656d73006600090169640000000014ffffffff016e616d650000000019ffffffff01646f6e650000000010ffffffff01646f630000000edaffffffff01707269636500000006a4ffffffff01617400000004a0ffffffff0165787472610000000019ffffffff016269670000000019ffffffff0173746174650000004001ffffffff";
    const TAGS_RELATION: &str = "520000400c7075626c69630074616773006400020169640000000017ffffffff006c6162656c0000000019ffffffff";

    const ITEMS: Oid = 16389;
    const TAGS: Oid = 16396;
    const MOOD: Oid = 16385;

    /// Hex digits to bytes; whitespace is ignored.
    fn unhex(hex: &str) -> Vec<u8> {
        let hex: String = hex.split_whitespace().collect();
        assert_eq!(hex.len() % 2, 0);
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn decode_hex(hex: &str) -> Message {
        decode(&unhex(hex)).unwrap_or_else(|e| panic!("{e}: {hex}"))
    }

    fn text(s: &str) -> Datum {
        Datum::Text(s.to_owned())
    }

    fn items_relation() -> Relation {
        // REPLICA IDENTITY FULL: PostgreSQL flags every column as part of the key.
        let column = |name: &str, type_oid| Column {
            name: name.to_owned(),
            type_oid,
            key: true,
        };
        Relation {
            oid: ITEMS,
            schema: "public".to_owned(),
            table: "items".to_owned(),
            replica_identity: b'f',
            columns: vec![
                column("id", 20),
                column("name", 25),
                column("done", 16),
                column("doc", 3802),
                column("price", 1700),
                column("at", 1184),
                column("extra", 25),
                column("big", 25),
                column("state", MOOD),
            ],
        }
    }

    fn tags_relation() -> Relation {
        Relation {
            oid: TAGS,
            schema: "public".to_owned(),
            table: "tags".to_owned(),
            replica_identity: b'd',
            columns: vec![
                Column {
                    name: "id".to_owned(),
                    type_oid: 23,
                    key: true,
                },
                Column {
                    name: "label".to_owned(),
                    type_oid: 25,
                    key: false,
                },
            ],
        }
    }

    /// Row 1 of `items`: the first insert, and with `name` and `done` changed.
    fn row1(name: &str, done: &str) -> Tuple {
        vec![
            text("1"),
            text(name),
            text(done),
            text(r#"{"a": [1, 2], "b": null}"#),
            text("12.50"),
            text("2024-01-02 03:04:05.678+00"),
            Datum::Null,
            text("small"),
            text("calm"),
        ]
    }

    fn row2(done: Datum, big: Datum) -> Tuple {
        vec![
            text("2"),
            text("large"),
            done,
            Datum::Null,
            Datum::Null,
            Datum::Null,
            Datum::Null,
            big,
            Datum::Null,
        ]
    }

    #[test]
    fn decodes_a_real_peek() {
        let big = || text(&"0123456789".repeat(1000));
        let begin = |final_lsn, commit_time_us, xid| Message::Begin {
            final_lsn,
            commit_time_us,
            xid,
        };
        let commit = |commit_lsn, end_lsn, commit_time_us| Message::Commit {
            commit_lsn,
            end_lsn,
            commit_time_us,
        };
        let expected = vec![
            begin(0x1546FE8, 0x3049627492A64, 730),
            Message::Other(b'Y'),
            Message::Relation(items_relation()),
            Message::Insert {
                relation: ITEMS,
                new: row1("first", "t"),
            },
            commit(0x1546FE8, 0x1547018, 0x3049627492A64),
            begin(0x1547138, 0x3049627493520, 731),
            // REPLICA IDENTITY FULL: the whole old row.
            Message::Update {
                relation: ITEMS,
                old: Some(row1("first", "t")),
                new: row1("renamed", "f"),
            },
            commit(0x1547138, 0x1547168, 0x3049627493520),
            begin(0x1549CA8, 0x3049627493D93, 732),
            // An insert carries a TOASTed value whole.
            Message::Insert {
                relation: ITEMS,
                new: row2(Datum::Null, big()),
            },
            commit(0x1549CA8, 0x1549CD8, 0x3049627493D93),
            begin(0x154C4E0, 0x30496274944AE, 733),
            // Observed: an update that leaves an out-of-line TOASTed value alone sends `u` for
            // it in the new tuple, while the old tuple of REPLICA IDENTITY FULL holds the whole
            // value (PostgreSQL inlines the TOASTed values of a FULL old row when it logs it).
            Message::Update {
                relation: ITEMS,
                old: Some(row2(Datum::Null, big())),
                new: row2(text("t"), Datum::UnchangedToast),
            },
            commit(0x154C4E0, 0x154C510, 0x30496274944AE),
            begin(0x154C5B8, 0x3049627494A2F, 734),
            Message::Delete {
                relation: ITEMS,
                old: row1("renamed", "f"),
            },
            commit(0x154C5B8, 0x154C5E8, 0x3049627494A2F),
            begin(0x154C760, 0x304962749530D, 735),
            Message::Relation(tags_relation()),
            Message::Insert {
                relation: TAGS,
                new: vec![text("7"), text("é ☃")],
            },
            // The default replica identity and an unchanged key: no old tuple.
            Message::Update {
                relation: TAGS,
                old: None,
                new: vec![text("7"), text("plain")],
            },
            // The default replica identity: the key, other columns NULL.
            Message::Delete {
                relation: TAGS,
                old: vec![text("7"), Datum::Null],
            },
            commit(0x154C760, 0x154C790, 0x304962749530D),
            // A truncate changes the relations: they are described again.
            begin(0x154DE70, 0x304962749A1FB, 736),
            Message::Other(b'Y'),
            Message::Relation(items_relation()),
            Message::Relation(tags_relation()),
            Message::Truncate {
                relations: vec![ITEMS, TAGS],
                cascade: true,
                restart_identity: true,
            },
            commit(0x154DE70, 0x154E128, 0x304962749A1FB),
        ];
        let decoded: Vec<Message> = PEEK.iter().map(|(_, hex)| decode_hex(hex)).collect();
        assert_eq!(decoded.len(), expected.len());
        for (i, (got, want)) in decoded.iter().zip(&expected).enumerate() {
            assert_eq!(got, want, "row {i}");
        }
    }

    #[test]
    fn lsns_of_a_real_peek_are_in_order() {
        // Each Begin's final LSN is its Commit's commit LSN, the commit ends after it, the
        // next transaction commits after that, and a row's lsn column never goes back.
        let mut last_row_lsn = 0;
        let mut last_end = 0;
        let mut open = None;
        for (lsn, hex) in PEEK {
            let row_lsn = parse_lsn(lsn).expect("lsn");
            assert!(row_lsn >= last_row_lsn);
            last_row_lsn = row_lsn;
            match decode_hex(hex) {
                Message::Begin { final_lsn, .. } => {
                    assert!(open.is_none());
                    assert!(final_lsn > last_end);
                    open = Some(final_lsn);
                }
                Message::Commit {
                    commit_lsn,
                    end_lsn,
                    ..
                } => {
                    assert_eq!(open.take(), Some(commit_lsn));
                    assert!(end_lsn > commit_lsn);
                    // The Commit row's lsn is the transaction's end.
                    assert_eq!(row_lsn, end_lsn);
                    last_end = end_lsn;
                }
                _ => assert!(open.is_some()),
            }
        }
        assert!(open.is_none());
    }

    #[test]
    fn every_prefix_is_an_error_or_a_message() {
        for (_, hex) in PEEK {
            let bytes = unhex(hex);
            for len in 0..bytes.len() {
                match decode(&bytes[..len]) {
                    // Only the messages it does not read decode from a part.
                    Ok(message) => assert_eq!(message, Message::Other(bytes[0]), "{len}"),
                    Err(e) => assert!(e.at <= len, "{e}"),
                }
            }
            // Nor with a byte more.
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(decode(&longer).is_err() || bytes[0] == b'Y');
        }
    }

    #[test]
    fn garbage_never_panics() {
        // A small deterministic generator (xorshift): random bytes, and the fixtures with
        // bytes changed.
        let mut state = 0x2545_F491_4F6C_DD1D_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let fixtures: Vec<Vec<u8>> = PEEK.iter().map(|(_, hex)| unhex(hex)).collect();
        for _ in 0..20_000 {
            let mut bytes = if next() % 2 == 0 {
                let len = (next() % 64) as usize;
                let tag = b"BCRIUDTYO"[(next() % 9) as usize];
                let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                b.insert(0, tag);
                b
            } else {
                fixtures[(next() % fixtures.len() as u64) as usize].clone()
            };
            for _ in 0..(next() % 4) {
                let i = (next() % bytes.len() as u64) as usize;
                bytes[i] = next() as u8;
            }
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn malformed_messages_are_errors() {
        let cases: &[(&str, &str)] = &[
            ("", "the message type"),
            // An Insert without its 'N'.
            ("49000040054b0001 6e", "expected 'N'"),
            // A value kind that does not exist, and a binary value.
            ("49000040054e0001 78", "unexpected value kind 'x'"),
            ("49000040054e0001 62 00000001 00", "binary"),
            // A negative length and column count, a length past the end.
            ("49000040054e0001 74 ffffffff", "negative"),
            ("49000040054e ffff", "negative"),
            ("49000040054e0001 74 7fffffff 41", "truncated"),
            // Text that is not UTF-8, in a value and in a name.
            ("49000040054e0001 74 00000002 c328", "not UTF-8"),
            ("52000040057075626cff6300 6100 64 0000", "not UTF-8"),
            // A name without its NUL.
            ("5200004005707562", "no terminating NUL"),
            // An update's and a delete's tuple kinds.
            ("5500004005 58", "unexpected tuple kind 'X'"),
            ("4400004005 4e0000", "unexpected tuple kind 'N'"),
            ("5500004005 4f0000 4f0000", "expected 'N'"),
            // A byte too many, a truncate with more oids than bytes.
            ("49000040054e0000 00", "1 bytes after the message"),
            ("54 7fffffff 00 00004005", "truncated"),
            ("54 80000000 00", "negative"),
            // The messages of protocol versions 2 and later.
            ("53 00000001 01", "streamed or two-phase"),
            ("63 00", "streamed or two-phase"),
        ];
        for (hex, what) in cases {
            let bytes = unhex(hex);
            let err = decode(&bytes).expect_err(hex);
            assert!(err.to_string().contains(what), "{hex}: {err}");
        }
    }

    #[test]
    fn other_messages_are_skipped() {
        // Origin: LSN and name.
        assert_eq!(
            decode(&unhex("4f00000000015471380061626300")),
            Ok(Message::Other(b'O'))
        );
        assert_eq!(decode(b"M"), Ok(Message::Other(b'M')));
        assert_eq!(decode(&[0xff, 1, 2]), Ok(Message::Other(0xff)));
    }

    #[test]
    fn an_empty_namespace_is_pg_catalog() {
        let message = decode(&unhex("52 000004d2 00 7400 6e 0000")).expect("relation");
        assert_eq!(
            message,
            Message::Relation(Relation {
                oid: 1234,
                schema: "pg_catalog".to_owned(),
                table: "t".to_owned(),
                replica_identity: b'n',
                columns: vec![],
            })
        );
    }

    #[test]
    fn lsn_text() {
        for (text, lsn) in [
            ("0/0", 0),
            ("16/B374D848", 0x16_B374_D848),
            ("0/1546FE8", 0x1546FE8),
            ("FFFFFFFF/FFFFFFFF", u64::MAX),
        ] {
            assert_eq!(parse_lsn(text), Some(lsn), "{text}");
            assert_eq!(format_lsn(lsn), text);
        }
        assert_eq!(parse_lsn("16/b374d848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("00000016/0000000A"), Some(0x16_0000_000A));
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "16",
            "16/B374D848/0",
            "+1/0",
            "0/-1",
            "0/ 1",
            "100000000/0",
            "0/G",
            "16-B374D848",
        ] {
            assert_eq!(parse_lsn(bad), None, "{bad:?}");
        }
        for shift in 0..64 {
            for lsn in [1_u64 << shift, (1_u64 << shift) - 1, u64::MAX >> shift] {
                assert_eq!(parse_lsn(&format_lsn(lsn)), Some(lsn), "{lsn:x}");
            }
        }
    }

    #[test]
    fn values_as_json() {
        let cases = [
            (21, "-32768", json!(-32768)),
            (23, "42", json!(42)),
            (
                20,
                "9223372036854775807",
                json!(9_223_372_036_854_775_807_i64),
            ),
            (20, "-9223372036854775808", json!(i64::MIN)),
            (26, "4294967295", json!(4_294_967_295_u32)),
            (23, "x", json!("x")),
            (701, "1.5", json!(1.5)),
            (701, "-0", json!(-0.0)),
            (701, "1e+300", json!(1e300)),
            (700, "NaN", json!("NaN")),
            (701, "Infinity", json!("Infinity")),
            (701, "-Infinity", json!("-Infinity")),
            (1700, "12.50", json!(12.5)),
            (1700, "NaN", json!("NaN")),
            (1700, "0.1", json!(0.1)),
            (1700, "3", json!(3)),
            (701, "-7", json!(-7)),
            (
                1700,
                &format!("1{}", "0".repeat(400)),
                json!(format!("1{}", "0".repeat(400))),
            ),
            (16, "t", json!(true)),
            (16, "f", json!(false)),
            (16, "true", json!("true")),
            (
                3802,
                r#"{"a": [1, 2], "b": null}"#,
                json!({"a": [1, 2], "b": null}),
            ),
            (114, "[1, \"x\"]", json!([1, "x"])),
            (114, "\"s\"", json!("s")),
            (114, "{oops", json!("{oops")),
            (25, "42", json!("42")),
            (
                1184,
                "2024-01-02 03:04:05.678+00",
                json!("2024-01-02 03:04:05.678+00"),
            ),
            (
                2950,
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            ),
            (1007, "{1,2,3}", json!("{1,2,3}")),
            (MOOD, "calm", json!("calm")),
        ];
        for (type_oid, text, want) in cases {
            assert_eq!(to_json(type_oid, text), want, "{type_oid} {text}");
        }
        // Deeply nested JSON is left as text, not a panic.
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(to_json(3802, &deep), Value::String(deep.clone()));
    }
}
