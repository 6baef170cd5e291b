//! Entry points for the fuzz targets in `fuzz/` (`cargo fuzz`; see `docs/security.md`), not
//! an API: hidden from the documentation, and the only door they have into the bridge.
//!
//! A NOTIFY request body comes from NATS, from whoever can publish on `<prefix>.notify`: it
//! is checked by [`validate_notify`] before anything reaches PostgreSQL, and the requests of
//! a batch are cut into transactions by [`plan_transactions`]. Both are the bridge's own
//! functions, unchanged.

use pgws_proto::{Notification, NotifyRequest};

use crate::batch;

/// The bridge's check of a NOTIFY request body; the error is the text of the reply.
pub fn validate_notify(body: &[u8]) -> Result<NotifyRequest, String> {
    batch::validate(body).map_err(|e| e.to_string())
}

/// The transactions the bridge would execute `requests` in, in order: `(request,
/// notification)` indexes.
pub fn plan_transactions(requests: &[&[Notification]]) -> Vec<Vec<(usize, usize)>> {
    batch::plan(requests.iter().copied())
}
