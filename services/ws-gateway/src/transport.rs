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

/// An accepted TCP connection that resets itself on drop when its [`Reset`] is armed.
pub(crate) struct Conn {
    tcp: TcpStream,
    reset: Reset,
}

impl Conn {
    /// Wraps `tcp`; the returned [`Reset`] arms it.
    pub(crate) fn new(tcp: TcpStream) -> (Self, Reset) {
        let reset = Reset::default();
        let conn = Self {
            tcp,
            reset: reset.clone(),
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
        Pin::new(&mut self.tcp).poll_read(cx, buf)
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
