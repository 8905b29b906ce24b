//! The VM: one memory slot over a [`Region`], an optional in-kernel irqchip, one or
//! more vCPUs each on its own thread, a guest program; created fresh or restored from
//! a checkpoint, and driven through [`Protected`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_MP_STATE_RUNNABLE,
    KVM_PIT_SPEAKER_DUMMY, kvm_mp_state, kvm_pit_config,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use super::dirty::{DirtyLog, DirtyTracking, SLOT, SharedRing};
use super::guest::{self, GuestArgs, Privilege, Program};
use super::kv::KvDevice;
use super::state::{self, DeviceState, Machine, MachineState, RestoreReport};
use super::sys::GuestMemory;
use super::vcpu::{DeviceIo, GuestStop, VcpuThreads};
use super::{KvmError, sys};
use crate::cow::{CowMode, CowTracker, Granule};
use crate::memory::{Backing, Region};
use crate::protected::{HypError, Protected};
use crate::workload::PAGE;

/// What VM to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest memory in bytes: a multiple of 2 MiB from 4 MiB to 3 GiB.
    pub mem_bytes: usize,
    /// The guest program.
    pub program: Program,
    /// Its parameters.
    pub args: GuestArgs,
    /// The privilege level it runs at.
    pub privilege: Privilege,
    /// How dirty pages are found.
    pub tracking: DirtyTracking,
    /// The dirty ring's size in bytes (ring tracking): a power of two of at least
    /// 4096; by default as large as KVM allows, up to 1 MiB.
    pub ring_bytes: Option<u32>,
    /// Whether to create an in-kernel irqchip (PICs, IOAPIC, LAPICs) and PIT; their
    /// state is then part of the checkpoint.
    pub irqchip: bool,
    /// vCPUs: 1 to [`guest::MAX_VCPUS`] (at most [`Program::max_vcpus`]); each runs
    /// the program in its own share of the data area.
    pub vcpus: usize,
    /// Output commit: the key-value device holds each reply until
    /// [`KvmVm::committed`] says the epoch that produced it is on the backup (set it
    /// when the VM is protected); otherwise replies leave at once.
    pub output_commit: bool,
    /// Copy-on-write checkpoints: the pause write-protects the dirty pages of guest
    /// memory and they are copied after the vCPUs resume, each before the guest's (or
    /// the VMM's) first write to it ([`crate::cow`], [`CowMode::Snapshot`]: KVM's
    /// dirty log still finds the dirty pages).
    pub copy_on_write: bool,
    /// With `copy_on_write`: the unit in which pages are protected, copied and
    /// unprotected (by default 2 MiB, chosen by measurement: docs/performance.md).
    pub cow_granule: Granule,
}

impl VmConfig {
    /// `program` in `mem_bytes` of memory at CPL3, tracked by `tracking`, with an
    /// irqchip and default arguments.
    pub fn new(program: Program, mem_bytes: usize, tracking: DirtyTracking) -> Self {
        Self {
            mem_bytes,
            program,
            args: GuestArgs::default(),
            privilege: Privilege::User,
            tracking,
            ring_bytes: None,
            irqchip: true,
            vcpus: 1,
            output_commit: false,
            copy_on_write: false,
            cow_granule: Granule::default(),
        }
    }
}

/// How long the parts of the last pause took.
#[derive(Clone, Copy, Debug, Default)]
pub struct PauseTimes {
    /// From asking the vCPU to stop until it was parked.
    pub stop: Duration,
    /// The dirty harvest (KVM's part).
    pub harvest: Duration,
    /// Capturing and encoding the machine state.
    pub state: Duration,
    /// Pages the last harvest reported.
    pub dirty_pages: usize,
}

/// A KVM micro-VM running one guest program on one or more vCPUs.
pub struct KvmVm {
    // Fields drop in order: copy-on-write protection is lifted first (no vCPU may
    // wait on a fault nobody serves), the vCPU threads end before the VM and its
    // memory go.
    cow: Option<CowTracker>,
    vcpus: VcpuThreads,
    dirty: DirtyLog,
    vm: Arc<VmFd>,
    _kvm: Kvm,
    kv: Option<Arc<KvDevice>>,
    config: VmConfig,
    msrs: Vec<u32>,
    /// Pages the VMM wrote into guest memory since the last harvest (KVM logs only
    /// the guest's writes).
    host_writes: Vec<u64>,
    stopped: bool,
    round: u64,
    times: PauseTimes,
    memory: Region,
}

/// A VM with memory and vCPUs, not yet running.
struct Parts {
    kvm: Kvm,
    vm: VmFd,
    dirty: DirtyLog,
    vcpus: Vec<VcpuFd>,
    rings: Vec<SharedRing>,
    msrs: Vec<u32>,
    xsave_size: usize,
    memory: Region,
}

