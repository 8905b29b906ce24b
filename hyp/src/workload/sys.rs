//! `sys`: a SPECsys-like (kernel-heavy) load. Pointer-sized updates to structures in
//! many pages (list links, reference counts), pages allocated from a pool (zeroed,
//! then a header written), and pages copied (fork's copy-on-write, page cache reads).

use super::{PAGE, Region, Rng, Workload, WorkloadError, layout, load_rng, touch, write_at};

/// The `sys` workload.
pub struct Sys {
    rng: Rng,
    slab: Region,
    pool: Region,
    cache: Region,
}

impl Sys {
    /// Lays out `pages` pages: 50% slab, 30% page pool, 20% page cache.
    pub fn new(pages: usize, rng: Rng) -> Self {
        let [slab, pool, cache] = layout(pages, [500, 300, 200]);
        Self {
            rng,
            slab,
            pool,
            cache,
        }
    }

    fn pointer(&mut self) -> [u8; 8] {
        (0xffff_8880_0000_0000u64 | (self.rng.below(1 << 30) << 6)).to_le_bytes()
    }
}

impl Workload for Sys {
    fn name(&self) -> &'static str {
        "sys"
    }

    fn populate(&mut self, memory: &mut [u8], written: &mut Vec<u64>) {
        for at in (self.slab.start()..self.slab.start() + self.slab.len()).step_by(64) {
            let p = self.pointer();
            memory[at..at + 8].copy_from_slice(&p);
            memory[at + 8..at + 16].copy_from_slice(&p);
            memory[at + 16..at + 24].copy_from_slice(&(self.rng.below(16)).to_le_bytes());
        }
        touch(self.slab.start(), self.slab.len(), written);
        let cache = &mut memory[self.cache.start()..self.cache.start() + self.cache.len()];
        for (i, page) in cache.chunks_mut(PAGE).enumerate() {
            if i % 2 == 0 {
                self.rng.fill_text(page);
            } else {
                self.rng.fill(page);
            }
        }
        touch(self.cache.start(), self.cache.len(), written);
    }

    fn step(&mut self, memory: &mut [u8], written: &mut Vec<u64>) {
        let words = self.slab.len() / 8;
        for _ in 0..2000 {
            let at = self.slab.start() + self.rng.skewed(words as u64) as usize * 8;
            let value = if self.rng.below(3) == 0 {
                (self.rng.below(64)).to_le_bytes()
            } else {
                self.pointer()
            };
            write_at(memory, at, &value, written);
        }
        for _ in 0..60 {
            let at = self.pool.start() + self.rng.below(self.pool.pages as u64) as usize * PAGE;
            memory[at..at + PAGE].fill(0);
            touch(at, PAGE, written);
            if self.rng.below(2) == 0 {
                let header = self.pointer();
                write_at(memory, at, &header, written);
            }
        }
        for _ in 0..40 {
            let from =
                self.cache.start() + self.rng.skewed(self.cache.pages as u64) as usize * PAGE;
            let to = self.pool.start() + self.rng.below(self.pool.pages as u64) as usize * PAGE;
            memory.copy_within(from..from + PAGE, to);
            touch(to, PAGE, written);
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
