//! KVM micro-VMs on the host's /dev/kvm: guests run and report, dirty tracking by
//! each method matches ground truth, and a restored VM continues exactly. Each test
//! probes first and prints `SKIPPED: <reason>` when KVM or a capability is missing.

use std::time::{Duration, Instant};

use fgbi_hyp::kvm::ep::{CLASS_S_BATCHES, EpResult};
use fgbi_hyp::kvm::guest::{DATA, data_pages};
use fgbi_hyp::kvm::{
    DirtyTracking, GuestStop, KvmError, KvmVm, MachineState, Privilege, Program, VmConfig, probe,
};
use fgbi_hyp::protected::{HypError, Protected};
use fgbi_hyp::workload::{PAGE, Rng};
use zerocopy::{FromBytes, IntoBytes};

const MEM: usize = 32 << 20;
const WAIT: Duration = Duration::from_secs(20);

/// Whether the host can run `tracking`; says so loudly when it cannot.
fn available(tracking: DirtyTracking) -> bool {
    fgbi_hyp::feature::available("KVM", probe(tracking))
}

/// Stops, harvests and resumes; returns the sorted, deduplicated dirty pages.
fn harvest(vm: &mut KvmVm) -> Vec<u64> {
    vm.stop().unwrap();
    let mut dirty = Vec::new();
    vm.harvest(&mut dirty).unwrap();
    vm.resume().unwrap();
    dirty.sort_unstable();
    dirty.dedup();
    dirty
}

/// Runs until `more` further doorbell iterations have been reported.
fn run_for(vm: &KvmVm, more: u64) -> u64 {
    let target = vm.progress() + more;
    vm.wait_progress(target, WAIT).unwrap()
}

#[test]
fn a_guest_runs_at_cpl3_reports_progress_and_console_and_stops_and_resumes() {
    if !available(DirtyTracking::Classic) {
        return;
    }
    for vcpus in [1, 3] {
        let mut config = VmConfig::new(Program::Counter, MEM, DirtyTracking::Classic);
        config.args.arg0 = 16;
        config.vcpus = vcpus;
        let mut vm = KvmVm::new(config).unwrap();
        run_for(&vm, 1000);
        assert_eq!(vm.console(), "counter: start\n");
        let mut stops = Vec::new();
        for _ in 0..20 {
            vm.stop().unwrap();
            let at_stop = vm.vcpu_progress();
            let at = iterations(&vm);
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(
                vm.vcpu_progress(),
                at_stop,
                "a stopped guest makes no progress"
            );
            assert_eq!(iterations(&vm), at);
            stops.push(vm.pause_times().stop);
            vm.resume().unwrap();
            run_for(&vm, 16);
        }
        stops.sort_unstable();
        eprintln!(
            "{vcpus} vCPU(s): stop latency over 20 stops: median {:?}, max {:?}",
            stops[10], stops[19]
        );
        assert!(vm.guest_stop().is_none());
    }
}

#[test]
fn harvest_and_capture_refuse_a_running_guest() {
    if !available(DirtyTracking::Classic) {
        return;
    }
    let mut vm = KvmVm::new(VmConfig::new(Program::Touch, MEM, DirtyTracking::Classic)).unwrap();
    let mut dirty = Vec::new();
    assert!(matches!(vm.harvest(&mut dirty), Err(HypError::Order(_))));
    let mut blob = Vec::new();
    assert!(matches!(
        vm.capture_state(&mut blob),
        Err(HypError::Order(_))
    ));
    assert!(matches!(vm.post_round(&[1]), Err(KvmError::Order(_))));
    let err = KvmVm::new(VmConfig::new(
        Program::Touch,
        3 << 20,
        DirtyTracking::Classic,
    ))
    .err()
    .unwrap();
    assert!(err.to_string().contains("multiple of 2 MiB"), "{err}");
}

