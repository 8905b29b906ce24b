//! Synthetic workloads: deterministic generators of writes into a memory region,
//! named after the paper's benchmarks by the memory behaviour they mimic.
//!
//! A workload first populates memory ([`Workload::populate`], the initial sync), then
//! each [`Workload::step`] performs one epoch's writes. Both report the pages they
//! wrote; the same seed gives the same writes.

mod dense;
mod dup;
mod idle;
mod npb_ep;
mod rng;
mod sys;
mod web;

use thiserror::Error;

pub use rng::Rng;

/// Size of a page, in bytes.
pub const PAGE: usize = 4096;

/// Names accepted by [`by_name`], in the order `--workload all` runs them.
pub const NAMES: [&str; 6] = ["web", "npb-ep", "sys", "dense", "dup", "idle"];

/// A workload could not be created.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WorkloadError {
    /// No workload has this name.
    #[error("unknown workload {0:?}: use one of web, npb-ep, sys, dense, dup, idle, or all")]
    Unknown(String),
    /// A saved workload state does not fit the workload.
    #[error(
        "saved state of workload {name} is {got} words, expected {expected}: the state blob is not from this workload or version"
    )]
    State {
        /// Workload name.
        name: &'static str,
        /// Words expected.
        expected: usize,
        /// Words given.
        got: usize,
    },
    /// The memory is too small for the workload's layout.
    #[error("workload {name} needs at least {min} bytes of memory, got {got}: raise --mem")]
    TooSmall {
        /// Workload name.
        name: &'static str,
        /// Minimum memory.
        min: usize,
        /// Memory given.
        got: usize,
    },
}

/// A generator of writes into protected memory.
pub trait Workload: Send {
    /// The workload's name.
    fn name(&self) -> &'static str;

    /// Writes the workload's initial contents; pushes every page written to `written`.
    fn populate(&mut self, memory: &mut [u8], written: &mut Vec<u64>);

    /// Performs one epoch of writes; pushes every page written to `written`.
    fn step(&mut self, memory: &mut [u8], written: &mut Vec<u64>);

    /// The workload's state besides memory (generator, cursors, accumulators), so a
    /// replica can continue it exactly.
    fn save(&self) -> Vec<u64>;

    /// Restores a state from [`Workload::save`].
    fn load(&mut self, words: &[u64]) -> Result<(), WorkloadError>;
}

/// The generator of a saved state of `expected` words, whose first word it is.
pub(crate) fn load_rng(
    name: &'static str,
    words: &[u64],
    expected: usize,
) -> Result<Rng, WorkloadError> {
    expect_words(name, words, expected)?;
    Ok(Rng::new(words[0]))
}

/// Checks that a saved state has `expected` words.
pub(crate) fn expect_words(
    name: &'static str,
    words: &[u64],
    expected: usize,
) -> Result<(), WorkloadError> {
    if words.len() != expected {
        return Err(WorkloadError::State {
            name,
            expected,
            got: words.len(),
        });
    }
    Ok(())
}

/// The workload `name` over `mem_bytes` of memory, seeded with `seed`.
pub fn by_name(
    name: &str,
    mem_bytes: usize,
    seed: u64,
) -> Result<Box<dyn Workload>, WorkloadError> {
    let min = 4 << 20;
    let canonical = NAMES
        .iter()
        .find(|&&n| n == name)
        .ok_or_else(|| WorkloadError::Unknown(name.to_string()))?;
    if mem_bytes < min {
        return Err(WorkloadError::TooSmall {
            name: canonical,
            min,
            got: mem_bytes,
        });
    }
    let pages = mem_bytes / PAGE;
    let rng = Rng::new(seed);
    Ok(match *canonical {
        "web" => Box::new(web::Web::new(pages, rng)),
        "npb-ep" => Box::new(npb_ep::NpbEp::new(pages, rng)),
        "sys" => Box::new(sys::Sys::new(pages, rng)),
        "dense" => Box::new(dense::Dense::new(pages, rng)),
        "dup" => Box::new(dup::Dup::new(pages, rng)),
        _ => Box::new(idle::Idle::new(pages, rng)),
    })
}

