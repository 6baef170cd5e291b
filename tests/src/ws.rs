//! A websocket client and a minimal HTTP GET, both over real sockets.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A connected websocket.
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The subprotocol the server selected.
    pub protocol: Option<String>,
}

impl WsClient {
    /// Connects to `url`.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        Self::connect_with(url, &[]).await
    }

    /// Connects to `url` with extra request headers.
    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut req = url.into_client_request()?;
        for (k, v) in headers {
            req.headers_mut()
                .insert(http_name(k)?, v.parse().context("header value")?);
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, resp)) => Ok(Self {
                ws,
                protocol: resp
                    .headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            }),
            Err(WsError::Http(resp)) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                bail!("refused {}: {body}", resp.status().as_u16())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// What a handshake at `url` got: `"accepted"`, or `"refused <status>: <body>"` (or the
    /// connection error).
    pub async fn refusal(url: &str, headers: &[(&str, &str)]) -> String {
        match Self::connect_with(url, headers).await {
            Ok(_) => "accepted".to_owned(),
            Err(e) => e.to_string(),
        }
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.ws.send(Message::text(text)).await?;
        Ok(())
    }

    /// Sends a text frame holding exactly `bytes`, UTF-8 or not (as a broken client could).
    pub async fn send_raw_text(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;
        let frame = Frame::message(bytes.to_vec(), OpCode::Data(Data::Text), true);
        self.ws.send(Message::Frame(frame)).await?;
        Ok(())
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.ws.send(Message::binary(data.to_vec())).await?;
        Ok(())
    }

    /// The next text frame, skipping pings, within `timeout`.
    pub async fn next_text(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Message::Text(t) = self.next_data(left).await? {
                return Ok(t.as_str().to_owned());
            }
        }
    }

    /// The next text or binary frame, skipping pings, within `timeout`.
    pub async fn next_data(&mut self, timeout: Duration) -> anyhow::Result<Message> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .context("no message in time")?
                .context("socket closed")??;
            match msg {
                Message::Text(_) | Message::Binary(_) => return Ok(msg),
                Message::Close(c) => bail!("closed: {c:?}"),
                _ => continue,
            }
        }
    }

    /// The next text frame parsed as JSON.
    pub async fn next_json(&mut self, timeout: Duration) -> anyhow::Result<serde_json::Value> {
        let text = self.next_text(timeout).await?;
        serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))
    }

    /// The next frame of any kind (pings included), within `timeout`.
    pub async fn next_frame(&mut self, timeout: Duration) -> anyhow::Result<Message> {
        Ok(tokio::time::timeout(timeout, self.ws.next())
            .await
            .context("no frame in time")?
            .context("socket closed")??)
    }

    /// Reads until the socket ends: `Some` close frame's code and reason, or `None` when the
    /// connection ended without one (the server gave up a client that did not read).
    pub async fn expect_end(&mut self, timeout: Duration) -> anyhow::Result<Option<(u16, String)>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .context("the socket did not end in time")?;
            match msg {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return Ok(Some((
                        u16::from(frame.code),
                        frame.reason.as_str().to_owned(),
                    )))
                }
                Some(Ok(Message::Close(None))) => {
                    return Ok(Some((u16::from(CloseCode::Status), String::new())))
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Ok(None),
            }
        }
    }

    /// Waits for the server's close frame and returns its code and reason.
    pub async fn expect_close(&mut self, timeout: Duration) -> anyhow::Result<(u16, String)> {
        self.expect_end(timeout)
            .await?
            .context("socket ended without a close frame")
    }
}

fn http_name(name: &str) -> anyhow::Result<tokio_tungstenite::tungstenite::http::HeaderName> {
    Ok(name.parse()?)
}

/// `GET path` over HTTP/1.1; returns status and body (a chunked body decoded).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("truncated chunk size")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .context("bad chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).context("truncated chunk")?);
        body = rest
            .get(size..)
            .and_then(|r| r.strip_prefix("\r\n"))
            .context("a chunk without its line end")?;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunked_bodies_are_decoded() {
        let body = "4\r\n{\"a\"\r\n5\r\n: 1}\n\r\n0\r\n\r\n";
        assert_eq!(super::dechunk(body).ok().as_deref(), Some("{\"a\": 1}\n"));
        assert!(super::dechunk("5\r\nab").is_err());
    }
}
