//! `/live` table topics: events from plain SQL writes, in commit order, filtered by the
//! table's privileges and row-level security per socket, whole rows of any size, deletes per
//! kind of subscriber, and capture across a bridge failover and a PostgreSQL restart.

use std::time::Duration;

use pgws_tests::{token, unique, PrivatePg, Stack, WsClient};
use serde_json::{json, Value};

pub(crate) const T: Duration = Duration::from_secs(20);

/// A schema with `orders` (row-level security: a reader sees the rows whose `owner` is its
/// `sub`; the role `<schema>_audit` also every row not owned by bob), the roles `<schema>_web`
/// and `<schema>_audit` that may SELECT it, a role `<schema>_none` that may not, and the roles
/// dropped (and the stack's slot and publication too) when it drops.
pub(crate) struct Fixture {
    pub(crate) schema: String,
    uri: String,
    slot: String,
}

impl Fixture {
    /// Creates the fixture in the database of `uri`; declared before the stack
    /// ([`Fixture::stack`]), it drops after the stack's processes are gone.
    pub(crate) async fn create(uri: &str) -> anyhow::Result<Self> {
        let schema = unique("lt").replace('-', "_");
        let (db, conn) = tokio_postgres::connect(uri, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        db.batch_execute(&format!(
            "CREATE SCHEMA {s};
             CREATE TABLE {s}.orders (id bigserial PRIMARY KEY, owner text NOT NULL,
                                      note text, big text);
             ALTER TABLE {s}.orders ENABLE ROW LEVEL SECURITY;
             CREATE POLICY own ON {s}.orders FOR SELECT
               USING (owner = current_setting('request.jwt.claims', true)::json ->> 'sub');
             CREATE ROLE {s}_web NOLOGIN;
             CREATE ROLE {s}_audit NOLOGIN;
             CREATE ROLE {s}_none NOLOGIN;
             CREATE POLICY audit ON {s}.orders FOR SELECT TO {s}_audit USING (owner <> 'bob');
             GRANT USAGE ON SCHEMA {s} TO {s}_web, {s}_audit, {s}_none;
             GRANT SELECT ON {s}.orders TO {s}_web, {s}_audit;",
            s = schema
        ))
        .await?;
        Ok(Self {
            uri: uri.to_owned(),
            slot: format!("{schema}_slot"),
            schema,
        })
    }

    /// A stack on this fixture's database capturing its schema's tables, with `bridges` bridges and
    /// `gateways` gateways and `extra` settings for all.
    pub(crate) async fn stack(
        &self,
        bridges: usize,
        gateways: usize,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Stack> {
        let topics = format!("{}.*", self.schema);
        let mut env = vec![
            ("PGWS_DB_URI", self.uri.as_str()),
            ("PGWS_TABLE_TOPICS", topics.as_str()),
            ("PGWS_CAPTURE_SLOT", self.slot.as_str()),
        ];
        env.extend_from_slice(extra);
        Stack::start_sized(&env, bridges, gateways).await
    }

    pub(crate) fn role(&self, which: &str) -> String {
        format!("{}_{which}", self.schema)
    }

    /// Waits until the leader bridge created the stack's slot: changes committed from then on
    /// are captured.
    pub(crate) async fn slot_ready(&self) -> anyhow::Result<()> {
        let db = self.db().await?;
        let ready = pgws_tests::eventually(T, || async {
            db.query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .ok()
            .flatten()
            .is_some()
        })
        .await;
        anyhow::ensure!(ready, "no replication slot {}", self.slot);
        Ok(())
    }

    pub(crate) async fn db(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (db, conn) = tokio_postgres::connect(&self.uri, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(db)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let s = &self.schema;
        let sql = format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
              WHERE slot_name = '{slot}' AND NOT active;
             DROP PUBLICATION IF EXISTS {slot};
             DROP SCHEMA IF EXISTS {s} CASCADE;
             DROP ROLE IF EXISTS {s}_web; DROP ROLE IF EXISTS {s}_audit;
             DROP ROLE IF EXISTS {s}_none; DROP ROLE IF EXISTS {s}_bypass;
             DROP ROLE IF EXISTS {s}_super;",
            slot = self.slot
        );
        let _ = std::process::Command::new("psql")
            .args(["-X", "-q", "-d", &self.uri, "-c", &sql])
            .output();
    }
}

/// A `/live` socket on gateway `i` with these claims.
pub(crate) async fn live(stack: &Stack, i: usize, claims: &Value) -> anyhow::Result<WsClient> {
    WsClient::connect(&format!("{}/live?token={}", stack.ws_url(i), token(claims))).await
}

pub(crate) async fn call(
    ws: &mut WsClient,
    method: &str,
    attributes: Value,
) -> anyhow::Result<Value> {
    ws.send_text(&json!({"id": method, "method": method, "attributes": attributes}).to_string())
        .await?;
    ws.next_json(T).await
}

pub(crate) async fn subscribe(ws: &mut WsClient, topic: &str) -> anyhow::Result<()> {
    let reply = call(ws, "subscribe", json!({"topicName": topic})).await?;
    anyhow::ensure!(reply["ok"] == true, "subscribe refused: {reply}");
    Ok(())
}

/// The next `n` events, as `(event, id, attributes)`.
pub(crate) async fn events(
    ws: &mut WsClient,
    n: usize,
) -> anyhow::Result<Vec<(String, String, Value)>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let e = match ws.next_json(T).await {
            Ok(e) => e,
            Err(e) => anyhow::bail!("{e} after {} of {n} events: {out:?}", out.len()),
        };
        anyhow::ensure!(e["type"] == "event", "not an event: {e}");
        out.push((
            e["event"].as_str().unwrap_or_default().to_owned(),
            e["data"]["id"].as_str().unwrap_or_default().to_owned(),
            e["data"].get("attributes").cloned().unwrap_or(Value::Null),
        ));
    }
    Ok(out)
}

