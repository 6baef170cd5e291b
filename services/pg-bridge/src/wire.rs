//! The LISTEN connection's socket: opened here (TCP or Unix, each host of the URI in turn) and
//! read through [`Mended`], which makes every notification valid UTF-8 before tokio-postgres
//! parses it.
//!
//! A database whose encoding is `SQL_ASCII` passes payload bytes through unchecked, so any
//! database user can `NOTIFY` bytes that are not UTF-8. With a UTF-8 client encoding the
//! server then fails the session as it sends the notification, and tokio-postgres would fail
//! the connection on one it received: either way every channel would lose the notifications
//! sent while the leader reconnects. So on such a database the LISTEN session asks for
//! `client_encoding = SQL_ASCII` (the bytes as they are, see `leader.rs`), and the bytes of a notification's channel and payload
//! that are not UTF-8 are replaced with U+FFFD (as `String::from_utf8_lossy` does): the
//! notification is delivered, counted and logged, and the connection goes on.
//!
//! Everything else passes through unchanged: the stream splits the backend's messages by their
//! headers (a type byte and a big-endian length), holds only a notification until it is whole
//! (bounded by [`MAX_NOTIFICATION`]) and copies other messages through as they come.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use pgws_service::prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::Host;
use tokio_postgres::Config;

/// A notification larger than this passes through as it is (PostgreSQL's own limit on a
/// payload is under 8000 bytes and a channel name under 64).
const MAX_NOTIFICATION: usize = 1 << 20;
/// The backend message type of a notification (`NotificationResponse`).
const NOTIFICATION: u8 = b'A';

/// A socket to PostgreSQL.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Opens a socket to the first host of `config` that answers, each attempt bounded by the
/// configured connect timeout.
pub(crate) async fn open(config: &Config) -> io::Result<Box<dyn Io>> {
    let hosts = config.get_hosts();
    let ports = config.get_ports();
    let wait = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(10));
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no host in the database URI");
    for (i, host) in hosts.iter().enumerate() {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let attempt = async {
            match host {
                Host::Tcp(name) => {
                    let stream = TcpStream::connect((name.as_str(), port)).await?;
                    stream.set_nodelay(true)?;
                    if config.get_keepalives() {
                        let keepalive =
                            socket2::TcpKeepalive::new().with_time(config.get_keepalives_idle());
                        socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
                    }
                    Ok(Box::new(stream) as Box<dyn Io>)
                }
                Host::Unix(dir) => {
                    let path = dir.join(format!(".s.PGSQL.{port}"));
                    Ok(Box::new(UnixStream::connect(path).await?) as Box<dyn Io>)
                }
            }
        };
        match tokio::time::timeout(wait, attempt).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = e,
            Err(_) => last = io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
        }
    }
    Err(last)
}

/// A stream from PostgreSQL whose notifications are always valid UTF-8.
pub(crate) struct Mended<S> {
    inner: S,
    /// Bytes read and not yet split into messages.
    input: BytesMut,
    /// Bytes ready for the reader.
    output: BytesMut,
    /// What is left of a message being copied through.
    passing: usize,
    /// Notifications whose bytes were replaced.
    mended: Counter,
    /// When that was last logged (at most once per [`LOG_EVERY`]).
    logged: Option<Instant>,
}

/// How often mended notifications are logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

impl<S> Mended<S> {
    pub(crate) fn new(inner: S, mended: Counter) -> Self {
        Self {
            inner,
            input: BytesMut::new(),
            output: BytesMut::new(),
            passing: 0,
            mended,
            logged: None,
        }
    }

