//! `pgws`, the three roles in one process: every protocol without NATS (and no connection to
//! NATS at all), the audit written in the NOTIFY transaction across a SIGKILL, two nodes over
//! NATS sharing channels and one LISTEN leader, and `deploy/bridge-role.sql` handing the bridge's
//! role an audit schema a split stack made.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pgws_tests::{listen, nats_url, remote_ports, token, unique, Stack, Topology, WsClient};
use serde_json::{json, Value};

use crate::live_tables::{self, Fixture};
use crate::pubsub::{keys_table, KEY};

const T: Duration = Duration::from_secs(10);

/// The port of the machine's NATS (`nats_url()`).
fn nats_port() -> u16 {
    nats_url()
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or(4222)
}

/// postgres-websockets channels, a direct channel, a wspubsub topic and a `/live` custom
/// topic, each end to end on a stack of `topology`.
async fn every_protocol(topology: Topology) -> anyhow::Result<Stack> {
    let direct = unique("direct-");
    let (table, domain) = keys_table().await?;
    let stack = Stack::start_as(
        topology,
        &[
            ("PGWS_DIRECT_CHANNELS", &direct),
            ("PGWS_PUBSUB_KEYS_TABLE", &table),
        ],
    )
    .await?;
    let base = stack.ws_url(0);
    let db = stack.pg().await?;

    // postgres-websockets: a client message reaches every reader; SQL reaches them verbatim.
    let mut ann = stack
        .connect(0, "chat", &json!({"mode": "rw", "user": "ann"}))
        .await?;
    let mut bob = stack.connect(0, "chat", &json!({"mode": "r"})).await?;
    ann.send_text("hello").await?;
    for ws in [&mut ann, &mut bob] {
        let env = ws.next_json(T).await?;
        assert_eq!(
            (env["channel"].as_str(), env["payload"].as_str()),
            (Some("chat"), Some("hello"))
        );
        assert_eq!(env["claims"]["user"], "ann");
    }
    let raw = r#"{"channel":"chat","payload":"from sql"}"#;
    stack.notify(&db, raw).await?;
    assert_eq!(bob.next_text(T).await?, raw);

    // A direct channel: NOTIFY reaches the socket bare, the socket's frame is NOTIFYed bare.
    let (_l, mut heard) = listen(&[&direct]).await?;
    let claims = json!({"channel": direct, "mode": "rw"});
    let mut dws = WsClient::connect(&format!("{base}/{}", token(&claims))).await?;
    db.execute("SELECT pg_notify($1, 'to the socket')", &[&direct])
        .await?;
    assert_eq!(dws.next_text(T).await?, "to the socket");
    assert_eq!(
        tokio::time::timeout(T, heard.recv()).await?.map(|h| h.1),
        Some("to the socket".to_owned())
    );
    // postgrest-ws's body: the payload and the claims.
    dws.send_text("from the socket").await?;
    let body = tokio::time::timeout(T, heard.recv()).await?.map(|h| h.1);
    let body: Value = serde_json::from_str(&body.unwrap_or_default())?;
    assert_eq!(
        body,
        json!({"payload": "from the socket", "userClaims": claims})
    );

    // wspubsub: the key's publisher reaches a subscriber verbatim; a second publisher is refused.
    let mut publ = WsClient::connect(&format!("{base}/ws/pub/{KEY}/{domain}/news")).await?;
    let mut sub = WsClient::connect(&format!("{base}/ws/sub/{domain}/news")).await?;
    let sent = Instant::now();
    loop {
        publ.send_text("extra!").await?;
        match sub.next_text(Duration::from_millis(300)).await {
            Ok(frame) => {
                assert_eq!(frame, "extra!");
                break;
            }
            Err(_) if sent.elapsed() < T => {}
            Err(e) => return Err(e),
        }
    }
    let second = WsClient::connect(&format!("{base}/ws/pub/{KEY}/{domain}/news")).await;
    assert!(second.is_err(), "a second publisher was accepted");

    // /live: a custom topic created by one socket carries a message to another.
    let mut a = live_tables::live(&stack, 0, &json!({"sub": "ann"})).await?;
    let mut b = live_tables::live(&stack, 0, &json!({"sub": "bob"})).await?;
    let topic = unique("room");
    let created = live_tables::call(
        &mut a,
        "create-topic",
        json!({"name": topic, "public": true}),
    )
    .await?;
    assert_eq!(created["ok"], true, "{created}");
    live_tables::subscribe(&mut b, &topic).await?;
    let said = live_tables::call(
        &mut a,
        "new-message",
        json!({"topicName": topic, "message": {"text": "hi"}}),
    )
    .await?;
    assert_eq!(said["ok"], true, "{said}");
    let event = b.next_json(T).await?;
    assert_eq!(event["type"], "event", "{event}");
    assert_eq!(event["data"]["text"], "hi", "{event}");
    Ok(stack)
}

