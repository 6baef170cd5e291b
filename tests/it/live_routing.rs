//! `/live` table topics routed by value: per-user policies (a column compared with a claim)
//! serve thousands of users with one check per batch, each user receiving exactly the rows its
//! policy lets it see; and the roles a token may never act as.

use futures::{stream, StreamExt, TryStreamExt};
use pgws_tests::WsClient;
use serde_json::{json, Value};

use crate::live_tables::{assert_quiet, call, events, live, subscribe, Fixture, T};

/// Distinct users on one gateway (more than the 2,000 classes a gateway once served).
const USERS: usize = 2500;
/// Of them, the users that also get rows one per transaction.
const SINGLES: usize = 20;

/// The leader bridge's visibility checks so far.
async fn checks(stack: &pgws_tests::Stack) -> f64 {
    let leader = stack.leader().await.unwrap_or(0);
    stack.bridges[leader]
        .metric("pgws_bridge_capture_checks_total")
        .await
        .unwrap_or(0.0)
}

#[tokio::test]
async fn thousands_of_users_each_receive_exactly_their_own_rows() -> anyhow::Result<()> {
    let fx = Fixture::create(&pgws_tests::db_uri()).await?;
    let stack = fx.stack(1, 1, &[]).await?;
    let web = fx.role("web");
    let stack = &stack;
    let web = &web;
    let mut sockets: Vec<(usize, WsClient)> = stream::iter(0..USERS)
        .map(|i| async move {
            let mut ws = live(stack, 0, &json!({"sub": format!("u{i}"), "role": web})).await?;
            subscribe(&mut ws, "orders").await?;
            anyhow::Ok((i, ws))
        })
        .buffer_unordered(64)
        .try_collect()
        .await?;
    fx.slot_ready().await?;
    let before = checks(stack).await;

    // One transaction with a row for every user, then rows one per transaction.
    let db = fx.db().await?;
    let s = &fx.schema;
    db.batch_execute(&format!(
        "INSERT INTO {s}.orders (owner, note) SELECT 'u' || g, 'batch' FROM generate_series(0, {}) g",
        USERS - 1
    ))
    .await?;
    for i in 0..SINGLES {
        db.batch_execute(&format!(
            "INSERT INTO {s}.orders (owner, note) VALUES ('u{i}', 'single')"
        ))
        .await?;
    }
    stream::iter(sockets.iter_mut())
        .map(|(i, ws)| async move {
            let n = if *i < SINGLES { 2 } else { 1 };
            let got = events(ws, n).await?;
            for (event, _, row) in &got {
                anyhow::ensure!(event == "create", "u{i}: {event}");
                anyhow::ensure!(row["owner"] == format!("u{i}"), "u{i} got {row}");
            }
            let notes: Vec<&str> = got
                .iter()
                .map(|(_, _, r)| r["note"].as_str().unwrap_or(""))
                .collect();
            let want: &[&str] = if *i < SINGLES {
                &["batch", "single"]
            } else {
                &["batch"]
            };
            anyhow::ensure!(notes == want, "u{i}: {notes:?}");
            anyhow::Ok(())
        })
        .buffer_unordered(256)
        .try_collect::<Vec<()>>()
        .await?;
    // Nobody gets anything more (another user's row, or one twice).
    stream::iter(sockets.iter_mut())
        .for_each_concurrent(512, |(i, ws)| async move {
            assert_quiet(ws, &format!("u{i}")).await;
        })
        .await;
    // One check per batch and role, not one per user: 2,520 rows to 2,500 users took a few.
    let spent = checks(stack).await - before;
    assert!(
        (1.0..=(SINGLES as f64 + 10.0)).contains(&spent),
        "{spent} visibility checks for {} rows",
        USERS + SINGLES
    );
    Ok(())
}

