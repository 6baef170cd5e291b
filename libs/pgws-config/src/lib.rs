//! Configuration shared by every pgws service.
//!
//! Sources, lowest to highest priority: built-in defaults, an optional TOML file (path in
//! `PGWS_CONFIG_FILE`, keys without the `PGWS_` prefix, lower case), then `PGWS_*` environment
//! variables. One env file configures the whole stack; each service reads the keys it needs
//! through [`Settings`] by their [`Key`]s ([`keys`]) and reports every problem at once ([`Problems`]), never at first use.
//! Values starting with `@` are read from the named file where a setting says so (secrets).

mod direct;
pub mod keys;
mod sections;
mod settings;

pub use direct::DirectChannels;
pub use keys::{Key, KNOWN_KEYS};
pub use sections::{
    AdminConfig, AuditConfig, DbConfig, HistoryConfig, NatsAuth, NatsConfig, DEFAULT_ADMIN_PORTS,
};
pub use settings::{ConfigError, Problems, Settings};
