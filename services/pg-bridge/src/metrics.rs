//! The bridge's Prometheus metrics, registered once at start and shared by its components.
//!
//! Names get the `pgws_` prefix from the registry and counters get `_total` when encoded, so
//! `bridge_notify_transactions` is scraped as `pgws_bridge_notify_transactions_total`.

use std::sync::atomic::AtomicU64;

use pgws_service::prometheus_client::metrics::counter::Counter;
use pgws_service::prometheus_client::metrics::family::Family;
use pgws_service::prometheus_client::metrics::gauge::Gauge;
use pgws_service::prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use pgws_service::Metrics;

type Outcome = [(&'static str, &'static str); 1];

/// Handles on every bridge metric (cheap to clone, lock-free to update).
#[derive(Debug, Clone)]
pub(crate) struct BridgeMetrics {
    /// NOTIFY requests answered `ok`.
    pub(crate) requests_ok: Counter,
    /// NOTIFY requests answered `failed` after a database error (the gateway retries).
    pub(crate) requests_failed: Counter,
    /// NOTIFY requests refused before execution (bad JSON, channel or payload).
    pub(crate) requests_invalid: Counter,
    /// NOTIFY requests not started because their deadline had passed.
    pub(crate) requests_expired: Counter,
    /// Notifications skipped because their request had already been executed (a retry).
    pub(crate) duplicates: Counter,
    /// Notifications per executed transaction.
    pub(crate) batch_size: Histogram,
    /// Transactions committed.
    pub(crate) transactions: Counter,
    /// Database errors met by NOTIFY workers (failed transactions, lost connections).
    pub(crate) notify_errors: Counter,
    /// NOTIFY transactions run again with the audit statement because their audit `COPY` was
    /// refused (a row written before, or one without a place).
    pub(crate) audit_copy_refused: Counter,
    /// Notifications the leader published to NATS.
    pub(crate) published: Counter,
    /// Notifications without a string `channel`, ignored as postgres-websockets does.
    pub(crate) unroutable: Counter,
    /// 1 while this bridge is the LISTEN leader.
    pub(crate) leader: Gauge,
    /// 1 while this bridge's LISTEN connection (leader or standby) is up.
    pub(crate) listener_connected: Gauge,
    /// LISTEN connections re-established after the first one.
    pub(crate) listener_reconnects: Counter,
    /// Notifications that were not valid UTF-8, delivered with those bytes replaced.
    pub(crate) notifications_mended: Counter,
    /// `pg_notification_queue_usage()` as last seen by the leader (0..1).
    pub(crate) queue_usage: Gauge<f64, AtomicU64>,
    /// Direct channels the leader LISTENs on for the gateways.
    pub(crate) direct_channels: Gauge,
    /// Channels gateways reported that are not in `PGWS_DIRECT_CHANNELS` (not LISTENed).
    pub(crate) direct_refused: Counter,
    /// API-key checks answered, by outcome (valid, refused, error).
    pub(crate) key_checks: Family<Outcome, Counter>,
    /// Row changes the capture read from the slot.
    pub(crate) capture_changes: Counter,
    /// Visibility queries the capture ran (one per table, class and batch).
    pub(crate) capture_checks: Counter,
    /// Table events the capture published (one per change and class that may see it).
    pub(crate) capture_events: Counter,
}

