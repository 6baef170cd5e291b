//! Subject names and the channel <-> subject-token mapping.
//!
//! A PostgreSQL channel (or a postgres-websockets channel, which is any string) cannot be used
//! as a NATS subject token as is: `.`, `*`, `>` and whitespace have meaning there. The mapping
//! keeps `[A-Za-z0-9-]` and writes every other byte as `_XX` (upper-case hex), so it is
//! reversible for any string, and the empty string becomes a lone `_`. Decoding accepts only
//! what encoding writes: each channel has one token and each token one channel, so two
//! subjects never stand for the same channel.

use std::fmt;

/// A validated `PGWS_NATS_PREFIX`: one or more tokens of `[A-Za-z0-9_-]` separated by dots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix(String);

/// Why a prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid NATS prefix {0:?}: use dot-separated tokens of letters, digits, '-' and '_'")]
pub struct PrefixError(String);

impl Prefix {
    /// Validates a prefix.
    pub fn new(prefix: &str) -> Result<Self, PrefixError> {
        let ok = !prefix.is_empty()
            && prefix.split('.').all(|t| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if ok {
            Ok(Self(prefix.to_owned()))
        } else {
            Err(PrefixError(prefix.to_owned()))
        }
    }

    /// The prefix text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Every subject and queue-group name of one stack.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: Prefix,
}

impl Subjects {
    /// The subjects of the stack named by `prefix`.
    pub fn new(prefix: Prefix) -> Self {
        Self { prefix }
    }

    /// The prefix these subjects derive from.
    pub fn prefix(&self) -> &Prefix {
        &self.prefix
    }

    /// Gateways send [`crate::NotifyRequest`]s here (request/reply); bridges serve it as the
    /// queue group [`Subjects::bridge_queue`].
    pub fn notify(&self) -> String {
        format!("{}.notify", self.prefix)
    }

    /// Queue group of the bridges' NOTIFY workers.
    pub fn bridge_queue(&self) -> String {
        format!("{}.bridge", self.prefix)
    }

    /// The leader bridge publishes each notification of `channel` here, payload verbatim.
    pub fn deliver(&self, channel: &str) -> String {
        format!("{}.deliver.{}", self.prefix, encode_channel(channel))
    }

    /// The leader bridge publishes the payload of each NOTIFY on the direct channel `channel`
    /// here, verbatim (postgrest-ws direct channels).
    pub fn direct(&self, channel: &str) -> String {
        format!("{}.direct.{}", self.prefix, encode_channel(channel))
    }

    /// The leader bridge's registry of direct channels and wspubsub topics
    /// ([`crate::RegistryRequest`], request/reply).
    pub fn registry(&self) -> String {
        format!("{}.registry", self.prefix)
    }

    /// API-key checks ([`crate::KeyCheck`], request/reply, any bridge: queue group
    /// [`Subjects::bridge_queue`]).
    pub fn apikey(&self) -> String {
        format!("{}.apikey", self.prefix)
    }

    /// A wspubsub topic's frames, from its publisher's gateway to the subscribers' gateways.
    pub fn topic(&self, topic: &crate::Topic) -> String {
        format!(
            "{}.topic.{}.{}",
            self.prefix,
            encode_channel(&topic.domain),
            encode_channel(&topic.topic)
        )
    }

    /// The leader bridge closes a wspubsub topic's subscribers here (its publisher left and
    /// none took over in time): an empty message with a [`crate::headers::CLOSE`] header. Only
    /// bridges may publish on it, while a topic's own subject carries whatever its publisher's
    /// gateway sends, so a close is never taken from there.
    pub fn topic_close(&self, topic: &crate::Topic) -> String {
        format!(
            "{}.topicclose.{}.{}",
            self.prefix,
            encode_channel(&topic.domain),
            encode_channel(&topic.topic)
        )
    }

    /// Every topic close, for a gateway's one subscription.
    pub fn topic_closes(&self) -> String {
        format!("{}.topicclose.>", self.prefix)
    }

