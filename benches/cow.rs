//! Copy-on-write checkpoints against their granule (the unit in which a snapshot is
//! copied and unprotected, `fgbi_hyp::cow::Granule`), with copying in the pause as
//! the baseline: the pause, the whole checkpoint (pause plus the copy after it), the
//! faults the writer took and the handler's time serving them, and the writer's own
//! speed. The writers are KVM guests (when this host has KVM) and a thread writing a
//! process region.
//!
//! Run with `cargo bench --bench cow`; criterion times the pause, and one summary line
//! per setting (`cow ...`, on stderr) gives the rest. docs/performance.md has a table.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fgbi::checkpoint::Checkpointer;
use fgbi_hyp::cow::{CowMode, CowStats, CowTracker, Granule};
use fgbi_hyp::kvm::{DirtyTracking, GuestArgs, KvmVm, Program, VmConfig};
use fgbi_hyp::memory::{Backing, Region, huge_page_bytes};
use fgbi_hyp::protected::Protected;
use fgbi_hyp::workload::Rng;

const PAGE: usize = 4096;
const MEM: usize = 64 << 20;
/// The writer runs this long between checkpoints.
const EPOCH: Duration = Duration::from_millis(20);

/// How pages are kept safe: copied in the pause, or copy-on-write at a granule.
#[derive(Clone, Copy)]
enum Safety {
    Copy,
    Cow(Granule),
}

impl std::fmt::Display for Safety {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Safety::Copy => f.write_str("copy"),
            Safety::Cow(granule) => write!(f, "cow-{granule}"),
        }
    }
}

/// Copying in the pause, then copy-on-write at 4 KiB, 16 KiB, 64 KiB, 256 KiB, 2 MiB.
fn safeties() -> impl Iterator<Item = Safety> {
    let granules = [4usize, 16, 64, 256, 2048].map(|k| Granule::new(k << 10).unwrap());
    std::iter::once(Safety::Copy).chain(granules.map(Safety::Cow))
}

/// One checkpoint's measurements.
#[derive(Default)]
struct Epoch {
    pause: Duration,
    total: Duration,
    dirty: usize,
}

/// What a setting did over all its checkpoints.
#[derive(Default)]
struct Summary {
    epochs: Vec<Epoch>,
    cow: CowStats,
    progress: u64,
    running: Duration,
    /// MiB of the writer's memory mapped by transparent huge pages at the end.
    huge_mib: u64,
}

impl Summary {
    fn print(&mut self, writer: &str, safety: Safety, unit: &str) {
        if self.epochs.is_empty() {
            return; // filtered out
        }
        let n = self.epochs.len();
        let median = |key: fn(&Epoch) -> Duration, epochs: &mut Vec<Epoch>| {
            epochs.sort_by_key(key);
            epochs.get(epochs.len() / 2).map(key).unwrap_or_default()
        };
        let pause = median(|e| e.pause, &mut self.epochs);
        let total = median(|e| e.total, &mut self.epochs);
        let dirty = self.epochs.iter().map(|e| e.dirty).sum::<usize>() / n;
        let per_fault = self.cow.serving.as_nanos() as f64 / self.cow.faults.max(1) as f64;
        eprintln!(
            "cow {writer} {safety}: {n} checkpoints, dirty {dirty} pages, pause p50 {:.0} us, \
             checkpoint p50 {:.0} us, {:.0} faults and {:.0} handler copies per checkpoint, \
             {:.1} us serving per fault, writer {:.0} {unit}/s, {} MiB in huge pages",
            pause.as_secs_f64() * 1e6,
            total.as_secs_f64() * 1e6,
            self.cow.faults as f64 / n as f64,
            self.cow.handler_copies as f64 / n as f64,
            per_fault / 1e3,
            self.progress as f64 / self.running.as_secs_f64().max(1e-9),
            self.huge_mib,
        );
    }
}

