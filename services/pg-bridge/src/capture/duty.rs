//! The capture loop the leader runs beside LISTEN: read committed changes from the slot, check
//! what each permission class may see, publish, then move the slot.
//!
//! One batch: `pg_logical_slot_peek_binary_changes` (at most [`PEEK_CHANGES`] messages, whole
//! transactions) -> for each table and each class reading it, one visibility query over the
//! batch's rows (`SET LOCAL ROLE`, `request.jwt.claims`, `SELECT key ... WHERE key IN (...)`,
//! in a read-only transaction) -> each visible event published to the class's subject, in
//! commit order, with its position -> NATS flushed -> `pg_replication_slot_advance` past the
//! batch. A leader that dies before the advance leaves the batch in the slot for the next one
//! (gateways drop what they already passed on), so nothing committed is lost or shown twice.
//!
//! Classes without the capture's check: `all` classes (admins, BYPASSRLS) see every row and a
//! delete's whole old row; for other classes a deleted row cannot be checked any more, so
//! every class of the table (each may SELECT it) gets the delete with its id only. Visibility
//! is that of the row as it is when the batch is checked (milliseconds after its commit): a
//! row changed again meanwhile is checked in its newer state, and a row deleted meanwhile is
//! not shown to classes that need the check.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client as Nats, HeaderMap};
use bytes::Bytes;
use pgws_config::DbConfig;
use pgws_proto::{headers, LiveClass, Subjects};
use tokio::sync::watch;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config};
use tokio_util::sync::CancellationToken;

use super::events::{Kind, RowChange, Table, Tables, Transactions};
use super::pgoutput::{self, Relation};
use crate::config::TablePattern;
use crate::db::{self, quote_ident};
use crate::live_tables::{self, TableTopic};
use crate::metrics::BridgeMetrics;

/// Most messages one peek returns (it stops at the first commit after that many).
const PEEK_CHANGES: i32 = 5000;
/// The pause after a peek that found nothing.
const IDLE_POLL: Duration = Duration::from_millis(20);
/// How often an idle slot is moved to the WAL position read before an empty peek, so that it
/// does not hold WAL written for other databases.
const IDLE_ADVANCE: Duration = Duration::from_secs(5);

/// The classes the gateways report, as the leader's registry knows them.
pub(crate) type Classes = watch::Receiver<Arc<Vec<LiveClass>>>;

/// The capture's settings and handles.
#[derive(Debug)]
pub(crate) struct Capture {
    pub(crate) pg: Config,
    pub(crate) slot: String,
    pub(crate) patterns: Vec<TablePattern>,
    pub(crate) subjects: Subjects,
    pub(crate) nats: Nats,
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
        let mut tables = Tables::new();
        let mut idle_since = tokio::time::Instant::now();
        loop {
            if token.is_cancelled() {
                return Ok(());
            }
            let before: String = client
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await?
                .get(0);
            let rows = client
                .query(
                    "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2,
                       'proto_version', '1', 'publication_names', $3)",
                    &[&self.slot, &PEEK_CHANGES, &self.slot],
                )
                .await?;
            if rows.is_empty() {
                if idle_since.elapsed() >= IDLE_ADVANCE {
                    self.advance(client, &before).await?;
                    idle_since = tokio::time::Instant::now();
                }
                pause(token, IDLE_POLL).await;
                continue;
            }
            idle_since = tokio::time::Instant::now();
            let mut batch = Transactions::default();
            for row in &rows {
                let data: &[u8] = row.get(0);
                match pgoutput::decode(data) {
                    Ok(m) => batch.push(m),
                    Err(e) => anyhow::bail!("undecodable change: {e}"),
                }
            }
            for relation in batch.relations.values() {
                self.describe(client, &by_oid, relation, &mut tables)
                    .await?;
            }
            let snapshot = Arc::clone(&classes.borrow());
            self.publish(client, &batch.changes, &tables, &snapshot)
                .await?;
            self.metrics
                .capture_changes
                .inc_by(batch.changes.len() as u64);
            if let Some(end) = batch.end_lsn {
                self.nats.flush().await?;
                self.advance(client, &pgoutput::format_lsn(end)).await?;
            }
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
            }),
        );
        Ok(())
    }

    /// Publishes what each class may see of `changes`, in order.
    async fn publish(
        &self,
        client: &mut Client,
        changes: &[RowChange],
        tables: &Tables,
        classes: &[LiveClass],
    ) -> anyhow::Result<()> {
        // Per class: its subject and the keys it may see (None: everything).
        let mut plans: Vec<Plan<'_>> = Vec::new();
        let mut by_topic: HashMap<&str, Vec<usize>> = HashMap::new();
        for (oid, table) in tables {
            let keys: Vec<Vec<String>> = changes
                .iter()
                .filter(|c| c.relation == *oid && c.kind != Kind::Delete)
                .filter_map(|c| table.key_of(c))
                .collect();
            let readers = classes.iter().filter(|c| c.topic == table.topic);
            for class in readers {
                let visible = if class.all {
                    None
                } else if keys.is_empty() {
                    Some(HashSet::new())
                } else {
                    self.metrics.capture_checks.inc();
                    match visible(client, table, class, &keys).await {
                        Ok(v) => Some(v),
                        Err(e) => {
                            tracing::warn!(
                                topic = %table.topic,
                                role = %class.role,
                                error = %e,
                                "visibility check failed: the class gets none of this batch"
                            );
                            Some(HashSet::new())
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
        for change in changes {
            let Some(table) = tables.get(&change.relation) else {
                continue;
            };
            let Some(readers) = by_topic.get(table.topic.as_str()) else {
                continue;
            };
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
                        (Some(k), Some(v)) => change.kind == Kind::Delete || v.contains(k),
                        _ => false,
                    };
                    if !seen {
                        continue;
                    }
                    partial.get_or_insert_with(|| {
                        Bytes::from(table.frame(change, key.as_deref(), false))
                    })
                };
                let mut h = HeaderMap::new();
                h.insert(headers::CHANGE, position.as_str());
                self.nats
                    .publish_with_headers(subject.clone(), h, frame.clone())
                    .await?;
                self.metrics.capture_events.inc();
            }
        }
        Ok(())
    }

    async fn advance(&self, client: &Client, lsn: &str) -> anyhow::Result<()> {
        client
            .query_one(
                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                &[&self.slot, &lsn],
            )
            .await?;
        Ok(())
    }
}

/// A class reading a batch: its subject, and the keys it may see (`None`: every row).
type Plan<'a> = (&'a LiveClass, String, Option<HashSet<Vec<String>>>);