    /// Moves what `input` holds into `output`, message by message, as far as it can.
    fn split(&mut self) {
        loop {
            if self.passing > 0 {
                let n = self.passing.min(self.input.len());
                if n == 0 {
                    return;
                }
                self.output.extend_from_slice(&self.input.split_to(n));
                self.passing -= n;
                continue;
            }
            if self.input.len() < 5 {
                return;
            }
            let kind = self.input[0];
            let len =
                u32::from_be_bytes([self.input[1], self.input[2], self.input[3], self.input[4]])
                    as usize;
            let whole = len.saturating_add(1);
            if kind != NOTIFICATION || whole > MAX_NOTIFICATION {
                self.passing = whole;
                continue;
            }
            if self.input.len() < whole {
                return;
            }
            let message = self.input.split_to(whole);
            match mend(&message) {
                None => self.output.extend_from_slice(&message),
                Some(fixed) => {
                    self.mended.inc();
                    if self.logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                        self.logged = Some(Instant::now());
                        tracing::warn!(
                            total = self.mended.get(),
                            "a notification that is not valid UTF-8 (a SQL_ASCII database?) is delivered with its invalid bytes replaced by U+FFFD (logged at most every 10 s)"
                        );
                    }
                    self.output.extend_from_slice(&fixed);
                }
            }
        }
    }
}

/// A `NotificationResponse` (`message`, whole) rewritten with its channel and payload made
/// valid UTF-8; `None` when it already is, or is not shaped as one (tokio-postgres decides).
fn mend(message: &[u8]) -> Option<Vec<u8>> {
    let body = message.get(9..)?;
    let pid = &message[5..9];
    let mut parts = body.splitn(3, |b| *b == 0);
    let (channel, payload) = (parts.next()?, parts.next()?);
    if std::str::from_utf8(channel).is_ok() && std::str::from_utf8(payload).is_ok() {
        return None;
    }
    let channel = String::from_utf8_lossy(channel);
    let payload = String::from_utf8_lossy(payload);
    let len = 4 + 4 + channel.len() + 1 + payload.len() + 1;
    let mut out = Vec::with_capacity(len + 1);
    out.put_u8(NOTIFICATION);
    out.put_u32(u32::try_from(len).ok()?);
    out.extend_from_slice(pid);
    out.extend_from_slice(channel.as_bytes());
    out.put_u8(0);
    out.extend_from_slice(payload.as_bytes());
    out.put_u8(0);
    Some(out)
}

impl<S: AsyncRead + Unpin> AsyncRead for Mended<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut part = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
            if part.filled().is_empty() {
                // End of stream: whatever is left goes to the reader as it is.
                this.output = this.input.split();
                this.passing = 0;
                if this.output.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.input.extend_from_slice(part.filled());
            this.split();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Mended<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&u32::try_from(body.len() + 4).expect("small").to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn notification(channel: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut body = 7i32.to_be_bytes().to_vec();
        body.extend_from_slice(channel);
        body.push(0);
        body.extend_from_slice(payload);
        body.push(0);
        message(NOTIFICATION, &body)
    }

    /// What a reader gets from `input` through [`Mended`], reading `step` bytes at a time.
    async fn through(input: Vec<u8>, step: usize) -> (Vec<u8>, u64) {
        let counter = Counter::default();
        let mut stream = Mended::new(input.as_slice(), counter.clone());
        let mut out = Vec::new();
        let mut buf = vec![0u8; step];
        loop {
            let n = stream.read(&mut buf).await.expect("reads");
            if n == 0 {
                return (out, counter.get());
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn only_invalid_notifications_change() {
        let big = message(b'D', &vec![0xff; 20_000]);
        let mut input = message(b'Z', b"I");
        input.extend(notification(b"chat", b"fine \xc3\xa9"));
        input.extend(&big);
        input.extend(notification(b"chat", b"A\xffB"));
        input.extend(message(b'Z', b"I"));
        let mut expected = message(b'Z', b"I");
        expected.extend(notification(b"chat", b"fine \xc3\xa9"));
        expected.extend(&big);
        expected.extend(notification(b"chat", "A\u{fffd}B".as_bytes()));
        expected.extend(message(b'Z', b"I"));
        for step in [1, 3, 5, 64, 100_000] {
            assert_eq!(
                through(input.clone(), step).await,
                (expected.clone(), 1),
                "{step}"
            );
        }
        // A stream cut inside a message ends with what it had.
        let cut = input[..input.len() - 3].to_vec();
        let (out, _) = through(cut, 7).await;
        assert_eq!(out, expected[..expected.len() - 3]);
    }
}