/// Writes `bytes` at byte offset `at` and records the pages touched.
#[inline]
pub(crate) fn write_at(memory: &mut [u8], at: usize, bytes: &[u8], written: &mut Vec<u64>) {
    memory[at..at + bytes.len()].copy_from_slice(bytes);
    touch(at, bytes.len(), written);
}

/// Records the pages of byte range `at..at + len` as written.
#[inline]
pub(crate) fn touch(at: usize, len: usize, written: &mut Vec<u64>) {
    if len == 0 {
        return;
    }
    let first = at / PAGE;
    let last = (at + len - 1) / PAGE;
    written.extend((first..=last).map(|p| p as u64));
}

/// A contiguous range of pages assigned to one purpose in a workload's layout.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Region {
    /// First page.
    pub first: usize,
    /// Number of pages.
    pub pages: usize,
}

impl Region {
    /// Byte offset of the region's start.
    pub fn start(&self) -> usize {
        self.first * PAGE
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.pages * PAGE
    }
}

/// Splits `pages` into consecutive regions of the given per-mille shares.
pub(crate) fn layout<const N: usize>(pages: usize, shares: [usize; N]) -> [Region; N] {
    let mut first = 0;
    shares.map(|share| {
        let n = (pages * share / 1000).max(1);
        let r = Region { first, pages: n };
        first += n;
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, seed: u64) -> (Vec<u8>, Vec<Vec<u64>>) {
        let mem = 8 << 20;
        let mut memory = vec![0u8; mem];
        let mut w = by_name(name, mem, seed).unwrap();
        let mut log = Vec::new();
        let mut written = Vec::new();
        w.populate(&mut memory, &mut written);
        log.push(std::mem::take(&mut written));
        for _ in 0..5 {
            w.step(&mut memory, &mut written);
            log.push(std::mem::take(&mut written));
        }
        (memory, log)
    }

    #[test]
    fn workloads_are_deterministic_and_report_every_page_they_write() {
        for name in NAMES {
            let (mem_a, log_a) = run(name, 1);
            let (mem_b, log_b) = run(name, 1);
            assert_eq!(log_a, log_b, "{name}");
            assert!(mem_a == mem_b, "{name}");
            // Ground truth: replay with a shadow copy and compare after each step.
            let mem = 8 << 20;
            let mut memory = vec![0u8; mem];
            let mut shadow = memory.clone();
            let mut w = by_name(name, mem, 2).unwrap();
            let mut written = Vec::new();
            w.populate(&mut memory, &mut written);
            for _ in 0..5 {
                shadow.copy_from_slice(&memory);
                written.clear();
                w.step(&mut memory, &mut written);
                for (p, (a, b)) in memory.chunks(PAGE).zip(shadow.chunks(PAGE)).enumerate() {
                    if a != b {
                        assert!(
                            written.contains(&(p as u64)),
                            "{name}: page {p} written but not reported"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_saved_workload_continues_exactly_from_a_copy_of_its_memory() {
        for name in NAMES {
            let mem = 8 << 20;
            let mut memory = vec![0u8; mem];
            let mut w = by_name(name, mem, 9).unwrap();
            let mut written = Vec::new();
            w.populate(&mut memory, &mut written);
            w.step(&mut memory, &mut written);
            let (mut copy, saved) = (memory.clone(), w.save());
            let mut twin = by_name(name, mem, 12345).unwrap();
            twin.load(&saved).unwrap();
            for _ in 0..3 {
                w.step(&mut memory, &mut written);
                twin.step(&mut copy, &mut written);
            }
            assert!(memory == copy, "{name} diverged after restore");
            assert!(
                twin.load(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])
                    .is_err()
            );
        }
    }

    #[test]
    fn unknown_names_and_tiny_memory_are_refused() {
        assert!(matches!(
            by_name("apache", 8 << 20, 0),
            Err(WorkloadError::Unknown(_))
        ));
        assert!(matches!(
            by_name("web", 4096, 0),
            Err(WorkloadError::TooSmall { .. })
        ));
    }
}