impl Parts {
    fn new(config: &VmConfig) -> Result<Self, KvmError> {
        guest::check_size(config.mem_bytes).map_err(KvmError::Config)?;
        if !(1..=config.program.max_vcpus()).contains(&config.vcpus) {
            return Err(KvmError::Config(format!(
                "{} vCPUs for the {} guest: use 1 to {}",
                config.vcpus,
                config.program.name(),
                config.program.max_vcpus()
            )));
        }
        if config.program == Program::Pit && !config.irqchip {
            return Err(KvmError::Config(
                "the pit guest drives the in-kernel PIC and PIT: enable the irqchip".into(),
            ));
        }
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let vm = kvm
            .create_vm()
            .map_err(|e| KvmError::ioctl("KVM_CREATE_VM", e))?;
        // The ring must be enabled before any vCPU exists.
        let mut dirty = DirtyLog::enable(&vm, config.tracking, config.ring_bytes)?;
        if !vm.check_extension(Cap::Xsave) {
            return Err(KvmError::Unsupported("KVM_CAP_XSAVE"));
        }
        let xsave_size = usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        if xsave_size > size_of::<kvm_bindings::kvm_xsave>() {
            return Err(KvmError::Unsupported("an XSAVE area of at most 4096 bytes"));
        }
        vm.set_tss_address(guest::KVM_TSS)
            .map_err(|e| KvmError::ioctl("KVM_SET_TSS_ADDR", e))?;
        if config.irqchip {
            vm.create_irq_chip()
                .map_err(|e| KvmError::ioctl("KVM_CREATE_IRQCHIP", e))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.create_pit2(pit)
                .map_err(|e| KvmError::ioctl("KVM_CREATE_PIT2", e))?;
        }
        let mut memory = Region::new(config.mem_bytes)?;
        // SAFETY: `memory` is a private anonymous mapping that `KvmVm` owns and drops
        // only after the VM (field order in `KvmVm`).
        unsafe {
            sys::set_memory(
                &vm,
                SLOT,
                memory.as_mut_ptr(),
                memory.len(),
                KVM_MEM_LOG_DIRTY_PAGES,
            )
        }
        .map_err(|e| KvmError::ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| KvmError::ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut vcpus = Vec::with_capacity(config.vcpus);
        let mut rings = Vec::new();
        for id in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(id as u64)
                .map_err(|e| KvmError::ioctl("KVM_CREATE_VCPU", e))?;
            // Without it KVM refuses EFER.LME.
            vcpu.set_cpuid2(&with_apic_id(&supported, id as u32))
                .map_err(|e| KvmError::ioctl("KVM_SET_CPUID2", e))?;
            rings.extend(dirty.attach(&vcpu)?);
            vcpus.push(vcpu);
        }
        let msrs = kvm
            .get_msr_index_list()
            .map_err(|e| KvmError::ioctl("KVM_GET_MSR_INDEX_LIST", e))?
            .as_slice()
            .to_vec();
        Ok(Self {
            kvm,
            vm,
            dirty,
            vcpus,
            rings,
            msrs,
            xsave_size,
            memory,
        })
    }

    /// Starts the vCPU threads and lets the guest run.
    fn start(
        self,
        config: VmConfig,
        devices: DeviceState,
        host_writes: Vec<u64>,
    ) -> Result<KvmVm, KvmError> {
        let vm = Arc::new(self.vm);
        let mut memory = self.memory;
        // SAFETY: `memory` moves into the `KvmVm`, which drops it only after the vCPU
        // threads (field order); its devices copy only while their vCPU is out of
        // KVM_RUN, into slots the guest reads after the exit.
        let view = unsafe { GuestMemory::new(memory.as_mut_ptr(), memory.len()) }
            .ok_or(KvmError::Order("guest memory has no address"))?;
        let kv =
            (config.program == Program::Kv).then(|| Arc::new(KvDevice::new(config.output_commit)));
        let io = DeviceIo {
            memory: view,
            kv: kv.clone(),
        };
        let cow = if config.copy_on_write {
            // SAFETY: guest memory is private anonymous memory, 2 MiB-aligned; it moves
            // into the `KvmVm`, which drops the tracker first (field order) and the
            // memory last, and the checkpointer finishes every snapshot it arms within
            // one checkpoint.
            Some(unsafe {
                CowTracker::new(
                    memory.as_mut_ptr(),
                    memory.len(),
                    memory.backing(),
                    CowMode::Snapshot,
                    config.cow_granule,
                )
            }?)
        } else {
            None
        };
        let mut vcpus = VcpuThreads::spawn(self.vcpus, Arc::clone(&vm), self.rings, devices, io)?;
        vcpus.resume();
        Ok(KvmVm {
            cow,
            vcpus,
            dirty: self.dirty,
            vm,
            _kvm: self.kvm,
            kv,
            config,
            msrs: self.msrs,
            host_writes,
            stopped: false,
            round: 0,
            times: PauseTimes::default(),
            memory,
        })
    }
}

