//! Client messages on their way to the database.
//!
//! A socket's accepted frames become [`Notification`]s and are handed to the bridges as a
//! NATS request; the bridge replies once the NOTIFYs are committed. One request per socket is
//! in flight at a time, so a socket's messages reach PostgreSQL in the order they were sent
//! whichever bridge serves each request; what arrives meanwhile waits in the socket's bounded
//! pending queue and goes in the next request. A request that finds no bridge, times out or
//! fails is retried with backoff until `PGWS_NOTIFY_TIMEOUT`; then the client gets an error
//! frame for each message in it.
//!
//! Each request carries an id, the same on every retry, and the deadline after which the
//! gateway gives up: a bridge executes an id at most once and never starts a request past its
//! deadline, so a retry that overtakes a copy stuck in a stalled bridge neither doubles the
//! NOTIFYs nor lets them land after the socket's later messages.
//!
//! With the audit on (`PGWS_AUDIT`, the default) the audit is kept one of two ways:
//! - in the audit log (the stack's JetStream stream, [`Audit::Log`]): the request's
//!   notifications are first appended to it (one record holding all of them when there are
//!   several, with every message id; the id makes a retry inside the duplicate window a no-op)
//!   and the NOTIFY request goes out only once the log holds them: a message is never in the
//!   database without being in the audit stream. When the NOTIFY then fails for good, an
//!   outcome record (`Pgws-Outcome: failed`, the reason as body) tells the recorder which
//!   recorded messages were not NOTIFYed;
//! - in the request itself ([`Audit::InRequest`], one process): the records ride in the NOTIFY
//!   request (said in one flag when they are the notifications themselves, the usual case)
//!   and the bridge writes them in the transaction that NOTIFYs their messages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::BoxFuture;
use pgws_bus::{Headers as HeaderMap, Log};
use pgws_proto::{headers, Notification, NotifyReply, NotifyRequest};
use pgws_service::telemetry::{self, TARGET as TRACE};
use tokio::time::Instant;
use tracing::{Instrument, Span};

/// At most this many notifications per request (NATS payloads are limited to 1 MiB by default;
/// 64 envelopes of at most 8 KB fit).
pub(crate) const MAX_PER_REQUEST: usize = 64;

/// An accepted notification waiting for its request, with the span of the frame it came from
/// (disabled when traces are not exported).
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) note: Notification,
    /// What the audit stream records when it is not the notified payload (a direct channel's
    /// message is recorded as a postgres-websockets envelope).
    pub(crate) record: Option<String>,
    /// A client message: also NOTIFYed on `PGWS_AUDIT_CHANNEL`, when set, in the same
    /// transaction.
    pub(crate) echo: bool,
    pub(crate) span: Span,
}

impl Pending {
    /// A client message's notification.
    pub(crate) fn message(note: Notification, span: Span) -> Self {
        Self {
            note,
            record: None,
            echo: true,
            span,
        }
    }

    /// A notification no trace follows and no audit channel repeats (connection events).
    pub(crate) fn untraced(note: Notification) -> Self {
        Self {
            note,
            record: None,
            echo: false,
            span: Span::none(),
        }
    }
}

/// Sends NOTIFY requests to the bridges.
#[derive(Clone, Debug)]
pub(crate) struct Uplink {
    client: pgws_bus::Client,
    subject: String,
    deadline: Duration,
    audit: Option<Audit>,
    /// `PGWS_AUDIT_CHANNEL`.
    audit_channel: Option<String>,
    /// Request ids: the gateway's instance id and a counter.
    instance: u64,
    next_request: Arc<AtomicU64>,
}

/// Where audit records go.
#[derive(Clone)]
pub enum Audit {
    /// Appended to the audit log on `subject` before the NOTIFY request leaves.
    Log { log: Arc<dyn Log>, subject: String },
    /// Carried in the NOTIFY request, for the bridge to write in its transaction.
    InRequest,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Log { subject, .. } => f.debug_struct("Log").field("subject", subject).finish(),
            Self::InRequest => f.write_str("InRequest"),
        }
    }
}

