//! The Prometheus registry of a service, rendered as text on `/metrics`.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::{Metric, Registry};

/// A registry shared by the components of one service. Register at start-up, render on
/// scrape; metric handles themselves are lock-free.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    /// The names registered, in order (without the prefix).
    names: Arc<Mutex<Vec<String>>>,
}

impl Metrics {
    /// An empty registry; every name gets the `pgws_` prefix.
    pub fn new() -> Self {
        Self {
            registry: Arc::new(Mutex::new(Registry::with_prefix("pgws"))),
            names: Arc::default(),
        }
    }

    /// Registers a metric and returns it.
    pub fn register<M: Metric + Clone>(&self, name: &str, help: &str, metric: M) -> M {
        if let Ok(mut r) = self.registry.lock() {
            r.register(name, help, metric.clone());
        }
        if let Ok(mut names) = self.names.lock() {
            names.push(name.to_owned());
        }
        metric
    }

    /// The names registered, in order, without the `pgws_` prefix (counters are scraped with
    /// `_total` added).
    pub fn names(&self) -> Vec<String> {
        self.names.lock().map(|n| n.clone()).unwrap_or_default()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            // Writing into a String cannot fail.
            let _ = encode(&mut out, &r);
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}
