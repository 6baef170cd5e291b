//! What receiving sockets record: a latency histogram (microseconds from the timestamp in the
//! payload to receipt), delivery counts, the time of the last receipt, deliveries that came
//! after a later one of the same socket (by the sequence number `"i"`); and how histograms
//! travel from child processes (HdrHistogram V2 serialisation, base64).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Unix time in microseconds.
pub fn micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// An empty latency histogram: 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| Histogram::new(3).unwrap())
}

const SHARDS: usize = 16;

/// Shared by every receiving socket of a process.
pub struct RxStats {
    shards: Vec<Mutex<Histogram<u64>>>,
    /// Frames that carried a timestamp.
    pub received: AtomicU64,
    /// Unix µs of the last such frame.
    pub last_rx_us: AtomicU64,
    /// Sockets that ended before they were told to.
    pub closed: AtomicU64,
    /// Frames whose sequence number was below one received before on the same socket.
    pub out_of_order: AtomicU64,
}

impl Default for RxStats {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
            received: AtomicU64::new(0),
            last_rx_us: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
        }
    }
}

/// The number after the first `"<key>":` in `payload` (`key` a single byte).
fn number(payload: &[u8], key: u8) -> Option<u64> {
    let at = payload
        .windows(4)
        .position(|w| w == [b'"', key, b'"', b':'])?
        + 4;
    let digits = &payload[at..];
    let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    (n > 0).then(|| {
        digits[..n]
            .iter()
            .fold(0u64, |n, b| n * 10 + u64::from(b - b'0'))
    })
}

/// The number after the first `"t":` in `payload` (a send time, unix µs).
pub fn timestamp(payload: &[u8]) -> Option<u64> {
    number(payload, b't').filter(|t| *t > 0)
}

/// The number after the first `"i":` in `payload` (a sequence number).
pub fn sequence(payload: &[u8]) -> Option<u64> {
    number(payload, b'i')
}

impl RxStats {
    /// Records a received payload if it carries a timestamp; `last` is the socket's highest
    /// sequence number so far.
    pub fn record(&self, shard: usize, payload: &[u8], last: &mut Option<u64>) {
        let Some(sent) = timestamp(payload) else {
            return;
        };
        if let Some(i) = sequence(payload) {
            if last.is_some_and(|l| i < l) {
                self.out_of_order.fetch_add(1, Ordering::Relaxed);
            }
            *last = (*last).max(Some(i));
        }
        let now = micros();
        if let Ok(mut h) = self.shards[shard % SHARDS].lock() {
            h.saturating_record(now.saturating_sub(sent).max(1));
        }
        self.received.fetch_add(1, Ordering::Relaxed);
        self.last_rx_us.fetch_max(now, Ordering::Relaxed);
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = histogram();
        for s in &self.shards {
            if let Ok(h) = s.lock() {
                let _ = all.add(&*h);
            }
        }
        all
    }
}

/// `h` as base64 of its V2 serialisation.
pub fn encode(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    let _ = V2Serializer::new().serialize(h, &mut buf);
    base64::engine::general_purpose::STANDARD.encode(buf)
}

/// The inverse of [`encode`].
pub fn decode(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .context("histogram base64")?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("histogram: {e:?}"))
}

fn ms(us: u64) -> f64 {
    (us as f64 / 10.0).round() / 100.0
}

/// Latency percentiles in milliseconds.
pub fn percentiles(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!(null);
    }
    json!({
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p99_9_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
        "mean_ms": (h.mean() / 10.0).round() / 100.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_timestamp() {
        assert_eq!(
            timestamp(br#"{"channel":"a","i":3,"t":1234567}"#),
            Some(1_234_567)
        );
        assert_eq!(timestamp(br#"{"channel":"a"}"#), None);
        assert_eq!(sequence(br#"{"channel":"a","i":0,"t":1}"#), Some(0));
        assert_eq!(sequence(br#"{"channel":"a","i":12,"t":1}"#), Some(12));
    }

    #[test]
    fn counts_deliveries_out_of_order() {
        let s = RxStats::default();
        let mut last = None;
        for i in [0, 2, 1, 3] {
            s.record(0, format!(r#"{{"i":{i},"t":1}}"#).as_bytes(), &mut last);
        }
        assert_eq!(s.received.load(Ordering::Relaxed), 4);
        assert_eq!(s.out_of_order.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn histograms_round_trip() {
        let mut h = histogram();
        h.record(1500).unwrap();
        h.record(90_000).unwrap();
        let back = decode(&encode(&h)).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back.max(), h.max());
    }
}
