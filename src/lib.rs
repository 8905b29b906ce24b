//! fgbi: continuous-checkpoint high availability with fine-grained block identification.
//!
//! [`replicator`] protects an application's own memory regions and checkpoints them
//! continuously on an epoch thread. [`local`] replicates a protected program to a replica in the same process, through
//! the whole primary-to-backup path; [`staging`] holds the dirty pages copied out
//! during the pause. [`bench`] drives it over the synthetic workloads, every mode side
//! by side, and proves after every epoch that the replica equals the checkpoint.
//! [`percentiles`] summarises timing samples.
//! [`capi`] is the C API over the replicator, declared by `include/fgbi.h`.
//! [`primary`] and [`backup`] are the two sides of replication between hosts, over
//! the transport (the replicator sends to a backup through the same
//! [`primary::Link`]); [`checkpoint`] is the work inside the pause they share;
//! [`restart`] hands a backup's replica to a restarted program without copying it;
//! [`fault`] is the test hook that kills a primary at a chosen point.

pub mod backup;
pub mod bench;
pub mod capi;
pub mod checkpoint;
pub mod fault;
pub mod fence;
pub mod input_log;
pub mod local;
pub mod metrics;
pub mod percentiles;
pub mod precopy;
pub mod primary;
pub mod replicator;
pub mod restart;
pub mod staging;
