//! The stack's JetStream streams. The audit stream: the recorder owns it: it creates the
//! stream or brings it to the configured limits. A gateway only makes sure it exists, creating
//! it when no recorder has yet (so that it exists before the first client message), and never
//! changes one that does. The history stream (delivered messages, for sockets that resume):
//! the bridges own it, as they publish what it keeps; gateways only read it.

use std::time::Duration;

use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{Context, ErrorCode};
use pgws_config::{AuditConfig, HistoryConfig};
use pgws_proto::Subjects;

/// JetStream drops a record whose `Nats-Msg-Id` it saw within this window (gateway retries).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The stream's configuration for a stack.
pub fn audit_stream_config(subjects: &Subjects, audit: &AuditConfig) -> Config {
    Config {
        name: subjects.audit_stream(),
        subjects: vec![subjects.audit()],
        retention: RetentionPolicy::WorkQueue,
        discard: DiscardPolicy::New,
        max_bytes: audit.max_bytes,
        max_age: audit.max_age,
        duplicate_window: DUPLICATE_WINDOW,
        storage: StorageType::File,
        num_replicas: audit.replicas,
        ..Default::default()
    }
}

/// The history stream's configuration for a stack: it keeps every delivery for
/// `PGWS_HISTORY_SECONDS`, the oldest dropped beyond `PGWS_HISTORY_MAX_BYTES`.
pub fn history_stream_config(subjects: &Subjects, history: &HistoryConfig) -> Config {
    Config {
        name: subjects.history_stream(),
        subjects: subjects.history(),
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        max_bytes: history.max_bytes,
        max_age: history.max_age,
        // Table events carry an id (their change and subject): one the capture publishes
        // again after a failover is kept once.
        duplicate_window: history.max_age.min(DUPLICATE_WINDOW),
        storage: StorageType::File,
        num_replicas: history.replicas,
        ..Default::default()
    }
}

/// Creates the history stream, or brings it to the configured limits when it exists: a
/// bridge's part. Retries until it succeeds or `give_up` resolves.
pub async fn ensure_history_stream(
    js: &Context,
    subjects: &Subjects,
    history: &HistoryConfig,
    give_up: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    ensure_stream(js, history_stream_config(subjects, history), give_up).await
}

/// Creates the audit stream, or brings it to the configured limits when it exists: the
/// recorder's part, as the stream's owner. Retries until it succeeds or `give_up` resolves
/// (NATS may still be coming up).
pub async fn ensure_audit_stream(
    js: &Context,
    subjects: &Subjects,
    audit: &AuditConfig,
    give_up: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    ensure_stream(js, audit_stream_config(subjects, audit), give_up).await
}

/// Creates the stream of `config`, or brings an existing one to it, retrying until it
/// succeeds or `give_up` resolves: the owner's part.
async fn ensure_stream(
    js: &Context,
    config: Config,
    give_up: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    retrying(&config.name, give_up, || async {
        js.create_or_update_stream(config.clone())
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await
}

/// Makes sure the audit stream exists, never changing one that does: a gateway's part. The
/// stream is created with the configured limits only when it is missing (a gateway started
/// before any recorder), so a NATS user that may only read the stream's information (as the
/// shipped NATS authorization gives the gateways) waits here for the recorder to create it,
/// and no gateway can change the limits the recorder set. Retries until it succeeds or
/// `give_up` resolves.
pub async fn await_audit_stream(
    js: &Context,
    subjects: &Subjects,
    audit: &AuditConfig,
    give_up: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let config = audit_stream_config(subjects, audit);
    retrying(&config.name, give_up, || async {
        match js.get_stream(&config.name).await {
            Ok(_) => Ok(()),
            Err(e) if missing(&e) => js
                .create_stream(config.clone())
                .await
                .map(drop)
                .map_err(|e| format!("the stream does not exist and creating it failed: {e}")),
            // No answer: NATS is not there, or this user may not read the stream's information
            // (the NATS authorization shipped before gateways read it let them create the
            // stream instead). Creating it tells whether it exists; an existing stream is
            // never changed by a create.
            Err(info) => match js.create_stream(config.clone()).await {
                Ok(_) => Ok(()),
                Err(e) if exists(&e) => Ok(()),
                Err(e) => Err(format!("{info}; creating it: {e}")),
            },
        }
    })
    .await
}

/// The stream is not there (as opposed to NATS not answering).
fn missing(e: &async_nats::jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND
    )
}

/// A create found the stream there already (with other limits).
fn exists(e: &async_nats::jetstream::context::CreateStreamError) -> bool {
    matches!(
        e.kind(),
        CreateStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NAME_EXIST
    )
}

/// Runs `attempt` until it succeeds (backing off from 200 ms to 5 s, with a warning each
/// time) or `give_up` resolves.
async fn retrying<F, Fut>(
    stream: &str,
    give_up: impl std::future::Future<Output = ()>,
    mut attempt: F,
) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    tokio::pin!(give_up);
    let mut wait = Duration::from_millis(200);
    loop {
        match attempt().await {
            Ok(()) => {
                tracing::info!(stream, "stream ready");
                return Ok(());
            }
            Err(error) => tracing::warn!(stream, error, "stream not ready"),
        }
        tokio::select! {
            _ = &mut give_up => return Err(format!("gave up waiting for the stream {stream}")),
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}
