//! `/live`: Daptin's websocket API (JSON requests, topics, events).
//!
//! `ws://host/live?token=<jwt>` (or the token in `Authorization: Bearer` or
//! `Sec-WebSocket-Protocol`, as for every protocol); the token needs no `mode` claim: `sub` is
//! the socket's identity (an event's `source`, a topic's owner) and a `role` listed in
//! `PGWS_ADMIN_ROLES` makes it an admin. Requests and replies: [`request`].
//!
//! Table topics (`PGWS_TABLE_TOPICS`, read by the bridges) carry the committed changes of
//! their table: a socket that subscribes is placed by a bridge in its permission class (its
//! `role` claim and the claims the table's policies read); it then reads the class's subject,
//! and the gateway reports the class to the leader bridge, whose change capture publishes
//! there what that class may SELECT.
//!
//! Custom topics are kept by the bridges (`pgws_live.topics`, see pg-bridge's `live_topics`),
//! so every gateway sees the same ones and they survive restarts. By default only the owner
//! and admins may subscribe and publish; `create-topic` with `"public": true` opens a topic to
//! every authenticated socket. A message reaches the subscribers on every gateway through the
//! NATS subject of the topic's incarnation; the sender gets it only if it subscribed too.
//!
//! Requests that need a bridge are answered in order, each within [`ANSWER_WAIT`] (the
//! topics of one `subscribe` are looked up at once); bounds:
//! [`MAX_SUBSCRIPTIONS`] topics per socket, [`request::MAX_TOPICS_PER_REQUEST`] per request,
//! [`LOOKUPS_PER_SECOND`] bridge lookups per socket, [`request::MAX_ID`] bytes of `id`.

pub(crate) mod request;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::Message;
use axum::http::StatusCode;
use bytes::Bytes;
use futures::FutureExt as _;
use pgws_auth::Authorizer;
use pgws_proto::{
    LiveClass, LiveOutcome, LiveTopic, LiveTopicOp, LiveTopicReply, Reader, MAX_TOPICS_PER_OWNER,
};
use serde_json::{json, Map, Value};

use self::request::{event, Bad, Method, Request};
use super::{same_claims_apart_from, unix_secs, Action, Admission, Frame, Protocol, Refusal};
use crate::handshake::Credentials;
use crate::limits::Rate;
use crate::presence::{Registration, MAX_CLASSES};
use crate::resume::{Resume, Wrap};
use crate::Gateway;

/// How long a request waits for a bridge's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(5);
/// Messages a `/live` socket's send queue holds at least: a table event comes per row, and a
/// transaction's rows come at once (the queue's byte bound, `PGWS_SEND_QUEUE_BYTES`, still
/// holds).
const LIVE_SEND_QUEUE: usize = 16_384;
/// Most topics one socket reads.
pub(crate) const MAX_SUBSCRIPTIONS: usize = 256;
/// Topic lookups (requests a bridge answers) one socket may make per second, in bursts of as
/// many: a `subscribe` of [`request::MAX_TOPICS_PER_REQUEST`] new topics costs that many.
/// Over it, a request is answered `ok:false` and the socket stays.
pub(crate) const LOOKUPS_PER_SECOND: u32 = 128;
/// Most topics a socket remembers it may publish on without asking a bridge again.
const MAX_KNOWN: usize = 256;

/// Who the socket is.
struct Identity {
    /// The token's `sub` claim, when it is a string.
    sub: Option<String>,
    /// The token's `role` claim, when it is a string.
    role: Option<String>,
    /// Its `role` is in `PGWS_ADMIN_ROLES`.
    admin: bool,
    /// The token's claims (what table visibility checks see as `request.jwt.claims`).
    claims: Map<String, Value>,
}

impl Identity {
    fn reader(&self) -> Reader {
        Reader {
            role: self.role.clone(),
            claims: self.claims.clone(),
            admin: self.admin,
        }
    }
}

/// A topic a socket reads.
#[derive(Clone)]
enum Found {
    Custom(LiveTopic),
    /// A table topic, in this class.
    Table(LiveClass),
}