impl Uplink {
    pub(crate) fn new(
        client: pgws_bus::Client,
        subject: String,
        deadline: Duration,
        audit: Option<Audit>,
        audit_channel: Option<String>,
        instance: u64,
    ) -> Self {
        Self {
            client,
            subject,
            deadline,
            audit,
            audit_channel,
            instance,
            next_request: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A new request id, unique across gateways and restarts.
    fn request_id(&self) -> String {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}-r{n:x}", self.instance)
    }

    /// Most notifications of one socket in one request (halved when each is repeated on the
    /// audit channel, so a request stays within NATS' payload limit).
    pub(crate) fn per_request(&self) -> usize {
        if self.audit_channel.is_some() {
            MAX_PER_REQUEST / 2
        } else {
            MAX_PER_REQUEST
        }
    }

    /// Hands `notifications` to a bridge; resolves when they are committed (`Ok`) or when the
    /// deadline passed (`Err` with the last reason).
    pub(crate) fn send(&self, batch: Vec<Pending>) -> BoxFuture<'static, Result<(), String>> {
        let client = self.client.clone();
        let subject = self.subject.clone();
        let deadline = Instant::now() + self.deadline;
        let id = self.request_id();
        // The same instant on the wall clock, for the bridges (see `NotifyRequest`).
        let deadline_ms = SystemTime::now()
            .checked_add(self.deadline)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64);
        let audit = self.audit.clone();
        // `gateway.publish`: a child of the first message's span, linked to the others'.
        let first = batch.first().map_or_else(Span::none, |p| p.span.clone());
        let span = tracing::info_span!(
            target: TRACE,
            parent: &first,
            "gateway.publish",
            otel.kind = "producer",
            messaging.system = "nats",
            messaging.destination.name = %subject,
            messaging.batch.message_count = batch.len(),
            attempts = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let mut frames = Vec::new();
        let mut notifications = Vec::with_capacity(batch.len());
        // What the audit stream records, when some notification is recorded in another form.
        let mut records: Option<Vec<Notification>> = None;
        let mut echoes = Vec::with_capacity(batch.len());
        for p in batch {
            if telemetry::tracing_enabled()
                && frames.last().is_none_or(|s: &Span| s.id() != p.span.id())
            {
                if !frames.is_empty() {
                    telemetry::link(&span, &p.span);
                }
                frames.push(p.span);
            }
            if let Some(body) = p.record {
                let records = records.get_or_insert_with(|| notifications.clone());
                records.push(Notification {
                    payload: body,
                    ..p.note.clone()
                });
            } else if let Some(records) = &mut records {
                records.push(p.note.clone());
            }
            echoes.push(p.echo);
            notifications.push(p.note);
        }
        let audit_channel = self.audit_channel.clone();
        let mut trace = HeaderMap::new();
        telemetry::inject(&span, &mut trace);
        let sending = async move {
            // The frames' spans end when their messages are in the database (or given up).
            let _frames = frames;
            let mut in_request = Vec::new();
            let mut record_notifications = false;
            // The recorded messages, for an outcome record if their NOTIFY fails.
            let mut ids: Vec<String> = Vec::new();
            match &audit {
                None => {}
                Some(Audit::Log { log, subject }) => {
                    let recorded = records.as_deref().unwrap_or(&notifications);
                    record(log.as_ref(), subject, recorded, &trace, deadline).await?;
                    ids = recorded.iter().filter_map(|n| n.id.clone()).collect();
                }
                // Each notification with an id is its own record: said, not sent twice.
                Some(Audit::InRequest) => match &records {
                    None => record_notifications = true,
                    Some(recorded) => {
                        in_request = recorded
                            .iter()
                            .filter(|n| n.id.is_some())
                            .cloned()
                            .collect();
                    }
                },
            }
            if let Some(channel) = audit_channel {
                notifications = with_echoes(notifications, &echoes, &channel);
            }
            let body = serde_json::to_vec(&NotifyRequest {
                id: Some(id),
                deadline_ms,
                notifications,
                records: in_request,
                record_notifications,
            })
            .map_err(|e| format!("cannot encode request: {e}"))?;
            let result = notify(&client, &subject, &trace, body.into(), deadline).await;
            if let (Err(reason), Some(Audit::Log { log, subject })) = (&result, &audit) {
                if !ids.is_empty() {
                    report_failure(log.as_ref(), subject, &ids, reason).await;
                }
            }
            result
        };
        Box::pin(
            async move {
                let result = sending.await;
                if result.is_err() {
                    Span::current().record("otel.status_code", "ERROR");
                }
                result
            }
            .instrument(span),
        )
    }
}

/// Sends one NOTIFY request until a bridge commits it or `deadline` passes (retries with
/// backoff; each attempt waits at most 5 s for its answer).
async fn notify(
    client: &pgws_bus::Client,
    subject: &str,
    trace: &HeaderMap,
    body: Bytes,
    deadline: Instant,
) -> Result<(), String> {
    let mut backoff = Duration::from_millis(50);
    let mut attempts = 0u32;
    let mut last = None;
    loop {
        let now = Instant::now();
        if now >= deadline {
            let last = last.map_or_else(String::new, |e| format!(" (last attempt: {e})"));
            return Err(format!("no bridge committed the message in time{last}"));
        }
        attempts += 1;
        Span::current().record("attempts", attempts);
        let attempt = (deadline - now).min(Duration::from_secs(5));
        let sent = client.request_with_headers(
            subject,
            trace.clone(),
            body.clone(),
            pgws_bus::REQUEST_TIMEOUT,
        );
        let error = match tokio::time::timeout(attempt, sent).await {
            Ok(Ok(reply)) => match serde_json::from_slice::<NotifyReply>(&reply.payload) {
                Ok(r) if r.ok => return Ok(()),
                Ok(r) => r.error.unwrap_or_else(|| "bridge failed".to_owned()),
                Err(e) => format!("unreadable bridge reply: {e}"),
            },
            Ok(Err(e)) => e.to_string(),
            Err(_) => "bridge did not answer".to_owned(),
        };
        tracing::debug!(error, "notify request failed; retrying");
        last = Some(error);
        backoff = pause(backoff, deadline).await;
    }
}

