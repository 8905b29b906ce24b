//! `dup`: sharing's best case. Each epoch a few fresh source pages are produced and
//! then copied, whole and in block-aligned pieces, into many other pages (message
//! fan-out, buffer duplication, copied templates).

use super::{PAGE, Region, Rng, Workload, WorkloadError, layout, load_rng, touch};

/// The `dup` workload.
pub struct Dup {
    rng: Rng,
    sources: Region,
    targets: Region,
}

impl Dup {
    /// Lays out `pages` pages: 2% sources, the rest copy targets.
    pub fn new(pages: usize, rng: Rng) -> Self {
        let [sources, targets] = layout(pages, [20, 980]);
        Self {
            rng,
            sources,
            targets,
        }
    }
}

impl Workload for Dup {
    fn name(&self) -> &'static str {
        "dup"
    }

    fn populate(&mut self, memory: &mut [u8], written: &mut Vec<u64>) {
        self.step(memory, written);
    }

    fn step(&mut self, memory: &mut [u8], written: &mut Vec<u64>) {
        let fresh = 8.min(self.sources.pages);
        let first = self.rng.below((self.sources.pages - fresh + 1) as u64) as usize;
        for i in 0..fresh {
            let at = self.sources.start() + (first + i) * PAGE;
            if i % 2 == 0 {
                self.rng.fill(&mut memory[at..at + PAGE]);
            } else {
                self.rng.fill_text(&mut memory[at..at + PAGE]);
            }
            touch(at, PAGE, written);
        }
        let source = |rng: &mut Rng| {
            self.sources.start() + (first + rng.below(fresh as u64) as usize) * PAGE
        };
        for _ in 0..200 {
            let from = source(&mut self.rng);
            let to =
                self.targets.start() + self.rng.below(self.targets.pages as u64) as usize * PAGE;
            memory.copy_within(from..from + PAGE, to);
            touch(to, PAGE, written);
        }
        for _ in 0..300 {
            let len = 64 << self.rng.below(3);
            let from = source(&mut self.rng) + self.rng.below((PAGE / len) as u64) as usize * len;
            let to = self.targets.start()
                + self.rng.below((self.targets.len() / len) as u64) as usize * len;
            memory.copy_within(from..from + len, to);
            touch(to, len, written);
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
