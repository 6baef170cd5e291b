//! The capture loop the leader runs beside LISTEN: stream committed changes from the slot,
//! check what each permission class may see, publish, then confirm.
//!
//! The slot's changes arrive as the server decodes them ([`super::replication`]: the streaming
//! replication protocol, no polling); they are read ahead while a batch is published. One
//! batch: the whole transactions that arrived (at most about [`BATCH_CHANGES`] messages) ->
//! for each table and each class reading it, one visibility check over the batch's rows
//! ([`super::visibility`]) -> each visible event published to the class's subject, in commit
//! order, with its position -> the bus flushed -> the batch's end confirmed to the server. A
//! leader that dies before the confirmation leaves the batch in the slot: the next leader's
//! stream starts with it again (gateways drop what they already passed on), so nothing
//! committed is lost or shown twice. When the stream is idle the server's keepalive says how
//! far it read, and the slot is confirmed there, so it keeps no WAL written for other
//! databases.
//!
//! Classes without a check: `all` classes (admins, BYPASSRLS) see every row and a delete's
//! whole old row. A deleted row cannot be checked any more, so every class of the table (each
//! may SELECT it) gets the delete with its id only. A row that still exists is checked as it is
//! when the batch is read (milliseconds after its commit); one that no longer exists by its
//! committed values.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pgws_bus::{Client as Bus, Headers};
use pgws_config::DbConfig;
use pgws_proto::{headers, LiveClass, Subjects};
use tokio::sync::{mpsc, watch};
use tokio_postgres::{Client, Config};
use tokio_util::sync::CancellationToken;

use super::events::{Kind, RowChange, Table, Tables, Transactions};
use super::pgoutput::{self, Relation};
use super::replication::{self, Frame};
use super::visibility::{self, Vanished, Visible};
use crate::config::TablePattern;
use crate::db::{self, quote_ident};
use crate::live_tables::{self, TableTopic};
use crate::metrics::BridgeMetrics;
use crate::routing;

/// Most messages in one batch (it ends at the first commit after that many).
const BATCH_CHANGES: usize = 5000;
/// Frames read ahead of the batch being published.
const READ_AHEAD: usize = 2 * BATCH_CHANGES;
/// How often the confirmed position is sent when nothing else is (the server's
/// `wal_sender_timeout` is 60 s by default).
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// The classes the gateways report, as the leader's registry knows them.
pub(crate) type Classes = watch::Receiver<Arc<Vec<LiveClass>>>;

/// The capture's settings and handles.
#[derive(Debug)]
pub(crate) struct Capture {
    pub(crate) pg: Config,
    pub(crate) slot: String,
    pub(crate) patterns: Vec<TablePattern>,
    pub(crate) subjects: Subjects,
    pub(crate) bus: Bus,
    pub(crate) metrics: BridgeMetrics,
    /// How long a new leader waits for the gateways' reports before reading the slot.
    pub(crate) settle: Duration,
}

