//! fedsend as a `federation_sender` instance of a Synapse deployment on PostgreSQL and Redis:
//! reading Synapse's configuration, following its replication stream, and answering the core's
//! storage boundary from Synapse's own tables.

pub mod config;
pub mod http_gap;
pub mod pg;
pub mod redis_link;
pub mod replication;
