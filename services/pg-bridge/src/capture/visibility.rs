//! Which changes of a batch a permission class may see, asked of PostgreSQL once per table,
//! class and batch, in a read-only transaction as the class's role with its claims
//! (`SET LOCAL ROLE`, `request.jwt.claims`), as PostgREST runs a `SELECT`.
//!
//! - A row that still exists is checked as it is: `SELECT <key> FROM <table> WHERE <key> IN
//!   (<the batch's keys>)`, so privileges and row-level security apply exactly as to any
//!   query of that role.
//! - A row created or updated in the batch that no longer exists (deleted since, often within
//!   the same batch) cannot be selected: its values as committed are checked against the
//!   table's row-level security condition for that role instead, the way PostgreSQL combines
//!   it (permissive policies OR'ed, restrictive ones AND'ed, none: nothing; no row-level
//!   security, an owner without FORCE, a superuser or BYPASSRLS: everything), with the policy
//!   expressions as `pg_get_expr` prints them, over a relation of those values named like the
//!   table.

use std::collections::HashSet;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient};

use pgws_proto::LiveClass;

use super::events::Table;
use crate::db::quote_ident;

/// A row of the batch whose key no longer exists: the change's index in the batch and its
/// columns' text values (`None`: NULL or not sent).
pub(crate) type Vanished = (i64, Vec<Option<String>>);

/// What a class may see of a batch.
#[derive(Debug, Default)]
pub(crate) struct Visible {
    /// Keys of existing rows the class may select.
    pub(crate) keys: HashSet<Vec<String>>,
    /// Indexes of vanished changes whose values the class may see.
    pub(crate) vanished: HashSet<i64>,
}

/// `(key column expressions, the key IN (...) condition over arrays $1..$n)`.
fn key_match(table: &Table, alias: &str) -> (Vec<String>, String) {
    let columns: Vec<String> = table
        .key
        .iter()
        .map(|(i, _)| format!("{alias}.{}", quote_ident(&table.relation.columns[*i].name)))
        .collect();
    let casts: Vec<String> = table
        .key
        .iter()
        .enumerate()
        .map(|(n, (_, ty))| format!("u.c{n}::{ty} AS c{n}"))
        .collect();
    let names: Vec<String> = (0..table.key.len()).map(|n| format!("c{n}")).collect();
    let picked: Vec<String> = names.iter().map(|n| format!("k.{n}")).collect();
    let arrays: Vec<String> = (1..=table.key.len())
        .map(|n| format!("${n}::text[]"))
        .collect();
    // The keys are cast in a subquery the planner keeps apart (OFFSET 0): a cast from text is
    // not leakproof, so in the join clause itself row-level security would keep it from the
    // primary key's index and every check would scan the whole table.
    let condition = format!(
        "({}) IN (SELECT {} FROM (SELECT {} FROM unnest({}) AS u({}) OFFSET 0) k)",
        columns.join(", "),
        picked.join(", "),
        casts.join(", "),
        arrays.join(", "),
        names.join(", "),
    );
    (columns, condition)
}

/// The key arrays of `keys`, one per key column.
fn key_params(table: &Table, keys: &[Vec<String>]) -> Vec<Vec<String>> {
    (0..table.key.len())
        .map(|n| keys.iter().map(|k| k[n].clone()).collect())
        .collect()
}

async fn select_keys(
    db: &impl GenericClient,
    table: &Table,
    keys: &[Vec<String>],
) -> Result<HashSet<Vec<String>>, tokio_postgres::Error> {
    let (columns, condition) = key_match(table, "t");
    let texts: Vec<String> = columns.iter().map(|c| format!("{c}::text")).collect();
    let sql = format!(
        "SELECT {} FROM {} t WHERE {condition}",
        texts.join(", "),
        table.qualified
    );
    let params = key_params(table, keys);
    let params: Vec<&(dyn ToSql + Sync)> =
        params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
    let rows = db.query(&sql, &params).await?;
    Ok(rows
        .iter()
        .map(|r| {
            (0..table.key.len())
                .map(|n| r.get::<_, String>(n))
                .collect()
        })
        .collect())
}

/// The keys of `keys` whose rows exist now, as the bridge's own user sees them (an owner or
/// superuser sees every row; under FORCE ROW LEVEL SECURITY fewer, which only sends more rows
/// to the value check).
pub(crate) async fn existing(
    client: &Client,
    table: &Table,
    keys: &[Vec<String>],
) -> Result<HashSet<Vec<String>>, tokio_postgres::Error> {
    select_keys(client, table, keys).await
}

/// Which SELECT policies PostgreSQL applies when `role` reads `table`.
#[derive(Debug)]
pub(crate) enum Policies {
    /// No such table or role: nothing is visible.
    Missing,
    /// No row-level security for the role (none on the table, an owner without FORCE, a
    /// superuser or BYPASSRLS): everything is visible.
    Unrestricted,
    /// These policies: `(expression as pg_get_expr prints it, permissive, policy oid)`.
    Apply(Vec<(String, bool, u32)>),
}

