//! The edge under hostile input: long channel names, slow request headers, oversized frames.

use std::time::{Duration, Instant};

use pgws_tests::{token, Stack, WsClient};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_long_channel_name_is_refused_and_harms_no_other_socket() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut reader = stack.connect(0, "chat", &json!({"mode": "r"})).await?;
    let base = stack.ws_url(0);
    // A path channel with a token that names none (allowed, as in postgres-websockets).
    let long = "c".repeat(3000);
    let open = token(&json!({"mode": "rw"}));
    let refused = WsClient::refusal(&format!("{base}/{long}/{open}"), &[]).await;
    assert!(
        refused.contains("400") && refused.contains("1 to 63 bytes"),
        "{refused}"
    );
    // The same through the token's claims, and an empty name.
    for claims in [
        json!({"mode": "r", "channels": ["ok", "x".repeat(64)]}),
        json!({"mode": "r", "channel": ""}),
    ] {
        let refused = WsClient::refusal(&format!("{base}/{}", token(&claims)), &[]).await;
        assert!(refused.contains("400"), "{claims}: {refused}");
    }
    // 63 bytes is a valid name.
    let longest = "é".repeat(31) + "x";
    assert_eq!(longest.len(), 63);
    stack
        .connect(0, &longest.replace('é', "%C3%A9"), &json!({"mode": "r"}))
        .await?;
    // The gateway's other sockets still receive.
    let db = stack.pg().await?;
    let payload = json!({"channel": "chat", "n": 1}).to_string();
    stack.notify(&db, &payload).await?;
    assert_eq!(reader.next_text(T).await?, payload);
    Ok(())
}

