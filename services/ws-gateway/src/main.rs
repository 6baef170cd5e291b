//! The `ws-gateway` binary: see the library for what it does.

fn main() -> std::process::ExitCode {
    pgws_service::run_main(
        "ws-gateway",
        ws_gateway::GatewayConfig::from_settings,
        ws_gateway::run,
    )
}
