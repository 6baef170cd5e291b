//! The machine a run was taken on: cores, CPU model, memory, kernel and load average, read
//! from /proc so that every report says where its figures come from.

use serde_json::{json, Value};

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The CPU model (`model name` of /proc/cpuinfo).
pub fn cpu_model() -> String {
    read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Total memory in bytes.
pub fn memory_bytes() -> u64 {
    read("/proc/meminfo")
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("MemTotal:")?;
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
        * 1024
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> Vec<f64> {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// The machine as JSON.
pub fn describe() -> Value {
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu": cpu_model(),
        "memory_gib": (memory_bytes() as f64 / (1u64 << 30) as f64 * 10.0).round() / 10.0,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "load_average": load_average(),
    })
}
