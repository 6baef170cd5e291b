//! The `pg-recorder` binary: see the library.

fn main() -> std::process::ExitCode {
    pgws_service::run_main(
        "pg-recorder",
        pg_recorder::RecorderConfig::from_settings,
        pg_recorder::run,
    )
}
