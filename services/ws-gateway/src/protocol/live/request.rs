//! `/live` requests and replies, without I/O.
//!
//! A request is a JSON object `{"id"?: any, "method": "...", "attributes": {...}}`; a reply is
//! `{"type":"response","id":<as sent>,"method":...,"ok":true,"data":{...}}` or `"ok":false`
//! with an `error` saying what was wrong. Anything else (not JSON, not an object, no method, an
//! unknown one, attributes that are not an object) is answered `ok:false` too, with the id when
//! the request had one: the socket stays open.

use pgws_proto::{valid_live_topic, MAX_LIVE_TOPIC};
use serde_json::{json, Map, Value};

/// Most bytes a request's `id` takes as JSON: it is echoed in each reply (one per topic of a
/// `subscribe`), so a large one would multiply what a frame costs.
pub(crate) const MAX_ID: usize = 256;

/// Most topics one `subscribe` or `unsubscribe` may name.
pub(crate) const MAX_TOPICS_PER_REQUEST: usize = 64;

/// A request's method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Subscribe,
    Unsubscribe,
    NewMessage,
    CreateTopic,
    DestroyTopic,
    ListTopic,
    GetTopic,
    Ping,
    /// A new token for the same identity (in-band refresh).
    Refresh,
}

impl Method {
    /// The method a request names (Daptin's later spellings `create-topicName` and
    /// `destroy-topicName` included).
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "subscribe" => Self::Subscribe,
            "unsubscribe" => Self::Unsubscribe,
            "new-message" => Self::NewMessage,
            "create-topic" | "create-topicName" => Self::CreateTopic,
            "destroy-topic" | "destroy-topicName" => Self::DestroyTopic,
            "list-topic" => Self::ListTopic,
            "get-topic" => Self::GetTopic,
            "ping" => Self::Ping,
            "refresh" => Self::Refresh,
            _ => return None,
        })
    }
}

/// A well-formed request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Request {
    pub(crate) id: Option<Value>,
    pub(crate) method: Method,
    /// The method as the client spelled it (echoed in the reply).
    pub(crate) name: String,
    pub(crate) attributes: Map<String, Value>,
}

/// A request that cannot be served, and what the reply says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Bad {
    pub(crate) id: Option<Value>,
    pub(crate) method: Option<String>,
    pub(crate) error: String,
}

impl Bad {
    /// The `ok:false` reply.
    pub(crate) fn reply(&self) -> String {
        response(self.id.as_ref(), self.method.as_deref(), Err(&self.error))
    }
}

/// Parses a client frame.
pub(crate) fn parse(text: &str) -> Result<Request, Bad> {
    let bad = |id: Option<Value>, method: Option<String>, error: &str| Bad {
        id,
        method,
        error: error.to_owned(),
    };
    let value: Value =
        serde_json::from_str(text).map_err(|e| bad(None, None, &format!("malformed JSON: {e}")))?;
    let Value::Object(mut request) = value else {
        return Err(bad(None, None, "a request is a JSON object"));
    };
    let id = request.remove("id");
    if id.as_ref().is_some_and(|id| id.to_string().len() > MAX_ID) {
        return Err(bad(
            None,
            None,
            &format!("an \"id\" takes at most {MAX_ID} bytes of JSON"),
        ));
    }
    let name = match request.remove("method") {
        Some(Value::String(m)) => m,
        Some(_) => return Err(bad(id, None, "\"method\" must be a string")),
        None => return Err(bad(id, None, "missing \"method\"")),
    };
    let Some(method) = Method::parse(&name) else {
        let error = format!("unknown method {:?}", truncated(&name, 64));
        return Err(bad(id, Some(truncated(&name, 64)), &error));
    };
    let attributes = match request.remove("attributes") {
        Some(Value::Object(a)) => a,
        None | Some(Value::Null) => Map::new(),
        Some(_) => return Err(bad(id, Some(name), "\"attributes\" must be an object")),
    };
    Ok(Request {
        id,
        method,
        name,
        attributes,
    })
}

impl Request {
    /// An `ok:false` reply to this request.
    pub(crate) fn error(&self, error: &str) -> String {
        response(self.id.as_ref(), Some(&self.name), Err(error))
    }