impl Found {
    fn subject(&self, gw: &Gateway) -> String {
        let subjects = &gw.config.nats.subjects;
        match self {
            Found::Custom(t) => subjects.live(&t.name, t.incarnation),
            Found::Table(c) => subjects.table(c),
        }
    }

    fn registration(&self) -> Option<Registration> {
        match self {
            Found::Custom(_) => None,
            Found::Table(c) => Some(Registration::Class(c.clone())),
        }
    }
}

/// What the socket reads and may write.
#[derive(Default)]
struct State {
    /// Subscribed topics by name.
    subscribed: HashMap<String, Found>,
    /// Topics found open to this socket (for publishing without asking again).
    known: HashMap<String, LiveTopic>,
}

struct Live {
    gw: Arc<Gateway>,
    who: Arc<Identity>,
    state: Arc<Mutex<State>>,
    /// Bridge lookups this socket may still make ([`LOOKUPS_PER_SECOND`]).
    lookups: Rate,
}

/// The token of a `/live` handshake verified at `now` (unix seconds), without side effects:
/// its claims and expiry.
pub(crate) fn verify(
    authorizer: &Authorizer,
    creds: &Credentials,
    now: u64,
) -> Result<(Map<String, Value>, Option<u64>), Refusal> {
    let Some(token) = creds.token.as_deref().filter(|t| !t.is_empty()) else {
        return Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "Error: missing token",
        ));
    };
    authorizer.verify_claims(token, now).map_err(|r| Refusal {
        status: StatusCode::UNAUTHORIZED,
        ..Refusal::token(&r)
    })
}

/// Admits a `/live` socket.
pub(crate) fn admission(gw: &Arc<Gateway>, creds: &Credentials) -> Result<Admission, Refusal> {
    let (claims, expires_at) = verify(&gw.config.authorizer, creds, unix_secs())?;
    let text = |key: &str| claims.get(key).and_then(Value::as_str).map(str::to_owned);
    let role = text("role");
    let who = Identity {
        sub: text("sub"),
        admin: role
            .as_ref()
            .is_some_and(|r| gw.config.admin_roles.contains(r)),
        role,
        claims,
    };
    Ok(Admission {
        label: "live",
        subjects: Vec::new(),
        registrations: Vec::new(),
        gaps: false,
        dynamic: true,
        send_queue: Some(gw.config.send_queue.max(LIVE_SEND_QUEUE)),
        expires_at,
        opening: None,
        protocol: Box::new(Live {
            gw: Arc::clone(gw),
            who: Arc::new(who),
            state: Arc::default(),
            lookups: Rate::new(LOOKUPS_PER_SECOND),
        }),
        // With a history, every event carries its position and `subscribe` takes `since`.
        resume: gw
            .hub
            .history
            .is_some()
            .then_some((Resume::Now, Wrap::Event)),
        after_join: None,
    })
}

impl Protocol for Live {
    fn frame(&mut self, gw: &Gateway, frame: Frame) -> Action {
        let Some(text) = frame.as_text() else {
            gw.metrics.refused("binary_not_utf8");
            let bad = Bad {
                id: None,
                method: None,
                error: "a request is UTF-8 JSON".to_owned(),
            };
            return reply(bad.reply());
        };
        let request = match request::parse(text) {
            Ok(r) => r,
            Err(bad) => {
                gw.metrics.refused("bad_request");
                return reply(bad.reply());
            }
        };
        gw.metrics.accepted(text.len());
        if !self.lookups.take_n(self.lookups_of(&request)) {
            gw.metrics.refused("live_lookup_rate");
            return failed(
                &request,
                format!(
                    "too many requests: a socket may make {LOOKUPS_PER_SECOND} topic lookups a \
                     second (a subscribe costs one per topic); try again shortly"
                ),
            );
        }
        match request.method {
            Method::Ping => reply(request.ok(json!({"pong": true}))),
            Method::Subscribe => self.subscribe(request),
            Method::Unsubscribe => self.unsubscribe(&request),
            Method::NewMessage => self.new_message(request),
            Method::CreateTopic => self.create(request),
            Method::DestroyTopic => self.destroy(request),
            Method::ListTopic => self.list(request),
            Method::GetTopic => self.get(request),
            Method::Refresh => self.refresh(&request),
        }
    }

