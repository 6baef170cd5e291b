//! `/live` custom topics, a request service every bridge serves.
//!
//! The gateways hold no database credentials, so they ask the bridges (queue group
//! `<prefix>.bridge` on `<prefix>.livetopics`) to create, destroy, find and list custom
//! topics ([`LiveTopicOp`]). Topics live in `pgws_live.topics`, created by the first bridge
//! that needs it: they survive restarts and every gateway sees the same ones. A name's
//! `incarnation` is new at each creation (an identity column), which names the NATS subject of
//! its messages.
//!
//! Bounds: one connection per bridge (opened again after it failed), at most
//! [`CONCURRENCY`] requests in flight, lists of at most [`MAX_LIST`] topics,
//! [`MAX_TOPICS_PER_OWNER`] topics per owner (checked before each creation; two creations at
//! once may pass it by one).

use async_nats::Client as Nats;
use futures::StreamExt as _;
use pgws_proto::{
    valid_live_topic, LiveOutcome, LiveTopic, LiveTopicOp, LiveTopicReply, Subjects,
    MAX_TOPICS_PER_OWNER,
};
use pgws_service::Shutdown;
use tokio_postgres::{Client, Config, Row};
use tokio_util::sync::CancellationToken;

use crate::bus::reply;
use crate::db::LazyClient;

/// Requests in flight per bridge.
const CONCURRENCY: usize = 16;
/// Most topics a list returns.
pub(crate) const MAX_LIST: i64 = 1000;

const TABLE: &str = "pgws_live.topics";
const SCHEMA: &str = "CREATE SCHEMA IF NOT EXISTS pgws_live;
    CREATE TABLE IF NOT EXISTS pgws_live.topics (
        name        text        PRIMARY KEY,
        owner       text        NOT NULL,
        public      boolean     NOT NULL DEFAULT false,
        incarnation bigint      GENERATED ALWAYS AS IDENTITY,
        created_at  timestamptz NOT NULL DEFAULT now()
    )";

/// The topic service; [`LiveTopics::run`] is its task.
pub(crate) struct LiveTopics {
    pub(crate) pg: Config,
    pub(crate) subjects: Subjects,
    pub(crate) nats: Nats,
    pub(crate) shutdown: Shutdown,
}

impl LiveTopics {
    /// Serves topic requests until `token` is cancelled.
    pub(crate) async fn run(self, token: CancellationToken) -> anyhow::Result<()> {
        let sub = self
            .nats
            .queue_subscribe(self.subjects.live_topics(), self.subjects.bridge_queue())
            .await?;
        let conn = LazyClient::new(self.pg.clone(), "live topics", self.shutdown.clone());
        let this = &self;
        let serving = sub.for_each_concurrent(CONCURRENCY, |m| {
            let conn = &conn;
            async move {
                let answer = match serde_json::from_slice::<LiveTopicOp>(&m.payload) {
                    Ok(op) => answer(conn, &op).await,
                    Err(e) => LiveTopicReply::unavailable(format!("invalid topic request: {e}")),
                };
                reply(&this.nats, m.reply.as_ref(), &answer).await;
            }
        });
        tokio::select! {
            _ = token.cancelled() => {}
            _ = serving => anyhow::bail!("the live topic subscription ended"),
        }
        Ok(())
    }
}

async fn answer(conn: &LazyClient, op: &LiveTopicOp) -> LiveTopicReply {
    let name = match op {
        LiveTopicOp::Create { name, .. }
        | LiveTopicOp::Destroy { name, .. }
        | LiveTopicOp::Get { name } => Some(name),
        LiveTopicOp::List { .. } => None,
    };
    if name.is_some_and(|n| !valid_live_topic(n)) {
        return LiveTopicReply::unavailable("invalid topic name");
    }
    let client = match conn.get().await {
        Ok((client, fresh)) => {
            if fresh {
                if let Err(e) = crate::db::ensure_table(&client, TABLE, SCHEMA).await {
                    tracing::warn!(error = %e, "cannot create pgws_live.topics");
                    return LiveTopicReply::unavailable("cannot create pgws_live.topics");
                }
            }
            client
        }
        Err(_) => return LiveTopicReply::unavailable("database unavailable"),
    };
    match execute(&client, op).await {
        Ok(reply) => reply,
        Err(e) => {
            tracing::warn!(error = %e, "live topic request failed");
            LiveTopicReply::unavailable("topic request failed")
        }
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
            let sql = format!(
                "INSERT INTO pgws_live.topics (name, owner, public) VALUES ($1, $2, $3)
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
            let sql = format!(
                "DELETE FROM pgws_live.topics WHERE name = $1 AND (owner = $2 OR $3)
                 RETURNING {COLUMNS}"
            );
            match db.query_opt(&sql, &[name, caller, admin]).await? {
                Some(row) => LiveTopicReply::topic(topic(&row)),
                None => match get(db, name).await? {
                    Some(_) => LiveTopicReply::outcome(LiveOutcome::Forbidden),
                    None => LiveTopicReply::outcome(LiveOutcome::Absent),
                },
            }
        }
        LiveTopicOp::Get { name } => match get(db, name).await? {
            Some(t) => LiveTopicReply::topic(t),
            None => LiveTopicReply::outcome(LiveOutcome::Absent),
        },
        LiveTopicOp::List { caller, admin } => {
            let sql = format!(
                "SELECT {COLUMNS} FROM pgws_live.topics WHERE public OR owner = $1 OR $2
                 ORDER BY name LIMIT $3"
            );
            let rows = db.query(&sql, &[caller, admin, &MAX_LIST]).await?;
            LiveTopicReply {
                topics: rows.iter().map(topic).collect(),
                ..LiveTopicReply::outcome(LiveOutcome::Ok)
            }
        }
    })
}

async fn get(db: &Client, name: &str) -> Result<Option<LiveTopic>, tokio_postgres::Error> {
    let row = db
        .query_opt(
            "SELECT name, owner, public, incarnation FROM pgws_live.topics WHERE name = $1",
            &[&name],
        )
        .await?;
    Ok(row.as_ref().map(topic))
}
