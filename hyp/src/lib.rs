//! What fgbi protects, and the workloads that exercise it.
//!
//! [`memory`] maps the regions that hold protected memory and replicas.
//! [`workload`] holds the synthetic workloads named after the paper's benchmarks by
//! the memory behaviour they mimic; each writes into a memory region epoch by epoch
//! and reports the pages it wrote.

pub mod memory;
pub mod safepoint;
pub mod workload;
