//! Routing by value: when a table's SELECT policies compare a column with a claim (the
//! owner policy `owner = current_setting('request.jwt.claims', true)::json ->> 'sub'`,
//! Supabase's `auth.uid() = user_id`), a changed row can only be seen by the sockets whose
//! claim equals the row's column. Such a socket's class carries that value ([`LiveRoute`]),
//! and the leader checks each changed row against the classes of its value only, every pair
//! of a role in one statement ([`Spec::condition`]), instead of once per class.
//!
//! A table is routed for a role when every permissive SELECT policy that applies to the role
//! is a conjunction (`AND`) holding one same conjunct `<column> = <claim>` (either side, the
//! column possibly cast to text), where `<claim>` reads nothing but the claims: a
//! `current_setting('request.jwt.claims', true)` lookup with `->>`/`->`, literals and casts, or
//! a call of a helper function (`LANGUAGE sql`, no arguments, not volatile, a single `SELECT`
//! reading no table). Restrictive policies only narrow what the permissive ones allow, so they
//! need no shape: PostgreSQL evaluates them in the check. Every other policy set keeps the
//! class of all the claims the policies read, which is always correct.
//!
//! The check evaluates the role's whole policy condition over each pair's committed values,
//! as the role (`SET LOCAL ROLE`), with every claims lookup rewritten to read the pair's own
//! claims and every helper call replaced by its body: one statement for all the pairs. So
//! the route only chooses which pairs are asked; PostgreSQL still decides each.
//!
//! A route's value is the claim as the column's type prints it; equal values print the same
//! for the types routed (`text`, `varchar`, `uuid`, the integers, `boolean`), so a row whose
//! column differs cannot satisfy the policy. Other types are not routed.

use std::sync::LazyLock;

use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;

use crate::capture::visibility;
use crate::db::quote_ident;

/// Types whose equal values always print the same text.
const ROUTED_TYPES: &[&str] = &[
    "text",
    "character varying",
    "uuid",
    "integer",
    "bigint",
    "smallint",
    "boolean",
];

/// The claims lookup as `pg_get_expr` prints it.
const CLAIMS_READ: &str = "current_setting('request.jwt.claims'::text, true)";

/// How a table is routed for a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Spec {
    /// The column compared with the claim.
    pub(crate) column: String,
    /// The claim side as the policy prints it: evaluated as the role with a socket's claims,
    /// it gives the socket's route value.
    pub(crate) claim: String,
    /// The claim side reading its claims from the text parameter `$1` (helpers inlined):
    /// a socket's route value, computed without taking its role.
    pub(crate) claim_sql: String,
    /// The claim side's value is compared as text (the column is cast to text).
    pub(crate) as_text: bool,
    /// The role's whole SELECT condition with each claims lookup reading
    /// `<table>.pgws_claims` and each helper call inlined.
    pub(crate) condition: String,
}

/// A helper function a policy may call: its name as printed in expressions and its body as an
/// expression.
#[derive(Debug, Clone)]
struct Helper {
    name: String,
    body: String,
    returns: String,
}