#[tokio::test]
async fn every_protocol_on_split_services() -> anyhow::Result<()> {
    every_protocol(Topology::Split).await.map(drop)
}

#[tokio::test]
async fn every_protocol_in_one_process_that_never_connects_to_nats() -> anyhow::Result<()> {
    let stack = every_protocol(Topology::One).await?;
    let pid = stack.gateways[0].pid().expect("a pid");
    let ports = remote_ports(pid);
    assert!(
        !ports.is_empty(),
        "no connection seen at all (the database's?)"
    );
    assert!(
        !ports.contains(&nats_port()),
        "pgws without PGWS_NATS_URL connected to NATS: remote ports {ports:?}"
    );
    // One admin listener answers for the three roles.
    let metrics = pgws_tests::http_get(stack.gateways[0].admin, "/metrics")
        .await?
        .1;
    for role in ["pgws_gateway_", "pgws_bridge_", "pgws_recorder_"] {
        assert!(metrics.contains(role), "no {role} metrics");
    }
    Ok(())
}

#[tokio::test]
async fn table_events_under_row_security_in_one_process() -> anyhow::Result<()> {
    let fx = Fixture::create(&pgws_tests::db_uri()).await?;
    let mut stack = Stack::new();
    stack.topology = Topology::One;
    stack.over_nats = false;
    let topics = format!("{}.*", fx.schema);
    let slot = format!("{}_slot", fx.schema);
    stack.extra = vec![
        ("PGWS_TABLE_TOPICS".to_owned(), topics),
        ("PGWS_CAPTURE_SLOT".to_owned(), slot),
    ];
    stack.add_gateway(&[]).await?;
    let web = fx.role("web");
    let mut ann = live_tables::live(&stack, 0, &json!({"sub": "ann", "role": web})).await?;
    let mut bob = live_tables::live(&stack, 0, &json!({"sub": "bob", "role": web})).await?;
    live_tables::subscribe(&mut ann, "orders").await?;
    live_tables::subscribe(&mut bob, "orders").await?;
    fx.slot_ready().await?;
    let db = fx.db().await?;
    db.execute(
        &format!(
            "INSERT INTO {}.orders (owner, note) VALUES ('ann', 'a1')",
            fx.schema
        ),
        &[],
    )
    .await?;
    let got = live_tables::events(&mut ann, 1).await?;
    assert_eq!(got[0].2["note"], "a1", "{got:?}");
    live_tables::assert_quiet(&mut bob, "bob may not see ann's row").await;
    Ok(())
}

