//! KVM's three dirty-tracking methods side by side (`fgbi_hyp::kvm::DirtyTracking`:
//! `KVM_GET_DIRTY_LOG`, the same with `KVM_CLEAR_DIRTY_LOG`, and the per-vCPU dirty
//! ring): the touch guest writes a number of random pages of a 256 MiB VM, then the
//! VM is stopped and harvested. Criterion times the harvest (the part of the pause
//! that depends on the method); one summary line per setting (`dirty-log ...`, on
//! stderr) adds the stop and the state capture. Skips, loudly, without KVM.
//!
//! Run with `cargo bench --bench dirty_log`; docs/kvm.md has a table.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fgbi_hyp::kvm::guest::data_pages;
use fgbi_hyp::kvm::vm::PauseTimes;
use fgbi_hyp::kvm::{DirtyTracking, KvmVm, Program, VmConfig, probe};
use fgbi_hyp::protected::Protected;
use fgbi_hyp::workload::Rng;

const MEM: usize = 256 << 20;

/// One round: the guest writes `pages` random pages, then the VM is stopped,
/// harvested, its state captured, and resumed. Returns the pause's parts.
fn round(
    vm: &mut KvmVm,
    rng: &mut Rng,
    pages: usize,
) -> Result<PauseTimes, Box<dyn std::error::Error>> {
    let data = data_pages(MEM);
    let mut dirty = Vec::new();
    vm.stop()?;
    let table: Vec<u32> = (0..pages).map(|_| rng.below(data) as u32).collect();
    let posted = vm.post_round(&table)?;
    // The VMM's own writes of the table are not the guest's: harvested away first.
    vm.harvest(&mut dirty)?;
    vm.resume()?;
    vm.wait_progress(posted, Duration::from_secs(30))?;
    vm.stop()?;
    dirty.clear();
    vm.harvest(&mut dirty)?;
    let mut blob = Vec::new();
    vm.capture_state(&mut blob)?;
    vm.resume()?;
    Ok(vm.pause_times())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn dirty_log(c: &mut Criterion) {
    let mut group = c.benchmark_group("kvm-dirty-log");
    group.sample_size(10);
    for tracking in DirtyTracking::ALL {
        if let Err(e) = probe(tracking) {
            eprintln!("SKIPPED: dirty-log {tracking}: {e}");
            continue;
        }
        for pages in [1_000, 10_000, 50_000] {
            let mut vm = KvmVm::new(VmConfig::new(Program::Touch, MEM, tracking))
                .expect("a VM of a method that probed fine");
            let mut rng = Rng::new(1);
            // The first harvest after boot reports what the VMM wrote to boot.
            round(&mut vm, &mut rng, pages).expect("a round");
            let (mut stops, mut states) = (Vec::new(), Vec::new());
            group.bench_function(BenchmarkId::new(tracking.to_string(), pages), |b| {
                b.iter_custom(|iters| {
                    let mut harvest = Duration::ZERO;
                    for _ in 0..iters {
                        let times = round(&mut vm, &mut rng, pages).expect("a round");
                        harvest += times.harvest;
                        stops.push(times.stop);
                        states.push(times.state);
                    }
                    harvest
                });
            });
            eprintln!(
                "dirty-log {tracking} pages={pages} stop_median={:?} state_median={:?}",
                median(stops),
                median(states)
            );
        }
    }
    group.finish();
}

criterion_group!(benches, dirty_log);
criterion_main!(benches);
