//! postgrest-ws direct channels (`PGWS_DIRECT_CHANNELS`) and the audit channel
//! (`PGWS_AUDIT_CHANNEL`), seen from a websocket client and from a LISTEN session.

use std::time::{Duration, Instant};

use pgws_tests::{eventually, listen, now, token, unique, Stack, WsClient};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

const T: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(600);

type Heard = UnboundedReceiver<(String, String, i32)>;

async fn heard(rx: &mut Heard) -> (String, String, i32) {
    tokio::time::timeout(T, rx.recv())
        .await
        .expect("a notification in time")
        .expect("listening")
}

async fn silent(rx: &mut Heard) -> bool {
    tokio::time::timeout(QUIET, rx.recv()).await.is_err()
}

async fn notify(db: &tokio_postgres::Client, channel: &str, payload: &str) -> anyhow::Result<()> {
    db.execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_direct_channel_speaks_postgrest_ws() -> anyhow::Result<()> {
    let direct = unique("direct-");
    let audit = unique("audit-");
    let list = format!("{direct},unused");
    let stack = Stack::start_with(&[
        ("PGWS_DIRECT_CHANNELS", &list),
        ("PGWS_AUDIT_CHANNEL", &audit),
    ])
    .await?;
    let (_l, mut rx) = listen(&[&direct, &audit, &stack.listen_channel]).await?;
    let base = stack.ws_url(0);
    // seed 000: `/<jwt>` with the channel and mode claims.
    let writer_claims = json!({"channel": direct, "mode": "rw", "user": "ann", "exp": now() + 300});
    let mut writer = WsClient::connect(&format!("{base}/{}", token(&writer_claims))).await?;
    // seed 001: `/<channel>/<jwt>`, a channel claim wins over the path.
    let reader_claims = json!({"channel": direct, "mode": "r"});
    let mut claimed =
        WsClient::connect(&format!("{base}/elsewhere/{}", token(&reader_claims))).await?;
    let mut pathed = stack.connect(0, &direct, &json!({"mode": "r"})).await?;

    // Any NOTIFY on the channel reaches every socket as its bare payload.
    let db = stack.pg().await?;
    let raw = "not json at all: ünïcødé \"quoted\"";
    notify(&db, &direct, raw).await?;
    for ws in [&mut writer, &mut claimed, &mut pathed] {
        assert_eq!(ws.next_text(T).await?, raw);
    }
    assert_eq!(heard(&mut rx).await.1, raw);

    // A text becomes exactly one NOTIFY on the channel itself, in seed 000's body, and its
    // copy on the audit channel from the same transaction; nothing on the listen channel.
    writer.send_text("hi \"there\"").await?;
    let (channel, body, pid) = heard(&mut rx).await;
    assert_eq!(channel, direct);
    let body: Value = serde_json::from_str(&body)?;
    assert_eq!(
        body,
        json!({"userClaims": writer_claims, "payload": "hi \"there\""})
    );
    let (channel, copy, copy_pid) = heard(&mut rx).await;
    assert_eq!(channel, audit);
    assert_eq!(serde_json::from_str::<Value>(&copy)?, body);
    assert_eq!(
        pid, copy_pid,
        "the message and its audit copy share a session"
    );
    for ws in [&mut writer, &mut claimed, &mut pathed] {
        assert_eq!(
            serde_json::from_str::<Value>(&ws.next_text(T).await?)?,
            body
        );
    }
    assert!(silent(&mut rx).await, "one NOTIFY per message");

    // A read-only socket's text makes no NOTIFY and no frame.
    claimed.send_text("ignored").await?;
    assert!(silent(&mut rx).await, "a read-only socket notified");
    assert!(pathed.next_text(QUIET).await.is_err());

    // A postgres-websockets socket on another channel keeps its envelope, and is audited too.
    let mut plain = stack.connect(0, "plain", &json!({"mode": "rw"})).await?;
    plain.send_text("classic").await?;
    let (channel, envelope, _) = heard(&mut rx).await;
    assert_eq!(channel, stack.listen_channel);
    let envelope: Value = serde_json::from_str(&envelope)?;
    assert_eq!(envelope["event"], "WebsocketMessage");
    assert_eq!(envelope["payload"], "classic");
    let (channel, copy, _) = heard(&mut rx).await;
    assert_eq!(channel, audit);
    assert_eq!(serde_json::from_str::<Value>(&copy)?, envelope);
    assert_eq!(plain.next_json(T).await?["payload"], "classic");
    Ok(())
}

#[tokio::test]
async fn direct_socket_refusals_are_clear() -> anyhow::Result<()> {
    let direct = unique("direct-");
    let stack = Stack::start_with(&[("PGWS_DIRECT_CHANNELS", &direct)]).await?;
    let base = stack.ws_url(0);
    // A direct channel cannot share a socket with postgres-websockets channels.
    let mixed = json!({"channels": [direct, "other"], "mode": "rw"});
    let err = WsClient::refusal(&format!("{base}/{}", token(&mixed)), &[]).await;
    assert!(
        err.contains("400") && err.contains("direct channel"),
        "{err}"
    );
    // Too large for NOTIFY: the socket is closed with 1009 and says why.
    let mut ws = stack.connect(0, &direct, &json!({"mode": "rw"})).await?;
    ws.send_text(&"x".repeat(8000)).await?;
    let (code, reason) = ws.expect_close(T).await?;
    assert_eq!(code, 1009, "{reason}");
    assert!(reason.contains("too large"), "{reason}");
    Ok(())
}

/// A stack whose every channel is direct (`*`), so the postgres-websockets probe of
/// `Stack::start` cannot be used: waits until a direct channel delivers on every gateway. It
/// keeps no history, so a channel is UNLISTENed as soon as its last socket leaves (with a
/// history it stays LISTENed for the history's age, for sockets that resume: `resume.rs`).
async fn star_stack(bridges: usize, gateways: usize) -> anyhow::Result<Stack> {
    let env = [("PGWS_DIRECT_CHANNELS", "*"), ("PGWS_HISTORY_SECONDS", "0")];
    let stack = Stack::start_sized(&env, bridges, gateways).await?;
    let db = stack.pg().await?;
    for i in 0..gateways {
        let probe = unique("probe-");
        let mut ws = stack.connect(i, &probe, &json!({"mode": "r"})).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            anyhow::ensure!(Instant::now() < deadline, "direct channels never delivered");
            notify(&db, &probe, "probe").await?;
            if ws.next_text(Duration::from_millis(300)).await.is_ok() {
                break;
            }
        }
    }
    Ok(stack)
}

