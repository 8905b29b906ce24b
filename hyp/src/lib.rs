//! What fgbi protects, behind one trait, and the workloads that exercise it.
//!
//! [`protected::Protected`] is what the replication loop drives: stop, harvest,
//! capture state, read memory, resume. [`synthetic::SyntheticMachine`] implements it
//! for the synthetic workloads and [`process::ProcessMemory`] for an application's
//! own memory regions; [`safepoint`] brings an application's threads to a
//! consistent stop.
//!
//! [`kvm::KvmVm`] implements it for KVM micro-VMs running small guest programs.
//! [`resp`] is the Redis protocol shared by the services built on them.
//!
//! [`memory`] maps the regions that hold protected memory and replicas.
//! [`workload`] holds the synthetic workloads named after the paper's benchmarks by
//! the memory behaviour they mimic; each writes into a memory region epoch by epoch
//! and reports the pages it wrote. [`tracking`] asks the kernel which pages of a region
//! were written, for programs that do not report their own writes.

pub mod cow;
pub mod feature;
pub mod kvm;
pub mod memory;
pub mod process;
pub mod protected;
pub mod resp;
pub mod safepoint;
pub mod synthetic;
pub mod trace;
pub mod tracking;
mod uffd;
pub mod workload;