impl Capture {
    /// Runs while this bridge leads (the caller drops it when leadership ends); failures are
    /// logged and retried.
    pub(crate) async fn run(&self, classes: Classes, token: &CancellationToken) -> Infallible {
        // Until the gateways reported, the classes are unknown: changes wait in the slot.
        let settled = tokio::time::Instant::now() + self.settle;
        let mut attempt = 0;
        loop {
            if token.is_cancelled() {
                // The leader's session ends with shutdown and drops this future.
                return std::future::pending().await;
            }
            match self.session(&classes, token, &mut attempt, settled).await {
                Ok(()) => attempt = 0,
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "change capture failed; retrying")
                }
            }
            pause(token, DbConfig::backoff(attempt)).await;
            attempt = attempt.saturating_add(1).min(5);
        }
    }

    /// One connection's life; returns when the connection fails or nothing is captured.
    async fn session(
        &self,
        classes: &Classes,
        token: &CancellationToken,
        attempt: &mut u32,
        settled: tokio::time::Instant,
    ) -> anyhow::Result<()> {
        let (mut client, connection) = db::connect(&self.pg).await?;
        let driver = async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "capture connection lost");
            }
        };
        tokio::select! {
            () = driver => anyhow::bail!("capture connection closed"),
            r = self.capture(&mut client, classes, token, attempt, settled) => r,
        }
    }

    async fn capture(
        &self,
        client: &mut Client,
        classes: &Classes,
        token: &CancellationToken,
        attempt: &mut u32,
        settled: tokio::time::Instant,
    ) -> anyhow::Result<()> {
        let topics = live_tables::resolve(client, &self.patterns).await?;
        if topics.is_empty() {
            anyhow::bail!("PGWS_TABLE_TOPICS names no existing table");
        }
        self.prepare(client, &topics).await?;
        tracing::info!(
            slot = %self.slot,
            tables = topics.len(),
            "capturing table changes"
        );
        *attempt = 0;
        // The slot exists (changes from now on are kept); read it once the classes are known.
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep_until(settled) => {}
        }
        let by_oid: HashMap<u32, TableTopic> = topics.into_iter().map(|t| (t.oid, t)).collect();
        let (mut changes, mut feedback) = replication::start(&self.pg, &self.slot).await?;
        // Read ahead while a batch is checked and published: the server sends as it decodes.
        let (tx, mut frames) = mpsc::channel(READ_AHEAD);
        let reading = async move {
            loop {
                let frame = changes.next().await?;
                if tx.send(frame).await.is_err() {
                    return anyhow::Ok(());
                }
            }
        };
        let following = async {
            let mut tables = Tables::new();
            let mut specs = routing::Specs::default();
            let mut read = Transactions::default();
            // Everything before this was published (or holds nothing captured).
            let mut confirmed = 0u64;
            loop {
                let first = tokio::select! {
                    _ = token.cancelled() => return Ok(()),
                    f = frames.recv() => f,
                    _ = tokio::time::sleep(STATUS_EVERY) => {
                        feedback.confirm(confirmed).await?;
                        continue;
                    }
                };
                let Some(first) = first else {
                    return Ok(());
                };
                let Gathered { idle_end, reply } = gather(first, &mut frames, &mut read)?;
                let batch = read.take();
                if !batch.is_empty() {
                    for relation in batch.relations.values() {
                        self.describe(client, &by_oid, relation, &mut tables)
                            .await?;
                    }
                    let snapshot = Arc::clone(&classes.borrow());
                    self.publish(client, &mut specs, &batch.changes, &tables, &snapshot)
                        .await?;
                    self.metrics
                        .capture_changes
                        .inc_by(batch.changes.len() as u64);
                }
                let mut moved = false;
                if let Some(end) = batch.end_lsn {
                    self.bus.flush().await?;
                    confirmed = confirmed.max(end);
                    moved = true;
                }
                // The server sent everything before a keepalive: with no transaction half
                // read, the slot may move there (it then keeps no WAL written for other
                // databases or tables).
                if let Some(end) = idle_end.filter(|_| !read.in_transaction()) {
                    if end > confirmed {
                        confirmed = end;
                        moved = true;
                    }
                }
                if moved || reply {
                    feedback.confirm(confirmed).await?;
                }
            }
        };
        tokio::select! {
            r = reading => r.and_then(|()| anyhow::bail!("the replication stream ended")),
            r = following => r,
        }
    }

    /// The publication (the configured tables), whole old rows, and the slot.
    async fn prepare(&self, client: &Client, topics: &[TableTopic]) -> anyhow::Result<()> {
        let list = topics
            .iter()
            .map(TableTopic::qualified)
            .collect::<Vec<_>>()
            .join(", ");
        let name = quote_ident(&self.slot);
        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&self.slot],
            )
            .await?
            .is_some();
        let ddl = if exists {
            format!("ALTER PUBLICATION {name} SET TABLE {list}")
        } else {
            format!("CREATE PUBLICATION {name} FOR TABLE {list}")
        };
        if let Err(e) = client.batch_execute(&ddl).await {
            if !exists {
                return Err(anyhow::Error::new(e).context("cannot create the publication"));
            }
            tracing::warn!(error = %e, "cannot update the publication; it is used as it is");
        }
        for t in topics {
            let full: bool = client
                .query_one(
                    "SELECT relreplident = 'f' FROM pg_class WHERE oid = $1::oid",
                    &[&t.oid],
                )
                .await?
                .get(0);
            if !full {
                let alter = format!("ALTER TABLE {} REPLICA IDENTITY FULL", t.qualified());
                if let Err(e) = client.batch_execute(&alter).await {
                    tracing::warn!(
                        table = %t.topic,
                        error = %e,
                        "REPLICA IDENTITY FULL not set: deletes show only the key to admins, \
                         updates leave out unchanged large values"
                    );
                }
            }
        }
        let slot = client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await?;
        if slot.is_none() {
            client
                .query_one(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&self.slot],
                )
                .await
                .map_err(|e| {
                    anyhow::Error::new(e).context(
                        "cannot create the replication slot (wal_level=logical and the \
                         REPLICATION attribute are needed)",
                    )
                })?;
            tracing::info!(slot = %self.slot, "replication slot created");
        }
        Ok(())
    }

    /// Learns (or refreshes) a captured table from its Relation message.
    async fn describe(
        &self,
        client: &Client,
        by_oid: &HashMap<u32, TableTopic>,
        relation: &Relation,
        tables: &mut Tables,
    ) -> anyhow::Result<()> {
        if tables
            .get(&relation.oid)
            .is_some_and(|t| t.relation == *relation)
        {
            return Ok(());
        }
        let Some(topic) = by_oid.get(&relation.oid) else {
            return Ok(());
        };
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
                   FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                  WHERE i.indrelid = $1::oid AND i.indisprimary
                  ORDER BY array_position(i.indkey::int2[], a.attnum)",
                &[&relation.oid],
            )
            .await?;
        let mut key = Vec::new();
        for row in &rows {
            let name: String = row.get(0);
            if let Some(i) = relation.columns.iter().position(|c| c.name == name) {
                key.push((i, row.get::<_, String>(1)));
            }
        }
        let columns = client
            .query(
                "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
                  WHERE attrelid = $1::oid AND attnum > 0 AND NOT attisdropped",
                &[&relation.oid],
            )
            .await?;
        let by_name: HashMap<String, String> = columns
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        let types: Vec<String> = relation
            .columns
            .iter()
            .filter_map(|c| by_name.get(&c.name).cloned())
            .collect();
        if key.len() != rows.len() || key.is_empty() {
            tracing::warn!(
                table = %topic.topic,
                "no primary key: only admins see this table's events"
            );
            key.clear();
        }
        tables.insert(
            relation.oid,
            Arc::new(Table {
                topic: topic.topic.clone(),
                name: topic.table.clone(),
                qualified: topic.qualified(),
                relation: relation.clone(),
                key,
                types,
            }),
        );
        Ok(())
    }

    /// Publishes what each class may see of `changes`, in order.
    async fn publish(
        &self,
        client: &mut Client,
        specs: &mut routing::Specs,
        changes: &[RowChange],
        tables: &Tables,
        classes: &[LiveClass],
    ) -> anyhow::Result<()> {
        // Per class: its subject and what it may see (None: everything).
        let mut plans: Vec<Plan<'_>> = Vec::new();
        let mut by_topic: HashMap<&str, Vec<usize>> = HashMap::new();
        // Routed classes: per change, the subjects of the classes that may see it.
        let mut routed: HashMap<usize, Vec<Arc<str>>> = HashMap::new();
        for (oid, table) in tables {
            let readers: Vec<&LiveClass> =
                classes.iter().filter(|c| c.topic == table.topic).collect();
            if readers.is_empty() {
                continue;
            }
            let (by_value, mut readers): (Vec<&LiveClass>, Vec<&LiveClass>) = readers
                .into_iter()
                .partition(|c| c.route.is_some() && !c.all);
            // Routed classes that cannot be routed in this batch are checked one by one.
            readers.extend(
                self.route(client, specs, changes, *oid, table, &by_value, &mut routed)
                    .await?,
            );
            if readers.is_empty() {
                continue;
            }
            // This table's creates and updates, by index in the batch, with their keys.
            let written: Vec<(usize, &RowChange, Vec<String>)> = changes
                .iter()
                .enumerate()
                .filter(|(_, c)| c.relation == *oid && c.kind != Kind::Delete)
                .filter_map(|(i, c)| table.key_of(c).map(|k| (i, c, k)))
                .collect();
            let keys: Vec<Vec<String>> = written.iter().map(|(_, _, k)| k.clone()).collect();
            let checked = readers.iter().any(|c| !c.all) && !keys.is_empty();
            // Rows created or updated in the batch and gone since: checked by their values.
            let mut vanished: Vec<Vanished> = Vec::new();
            if checked {
                let exist = visibility::existing(client, table, &keys).await?;
                vanished = written
                    .iter()
                    .filter(|(_, _, k)| !exist.contains(k))
                    .map(|(i, c, _)| (*i as i64, table.texts(c)))
                    .collect();
            }
            for class in readers {
                let visible = if class.all {
                    None
                } else if keys.is_empty() {
                    Some(Visible::default())
                } else {
                    self.metrics.capture_checks.inc();
                    match visibility::check(client, table, class, &keys, &vanished).await {
                        Ok(v) => Some(v),
                        Err(e) => {
                            tracing::warn!(
                                topic = %table.topic,
                                role = %class.role,
                                error = %e,
                                "visibility check failed: the class gets none of this batch"
                            );
                            Some(Visible::default())
                        }
                    }
                };
                by_topic
                    .entry(table.topic.as_str())
                    .or_default()
                    .push(plans.len());
                plans.push((class, self.subjects.table(class), visible));
            }
        }
        let (no_readers, no_targets) = (Vec::new(), Vec::new());
        for (index, change) in changes.iter().enumerate() {
            let Some(table) = tables.get(&change.relation) else {
                continue;
            };
            let readers = by_topic.get(table.topic.as_str()).unwrap_or(&no_readers);
            let targets = routed.get(&index).unwrap_or(&no_targets);
            if readers.is_empty() && targets.is_empty() {
                continue;
            }
            let key = table.key_of(change);
            let position = headers::change(change.position.0, change.position.1);
            let (mut whole, mut partial) = (None, None);
            for &i in readers {
                let (class, subject, visible) = &plans[i];
                let frame = if class.all {
                    whole.get_or_insert_with(|| {
                        Bytes::from(table.frame(change, key.as_deref(), true))
                    })
                } else {
                    let seen = match (&key, visible) {
                        (Some(k), Some(v)) => {
                            change.kind == Kind::Delete
                                || v.keys.contains(k)
                                || v.vanished.contains(&(index as i64))
                        }
                        _ => false,
                    };
                    if !seen {
                        continue;
                    }
                    partial.get_or_insert_with(|| {
                        Bytes::from(table.frame(change, key.as_deref(), false))
                    })
                };
                self.send(subject, &position, frame).await?;
            }
            if key.is_some() {
                for subject in targets {
                    let frame = partial.get_or_insert_with(|| {
                        Bytes::from(table.frame(change, key.as_deref(), false))
                    });
                    self.send(subject, &position, frame).await?;
                }
            }
        }
        Ok(())
    }

    async fn send(&self, subject: &str, position: &str, frame: &Bytes) -> anyhow::Result<()> {
        let mut h = Headers::new();
        h.insert(headers::CHANGE.to_owned(), position.to_owned());
        h.insert(
            headers::MSG_ID.to_owned(),
            headers::change_id(subject, position),
        );
        self.bus
            .publish_with_headers(subject, h, frame.clone())
            .await?;
        self.metrics.capture_events.inc();
        Ok(())
    }

    /// Routes `table`'s changes to the routed classes `by_value` ([`routing`]): for each
    /// role, the pairs of a changed row and a class whose route value is the row's, all
    /// checked in one statement; the subjects that may see each change go into `routed`.
    /// Returns the classes that cannot be routed in this batch (their role's policies changed,
    /// a row's value is missing, the statement failed): the caller checks them one by one.
    #[allow(clippy::too_many_arguments)]
    async fn route<'c>(
        &self,
        client: &mut Client,
        specs: &mut routing::Specs,
        changes: &[RowChange],
        oid: u32,
        table: &Table,
        by_value: &[&'c LiveClass],
        routed: &mut HashMap<usize, Vec<Arc<str>>>,
    ) -> anyhow::Result<Vec<&'c LiveClass>> {
        let mut fallback = Vec::new();
        let mut roles: HashMap<&str, Vec<&'c LiveClass>> = HashMap::new();
        for class in by_value {
            roles.entry(class.role.as_str()).or_default().push(class);
        }
        let mine: Vec<usize> = (0..changes.len())
            .filter(|&i| changes[i].relation == oid)
            .collect();
        if mine.is_empty() {
            // Nothing of this table in the batch: no policy to read.
            return Ok(fallback);
        }
        for (role, group) in roles {
            let spec = specs.get(&*client, oid, &table.name, role).await?;
            let column = spec.as_ref().and_then(|s| {
                table
                    .relation
                    .columns
                    .iter()
                    .position(|c| c.name == s.column)
            });
            let (Some(spec), Some(column)) = (spec, column) else {
                fallback.extend(group);
                continue;
            };
            // Creates and updates are checked by their values: each needs all of them (a
            // delete needs none).
            if table.types.len() != table.relation.columns.len()
                || mine
                    .iter()
                    .any(|&i| changes[i].kind != Kind::Delete && !table.complete(&changes[i]))
            {
                fallback.extend(group);
                continue;
            }
            let (mut matching, mut other): (Vec<&LiveClass>, Vec<&LiveClass>) = group
                .into_iter()
                .partition(|c| c.route.as_ref().is_some_and(|r| r.column == spec.column));
            fallback.append(&mut other);
            let mut index: HashMap<&str, Vec<usize>> = HashMap::new();
            for (n, class) in matching.iter().enumerate() {
                if let Some(v) = class.route.as_ref().and_then(|r| r.value.as_deref()) {
                    index.entry(v).or_default().push(n);
                }
            }
            // Pairs (change, class) to check; deletes go without a check, as for every class.
            let mut pairs: Vec<(usize, usize)> = Vec::new();
            let mut deletes: Vec<(usize, usize)> = Vec::new();
            for &i in &mine {
                let change = &changes[i];
                let value = table.text(change, column);
                let classes: Vec<usize> = match (value, change.kind) {
                    (Some(v), _) => index.get(v).cloned().unwrap_or_default(),
                    // A delete without the old row's value: every class of the role.
                    (None, Kind::Delete) if change.old.is_none() => (0..matching.len()).collect(),
                    (None, _) => Vec::new(),
                };
                for n in classes {
                    if change.kind == Kind::Delete {
                        deletes.push((i, n));
                    } else {
                        pairs.push((i, n));
                    }
                }
            }
            let seen = if pairs.is_empty() {
                Ok(Vec::new())
            } else {
                self.metrics.capture_checks.inc();
                let claims: Vec<&str> = pairs
                    .iter()
                    .map(|&(_, n)| matching[n].claims.as_str())
                    .collect();
                visibility::pairs(
                    client,
                    &mut specs.prepared,
                    table,
                    role,
                    &spec.condition,
                    changes,
                    &pairs,
                    &claims,
                )
                .await
            };
            match seen {
                Ok(seen) => {
                    let mut reached: Vec<(usize, usize)> =
                        seen.into_iter().map(|p| pairs[p]).collect();
                    reached.extend(deletes);
                    // Each class's subject once, shared by its changes.
                    let mut subjects: HashMap<usize, Arc<str>> = HashMap::new();
                    for (i, n) in reached {
                        let subject = subjects
                            .entry(n)
                            .or_insert_with(|| self.subjects.table(matching[n]).into());
                        routed.entry(i).or_default().push(Arc::clone(subject));
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        topic = %table.topic,
                        role,
                        error = %e,
                        "the routed check failed: its classes are checked one by one"
                    );
                    fallback.append(&mut matching);
                }
            }
        }
        Ok(fallback)
    }
}

