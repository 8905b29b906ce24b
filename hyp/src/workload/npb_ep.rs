//! `npb-ep`: the NPB Embarrassingly Parallel kernel's memory behaviour. Compute-heavy:
//! each epoch rewrites a small batch buffer of fresh random doubles and updates a few
//! accumulators (the annulus counts and the sums); nothing else moves.

use super::{PAGE, Region, Rng, Workload, WorkloadError, load_rng, write_at};

/// Pages of the batch buffer of random pairs.
const BATCH_PAGES: usize = 16;

/// The `npb-ep` workload.
pub struct NpbEp {
    rng: Rng,
    batch: Region,
    sums: Region,
    q: [f64; 10],
    sx: f64,
    sy: f64,
}

impl NpbEp {
    /// Lays out the batch buffer and one page of accumulators at the start of memory.
    pub fn new(pages: usize, rng: Rng) -> Self {
        let batch = Region {
            first: 0,
            pages: BATCH_PAGES.min(pages / 2),
        };
        Self {
            rng,
            batch,
            sums: Region {
                first: batch.pages,
                pages: 1,
            },
            q: [0.0; 10],
            sx: 0.0,
            sy: 0.0,
        }
    }
}

impl Workload for NpbEp {
    fn name(&self) -> &'static str {
        "npb-ep"
    }

    fn populate(&mut self, memory: &mut [u8], written: &mut Vec<u64>) {
        self.step(memory, written);
    }

    fn step(&mut self, memory: &mut [u8], written: &mut Vec<u64>) {
        let mut page = [0u8; PAGE];
        for p in 0..self.batch.pages {
            for pair in page.chunks_exact_mut(16) {
                let x = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
                let y = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
                pair[..8].copy_from_slice(&x.to_le_bytes());
                pair[8..].copy_from_slice(&y.to_le_bytes());
                let t = x * x + y * y;
                if t <= 1.0 && t > 0.0 {
                    let f = (-2.0 * t.ln() / t).sqrt();
                    let (gx, gy) = (x * f, y * f);
                    let l = gx.abs().max(gy.abs()) as usize;
                    if l < 10 {
                        self.q[l] += 1.0;
                    }
                    self.sx += gx;
                    self.sy += gy;
                }
            }
            write_at(memory, self.batch.start() + p * PAGE, &page, written);
        }
        let mut sums = [0u8; 96];
        for (slot, v) in sums
            .chunks_exact_mut(8)
            .zip(self.q.iter().chain([&self.sx, &self.sy]))
        {
            slot.copy_from_slice(&v.to_le_bytes());
        }
        write_at(memory, self.sums.start(), &sums, written);
    }

    fn save(&self) -> Vec<u64> {
        let mut words = vec![self.rng.state()];
        words.extend(
            self.q
                .iter()
                .chain([&self.sx, &self.sy])
                .map(|v| v.to_bits()),
        );
        words
    }

    fn load(&mut self, words: &[u64]) -> Result<(), WorkloadError> {
        self.rng = load_rng(self.name(), words, 13)?;
        for (q, w) in self.q.iter_mut().zip(&words[1..11]) {
            *q = f64::from_bits(*w);
        }
        self.sx = f64::from_bits(words[11]);
        self.sy = f64::from_bits(words[12]);
        Ok(())
    }
}
