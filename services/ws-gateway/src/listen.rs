//! `PGWS_HOST` with the meaning postgres-websockets gives it.
//!
//! postgres-websockets hands `PGWS_HOST` to warp, which reads it as a host preference
//! (streaming-commons' `HostPreference`): `*` any address, IPv4 or IPv6; `*4` any, IPv4
//! preferred; `!4` IPv4 only; `*6` any, IPv6 preferred; `!6` IPv6 only; anything else a host
//! name or an IP address. Its own `sample-env` sets `*4`, so an env file written for it only
//! starts the gateway unchanged if the same values are accepted here, with the same meaning.
//!
//! A host name is resolved when the configuration is read: a name that does not resolve is a
//! configuration problem listed with the others, not a failure once the service is running.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

use tokio::net::{TcpListener, TcpSocket};

/// Connections the kernel queues before `accept` (what tokio's own `TcpListener::bind` asks).
const BACKLOG: u32 = 1024;

/// Where the websocket listener binds (`PGWS_HOST`, `PGWS_PORT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr {
    /// `PGWS_HOST` as given, for messages.
    host: String,
    port: u16,
    target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// `*`, `*6`: `[::]` dual-stack, `0.0.0.0` on a host without IPv6.
    Any,
    /// `*4`, `!4`: `0.0.0.0`.
    Ipv4,
    /// `!6`: `[::]` with `IPV6_V6ONLY`.
    Ipv6Only,
    /// A host name or an IP address, resolved; the first address that binds is used.
    Resolved(Vec<SocketAddr>),
}

/// `PGWS_HOST` is neither a host preference nor a name or address that resolves.
#[derive(Debug)]
pub struct HostError(io::Error);

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "expected *, *4, !4, *6, !6, an IP address or a host name that resolves: {}",
            self.0
        )
    }
}

impl std::error::Error for HostError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl ListenAddr {
    /// Reads `PGWS_HOST` (`host`) for `port`, resolving a host name now.
    pub fn parse(host: &str, port: u16) -> Result<Self, HostError> {
        let host = host.trim();
        let target = match host {
            "*" | "*6" => Target::Any,
            "*4" | "!4" => Target::Ipv4,
            "!6" => Target::Ipv6Only,
            name => {
                // `[::1]` as well as `::1`.
                let bare = name
                    .strip_prefix('[')
                    .and_then(|n| n.strip_suffix(']'))
                    .unwrap_or(name);
                let addrs: Vec<SocketAddr> =
                    (bare, port).to_socket_addrs().map_err(HostError)?.collect();
                if addrs.is_empty() {
                    return Err(HostError(io::Error::new(
                        io::ErrorKind::NotFound,
                        "the name has no address",
                    )));
                }
                Target::Resolved(addrs)
            }
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            target,
        })
    }

    /// `0.0.0.0` on `port`: any IPv4 address, the default (as postgres-websockets' `*4`).
    pub fn any_ipv4(port: u16) -> Self {
        Self {
            host: Ipv4Addr::UNSPECIFIED.to_string(),
            port,
            target: Target::Resolved(vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))]),
        }
    }

    /// `PGWS_PORT`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Binds the listener (inside a tokio runtime).
    pub fn bind(&self) -> io::Result<TcpListener> {
        let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, self.port));
        let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, self.port));
        match &self.target {
            Target::Ipv4 => bind(v4, false),
            Target::Ipv6Only => bind(v6, true),
            Target::Any => match bind(v6, false) {
                Ok(listener) => Ok(listener),
                // A port taken or not allowed would be the same on IPv4: only a missing IPv6
                // stack falls back.
                Err(e)
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied
                    ) =>
                {
                    tracing::warn!(error = %e, "no IPv6 on this host: listening on IPv4 only");
                    bind(v4, false)
                }
                Err(e) => Err(e),
            },
            Target::Resolved(addrs) => {
                let mut last = None;
                for &addr in addrs {
                    match bind(addr, false) {
                        Ok(listener) => return Ok(listener),
                        Err(e) => {
                            tracing::debug!(%addr, error = %e, "bind failed, trying the next address");
                            last = Some(e);
                        }
                    }
                }
                Err(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::AddrNotAvailable, "no address to bind")
                }))
            }
        }
    }
}