#[tokio::test]
async fn a_notify_right_after_the_handshake_is_not_missed() -> anyhow::Result<()> {
    let stack = star_stack(1, 1).await?;
    let db = stack.pg().await?;
    for i in 0..20 {
        // A channel nobody listened to before: the handshake waits for its LISTEN.
        let channel = unique("fresh-");
        let mut ws = stack.connect(0, &channel, &json!({"mode": "r"})).await?;
        notify(&db, &channel, &format!("n{i}")).await?;
        assert_eq!(ws.next_text(T).await?, format!("n{i}"), "socket {i}");
    }
    Ok(())
}

/// The leader's count of direct channels it LISTENs on.
async fn listened(stack: &Stack) -> f64 {
    let mut most = 0.0_f64;
    for b in &stack.bridges {
        most = most.max(b.metric("pgws_bridge_direct_channels").await.unwrap_or(0.0));
    }
    most
}

#[tokio::test]
async fn two_gateways_a_leader_failover_and_unlisten() -> anyhow::Result<()> {
    let direct = unique("direct-");
    let mut stack = star_stack(2, 2).await?;
    let mut a = stack.connect(0, &direct, &json!({"mode": "rw"})).await?;
    let mut b = stack.connect(1, &direct, &json!({"mode": "r"})).await?;
    let db = stack.pg().await?;
    notify(&db, &direct, "before").await?;
    assert_eq!(a.next_text(T).await?, "before");
    assert_eq!(b.next_text(T).await?, "before");
    // A message from gateway 0 reaches the socket on gateway 1.
    a.send_text("from a").await?;
    let got: Value = serde_json::from_str(&b.next_text(T).await?)?;
    assert_eq!(got["payload"], "from a");
    assert!(
        a.next_text(T).await?.contains("from a"),
        "the sender hears itself"
    );

    // The leader dies: the other bridge takes over and learns the channel from the gateways.
    let leader = stack.leader().await.expect("one bridge leads");
    stack.bridges[leader].signal("KILL")?;
    let started = Instant::now();
    // Both sockets receive again (after possibly missing what was notified in the gap).
    for ws in [&mut a, &mut b] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "delivery did not resume");
            notify(&db, &direct, "probe").await?;
            if let Ok(t) = ws.next_text(Duration::from_millis(300)).await {
                if t == "probe" {
                    break;
                }
            }
        }
    }
    println!(
        "direct delivery resumed {:?} after the leader died",
        started.elapsed()
    );
    let survivor = &stack.bridges[1 - leader];
    assert_eq!(
        survivor.metric("pgws_bridge_direct_channels").await,
        Some(1.0)
    );
    stack.bridges.remove(leader);

    // Closing the last socket of the stack releases the channel (UNLISTEN). The probes of
    // start-up are closed too, so the count falls to 0.
    drop(a);
    assert!(
        !eventually(Duration::from_secs(1), || async {
            listened(&stack).await == 0.0
        })
        .await,
        "b on the other gateway still reads the channel"
    );
    drop(b);
    assert!(eventually(T, || async { listened(&stack).await == 0.0 }).await);
    notify(&db, &direct, "nobody").await?;

    // A gateway that dies without saying so is forgotten after the presence expiry.
    let mut c = stack.connect(1, &direct, &json!({"mode": "r"})).await?;
    notify(&db, &direct, "c").await?;
    assert_eq!(c.next_text(T).await?, "c");
    stack.gateways[1].signal("KILL")?;
    let expiry = Duration::from_secs(pgws_proto::PRESENCE_EXPIRY_SECS + 10);
    assert!(eventually(expiry, || async { listened(&stack).await == 0.0 }).await);
    Ok(())
}

