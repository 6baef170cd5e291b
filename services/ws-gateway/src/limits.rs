//! Limits on what one client can take from a gateway: open websockets and handshakes in
//! progress per source address, the origins browsers may connect from, the rate of
//! messages per socket, and refused API keys per source address.
//!
//! All but the last are off by default (postgres-websockets had none, and a load balancer or a load test
//! may open thousands of sockets from one address); each refusal is clear to the client:
//! HTTP 429 or 403 at the handshake, close 1008 for a socket over its message rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

/// The source address of a connection, put in each request's extensions by the listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) IpAddr);

/// Connections per source address: open websockets (with their handshakes), or handshakes
/// in progress.
#[derive(Debug, Default)]
pub(crate) struct PerAddress {
    max: Option<usize>,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; released on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    owner: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    /// At most `max` per address; `None`: no limit.
    pub(crate) fn new(max: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::default(),
        })
    }

    /// A slot for `ip`, or `None` when it has `max` already.
    pub(crate) fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let max = self.max?;
        let mut open = self.open.lock().ok()?;
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            owner: Arc::clone(self),
            ip,
        })
    }

    /// Whether a limit is set.
    pub(crate) fn enabled(&self) -> bool {
        self.max.is_some()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.owner.open.lock() {
            if let Some(n) = open.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&self.ip);
                }
            }
        }
    }
}

/// API keys refused per source address (wspubsub publishers), always on: from the third
/// refusal in a row, the address waits before its next key is checked, twice as long after
/// each further refusal (250 ms, 500 ms, ... up to [`KEY_BLOCK_MAX`]); meanwhile its publisher
/// handshakes are answered 429 without asking a bridge. A key accepted from the address clears
/// its count; an address without a refusal for [`KEY_FORGET`] is forgotten.
#[derive(Debug, Default)]
pub(crate) struct KeyRefusals {
    by_address: Mutex<HashMap<IpAddr, Refusals>>,
}

#[derive(Debug, Clone, Copy)]
struct Refusals {
    count: u32,
    last: Instant,
    until: Instant,
}

/// Refusals in a row an address may have before it waits.
const KEY_FREE: u32 = 2;
/// The first wait.
const KEY_BLOCK_FIRST: std::time::Duration = std::time::Duration::from_millis(250);
/// The longest wait.
pub(crate) const KEY_BLOCK_MAX: std::time::Duration = std::time::Duration::from_secs(60);
/// How long an address's refusals are remembered.
const KEY_FORGET: std::time::Duration = std::time::Duration::from_secs(600);
/// Most addresses remembered (the oldest are forgotten first when more come).
const KEY_ADDRESSES: usize = 100_000;

impl KeyRefusals {
    /// How long `ip` must still wait before a key of its is checked; `None` when it need not.
    pub(crate) fn waiting(&self, ip: IpAddr) -> Option<std::time::Duration> {
        let now = Instant::now();
        let map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&ip)
            .filter(|r| r.until > now)
            .map(|r| r.until - now)
    }

    /// A key from `ip` was refused; returns its refusals in a row.
    pub(crate) fn refused(&self, ip: IpAddr) -> u32 {
        let now = Instant::now();
        let mut map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= KEY_ADDRESSES && !map.contains_key(&ip) {
            map.retain(|_, r| now.duration_since(r.last) < KEY_FORGET);
            if map.len() >= KEY_ADDRESSES {
                let oldest = map.iter().min_by_key(|(_, r)| r.last).map(|(ip, _)| *ip);
                oldest.map(|ip| map.remove(&ip));
            }
        }
        let r = map.entry(ip).or_insert(Refusals {
            count: 0,
            last: now,
            until: now,
        });
        if now.duration_since(r.last) >= KEY_FORGET {
            r.count = 0;
        }
        r.count += 1;
        r.last = now;
        if r.count > KEY_FREE {
            let doublings = (r.count - KEY_FREE - 1).min(16);
            r.until = now + (KEY_BLOCK_FIRST * 2u32.pow(doublings)).min(KEY_BLOCK_MAX);
        }
        r.count
    }

    /// A key from `ip` was accepted: its count starts again.
    pub(crate) fn accepted(&self, ip: IpAddr) {
        let mut map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&ip);
    }
}

