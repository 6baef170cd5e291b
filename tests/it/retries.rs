//! NOTIFY requests retried around a bridge that stalls (SIGSTOP) or dies: a socket's
//! messages reach PostgreSQL once each, in the order it sent them, and a message the client
//! was told failed is never NOTIFYed later.
//!
//! Each test streams numbered messages from one socket through a stack of two bridges while
//! the bridge that does not hold LISTEN is stalled or killed, and watches the NOTIFYs with a
//! LISTEN of its own. Figures are printed (`--nocapture`) for `docs/reliability.md`.

use std::time::{Duration, Instant};

use pgws_tests::Stack;
use serde_json::{json, Value};

use crate::faults::PgWatch;

/// Messages sent by the socket, one every [`EVERY`].
const MESSAGES: u64 = 250;
const EVERY: Duration = Duration::from_millis(40);
/// When the fault starts, after the first message.
const FAULT_AT: Duration = Duration::from_millis(1500);

enum Fault {
    /// SIGSTOP for this long, then SIGCONT.
    Stall(Duration),
    /// SIGSTOP, then SIGKILL two seconds later: dies holding the requests it was given.
    Kill,
}

/// What a run saw.
struct Run {
    /// Error frames the socket got (one per message that was not accepted).
    errors: u64,
    /// The numbers the LISTEN saw, in order.
    seen: Vec<u64>,
    /// Longest time between two NOTIFYs seen.
    longest_gap: Duration,
    /// The stalled bridge's counts of skipped duplicates and expired requests.
    victim_duplicates: Option<f64>,
    victim_expired: Option<f64>,
}