    /// An `ok:true` reply to this request.
    pub(crate) fn ok(&self, data: Value) -> String {
        response(self.id.as_ref(), Some(&self.name), Ok(data))
    }

    /// A string attribute, required.
    pub(crate) fn text(&self, key: &str) -> Result<&str, String> {
        match self.attributes.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(format!("attribute {key:?} must be a string")),
            None => Err(format!("missing attribute {key:?}")),
        }
    }

    /// One topic name from the first of `keys` present.
    pub(crate) fn topic(&self, keys: &[&str]) -> Result<String, String> {
        let key = keys
            .iter()
            .find(|k| self.attributes.contains_key(**k))
            .unwrap_or(&keys[0]);
        let name = self.text(key)?;
        if !valid_live_topic(name) {
            return Err(invalid_topic(name));
        }
        Ok(name.to_owned())
    }

    /// The comma-separated topic list of `topicName` (spaces around names ignored).
    pub(crate) fn topics(&self) -> Result<Vec<String>, String> {
        let list = self.text("topicName")?;
        let names: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        if names.is_empty() {
            return Err("attribute \"topicName\" names no topic".to_owned());
        }
        if names.len() > MAX_TOPICS_PER_REQUEST {
            return Err(format!(
                "at most {MAX_TOPICS_PER_REQUEST} topics per request, got {}",
                names.len()
            ));
        }
        if let Some(bad) = names.iter().find(|t| !valid_live_topic(t)) {
            return Err(invalid_topic(bad));
        }
        Ok(names)
    }

    /// A boolean attribute, false when absent.
    pub(crate) fn flag(&self, key: &str) -> Result<bool, String> {
        match self.attributes.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(format!("attribute {key:?} must be true or false")),
        }
    }
}

