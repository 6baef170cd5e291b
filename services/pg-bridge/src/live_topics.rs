//! `/live` custom topics, a request service every bridge serves.
//!
//! The gateways hold no database credentials, so they ask the bridges (queue group
//! `<prefix>.bridge` on `<prefix>.livetopics`) to create, destroy, find and list custom
//! topics ([`LiveTopicOp`]). Topics live in `pgws_live.topics`, created by the first bridge
//! that needs it: they survive restarts and every gateway sees the same ones. A name's
//! `incarnation` is new at each creation (an identity column), which names the bus subject of
//! its messages.
//!
//! Table topics (`PGWS_TABLE_TOPICS`, [`crate::live_tables`]) are answered here too: a `get`
//! with a reader answers the reader's permission class (or why it may not read the table), a
//! `list` adds the table topics the role may SELECT, and a custom topic cannot take a table
//! topic's name.
//!
//! Bounds: one connection per bridge (opened again after it failed), at most
//! [`CONCURRENCY`] requests in flight, lists of at most [`MAX_LIST`] topics,
//! [`MAX_TOPICS_PER_OWNER`] topics per owner (checked before each creation; two creations at
//! once may pass it by one).

use futures::StreamExt as _;
use pgws_bus::Client as Bus;
use pgws_proto::{
    valid_live_topic, LiveOutcome, LiveTopic, LiveTopicOp, LiveTopicReply, Subjects,
    MAX_TOPICS_PER_OWNER,
};
use pgws_service::Shutdown;
use tokio_postgres::{Client, Config, Row};
use tokio_util::sync::CancellationToken;

use crate::bus::reply;
use crate::config::TablePattern;
use crate::db::LazyClient;
use crate::live_tables::{self, Refused};

/// Requests in flight per bridge.
const CONCURRENCY: usize = 16;
/// Most topics a list returns.
pub(crate) const MAX_LIST: i64 = 1000;

const TABLE: &str = "pgws_live.topics";
/// A name is one public topic, or one private topic per owner: another owner's private topic
/// neither shows nor keeps a name from being created (which would tell that it exists).
const SCHEMA: &str = "CREATE SCHEMA IF NOT EXISTS pgws_live;
    CREATE TABLE IF NOT EXISTS pgws_live.topics (
        name        text        NOT NULL,
        owner       text        NOT NULL,
        public      boolean     NOT NULL DEFAULT false,
        incarnation bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        created_at  timestamptz NOT NULL DEFAULT now(),
        UNIQUE (owner, name)
    );
    CREATE UNIQUE INDEX IF NOT EXISTS topics_public_name ON pgws_live.topics (name) WHERE public";
/// The same for a table made before names were per owner (its primary key was the name).
const PER_OWNER: &str = "DO $$ BEGIN
      IF to_regclass('pgws_live.topics_public_name') IS NULL THEN
        ALTER TABLE pgws_live.topics DROP CONSTRAINT IF EXISTS topics_pkey;
        ALTER TABLE pgws_live.topics ADD PRIMARY KEY (incarnation), ADD UNIQUE (owner, name);
        CREATE UNIQUE INDEX topics_public_name ON pgws_live.topics (name) WHERE public;
      END IF;
    END $$";
/// The index that tells the table has names per owner.
const PER_OWNER_INDEX: &str = "pgws_live.topics_public_name";
/// How one caller's view picks among the topics of a name: its own, then the public one,
/// then the oldest.
const SEEN_FIRST: &str = "ORDER BY (owner = $2) DESC NULLS LAST, public DESC, incarnation";

/// The topic service; [`LiveTopics::run`] is its task.
pub(crate) struct LiveTopics {
    pub(crate) pg: Config,
    pub(crate) subjects: Subjects,
    pub(crate) bus: Bus,
    pub(crate) shutdown: Shutdown,
    /// `PGWS_TABLE_TOPICS`.
    pub(crate) tables: Vec<TablePattern>,
    /// `PGWS_LIVE_CLASSES=subscriber`.
    pub(crate) per_subscriber: bool,
}