/// `payload -> rows` recorded in `pgws_audit.messages` for `channel`.
async fn audit_rows(
    db: &tokio_postgres::Client,
    channel: &str,
) -> anyhow::Result<BTreeMap<String, i64>> {
    let rows = db
        .query(
            "SELECT payload, count(*) FROM pgws_audit.messages WHERE channel = $1 GROUP BY 1",
            &[&channel],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

#[tokio::test]
async fn one_process_audits_exactly_what_it_notified_across_a_sigkill() -> anyhow::Result<()> {
    let mut stack = Stack::start_one(&[]).await?;
    let channel = unique("audited-");
    let (_l, mut heard) = listen(&[&stack.listen_channel]).await?;
    let claims = json!({"mode": "rw"});
    let mut ws = stack.connect(0, &channel, &claims).await?;
    // Killed with messages in flight: some accepted and not yet NOTIFYed, some NOTIFYed.
    for i in 0..400 {
        ws.send_text(&format!("m{i}")).await?;
    }
    let mut early = Vec::new();
    while early.len() < 20 {
        early.extend(tokio::time::timeout(T, heard.recv()).await?);
    }
    stack.gateways[0].signal("KILL")?;
    drop(ws);
    stack.gateways.clear();
    stack.add_gateway(&[]).await?;
    let mut ws = stack.connect(0, &channel, &claims).await?;
    for i in 0..50 {
        ws.send_text(&format!("after{i}")).await?;
    }
    // Every message the restarted process accepted reaches its own socket: then all is in.
    let mut seen = 0;
    while seen < 50 {
        let env = ws.next_json(T).await?;
        if env["payload"]
            .as_str()
            .is_some_and(|p| p.starts_with("after"))
        {
            seen += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut notified: BTreeMap<String, i64> = BTreeMap::new();
    while let Some((_, payload, _)) = early.pop().or_else(|| heard.try_recv().ok()) {
        let env: Value = serde_json::from_str(&payload)?;
        if env["channel"] == channel.as_str() {
            *notified
                .entry(env["payload"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
    }
    let db = stack.pg().await?;
    let recorded = audit_rows(&db, &channel).await?;
    let before = notified.keys().filter(|p| !p.starts_with("after")).count();
    eprintln!("NOTIFYed before the SIGKILL: {before} of 400");
    assert!(notified.len() >= 50, "only {} notified", notified.len());
    assert!(
        notified.values().all(|n| *n == 1),
        "a NOTIFY repeated: {notified:?}"
    );
    assert_eq!(
        recorded, notified,
        "the audit rows are not exactly the messages NOTIFYed"
    );
    Ok(())
}

#[tokio::test]
async fn two_nodes_over_nats_share_channels_and_one_listen_leader() -> anyhow::Result<()> {
    let mut stack = Stack::new();
    stack.topology = Topology::One;
    stack.add_gateway(&[]).await?;
    stack.add_gateway(&[]).await?;
    stack.wait_flowing(0).await?;
    stack.wait_flowing(1).await?;
    let mut writer = stack.connect(0, "shared", &json!({"mode": "rw"})).await?;
    let mut reader = stack.connect(1, "shared", &json!({"mode": "r"})).await?;
    writer.send_text("across nodes").await?;
    let env = reader.next_json(T).await?;
    assert_eq!(env["payload"], "across nodes");

    let mut leader = None;
    for (i, node) in stack.gateways.iter().enumerate() {
        if node.metric("pgws_bridge_leader").await == Some(1.0) {
            leader = Some(i);
        }
    }
    let leader = leader.expect("one node leads");
    let other = 1 - leader;
    let mut ws = stack.connect(other, "after", &json!({"mode": "r"})).await?;
    let db = stack.pg().await?;
    stack.gateways[leader].signal("KILL")?;
    let killed = Instant::now();
    let payload = json!({"channel": "after", "payload": "again"}).to_string();
    loop {
        stack.notify(&db, &payload).await?;
        if ws.next_text(Duration::from_millis(100)).await.is_ok() {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "no delivery 10 s after the leader node died"
        );
    }
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_secs(2),
        "SQL notifications reached the surviving node {took:?} after the leader's SIGKILL"
    );
    Ok(())
}

/// `deploy/bridge-role.sql` with `audit_to_bridge` (what `scripts/stack.sh` runs before
/// `pgws`) hands `pgws_bridge` an audit schema that a split stack's recorder made as another
/// user, the sequence of `dead_letters`' identity column included: a stack run with `--split`
/// can be run as one process afterwards.
#[test]
fn the_bridge_role_takes_over_an_audit_schema_a_split_recorder_made() -> anyhow::Result<()> {
    let pg = pgws_tests::PrivatePg::start()?;
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let psql = |args: &[&str]| -> anyhow::Result<String> {
        let out = std::process::Command::new("psql")
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", &pg.uri()])
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "psql {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    // The recorder's migrations, run as the superuser (a split recorder's own user).
    psql(&["-c", "CREATE SCHEMA pgws_audit"])?;
    let mut migrations: Vec<_> =
        std::fs::read_dir(root.join("services/pg-recorder/src/migrations"))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
    migrations.sort();
    for file in &migrations {
        psql(&["-f", &file.to_string_lossy()])?;
    }
    let role = root.join("deploy/bridge-role.sql");
    psql(&[
        "-v",
        "bridge_password=secret",
        "-v",
        "audit_to_bridge=1",
        "-f",
        &role.to_string_lossy(),
    ])?;
    let others = psql(&[
        "-c",
        "SELECT string_agg(c.relname, ', ' ORDER BY c.relname) FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = 'pgws_audit' AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
            AND pg_get_userbyid(c.relowner) <> 'pgws_bridge'",
    ])?;
    assert_eq!(others, "", "pgws_audit relations not handed to pgws_bridge");
    assert!(
        !psql(&[
            "-c",
            "SELECT string_agg(relname, ',') FROM pg_class WHERE relname = 'dead_letters_id_seq'"
        ])?
        .is_empty(),
        "the migrations made no identity sequence: the test proves nothing"
    );
    Ok(())
}
