//! The bridge's decoder of PostgreSQL's logical replication messages (`pgoutput`, protocol
//! version 1, through `pg_bridge::fuzzing`) and its JSON form of column values: any bytes, and
//! messages of every kind built from fuzzed fields, whole, cut short or with a byte changed.
//! Nothing panics; a built message decodes to exactly what it was built from, and any part of
//! it cut short is an error; a value is a JSON string unless its type says otherwise, and a
//! number, a boolean or JSON only when the text reads as one.

#![no_main]

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pg_bridge::fuzzing::{decode_pgoutput, pgoutput_value_json};
use serde_json::{json, Value};

/// The type oids the JSON form reads (bool, int8, int2, int4, oid, json, float4, float8,
/// numeric, jsonb) and a few it leaves as text (text, timestamptz, an enum).
const TYPES: &[u32] = &[
    16, 20, 21, 23, 26, 114, 700, 701, 1700, 3802, 25, 1184, 16385,
];

#[derive(Debug)]
enum Input {
    /// Any bytes (the seeds: messages captured from PostgreSQL 15).
    Bytes(Vec<u8>),
    /// A message as PostgreSQL writes it, what it should decode to, and a change to it.
    Built {
        bytes: Vec<u8>,
        model: Value,
        change: Change,
    },
    /// A column value.
    Value { type_oid: u32, text: String },
}

#[derive(Debug)]
enum Change {
    None,
    Cut(usize),
    Set(usize, u8),
}

/// Writes what PostgreSQL writes: big-endian integers, NUL-terminated strings.
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn string(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
    }
}

/// A name without NUL (PostgreSQL's names have none).
fn name(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(match u.int_in_range(0..=3)? {
        0 => String::new(),
        1 => "public".to_owned(),
        _ => u.arbitrary::<String>()?.replace('\0', ""),
    })
}

fn value_text(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(match u.int_in_range(0..=6)? {
        0 => String::new(),
        1 => "é ☃".to_owned(),
        2 => "x".repeat(u.int_in_range(0..=3000)?),
        3 => (*u.choose(&["t", "f", "12.50", "-7", "NaN", "Infinity", "{\"a\": [1]}"])?).to_owned(),
        _ => u.arbitrary()?,
    })
}

fn tuple(u: &mut Unstructured<'_>, w: &mut Writer) -> Result<Value> {
    let n = u.int_in_range(0..=5)?;
    w.u16(n);
    let mut values = Vec::new();
    for _ in 0..n {
        values.push(match u.int_in_range(0..=3)? {
            0 => {
                w.u8(b'n');
                json!("Null")
            }
            1 => {
                w.u8(b'u');
                json!("UnchangedToast")
            }
            _ => {
                let text = value_text(u)?;
                w.u8(b't');
                w.u32(u32::try_from(text.len()).expect("short"));
                w.0.extend_from_slice(text.as_bytes());
                json!({ "Text": text })
            }
        });
    }
    Ok(Value::Array(values))
}

