//! Token keys from a JWKS URL (`PGWS_JWKS_URL`): fetched at start, refreshed on a schedule and
//! when a token names a key id the current set lacks, so keys rotate without a restart.
//!
//! The keys live in a [`KeySet`] that the `Authorizer` reads at every handshake; this module
//! only fetches and installs documents. A failed or garbled fetch keeps the last good set (a
//! warning and `pgws_gateway_jwks_refresh_failures_total`). Everything from the endpoint is
//! bounded: [`FETCH_TIMEOUT`] per fetch, [`MAX_JWKS_BYTES`] per document (a longer body is
//! not read further), [`pgws_auth::MAX_JWKS_KEYS`] keys, no redirects. A token with an unknown
//! `kid` starts at most one refresh per [`KID_REFRESH_INTERVAL`] (others with unknown kids
//! meanwhile wait for that refresh, or are refused at once after it), and its handshake waits
//! for it at most [`KID_REFRESH_WAIT`]: a flood of made-up kids costs the endpoint one request
//! per interval and the handshakes a bounded delay.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgws_auth::{Authorizer, KeySet, MAX_JWKS_BYTES};
use pgws_service::Shutdown;
use reqwest::header::{HeaderMap, ACCEPT, CACHE_CONTROL};
use reqwest::Url;
use tokio::sync::{watch, Notify};

use crate::metrics::GatewayMetrics;

/// The longest a fetch may take, connection and whole body included.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Fetches tried at start before the gateway gives up (1 s, then 2 s apart).
const START_ATTEMPTS: u32 = 3;
/// At most one refresh for unknown key ids per this period.
pub(crate) const KID_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// The longest a handshake waits for a refresh that might bring its token's key.
pub(crate) const KID_REFRESH_WAIT: Duration = Duration::from_secs(2);
/// The shortest schedule a `Cache-Control: max-age` may ask for.
const MIN_MAX_AGE: Duration = Duration::from_secs(10);
/// After a failed refresh, the next one comes this soon (or at the schedule, if sooner).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// Where the token keys come from when they are fetched.
#[derive(Debug, Clone)]
pub struct JwksConfig {
    /// `PGWS_JWKS_URL`: http or https.
    pub url: Url,
    /// `PGWS_JWKS_REFRESH`: the longest time between two fetches (a shorter
    /// `Cache-Control: max-age` of the response wins).
    pub refresh: Duration,
    /// The keys the gateway's `Authorizer` verifies with.
    pub keys: Arc<KeySet>,
}

impl JwksConfig {
    /// Checks a `PGWS_JWKS_URL` value: an absolute http or https URL with a host.
    pub(crate) fn parse_url(text: &str) -> Result<Url, String> {
        let url = Url::parse(text.trim()).map_err(|e| format!("not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("scheme {:?}: only http and https", url.scheme()));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("no host".to_owned());
        }
        Ok(url)
    }
}

/// The URL as logs show it: without user, password, query or fragment (they may hold
/// credentials).
fn shown(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{}://{host}:{port}{}", url.scheme(), url.path()),
        None => format!("{}://{host}{}", url.scheme(), url.path()),
    }
}

/// What fetches a refresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    Start,
    Schedule,
    UnknownKid,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::Schedule => "schedule",
            Trigger::UnknownKid => "unknown_kid",
        }
    }
}

/// The fetcher of one JWKS URL and the refreshes that tokens with unknown key ids ask for.
pub(crate) struct Jwks {
    config: JwksConfig,
    client: reqwest::Client,
    gate: Mutex<KidGate>,
    /// Wakes the refresher for an unknown-kid refresh.
    wake: Notify,
    /// The number of the last refresh that finished (see [`KidGate`]).
    finished: watch::Sender<u64>,
    metrics: GatewayMetrics,
}

