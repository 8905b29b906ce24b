//! Protecting an application's own memory: one or more regions it allocates from
//! fgbi, written by its threads, tracked by the kernel, stopped at safepoints.
//!
//! [`protect`] returns two halves. The application keeps the [`ProcessHandle`]: the
//! regions' addresses, safepoint registration for its threads, and the restart record
//! (state blob) it wants to travel with each epoch. The replication loop keeps the
//! [`ProcessMemory`], which implements [`Protected`]. The regions are laid out back to
//! back, each starting on a 2 MiB boundary, in one mapping backed by huge pages where
//! the host allows; to the replica they are one flat memory image.
//!
//! The state blob each checkpoint captures is the regions' layout followed by the
//! application's restart record ([`parse_state`] splits it), so whoever holds a
//! replica knows where its regions lie.
//!
//! Output commit: every checkpoint closes an *output epoch*. Whatever the application
//! produces for the outside world (a reply to a client) while
//! [`ProcessHandle::output_epoch`] says `n` depends on memory that the checkpoint
//! closing epoch `n` captures; it may leave the process once the replication loop
//! has reported that checkpoint committed ([`ProcessHandle::wait_committed`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

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

/// First bytes of a protected process's state blob.
const STATE_MAGIC: &[u8; 8] = b"FGBIPRC1";
/// Most regions a state blob may describe.
const MAX_REGIONS: usize = 4096;

/// Splits a protected process's state blob (as captured by
/// [`ProcessMemory::capture_state`]) into the regions' layout and the application's
/// restart record. An empty blob (nothing committed yet) is an error.
pub fn parse_state(blob: &[u8]) -> Result<(Vec<RegionLayout>, &[u8]), HypError> {
    let bad = HypError::State;
    let rest = blob
        .strip_prefix(STATE_MAGIC)
        .ok_or(bad("the state blob is not a protected process's state"))?;
    let word = |at: usize| -> Option<u64> {
        let bytes = rest.get(at..at + 8)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    };
    let count = word(0)
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| (1..=MAX_REGIONS).contains(&n))
        .ok_or(bad("the state blob's region count is out of range"))?;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let (offset, len) = word(8 + 16 * i)
            .zip(word(16 + 16 * i))
            .ok_or(bad("the state blob ends inside its region table"))?;
        let (offset, len) = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(len).ok())
            .filter(|&(o, l)| l > 0 && o % HUGE_PAGE == 0 && o.checked_add(l).is_some())
            .ok_or(bad("the state blob describes an impossible region"))?;
        if out
            .last()
            .is_some_and(|r: &RegionLayout| r.offset + r.len > offset)
        {
            return Err(bad("the state blob's regions overlap or are out of order"));
        }
        out.push(RegionLayout { offset, len });
    }
    Ok((out, &rest[8 + 16 * count..]))
}

/// Appends the state blob of a process with regions `layout` and restart record
/// `record` to `out`.
fn write_state(layout: &[RegionLayout], record: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&(layout.len() as u64).to_le_bytes());
    for r in layout {
        out.extend_from_slice(&(r.offset as u64).to_le_bytes());
        out.extend_from_slice(&(r.len as u64).to_le_bytes());
    }
    out.extend_from_slice(record);
}

/// Output epochs: the one being produced, and the highest committed.
struct Outputs {
    /// The output epoch now open; starts at 1, and each checkpoint's stop closes it.
    open: AtomicU64,
    /// Highest output epoch whose checkpoint is committed (`u64::MAX` once
    /// protection has ended and everything is released).
    committed: Mutex<u64>,
    changed: Condvar,
}

impl Outputs {
    fn commit(&self, epoch: u64) {
        let mut committed = self
            .committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if epoch > *committed {
            *committed = epoch;
            self.changed.notify_all();
        }
    }
}

struct Shared {
    region: Region,
    base: *mut u8,
    layout: Vec<RegionLayout>,
    state: Mutex<Vec<u8>>,
    safepoints: Safepoints,
    outputs: Outputs,
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
        outputs: Outputs {
            open: AtomicU64::new(1),
            committed: Mutex::new(0),
            changed: Condvar::new(),
        },
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
            closed: 0,
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

    /// The output epoch now open: an output produced now (a reply computed from the
    /// regions) belongs to it, and may leave the process once
    /// [`ProcessHandle::committed_epoch`] reaches it. One atomic load. Read it
    /// between two safepoint passes that enclose the work the output depends on.
    pub fn output_epoch(&self) -> u64 {
        self.shared.outputs.open.load(Ordering::Acquire)
    }

