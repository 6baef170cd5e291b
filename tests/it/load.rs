//! The load tool keeps working: `pgws-load` (the workspace binary next to the services) runs
//! its three modes for a second or two with small counts against a stack started here, and
//! its JSON reports hold sane figures. Nothing here is about speed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use pgws_tests::{Stack, SECRET};
use serde_json::Value;

fn load_binary() -> PathBuf {
    // target/<profile>/deps/it-xxxx -> target/<profile>/pgws-load
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(|p| p.parent())
        .map(|d| d.join("pgws-load"))
        .unwrap_or_default()
}

/// Runs `pgws-load <args> --json <file>` against `stack` and returns the parsed report.
async fn run(stack: &Stack, name: &str, args: &[&str]) -> anyhow::Result<Value> {
    let bin = load_binary();
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        bin.display()
    );
    let json = std::env::temp_dir().join(format!("{}-{name}.json", stack.prefix));
    let gateway_pid = stack.gateways[0].pid().context("gateway pid")?.to_string();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(&bin)
            .args(args)
            .args(["--gateways", &stack.ws_url(0)])
            .args(["--gateway-pid", &gateway_pid])
            .args(["--db-uri", &stack.db_uri()])
            .args(["--listen-channel", &stack.listen_channel])
            .args(["--secret", SECRET])
            .args(["--settle", "0.2", "--drain", "5"])
            .arg("--json")
            .arg(&json)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("pgws-load did not finish in 30 s")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "pgws-load {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for section in ["params:", "machine:", "figures:"] {
        anyhow::ensure!(stdout.contains(section), "no {section} in:\n{stdout}");
    }
    let text = std::fs::read_to_string(&json).context("reading the JSON report")?;
    let _ = std::fs::remove_file(&json);
    let report: Value = serde_json::from_str(&text).context("parsing the JSON report")?;
    assert_eq!(report["tool"], "pgws-load");
    assert!(report["machine"]["cores"].as_u64().unwrap_or(0) >= 1);
    Ok(report)
}

fn num(report: &Value, key: &str) -> f64 {
    report["figures"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("figure {key} missing in {report}"))
}

#[tokio::test]
async fn the_load_tool_runs_its_three_modes() -> anyhow::Result<()> {
    let stack = Stack::start().await?;

    let fanout = run(
        &stack,
        "fanout",
        &[
            "fanout",
            "--channels",
            "2",
            "--subscribers",
            "5",
            "--rate",
            "50",
            "--seconds",
            "2",
        ],
    )
    .await?;
    assert_eq!(fanout["mode"], "fanout");
    assert_eq!(num(&fanout, "opened"), 10.0);
    assert_eq!(num(&fanout, "published"), 100.0);
    let deliveries = num(&fanout, "deliveries");
    assert!(deliveries > 0.0, "{fanout}");
    assert!(deliveries <= num(&fanout, "expected_deliveries"));
    assert!(num(&fanout, "deliveries_per_s") > 0.0);
    let latency = &fanout["figures"]["latency"];
    for q in ["p50_ms", "p99_ms", "p99_9_ms"] {
        assert!(latency[q].as_f64().is_some_and(|v| v > 0.0), "{latency}");
    }

    let idle = run(
        &stack,
        "idle",
        &["idle", "--sockets", "20", "--hold", "0.5"],
    )
    .await?;
    assert_eq!(num(&idle, "opened"), 20.0);
    assert!(num(&idle, "handshakes_per_s") > 0.0);
    assert!(idle["figures"]["server_rss_per_socket_bytes"].is_number());

    let ingest = run(
        &stack,
        "ingest",
        &[
            "ingest",
            "--sockets",
            "4",
            "--seconds",
            "1",
            "--baseline-connections",
            "2",
        ],
    )
    .await?;
    assert!(num(&ingest, "ingest_msgs_per_s") > 0.0, "{ingest}");
    assert!(num(&ingest, "baseline_msgs_per_s") > 0.0, "{ingest}");
    assert!(num(&ingest, "ratio_to_baseline") > 0.0);
    Ok(())
}
