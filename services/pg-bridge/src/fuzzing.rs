//! Entry points for the fuzz targets in `fuzz/` (`cargo fuzz`; see `docs/security.md`), not
//! an API: hidden from the documentation, and the only door they have into the bridge.
//!
//! A NOTIFY request body comes from the bus, from whoever can publish on `<prefix>.notify`: it
//! is checked by [`validate_notify`] before anything reaches PostgreSQL, and the requests of
//! a batch are cut into transactions by [`plan_transactions`]. Both are the bridge's own
//! functions, unchanged. So is the decoder of the logical replication messages PostgreSQL
//! sends for change capture ([`decode_pgoutput`], [`pgoutput_value_json`]).

use pgws_proto::{Notification, NotifyRequest};

use crate::batch;
use crate::capture::pgoutput;

/// The bridge's check of a NOTIFY request body; the error is the text of the reply.
pub fn validate_notify(body: &[u8]) -> Result<NotifyRequest, String> {
    batch::validate(body).map_err(|e| e.to_string())
}

/// The transactions the bridge would execute `requests` in, in order: `(request,
/// notification)` indexes.
pub fn plan_transactions(requests: &[&[Notification]]) -> Vec<Vec<(usize, usize)>> {
    batch::plan(requests.iter().copied())
}

/// One pgoutput message (a row's `data` from a logical replication slot) as the bridge's
/// decoder reads it, in the message's serde form as JSON (`{"Insert":{"relation":16389,
/// "new":["Null","UnchangedToast",{"Text":"1"}]}}`, `{"Other":89}`); the error is its text.
pub fn decode_pgoutput(data: &[u8]) -> Result<serde_json::Value, String> {
    let message = pgoutput::decode(data).map_err(|e| e.to_string())?;
    serde_json::to_value(message).map_err(|e| e.to_string())
}

/// A column's text value of type `type_oid` as the bridge shows it in JSON.
pub fn pgoutput_value_json(type_oid: u32, text: &str) -> serde_json::Value {
    pgoutput::to_json(type_oid, text)
}
