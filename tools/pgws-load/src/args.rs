//! The command line: `pgws-load <idle|fanout|pubsub|ingest> [--option value]...`, with
//! defaults taken from the stack's own settings (`PGWS_JWT_SECRET`, `PGWS_DB_URI`,
//! `PGWS_LISTEN_CHANNEL`, `PGWS_NATS_URL`) so that `set -a; . deploy/sample.env; set +a` is
//! all a run needs.

use std::path::PathBuf;

use anyhow::{bail, Context};

/// The help text.
pub const USAGE: &str = "\
usage: pgws-load <mode> [options]

modes:
  idle    --sockets N [--hold SECS]             open N sockets, report handshake rate and
                                                server RSS per socket
  fanout  --channels C --subscribers K --rate R --seconds S
                                                C*K sockets; R notifications/s spread over the
                                                C channels; deliveries/s, latency, losses
  pubsub  --topics T --subscribers K --rate R --seconds S
                                                the same over wspubsub topics: a key of its
                                                own in apikeys, one publishing socket per
                                                topic, T*K subscribers; R frames/s in all
  ingest  --sockets N --seconds S               write-mode sockets send as fast as allowed;
                                                messages/s reaching NOTIFY, and the
                                                one-NOTIFY-per-transaction baseline

options:
  --target pgws|nats|node   server under test (idle, fanout; pubsub: pgws or nats, whose
                            publishers speak NATS over websockets too; default pgws)
  --gateways URL,...        websocket base URLs, sockets spread round-robin
                            (default $PGWS_URL or ws://127.0.0.1:3000)
  --gateway-pid PID,...     processes whose RSS and CPU are reported (default: the
                            processes listening on the gateways' ports)
  --json FILE               also write the report as JSON
  --label TEXT              free text stored in the report
  --secret S                JWT HMAC secret (default $PGWS_JWT_SECRET)
  --db-uri URI              PostgreSQL (default $PGWS_DB_URI)
  --listen-channel NAME     the NOTIFY channel (default $PGWS_LISTEN_CHANNEL)
  --keys-table NAME         pubsub: the API-key table, may be schema.table (default
                            $PGWS_PUBSUB_KEYS_TABLE or apikeys)
  --nats-url URL            NATS for --target nats publishing (default $PGWS_NATS_URL)
  --per-process N           most sockets per process before child processes are used
                            (default 19000; a process may hold 20,000 open files)
  --concurrency N           handshakes in flight per process (default 256)
  --baseline-connections N  connections of the ingest baseline (default 4)
  --batch N                 most notifications per publishing transaction (default 2000)
  --drain SECS              longest wait for deliveries after publishing (default 15)
  --quiet SECS              the wait also ends after this long without a delivery
                            (default 2)
  --settle SECS             pause after connecting before measuring (default 1)
  --binary                  pubsub: the publishers send binary frames (default text)
  --resume                  fanout on pgws: the sockets open with ?resume= (positioned frames,
                            read through the stack's history)
";

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Idle sockets.
    Idle,
    /// Fan-out from `pg_notify` (or NATS publishes).
    Fanout,
    /// Client messages to NOTIFY.
    Ingest,
    /// Fan-out of wspubsub topics (or NATS subjects) from websocket publishers.
    Pubsub,
}

impl Mode {
    /// The mode's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Fanout => "fanout",
            Self::Ingest => "ingest",
            Self::Pubsub => "pubsub",
        }
    }
}

/// The server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The pgws gateway (`/<channel>/<jwt>`, fed by `pg_notify`).
    Pgws,
    /// nats-server's websocket endpoint (NATS protocol, fed by NATS publishes).
    Nats,
    /// The Node.js server of `bench/node` (`/<channel>`, fed by `pg_notify`).
    Node,
}

