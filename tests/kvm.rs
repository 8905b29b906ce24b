//! A running KVM guest replicated epoch by epoch to an in-process replica, by each
//! dirty tracking method, every epoch verified; then failover: a VM restored from
//! the replica continues the guest exactly, down to the NPB EP kernel's verified
//! sums. Skips, loudly, without KVM.

use std::time::Duration;

use fgbi::local::LocalReplication;
use fgbi_engine::{EncoderConfig, Geometry, Mode};
use fgbi_hyp::cow::Granule;
use fgbi_hyp::kvm::ep::{CLASS_S_BATCHES, EpResult};
use fgbi_hyp::kvm::{DirtyTracking, GuestArgs, KvmVm, MachineState, Program, VmConfig, probe};

const MEM: usize = 16 << 20;
const EPOCHS: u64 = 30;

fn replicate(tracking: DirtyTracking, program: Program, args: GuestArgs, vcpus: usize) {
    let mut config = VmConfig::new(program, MEM, tracking);
    config.args = args;
    config.vcpus = vcpus;
    replicate_vm(config);
}

/// Replicates a VM built from `config` for [`EPOCHS`] verified epochs, then fails
/// over to a VM restored from the replica.
fn replicate_vm(config: VmConfig) {
    let (tracking, program, vcpus) = (config.tracking, config.program, config.vcpus);
    if !fgbi_hyp::feature::available("KVM", probe(tracking)) {
        return;
    }
    let mut vm = KvmVm::new(config).unwrap();
    let geometry = Geometry::new(MEM as u64, 64).unwrap();
    let mut replication = LocalReplication::new(EncoderConfig::new(geometry, Mode::Fgbi)).unwrap();
    let mut pauses = Vec::new();
    let mut dirty = 0;
    for epoch in 1..=EPOCHS {
        let report = replication.checkpoint(&mut vm, true).unwrap();
        assert_eq!(report.epoch, epoch);
        assert_eq!(report.verified, Some(true), "{tracking} epoch {epoch}");
        pauses.push(report.pause);
        dirty += report.dirty_pages;
        std::thread::sleep(Duration::from_millis(5));
    }
    pauses.sort_unstable();
    eprintln!(
        "{tracking}{} {} on {vcpus} vCPUs: {EPOCHS} epochs verified, {dirty} dirty pages, pause median {:?} max {:?}",
        if config.copy_on_write {
            format!(" copy-on-write at {}", config.cow_granule)
        } else {
            String::new()
        },
        program.name(),
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1]
    );

    // Failover: the replica's memory and state make a VM that carries on.
    let progress = vm.progress();
    drop(vm);
    let (restored, _) = KvmVm::restore(config, replication.replica(), replication.state()).unwrap();
    assert!(restored.progress() <= progress);
    restored
        .wait_progress(restored.progress() + 100, Duration::from_secs(20))
        .unwrap();
    assert_eq!(restored.guest_stop(), None);
}

/// The counter guest, ringing the doorbell every 16 iterations.
const COUNTER: GuestArgs = GuestArgs {
    seed: 0,
    arg0: 16,
    arg1: 0,
};

#[test]
fn a_counter_guest_is_replicated_and_fails_over_with_classic_dirty_logging() {
    replicate(DirtyTracking::Classic, Program::Counter, COUNTER, 1);
}

#[test]
fn a_counter_guest_is_replicated_and_fails_over_with_manual_protect() {
    replicate(DirtyTracking::ManualProtect, Program::Counter, COUNTER, 1);
}

#[test]
fn a_counter_guest_is_replicated_and_fails_over_with_the_dirty_ring() {
    replicate(DirtyTracking::Ring, Program::Counter, COUNTER, 1);
}

#[test]
fn a_counter_guest_on_three_vcpus_is_replicated_and_fails_over_by_every_method() {
    for tracking in DirtyTracking::ALL {
        replicate(tracking, Program::Counter, COUNTER, 3);
    }
}

/// Copy-on-write checkpoints: the dense counter guest rewrites every data page right
/// after each resume, so the fault handler copies pages while the copier runs, on
/// three vCPUs; every epoch must still reach the replica as it was at the pause, at
/// the finest and the coarsest granule.
#[test]
fn a_counter_guest_is_replicated_copy_on_write_and_fails_over_by_every_method_and_granule() {
    let backing = fgbi_hyp::memory::Backing::TransparentHuge;
    if !fgbi_hyp::feature::available(
        "copy-on-write snapshots",
        fgbi_hyp::cow::CowTracker::probe(backing),
    ) {
        return;
    }
    for granule in [Granule::MIN, Granule::MAX] {
        for tracking in DirtyTracking::ALL {
            let mut config = VmConfig::new(Program::Counter, MEM, tracking);
            config.args = COUNTER;
            config.vcpus = 3;
            config.copy_on_write = true;
            config.cow_granule = granule;
            replicate_vm(config);
        }
    }
}

#[test]
fn a_web_guest_is_replicated_by_every_method() {
    let args = GuestArgs {
        seed: 9,
        arg0: 32,
        arg1: 1,
    };
    for tracking in DirtyTracking::ALL {
        replicate(tracking, Program::Web, args, 1);
    }
}

#[test]
fn the_npb_ep_kernel_verifies_after_failing_over_mid_computation() {
    ep_fails_over(1);
}

#[test]
fn the_npb_ep_kernel_on_two_vcpus_verifies_after_failing_over_mid_computation() {
    ep_fails_over(2);
}

/// The EP kernel on `vcpus` vCPUs is checkpointed, every epoch verified, until the
/// replica holds an eighth of its batches; a VM restored from the replica finishes
/// it, and the sums verify.
fn ep_fails_over(vcpus: usize) {
    if !fgbi_hyp::feature::available("KVM", probe(DirtyTracking::Classic)) {
        return;
    }
    let mem = 8 << 20;
    let mut config = VmConfig::new(Program::Ep, mem, DirtyTracking::Classic);
    config.vcpus = vcpus;
    let mut vm = KvmVm::new(config).unwrap();
    let geometry = Geometry::new(mem as u64, 64).unwrap();
    let mut replication = LocalReplication::new(EncoderConfig::new(geometry, Mode::Fgbi)).unwrap();
    // Each vCPU runs its share of the batches; progress is the least share done.
    let share = CLASS_S_BATCHES / vcpus as u64;
    let mut batches = 0;
    let mut epochs = 0;
    while batches < share / 8 {
        let report = replication.checkpoint(&mut vm, true).unwrap();
        assert_eq!(report.verified, Some(true), "epoch {}", report.epoch);
        batches = MachineState::decode(replication.state())
            .unwrap()
            .devices
            .least_progress();
        epochs += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        batches < share,
        "the kernel finished before the failover ({batches} batches)"
    );
    // The primary dies mid-computation; the replica's VM finishes the kernel.
    drop(vm);
    let (restored, _) = KvmVm::restore(config, replication.replica(), replication.state()).unwrap();
    // The restored guest runs at once: it starts from the replica's batch count.
    assert!(restored.progress() >= batches);
    let code = restored.wait_finish(Duration::from_secs(120)).unwrap();
    let console = restored.console();
    let result = EpResult::parse(&console).expect(&console);
    eprintln!("{vcpus} vCPU(s): failed over after {epochs} epochs at batch {batches}: {result:?}");
    assert_eq!(code, 0, "{console}");
    assert!(result.guest_verified, "{console}");
    assert!(result.verifies_class_s(), "{result:?}");
    assert_eq!(restored.vcpu_progress(), vec![share; vcpus]);
}
