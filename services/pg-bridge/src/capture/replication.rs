//! PostgreSQL's streaming replication protocol, as far as the capture needs it: a logical
//! walsender connection (`replication=database`), `START_REPLICATION SLOT ... LOGICAL`, the
//! slot's changes as the server decodes them (no polling: a commit is sent as soon as its WAL is
//! flushed), the server's keepalives, and the standby status updates that confirm what was
//! published.
//!
//! tokio-postgres has no copy-both mode, so the messages are framed here (a type byte and a
//! big-endian length, as in [`crate::wire`]); postgres-protocol writes the start-up and
//! authentication messages and does SCRAM-SHA-256 and MD5. The connection opens its socket
//! with [`crate::wire::open`] (each host of the URI in turn, TCP or Unix, the connect timeout).
//!
//! What the server sends before the copy starts is bounded ([`MAX_MESSAGE`]); a change of the
//! stream is as large as its row (PostgreSQL's own bound, 1 GB a value) and is read whole.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_postgres::Config;

use crate::db::quote_ident;
use crate::wire::{self, Io};

/// The largest message accepted before the copy starts (errors, parameters, authentication).
const MAX_MESSAGE: usize = 1 << 20;
/// The largest message of the stream: one change, as large as its row.
const MAX_CHANGE: usize = 1 << 30;
/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// What the stream carries.
#[derive(Debug)]
pub(crate) enum Frame {
    /// One pgoutput message (a Begin, a Relation, a row change, a Commit...).
    Change { data: Bytes },
    /// The server has sent everything before `wal_end`; `reply` asks for a status update now.
    Keepalive { wal_end: u64, reply: bool },
}

/// The reading half of a started stream.
pub(crate) struct Changes {
    read: ReadHalf<Box<dyn Io>>,
    buf: BytesMut,
}

/// The writing half of a started stream: standby status updates.
pub(crate) struct Feedback {
    write: WriteHalf<Box<dyn Io>>,
    buf: BytesMut,
}

/// Opens a logical walsender connection to the database of `config` and starts streaming
/// `slot`'s changes of the publication of the same name (pgoutput, protocol version 1) from
/// where the slot was last confirmed.
pub(crate) async fn start(config: &Config, slot: &str) -> anyhow::Result<(Changes, Feedback)> {
    let socket = wire::open(config)
        .await
        .context("connecting for replication")?;
    let (read, write) = tokio::io::split(socket);
    let (mut changes, mut feedback) = (
        Changes {
            read,
            buf: BytesMut::with_capacity(8192),
        },
        Feedback {
            write,
            buf: BytesMut::with_capacity(256),
        },
    );
    let wait = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(10));
    tokio::time::timeout(wait, handshake(config, &mut changes, &mut feedback))
        .await
        .map_err(|_| anyhow::anyhow!("the replication connection's start-up timed out"))??;
    let name = quote_ident(slot);
    let start = format!(
        "START_REPLICATION SLOT {name} LOGICAL 0/0 (\"proto_version\" '1', \
         \"publication_names\" '{}')",
        name.replace('\'', "''")
    );
    feedback.send(|buf| frontend::query(&start, buf)).await?;
    loop {
        let (tag, body) = changes.message(MAX_MESSAGE).await?;
        match tag {
            // CopyBothResponse: the stream begins.
            b'W' => return Ok((changes, feedback)),
            b'E' => bail!("START_REPLICATION: {}", server_error(&body)),
            b'N' | b'S' => {}
            other => bail!(
                "START_REPLICATION: unexpected message {:?}",
                char::from(other)
            ),
        }
    }
}

/// Start-up and authentication, until the server is ready for a query.
async fn handshake(
    config: &Config,
    changes: &mut Changes,
    feedback: &mut Feedback,
) -> anyhow::Result<()> {
    let user = config
        .get_user()
        .ok_or_else(|| anyhow::anyhow!("the database URI names no user"))?;
    let dbname = config.get_dbname().unwrap_or(user);
    let application = config.get_application_name().unwrap_or("pg-bridge");
    let mut params = vec![
        ("user", user),
        ("database", dbname),
        ("application_name", application),
        ("replication", "database"),
        // Row values as the SQL sessions read them (pgoutput converts them to this encoding).
        ("client_encoding", "UTF8"),
    ];
    if let Some(options) = config.get_options() {
        params.push(("options", options));
    }
    feedback
        .send(|buf| frontend::startup_message(params.iter().copied(), buf))
        .await?;
    let password = config.get_password();
    let mut scram: Option<sasl::ScramSha256> = None;
    loop {
        let (tag, mut body) = changes.message(MAX_MESSAGE).await?;
        match tag {
            b'R' => {
                let kind = take_i32(&mut body)?;
                match kind {
                    0 => {}
                    3 => {
                        let pw = password.ok_or_else(no_password)?;
                        feedback
                            .send(|buf| frontend::password_message(pw, buf))
                            .await?;
                    }
                    5 => {
                        let pw = password.ok_or_else(no_password)?;
                        if body.len() < 4 {
                            bail!("a truncated MD5 request");
                        }
                        let salt = [body[0], body[1], body[2], body[3]];
                        let hashed = md5_hash(user.as_bytes(), pw, salt);
                        feedback
                            .send(|buf| frontend::password_message(hashed.as_bytes(), buf))
                            .await?;
                    }
                    10 => {
                        let offers_scram = body
                            .split(|b| *b == 0)
                            .any(|m| m == sasl::SCRAM_SHA_256.as_bytes());
                        if !offers_scram {
                            bail!("the server offers no SASL mechanism the bridge knows");
                        }
                        let pw = password.ok_or_else(no_password)?;
                        let s = sasl::ScramSha256::new(pw, sasl::ChannelBinding::unsupported());
                        feedback
                            .send(|buf| {
                                frontend::sasl_initial_response(
                                    sasl::SCRAM_SHA_256,
                                    s.message(),
                                    buf,
                                )
                            })
                            .await?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| anyhow::anyhow!("SASL continue out of turn"))?;
                        s.update(&body).context("SCRAM")?;
                        let message = s.message().to_vec();
                        feedback
                            .send(|buf| frontend::sasl_response(&message, buf))
                            .await?;
                    }
                    12 => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| anyhow::anyhow!("SASL final out of turn"))?;
                        s.finish(&body).context("SCRAM: the server's proof")?;
                    }
                    other => bail!("unsupported authentication method {other}"),
                }
            }
            b'E' => bail!("{}", server_error(&body)),
            b'Z' => return Ok(()),
            // Parameters, the key for cancelling, notices.
            b'S' | b'K' | b'N' => {}
            other => bail!("unexpected message {:?} at start-up", char::from(other)),
        }
    }
}