/// One touch round: the guest writes `pages`; the harvest must report each of them,
/// and nothing else outside the VMM's system area below the data area.
fn check_round(vm: &mut KvmVm, pages: &[u32]) -> Duration {
    vm.stop().unwrap();
    let round = vm.post_round(pages).unwrap();
    let mut dirty = Vec::new();
    // What the VMM wrote to post the round, and anything left from before.
    vm.harvest(&mut dirty).unwrap();
    vm.resume().unwrap();
    vm.wait_progress(round, WAIT).unwrap();
    vm.stop().unwrap();
    dirty.clear();
    vm.harvest(&mut dirty).unwrap();
    let took = vm.pause_times().harvest;
    vm.resume().unwrap();
    dirty.sort_unstable();
    dirty.dedup();
    let mut written: Vec<u64> = pages.iter().map(|&p| KvmVm::data_page(p)).collect();
    written.sort_unstable();
    written.dedup();
    let missed: Vec<u64> = written
        .iter()
        .filter(|p| dirty.binary_search(p).is_err())
        .copied()
        .collect();
    assert!(
        missed.is_empty(),
        "missed {} pages, first {:?}",
        missed.len(),
        missed.first()
    );
    let first_data = DATA / PAGE as u64;
    let extra: Vec<u64> = dirty
        .iter()
        .filter(|&&p| p >= first_data && written.binary_search(&p).is_err())
        .copied()
        .collect();
    assert!(
        extra.is_empty(),
        "reported {} data pages never written: {extra:?}",
        extra.len()
    );
    took
}

fn ground_truth(tracking: DirtyTracking, ring_bytes: Option<u32>) {
    if !available(tracking) {
        return;
    }
    let mut config = VmConfig::new(Program::Touch, MEM, tracking);
    config.ring_bytes = ring_bytes;
    let mut vm = KvmVm::new(config).unwrap();
    harvest(&mut vm);
    let data = data_pages(MEM) as u32;
    let mut rng = Rng::new(11);
    let mut sizes = vec![1, 0, 37, 1000, data as usize];
    sizes.extend((0..5).map(|_| rng.below(u64::from(data)) as usize));
    for n in sizes {
        let pages: Vec<u32> = (0..n).map(|_| rng.below(u64::from(data)) as u32).collect();
        let took = check_round(&mut vm, &pages);
        eprintln!("{tracking} (ring {ring_bytes:?}): {n} pages written, harvest {took:?}");
    }
    assert!(vm.guest_stop().is_none());
}

#[test]
fn classic_dirty_log_reports_every_written_page() {
    ground_truth(DirtyTracking::Classic, None);
}

#[test]
fn manual_protect_reports_every_written_page() {
    ground_truth(DirtyTracking::ManualProtect, None);
}

#[test]
fn the_dirty_ring_reports_every_written_page() {
    ground_truth(DirtyTracking::Ring, None);
}

#[test]
fn a_full_dirty_ring_is_collected_by_the_vcpu_thread_and_nothing_is_lost() {
    // 4 KiB: 256 entries, far fewer than the pages of a round.
    ground_truth(DirtyTracking::Ring, Some(4096));
}

#[test]
fn web_and_dense_guests_write_like_their_workloads() {
    if !available(DirtyTracking::Classic) {
        return;
    }
    let first_data = DATA / PAGE as u64;
    let mut web = VmConfig::new(Program::Web, MEM, DirtyTracking::Classic);
    web.args = fgbi_hyp::kvm::GuestArgs {
        seed: 3,
        arg0: 64,
        arg1: 1,
    };
    let mut vm = KvmVm::new(web).unwrap();
    run_for(&vm, 10);
    harvest(&mut vm);
    run_for(&vm, 20);
    let dirty = harvest(&mut vm);
    let data = dirty.iter().filter(|&&p| p >= first_data).count();
    // 64 scattered records per iteration over 7680 data pages: mostly distinct pages.
    assert!(data > 20 * 64 / 2, "web dirtied only {data} data pages");
    assert_eq!(vm.console(), "web: start\n");

    let mut dense = VmConfig::new(Program::Dense, MEM, DirtyTracking::Classic);
    dense.args.arg0 = 300;
    let mut vm = KvmVm::new(dense).unwrap();
    run_for(&vm, 10);
    harvest(&mut vm);
    run_for(&vm, 10);
    let dirty = harvest(&mut vm);
    let data: Vec<u64> = dirty.into_iter().filter(|&p| p >= first_data).collect();
    let hot: Vec<u64> = (first_data..first_data + 300).collect();
    assert_eq!(data, hot, "dense rewrites exactly its hot pages");
}

