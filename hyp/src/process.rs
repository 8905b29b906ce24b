//! Protecting an application's own memory: one or more regions it allocates from
//! fgbi, written by its threads, tracked by the kernel, stopped at safepoints.
//!
//! [`protect`] returns two halves. The application keeps the [`ProcessHandle`]: the
//! regions' addresses, safepoint registration for its threads, and the restart record
//! (state blob) it wants to travel with each epoch. The replication loop keeps the
//! [`ProcessMemory`], which implements [`Protected`]. The regions are laid out back to
//! back, each starting on a 2 MiB boundary, in one mapping backed by huge pages where
//! the host allows; to the replica they are one flat memory image.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cow::CowTracker;
use crate::memory::{HUGE_PAGE, Region};
use crate::protected::{HypError, Protected};
use crate::safepoint::{Safepoint, Safepoints};
pub use crate::tracking::PageSafety;
use crate::tracking::RegionTracker;

/// Where one protected region lies in the flat protected memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionLayout {
    /// Byte offset in protected memory (a multiple of 2 MiB).
    pub offset: usize,
    /// Length in bytes, as asked for.
    pub len: usize,
}

/// Lays out regions of the given sizes back to back on 2 MiB boundaries; returns the
/// layout and the total size.
pub fn layout(sizes: &[usize]) -> Result<(Vec<RegionLayout>, usize), HypError> {
    let mut offset = 0usize;
    let mut out = Vec::with_capacity(sizes.len());
    for &len in sizes {
        if len == 0 {
            return Err(HypError::Layout("a protected region is empty"));
        }
        out.push(RegionLayout { offset, len });
        offset = len
            .checked_next_multiple_of(HUGE_PAGE)
            .and_then(|l| offset.checked_add(l))
            .ok_or(HypError::Layout("the regions exceed the address space"))?;
    }
    if out.is_empty() {
        return Err(HypError::Layout("no region was asked for"));
    }
    Ok((out, offset))
}

struct Shared {
    region: Region,
    base: *mut u8,
    layout: Vec<RegionLayout>,
    state: Mutex<Vec<u8>>,
    safepoints: Safepoints,
}

// SAFETY: `base` points into `region`'s mapping, which lives as long as `Shared`.
// The application writes through it from its threads, and the replication loop reads
// through it only while every application thread is parked at a safepoint (the
// `Protected` contract), the mutex and condition variable of `Safepoints` ordering
// those accesses.
unsafe impl Send for Shared {}
// SAFETY: as above; all other fields are Sync.
unsafe impl Sync for Shared {}

/// Protects regions of the given sizes, stopping the application's threads within
/// `stop_timeout` at each checkpoint, with [`PageSafety::Copy`].
pub fn protect(
    sizes: &[usize],
    stop_timeout: Duration,
) -> Result<(ProcessHandle, ProcessMemory), HypError> {
    protect_with(sizes, stop_timeout, PageSafety::Copy)
}

/// Protects regions of the given sizes, stopping the application's threads within
/// `stop_timeout` at each checkpoint, keeping checkpoints safe as `safety` says.
pub fn protect_with(
    sizes: &[usize],
    stop_timeout: Duration,
    safety: PageSafety,
) -> Result<(ProcessHandle, ProcessMemory), HypError> {
    let (layout, total) = layout(sizes)?;
    let mut region = Region::new(total)?;
    let base = region.as_mut_ptr();
    // Tracking starts before the application writes anything.
    // SAFETY: `Shared` keeps the region mapped for as long as the `ProcessMemory`
    // holding the tracker lives (the tracker is declared before `shared` there, so
    // dropped first), and the checkpointer finishes or drops every snapshot it arms
    // within one checkpoint.
    let tracker = unsafe { RegionTracker::new(&mut region, safety) }?;
    let shared = Arc::new(Shared {
        region,
        base,
        layout,
        state: Mutex::new(Vec::new()),
        safepoints: Safepoints::new(),
    });
    Ok((
        ProcessHandle {
            shared: Arc::clone(&shared),
        },
        ProcessMemory {
            shared,
            tracker,
            stop_timeout,
            stopped: false,
        },
    ))
}

