//! fgbi: continuous-checkpoint high availability with fine-grained block identification.
//!
//! [`local`] replicates a protected program to a replica in the same process, through
//! the whole primary-to-backup path; [`staging`] holds the dirty pages copied out
//! during the pause. [`bench`] drives it over the synthetic workloads, every mode side
//! by side, and proves after every epoch that the replica equals the checkpoint.

pub mod bench;
pub mod local;
pub mod staging;
