//! The recorder's metrics.

use pgws_service::prometheus_client::metrics::counter::Counter;
use pgws_service::prometheus_client::metrics::family::Family;
use pgws_service::prometheus_client::metrics::gauge::Gauge;
use pgws_service::prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use pgws_service::Metrics;

type Labels = [(&'static str, &'static str); 1];

/// Handles to every recorder metric.
#[derive(Clone, Debug)]
pub(crate) struct RecorderMetrics {
    pub(crate) rows: Counter,
    pub(crate) duplicates: Counter,
    pub(crate) dead_letters: Counter,
    pub(crate) notify_failures: Counter,
    pub(crate) dispatched: Counter,
    pub(crate) batches: Family<Labels, Counter>,
    pub(crate) batch_size: Histogram,
    pub(crate) commit_seconds: Histogram,
    pub(crate) pending: Gauge,
}

impl RecorderMetrics {
    pub(crate) fn register(m: &Metrics) -> Self {
        Self {
            rows: m.register(
                "recorder_rows",
                "Rows inserted into pgws_audit.messages",
                Counter::default(),
            ),
            duplicates: m.register(
                "recorder_duplicates",
                "Redelivered records already written (skipped by id)",
                Counter::default(),
            ),
            dead_letters: m.register(
                "recorder_dead_letters",
                "Malformed records stored in pgws_audit.dead_letters",
                Counter::default(),
            ),
            notify_failures: m.register(
                "recorder_notify_failures",
                "Recorded messages whose NOTIFY failed, stored in pgws_audit.notify_failures",
                Counter::default(),
            ),
            dispatched: m.register(
                "recorder_dispatched",
                "Dispatcher function calls (dispatcher mode)",
                Counter::default(),
            ),
            batches: m.register(
                "recorder_batches",
                "Batches, by outcome (committed; retried; conflict: a COPY met an existing row)",
                Family::default(),
            ),
            batch_size: m.register(
                "recorder_batch_size",
                "Records per committed batch",
                Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            ),
            commit_seconds: m.register(
                "recorder_commit_seconds",
                "Time to write and commit a batch",
                Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            ),
            pending: m.register(
                "recorder_pending_messages",
                "Audit records not yet recorded (consumer pending + unacknowledged): the lag",
                Gauge::default(),
            ),
        }
    }
}

/// The metrics of in-transaction writes ([`crate::prepare_in_process`]): the statement runs in
/// the bridge's transactions, so what it commits is not seen here; what is counted is what it
/// was given.
#[derive(Clone, Debug)]
pub(crate) struct InProcessMetrics {
    /// By outcome: `recorded` (a row, or a dispatcher call, unless written before) or
    /// `dead_letter`.
    pub(crate) records: Family<Labels, Counter>,
    /// Upkeep runs, by outcome (`ok`, `failed`).
    pub(crate) upkeep_runs: Family<Labels, Counter>,
}

impl InProcessMetrics {
    pub(crate) fn register(m: &Metrics) -> Self {
        Self {
            records: m.register(
                "recorder_in_transaction_records",
                "Audit records given to the in-transaction COPY or statement, by outcome (recorded; dead_letter: malformed). Counted when the COPY data or the statement's parameters are made: a NOTIFY transaction rolled back or run again counts again",
                Family::default(),
            ),
            upkeep_runs: m.register(
                "recorder_upkeep_runs",
                "Upkeep runs of in-transaction writes (the coming days' partitions, retention, ledger pruning), by outcome (ok; failed: retried in 30 s, readiness check audit fails)",
                Family::default(),
            ),
        }
    }
}
