//! Change capture for `/live` table topics: the leader bridge reads committed changes from a
//! logical replication slot (PostgreSQL's built-in `pgoutput` plugin, streamed over the
//! replication protocol) and publishes each change to the permission classes that may see it.
//!
//! - [`pgoutput`]: the decoder of the plugin's messages.
//! - [`events`]: transactions, rows, keys and event frames, without I/O.
//! - [`visibility`]: what a permission class may see of a batch, one query per table and class.
//! - [`replication`]: the walsender connection: start-up, the stream, status updates.
//! - [`duty`]: the loop: read, check, publish, confirm.

mod duty;
mod events;
pub(crate) mod pgoutput;
mod replication;
pub(crate) mod visibility;

pub(crate) use duty::Capture;