/// The data pages (from the start of the data area) a guest wrote over at least
/// `more` iterations after its first `warm` (which include any populating), and how
/// many iterations it completed meanwhile (one more may have started).
fn data_pages_written(config: VmConfig, warm: u64, more: u64) -> (KvmVm, Vec<u64>, u64) {
    let first_data = DATA / PAGE as u64;
    let mut vm = KvmVm::new(config).unwrap();
    run_for(&vm, warm);
    vm.stop().unwrap();
    let before = vm.status_iterations();
    vm.harvest(&mut Vec::new()).unwrap();
    vm.resume().unwrap();
    run_for(&vm, more);
    vm.stop().unwrap();
    let iterations = vm.status_iterations() - before;
    let mut dirty = Vec::new();
    vm.harvest(&mut dirty).unwrap();
    vm.resume().unwrap();
    dirty.sort_unstable();
    dirty.dedup();
    let dirty = dirty
        .into_iter()
        .filter(|&p| p >= first_data)
        .map(|p| p - first_data)
        .collect();
    (vm, dirty, iterations)
}

#[test]
fn npb_ep_sys_and_dup_guests_write_like_their_workloads() {
    if !available(DirtyTracking::Classic) {
        return;
    }
    let pages = data_pages(MEM);
    let config = |program| {
        let mut config = VmConfig::new(program, MEM, DirtyTracking::Classic);
        config.args.seed = 5;
        config
    };
    // npb-ep: the 16-page batch buffer and the accumulator page after it, nothing else.
    let (vm, dirty, _) = data_pages_written(config(Program::NpbEp), 3, 5);
    assert_eq!(dirty, (0..17).collect::<Vec<u64>>());
    assert_eq!(vm.console(), "npb-ep: start\n");
    // sys: slab (first half) and pool (next 30%) written; the cache is only read.
    let (vm, dirty, _) = data_pages_written(config(Program::Sys), 2, 3);
    let (slab, pool) = (pages / 2, pages * 3 / 10);
    assert!(
        dirty.iter().all(|&p| p < slab + pool),
        "sys wrote its cache"
    );
    let in_pool = dirty.iter().filter(|&&p| p >= slab).count();
    assert!(in_pool > 60, "sys allocated only {in_pool} pool pages");
    assert!(dirty.len() - in_pool > 500, "sys touched few slab pages");
    assert_eq!(vm.console(), "sys: start\n");
    // dup: at most 8 fresh sources an iteration, copied into many targets.
    let (vm, dirty, iterations) = data_pages_written(config(Program::Dup), 2, 3);
    let sources = pages / 50;
    let fresh = dirty.iter().filter(|&&p| p < sources).count() as u64;
    assert!(
        (1..=8 * (iterations + 1)).contains(&fresh),
        "dup wrote {fresh} source pages in {iterations} iterations"
    );
    assert!(
        dirty.len() as u64 - fresh > 400,
        "dup copied into few targets"
    );
    assert_eq!(vm.console(), "dup: start\n");
}

#[test]
fn the_ep_guest_computes_npb_ep_class_s_and_verifies() {
    ep_class_s(1);
}

#[test]
fn the_ep_guest_on_three_vcpus_computes_npb_ep_class_s_and_verifies() {
    ep_class_s(3);
}

