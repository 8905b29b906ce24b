//! Type II downtime's first cost: harvesting the kernel's dirty log of a protected
//! region, against region size and dirty-set size.
//!
//! Run with `cargo bench --bench harvest`; docs/performance.md has the curve.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fgbi_hyp::memory::Region;
use fgbi_hyp::tracking::DirtyTracker;
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
            let chosen: Vec<usize> = {
                let mut all: Vec<usize> = (0..pages).collect();
                for i in 0..dirty {
                    let j = i + rng.below((pages - i) as u64) as usize;
                    all.swap(i, j);
                }
                all.truncate(dirty);
                all
            };
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

criterion_group!(benches, harvest);
criterion_main!(benches);