impl Jwks {
    /// Fetches the keys (a few attempts; the gateway does not start without them), then keeps
    /// them fresh in a task of `shutdown`.
    pub(crate) async fn start(
        config: JwksConfig,
        metrics: GatewayMetrics,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Arc<Jwks>> {
        let jwks = Arc::new(Jwks {
            client: client()?,
            gate: Mutex::new(KidGate::new(KID_REFRESH_INTERVAL)),
            wake: Notify::new(),
            finished: watch::Sender::new(0),
            metrics,
            config,
        });
        let url = shown(&jwks.config.url);
        let mut attempt = 1;
        let max_age = loop {
            let outcome = tokio::select! {
                outcome = jwks.refresh(Trigger::Start) => outcome,
                () = shutdown.token.cancelled() => bail!("stopped while fetching the JWKS"),
            };
            match outcome {
                Ok(max_age) => break max_age,
                Err(e) if attempt >= START_ATTEMPTS => {
                    return Err(e).with_context(|| {
                        format!("fetching the JWKS from {url} ({START_ATTEMPTS} attempts)")
                    });
                }
                Err(e) => {
                    tracing::warn!(
                        url,
                        attempt,
                        error = format!("{e:#}"),
                        "jwks fetch failed, retrying"
                    );
                }
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))) => {}
                () = shutdown.token.cancelled() => bail!("stopped while fetching the JWKS"),
            }
            attempt += 1;
        };
        tracing::info!(url, keys = jwks.config.keys.len(), "jwks fetched");
        let refresher = Arc::clone(&jwks);
        let token = shutdown.token.clone();
        shutdown.spawn(async move {
            tokio::select! {
                () = refresher.refresh_loop(max_age) => {}
                () = token.cancelled() => {}
            }
        });
        Ok(jwks)
    }

    /// Before `token` is verified: when it names a key id the current set lacks, asks for a
    /// refresh (at most one per [`KID_REFRESH_INTERVAL`]) and waits for it at most
    /// [`KID_REFRESH_WAIT`]. Verification then uses whatever keys are current.
    pub(crate) async fn settle(&self, authorizer: &Authorizer, token: &str) {
        if authorizer.unknown_kid(token).is_none() {
            return;
        }
        let decision = self.gate().unknown_kid(Instant::now());
        match decision {
            KidDecision::Throttled => {
                tracing::debug!("token names an unknown key id; refreshed recently");
                self.metrics.jwks_throttled.inc();
            }
            KidDecision::Wait { refresh, wake } => {
                tracing::debug!(refresh, "token names an unknown key id; refreshing");
                let mut finished = self.finished.subscribe();
                if wake {
                    self.wake.notify_one();
                }
                // Past the wait the token is verified with the keys there are; the refresh
                // goes on for the tokens after it.
                drop(
                    tokio::time::timeout(KID_REFRESH_WAIT, finished.wait_for(|n| *n >= refresh))
                        .await,
                );
            }
        }
    }

    /// Refreshes on the schedule and when woken, until cancelled.
    async fn refresh_loop(&self, first_max_age: Option<Duration>) {
        let mut next = Instant::now() + self.next_after(Ok(first_max_age));
        loop {
            let trigger = tokio::select! {
                () = tokio::time::sleep_until(next.into()) => Trigger::Schedule,
                () = self.wake.notified() => Trigger::UnknownKid,
            };
            let number = self.gate().begin();
            let outcome = self.refresh(trigger).await;
            if let Err(e) = &outcome {
                tracing::warn!(
                    url = shown(&self.config.url),
                    trigger = trigger.label(),
                    error = format!("{e:#}"),
                    "jwks refresh failed, keeping the last good keys"
                );
            }
            self.gate().end(number);
            self.finished.send_replace(number);
            next = Instant::now() + self.next_after(outcome.as_ref().map(|m| *m));
        }
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, KidGate> {
        self.gate.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The time to the next scheduled refresh after one that succeeded with this `max-age`, or
    /// failed.
    fn next_after(&self, outcome: Result<Option<Duration>, &anyhow::Error>) -> Duration {
        let refresh = self.config.refresh;
        match outcome {
            Ok(None) => refresh,
            Ok(Some(max_age)) => refresh.min(max_age.max(MIN_MAX_AGE)),
            Err(_) => refresh.min(RETRY_AFTER_FAILURE),
        }
    }

    /// One fetch: installs a good document and returns its `max-age`; counts the outcome.
    async fn refresh(&self, trigger: Trigger) -> anyhow::Result<Option<Duration>> {
        let outcome = async {
            let (document, max_age) = fetch(&self.client, &self.config.url).await?;
            let keys = self.config.keys.install(&document)?;
            Ok((keys, max_age))
        }
        .await;
        match outcome {
            Ok((keys, max_age)) => {
                let m = &self.metrics;
                m.jwks_refreshes
                    .get_or_create(&[("trigger", trigger.label())])
                    .inc();
                m.jwks_keys.set(keys as i64);
                m.jwks_updated.set(unix_secs());
                tracing::debug!(keys, trigger = trigger.label(), "jwks refreshed");
                Ok(max_age)
            }
            Err(e) => {
                self.metrics.jwks_failures.inc();
                Err(e)
            }
        }
    }
}

fn unix_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The HTTP client: rustls (ring, the system's roots), no redirects, every fetch bounded.
fn client() -> anyhow::Result<reqwest::Client> {
    pgws_service::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(FETCH_TIMEOUT)
        .connect_timeout(FETCH_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("pgws-ws-gateway/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("building the JWKS HTTP client")
}

/// GETs the document: a 2xx answer of at most [`MAX_JWKS_BYTES`], and its `max-age`.
async fn fetch(client: &reqwest::Client, url: &Url) -> anyhow::Result<(Vec<u8>, Option<Duration>)> {
    let mut response = client
        .get(url.clone())
        .header(ACCEPT, "application/jwk-set+json, application/json")
        .send()
        .await
        .map_err(reqwest::Error::without_url)?;
    let status = response.status();
    if status.is_redirection() {
        bail!("HTTP status {status}: redirects are not followed, give the final URL");
    }
    if !status.is_success() {
        bail!("HTTP status {status}");
    }
    let too_big = || format!("the document is larger than {MAX_JWKS_BYTES} bytes");
    if response
        .content_length()
        .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
    {
        bail!(too_big());
    }
    let max_age = max_age(response.headers());
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(reqwest::Error::without_url)?
    {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            bail!(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, max_age))
}

/// The `max-age` of a `Cache-Control` header, if any.
fn max_age(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|directive| {
            let (name, value) = directive.trim().split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("max-age") {
                return None;
            }
            value.trim().trim_matches('"').parse().ok()
        })
        .map(Duration::from_secs)
}

/// Which refreshes tokens with unknown key ids get. Refreshes are numbered as they begin (one
/// at a time); a handshake waits until the refresh it needs has finished.
#[derive(Debug)]
struct KidGate {
    interval: Duration,
    /// When an unknown kid last asked for a refresh.
    asked_at: Option<Instant>,
    /// The number of the last refresh begun.
    begun: u64,
    /// The number of the last refresh finished.
    finished: u64,
    /// The refresh that unknown kids wait for: the first to begin after they asked.
    wanted: u64,
}

/// What a token with an unknown key id does.
#[derive(Debug, PartialEq, Eq)]
enum KidDecision {
    /// Wait for refresh number `refresh`; `wake`: this token asked for it.
    Wait { refresh: u64, wake: bool },
    /// A refresh ran within the interval and did not bring the key: no new one.
    Throttled,
}

impl KidGate {
    fn new(interval: Duration) -> KidGate {
        KidGate {
            interval,
            asked_at: None,
            begun: 0,
            finished: 0,
            wanted: 0,
        }
    }

    fn unknown_kid(&mut self, now: Instant) -> KidDecision {
        if self.wanted > self.finished {
            // Asked for and not finished yet: join it.
            return KidDecision::Wait {
                refresh: self.wanted,
                wake: false,
            };
        }
        if self
            .asked_at
            .is_some_and(|at| now.saturating_duration_since(at) < self.interval)
        {
            return KidDecision::Throttled;
        }
        self.asked_at = Some(now);
        // A refresh in flight began before the new key may have been published: the next one.
        self.wanted = self.begun + 1;
        KidDecision::Wait {
            refresh: self.wanted,
            wake: true,
        }
    }

    /// A refresh begins; its number.
    fn begin(&mut self) -> u64 {
        self.begun += 1;
        self.begun
    }

    /// Refresh `number` finished (well or not).
    fn end(&mut self, number: u64) {
        self.finished = number;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_kids_share_one_refresh_per_interval() {
        let t0 = Instant::now();
        let mut gate = KidGate::new(Duration::from_secs(10));
        let first = KidDecision::Wait {
            refresh: 1,
            wake: true,
        };
        assert_eq!(gate.unknown_kid(t0), first);
        // Until refresh 1 finishes, others wait for it without asking again.
        let joined = KidDecision::Wait {
            refresh: 1,
            wake: false,
        };
        assert_eq!(gate.unknown_kid(t0 + Duration::from_secs(1)), joined);
        let n = gate.begin();
        assert_eq!(n, 1);
        assert_eq!(gate.unknown_kid(t0 + Duration::from_secs(2)), joined);
        gate.end(n);
        // Finished and still unknown: refused at once until the interval has passed.
        assert_eq!(
            gate.unknown_kid(t0 + Duration::from_secs(3)),
            KidDecision::Throttled
        );
        assert_eq!(
            gate.unknown_kid(t0 + Duration::from_millis(9_999)),
            KidDecision::Throttled
        );
        assert_eq!(
            gate.unknown_kid(t0 + Duration::from_secs(10)),
            KidDecision::Wait {
                refresh: 2,
                wake: true
            }
        );
    }

    #[test]
    fn a_refresh_in_flight_is_not_the_one_waited_for() {
        let t0 = Instant::now();
        let mut gate = KidGate::new(Duration::from_secs(10));
        let scheduled = gate.begin();
        // It began before the token came: the token needs the next one.
        assert_eq!(
            gate.unknown_kid(t0),
            KidDecision::Wait {
                refresh: 2,
                wake: true
            }
        );
        gate.end(scheduled);
        assert_eq!(
            gate.unknown_kid(t0),
            KidDecision::Wait {
                refresh: 2,
                wake: false
            }
        );
        let asked = gate.begin();
        gate.end(asked);
        assert_eq!(gate.unknown_kid(t0), KidDecision::Throttled);
    }

    #[test]
    fn max_age_is_read_from_cache_control() {
        let mut h = HeaderMap::new();
        assert_eq!(max_age(&h), None);
        h.insert(
            CACHE_CONTROL,
            "public, max-age=600, must-revalidate".parse().unwrap(),
        );
        assert_eq!(max_age(&h), Some(Duration::from_secs(600)));
        h.insert(CACHE_CONTROL, "no-cache, MAX-AGE = \"42\"".parse().unwrap());
        assert_eq!(max_age(&h), Some(Duration::from_secs(42)));
        h.insert(CACHE_CONTROL, "max-age=soon".parse().unwrap());
        assert_eq!(max_age(&h), None);
    }

    #[test]
    fn urls_are_checked_and_shown_without_credentials() {
        assert!(JwksConfig::parse_url("https://idp.example/.well-known/jwks.json").is_ok());
        assert!(JwksConfig::parse_url("http://127.0.0.1:8080/keys").is_ok());
        for bad in [
            "ftp://idp.example/jwks",
            "idp.example/jwks",
            "file:///etc/jwks",
            "",
        ] {
            assert!(JwksConfig::parse_url(bad).is_err(), "{bad}");
        }
        let url = JwksConfig::parse_url("https://u:p@idp.example:8443/k?token=x#f").unwrap();
        assert_eq!(shown(&url), "https://idp.example:8443/k");
    }
}
