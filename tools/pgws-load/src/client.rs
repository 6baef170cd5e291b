//! Opening sockets: each bound to a 127.0.0.x source address before `connect` (so that more
//! sockets than one address's ephemeral ports can reach one gateway), closed with RST
//! (linger 0, no TIME_WAIT left behind), with small buffers; then the target's own
//! subscription step; then a receiving loop that records timestamps.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::args::{Mode, Opts, Target};
use crate::nats;
use crate::stats::RxStats;

/// A client websocket.
pub type Ws = WebSocketStream<TcpStream>;

/// Sockets per source address (each address has the whole ephemeral port range).
pub const PER_SOURCE_ADDRESS: u64 = 10_000;

/// A resolved gateway.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `ws://host:port` as given.
    pub base: String,
    /// Where to connect.
    pub addr: SocketAddr,
}

/// Resolves `ws://host:port`.
pub async fn resolve(base: &str) -> anyhow::Result<Endpoint> {
    let rest = base
        .strip_prefix("ws://")
        .with_context(|| format!("{base}: only ws:// URLs"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:80")
    };
    let addr = tokio::net::lookup_host(&hostport)
        .await
        .with_context(|| format!("resolving {hostport}"))?
        .find(SocketAddr::is_ipv4)
        .with_context(|| format!("{hostport} has no IPv4 address"))?;
    Ok(Endpoint {
        base: base.to_owned(),
        addr,
    })
}

/// Resolves every `--gateways` URL, in order.
pub async fn resolve_all(opts: &Opts) -> anyhow::Result<Vec<Endpoint>> {
    let mut eps = Vec::with_capacity(opts.gateways.len());
    for g in &opts.gateways {
        eps.push(resolve(g).await?);
    }
    Ok(eps)
}

/// A PostgreSQL connection to `--db-uri`, driven by a task of its own.
pub async fn postgres(opts: &Opts) -> anyhow::Result<tokio_postgres::Client> {
    let (db, conn) = tokio_postgres::connect(&opts.db_uri, tokio_postgres::NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::spawn(conn);
    Ok(db)
}

/// `name` as a quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The source address of global socket index `g`: 127.0.0.2, .3, ... every
/// [`PER_SOURCE_ADDRESS`] sockets. Only for loopback gateways; others use any address.
pub fn source_of(g: u64, to: &SocketAddr) -> Option<IpAddr> {
    if !to.ip().is_loopback() {
        return None;
    }
    let n = 2 + (g / PER_SOURCE_ADDRESS) % 250;
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n as u8)))
}

/// A plain TCP connection from `source` to `to`.
pub async fn tcp(to: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("binding to {ip}"))?;
    }
    // Linger 0: close sends RST and leaves no TIME_WAIT (a zero linger never blocks).
    #[allow(deprecated)]
    sock.set_linger(Some(Duration::ZERO))?;
    sock.set_nodelay(true)?;
    sock.set_recv_buffer_size(64 * 1024).ok();
    // A small send buffer: a writer that outruns the server blocks early instead of
    // spending the shared cores filling kernel buffers the server will not read for seconds.
    sock.set_send_buffer_size(64 * 1024).ok();
    let stream = sock
        .connect(to)
        .await
        .with_context(|| format!("connecting to {to}"))?;
    Ok(stream)
}

/// Websocket settings of receiving sockets: small read buffer, writes unbuffered.
pub fn small_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Opens `path` on `ep` from `source` and completes the websocket handshake.
pub async fn open(
    ep: &Endpoint,
    path: &str,
    source: Option<IpAddr>,
    config: WebSocketConfig,
) -> anyhow::Result<Ws> {
    let stream = tcp(ep.addr, source).await?;
    let url = format!("{}{}", ep.base, path);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .map_err(|e| anyhow::anyhow!("handshake: {e}"))?;
    Ok(ws)
}

/// An HS256 token for `claims`.
pub fn token(opts: &Opts, claims: &serde_json::Value) -> anyhow::Result<String> {
    let key = if opts.secret_base64 {
        use base64::Engine;
        let s = opts.secret.trim().replace('-', "+").replace('_', "/");
        let s = s.trim_end_matches('=');
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(s)
            .context("PGWS_JWT_SECRET is not base64")?
    } else {
        opts.secret.as_bytes().to_vec()
    };
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(&key),
    )?)
}

