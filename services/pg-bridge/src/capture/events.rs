//! From decoded pgoutput messages to `/live` table events, without I/O.
//!
//! [`Transactions`] gathers the slot's messages into committed transactions (pgoutput
//! sends a transaction only once it committed, whole, in commit order); each change keeps its
//! position (commit LSN, index in the transaction), which orders events and lets gateways drop
//! the ones a new leader publishes again. [`Table`] turns a change's tuples into the row's
//! JSON and its primary key.
//!
//! Rows: each column's text value as PostgREST shows it (`pgoutput::to_json`). An UPDATE that
//! leaves a large (TOASTed) column unchanged does not carry it; it is taken from the old row,
//! which a table with `REPLICA IDENTITY FULL` sends whole (the capture sets that where it
//! may), and left out otherwise.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::pgoutput::{Datum, Message, Oid, Relation, Tuple};

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Create,
    Update,
    Delete,
}

impl Kind {
    pub(crate) fn event(self) -> &'static str {
        match self {
            Kind::Create => "create",
            Kind::Update => "update",
            Kind::Delete => "delete",
        }
    }
}

/// One row change of a committed transaction.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RowChange {
    pub(crate) relation: Oid,
    pub(crate) kind: Kind,
    pub(crate) old: Option<Tuple>,
    pub(crate) new: Option<Tuple>,
    /// `(commit LSN, index in the transaction)`.
    pub(crate) position: (u64, u64),
}

/// The committed transactions read from the slot, in commit order, and the one being read.
#[derive(Debug, Default)]
pub(crate) struct Transactions {
    /// Row changes of complete transactions.
    pub(crate) changes: Vec<RowChange>,
    /// The relations described since the last [`Transactions::take`], by oid (latest
    /// description).
    pub(crate) relations: HashMap<Oid, Relation>,
    /// The end LSN of the last complete transaction: where the slot may advance to.
    pub(crate) end_lsn: Option<u64>,
    /// Changes of the transaction being read, not yet committed.
    open: Vec<RowChange>,
    /// A Begin was read and its Commit not yet.
    reading: bool,
    index: u64,
}

impl Transactions {
    /// The complete transactions read so far (and the relations described), leaving the
    /// transaction being read.
    pub(crate) fn take(&mut self) -> Transactions {
        Transactions {
            changes: std::mem::take(&mut self.changes),
            relations: std::mem::take(&mut self.relations),
            end_lsn: self.end_lsn.take(),
            ..Transactions::default()
        }
    }

    /// Whether a transaction was begun and not committed yet.
    pub(crate) fn in_transaction(&self) -> bool {
        self.reading
    }

    /// Whether nothing was read since the last [`Transactions::take`].
    pub(crate) fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.relations.is_empty() && self.end_lsn.is_none()
    }

    /// Adds the next message.
    pub(crate) fn push(&mut self, message: Message) {
        let change = |relation, kind, old, new| RowChange {
            relation,
            kind,
            old,
            new,
            position: (0, 0),
        };
        let row = match message {
            Message::Begin { .. } => {
                self.open.clear();
                self.reading = true;
                self.index = 0;
                return;
            }
            Message::Commit {
                commit_lsn,
                end_lsn,
                ..
            } => {
                for mut c in self.open.drain(..) {
                    c.position.0 = commit_lsn;
                    self.changes.push(c);
                }
                self.reading = false;
                self.end_lsn = Some(end_lsn);
                return;
            }
            Message::Relation(r) => {
                self.relations.insert(r.oid, r);
                return;
            }
            Message::Insert { relation, new } => change(relation, Kind::Create, None, Some(new)),
            Message::Update { relation, old, new } => {
                change(relation, Kind::Update, old, Some(new))
            }
            Message::Delete { relation, old } => change(relation, Kind::Delete, Some(old), None),
            Message::Truncate { .. } | Message::Other(_) => return,
        };
        let mut row = row;
        row.position.1 = self.index;
        self.index += 1;
        self.open.push(row);
    }
}