/// A message of any kind and its serde form.
fn message(u: &mut Unstructured<'_>) -> Result<(Vec<u8>, Value)> {
    let mut w = Writer(Vec::new());
    let model = match u.int_in_range(0..=8)? {
        0 => {
            let (final_lsn, commit_time_us, xid) = (u.arbitrary()?, u.arbitrary()?, u.arbitrary()?);
            w.u8(b'B');
            w.u64(final_lsn);
            w.u64(commit_time_us);
            w.u32(xid);
            let commit_time_us = commit_time_us as i64;
            json!({"Begin": {"final_lsn": final_lsn, "commit_time_us": commit_time_us, "xid": xid}})
        }
        1 => {
            let (flags, commit_lsn, end_lsn, time) = (
                u.arbitrary::<u8>()?,
                u.arbitrary::<u64>()?,
                u.arbitrary::<u64>()?,
                u.arbitrary::<i64>()?,
            );
            w.u8(b'C');
            w.u8(flags);
            w.u64(commit_lsn);
            w.u64(end_lsn);
            w.u64(time as u64);
            json!({"Commit": {"commit_lsn": commit_lsn, "end_lsn": end_lsn, "commit_time_us": time}})
        }
        2 => {
            let oid: u32 = u.arbitrary()?;
            let schema = name(u)?;
            let table = name(u)?;
            let replica_identity = *u.choose(b"dnfi")?;
            let n = u.int_in_range(0..=4)?;
            w.u8(b'R');
            w.u32(oid);
            w.string(&schema);
            w.string(&table);
            w.u8(replica_identity);
            w.u16(n);
            let mut columns = Vec::new();
            for _ in 0..n {
                let flags: u8 = u.arbitrary()?;
                let column = name(u)?;
                let type_oid = *u.choose(TYPES)?;
                w.u8(flags);
                w.string(&column);
                w.u32(type_oid);
                w.u32(u.arbitrary()?);
                columns.push(json!({"name": column, "type_oid": type_oid, "key": flags & 1 == 1}));
            }
            let schema = if schema.is_empty() {
                "pg_catalog".to_owned()
            } else {
                schema
            };
            json!({"Relation": {"oid": oid, "schema": schema, "table": table,
                "replica_identity": replica_identity, "columns": columns}})
        }
        3 => {
            let relation: u32 = u.arbitrary()?;
            w.u8(b'I');
            w.u32(relation);
            w.u8(b'N');
            let new = tuple(u, &mut w)?;
            json!({"Insert": {"relation": relation, "new": new}})
        }
        4 => {
            let relation: u32 = u.arbitrary()?;
            w.u8(b'U');
            w.u32(relation);
            let old = match u.int_in_range(0..=2)? {
                0 => Value::Null,
                kind => {
                    w.u8(if kind == 1 { b'K' } else { b'O' });
                    tuple(u, &mut w)?
                }
            };
            w.u8(b'N');
            let new = tuple(u, &mut w)?;
            json!({"Update": {"relation": relation, "old": old, "new": new}})
        }
        5 => {
            let relation: u32 = u.arbitrary()?;
            w.u8(b'D');
            w.u32(relation);
            w.u8(*u.choose(b"KO")?);
            let old = tuple(u, &mut w)?;
            json!({"Delete": {"relation": relation, "old": old}})
        }
        6 => {
            let relations: Vec<u32> = (0..u.int_in_range(0..=4_u8)?)
                .map(|_| u.arbitrary())
                .collect::<Result<_>>()?;
            let options: u8 = u.arbitrary()?;
            w.u8(b'T');
            w.u32(u32::try_from(relations.len()).expect("short"));
            w.u8(options);
            for oid in &relations {
                w.u32(*oid);
            }
            json!({"Truncate": {"relations": relations, "cascade": options & 1 == 1,
                "restart_identity": options & 2 == 2}})
        }
        _ => {
            // Origin, Type, Message: whatever follows is not read.
            let tag = *u.choose(b"OYM")?;
            w.u8(tag);
            let rest: Vec<u8> = u.arbitrary()?;
            w.0.extend_from_slice(&rest);
            json!({ "Other": tag })
        }
    };
    Ok((w.0, model))
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(match u.int_in_range(0..=3)? {
            // The rest of the input, so that a message's bytes behind a 0 byte are a seed.
            0 => Input::Bytes(u.bytes(u.len())?.to_vec()),
            1 => Input::Value {
                type_oid: *u.choose(TYPES)?,
                text: value_text(u)?,
            },
            _ => {
                let (bytes, model) = message(u)?;
                let change = match u.int_in_range(0..=2)? {
                    0 => Change::None,
                    1 => Change::Cut(u.choose_index(bytes.len())?),
                    _ => Change::Set(u.choose_index(bytes.len())?, u.arbitrary()?),
                };
                Input::Built {
                    bytes,
                    model,
                    change,
                }
            }
        })
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Bytes(bytes) => {
            let _ = decode_pgoutput(&bytes);
        }
        Input::Built {
            mut bytes,
            model,
            change,
        } => match change {
            Change::None => assert_eq!(decode_pgoutput(&bytes), Ok(model)),
            Change::Cut(len) => {
                let cut = decode_pgoutput(&bytes[..len]);
                if model.get("Other").is_some() && len > 0 {
                    assert_eq!(cut, Ok(model));
                } else {
                    assert!(cut.is_err(), "{len}: {cut:?}");
                }
            }
            Change::Set(at, byte) => {
                bytes[at] = byte;
                let _ = decode_pgoutput(&bytes);
            }
        },
        Input::Value { type_oid, text } => {
            let value = pgoutput_value_json(type_oid, &text);
            match type_oid {
                16 => match text.as_str() {
                    "t" => assert_eq!(value, Value::Bool(true)),
                    "f" => assert_eq!(value, Value::Bool(false)),
                    _ => assert_eq!(value, Value::String(text)),
                },
                20 | 21 | 23 => match text.parse::<i64>() {
                    Ok(n) => assert_eq!(value, Value::from(n)),
                    Err(_) => assert_eq!(value, Value::String(text)),
                },
                26 => match text.parse::<u32>() {
                    Ok(n) => assert_eq!(value, Value::from(n)),
                    Err(_) => assert_eq!(value, Value::String(text)),
                },
                700 | 701 | 1700 => match value {
                    Value::Number(n) => {
                        let f = n.as_f64().expect("a float");
                        assert!(f.is_finite());
                        assert_eq!(text.parse::<f64>().ok(), Some(f));
                    }
                    Value::String(s) => {
                        assert!(!text.parse::<f64>().is_ok_and(f64::is_finite), "{s:?}");
                        assert_eq!(s, text);
                    }
                    other => panic!("{other:?}"),
                },
                114 | 3802 => match serde_json::from_str::<Value>(&text) {
                    Ok(parsed) => assert_eq!(value, parsed),
                    Err(_) => assert_eq!(value, Value::String(text)),
                },
                _ => assert_eq!(value, Value::String(text)),
            }
        }
    }
});
