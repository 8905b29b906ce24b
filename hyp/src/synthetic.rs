//! A synthetic workload as a protected program: it runs one epoch of writes per
//! [`SyntheticMachine::run`], in memory of its own. Its dirty pages come from the
//! kernel ([`Tracking::Kernel`], userfaultfd write-protect; [`Tracking::CopyOnWrite`],
//! the same in synchronous mode, with copy-on-write checkpoints) or from its own
//! record of what it wrote ([`Tracking::Generator`]); with checking on, every kernel
//! harvest compares the two and fails if they differ.

use std::str::FromStr;

use crate::cow::CowTracker;
use crate::memory::{Backing, Region};
use crate::protected::{HypError, Protected};
use crate::tracking::{PageSafety, RegionTracker};
use crate::workload::{self, PAGE, Workload};

/// First bytes of a synthetic machine's state blob.
const STATE_MAGIC: &[u8] = b"FGBSYN1\0";

/// Where a synthetic machine's dirty pages come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracking {
    /// The kernel: userfaultfd write-protect and PAGEMAP_SCAN.
    Kernel,
    /// The kernel, with copy-on-write checkpoints ([`crate::cow`]).
    CopyOnWrite,
    /// The workload's own list of the pages it wrote.
    Generator,
}

impl Tracking {
    /// Every variant.
    pub const ALL: [Tracking; 3] = [Tracking::Kernel, Tracking::CopyOnWrite, Tracking::Generator];

    /// The name [`FromStr`] accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            Tracking::Kernel => "kernel",
            Tracking::CopyOnWrite => "cow",
            Tracking::Generator => "generator",
        }
    }
}

impl FromStr for Tracking {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kernel" => Ok(Tracking::Kernel),
            "cow" => Ok(Tracking::CopyOnWrite),
            "generator" => Ok(Tracking::Generator),
            _ => Err(format!(
                "unknown tracking {s:?}: use kernel, cow or generator"
            )),
        }
    }
}

/// Compares the pages a program wrote with the pages the kernel reported (both
/// sorted and deduplicated).
pub fn check_tracking(written: &[u64], reported: &[u64]) -> Result<(), HypError> {
    let missed: Vec<u64> = written
        .iter()
        .filter(|p| reported.binary_search(p).is_err())
        .copied()
        .collect();
    let extra: Vec<u64> = reported
        .iter()
        .filter(|p| written.binary_search(p).is_err())
        .copied()
        .collect();
    if missed.is_empty() && extra.is_empty() {
        return Ok(());
    }
    Err(HypError::TrackingMismatch {
        missed: missed.len(),
        first_missed: missed.first().copied(),
        extra: extra.len(),
        first_extra: extra.first().copied(),
    })
}

/// The kernel tracker `tracking` asks for over `memory`, which must outlive it.
fn tracker_for(memory: &mut Region, tracking: Tracking) -> Result<Option<RegionTracker>, HypError> {
    let safety = match tracking {
        Tracking::Kernel => PageSafety::Copy,
        Tracking::CopyOnWrite => PageSafety::CopyOnWrite,
        Tracking::Generator => return Ok(None),
    };
    // SAFETY: the machine holding the tracker owns `memory` and drops the tracker
    // first (field order); the checkpointer finishes every snapshot it arms within one
    // checkpoint.
    Ok(Some(unsafe { RegionTracker::new(memory, safety) }?))
}

/// A workload running in a memory region, protected like a real program.
pub struct SyntheticMachine {
    // Declared before the memory it tracks, so dropped first.
    tracker: Option<RegionTracker>,
    memory: Region,
    workload: Box<dyn Workload>,
    check: bool,
    written: Vec<u64>,
    /// Restored from a replica: the first harvest reports every page.
    report_all: bool,
    epochs: u64,
    stopped: bool,
}

impl SyntheticMachine {
    /// `name`'s workload over `mem_bytes` of fresh memory, seeded with `seed`, with
    /// its initial contents already written (the first harvest returns them), its
    /// dirty pages tracked by `tracking`, and with `check` every kernel harvest
    /// compared with the workload's own record.
    pub fn new(
        name: &str,
        mem_bytes: usize,
        seed: u64,
        tracking: Tracking,
        check: bool,
    ) -> Result<Self, HypError> {
        let workload = workload::by_name(name, mem_bytes, seed)?;
        Self::with_workload(workload, mem_bytes, tracking, check)
    }