    fn undelivered(&self, _n: usize, _reason: &str) -> Action {
        Action::None
    }
}

fn reply(text: String) -> Action {
    Action::Reply(Message::text(text))
}

/// An event frame for a topic's subscribers on every gateway, then the sender's reply.
fn publish_then_reply(subject: String, frame: String, answer: String) -> Action {
    Action::Many(vec![
        Action::Publish {
            subject,
            payload: Bytes::from(frame),
            binary: false,
        },
        reply(answer),
    ])
}

/// An `ok:false` reply to `request`.
fn failed(request: &Request, error: impl AsRef<str>) -> Action {
    reply(request.error(error.as_ref()))
}

impl Live {
    /// How many bridge lookups `request` costs: one per topic a `subscribe` names that the
    /// socket does not read yet, one for a message to a topic not known yet and for each
    /// other topic request; none for `ping`, `unsubscribe` and `refresh`.
    fn lookups_of(&self, request: &Request) -> usize {
        let state = lock(&self.state);
        match request.method {
            Method::Subscribe => request.topics().map_or(0, |topics| {
                topics
                    .iter()
                    .filter(|t| !state.subscribed.contains_key(*t))
                    .count()
            }),
            Method::NewMessage => request
                .topic(&["topicName"])
                .map_or(0, |t| usize::from(!state.known.contains_key(&t))),
            Method::CreateTopic | Method::DestroyTopic | Method::ListTopic | Method::GetTopic => 1,
            Method::Ping | Method::Unsubscribe | Method::Refresh => 0,
        }
    }

    /// `refresh` (`token`): a new token for the same identity moves the socket's expiry; it may
    /// differ from the socket's token only in `exp`, `iat`, `nbf` and `jti`, so what the socket
    /// may read and write stays as it was granted.
    fn refresh(&self, request: &Request) -> Action {
        let token = match request.text("token") {
            Ok(t) => t,
            Err(e) => return failed(request, e),
        };
        let (claims, expires_at) = match self.gw.config.authorizer.verify_claims(token, unix_secs())
        {
            Ok(v) => v,
            Err(r) => return failed(request, format!("token refused: {r}")),
        };
        if !same_claims_apart_from(&claims, &self.who.claims, &[]) {
            return failed(
                request,
                "a refreshed token carries the socket's claims: only exp, iat, nbf and jti may \
                 change",
            );
        }
        self.gw.metrics.refreshed.inc();
        Action::Many(vec![
            Action::Expire(expires_at),
            reply(request.ok(json!({"expires_at": expires_at}))),
        ])
    }

    fn subscribe(&self, request: Request) -> Action {
        let topics = match request.topics() {
            Ok(t) => t,
            Err(e) => return failed(&request, e),
        };
        let since = match since(&request) {
            Ok(since) => since,
            Err(e) => return failed(&request, e),
        };
        let (gw, who, state) = (
            Arc::clone(&self.gw),
            Arc::clone(&self.who),
            Arc::clone(&self.state),
        );
        Action::Await(
            async move {
                // The topics are looked up at once; the replies keep the request's order.
                let lookups = topics.iter().map(|name| {
                    let known = lock(&state).subscribed.contains_key(name);
                    let (gw, who) = (&gw, &who);
                    async move {
                        if known {
                            None
                        } else {
                            Some(find(gw, who, name, true).await)
                        }
                    }
                });
                let found = futures::future::join_all(lookups).await;
                // The events after `since` are queued after the reply, which says whether every
                // one of them is still kept.
                let recovered = match &since {
                    Some(since) => Some((since, recoverable(&gw, since).await)),
                    None => None,
                };
                let mut actions = Vec::with_capacity(topics.len() * 2);
                for (name, found) in topics.into_iter().zip(found) {
                    let topic = match found {
                        None => {
                            actions.push(reply(request.ok(json!({"topic": name}))));
                            continue;
                        }
                        Some(Err(e)) => {
                            actions.push(failed(&request, e));
                            continue;
                        }
                        Some(Ok(topic)) => topic,
                    };
                    let mut s = lock(&state);
                    if s.subscribed.contains_key(&name) {
                        // Named twice in the request.
                        actions.push(reply(request.ok(json!({"topic": name}))));
                        continue;
                    }
                    if s.subscribed.len() >= MAX_SUBSCRIPTIONS {
                        let error = format!("at most {MAX_SUBSCRIPTIONS} subscriptions per socket");
                        actions.push(failed(&request, error));
                        continue;
                    }
                    if let Found::Table(class) = &topic {
                        if !gw.presence.admit_class(class) {
                            let error = format!(
                                "this gateway serves at most {MAX_CLASSES} permission classes \
                                 of table topics; try another gateway or later"
                            );
                            actions.push(failed(&request, error));
                            continue;
                        }
                    }
                    let subject = topic.subject(&gw);
                    let registration = topic.registration();
                    s.subscribed.insert(name.clone(), topic);
                    drop(s);
                    let Some((since, recovered)) = recovered else {
                        actions.push(Action::Join(subject, registration));
                        actions.push(reply(request.ok(json!({"topic": name}))));
                        continue;
                    };
                    actions.push(if recovered {
                        Action::JoinFrom(subject, registration, since.clone())
                    } else {
                        Action::Join(subject, registration)
                    });
                    let data = json!({"topic": name, "recovered": recovered});
                    actions.push(reply(request.ok(data)));
                }
                Action::Many(actions)
            }
            .boxed(),
        )
    }

