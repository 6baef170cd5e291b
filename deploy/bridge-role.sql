-- The database role the bridges connect as: `pgws_bridge`, not a superuser, so that what a
-- token may do is bounded by the roles granted to it (as PostgREST's authenticator).
-- It may log in, stream changes (REPLICATION, for /live table topics), create the schemas it
-- keeps (pgws_bridge, pgws_live) in this database, and owns them when they already exist.
-- Run as a superuser (or a role with CREATEROLE) by scripts/stack.sh and by the compose
-- stack's pgws-db-setup, with psql:
--   psql -v bridge_password=... [-v keys_table=apikeys] [-v audit_to_bridge=1] -f deploy/bridge-role.sql
-- audit_to_bridge: for pgws in one process, whose recorder writes the audit on the bridge's
-- connection: pgws_audit (schema, tables and partitions, views, functions) becomes
-- pgws_bridge's too. Split stacks leave it to the recorder's own user.
-- What it does not do, because the tables are yours (README, "Table topics"):
--   GRANT web_user TO pgws_bridge;                    -- each role tokens may name
--   ALTER TABLE public.orders OWNER TO pgws_bridge;   -- each table of PGWS_TABLE_TOPICS
\set ON_ERROR_STOP on
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgws_bridge') AS pgws_missing \gset
\if :pgws_missing
CREATE ROLE pgws_bridge LOGIN REPLICATION NOINHERIT;
\endif
ALTER ROLE pgws_bridge LOGIN REPLICATION NOINHERIT NOSUPERUSER NOBYPASSRLS NOCREATEROLE;
\if :{?bridge_password}
ALTER ROLE pgws_bridge PASSWORD :'bridge_password';
\endif
SELECT format('GRANT CREATE ON DATABASE %I TO pgws_bridge', current_database()) \gexec
-- The schemas the bridges keep, if another user created them: theirs from now on.
SELECT format('ALTER SCHEMA %I OWNER TO pgws_bridge', nspname)
  FROM pg_namespace WHERE nspname IN ('pgws_bridge', 'pgws_live') \gexec
SELECT format('ALTER TABLE %I.%I OWNER TO pgws_bridge', schemaname, tablename)
  FROM pg_tables WHERE schemaname IN ('pgws_bridge', 'pgws_live') \gexec
-- wspubsub API keys: read by the bridges.
\if :{?keys_table}
SELECT format('GRANT SELECT ON %s TO pgws_bridge', to_regclass(:'keys_table'))
  WHERE to_regclass(:'keys_table') IS NOT NULL \gexec
\endif
-- pgws in one process: the audit schema is the bridge role's (the recorder of a split stack,
-- connecting as another user, may have made it or a partition of it since).
\if :{?audit_to_bridge}
SELECT format('ALTER SCHEMA %I OWNER TO pgws_bridge', nspname)
  FROM pg_namespace WHERE nspname = 'pgws_audit' \gexec
-- A sequence of an identity (or serial) column is not altered alone: it follows its table.
SELECT format('ALTER TABLE %I.%I OWNER TO pgws_bridge', n.nspname, c.relname)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'pgws_audit' AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
   AND pg_get_userbyid(c.relowner) <> 'pgws_bridge'
   AND NOT EXISTS (SELECT FROM pg_depend d
                    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                      AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
                      AND c.relkind = 'S') \gexec
SELECT format('ALTER FUNCTION %s OWNER TO pgws_bridge', p.oid::regprocedure)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'pgws_audit' AND pg_get_userbyid(p.proowner) <> 'pgws_bridge' \gexec
\endif
