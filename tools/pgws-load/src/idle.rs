//! `idle`: N sockets opened and held; the handshake rate, and the server's resident memory
//! per socket (VmRSS of the server processes before the first socket and after the last,
//! once the sockets have been held open for `--hold` seconds).

use std::time::Duration;

use serde_json::json;

use crate::args::Opts;
use crate::client;
use crate::fleet::{Drain, Fleet};
use crate::procfs;
use crate::report::{round, Report};

/// Runs `idle`.
pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    let mut report = Report::new(opts);
    report.param("sockets", opts.sockets);
    report.param("channels", opts.channels);
    report.param("hold_secs", opts.hold);
    report.param("per_process", opts.per_process);
    report.param("concurrency", opts.concurrency as u64);
    let pids = client::server_pids(opts);
    report.servers(&pids);
    let rss_before = procfs::total_rss_kib(&pids);
    let (fleet, opened) = Fleet::open(opts).await?;
    tokio::time::sleep(Duration::from_secs_f64(opts.hold)).await;
    let rss_after = procfs::total_rss_kib(&pids);
    let finished = fleet.finish(|_| 0, Drain::of(opts)).await?;

    report.figure("opened", opened.opened);
    report.figure("failed", opened.failed);
    if let Some(e) = &opened.first_error {
        report.figure("first_error", e.as_str());
    }
    report.figure("closed_while_held", finished.closed);
    report.figure("load_processes", opened.processes as u64);
    report.figure("connect_secs", round(opened.connect_secs, 3));
    report.figure(
        "handshakes_per_s",
        round(opened.opened as f64 / opened.connect_secs.max(1e-9), 0),
    );
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        let per = (after.saturating_sub(before) * 1024) as f64 / opened.opened.max(1) as f64;
        report.figure("server_rss_before_kib", before);
        report.figure("server_rss_after_kib", after);
        report.figure("server_rss_per_socket_bytes", round(per, 0));
        report.figure("server_rss_per_socket_kib", round(per / 1024.0, 2));
    } else {
        report.figure("server_rss_per_socket_bytes", json!(null));
    }
    report.figure("load_rss_kib", finished.rss_kib);
    report.finish(opts.json.as_deref())?;
    if opened.opened == 0 {
        anyhow::bail!("no socket could be opened");
    }
    Ok(())
}