/// Times `checkpoint` (which returns one epoch's numbers) under criterion, as the
/// pause, keeping every epoch for the summary.
fn bench(
    c: &mut Criterion,
    group: &str,
    safety: Safety,
    summary: &mut Summary,
    mut checkpoint: impl FnMut() -> Epoch,
) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.bench_function(BenchmarkId::from_parameter(safety), |b| {
        b.iter_custom(|iters| {
            let mut paused = Duration::ZERO;
            for _ in 0..iters {
                std::thread::sleep(EPOCH);
                let epoch = checkpoint();
                paused += epoch.pause;
                summary.epochs.push(epoch);
            }
            paused
        })
    });
    g.finish();
}

/// A KVM guest, checkpointed by the checkpointer the replication loop uses.
fn vm(c: &mut Criterion, name: &str, program: Program, args: GuestArgs, safety: Safety) {
    let mut config = VmConfig::new(program, MEM, DirtyTracking::ManualProtect);
    config.args = args;
    if let Safety::Cow(granule) = safety {
        config.copy_on_write = true;
        config.cow_granule = granule;
    }
    let mut vm = KvmVm::new(config).unwrap();
    let mut checkpointer = Checkpointer::new();
    // The first checkpoint takes everything the VMM wrote to boot.
    checkpointer.take(&mut vm, &[], false).unwrap();
    let (progress, started) = (vm.progress(), Instant::now());
    let mut summary = Summary::default();
    bench(c, &format!("cow-vm-{name}"), safety, &mut summary, || {
        let started = Instant::now();
        let checkpoint = checkpointer.take(&mut vm, &[], false).unwrap();
        Epoch {
            pause: checkpoint.pause,
            total: started.elapsed(),
            dirty: checkpoint.dirty.len(),
        }
    });
    summary.running = started.elapsed();
    summary.progress = vm.progress() - progress;
    summary.cow = vm.copy_on_write().map(|c| c.stats()).unwrap_or_default();
    summary.huge_mib = huge_page_bytes(vm.memory()).unwrap_or(0) >> 20;
    assert_eq!(vm.guest_stop(), None, "{}", vm.console());
    summary.print(&format!("vm-{name}"), safety, "iterations");
}

