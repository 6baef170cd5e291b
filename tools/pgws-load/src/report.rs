//! A run's report: mode, target, parameters, machine and figures, printed as aligned text and
//! optionally written as JSON (`--json FILE`) for `bench/plot.py` and the comparison script.

use std::path::Path;

use anyhow::Context;
use serde_json::{json, Map, Value};

use crate::args::Opts;
use crate::machine;

/// A report being filled.
pub struct Report {
    params: Map<String, Value>,
    figures: Map<String, Value>,
    mode: &'static str,
    target: &'static str,
    label: Option<String>,
    machine: Value,
}

impl Report {
    /// A report for `opts`, with the machine read now (before the load).
    pub fn new(opts: &Opts) -> Self {
        let mut params = Map::new();
        params.insert("gateways".into(), json!(opts.gateways));
        Self {
            params,
            figures: Map::new(),
            mode: opts.mode.name(),
            target: opts.target.name(),
            label: opts.label.clone(),
            machine: machine::describe(),
        }
    }

    /// Adds a parameter.
    pub fn param(&mut self, key: &str, value: impl Into<Value>) {
        self.params.insert(key.to_owned(), value.into());
    }

    /// Adds the `server_processes` parameter: the measured processes' pids and names.
    pub fn servers(&mut self, pids: &[u32]) {
        let servers: Vec<Value> = pids
            .iter()
            .map(|p| json!({"pid": p, "name": crate::procfs::comm(*p)}))
            .collect();
        self.param("server_processes", servers);
    }

    /// Adds a figure.
    pub fn figure(&mut self, key: &str, value: impl Into<Value>) {
        self.figures.insert(key.to_owned(), value.into());
    }

    /// The whole report as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "tool": "pgws-load",
            "mode": self.mode,
            "target": self.target,
            "label": self.label,
            "unix_time": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            "params": self.params,
            "machine": self.machine,
            "figures": self.figures,
        })
    }

    /// Prints the report and writes the JSON file if one was asked for.
    pub fn finish(&self, json_file: Option<&Path>) -> anyhow::Result<()> {
        println!("pgws-load {} (target {})", self.mode, self.target);
        if let Some(label) = &self.label {
            println!("label: {label}");
        }
        println!("params:");
        print_map(&self.params);
        println!("machine:");
        if let Value::Object(m) = &self.machine {
            print_map(m);
        }
        println!("figures:");
        print_map(&self.figures);
        if let Some(path) = json_file {
            let text = serde_json::to_string_pretty(&self.to_json())?;
            std::fs::write(path, text + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
            println!("json: {}", path.display());
        }
        Ok(())
    }
}

fn print_map(map: &Map<String, Value>) {
    let width = map.keys().map(String::len).max().unwrap_or(0);
    for (k, v) in map {
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Object(inner) => inner
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
            other => other.to_string(),
        };
        println!("  {k:<width$}  {text}");
    }
}

/// `x` rounded to `digits` decimals.
pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}
