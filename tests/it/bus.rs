//! The bus as a trust boundary: the stack on a private nats-server running the shipped
//! configuration (`deploy/compose/nats.conf`, one user per service), where every service works
//! and a client holding the gateway's credentials can forge nothing, nor touch the audit
//! stream the recorder owns.

use std::time::Duration;

use async_nats::ConnectOptions;
use futures::StreamExt;
use pgws_tests::{
    eventually, token, NatsSite, PrivateNats, Service, ServiceKind, Stack, TempDb, WsClient,
};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);
const API_KEY: &str = "f47ac10b-58cc-4372-a567-0e02b2c3d479";

const PASSWORDS: [(&str, &str); 3] = [
    ("NATS_GATEWAY_PASSWORD", "gateway-secret"),
    ("NATS_BRIDGE_PASSWORD", "bridge-secret"),
    ("NATS_RECORDER_PASSWORD", "recorder-secret"),
];

/// The shipped configuration with what a private server must change: its ports and store.
fn shipped_conf(site: &NatsSite) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/compose/nats.conf");
    let mut conf = std::fs::read_to_string(path).unwrap_or_default();
    for (line, private) in [
        ("port: 4222", format!("port: {}", site.port)),
        (
            "http_port: 8222",
            format!("http_port: {}", site.monitor_port),
        ),
        (
            "  store_dir: \"/data\"",
            format!("  store_dir: {:?}", site.store.display().to_string()),
        ),
    ] {
        let found = conf.lines().filter(|l| *l == line).count();
        assert_eq!(found, 1, "deploy/compose/nats.conf: {line:?} {found} times");
        conf = conf
            .lines()
            .map(|l| if l == line { private.as_str() } else { l })
            .collect::<Vec<_>>()
            .join("\n");
    }
    conf
}

/// A NATS client with a service's credentials and inbox prefix, as the service connects.
async fn client_as(
    nats: &PrivateNats,
    user: &str,
    password: &str,
    service: &str,
) -> anyhow::Result<async_nats::Client> {
    Ok(
        ConnectOptions::with_user_and_password(user.into(), password.into())
            .custom_inbox_prefix(format!("_INBOX.pgws.{service}"))
            .connect(nats.url())
            .await?,
    )
}

/// The audit stream's configuration, read with the recorder's credentials (its owner).
async fn audit_stream_config(nats: &PrivateNats) -> anyhow::Result<Value> {
    let owner = client_as(nats, "recorder", "recorder-secret", "pg-recorder").await?;
    let info = owner
        .request("$JS.API.STREAM.INFO.pgws-audit", "".into())
        .await?;
    let info: Value = serde_json::from_slice(&info.payload)?;
    Ok(info["config"].clone())
}

/// A `/live` request on `ws` and its reply.
async fn live_call(ws: &mut WsClient, method: &str, attributes: Value) -> anyhow::Result<Value> {
    let request = json!({"id": method, "method": method, "attributes": attributes});
    ws.send_text(&request.to_string()).await?;
    ws.next_json(T).await
}

/// Rows of `pgws_audit.messages` with this channel and payload.
async fn recorded(db_uri: &str, channel: &str, payload: &str) -> i64 {
    let Ok((db, conn)) = tokio_postgres::connect(db_uri, tokio_postgres::NoTls).await else {
        return 0;
    };
    tokio::spawn(conn);
    db.query_one(
        "SELECT count(*) FROM pgws_audit.messages WHERE channel = $1 AND payload = $2",
        &[&channel, &payload],
    )
    .await
    .map(|row| row.get(0))
    .unwrap_or(0)
}

