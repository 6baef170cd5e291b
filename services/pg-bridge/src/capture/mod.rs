//! Change capture for `/live` table topics: the leader bridge reads committed changes from a
//! logical replication slot (PostgreSQL's built-in `pgoutput` plugin, through SQL) and
//! publishes each change to the permission classes that may see it.
//!
//! - [`pgoutput`]: the decoder of the plugin's messages.
//! - [`events`]: transactions, rows, keys and event frames, without I/O.
//! - [`visibility`]: what a permission class may see of a batch, one query per table and class.
//! - [`duty`]: the loop: peek, check, publish, advance.

mod duty;
mod events;
pub(crate) mod pgoutput;
pub(crate) mod visibility;

pub(crate) use duty::Capture;
