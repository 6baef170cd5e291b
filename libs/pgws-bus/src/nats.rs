//! The bus on NATS (async-nats): a subject is a NATS subject, a queue group a NATS queue
//! group; a subscription is the async-nats subscriber (with its own bounded queue), mapped.

use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;

use crate::subject::{valid_pattern, valid_subject};
use crate::{Bus, BusError, Headers, Message, Subscription};

/// The bus on a NATS connection; cheap to clone.
#[derive(Debug, Clone)]
pub struct Nats {
    client: async_nats::Client,
}

impl Nats {
    pub fn new(client: async_nats::Client) -> Self {
        Self { client }
    }

    /// The connection, for what the seam does not cover yet (JetStream).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }
}

pub(crate) fn header_map(headers: Headers) -> async_nats::HeaderMap {
    let mut map = async_nats::HeaderMap::new();
    for (name, value) in headers {
        map.insert(name.as_str(), value.as_str());
    }
    map
}

pub(crate) fn message(m: async_nats::Message) -> Message {
    let headers = m
        .headers
        .as_ref()
        .map(|h| {
            h.iter()
                .filter_map(|(name, values)| {
                    let value = values.first()?;
                    Some((name.to_string(), value.as_str().to_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    Message {
        subject: m.subject.to_string(),
        reply: m.reply.map(|r| r.to_string()),
        headers,
        payload: m.payload,
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl Bus for Nats {
    fn publish(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BusError>> {
        let subject = subject.to_owned();
        Box::pin(async move {
            if !valid_subject(&subject) {
                return Err(BusError::InvalidSubject(subject));
            }
            self.client
                .publish_with_headers(subject, header_map(headers), payload)
                .await
                .map_err(unavailable)
        })
    }

    fn subscribe(
        &self,
        pattern: &str,
        queue: Option<&str>,
    ) -> BoxFuture<'_, Result<Subscription, BusError>> {
        let pattern = pattern.to_owned();
        let queue = queue.map(str::to_owned);
        Box::pin(async move {
            if !valid_pattern(&pattern) || !queue.as_deref().is_none_or(valid_subject) {
                return Err(BusError::InvalidSubject(pattern));
            }
            let sub = match queue {
                Some(q) => self.client.queue_subscribe(pattern, q).await,
                None => self.client.subscribe(pattern).await,
            }
            .map_err(unavailable)?;
            // Known to the server before this resolves: nothing published after is missed.
            self.client.flush().await.map_err(unavailable)?;
            Ok(Subscription::stream(sub.map(message)))
        })
    }

    fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Message, BusError>> {
        let subject = subject.to_owned();
        Box::pin(async move {
            if !valid_subject(&subject) {
                return Err(BusError::InvalidSubject(subject));
            }
            let request = async_nats::Request::new()
                .headers(header_map(headers))
                .payload(payload)
                .timeout(Some(timeout));
            match self.client.send_request(subject, request).await {
                Ok(m) => Ok(message(m)),
                Err(e) => Err(match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => BusError::NoResponders,
                    async_nats::RequestErrorKind::TimedOut => BusError::TimedOut,
                    _ => unavailable(e),
                }),
            }
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move { self.client.flush().await.map_err(unavailable) })
    }

    /// The server's limit (1 MiB by default; before the first connection, that default).
    fn max_payload(&self) -> usize {
        match self.client.server_info().max_payload {
            0 => 1024 * 1024,
            n => n,
        }
    }
}
