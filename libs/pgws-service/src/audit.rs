//! The audit stream: created (or brought to the configured limits) by whichever service starts
//! first, so it exists before the first client message is sent.

use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::Context;
use pgws_config::AuditConfig;
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

/// Creates the audit stream, or updates its limits when it exists; retries until it succeeds
/// or `give_up` resolves (NATS may still be coming up).
pub async fn ensure_audit_stream(
    js: &Context,
    subjects: &Subjects,
    audit: &AuditConfig,
    give_up: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let config = audit_stream_config(subjects, audit);
    tokio::pin!(give_up);
    let mut wait = Duration::from_millis(200);
    loop {
        match js.create_or_update_stream(config.clone()).await {
            Ok(_) => {
                tracing::info!(stream = config.name, "audit stream ready");
                return Ok(());
            }
            Err(e) => tracing::warn!(stream = config.name, error = %e, "audit stream not ready"),
        }
        tokio::select! {
            _ = &mut give_up => return Err("gave up creating the audit stream".to_owned()),
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}