    /// Like [`SyntheticMachine::new`], running `workload` (a synthetic one, or a
    /// recorded trace's replay) over `mem_bytes` of fresh memory.
    pub fn with_workload(
        mut workload: Box<dyn Workload>,
        mem_bytes: usize,
        tracking: Tracking,
        check: bool,
    ) -> Result<Self, HypError> {
        let mut memory = Region::new(mem_bytes)?;
        // Tracking starts before the first write, so the initial contents are the
        // first harvest.
        let tracker = tracker_for(&mut memory, tracking)?;
        let mut written = Vec::new();
        workload.populate(&mut memory, &mut written);
        Ok(Self {
            memory,
            workload,
            tracker,
            check,
            written,
            report_all: false,
            epochs: 0,
            stopped: false,
        })
    }

    /// Rebuilds a machine on a backup from its replica `memory` and the state blob of
    /// the epoch that memory was committed with, ready to continue exactly where the
    /// primary's checkpoint stood.
    pub fn restore(memory: Region, state: &[u8], tracking: Tracking) -> Result<Self, HypError> {
        // The seed is irrelevant: the saved generator state replaces it.
        Self::restore_with(memory, state, tracking, |name, mem| {
            Ok(workload::by_name(name, mem, 0)?)
        })
    }

    /// Like [`SyntheticMachine::restore`], with the workload built by `workload` from
    /// the name in the state blob and the memory size (for workloads that
    /// [`workload::by_name`] does not know, such as a trace's replay); its saved state
    /// is then loaded from the blob.
    pub fn restore_with(
        mut memory: Region,
        state: &[u8],
        tracking: Tracking,
        workload: impl FnOnce(&str, usize) -> Result<Box<dyn Workload>, HypError>,
    ) -> Result<Self, HypError> {
        let bad = || HypError::State("the state blob is not a synthetic machine's state");
        let rest = state.strip_prefix(STATE_MAGIC).ok_or_else(bad)?;
        let end = rest.iter().position(|&b| b == 0).ok_or_else(bad)?;
        let name = std::str::from_utf8(&rest[..end]).map_err(|_| bad())?;
        let rest = &rest[end + 1..];
        if rest.len() < 8 || (rest.len() - 8) % 8 != 0 {
            return Err(bad());
        }
        let (epochs, words) = rest.split_at(8);
        let words: Vec<u64> = words
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
            .collect();
        let mut workload = workload(name, memory.len())?;
        if workload.name() != name {
            return Err(bad());
        }
        workload.load(&words)?;
        let tracker = tracker_for(&mut memory, tracking)?;
        Ok(Self {
            memory,
            workload,
            tracker,
            check: false,
            written: Vec::new(),
            report_all: true,
            epochs: u64::from_le_bytes(epochs.try_into().unwrap_or_default()),
            stopped: false,
        })
    }

    /// Epochs of writes run so far (carried over by [`SyntheticMachine::restore`]):
    /// the workload's progress, one fixed batch of writes per epoch.
    pub fn epochs(&self) -> u64 {
        self.epochs
    }

    /// Runs one epoch of the workload's writes.
    pub fn run(&mut self) -> Result<(), HypError> {
        if self.stopped {
            return Err(HypError::Order("run while stopped"));
        }
        self.workload.step(&mut self.memory, &mut self.written);
        if self.tracker.is_some() && !self.check {
            // The kernel tracks the writes and nothing reads the workload's record.
            self.written.clear();
        }
        self.epochs += 1;
        Ok(())
    }

    /// What backs the machine's memory.
    pub fn backing(&self) -> Backing {
        self.memory.backing()
    }
}

impl Protected for SyntheticMachine {
    fn mem_bytes(&self) -> u64 {
        self.memory.len() as u64
    }

    fn stop(&mut self) -> Result<(), HypError> {
        self.stopped = true;
        Ok(())
    }

    fn harvest(&mut self, dirty: &mut Vec<u64>) -> Result<(), HypError> {
        if !self.stopped {
            return Err(HypError::Order("harvest while running"));
        }
        if std::mem::take(&mut self.report_all) {
            // The restored memory may differ from an empty replica anywhere.
            dirty.extend(0..(self.memory.len() / PAGE) as u64);
        }
        let Some(tracker) = self.tracker.as_mut() else {
            dirty.append(&mut self.written);
            return Ok(());
        };
        let start = dirty.len();
        tracker.harvest(dirty)?;
        if self.check {
            self.written.sort_unstable();
            self.written.dedup();
            let reported = &mut dirty[start..];
            reported.sort_unstable();
            check_tracking(&self.written, reported)?;
        }
        self.written.clear();
        Ok(())
    }

