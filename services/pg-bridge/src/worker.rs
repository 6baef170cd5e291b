//! A NOTIFY worker: one PostgreSQL connection executing batches as pipelined transactions.
//!
//! Split from the intake ([`crate::notifier`]) because the two fail differently: the intake
//! deals with NATS and bad requests, a worker with a connection that can die, hang or refuse
//! a transaction. A worker offers itself only while its connection is up, reconnects with
//! backoff (1 s doubling up to 32 s, forever) and answers every request it was given once.
//!
//! Bounds: one batch at a time; a transaction has [`TX_TIMEOUT`] to commit, after which the
//! connection is abandoned (dropped, so PostgreSQL rolls back what did not commit).

use std::sync::Arc;
use std::time::Duration;

use async_nats::Client as Nats;
use pgws_config::DbConfig;
use pgws_proto::NotifyReply;
use pgws_service::telemetry::TARGET as TRACE;
use pgws_service::Shutdown;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep, timeout};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, Statement};
use tokio_util::sync::CancellationToken;

use crate::batch::{plan, Batch, Offer, UNAVAILABLE};
use crate::bus::reply;
use crate::db;
use crate::metrics::BridgeMetrics;

/// Many NOTIFYs in one statement; `unnest` keeps the arrays' order.
const NOTIFY_SQL: &str =
    "SELECT count(pg_notify(c, p)) FROM unnest($1::text[], $2::text[]) AS t(c, p)";
/// Time a transaction has to commit before its connection is abandoned.
pub(crate) const TX_TIMEOUT: Duration = Duration::from_secs(10);

/// A worker's connection; `gone` is cancelled when it ends or is abandoned.
struct Conn {
    client: Client,
    statement: Statement,
    gone: CancellationToken,
}

pub(crate) struct Worker {
    id: usize,
    pg: Config,
    conn: Option<Conn>,
    up: Arc<watch::Sender<usize>>,
    nats: Nats,
    metrics: BridgeMetrics,
    shutdown: Shutdown,
}

impl Worker {
    /// A worker without a connection yet; `up` counts the live connections of all workers.
    pub(crate) fn new(
        id: usize,
        pg: Config,
        up: Arc<watch::Sender<usize>>,
        nats: Nats,
        metrics: BridgeMetrics,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            id,
            pg,
            conn: None,
            up,
            nats,
            metrics,
            shutdown,
        }
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
        let statement = client.prepare(NOTIFY_SQL).await?;
        Ok(Conn {
            client,
            statement,
            gone,
        })
    }

    /// Executes a batch as few transactions as possible, answering each request once.
    async fn execute(&mut self, batch: Batch) {
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
        let mut answered = 0;
        let mut failure: Option<String> = None;
        for (k, tx) in plan.iter().enumerate() {
            let Some(conn) = self.conn.as_ref().filter(|c| !c.gone.is_cancelled()) else {
                failure = Some("no connection".to_owned());
                break;
            };
            let (channels, payloads): (Vec<&str>, Vec<&str>) = tx
                .iter()
                .map(|&(r, i)| {
                    let n = &batch.requests[r].notifications[i];
                    (n.channel.as_str(), n.payload.as_str())
                })
                .unzip();
            let result = timeout(TX_TIMEOUT, notify(conn, &channels, &payloads)).await;
            match result {
                Ok(Ok(())) => {
                    self.metrics.transactions.inc();
                    self.metrics.batch_size.observe(channels.len() as f64);
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
                reply(&self.nats, to, &NotifyReply::ok()).await;
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
                reply(&self.nats, request.reply.as_ref(), &failed).await;
            }
        }
    }
}

/// One transaction, pipelined: the three statements leave together and PostgreSQL answers
/// in order. When the SELECT fails, PostgreSQL answers the COMMIT of the aborted transaction
/// with a rollback, so the session is clean for the next batch.
async fn notify(
    conn: &Conn,
    channels: &[&str],
    payloads: &[&str],
) -> Result<(), tokio_postgres::Error> {
    let params: [&(dyn ToSql + Sync); 2] = [&channels, &payloads];
    let (begin, select, commit) = tokio::join!(
        conn.client.batch_execute("BEGIN"),
        conn.client.query_one(&conn.statement, &params),
        conn.client.batch_execute("COMMIT"),
    );
    begin?;
    select?;
    commit
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