#[tokio::test]
async fn an_and_of_two_claims_and_a_helper_function_route_rows_to_their_readers(
) -> anyhow::Result<()> {
    let fx = Fixture::create(&pgws_tests::db_uri()).await?;
    let s = fx.schema.clone();
    let web = fx.role("web");
    let db = fx.db().await?;
    // Supabase's shape: a helper reading the `sub` claim, compared with a uuid column, and a
    // second claim compared with another column.
    db.batch_execute(&format!(
        "CREATE FUNCTION {s}.uid() RETURNS uuid LANGUAGE sql STABLE AS
           $$ select nullif(current_setting('request.jwt.claims', true)::json ->> 'sub', '')::uuid $$;
         CREATE TABLE {s}.docs (id bigserial PRIMARY KEY, tenant text NOT NULL,
                                user_id uuid NOT NULL, note text);
         ALTER TABLE {s}.docs ENABLE ROW LEVEL SECURITY;
         CREATE POLICY mine ON {s}.docs FOR SELECT
           USING (tenant = current_setting('request.jwt.claims', true)::json ->> 'tenant'
                  AND {s}.uid() = user_id);
         GRANT SELECT ON {s}.docs TO {web};"
    ))
    .await?;
    let stack = fx.stack(1, 2, &[]).await?;
    const U1: &str = "00000000-0000-0000-0000-0000000000a1";
    const U2: &str = "00000000-0000-0000-0000-0000000000a2";
    // Readers: (tenant, sub); the second differs from the first by its sub only, the third
    // by its tenant only; the last has an upper-case sub, the same uuid as the first's.
    let readers = [
        ("t1", U1),
        ("t1", U2),
        ("t2", U1),
        ("t1", &U1.to_uppercase()[..]),
    ];
    let mut sockets = Vec::new();
    for (n, (tenant, sub)) in readers.iter().enumerate() {
        let mut ws = live(
            &stack,
            n % 2,
            &json!({"sub": sub, "tenant": tenant, "role": web}),
        )
        .await?;
        subscribe(&mut ws, "docs").await?;
        sockets.push(ws);
    }
    fx.slot_ready().await?;
    let before = checks(&stack).await;
    let rows = [("t1", U1), ("t1", U2), ("t2", U1), ("t2", U2)];
    // Which readers may see each row: the tenant and the uuid must both match.
    let readers_of = |row: usize| -> Vec<usize> {
        let (t, u) = rows[row];
        (0..readers.len())
            .filter(|&n| readers[n].0 == t && readers[n].1.to_lowercase() == u)
            .collect()
    };
    let mut seen: Vec<Vec<String>> = vec![Vec::new(); readers.len()];
    let values: Vec<String> = rows
        .iter()
        .map(|(t, u)| format!("('{t}', '{u}', 'many')"))
        .collect();
    db.batch_execute(&format!(
        "INSERT INTO {s}.docs (tenant, user_id, note) VALUES {}",
        values.join(", ")
    ))
    .await?;
    for row in 0..rows.len() {
        for n in readers_of(row) {
            let got = events(&mut sockets[n], 1).await?;
            assert_eq!(got[0].1, (row + 1).to_string(), "reader {n}");
            seen[n].push(got[0].1.clone());
        }
    }
    // Then one row per transaction, each in a batch of its own (its readers got it first).
    for (row, (t, u)) in rows.iter().enumerate() {
        db.batch_execute(&format!(
            "INSERT INTO {s}.docs (tenant, user_id, note) VALUES ('{t}', '{u}', 'one')"
        ))
        .await?;
        for n in readers_of(row) {
            let got = events(&mut sockets[n], 1).await?;
            seen[n].push(got[0].1.clone());
            assert_eq!(got[0].1, (row + 5).to_string(), "reader {n}");
            let (tenant, sub) = readers[n];
            assert_eq!(got[0].2["tenant"], tenant);
            assert_eq!(got[0].2["user_id"], sub.to_lowercase());
        }
    }
    // Row ids: 1-4 in one transaction, 5-8 one by one, in the order of `rows`.
    let expected = [["1", "5"], ["2", "6"], ["3", "7"], ["1", "5"]];
    for (n, ws) in sockets.iter_mut().enumerate() {
        assert_eq!(seen[n], expected[n], "reader {:?}", readers[n]);
        assert_quiet(ws, &format!("reader {n}")).await;
    }
    // One check per batch for the role (five transactions, each its own batch here), not one
    // per reader and batch (four classes: twenty checks).
    let spent = checks(&stack).await - before;
    assert!((1.0..=5.0).contains(&spent), "{spent} checks for 5 batches");

    // A role whose SELECT is revoked after its sockets subscribed sees nothing more.
    db.batch_execute(&format!(
        "REVOKE SELECT ON {s}.docs FROM {web};
         INSERT INTO {s}.docs (tenant, user_id, note) VALUES ('t1', '{U1}', 'revoked')"
    ))
    .await?;
    assert_quiet(&mut sockets[0], "a reader whose role lost SELECT").await;
    Ok(())
}