/// The route of `table` for `role`, or `None` when its policies are not of a routed shape.
pub(crate) async fn spec(
    db: &impl GenericClient,
    table: u32,
    table_name: &str,
    role: &str,
) -> Result<Option<Spec>, tokio_postgres::Error> {
    // What the policies depend on beyond the catalog: helper functions (inlined) and other
    // tables with row-level security (whose policies may read anything: not routed). Read
    // with the policies and the columns, all at once (one round trip).
    let deps = format!(
        "SELECT f.oid::regproc::text, coalesce(l.lanname = 'sql', false), f.pronargs, f.provolatile, f.prokind, f.prosrc,
                format_type(f.prorettype, NULL), c.oid IS NOT NULL
           FROM pg_depend d
           LEFT JOIN pg_proc f ON d.refclassid = 'pg_proc'::regclass AND f.oid = d.refobjid
                              AND f.pronamespace <> 'pg_catalog'::regnamespace
           LEFT JOIN pg_language l ON l.oid = f.prolang
           LEFT JOIN pg_class c ON d.refclassid = 'pg_class'::regclass
                               AND c.oid = d.refobjid AND c.oid <> $1::oid
                               AND c.relrowsecurity
          WHERE d.classid = 'pg_policy'::regclass
            AND d.objid IN (SELECT p.oid FROM pg_policy p
                             WHERE p.polrelid = $1::oid AND {})
            AND (f.oid IS NOT NULL OR c.oid IS NOT NULL)",
        visibility::APPLIES
    );
    let (both, one): ([&(dyn ToSql + Sync); 2], [&(dyn ToSql + Sync); 1]) =
        ([&table, &role], [&table]);
    let (policies, deps, columns) = futures::try_join!(
        visibility::policies(db, table, role),
        db.query(&deps, &both),
        db.query(
            "SELECT attname::text FROM pg_attribute
              WHERE attrelid = $1::oid AND attnum > 0 AND NOT attisdropped",
            &one,
        ),
    )?;
    let visibility::Policies::Apply(policies) = policies else {
        return Ok(None);
    };
    let mut helpers = Vec::new();
    for d in &deps {
        if d.get::<_, bool>(7) {
            return Ok(None);
        }
        let (name, sql, args, volatile, kind, src, returns): (
            Option<String>,
            bool,
            i16,
            i8,
            i8,
            String,
            String,
        ) = (
            d.get(0),
            d.get(1),
            d.get(2),
            d.get(3),
            d.get(4),
            d.get(5),
            d.get(6),
        );
        if !sql || args != 0 || volatile == b'v' as i8 || kind != b'f' as i8 {
            return Ok(None);
        }
        let (Some(name), Some(body)) = (name, helper_body(&src)) else {
            return Ok(None);
        };
        helpers.push(Helper {
            name,
            body,
            returns,
        });
    }
    let exprs: Vec<(String, bool)> = policies.into_iter().map(|(e, p, _)| (e, p)).collect();
    let columns: Vec<String> = columns.iter().map(|r| r.get(0)).collect();
    Ok(analyse(&exprs, &columns, &helpers, table_name))
}

/// What [`spec`] reads, in one statement: the table's row and columns, the role's attributes and
/// memberships as the policies and the table's owner see them, each policy of the table (its
/// row version and whether it applies to the role), and what the policies depend on (helper
/// functions' and other tables' row versions). Any change to one of them changes the text.
static FINGERPRINT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT concat_ws('/',
    (SELECT c.xmin::text || ':' || pg_has_role(r.oid, c.relowner, 'USAGE')::text || ':'
            || (r.rolsuper OR r.rolbypassrls)::text
       FROM pg_class c, pg_roles r WHERE c.oid = $1::oid AND r.rolname = $2),
    (SELECT string_agg(a.attname::text, ',' ORDER BY a.attnum) FROM pg_attribute a
      WHERE a.attrelid = $1::oid AND a.attnum > 0 AND NOT a.attisdropped),
    (SELECT string_agg(p.oid::text || ':' || p.xmin::text || ':' || ({applies})::text, ','
                       ORDER BY p.oid)
       FROM pg_policy p WHERE p.polrelid = $1::oid),
    (SELECT string_agg(d.refobjid::text || ':' || coalesce(f.xmin::text, '') || ':'
                       || coalesce(c.xmin::text, ''), ',' ORDER BY d.refobjid, d.objid)
       FROM pg_depend d
       LEFT JOIN pg_proc f ON d.refclassid = 'pg_proc'::regclass AND f.oid = d.refobjid
       LEFT JOIN pg_class c ON d.refclassid = 'pg_class'::regclass AND c.oid = d.refobjid
      WHERE d.classid = 'pg_policy'::regclass
        AND d.objid IN (SELECT p.oid FROM pg_policy p WHERE p.polrelid = $1::oid)))",
        applies = visibility::APPLIES
    )
});

/// Most routes kept by one [`Specs`] (all are forgotten beyond).
const MAX_SPECS: usize = 10_000;

