//! Configuration shared by every pgws service.
//!
//! Sources, lowest to highest priority: built-in defaults, an optional TOML file (path in
//! `PGWS_CONFIG_FILE`, keys without the `PGWS_` prefix, lower case), then `PGWS_*` environment
//! variables. One env file configures the whole stack; each service reads the keys it needs
//! through [`Settings`] and reports every problem at once ([`Problems`]), never at first use.
//! Values starting with `@` are read from the named file where a setting says so (secrets).

mod direct;
mod sections;
mod settings;

pub use direct::DirectChannels;
pub use sections::{AdminConfig, AuditConfig, DbConfig, NatsAuth, NatsConfig};
pub use settings::{ConfigError, Problems, Settings, KNOWN_KEYS};