impl KvmVm {
    /// Builds a VM, loads the program and its page tables, and starts the guest. The
    /// first harvest reports every page the VMM wrote to boot it.
    pub fn new(config: VmConfig) -> Result<Self, KvmError> {
        let mut parts = Parts::new(&config)?;
        let mut host_writes = Vec::new();
        guest::write_boot(
            &mut parts.memory,
            config.program,
            config.args,
            config.vcpus,
            &mut host_writes,
        )
        .map_err(KvmError::Config)?;
        for (cpu, vcpu) in parts.vcpus.iter().enumerate() {
            let mut sregs = vcpu
                .get_sregs()
                .map_err(|e| KvmError::ioctl("KVM_GET_SREGS", e))?;
            guest::set_long_mode(&mut sregs, config.privilege);
            vcpu.set_sregs(&sregs)
                .map_err(|e| KvmError::ioctl("KVM_SET_SREGS", e))?;
            vcpu.set_regs(&guest::entry(cpu))
                .map_err(|e| KvmError::ioctl("KVM_SET_REGS", e))?;
            // With an in-kernel irqchip every vCPU but the first would wait for a
            // startup IPI; the VMM starts them all.
            let runnable = kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            };
            vcpu.set_mp_state(runnable)
                .map_err(|e| KvmError::ioctl("KVM_SET_MP_STATE", e))?;
        }
        parts.start(config, DeviceState::new(config.vcpus), host_writes)
    }

    /// Builds a VM from a checkpoint: guest memory `image` and the state blob
    /// `blob` that [`Protected::capture_state`] produced, and lets the guest continue.
    /// `config` must describe the same memory size and privilege; its program and
    /// arguments are already in `image`. The first harvest reports every page.
    pub fn restore(
        config: VmConfig,
        image: &[u8],
        blob: &[u8],
    ) -> Result<(Self, RestoreReport), KvmError> {
        let state = MachineState::decode(blob)?;
        if state.mem_bytes != config.mem_bytes as u64 || image.len() != config.mem_bytes {
            return Err(KvmError::Config(format!(
                "restoring {} bytes of memory with a state of {} bytes into a VM of {}: use the checkpoint's memory size",
                image.len(),
                state.mem_bytes,
                config.mem_bytes
            )));
        }
        if state.privilege != config.privilege {
            return Err(KvmError::Config(format!(
                "the checkpoint ran at {:?}, the VM is configured for {:?}",
                state.privilege, config.privilege
            )));
        }
        if state.irqchip() != config.irqchip {
            return Err(KvmError::Config(
                "the checkpoint and the VM differ in having an in-kernel irqchip".into(),
            ));
        }
        if state.vcpus.len() != config.vcpus {
            return Err(KvmError::Config(format!(
                "the checkpoint has {} vCPUs, the VM is configured for {}: use the checkpoint's count",
                state.vcpus.len(),
                config.vcpus
            )));
        }
        let mut parts = Parts::new(&config)?;
        parts.memory.copy_from_slice(image);
        let report = state::restore(&parts.vcpus, &parts.vm, &state, parts.xsave_size)?;
        let all = (0..(config.mem_bytes / PAGE) as u64).collect();
        Ok((parts.start(config, state.devices, all)?, report))
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// What backs guest memory.
    pub fn backing(&self) -> Backing {
        self.memory.backing()
    }

    /// The guest's iteration count as last reported on the doorbells: the least of
    /// its vCPUs'.
    pub fn progress(&self) -> u64 {
        self.vcpus.devices().least_progress()
    }

    /// Each vCPU's iteration count as last reported on its doorbell.
    pub fn vcpu_progress(&self) -> Vec<u64> {
        self.vcpus.devices().progress
    }

    /// Waits until every vCPU reports at least `target` iterations; fails if the
    /// guest stops for good or `timeout` passes first.
    pub fn wait_progress(&self, target: u64, timeout: Duration) -> Result<u64, KvmError> {
        self.vcpus.wait_progress(target, timeout)
    }

    /// Waits until the guest program finishes (the exit port) and returns its exit
    /// code; fails if the guest stops otherwise or `timeout` passes first.
    pub fn wait_finish(&self, timeout: Duration) -> Result<u32, KvmError> {
        self.vcpus.wait_finish(timeout)
    }

    /// The guest's console output so far (the most recent 64 KiB).
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.vcpus.devices().console).into_owned()
    }

    /// Why the guest stopped for good, if it did.
    pub fn guest_stop(&self) -> Option<GuestStop> {
        self.vcpus.guest_stop()
    }

    /// vCPU 0's iteration count in the guest's status page (exact while stopped).
    pub fn status_iterations(&self) -> u64 {
        self.vcpu_iterations(0)
    }

    /// vCPU `cpu`'s iteration count in the guest's status page (exact while
    /// stopped).
    pub fn vcpu_iterations(&self, cpu: usize) -> u64 {
        guest::read_u64(&self.memory, guest::STATUS + 8 * cpu as u64)
    }

    /// The key-value device (the `kv` guest only).
    pub fn kv_device(&self) -> Option<Arc<KvDevice>> {
        self.kv.clone()
    }

    /// Epoch `epoch` (the checkpoint taken at this VM's `epoch`-th stop) is on the
    /// backup: with output commit, the device releases the replies produced in it
    /// and before.
    pub fn committed(&self, epoch: u64) {
        if let Some(kv) = &self.kv {
            kv.committed(epoch);
        }
    }

    /// How long the parts of the last pause took.
    pub fn pause_times(&self) -> PauseTimes {
        self.times
    }

    /// Touch program only, while stopped: asks the guest to write one word into each
    /// of the data pages `pages` (indices from the start of the data area) once
    /// resumed; it rings the doorbell with the returned round number when done.
    pub fn post_round(&mut self, pages: &[u32]) -> Result<u64, KvmError> {
        if self.config.program != Program::Touch {
            return Err(KvmError::Order(
                "post_round: only the touch program takes rounds",
            ));
        }
        if !self.stopped {
            return Err(KvmError::Order("post_round: stop the VM first"));
        }
        self.round += 1;
        guest::write_round(&mut self.memory, self.round, pages, &mut self.host_writes)
            .map_err(KvmError::Config)?;
        Ok(self.round)
    }

    /// The guest page number of data page `page`.
    pub fn data_page(page: u32) -> u64 {
        guest::DATA / PAGE as u64 + u64::from(page)
    }

    fn require_stopped(&self, what: &'static str) -> Result<(), HypError> {
        match self.stopped {
            true => Ok(()),
            false => Err(HypError::Order(what)),
        }
    }
}