/// The leader keeps each table's route while the catalog rows it was read from are unchanged:
/// a policy altered, a helper function replaced, each applies from the next commit on.
#[tokio::test]
async fn a_changed_policy_or_helper_applies_from_the_next_commit() -> anyhow::Result<()> {
    let fx = Fixture::create(&pgws_tests::db_uri()).await?;
    let s = fx.schema.clone();
    let stack = fx.stack(1, 1, &[]).await?;
    let mut ann = live(&stack, 0, &json!({"sub": "ann", "role": fx.role("web")})).await?;
    subscribe(&mut ann, "orders").await?;
    fx.slot_ready().await?;
    let db = fx.db().await?;
    let insert =
        |note: &str| format!("INSERT INTO {s}.orders (owner, note) VALUES ('ann', '{note}')");
    let next_note = |got: Vec<(String, String, Value)>| got[0].2["note"].clone();
    db.batch_execute(&insert("1")).await?;
    assert_eq!(next_note(events(&mut ann, 1).await?), "1");
    // The policy narrowed: the next rows are checked by the new one.
    db.batch_execute(&format!(
        "ALTER POLICY own ON {s}.orders USING (owner = current_setting('request.jwt.claims', \
           true)::json ->> 'sub' AND note <> 'hidden')"
    ))
    .await?;
    db.batch_execute(&insert("hidden")).await?;
    db.batch_execute(&insert("2")).await?;
    assert_eq!(
        next_note(events(&mut ann, 1).await?),
        "2",
        "the altered policy"
    );
    // Through a helper function, then the helper replaced.
    db.batch_execute(&format!(
        "CREATE FUNCTION {s}.me() RETURNS text LANGUAGE sql STABLE AS
           $$ select current_setting('request.jwt.claims', true)::json ->> 'sub' $$;
         ALTER POLICY own ON {s}.orders USING ({s}.me() = owner)"
    ))
    .await?;
    db.batch_execute(&insert("3")).await?;
    assert_eq!(next_note(events(&mut ann, 1).await?), "3", "the helper");
    db.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION {s}.me() RETURNS text LANGUAGE sql STABLE AS
           $$ select upper(current_setting('request.jwt.claims', true)::json ->> 'sub') $$"
    ))
    .await?;
    let captured = || async {
        stack.bridges[0]
            .metric("pgws_bridge_capture_changes_total")
            .await
            .unwrap_or(0.0)
    };
    let before = captured().await;
    db.batch_execute(&insert("4")).await?;
    // Rows are checked against the policies as they are when the leader reads them: row 4
    // is read before the policy changes again.
    let read = pgws_tests::eventually(T, || async { captured().await > before }).await;
    anyhow::ensure!(read, "row 4 was not captured");
    db.batch_execute(&format!(
        "ALTER POLICY own ON {s}.orders USING (owner = current_setting('request.jwt.claims', \
           true)::json ->> 'sub')"
    ))
    .await?;
    db.batch_execute(&insert("5")).await?;
    assert_eq!(
        next_note(events(&mut ann, 1).await?),
        "5",
        "the replaced helper (ANN is not ann)"
    );
    assert_quiet(&mut ann, "after the last row").await;
    Ok(())
}