    fn capture_state(&mut self, out: &mut Vec<u8>) -> Result<(), HypError> {
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(self.workload.name().as_bytes());
        out.push(0);
        out.extend_from_slice(&self.epochs.to_le_bytes());
        for word in self.workload.save() {
            out.extend_from_slice(&word.to_le_bytes());
        }
        Ok(())
    }

    fn memory(&self) -> &[u8] {
        &self.memory
    }

    fn copy_on_write(&self) -> Option<&CowTracker> {
        self.tracker.as_ref()?.copy_on_write()
    }

    fn resume(&mut self) -> Result<(), HypError> {
        if !self.stopped {
            return Err(HypError::Order("resume while running"));
        }
        self.stopped = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_names_missed_and_extra_pages() {
        assert!(check_tracking(&[1, 2, 3], &[1, 2, 3]).is_ok());
        let err = check_tracking(&[1, 2, 3, 9], &[1, 3, 4]).unwrap_err();
        assert!(matches!(
            err,
            HypError::TrackingMismatch {
                missed: 2,
                first_missed: Some(2),
                extra: 1,
                first_extra: Some(4)
            }
        ));
        assert!(err.to_string().contains("kernel missed 2"));
    }

    #[test]
    fn kernel_tracking_agrees_with_every_workload() {
        for (tracking, safety) in [
            (Tracking::Kernel, PageSafety::Copy),
            (Tracking::CopyOnWrite, PageSafety::CopyOnWrite),
        ] {
            let probe = RegionTracker::probe(safety, Backing::TransparentHuge);
            if crate::feature::available(tracking.as_str(), probe) {
                harvests_agree_with_every_workload(tracking);
            }
        }
    }

    fn harvests_agree_with_every_workload(tracking: Tracking) {
        for name in workload::NAMES {
            let mut m = SyntheticMachine::new(name, 8 << 20, 2, tracking, true).unwrap();
            let mut dirty = Vec::new();
            for _ in 0..4 {
                m.stop().unwrap();
                dirty.clear();
                m.harvest(&mut dirty).unwrap();
                assert!(!dirty.is_empty(), "{name}");
                m.resume().unwrap();
                m.run().unwrap();
            }
        }
    }

    #[test]
    fn runs_stops_harvests_and_resumes_in_order() {
        let mut m = SyntheticMachine::new("sys", 8 << 20, 1, Tracking::Generator, false).unwrap();
        let mut dirty = Vec::new();
        assert!(matches!(m.harvest(&mut dirty), Err(HypError::Order(_))));
        m.stop().unwrap();
        m.harvest(&mut dirty).unwrap();
        assert!(
            !dirty.is_empty(),
            "the initial contents are the first harvest"
        );
        assert!(matches!(m.run(), Err(HypError::Order(_))));
        m.resume().unwrap();
        m.run().unwrap();
        m.stop().unwrap();
        dirty.clear();
        m.harvest(&mut dirty).unwrap();
        assert!(!dirty.is_empty());
        dirty.clear();
        m.harvest(&mut dirty).unwrap();
        assert!(dirty.is_empty(), "a second harvest finds nothing new");
        let mut state = Vec::new();
        m.capture_state(&mut state).unwrap();
        assert_eq!(&state[8..12], b"sys\0");
        assert_eq!(state[12..20], 1u64.to_le_bytes());
    }

    #[test]
    fn a_restored_machine_continues_exactly() {
        let mem = 8 << 20;
        let mut m = SyntheticMachine::new("web", mem, 3, Tracking::Generator, false).unwrap();
        m.run().unwrap();
        m.stop().unwrap();
        let mut state = Vec::new();
        m.capture_state(&mut state).unwrap();
        let mut replica = Region::new(mem).unwrap();
        replica.copy_from_slice(m.memory());
        m.resume().unwrap();
        let mut twin = SyntheticMachine::restore(replica, &state, Tracking::Generator).unwrap();
        assert_eq!(twin.epochs(), 1);
        for _ in 0..3 {
            m.run().unwrap();
            twin.run().unwrap();
        }
        assert!(m.memory() == twin.memory());
        for bad in [&b"nonsense"[..], &state[..state.len() - 3], &state[..9]] {
            let r = Region::new(mem).unwrap();
            assert!(SyntheticMachine::restore(r, bad, Tracking::Generator).is_err());
        }
    }
}