/// The keys of `keys` that `class` may SELECT now.
async fn visible(
    client: &mut Client,
    table: &Table,
    class: &LiveClass,
    keys: &[Vec<String>],
) -> Result<HashSet<Vec<String>>, tokio_postgres::Error> {
    let columns: Vec<String> = table
        .key
        .iter()
        .map(|(i, _)| format!("t.{}", quote_ident(&table.relation.columns[*i].name)))
        .collect();
    let casts: Vec<String> = table
        .key
        .iter()
        .enumerate()
        .map(|(n, (_, ty))| format!("u.c{n}::{ty} AS c{n}"))
        .collect();
    let names: Vec<String> = (0..table.key.len()).map(|n| format!("c{n}")).collect();
    let arrays: Vec<String> = (1..=table.key.len())
        .map(|n| format!("${n}::text[]"))
        .collect();
    // The keys are cast in a subquery the planner keeps apart (OFFSET 0): a cast from text is
    // not leakproof, so in the join clause itself row-level security would keep it from the
    // primary key's index and every check would scan the whole table.
    let sql = format!(
        "SELECT {} FROM {} t WHERE ({}) IN \
           (SELECT {} FROM (SELECT {} FROM unnest({}) AS u({}) OFFSET 0) k)",
        columns
            .iter()
            .map(|c| format!("{c}::text"))
            .collect::<Vec<_>>()
            .join(", "),
        table.qualified,
        columns.join(", "),
        names
            .iter()
            .map(|c| format!("k.{c}"))
            .collect::<Vec<_>>()
            .join(", "),
        casts.join(", "),
        arrays.join(", "),
        names.join(", "),
    );
    let params: Vec<Vec<&str>> = (0..table.key.len())
        .map(|n| keys.iter().map(|k| k[n].as_str()).collect())
        .collect();
    let params: Vec<&(dyn ToSql + Sync)> =
        params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
    let tx = client.build_transaction().read_only(true).start().await?;
    tx.batch_execute(&format!("SET LOCAL ROLE {}", quote_ident(&class.role)))
        .await?;
    tx.execute(
        "SELECT set_config('request.jwt.claims', $1, true)",
        &[&class.claims],
    )
    .await?;
    let rows = tx.query(&sql, &params).await?;
    tx.commit().await?;
    Ok(rows
        .iter()
        .map(|r| {
            (0..table.key.len())
                .map(|n| r.get::<_, String>(n))
                .collect()
        })
        .collect())
}

async fn pause(token: &CancellationToken, delay: Duration) {
    tokio::select! {
        _ = token.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}
