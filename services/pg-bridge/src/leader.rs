//! Leader election: whatever must run once per stack runs on the bridge holding a PostgreSQL
//! advisory lock.
//!
//! Every bridge keeps a dedicated connection that tries `pg_try_advisory_lock(key)` every
//! second (the key derives from the NATS prefix, so stacks sharing a database elect apart).
//! The holder runs its [`Duty`] on that same session. PostgreSQL releases the lock when the
//! session ends, so leadership moves to a standby within about a second of the leader's death,
//! and the old leader's duty ends with its connection: it cannot keep acting once it lost the
//! lock. A lost connection is re-established (1 s doubling up to 32 s, forever).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt as _};
use pgws_config::DbConfig;
use tokio::time::{sleep, timeout};
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, Config, Notification};
use tokio_util::sync::CancellationToken;

use crate::db::{self, PgConnection};
use crate::metrics::BridgeMetrics;

/// How often a standby tries to take the lock.
const STANDBY_RETRY: Duration = Duration::from_secs(1);
/// Time a closing session has to say goodbye, so PostgreSQL releases the lock at once.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the session's connection delivers (notifications, notices, errors).
pub(crate) type Messages =
    Pin<Box<dyn Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Send>>;

/// How a session ended.
#[derive(Debug)]
pub(crate) enum End {
    Shutdown,
    Lost(String),
}

/// What the leader does, on the session that holds the lock. It must drive `messages` (the
/// connection's I/O) and return when the session ends or `token` is cancelled.
pub(crate) trait Duty: Send + Sync + 'static {
    /// Called just before this bridge is known as the leader (its readiness may change).
    fn taking_lead(&self) {}

    fn lead<'a>(
        &'a self,
        client: &'a Arc<Client>,
        messages: &'a mut Messages,
        token: &'a CancellationToken,
    ) -> BoxFuture<'a, End>;
}

/// What readiness and the metrics see of the election.
#[derive(Debug, Default)]
pub(crate) struct LeaderState {
    pub(crate) leader: AtomicBool,
    pub(crate) connected: AtomicBool,
}

impl LeaderState {
    /// Ready unless this bridge is the leader without its connection.
    pub(crate) fn ready(&self) -> bool {
        !self.leader.load(Ordering::Acquire) || self.connected.load(Ordering::Acquire)
    }
}

/// One bridge's candidacy; [`Election::run`] is its task.
pub(crate) struct Election<D> {
    pub(crate) pg: Config,
    pub(crate) key: i64,
    pub(crate) metrics: BridgeMetrics,
    pub(crate) state: Arc<LeaderState>,
    pub(crate) duty: D,
}

