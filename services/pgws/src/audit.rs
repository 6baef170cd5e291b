//! The audit in one process: the recorder's statement, run by the bridge in the transaction
//! that NOTIFYs the messages it records.

use pgws_proto::Notification;
use tokio_postgres::types::ToSql;

/// The recorder's in-transaction writer as the bridge's audit hook.
pub(crate) struct InTransaction(pub(crate) pg_recorder::InTransaction);

impl pg_bridge::TxAudit for InTransaction {
    fn sql(&self) -> &str {
        self.0.sql()
    }

    fn params(&self, records: &[Notification]) -> Vec<Box<dyn ToSql + Sync + Send>> {
        self.0.params(records)
    }

    fn copy_sql(&self) -> Option<&str> {
        self.0.copy_sql()
    }

    fn copy(&self, records: &[Notification]) -> Option<bytes::Bytes> {
        self.0.copy(records)
    }
}