/// A thread writing one word into each of `pages` of a region, over and over; it
/// parks, between two writes, while `stop` is set.
struct Writer {
    stop: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    /// Times it parked.
    parks: Arc<AtomicU64>,
    passes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(region: &mut Region, pages: Vec<usize>) -> Self {
        let (stop, quit) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (parks, passes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let base = region.as_mut_ptr().addr();
        let thread = std::thread::spawn({
            let (stop, quit) = (Arc::clone(&stop), Arc::clone(&quit));
            let (parks, passes) = (Arc::clone(&parks), Arc::clone(&passes));
            move || {
                let mut n = 0u64;
                while !quit.load(Ordering::Acquire) {
                    n += 1;
                    for &p in &pages {
                        if stop.load(Ordering::Acquire) {
                            parks.fetch_add(1, Ordering::AcqRel);
                            // Blocks rather than spins or polls, leaving the cores
                            // to the checkpoint being measured.
                            while stop.load(Ordering::Acquire) {
                                std::thread::park();
                            }
                        }
                        // SAFETY: page `p` lies inside the region, which outlives this
                        // thread (`Writer` is dropped, and joins it, before the region).
                        unsafe { std::ptr::write_volatile((base + p * PAGE) as *mut u64, n) };
                    }
                    passes.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Self {
            stop,
            quit,
            parks,
            passes,
            thread: Some(thread),
        }
    }

    /// Returns once the writer is parked: every write it made is done.
    fn pause(&self) {
        let parks = self.parks.load(Ordering::Acquire);
        self.stop.store(true, Ordering::Release);
        while self.parks.load(Ordering::Acquire) == parks {
            std::hint::spin_loop();
        }
    }

    fn resume(&self) {
        self.stop.store(false, Ordering::Release);
        if let Some(thread) = &self.thread {
            thread.thread().unpark();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::Release);
        self.resume();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A thread writing a process region, with the tracker in snapshot mode (the pages
/// to snapshot are the writer's, known in advance, as KVM's dirty log gives them).
/// Its pause starts once the writer is parked (a VM's includes stopping the vCPUs).
fn region(c: &mut Criterion, name: &str, pages: Vec<usize>, safety: Safety) {
    let mut region = Region::new(MEM).unwrap();
    let cow = match safety {
        // SAFETY: the region is private anonymous memory, declared before the tracker
        // and every snapshot, so it outlives them.
        Safety::Cow(granule) => Some(
            unsafe {
                CowTracker::new(
                    region.as_mut_ptr(),
                    region.len(),
                    region.backing(),
                    CowMode::Snapshot,
                    granule,
                )
            }
            .unwrap(),
        ),
        Safety::Copy => None,
    };
    let mut armed: Vec<u64> = pages.iter().map(|&p| p as u64).collect();
    armed.sort_unstable();
    let base = region.as_mut_ptr().addr();
    let writer = Writer::start(&mut region, pages);
    let mut buffer = Vec::new();
    let started = Instant::now();
    let mut summary = Summary::default();
    bench(
        c,
        &format!("cow-region-{name}"),
        safety,
        &mut summary,
        || {
            let started = Instant::now();
            writer.pause();
            let Some(cow) = &cow else {
                buffer.clear();
                for &p in &armed {
                    // SAFETY: page `p` lies inside the region, which outlives the writer;
                    // the writer is parked, so nobody writes it meanwhile.
                    let page = unsafe {
                        std::slice::from_raw_parts((base + p as usize * PAGE) as *const u8, PAGE)
                    };
                    buffer.extend_from_slice(page);
                }
                writer.resume();
                let pause = started.elapsed();
                return Epoch {
                    pause,
                    total: pause,
                    dirty: armed.len(),
                };
            };
            let snapshot = cow.arm(armed.clone(), std::mem::take(&mut buffer)).unwrap();
            writer.resume();
            let pause = started.elapsed();
            buffer = snapshot.finish().unwrap().1;
            Epoch {
                pause,
                total: started.elapsed(),
                dirty: armed.len(),
            }
        },
    );
    summary.progress = writer.passes.load(Ordering::Relaxed);
    drop(writer);
    summary.running = started.elapsed();
    summary.cow = cow.as_ref().map(|c| c.stats()).unwrap_or_default();
    summary.huge_mib = huge_page_bytes(&region).unwrap_or(0) >> 20;
    summary.print(&format!("region-{name}"), safety, "passes");
}

fn vms(c: &mut Criterion) {
    if let Err(e) = CowTracker::probe(Backing::TransparentHuge) {
        eprintln!("SKIPPED: copy-on-write snapshots unavailable: {e}");
        return;
    }
    if let Err(e) = fgbi_hyp::kvm::probe(DirtyTracking::ManualProtect) {
        eprintln!("SKIPPED: KVM guests ({e}): only the process region is measured");
        return;
    }
    let guests = [
        ("dense-1000", Program::Dense, 1000, 16),
        ("dense-10000", Program::Dense, 10_000, 1),
        ("web", Program::Web, 64, 16),
    ];
    for (name, program, arg0, arg1) in guests {
        for safety in safeties() {
            let args = GuestArgs {
                seed: 5,
                arg0,
                arg1,
            };
            vm(c, name, program, args, safety);
        }
    }
}

fn regions(c: &mut Criterion) {
    if let Err(e) = CowTracker::probe(Backing::TransparentHuge) {
        eprintln!("SKIPPED: copy-on-write snapshots unavailable: {e}");
        return;
    }
    let pages = MEM / PAGE;
    let mut rng = Rng::new(3);
    let mut scattered: Vec<usize> = (0..pages).collect();
    for i in 0..10_000 {
        let j = i + rng.below((pages - i) as u64) as usize;
        scattered.swap(i, j);
    }
    scattered.truncate(10_000);
    let patterns = [
        ("dense-1000", (0..1000).collect::<Vec<_>>()),
        ("dense-10000", (0..10_000).collect()),
        ("scattered-10000", scattered),
    ];
    for (name, chosen) in patterns {
        for safety in safeties() {
            region(c, name, chosen.clone(), safety);
        }
    }
}

criterion_group!(benches, vms, regions);
criterion_main!(benches);