pub(crate) async fn assert_quiet(ws: &mut WsClient, what: &str) {
    if let Ok(frame) = ws.next_text(Duration::from_millis(700)).await {
        panic!("{what}: unexpected frame {frame}");
    }
}

pub(crate) fn kinds(events: &[(String, String, Value)]) -> Vec<(&str, &str)> {
    events
        .iter()
        .map(|(e, id, _)| (e.as_str(), id.as_str()))
        .collect()
}

#[tokio::test]
async fn sql_writes_reach_each_socket_as_its_role_and_policies_allow() -> anyhow::Result<()> {
    let fx = Fixture::create(&pgws_tests::db_uri()).await?;
    let stack = fx.stack(1, 2, &[("PGWS_ADMIN_ROLES", "boss")]).await?;
    let web = fx.role("web");
    let mut ann = live(&stack, 0, &json!({"sub": "ann", "role": web})).await?;
    let mut bob = live(&stack, 1, &json!({"sub": "bob", "role": web})).await?;
    let mut boss = live(&stack, 1, &json!({"sub": "root", "role": "boss"})).await?;
    let mut audit = live(&stack, 0, &json!({"sub": "aud", "role": fx.role("audit")})).await?;
    let mut none = live(&stack, 0, &json!({"sub": "eve", "role": fx.role("none")})).await?;
    let mut anon = live(&stack, 0, &json!({"sub": "x"})).await?;
    for ws in [&mut ann, &mut bob, &mut boss, &mut audit] {
        subscribe(ws, "orders").await?;
    }
    fx.slot_ready().await?;
    let refused = call(&mut none, "subscribe", json!({"topicName": "orders"})).await?;
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or("")
            .contains("may not SELECT"),
        "{refused}"
    );
    let refused = call(&mut anon, "subscribe", json!({"topicName": "orders"})).await?;
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or("")
            .contains("\"role\" claim"),
        "{refused}"
    );

    // Plain SQL, as psql would send it: no API involved.
    let db = fx.db().await?;
    let s = &fx.schema;
    let big = "x".repeat(20_000);
    // One statement at a time, each its own transaction, as psql sends them.
    for sql in [
        format!("INSERT INTO {s}.orders (owner, note) VALUES ('ann', 'first')"),
        format!("BEGIN; INSERT INTO {s}.orders (owner, note) VALUES ('ann', 'never'); ROLLBACK"),
        format!("INSERT INTO {s}.orders (owner, note) VALUES ('bob', 'second')"),
        format!("UPDATE {s}.orders SET note = 'changed' WHERE owner = 'ann'"),
    ] {
        db.batch_execute(&sql).await?;
    }
    // Bob's row goes at once, likely in the same batch as its creation: a row that no longer
    // exists is checked by its committed values, so bob still sees it come.
    for sql in [
        format!("DELETE FROM {s}.orders WHERE owner = 'bob'"),
        format!("INSERT INTO {s}.orders (owner, note, big) VALUES ('ann', 'large', '{big}')"),
    ] {
        db.batch_execute(&sql).await?;
    }
    // Ids: 1 ann, 2 rolled back, 3 bob, 4 ann (large). The web role's policy compares
    // `owner` with the `sub` claim, so the table is routed by value for it: a delete reaches
    // only the sockets whose `sub` is the deleted row's owner (its old row), so ann does not
    // hear of bob's row at all.
    let got = events(&mut ann, 3).await?;
    assert_eq!(
        kinds(&got),
        [("create", "1"), ("update", "1"), ("create", "4")]
    );
    assert_eq!(
        got[0].2,
        json!({"id": 1, "owner": "ann", "note": "first", "big": null})
    );
    assert_eq!(got[1].2["note"], "changed");
    assert_eq!(got[2].2["big"].as_str().map(str::len), Some(20_000));

    // A deleted row can no longer be checked: its readers get its id only.
    let got = events(&mut bob, 2).await?;
    assert_eq!(kinds(&got), [("create", "3"), ("delete", "3")]);
    assert_eq!(got[0].2["note"], "second");
    assert_eq!(got[1].2, Value::Null);

    let got = events(&mut boss, 5).await?;
    assert_eq!(
        kinds(&got),
        [
            ("create", "1"),
            ("create", "3"),
            ("update", "1"),
            ("delete", "3"),
            ("create", "4")
        ]
    );
    // Admins get the whole old row of a delete.
    assert_eq!(
        got[3].2,
        json!({"id": 3, "owner": "bob", "note": "second", "big": null})
    );
    // Another role, another policy: every row but bob's, and his delete's id.
    let got = events(&mut audit, 4).await?;
    assert_eq!(
        kinds(&got),
        [
            ("create", "1"),
            ("update", "1"),
            ("delete", "3"),
            ("create", "4")
        ]
    );
    assert_eq!(got[2].2, Value::Null);
    for (ws, who) in [
        (&mut ann, "ann"),
        (&mut bob, "bob"),
        (&mut boss, "boss"),
        (&mut audit, "audit"),
    ] {
        assert_quiet(ws, who).await;
    }
    assert_quiet(&mut none, "a refused socket").await;

    // Unsubscribed: nothing more.
    let reply = call(&mut ann, "unsubscribe", json!({"topicName": "orders"})).await?;
    assert_eq!(reply["ok"], true, "{reply}");
    db.batch_execute(&format!("INSERT INTO {s}.orders (owner) VALUES ('ann')"))
        .await?;
    assert_eq!(kinds(&events(&mut boss, 1).await?), [("create", "5")]);
    assert_quiet(&mut ann, "ann after unsubscribe").await;

    // A row created and deleted in one transaction no longer exists when it is checked: its
    // committed values decide, so its owner sees it come and go, as the admin does.
    db.batch_execute(&format!(
        "BEGIN;
         INSERT INTO {s}.orders (owner, note) VALUES ('bob', 'brief');
         DELETE FROM {s}.orders WHERE note = 'brief';
         COMMIT;"
    ))
    .await?;
    let got = events(&mut bob, 2).await?;
    assert_eq!(kinds(&got), [("create", "6"), ("delete", "6")]);
    assert_eq!(got[0].2["note"], "brief");
    assert_eq!(
        kinds(&events(&mut boss, 2).await?),
        [("create", "6"), ("delete", "6")]
    );
    // The auditor's policy hides bob's rows: ann's row 5, then the delete's id only.
    assert_eq!(
        kinds(&events(&mut audit, 2).await?),
        [("create", "5"), ("delete", "6")]
    );
    Ok(())
}

