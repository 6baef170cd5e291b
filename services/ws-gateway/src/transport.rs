//! The TCP connection under a client's requests and websocket, with one power a plain stream
//! lacks: it can be reset instead of closed.
//!
//! A socket given up because its client stopped reading (or stopped answering pings) still has
//! bytes in the kernel's send buffer. A plain close keeps them, and the connection in
//! FIN-WAIT-1, until TCP gives up on the peer, which can take many minutes of zero-window
//! probes: a client that never reads would hold kernel memory long after its socket's task is
//! gone. [`Reset::arm`] makes the close that follows an abort instead (`SO_LINGER` 0): the
//! kernel drops the unsent bytes and the connection at once, and the client sees the
//! connection reset. Normal closes are untouched: they are graceful, with everything written.
//!
//! It also reads ahead for its reader without holding a buffer while idle. The websocket reads
//! in small steps (its own buffer is small, since every socket keeps it): such a read takes
//! what the kernel has, up to [`READ_AHEAD`] bytes, into a buffer of the thread's, and keeps
//! what the reader did not take in an allocation that lives only until it is read. A busy
//! socket makes one system call per [`READ_AHEAD`] bytes; an idle one holds nothing.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Asks for a connection to be reset when it is dropped. Cloned into the request's extensions
/// so that the websocket task holding the connection (through hyper's upgrade) can arm it.
#[derive(Clone, Default)]
pub(crate) struct Reset(Arc<AtomicBool>);

impl Reset {
    /// The connection is reset, not closed, when it is dropped.
    pub(crate) fn arm(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn armed(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Most bytes one read takes from the kernel; a read asking for at least this many goes
/// straight to the connection.
pub(crate) const READ_AHEAD: usize = 16 * 1024;

thread_local! {
    /// Where a small read lands first (one per worker thread).
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_AHEAD].into_boxed_slice());
}

/// An accepted TCP connection that resets itself on drop when its [`Reset`] is armed.
pub(crate) struct Conn {
    tcp: TcpStream,
    reset: Reset,
    /// Bytes read from the kernel that the reader has not taken yet, from `ahead_at`; empty
    /// (no allocation) once taken.
    ahead: Vec<u8>,
    ahead_at: usize,
}

impl Conn {
    /// Wraps `tcp`; the returned [`Reset`] arms it.
    pub(crate) fn new(tcp: TcpStream) -> (Self, Reset) {
        let reset = Reset::default();
        let conn = Self {
            tcp,
            reset: reset.clone(),
            ahead: Vec::new(),
            ahead_at: 0,
        };
        (conn, reset)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.reset.armed() {
            // The close that follows (dropping `tcp`) sends a RST and frees the buffers.
            if let Err(e) = socket2::SockRef::from(&self.tcp).set_linger(Some(Duration::ZERO)) {
                tracing::debug!(error = %e, "cannot set SO_LINGER to reset a connection");
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.ahead_at < this.ahead.len() {
            let n = buf.remaining().min(this.ahead.len() - this.ahead_at);
            buf.put_slice(&this.ahead[this.ahead_at..this.ahead_at + n]);
            this.ahead_at += n;
            if this.ahead_at == this.ahead.len() {
                this.ahead = Vec::new();
                this.ahead_at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() == 0 || buf.remaining() >= READ_AHEAD {
            return Pin::new(&mut this.tcp).poll_read(cx, buf);
        }
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut read = ReadBuf::new(&mut scratch[..]);
            let ready = Pin::new(&mut this.tcp).poll_read(cx, &mut read);
            if let Poll::Ready(Ok(())) = ready {
                let got = read.filled();
                let n = buf.remaining().min(got.len());
                buf.put_slice(&got[..n]);
                if n < got.len() {
                    this.ahead = got[n..].to_vec();
                }
            }
            ready
        })
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Small reads get every byte in order, and nothing stays allocated once all is read.
    #[tokio::test]
    async fn small_reads_read_ahead_and_keep_nothing_once_read() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent: Vec<u8> = (0..3 * READ_AHEAD + 123).map(|i| (i % 251) as u8).collect();
        let data = sent.clone();
        let writer = tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(&data).await.unwrap();
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let (mut conn, _) = Conn::new(tcp);
        writer.await.unwrap();
        let mut got = Vec::new();
        let mut step = [0u8; 256];
        loop {
            let n = conn.read(&mut step).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&step[..n]);
            if got.len() == sent.len() {
                assert_eq!(
                    conn.ahead.capacity(),
                    0,
                    "read ahead kept after it was read"
                );
            }
        }
        assert_eq!(got, sent);
        assert_eq!(conn.ahead.capacity(), 0);
    }
}
