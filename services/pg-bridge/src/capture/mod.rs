//! Change capture: reading a table's committed changes from a logical replication slot.

pub(crate) mod pgoutput;
