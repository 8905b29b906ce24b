//! What fgbi protects, and the workloads that exercise it.
//!
//! [`memory`] maps the regions that hold protected memory and replicas.
//! [`workload`] holds the synthetic workloads named after the paper's benchmarks by
//! the memory behaviour they mimic; each writes into a memory region epoch by epoch
//! and reports the pages it wrote. [`tracking`] asks the kernel which pages of a region
//! were written, for programs that do not report their own writes.

pub mod memory;
pub mod tracking;
pub mod workload;