    /// The topic subject ([`Subjects::topic`]) that a [`Subjects::topic_close`] subject closes.
    pub fn topic_of_close(&self, subject: &str) -> Option<String> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".topicclose.")?;
        Some(format!("{}.topic.{rest}", self.prefix))
    }

    /// `/live` custom topics ([`crate::LiveTopicOp`], request/reply, any bridge: queue group
    /// [`Subjects::bridge_queue`]).
    pub fn live_topics(&self) -> String {
        format!("{}.livetopics", self.prefix)
    }

    /// The messages of one incarnation of the `/live` custom topic `name`, from the sender's
    /// gateway to the subscribers' gateways.
    pub fn live(&self, name: &str, incarnation: i64) -> String {
        format!(
            "{}.live.{}.{incarnation}",
            self.prefix,
            encode_channel(name)
        )
    }

    /// The change events of a `/live` table topic that one permission class may see, from the
    /// leader bridge's change capture to the gateways of the class's sockets.
    pub fn table(&self, class: &crate::LiveClass) -> String {
        format!(
            "{}.table.{}.{}",
            self.prefix,
            encode_channel(&class.topic),
            class.key()
        )
    }

    /// Gateways publish every accepted client message envelope (and connection event) here,
    /// captured by the JetStream stream [`Subjects::audit_stream`].
    pub fn audit(&self) -> String {
        format!("{}.audit", self.prefix)
    }

    /// The JetStream stream holding the audit records (stream names cannot hold `.`, so the
    /// prefix is written with the channel-token mapping, which keeps names distinct).
    pub fn audit_stream(&self) -> String {
        format!("{}-audit", encode_channel(self.prefix.as_str()))
    }

    /// The JetStream stream keeping delivered messages for sockets that resume
    /// ([`Subjects::history`] captures what goes in it).
    pub fn history_stream(&self) -> String {
        format!("{}-history", encode_channel(self.prefix.as_str()))
    }

    /// What the history keeps: every postgres-websockets channel's and direct channel's
    /// deliveries, `/live` custom topics' messages and table topics' events.
    pub fn history(&self) -> Vec<String> {
        vec![
            format!("{}.deliver.>", self.prefix),
            format!("{}.direct.>", self.prefix),
            format!("{}.live.>", self.prefix),
            format!("{}.table.>", self.prefix),
        ]
    }

    /// The durable consumer shared by every pg-recorder replica.
    pub fn recorder_consumer(&self) -> String {
        format!("{}-recorder", encode_channel(self.prefix.as_str()))
    }

    /// A bridge publishes a gap marker here (body: the reason, e.g. `listener`) when it
    /// (re)gains LISTEN: notifications issued before that may have reached nobody.
    pub fn gap(&self) -> String {
        format!("{}.gap", self.prefix)
    }

    /// Nobody subscribes here: a request to it comes back as "no responders" once the server
    /// has processed everything the client sent before, which makes it a server round trip.
    pub fn sync_probe(&self) -> String {
        format!("{}.sync", self.prefix)
    }

    /// The inbox prefix of `service` (its connection name, e.g. `ws-gateway`): replies to its
    /// requests arrive under `_INBOX.<prefix>.<service>.`, so a NATS user may subscribe to its
    /// own replies only (not to what the server hands another service, such as the audit
    /// records a recorder pulls).
    pub fn inbox_prefix(&self, service: &str) -> String {
        format!("_INBOX.{}.{}", self.prefix, service)
    }

    /// The channel a delivery subject carries, if it is one of this stack's.
    pub fn channel_of_deliver(&self, subject: &str) -> Option<String> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".deliver.")?;
        decode_channel(rest).ok()
    }

    /// A stable 64-bit key for the PostgreSQL advisory lock that elects the LISTEN leader.
    pub fn leader_lock_key(&self) -> i64 {
        // FNV-1a: stable across builds and platforms, unlike `DefaultHasher`.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in format!("{}.leader", self.prefix).bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        i64::from_ne_bytes(h.to_ne_bytes())
    }
}