    fn unsubscribe(&self, request: &Request) -> Action {
        let topics = match request.topics() {
            Ok(t) => t,
            Err(e) => return failed(request, e),
        };
        let mut actions = Vec::with_capacity(topics.len() * 2);
        let mut state = lock(&self.state);
        for name in topics {
            match state.subscribed.remove(&name) {
                Some(topic) => {
                    let subject = topic.subject(&self.gw);
                    actions.push(Action::Leave(subject, topic.registration()));
                    actions.push(reply(request.ok(json!({"topic": name}))));
                }
                None => actions.push(failed(request, format!("not subscribed to {name:?}"))),
            }
        }
        Action::Many(actions)
    }

    fn new_message(&self, request: Request) -> Action {
        let name = match request.topic(&["topicName"]) {
            Ok(n) => n,
            Err(e) => return failed(&request, e),
        };
        let Some(message) = request.attributes.get("message").cloned() else {
            return failed(&request, "missing attribute \"message\"");
        };
        let subjects = self.gw.config.nats.subjects.clone();
        let source = self.who.sub.clone();
        let publish = move |request: &Request, topic: &LiveTopic| {
            let frame = event(&topic.name, "new-message", source.as_deref(), &message);
            let subject = subjects.live(&topic.name, topic.incarnation);
            publish_then_reply(subject, frame, request.ok(json!({"topic": topic.name})))
        };
        let known = lock(&self.state).known.get(&name).cloned();
        if let Some(topic) = known {
            return publish(&request, &topic);
        }
        let (gw, who, state) = (
            Arc::clone(&self.gw),
            Arc::clone(&self.who),
            Arc::clone(&self.state),
        );
        Action::Await(
            async move {
                match find(&gw, &who, &name, false).await {
                    Ok(Found::Table(_)) => failed(&request, table_written(&name)),
                    Ok(Found::Custom(topic)) => {
                        let mut s = lock(&state);
                        if s.known.len() >= MAX_KNOWN {
                            s.known.clear();
                        }
                        s.known.insert(name, topic.clone());
                        drop(s);
                        publish(&request, &topic)
                    }
                    Err(e) => failed(&request, e),
                }
            }
            .boxed(),
        )
    }

