//! Structured logs with `tracing`: text by default, JSON lines with `PGWS_LOG_FORMAT=json`;
//! the filter comes from `PGWS_LOG` (then `RUST_LOG`), default `info`.

use std::io::IsTerminal;

use pgws_config::Settings;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber (once; later calls are ignored).
pub fn init_logs(settings: &Settings) {
    let filter = settings
        .get("log")
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_owned());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = if settings.get("log_format") == Some("json") {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    drop(result);
}
