//! The load tool of the pgws stack: drives the real gateway (or a peer: nats-server's own
//! websocket endpoint, a Node.js server) with idle sockets, fan-out from `pg_notify`, fan-out
//! of wspubsub topics from publishing sockets, or client ingest, and reports figures with the
//! parameters and the machine, as text and JSON.
//!
//! Counts above one process's share of open files are spread over child processes of this
//! same binary (re-executed with `--child A:B`), whose reports are summed.

pub mod args;
pub mod client;
pub mod fanout;
pub mod fleet;
pub mod idle;
pub mod ingest;
pub mod machine;
pub mod nats;
pub mod procfs;
pub mod pubsub;
pub mod report;
pub mod stats;

use std::process::ExitCode;

use args::{Mode, Opts};

/// Parses the command line, runs the chosen mode and returns the exit code.
pub fn run() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let opts = match Opts::parse(&argv) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            println!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("pgws-load: {e:#}\n\n{}", args::USAGE);
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgws-load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        if opts.child.is_some() {
            return fleet::serve_child(&opts).await;
        }
        match opts.mode {
            Mode::Idle => idle::run(&opts).await,
            Mode::Fanout | Mode::Pubsub => fanout::run(&opts).await,
            Mode::Ingest => ingest::run(&opts).await,
        }
    });
    // Sockets are closed with RST (linger 0) when the runtime drops them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgws-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}
