//! The publishing side of `pubsub`, the fan-out of wspubsub topics; the rest of the mode (the
//! fleet of subscribers, the steady publishing loop, the report) is `fanout`'s.
//!
//! pgws: the run gets a key of its own in `apikeys` (`--keys-table`, the stack's
//! `PGWS_PUBSUB_KEYS_TABLE`; the table is created with wspubsub's seed DDL if absent; one
//! active row for the domain `<run id>.pgws-load`, deleted at the end), then one publishing
//! socket per topic, `/ws/pub/<key>/<domain>/<topic>`, opened before any subscriber (a topic
//! without its publisher answers 404). nats: one websocket per topic to nats-server's
//! websocket endpoint, speaking NATS (`CONNECT`, then one `PUB` per websocket frame), so that
//! both servers read their publishers' frames from websockets. Every frame carries `fanout`'s
//! payload, `{"channel":"<topic>","i":<sequence>,"t":<unix µs>}`, as text or (`--binary`)
//! binary. A reading half per publisher drains what the server sends (answering NATS pings)
//! and notes closes and errors for the report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::args::{Opts, Target};
use crate::client::{self, Ws};
use crate::nats;
use crate::report::Report;

/// The seed DDL of the key table (after its name), run when it is absent.
const APIKEYS_COLUMNS: &str = "(
    id serial primary key,
    domain varchar(64) not null unique,
    username varchar(254) not null,
    apikey varchar(36) not null unique,
    insert_ts timestamp not null default now(),
    active boolean not null default false)";

type Sink = Arc<Mutex<SplitSink<Ws, Message>>>;

/// What the publishers' reading halves saw.
#[derive(Default)]
struct Seen {
    frames: AtomicU64,
    closed: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Seen {
    fn error(&self, e: String) {
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert(e);
        }
    }
}

/// The run's row of the key table, and the connection that removes it.
struct Key {
    db: tokio_postgres::Client,
    table: String,
    domain: String,
}

impl Key {
    /// Creates the table if absent and inserts an active key for the run's domain.
    async fn provision(opts: &Opts) -> anyhow::Result<(Self, String)> {
        let db = client::postgres(opts).await?;
        let table: Vec<String> = opts
            .keys_table
            .split('.')
            .map(client::quote_ident)
            .collect();
        let table = table.join(".");
        db.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} {APIKEYS_COLUMNS}"
        ))
        .await
        .with_context(|| format!("creating the key table {table}"))?;
        let domain = opts.domain();
        let row = db
            .query_one(
                &format!(
                    "INSERT INTO {table} (domain, username, apikey, active) \
                     VALUES ($1, 'pgws-load', gen_random_uuid()::text, true) RETURNING apikey"
                ),
                &[&domain],
            )
            .await
            .with_context(|| format!("inserting the run's key into {table}"))?;
        Ok((Self { db, table, domain }, row.get(0)))
    }

    async fn remove(self) {
        let sql = format!("DELETE FROM {} WHERE domain = $1", self.table);
        if let Err(e) = self.db.execute(&sql, &[&self.domain]).await {
            eprintln!(
                "pgws-load: the key of {} stays in {}: {e}",
                self.domain, self.table
            );
        }
    }
}

/// One publishing socket per topic.
pub struct Publishers {
    nats: bool,
    binary: bool,
    sinks: Vec<Sink>,
    readers: Vec<JoinHandle<()>>,
    seen: Arc<Seen>,
    key: Option<Key>,
}

impl Publishers {
    /// Provisions the key (pgws) and opens the publishers, topic `c` on gateway
    /// `gateway_of(c)`.
    pub async fn connect(opts: &Opts) -> anyhow::Result<Self> {
        let nats = opts.target == Target::Nats;
        let (key, apikey) = if nats {
            (None, String::new())
        } else {
            let (key, apikey) = Key::provision(opts).await?;
            (Some(key), apikey)
        };
        let mut me = Self {
            nats,
            binary: opts.binary,
            sinks: Vec::new(),
            readers: Vec::new(),
            seen: Arc::new(Seen::default()),
            key,
        };
        if let Err(e) = me.open(opts, &apikey).await {
            me.finish(None).await;
            return Err(e);
        }
        Ok(me)
    }