/// The ep guest on `vcpus` vCPUs: the same counts, sums within the tolerance.
fn ep_class_s(vcpus: usize) {
    if !available(DirtyTracking::Classic) {
        return;
    }
    let mut config = VmConfig::new(Program::Ep, 8 << 20, DirtyTracking::Classic);
    config.vcpus = vcpus;
    let vm = KvmVm::new(config).unwrap();
    let started = Instant::now();
    let code = vm.wait_finish(Duration::from_secs(120)).unwrap();
    eprintln!(
        "ep class S in a VM on {vcpus} vCPU(s): {:?}",
        started.elapsed()
    );
    let console = vm.console();
    let result = EpResult::parse(&console).expect(&console);
    assert_eq!(code, 0, "{console}");
    assert!(result.guest_verified, "{console}");
    assert!(result.verifies_class_s(), "{result:?}");
    // Every vCPU ran its share of the batches; the counts are integers, the same
    // on any number of vCPUs.
    let share = CLASS_S_BATCHES / vcpus as u64;
    let shares: Vec<u64> = (0..vcpus as u64)
        .map(|c| share + u64::from(c < CLASS_S_BATCHES % vcpus as u64))
        .collect();
    assert_eq!(vm.vcpu_progress(), shares);
    assert_eq!(result.pairs, 13_176_389, "{result:?}");
    // A finished guest stays stopped.
    assert!(matches!(
        vm.wait_progress(vm.progress() + 1, WAIT),
        Err(KvmError::Guest(GuestStop::Finished(0)))
    ));
}

/// The counter guest's pattern (counter.c) of vCPU `cpu`.
fn pattern(cpu: u64, n: u64, word: u64) -> u64 {
    let word = word ^ (cpu << 32);
    (n.wrapping_mul(0x9E3779B97F4A7C15)) ^ (word.wrapping_mul(0xD6E8FEB86659FD93)) ^ word
}

/// Checks, from the host, that every page of each vCPU's share of the data area
/// holds the pattern of the last iteration that wrote it, given the vCPU completed
/// `iterations[cpu]`. The guest writes a page before it counts the iteration, so a
/// stop can fall inside iteration `iterations + 1`: each word of that iteration's
/// page may already hold its new pattern.
fn check_patterns(memory: &[u8], iterations: &[u64]) {
    let pages = data_pages(memory.len()) / iterations.len() as u64;
    for (cpu, &iterations) in iterations.iter().enumerate() {
        let cpu = cpu as u64;
        let next = iterations + 1;
        let next_page = (next - 1) % pages;
        for page in 0..pages.min(iterations) {
            // The last n <= iterations with (n - 1) % pages == page.
            let n = iterations - (iterations - 1 - page) % pages;
            let at = DATA as usize + (cpu * pages + page) as usize * PAGE;
            for word in 0..512u64 {
                let got =
                    u64::from_le_bytes(memory[at + word as usize * 8..][..8].try_into().unwrap());
                let in_progress = page == next_page && got == pattern(cpu, next, word);
                assert!(
                    got == pattern(cpu, n, word) || in_progress,
                    "vCPU {cpu} page {page} word {word} after {iterations}: {got:#x}"
                );
            }
        }
    }
}

/// [`check_patterns`] for a one-vCPU guest.
fn check_pattern(memory: &[u8], iterations: u64) {
    check_patterns(memory, &[iterations]);
}

/// Every vCPU's iteration count in the status page.
fn iterations(vm: &KvmVm) -> Vec<u64> {
    (0..vm.config().vcpus)
        .map(|cpu| vm.vcpu_iterations(cpu))
        .collect()
}