/// `PGWS_ALLOWED_ORIGINS`: the `Origin` values a handshake may carry. A handshake without an
/// `Origin` header (not a browser) is not concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins(Option<Vec<String>>);

impl Origins {
    /// A comma list of origins (`https://app.example`), or `*` / empty for any.
    pub fn parse(text: &str) -> Self {
        let list: Vec<String> = text
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
            .filter(|o| !o.is_empty())
            .collect();
        if list.is_empty() || list.iter().any(|o| o == "*") {
            Self(None)
        } else {
            Self(Some(list))
        }
    }

    /// Whether a handshake with this `Origin` header may proceed.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        match (&self.0, origin) {
            (None, _) | (_, None) => true,
            (Some(list), Some(origin)) => {
                let origin = origin.trim_end_matches('/').to_ascii_lowercase();
                list.contains(&origin)
            }
        }
    }
}

/// A token bucket: `rate` messages per second on average, bursts of up to `rate` (at least 1).
#[derive(Debug)]
pub(crate) struct Rate {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Rate {
    pub(crate) fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            tokens: rate,
            at: Instant::now(),
        }
    }

    /// Takes one message's token; false when the socket is over its rate.
    pub(crate) fn take(&mut self) -> bool {
        self.take_n(1)
    }

    /// Takes `n` tokens at once, or none; false when that is over the rate.
    pub(crate) fn take_n(&mut self, n: usize) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.rate);
        self.at = now;
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn slots_are_counted_per_address_and_released() {
        let limit = PerAddress::new(Some(2));
        let ip: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        let a = limit.acquire(ip).expect("first");
        let _b = limit.acquire(ip).expect("second");
        assert!(limit.acquire(ip).is_none());
        assert!(limit.acquire(other).is_some());
        drop(a);
        assert!(limit.acquire(ip).is_some());
        assert!(PerAddress::new(None).acquire(ip).is_none());
        assert!(!PerAddress::new(None).enabled());
    }

    #[test]
    fn origins() {
        let o = Origins::parse("https://app.example, http://localhost:3000/");
        assert!(o.allows(Some("https://APP.example")));
        assert!(o.allows(Some("http://localhost:3000")));
        assert!(!o.allows(Some("https://evil.example")));
        assert!(o.allows(None));
        assert!(Origins::parse("").allows(Some("https://evil.example")));
        assert!(Origins::parse("*").allows(Some("https://evil.example")));
    }

    #[tokio::test]
    async fn refused_keys_make_an_address_wait_longer_each_time() {
        let keys = KeyRefusals::default();
        let ip: IpAddr = [10, 0, 0, 1].into();
        assert_eq!(keys.waiting(ip), None);
        assert_eq!(keys.refused(ip), 1);
        assert_eq!(keys.refused(ip), 2);
        assert_eq!(keys.waiting(ip), None, "two refusals are free");
        keys.refused(ip);
        let first = keys.waiting(ip).expect("waits");
        assert!(first <= KEY_BLOCK_FIRST && first > KEY_BLOCK_FIRST / 2);
        keys.refused(ip);
        assert!(keys.waiting(ip).expect("waits") > KEY_BLOCK_FIRST);
        for _ in 0..40 {
            keys.refused(ip);
        }
        assert!(keys.waiting(ip).expect("waits") <= KEY_BLOCK_MAX);
        assert_eq!(keys.waiting([10, 0, 0, 2].into()), None, "per address");
        keys.accepted(ip);
        assert_eq!(keys.waiting(ip), None);
    }

    #[tokio::test]
    async fn the_bucket_refills_at_the_rate() {
        let mut r = Rate::new(10);
        for _ in 0..10 {
            assert!(r.take());
        }
        assert!(!r.take());
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(r.take());
        assert!(!r.take());
    }
}
