//! The `pgws` binary: see the library for what it does.

fn main() -> std::process::ExitCode {
    pgws_service::run_main("pgws", pgws::PgwsConfig::from_settings, pgws::run)
}