/// `[::1]:3000`, `*4:3000`, `localhost:3000`.
impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') && !self.host.starts_with('[') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One listening socket; an IPv6 one takes IPv4 too unless `v6_only` (set either way, not left
/// to the host's `net.ipv6.bindv6only`).
fn bind(addr: SocketAddr, v6_only: bool) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv6() {
        let socket = TcpSocket::new_v6()?;
        socket2::SockRef::from(&socket).set_only_v6(v6_only)?;
        socket
    } else {
        TcpSocket::new_v4()?
    };
    // As tokio's `TcpListener::bind`: a restart does not wait for old connections' TIME_WAIT.
    if cfg!(unix) {
        socket.set_reuseaddr(true)?;
    }
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: &str) -> Target {
        ListenAddr::parse(host, 3000).expect("accepted").target
    }

    #[test]
    fn host_preferences_mean_what_they_mean_in_postgres_websockets() {
        assert_eq!(target("*"), Target::Any);
        assert_eq!(target("*6"), Target::Any);
        assert_eq!(target("*4"), Target::Ipv4);
        assert_eq!(target("!4"), Target::Ipv4);
        assert_eq!(target("!6"), Target::Ipv6Only);
        assert_eq!(target(" *4 "), Target::Ipv4);
    }

    #[test]
    fn addresses_and_names_are_resolved_when_read() {
        let one = |a: SocketAddr| Target::Resolved(vec![a]);
        assert_eq!(target("127.0.0.1"), one(([127, 0, 0, 1], 3000).into()));
        assert_eq!(target("0.0.0.0"), one(([0, 0, 0, 0], 3000).into()));
        let v6: SocketAddr = "[::1]:3000".parse().expect("address");
        assert_eq!(target("::1"), one(v6));
        assert_eq!(target("[::1]"), one(v6));
        let Target::Resolved(local) = target("localhost") else {
            panic!("localhost is a name");
        };
        assert!(local
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 3000));
        assert_eq!(ListenAddr::any_ipv4(3000).target, target("0.0.0.0"));
    }

    #[test]
    fn a_name_that_does_not_resolve_is_refused() {
        for host in ["no-such-host.invalid", "*5", "!", "1.2.3.4.5", "[::1"] {
            let e = ListenAddr::parse(host, 3000).expect_err(host);
            assert!(e.to_string().starts_with("expected *, *4"), "{host}: {e}");
        }
    }

    #[test]
    fn displayed_as_given() {
        let shown = |h: &str| ListenAddr::parse(h, 80).expect("accepted").to_string();
        assert_eq!(shown("*4"), "*4:80");
        assert_eq!(shown("::1"), "[::1]:80");
        assert_eq!(shown("[::1]"), "[::1]:80");
        assert_eq!(ListenAddr::any_ipv4(80).to_string(), "0.0.0.0:80");
    }

    /// Whether something accepts TCP connections at `addr`.
    async fn reachable(addr: SocketAddr) -> bool {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    }

    fn has_ipv6() -> bool {
        std::net::TcpListener::bind("[::1]:0").is_ok()
    }

    #[tokio::test]
    async fn any_takes_ipv4_and_ipv6() -> io::Result<()> {
        let listener = ListenAddr::parse("*", 0).expect("accepted").bind()?;
        let port = listener.local_addr()?.port();
        assert!(reachable(([127, 0, 0, 1], port).into()).await);
        if has_ipv6() {
            assert!(listener.local_addr()?.is_ipv6());
            assert!(reachable((Ipv6Addr::LOCALHOST, port).into()).await);
        }
        Ok(())
    }

    #[tokio::test]
    async fn ipv4_only_and_ipv6_only_keep_to_their_family() -> io::Result<()> {
        let v4 = ListenAddr::parse("*4", 0).expect("accepted").bind()?;
        let port = v4.local_addr()?.port();
        assert!(v4.local_addr()?.is_ipv4());
        assert!(reachable(([127, 0, 0, 1], port).into()).await);
        if !has_ipv6() {
            return Ok(());
        }
        assert!(!reachable((Ipv6Addr::LOCALHOST, port).into()).await);
        let v6 = ListenAddr::parse("!6", 0).expect("accepted").bind()?;
        let port = v6.local_addr()?.port();
        assert!(reachable((Ipv6Addr::LOCALHOST, port).into()).await);
        assert!(!reachable(([127, 0, 0, 1], port).into()).await);
        Ok(())
    }

    #[tokio::test]
    async fn a_name_binds_its_first_address() -> io::Result<()> {
        let listener = ListenAddr::parse("localhost", 0)
            .expect("accepted")
            .bind()?;
        let addr = listener.local_addr()?;
        assert!(addr.ip().is_loopback());
        assert!(reachable(addr).await);
        Ok(())
    }
}