#[tokio::test]
async fn a_token_may_not_act_as_the_bridges_own_role_a_superuser_or_a_bypassrls_role(
) -> anyhow::Result<()> {
    let fx = Fixture::create(&pgws_tests::db_uri()).await?;
    let s = fx.schema.clone();
    let db = fx.db().await?;
    db.batch_execute(&format!(
        "CREATE ROLE {s}_bypass NOLOGIN BYPASSRLS; CREATE ROLE {s}_super NOLOGIN SUPERUSER;
         GRANT SELECT ON {s}.orders TO {s}_bypass;"
    ))
    .await?;
    let admin = format!("{s}_bypass");
    let stack = fx.stack(1, 1, &[("PGWS_ADMIN_ROLES", &admin)]).await?;
    // The test stack's bridge connects as postgres, a superuser that owns the table.
    let refused = [
        ("postgres", "the bridge's own database user"),
        (
            &format!("{s}_super")[..],
            "superuser or bypasses row-level security",
        ),
    ];
    for (role, why) in refused {
        let mut ws = live(&stack, 0, &json!({"sub": "ann", "role": role})).await?;
        let reply = call(&mut ws, "subscribe", json!({"topicName": "orders"})).await?;
        assert_eq!(reply["ok"], false, "{role}: {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{role}: {reply}");
    }
    // The same kind of role named in PGWS_ADMIN_ROLES is an admin: every row.
    let mut boss = live(&stack, 0, &json!({"sub": "root", "role": admin})).await?;
    subscribe(&mut boss, "orders").await?;
    fx.slot_ready().await?;
    db.batch_execute(&format!(
        "INSERT INTO {s}.orders (owner, note) VALUES ('ann', 'a'), ('bob', 'b')"
    ))
    .await?;
    let got = events(&mut boss, 2).await?;
    let owners: Vec<&Value> = got.iter().map(|(_, _, r)| &r["owner"]).collect();
    assert_eq!(owners, [&json!("ann"), &json!("bob")]);
    Ok(())
}

#[tokio::test]
async fn a_gateway_tells_the_leader_its_classes_once_then_only_what_changes() -> anyhow::Result<()>
{
    use pgws_proto::{Prefix, RegistryOp, RegistryRequest, Subjects};

    const MANY: usize = 200;
    let fx = Fixture::create(&pgws_tests::db_uri()).await?;
    let stack = fx.stack(1, 1, &[]).await?;
    let web = fx.role("web");
    // Every request the gateway makes of the leader, read beside it.
    let nats = async_nats::connect(pgws_tests::nats_url()).await?;
    let subject = Subjects::new(Prefix::new(&stack.prefix)?).registry();
    let mut tap = nats.subscribe(subject).await?;
    nats.flush().await?;
    let mut sockets = Vec::new();
    for i in 0..=MANY {
        let mut ws = live(&stack, 0, &json!({"sub": format!("u{i}"), "role": web})).await?;
        subscribe(&mut ws, "orders").await?;
        sockets.push(ws);
    }
    // Past a heartbeat: nothing changes, so the gateway only says it is alive.
    let deadline = tokio::time::Instant::now()
        + std::time::Duration::from_secs(pgws_proto::PRESENCE_INTERVAL_SECS + 2);
    let (mut most, mut changes, mut alive) = (0, 0, 0);
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, tap.next()).await {
        let Ok(request) = serde_json::from_slice::<RegistryRequest>(&m.payload) else {
            continue;
        };
        let classes = match &request.op {
            RegistryOp::Report { presence, .. } => presence.classes.len(),
            RegistryOp::Change { added, removed, .. } => {
                changes += 1;
                added.classes.len() + removed.classes.len()
            }
            RegistryOp::Alive { .. } => {
                alive += 1;
                0
            }
            _ => 0,
        };
        most = most.max(classes);
    }
    // Each subscription was one change of one class (a few may share one), never the whole
    // list of classes again.
    assert!(most <= 5, "a request carried {most} classes");
    assert!(
        changes >= MANY / 5,
        "{changes} changes for {} classes",
        MANY + 1
    );
    assert!(
        alive >= 1,
        "no heartbeat in {} s",
        pgws_proto::PRESENCE_INTERVAL_SECS + 2
    );
    // And the leader knows them all: the last user still gets its row.
    fx.slot_ready().await?;
    let db = fx.db().await?;
    db.batch_execute(&format!(
        "INSERT INTO {}.orders (owner, note) VALUES ('u{MANY}', 'last')",
        fx.schema
    ))
    .await?;
    let got = events(&mut sockets[MANY], 1).await?;
    assert_eq!(got[0].2["note"], "last");
    Ok(())
}
