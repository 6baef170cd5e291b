//! The `main` every service shares: load settings, validate, init logs and traces, run until
//! a signal, flush the traces.

use std::future::Future;
use std::process::ExitCode;

use pgws_config::{ConfigError, Settings};

use crate::{init_telemetry, wait_for_signal, Shutdown};

/// Exit code for invalid configuration (EX_USAGE, as sysexits.h).
const EXIT_CONFIG: u8 = 64;

/// Runs a service: `configure` validates the settings (every problem reported at once, exit
/// 64), `run` serves until the shutdown token is cancelled by SIGTERM/SIGINT and must return
/// after draining its work.
pub fn run_main<C, F, Fut>(
    service: &str,
    configure: impl FnOnce(&Settings) -> Result<C, ConfigError>,
    run: F,
) -> ExitCode
where
    F: FnOnce(C, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let settings = match Settings::load(std::env::vars()) {
        Ok(s) => s,
        Err(e) => return config_failure(service, &e),
    };
    let config = match configure(&settings) {
        Ok(c) => c,
        Err(e) => return config_failure(service, &e),
    };
    install_crypto_provider();
    let telemetry = match init_telemetry(&settings, service) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{service}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for key in settings.unknown_keys() {
        tracing::warn!(key, "unknown setting ignored");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{service}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = Shutdown::new();
        let token = shutdown.token.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            token.cancel();
        });
        run(config, shutdown).await
    });
    // The runtime goes first: what its tasks still held is dropped, then the spans are flushed.
    drop(runtime);
    telemetry.shutdown();
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "fatal");
            eprintln!("{service}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Makes ring the crypto provider of every rustls client of the process. The HTTP clients
/// (reqwest: the OTLP exporter, the gateway's JWKS fetches) are built with rustls but without
/// a provider of their own, so that ring, which NATS and the websocket listener use, stays
/// the only crypto library; without a provider they could not be built. Idempotent.
pub fn install_crypto_provider() {
    // An error means a provider is already installed, which is what is wanted.
    drop(tokio_rustls::rustls::crypto::ring::default_provider().install_default());
}

fn config_failure(service: &str, e: &ConfigError) -> ExitCode {
    eprintln!("{service}: {e}");
    ExitCode::from(EXIT_CONFIG)
}
