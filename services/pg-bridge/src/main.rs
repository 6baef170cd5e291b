//! The pg-bridge binary: everything lives in the library so tests run what ships.

fn main() -> std::process::ExitCode {
    pgws_service::run_main(
        "pg-bridge",
        pg_bridge::BridgeConfig::from_settings,
        pg_bridge::run,
    )
}
