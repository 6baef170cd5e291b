//! What every pgws service shares: the `main` skeleton, logs, the admin listener with
//! health, readiness and Prometheus metrics, ordered shutdown, the NATS connection, and
//! telemetry (logs, OpenTelemetry traces and their context in NATS headers).
//!
//! A service's `main.rs` is one call to [`run_main`]; its library takes its configuration and
//! a [`Shutdown`] so tests run exactly what ships.

mod admin;
mod audit;
mod host;
mod launch;
mod metrics;
mod nats;
mod shutdown;
pub mod telemetry;

pub use admin::{serve_admin, Readiness};
pub use audit::{
    audit_stream_config, await_audit_stream, ensure_audit_stream, ensure_history_stream,
    history_stream_config,
};
pub use host::Host;
pub use launch::{install_crypto_provider, run_main};
pub use metrics::Metrics;
pub use nats::{connect_nats, flush_at_stop, NatsLink};
pub use shutdown::{wait_for_signal, Shutdown};
pub use telemetry::{init_telemetry, Telemetry};

pub use prometheus_client;