impl Target {
    /// The target's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pgws => "pgws",
            Self::Nats => "nats",
            Self::Node => "node",
        }
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Opts {
    /// The mode.
    pub mode: Mode,
    /// The server under test.
    pub target: Target,
    /// Websocket base URLs (`ws://host:port`).
    pub gateways: Vec<String>,
    /// Sockets (idle, ingest).
    pub sockets: u64,
    /// Channels (fan-out; idle spreads its sockets over them too), or topics (pubsub).
    pub channels: u64,
    /// Subscribers per channel or topic (fan-out, pubsub).
    pub subscribers: u64,
    /// Notifications per second (fan-out).
    pub rate: f64,
    /// Seconds of load (fan-out, ingest).
    pub seconds: f64,
    /// Seconds the idle sockets are held open before the second RSS reading.
    pub hold: f64,
    /// Processes whose RSS and CPU are measured.
    pub gateway_pids: Vec<u32>,
    /// Where the JSON report goes.
    pub json: Option<PathBuf>,
    /// Free text for the report.
    pub label: Option<String>,
    /// JWT secret.
    pub secret: String,
    /// The secret is base64.
    pub secret_base64: bool,
    /// PostgreSQL URI.
    pub db_uri: String,
    /// NOTIFY channel.
    pub listen_channel: String,
    /// The wspubsub API-key table (`table` or `schema.table`).
    pub keys_table: String,
    /// NATS URL for publishing to the nats target.
    pub nats_url: String,
    /// Most sockets in one process.
    pub per_process: u64,
    /// Handshakes in flight per process.
    pub concurrency: usize,
    /// Connections of the ingest baseline.
    pub baseline_connections: usize,
    /// Most notifications per publishing transaction.
    pub batch: usize,
    /// Longest wait for deliveries after publishing, seconds.
    pub drain: f64,
    /// The drain also ends after this long without a delivery, seconds.
    pub quiet: f64,
    /// Pause after connecting, seconds.
    pub settle: f64,
    /// The pubsub publishers send binary frames.
    pub binary: bool,
    /// pgws channel sockets open with `?resume=` (read through the history).
    pub resume: bool,
    /// Child process: the range of global socket indices it opens.
    pub child: Option<(u64, u64)>,
    /// Names of this run's channels derive from it (shared with child processes).
    pub run_id: String,
    /// The original arguments (re-used for child processes).
    pub argv: Vec<String>,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

fn num<T: std::str::FromStr>(key: &str, value: &str) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e| anyhow::anyhow!("{key} {value}: {e}"))
}

fn list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('/').to_owned())
        .collect()
}

