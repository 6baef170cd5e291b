//! The channel <-> subject-token mapping (`pgws_proto::encode_channel`/`decode_channel`):
//! every channel maps to one literal NATS token and back, the token of a PostgreSQL channel
//! (at most 63 bytes) is at most 189 bytes, and a token decodes only when it is the one
//! spelling the encoder writes, so two subjects never name one channel.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pgws_fuzz::literal_token;
use pgws_proto::{decode_channel, encode_channel, Prefix, Subjects, MAX_PG_CHANNEL};

#[derive(Arbitrary, Debug)]
enum Input {
    /// A channel name (any string).
    Channel(String),
    /// A subject token from outside.
    Token(String),
}

fuzz_target!(|input: Input| {
    match input {
        Input::Channel(channel) => {
            let token = encode_channel(&channel);
            assert!(literal_token(&token), "{channel:?} -> {token:?}");
            assert!(token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            assert!(token.len() <= 3 * channel.len().max(1));
            if channel.len() <= MAX_PG_CHANNEL {
                assert!(token.len() <= 3 * MAX_PG_CHANNEL);
            }
            assert_eq!(decode_channel(&token).as_deref(), Ok(channel.as_str()));
            let subjects = Subjects::new(Prefix::new("pgws").expect("valid prefix"));
            let subject = subjects.deliver(&channel);
            assert_eq!(subject.split('.').count(), 3, "{subject}");
            assert_eq!(subjects.channel_of_deliver(&subject), Some(channel));
        }
        Input::Token(token) => {
            if let Ok(channel) = decode_channel(&token) {
                assert_eq!(encode_channel(&channel), token, "{channel:?}");
            }
        }
    }
});
