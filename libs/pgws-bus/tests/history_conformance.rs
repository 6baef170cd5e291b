//! The same cases on both histories: in memory and on a JetStream stream of the machine's NATS
//! (a stream of each test's own, capturing messages published on plain NATS subjects as the
//! leader bridge publishes deliveries, removed at the end).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use pgws_bus::{replay_all, History, JetStreamHistory, Kept, MemoryHistory, Replay};

/// How long the histories of these tests keep a message.
const MAX_AGE: Duration = Duration::from_secs(2);

/// A history, how messages reach it, and on NATS its stream (removed when dropped).
struct Fixture {
    history: Arc<dyn History>,
    prefix: String,
    memory: Option<MemoryHistory>,
    nats: Option<(async_nats::Client, async_nats::jetstream::Context, String)>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some((_, js, name)) = self.nats.take() {
            pgws_testkit::off_runtime(async move {
                let _ = js.delete_stream(&name).await;
            });
        }
    }
}

impl Fixture {
    fn subject(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    /// Publishes `text` on `name` as a delivery is published, and waits until it is kept.
    async fn publish(&self, name: &str, text: &str) {
        let subject = self.subject(name);
        if let Some(memory) = &self.memory {
            memory.keep(&subject, Default::default(), Bytes::from(text.to_owned()));
        }
        if let Some((client, _, _)) = &self.nats {
            client
                .publish(subject, Bytes::from(text.to_owned()))
                .await
                .expect("published");
            client.flush().await.expect("flushed");
        }
    }

    /// Publishes `text` on `name` with a `Nats-Msg-Id`.
    async fn publish_with_id(&self, name: &str, text: &str, id: &str) {
        let subject = self.subject(name);
        let mut headers = pgws_bus::Headers::new();
        headers.insert("Nats-Msg-Id".to_owned(), id.to_owned());
        if let Some(memory) = &self.memory {
            memory.keep(&subject, headers.clone(), Bytes::from(text.to_owned()));
        }
        if let Some((client, _, _)) = &self.nats {
            let mut map = async_nats::HeaderMap::new();
            map.insert("Nats-Msg-Id", id);
            client
                .publish_with_headers(subject, map, Bytes::from(text.to_owned()))
                .await
                .expect("published");
            client.flush().await.expect("flushed");
        }
    }

    async fn publish_all(&self, name: &str, texts: std::ops::Range<u32>) {
        for i in texts {
            self.publish(name, &format!("{name}{i}")).await;
        }
    }

    async fn replay(&self, name: &str, epoch: &str, after: u64) -> Option<Vec<Kept>> {
        match self
            .history
            .replay(&self.subject(name), epoch, after)
            .await
            .expect("replay")
        {
            Replay::Kept(s) => Some(collect(s).await),
            Replay::Gap => None,
        }
    }
}

async fn collect(s: pgws_bus::KeptStream) -> Vec<Kept> {
    tokio::time::timeout(
        Duration::from_secs(10),
        s.map(|k| k.expect("kept")).collect(),
    )
    .await
    .expect("the replay ends")
}

fn texts(kept: &[Kept]) -> Vec<String> {
    kept.iter()
        .map(|k| String::from_utf8_lossy(&k.payload).into_owned())
        .collect()
}

fn memory() -> Fixture {
    let memory = MemoryHistory::new(MAX_AGE, 1 << 20);
    Fixture {
        history: Arc::new(memory.clone()),
        prefix: pgws_testkit::unique("history"),
        memory: Some(memory),
        nats: None,
    }
}

async fn jetstream() -> Fixture {
    let prefix = pgws_testkit::unique("history");
    let client = async_nats::connect(pgws_testkit::nats_url())
        .await
        .expect("the machine's NATS (scripts/ensure-services.sh)");
    let js = async_nats::jetstream::new(client.clone());
    let name = prefix.replace(['-', '.'], "_").to_uppercase();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("{prefix}.>")],
        storage: async_nats::jetstream::stream::StorageType::Memory,
        max_age: MAX_AGE,
        duplicate_window: MAX_AGE,
        ..Default::default()
    })
    .await
    .expect("a stream");
    Fixture {
        history: Arc::new(JetStreamHistory::new(js.clone(), &name)),
        prefix,
        memory: None,
        nats: Some((client, js, name)),
    }
}

macro_rules! on_both {
    ($name:ident, $case:ident) => {
        mod $name {
            #[tokio::test]
            async fn memory() {
                super::$case(super::memory()).await;
            }
            #[tokio::test]
            async fn jetstream() {
                super::$case(super::jetstream().await).await;
            }
        }
    };
}