#[tokio::test]
async fn half_sent_request_headers_do_not_hold_a_connection() -> anyhow::Result<()> {
    let mut stack = Stack::new();
    stack.add_bridge(&[]).await?;
    stack
        .add_gateway(&[("PGWS_HANDSHAKE_TIMEOUT", "1")])
        .await?;
    let addr = stack.gateways[0].addr.expect("gateway address");
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: web")
            .await?;
        slow.push(tcp);
    }
    let started = Instant::now();
    for mut tcp in slow {
        let mut buf = [0u8; 1024];
        // The server ends the connection (a 408 or a plain close), well before our 10 s.
        loop {
            match tokio::time::timeout(T, tcp.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => anyhow::bail!("a half-sent request was held for 10 s"),
            }
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

/// Opens a websocket by hand on `path` and returns the raw connection after the 101.
async fn raw_websocket(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(
            tcp.read(&mut byte).await? == 1,
            "closed during the handshake"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    anyhow::ensure!(head.starts_with("HTTP/1.1 101"), "{head}");
    Ok(tcp)
}

#[tokio::test]
async fn a_frame_over_the_limit_is_refused_from_its_header() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let addr = stack.gateways[0].addr.expect("gateway address");
    let open = token(&json!({"mode": "rw"}));
    let mut tcp = raw_websocket(addr, &format!("/chat/{open}")).await?;
    // A masked text frame announcing 16 MiB, followed by only 4 KiB of it.
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&(16u64 << 20).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend_from_slice(&[b'x'; 4096]);
    tcp.write_all(&frame).await?;
    let started = Instant::now();
    // The server answers with a close frame 1009 at once, not after 16 MiB.
    let mut reply = [0u8; 256];
    let n = tokio::time::timeout(T, tcp.read(&mut reply)).await??;
    assert!(n >= 4, "no close frame: {:?}", &reply[..n]);
    assert_eq!(reply[0], 0x88, "a close frame: {:?}", &reply[..n]);
    let code = u16::from_be_bytes([reply[2], reply[3]]);
    assert_eq!(code, 1009, "{:?}", String::from_utf8_lossy(&reply[4..n]));
    assert!(started.elapsed() < Duration::from_secs(2));
    Ok(())
}

/// A stack with a flowing default gateway (0) and a second gateway with `extra` (1).
async fn with_limited_gateway(extra: &[(&str, &str)]) -> anyhow::Result<Stack> {
    let mut stack = Stack::start().await?;
    stack.add_gateway(extra).await?;
    Ok(stack)
}

async fn refused(url: &str, headers: &[(&str, &str)]) -> String {
    WsClient::refusal(url, headers).await
}

#[tokio::test]
async fn browsers_connect_only_from_allowed_origins() -> anyhow::Result<()> {
    let stack = with_limited_gateway(&[(
        "PGWS_ALLOWED_ORIGINS",
        "https://app.example,http://localhost:3000",
    )])
    .await?;
    let url = format!("{}/chat/{}", stack.ws_url(1), token(&json!({"mode": "r"})));
    let evil = refused(&url, &[("Origin", "https://evil.example")]).await;
    assert_eq!(evil, "refused 403: origin not allowed");
    WsClient::connect_with(&url, &[("Origin", "https://app.example")]).await?;
    // Not a browser: no Origin header, nothing to check.
    WsClient::connect(&url).await?;
    Ok(())
}

#[tokio::test]
async fn connections_per_address_are_capped() -> anyhow::Result<()> {
    let stack = with_limited_gateway(&[("PGWS_MAX_CONNECTIONS_PER_ADDRESS", "3")]).await?;
    let url = format!("{}/chat/{}", stack.ws_url(1), token(&json!({"mode": "r"})));
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(WsClient::connect(&url).await?);
    }
    assert_eq!(
        refused(&url, &[]).await,
        "refused 429: too many connections from this address"
    );
    // A closed socket frees its place.
    drop(open.pop());
    let mut again = None;
    for _ in 0..50 {
        if let Ok(ws) = WsClient::connect(&url).await {
            again = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again.is_some(), "the freed place was not given back");
    // Other gateways are not concerned.
    stack.connect(0, "chat", &json!({"mode": "r"})).await?;
    Ok(())
}

#[tokio::test]
async fn a_socket_over_its_message_rate_is_closed_and_keeps_what_was_accepted() -> anyhow::Result<()>
{
    let stack = with_limited_gateway(&[("PGWS_MAX_MESSAGE_RATE", "5")]).await?;
    let (_l, mut rx) = pgws_tests::listen(&[&stack.listen_channel]).await?;
    let url = format!("{}/rated/{}", stack.ws_url(1), token(&json!({"mode": "w"})));
    let mut ws = WsClient::connect(&url).await?;
    for i in 0..20 {
        if ws.send_text(&format!("m{i}")).await.is_err() {
            break;
        }
    }
    let (code, reason) = ws.expect_close(T).await?;
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("rate"), "{reason}");
    // The burst of 5 was accepted and reaches NOTIFY, in order; nothing after it.
    for i in 0..5 {
        let (_, payload, _) = tokio::time::timeout(T, rx.recv())
            .await?
            .expect("listening");
        let envelope: serde_json::Value = serde_json::from_str(&payload)?;
        assert_eq!(envelope["payload"], format!("m{i}"));
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err(),
        "a message over the rate was notified"
    );
    Ok(())
}

#[tokio::test]
async fn handshakes_in_progress_are_capped_per_address() -> anyhow::Result<()> {
    let stack = with_limited_gateway(&[
        ("PGWS_MAX_HANDSHAKES_PER_ADDRESS", "5"),
        ("PGWS_HANDSHAKE_TIMEOUT", "2"),
    ])
    .await?;
    let addr = stack.gateways[1].addr.expect("gateway address");
    let mut slow = Vec::new();
    for _ in 0..5 {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\n").await?;
        slow.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A sixth from the same address is closed at once, a websocket too.
    let mut sixth = TcpStream::connect(addr).await?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(1), sixth.read(&mut buf)).await??;
    assert_eq!(n, 0, "the sixth connection was served");
    let url = format!("{}/chat/{}", stack.ws_url(1), token(&json!({"mode": "r"})));
    assert!(WsClient::connect(&url).await.is_err(), "a websocket got in");
    // Once the slow ones are timed out, handshakes go through again.
    drop(slow);
    let mut ok = false;
    for _ in 0..60 {
        if WsClient::connect(&url).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "handshakes stayed refused");
    Ok(())
}