/// The routes of one capture connection by table and role, each kept while the catalog rows it
/// was read from are unchanged ([`FINGERPRINT`], one prepared statement): a batch costs one
/// short query per table and role instead of reading the policies again, and a policy, role
/// or helper changed by a commit is read again by the next batch.
#[derive(Default)]
pub(crate) struct Specs {
    known: std::collections::HashMap<(u32, String), (String, Option<Spec>)>,
    /// The fingerprint and the routed checks, prepared on the capture's connection.
    pub(crate) prepared: visibility::Prepared,
}

impl Specs {
    /// [`spec`] of `table` for `role`, read again only when its fingerprint changed.
    pub(crate) async fn get(
        &mut self,
        db: &tokio_postgres::Client,
        table: u32,
        table_name: &str,
        role: &str,
    ) -> Result<Option<Spec>, tokio_postgres::Error> {
        let statement = self.prepared.get(db, &FINGERPRINT).await?;
        let print: Option<String> = db.query_one(&statement, &[&table, &role]).await?.get(0);
        let print = print.unwrap_or_default();
        let key = (table, role.to_owned());
        if let Some((known, spec)) = self.known.get(&key) {
            if *known == print {
                return Ok(spec.clone());
            }
        }
        // Read after the fingerprint: a change in between only reads it again next time.
        let spec = spec(db, table, table_name, role).await?;
        if self.known.len() >= MAX_SPECS {
            self.known.clear();
        }
        self.known.insert(key, (print, spec.clone()));
        Ok(spec)
    }
}

/// The route of a policy set (`(expression, permissive)`), given the table's columns and the
/// helper functions the policies call.
fn analyse(
    policies: &[(String, bool)],
    columns: &[String],
    helpers: &[Helper],
    table_name: &str,
) -> Option<Spec> {
    let permissive: Vec<&str> = policies
        .iter()
        .filter(|(_, p)| *p)
        .map(|(e, _)| e.as_str())
        .collect();
    let (first, others) = permissive.split_first()?;
    let mut candidates = comparisons(first, columns, helpers);
    // The user's own claim routes finest (one user, a few rows) where a tenant's would not.
    candidates.sort_by_key(|(_, claim, _)| !(claim.contains("'sub'") || claim.ends_with("()")));
    let (column, claim, as_text) = candidates.into_iter().find(|c| {
        others
            .iter()
            .all(|e| comparisons(e, columns, helpers).contains(c))
    })?;
    let combined = visibility::combine(policies.iter().cloned());
    let condition = rewrite(
        &combined,
        helpers,
        &format!("{}.pgws_claims", quote_ident(table_name)),
    )?;
    let claim_sql = rewrite(&claim, helpers, "($1::text)")?;
    Some(Spec {
        column,
        claim,
        claim_sql,
        as_text,
        condition,
    })
}

/// The `(column, claim side, compared as text)` conjuncts of a policy expression.
fn comparisons(expr: &str, columns: &[String], helpers: &[Helper]) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for conjunct in conjuncts(expr) {
        let sides = split_top(conjunct, " = ");
        let [a, b] = sides.as_slice() else { continue };
        for (col, claim) in [(a, b), (b, a)] {
            if let Some((name, as_text)) = column_of(col, columns) {
                if claim_only(claim, helpers) {
                    out.push((name, normalise(claim), as_text));
                }
            }
        }
    }
    out
}