impl BridgeMetrics {
    /// Registers every metric in `metrics`.
    pub(crate) fn register(metrics: &Metrics) -> Self {
        let requests = metrics.register(
            "bridge_notify_requests",
            "NOTIFY requests served, by outcome (ok, failed, invalid, expired)",
            Family::<Outcome, Counter>::default(),
        );
        let outcome = |o: &'static str| requests.get_or_create(&[("outcome", o)]).clone();
        Self {
            requests_ok: outcome("ok"),
            requests_failed: outcome("failed"),
            requests_invalid: outcome("invalid"),
            requests_expired: outcome("expired"),
            duplicates: metrics.register(
                "bridge_notify_duplicates",
                "Notifications skipped because their request had already been executed",
                Counter::default(),
            ),
            batch_size: metrics.register(
                "bridge_notify_batch_size",
                "Notifications per NOTIFY transaction",
                Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            ),
            transactions: metrics.register(
                "bridge_notify_transactions",
                "NOTIFY transactions committed",
                Counter::default(),
            ),
            notify_errors: metrics.register(
                "bridge_notify_errors",
                "Database errors of the NOTIFY workers",
                Counter::default(),
            ),
            audit_copy_refused: metrics.register(
                "bridge_audit_copy_refused",
                "NOTIFY transactions whose audit COPY met a row written before or one without a place (no partition), run again with the audit statement",
                Counter::default(),
            ),
            published: metrics.register(
                "bridge_notifications_published",
                "Notifications published to NATS by the LISTEN leader",
                Counter::default(),
            ),
            unroutable: metrics.register(
                "bridge_notifications_unroutable",
                "Notifications ignored because their payload has no string channel field",
                Counter::default(),
            ),
            leader: metrics.register(
                "bridge_leader",
                "1 while this bridge holds the LISTEN leadership",
                Gauge::default(),
            ),
            listener_connected: metrics.register(
                "bridge_listener_connected",
                "1 while this bridge's LISTEN connection is up",
                Gauge::default(),
            ),
            listener_reconnects: metrics.register(
                "bridge_listener_reconnects",
                "LISTEN connections re-established after the first",
                Counter::default(),
            ),
            notifications_mended: metrics.register(
                "bridge_notifications_mended",
                "Notifications that were not valid UTF-8 (a SQL_ASCII database), delivered with those bytes replaced by U+FFFD",
                Counter::default(),
            ),
            queue_usage: metrics.register(
                "bridge_notification_queue_usage",
                "Fraction of PostgreSQL's NOTIFY queue in use, as seen by the leader",
                Gauge::default(),
            ),
            direct_channels: metrics.register(
                "bridge_direct_channels",
                "Direct channels the leader LISTENs on because some gateway's sockets read them",
                Gauge::default(),
            ),
            direct_refused: metrics.register(
                "bridge_direct_channels_refused",
                "Channels gateways reported that are not in this bridge's PGWS_DIRECT_CHANNELS, not LISTENed (once per gateway and channel)",
                Counter::default(),
            ),
            key_checks: metrics.register(
                "bridge_key_checks",
                "wspubsub API-key checks answered, by outcome (valid, refused, error)",
                Family::default(),
            ),
            capture_changes: metrics.register(
                "bridge_capture_changes",
                "Committed row changes of the table topics read from the replication slot",
                Counter::default(),
            ),
            capture_checks: metrics.register(
                "bridge_capture_checks",
                "Visibility queries run for table events (one per table, class and batch)",
                Counter::default(),
            ),
            capture_events: metrics.register(
                "bridge_capture_events",
                "Table events published (one per change and permission class that sees it)",
                Counter::default(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let metrics = Metrics::new();
        let m = BridgeMetrics::register(&metrics);
        m.requests_ok.inc();
        m.queue_usage.set(0.25);
        let text = metrics.render();
        for name in [
            "pgws_bridge_notify_requests_total{outcome=\"ok\"} 1",
            "pgws_bridge_notify_requests_total{outcome=\"invalid\"} 0",
            "pgws_bridge_notify_batch_size_bucket",
            "pgws_bridge_notify_transactions_total",
            "pgws_bridge_notify_errors_total",
            "pgws_bridge_audit_copy_refused_total 0",
            "pgws_bridge_notifications_published_total",
            "pgws_bridge_notifications_unroutable_total",
            "pgws_bridge_leader 0",
            "pgws_bridge_listener_connected 0",
            "pgws_bridge_listener_reconnects_total",
            "pgws_bridge_notifications_mended_total 0",
            "pgws_bridge_notification_queue_usage 0.25",
            "pgws_bridge_direct_channels 0",
            "pgws_bridge_direct_channels_refused_total 0",
            "pgws_bridge_capture_changes_total 0",
            "pgws_bridge_capture_checks_total 0",
            "pgws_bridge_capture_events_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
