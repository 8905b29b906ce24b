//! A synthetic workload as a protected program: it runs one epoch of writes per
//! [`SyntheticMachine::run`], in memory of its own, and its dirty pages come from its
//! own record of what it wrote.

use crate::memory::{Backing, Region};
use crate::protected::{HypError, Protected};
use crate::workload::{self, Workload};

/// A workload running in a memory region, protected like a real program.
pub struct SyntheticMachine {
    memory: Region,
    workload: Box<dyn Workload>,
    written: Vec<u64>,
    epochs: u64,
    stopped: bool,
}

impl SyntheticMachine {
    /// `name`'s workload over `mem_bytes` of fresh memory, seeded with `seed`, with
    /// its initial contents already written (the first harvest returns them).
    pub fn new(name: &str, mem_bytes: usize, seed: u64) -> Result<Self, HypError> {
        let mut memory = Region::new(mem_bytes)?;
        let mut workload = workload::by_name(name, mem_bytes, seed)?;
        let mut written = Vec::new();
        workload.populate(&mut memory, &mut written);
        Ok(Self {
            memory,
            workload,
            written,
            epochs: 0,
            stopped: false,
        })
    }

    /// Runs one epoch of the workload's writes.
    pub fn run(&mut self) -> Result<(), HypError> {
        if self.stopped {
            return Err(HypError::Order("run while stopped"));
        }
        self.workload.step(&mut self.memory, &mut self.written);
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
        dirty.append(&mut self.written);
        Ok(())
    }

    fn capture_state(&mut self, out: &mut Vec<u8>) -> Result<(), HypError> {
        out.extend_from_slice(self.workload.name().as_bytes());
        out.push(0);
        out.extend_from_slice(&self.epochs.to_le_bytes());
        Ok(())
    }

    fn memory(&self) -> &[u8] {
        &self.memory
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
    fn runs_stops_harvests_and_resumes_in_order() {
        let mut m = SyntheticMachine::new("sys", 8 << 20, 1).unwrap();
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
        assert_eq!(&state[..4], b"sys\0");
        assert_eq!(state[4..], 1u64.to_le_bytes());
    }
}