/// Whitespace collapsed: two printings of one expression compare equal.
fn normalise(s: &str) -> String {
    strip_parens(s.trim())
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The top-level conjuncts of an expression (nested `AND`s flattened).
fn conjuncts(expr: &str) -> Vec<&str> {
    let inner = strip_parens(expr.trim());
    let parts = split_top(inner, " AND ");
    if parts.len() == 1 {
        return vec![inner];
    }
    parts.into_iter().flat_map(conjuncts).collect()
}

/// `s` without the parentheses that enclose all of it.
fn strip_parens(mut s: &str) -> &str {
    loop {
        s = s.trim();
        if !(s.starts_with('(') && s.ends_with(')')) {
            return s;
        }
        // The opening parenthesis must close at the very end.
        let mut depth = 0;
        let mut closes_at_end = false;
        for (i, ch) in scan(s) {
            match ch {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        closes_at_end = i == s.len() - 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        if !closes_at_end {
            return s;
        }
        s = &s[1..s.len() - 1];
    }
}

/// The characters of `s` outside string literals and quoted identifiers, with their byte
/// offsets.
fn scan(s: &str) -> impl Iterator<Item = (usize, char)> + '_ {
    let mut quote: Option<char> = None;
    s.char_indices().filter(move |&(_, ch)| match quote {
        Some(q) => {
            // A doubled quote closes and reopens: the same state either way.
            if ch == q {
                quote = None;
            }
            false
        }
        None if ch == '\'' || ch == '"' => {
            quote = Some(ch);
            false
        }
        None => true,
    })
}

/// `s` split at `sep` where it is outside parentheses and quotes.
fn split_top<'a>(s: &'a str, sep: &str) -> Vec<&'a str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    let mut quote: Option<char> = None;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < s.len() {
        let ch = bytes[i] as char;
        match quote {
            Some(q) => {
                if ch == q {
                    quote = None;
                }
            }
            None => match ch {
                '\'' | '"' => quote = Some(ch),
                '(' => depth += 1,
                ')' => depth -= 1,
                _ if depth == 0 && s[i..].starts_with(sep) => {
                    parts.push(s[start..i].trim());
                    i += sep.len();
                    start = i;
                    continue;
                }
                _ => {}
            },
        }
        i += 1;
    }
    parts.push(s[start..].trim());
    parts
}

/// The column a side names (`col`, `"Col"`, or `(col)::text`), and whether it is cast to text.
fn column_of(side: &str, columns: &[String]) -> Option<(String, bool)> {
    let side = strip_parens(side);
    let (ident, as_text) = match side.strip_suffix("::text") {
        Some(inner) => (strip_parens(inner), true),
        None => (side, false),
    };
    let name = if let Some(q) = ident.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        q.replace("\"\"", "\"")
    } else if ident
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$')
        && !ident.is_empty()
    {
        ident.to_owned()
    } else {
        return None;
    };
    columns.contains(&name).then_some((name, as_text))
}

/// Whether a side reads only the claims: claims lookups, helper calls, literals, casts,
/// `->>`/`->` and parentheses, and at least one lookup or call.
fn claim_only(side: &str, helpers: &[Helper]) -> bool {
    let mut rest = side.trim();
    let mut reads = 0;
    while !rest.is_empty() {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix(CLAIMS_READ) {
            reads += 1;
            rest = r;
        } else if let Some(r) = helpers
            .iter()
            .find_map(|h| rest.strip_prefix(&format!("{}()", h.name)))
        {
            reads += 1;
            rest = r;
        } else if let Some(r) = rest.strip_prefix('\'') {
            // A literal; '' inside is a quote.
            let mut end = None;
            let mut chars = r.char_indices().peekable();
            while let Some((i, c)) = chars.next() {
                if c == '\'' {
                    if chars.peek().is_some_and(|&(_, n)| n == '\'') {
                        chars.next();
                        continue;
                    }
                    end = Some(i);
                    break;
                }
            }
            let Some(end) = end else { return false };
            rest = &r[end + 1..];
        } else if let Some(r) = rest.strip_prefix("::") {
            let len = r
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
                .unwrap_or(r.len());
            if len == 0 {
                return false;
            }
            rest = &r[len..];
            if let Some(r) = rest.strip_prefix(" varying") {
                rest = r;
            }
        } else if let Some(r) = rest
            .strip_prefix("->>")
            .or_else(|| rest.strip_prefix("->"))
            .or_else(|| rest.strip_prefix('('))
            .or_else(|| rest.strip_prefix(')'))
        {
            rest = r;
        } else {
            return false;
        }
    }
    reads > 0
}

