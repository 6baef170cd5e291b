//! A fleet of receiving sockets, in this process or spread over child processes of this
//! binary when there are more than `--per-process` sockets.
//!
//! Child protocol (JSON lines on the child's stdout, commands on its stdin):
//! the child opens sockets `A..B`, prints `{"ready":{...}}`, waits for `stop <expected>`,
//! waits until `expected` deliveries arrived (or they stop coming), prints `{"done":{...}}`
//! with its latency histogram, and exits.

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;

use crate::args::Opts;
use crate::client::{self, Endpoint};
use crate::procfs;
use crate::stats::{self, RxStats};

/// How opening the sockets went.
#[derive(Debug, Clone, Default)]
pub struct Opened {
    /// Sockets open and subscribed.
    pub opened: u64,
    /// Sockets that failed.
    pub failed: u64,
    /// Seconds from the first connect to the last handshake (the longest over processes).
    pub connect_secs: f64,
    /// The first failure.
    pub first_error: Option<String>,
    /// Processes holding sockets.
    pub processes: usize,
}

/// What the fleet received.
pub struct Finished {
    /// Timestamped deliveries.
    pub received: u64,
    /// Latencies.
    pub hist: Histogram<u64>,
    /// Unix µs of the last delivery.
    pub last_rx_us: u64,
    /// Sockets that ended early.
    pub closed: u64,
    /// Deliveries that came after a later one on the same socket.
    pub out_of_order: u64,
    /// CPU seconds of the processes holding the sockets (this one included).
    pub cpu_secs: f64,
    /// RSS of the processes holding the sockets, KiB.
    pub rss_kib: u64,
}

/// How long a fleet waits for its deliveries once the publishing is over.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    /// At most this long (`--drain`).
    pub longest: Duration,
    /// And no longer than this without a new delivery (`--quiet`).
    pub quiet: Duration,
}

impl Drain {
    /// The drain of `opts`.
    pub fn of(opts: &Opts) -> Self {
        Self {
            longest: Duration::from_secs_f64(opts.drain),
            quiet: Duration::from_secs_f64(opts.quiet),
        }
    }
}

/// Sockets held by this process.
pub struct Local {
    range: (u64, u64),
    stats: Arc<RxStats>,
    tasks: Vec<JoinHandle<()>>,
}

/// Opens sockets `range` in this process.
pub async fn open_local(opts: &Opts, range: (u64, u64)) -> anyhow::Result<(Local, Opened)> {
    let eps: Arc<Vec<Endpoint>> = Arc::new(client::resolve_all(opts).await?);
    let token = client::token(opts, &json!({"mode": "r"}))?;
    let stats = Arc::new(RxStats::default());
    let started = Instant::now();
    let opts_arc = Arc::new(opts.clone());
    let mut results = futures::stream::iter(range.0..range.1)
        .map(|g| {
            let (opts, eps, token) = (Arc::clone(&opts_arc), Arc::clone(&eps), token.clone());
            async move { (g, client::subscribe(&opts, &eps, &token, g).await) }
        })
        .buffer_unordered(opts.concurrency);
    let mut tasks = Vec::with_capacity((range.1 - range.0) as usize);
    let mut opened = Opened {
        processes: 1,
        ..Opened::default()
    };
    while let Some((g, result)) = results.next().await {
        match result {
            Ok(sub) => {
                opened.opened += 1;
                tasks.push(tokio::spawn(client::receive(
                    sub,
                    Arc::clone(&stats),
                    g as usize,
                )));
            }
            Err(e) => {
                opened.failed += 1;
                if opened.first_error.is_none() {
                    opened.first_error = Some(format!("{e:#}"));
                }
            }
        }
    }
    opened.connect_secs = started.elapsed().as_secs_f64();
    Ok((
        Local {
            range,
            stats,
            tasks,
        },
        opened,
    ))
}

impl Local {
    /// Deliveries so far.
    pub fn received(&self) -> u64 {
        self.stats.received.load(Ordering::Relaxed)
    }

    /// Waits for `expected` deliveries as `drain` says, then closes the sockets.
    pub async fn finish(self, expected: u64, drain: Drain) -> Finished {
        let deadline = Instant::now() + drain.longest;
        let mut last = self.received();
        let mut last_change = Instant::now();
        while self.received() < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.received();
            if now != last {
                last = now;
                last_change = Instant::now();
            } else if last_change.elapsed() > drain.quiet {
                break;
            }
        }
        let closed = self.stats.closed.load(Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
        let me = std::process::id();
        Finished {
            received: self.received(),
            hist: self.stats.merged(),
            last_rx_us: self.stats.last_rx_us.load(Ordering::Relaxed),
            closed,
            out_of_order: self.stats.out_of_order.load(Ordering::Relaxed),
            cpu_secs: procfs::cpu_secs(me).unwrap_or(0.0),
            rss_kib: procfs::rss_kib(me).unwrap_or(0),
        }
    }
}

/// A child process holding sockets `range`.
pub struct ChildProc {
    range: (u64, u64),
    child: Child,
    stdin: ChildStdin,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl ChildProc {
    async fn message(&mut self, key: &str) -> anyhow::Result<Value> {
        loop {
            let line = self
                .lines
                .next_line()
                .await?
                .with_context(|| format!("child {:?} exited before {key}", self.range))?;
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if let Some(inner) = v.get(key) {
                    return Ok(inner.clone());
                }
            }
        }
    }
}

/// Receiving sockets, here or in children.
pub enum Fleet {
    /// All in this process.
    Local(Local),
    /// In child processes.
    Children(Vec<ChildProc>),
}