on_both!(a_replay_is_one_subject_after_a_sequence, replay_after);
async fn replay_after(f: Fixture) {
    let epoch = f.history.epoch().await.expect("epoch");
    f.publish_all("a", 0..5).await;
    f.publish_all("b", 0..3).await;
    f.publish_all("a", 5..8).await;
    let all = f.replay("a", &epoch, 0).await.expect("from the start");
    assert_eq!(
        texts(&all),
        ["a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7"]
    );
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    // After a4: a5.. only, though b's messages came between.
    let after = f.replay("a", &epoch, all[4].seq).await.expect("after a4");
    assert_eq!(texts(&after), ["a5", "a6", "a7"]);
    // After the last one: nothing, and the replay ends.
    let last = all[7].seq;
    assert_eq!(f.replay("a", &epoch, last).await.map(|k| k.len()), Some(0));
    // A subject without messages after the position: nothing.
    assert_eq!(f.replay("c", &epoch, last).await.map(|k| k.len()), Some(0));
}

on_both!(positions_of_another_history_or_not_issued_are_gaps, gaps);
async fn gaps(f: Fixture) {
    let epoch = f.history.epoch().await.expect("epoch");
    f.publish_all("a", 0..3).await;
    let all = f.replay("a", &epoch, 0).await.expect("kept");
    let last = all.last().expect("three").seq;
    assert!(f.replay("a", "123abc", 0).await.is_none(), "another epoch");
    assert!(
        f.replay("a", &epoch, last + 1).await.is_none(),
        "not issued"
    );
    // Once what followed a position is no longer kept, it is a gap.
    tokio::time::sleep(MAX_AGE + Duration::from_millis(1500)).await;
    f.publish_all("a", 3..4).await;
    assert!(f.replay("a", &epoch, all[0].seq).await.is_none(), "expired");
    // The newest position is still served.
    let now = f.replay("a", &epoch, last).await.expect("served");
    assert_eq!(texts(&now), ["a3"]);
}

on_both!(a_tail_joins_a_replay_by_sequence, tail_and_replay);
async fn tail_and_replay(f: Fixture) {
    let epoch = f.history.epoch().await.expect("epoch");
    f.publish_all("a", 0..3).await;
    let mut tail = f.history.tail(&f.subject("a")).await.expect("tail");
    assert_eq!(tail.epoch, epoch);
    f.publish_all("a", 3..6).await;
    f.publish_all("b", 0..2).await;
    f.publish_all("a", 6..7).await;
    let mut live = Vec::new();
    for _ in 0..4 {
        let k = tokio::time::timeout(Duration::from_secs(5), tail.messages.next())
            .await
            .expect("a tail message")
            .expect("open")
            .expect("kept");
        live.push(k);
    }
    assert_eq!(texts(&live), ["a3", "a4", "a5", "a6"]);
    // A replay from a0 overlaps the tail; joined by sequence there is no gap and no repeat.
    let first = f.replay("a", &epoch, 0).await.expect("kept")[0].seq;
    let replayed = f.replay("a", &epoch, first).await.expect("kept");
    let last = replayed.last().expect("some").seq;
    let joined: Vec<Kept> = replayed
        .into_iter()
        .chain(live.into_iter().filter(|k| k.seq > last))
        .collect();
    assert_eq!(texts(&joined), ["a1", "a2", "a3", "a4", "a5", "a6"]);
}

on_both!(several_subjects_replay_in_sequence_order, merged);
async fn merged(f: Fixture) {
    let epoch = f.history.epoch().await.expect("epoch");
    for i in 0..4 {
        f.publish("a", &format!("a{i}")).await;
        f.publish("b", &format!("b{i}")).await;
        f.publish("c", &format!("c{i}")).await;
    }
    let subjects = [f.subject("a"), f.subject("b")];
    let Replay::Kept(s) = replay_all(f.history.as_ref(), &subjects, &epoch, 0)
        .await
        .expect("replay")
    else {
        panic!("no gap");
    };
    assert_eq!(
        texts(&collect(s).await),
        ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3"]
    );
    let gap = replay_all(f.history.as_ref(), &subjects, "0", 0).await;
    assert!(matches!(gap, Ok(Replay::Gap)));
}

on_both!(
    a_message_published_again_with_its_id_is_kept_once,
    deduplicated
);
async fn deduplicated(f: Fixture) {
    let epoch = f.history.epoch().await.expect("epoch");
    f.publish_with_id("a", "e1", "1.0@a").await;
    f.publish_with_id("a", "e2", "1.1@a").await;
    f.publish_with_id("a", "e1", "1.0@a").await;
    f.publish("a", "plain").await;
    f.publish("a", "plain").await;
    let kept = f.replay("a", &epoch, 0).await.expect("kept");
    assert_eq!(texts(&kept), ["e1", "e2", "plain", "plain"]);
}
