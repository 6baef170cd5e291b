//! `fanout`: C channels with K subscribing sockets each; R notifications per second dealt
//! over the channels for S seconds, each payload `{"channel":..,"i":..,"t":<unix µs>}`.
//! pgws and node are fed by `pg_notify` on the listen channel (many per transaction:
//! `SELECT pg_notify($1, p) FROM unnest($2::text[]) p`), nats by NATS publishes. Reports
//! deliveries per second, latency from just before the publishing statement to receipt,
//! and deliveries lost.
//!
//! `pubsub` is the same run over wspubsub topics (or NATS subjects), fed by one publishing
//! websocket per topic (see [`crate::pubsub`]); latency is from just before the frames are
//! written.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::args::{Mode, Opts, Target};
use crate::client;
use crate::fleet::{Drain, Fleet};
use crate::procfs;
use crate::pubsub::Publishers;
use crate::report::{round, Report};
use crate::stats::{self, micros};

enum Publisher {
    Pg {
        db: tokio_postgres::Client,
        stmt: tokio_postgres::Statement,
    },
    Nats(async_nats::Client),
    Ws(Publishers),
}

impl Publisher {
    async fn connect(opts: &Opts) -> anyhow::Result<Self> {
        if opts.mode == Mode::Pubsub {
            return Ok(Self::Ws(Publishers::connect(opts).await?));
        }
        match opts.target {
            Target::Pgws | Target::Node => {
                let db = client::postgres(opts).await?;
                let stmt = db
                    .prepare("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
                    .await?;
                Ok(Self::Pg { db, stmt })
            }
            Target::Nats => Ok(Self::Nats(
                async_nats::connect(&opts.nats_url)
                    .await
                    .with_context(|| format!("connecting to NATS at {}", opts.nats_url))?,
            )),
        }
    }

    /// Sends one batch: `(channel, payload)` pairs; `names` are the channels' names.
    async fn send(
        &self,
        opts: &Opts,
        names: &[String],
        batch: Vec<(usize, String)>,
    ) -> anyhow::Result<()> {
        match self {
            Self::Pg { db, stmt } => {
                let payloads: Vec<String> = batch.into_iter().map(|(_, p)| p).collect();
                db.execute(stmt, &[&opts.listen_channel, &payloads])
                    .await
                    .context("pg_notify")?;
            }
            Self::Nats(client) => {
                for (c, payload) in batch {
                    client.publish(names[c].clone(), payload.into()).await?;
                }
                client.flush().await?;
            }
            Self::Ws(publishers) => publishers.send(names, batch).await?,
        }
        Ok(())
    }
}

struct Published {
    per_channel: Vec<u64>,
    total: u64,
    batches: u64,
    start_us: u64,
    secs: f64,
}

/// Publishes `rate * seconds` notifications at a steady rate.
async fn publish(opts: &Opts, publisher: &Publisher) -> anyhow::Result<Published> {
    let total = (opts.rate * opts.seconds).round().max(1.0) as u64;
    let names: Vec<String> = (0..opts.channels).map(|c| opts.channel_name(c)).collect();
    let mut per_channel = vec![0u64; opts.channels as usize];
    let start = Instant::now();
    let start_us = micros();
    let (mut sent, mut batches) = (0u64, 0u64);
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * opts.rate) as u64 + 1).min(total);
        if due <= sent {
            let next = Duration::from_secs_f64(sent as f64 / opts.rate);
            tokio::time::sleep_until((start + next).into()).await;
            continue;
        }
        let n = (due - sent).min(opts.batch as u64);
        let t = micros();
        let batch: Vec<(usize, String)> = (sent..sent + n)
            .map(|i| {
                let c = (i % opts.channels) as usize;
                per_channel[c] += 1;
                let name = &names[c];
                (c, format!(r#"{{"channel":"{name}","i":{i},"t":{t}}}"#))
            })
            .collect();
        publisher.send(opts, &names, batch).await?;
        sent += n;
        batches += 1;
    }
    Ok(Published {
        per_channel,
        total,
        batches,
        start_us,
        secs: start.elapsed().as_secs_f64(),
    })
}

