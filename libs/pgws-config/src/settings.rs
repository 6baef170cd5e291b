//! Reading raw settings and turning them into typed values while collecting problems.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use crate::keys::{self, Key, KNOWN_KEYS};

/// The merged raw settings: lower-case keys without prefix, values as text.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    values: BTreeMap<String, String>,
    unknown: Vec<String>,
}

/// Configuration could not be loaded or validated; lists every problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// One line per problem.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration:")?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// Environment variables as a figment provider that keeps every value as text (figment's own
/// `Env` would turn a JWKS document or `[..]` into a dictionary or an array).
struct RawEnv(Dict);

impl Provider for RawEnv {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable(s)")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.0.clone()))
    }
}

impl Settings {
    /// Loads settings from `vars` (the process environment in production, a list in tests)
    /// and the TOML file named by `PGWS_CONFIG_FILE` in them, if any.
    pub fn load<I, K, V>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut env = Dict::new();
        for (k, v) in vars {
            if let Some(key) = k.as_ref().strip_prefix("PGWS_") {
                env.insert(key.to_ascii_lowercase(), Value::from(v.as_ref().to_owned()));
            }
        }
        let mut figment = Figment::new();
        if let Some(file) = env.get(keys::CONFIG_FILE.name()).and_then(Value::as_str) {
            if !Path::new(file).is_file() {
                return Err(ConfigError {
                    problems: vec![format!("PGWS_CONFIG_FILE: no such file {file:?}")],
                });
            }
            figment = figment.merge(Toml::file(file));
        }
        let figment = figment.merge(RawEnv(env));
        let raw: BTreeMap<String, Value> = figment.extract().map_err(|e| ConfigError {
            problems: e.into_iter().map(|e| e.to_string()).collect(),
        })?;
        let mut values = BTreeMap::new();
        let mut problems = Vec::new();
        for (k, v) in raw {
            let key = k.to_ascii_lowercase();
            match scalar_text(&v) {
                Some(text) => {
                    values.insert(key, text);
                }
                None => problems.push(format!("{}: expected a single value", env_name(&key))),
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        let unknown = values
            .keys()
            .filter(|k| !KNOWN_KEYS.iter().any(|known| known.name() == k.as_str()))
            .map(|k| env_name(k))
            .collect();
        Ok(Self { values, unknown })
    }

    /// Settings from explicit `(PGWS_NAME, value)` pairs only (tests).
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Result<Self, ConfigError> {
        Self::load(pairs.iter().copied())
    }

    /// Keys that no service knows, as `PGWS_*` names.
    pub fn unknown_keys(&self) -> &[String] {
        &self.unknown
    }

    /// The raw text of `key`, empty values counting as unset.
    pub fn get(&self, key: Key) -> Option<&str> {
        self.values
            .get(key.name())
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(_, s) => Some(s.clone()),
        Value::Char(_, c) => Some(c.to_string()),
        Value::Bool(_, b) => Some(b.to_string()),
        Value::Num(_, n) => n
            .to_i128()
            .map(|i| i.to_string())
            .or_else(|| n.to_f64().map(|f| f.to_string())),
        Value::Empty(..) => Some(String::new()),
        Value::Dict(..) | Value::Array(..) => None,
    }
}

/// `db_uri` -> `PGWS_DB_URI`.
fn env_name(key: &str) -> String {
    format!("PGWS_{}", key.to_ascii_uppercase())
}

/// Collects problems while typed values are read from [`Settings`].
#[derive(Debug)]
pub struct Problems<'a> {
    settings: &'a Settings,
    problems: Vec<String>,
}

impl<'a> Problems<'a> {
    /// Starts reading `settings`.
    pub fn new(settings: &'a Settings) -> Self {
        Self {
            settings,
            problems: Vec::new(),
        }
    }

    /// Records a problem found by the caller's own validation.
    pub fn push(&mut self, problem: impl Into<String>) {
        self.problems.push(problem.into());
    }

    /// A text value.
    pub fn text(&self, key: Key) -> Option<String> {
        self.settings.get(key).map(str::to_owned)
    }

    /// A text value with a default.
    pub fn text_or(&self, key: Key, default: &str) -> String {
        self.text(key).unwrap_or_else(|| default.to_owned())
    }

    /// A required text value.
    pub fn required(&mut self, key: Key) -> String {
        match self.text(key) {
            Some(v) => v,
            None => {
                self.push(format!("{} is required", key));
                String::new()
            }
        }
    }