fn invalid_topic(name: &str) -> String {
    format!(
        "invalid topic name {:?}: 1 to {MAX_LIVE_TOPIC} bytes, no comma or control character",
        truncated(name, 80)
    )
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncated(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// A reply frame.
pub(crate) fn response(
    id: Option<&Value>,
    method: Option<&str>,
    result: Result<Value, &str>,
) -> String {
    let mut reply = Map::new();
    reply.insert("type".into(), "response".into());
    if let Some(id) = id {
        reply.insert("id".into(), id.clone());
    }
    reply.insert("method".into(), method.map_or(Value::Null, Value::from));
    match result {
        Ok(data) => {
            reply.insert("ok".into(), true.into());
            reply.insert("data".into(), data);
        }
        Err(error) => {
            reply.insert("ok".into(), false.into());
            reply.insert("error".into(), error.into());
        }
    }
    Value::Object(reply).to_string()
}

/// An event frame.
pub(crate) fn event(topic: &str, event: &str, source: Option<&str>, data: &Value) -> String {
    let mut frame = json!({"type": "event", "topic": topic, "event": event});
    if let Some(source) = source {
        frame["source"] = source.into();
    }
    frame["data"] = data.clone();
    frame.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(text: &str) -> Value {
        serde_json::from_str(text).expect("JSON")
    }

    /// Found by fuzzing (`fuzz/fuzz_targets/live_request.rs`): serde_json's default float
    /// parsing may be a unit in the last place off, so a float id came back as another
    /// number (`3.1850645326773252e-304` as `3.185064532677325e-304`) and the client could not
    /// match the reply; the workspace now builds serde_json with `float_roundtrip`.
    #[test]
    fn a_float_id_comes_back_exactly() {
        for id in [
            "3.1850645326773252e-304",
            "0.30000000000000004",
            "1.7976931348623157e308",
        ] {
            let r = parse(&format!(r#"{{"id":{id},"method":"ping"}}"#)).expect("valid");
            let reply = r.ok(json!({}));
            // The number written back, read exactly (by Rust, not by serde_json).
            let echoed = reply
                .split(r#""id":"#)
                .nth(1)
                .and_then(|r| r.split(',').next());
            let echoed = echoed.and_then(|n| n.parse::<f64>().ok());
            assert_eq!(echoed, id.parse::<f64>().ok(), "{reply}");
        }
    }

    #[test]
    fn requests_parse_with_any_id() {
        let r = parse(r#"{"id":[1,"a"],"method":"subscribe","attributes":{"topicName":"a, b"}}"#)
            .expect("valid");
        assert_eq!(r.method, Method::Subscribe);
        assert_eq!(r.id, Some(json!([1, "a"])));
        assert_eq!(r.topics().unwrap(), ["a", "b"]);
        let ok = reply(&r.ok(json!({"topic": "a"})));
        assert_eq!(
            ok,
            json!({"type":"response","id":[1,"a"],"method":"subscribe","ok":true,"data":{"topic":"a"}})
        );
        let r = parse(r#"{"method":"destroy-topicName","attributes":{"name":"x"}}"#).unwrap();
        assert_eq!(r.method, Method::DestroyTopic);
        assert_eq!(r.topic(&["name", "topicName"]).unwrap(), "x");
        let r = parse(r#"{"method":"ping"}"#).unwrap();
        assert!(r.attributes.is_empty());
    }

    #[test]
    fn bad_requests_say_what_is_wrong_and_keep_the_id() {
        let cases = [
            ("nope", None, "malformed JSON"),
            ("[1]", None, "a request is a JSON object"),
            (r#"{"id":7}"#, Some(json!(7)), "missing \"method\""),
            (
                r#"{"id":"x","method":3}"#,
                Some(json!("x")),
                "\"method\" must be a string",
            ),
            (
                r#"{"id":1,"method":"fly"}"#,
                Some(json!(1)),
                "unknown method \"fly\"",
            ),
            (
                r#"{"id":2,"method":"ping","attributes":[1]}"#,
                Some(json!(2)),
                "\"attributes\" must be an object",
            ),
        ];
        for (text, id, error) in cases {
            let bad = parse(text).expect_err(text);
            assert!(bad.error.starts_with(error), "{text}: {}", bad.error);
            let r = reply(&bad.reply());
            assert_eq!(r["ok"], false);
            assert_eq!(r["type"], "response");
            assert_eq!(r.get("id").cloned(), id, "{text}");
        }
    }

    #[test]
    fn a_long_id_is_refused_and_not_echoed() {
        let id = "i".repeat(MAX_ID - 2);
        let r = parse(&json!({"id": id, "method": "ping"}).to_string()).expect("fits");
        assert_eq!(r.id, Some(json!(id)));
        let id = "i".repeat(MAX_ID - 1);
        let bad = parse(&json!({"id": id, "method": "ping"}).to_string()).expect_err("long");
        assert_eq!(bad.id, None);
        assert!(bad.error.contains("at most 256 bytes"), "{}", bad.error);
    }

    #[test]
    fn attributes_are_checked() {
        let r = parse(r#"{"method":"subscribe","attributes":{"topicName":5}}"#).unwrap();
        assert_eq!(
            r.topics().unwrap_err(),
            "attribute \"topicName\" must be a string"
        );
        let r = parse(r#"{"method":"subscribe","attributes":{}}"#).unwrap();
        assert_eq!(r.topics().unwrap_err(), "missing attribute \"topicName\"");
        let r = parse(r#"{"method":"subscribe","attributes":{"topicName":" , "}}"#).unwrap();
        assert!(r.topics().is_err());
        let many = vec!["t"; MAX_TOPICS_PER_REQUEST + 1].join(",");
        let r = parse(&json!({"method":"subscribe","attributes":{"topicName": many}}).to_string())
            .unwrap();
        assert!(r.topics().unwrap_err().starts_with("at most 64 topics"));
        let long = "x".repeat(MAX_LIVE_TOPIC + 1);
        let r = parse(&json!({"method":"create-topic","attributes":{"name": long}}).to_string())
            .unwrap();
        assert!(r
            .topic(&["name"])
            .unwrap_err()
            .starts_with("invalid topic name"));
        let r =
            parse(r#"{"method":"create-topic","attributes":{"name":"t","public":"yes"}}"#).unwrap();
        assert!(r.flag("public").is_err());
    }

    #[test]
    fn events_carry_the_source_when_known() {
        let e = reply(&event("t", "new-message", Some("ann"), &json!("hi")));
        assert_eq!(
            e,
            json!({"type":"event","topic":"t","event":"new-message","source":"ann","data":"hi"})
        );
        let e = reply(&event("t", "destroy-topic", None, &json!({})));
        assert!(e.get("source").is_none());
    }
}