#[test]
fn a_restored_vm_continues_the_counter_and_pattern_with_no_gap() {
    if !available(DirtyTracking::Classic) {
        return;
    }
    for privilege in [Privilege::User, Privilege::Kernel] {
        let mut config = VmConfig::new(Program::Counter, 8 << 20, DirtyTracking::Classic);
        config.privilege = privilege;
        config.args.arg0 = 1;
        let mut vm = KvmVm::new(config).unwrap();
        // More than one pass over the 1536 data pages at CPL3, so the guest checks
        // old contents; a few iterations of emulated CPL0 code.
        let target = match privilege {
            Privilege::User => 4000,
            Privilege::Kernel => 20,
        };
        let started = Instant::now();
        vm.wait_progress(target, Duration::from_secs(120)).unwrap();
        eprintln!(
            "{privilege:?}: {target} iterations in {:?}",
            started.elapsed()
        );
        vm.stop().unwrap();
        let saved = vm.status_iterations();
        check_pattern(vm.memory(), saved);
        let mut blob = Vec::new();
        let started = Instant::now();
        vm.capture_state(&mut blob).unwrap();
        let capture = started.elapsed();
        let image = vm.memory().to_vec();
        drop(vm);

        let started = Instant::now();
        let (mut restored, report) = KvmVm::restore(config, &image, &blob).unwrap();
        eprintln!(
            "{privilege:?}: state blob {} bytes, capture {capture:?}, restore {:?}, skipped MSRs {:x?}",
            blob.len(),
            started.elapsed(),
            report.skipped_msrs
        );
        assert_eq!(
            restored.console(),
            "counter: start\n",
            "the console is device state"
        );
        // The guest checks every page it rewrites and its counter against a register:
        // a gap or a bad byte stops it with a fault.
        let more = match privilege {
            Privilege::User => 3000,
            Privilege::Kernel => 5,
        };
        restored
            .wait_progress(saved + more, Duration::from_secs(120))
            .unwrap();
        restored.stop().unwrap();
        let now = restored.status_iterations();
        assert!(now >= saved + more);
        check_pattern(restored.memory(), now);
        assert_eq!(restored.guest_stop(), None);
    }
}

#[test]
fn a_damaged_state_blob_is_refused_and_a_guest_fault_is_reported() {
    if !available(DirtyTracking::Classic) {
        return;
    }
    let config = VmConfig::new(Program::Counter, 8 << 20, DirtyTracking::Classic);
    let mut vm = KvmVm::new(config).unwrap();
    run_for(&vm, 2000);
    vm.stop().unwrap();
    let mut blob = Vec::new();
    vm.capture_state(&mut blob).unwrap();
    let mut image = vm.memory().to_vec();
    let mut damaged = blob.clone();
    damaged[40] ^= 0x10;
    let err = KvmVm::restore(config, &image, &damaged).err().unwrap();
    assert!(err.to_string().contains("checksum"), "{err}");
    // Corrupt a data page the guest will check on its next pass: it must notice.
    let saved = vm.status_iterations();
    let next_page = saved % data_pages(image.len());
    image[DATA as usize + next_page as usize * PAGE + 8] ^= 1;
    let (restored, _) = KvmVm::restore(config, &image, &blob).unwrap();
    let err = restored.wait_progress(saved + 10, WAIT).unwrap_err();
    assert!(matches!(err, KvmError::Guest(GuestStop::Fault(1))), "{err}");
}

/// Set in the child process of [`a_checkpoint_restores_in_another_process`]: the
/// directory holding the checkpoint to restore.
const CHILD_DIR: &str = "FGBI_KVM_RESTORE_DIR";

