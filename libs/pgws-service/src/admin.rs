//! The admin listener: `GET /healthz` (the process runs), `GET /readyz` (its dependencies are
//! connected) and `GET /metrics` (Prometheus text).

use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Metrics;

type Check = Arc<dyn Fn() -> bool + Send + Sync>;

/// Named readiness checks; `/readyz` is 200 only when all pass.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<RwLock<Vec<(String, Check)>>>,
}

impl Readiness {
    /// No checks yet (ready).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check, evaluated at each `/readyz`.
    pub fn add(&self, name: &str, check: impl Fn() -> bool + Send + Sync + 'static) {
        if let Ok(mut c) = self.checks.write() {
            c.push((name.to_owned(), Arc::new(check)));
        }
    }

    /// The names of the failing checks (empty when ready).
    pub fn failing(&self) -> Vec<String> {
        let checks = match self.checks.read() {
            Ok(c) => c.clone(),
            Err(_) => return vec!["poisoned".to_owned()],
        };
        checks
            .iter()
            .filter(|(_, check)| !check())
            .map(|(name, _)| name.clone())
            .collect()
    }
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("failing", &self.failing())
            .finish()
    }
}

#[derive(Clone)]
struct AdminState {
    readiness: Readiness,
    metrics: Metrics,
}

/// Serves the admin endpoints on `listener` until `shutdown` is cancelled.
pub async fn serve_admin(
    listener: TcpListener,
    readiness: Readiness,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AdminState { readiness, metrics });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let failing = s.readiness.failing();
    if failing.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", failing.join(", ")),
        )
    }
}

async fn metrics_text(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}
