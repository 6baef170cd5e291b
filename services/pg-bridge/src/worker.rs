//! A NOTIFY worker: one PostgreSQL connection executing batches as pipelined transactions.
//!
//! Split from the intake ([`crate::notifier`]) because the two fail differently: the intake
//! deals with the bus and bad requests, a worker with a connection that can die, hang or
//! refuse a transaction. A worker offers itself only while its connection is up, reconnects with
//! backoff (1 s doubling up to 32 s, forever) and answers every request it was given once.
//!
//! Bounds: one batch at a time; a transaction has [`TX_TIMEOUT`] to commit, after which the
//! connection is abandoned (dropped, so PostgreSQL rolls back what did not commit).
//!
//! Requests whose deadline passed are answered `failed` before the batch starts; the others
//! are executed at most once each ([`crate::dedup`]), and worker 0 deletes expired keys every
//! [`CLEANUP_INTERVAL`] while it has work.
//!
//! With a [`TxAudit`] ([`crate::audit`]), each transaction also writes the audit records of
//! the messages it NOTIFYs, before its NOTIFYs, in the same pipeline: by its `COPY` when it
//! has one, and again by its statement when the `COPY` is refused.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::SinkExt;
use pgws_bus::Client as Bus;
use pgws_config::DbConfig;
use pgws_proto::{Notification, NotifyReply};
use pgws_service::telemetry::TARGET as TRACE;
use pgws_service::Shutdown;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep, timeout, Instant};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, Statement};
use tokio_util::sync::CancellationToken;

use crate::audit::{copy_refused, AuditArgs, AuditWrite, TxAudit};
use crate::batch::{audit_plan, plan, Batch, Offer, EXPIRED, UNAVAILABLE};
use crate::bus::reply;
use crate::metrics::BridgeMetrics;
use crate::{db, dedup};

/// Time a transaction has to commit before its connection is abandoned.
pub(crate) const TX_TIMEOUT: Duration = Duration::from_secs(10);
/// How often worker 0 deletes the keys of requests that can no longer arrive.
const CLEANUP_INTERVAL: Duration = Duration::from_secs(30);

/// A worker's connection; `gone` is cancelled when it ends or is abandoned.
struct Conn {
    client: Client,
    statement: Statement,
    /// The [`TxAudit`]'s statement, when the worker has one.
    audit: Option<Statement>,
    /// The [`TxAudit`]'s `COPY`, when it has one.
    copy: Option<Statement>,
    gone: CancellationToken,
}

pub(crate) struct Worker {
    id: usize,
    pg: Config,
    conn: Option<Conn>,
    up: Arc<watch::Sender<usize>>,
    bus: Bus,
    metrics: BridgeMetrics,
    shutdown: Shutdown,
    /// `PGWS_NOTIFY_DEDUP`: requests with an id are executed at most once.
    dedup: bool,
    /// Writes the requests' audit records in their transactions.
    audit: Option<Arc<dyn TxAudit>>,
    /// When worker 0 last deleted expired keys.
    cleaned: Instant,
}

impl Worker {
    /// A worker without a connection yet; `up` counts the live connections of all workers.
    pub(crate) fn new(
        id: usize,
        pg: Config,
        up: Arc<watch::Sender<usize>>,
        bus: Bus,
        metrics: BridgeMetrics,
        shutdown: Shutdown,
        dedup: bool,
    ) -> Self {
        Self {
            id,
            pg,
            conn: None,
            up,
            bus,
            metrics,
            shutdown,
            dedup,
            audit: None,
            cleaned: Instant::now(),
        }
    }

    /// The worker writing the requests' audit records with `audit`, when given.
    pub(crate) fn with_audit(mut self, audit: Option<Arc<dyn TxAudit>>) -> Self {
        self.audit = audit;
        self
    }