    /// The highest output epoch whose checkpoint the replica has committed (0:
    /// none yet; `u64::MAX` once protection has ended).
    pub fn committed_epoch(&self) -> u64 {
        *self
            .shared
            .outputs
            .committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits up to `timeout` until output epoch `epoch` is committed; true if it is.
    /// The waiting thread must not hold back a checkpoint: call this outside
    /// protected memory (from a thread without a safepoint, or within
    /// [`Safepoint::outside`]).
    pub fn wait_committed(&self, epoch: u64, timeout: Duration) -> bool {
        let outputs = &self.shared.outputs;
        let deadline = Instant::now() + timeout;
        let mut committed = outputs
            .committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while *committed < epoch {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            committed = outputs
                .changed
                .wait_timeout(committed, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// The replication loop's half: the protected memory as a [`Protected`] program.
pub struct ProcessMemory {
    // Declared first: dropped (protection lifted, handler stopped) before the memory.
    tracker: RegionTracker,
    shared: Arc<Shared>,
    stop_timeout: Duration,
    stopped: bool,
    /// The output epoch the last stop closed.
    closed: u64,
}

impl ProcessMemory {
    /// The regions' layout in protected memory.
    pub fn layout(&self) -> &[RegionLayout] {
        &self.shared.layout
    }

    /// The output epoch closed by the last checkpoint's stop (0 before the first):
    /// once that checkpoint is committed, pass this to
    /// [`ProcessMemory::commit_outputs`].
    pub fn closed_output_epoch(&self) -> u64 {
        self.closed
    }

    /// Releases every output of epochs up to `epoch`: their checkpoint is committed
    /// (or, while no backup holds a replica, the process runs unprotected and holds
    /// nothing back).
    pub fn commit_outputs(&self, epoch: u64) {
        self.shared.outputs.commit(epoch);
    }

    /// A handle that releases outputs as [`ProcessMemory::commit_outputs`] does, for
    /// code that hears of commits while the memory is borrowed for a checkpoint.
    pub fn output_release(&self) -> OutputRelease {
        OutputRelease(Arc::clone(&self.shared))
    }
}

/// Releases a protected process's held outputs ([`ProcessMemory::output_release`]).
pub struct OutputRelease(Arc<Shared>);

impl OutputRelease {
    /// Releases every output of epochs up to `epoch`.
    pub fn commit(&self, epoch: u64) {
        self.0.outputs.commit(epoch);
    }
}

impl Drop for ProcessMemory {
    /// Protection ends: nothing will be committed any more, so nothing is held back.
    fn drop(&mut self) {
        self.shared.outputs.commit(u64::MAX);
    }
}

impl Protected for ProcessMemory {
    fn mem_bytes(&self) -> u64 {
        self.shared.region.len() as u64
    }

    fn stop(&mut self) -> Result<(), HypError> {
        self.shared.safepoints.stop(self.stop_timeout)?;
        self.stopped = true;
        // Every thread is parked: whatever they produced so far is in this checkpoint.
        self.closed = self.shared.outputs.open.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn harvest(&mut self, dirty: &mut Vec<u64>) -> Result<(), HypError> {
        if !self.stopped {
            return Err(HypError::Order("harvest while running"));
        }
        self.tracker.harvest(dirty)
    }

    /// The regions' layout, then the application's restart record ([`parse_state`]).
    fn capture_state(&mut self, out: &mut Vec<u8>) -> Result<(), HypError> {
        let state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        write_state(&self.shared.layout, &state, out);
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

    #[test]
    fn the_state_blob_carries_the_layout_and_the_record() {
        let (l, _) = layout(&[100, 3 << 20]).unwrap();
        let mut blob = Vec::new();
        write_state(&l, b"record", &mut blob);
        let (parsed, record) = parse_state(&blob).unwrap();
        assert_eq!(parsed, l);
        assert_eq!(record, b"record");
        for cut in [0, 8, 16, 30, blob.len() - 7] {
            let truncated = parse_state(&blob[..cut]).map(|(l, _)| l.len());
            assert!(cut >= blob.len() - 6 || truncated.is_err(), "{cut}");
        }
        let mut overlapping = blob.clone();
        overlapping[24..32].copy_from_slice(&(4u64 << 20).to_le_bytes());
        assert!(parse_state(&overlapping).is_err());
        assert!(parse_state(b"FGBSYN1\0").is_err());
    }

    #[test]
    fn outputs_are_released_in_epoch_order_and_all_at_the_end() {
        if !crate::feature::available(
            "kernel dirty tracking",
            crate::tracking::DirtyTracker::probe(),
        ) {
            return;
        }
        let (handle, mut memory) = protect(&[4096], Duration::from_secs(1)).unwrap();
        assert_eq!(handle.output_epoch(), 1);
        memory.stop().unwrap();
        assert_eq!(memory.closed_output_epoch(), 1);
        memory.resume().unwrap();
        assert_eq!(handle.output_epoch(), 2);
        assert!(!handle.wait_committed(1, Duration::from_millis(1)));
        memory.commit_outputs(1);
        assert!(handle.wait_committed(1, Duration::ZERO));
        assert!(!handle.wait_committed(2, Duration::from_millis(1)));
        let waiter = {
            let handle = handle.clone();
            std::thread::spawn(move || handle.wait_committed(2, Duration::from_secs(30)))
        };
        drop(memory);
        assert!(
            waiter.join().unwrap(),
            "the end of protection releases everything"
        );
        assert_eq!(handle.committed_epoch(), u64::MAX);
    }
}
