//! `/live` table topics: which tables they are, who may read them, and the permission class a
//! reader falls in.
//!
//! `PGWS_TABLE_TOPICS` lists `schema.table` and `schema.*` entries; the catalog resolves them
//! ([`resolve`]). A topic is named after its table (`public.orders` -> `orders`); when two
//! resolved tables share a name, both topics take the qualified name (`a.orders`, `b.orders`),
//! so no name ever means two tables.
//!
//! A reader's class ([`class_of`]) is what PostgreSQL's answer to "which of these rows may
//! this socket SELECT" depends on, the way PostgREST runs a request: the token's `role`
//! (`SET LOCAL ROLE`, inside a transaction) and its claims (`request.jwt.claims`). The class
//! keeps only the claims the table's SELECT policies can read:
//! - the table has no row-level security: no claims (the role decides alone);
//! - every policy expression reads claims only as
//!   `current_setting('request.jwt.claims', ...)::json(b) ->> 'key'` (or `->`): those keys;
//! - a policy calls a function outside `pg_catalog`, reads another setting under
//!   `request.jwt`, or reads another table that has row-level security (whose own policies
//!   may read anything): all the claims, the finest class, always correct.
//!
//! Admins (`PGWS_ADMIN_ROLES`) read everything: one class per table and role, which the
//! capture serves without a visibility check. A token may not name the bridge's own database
//! user (which owns the captured tables, so row-level security does not apply to it), a
//! superuser or a BYPASSRLS role unless that role is an admin one.

use std::collections::BTreeSet;

use serde_json::{Map, Value};
use tokio_postgres::Client;

use pgws_proto::{LiveClass, LiveRoute, Reader, MAX_CLASS_CLAIMS};

use crate::config::TablePattern;
use crate::db::quote_ident;
use crate::routing;

/// A table some socket may read as a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableTopic {
    pub(crate) oid: u32,
    pub(crate) schema: String,
    pub(crate) table: String,
    /// The topic's name.
    pub(crate) topic: String,
}

impl TableTopic {
    /// `"schema"."table"`.
    pub(crate) fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }
}

/// The tables `patterns` name now, with their topic names, ordered by topic.
pub(crate) async fn resolve(
    db: &Client,
    patterns: &[TablePattern],
) -> Result<Vec<TableTopic>, tokio_postgres::Error> {
    if patterns.is_empty() {
        return Ok(Vec::new());
    }
    let (mut exact_schemas, mut exact_tables, mut schemas) = (Vec::new(), Vec::new(), Vec::new());
    for p in patterns {
        match &p.table {
            Some(t) => {
                exact_schemas.push(p.schema.clone());
                exact_tables.push(t.clone());
            }
            None => schemas.push(p.schema.clone()),
        }
    }
    let rows = db
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p')
                AND (n.nspname = ANY($3)
                     OR (n.nspname, c.relname) IN
                        (SELECT * FROM unnest($1::text[], $2::text[])))",
            &[&exact_schemas, &exact_tables, &schemas],
        )
        .await?;
    let found = rows
        .iter()
        .map(|r| (r.get::<_, u32>(0), r.get::<_, String>(1), r.get(2)))
        .collect();
    Ok(name_topics(found))
}

/// Names each table's topic: the table's name, qualified when another table has it too.
pub(crate) fn name_topics(tables: Vec<(u32, String, String)>) -> Vec<TableTopic> {
    let mut topics: Vec<TableTopic> = tables
        .iter()
        .map(|(oid, schema, table)| {
            let shared = tables.iter().filter(|(_, _, t)| t == table).count() > 1;
            TableTopic {
                oid: *oid,
                schema: schema.clone(),
                table: table.clone(),
                topic: if shared {
                    format!("{schema}.{table}")
                } else {
                    table.clone()
                },
            }
        })
        .filter(|t| pgws_proto::valid_live_topic(&t.topic))
        .collect();
    topics.sort_by(|a, b| a.topic.cmp(&b.topic));
    topics
}

