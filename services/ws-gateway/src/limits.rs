//! Limits on what one client can take from a gateway: open websockets and handshakes in
//! progress per source address, the origins browsers may connect from, and the rate of
//! messages per socket.
//!
//! All are off by default (postgres-websockets had none, and a load balancer or a load test
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