impl Protected for KvmVm {
    fn mem_bytes(&self) -> u64 {
        self.memory.len() as u64
    }

    fn stop(&mut self) -> Result<(), HypError> {
        if !self.stopped {
            self.times.stop = self.vcpus.stop()?;
            self.stopped = true;
        }
        Ok(())
    }

    fn harvest(&mut self, dirty: &mut Vec<u64>) -> Result<(), HypError> {
        self.require_stopped("harvest while running")?;
        let started = Instant::now();
        let first = dirty.len();
        self.dirty.harvest(&self.vm, self.memory.len(), dirty)?;
        self.times.harvest = started.elapsed();
        self.times.dirty_pages = dirty.len() - first;
        dirty.append(&mut self.host_writes);
        dirty.append(&mut self.vcpus.take_host_writes());
        Ok(())
    }

    fn capture_state(&mut self, out: &mut Vec<u8>) -> Result<(), HypError> {
        self.require_stopped("capture_state while running")?;
        let started = Instant::now();
        let devices = self.vcpus.devices();
        let vcpus = self
            .vcpus
            .parked()
            .ok_or(KvmError::Order("capture_state: the vCPUs are not parked"))?;
        let machine = Machine {
            mem_bytes: self.memory.len() as u64,
            privilege: self.config.privilege,
            irqchip: self.config.irqchip,
        };
        let state = state::capture(&vcpus, &self.vm, &mut self.msrs, machine, devices)?;
        drop(vcpus);
        state.encode(out);
        self.times.state = started.elapsed();
        Ok(())
    }

    fn memory(&self) -> &[u8] {
        &self.memory
    }

    fn copy_on_write(&self) -> Option<&CowTracker> {
        self.cow.as_ref()
    }

    fn resume(&mut self) -> Result<(), HypError> {
        self.require_stopped("resume while running")?;
        self.vcpus.resume();
        self.stopped = false;
        match self.vcpus.guest_stop() {
            Some(stop) => Err(KvmError::Guest(stop).into()),
            None => Ok(()),
        }
    }
}

/// `supported` with vCPU `id`'s initial APIC ID in CPUID leaves 1 (EBX[31:24]),
/// 0xB and 0x1F (EDX).
fn with_apic_id(supported: &CpuId, id: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (id << 24),
            0xb | 0x1f => entry.edx = id,
            _ => {}
        }
    }
    cpuid
}