/// Runs `fanout`.
pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    let mut report = Report::new(opts);
    let unit = match opts.mode {
        Mode::Pubsub => "topic",
        _ => "channel",
    };
    report.param(&format!("{unit}s"), opts.channels);
    report.param(&format!("subscribers_per_{unit}"), opts.subscribers);
    report.param("sockets", opts.sockets);
    report.param("rate_per_s", opts.rate);
    report.param("seconds", opts.seconds);
    report.param(
        "offered_deliveries_per_s",
        opts.rate * opts.subscribers as f64,
    );
    report.param("batch", opts.batch as u64);
    report.param("drain_secs", opts.drain);
    report.param("quiet_secs", opts.quiet);
    if opts.mode == Mode::Pubsub {
        report.param("frames", if opts.binary { "binary" } else { "text" });
        if opts.target == Target::Pgws {
            report.param("domain", opts.domain());
        }
    }
    report.param("per_process", opts.per_process);
    let pids = client::server_pids(opts);
    report.servers(&pids);
    let publisher = Publisher::connect(opts).await?;
    let measured = measure(opts, &publisher, &pids, &mut report).await;
    if let Publisher::Ws(publishers) = publisher {
        publishers.finish(Some(&mut report)).await;
    }
    let received = measured?;
    report.finish(opts.json.as_deref())?;
    if received == 0 {
        anyhow::bail!("nothing was delivered");
    }
    Ok(())
}

/// Opens the fleet, publishes, waits for the deliveries and adds the figures to `report`;
/// returns the deliveries.
async fn measure(
    opts: &Opts,
    publisher: &Publisher,
    pids: &[u32],
    report: &mut Report,
) -> anyhow::Result<u64> {
    let rss_before = procfs::total_rss_kib(pids);
    let (fleet, opened) = Fleet::open(opts).await?;
    let rss_open = procfs::total_rss_kib(pids);
    tokio::time::sleep(Duration::from_secs_f64(opts.settle)).await;

    let cpu_before = procfs::total_cpu_secs(pids);
    let published = publish(opts, publisher).await?;
    let per_channel = published.per_channel.clone();
    let channels = opts.channels;
    let expected_for = move |(a, b): (u64, u64)| -> u64 {
        (a..b).map(|g| per_channel[(g % channels) as usize]).sum()
    };
    let expected = expected_for((0, opts.sockets));
    let finished = fleet.finish(expected_for, Drain::of(opts)).await?;
    let cpu_after = procfs::total_cpu_secs(pids);

    let window = (finished.last_rx_us.saturating_sub(published.start_us) as f64 / 1e6)
        .max(opts.seconds)
        .max(1e-9);
    report.figure("opened", opened.opened);
    report.figure("failed", opened.failed);
    if let Some(e) = &opened.first_error {
        report.figure("first_error", e.as_str());
    }
    report.figure("load_processes", opened.processes as u64);
    report.figure("connect_secs", round(opened.connect_secs, 3));
    report.figure(
        "handshakes_per_s",
        round(opened.opened as f64 / opened.connect_secs.max(1e-9), 0),
    );
    report.figure("published", published.total);
    report.figure("publish_batches", published.batches);
    report.figure("publish_secs", round(published.secs, 3));
    report.figure(
        "published_per_s",
        round(published.total as f64 / published.secs.max(1e-9), 0),
    );
    report.figure("expected_deliveries", expected);
    report.figure("deliveries", finished.received);
    report.figure(
        "lost_deliveries",
        expected.saturating_sub(finished.received),
    );
    report.figure("sockets_closed_early", finished.closed);
    report.figure("out_of_order", finished.out_of_order);
    report.figure("delivery_secs", round(window, 3));
    report.figure(
        "deliveries_per_s",
        round(finished.received as f64 / window, 0),
    );
    report.figure("latency", stats::percentiles(&finished.hist));
    if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
        let cpu = b - a;
        report.figure("server_cpu_secs", round(cpu, 2));
        report.figure("server_cpu_share", round(cpu / window, 3));
        if finished.received > 0 {
            report.figure(
                "server_cpu_us_per_delivery",
                round(cpu * 1e6 / finished.received as f64, 3),
            );
        }
    }
    if let (Some(a), Some(b)) = (rss_before, rss_open) {
        report.figure(
            "server_rss_per_socket_kib",
            round(b.saturating_sub(a) as f64 / opened.opened.max(1) as f64, 2),
        );
    }
    report.figure("load_cpu_secs", round(finished.cpu_secs, 2));
    Ok(finished.received)
}
