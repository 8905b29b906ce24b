//! The one trait the replication loop drives, whatever is protected.
//!
//! Per epoch the primary calls, in order: [`Protected::stop`], [`Protected::harvest`],
//! [`Protected::capture_state`], reads [`Protected::memory`] (or copies the dirty
//! pages out of it, or arms them copy-on-write with [`Protected::copy_on_write`]), then
//! [`Protected::resume`]. The time between `stop` and `resume` is type II downtime:
//! the loop keeps everything else out of it.

use thiserror::Error;

use crate::cow::{CowError, CowTracker};
use crate::kvm::KvmError;
use crate::memory::MemoryError;
use crate::safepoint::SafepointError;
use crate::tracking::TrackingError;
use crate::workload::WorkloadError;

/// Why a protected program could not be stopped, harvested, or resumed.
#[derive(Debug, Error)]
pub enum HypError {
    /// The program's threads did not reach a consistent point.
    #[error(transparent)]
    Safepoint(#[from] SafepointError),
    /// Protected memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A synthetic workload could not be created.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// The kernel's dirty tracking failed.
    #[error(transparent)]
    Tracking(#[from] TrackingError),
    /// Copy-on-write snapshots failed.
    #[error(transparent)]
    Cow(#[from] CowError),
    /// A KVM micro-VM failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The kernel's dirty pages and the program's own record of its writes disagree.
    #[error(
        "dirty tracking check failed: the kernel missed {missed} written page(s) (first: {first_missed:?}) and reported {extra} page(s) never written (first: {first_extra:?})"
    )]
    TrackingMismatch {
        /// Pages written but not reported by the kernel.
        missed: usize,
        /// The first of them.
        first_missed: Option<u64>,
        /// Pages reported but never written.
        extra: usize,
        /// The first of them.
        first_extra: Option<u64>,
    },
    /// The regions asked for cannot be laid out.
    #[error(
        "{0}: protect one or more regions of at least one byte each, together within the address space"
    )]
    Layout(&'static str),
    /// A state blob cannot be restored.
    #[error(
        "{0}: restore only from the state blob committed with the replica's epoch, by the same fgbi version"
    )]
    State(&'static str),
    /// An operation was called out of order (e.g. harvest while running).
    #[error("{0}: the replication loop must stop before harvesting and resume after")]
    Order(&'static str),
}

/// Something fgbi protects: a process's memory regions, a virtual machine, a
/// synthetic or recorded workload.
pub trait Protected {
    /// Bytes of protected memory, a multiple of 4 KiB.
    fn mem_bytes(&self) -> u64;

    /// Brings the program to a stop at a consistent point (an epoch boundary).
    fn stop(&mut self) -> Result<(), HypError>;

    /// Appends the 4 KiB pages written since the previous harvest and starts tracking
    /// anew. Called while stopped: a page written after the harvest belongs to the
    /// next one, never to none. The first harvest reports every page that may differ
    /// from zero (all of them for a program restored from a replica), so that a
    /// backup starting from an empty replica receives everything.
    fn harvest(&mut self, dirty: &mut Vec<u64>) -> Result<(), HypError>;

    /// Appends the opaque machine-state blob (registers and devices, or an
    /// application's restart record). Called while stopped.
    fn capture_state(&mut self, out: &mut Vec<u8>) -> Result<(), HypError>;

    /// The protected memory as one flat image, page `n` at byte `n * 4096`. Its
    /// contents are the checkpoint only while stopped.
    fn memory(&self) -> &[u8];

    /// Lets the program run again.
    fn resume(&mut self) -> Result<(), HypError>;

    /// The copy-on-write tracker of the program's memory, when it was set up with one:
    /// the replication loop then arms the harvested pages with it during the pause
    /// and copies them out after [`resume`](Self::resume), instead of copying them
    /// while the program is stopped.
    fn copy_on_write(&self) -> Option<&CowTracker> {
        None
    }
}