    /// Connects (with backoff), offers itself, executes what it is given; ends when the intake
    /// is gone, or at shutdown while it has no connection.
    pub(crate) async fn run(mut self, idle: mpsc::Sender<Offer>) {
        let token = self.shutdown.token.clone();
        let mut attempt = 0;
        loop {
            let gone = match &self.conn {
                Some(conn) if !conn.gone.is_cancelled() => conn.gone.clone(),
                _ => {
                    self.conn = None;
                    let result = tokio::select! {
                        _ = token.cancelled() => return,
                        _ = idle.closed() => return,
                        r = self.connect() => r,
                    };
                    match result {
                        Ok(conn) => {
                            attempt = 0;
                            tracing::debug!(worker = self.id, "notify connection up");
                            self.conn = Some(conn);
                        }
                        Err(e) => {
                            self.metrics.notify_errors.inc();
                            let delay = DbConfig::backoff(attempt);
                            attempt += 1;
                            tracing::warn!(worker = self.id, attempt, error = %e, "notify connection failed");
                            tokio::select! {
                                _ = token.cancelled() => return,
                                _ = idle.closed() => return,
                                _ = sleep(delay) => {}
                            }
                        }
                    }
                    continue;
                }
            };
            let (offer, batch) = oneshot::channel();
            if idle.send(offer).await.is_err() {
                return;
            }
            tokio::select! {
                batch = batch => match batch {
                    Ok(batch) => self.execute(batch).await,
                    Err(_) => return,
                },
                // The connection died while idle: withdraw the offer and reconnect.
                _ = gone.cancelled() => {}
                _ = idle.closed() => return,
            }
        }
    }

    async fn connect(&self) -> Result<Conn, tokio_postgres::Error> {
        let (client, connection) = db::connect(&self.pg).await?;
        let gone = CancellationToken::new();
        self.up.send_modify(|n| *n += 1);
        let (up, done, id) = (self.up.clone(), gone.clone(), self.id);
        self.shutdown.spawn(async move {
            tokio::select! {
                result = connection => if let Err(e) = result {
                    tracing::warn!(worker = id, error = %e, "notify connection lost");
                },
                _ = done.cancelled() => {}
            }
            up.send_modify(|n| *n = n.saturating_sub(1));
            done.cancel();
        });
        let statement = if self.dedup {
            dedup::ensure(&client).await?;
            client.prepare(dedup::NOTIFY_SQL).await?
        } else {
            client.prepare(dedup::PLAIN_NOTIFY_SQL).await?
        };
        let (audit, copy) = match &self.audit {
            Some(audit) => (
                Some(client.prepare(audit.sql()).await?),
                match audit.copy_sql() {
                    Some(sql) => Some(client.prepare(sql).await?),
                    None => None,
                },
            ),
            None => (None, None),
        };
        Ok(Conn {
            client,
            statement,
            audit,
            copy,
            gone,
        })
    }