/// The topics of `tables` that `role` may SELECT (every one for an admin).
pub(crate) async fn readable(
    db: &Client,
    tables: &[TableTopic],
    role: Option<&str>,
    admin: bool,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let names: Vec<&str> = tables.iter().map(|t| t.topic.as_str()).collect();
    let rows = db
        .query(
            "SELECT u.t FROM unnest($1::oid[], $2::text[]) AS u(o, t)
               LEFT JOIN pg_roles r ON r.rolname = $3
              WHERE CASE WHEN $4 THEN true
                         WHEN r.oid IS NULL THEN false
                         ELSE has_table_privilege(r.oid, u.o, 'SELECT') END
              ORDER BY u.t",
            &[&oids, &names, &role, &admin],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Why a reader has no class.
#[derive(Debug)]
pub(crate) enum Refused {
    /// Not allowed (no role, a role the bridge cannot take, no SELECT): the reason.
    Forbidden(String),
    Db(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for Refused {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e)
    }
}

/// Whether `db`'s user may take `role` for a token (it is a member, as PostgREST's
/// authenticator is of the roles it switches to, and the role is neither the bridge's own
/// user, nor a superuser, nor one that bypasses row-level security: those only through
/// `PGWS_ADMIN_ROLES`), and whether the role may SELECT `table`.
async fn probe_role(
    db: &Client,
    role: &str,
    table: u32,
) -> Result<Result<bool, String>, tokio_postgres::Error> {
    let row = db
        .query_opt(
            "SELECT pg_has_role(session_user, r.oid, 'MEMBER'),
                    has_table_privilege(r.oid, $2::oid, 'SELECT'),
                    r.rolname = session_user, r.rolsuper OR r.rolbypassrls
               FROM pg_roles r WHERE r.rolname = $1",
            &[&role, &table],
        )
        .await?;
    Ok(match row {
        None => Err(format!("role {role:?} does not exist")),
        Some(r) if r.get::<_, bool>(2) => Err(format!(
            "role {role:?} is the bridge's own database user: a token may not act as it"
        )),
        Some(r) if r.get::<_, bool>(3) => Err(format!(
            "role {role:?} is a superuser or bypasses row-level security: a token may act as \
             it only when it is one of PGWS_ADMIN_ROLES"
        )),
        Some(r) if !r.get::<_, bool>(0) => Err(format!(
            "role {role:?} cannot be used: the bridge's database user is not a member of it"
        )),
        Some(r) => Ok(r.get(1)),
    })
}

/// The class `reader` reads `table` in.
pub(crate) async fn class_of(
    db: &Client,
    table: &TableTopic,
    reader: &Reader,
    per_subscriber: bool,
) -> Result<LiveClass, Refused> {
    let Some(role) = reader.role.clone() else {
        return Err(Refused::Forbidden(
            "a table topic needs a token with a \"role\" claim".to_owned(),
        ));
    };
    // An admin's role need not exist in the database: nothing runs as it.
    let select = reader.admin
        || probe_role(db, &role, table.oid)
            .await?
            .map_err(Refused::Forbidden)?;
    if !select {
        return Err(Refused::Forbidden(format!(
            "role {role:?} may not SELECT {}.{}",
            table.schema, table.table
        )));
    }
    let all = reader.admin;
    let mut claims = if all {
        Map::new()
    } else {
        match policy_claims(db, table.oid).await? {
            Some(keys) => reader
                .claims
                .iter()
                .filter(|(k, _)| keys.contains(k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            None => reader.claims.clone(),
        }
    };
    if per_subscriber {
        // The benchmark's baseline: every socket a class of its own.
        claims.insert("pgws_subscriber".to_owned(), Value::from(uuid_like()));
    }
    let claims = Value::Object(claims).to_string();
    let route = if all || per_subscriber {
        None
    } else {
        route_of(db, table, &role, &claims).await?
    };
    if claims.len() > MAX_CLASS_CLAIMS {
        return Err(Refused::Forbidden(format!(
            "the claims {}.{}'s policies read take {} bytes; a table topic takes at most {MAX_CLASS_CLAIMS}",
            table.schema,
            table.table,
            claims.len()
        )));
    }
    Ok(LiveClass {
        topic: table.topic.clone(),
        role,
        claims,
        all,
        route,
    })
}

/// The reader's route when `table` is routed by value for `role` ([`routing`]).
async fn route_of(
    db: &Client,
    table: &TableTopic,
    role: &str,
    claims: &str,
) -> Result<Option<LiveRoute>, tokio_postgres::Error> {
    let Some(spec) = routing::spec(db, table.oid, &table.table, role).await? else {
        return Ok(None);
    };
    Ok(routing::value(db, table.oid, &spec, claims)
        .await?
        .map(|value| LiveRoute {
            column: spec.column,
            value,
        }))
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The claim keys the SELECT policies of `table` can read; `None` when they cannot be
/// narrowed (all claims), an empty set when the table has no row-level security.
async fn policy_claims(
    db: &Client,
    table: u32,
) -> Result<Option<BTreeSet<String>>, tokio_postgres::Error> {
    let rls: bool = db
        .query_one(
            "SELECT relrowsecurity FROM pg_class WHERE oid = $1::oid",
            &[&table],
        )
        .await?
        .get(0);
    if !rls {
        return Ok(Some(BTreeSet::new()));
    }
    // Functions outside pg_catalog, or other tables with row-level security, in any policy.
    let opaque: bool = db
        .query_one(
            "SELECT EXISTS (
               SELECT 1 FROM pg_policy p
                 JOIN pg_depend d ON d.classid = 'pg_policy'::regclass AND d.objid = p.oid
                 LEFT JOIN pg_proc f ON d.refclassid = 'pg_proc'::regclass AND f.oid = d.refobjid
                 LEFT JOIN pg_class c ON d.refclassid = 'pg_class'::regclass
                                     AND c.oid = d.refobjid
                WHERE p.polrelid = $1::oid AND p.polcmd IN ('r', '*')
                  AND ((f.oid IS NOT NULL AND f.pronamespace <> 'pg_catalog'::regnamespace)
                       OR (c.oid IS NOT NULL AND c.oid <> $1::oid AND c.relrowsecurity)))",
            &[&table],
        )
        .await?
        .get(0);
    if opaque {
        return Ok(None);
    }
    let rows = db
        .query(
            "SELECT pg_get_expr(polqual, polrelid) FROM pg_policy
              WHERE polrelid = $1::oid AND polcmd IN ('r', '*') AND polqual IS NOT NULL",
            &[&table],
        )
        .await?;
    let exprs: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    Ok(claim_keys(&exprs))
}

/// The claim keys policy expressions (as `pg_get_expr` prints them) read, or `None` when
/// they read claims in a way this cannot follow.
pub(crate) fn claim_keys(exprs: &[String]) -> Option<BTreeSet<String>> {
    const SETTING: &str = "current_setting('request.jwt.claims'";
    let mut keys = BTreeSet::new();
    for expr in exprs {
        let mut rest = expr.as_str();
        // Every mention of request.jwt must be a claims lookup by a literal key.
        if expr.matches("request.jwt").count() != expr.matches(SETTING).count() {
            return None;
        }
        while let Some(at) = rest.find(SETTING) {
            rest = &rest[at + SETTING.len()..];
            keys.insert(key_after(rest)?);
        }
    }
    Some(keys)
}

/// The literal key of the first `->> 'key'` or `-> 'key'` after a claims setting, which must
/// follow the setting's call and casts directly.
fn key_after(text: &str) -> Option<String> {
    // `, true))::json ->> 'sub'::text)`: skip the call's arguments, closing parentheses and
    // casts to json or jsonb.
    let close = text.find(')')?;
    let mut rest = text[close..].trim_start_matches(')');
    for cast in ["::jsonb", "::json"] {
        if let Some(r) = rest.strip_prefix(cast) {
            rest = r;
            break;
        }
    }
    let rest = rest.trim_start_matches(')').trim_start();
    let rest = rest
        .strip_prefix("->>")
        .or_else(|| rest.strip_prefix("->"))?
        .trim_start();
    let rest = rest.strip_prefix('\'')?;
    let end = rest.find('\'')?;
    let key = &rest[..end];
    // A doubled quote inside the key: not followed here.
    if rest[end + 1..].starts_with('\'') {
        return None;
    }
    Some(key.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_table_names_are_qualified() {
        let topics = name_topics(vec![
            (1, "public".into(), "orders".into()),
            (2, "app".into(), "orders".into()),
            (3, "app".into(), "items".into()),
        ]);
        let names: Vec<&str> = topics.iter().map(|t| t.topic.as_str()).collect();
        assert_eq!(names, ["app.orders", "items", "public.orders"]);
    }

    #[test]
    fn claims_read_by_literal_key_are_found() {
        let e = |s: &str| vec![s.to_owned()];
        assert_eq!(
            claim_keys(&e(
                "(owner = ((current_setting('request.jwt.claims'::text, true))::json ->> 'sub'::text))"
            )),
            Some(["sub".to_owned()].into())
        );
        assert_eq!(
            claim_keys(&e(
                "((tenant)::text = ((current_setting('request.jwt.claims'::text, true))::jsonb ->> 'tenant'::text)) OR (((current_setting('request.jwt.claims'::text, true))::jsonb -> 'admin'::text) = 'true'::jsonb)"
            )),
            Some(["admin".to_owned(), "tenant".to_owned()].into())
        );
        assert_eq!(claim_keys(&e("(published = true)")), Some(BTreeSet::new()));
        // Read whole, or another setting under request.jwt: not narrowed.
        assert_eq!(
            claim_keys(&e(
                "(doc @> (current_setting('request.jwt.claims'::text, true))::jsonb)"
            )),
            None
        );
        assert_eq!(
            claim_keys(&e(
                "(owner = current_setting('request.jwt.claim.sub'::text, true))"
            )),
            None
        );
    }
}