#[tokio::test]
async fn the_shipped_nats_authorization_carries_the_stack_and_stops_a_forging_gateway(
) -> anyhow::Result<()> {
    let nats = PrivateNats::start_configured(shipped_conf, &PASSWORDS).await?;
    // The shipped file is for the prefix `pgws`; the stack gets a database of its own so that
    // its leader election meets no other stack of that prefix.
    let db = TempDb::create().await?;
    {
        let (c, conn) = tokio_postgres::connect(&db.uri, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        c.batch_execute("CREATE TABLE public.notes (id serial PRIMARY KEY, body text)")
            .await?;
        c.batch_execute(&format!(
            "CREATE TABLE apikeys (id serial PRIMARY KEY, domain varchar(64) NOT NULL UNIQUE,
                username varchar(254) NOT NULL, apikey varchar(36) NOT NULL UNIQUE,
                insert_ts timestamp NOT NULL DEFAULT now(), active boolean NOT NULL DEFAULT false);
             INSERT INTO apikeys (domain, username, apikey, active)
                VALUES ('example.com', 'ops@example.com', '{API_KEY}', true)"
        ))
        .await?;
    }
    let subjects = pgws_proto::Subjects::new(pgws_proto::Prefix::new("pgws")?);
    let slot = pgws_tests::unique("bus").replace('-', "_");
    let mut stack = Stack::new();
    stack.prefix = "pgws".into();
    stack.extra = vec![
        ("PGWS_NATS_URL".into(), nats.url()),
        ("PGWS_DB_URI".into(), db.uri.clone()),
        ("PGWS_TABLE_TOPICS".into(), "public.notes".into()),
        ("PGWS_CAPTURE_SLOT".into(), slot.clone()),
        ("PGWS_ADMIN_ROLES".into(), "admin".into()),
        ("PGWS_DIRECT_CHANNELS".into(), "room_direct".into()),
        ("PGWS_PUBSUB_GRACE".into(), "1".into()),
    ];
    let as_user = |user: &str, password: &str| {
        let mut env = stack.env();
        env.extend([
            ("PGWS_NATS_USER".into(), user.into()),
            ("PGWS_NATS_PASSWORD".into(), password.into()),
        ]);
        env
    };
    // A gateway started before the recorder waits for it to create the audit stream: it may
    // not create (nor change) the stream itself.
    let gateway =
        Service::start(ServiceKind::Gateway, &as_user("gateway", "gateway-secret")).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, body) = pgws_tests::http_get(gateway.admin, "/readyz").await?;
    assert!(
        status == 503 && body.contains("audit"),
        "a gateway without the audit stream answered {status} {body:?}"
    );
    let recorder = Service::start(
        ServiceKind::Recorder,
        &as_user("recorder", "recorder-secret"),
    )
    .await?;
    recorder.wait_ready().await?;
    gateway.wait_ready().await?;
    stack.gateways.push(gateway);
    stack
        .add_bridge(&[
            ("PGWS_NATS_USER", "bridge"),
            ("PGWS_NATS_PASSWORD", "bridge-secret"),
        ])
        .await?;
    // A database NOTIFY reaches a socket.
    stack.wait_flowing(0).await?;

    // A client message is NOTIFYed (it comes back) and recorded in the audit table.
    let mut ws = stack
        .connect(0, "chat", &json!({"mode": "rw", "gaps": true}))
        .await?;
    ws.send_text("through the bus").await?;
    assert_eq!(ws.next_json(T).await?["payload"], "through the bus");
    let is_recorded = eventually(Duration::from_secs(30), || async {
        recorded(&db.uri, "chat", "through the bus").await == 1
    })
    .await;
    assert!(
        is_recorded,
        "the message was not recorded:\n{}",
        recorder.log()
    );

    // A resuming socket reads the history the bridge keeps: what it missed comes back.
    let jwt = token(&json!({"mode": "r"}));
    let resume_url = |from: &str| format!("{}/kept/{jwt}?resume={from}", stack.ws_url(0));
    let mut resuming = WsClient::connect(&resume_url("")).await?;
    let pg = stack.pg().await?;
    stack
        .notify(&pg, r#"{"channel":"kept","payload":"kept 1"}"#)
        .await?;
    let first = resuming.next_json(T).await?;
    assert_eq!(first["message"]["payload"], "kept 1", "{first}");
    drop(resuming);
    stack
        .notify(&pg, r#"{"channel":"kept","payload":"kept 2"}"#)
        .await?;
    let position = first["position"].as_str().unwrap_or_default();
    let mut resuming = WsClient::connect(&resume_url(position)).await?;
    let missed = resuming.next_json(T).await?;
    assert_eq!(missed["message"]["payload"], "kept 2", "{missed}");

    // A `/live` custom topic: created through a bridge, a message reaches its subscriber.
    let jwt = token(&json!({"sub": "ann", "role": "web_user"}));
    let url = format!("{}/live?token={jwt}", stack.ws_url(0));
    let (mut reader, mut writer) = (
        WsClient::connect(&url).await?,
        WsClient::connect(&url).await?,
    );
    let create = live_call(&mut reader, "create-topic", json!({"name": "room"})).await?;
    let subscribe = live_call(&mut reader, "subscribe", json!({"topicName": "room"})).await?;
    let message = json!({"topicName": "room", "message": "hi"});
    let sent = live_call(&mut writer, "new-message", message).await?;
    for reply in [create, subscribe, sent] {
        assert_eq!(reply["ok"], true, "{reply}");
    }
    assert_eq!(reader.next_json(T).await?["data"], "hi");

    // A `/live` table topic: the leader's capture publishes a committed row to the admin's
    // class, and the gateway's credentials cannot publish an event there.
    let admin = token(&json!({"sub": "ops", "role": "admin"}));
    let mut ops = WsClient::connect(&format!("{}/live?token={admin}", stack.ws_url(0))).await?;
    let subscribe = live_call(&mut ops, "subscribe", json!({"topicName": "notes"})).await?;
    assert_eq!(subscribe["ok"], true, "{subscribe}");
    let (tdb, conn) = tokio_postgres::connect(&db.uri, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let slot_made = eventually(T, || async {
        tdb.query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .ok()
        .flatten()
        .is_some()
    })
    .await;
    assert!(slot_made, "no capture slot");
    let class = pgws_proto::LiveClass {
        topic: "notes".into(),
        role: "admin".into(),
        claims: "{}".into(),
        all: true,
        route: None,
    };
    let subject = subjects.table(&class);
    let forging = client_as(&nats, "gateway", "gateway-secret", "ws-gateway").await?;
    let fake = json!({"type": "event", "topic": "notes", "forged": true}).to_string();
    forging.publish(subject, fake.into()).await?;
    forging.flush().await?;
    tdb.batch_execute("INSERT INTO public.notes (body) VALUES ('from SQL')")
        .await?;
    let event = ops.next_json(Duration::from_secs(20)).await?;
    assert_eq!(event["data"]["attributes"]["body"], "from SQL", "{event}");

    // Whoever holds the gateway's credentials cannot publish a delivery or a gap marker: the
    // socket sees only what the database notified.
    let forger = client_as(&nats, "gateway", "gateway-secret", "ws-gateway").await?;
    let forged = json!({"channel": "chat", "forged": true}).to_string();
    forger
        .publish("pgws.deliver.chat", forged.clone().into())
        .await?;
    forger.publish("pgws.gap", "listener".into()).await?;
    forger.flush().await?;
    let pg = stack.pg().await?;
    let real = json!({"channel": "chat", "real": true}).to_string();
    stack.notify(&pg, &real).await?;
    assert_eq!(ws.next_text(T).await?, real, "a forged frame got through");
    // The same delivery from the bridge's credentials does reach the socket.
    let bridge = client_as(&nats, "bridge", "bridge-secret", "pg-bridge").await?;
    bridge
        .publish("pgws.deliver.chat", forged.clone().into())
        .await?;
    bridge.flush().await?;
    assert_eq!(ws.next_text(T).await?, forged, "the bridge cannot deliver");

    // Nor can it answer another gateway's registry request: a gateway's inbox gets the
    // leader's answer and never the forged one.
    let victim = client_as(&nats, "gateway", "gateway-secret", "ws-gateway").await?;
    let inbox = "_INBOX.pgws.ws-gateway.victim";
    let mut replies = victim.subscribe(inbox).await?;
    victim.flush().await?;
    forger.publish(inbox, r#""ok""#.into()).await?;
    forger.flush().await?;
    let lookup = json!({"gateway": "victim", "op": "lookup",
        "topic": {"domain": "d", "topic": "t"}});
    victim
        .publish_with_reply("pgws.registry", inbox, lookup.to_string().into())
        .await?;
    let answer = tokio::time::timeout(T, replies.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no registry answer"))?;
    let answer = String::from_utf8_lossy(&answer.payload).into_owned();
    assert!(
        answer == r#""absent""# || answer == r#""retry""#,
        "the first answer is {answer}, not the leader's"
    );

    // Nor close a wspubsub topic's subscribers: only the bridges may publish on a topic's close
    // subject, and a close header on the topic's own subject (which publishers' gateways write)
    // is ignored. The leader's close, once the publisher is gone, does arrive.
    let topic = pgws_proto::Topic {
        domain: "example.com".into(),
        topic: "news".into(),
    };
    let mut publisher = WsClient::connect(&format!(
        "{}/ws/pub/{API_KEY}/example.com/news",
        stack.ws_url(0)
    ))
    .await?;
    let mut reader =
        WsClient::connect(&format!("{}/ws/sub/example.com/news", stack.ws_url(0))).await?;
    for subject in [subjects.topic(&topic), subjects.topic_close(&topic)] {
        let mut h = async_nats::HeaderMap::new();
        h.insert(pgws_proto::headers::CLOSE, "4004 forged");
        forger.publish_with_headers(subject, h, "".into()).await?;
    }
    forger.flush().await?;
    publisher.send_text("still open").await?;
    assert_eq!(
        reader.next_text(T).await?,
        "still open",
        "a forged close got through"
    );
    drop(publisher);
    let (code, reason) = reader.expect_close(T).await?;
    assert_eq!(code, 4004, "{reason}");

    // Nor make the leader LISTEN on a channel that is not a direct channel and read what is
    // notified there: the bridge refuses that channel of a forged report, and LISTENs on the
    // configured direct channel of the same report.
    let mut spied = forger.subscribe(subjects.direct("payroll")).await?;
    let mut direct = forger.subscribe(subjects.direct("room_direct")).await?;
    forger.flush().await?;
    let report = pgws_proto::RegistryRequest {
        gateway: "forger".into(),
        op: pgws_proto::RegistryOp::Report {
            presence: pgws_proto::Presence {
                channels: vec!["payroll".into(), "room_direct".into()],
                ..Default::default()
            },
            part: None,
            version: None,
        },
    };
    let answered = forger.request(subjects.registry(), serde_json::to_vec(&report)?.into());
    tokio::time::timeout(T, answered).await??;
    pg.batch_execute("SELECT pg_notify('payroll', 'salaries'), pg_notify('room_direct', 'hello')")
        .await?;
    let heard = tokio::time::timeout(T, direct.next()).await?;
    assert_eq!(heard.map(|m| m.payload), Some("hello".into()));
    let spied = tokio::time::timeout(Duration::from_millis(500), spied.next()).await;
    assert!(
        spied.is_err(),
        "a forged report made the leader LISTEN on a channel that is not direct: {spied:?}"
    );

    // Nor read another service's replies (the records the recorder pulls), nor delete the
    // audit stream, nor change its limits (records that expire before they are recorded).
    let mut snoop = forger.subscribe("_INBOX.pgws.pg-recorder.>").await?;
    let mut all = forger.subscribe("_INBOX.>").await?;
    let delete = forger.request("$JS.API.STREAM.DELETE.pgws-audit", "".into());
    let deleted = tokio::time::timeout(Duration::from_secs(3), delete).await;
    assert!(
        !matches!(deleted, Ok(Ok(_))),
        "the gateway's credentials reached the JetStream API"
    );
    let mut shorter = audit_stream_config(&nats).await?;
    assert_eq!(shorter["max_age"], 604_800_000_000_000u64, "{shorter}");
    shorter["max_age"] = json!(3_600_000_000_000u64);
    let update = forger.request(
        "$JS.API.STREAM.UPDATE.pgws-audit",
        shorter.to_string().into(),
    );
    let updated = tokio::time::timeout(Duration::from_secs(3), update).await;
    let now = audit_stream_config(&nats).await?;
    assert_eq!(
        now["max_age"], 604_800_000_000_000u64,
        "the gateway's credentials changed the audit stream ({updated:?}): {now}"
    );
    ws.send_text("after the attempts").await?;
    assert_eq!(ws.next_json(T).await?["payload"], "after the attempts");
    let is_recorded = eventually(Duration::from_secs(30), || async {
        recorded(&db.uri, "chat", "after the attempts").await == 1
    })
    .await;
    assert!(is_recorded, "the audit stream stopped recording");
    for sub in [&mut snoop, &mut all] {
        let seen = tokio::time::timeout(Duration::from_millis(200), sub.next()).await;
        assert!(
            seen.is_err(),
            "the gateway's credentials read another inbox"
        );
    }

    // Nobody connects without a user, or with a wrong password.
    let anonymous = ConnectOptions::new().connect(nats.url()).await;
    assert!(anonymous.is_err(), "an anonymous client connected");
    let wrong = ConnectOptions::with_user_and_password("gateway".into(), "guess".into())
        .connect(nats.url())
        .await;
    assert!(wrong.is_err(), "a wrong password was accepted");
    Ok(())
}

#[tokio::test]
async fn a_gateway_under_the_earlier_authorization_still_becomes_ready() -> anyhow::Result<()> {
    // Before gateways read the audit stream's information, the shipped file let them create
    // and update it instead: a copy of that block must not leave a new gateway unready.
    let earlier = |site: &NatsSite| {
        let conf = shipped_conf(site);
        let info = r#""pgws.sync", "$JS.API.STREAM.INFO.pgws-audit""#;
        assert!(conf.contains(info), "the gateway's stream permission moved");
        conf.replace(
            info,
            r#""pgws.sync", "$JS.API.STREAM.CREATE.pgws-audit", "$JS.API.STREAM.UPDATE.pgws-audit""#,
        )
    };
    let nats = PrivateNats::start_configured(earlier, &PASSWORDS).await?;
    let db = TempDb::create().await?;
    let mut stack = Stack::new();
    stack.prefix = "pgws".into();
    stack.extra = vec![
        ("PGWS_NATS_URL".into(), nats.url()),
        ("PGWS_DB_URI".into(), db.uri.clone()),
    ];
    let mut env = stack.env();
    env.extend([
        ("PGWS_NATS_USER".into(), "recorder".into()),
        ("PGWS_NATS_PASSWORD".into(), "recorder-secret".into()),
    ]);
    let recorder = Service::start(ServiceKind::Recorder, &env).await?;
    recorder.wait_ready().await?;
    // Other limits than the recorder's: the gateway's create finds the stream there and
    // leaves it as it is.
    stack
        .add_gateway(&[
            ("PGWS_NATS_USER", "gateway"),
            ("PGWS_NATS_PASSWORD", "gateway-secret"),
            ("PGWS_AUDIT_MAX_BYTES", "8388608"),
        ])
        .await?;
    let config = audit_stream_config(&nats).await?;
    assert_eq!(config["max_bytes"], 16 << 20, "{config}");
    Ok(())
}