/// A subscribed socket, ready for [`receive`].
pub struct Subscribed {
    ws: Ws,
    parser: Option<nats::Parser>,
}

/// Sends the NATS opening (`CONNECT`, `SUB` to `subject` if given, `PING`) on `ws`, a
/// websocket to nats-server, and reads until its `PONG`.
pub async fn nats_handshake(ws: &mut Ws, subject: Option<&str>) -> anyhow::Result<nats::Parser> {
    ws.send(Message::binary(nats::opening_frame(subject)))
        .await?;
    let mut parser = nats::Parser::default();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .context("no PONG from nats-server")?;
        let data = match msg {
            Some(Ok(Message::Binary(b))) => b.to_vec(),
            Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
            Some(Ok(_)) => continue,
            Some(Err(e)) => bail!("nats websocket: {e}"),
            None => bail!("nats websocket closed"),
        };
        let fed = parser.feed(&data, |_| {});
        if let Some(e) = fed.error {
            bail!("nats-server: {e}");
        }
        if fed.pongs > 0 {
            return Ok(parser);
        }
    }
}

/// Opens global socket `g` of a receiving fleet and subscribes it to its channel: pgws
/// `/<channel>/<jwt>` (the handshake completes once subscribed), wspubsub (mode `pubsub`)
/// `/ws/sub/<domain>/<topic>`, node `/<channel>/<jwt>`, nats `CONNECT` + `SUB` + `PING`,
/// waiting for the `PONG`.
pub async fn subscribe(
    opts: &Opts,
    eps: &[Endpoint],
    token: &str,
    g: u64,
) -> anyhow::Result<Subscribed> {
    let ep = &eps[opts.gateway_of(g)];
    let channel = opts.channel_name(opts.channel_of(g));
    let source = source_of(g, &ep.addr);
    let path = match (opts.target, opts.mode) {
        (Target::Nats, _) => "/".to_owned(),
        (Target::Pgws, Mode::Pubsub) => format!("/ws/sub/{}/{channel}", opts.domain()),
        (Target::Pgws, _) if opts.resume => format!("/{channel}/{token}?resume="),
        _ => format!("/{channel}/{token}"),
    };
    let mut ws = open(ep, &path, source, small_config()).await?;
    let parser = match opts.target {
        Target::Nats => Some(nats_handshake(&mut ws, Some(&channel)).await?),
        Target::Pgws | Target::Node => None,
    };
    Ok(Subscribed { ws, parser })
}

/// Reads until the socket ends, recording every timestamped payload; answers NATS pings.
pub async fn receive(sub: Subscribed, stats: Arc<RxStats>, shard: usize) {
    let Subscribed { mut ws, mut parser } = sub;
    let mut last = None;
    while let Some(msg) = ws.next().await {
        let data = match msg {
            Ok(Message::Text(t)) => t.into(),
            Ok(Message::Binary(b)) => b,
            Ok(_) => continue, // pings are answered by tungstenite
            Err(_) => break,
        };
        match parser.as_mut() {
            None => stats.record(shard, &data, &mut last),
            Some(p) => {
                let fed = p.feed(&data, |m| stats.record(shard, m, &mut last));
                for _ in 0..fed.pings {
                    if ws.send(Message::binary(&b"PONG\r\n"[..])).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    stats.closed.fetch_add(1, Ordering::Relaxed);
}

/// The TCP port of `ws://host:port`.
pub fn port_of(base: &str) -> Option<u16> {
    let rest = base.strip_prefix("ws://")?;
    let hostport = rest.split('/').next()?;
    match hostport.rsplit_once(':') {
        Some((_, p)) => p.parse().ok(),
        None => Some(80),
    }
}

/// The processes under test: `--gateway-pid`, else those listening on the gateways' ports.
pub fn server_pids(opts: &Opts) -> Vec<u32> {
    if !opts.gateway_pids.is_empty() {
        return opts.gateway_pids.clone();
    }
    let mut pids: Vec<u32> = opts
        .gateways
        .iter()
        .filter_map(|g| port_of(g))
        .filter_map(crate::procfs::pid_listening_on)
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}
