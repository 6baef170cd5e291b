//! Ordered shutdown: one token that says "stop", one tracker that owns every spawned task.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The stop signal and the owner of a service's tasks.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Cancelled when the service must stop.
    pub token: CancellationToken,
    /// Every task of the service, so shutdown can wait for them.
    pub tracker: TaskTracker,
}

impl Shutdown {
    /// A fresh pair.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns an owned task.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// Closes the tracker and waits for every task, at most `grace`; returns false when some
    /// were still running.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => drop(ctrl_c.await),
        }
    }
    #[cfg(not(unix))]
    drop(ctrl_c.await);
}