#[test]
fn a_checkpoint_restores_in_another_process() {
    if !available(DirtyTracking::Ring) {
        return;
    }
    let mut config = VmConfig::new(Program::Counter, 8 << 20, DirtyTracking::Ring);
    config.args.arg0 = 1;
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        // The child: restore the parent's checkpoint and run on.
        let dir = std::path::PathBuf::from(dir);
        let image = std::fs::read(dir.join("memory")).unwrap();
        let blob = std::fs::read(dir.join("state")).unwrap();
        let (mut vm, _) = KvmVm::restore(config, &image, &blob).unwrap();
        let saved = fgbi_hyp::kvm::guest::read_u64(&image, fgbi_hyp::kvm::guest::STATUS);
        vm.wait_progress(saved + 3000, WAIT).unwrap();
        vm.stop().unwrap();
        check_pattern(vm.memory(), vm.status_iterations());
        eprintln!(
            "child: restored at {saved}, ran to {}",
            vm.status_iterations()
        );
        return;
    }
    let mut vm = KvmVm::new(config).unwrap();
    vm.wait_progress(5000, WAIT).unwrap();
    vm.stop().unwrap();
    let mut blob = Vec::new();
    vm.capture_state(&mut blob).unwrap();
    let dir = std::env::temp_dir().join(format!("fgbi-kvm-restore-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("memory"), vm.memory()).unwrap();
    std::fs::write(dir.join("state"), &blob).unwrap();
    drop(vm);
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_checkpoint_restores_in_another_process",
            "--nocapture",
        ])
        .env(CHILD_DIR, &dir)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the child failed:\n{stderr}");
    assert!(
        stderr.contains("child: restored at"),
        "the child did not restore:\n{stderr}"
    );
    eprintln!(
        "{}",
        stderr
            .lines()
            .find(|l| l.contains("child:"))
            .unwrap_or_default()
    );
}

/// Set in the child process of [`a_multi_vcpu_checkpoint_restores_in_another_process`].
const MULTI_CHILD_DIR: &str = "FGBI_KVM_RESTORE_MULTI_DIR";

#[test]
fn a_multi_vcpu_checkpoint_restores_in_another_process() {
    if !available(DirtyTracking::Ring) {
        return;
    }
    // Three vCPUs, each with its own 512-page share, its own ring and its own stack.
    let mut config = VmConfig::new(Program::Counter, 8 << 20, DirtyTracking::Ring);
    config.args.arg0 = 1;
    config.vcpus = 3;
    if let Some(dir) = std::env::var_os(MULTI_CHILD_DIR) {
        let dir = std::path::PathBuf::from(dir);
        let image = std::fs::read(dir.join("memory")).unwrap();
        let blob = std::fs::read(dir.join("state")).unwrap();
        let (mut vm, _) = KvmVm::restore(config, &image, &blob).unwrap();
        let saved: Vec<u64> = (0..3)
            .map(|cpu| {
                fgbi_hyp::kvm::guest::read_u64(&image, fgbi_hyp::kvm::guest::STATUS + 8 * cpu)
            })
            .collect();
        let least = *saved.iter().min().unwrap();
        vm.wait_progress(least + 1500, WAIT).unwrap();
        vm.stop().unwrap();
        let now = iterations(&vm);
        check_patterns(vm.memory(), &now);
        assert!(
            now.iter().zip(&saved).all(|(n, s)| n > s),
            "{saved:?} -> {now:?}"
        );
        assert!(*now.iter().min().unwrap() >= least + 1500, "{now:?}");
        eprintln!("child: restored 3 vCPUs at {saved:?}, ran to {now:?}");
        return;
    }
    let mut vm = KvmVm::new(config).unwrap();
    vm.wait_progress(1200, WAIT).unwrap();
    // Every vCPU's ring reports its own share.
    let dirty = harvest(&mut vm);
    let share = data_pages(8 << 20) / 3;
    let first_data = DATA / PAGE as u64;
    for cpu in 0..3 {
        let lo = first_data + cpu * share;
        assert!(
            dirty.iter().any(|p| (lo..lo + share).contains(p)),
            "no dirty page in vCPU {cpu}'s share"
        );
    }
    vm.stop().unwrap();
    let saved = iterations(&vm);
    check_patterns(vm.memory(), &saved);
    assert_eq!(vm.vcpu_progress().len(), 3);
    let mut blob = Vec::new();
    vm.capture_state(&mut blob).unwrap();
    let dir = std::env::temp_dir().join(format!("fgbi-kvm-restore-multi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("memory"), vm.memory()).unwrap();
    std::fs::write(dir.join("state"), &blob).unwrap();
    drop(vm);
    // The wrong vCPU count is refused.
    let mut two = config;
    two.vcpus = 2;
    let image = std::fs::read(dir.join("memory")).unwrap();
    let err = KvmVm::restore(two, &image, &blob).err().unwrap();
    assert!(err.to_string().contains("3 vCPUs"), "{err}");
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_multi_vcpu_checkpoint_restores_in_another_process",
            "--nocapture",
        ])
        .env(MULTI_CHILD_DIR, &dir)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the child failed:\n{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("child: restored 3 vCPUs"));
    assert!(line.is_some(), "the child did not restore:\n{stderr}");
    eprintln!("saved at {saved:?}; {}", line.unwrap_or_default());
}

