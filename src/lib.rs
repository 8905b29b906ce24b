//! fgbi: continuous-checkpoint high availability with fine-grained block identification.
//!
//! [`replicator`] protects an application's own memory regions and checkpoints them
//! continuously on an epoch thread. [`local`] replicates a protected program to a replica in the same process, through
//! the whole primary-to-backup path; [`staging`] holds the dirty pages copied out
//! during the pause. [`bench`] drives it over the synthetic workloads, every mode side
//! by side, and proves after every epoch that the replica equals the checkpoint.
//! [`percentiles`] summarises timing samples.
//! [`capi`] is the C API over the replicator, declared by `include/fgbi.h`.
//! [`primary`] and [`backup`] are the replication loops between hosts, over the
//! transport; [`checkpoint`] is the work inside the pause they share.

pub mod backup;
pub mod bench;
pub mod capi;
pub mod checkpoint;
pub mod local;
pub mod percentiles;
pub mod primary;
pub mod replicator;
pub mod staging;