/// What [`gather`] saw besides changes.
struct Gathered {
    /// The position of a keepalive that came last: the server had sent everything before it.
    idle_end: Option<u64>,
    /// The server asked for a status update.
    reply: bool,
}

/// Reads `first` and whatever else already arrived into `read`, up to about
/// [`BATCH_CHANGES`] messages (ending at a commit).
fn gather(
    first: Frame,
    frames: &mut mpsc::Receiver<Frame>,
    read: &mut Transactions,
) -> anyhow::Result<Gathered> {
    let mut seen = Gathered {
        idle_end: None,
        reply: false,
    };
    let mut frame = Some(first);
    let mut messages = 0;
    while let Some(f) = frame.take() {
        match f {
            Frame::Change { data } => {
                read.push(
                    pgoutput::decode(&data)
                        .map_err(|e| anyhow::anyhow!("undecodable change: {e}"))?,
                );
                messages += 1;
                seen.idle_end = None;
            }
            Frame::Keepalive { wal_end, reply } => {
                seen.reply |= reply;
                seen.idle_end = Some(wal_end);
            }
        }
        if messages >= BATCH_CHANGES && !read.in_transaction() {
            break;
        }
        frame = frames.try_recv().ok();
    }
    Ok(seen)
}

/// A class reading a batch: its subject, and what it may see (`None`: every row).
type Plan<'a> = (&'a LiveClass, String, Option<Visible>);

async fn pause(token: &CancellationToken, delay: Duration) {
    tokio::select! {
        _ = token.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}