    async fn open(&mut self, opts: &Opts, apikey: &str) -> anyhow::Result<()> {
        let eps = client::resolve_all(opts).await?;
        for c in 0..opts.channels {
            let topic = opts.channel_name(c);
            let path = if self.nats {
                "/".to_owned()
            } else {
                format!("/ws/pub/{apikey}/{}/{topic}", opts.domain())
            };
            let ep = &eps[opts.gateway_of(c)];
            let mut ws = client::open(ep, &path, None, WebSocketConfig::default())
                .await
                .with_context(|| format!("the publisher of {topic}"))?;
            let parser = if self.nats {
                Some(client::nats_handshake(&mut ws, None).await?)
            } else {
                None
            };
            let (sink, stream) = ws.split();
            let sink = Arc::new(Mutex::new(sink));
            self.readers.push(tokio::spawn(read(
                stream,
                parser,
                Arc::clone(&sink),
                Arc::clone(&self.seen),
            )));
            self.sinks.push(sink);
        }
        Ok(())
    }

    /// Sends `(topic, payload)` pairs, each on its topic's socket, in order; `names` are the
    /// topics' names (NATS subjects).
    pub async fn send(&self, names: &[String], batch: Vec<(usize, String)>) -> anyhow::Result<()> {
        let mut touched = vec![false; self.sinks.len()];
        for (c, payload) in batch {
            let msg = if self.nats {
                Message::binary(nats::publish_frame(&names[c], payload.as_bytes()))
            } else if self.binary {
                Message::binary(payload.into_bytes())
            } else {
                Message::text(payload)
            };
            self.sinks[c]
                .lock()
                .await
                .feed(msg)
                .await
                .with_context(|| format!("publishing on {}", names[c]))?;
            touched[c] = true;
        }
        for (sink, touched) in self.sinks.iter().zip(touched) {
            if touched {
                sink.lock().await.flush().await.context("publishing")?;
            }
        }
        Ok(())
    }

    /// Adds the publishers' figures to `report` (if given), stops reading and removes the
    /// run's key. The sockets close when `self` is dropped.
    pub async fn finish(self, report: Option<&mut Report>) {
        if let Some(report) = report {
            report.figure("publishers", self.sinks.len() as u64);
            report.figure(
                "publishers_closed",
                self.seen.closed.load(Ordering::Relaxed),
            );
            report.figure(
                "frames_to_publishers",
                self.seen.frames.load(Ordering::Relaxed),
            );
            if let Some(e) = self.seen.first_error.lock().ok().and_then(|e| e.clone()) {
                report.figure("publisher_error", e);
            }
        }
        for r in &self.readers {
            r.abort();
        }
        if let Some(key) = self.key {
            key.remove().await;
        }
    }
}

/// A publisher's reading half: counts the frames the server sends, answers NATS pings, notes
/// NATS errors and the close.
async fn read(
    mut stream: SplitStream<Ws>,
    mut parser: Option<nats::Parser>,
    sink: Sink,
    seen: Arc<Seen>,
) {
    while let Some(msg) = stream.next().await {
        let data = match msg {
            Ok(Message::Text(t)) => t.into(),
            Ok(Message::Binary(b)) => b,
            Ok(_) => continue, // pings are answered by tungstenite
            Err(e) => {
                seen.error(format!("publisher socket: {e}"));
                break;
            }
        };
        seen.frames.fetch_add(1, Ordering::Relaxed);
        let Some(p) = parser.as_mut() else {
            continue;
        };
        let fed = p.feed(&data, |_| {});
        if let Some(e) = fed.error {
            seen.error(format!("nats-server: {e}"));
        }
        for _ in 0..fed.pings {
            let pong = Message::binary(&b"PONG\r\n"[..]);
            if sink.lock().await.send(pong).await.is_err() {
                break;
            }
        }
    }
    seen.closed.fetch_add(1, Ordering::Relaxed);
}
