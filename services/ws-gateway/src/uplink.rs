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
//! With the audit stream on (`PGWS_AUDIT`, the default), every notification is first published
//! to JetStream with its message id (`Nats-Msg-Id`, so a retry inside the duplicate window is
//! not stored twice) and the NOTIFY request goes out only once the stream acknowledged them
//! all: a message is never in the database without being in the audit stream.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::future::BoxFuture;
use pgws_proto::{headers, Notification, NotifyReply, NotifyRequest};
use tokio::time::Instant;

/// At most this many notifications per request (NATS payloads are limited to 1 MiB by default;
/// 64 envelopes of at most 8 KB fit).
pub(crate) const MAX_PER_REQUEST: usize = 64;

/// Sends NOTIFY requests to the bridges.
#[derive(Clone, Debug)]
pub(crate) struct Uplink {
    client: async_nats::Client,
    subject: String,
    deadline: Duration,
    audit: Option<Audit>,
}

/// Where audit records go.
#[derive(Clone, Debug)]
pub(crate) struct Audit {
    pub(crate) js: jetstream::Context,
    pub(crate) subject: String,
}

impl Uplink {
    pub(crate) fn new(
        client: async_nats::Client,
        subject: String,
        deadline: Duration,
        audit: Option<Audit>,
    ) -> Self {
        Self {
            client,
            subject,
            deadline,
            audit,
        }
    }

    /// Hands `notifications` to a bridge; resolves when they are committed (`Ok`) or when the
    /// deadline passed (`Err` with the last reason).
    pub(crate) fn send(
        &self,
        notifications: Vec<Notification>,
    ) -> BoxFuture<'static, Result<(), String>> {
        let client = self.client.clone();
        let subject = self.subject.clone();
        let deadline = Instant::now() + self.deadline;
        let audit = self.audit.clone();
        Box::pin(async move {
            if let Some(audit) = audit {
                record(&audit, &notifications, deadline).await?;
            }
            let body = serde_json::to_vec(&NotifyRequest { notifications })
                .map_err(|e| format!("cannot encode request: {e}"))?;
            let body = bytes::Bytes::from(body);
            let mut backoff = Duration::from_millis(50);
            loop {
                let now = Instant::now();
                if now >= deadline {
                    return Err("no bridge committed the message in time".to_owned());
                }
                let attempt = (deadline - now).min(Duration::from_secs(5));
                let error = match tokio::time::timeout(
                    attempt,
                    client.request(subject.clone(), body.clone()),
                )
                .await
                {
                    Ok(Ok(reply)) => match serde_json::from_slice::<NotifyReply>(&reply.payload) {
                        Ok(r) if r.ok => return Ok(()),
                        Ok(r) => r.error.unwrap_or_else(|| "bridge failed".to_owned()),
                        Err(e) => format!("unreadable bridge reply: {e}"),
                    },
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "bridge did not answer".to_owned(),
                };
                tracing::debug!(error, "notify request failed; retrying");
                backoff = pause(backoff, deadline).await;
            }
        })
    }
}

/// Sleeps `backoff` (at most until `deadline`) and returns the next, longer one.
async fn pause(backoff: Duration, deadline: Instant) -> Duration {
    let wait = backoff.min(deadline.saturating_duration_since(Instant::now()));
    tokio::time::sleep(wait).await;
    (backoff * 2).min(Duration::from_secs(1))
}

/// Publishes the audit records of `notifications` and waits for every acknowledgement,
/// retrying (same ids, so the stream keeps one copy) until `deadline`.
async fn record(
    audit: &Audit,
    notifications: &[Notification],
    deadline: Instant,
) -> Result<(), String> {
    let mut backoff = Duration::from_millis(50);
    loop {
        let error = match tokio::time::timeout_at(deadline, publish_all(audit, notifications)).await
        {
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

async fn publish_all(audit: &Audit, notifications: &[Notification]) -> Result<(), String> {
    let mut acks = Vec::with_capacity(notifications.len());
    for n in notifications {
        let mut h = async_nats::HeaderMap::new();
        if let Some(id) = &n.id {
            h.insert(headers::MSG_ID, id.as_str());
        }
        h.insert(headers::NOTIFY_CHANNEL, n.channel.as_str());
        let ack = audit
            .js
            .publish_with_headers(audit.subject.clone(), h, Bytes::from(n.payload.clone()))
            .await
            .map_err(|e| e.to_string())?;
        acks.push(ack);
    }
    for ack in acks {
        ack.await.map_err(|e| e.to_string())?;
    }
    Ok(())
}