/// A stack of two bridges and a gateway with `PGWS_NOTIFY_TIMEOUT=timeout`; streams the
/// numbered messages while `fault` hits the bridge that is not the leader.
async fn stream_through(fault: Fault, timeout: &str) -> anyhow::Result<Run> {
    let mut stack = Stack::new();
    stack.add_bridge(&[]).await?;
    stack.add_bridge(&[]).await?;
    stack
        .add_gateway(&[("PGWS_NOTIFY_TIMEOUT", timeout)])
        .await?;
    stack.wait_flowing(0).await?;
    let leader = stack.leader().await.unwrap_or(0);
    let victim = 1 - leader;
    let channel = pgws_tests::unique("seq-");
    let mut watch = PgWatch::start(&stack.db_uri(), &stack.listen_channel).await?;
    // The LISTEN is read as the messages go, for the gaps between NOTIFYs.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let ours = channel.clone();
    let watcher = tokio::spawn(async move {
        while let Some(p) = watch.next(Duration::from_secs(60)).await {
            let v: Value = serde_json::from_str(&p).unwrap_or_default();
            if v["channel"] == ours.as_str() {
                if let Some(n) = v["payload"].as_str().and_then(|t| t.parse::<u64>().ok()) {
                    if seen_tx.send((n, Instant::now())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut ws = stack.connect(0, &channel, &json!({"mode": "w"})).await?;

    let started = Instant::now();
    let mut faulted = false;
    let mut resumed_at: Option<Instant> = None;
    let mut killed_at: Option<Instant> = None;
    for n in 0..MESSAGES {
        if !faulted && started.elapsed() >= FAULT_AT {
            faulted = true;
            match &fault {
                Fault::Stall(d) => {
                    stack.bridges[victim].signal("STOP")?;
                    resumed_at = Some(Instant::now() + *d);
                }
                Fault::Kill => {
                    stack.bridges[victim].signal("STOP")?;
                    killed_at = Some(Instant::now() + Duration::from_secs(2));
                }
            }
        }
        if killed_at.is_some_and(|at| Instant::now() >= at) {
            stack.bridges[victim].signal("KILL")?;
            killed_at = None;
        }
        if resumed_at.is_some_and(|at| Instant::now() >= at) {
            stack.bridges[victim].signal("CONT")?;
            resumed_at = None;
        }
        ws.send_text(&n.to_string()).await?;
        tokio::time::sleep(EVERY).await;
    }
    if let Some(at) = resumed_at {
        tokio::time::sleep(at.saturating_duration_since(Instant::now())).await;
        stack.bridges[victim].signal("CONT")?;
    }

    // What the socket was told: "<n> message(s) could not be delivered..." error frames.
    let mut errors = 0;
    let mut seen: Vec<(u64, Instant)> = Vec::new();
    let quiet = Duration::from_secs(8);
    // Until every message is accounted for, then a while longer for late copies.
    let mut settle: Option<Instant> = None;
    let give_up = Instant::now() + Duration::from_secs(40);
    while settle.is_none_or(|s| Instant::now() < s) && Instant::now() < give_up {
        while let Ok(text) = ws.next_text(Duration::from_millis(1)).await {
            let v: Value = serde_json::from_str(&text).unwrap_or_default();
            if v["event"] == "Error" {
                let error = v["error"].as_str().unwrap_or_default();
                let n = error.split(' ').next().and_then(|n| n.parse::<u64>().ok());
                errors += n.unwrap_or(1);
            }
        }
        if let Ok(Some(s)) = tokio::time::timeout(Duration::from_millis(200), seen_rx.recv()).await
        {
            seen.push(s);
        }
        if settle.is_none() && seen.len() as u64 + errors >= MESSAGES {
            settle = Some(Instant::now() + quiet);
        }
    }
    watcher.abort();
    let longest_gap = seen
        .windows(2)
        .map(|w| w[1].1 - w[0].1)
        .max()
        .unwrap_or_default();
    let seen = seen.into_iter().map(|(n, _)| n).collect();
    let metric = |name: &'static str| {
        let bridge = &stack.bridges[victim];
        async move { bridge.metric(name).await }
    };
    let (victim_duplicates, victim_expired) = match fault {
        Fault::Stall(_) => (
            metric("pgws_bridge_notify_duplicates_total").await,
            metric("pgws_bridge_notify_requests_total{outcome=\"expired\"}").await,
        ),
        Fault::Kill => (None, None),
    };
    drop(ws);
    Ok(Run {
        errors,
        seen,
        longest_gap,
        victim_duplicates,
        victim_expired,
    })
}

/// Every number the LISTEN saw is new and larger than the one before, and every message is
/// either seen or was refused with an error frame.
fn assert_once_in_order(run: &Run, what: &str) {
    for w in run.seen.windows(2) {
        assert!(
            w[0] < w[1],
            "{what}: {} NOTIFYed after {} (duplicate or out of order); seen: {:?}",
            w[1],
            w[0],
            run.seen
        );
    }
    assert_eq!(
        run.seen.len() as u64 + run.errors,
        MESSAGES,
        "{what}: {} seen + {} refused != {MESSAGES} sent",
        run.seen.len(),
        run.errors
    );
}

#[tokio::test]
async fn a_stalled_bridge_neither_doubles_nor_reorders_retried_messages() -> anyhow::Result<()> {
    // The stall outlasts the gateway's 5 s attempt timeout (so requests are retried on the
    // other bridge) but not PGWS_NOTIFY_TIMEOUT (so the stalled copies are still due when the
    // bridge resumes, and only the ids keep them from running twice).
    let run = stream_through(Fault::Stall(Duration::from_secs(7)), "30").await?;
    println!(
        "stall 7 s: {MESSAGES} sent, {} NOTIFYed, {} refused, longest gap {:?}, \
         stalled bridge skipped {:?} duplicates",
        run.seen.len(),
        run.errors,
        run.longest_gap,
        run.victim_duplicates
    );
    assert_once_in_order(&run, "stall");
    assert_eq!(run.errors, 0, "a retried message was refused");
    assert!(
        run.victim_duplicates.unwrap_or(0.0) > 0.0,
        "the stalled bridge held no request: the fault was not exercised"
    );
    Ok(())
}

#[tokio::test]
async fn a_request_stalled_past_its_deadline_is_never_notified() -> anyhow::Result<()> {
    // PGWS_NOTIFY_TIMEOUT (4 s) is shorter than the stall: what waited in the stalled bridge
    // was refused to the client, and must not reach the database when the bridge resumes.
    let run = stream_through(Fault::Stall(Duration::from_secs(9)), "4").await?;
    println!(
        "stall 9 s, deadline 4 s: {MESSAGES} sent, {} NOTIFYed, {} refused, longest gap {:?}, \
         stalled bridge dropped {:?} expired requests",
        run.seen.len(),
        run.errors,
        run.longest_gap,
        run.victim_expired
    );
    assert_once_in_order(&run, "expiry");
    assert!(
        run.errors > 0,
        "no request waited in the stalled bridge: the fault was not exercised"
    );
    Ok(())
}

#[tokio::test]
async fn a_bridge_killed_mid_stream_loses_and_reorders_nothing() -> anyhow::Result<()> {
    let run = stream_through(Fault::Kill, "30").await?;
    println!(
        "kill -9: {MESSAGES} sent, {} NOTIFYed, {} refused, longest gap {:?}",
        run.seen.len(),
        run.errors,
        run.longest_gap
    );
    assert_once_in_order(&run, "kill");
    assert_eq!(run.errors, 0, "a retried message was refused");
    assert!(
        run.longest_gap > Duration::from_secs(1),
        "no request waited in the killed bridge: the fault was not exercised"
    );
    Ok(())
}
