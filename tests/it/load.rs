//! The load tool keeps working: `pgws-load` (the workspace binary next to the services) runs
//! its four modes for a second or two with small counts against a stack started here, and
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

/// What a fan-out report (`fanout` or `pubsub`) of 10 sockets and 100 messages holds.
fn assert_fanned_out(report: &Value) {
    assert_eq!(num(report, "opened"), 10.0, "{report}");
    assert_eq!(num(report, "published"), 100.0);
    let deliveries = num(report, "deliveries");
    assert!(deliveries > 0.0, "{report}");
    assert!(deliveries <= num(report, "expected_deliveries"));
    assert!(num(report, "deliveries_per_s") > 0.0);
    let latency = &report["figures"]["latency"];
    for q in ["p50_ms", "p99_ms", "p99_9_ms"] {
        assert!(latency[q].as_f64().is_some_and(|v| v > 0.0), "{latency}");
    }
}

#[tokio::test]
async fn the_load_tool_runs_its_four_modes() -> anyhow::Result<()> {
    let stack = Stack::start().await?;

    // 2 channels (topics) of 5 sockets, 100 messages.
    let shape = ["--subscribers", "5", "--rate", "50", "--seconds", "2"];
    let fanout = run(
        &stack,
        "fanout",
        &[&["fanout", "--channels", "2"], &shape[..]].concat(),
    )
    .await?;
    assert_eq!(fanout["mode"], "fanout");
    assert_fanned_out(&fanout);

    // wspubsub: the tool provisions its own key, publishes over websockets, and every frame
    // reaches every subscriber of its topic in order.
    let pubsub = run(
        &stack,
        "pubsub",
        &[&["pubsub", "--topics", "2", "--binary"], &shape[..]].concat(),
    )
    .await?;
    assert_eq!(pubsub["mode"], "pubsub");
    assert_fanned_out(&pubsub);
    assert_eq!(num(&pubsub, "publishers"), 2.0);
    assert_eq!(num(&pubsub, "publishers_closed"), 0.0);
    assert_eq!(num(&pubsub, "out_of_order"), 0.0, "{pubsub}");
    let domain = pubsub["params"]["domain"].as_str().unwrap_or_default();
    let left = stack
        .pg()
        .await?
        .query("SELECT 1 FROM apikeys WHERE domain = $1", &[&domain])
        .await?;
    assert!(left.is_empty(), "the run's key stays in apikeys");

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
