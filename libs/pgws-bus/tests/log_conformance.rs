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
    // Each says its id (not among the headers), its place in the log (a repeated id takes
    // none) and that it comes for the first time.
    let ids: Vec<Option<&str>> = got.iter().map(|r| r.id.as_deref()).collect();
    assert_eq!(ids, [Some("a"), Some("b"), Some("c")]);
    assert!(got.iter().all(|r| !r.headers.contains_key("Nats-Msg-Id")));
    let seqs: Vec<u64> = got.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert!(!got[0].stream.is_empty());
    assert!(got.iter().all(|r| r.stream == got[0].stream));
    assert!(got.iter().all(|r| r.delivered == 1 && !r.redelivered()));
    assert_eq!(
        got[2].subject,
        format!("{}.audit.m", fx.prefix),
        "the subject appended to"
    );
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
    assert_eq!((again[0].seq, again[0].delivered), (2, 2));
    assert!(again[0].redelivered());
    // Handed back: again after its delay.
    let y = again.into_iter().next().expect("y");
    y.hand_back(Duration::from_millis(300))
        .await
        .expect("handed back");
    let again = fetch(&fx, "rec", ACK_WAIT * 3).await;
    assert_eq!(texts(&again), ["y"]);
    assert_eq!(again[0].delivered, 3);
    for r in again {
        r.ack().await.expect("acked");
    }
    assert!(fetch(&fx, "rec", ACK_WAIT + Duration::from_millis(500))
        .await
        .is_empty());
}
on_both!(an_unacknowledged_record_comes_again, redelivery);

async fn lag(fx: Fixture) {
    assert_eq!(fx.log.pending("rec").await.expect("pending"), 0);
    for id in ["p", "q", "r"] {
        append(&fx, id, id).await;
    }
    // Never received, then received and not acknowledged: pending either way.
    assert_eq!(fx.log.pending("rec").await.expect("pending"), 3);
    let got = fetch(&fx, "rec", Duration::from_secs(2)).await;
    assert_eq!(got.len(), 3);
    assert_eq!(fx.log.pending("rec").await.expect("pending"), 3);
    let mut got = got.into_iter();
    for r in got.by_ref().take(2) {
        r.ack().await.expect("acked");
    }
    // Acknowledgements reach JetStream asynchronously.
    let mut left = u64::MAX;
    for _ in 0..50 {
        left = fx.log.pending("rec").await.expect("pending");
        if left == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(left, 1);
    // Another consumer has read nothing yet.
    assert_eq!(fx.log.pending("other").await.expect("pending"), 3);
    drop(got);
}
on_both!(pending_counts_what_a_consumer_has_not_acknowledged, lag);

async fn empty_ids(fx: Fixture) {
    // An empty id deduplicates nothing (JetStream ignores an empty Nats-Msg-Id).
    append(&fx, "", "first").await;
    append(&fx, "", "second").await;
    let got = fetch(&fx, "rec", Duration::from_secs(2)).await;
    assert_eq!(texts(&got), ["first", "second"]);
    for r in got {
        r.ack().await.expect("acked");
    }
}
on_both!(an_empty_id_deduplicates_nothing, empty_ids);

async fn prompt(fx: Fixture) {
    for id in ["s", "t"] {
        append(&fx, id, id).await;
    }
    // Fewer records than asked for: they come at once, not when the wait is over.
    let started = std::time::Instant::now();
    let got = fx
        .log
        .fetch("rec", 100, Duration::from_secs(5))
        .await
        .expect("fetched");
    assert_eq!(texts(&got), ["s", "t"]);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    for r in got {
        r.ack().await.expect("acked");
    }
}
on_both!(what_there_is_comes_without_waiting_for_more, prompt);

#[tokio::test]
async fn a_jetstream_consumer_holds_at_most_max_ack_pending() {
    let mut fx = jetstream().await;
    let (js, name) = fx.stream.clone().expect("a stream");
    fx.log = Arc::new(JetStreamLog::new(js, &name, ACK_WAIT).with_max_ack_pending(2));
    for id in ["u", "v", "w"] {
        append(&fx, id, id).await;
    }
    let got = fetch(&fx, "rec", Duration::from_millis(500)).await;
    assert_eq!(texts(&got), ["u", "v"]);
    for r in got {
        r.ack().await.expect("acked");
    }
    assert_eq!(
        texts(&fetch(&fx, "rec", Duration::from_secs(2)).await),
        ["w"]
    );
}

async fn arriving(fx: Fixture) {
    // A fetch waiting on an empty log returns what is appended meanwhile, without waiting
    // for more or for its end.
    let fx = Arc::new(fx);
    let waiting = {
        let fx = Arc::clone(&fx);
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let got = fx
                .log
                .fetch("rec", 100, Duration::from_secs(4))
                .await
                .expect("fetched");
            (got, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    append(&fx, "a1", "a1").await;
    let (got, took) = waiting.await.expect("joins");
    assert_eq!(texts(&got), ["a1"]);
    assert!(took < Duration::from_secs(2), "{took:?}");
    // Nothing there: the fetch waits its time, and not much longer.
    let started = std::time::Instant::now();
    let none = fetch(&fx, "rec", Duration::from_millis(300)).await;
    assert!(none.is_empty());
    let took = started.elapsed();
    assert!(
        (Duration::from_millis(250)..Duration::from_secs(1)).contains(&took),
        "{took:?}"
    );
}
on_both!(a_waiting_fetch_returns_what_arrives, arriving);

async fn busy(fx: Fixture) {
    // Short fetches while records keep coming: each returns within about its wait (nats-server
    // does not always say when a pull ended), and every record comes once it is acknowledged.
    const TOTAL: usize = 20_000;
    let fx = Arc::new(fx);
    let producer = {
        let fx = Arc::clone(&fx);
        tokio::spawn(async move {
            let subject = format!("{}.audit.m", fx.prefix);
            for chunk in 0..TOTAL / 500 {
                let appends = (0..500).map(|i| {
                    let id = format!("{chunk}-{i}");
                    let subject = subject.clone();
                    let log = Arc::clone(&fx.log);
                    async move {
                        log.append(&subject, &id, Headers::new(), Bytes::from_static(b"x"))
                            .await
                    }
                });
                for appended in futures::future::join_all(appends).await {
                    appended.expect("appended");
                }
            }
        })
    };
    let started = std::time::Instant::now();
    let mut got = 0;
    let mut slowest = Duration::ZERO;
    while got < TOTAL && started.elapsed() < Duration::from_secs(30) {
        for wait in [Duration::from_millis(20), Duration::from_millis(3)] {
            let t = std::time::Instant::now();
            let records = fx.log.fetch("rec", 1000, wait).await.expect("fetched");
            slowest = slowest.max(t.elapsed().saturating_sub(wait));
            got += records.len();
            for r in records {
                r.ack().await.expect("acked");
            }
        }
    }
    producer.await.expect("appended all");
    assert_eq!(got, TOTAL);
    assert!(
        slowest < Duration::from_secs(1),
        "a fetch took {slowest:?} past its wait"
    );
}
on_both!(fetches_end_in_time_while_records_keep_coming, busy);
