//! Type II downtime: harvesting the kernel's dirty log of a protected region, against
//! region size and dirty-set size; then the whole pause of a checkpoint that copies
//! the dirty pages against one that arms them copy-on-write.
//!
//! Run with `cargo bench --bench harvest`; docs/performance.md has the curves.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fgbi::checkpoint::Checkpointer;
use fgbi_hyp::memory::{Backing, Region};
use fgbi_hyp::process::protect_with;
use fgbi_hyp::tracking::{DirtyTracker, PageSafety, RegionTracker};
use fgbi_hyp::workload::Rng;

const PAGE: usize = 4096;

fn harvest(c: &mut Criterion) {
    if let Err(e) = DirtyTracker::probe() {
        eprintln!("SKIPPED: kernel dirty tracking unavailable: {e}");
        return;
    }
    let mut group = c.benchmark_group("harvest");
    group.sample_size(20);
    for region_mib in [256usize, 1024] {
        let mut region = Region::new(region_mib << 20).unwrap();
        let mut tracker = DirtyTracker::new(&region).unwrap();
        let pages = region.len() / PAGE;
        let mut rng = Rng::new(7);
        // Split every huge page once, as a long-running protected program has.
        for p in (0..pages).step_by(512) {
            region[p * PAGE] = 1;
        }
        tracker.harvest(&mut Vec::new()).unwrap();
        for dirty in [0usize, 1_000, 10_000, 37_000, 100_000] {
            if dirty > pages {
                continue;
            }
            let chosen = scattered(&mut rng, pages, dirty);
            let mut out = Vec::with_capacity(dirty);
            group.bench_function(BenchmarkId::new(format!("{region_mib}MiB"), dirty), |b| {
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        for &p in &chosen {
                            region[p * PAGE + 8] ^= 1;
                        }
                        out.clear();
                        let started = Instant::now();
                        tracker.harvest(&mut out).unwrap();
                        timed += started.elapsed();
                        assert_eq!(out.len(), dirty);
                    }
                    timed
                })
            });
        }
    }
    group.finish();
}

/// `count` distinct pages of `pages`, chosen at random.
fn scattered(rng: &mut Rng, pages: usize, count: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..pages).collect();
    for i in 0..count {
        let j = i + rng.below((pages - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(count);
    all
}

/// The pause of one checkpoint of a 1 GiB protected region (no application thread to
/// stop): pages copied in the pause, or armed copy-on-write and copied after it.
fn pause(c: &mut Criterion) {
    let mut group = c.benchmark_group("pause");
    group.sample_size(20);
    let mem = 1 << 30;
    let pages = mem / PAGE;
    let mut rng = Rng::new(11);
    // Scattered pages, and the same counts as runs of 64 pages (a dense writer).
    let patterns: Vec<(String, Vec<usize>)> = [1_000usize, 10_000, 100_000]
        .iter()
        .flat_map(|&n| {
            let runs: Vec<usize> = scattered(&mut rng, pages / 64, n / 64)
                .into_iter()
                .flat_map(|r| r * 64..r * 64 + 64)
                .collect();
            [
                (format!("scattered-{n}"), scattered(&mut rng, pages, n)),
                (format!("runs64-{}", runs.len()), runs),
            ]
        })
        .collect();
    for safety in [PageSafety::Copy, PageSafety::CopyOnWrite] {
        if let Err(e) = RegionTracker::probe(safety, Backing::TransparentHuge) {
            eprintln!("SKIPPED: {safety:?} pauses: {e}");
            continue;
        }
        let (handle, mut memory) = protect_with(&[mem], Duration::from_secs(1), safety).unwrap();
        let (base, _) = handle.region(0).unwrap();
        let mut checkpointer = Checkpointer::new();
        // The first checkpoint takes the initial contents.
        checkpointer.take(&mut memory, &[], false).unwrap();
        for (name, chosen) in &patterns {
            group.bench_function(BenchmarkId::new(format!("{safety:?}"), name), |b| {
                b.iter_custom(|iters| {
                    let mut paused = Duration::ZERO;
                    for _ in 0..iters {
                        for &p in chosen {
                            // SAFETY: `p * PAGE + 8` lies inside the 1 GiB region, which
                            // `handle` keeps alive; no other thread touches it.
                            unsafe { *base.add(p * PAGE + 8) ^= 1 };
                        }
                        let checkpoint = checkpointer.take(&mut memory, &[], false).unwrap();
                        assert_eq!(checkpoint.dirty.len(), chosen.len());
                        paused += checkpoint.pause;
                    }
                    paused
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, harvest, pause);
criterion_main!(benches);