/// The condition on `pg_policy p` of a policy PostgreSQL applies when role `$2` selects from
/// its table.
pub(crate) const APPLIES: &str = "p.polcmd IN ('r', '*')
     AND ('0'::oid = ANY(p.polroles)
          OR EXISTS (SELECT 1 FROM unnest(p.polroles) AS pr(oid)
                      WHERE pg_has_role($2, pr.oid, 'USAGE')))";

/// The SELECT policies `role` reads `table` under.
pub(crate) async fn policies(
    db: &impl GenericClient,
    table: u32,
    role: &str,
) -> Result<Policies, tokio_postgres::Error> {
    // Both at once (one round trip): the second is wasted when the first finds no policy
    // applies.
    let listed = format!(
        "SELECT coalesce(pg_get_expr(p.polqual, p.polrelid), 'true'), p.polpermissive, p.oid
           FROM pg_policy p WHERE p.polrelid = $1::oid AND {APPLIES}"
    );
    let params: [&(dyn ToSql + Sync); 2] = [&table, &role];
    let (row, rows) = futures::try_join!(
        db.query_opt(
            "SELECT c.relrowsecurity, c.relforcerowsecurity,
                    pg_has_role(r.oid, c.relowner, 'USAGE'), r.rolsuper OR r.rolbypassrls
               FROM pg_class c, pg_roles r WHERE c.oid = $1::oid AND r.rolname = $2",
            &params,
        ),
        db.query(&listed, &params)
    )?;
    let Some(row) = row else {
        return Ok(Policies::Missing);
    };
    let (rls, force, owner, bypass): (bool, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if !rls || bypass || (owner && !force) {
        return Ok(Policies::Unrestricted);
    }
    Ok(Policies::Apply(
        rows.iter()
            .map(|p| (p.get(0), p.get(1), p.get(2)))
            .collect(),
    ))
}

/// The row-level security condition PostgreSQL applies when `role` selects from `table`.
async fn condition(
    db: &impl GenericClient,
    table: u32,
    role: &str,
) -> Result<String, tokio_postgres::Error> {
    Ok(match policies(db, table, role).await? {
        Policies::Missing => "false".to_owned(),
        Policies::Unrestricted => "true".to_owned(),
        Policies::Apply(p) => combine(p.into_iter().map(|(e, permissive, _)| (e, permissive))),
    })
}

/// The columns of a relation of text values named like `table` and typed like its columns:
/// `(the select list casting u.c<n>, the unnest arguments from $<first>, the u.c<n> names)`.
fn values_relation(table: &Table, first: usize) -> (String, String, String) {
    let columns: Vec<String> = table
        .relation
        .columns
        .iter()
        .zip(&table.types)
        .enumerate()
        .map(|(n, (c, ty))| format!("u.c{n}::{ty} AS {}", quote_ident(&c.name)))
        .collect();
    let arrays: Vec<String> = (first..table.types.len() + first)
        .map(|n| format!("${n}::text[]"))
        .collect();
    let names: Vec<String> = (0..table.types.len()).map(|n| format!("c{n}")).collect();
    (columns.join(", "), arrays.join(", "), names.join(", "))
}

/// Policies `(expression, permissive)` combined as PostgreSQL does for a SELECT.
pub(crate) fn combine(policies: impl Iterator<Item = (String, bool)>) -> String {
    let (mut permissive, mut restrictive) = (Vec::new(), Vec::new());
    for (expr, is_permissive) in policies {
        if is_permissive {
            permissive.push(format!("({expr})"));
        } else {
            restrictive.push(format!("({expr})"));
        }
    }
    if permissive.is_empty() {
        return "false".to_owned();
    }
    let mut condition = format!("({})", permissive.join(" OR "));
    for r in restrictive {
        condition = format!("{condition} AND {r}");
    }
    condition
}

/// What `class` may see: of `keys` (existing rows), and of `vanished` (rows gone since).
pub(crate) async fn check(
    client: &mut Client,
    table: &Table,
    class: &LiveClass,
    keys: &[Vec<String>],
    vanished: &[Vanished],
) -> Result<Visible, tokio_postgres::Error> {
    let mut tx = client.build_transaction().read_only(true).start().await?;
    tx.batch_execute(&format!("SET LOCAL ROLE {}", quote_ident(&class.role)))
        .await?;
    tx.execute(
        "SELECT set_config('request.jwt.claims', $1, true)",
        &[&class.claims],
    )
    .await?;
    let mut visible = Visible::default();
    if !keys.is_empty() {
        visible.keys = select_keys(&tx, table, keys).await?;
    }
    if !vanished.is_empty() && table.types.len() == table.relation.columns.len() {
        // In a savepoint: a condition PostgreSQL cannot evaluate this way costs the vanished
        // rows only, not the batch's other rows.
        let sp = tx.transaction().await?;
        match vanished_visible(&sp, table, class, vanished).await {
            Ok(seen) => {
                visible.vanished = seen;
                sp.commit().await?;
            }
            Err(e) => {
                tracing::warn!(
                    topic = %table.topic,
                    role = %class.role,
                    error = %e,
                    "rows gone before their check cannot be checked by their values: not shown"
                );
                sp.rollback().await?;
            }
        }
    }
    tx.commit().await?;
    Ok(visible)
}

/// The indexes of `vanished` whose values `class` may see (in its role's transaction).
async fn vanished_visible(
    tx: &impl GenericClient,
    table: &Table,
    class: &LiveClass,
    vanished: &[Vanished],
) -> Result<HashSet<i64>, tokio_postgres::Error> {
    let condition = condition(tx, table.relation.oid, &class.role).await?;
    let alias = quote_ident(&table.name);
    let (columns, arrays, names) = values_relation(table, 2);
    let sql = format!(
        "SELECT {alias}.pgws_change FROM (SELECT u.n AS pgws_change, {columns} \
           FROM unnest($1::int8[], {arrays}) AS u(n, {names})) AS {alias} WHERE {condition}"
    );
    let indexes: Vec<i64> = vanished.iter().map(|(i, _)| *i).collect();
    let values: Vec<Vec<Option<&str>>> = (0..table.types.len())
        .map(|n| vanished.iter().map(|(_, v)| v[n].as_deref()).collect())
        .collect();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&indexes];
    params.extend(values.iter().map(|v| v as &(dyn ToSql + Sync)));
    let rows = tx.query(&sql, &params).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Which `pairs` (a change of the batch, and the claims of a class that may see it) `role`
/// may see, by the change's committed values: `condition` is the role's SELECT condition
/// reading each pair's claims from `<table>.pgws_claims` ([`crate::routing`]), evaluated
/// for all the pairs in one statement, as the role, which must still hold SELECT on the
/// table (a privilege revoked since the subscription shows nothing more). Returns the
/// indexes of the visible pairs.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn pairs(
    client: &mut Client,
    prepared: &mut Prepared,
    table: &Table,
    role: &str,
    condition: &str,
    changes: &[super::events::RowChange],
    pairs: &[(usize, usize)],
    claims: &[&str],
) -> Result<Vec<usize>, tokio_postgres::Error> {
    let alias = quote_ident(&table.name);
    let (columns, arrays, names) = values_relation(table, 3);
    let sql = format!(
        "SELECT {alias}.pgws_pair FROM (SELECT u.p AS pgws_pair, u.claims AS pgws_claims, \
           {columns} FROM unnest($1::int8[], $2::text[], {arrays}) AS u(p, claims, {names})) \
           AS {alias} WHERE has_table_privilege({oid}::oid, 'SELECT') AND ({condition})",
        oid = table.relation.oid,
    );
    let indexes: Vec<i64> = (0..pairs.len() as i64).collect();
    let texts: Vec<Vec<Option<String>>> = pairs
        .iter()
        .map(|&(i, _)| table.texts(&changes[i]))
        .collect();
    let values: Vec<Vec<Option<&str>>> = (0..table.types.len())
        .map(|n| texts.iter().map(|t| t[n].as_deref()).collect())
        .collect();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&indexes, &claims];
    params.extend(values.iter().map(|v| v as &(dyn ToSql + Sync)));
    // One round trip once the statement is prepared (it reads no table, so it holds no plan
    // that depends on the role): the transaction, the query and the commit (a failed query
    // makes the commit a rollback).
    let client = &*client;
    let statement = prepared.get(client, &sql).await?;
    let begin = format!("BEGIN READ ONLY; SET LOCAL ROLE {}", quote_ident(role));
    let checked = futures::try_join!(
        client.batch_execute(&begin),
        client.query(&statement, &params),
        client.batch_execute("COMMIT")
    )
    .map(|((), rows, ())| rows);
    let rows = match checked {
        Ok(rows) => rows,
        Err(e) => {
            // The transaction may still be open (BEGIN passed, SET ROLE failed).
            drop(client.batch_execute("ROLLBACK").await);
            return Err(e);
        }
    };
    Ok(rows.iter().map(|r| r.get::<_, i64>(0) as usize).collect())
}

/// Most statements one [`Prepared`] keeps (all are closed beyond).
const MAX_PREPARED: usize = 1000;

/// Statements prepared on one connection, by their text: a statement the capture runs for
/// each batch is parsed and planned once.
#[derive(Default)]
pub(crate) struct Prepared(std::collections::HashMap<String, tokio_postgres::Statement>);

impl Prepared {
    /// The statement of `sql`, prepared on `client` the first time.
    pub(crate) async fn get(
        &mut self,
        client: &Client,
        sql: &str,
    ) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        if let Some(s) = self.0.get(sql) {
            return Ok(s.clone());
        }
        let s = client.prepare(sql).await?;
        if self.0.len() >= MAX_PREPARED {
            self.0.clear();
        }
        self.0.insert(sql.to_owned(), s.clone());
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_combine_as_postgres_does() {
        let p = |e: &str, permissive| (e.to_owned(), permissive);
        assert_eq!(combine(std::iter::empty()), "false");
        assert_eq!(
            combine([p("a", false)].into_iter()),
            "false",
            "restrictive alone"
        );
        assert_eq!(
            combine([p("a", true), p("b", true), p("c", false)].into_iter()),
            "((a) OR (b)) AND (c)"
        );
    }
}
