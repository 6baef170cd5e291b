//! The same cases on both logs: in memory and on a JetStream stream of the machine's NATS
//! (a stream of each test's own, in memory, removed at the end).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pgws_bus::{Headers, JetStreamLog, Log, MemoryLog, Record};

/// How long a consumer waits for an acknowledgement before a record comes again.
const ACK_WAIT: Duration = Duration::from_secs(1);

/// A log and, on NATS, its stream (removed when dropped).
struct Fixture {
    log: Arc<dyn Log>,
    prefix: String,
    stream: Option<(async_nats::jetstream::Context, String)>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some((js, name)) = self.stream.take() {
            pgws_testkit::off_runtime(async move {
                let _ = js.delete_stream(&name).await;
            });
        }
    }
}

fn memory() -> Fixture {
    Fixture {
        log: Arc::new(MemoryLog::new(ACK_WAIT)),
        prefix: pgws_testkit::unique("log"),
        stream: None,
    }
}

async fn jetstream() -> Fixture {
    let prefix = pgws_testkit::unique("log");
    let client = async_nats::connect(pgws_testkit::nats_url())
        .await
        .expect("the machine's NATS (scripts/ensure-services.sh)");
    let js = async_nats::jetstream::new(client);
    let name = prefix.replace(['-', '.'], "_").to_uppercase();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("{prefix}.>")],
        storage: async_nats::jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .expect("a stream");
    Fixture {
        log: Arc::new(JetStreamLog::new(js.clone(), &name, ACK_WAIT)),
        prefix,
        stream: Some((js, name)),
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

fn texts(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect()
}

async fn append(fx: &Fixture, id: &str, payload: &str) {
    let mut h = Headers::new();
    h.insert("Pgws-Id".into(), id.into());
    fx.log
        .append(
            &format!("{}.audit.m", fx.prefix),
            id,
            h,
            Bytes::from(payload.to_owned()),
        )
        .await
        .expect("appended");
}

async fn fetch(fx: &Fixture, consumer: &str, wait: Duration) -> Vec<Record> {
    fx.log.fetch(consumer, 10, wait).await.expect("fetched")
}

async fn order_and_dedup(fx: Fixture) {
    for (id, text) in [
        ("a", "one"),
        ("b", "two"),
        ("a", "one again"),
        ("c", "three"),
    ] {
        append(&fx, id, text).await;
    }
    let got = fetch(&fx, "rec", Duration::from_secs(2)).await;
    assert_eq!(texts(&got), ["one", "two", "three"]);
    assert_eq!(got[1].headers.get("Pgws-Id").map(String::as_str), Some("b"));
    for r in got {
        r.ack().await.expect("acked");
    }
    assert!(fetch(&fx, "rec", Duration::from_millis(500))
        .await
        .is_empty());
    // Another consumer reads the whole log too.
    assert_eq!(
        texts(&fetch(&fx, "other", Duration::from_secs(2)).await),
        ["one", "two", "three"]
    );
}
on_both!(
    records_come_in_order_and_a_repeated_id_once,
    order_and_dedup
);

async fn redelivery(fx: Fixture) {
    append(&fx, "x", "x").await;
    append(&fx, "y", "y").await;
    let mut got = fetch(&fx, "rec", Duration::from_secs(2)).await;
    assert_eq!(texts(&got), ["x", "y"]);
    let y = got.pop().expect("y");
    got.pop().expect("x").ack().await.expect("acked");
    // y is neither acknowledged nor handed back: it comes again after the ack wait.
    drop(y);
    let again = fetch(&fx, "rec", ACK_WAIT * 3).await;
    assert_eq!(texts(&again), ["y"]);
    // Handed back: again after its delay.
    let y = again.into_iter().next().expect("y");
    y.hand_back(Duration::from_millis(300))
        .await
        .expect("handed back");
    let again = fetch(&fx, "rec", ACK_WAIT * 3).await;
    assert_eq!(texts(&again), ["y"]);
    for r in again {
        r.ack().await.expect("acked");
    }
    assert!(fetch(&fx, "rec", ACK_WAIT + Duration::from_millis(500))
        .await
        .is_empty());
}
on_both!(an_unacknowledged_record_comes_again, redelivery);
