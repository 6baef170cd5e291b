//! Migrations, partitions and retention against the real PostgreSQL, a database per test.

use super::*;
use crate::test_support::TestDb;

async fn versions(db: &Client) -> Vec<i32> {
    db.query(
        "SELECT version FROM pgws_audit.schema_migrations ORDER BY version",
        &[],
    )
    .await
    .expect("versions")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn partitions(db: &Client) -> Vec<String> {
    db.query(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'pgws_audit.messages'::regclass ORDER BY 1",
        &[],
    )
    .await
    .expect("partitions")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn all_versions() -> Vec<i32> {
    MIGRATIONS.iter().map(|(v, _, _)| *v).collect()
}

#[tokio::test]
async fn migrations_apply_once_and_again_is_a_no_op() {
    let test = TestDb::create().await;
    let mut db = test.client().await;
    assert_eq!(migrate(&mut db).await.expect("first"), MIGRATIONS.len());
    assert_eq!(migrate(&mut db).await.expect("second"), 0);
    assert_eq!(versions(&db).await, all_versions());
}

#[tokio::test]
async fn replicas_migrating_at_once_apply_each_migration_once() {
    let test = TestDb::create().await;
    let mut a = test.client().await;
    let mut b = test.client().await;
    let mut c = test.client().await;
    let (ra, rb, rc) = tokio::join!(migrate(&mut a), migrate(&mut b), migrate(&mut c));
    let applied = ra.expect("a") + rb.expect("b") + rc.expect("c");
    assert_eq!(applied, MIGRATIONS.len());
    assert_eq!(versions(&a).await, all_versions());
}

#[tokio::test]
async fn daily_partitions_are_created_on_demand_once() {
    let test = TestDb::create().await;
    let a = test.migrated().await;
    let b = test.client().await;
    let (mut pa, mut pb) = (Partitions::default(), Partitions::default());
    // 2023-11-14 and 2023-11-15 (UTC), asked for by two replicas at once.
    let days = [day_of(1_700_000_000.0), day_of(1_700_086_400.0)];
    let (ra, rb) = tokio::join!(
        pa.ensure(&a, days.iter().copied()),
        pb.ensure(&b, days.iter().rev().copied())
    );
    ra.expect("a");
    rb.expect("b");
    assert_eq!(
        partitions(&a).await,
        ["messages_20231114", "messages_20231115"]
    );
    // Known days are not asked for again; unknown ones are.
    pa.ensure(&a, [days[0], days[0] + 2]).await.expect("again");
    assert_eq!(partitions(&a).await.len(), 3);
    // A row lands in its day's partition.
    a.execute(
        "INSERT INTO pgws_audit.messages (id, channel, event, payload, claims, received_at, notify_channel)
         VALUES ('x', 'c', 'e', 'p', '{}', to_timestamp(1700000000.5), 'n')",
        &[],
    )
    .await
    .expect("insert");
    let n: i64 = a
        .query_one("SELECT count(*) FROM pgws_audit.messages_20231114", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn retention_drops_only_the_partitions_older_than_the_limit() {
    let test = TestDb::create().await;
    let db = test.migrated().await;
    let today = day_of(crate::test_support::now());
    let mut p = Partitions::default();
    p.ensure(&db, [today, today - 1, today - 3, today - 4, today - 30])
        .await
        .expect("partitions");
    let dropped = drop_old_partitions(&db, 3).await.expect("retention");
    assert_eq!(dropped, 2, "{:?}", partitions(&db).await);
    assert_eq!(partitions(&db).await.len(), 3);
    assert_eq!(drop_old_partitions(&db, 3).await.expect("again"), 0);
}

#[tokio::test]
async fn the_dispatcher_ledger_is_pruned_by_age() {
    let test = TestDb::create().await;
    let db = test.migrated().await;
    db.batch_execute(
        "INSERT INTO pgws_audit.dispatched (id, dispatched_at) VALUES
            ('old', now() - interval '15 days'), ('recent', now() - interval '13 days'),
            ('new', now())",
    )
    .await
    .expect("ledger");
    let deleted = prune_ledger(&db, Duration::from_secs(14 * 86_400))
        .await
        .expect("prune");
    assert_eq!(deleted, 1);
    let left: i64 = db
        .query_one("SELECT count(*) FROM pgws_audit.dispatched", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 2);
}