    /// Executes a batch as few transactions as possible, answering each request once.
    async fn execute(&mut self, batch: Batch) {
        let batch = self.drop_expired(batch).await;
        self.execute_live(batch).await;
        if self.dedup && self.id == 0 && self.cleaned.elapsed() >= CLEANUP_INTERVAL {
            self.cleaned = Instant::now();
            if let Some(conn) = self.conn.as_ref().filter(|c| !c.gone.is_cancelled()) {
                match timeout(TX_TIMEOUT, dedup::cleanup(&conn.client)).await {
                    Ok(Ok(n)) => tracing::debug!(keys = n, "expired request keys deleted"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot delete expired request keys"),
                    Err(_) => tracing::warn!("deleting expired request keys timed out"),
                }
            }
        }
    }

    /// Answers the requests whose gateway has given up (they waited behind a stalled or busy
    /// worker) and returns the others.
    async fn drop_expired(&self, batch: Batch) -> Batch {
        let now = SystemTime::now();
        if !batch.requests.iter().any(|r| r.expired(now)) {
            return batch;
        }
        let mut live = Batch::default();
        for request in batch.requests {
            if request.expired(now) {
                self.metrics.requests_expired.inc();
                request.span.record("otel.status_code", "ERROR");
                let failed = NotifyReply::failed(EXPIRED);
                reply(&self.bus, request.reply.as_ref(), &failed).await;
            } else {
                live.push(request);
            }
        }
        live
    }

    /// How one transaction writes its `records` (nothing without records): by the `COPY`
    /// when `by_copy` and the [`TxAudit`] has one for them, else by the statement.
    fn audit_write(
        &self,
        conn: &Conn,
        records: &[Notification],
        by_copy: bool,
    ) -> Result<Option<AuditWrite>, String> {
        if records.is_empty() {
            return Ok(None);
        }
        let (Some(audit), Some(statement)) = (&self.audit, &conn.audit) else {
            return Err("the audit statement is not prepared".to_owned());
        };
        if by_copy && conn.copy.is_some() {
            if let Some(data) = audit.copy(records) {
                return Ok(Some(AuditWrite::Copy(data)));
            }
        }
        AuditArgs::new(audit.as_ref(), statement, records)
            .map(|args| Some(AuditWrite::Statement(args)))
    }

    async fn execute_live(&mut self, batch: Batch) {
        let plan = plan(batch.requests.iter().map(|r| r.notifications.as_slice()));
        // The last transaction of each request; non-decreasing, as the plan keeps order.
        let mut last = vec![0; batch.requests.len()];
        for (k, tx) in plan.iter().enumerate() {
            for &(r, _) in tx {
                last[r] = k;
            }
        }
        // `bridge.notify` per request: from here to the commit of its last transaction.
        let mut notify_spans: Vec<tracing::Span> = batch
            .requests
            .iter()
            .map(|r| {
                r.span.record("batch.requests", batch.requests.len());
                r.span.record("batch.notifications", batch.notifications);
                r.span.record("batch.transactions", plan.len());
                tracing::info_span!(
                    target: TRACE,
                    parent: &r.span,
                    "bridge.notify",
                    otel.kind = "client",
                    db.system = "postgresql",
                    db.operation.name = "NOTIFY",
                    notifications = r.notifications.len(),
                    otel.status_code = tracing::field::Empty,
                )
            })
            .collect();
        // The audit records each transaction writes, when the worker writes them.
        let audited = match &self.audit {
            Some(_) if batch.requests.iter().any(|r| !r.records.is_empty()) => {
                let requests: Vec<_> = batch
                    .requests
                    .iter()
                    .map(|r| (r.notifications.as_slice(), r.records.as_slice()))
                    .collect();
                audit_plan(&requests, &plan)
            }
            _ => Vec::new(),
        };
        let mut answered = 0;
        let mut failure: Option<String> = None;
        for (k, tx) in plan.iter().enumerate() {
            let Some(conn) = self.conn.as_ref().filter(|c| !c.gone.is_cancelled()) else {
                failure = Some("no connection".to_owned());
                break;
            };
            let records: Vec<Notification> = audited.get(k).map_or_else(Vec::new, |written| {
                written
                    .iter()
                    .map(|&(r, j)| batch.requests[r].records[j].clone())
                    .collect()
            });
            let audit = match self.audit_write(conn, &records, true) {
                Ok(audit) => audit,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            let tx = TxArgs::new(&batch, tx, self.dedup);
            let mut result = timeout(TX_TIMEOUT, notify(conn, &tx, audit.as_ref())).await;
            if let (Some(AuditWrite::Copy(_)), Ok(Err(e))) = (&audit, &result) {
                if copy_refused(e) {
                    // Rolled back: run again, the statement writing what the COPY could not.
                    tracing::debug!(worker = self.id, error = %e, "audit COPY refused, written by the statement");
                    self.metrics.audit_copy_refused.inc();
                    result = match self.audit_write(conn, &records, false) {
                        Ok(audit) => timeout(TX_TIMEOUT, notify(conn, &tx, audit.as_ref())).await,
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    };
                }
            }
            match result {
                Ok(Ok(notified)) => {
                    self.metrics.transactions.inc();
                    self.metrics.batch_size.observe(tx.channels.len() as f64);
                    let skipped = tx.channels.len() as u64 - notified.min(tx.channels.len() as u64);
                    if skipped > 0 {
                        tracing::debug!(skipped, "notifications of retried requests skipped");
                        self.metrics.duplicates.inc_by(skipped);
                    }
                }
                Ok(Err(e)) => {
                    failure = Some(e.to_string());
                    break;
                }
                Err(_) => {
                    conn.gone.cancel();
                    failure = Some(format!("no commit within {TX_TIMEOUT:?}"));
                    break;
                }
            }
            while answered < batch.requests.len() && last[answered] <= k {
                // The request's NOTIFYs are committed: its span ends.
                notify_spans[answered] = tracing::Span::none();
                self.metrics.requests_ok.inc();
                let to = batch.requests[answered].reply.as_ref();
                reply(&self.bus, to, &NotifyReply::ok()).await;
                answered += 1;
            }
        }
        if let Some(error) = failure {
            self.metrics.notify_errors.inc();
            let requests = batch.requests.len() - answered;
            tracing::warn!(
                worker = self.id,
                requests,
                error,
                "notify transaction failed"
            );
            let failed = NotifyReply::failed(UNAVAILABLE);
            for (request, span) in batch.requests[answered..]
                .iter()
                .zip(&notify_spans[answered..])
            {
                span.record("otel.status_code", "ERROR");
                request.span.record("otel.status_code", "ERROR");
                self.metrics.requests_failed.inc();
                reply(&self.bus, request.reply.as_ref(), &failed).await;
            }
        }
    }
}

/// The parameters of one transaction's statement ([`dedup::NOTIFY_SQL`]).
struct TxArgs<'a> {
    channels: Vec<&'a str>,
    payloads: Vec<&'a str>,
    /// Per notification: its request part's key, when the request has an id (empty without
    /// deduplication: the statement takes only the first two parameters then).
    keys: Vec<Option<String>>,
    /// The distinct keys and when each may be forgotten.
    new_keys: Vec<String>,
    expiries: Vec<f64>,
}

impl<'a> TxArgs<'a> {
    fn new(batch: &'a Batch, tx: &[(usize, usize)], dedup: bool) -> Self {
        let mut args = Self {
            channels: Vec::with_capacity(tx.len()),
            payloads: Vec::with_capacity(tx.len()),
            keys: Vec::with_capacity(tx.len()),
            new_keys: Vec::new(),
            expiries: Vec::new(),
        };
        // (request, key) of the part being filled: a request's part is contiguous.
        let mut part: Option<(usize, String)> = None;
        for &(r, i) in tx {
            let request = &batch.requests[r];
            let n = &request.notifications[i];
            args.channels.push(&n.channel);
            args.payloads.push(&n.payload);
            let id = request.id.as_deref().filter(|_| dedup);
            let key = id.map(|id| match &part {
                Some((pr, key)) if *pr == r => key.clone(),
                _ => {
                    let key = dedup::key(id, i);
                    args.new_keys.push(key.clone());
                    args.expiries.push(dedup::expiry(request.deadline));
                    part = Some((r, key.clone()));
                    key
                }
            });
            args.keys.push(key);
        }
        args
    }
}

/// One transaction, pipelined: the statements leave together and PostgreSQL answers in order
/// (`BEGIN`, the audit statement when the transaction writes records, the NOTIFYs, `COMMIT`).
/// With an audit `COPY`, `BEGIN` and the `COPY` leave first; its data, the NOTIFYs and
/// `COMMIT` when PostgreSQL asks for the data (the connection sends nothing else meanwhile).
/// When a statement fails, PostgreSQL answers the COMMIT of the aborted transaction with a
/// rollback, so nothing of it commits and the session is clean for the next batch. Returns
/// how many notifications were sent (the others belonged to requests already executed).
async fn notify(
    conn: &Conn,
    tx: &TxArgs<'_>,
    audit: Option<&AuditWrite>,
) -> Result<u64, tokio_postgres::Error> {
    let all: [&(dyn ToSql + Sync); 5] = [
        &tx.channels,
        &tx.payloads,
        &tx.keys,
        &tx.new_keys,
        &tx.expiries,
    ];
    let params = &all[..conn.statement.params().len()];
    // Sent when first polled: `join!` polls in order, so the statements leave in order.
    let audited = async {
        match (audit, &conn.audit, &conn.copy) {
            (Some(AuditWrite::Statement(args)), Some(statement), _) => conn
                .client
                .execute(statement, &args.params())
                .await
                .map(|_| ()),
            (Some(AuditWrite::Copy(data)), _, Some(copy)) => {
                let sink = conn.client.copy_in::<_, Bytes>(copy).await?;
                futures::pin_mut!(sink);
                sink.send(data.clone()).await?;
                sink.finish().await.map(|_| ())
            }
            _ => Ok(()),
        }
    };
    let (begin, audited, select, commit) = tokio::join!(
        conn.client.batch_execute("BEGIN"),
        audited,
        conn.client.query_one(&conn.statement, params),
        conn.client.batch_execute("COMMIT"),
    );
    begin?;
    audited?;
    let notified: i64 = select?.get(0);
    commit?;
    Ok(u64::try_from(notified).unwrap_or(0))
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