    fn create(&self, request: Request) -> Action {
        let (name, public) = match (
            request.topic(&["name", "topicName"]),
            request.flag("public"),
        ) {
            (Ok(n), Ok(p)) => (n, p),
            (Err(e), _) | (_, Err(e)) => return failed(&request, e),
        };
        let Some(owner) = self.who.sub.clone() else {
            return failed(&request, "create-topic needs a token with a \"sub\" claim");
        };
        let gw = Arc::clone(&self.gw);
        Action::Await(
            async move {
                let op = LiveTopicOp::Create {
                    name: name.clone(),
                    owner,
                    public,
                };
                answered(&request, &gw, &op, |r| match (r.outcome, r.topic) {
                    (LiveOutcome::Ok, Some(t)) => Ok(describe(&gw, &name, &Found::Custom(t))),
                    (LiveOutcome::Exists, _) => {
                        Err(r.error.unwrap_or_else(|| format!("topic {name:?} exists")))
                    }
                    (LiveOutcome::Limit, _) => Err(format!(
                        "one owner may have at most {MAX_TOPICS_PER_OWNER} topics"
                    )),
                    (_, _) => Err(unavailable(r.error.as_deref())),
                })
                .await
            }
            .boxed(),
        )
    }

    fn destroy(&self, request: Request) -> Action {
        let name = match request.topic(&["name", "topicName"]) {
            Ok(n) => n,
            Err(e) => return failed(&request, e),
        };
        let (gw, who) = (Arc::clone(&self.gw), Arc::clone(&self.who));
        Action::Await(
            async move {
                let op = LiveTopicOp::Destroy {
                    name: name.clone(),
                    caller: who.sub.clone(),
                    admin: who.admin,
                };
                let r = match ask(&gw, &op).await {
                    Ok(r) => r,
                    Err(e) => return failed(&request, e),
                };
                let error = match (r.outcome, r.topic) {
                    (LiveOutcome::Ok, Some(t)) => {
                        // Its subscribers hear it; the name's next topic has another
                        // subject, so they hear nothing of it.
                        let frame = event(&t.name, "destroy-topic", None, &json!({}));
                        let subject = gw.config.nats.subjects.live(&t.name, t.incarnation);
                        let answer = request.ok(json!({"topic": t.name}));
                        return publish_then_reply(subject, frame, answer);
                    }
                    (LiveOutcome::Absent, _) => no_topic(&name),
                    (LiveOutcome::Forbidden, _) => r.error.unwrap_or_else(|| {
                        format!("only the owner of {name:?} or an admin may destroy it")
                    }),
                    (_, _) => unavailable(r.error.as_deref()),
                };
                failed(&request, error)
            }
            .boxed(),
        )
    }

    /// `list-topic` (`after`, optional): the topics this socket may use, a page at a time;
    /// `more: true` and `next` (the `after` of the next page) when the list goes on.
    fn list(&self, request: Request) -> Action {
        let after = match request.attributes.get("after") {
            None | Some(Value::Null) => None,
            Some(_) => match request.topic(&["after"]) {
                Ok(name) => Some(name),
                Err(e) => return failed(&request, e),
            },
        };
        let (gw, who) = (Arc::clone(&self.gw), Arc::clone(&self.who));
        Action::Await(
            async move {
                let op = LiveTopicOp::List {
                    caller: who.sub.clone(),
                    admin: who.admin,
                    role: who.role.clone(),
                    after,
                };
                answered(&request, &gw, &op, |r| {
                    if r.outcome != LiveOutcome::Ok {
                        return Err(unavailable(r.error.as_deref()));
                    }
                    let tables = r.tables.iter().map(String::as_str);
                    let names: Vec<&str> = tables
                        .chain(r.topics.iter().map(|t| t.name.as_str()))
                        .collect();
                    let mut data = json!({"topics": names, "more": r.more});
                    if let (true, Some(last)) = (r.more, r.topics.last()) {
                        data["next"] = last.name.clone().into();
                    }
                    Ok(data)
                })
                .await
            }
            .boxed(),
        )
    }

    fn get(&self, request: Request) -> Action {
        let name = match request.topic(&["topicName", "name"]) {
            Ok(n) => n,
            Err(e) => return failed(&request, e),
        };
        let (gw, who) = (Arc::clone(&self.gw), Arc::clone(&self.who));
        Action::Await(
            async move {
                match find(&gw, &who, &name, true).await {
                    Ok(found) => reply(request.ok(describe(&gw, &name, &found))),
                    Err(e) => failed(&request, e),
                }
            }
            .boxed(),
        )
    }
}