/// `total` sockets split into shares of at most `per` each, as even as possible.
pub fn shares(total: u64, per: u64) -> Vec<(u64, u64)> {
    let n = total.div_ceil(per.max(1)).max(1);
    (0..n)
        .map(|i| (total * i / n, total * (i + 1) / n))
        .collect()
}

impl Fleet {
    /// Opens `opts.sockets` receiving sockets and returns once all are open (or failed).
    pub async fn open(opts: &Opts) -> anyhow::Result<(Self, Opened)> {
        if let Some(range) = opts.child {
            let (local, opened) = open_local(opts, range).await?;
            return Ok((Self::Local(local), opened));
        }
        if opts.sockets <= opts.per_process {
            let (local, opened) = open_local(opts, (0, opts.sockets)).await?;
            return Ok((Self::Local(local), opened));
        }
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut children = Vec::new();
        for range in shares(opts.sockets, opts.per_process) {
            let mut cmd = Command::new(&exe);
            cmd.args(&opts.argv)
                .args(["--run-id", &opts.run_id])
                .args(["--child", &format!("{}:{}", range.0, range.1)])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            let mut child = cmd.spawn().context("starting a child process")?;
            let stdin = child.stdin.take().context("child stdin")?;
            let stdout = child.stdout.take().context("child stdout")?;
            children.push(ChildProc {
                range,
                child,
                stdin,
                lines: BufReader::new(stdout).lines(),
            });
        }
        let mut opened = Opened {
            processes: children.len(),
            ..Opened::default()
        };
        for c in &mut children {
            let r = c.message("ready").await?;
            opened.opened += r["opened"].as_u64().unwrap_or(0);
            opened.failed += r["failed"].as_u64().unwrap_or(0);
            opened.connect_secs = opened
                .connect_secs
                .max(r["connect_secs"].as_f64().unwrap_or(0.0));
            if opened.first_error.is_none() {
                opened.first_error = r["first_error"].as_str().map(str::to_owned);
            }
        }
        Ok((Self::Children(children), opened))
    }

    /// Asks for `expected(range)` deliveries per share, waits for them, and sums the shares.
    pub async fn finish(
        self,
        expected: impl Fn((u64, u64)) -> u64,
        drain: Drain,
    ) -> anyhow::Result<Finished> {
        match self {
            Self::Local(local) => {
                let n = expected(local.range);
                Ok(local.finish(n, drain).await)
            }
            Self::Children(mut children) => {
                for c in &mut children {
                    let line = format!("stop {}\n", expected(c.range));
                    c.stdin.write_all(line.as_bytes()).await?;
                    c.stdin.flush().await?;
                }
                let mut all = Finished {
                    received: 0,
                    hist: stats::histogram(),
                    last_rx_us: 0,
                    closed: 0,
                    out_of_order: 0,
                    cpu_secs: procfs::cpu_secs(std::process::id()).unwrap_or(0.0),
                    rss_kib: procfs::rss_kib(std::process::id()).unwrap_or(0),
                };
                for c in &mut children {
                    let d = c.message("done").await?;
                    all.received += d["received"].as_u64().unwrap_or(0);
                    all.closed += d["closed"].as_u64().unwrap_or(0);
                    all.out_of_order += d["out_of_order"].as_u64().unwrap_or(0);
                    all.last_rx_us = all.last_rx_us.max(d["last_rx_us"].as_u64().unwrap_or(0));
                    all.cpu_secs += d["cpu_secs"].as_f64().unwrap_or(0.0);
                    all.rss_kib += d["rss_kib"].as_u64().unwrap_or(0);
                    if let Some(h) = d["hist"].as_str() {
                        let h = stats::decode(h)?;
                        let _ = all.hist.add(&h);
                    }
                }
                for c in &mut children {
                    let _ = tokio::time::timeout(Duration::from_secs(5), c.child.wait()).await;
                }
                Ok(all)
            }
        }
    }
}

/// The child's side: open the share, report, wait for `stop`, report again.
pub async fn serve_child(opts: &Opts) -> anyhow::Result<()> {
    let Some(range) = opts.child else {
        bail!("not a child");
    };
    let (local, opened) = open_local(opts, range).await?;
    println!(
        "{}",
        json!({"ready": {
            "opened": opened.opened,
            "failed": opened.failed,
            "connect_secs": opened.connect_secs,
            "first_error": opened.first_error,
        }})
    );
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let expected = loop {
        match stdin.next_line().await? {
            Some(line) => {
                if let Some(n) = line.strip_prefix("stop") {
                    break n.trim().parse::<u64>().unwrap_or(0);
                }
            }
            None => break 0,
        }
    };
    let f = local.finish(expected, Drain::of(opts)).await;
    println!(
        "{}",
        json!({"done": {
            "received": f.received,
            "closed": f.closed,
            "out_of_order": f.out_of_order,
            "last_rx_us": f.last_rx_us,
            "cpu_secs": f.cpu_secs,
            "rss_kib": f.rss_kib,
            "hist": stats::encode(&f.hist),
        }})
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::shares;

    #[test]
    fn shares_cover_everything_evenly() {
        assert_eq!(shares(10, 19_000), vec![(0, 10)]);
        let s = shares(100_000, 19_000);
        assert_eq!(s.len(), 6);
        assert_eq!(s[0].0, 0);
        assert_eq!(s[5].1, 100_000);
        assert!(s.iter().all(|(a, b)| b - a <= 19_000));
    }
}