/// How long a gateway tries to tell the audit stream that recorded messages were not NOTIFYed.
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// Publishes the outcome record of messages recorded but not NOTIFYed (`Pgws-Outcome:
/// failed`, see proto/CONTRACT.md), so the audit says what became of them. Bounded by
/// [`REPORT_TIMEOUT`]; when the stream does not take it, the rows keep saying nothing about the
/// NOTIFY (logged).
async fn report_failure(log: &dyn Log, subject: &str, ids: &[String], reason: &str) {
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_IDS.to_owned(), ids.join(","));
    h.insert(
        headers::OUTCOME.to_owned(),
        headers::OUTCOME_FAILED.to_owned(),
    );
    let body = Bytes::from(reason.to_owned());
    let id = format!("{}:failed", ids[0]);
    let publish = async {
        log.append(subject, &id, h, body)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(REPORT_TIMEOUT, publish).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(
            error = e,
            messages = ids.len(),
            "cannot record a NOTIFY failure in the audit stream"
        ),
        Err(_) => tracing::warn!(
            messages = ids.len(),
            "recording a NOTIFY failure in the audit stream timed out"
        ),
    }
}

/// Each client message followed by its copy on the audit channel: adjacent, so the bridge
/// keeps the pair in one transaction (it only splits a transaction where a (channel, payload)
/// pair repeats, and a repeated copy implies its message repeated just before).
fn with_echoes(
    notifications: Vec<Notification>,
    echoes: &[bool],
    channel: &str,
) -> Vec<Notification> {
    let mut out = Vec::with_capacity(notifications.len() * 2);
    for (n, echo) in notifications.into_iter().zip(echoes) {
        let copy = echo.then(|| Notification {
            id: None,
            channel: channel.to_owned(),
            payload: n.payload.clone(),
        });
        out.push(n);
        out.extend(copy);
    }
    out
}

/// Sleeps `backoff` (at most until `deadline`) and returns the next, longer one.
async fn pause(backoff: Duration, deadline: Instant) -> Duration {
    let wait = backoff.min(deadline.saturating_duration_since(Instant::now()));
    tokio::time::sleep(wait).await;
    (backoff * 2).min(Duration::from_secs(1))
}

/// The ids and the channel when `notifications` can be one audit record: several, each with
/// an id, all on one channel, no payload holding a raw newline (envelopes never do).
fn one_record(notifications: &[Notification]) -> Option<(Vec<&str>, &str)> {
    let channel = notifications.first()?.channel.as_str();
    if notifications.len() < 2 {
        return None;
    }
    let mut ids = Vec::with_capacity(notifications.len());
    for n in notifications {
        let id =
            n.id.as_deref()
                .filter(|id| !id.is_empty() && !id.contains(','))?;
        if n.channel != channel || n.payload.contains('\n') {
            return None;
        }
        ids.push(id);
    }
    Some((ids, channel))
}

/// Publishes the audit records of `notifications` and waits for every acknowledgement,
/// retrying (same ids, so the stream keeps one copy) until `deadline`.
async fn record(
    log: &dyn Log,
    subject: &str,
    notifications: &[Notification],
    trace: &HeaderMap,
    deadline: Instant,
) -> Result<(), String> {
    let mut backoff = Duration::from_millis(50);
    loop {
        let appended = publish_all(log, subject, notifications, trace);
        let error = match tokio::time::timeout_at(deadline, appended).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => "the audit stream did not acknowledge in time".to_owned(),
        };
        if Instant::now() >= deadline {
            return Err(format!("not recorded in the audit stream: {error}"));
        }
        tracing::debug!(error, "audit publish failed; retrying");
        backoff = pause(backoff, deadline).await;
    }
}

async fn publish_all(
    log: &dyn Log,
    subject: &str,
    notifications: &[Notification],
    trace: &HeaderMap,
) -> Result<(), String> {
    if let Some((ids, channel)) = one_record(notifications) {
        // The request's envelopes as one record (see the audit stream in proto/CONTRACT.md).
        let mut h = trace.clone();
        h.insert(headers::MSG_IDS.to_owned(), ids.join(","));
        h.insert(headers::NOTIFY_CHANNEL.to_owned(), channel.to_owned());
        let mut body = Vec::with_capacity(notifications.iter().map(|n| n.payload.len() + 1).sum());
        for (i, n) in notifications.iter().enumerate() {
            if i > 0 {
                body.push(b'\n');
            }
            body.extend_from_slice(n.payload.as_bytes());
        }
        return log
            .append(subject, ids[0], h, Bytes::from(body))
            .await
            .map_err(|e| e.to_string());
    }
    // Appended together (each is sent as it is first polled, in order), acknowledged together.
    let appends = notifications.iter().map(|n| {
        let mut h = trace.clone();
        h.insert(headers::NOTIFY_CHANNEL.to_owned(), n.channel.clone());
        let id = n.id.as_deref().unwrap_or_default();
        log.append(subject, id, h, Bytes::from(n.payload.clone()))
    });
    futures::future::try_join_all(appends)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}