/// `subscribe`'s `since` (a position): `None` when absent.
fn since(request: &Request) -> Result<Option<Resume>, String> {
    match request.attributes.get("since") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => match pgws_bus::parse_position(text) {
            Some((epoch, seq)) => Ok(Some(Resume::After {
                epoch: epoch.to_owned(),
                seq,
            })),
            None => Err("attribute \"since\" is not a position".to_owned()),
        },
        Some(_) => Err("attribute \"since\" must be a position (a string)".to_owned()),
    }
}

/// Whether every event after `since` is still kept (false without a history).
async fn recoverable(gw: &Gateway, since: &Resume) -> bool {
    let (Some(history), Resume::After { epoch, seq }) = (&gw.hub.history, since) else {
        return false;
    };
    history.servable(epoch, *seq).await.unwrap_or(false)
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// `get-topic`'s answer: `subscribers` counts this gateway's sockets on the topic (on a
/// table topic: those in the caller's permission class).
fn describe(gw: &Gateway, name: &str, found: &Found) -> Value {
    let subscribers = gw.hub.readers(&found.subject(gw));
    match found {
        Found::Custom(topic) => json!({
            "name": topic.name,
            "type": "custom",
            "owner": topic.owner,
            "public": topic.public,
            "subscribers": subscribers,
        }),
        Found::Table(_) => json!({
            "name": name,
            "type": "table",
            "owner": null,
            "subscribers": subscribers,
        }),
    }
}

fn table_written(name: &str) -> String {
    format!("{name:?} is a table topic: only the database writes to it")
}

fn no_topic(name: &str) -> String {
    format!("no topic named {name:?}")
}

fn unavailable(why: Option<&str>) -> String {
    format!("topics are unavailable now: {}", why.unwrap_or("no answer"))
}

/// The topic `name` if this socket may use it: a custom topic (its own of that name first,
/// then the public one), or (`read`) a table topic in the socket's class. A custom topic it may
/// not use is reported as absent, so private topics do not show (and another owner's private
/// topic does not keep this socket from creating one of the same name); a table topic it may
/// not read says why.
async fn find(gw: &Gateway, who: &Identity, name: &str, read: bool) -> Result<Found, String> {
    let op = LiveTopicOp::Get {
        name: name.to_owned(),
        reader: read.then(|| who.reader()),
        caller: who.sub.clone(),
    };
    let r = ask(gw, &op).await?;
    match (r.outcome, r.topic, r.class) {
        (LiveOutcome::Ok, Some(t), _) if t.open_to(who.sub.as_deref(), who.admin) => {
            Ok(Found::Custom(t))
        }
        (LiveOutcome::Ok, None, Some(class)) if read => Ok(Found::Table(class)),
        (LiveOutcome::Ok, Some(_), _) | (LiveOutcome::Absent, _, _) => Err(no_topic(name)),
        (LiveOutcome::Forbidden, _, _) => Err(r.error.unwrap_or_else(|| no_topic(name))),
        (_, _, _) => Err(unavailable(r.error.as_deref())),
    }
}

/// The reply to `request` from a bridge's answer to `op`: `ok:true` with the data `read`
/// makes of it, `ok:false` with its error text (or why no bridge answered).
async fn answered(
    request: &Request,
    gw: &Gateway,
    op: &LiveTopicOp,
    read: impl FnOnce(LiveTopicReply) -> Result<Value, String>,
) -> Action {
    match ask(gw, op).await.and_then(read) {
        Ok(data) => reply(request.ok(data)),
        Err(e) => failed(request, e),
    }
}

/// One topic request to a bridge, answered within [`ANSWER_WAIT`].
async fn ask(gw: &Gateway, op: &LiveTopicOp) -> Result<LiveTopicReply, String> {
    let body = serde_json::to_vec(op).map_err(|e| e.to_string())?;
    let subject = gw.config.nats.subjects.live_topics();
    let answer = tokio::time::timeout(ANSWER_WAIT, gw.client.request(subject, body.into())).await;
    match answer {
        Ok(Ok(m)) => serde_json::from_slice(&m.payload)
            .map_err(|e| unavailable(Some(&format!("unreadable answer: {e}")))),
        Ok(Err(e)) => Err(unavailable(Some(&e.to_string()))),
        Err(_) => Err(unavailable(Some("no bridge answered in time"))),
    }
}