/// A gateway's presence report larger than one NATS message (a server with a 16 KiB limit,
/// 400 direct channels of 60 bytes) goes in parts: past the leader's presence expiry every
/// channel is still LISTENed and its sockets still receive, and no report failed.
#[tokio::test]
async fn a_presence_report_larger_than_a_nats_message_keeps_the_gateway_served(
) -> anyhow::Result<()> {
    let nats = pgws_tests::PrivateNats::start_configured(
        |site| {
            format!(
                "port: {}\nhttp_port: {}\nmax_payload: 16384\njetstream {{\n  store_dir: {:?}\n}}\n",
                site.port,
                site.monitor_port,
                site.store.display().to_string()
            )
        },
        &[],
    )
    .await?;
    let base = unique("big-");
    let channels: Vec<String> = (0..400).map(|i| format!("{base}-{i:0>48}")).collect();
    let list = channels.join(",");
    let url = nats.url();
    let stack =
        Stack::start_with(&[("PGWS_DIRECT_CHANNELS", &list), ("PGWS_NATS_URL", &url)]).await?;
    let mut sockets = Vec::new();
    for c in &channels {
        sockets.push(stack.connect(0, c, &json!({"mode": "r"})).await?);
    }
    // Past the expiry a gateway whose reports never arrived is forgotten, and its channels
    // UNLISTENed.
    tokio::time::sleep(Duration::from_secs(pgws_proto::PRESENCE_EXPIRY_SECS + 3)).await;
    let db = stack.pg().await?;
    for i in [0, 199, 399] {
        notify(&db, &channels[i], "still here").await?;
        assert_eq!(sockets[i].next_text(T).await?, "still here", "channel {i}");
    }
    let gw = &stack.gateways[0];
    let failed = gw.metric("pgws_gateway_presence_failures_total").await;
    assert_eq!(failed, Some(0.0));
    Ok(())
}