/// A helper's body as an expression: `SELECT <expr>` with no `FROM`, one statement.
fn helper_body(src: &str) -> Option<String> {
    let body = src.trim().trim_end_matches(';').trim();
    let lower = body.to_ascii_lowercase();
    let expr = lower.strip_prefix("select")?;
    if !expr.starts_with(|c: char| c.is_whitespace() || c == '(')
        || body.contains(';')
        || lower.split_whitespace().any(|w| w == "from")
        || lower.contains("--")
        || lower.contains("/*")
    {
        return None;
    }
    Some(format!("(SELECT {})", body[6..].trim()))
}

/// `condition` with each claims lookup reading `claims` instead and each helper call
/// replaced by its body (whose own lookups read the same); `None` when a mention of the
/// claims remains that is not such a lookup.
fn rewrite(condition: &str, helpers: &[Helper], claims: &str) -> Option<String> {
    let mut out = condition.replace(CLAIMS_READ, claims);
    for h in helpers {
        let body = replace_lookups(&h.body, claims)?;
        out = out.replace(
            &format!("{}()", h.name),
            &format!("({body})::{}", h.returns),
        );
    }
    (!out.contains("request.jwt.claims'")).then_some(out)
}

/// `text` with every `current_setting('request.jwt.claims'[::text], true)` (any case and
/// spacing) replaced by `with`; `None` when another mention of the claims setting remains.
fn replace_lookups(text: &str, with: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let mut out = String::new();
    let mut at = 0;
    while let Some(found) = lower[at..].find("current_setting") {
        let start = at + found;
        out.push_str(&text[at..start]);
        let mut rest = &lower[start + "current_setting".len()..];
        let matched = (|| {
            rest = rest.trim_start().strip_prefix('(')?.trim_start();
            rest = rest.strip_prefix("'request.jwt.claims'")?.trim_start();
            if let Some(r) = rest.strip_prefix("::text") {
                rest = r.trim_start();
            }
            rest = rest.strip_prefix(',')?.trim_start();
            rest = rest.strip_prefix("true")?.trim_start();
            rest = rest.strip_prefix(')')?;
            Some(())
        })();
        let consumed = lower.len() - rest.len();
        if matched.is_some() {
            out.push_str(with);
            at = consumed;
        } else {
            out.push_str("current_setting");
            at = start + "current_setting".len();
        }
    }
    out.push_str(&text[at..]);
    (!out.to_ascii_lowercase().contains("'request.jwt.claims'")).then_some(out)
}