impl<D: Duty> Election<D> {
    /// Runs sessions on `first`, then on new connections, until `token` is cancelled.
    pub(crate) async fn run(self, first: (Client, PgConnection), token: CancellationToken) {
        let mut next = Some(first);
        let mut attempt = 0;
        loop {
            let (client, connection) = match next.take() {
                Some(pair) => pair,
                None => {
                    let result = tokio::select! {
                        _ = token.cancelled() => return,
                        r = db::connect_listening(&self.pg, &self.metrics.notifications_mended) => r,
                    };
                    match result {
                        Ok(pair) => {
                            self.metrics.listener_reconnects.inc();
                            tracing::info!("leader connection re-established");
                            attempt = 0;
                            pair
                        }
                        Err(e) => {
                            tracing::warn!(attempt, error = %e, "leader connection failed");
                            if !pause(&token, DbConfig::backoff(attempt)).await {
                                return;
                            }
                            attempt += 1;
                            continue;
                        }
                    }
                }
            };
            self.set_connected(true);
            let end = self.session(client, connection, &token).await;
            self.set_leader(false);
            self.set_connected(false);
            match end {
                End::Shutdown => {
                    tracing::info!("leader session stopped");
                    return;
                }
                End::Lost(reason) => {
                    tracing::warn!(reason, "leader connection lost");
                    if !pause(&token, DbConfig::backoff(attempt)).await {
                        return;
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// One connection's life: standby, then leader; closed cleanly at shutdown.
    async fn session(
        &self,
        client: Client,
        mut connection: PgConnection,
        token: &CancellationToken,
    ) -> End {
        let client = Arc::new(client);
        let mut messages: Messages = Box::pin(futures::stream::poll_fn(move |cx| {
            connection.poll_message(cx)
        }));
        // On a SQL_ASCII database PostgreSQL checks each notification against the client's
        // encoding and fails the session on bytes that are not UTF-8: asked for SQL_ASCII, it
        // sends them as they are, and the connection's reader mends them (`crate::wire`).
        let raw = client.simple_query(
            "SELECT set_config('client_encoding', 'SQL_ASCII', false) \
             WHERE current_setting('server_encoding') = 'SQL_ASCII'",
        );
        if let Err(end) = drive(&mut messages, token, raw).await.and_then(|r| {
            r.map(drop)
                .map_err(|e| End::Lost(format!("setting the client encoding: {e}")))
        }) {
            return end;
        }
        let end = match self.acquire(&client, &mut messages, token).await {
            Ok(()) => {
                self.duty.taking_lead();
                self.set_leader(true);
                tracing::info!("leader");
                self.duty.lead(&client, &mut messages, token).await
            }
            Err(end) => end,
        };
        drop(client);
        if matches!(end, End::Shutdown) {
            // The last client is gone: the connection says goodbye and ends the stream.
            let goodbye = async { while messages.next().await.is_some() {} };
            let _ = timeout(CLOSE_TIMEOUT, goodbye).await;
        }
        end
    }

    /// Waits until this session holds the lock.
    async fn acquire(
        &self,
        client: &Arc<Client>,
        messages: &mut Messages,
        token: &CancellationToken,
    ) -> Result<(), End> {
        let mut told = false;
        loop {
            let params: [&(dyn ToSql + Sync); 1] = [&self.key];
            let lock = client.query_one("SELECT pg_try_advisory_lock($1)", &params);
            match drive(messages, token, lock).await? {
                Ok(row) => match row.try_get::<_, bool>(0) {
                    Ok(true) => return Ok(()),
                    Ok(false) => {}
                    Err(e) => return Err(End::Lost(e.to_string())),
                },
                Err(e) => return Err(End::Lost(e.to_string())),
            }
            if !told {
                tracing::info!("standby: another bridge is the leader");
                told = true;
            }
            drive(messages, token, sleep(STANDBY_RETRY)).await?;
        }
    }

    fn set_leader(&self, on: bool) {
        self.state.leader.store(on, Ordering::Release);
        self.metrics.leader.set(i64::from(on));
        if !on {
            // Only the leader samples the queue; a stale value would mislead a max() query.
            self.metrics.queue_usage.set(0.0);
        }
    }

    fn set_connected(&self, on: bool) {
        self.state.connected.store(on, Ordering::Release);
        self.metrics.listener_connected.set(i64::from(on));
    }
}

/// Waits `delay` unless shutdown comes first (then false).
async fn pause(token: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = token.cancelled() => false,
        _ = sleep(delay) => true,
    }
}

/// Awaits `work` while driving the connection (whatever it delivers meanwhile is ignored);
/// `Err` when the connection ends or shutdown comes first.
pub(crate) async fn drive<F>(
    messages: &mut Messages,
    token: &CancellationToken,
    work: F,
) -> Result<F::Output, End>
where
    F: Future,
{
    drive_keeping(messages, token, work, &mut Vec::new()).await
}

/// [`drive`], keeping the notifications the connection delivers meanwhile in `kept` (a session
/// that LISTENs already must not lose them).
pub(crate) async fn drive_keeping<F>(
    messages: &mut Messages,
    token: &CancellationToken,
    work: F,
    kept: &mut Vec<Notification>,
) -> Result<F::Output, End>
where
    F: Future,
{
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => return Err(End::Shutdown),
            out = &mut work => return Ok(out),
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(n))) => kept.push(n),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(End::Lost(e.to_string())),
                None => return Err(End::Lost("connection closed".to_owned())),
            },
        }
    }
}