/// Why a subject token does not decode to a channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// A byte that the encoder never writes.
    #[error("unexpected byte {0:#04x} in channel token")]
    Byte(u8),
    /// `_` not followed by two hex digits.
    #[error("truncated or invalid escape in channel token")]
    Escape,
    /// The decoded bytes are not UTF-8.
    #[error("channel token does not decode to UTF-8")]
    Utf8,
    /// Not the spelling the encoder writes: an empty token, or an escape of a byte that is
    /// written as itself (`_41` for `A`).
    #[error("channel token is not in its encoded form")]
    NotEncoded,
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Maps any channel name to a valid, non-empty NATS subject token.
pub fn encode_channel(channel: &str) -> String {
    if channel.is_empty() {
        return "_".to_owned();
    }
    let mut out = String::with_capacity(channel.len());
    for &b in channel.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push('_');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

/// The inverse of [`encode_channel`]: `Ok` only for a token it writes.
pub fn decode_channel(token: &str) -> Result<String, TokenError> {
    match token {
        "_" => return Ok(String::new()),
        "" => return Err(TokenError::NotEncoded),
        _ => {}
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b);
            i += 1;
        } else if b == b'_' {
            let hi = bytes.get(i + 1).and_then(|&c| hex_val(c));
            let lo = bytes.get(i + 2).and_then(|&c| hex_val(c));
            let byte = match (hi, lo) {
                (Some(hi), Some(lo)) => hi << 4 | lo,
                _ => return Err(TokenError::Escape),
            };
            if byte.is_ascii_alphanumeric() || byte == b'-' {
                return Err(TokenError::NotEncoded);
            }
            out.push(byte);
            i += 3;
        } else {
            return Err(TokenError::Byte(b));
        }
    }
    String::from_utf8(out).map_err(|_| TokenError::Utf8)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn subjects() -> Subjects {
        Subjects::new(Prefix::new("pgws").expect("valid prefix"))
    }

    #[test]
    fn plain_names_stay_readable() {
        assert_eq!(encode_channel("chat"), "chat");
        assert_eq!(encode_channel("room-1"), "room-1");
        assert_eq!(encode_channel("a.b"), "a_2Eb");
        assert_eq!(encode_channel("a_b"), "a_5Fb");
        assert_eq!(encode_channel(""), "_");
        assert_eq!(subjects().deliver("chat"), "pgws.deliver.chat");
        assert_eq!(subjects().audit(), "pgws.audit");
        assert_eq!(subjects().direct("a b"), "pgws.direct.a_20b");
        let t = crate::Topic {
            domain: "ex.com".into(),
            topic: "news".into(),
        };
        assert_eq!(subjects().topic(&t), "pgws.topic.ex_2Ecom.news");
        let close = subjects().topic_close(&t);
        assert_eq!(close, "pgws.topicclose.ex_2Ecom.news");
        assert_eq!(
            subjects().topic_of_close(&close),
            Some(subjects().topic(&t))
        );
        assert_eq!(subjects().topic_of_close(&subjects().topic(&t)), None);
        assert_eq!(subjects().topic_of_close("pgwsx.topicclose.a.b"), None);
        assert_eq!(subjects().audit_stream(), "pgws-audit");
        assert_eq!(
            subjects().inbox_prefix("ws-gateway"),
            "_INBOX.pgws.ws-gateway"
        );
        let dotted = Subjects::new(Prefix::new("a.b").expect("valid"));
        let underscored = Subjects::new(Prefix::new("a_2Eb").expect("valid"));
        assert_eq!(dotted.audit_stream(), "a_2Eb-audit");
        assert_ne!(dotted.audit_stream(), underscored.audit_stream());
        assert_eq!(dotted.recorder_consumer(), "a_2Eb-recorder");
    }

    #[test]
    fn bad_tokens_are_refused() {
        assert_eq!(decode_channel("a.b"), Err(TokenError::Byte(b'.')));
        assert_eq!(decode_channel("a_2"), Err(TokenError::Escape));
        assert_eq!(decode_channel("a_2e"), Err(TokenError::Escape));
        assert_eq!(decode_channel("_FF"), Err(TokenError::Utf8));
    }

    /// Found by fuzzing (`fuzz/fuzz_targets/subject_token.rs`): the empty token and escapes
    /// of bytes the encoder keeps decoded too, so that `pgws.deliver._63hat` read as the
    /// delivery subject of `chat`.
    #[test]
    fn a_token_decodes_only_in_its_encoded_form() {
        for other_spelling in ["", "_63hat", "a_2D", "_30", "_5a"] {
            assert!(
                decode_channel(other_spelling).is_err(),
                "{other_spelling:?}"
            );
        }
        assert_eq!(decode_channel("_").as_deref(), Ok(""));
        assert_eq!(decode_channel("_5F_2E").as_deref(), Ok("_."));
        assert_eq!(subjects().channel_of_deliver("pgws.deliver._63hat"), None);
    }

    #[test]
    fn prefixes_are_validated() {
        assert!(Prefix::new("pgws").is_ok());
        assert!(Prefix::new("tenant-1.pgws_a").is_ok());
        for bad in ["", ".", "a..b", "a.*", "a>", "a b", "a."] {
            assert!(Prefix::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn leader_keys_differ_per_prefix() {
        let other = Subjects::new(Prefix::new("other").expect("valid"));
        assert_ne!(subjects().leader_lock_key(), other.leader_lock_key());
        assert_eq!(subjects().leader_lock_key(), subjects().leader_lock_key());
    }

    proptest! {
        #[test]
        fn any_string_round_trips(channel in any::<String>()) {
            let token = encode_channel(&channel);
            prop_assert!(!token.is_empty());
            prop_assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            prop_assert_eq!(decode_channel(&token), Ok(channel.clone()));
            let subject = subjects().deliver(&channel);
            prop_assert_eq!(subjects().channel_of_deliver(&subject), Some(channel));
        }

        #[test]
        fn postgres_identifiers_round_trip(channel in "[\\PC]{1,63}") {
            prop_assert_eq!(decode_channel(&encode_channel(&channel)), Ok(channel));
        }

        #[test]
        fn a_decoded_token_encodes_back_to_itself(token in "([A-Za-z0-9_-]|_[0-9A-F]{2}){0,8}") {
            if let Ok(channel) = decode_channel(&token) {
                prop_assert_eq!(encode_channel(&channel), token);
            }
        }

        #[test]
        fn distinct_channels_get_distinct_tokens(a in any::<String>(), b in any::<String>()) {
            prop_assume!(a != b);
            prop_assert_ne!(encode_channel(&a), encode_channel(&b));
        }
    }
}
