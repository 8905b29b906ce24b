//! What dirty tracking does to a region backed by transparent huge pages, measured on
//! the real kernel: the granularity it reports, whether huge pages survive, and what
//! writes and reads cost. In its own test binary (its own process) so that the
//! /proc/self/smaps figures count this region only. Prints `SKIPPED: <reason>` and
//! returns if the kernel cannot track.

use std::hint::black_box;
use std::time::Instant;

use fgbi_hyp::memory::{Backing, Region, huge_page_bytes};
use fgbi_hyp::tracking::DirtyTracker;
use fgbi_hyp::workload::{PAGE, Rng};

const HUGE: usize = 2 << 20;

/// KiB of `AnonHugePages` in the mappings of /proc/self/smaps inside `region`.
fn anon_huge_kib(region: &[u8]) -> u64 {
    huge_page_bytes(region).unwrap() >> 10
}

/// Seconds per operation of `f`, which performs `ops` operations.
fn per_op(ops: usize, f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() / ops as f64
}

/// Writes one byte into `pages` pages spaced `stride` bytes apart from `offset`.
fn write_strided(region: &mut [u8], offset: usize, stride: usize) -> usize {
    let mut n = 0;
    for at in (offset..region.len()).step_by(stride) {
        region[at] = region[at].wrapping_add(1);
        n += 1;
    }
    n
}

/// Random 8-byte reads over the whole region, a stand-in for a program's TLB misses.
fn random_reads(region: &[u8], reads: usize) {
    let mut rng = Rng::new(5);
    let mut sum = 0u64;
    for _ in 0..reads {
        let at = rng.below((region.len() / 8) as u64) as usize * 8;
        sum = sum.wrapping_add(u64::from_le_bytes(region[at..at + 8].try_into().unwrap()));
    }
    black_box(sum);
}

#[test]
fn thp_backed_region_is_tracked_per_4k_page() {
    if !fgbi_hyp::feature::available("kernel dirty tracking", DirtyTracker::probe()) {
        return;
    }
    let len = 1 << 30;
    let huge_pages = len / HUGE;
    let reads = 2_000_000;
    let mut tracked = Region::new(len).unwrap();
    eprintln!(
        "backing {}: AnonHugePages {} MiB of {} MiB before tracking",
        tracked.backing().as_str(),
        anon_huge_kib(&tracked) >> 10,
        len >> 20
    );
    let mut tracker = DirtyTracker::new(&tracked).unwrap();
    eprintln!(
        "after registering and write-protecting: AnonHugePages {} MiB",
        anon_huge_kib(&tracked) >> 10
    );
    // Mapped only now: mapped earlier, it could have merged with `tracked` in smaps.
    let mut untracked = Region::new(len).unwrap();

    // One byte at a different 4 KiB page of each huge page.
    let mut rng = Rng::new(3);
    let mut written = Vec::new();
    let t = Instant::now();
    for h in 0..huge_pages {
        let page = h * (HUGE / PAGE) + rng.below((HUGE / PAGE) as u64) as usize;
        tracked[page * PAGE + 100] = 1;
        written.push(page as u64);
    }
    let first_write = t.elapsed().as_secs_f64() / huge_pages as f64;
    let mut dirty = Vec::new();
    tracker.harvest(&mut dirty).unwrap();
    assert_eq!(
        dirty, written,
        "tracking is not 4 KiB-granular on this region"
    );
    let split = anon_huge_kib(&tracked) >> 10;
    eprintln!(
        "granularity: one byte in each of {huge_pages} huge pages -> {} pages reported (4 KiB each); \
         AnonHugePages now {split} MiB",
        dirty.len()
    );
    if tracked.backing() == Backing::TransparentHuge {
        // Writing into a protected huge page splits it; nothing collapses it back.
        assert_eq!(split, 0, "huge pages survived a write under tracking");
    }

    let untracked_write = per_op(huge_pages, || {
        write_strided(&mut untracked, 100, HUGE);
    });
    let fault_4k = per_op(len / PAGE, || {
        write_strided(&mut tracked, 200, PAGE);
    });
    dirty.clear();
    tracker.harvest(&mut dirty).unwrap();
    assert_eq!(dirty.len(), len / PAGE);
    let untracked_4k = per_op(len / PAGE, || {
        write_strided(&mut untracked, 200, PAGE);
    });
    let reads_huge = per_op(reads, || random_reads(&untracked, reads));
    let reads_split = per_op(reads, || random_reads(&tracked, reads));
    eprintln!(
        "first write into a protected huge page (split + fault): {:.1} us; same write untracked: {:.2} us",
        first_write * 1e6,
        untracked_write * 1e6
    );
    eprintln!(
        "write into a protected 4 KiB page of a split huge page: {:.2} us; untracked: {:.3} us",
        fault_4k * 1e6,
        untracked_4k * 1e6
    );
    eprintln!(
        "random 8-byte read over 1 GiB: {:.1} ns on huge pages, {:.1} ns once split ({:+.0}%)",
        reads_huge * 1e9,
        reads_split * 1e9,
        (reads_split / reads_huge - 1.0) * 100.0
    );
}
