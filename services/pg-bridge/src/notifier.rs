//! The NOTIFY intake: bus requests in, batches out to the workers ([`crate::worker`]).
//!
//! Every bridge serves `<prefix>.notify` in the queue group `<prefix>.bridge`. One intake task
//! reads the subscription, refuses bad requests at once (so they never share a transaction),
//! and hands batches to `PGWS_POOL_SIZE` workers, each owning one connection. Batching is
//! natural: the intake waits for a free worker, then takes whatever requests are already
//! waiting (up to `PGWS_BATCH_SIZE` notifications), so batches grow with load and add no
//! latency. A request is answered `ok` only after every transaction holding it committed.
//!
//! Bounds: at most one batch per worker is in flight, each of at most `PGWS_BATCH_SIZE`
//! notifications (a larger single request goes alone); free-worker offers sit in a channel of
//! `2 * PGWS_POOL_SIZE`. Beyond that the bus subscription buffers (on NATS, the client's
//! subscription capacity, 65536 messages; in one process [`pgws_bus::SUBSCRIPTION_CAPACITY`];
//! past it the bus drops messages and the gateway retries after its timeout). While no worker
//! has a connection, the intake unsubscribes (so other bridges serve the queue group) and
//! answers what the subscription held with `failed`. A request read past its deadline is
//! answered `failed` without being executed (its gateway has given up on it), and the workers
//! check again before they start.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use futures::FutureExt as _;
use pgws_bus::{Client as Bus, Message, Subscription};
use pgws_proto::{NotifyReply, Subjects};
use pgws_service::Shutdown;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tokio_postgres::Config;
use tokio_util::sync::CancellationToken;

use crate::audit::TxAudit;
use crate::batch::{deadline, validate, Batch, Offer, Request, EXPIRED, UNAVAILABLE};
use crate::bus::reply;
use crate::metrics::BridgeMetrics;
use crate::worker::Worker;

/// Time an unsubscribed subscription has to hand over its buffered requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// What the NOTIFY side needs; [`Notifier::spawn`] starts it.
pub(crate) struct Notifier {
    pub(crate) pg: Config,
    pub(crate) subjects: Subjects,
    pub(crate) pool_size: usize,
    pub(crate) batch_size: usize,
    pub(crate) bus: Bus,
    pub(crate) metrics: BridgeMetrics,
    /// `PGWS_NOTIFY_DEDUP`.
    pub(crate) dedup: bool,
    /// Writes the requests' audit records in their NOTIFY transactions (one process).
    pub(crate) audit: Option<Arc<dyn TxAudit>>,
}

impl Notifier {
    /// Spawns the workers and the intake. Returns the number of live worker connections; the
    /// intake reports a fatal error (its bus closed) on `fatal`.
    pub(crate) fn spawn(
        self,
        shutdown: &Shutdown,
        fatal: mpsc::Sender<anyhow::Error>,
    ) -> watch::Receiver<usize> {
        let (up, up_rx) = watch::channel(0usize);
        let up = Arc::new(up);
        let (idle_tx, idle) = mpsc::channel(2 * self.pool_size);
        for id in 0..self.pool_size {
            let worker = Worker::new(
                id,
                self.pg.clone(),
                up.clone(),
                self.bus.clone(),
                self.metrics.clone(),
                shutdown.clone(),
                self.dedup,
            )
            .with_audit(self.audit.clone());
            shutdown.spawn(worker.run(idle_tx.clone()));
        }
        let intake = Intake {
            bus: self.bus,
            subjects: self.subjects,
            batch_size: self.batch_size,
            idle,
            up: up_rx.clone(),
            metrics: self.metrics,
            token: shutdown.token.clone(),
        };
        shutdown.spawn(async move {
            if let Err(e) = intake.run().await {
                let _ = fatal.try_send(e);
            }
        });
        up_rx
    }
}

/// Why a subscription was drained.
#[derive(Debug, Clone, Copy)]
enum Drain {
    Shutdown,
    DatabaseDown,
}

struct Intake {
    bus: Bus,
    subjects: Subjects,
    batch_size: usize,
    idle: mpsc::Receiver<Offer>,
    up: watch::Receiver<usize>,
    metrics: BridgeMetrics,
    token: CancellationToken,
}