/// A socket's route value: the claim side evaluated over its class's `claims`, as the
/// column's type prints it; `None` when the types are not routed (then the class is not
/// routed), `Some(None)` when the claim is missing (no row can match).
pub(crate) async fn value(
    db: &impl GenericClient,
    table: u32,
    spec: &Spec,
    claims: &str,
) -> Result<Option<Option<String>>, tokio_postgres::Error> {
    let row = db
        .query_one(
            &format!(
                "SELECT ({c})::text, pg_typeof({c})::text,
                        (SELECT atttypid::regtype::text FROM pg_attribute
                          WHERE attrelid = $2::oid AND attname = $3)",
                c = spec.claim_sql
            ),
            &[&claims, &table, &spec.column],
        )
        .await?;
    let (value, claim_type, column_type): (Option<String>, String, Option<String>) =
        (row.get(0), row.get(1), row.get(2));
    let routed = if spec.as_text {
        claim_type == "text"
    } else {
        column_type.as_deref() == Some(claim_type.as_str())
            && ROUTED_TYPES.contains(&claim_type.as_str())
    };
    Ok(routed.then_some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: &str =
        "(owner = ((current_setting('request.jwt.claims'::text, true))::json ->> 'sub'::text))";

    fn cols() -> Vec<String> {
        ["id", "owner", "tenant", "user_id", "note"]
            .map(String::from)
            .to_vec()
    }

    fn uid() -> Helper {
        Helper {
            name: "auth.uid".into(),
            body: helper_body(
                "select nullif(current_setting('request.jwt.claims', true)::json->>'sub', '')::uuid",
            )
            .expect("a helper"),
            returns: "uuid".into(),
        }
    }

    #[test]
    fn the_owner_policy_is_routed_by_its_column() {
        let spec = analyse(&[(OWNER.into(), true)], &cols(), &[], "orders").expect("routed");
        assert_eq!(spec.column, "owner");
        assert!(!spec.as_text);
        assert_eq!(
            spec.claim,
            "(current_setting('request.jwt.claims'::text, true))::json ->> 'sub'::text"
        );
        assert_eq!(spec.claim_sql, "(($1::text))::json ->> 'sub'::text");
        assert_eq!(
            spec.condition,
            "(((owner = ((\"orders\".pgws_claims)::json ->> 'sub'::text))))"
        );
    }

    #[test]
    fn and_of_two_claims_casts_and_helpers_are_routed() {
        let and = "((tenant = ((current_setting('request.jwt.claims'::text, true))::jsonb ->> 'tenant'::text)) AND ((owner)::text = ((current_setting('request.jwt.claims'::text, true))::jsonb ->> 'sub'::text)))";
        let spec = analyse(&[(and.into(), true)], &cols(), &[], "t").expect("routed");
        // The `sub` claim is preferred: it routes finer than a tenant.
        assert_eq!((spec.column.as_str(), spec.as_text), ("owner", true));
        let helper = "(auth.uid() = user_id)";
        let spec = analyse(&[(helper.into(), true)], &cols(), &[uid()], "t").expect("routed");
        assert_eq!(
            (spec.column.as_str(), spec.claim.as_str()),
            ("user_id", "auth.uid()")
        );
        assert!(spec
            .condition
            .contains("(SELECT nullif(\"t\".pgws_claims::json->>'sub', '')::uuid)"));
        assert!(!spec.condition.contains("auth.uid()"));
    }

    #[test]
    fn shapes_that_cannot_be_routed_are_not() {
        let r = |p: &[(&str, bool)], h: &[Helper]| {
            let p: Vec<(String, bool)> = p.iter().map(|(e, b)| ((*e).into(), *b)).collect();
            analyse(&p, &cols(), h, "t")
        };
        // OR with a branch open to all; a second permissive policy without the comparison.
        let or = "((owner = ((current_setting('request.jwt.claims'::text, true))::json ->> 'sub'::text)) OR (note = 'public'::text))";
        assert_eq!(r(&[(or, true)], &[]), None);
        assert_eq!(r(&[(OWNER, true), ("(note = 'x'::text)", true)], &[]), None);
        // A restrictive policy of any shape keeps the route.
        assert!(r(&[(OWNER, true), ("(note <> 'x'::text)", false)], &[]).is_some());
        // The claim side reads a column; an unknown function; a column not of the table.
        let mixed = "(owner = (((current_setting('request.jwt.claims'::text, true))::json ->> 'sub'::text) || note))";
        assert_eq!(r(&[(mixed, true)], &[]), None);
        assert_eq!(r(&[("(owner = other.fn())", true)], &[]), None);
        let ghost =
            "(ghost = ((current_setting('request.jwt.claims'::text, true))::json ->> 'sub'::text))";
        assert_eq!(r(&[(ghost, true)], &[]), None);
        // No permissive policy: nothing is visible, nothing to route.
        assert_eq!(r(&[], &[]), None);
    }

    #[test]
    fn helper_bodies_are_single_selects_of_no_table() {
        assert!(helper_body("select 1 from t").is_none());
        assert!(helper_body("select 1; select 2").is_none());
        assert!(helper_body("insert into t values (1)").is_none());
        assert_eq!(helper_body(" SELECT 1 ; ").as_deref(), Some("(SELECT 1)"));
        assert_eq!(
            replace_lookups("current_setting( 'request.jwt.claims' , TRUE )::json", "c").as_deref(),
            Some("c::json")
        );
        assert_eq!(
            replace_lookups("current_setting('request.jwt.claims')", "c"),
            None
        );
    }
}