/// Byte offsets in a `kvm_irqchip` holding a PIC: after chip_id and pad, the
/// `kvm_pic_state` fields imr (2) and irq_base (5).
const PIC_IMR: usize = 8 + 2;
const PIC_IRQ_BASE: usize = 8 + 5;

#[test]
fn the_in_kernel_pics_and_pit_survive_a_restore_and_a_lost_one_is_noticed() {
    if !available(DirtyTracking::Classic) {
        return;
    }
    let config = VmConfig::new(Program::Pit, 8 << 20, DirtyTracking::Classic);
    let mut vm = KvmVm::new(config).unwrap();
    // About 73 PIT periods a second.
    vm.wait_progress(5, WAIT).unwrap();
    vm.stop().unwrap();
    let saved = vm.progress();
    let mut blob = Vec::new();
    vm.capture_state(&mut blob).unwrap();
    let image = vm.memory().to_vec();
    drop(vm);
    let state = MachineState::decode(&blob).unwrap();
    let kernel = state.kernel_devices.as_ref().unwrap();
    let (master, slave) = (kernel.pic_master.as_bytes(), kernel.pic_slave.as_bytes());
    assert_eq!((master[PIC_IMR], slave[PIC_IMR]), (0xa5, 0x5a));
    assert_eq!((master[PIC_IRQ_BASE], slave[PIC_IRQ_BASE]), (0x20, 0x28));
    let channel = kernel.pit.channels[0];
    assert_eq!((channel.mode, channel.count), (2, 0x4000));

    // Restored, the guest finds its devices as it programmed them and counts on,
    // and the VM's clock continues from the checkpoint's (a fresh VM's starts near 0).
    let (mut restored, _) = KvmVm::restore(config, &image, &blob).unwrap();
    restored.wait_progress(saved + 5, WAIT).unwrap();
    assert_eq!(restored.guest_stop(), None);
    restored.stop().unwrap();
    let mut again = Vec::new();
    restored.capture_state(&mut again).unwrap();
    let clock = MachineState::decode(&again).unwrap().clock.clock;
    assert!(
        clock >= state.clock.clock,
        "{clock} < {}",
        state.clock.clock
    );
    drop(restored);

    // A checkpoint whose master PIC lost its mask: the guest notices.
    let mut state = MachineState::decode(&blob).unwrap();
    let kernel = state.kernel_devices.as_mut().unwrap();
    let mut bytes = kernel.pic_master.as_bytes().to_vec();
    bytes[PIC_IMR] = 0;
    kernel.pic_master = FromBytes::read_from_bytes(&bytes).unwrap();
    let mut lost = Vec::new();
    state.encode(&mut lost);
    let (restored, _) = KvmVm::restore(config, &image, &lost).unwrap();
    let err = restored.wait_progress(saved + 5, WAIT).unwrap_err();
    assert!(matches!(err, KvmError::Guest(GuestStop::Fault(4))), "{err}");

    // The pit guest needs the irqchip.
    let mut bare = config;
    bare.irqchip = false;
    let err = KvmVm::new(bare).err().unwrap();
    assert!(err.to_string().contains("enable the irqchip"), "{err}");
}