impl Intake {
    /// Subscribes while some worker has a connection; returns at shutdown.
    async fn run(mut self) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                biased;
                _ = self.token.cancelled() => return Ok(()),
                r = self.up.wait_for(|n| *n > 0) => if r.is_err() { return Ok(()) },
            }
            let sub = self
                .bus
                .queue_subscribe(self.subjects.notify(), self.subjects.bridge_queue())
                .await
                .context("cannot subscribe to notify requests")?;
            tracing::info!(
                subject = %self.subjects.notify(),
                queue = %self.subjects.bridge_queue(),
                "serving notify requests"
            );
            match self.serve(&mut Requests::new(sub)).await {
                Some(Drain::Shutdown) => return Ok(()),
                Some(Drain::DatabaseDown) => {
                    tracing::warn!("no notify connection left, notify requests paused")
                }
                None => anyhow::bail!("the notify subscription ended unexpectedly"),
            }
        }
    }

    /// Serves `sub` until it ends; returns why it was drained (`None`: it ended by itself).
    async fn serve(&mut self, sub: &mut Requests) -> Option<Drain> {
        let mut drain: Option<(Drain, Instant)> = None;
        let mut carry: Option<Request> = None;
        loop {
            let first = match carry.take() {
                Some(request) => request,
                None => {
                    let deadline = drain.map_or_else(Instant::now, |(_, at)| at);
                    let next = tokio::select! {
                        biased;
                        _ = self.token.cancelled(), if drain.is_none() => Err(Drain::Shutdown),
                        _ = self.up.wait_for(|n| *n == 0), if drain.is_none() => Err(Drain::DatabaseDown),
                        _ = sleep_until(deadline), if drain.is_some() => return drain.map(|d| d.0),
                        message = sub.next() => match message {
                            Some(message) => Ok(message),
                            None => return drain.map(|d| d.0),
                        },
                    };
                    match next {
                        Ok(message) => match self.accept(message).await {
                            Some(request) => request,
                            None => continue,
                        },
                        Err(why) => {
                            // Unsubscribe, then keep reading what the subscription held.
                            sub.unsubscribe();
                            drain = Some((why, Instant::now() + DRAIN_TIMEOUT));
                            continue;
                        }
                    }
                }
            };
            let mut batch = Batch::default();
            batch.push(first);
            let Some(mut offer) = self.take_offer().await else {
                self.fail(batch, UNAVAILABLE).await;
                continue;
            };
            // Natural batching: whatever arrived while every worker was busy.
            while batch.notifications < self.batch_size {
                let Some(message) = sub.try_next() else {
                    break;
                };
                if let Some(request) = self.accept(message).await {
                    if batch.notifications + request.notifications.len() > self.batch_size {
                        carry = Some(request);
                        break;
                    }
                    batch.push(request);
                }
            }
            loop {
                match offer.send(batch) {
                    Ok(()) => break,
                    Err(back) => match self.take_offer().await {
                        Some(next) => (batch, offer) = (back, next),
                        None => {
                            self.fail(back, UNAVAILABLE).await;
                            break;
                        }
                    },
                }
            }
        }
    }

    /// A worker ready for a batch; `None` when no worker has a connection.
    async fn take_offer(&mut self) -> Option<Offer> {
        loop {
            tokio::select! {
                offer = self.idle.recv() => match offer {
                    Some(offer) if !offer.is_closed() => return Some(offer),
                    Some(_) => continue,
                    None => return None,
                },
                _ = self.up.wait_for(|n| *n == 0) => return None,
            }
        }
    }

    /// Checks a message; answers it at once when it is invalid or empty.
    async fn accept(&self, message: Message) -> Option<Request> {
        match validate(&message.payload) {
            Err(e) => {
                self.metrics.requests_invalid.inc();
                tracing::debug!(error = %e, "invalid notify request");
                let failed = NotifyReply::failed(e.to_string());
                reply(&self.bus, message.reply.as_ref(), &failed).await;
                None
            }
            Ok(request) if request.notifications.is_empty() => {
                self.metrics.requests_ok.inc();
                reply(&self.bus, message.reply.as_ref(), &NotifyReply::ok()).await;
                None
            }
            Ok(request) => {
                let request = Request {
                    span: Request::span(request.notifications.len(), &message.headers),
                    id: request.id,
                    deadline: deadline(request.deadline_ms),
                    notifications: request.notifications,
                    records: request.records,
                    reply: message.reply,
                };
                if request.expired(SystemTime::now()) {
                    // Waited in this bridge (stalled, or its subscription backed up) until its
                    // gateway gave up: starting it now could overtake the socket's later
                    // messages.
                    self.metrics.requests_expired.inc();
                    request.span.record("otel.status_code", "ERROR");
                    let failed = NotifyReply::failed(EXPIRED);
                    reply(&self.bus, request.reply.as_ref(), &failed).await;
                    return None;
                }
                Some(request)
            }
        }
    }

    async fn fail(&self, batch: Batch, reason: &str) {
        let failed = NotifyReply::failed(reason);
        for request in batch.requests {
            request.span.record("otel.status_code", "ERROR");
            self.metrics.requests_failed.inc();
            reply(&self.bus, request.reply.as_ref(), &failed).await;
        }
    }
}

/// The notify requests: the subscription, then, once unsubscribed, what it held.
struct Requests {
    sub: Option<Subscription>,
    held: VecDeque<Message>,
}

impl Requests {
    fn new(sub: Subscription) -> Self {
        Self {
            sub: Some(sub),
            held: VecDeque::new(),
        }
    }

    /// The next request; `None` once the subscription ended (or was unsubscribed) and what it
    /// held was read.
    async fn next(&mut self) -> Option<Message> {
        if let Some(m) = self.held.pop_front() {
            return Some(m);
        }
        match &mut self.sub {
            Some(sub) => sub.next().await,
            None => None,
        }
    }

    /// The next request when one is there already.
    fn try_next(&mut self) -> Option<Message> {
        if let Some(m) = self.held.pop_front() {
            return Some(m);
        }
        self.sub.as_mut()?.next().now_or_never().flatten()
    }

    /// Leaves the queue group, keeping what the subscription received until then (at most its
    /// capacity) to be read and answered. A request the bus was still delivering is lost to
    /// this bridge; its gateway retries it after its timeout.
    fn unsubscribe(&mut self) {
        let Some(mut sub) = self.sub.take() else {
            return;
        };
        while let Some(Some(m)) = sub.next().now_or_never() {
            self.held.push_back(m);
        }
    }
}

#[cfg(test)]
#[path = "notifier_tests.rs"]
mod tests;
