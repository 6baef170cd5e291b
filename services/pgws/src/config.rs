//! The settings of the one-process `pgws`: each role's own, read from the same `PGWS_*`
//! settings and config file as the service binaries read them, plus where the roles talk (the
//! in-process bus, or NATS when `PGWS_NATS_URL` is set) and the one admin listener.

use pg_bridge::BridgeConfig;
use pg_recorder::RecorderConfig;
use pgws_config::{keys, AdminConfig, ConfigError, Problems, Settings};
use ws_gateway::GatewayConfig;

/// The default admin port of `pgws` (`PGWS_ADMIN_PORT`): the gateway's.
pub const DEFAULT_ADMIN_PORT: u16 = 9100;

/// Everything `pgws` runs with.
#[derive(Debug, Clone)]
pub struct PgwsConfig {
    pub gateway: GatewayConfig,
    pub bridge: BridgeConfig,
    /// The recorder's settings, when the audit is on (`PGWS_AUDIT`, the default).
    pub recorder: Option<RecorderConfig>,
    /// The roles talk over NATS (`PGWS_NATS_URL` set); otherwise over the in-process bus and no
    /// connection to NATS is made.
    pub over_nats: bool,
    /// The one admin listener (`PGWS_ADMIN_HOST`, `PGWS_ADMIN_PORT`): health, readiness and
    /// metrics of every role.
    pub admin: AdminConfig,
}

impl PgwsConfig {
    /// Reads and validates every role's settings, reporting every problem at once.
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let mut keep = |e: ConfigError| problems.extend(e.problems);
        let gateway = GatewayConfig::from_settings(settings)
            .map_err(&mut keep)
            .ok();
        let bridge = BridgeConfig::from_settings(settings)
            .map_err(&mut keep)
            .ok();
        let audit = gateway.as_ref().is_some_and(|g| g.audit.enabled);
        let recorder = if audit {
            RecorderConfig::from_settings(settings)
                .map_err(&mut keep)
                .ok()
        } else {
            None
        };
        let mut p = Problems::new(settings);
        let admin = AdminConfig::read(&mut p, DEFAULT_ADMIN_PORT);
        if let Err(e) = p.finish(()) {
            keep(e);
        }
        // Each problem once (several roles read the same settings).
        let mut seen = std::collections::BTreeSet::new();
        problems.retain(|p| seen.insert(p.clone()));
        match (gateway, bridge) {
            (Some(gateway), Some(bridge)) if problems.is_empty() => Ok(Self {
                gateway,
                bridge,
                recorder,
                over_nats: settings.get(keys::NATS_URL).is_some(),
                admin,
            }),
            _ => Err(ConfigError { problems }),
        }
    }
}
