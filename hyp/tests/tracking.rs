//! Kernel dirty-page tracking against ground truth, on the real kernel. Each test
//! first probes for userfaultfd async write-protect and PAGEMAP_SCAN and, if the kernel
//! lacks them, prints `SKIPPED: <reason>` and returns.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering, fence};
use std::time::Instant;

use fgbi_hyp::memory::Region;
use fgbi_hyp::tracking::{DirtyTracker, TrackingError};
use fgbi_hyp::workload::{PAGE, Rng};

/// Whether the kernel can track; says loudly why not.
fn kernel_supports_tracking(test: &str) -> bool {
    fgbi_hyp::feature::available(test, DirtyTracker::probe())
}

fn harvest(tracker: &mut DirtyTracker) -> Vec<u64> {
    let mut dirty = Vec::new();
    tracker.harvest(&mut dirty).unwrap();
    dirty
}

/// `n` distinct pages out of `pages`, in random order.
fn distinct_pages(rng: &mut Rng, pages: usize, n: usize) -> Vec<u64> {
    let mut all: Vec<u64> = (0..pages as u64).collect();
    for i in 0..n {
        let j = i + rng.below((pages - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(n);
    all
}

/// Writes one byte of page `page` at a random offset; half the time the byte already
/// there (a write that changes nothing is still a write).
fn write_byte(region: &mut [u8], page: u64, rng: &mut Rng) {
    let at = page as usize * PAGE + rng.below(PAGE as u64) as usize;
    region[at] = if rng.below(2) == 0 {
        black_box(region[at])
    } else {
        rng.next_u64() as u8
    };
}

#[test]
fn harvest_reports_exactly_the_pages_written() {
    if !kernel_supports_tracking("harvest_reports_exactly_the_pages_written") {
        return;
    }
    let pages = 4096;
    let mut region = Region::new(pages * PAGE).unwrap();
    let mut tracker = DirtyTracker::new(&region).unwrap();
    assert_eq!(
        harvest(&mut tracker),
        Vec::<u64>::new(),
        "nothing written yet"
    );

    let mut rng = Rng::new(11);
    for round in 0..8 {
        let n = [1, 7, 300, 1500, 4096, 2, 900, 64][round];
        let mut expected = BTreeSet::new();
        for page in distinct_pages(&mut rng, pages, n) {
            if rng.below(3) == 0 {
                let at = page as usize * PAGE;
                rng.fill(&mut region[at..at + PAGE]);
            } else {
                write_byte(&mut region, page, &mut rng);
            }
            expected.insert(page);
        }
        // Reads are not writes.
        let mut sum = 0u64;
        for _ in 0..1000 {
            sum += u64::from(region[rng.below((pages * PAGE) as u64) as usize]);
        }
        black_box(sum);
        let dirty = harvest(&mut tracker);
        assert_eq!(
            dirty,
            expected.into_iter().collect::<Vec<_>>(),
            "round {round}"
        );
        assert_eq!(
            harvest(&mut tracker),
            Vec::<u64>::new(),
            "round {round}: no writes since"
        );
    }
}

#[test]
fn a_sub_range_reports_pages_relative_to_its_start_and_ignores_the_rest() {
    if !kernel_supports_tracking(
        "a_sub_range_reports_pages_relative_to_its_start_and_ignores_the_rest",
    ) {
        return;
    }
    let mut region = Region::new(64 * PAGE).unwrap();
    let mut tracker = DirtyTracker::with_range(&region, 16 * PAGE, 32 * PAGE).unwrap();
    for page in [0, 15, 16, 17, 40, 47, 48, 63] {
        region[page * PAGE + 5] = 1;
    }
    assert_eq!(harvest(&mut tracker), vec![0, 1, 24, 31]);
    assert_eq!(harvest(&mut tracker), Vec::<u64>::new());
}

/// One write as the checker sees it: the page, and the harvest epoch read just before
/// and just after the write.
struct Write {
    page: u64,
    before: u32,
    after: u32,
}

#[test]
fn no_write_is_lost_when_harvesting_while_threads_write() {
    if !kernel_supports_tracking("no_write_is_lost_when_harvesting_while_threads_write") {
        return;
    }
    const WRITERS: usize = 2;
    const WRITES: usize = 400_000;
    let pages = 16_384; // 64 MiB
    let per_writer = pages / WRITERS;
    let mut region = Region::new(pages * PAGE).unwrap();
    let mut tracker = DirtyTracker::new(&region).unwrap();

    // Epoch protocol: harvest k runs while `epoch` is k; `epoch` becomes k + 1 once it
    // has returned. A writer loads `epoch` before its write (`before`: the write follows
    // the return of harvest before - 1) and after it (`after`: the write precedes the
    // store of after + 1, which follows the return of harvest after). So the write must
    // be reported by some harvest in before..=after + 1: after + 1 catches a write that
    // raced with harvest `after`, or came just after it returned.
    let epoch = AtomicU32::new(0);
    let running = AtomicU32::new(WRITERS as u32);
    let stop = AtomicBool::new(false);
    let mut harvests: Vec<Vec<u64>> = Vec::new();
    let logs: Vec<Vec<Write>> = std::thread::scope(|s| {
        let writers: Vec<_> = region
            .chunks_mut(per_writer * PAGE)
            .enumerate()
            .map(|(w, memory)| {
                let (epoch, running, stop) = (&epoch, &running, &stop);
                s.spawn(move || {
                    let mut rng = Rng::new(100 + w as u64);
                    let mut log = Vec::with_capacity(WRITES);
                    // A quarter of the pages, scattered: the rest are never written.
                    let hot = distinct_pages(&mut rng, per_writer, per_writer / 4);
                    for _ in 0..WRITES {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let local = hot[rng.below(hot.len() as u64) as usize];
                        let before = epoch.load(Ordering::SeqCst);
                        write_byte(memory, local, &mut rng);
                        // Keep the write before the second load, in compiler and CPU.
                        fence(Ordering::SeqCst);
                        let after = epoch.load(Ordering::SeqCst);
                        log.push(Write {
                            page: (w * per_writer) as u64 + local,
                            before,
                            after,
                        });
                    }
                    running.fetch_sub(1, Ordering::SeqCst);
                    log
                })
            })
            .collect();
        let started = Instant::now();
        while running.load(Ordering::SeqCst) > 0 {
            let mut dirty = Vec::new();
            tracker.harvest(&mut dirty).unwrap();
            harvests.push(dirty);
            epoch.store(harvests.len() as u32, Ordering::SeqCst);
            if started.elapsed().as_secs() >= 20 {
                stop.store(true, Ordering::Relaxed);
            }
        }
        writers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    // The final harvest, after every writer stopped.
    harvests.push(harvest(&mut tracker));
    let last = harvests.len() as u32 - 1;

    // For every page, the harvests that reported it.
    let mut reported: Vec<Vec<u32>> = vec![Vec::new(); pages];
    for (k, dirty) in harvests.iter().enumerate() {
        if let Some(i) = dirty.windows(2).position(|w| w[0] >= w[1]) {
            panic!(
                "harvest {k} not sorted at {i} of {}: {:?}",
                dirty.len(),
                &dirty[i.saturating_sub(5)..(i + 6).min(dirty.len())]
            );
        }
        for &p in dirty {
            reported[p as usize].push(k as u32);
        }
    }
    let writes: Vec<&Write> = logs.iter().flatten().collect();
    assert!(harvests.len() > 10, "only {} harvests ran", harvests.len());
    assert!(writes.len() > 100_000, "only {} writes ran", writes.len());
    let racing = writes.iter().filter(|w| w.before != w.after).count();
    eprintln!(
        "{} writes by {WRITERS} threads over {} harvests; {racing} writes saw the epoch change around them; \
         {} pages reported in all",
        writes.len(),
        harvests.len(),
        reported.iter().map(Vec::len).sum::<usize>()
    );

    // Completeness: every write is reported by a harvest in its window.
    for w in &writes {
        let ks = &reported[w.page as usize];
        let window = w.before..=(w.after + 1).min(last);
        let first_at_or_after = ks.partition_point(|&k| k < w.before);
        assert!(
            ks.get(first_at_or_after)
                .is_some_and(|k| window.contains(k)),
            "page {} written in epochs {window:?} was never reported in them (reported in {ks:?})",
            w.page
        );
    }
    // Precision (tracking is 4 KiB-granular): a page reported by harvest k was written
    // by a write that began before harvest k returned and ended after the previous
    // harvest that reported the page started.
    let mut by_page: Vec<Vec<&Write>> = vec![Vec::new(); pages];
    for w in &writes {
        by_page[w.page as usize].push(w);
    }
    for (page, ks) in reported.iter().enumerate() {
        let mut previous = 0;
        for &k in ks {
            assert!(
                by_page[page]
                    .iter()
                    .any(|w| w.before <= k && w.after >= previous),
                "page {page} reported by harvest {k} with no write to it since harvest {previous}"
            );
            previous = k;
        }
    }
}

#[test]
fn a_1_gib_region_with_37000_written_pages_is_harvested_without_a_miss() {
    if !kernel_supports_tracking(
        "a_1_gib_region_with_37000_written_pages_is_harvested_without_a_miss",
    ) {
        return;
    }
    let pages = (1 << 30) / PAGE;
    let mut region = Region::new(pages * PAGE).unwrap();
    let mut tracker = DirtyTracker::new(&region).unwrap();
    let mut rng = Rng::new(37);
    let backing = region.backing().as_str();
    let timed = |tracker: &mut DirtyTracker, what: &str| {
        let mut dirty = Vec::new();
        let t = Instant::now();
        tracker.harvest(&mut dirty).unwrap();
        let took = t.elapsed();
        eprintln!(
            "1 GiB region ({}), {what}: harvest of {} dirty pages took {:.3} ms",
            backing,
            dirty.len(),
            took.as_secs_f64() * 1e3
        );
        dirty
    };
    assert!(timed(&mut tracker, "nothing written, huge pages intact").is_empty());
    for n in [37_000, 100_000] {
        let mut written = distinct_pages(&mut rng, pages, n);
        for &page in &written {
            write_byte(&mut region, page, &mut rng);
        }
        written.sort_unstable();
        let dirty = timed(&mut tracker, &format!("{n} pages written"));
        assert_reported(&written, &dirty);
    }
    assert_reported(
        &[],
        &timed(&mut tracker, "nothing written, huge pages split"),
    );
}

/// Every written page was reported. The kernel may, rarely, report a page nobody
/// wrote (seen once in many runs, on a machine under memory pressure, where pages
/// are migrated and compacted): that costs an extra page on the wire, never
/// correctness, so a few are tolerated and printed; a missed page never is.
fn assert_reported(written: &[u64], reported: &[u64]) {
    let missed = written
        .iter()
        .filter(|p| reported.binary_search(p).is_err())
        .count();
    assert_eq!(missed, 0, "the harvest missed {missed} written page(s)");
    let extra: Vec<u64> = reported
        .iter()
        .filter(|p| written.binary_search(p).is_err())
        .copied()
        .collect();
    if !extra.is_empty() {
        eprintln!(
            "NOTE: the kernel reported {} page(s) never written: {extra:?}",
            extra.len()
        );
    }
    assert!(
        extra.len() <= 8,
        "the kernel reported {} pages never written: far more than the rare spurious one",
        extra.len()
    );
}

#[test]
fn bad_ranges_are_refused_with_a_clear_error() {
    // Range checks come before any kernel call, so this runs everywhere.
    let region = Region::new(16 * PAGE).unwrap();
    for (offset, len) in [
        (100, PAGE),
        (0, PAGE + 1),
        (0, 0),
        (0, 17 * PAGE),
        (16 * PAGE, PAGE),
        (PAGE, usize::MAX - PAGE + 1),
    ] {
        let e = DirtyTracker::with_range(&region, offset, len)
            .err()
            .unwrap_or_else(|| panic!("{offset}+{len} accepted"));
        assert!(
            matches!(e, TrackingError::Range { offset: o, len: l, region_len: 65536, granule: 4096 } if o == offset && l == len),
            "{e:?}"
        );
        let message = e.to_string();
        assert!(message.contains("multiples of 4096 bytes"), "{message}");
    }
}

#[test]
fn a_range_already_tracked_is_refused_and_freed_on_drop() {
    if !kernel_supports_tracking("a_range_already_tracked_is_refused_and_freed_on_drop") {
        return;
    }
    let region = Region::new(16 * PAGE).unwrap();
    let first = DirtyTracker::with_range(&region, 0, 8 * PAGE).unwrap();
    let e = DirtyTracker::with_range(&region, 4 * PAGE, 8 * PAGE)
        .err()
        .unwrap();
    assert!(matches!(e, TrackingError::Register(_)), "{e:?}");
    assert!(e.to_string().contains("already tracked"), "{e}");
    drop(first);
    DirtyTracker::new(&region).unwrap();
}

#[test]
fn writes_by_the_kernel_into_the_region_are_seen() {
    if !kernel_supports_tracking("writes_by_the_kernel_into_the_region_are_seen") {
        return;
    }
    let mut region = Region::new(32 * PAGE).unwrap();
    let mut tracker = DirtyTracker::new(&region).unwrap();
    // read(2) from /dev/zero: the kernel copies into pages 3 and 4 (2 bytes each).
    let mut zero = std::fs::File::open("/dev/zero").unwrap();
    std::io::Read::read_exact(&mut zero, &mut region[4 * PAGE - 2..4 * PAGE + 2]).unwrap();
    assert_eq!(harvest(&mut tracker), vec![3, 4]);
}
