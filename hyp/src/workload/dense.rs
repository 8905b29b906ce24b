//! `dense`: pages overwritten with fresh random data, FGBI's worst case: every block
//! changes, nothing repeats, nothing compresses.

use super::{PAGE, Rng, Workload, WorkloadError, load_rng, touch};

/// Pages rewritten per epoch.
const PAGES_PER_EPOCH: usize = 500;

/// The `dense` workload.
pub struct Dense {
    rng: Rng,
    pages: usize,
}

impl Dense {
    /// Dense writes over all `pages` pages.
    pub fn new(pages: usize, rng: Rng) -> Self {
        Self { rng, pages }
    }
}

impl Workload for Dense {
    fn name(&self) -> &'static str {
        "dense"
    }

    fn populate(&mut self, memory: &mut [u8], written: &mut Vec<u64>) {
        self.rng.fill(memory);
        touch(0, memory.len(), written);
    }

    fn step(&mut self, memory: &mut [u8], written: &mut Vec<u64>) {
        for _ in 0..PAGES_PER_EPOCH.min(self.pages) {
            let at = self.rng.below(self.pages as u64) as usize * PAGE;
            self.rng.fill(&mut memory[at..at + PAGE]);
            touch(at, PAGE, written);
        }
    }

    fn save(&self) -> Vec<u64> {
        vec![self.rng.state()]
    }

    fn load(&mut self, words: &[u64]) -> Result<(), WorkloadError> {
        self.rng = load_rng(self.name(), words, 1)?;
        Ok(())
    }
}
