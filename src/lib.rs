//! fgbi: continuous-checkpoint high availability with fine-grained block identification.
//!
//! The [`bench`] module drives the engine over the synthetic workloads, every mode
//! side by side, and proves after every epoch that the replica equals the primary.

pub mod bench;