#[tokio::test]
async fn table_topics_are_listed_described_and_protected() -> anyhow::Result<()> {
    let fx = Fixture::create(&pgws_tests::db_uri()).await?;
    let stack = fx.stack(1, 1, &[]).await?;
    let mut web = live(&stack, 0, &json!({"sub": "ann", "role": fx.role("web")})).await?;
    let mut none = live(&stack, 0, &json!({"sub": "eve", "role": fx.role("none")})).await?;

    let list = call(&mut web, "list-topic", json!({})).await?;
    let topics = list["data"]["topics"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(topics.contains(&json!("orders")), "{list}");
    let list = call(&mut none, "list-topic", json!({})).await?;
    let topics = list["data"]["topics"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!topics.contains(&json!("orders")), "{list}");

    let got = call(&mut web, "get-topic", json!({"topicName": "orders"})).await?;
    assert_eq!(got["data"]["type"], "table", "{got}");
    assert_eq!(got["data"]["name"], "orders", "{got}");

    for (method, attributes, needle) in [
        ("create-topic", json!({"name": "orders"}), "table topic"),
        (
            "destroy-topic",
            json!({"name": "orders"}),
            "cannot be destroyed",
        ),
        (
            "new-message",
            json!({"topicName": "orders", "message": {"a": 1}}),
            "only the database writes",
        ),
    ] {
        let reply = call(&mut web, method, attributes).await?;
        assert_eq!(reply["ok"], false, "{method}: {reply}");
        assert!(
            reply["error"].as_str().unwrap_or("").contains(needle),
            "{method}: {reply}"
        );
    }
    Ok(())
}

/// Inserts a row for each note of `notes`, one transaction each, `pause` apart.
async fn insert_rows(
    db: &tokio_postgres::Client,
    schema: &str,
    notes: std::ops::Range<usize>,
    pause: Duration,
) -> anyhow::Result<()> {
    for i in notes {
        let sql = format!("INSERT INTO {schema}.orders (owner, note) VALUES ('ann', '{i}')");
        db.batch_execute(&sql).await?;
        tokio::time::sleep(pause).await;
    }
    Ok(())
}

/// The create events a socket received: the rows' notes in arrival order, how many events
/// repeated a row, and the longest pause between two events.
#[derive(Default)]
struct Received {
    notes: Vec<i64>,
    repeated: usize,
    last: Option<std::time::Instant>,
    longest: Duration,
}

impl Received {
    /// Reads events until `n` distinct rows were seen or nothing came for 30 s.
    async fn until(&mut self, ws: &mut WsClient, n: usize) {
        while self.notes.len() < n {
            let Ok(e) = ws.next_json(Duration::from_secs(30)).await else {
                return;
            };
            let now = std::time::Instant::now();
            if let Some(last) = self.last {
                self.longest = self.longest.max(now - last);
            }
            self.last = Some(now);
            let note: i64 = e["data"]["attributes"]["note"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(-1);
            if self.notes.contains(&note) {
                self.repeated += 1;
            } else {
                self.notes.push(note);
            }
        }
    }
}

#[tokio::test]
async fn a_leader_killed_mid_stream_loses_and_repeats_no_change() -> anyhow::Result<()> {
    let fx = Fixture::create(&pgws_tests::db_uri()).await?;
    let stack = fx.stack(2, 1, &[]).await?;
    let mut ann = live(&stack, 0, &json!({"sub": "ann", "role": fx.role("web")})).await?;
    subscribe(&mut ann, "orders").await?;
    fx.slot_ready().await?;
    let leader = stack.leader().await.expect("a leader");
    let db = fx.db().await?;
    let schema = fx.schema.clone();
    // 600 rows over about 10 s: the leader (reading after its 6 s settle) catches up, then
    // streams; it is killed while rows keep coming.
    let n = 600;
    let writer =
        tokio::spawn(
            async move { insert_rows(&db, &schema, 0..n, Duration::from_millis(15)).await },
        );
    // The leader is publishing: kill it mid-stream.
    let mut got = Received::default();
    got.until(&mut ann, 450).await;
    stack.bridges[leader].signal("KILL")?;
    got.until(&mut ann, n).await;
    writer.await??;
    let expected: Vec<i64> = (0..n as i64).collect();
    assert_eq!(
        got.notes, expected,
        "every committed row once, in commit order"
    );
    assert_eq!(got.repeated, 0, "no row twice");
    assert_quiet(&mut ann, "after the last row").await;
    eprintln!("longest pause between two events: {:?}", got.longest);
    Ok(())
}

/// The capture confirms a batch to PostgreSQL only once it is published: a leader killed while
/// it publishes a large transaction leaves the whole transaction to the next leader, whose
/// repeats the gateway drops.
#[tokio::test]
async fn a_leader_killed_while_publishing_a_transaction_loses_and_repeats_none_of_it(
) -> anyhow::Result<()> {
    let fx = Fixture::create(&pgws_tests::db_uri()).await?;
    let stack = fx.stack(2, 1, &[]).await?;
    let mut ann = live(&stack, 0, &json!({"sub": "ann", "role": fx.role("web")})).await?;
    subscribe(&mut ann, "orders").await?;
    fx.slot_ready().await?;
    let db = fx.db().await?;
    // The leader streams (past its settle) once the first row arrives.
    insert_rows(&db, &fx.schema, 0..1, Duration::ZERO).await?;
    let mut got = Received::default();
    got.until(&mut ann, 1).await;
    anyhow::ensure!(got.notes == [0], "the first row: {:?}", got.notes);
    let leader = stack.leader().await.expect("a leader");
    let n = 10_000;
    db.batch_execute(&format!(
        "INSERT INTO {}.orders (owner, note) SELECT 'ann', g::text FROM generate_series(1, {}) g",
        fx.schema,
        n - 1
    ))
    .await?;
    // Mid-transaction: the leader is publishing it.
    got.until(&mut ann, 200).await;
    stack.bridges[leader].signal("KILL")?;
    got.until(&mut ann, n).await;
    let published = got.notes.len();
    assert_eq!(
        got.notes,
        (0..n as i64).collect::<Vec<_>>(),
        "every row of the transaction once, in order ({published} rows arrived)"
    );
    assert_eq!(got.repeated, 0, "no row twice");
    Ok(())
}

#[tokio::test]
async fn a_postgres_restart_loses_and_repeats_no_change() -> anyhow::Result<()> {
    let pg = PrivatePg::start()?;
    let fx = Fixture::create(&pg.uri()).await?;
    let stack = fx.stack(1, 1, &[]).await?;
    let mut ann = live(&stack, 0, &json!({"sub": "ann", "role": fx.role("web")})).await?;
    subscribe(&mut ann, "orders").await?;
    fx.slot_ready().await?;
    let db = fx.db().await?;
    insert_rows(&db, &fx.schema, 0..50, Duration::from_millis(5)).await?;
    // Delivered, so the capture runs: restart PostgreSQL under it, then commit more rows
    // while the bridge reconnects.
    let mut got = Received::default();
    got.until(&mut ann, 20).await;
    drop(db);
    pg.stop()?;
    pg.restart()?;
    let db = fx.db().await?;
    insert_rows(&db, &fx.schema, 50..150, Duration::ZERO).await?;
    got.until(&mut ann, 150).await;
    assert_eq!(
        got.notes,
        (0..150).collect::<Vec<i64>>(),
        "every row once, in order"
    );
    assert_eq!(got.repeated, 0, "no row twice");
    eprintln!("longest pause between two events: {:?}", got.longest);
    Ok(())
}

/// The capture's replication connection authenticates as the SQL sessions do: a user with a
/// password (SCRAM-SHA-256) gets its table events.
#[tokio::test]
async fn the_capture_signs_in_with_a_password() -> anyhow::Result<()> {
    let pg = PrivatePg::start()?;
    let uri = pg.password_user("capture_pw", "s3cret")?;
    let fx = Fixture::create(&pg.uri()).await?;
    let stack = fx.stack(1, 1, &[("PGWS_DB_URI", uri.as_str())]).await?;
    let mut ann = live(&stack, 0, &json!({"sub": "ann", "role": fx.role("web")})).await?;
    subscribe(&mut ann, "orders").await?;
    fx.slot_ready().await?;
    insert_rows(&fx.db().await?, &fx.schema, 0..3, Duration::ZERO).await?;
    let mut got = Received::default();
    got.until(&mut ann, 3).await;
    assert_eq!(
        got.notes,
        [0, 1, 2],
        "the rows, through a password user's stream"
    );
    Ok(())
}

#[tokio::test]
async fn an_event_published_again_reaches_a_socket_once() -> anyhow::Result<()> {
    use futures::StreamExt as _;
    use pgws_proto::{headers, LiveClass, Prefix, Subjects};

    let fx = Fixture::create(&pgws_tests::db_uri()).await?;
    let stack = fx.stack(1, 1, &[]).await?;
    let role = fx.role("web");
    let mut ann = live(&stack, 0, &json!({"sub": "ann", "role": role, "iat": 1})).await?;
    subscribe(&mut ann, "orders").await?;
    fx.slot_ready().await?;
    // The class a bridge puts ann in: her role, the one claim the policy reads, and the
    // route that claim gives (the policy compares it with `owner`).
    let class = LiveClass {
        topic: "orders".into(),
        role,
        claims: r#"{"sub":"ann"}"#.into(),
        all: false,
        route: Some(pgws_proto::LiveRoute {
            column: "owner".into(),
            value: Some("ann".into()),
        }),
    };
    let subject = Subjects::new(Prefix::new(&stack.prefix)?).table(&class);
    let nats = async_nats::connect(pgws_tests::nats_url()).await?;
    let mut tap = nats.subscribe(subject.clone()).await?;
    nats.flush().await?;

    let db = fx.db().await?;
    db.batch_execute(&format!(
        "INSERT INTO {}.orders (owner, note) VALUES ('ann', 'once')",
        fx.schema
    ))
    .await?;
    let first = tokio::time::timeout(T, tap.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no event on the class subject {subject}"))?;
    assert_eq!(kinds(&events(&mut ann, 1).await?), [("create", "1")]);
    let position = first
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::CHANGE))
        .map(|v| v.as_str().to_owned())
        .expect("a position");

    // What a leader that took over publishes again is dropped.
    nats.publish_with_headers(
        subject.clone(),
        first.headers.clone().unwrap_or_default(),
        first.payload.clone(),
    )
    .await?;
    nats.flush().await?;
    assert_quiet(&mut ann, "the same position again").await;

    // A later position passes.
    let (lsn, index) = headers::change_position(&position).expect("a position");
    let mut later = async_nats::HeaderMap::new();
    later.insert(headers::CHANGE, headers::change(lsn, index + 1).as_str());
    nats.publish_with_headers(subject, later, first.payload.clone())
        .await?;
    nats.flush().await?;
    assert_eq!(kinds(&events(&mut ann, 1).await?), [("create", "1")]);
    Ok(())
}

#[tokio::test]
async fn a_large_transaction_reaches_a_subscriber_whole() -> anyhow::Result<()> {
    let fx = Fixture::create(&pgws_tests::db_uri()).await?;
    let stack = fx.stack(1, 1, &[]).await?;
    let mut ann = live(&stack, 0, &json!({"sub": "ann", "role": fx.role("web")})).await?;
    subscribe(&mut ann, "orders").await?;
    fx.slot_ready().await?;
    // One transaction's rows come as one burst, far beyond PGWS_SEND_QUEUE's 1,024 messages
    // (3.6 MB, within its 4 MiB): a client that reads a moment later gets them all.
    let n = 6000;
    fx.db()
        .await?
        .batch_execute(&format!(
            "INSERT INTO {}.orders (owner, note, big)
             SELECT 'ann', g::text, repeat('x', 500) FROM generate_series(0, {}) g",
            fx.schema,
            n - 1
        ))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut got = Received::default();
    got.until(&mut ann, n).await;
    assert_eq!(
        got.notes.len(),
        n,
        "every row of the transaction, the socket still open"
    );
    assert_eq!(got.notes, (0..n as i64).collect::<Vec<_>>());
    assert_eq!(
        stack.gateways[0]
            .metric("pgws_gateway_slow_consumer_disconnects_total")
            .await,
        Some(0.0)
    );
    Ok(())
}

/// A table topic's permission class keeps the claims its policies read, and travels in the
/// gateway's presence reports: claims larger than the bound are refused, clearly, at
/// `subscribe`, and a socket within it is served.
#[tokio::test]
async fn claims_too_large_for_a_class_are_refused_at_subscribe() -> anyhow::Result<()> {
    let fx = Fixture::create(&pgws_tests::db_uri()).await?;
    let stack = fx.stack(1, 1, &[]).await?;
    let web = fx.role("web");
    let huge = "u".repeat(pgws_proto::MAX_CLASS_CLAIMS + 1);
    let mut refused = live(&stack, 0, &json!({"sub": huge, "role": web})).await?;
    let reply = call(&mut refused, "subscribe", json!({"topicName": "orders"})).await?;
    assert_eq!(reply["ok"], false, "{reply}");
    let error = reply["error"].as_str().unwrap_or("");
    assert!(error.contains("at most 4096"), "{reply}");
    // Claims the policies do not read are not kept: they do not count.
    let big_other = "o".repeat(8000);
    let owner = "v".repeat(3000);
    let mut served = live(
        &stack,
        0,
        &json!({"sub": owner, "role": web, "other": big_other}),
    )
    .await?;
    subscribe(&mut served, "orders").await?;
    fx.slot_ready().await?;
    let db = fx.db().await?;
    let s = &fx.schema;
    db.execute(
        &format!("INSERT INTO {s}.orders (owner, note) VALUES ($1, 'mine')"),
        &[&owner],
    )
    .await?;
    let got = events(&mut served, 1).await?;
    assert_eq!(kinds(&got), [("create", "1")]);
    Ok(())
}
