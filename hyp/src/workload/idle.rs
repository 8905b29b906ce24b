//! `idle`: an idle machine. A timer tick updates one counter each epoch; now and then
//! a housekeeping task touches a few words elsewhere.

use super::{PAGE, Rng, Workload, WorkloadError, load_rng, write_at};

/// The `idle` workload.
pub struct Idle {
    rng: Rng,
    pages: usize,
    ticks: u64,
}

impl Idle {
    /// An idle machine over `pages` pages.
    pub fn new(pages: usize, rng: Rng) -> Self {
        Self {
            rng,
            pages,
            ticks: 0,
        }
    }
}

impl Workload for Idle {
    fn name(&self) -> &'static str {
        "idle"
    }

    fn populate(&mut self, memory: &mut [u8], written: &mut Vec<u64>) {
        self.step(memory, written);
    }

    fn step(&mut self, memory: &mut [u8], written: &mut Vec<u64>) {
        self.ticks += 1;
        write_at(memory, 0, &self.ticks.to_le_bytes(), written);
        if self.ticks % 10 == 0 {
            for _ in 0..4 {
                let at = self.rng.below(self.pages as u64) as usize * PAGE
                    + 8 * self.rng.below(512) as usize;
                write_at(memory, at, &self.rng.next_u64().to_le_bytes(), written);
            }
        }
    }

    fn save(&self) -> Vec<u64> {
        vec![self.rng.state(), self.ticks]
    }

    fn load(&mut self, words: &[u64]) -> Result<(), WorkloadError> {
        self.rng = load_rng(self.name(), words, 2)?;
        self.ticks = words[1];
        Ok(())
    }
}
