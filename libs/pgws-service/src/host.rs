//! What the process running a role (gateway, bridge, recorder) gives it: the bus it talks
//! over, and the metrics registry and readiness checks that the process's admin listener
//! serves. A service binary builds one on NATS for its one role; `pgws` builds one for its
//! three roles, on the in-process bus or on NATS.

use tokio::sync::watch;

use crate::{Metrics, Readiness};

/// A role's share of its process.
#[derive(Clone)]
pub struct Host {
    /// The bus the role talks over.
    pub bus: pgws_bus::Client,
    /// How many times the bus connection came back after it was lost (never, in one process).
    pub reconnects: watch::Receiver<u64>,
    /// Where the role registers its metrics.
    pub metrics: Metrics,
    /// Where the role registers its readiness checks.
    pub readiness: Readiness,
    /// The history of delivered messages that resuming sockets are served from, when one is
    /// kept ([`Host::with_history`]).
    pub history: Option<std::sync::Arc<dyn pgws_bus::History>>,
    /// Keeps `reconnects` open on a bus that never reconnects.
    _reconnected: Option<std::sync::Arc<watch::Sender<u64>>>,
}

impl Host {
    /// A host on a bus that never reconnects (the in-process bus).
    pub fn local(bus: pgws_bus::Client, metrics: Metrics, readiness: Readiness) -> Self {
        let (tx, reconnects) = watch::channel(0);
        Self {
            bus,
            reconnects,
            metrics,
            readiness,
            history: None,
            _reconnected: Some(std::sync::Arc::new(tx)),
        }
    }

    /// A host on a NATS connection.
    pub fn nats(link: &crate::NatsLink, metrics: Metrics, readiness: Readiness) -> Self {
        Self {
            bus: link.bus(),
            reconnects: link.reconnects.clone(),
            metrics,
            readiness,
            history: None,
            _reconnected: None,
        }
    }

    /// The same host, keeping `history`.
    #[must_use]
    pub fn with_history(mut self, history: std::sync::Arc<dyn pgws_bus::History>) -> Self {
        self.history = Some(history);
        self
    }
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("reconnects", &*self.reconnects.borrow())
            .field("readiness", &self.readiness)
            .finish_non_exhaustive()
    }
}