/// The application's half: its regions, safepoints and restart record.
#[derive(Clone)]
pub struct ProcessHandle {
    shared: Arc<Shared>,
}

impl ProcessHandle {
    /// Number of protected regions.
    pub fn regions(&self) -> usize {
        self.shared.layout.len()
    }

    /// Start address and length of region `index`, if it exists. The memory is
    /// zero-filled, writable, and lives as long as any handle or the
    /// [`ProcessMemory`] does.
    pub fn region(&self, index: usize) -> Option<(*mut u8, usize)> {
        let r = self.shared.layout.get(index)?;
        // The offset lies inside the mapping by construction of the layout.
        Some((self.shared.base.wrapping_add(r.offset), r.len))
    }

    /// Registers a thread that writes protected memory.
    pub fn register(&self, name: &str) -> Safepoint {
        self.shared.safepoints.register(name)
    }

    /// Sets the restart record that travels with the next epochs (the iteration
    /// number, a cursor: whatever the application's restart code needs).
    pub fn set_state(&self, blob: &[u8]) {
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        state.clear();
        state.extend_from_slice(blob);
    }

    /// What backs the protected memory.
    pub fn backing(&self) -> crate::memory::Backing {
        self.shared.region.backing()
    }
}

/// The replication loop's half: the protected memory as a [`Protected`] program.
pub struct ProcessMemory {
    // Declared first: dropped (protection lifted, handler stopped) before the memory.
    tracker: RegionTracker,
    shared: Arc<Shared>,
    stop_timeout: Duration,
    stopped: bool,
}

impl ProcessMemory {
    /// The regions' layout in protected memory.
    pub fn layout(&self) -> &[RegionLayout] {
        &self.shared.layout
    }
}

impl Protected for ProcessMemory {
    fn mem_bytes(&self) -> u64 {
        self.shared.region.len() as u64
    }

    fn stop(&mut self) -> Result<(), HypError> {
        self.shared.safepoints.stop(self.stop_timeout)?;
        self.stopped = true;
        Ok(())
    }

    fn harvest(&mut self, dirty: &mut Vec<u64>) -> Result<(), HypError> {
        if !self.stopped {
            return Err(HypError::Order("harvest while running"));
        }
        self.tracker.harvest(dirty)
    }

    fn capture_state(&mut self, out: &mut Vec<u8>) -> Result<(), HypError> {
        let state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        out.extend_from_slice(&state);
        Ok(())
    }

    fn memory(&self) -> &[u8] {
        // SAFETY: `base` and the length describe the live mapping owned by `shared`.
        // The contents are only meaningful (and only read by the replication loop)
        // while the application's threads are parked, per the `Protected` contract.
        unsafe { std::slice::from_raw_parts(self.shared.base, self.shared.region.len()) }
    }

    fn resume(&mut self) -> Result<(), HypError> {
        if !self.stopped {
            return Err(HypError::Order("resume while running"));
        }
        self.stopped = false;
        self.shared.safepoints.resume()?;
        Ok(())
    }

    fn copy_on_write(&self) -> Option<&CowTracker> {
        self.tracker.copy_on_write()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_laid_out_on_huge_page_boundaries() {
        let (l, total) = layout(&[100, 3 << 20, 4096]).unwrap();
        assert_eq!(
            l,
            vec![
                RegionLayout {
                    offset: 0,
                    len: 100
                },
                RegionLayout {
                    offset: 2 << 20,
                    len: 3 << 20
                },
                RegionLayout {
                    offset: 6 << 20,
                    len: 4096
                },
            ]
        );
        assert_eq!(total, 8 << 20);
        assert!(layout(&[]).is_err());
        assert!(layout(&[0]).is_err());
        assert!(layout(&[usize::MAX]).is_err());
    }
}