    /// A secret: `@path` reads the file (one trailing newline stripped).
    pub fn secret(&mut self, key: Key) -> Option<String> {
        let raw = self.text(key)?;
        let Some(path) = raw.strip_prefix('@') else {
            return Some(raw);
        };
        match std::fs::read_to_string(path) {
            Ok(mut s) => {
                if s.ends_with('\n') {
                    s.pop();
                    if s.ends_with('\r') {
                        s.pop();
                    }
                }
                Some(s)
            }
            Err(e) => {
                self.push(format!("{}: cannot read {path:?}: {e}", key));
                None
            }
        }
    }

    /// A parsed value, absent when unset.
    pub fn parse<T: FromStr>(&mut self, key: Key) -> Option<T>
    where
        T::Err: fmt::Display,
    {
        let raw = self.settings.get(key)?;
        match raw.trim().parse() {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(format!("{}: invalid value {raw:?}: {e}", key));
                None
            }
        }
    }

    /// A parsed value with a default.
    pub fn parse_or<T: FromStr>(&mut self, key: Key, default: T) -> T
    where
        T::Err: fmt::Display,
    {
        self.parse(key).unwrap_or(default)
    }

    /// A boolean: true/false, 1/0, yes/no, on/off.
    pub fn flag(&mut self, key: Key) -> bool {
        match self
            .settings
            .get(key)
            .map(|s| s.trim().to_ascii_lowercase())
        {
            None => false,
            Some(v) => match v.as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => {
                    self.push(format!("{}: expected true or false, got {v:?}", key));
                    false
                }
            },
        }
    }

    /// Finishes: the value built, or every problem recorded.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError {
                problems: self.problems,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_values_stay_text() {
        let s = Settings::from_pairs(&[
            ("PGWS_JWT_SECRET", r#"{"keys":[]}"#),
            ("PGWS_PORT", "3000"),
            ("PGWS_TYPO", "1"),
            ("OTHER", "x"),
        ])
        .expect("loads");
        assert_eq!(s.get(keys::JWT_SECRET), Some(r#"{"keys":[]}"#));
        assert_eq!(s.get(keys::PORT), Some("3000"));
        assert_eq!(s.unknown_keys(), ["PGWS_TYPO"]);
    }

    #[test]
    fn problems_are_all_collected() {
        let s = Settings::from_pairs(&[("PGWS_PORT", "x"), ("PGWS_RETRIES", "-1")]).expect("loads");
        let mut p = Problems::new(&s);
        let _: u16 = p.parse_or(keys::PORT, 3000);
        let _: u32 = p.parse_or(keys::RETRIES, 5);
        let _ = p.required(keys::DB_URI);
        let err = p.finish(()).expect_err("three problems");
        assert_eq!(err.problems.len(), 3, "{err}");
        assert!(err.to_string().contains("PGWS_DB_URI is required"));
    }

    #[test]
    fn flags_ignore_case() {
        // postgres-websockets' `sample-env` has `PGWS_JWT_SECRET_BASE64=False` (Haskell's `Bool`).
        for (text, value) in [
            ("False", false),
            ("TRUE", true),
            ("Yes", true),
            ("off", false),
        ] {
            let s = Settings::from_pairs(&[("PGWS_JWT_SECRET_BASE64", text)]).expect("loads");
            let mut p = Problems::new(&s);
            assert_eq!(p.flag(keys::JWT_SECRET_BASE64), value, "{text}");
            p.finish(()).expect(text);
        }
    }

    #[test]
    fn toml_file_is_below_environment() {
        let dir = std::env::temp_dir().join(format!("pgws-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("pgws.toml");
        std::fs::write(&file, "port = 4000\nlisten_channel = \"from-file\"\n").expect("write");
        let path = file.to_string_lossy().into_owned();
        let s = Settings::from_pairs(&[("PGWS_CONFIG_FILE", &path), ("PGWS_PORT", "5000")])
            .expect("loads");
        assert_eq!(s.get(keys::PORT), Some("5000"));
        assert_eq!(s.get(keys::LISTEN_CHANNEL), Some("from-file"));
        let secret = dir.join("secret");
        std::fs::write(&secret, "s3cret\n").expect("write");
        let at = format!("@{}", secret.to_string_lossy());
        let s = Settings::from_pairs(&[("PGWS_JWT_SECRET", &at)]).expect("loads");
        assert_eq!(
            Problems::new(&s).secret(keys::JWT_SECRET).as_deref(),
            Some("s3cret")
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