/// A captured table as the events need it.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    /// The topic.
    pub(crate) topic: String,
    /// The table's own name (an event's `data.type`).
    pub(crate) name: String,
    /// `"schema"."table"`.
    pub(crate) qualified: String,
    /// The columns, as the last Relation message described them.
    pub(crate) relation: Relation,
    /// The primary key: column indexes in `relation` and SQL type names; empty without one.
    pub(crate) key: Vec<(usize, String)>,
    /// Each column's SQL type name, in `relation`'s order (empty when the catalog and the
    /// Relation message disagree, e.g. during an ALTER TABLE).
    pub(crate) types: Vec<String>,
}

impl Table {
    /// What a change shows of column `i`: the new row's value (an unchanged large value from
    /// the old row), or the old row's for a delete; `None` when it was not sent.
    fn datum<'c>(&self, change: &'c RowChange, i: usize) -> Option<&'c Datum> {
        let (main, fallback) = match change.kind {
            Kind::Delete => (change.old.as_ref(), None),
            _ => (change.new.as_ref(), change.old.as_ref()),
        };
        match main?.get(i) {
            Some(Datum::UnchangedToast) => fallback.and_then(|old| old.get(i)),
            other => other,
        }
        .filter(|d| !matches!(d, Datum::UnchangedToast))
    }

    /// The row a change shows (columns not sent and not in a whole old row are left out).
    pub(crate) fn row(&self, change: &RowChange) -> Map<String, Value> {
        let mut row = Map::new();
        for (i, column) in self.relation.columns.iter().enumerate() {
            let value = match self.datum(change, i) {
                Some(Datum::Text(t)) => super::pgoutput::to_json(column.type_oid, t),
                Some(_) => Value::Null,
                None => continue,
            };
            row.insert(column.name.clone(), value);
        }
        row
    }

    /// Whether the change shows every column (a value not sent, an unchanged large value
    /// without a whole old row, is missing).
    pub(crate) fn complete(&self, change: &RowChange) -> bool {
        (0..self.relation.columns.len()).all(|i| self.datum(change, i).is_some())
    }

    /// The text value of each column the change shows (`None`: NULL, or not sent and no whole
    /// old row to take it from).
    pub(crate) fn texts(&self, change: &RowChange) -> Vec<Option<String>> {
        (0..self.relation.columns.len())
            .map(|i| self.text(change, i).map(str::to_owned))
            .collect()
    }

    /// The text value of column `i` the change shows, as [`Table::texts`].
    pub(crate) fn text<'c>(&self, change: &'c RowChange, i: usize) -> Option<&'c str> {
        match self.datum(change, i) {
            Some(Datum::Text(t)) => Some(t.as_str()),
            _ => None,
        }
    }

    /// The primary key's text values, or `None` (no primary key, or a key column missing).
    pub(crate) fn key_of(&self, change: &RowChange) -> Option<Vec<String>> {
        if self.key.is_empty() {
            return None;
        }
        let tuple = match change.kind {
            Kind::Delete => change.old.as_ref(),
            _ => change.new.as_ref(),
        }?;
        self.key
            .iter()
            .map(|(i, _)| match tuple.get(*i) {
                Some(Datum::Text(t)) => Some(t.clone()),
                Some(Datum::UnchangedToast) => match change.old.as_ref()?.get(*i) {
                    Some(Datum::Text(t)) => Some(t.clone()),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    /// The event frame sockets get: the whole row, or (`whole` false, a delete) the id only.
    pub(crate) fn frame(&self, change: &RowChange, key: Option<&[String]>, whole: bool) -> String {
        let id = key.map_or(Value::Null, |k| Value::from(k.join(",")));
        let mut data = json!({"type": self.name, "id": id});
        if whole || change.kind != Kind::Delete {
            data["attributes"] = Value::Object(self.row(change));
        }
        json!({
            "type": "event",
            "topic": self.topic,
            "event": change.kind.event(),
            "data": data,
        })
        .to_string()
    }
}

/// Tables by relation oid, shared by the batches of one capture session.
pub(crate) type Tables = HashMap<Oid, Arc<Table>>;

#[cfg(test)]
mod tests {
    use super::super::pgoutput::Column;
    use super::*;

    fn table() -> Table {
        let col = |name: &str, type_oid: u32| Column {
            name: name.into(),
            type_oid,
            key: false,
        };
        Table {
            topic: "orders".into(),
            name: "orders".into(),
            qualified: "\"public\".\"orders\"".into(),
            relation: Relation {
                oid: 7,
                schema: "public".into(),
                table: "orders".into(),
                replica_identity: b'f',
                columns: vec![col("id", 20), col("note", 25), col("big", 25)],
            },
            key: vec![(0, "bigint".into())],
            types: vec!["bigint".into(), "text".into(), "text".into()],
        }
    }

    fn text(s: &str) -> Datum {
        Datum::Text(s.into())
    }

    #[test]
    fn changes_get_their_commit_position_in_order() {
        let mut t = Transactions::default();
        t.push(Message::Begin {
            final_lsn: 100,
            commit_time_us: 0,
            xid: 1,
        });
        t.push(Message::Insert {
            relation: 7,
            new: vec![text("1"), Datum::Null, text("x")],
        });
        t.push(Message::Delete {
            relation: 7,
            old: vec![text("1"), Datum::Null, text("x")],
        });
        // Nothing counts before the commit.
        assert!(t.changes.is_empty());
        t.push(Message::Commit {
            commit_lsn: 100,
            end_lsn: 120,
            commit_time_us: 0,
        });
        t.push(Message::Begin {
            final_lsn: 200,
            commit_time_us: 0,
            xid: 2,
        });
        t.push(Message::Insert {
            relation: 7,
            new: vec![text("2"), Datum::Null, text("y")],
        });
        let positions: Vec<_> = t.changes.iter().map(|c| (c.kind, c.position)).collect();
        assert_eq!(
            positions,
            [(Kind::Create, (100, 0)), (Kind::Delete, (100, 1))]
        );
        // The open transaction does not move the slot.
        assert_eq!(t.end_lsn, Some(120));
    }

    #[test]
    fn unchanged_large_values_come_from_the_old_row() {
        let t = table();
        let change = RowChange {
            relation: 7,
            kind: Kind::Update,
            old: Some(vec![text("5"), text("a"), text("huge")]),
            new: Some(vec![text("5"), text("b"), Datum::UnchangedToast]),
            position: (1, 0),
        };
        assert_eq!(
            serde_json::from_str::<Value>(&t.frame(&change, Some(&["5".into()]), false)).unwrap(),
            json!({"type":"event","topic":"orders","event":"update",
                   "data":{"type":"orders","id":"5","attributes":{"id":5,"note":"b","big":"huge"}}})
        );
        let without_old = RowChange {
            old: None,
            ..change
        };
        assert_eq!(
            Value::Object(t.row(&without_old)),
            json!({"id": 5, "note": "b"})
        );
    }

    #[test]
    fn a_delete_shows_the_id_or_the_whole_old_row() {
        let t = table();
        let change = RowChange {
            relation: 7,
            kind: Kind::Delete,
            old: Some(vec![text("9"), Datum::Null, text("z")]),
            new: None,
            position: (1, 0),
        };
        let key = t.key_of(&change).unwrap();
        assert_eq!(key, ["9"]);
        let frame = |whole| serde_json::from_str::<Value>(&t.frame(&change, Some(&key), whole));
        assert_eq!(
            frame(false).unwrap()["data"],
            json!({"type":"orders","id":"9"})
        );
        assert_eq!(
            frame(true).unwrap()["data"]["attributes"],
            json!({"id": 9, "note": null, "big": "z"})
        );
    }
}