fn no_password() -> anyhow::Error {
    anyhow::anyhow!("the server asks for a password and the database URI has none")
}

impl Changes {
    /// The next frame of the stream; an error when the connection ends or the server fails.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Frame> {
        loop {
            let (tag, mut body) = self.message(MAX_CHANGE).await?;
            match tag {
                b'd' => {
                    if body.is_empty() {
                        bail!("an empty replication message");
                    }
                    match body.get_u8() {
                        b'w' => {
                            if body.len() < 24 {
                                bail!("a truncated change");
                            }
                            body.advance(24); // start, end of WAL, send time
                            return Ok(Frame::Change { data: body });
                        }
                        b'k' => {
                            if body.len() < 17 {
                                bail!("a truncated keepalive");
                            }
                            let wal_end = body.get_u64();
                            body.advance(8);
                            let reply = body.get_u8() == 1;
                            return Ok(Frame::Keepalive { wal_end, reply });
                        }
                        other => bail!("unknown replication message {:?}", char::from(other)),
                    }
                }
                b'E' => bail!("replication: {}", server_error(&body)),
                b'c' => bail!("the server ended the replication stream"),
                // Notices and parameter changes.
                b'N' | b'S' => {}
                other => bail!("unexpected message {:?} in the stream", char::from(other)),
            }
        }
    }

    /// One whole backend message: its type and body (at most `limit` bytes).
    async fn message(&mut self, limit: usize) -> anyhow::Result<(u8, Bytes)> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                let len = len as usize;
                if len < 4 {
                    bail!("a malformed message from the server");
                }
                if len - 4 > limit {
                    bail!("a message of {len} bytes from the server (at most {limit})");
                }
                if self.buf.len() > len {
                    let tag = self.buf[0];
                    let mut whole = self.buf.split_to(len + 1);
                    whole.advance(5);
                    return Ok((tag, whole.freeze()));
                }
                self.buf.reserve(len + 1 - self.buf.len());
            }
            if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(8192);
            }
            if self.read.read_buf(&mut self.buf).await? == 0 {
                bail!("the server closed the replication connection");
            }
        }
    }
}

impl Feedback {
    /// Confirms that everything before `lsn` was published: the slot will not send it again.
    pub(crate) async fn confirm(&mut self, lsn: u64) -> anyhow::Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            - PG_EPOCH_MICROS;
        let mut update = BytesMut::with_capacity(34);
        update.put_u8(b'r');
        update.put_u64(lsn); // written
        update.put_u64(lsn); // flushed
        update.put_u64(lsn); // applied
        update.put_i64(now);
        update.put_u8(0);
        let update = update.freeze();
        self.send(|buf| {
            frontend::CopyData::new(update.clone())
                .map(|data| data.write(buf))
                .map_err(std::io::Error::other)
        })
        .await
    }

    async fn send(
        &mut self,
        write: impl FnOnce(&mut BytesMut) -> std::io::Result<()>,
    ) -> anyhow::Result<()> {
        self.buf.clear();
        write(&mut self.buf)?;
        self.write.write_all(&self.buf).await?;
        self.write.flush().await?;
        Ok(())
    }
}

fn take_i32(body: &mut Bytes) -> anyhow::Result<i32> {
    if body.len() < 4 {
        bail!("a truncated message from the server");
    }
    Ok(body.get_i32())
}

/// An ErrorResponse's severity, code and message.
fn server_error(body: &[u8]) -> String {
    let (mut severity, mut code, mut message) = ("ERROR", "", "");
    for field in body.split(|b| *b == 0) {
        let Some((&kind, text)) = field.split_first() else {
            continue;
        };
        let text = std::str::from_utf8(text).unwrap_or("?");
        match kind {
            b'S' => severity = text,
            b'C' => code = text,
            b'M' => message = text,
            _ => {}
        }
    }
    format!("{severity}: {message} (SQLSTATE {code})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_read_their_fields() {
        let body = b"SERROR\0VERROR\0C55006\0Mreplication slot \"s\" is active for PID 7\0\0";
        assert_eq!(
            server_error(body),
            "ERROR: replication slot \"s\" is active for PID 7 (SQLSTATE 55006)"
        );
    }
}