impl LiveTopics {
    /// Serves topic requests until `token` is cancelled.
    pub(crate) async fn run(self, token: CancellationToken) -> anyhow::Result<()> {
        let sub = self
            .bus
            .queue_subscribe(self.subjects.live_topics(), self.subjects.bridge_queue())
            .await?;
        let conn = LazyClient::new(self.pg.clone(), "live topics", self.shutdown.clone());
        let this = &self;
        let serving = sub.for_each_concurrent(CONCURRENCY, |m| {
            let conn = &conn;
            async move {
                let answer = match serde_json::from_slice::<LiveTopicOp>(&m.payload) {
                    Ok(op) => this.answer(conn, &op).await,
                    Err(e) => LiveTopicReply::unavailable(format!("invalid topic request: {e}")),
                };
                reply(&this.bus, m.reply.as_ref(), &answer).await;
            }
        });
        tokio::select! {
            _ = token.cancelled() => {}
            _ = serving => anyhow::bail!("the live topic subscription ended"),
        }
        Ok(())
    }
}

impl LiveTopics {
    async fn answer(&self, conn: &LazyClient, op: &LiveTopicOp) -> LiveTopicReply {
        let client = match connect(conn, op).await {
            Ok(c) => c,
            Err(reply) => return reply,
        };
        match self.execute(&client, op).await {
            Ok(reply) => reply,
            Err(e) => {
                tracing::warn!(error = %e, "live topic request failed");
                LiveTopicReply::unavailable("topic request failed")
            }
        }
    }

    /// Table topics first: their names are taken.
    async fn execute(
        &self,
        db: &Client,
        op: &LiveTopicOp,
    ) -> Result<LiveTopicReply, tokio_postgres::Error> {
        let tables = live_tables::resolve(db, &self.tables).await?;
        if let LiveTopicOp::List {
            admin, role, after, ..
        } = op
        {
            let mut reply = execute(db, op).await?;
            if reply.outcome == LiveOutcome::Ok && after.is_none() {
                reply.tables = live_tables::readable(db, &tables, role.as_deref(), *admin).await?;
            }
            return Ok(reply);
        }
        let table = tables.iter().find(|t| Some(&t.topic) == name_of(op));
        let Some(table) = table else {
            return execute(db, op).await;
        };
        let refused = LiveTopicReply::refused;
        Ok(match op {
            LiveTopicOp::Get {
                reader: Some(reader),
                ..
            } => match live_tables::class_of(db, table, reader, self.per_subscriber).await {
                Ok(class) => LiveTopicReply {
                    class: Some(class),
                    ..LiveTopicReply::outcome(LiveOutcome::Ok)
                },
                Err(Refused::Forbidden(why)) => refused(LiveOutcome::Forbidden, why),
                Err(Refused::Db(e)) => return Err(e),
            },
            LiveTopicOp::Get { name, .. } => refused(
                LiveOutcome::Forbidden,
                format!("{name:?} is a table topic: only the database writes to it"),
            ),
            LiveTopicOp::Create { name, .. } => refused(
                LiveOutcome::Exists,
                format!("{name:?} is the name of a table topic"),
            ),
            LiveTopicOp::Destroy { name, .. } => refused(
                LiveOutcome::Forbidden,
                format!("{name:?} is a table topic: it cannot be destroyed"),
            ),
            LiveTopicOp::List { .. } => execute(db, op).await?,
        })
    }
}

fn name_of(op: &LiveTopicOp) -> Option<&String> {
    match op {
        LiveTopicOp::Create { name, .. }
        | LiveTopicOp::Destroy { name, .. }
        | LiveTopicOp::Get { name, .. } => Some(name),
        LiveTopicOp::List { .. } => None,
    }
}

/// The service's connection, with its table created; `Err` is the answer when there is none.
async fn connect(
    conn: &LazyClient,
    op: &LiveTopicOp,
) -> Result<std::sync::Arc<Client>, LiveTopicReply> {
    let name = name_of(op);
    if name.is_some_and(|n| !valid_live_topic(n)) {
        return Err(LiveTopicReply::unavailable("invalid topic name"));
    }
    match conn.get().await {
        Ok((client, fresh)) => {
            if fresh {
                let ensured = async {
                    crate::db::ensure_table(&client, TABLE, SCHEMA).await?;
                    crate::db::ensure_table(&client, PER_OWNER_INDEX, PER_OWNER).await
                };
                if let Err(e) = ensured.await {
                    tracing::warn!(error = %e, "cannot create pgws_live.topics");
                    return Err(LiveTopicReply::unavailable(
                        "cannot create pgws_live.topics",
                    ));
                }
            }
            Ok(client)
        }
        Err(_) => Err(LiveTopicReply::unavailable("database unavailable")),
    }
}

