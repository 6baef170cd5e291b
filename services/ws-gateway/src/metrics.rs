//! The gateway's metrics, registered once and shared by every socket.

use pgws_service::prometheus_client::metrics::counter::Counter;
use pgws_service::prometheus_client::metrics::family::Family;
use pgws_service::prometheus_client::metrics::gauge::Gauge;
use pgws_service::prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use pgws_service::Metrics;

type Labels = [(&'static str, &'static str); 1];

/// Handles to every gateway metric (cheap to clone).
#[derive(Clone, Debug)]
pub(crate) struct GatewayMetrics {
    pub(crate) connections_open: Family<Labels, Gauge>,
    pub(crate) connections_total: Family<Labels, Counter>,
    pub(crate) handshakes_refused: Family<Labels, Counter>,
    pub(crate) messages_in: Counter,
    pub(crate) bytes_in: Counter,
    pub(crate) messages_refused: Family<Labels, Counter>,
    pub(crate) notify_failed: Counter,
    pub(crate) deliveries: Counter,
    pub(crate) bytes_out: Counter,
    pub(crate) notifications_in: Counter,
    /// `/live` table events dropped because their subject already passed that position on.
    pub(crate) changes_repeated: Counter,
    /// Tokens replaced in-band (`/live` `refresh`).
    pub(crate) refreshed: Counter,
    pub(crate) slow_consumers: Counter,
    pub(crate) abandoned: Counter,
    pub(crate) budget_disconnects: Counter,
    pub(crate) queued_bytes: Gauge,
    pub(crate) channels: Gauge,
    pub(crate) delivery_latency: Histogram,
    pub(crate) jwks_refreshes: Family<Labels, Counter>,
    pub(crate) jwks_failures: Counter,
    /// Presence reports the leader did not take (no answer, refused, or too large).
    pub(crate) presence_failures: Counter,
    pub(crate) jwks_throttled: Counter,
    pub(crate) jwks_keys: Gauge,
    pub(crate) jwks_updated: Gauge,
    /// Resuming sockets whose position was served (`recovered`) or was a gap (`gap`).
    pub(crate) resumes: Family<Labels, Counter>,
    /// Messages replayed from the history to resuming sockets.
    pub(crate) replayed: Counter,
}

impl GatewayMetrics {
    /// Counts an accepted client frame of `len` bytes.
    pub(crate) fn accepted(&self, len: usize) {
        self.messages_in.inc();
        self.bytes_in.inc_by(len as u64);
    }

    /// Counts a client frame refused for `reason`.
    pub(crate) fn refused(&self, reason: &'static str) {
        self.messages_refused
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Registers the gateway's metrics in `m`.
    pub(crate) fn register(m: &Metrics) -> Self {
        Self {
            connections_open: m.register(
                "gateway_connections_open",
                "Open websockets, by protocol",
                Family::default(),
            ),
            connections_total: m.register(
                "gateway_connections",
                "Websockets accepted, by protocol",
                Family::default(),
            ),
            handshakes_refused: m.register(
                "gateway_handshakes_refused",
                "Handshakes refused, by reason",
                Family::default(),
            ),
            messages_in: m.register(
                "gateway_client_messages",
                "Frames received from sockets and accepted",
                Counter::default(),
            ),
            bytes_in: m.register(
                "gateway_client_received_bytes",
                "Bytes of accepted frames received from sockets",
                Counter::default(),
            ),
            messages_refused: m.register(
                "gateway_client_messages_refused",
                "Client frames refused (an error frame, a close, or ignored, as the protocol says), by reason",
                Family::default(),
            ),
            notify_failed: m.register(
                "gateway_notify_failures",
                "Client messages that could not be handed to a bridge in time (the client got an error frame)",
                Counter::default(),
            ),
            deliveries: m.register(
                "gateway_deliveries",
                "Messages queued to sockets (one per socket per notification)",
                Counter::default(),
            ),
            bytes_out: m.register(
                "gateway_delivered_bytes",
                "Bytes of messages queued to sockets",
                Counter::default(),
            ),
            notifications_in: m.register(
                "gateway_notifications",
                "Notifications received from NATS for local channels",
                Counter::default(),
            ),
            refreshed: m.register(
                "gateway_tokens_refreshed",
                "Socket tokens replaced in-band (/live refresh), moving the socket's expiry",
                Counter::default(),
            ),
            changes_repeated: m.register(
                "gateway_table_events_repeated",
                "Table events dropped because their position was already passed on (a new leader bridge publishing again)",
                Counter::default(),
            ),
            slow_consumers: m.register(
                "gateway_slow_consumer_disconnects",
                "Sockets disconnected because their send queue was full",
                Counter::default(),
            ),
            budget_disconnects: m.register(
                "gateway_send_budget_disconnects",
                "Sockets with a backlog disconnected because the gateway's send budget (PGWS_SEND_BUDGET) was spent",
                Counter::default(),
            ),
            queued_bytes: m.register(
                "gateway_send_queued_bytes",
                "Bytes queued to sockets and not yet written, all sockets together",
                Gauge::default(),
            ),
            abandoned: m.register(
                "gateway_abandoned_sockets",
                "Sockets dropped without a close frame because their client stopped reading while a write was blocked",
                Counter::default(),
            ),
            channels: m.register(
                "gateway_channels",
                "Fan-out subjects (channels, direct channels, wspubsub topics) with at least one local reader (one NATS subscription each)",
                Gauge::default(),
            ),
            delivery_latency: m.register(
                "gateway_delivery_latency_seconds",
                "From the bridge receiving a notification from PostgreSQL to its queueing to the sockets (needs agreeing clocks)",
                Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            ),
            jwks_refreshes: m.register(
                "gateway_jwks_refreshes",
                "Good JWKS documents fetched from PGWS_JWKS_URL and installed, by trigger (start, schedule, unknown_kid)",
                Family::default(),
            ),
            presence_failures: m.register(
                "gateway_presence_failures",
                "Presence reports to the leader bridge that failed (sent again at the next change or heartbeat)",
                Counter::default(),
            ),
            jwks_failures: m.register(
                "gateway_jwks_refresh_failures",
                "JWKS fetches that failed or returned a document that is not a usable JWKS (the last good keys were kept)",
                Counter::default(),
            ),
            jwks_throttled: m.register(
                "gateway_jwks_unknown_kid_throttled",
                "Tokens naming an unknown key id refused without a new fetch, one having run within the last 10 s",
                Counter::default(),
            ),
            jwks_keys: m.register(
                "gateway_jwks_keys",
                "Keys in the current set fetched from PGWS_JWKS_URL",
                Gauge::default(),
            ),
            jwks_updated: m.register(
                "gateway_jwks_updated_timestamp_seconds",
                "Unix time of the last good JWKS fetch (the age of the keys is now minus this)",
                Gauge::default(),
            ),
            resumes: m.register(
                "gateway_resumes",
                "Sockets that resumed from a position, by outcome (recovered: replayed from the history; gap: the position could not be served)",
                Family::default(),
            ),
            replayed: m.register(
                "gateway_replayed_messages",
                "Messages replayed from the history to resuming sockets",
                Counter::default(),
            ),
        }
    }
}
