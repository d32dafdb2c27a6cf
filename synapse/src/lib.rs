//! fedsend as a `federation_sender` instance of a Synapse deployment on PostgreSQL and Redis:
//! reading Synapse's configuration, following its replication stream, and answering the core's
//! storage boundary from Synapse's own tables.

pub mod config;
pub mod pg;
pub mod replication;
pub mod redis_link;
pub mod http_gap;