fn topic(row: &Row) -> LiveTopic {
    LiveTopic {
        name: row.get(0),
        owner: row.get(1),
        public: row.get(2),
        incarnation: row.get(3),
    }
}

async fn execute(db: &Client, op: &LiveTopicOp) -> Result<LiveTopicReply, tokio_postgres::Error> {
    const COLUMNS: &str = "name, owner, public, incarnation";
    Ok(match op {
        LiveTopicOp::Create {
            name,
            owner,
            public,
        } => {
            let owned: i64 = db
                .query_one(
                    "SELECT count(*) FROM pgws_live.topics WHERE owner = $1",
                    &[owner],
                )
                .await?
                .get(0);
            if owned >= MAX_TOPICS_PER_OWNER {
                return Ok(LiveTopicReply::outcome(LiveOutcome::Limit));
            }
            // A name taken by a public topic or by the owner's own; another owner's private
            // topic does not take it. A private topic of a name that is public is refused
            // too: the public one is visible to all.
            let sql = format!(
                "INSERT INTO pgws_live.topics (name, owner, public)
                 SELECT $1, $2, $3 WHERE NOT EXISTS
                   (SELECT 1 FROM pgws_live.topics WHERE name = $1 AND public)
                 ON CONFLICT DO NOTHING RETURNING {COLUMNS}"
            );
            match db.query_opt(&sql, &[name, owner, public]).await? {
                Some(row) => LiveTopicReply::topic(topic(&row)),
                None => LiveTopicReply::outcome(LiveOutcome::Exists),
            }
        }
        LiveTopicOp::Destroy {
            name,
            caller,
            admin,
        } => {
            // The topic the caller sees by that name, if it may destroy it.
            let sql = format!(
                "DELETE FROM pgws_live.topics WHERE incarnation =
                   (SELECT incarnation FROM pgws_live.topics
                     WHERE name = $1 AND (owner = $2 OR $3) {SEEN_FIRST} LIMIT 1)
                 RETURNING {COLUMNS}"
            );
            match db.query_opt(&sql, &[name, caller, admin]).await? {
                Some(row) => LiveTopicReply::topic(topic(&row)),
                // A public topic it does not own: forbidden; another's private one: absent.
                None => match get(db, name, caller).await? {
                    Some(t) if t.public => LiveTopicReply::outcome(LiveOutcome::Forbidden),
                    _ => LiveTopicReply::outcome(LiveOutcome::Absent),
                },
            }
        }
        LiveTopicOp::Get { name, caller, .. } => match get(db, name, caller).await? {
            Some(t) => LiveTopicReply::topic(t),
            None => LiveTopicReply::outcome(LiveOutcome::Absent),
        },
        LiveTopicOp::List {
            caller,
            admin,
            after,
            ..
        } => {
            // One more than a page, to tell whether more follow.
            // Each name once (a caller's own private topic and a public one may share it).
            let sql = format!(
                "SELECT DISTINCT ON (name) {COLUMNS} FROM pgws_live.topics
                  WHERE (public OR owner = $1 OR $2) AND ($4::text IS NULL OR name > $4)
                  ORDER BY name, (owner = $1) DESC NULLS LAST, public DESC LIMIT $3"
            );
            let rows = db
                .query(&sql, &[caller, admin, &(MAX_LIST + 1), after])
                .await?;
            let mut topics: Vec<LiveTopic> = rows.iter().map(topic).collect();
            let more = topics.len() > MAX_LIST as usize;
            topics.truncate(MAX_LIST as usize);
            LiveTopicReply {
                topics,
                more,
                ..LiveTopicReply::outcome(LiveOutcome::Ok)
            }
        }
    })
}

/// The topic `caller` sees by `name` (see [`SEEN_FIRST`]); the gateway decides whether it may
/// use it.
async fn get(
    db: &Client,
    name: &str,
    caller: &Option<String>,
) -> Result<Option<LiveTopic>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT name, owner, public, incarnation FROM pgws_live.topics WHERE name = $1
         {SEEN_FIRST} LIMIT 1"
    );
    let row = db.query_opt(&sql, &[&name, caller]).await?;
    Ok(row.as_ref().map(topic))
}
