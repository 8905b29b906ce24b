//! Hot paths of the engine, side by side with memcpy on the same pages.
//!
//! Throughput is dirty-page data per second, for two dirty sets spread over 256 MiB:
//! 1,024 pages (4 MiB, about what redis-server dirties in a 25 ms epoch; it stays in
//! the last-level cache, as freshly written pages do) and 16,384 pages (64 MiB,
//! memory-resident). Run with `cargo bench --bench engine`; docs/performance.md
//! records the medians.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fgbi_engine::digest::DigestTable;
use fgbi_engine::{Applier, Encoder, EncoderConfig, Geometry, Mode, PAGE_SIZE};
use fgbi_hyp::workload::Rng;

const MEM: u64 = 256 << 20;
/// Dirty set sizes, in pages: cache-resident and memory-resident.
const DIRTY_SETS: [(&str, usize); 2] = [("4MiB", 1 << 10), ("64MiB", 16 << 10)];

fn memory(rng: &mut Rng) -> Vec<u8> {
    let mut m = vec![0u8; MEM as usize];
    rng.fill(&mut m);
    m
}

/// `n` pages evenly spread over memory, as dirty pages are in real guests.
fn dirty_pages(n: usize) -> Vec<u64> {
    let stride = MEM / PAGE_SIZE as u64 / n as u64;
    (0..n as u64).map(|i| i * stride).collect()
}

/// Writes `words` random 8-byte words into each dirty page (a sparse change).
fn scribble(memory: &mut [u8], pages: &[u64], words: usize, rng: &mut Rng) {
    for &p in pages {
        for _ in 0..words {
            let at = p as usize * PAGE_SIZE + rng.below(PAGE_SIZE as u64 / 8) as usize * 8;
            memory[at..at + 8].copy_from_slice(&rng.next_u64().to_le_bytes());
        }
    }
}

fn identify(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let memory = memory(&mut rng);
    let mut group = c.benchmark_group("identify");
    group.sample_size(20);
    for (set, dirty) in DIRTY_SETS {
        let pages = dirty_pages(dirty);
        group.throughput(Throughput::Bytes((dirty * PAGE_SIZE) as u64));
        for block in [32usize, 64, 128, 256] {
            let geometry = Geometry::new(MEM, block).unwrap();
            let mut table = DigestTable::new(&geometry, geometry.pages() as usize);
            let bpp = geometry.blocks_per_page();
            group.bench_function(format!("{set}/xxh3-{block}B"), |b| {
                let (mut new, mut undo) = (vec![0u64; bpp], Vec::new());
                b.iter(|| {
                    let mut changed = 0u32;
                    for &p in &pages {
                        let page = &memory[p as usize * PAGE_SIZE..][..PAGE_SIZE];
                        undo.clear();
                        changed += table
                            .identify(p as usize, page, &mut new, &mut undo)
                            .count_ones();
                    }
                    black_box(changed)
                })
            });
        }
        let mut shadow = vec![0u8; dirty * PAGE_SIZE];
        group.bench_function(format!("{set}/memcpy"), |b| {
            b.iter(|| {
                for (i, &p) in pages.iter().enumerate() {
                    shadow[i * PAGE_SIZE..][..PAGE_SIZE]
                        .copy_from_slice(&memory[p as usize * PAGE_SIZE..][..PAGE_SIZE]);
                }
                black_box(&shadow);
            })
        });
    }
    group.finish();
}

fn encoder(mode: Mode, workers: usize, cache: usize) -> Encoder {
    let mut config = EncoderConfig::new(Geometry::new(MEM, 64).unwrap(), mode);
    config.workers = workers;
    config.pin_workers = workers > 1;
    config.cache_bytes = cache;
    Encoder::new(config).unwrap()
}

fn encode(c: &mut Criterion) {
    let mut rng = Rng::new(2);
    let mut memory = memory(&mut rng);
    let mut group = c.benchmark_group("encode-sparse");
    group.sample_size(20);
    for (set, dirty) in DIRTY_SETS {
        let pages = dirty_pages(dirty);
        group.throughput(Throughput::Bytes((dirty * PAGE_SIZE) as u64));
        let cases = [
            ("remus", Mode::Remus, 1, 0),
            ("xbzrle", Mode::Xbzrle, 1, 64 << 20),
            ("fgbi-nocache", Mode::Fgbi, 1, 0),
            ("fgbi-nocache-2w", Mode::Fgbi, 2, 0),
            ("fgbi", Mode::Fgbi, 1, 64 << 20),
            ("fgbi-2w", Mode::Fgbi, 2, 64 << 20),
        ];
        for (name, mode, workers, cache) in cases {
            let mut enc = encoder(mode, workers, cache);
            // Initial sync, so that the measured epochs are sparse deltas.
            let all: Vec<u64> = (0..MEM / PAGE_SIZE as u64).collect();
            let e = enc.encode(&all, &memory, &[]).unwrap().stats.epoch;
            enc.acknowledge(e).unwrap();
            group.bench_function(format!("{set}/{name}"), |b| {
                // The scribbling between epochs is not timed.
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        scribble(&mut memory, &pages, 4, &mut rng);
                        let started = Instant::now();
                        let e = enc.encode(&pages, &memory, &[]).unwrap().stats.epoch;
                        enc.acknowledge(e).unwrap();
                        timed += started.elapsed();
                    }
                    timed
                })
            });
        }
    }
    group.finish();
}

fn apply(c: &mut Criterion) {
    let mut rng = Rng::new(3);
    let mut memory = memory(&mut rng);
    let geometry = Geometry::new(MEM, 64).unwrap();
    let mut group = c.benchmark_group("apply");
    group.sample_size(20);
    for (set, dirty) in DIRTY_SETS {
        let pages = dirty_pages(dirty);
        group.throughput(Throughput::Bytes((dirty * PAGE_SIZE) as u64));
        for (name, mode) in [("raw-pages", Mode::Remus), ("fgbi-sparse", Mode::Fgbi)] {
            let mut enc = encoder(mode, 1, 64 << 20);
            let mut replica = vec![0u8; MEM as usize];
            let all: Vec<u64> = (0..MEM / PAGE_SIZE as u64).collect();
            let sync = enc.encode(&all, &memory, &[]).unwrap().to_vec();
            Applier::new(geometry).apply(&mut replica, &sync).unwrap();
            enc.acknowledge(1).unwrap();
            scribble(&mut memory, &pages, 4, &mut rng);
            let epoch = enc.encode(&pages, &memory, &[]).unwrap().to_vec();
            group.bench_function(format!("{set}/{name}"), |b| {
                b.iter(|| {
                    let mut applier = Applier::resume(geometry, 1, Vec::new());
                    applier.apply(&mut replica, &epoch).unwrap();
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, identify, encode, apply);
criterion_main!(benches);