impl Opts {
    /// Parses the arguments (without the program name). `Ok(None)`: help was asked for.
    pub fn parse(argv: &[String]) -> anyhow::Result<Option<Self>> {
        let Some(mode) = argv.first() else {
            bail!("no mode given");
        };
        let mode = match mode.as_str() {
            "idle" => Mode::Idle,
            "fanout" => Mode::Fanout,
            "ingest" => Mode::Ingest,
            "pubsub" => Mode::Pubsub,
            "-h" | "--help" | "help" => return Ok(None),
            other => bail!("unknown mode {other:?}"),
        };
        let mut o = Self {
            mode,
            target: Target::Pgws,
            gateways: list(&env_or("PGWS_URL", "ws://127.0.0.1:3000")),
            sockets: 1000,
            channels: 1,
            subscribers: 100,
            rate: 100.0,
            seconds: 10.0,
            hold: 2.0,
            gateway_pids: Vec::new(),
            json: None,
            label: None,
            secret: env_or("PGWS_JWT_SECRET", "reallyreallyreallyreallyverysafe"),
            secret_base64: matches!(
                env_or("PGWS_JWT_SECRET_BASE64", "false")
                    .to_ascii_lowercase()
                    .as_str(),
                "true" | "1" | "yes"
            ),
            db_uri: env_or("PGWS_DB_URI", "postgres://postgres@127.0.0.1:5432/postgres"),
            listen_channel: env_or("PGWS_LISTEN_CHANNEL", "postgres-websockets-listener"),
            keys_table: env_or("PGWS_PUBSUB_KEYS_TABLE", "apikeys"),
            nats_url: env_or("PGWS_NATS_URL", "nats://127.0.0.1:4222"),
            per_process: 19_000,
            concurrency: 256,
            baseline_connections: 4,
            batch: 2000,
            drain: 15.0,
            quiet: 2.0,
            settle: 1.0,
            binary: false,
            resume: false,
            child: None,
            run_id: format!(
                "load{:x}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_micros()
                    & 0xff_ffff_ffff
            ),
            argv: argv.to_vec(),
        };
        let mut it = argv[1..].iter();
        while let Some(key) = it.next() {
            if key == "-h" || key == "--help" {
                return Ok(None);
            }
            if key == "--resume" {
                o.resume = true;
                continue;
            }
            if key == "--binary" {
                o.binary = true;
                continue;
            }
            let value = it
                .next()
                .with_context(|| format!("{key} needs a value"))?
                .as_str();
            match key.as_str() {
                "--target" => {
                    o.target = match value {
                        "pgws" => Target::Pgws,
                        "nats" => Target::Nats,
                        "node" => Target::Node,
                        other => bail!("unknown target {other:?} (pgws, nats, node)"),
                    }
                }
                "--gateways" | "--gateway" => o.gateways = list(value),
                "--sockets" => o.sockets = num(key, value)?,
                "--channels" | "--topics" => o.channels = num(key, value)?,
                "--subscribers" => o.subscribers = num(key, value)?,
                "--rate" => o.rate = num(key, value)?,
                "--seconds" => o.seconds = num(key, value)?,
                "--hold" => o.hold = num(key, value)?,
                "--gateway-pid" | "--gateway-pids" => {
                    o.gateway_pids = list(value)
                        .iter()
                        .map(|p| num(key, p))
                        .collect::<anyhow::Result<_>>()?
                }
                "--json" => o.json = Some(PathBuf::from(value)),
                "--label" => o.label = Some(value.to_owned()),
                "--secret" => o.secret = value.to_owned(),
                "--db-uri" => o.db_uri = value.to_owned(),
                "--listen-channel" => o.listen_channel = value.to_owned(),
                "--keys-table" => o.keys_table = value.to_owned(),
                "--nats-url" => o.nats_url = value.to_owned(),
                "--per-process" => o.per_process = num(key, value)?,
                "--concurrency" => o.concurrency = num(key, value)?,
                "--baseline-connections" => o.baseline_connections = num(key, value)?,
                "--batch" => o.batch = num(key, value)?,
                "--drain" => o.drain = num(key, value)?,
                "--quiet" => o.quiet = num(key, value)?,
                "--settle" => o.settle = num(key, value)?,
                "--run-id" => o.run_id = value.to_owned(),
                "--child" => {
                    let (a, b) = value.split_once(':').context("--child A:B")?;
                    o.child = Some((num(key, a)?, num(key, b)?));
                }
                other => bail!("unknown option {other}"),
            }
        }
        if o.gateways.is_empty() {
            bail!("--gateways is empty");
        }
        for g in &o.gateways {
            if !(g.starts_with("ws://") || g.starts_with("wss://")) {
                bail!("gateway URL {g:?} must start with ws://");
            }
        }
        if matches!(o.mode, Mode::Fanout | Mode::Pubsub) {
            o.sockets = o.channels * o.subscribers;
        }
        if o.sockets == 0 || o.channels == 0 {
            bail!("--sockets, --channels and --subscribers must be positive");
        }
        if o.mode == Mode::Ingest && o.target != Target::Pgws {
            bail!("ingest measures pgws only (the peers have no NOTIFY path)");
        }
        if o.mode == Mode::Pubsub && o.target == Target::Node {
            bail!("pubsub measures pgws and nats (the node server has no pub/sub endpoint)");
        }
        if o.rate <= 0.0 || o.seconds <= 0.0 {
            bail!("--rate and --seconds must be positive");
        }
        o.per_process = o.per_process.clamp(1, 19_900);
        o.concurrency = o.concurrency.max(1);
        o.batch = o.batch.max(1);
        Ok(Some(o))
    }

    /// The channel of global socket index `g` (sockets are dealt over the channels).
    pub fn channel_of(&self, g: u64) -> u64 {
        g % self.channels
    }

    /// The name of channel `c` of this run (a NATS subject for the nats target).
    pub fn channel_name(&self, c: u64) -> String {
        match self.target {
            Target::Nats => format!("load.{}.{c}", self.run_id),
            _ => format!("{}-{c}", self.run_id),
        }
    }

    /// The wspubsub domain of this run (a row of its own in `apikeys`).
    pub fn domain(&self) -> String {
        format!("{}.pgws-load", self.run_id)
    }

    /// The gateway of global socket index `g` (round-robin).
    pub fn gateway_of(&self, g: u64) -> usize {
        (g % self.gateways.len() as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> anyhow::Result<Opts> {
        let argv: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        Ok(Opts::parse(&argv)?.expect("not help"))
    }

    #[test]
    fn pubsub_counts_topics_times_subscribers() {
        let o = parse("pubsub --topics 3 --subscribers 4 --binary --rate 10").unwrap();
        assert_eq!((o.mode, o.channels, o.sockets), (Mode::Pubsub, 3, 12));
        assert!(o.binary);
        assert_eq!(o.rate, 10.0);
        assert!(o.domain().starts_with(&o.run_id));
        assert!(!parse("fanout --channels 2").unwrap().binary);
        assert!(parse("pubsub --target node").is_err());
        assert!(parse("pubsub --target nats").is_ok());
    }
}
