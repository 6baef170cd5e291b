//! Just enough of the NATS client protocol to subscribe and publish over nats-server's
//! websocket endpoint: `CONNECT`, `SUB`, `PUB`, `PING`/`PONG`, and `MSG` frames parsed across
//! websocket message boundaries.

/// What a chunk of server bytes held, besides the messages handed to the callback.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fed {
    /// `PING`s to answer.
    pub pings: usize,
    /// `PONG`s received.
    pub pongs: usize,
    /// The first `-ERR` line.
    pub error: Option<String>,
}

/// Reassembles the server's byte stream.
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
}

/// The client's opening: `CONNECT`, one `SUB` to `subject` if given, and a `PING` whose
/// `PONG` says the connection (and the subscription) is in place.
pub fn opening_frame(subject: Option<&str>) -> Vec<u8> {
    let sub = subject
        .map(|s| format!("SUB {s} 1\r\n"))
        .unwrap_or_default();
    format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"name\":\"pgws-load\"}}\r\n\
         {sub}PING\r\n"
    )
    .into_bytes()
}

/// One `PUB` of `payload` to `subject`.
pub fn publish_frame(subject: &str, payload: &[u8]) -> Vec<u8> {
    let mut frame = format!("PUB {subject} {}\r\n", payload.len()).into_bytes();
    frame.extend_from_slice(payload);
    frame.extend_from_slice(b"\r\n");
    frame
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf[from..]
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| p + from)
}

impl Parser {
    /// Adds `data` and hands every complete `MSG` payload to `on_msg`.
    pub fn feed(&mut self, data: &[u8], mut on_msg: impl FnMut(&[u8])) -> Fed {
        self.buf.extend_from_slice(data);
        let mut fed = Fed::default();
        let mut pos = 0;
        while let Some(eol) = find_crlf(&self.buf, pos) {
            let line = &self.buf[pos..eol];
            if line.starts_with(b"MSG ") || line.starts_with(b"HMSG ") {
                let size: Option<usize> = std::str::from_utf8(line)
                    .ok()
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|s| s.parse().ok());
                let Some(size) = size else {
                    fed.error = Some(String::from_utf8_lossy(line).into_owned());
                    pos = eol + 2;
                    continue;
                };
                let end = eol + 2 + size;
                if end + 2 > self.buf.len() {
                    break; // the payload has not all arrived
                }
                on_msg(&self.buf[eol + 2..end]);
                pos = end + 2;
                continue;
            }
            if line == b"PING" {
                fed.pings += 1;
            } else if line == b"PONG" {
                fed.pongs += 1;
            } else if line.starts_with(b"-ERR") && fed.error.is_none() {
                fed.error = Some(String::from_utf8_lossy(line).into_owned());
            }
            pos = eol + 2;
        }
        self.buf.drain(..pos);
        if self.buf.capacity() > 64 * 1024 && self.buf.len() < 1024 {
            self.buf.shrink_to(4096);
        }
        fed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_messages_split_anywhere() {
        let stream =
            b"INFO {}\r\n+OK\r\nPONG\r\nMSG a.b 1 5\r\nhello\r\nPING\r\nMSG a.b 1 2\r\nhi\r\n";
        for cut in 0..stream.len() {
            let mut p = Parser::default();
            let mut got = Vec::new();
            let a = p.feed(&stream[..cut], |m| got.push(m.to_vec()));
            let b = p.feed(&stream[cut..], |m| got.push(m.to_vec()));
            assert_eq!(got, vec![b"hello".to_vec(), b"hi".to_vec()], "cut at {cut}");
            assert_eq!(a.pings + b.pings, 1);
            assert_eq!(a.pongs + b.pongs, 1);
        }
    }

    #[test]
    fn frames_are_protocol_lines() {
        let open = String::from_utf8(opening_frame(Some("a.b"))).unwrap();
        assert!(open.starts_with("CONNECT {") && open.ends_with("\r\nSUB a.b 1\r\nPING\r\n"));
        let open = String::from_utf8(opening_frame(None)).unwrap();
        assert!(open.ends_with("}\r\nPING\r\n"), "{open}");
        assert_eq!(
            publish_frame("a.b", b"hello"),
            b"PUB a.b 5\r\nhello\r\n".to_vec()
        );
    }
}
