//! NATS header names of the contract.

/// The unique id of a client message, assigned by the gateway; JetStream's duplicate window
/// uses it, and the recorder stores it as the audit row's primary key. A `/live` table event
/// carries one too ([`change_id`]).
pub const MSG_ID: &str = "Nats-Msg-Id";

/// On an audit record holding several envelopes (the messages of one NOTIFY request): their
/// message ids, comma separated, in order; the body is the envelopes separated by `\n`, and
/// `Nats-Msg-Id` is the first id. Absent on a record of one envelope.
pub const MSG_IDS: &str = "Pgws-Msg-Ids";

/// On an outcome record of the audit stream: what happened to the messages it lists in
/// [`MSG_IDS`]. The only value is [`OUTCOME_FAILED`]: the gateway gave up on their NOTIFY
/// (the client got an error frame); the body is the reason.
pub const OUTCOME: &str = "Pgws-Outcome";

/// The [`OUTCOME`] of messages that were recorded but not NOTIFYed.
pub const OUTCOME_FAILED: &str = "failed";

/// On an audit record: the PostgreSQL channel the message was notified on.
pub const NOTIFY_CHANNEL: &str = "Pgws-Notify-Channel";

/// On a delivery: when the bridge received the notification from PostgreSQL, unix
/// microseconds (decimal text); the gateway's database -> socket latency starts there.
pub const LISTENED_AT: &str = "Pgws-Listened-At";

fn unix_micros() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

/// The [`LISTENED_AT`] value for now.
pub fn listened_now() -> String {
    unix_micros().to_string()
}

/// How long ago a [`LISTENED_AT`] value was (zero if it lies in the future); `None` when it
/// is not a number.
pub fn since_listened(value: &str) -> Option<std::time::Duration> {
    let at: u128 = value.parse().ok()?;
    let micros = unix_micros().saturating_sub(at);
    Some(std::time::Duration::from_micros(
        u64::try_from(micros).unwrap_or(u64::MAX),
    ))
}

/// On a message fanned out to sockets (wspubsub frames): `binary` when the payload goes out as
/// a binary websocket frame; absent: a text frame.
pub const FRAME: &str = "Pgws-Frame";

/// The [`FRAME`] value of a binary frame.
pub const FRAME_BINARY: &str = "binary";

/// On a message to a fan-out subject: close every socket reading that subject with this close
/// frame instead of delivering anything, `<code> <reason>` (the leader bridge closes a
/// wspubsub topic whose publisher did not come back within the grace period).
pub const CLOSE: &str = "Pgws-Close";

/// On a table event: where the change lies in the database's commit order,
/// `<commit LSN>.<index in its transaction>` (two decimal numbers). A leader that took over
/// publishes again what its predecessor may have published; gateways drop an event whose
/// position is not after the last one of its subject ([`change_position`]).
pub const CHANGE: &str = "Pgws-Change";

/// The [`CHANGE`] value of a change.
pub fn change(commit_lsn: u64, index: u64) -> String {
    format!("{commit_lsn}.{index}")
}

/// A [`CHANGE`] value read back, comparable in commit order.
pub fn change_position(value: &str) -> Option<(u64, u64)> {
    let (lsn, index) = value.split_once('.')?;
    Some((lsn.parse().ok()?, index.parse().ok()?))
}

/// The [`MSG_ID`] of a table event (JetStream deduplicates by it: the history keeps an event
/// the capture published again after a leader's failover once) at `position` ([`CHANGE`]) on `subject`.
pub fn change_id(subject: &str, position: &str) -> String {
    format!("{position}@{subject}")
}

/// W3C trace context (on NOTIFY requests, deliveries and audit records) when tracing is on.
pub const TRACEPARENT: &str = "traceparent";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_positions_compare_in_commit_order() {
        let a = change_position(&change(10, 2)).unwrap();
        let b = change_position(&change(10, 3)).unwrap();
        let c = change_position(&change(11, 0)).unwrap();
        assert!(a < b && b < c);
        for bad in ["", "1", "1.", ".1", "x.1", "1.-1"] {
            assert_eq!(change_position(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn listened_at_reads_back_as_an_age() {
        let age = since_listened(&listened_now()).expect("a number");
        assert!(age < std::time::Duration::from_secs(1), "{age:?}");
        assert_eq!(since_listened("x"), None);
        assert_eq!(
            since_listened(&u128::MAX.to_string()),
            Some(std::time::Duration::ZERO)
        );
    }
}
