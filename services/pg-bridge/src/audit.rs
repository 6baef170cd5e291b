//! The audit written by the bridge itself, in the transaction that NOTIFYs the messages: for a
//! process running every role (no audit stream between the gateway and a recorder), where the
//! gateway puts its messages' audit records in the NOTIFY request
//! ([`pgws_proto::NotifyRequest::records`]).
//!
//! Given to [`crate::run_on`], a [`TxAudit`] is prepared on every NOTIFY connection (again after
//! each reconnect, like the NOTIFY statement). Each transaction of a batch then executes it
//! once, before its NOTIFYs and inside the same `BEGIN`..`COMMIT` pipeline, with the records
//! whose message that transaction NOTIFYs ([`crate::batch::audit_plan`]); a transaction with
//! no such record does not execute it. So a record commits exactly when its message's NOTIFY
//! does, and an audit statement that fails fails its transaction as a failed NOTIFY does:
//! nothing of it commits and its requests are answered `failed` (the gateway retries them).
//!
//! Parameters that do not fit the prepared statement (their number or types) fail the
//! transaction before anything of it is sent.
//!
//! A [`TxAudit`] may also offer a binary `COPY` ([`TxAudit::copy`]), cheaper for PostgreSQL
//! than a statement but unable to skip a row that exists: the transaction then writes with it
//! (one round trip more: `BEGIN` and the `COPY` go first, its data, the NOTIFYs and `COMMIT`
//! when PostgreSQL is ready for the data). When the `COPY` meets a row that exists (unique
//! violation) or that it cannot place (check violation, e.g. a day without partition), the
//! transaction rolls back as any failed one does and is run again at once with the statement.

use bytes::{Bytes, BytesMut};
use pgws_proto::Notification;
use tokio_postgres::types::ToSql;
use tokio_postgres::Statement;

/// Audit rows written in the transaction that NOTIFYs their messages.
///
/// A retried request whose NOTIFYs already committed (skipped by the bridge's at-most-once
/// keys) writes its records again in the retry's transaction: the statement must be idempotent
/// by message id (e.g. `ON CONFLICT (id) DO NOTHING`).
pub trait TxAudit: Send + Sync + 'static {
    /// One statement recording `records` (each: the message id, the channel NOTIFYed, the envelope).
    fn sql(&self) -> &str;
    /// Its parameters for `records` (never empty).
    fn params(&self, records: &[Notification]) -> Vec<Box<dyn ToSql + Sync + Send>>;
    /// A `COPY ... FROM STDIN (FORMAT binary)` that records messages none of which is written
    /// yet, when there is one (prepared on every NOTIFY connection, as [`TxAudit::sql`] is).
    fn copy_sql(&self) -> Option<&str> {
        None
    }
    /// The `COPY`'s data for `records` (never empty), or `None` when the statement must write
    /// them.
    fn copy(&self, _records: &[Notification]) -> Option<Bytes> {
        None
    }
}

/// How one transaction writes its audit records.
pub(crate) enum AuditWrite {
    /// The statement, with its parameters.
    Statement(AuditArgs),
    /// The `COPY`, with its data.
    Copy(Bytes),
}

/// Whether a failed transaction whose audit was a `COPY` is to run again with the statement:
/// the `COPY` met a row that exists, or one it cannot place.
pub(crate) fn copy_refused(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(
        e.code(),
        Some(c) if *c == SqlState::UNIQUE_VIOLATION || *c == SqlState::CHECK_VIOLATION
    )
}

/// The audit statement of one transaction, with its parameters.
pub(crate) struct AuditArgs {
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl AuditArgs {
    /// The parameters of `audit` for `records`, checked against `statement` (their number, and
    /// each value encoded as the statement's type), so that the statement cannot fail on the
    /// client once the transaction's other statements are on their way.
    pub(crate) fn new(
        audit: &dyn TxAudit,
        statement: &Statement,
        records: &[Notification],
    ) -> Result<Self, String> {
        let params = audit.params(records);
        let types = statement.params();
        if params.len() != types.len() {
            return Err(format!(
                "the audit statement takes {} parameters, given {}",
                types.len(),
                params.len()
            ));
        }
        let mut scratch = BytesMut::new();
        for (i, (param, ty)) in params.iter().zip(types).enumerate() {
            scratch.clear();
            param
                .to_sql_checked(ty, &mut scratch)
                .map_err(|e| format!("audit parameter ${}: {e}", i + 1))?;
        }
        Ok(Self { params })
    }

    /// The parameters as a statement takes them.
    pub(crate) fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| &**p as &(dyn ToSql + Sync))
            .collect()
    }
}
