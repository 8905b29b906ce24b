//! Machine state for the checkpoint's state blob: everything of the vCPUs and the VM
//! that is not guest memory, captured while every vCPU is stopped, and a versioned,
//! checksummed encoding of it.
//!
//! # Format (version 3)
//!
//! ```text
//! magic "FGBIKVM\0" | version u32 | flags u32 (0)
//! section*          : tag u32 | len u32 | payload (len bytes)
//! checksum u64      : xxh3-64 of every byte before it
//! ```
//!
//! All integers are little-endian; KVM structures are stored as their x86-64 C
//! layout. A tag's low 16 bits name the section's kind, its high 16 bits the vCPU a
//! per-vCPU section belongs to (0 for the VM's sections). Sections, each once:
//!
//! - the VM's: machine (memory size u64, privilege u32, vCPU count u32), CLOCK
//!   (`kvm_clock_data`), devices (vCPU count u32, each vCPU's doorbell progress u64,
//!   fault code u32, then the console bytes), and with an in-kernel irqchip PIC_MASTER,
//!   PIC_SLAVE and IOAPIC (each a `kvm_irqchip` of its chip id) and PIT
//!   (`kvm_pit_state2`);
//! - each vCPU's, in vCPU order: REGS, SREGS, XSAVE (x87, SSE and AVX state: it
//!   supersedes KVM_GET_FPU), XCRS, MSRS (an array of `kvm_msr_entry`), VCPU_EVENTS,
//!   MP_STATE, DEBUGREGS, LAPIC (every vCPU's or none: only with an in-kernel
//!   irqchip).
//!
//! A decoder refuses a bad magic, another version, a bad checksum, an unknown or
//! repeated tag, a section of a vCPU the machine does not have, a wrong section size,
//! a missing section, a vCPU count out of range or differing between sections, an
//! irqchip section holding another chip, and irqchip or PIT sections without LAPICs
//! (or LAPICs without them).

use std::collections::BTreeMap;
use std::ops::Deref;

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::KvmError;
use super::guest::{MAX_VCPUS, Privilege};
use super::sys;

/// The blob's first bytes.
const MAGIC: &[u8; 8] = b"FGBIKVM\0";
/// The format version this module writes and reads.
pub const VERSION: u32 = 3;

/// Section kinds (a tag's low 16 bits).
mod tag {
    pub const MACHINE: u32 = 1;
    pub const REGS: u32 = 2;
    pub const SREGS: u32 = 3;
    pub const XSAVE: u32 = 4;
    pub const XCRS: u32 = 5;
    pub const MSRS: u32 = 6;
    pub const EVENTS: u32 = 7;
    pub const MP_STATE: u32 = 8;
    pub const DEBUGREGS: u32 = 9;
    pub const LAPIC: u32 = 10;
    pub const CLOCK: u32 = 11;
    pub const DEVICES: u32 = 12;
    pub const PIC_MASTER: u32 = 13;
    pub const PIC_SLAVE: u32 = 14;
    pub const IOAPIC: u32 = 15;
    pub const PIT: u32 = 16;

    /// The tag of vCPU `vcpu`'s section of kind `kind`.
    pub fn of(kind: u32, vcpu: usize) -> u32 {
        kind | (vcpu as u32) << 16
    }
}

/// A state blob could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateError {
    /// Not a state blob of this VMM.
    #[error("not an fgbi KVM state blob (bad magic): pass the state captured from a KvmVm")]
    Magic,
    /// Written by another format version.
    #[error(
        "state blob version {0}, this build reads version {VERSION}: restore with the matching fgbi"
    )]
    Version(u32),
    /// The checksum does not match: the blob was damaged.
    #[error(
        "state blob checksum mismatch (stored {stored:#018x}, computed {computed:#018x}): the blob is damaged"
    )]
    Checksum {
        /// The checksum in the blob.
        stored: u64,
        /// The checksum of the bytes.
        computed: u64,
    },
    /// The blob ends inside a header or section.
    #[error("state blob truncated at byte {0}: the blob is incomplete")]
    Truncated(usize),
    /// A section has the wrong size for what it holds.
    #[error(
        "state blob section {tag:#x} is {len} bytes, expected {expected}: the blob is damaged or from another build"
    )]
    SectionSize {
        /// Section tag.
        tag: u32,
        /// Its size.
        len: usize,
        /// The size its structure has.
        expected: usize,
    },
    /// An unknown or repeated section, or one of a vCPU the machine does not have.
    #[error(
        "state blob has an unexpected section {0:#x} (unknown, repeated or of a vCPU beyond the machine's): the blob is from another build"
    )]
    Section(u32),
    /// A required section is missing.
    #[error("state blob lacks the {section} section of {owner}: the blob is incomplete")]
    Missing {
        /// The section.
        section: &'static str,
        /// "the VM" or "vCPU n".
        owner: String,
    },
    /// The vCPU count is out of range or differs between sections.
    #[error("state blob is inconsistent: {0}: the blob is damaged or from another build")]
    Inconsistent(String),
}

/// The VMM's devices: the doorbell and console ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// Each vCPU's iteration count as last reported on its doorbell.
    pub progress: Vec<u64>,
    /// The fault code the guest reported (0: none).
    pub fault: u32,
    /// Console output so far (every vCPU's).
    pub console: Vec<u8>,
}

impl DeviceState {
    /// Fresh devices of a VM of `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        Self {
            progress: vec![0; vcpus],
            ..Self::default()
        }
    }

    /// The least progress of any vCPU (the VM's progress).
    pub fn least_progress(&self) -> u64 {
        self.progress.iter().copied().min().unwrap_or(0)
    }
}

/// Everything of a stopped vCPU.
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87, SSE and AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Model-specific registers.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for SIPI.
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC (with an in-kernel irqchip).
    pub lapic: Option<kvm_lapic_state>,
}

/// The state of the devices KVM emulates in the kernel with an irqchip: the two
/// 8259 PICs, the IOAPIC and the 8254 PIT.
pub struct KernelDevices {
    /// The master PIC (`KVM_GET_IRQCHIP`, chip 0).
    pub pic_master: kvm_irqchip,
    /// The slave PIC (chip 1).
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC (chip 2).
    pub ioapic: kvm_irqchip,
    /// The PIT (`KVM_GET_PIT2`).
    pub pit: kvm_pit_state2,
}

impl KernelDevices {
    /// The irqchip sections: tag, name, chip id, state.
    fn chips(&self) -> [(u32, &'static str, u32, &kvm_irqchip); 3] {
        [
            (
                tag::PIC_MASTER,
                "PIC_MASTER",
                KVM_IRQCHIP_PIC_MASTER,
                &self.pic_master,
            ),
            (
                tag::PIC_SLAVE,
                "PIC_SLAVE",
                KVM_IRQCHIP_PIC_SLAVE,
                &self.pic_slave,
            ),
            (tag::IOAPIC, "IOAPIC", KVM_IRQCHIP_IOAPIC, &self.ioapic),
        ]
    }

    /// Reads them from `vm`.
    fn capture(vm: &VmFd) -> Result<Self, KvmError> {
        let chip = |chip_id| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map(|()| chip)
                .map_err(|x| KvmError::ioctl("KVM_GET_IRQCHIP", x))
        };
        Ok(Self {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: vm
                .get_pit2()
                .map_err(|x| KvmError::ioctl("KVM_GET_PIT2", x))?,
        })
    }

    /// Loads them into `vm` (which has an irqchip and a PIT).
    fn restore(&self, vm: &VmFd) -> Result<(), KvmError> {
        for (_, _, _, chip) in self.chips() {
            vm.set_irqchip(chip)
                .map_err(|x| KvmError::ioctl("KVM_SET_IRQCHIP", x))?;
        }
        vm.set_pit2(&self.pit)
            .map_err(|x| KvmError::ioctl("KVM_SET_PIT2", x))
    }
}

/// Everything of a stopped machine that is not guest memory.
pub struct MachineState {
    /// Guest memory size in bytes.
    pub mem_bytes: u64,
    /// The guest's privilege level.
    pub privilege: Privilege,
    /// Every vCPU's state, in vCPU order.
    pub vcpus: Vec<VcpuState>,
    /// The VM's kvmclock.
    pub clock: kvm_clock_data,
    /// The in-kernel PICs, IOAPIC and PIT (with an irqchip).
    pub kernel_devices: Option<KernelDevices>,
    /// The VMM's devices.
    pub devices: DeviceState,
}

/// What a restore could not carry over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// MSRs KVM refused to set (each skipped; the rest were set), on any vCPU.
    pub skipped_msrs: Vec<u32>,
}

/// Reads the MSRs in `indices`; an index KVM cannot read is removed from `indices`
/// for good, and the rest are read.
pub fn read_msrs(vcpu: &VcpuFd, indices: &mut Vec<u32>) -> Result<Vec<kvm_msr_entry>, KvmError> {
    loop {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| KvmError::Config(format!("{} MSRs: {e:?}", entries.len())))?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(|e| KvmError::ioctl("KVM_GET_MSRS", e))?;
        if read >= entries.len() {
            return Ok(msrs.as_slice().to_vec());
        }
        indices.remove(read);
    }
}

/// The machine's identity: what a restoring VM must match.
#[derive(Clone, Copy, Debug)]
pub struct Machine {
    /// Guest memory size in bytes.
    pub mem_bytes: u64,
    /// The guest's privilege level.
    pub privilege: Privilege,
    /// Whether the VM has an in-kernel irqchip (and PIT).
    pub irqchip: bool,
}

/// Captures one stopped vCPU's state. `msrs` is the list of readable MSRs (pruned as
/// [`read_msrs`] does).
fn capture_vcpu(vcpu: &VcpuFd, msrs: &mut Vec<u32>, irqchip: bool) -> Result<VcpuState, KvmError> {
    let e = KvmError::ioctl;
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(|x| e("KVM_GET_REGS", x))?,
        sregs: vcpu.get_sregs().map_err(|x| e("KVM_GET_SREGS", x))?,
        xsave: vcpu.get_xsave().map_err(|x| e("KVM_GET_XSAVE", x))?,
        xcrs: vcpu.get_xcrs().map_err(|x| e("KVM_GET_XCRS", x))?,
        msrs: read_msrs(vcpu, msrs)?,
        events: vcpu
            .get_vcpu_events()
            .map_err(|x| e("KVM_GET_VCPU_EVENTS", x))?,
        mp_state: vcpu.get_mp_state().map_err(|x| e("KVM_GET_MP_STATE", x))?,
        debugregs: vcpu
            .get_debug_regs()
            .map_err(|x| e("KVM_GET_DEBUGREGS", x))?,
        lapic: match irqchip {
            true => Some(vcpu.get_lapic().map_err(|x| e("KVM_GET_LAPIC", x))?),
            false => None,
        },
    })
}

/// Captures the state of every vCPU (all stopped, in vCPU order) and of the VM.
pub fn capture<V: Deref<Target = VcpuFd>>(
    vcpus: &[V],
    vm: &VmFd,
    msrs: &mut Vec<u32>,
    machine: Machine,
    devices: DeviceState,
) -> Result<MachineState, KvmError> {
    let vcpus = vcpus
        .iter()
        .map(|vcpu| capture_vcpu(vcpu, msrs, machine.irqchip))
        .collect::<Result<_, _>>()?;
    Ok(MachineState {
        mem_bytes: machine.mem_bytes,
        privilege: machine.privilege,
        vcpus,
        clock: vm
            .get_clock()
            .map_err(|x| KvmError::ioctl("KVM_GET_CLOCK", x))?,
        kernel_devices: match machine.irqchip {
            true => Some(KernelDevices::capture(vm)?),
            false => None,
        },
        devices,
    })
}

/// Loads one vCPU's state, in the order that works on KVM: SREGS, REGS, XSAVE,
/// XCRS, MSRS, VCPU_EVENTS, MP_STATE, DEBUGREGS (the LAPIC comes after the clock).
fn restore_vcpu(
    vcpu: &VcpuFd,
    state: &VcpuState,
    xsave_size: usize,
    report: &mut RestoreReport,
) -> Result<(), KvmError> {
    let e = KvmError::ioctl;
    vcpu.set_sregs(&state.sregs)
        .map_err(|x| e("KVM_SET_SREGS", x))?;
    vcpu.set_regs(&state.regs)
        .map_err(|x| e("KVM_SET_REGS", x))?;
    sys::set_xsave(vcpu, &state.xsave, xsave_size)
        .ok_or(KvmError::Unsupported("an XSAVE area of at most 4096 bytes"))?
        .map_err(|x| e("KVM_SET_XSAVE", x))?;
    vcpu.set_xcrs(&state.xcrs)
        .map_err(|x| e("KVM_SET_XCRS", x))?;
    let mut rest = state.msrs.as_slice();
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest)
            .map_err(|x| KvmError::Config(format!("{} MSRs: {x:?}", rest.len())))?;
        let set = vcpu.set_msrs(&msrs).map_err(|x| e("KVM_SET_MSRS", x))?;
        if set >= rest.len() {
            break;
        }
        if !report.skipped_msrs.contains(&rest[set].index) {
            report.skipped_msrs.push(rest[set].index);
        }
        rest = &rest[set + 1..];
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(|x| e("KVM_SET_VCPU_EVENTS", x))?;
    vcpu.set_mp_state(state.mp_state)
        .map_err(|x| e("KVM_SET_MP_STATE", x))?;
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(|x| e("KVM_SET_DEBUGREGS", x))?;
    Ok(())
}

/// Loads `state` into fresh vCPUs (as many as it has, in order) and a fresh VM: each
/// vCPU's registers, then CLOCK, then each LAPIC, then the PICs, the IOAPIC and the
/// PIT.
pub fn restore(
    vcpus: &[VcpuFd],
    vm: &VmFd,
    state: &MachineState,
    xsave_size: usize,
) -> Result<RestoreReport, KvmError> {
    if vcpus.len() != state.vcpus.len() {
        return Err(KvmError::Config(format!(
            "the checkpoint has {} vCPUs, the VM {}: use the checkpoint's vCPU count",
            state.vcpus.len(),
            vcpus.len()
        )));
    }
    let mut report = RestoreReport::default();
    for (vcpu, saved) in vcpus.iter().zip(&state.vcpus) {
        restore_vcpu(vcpu, saved, xsave_size, &mut report)?;
    }
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(|x| KvmError::ioctl("KVM_SET_CLOCK", x))?;
    for (vcpu, saved) in vcpus.iter().zip(&state.vcpus) {
        if let Some(lapic) = &saved.lapic {
            vcpu.set_lapic(lapic)
                .map_err(|x| KvmError::ioctl("KVM_SET_LAPIC", x))?;
        }
    }
    if let Some(devices) = &state.kernel_devices {
        devices.restore(vm)?;
    }
    Ok(report)
}

impl MachineState {
    /// Whether the machine had an in-kernel irqchip (its vCPUs carry LAPIC state).
    pub fn irqchip(&self) -> bool {
        self.vcpus.first().is_some_and(|v| v.lapic.is_some())
    }

    /// Appends the encoded state to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        let privilege: u32 = match self.privilege {
            Privilege::User => 3,
            Privilege::Kernel => 0,
        };
        let vcpus = self.vcpus.len() as u32;
        let mut machine = self.mem_bytes.to_le_bytes().to_vec();
        machine.extend_from_slice(&privilege.to_le_bytes());
        machine.extend_from_slice(&vcpus.to_le_bytes());
        section(out, tag::MACHINE, &machine);
        for (i, vcpu) in self.vcpus.iter().enumerate() {
            section(out, tag::of(tag::REGS, i), vcpu.regs.as_bytes());
            section(out, tag::of(tag::SREGS, i), vcpu.sregs.as_bytes());
            section(out, tag::of(tag::XSAVE, i), vcpu.xsave.as_bytes());
            section(out, tag::of(tag::XCRS, i), vcpu.xcrs.as_bytes());
            section(out, tag::of(tag::MSRS, i), vcpu.msrs.as_bytes());
            section(out, tag::of(tag::EVENTS, i), vcpu.events.as_bytes());
            section(out, tag::of(tag::MP_STATE, i), vcpu.mp_state.as_bytes());
            section(out, tag::of(tag::DEBUGREGS, i), vcpu.debugregs.as_bytes());
            if let Some(lapic) = &vcpu.lapic {
                section(out, tag::of(tag::LAPIC, i), lapic.as_bytes());
            }
        }
        section(out, tag::CLOCK, self.clock.as_bytes());
        if let Some(kernel) = &self.kernel_devices {
            for (tag, _, _, chip) in kernel.chips() {
                section(out, tag, chip.as_bytes());
            }
            section(out, tag::PIT, kernel.pit.as_bytes());
        }
        let mut devices = (self.devices.progress.len() as u32).to_le_bytes().to_vec();
        for progress in &self.devices.progress {
            devices.extend_from_slice(&progress.to_le_bytes());
        }
        devices.extend_from_slice(&self.devices.fault.to_le_bytes());
        devices.extend_from_slice(&self.devices.console);
        section(out, tag::DEVICES, &devices);
        let checksum = xxh3_64(&out[start..]);
        out.extend_from_slice(&checksum.to_le_bytes());
    }

    /// Decodes a blob [`MachineState::encode`] wrote.
    pub fn decode(blob: &[u8]) -> Result<Self, StateError> {
        let header = MAGIC.len() + 8;
        if blob.len() < header + 8 {
            return Err(StateError::Truncated(blob.len()));
        }
        if &blob[..MAGIC.len()] != MAGIC {
            return Err(StateError::Magic);
        }
        let version = u32_at(blob, 8);
        if version != VERSION {
            return Err(StateError::Version(version));
        }
        let (body, stored) = blob.split_at(blob.len() - 8);
        let stored = u64::from_le_bytes(stored.try_into().unwrap_or_default());
        let computed = xxh3_64(body);
        if stored != computed {
            return Err(StateError::Checksum { stored, computed });
        }
        let mut sections = Sections::default();
        let mut at = header;
        while at < body.len() {
            let head = body.get(at..at + 8).ok_or(StateError::Truncated(at))?;
            let tag = u32_at(head, 0);
            let len = u32_at(head, 4) as usize;
            let payload = body
                .get(at + 8..at + 8 + len)
                .ok_or(StateError::Truncated(at))?;
            if sections.0.insert(tag, payload).is_some() {
                return Err(StateError::Section(tag));
            }
            at += 8 + len;
        }

        let machine = sections.take(tag::MACHINE, "machine", None)?;
        sized(machine, tag::MACHINE, 16)?;
        let privilege = match u32_at(machine, 8) {
            0 => Privilege::Kernel,
            3 => Privilege::User,
            other => return Err(StateError::Inconsistent(format!("privilege level {other}"))),
        };
        let count = u32_at(machine, 12) as usize;
        if !(1..=MAX_VCPUS).contains(&count) {
            return Err(StateError::Inconsistent(format!(
                "{count} vCPUs (1 to {MAX_VCPUS})"
            )));
        }
        let mut vcpus = Vec::with_capacity(count);
        for i in 0..count {
            let v = Some(i);
            let msrs = sections.take(tag::of(tag::MSRS, i), "MSRS", v)?;
            let entry = size_of::<kvm_msr_entry>();
            if msrs.len() % entry != 0 {
                return Err(StateError::SectionSize {
                    tag: tag::of(tag::MSRS, i),
                    len: msrs.len(),
                    expected: msrs.len().next_multiple_of(entry),
                });
            }
            vcpus.push(VcpuState {
                regs: sections.structure(tag::of(tag::REGS, i), "REGS", v)?,
                sregs: sections.structure(tag::of(tag::SREGS, i), "SREGS", v)?,
                xsave: sections.structure(tag::of(tag::XSAVE, i), "XSAVE", v)?,
                xcrs: sections.structure(tag::of(tag::XCRS, i), "XCRS", v)?,
                msrs: msrs
                    .chunks_exact(entry)
                    .map(|bytes| structure(bytes, tag::of(tag::MSRS, i)))
                    .collect::<Result<_, _>>()?,
                events: sections.structure(tag::of(tag::EVENTS, i), "VCPU_EVENTS", v)?,
                mp_state: sections.structure(tag::of(tag::MP_STATE, i), "MP_STATE", v)?,
                debugregs: sections.structure(tag::of(tag::DEBUGREGS, i), "DEBUGREGS", v)?,
                lapic: match sections.0.remove(&tag::of(tag::LAPIC, i)) {
                    Some(bytes) => Some(structure(bytes, tag::of(tag::LAPIC, i))?),
                    None => None,
                },
            });
        }
        if let Some(i) = vcpus
            .iter()
            .position(|v| v.lapic.is_some() != vcpus[0].lapic.is_some())
        {
            let i = if vcpus[0].lapic.is_some() { i } else { 0 };
            return Err(StateError::Missing {
                section: "LAPIC",
                owner: format!("vCPU {i}"),
            });
        }
        let clock = sections.structure(tag::CLOCK, "CLOCK", None)?;
        // With LAPICs (an irqchip) the PICs, IOAPIC and PIT are required; without,
        // any of their sections is left over and refused below.
        let kernel_devices = match vcpus[0].lapic.is_some() {
            true => {
                let mut chip = |tag: u32, name: &'static str, id: u32| {
                    let chip: kvm_irqchip = sections.structure(tag, name, None)?;
                    match chip.chip_id == id {
                        true => Ok(chip),
                        false => Err(StateError::Inconsistent(format!(
                            "the {name} section holds irqchip {}",
                            chip.chip_id
                        ))),
                    }
                };
                Some(KernelDevices {
                    pic_master: chip(tag::PIC_MASTER, "PIC_MASTER", KVM_IRQCHIP_PIC_MASTER)?,
                    pic_slave: chip(tag::PIC_SLAVE, "PIC_SLAVE", KVM_IRQCHIP_PIC_SLAVE)?,
                    ioapic: chip(tag::IOAPIC, "IOAPIC", KVM_IRQCHIP_IOAPIC)?,
                    pit: sections.structure(tag::PIT, "PIT", None)?,
                })
            }
            false => None,
        };
        let devices = sections.take(tag::DEVICES, "devices", None)?;
        let fixed = 4 + 8 * count + 4;
        if devices.len() < fixed {
            return Err(StateError::SectionSize {
                tag: tag::DEVICES,
                len: devices.len(),
                expected: fixed,
            });
        }
        if u32_at(devices, 0) as usize != count {
            return Err(StateError::Inconsistent(format!(
                "the devices hold {} vCPUs' progress, the machine has {count} vCPUs",
                u32_at(devices, 0)
            )));
        }
        let devices = DeviceState {
            progress: devices[4..4 + 8 * count]
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
                .collect(),
            fault: u32_at(devices, fixed - 4),
            console: devices[fixed..].to_vec(),
        };
        sections.finish()?;
        Ok(Self {
            mem_bytes: u64::from_le_bytes(machine[..8].try_into().unwrap_or_default()),
            privilege,
            vcpus,
            clock,
            kernel_devices,
            devices,
        })
    }
}

/// The sections of a blob being decoded, by tag; decoding takes each one it expects.
#[derive(Default)]
struct Sections<'a>(BTreeMap<u32, &'a [u8]>);

impl<'a> Sections<'a> {
    /// Takes the section `tag`, named `name`, of the VM or of vCPU `vcpu`.
    fn take(
        &mut self,
        tag: u32,
        name: &'static str,
        vcpu: Option<usize>,
    ) -> Result<&'a [u8], StateError> {
        self.0.remove(&tag).ok_or_else(|| StateError::Missing {
            section: name,
            owner: match vcpu {
                Some(i) => format!("vCPU {i}"),
                None => "the VM".into(),
            },
        })
    }

    /// Takes a section holding one KVM structure.
    fn structure<T: FromBytes + IntoBytes + Immutable>(
        &mut self,
        tag: u32,
        name: &'static str,
        vcpu: Option<usize>,
    ) -> Result<T, StateError> {
        structure(self.take(tag, name, vcpu)?, tag)
    }

    /// Fails on any section decoding did not take: unknown, or of a vCPU the machine
    /// does not have.
    fn finish(self) -> Result<(), StateError> {
        match self.0.keys().next() {
            Some(&tag) => Err(StateError::Section(tag)),
            None => Ok(()),
        }
    }
}

/// The little-endian u32 at byte `at` of `bytes` (which holds it).
fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default())
}

/// Checks that a section has `expected` bytes.
fn sized(bytes: &[u8], tag: u32, expected: usize) -> Result<(), StateError> {
    match bytes.len() == expected {
        true => Ok(()),
        false => Err(StateError::SectionSize {
            tag,
            len: bytes.len(),
            expected,
        }),
    }
}

/// Appends one section.
fn section(out: &mut Vec<u8>, tag: u32, payload: &[u8]) {
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

/// A KVM structure from its section's bytes.
fn structure<T: FromBytes + IntoBytes + Immutable>(
    bytes: &[u8],
    tag: u32,
) -> Result<T, StateError> {
    T::read_from_bytes(bytes).map_err(|_| StateError::SectionSize {
        tag,
        len: bytes.len(),
        expected: size_of::<T>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vcpu(rax: u64) -> VcpuState {
        let mut state = VcpuState {
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                reserved: 0,
                data: 12345 + rax,
            }],
            events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state { mp_state: 0 },
            debugregs: kvm_debugregs::default(),
            lapic: Some(kvm_lapic_state::default()),
        };
        state.regs.rip = 0x10000;
        state.regs.rax = rax;
        state.sregs.cr3 = 0x2000;
        state.xsave.region[40] = rax as u32;
        state
    }

    fn sample(vcpus: usize) -> MachineState {
        MachineState {
            mem_bytes: 64 << 20,
            privilege: Privilege::User,
            vcpus: (0..vcpus as u64).map(|i| vcpu(42 + i)).collect(),
            clock: kvm_clock_data {
                clock: 123_456_789,
                ..Default::default()
            },
            kernel_devices: Some(KernelDevices {
                pic_master: patterned_chip(KVM_IRQCHIP_PIC_MASTER),
                pic_slave: patterned_chip(KVM_IRQCHIP_PIC_SLAVE),
                ioapic: patterned_chip(KVM_IRQCHIP_IOAPIC),
                pit: kvm_pit_state2::read_from_bytes(&patterned(size_of::<kvm_pit_state2>(), 7))
                    .unwrap(),
            }),
            devices: DeviceState {
                progress: (0..vcpus as u64).map(|i| 99 + i).collect(),
                fault: 0,
                console: b"hello\n".to_vec(),
            },
        }
    }

    /// `len` bytes, none zero, different for each `seed`.
    fn patterned(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed | 1)
            .collect()
    }

    /// An irqchip state of chip `id` with every other byte set.
    fn patterned_chip(id: u32) -> kvm_irqchip {
        let mut bytes = patterned(size_of::<kvm_irqchip>(), id as u8);
        bytes[..4].copy_from_slice(&id.to_le_bytes());
        kvm_irqchip::read_from_bytes(&bytes).unwrap()
    }

    /// A blob's sections: (tag, payload).
    type Raw = Vec<(u32, Vec<u8>)>;

    /// A blob of `sections` with a valid header and checksum.
    fn blob_of(sections: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut blob = Vec::new();
        blob.extend_from_slice(MAGIC);
        blob.extend_from_slice(&VERSION.to_le_bytes());
        blob.extend_from_slice(&0u32.to_le_bytes());
        for (tag, payload) in sections {
            section(&mut blob, *tag, payload);
        }
        let checksum = xxh3_64(&blob);
        blob.extend_from_slice(&checksum.to_le_bytes());
        blob
    }

    /// The sections of an encoded blob.
    fn sections_of(blob: &[u8]) -> Raw {
        let body = &blob[16..blob.len() - 8];
        let mut out = Vec::new();
        let mut at = 0;
        while at < body.len() {
            let len = u32_at(body, at + 4) as usize;
            out.push((u32_at(body, at), body[at + 8..at + 8 + len].to_vec()));
            at += 8 + len;
        }
        out
    }

    #[test]
    fn encode_decode_round_trips_every_field_of_every_vcpu() {
        for count in [1, 3] {
            let state = sample(count);
            let mut blob = Vec::new();
            state.encode(&mut blob);
            let back = MachineState::decode(&blob).unwrap();
            assert_eq!(back.mem_bytes, state.mem_bytes);
            assert_eq!(back.privilege, state.privilege);
            assert_eq!(back.vcpus.len(), count);
            for (b, s) in back.vcpus.iter().zip(&state.vcpus) {
                assert_eq!(b.regs, s.regs);
                assert_eq!(b.sregs, s.sregs);
                assert_eq!(b.xsave.region, s.xsave.region);
                assert_eq!(b.msrs.as_bytes(), s.msrs.as_bytes());
                assert_eq!(b.lapic.map(|l| l.regs), s.lapic.map(|l| l.regs));
            }
            assert_eq!(back.clock.as_bytes(), state.clock.as_bytes());
            let (b, s) = (
                back.kernel_devices.as_ref().unwrap(),
                state.kernel_devices.as_ref().unwrap(),
            );
            for ((_, _, _, b), (_, _, _, s)) in b.chips().into_iter().zip(s.chips()) {
                assert_eq!(b.as_bytes(), s.as_bytes());
            }
            assert_eq!(b.pit.as_bytes(), s.pit.as_bytes());
            assert_eq!(back.devices, state.devices);
            let mut again = Vec::new();
            back.encode(&mut again);
            assert_eq!(again, blob);
        }
    }

    #[test]
    fn damaged_or_foreign_blobs_are_refused() {
        let mut blob = Vec::new();
        sample(1).encode(&mut blob);
        let mut flipped = blob.clone();
        flipped[100] ^= 1;
        assert!(matches!(
            MachineState::decode(&flipped),
            Err(StateError::Checksum { .. })
        ));
        let mut magic = blob.clone();
        magic[0] = b'X';
        assert_eq!(MachineState::decode(&magic).err(), Some(StateError::Magic));
        let mut version = blob.clone();
        version[8] = 1;
        assert_eq!(
            MachineState::decode(&version).err(),
            Some(StateError::Version(1))
        );
        assert_eq!(
            MachineState::decode(&blob[..10]).err(),
            Some(StateError::Truncated(10))
        );
    }

    #[test]
    fn well_formed_blobs_with_wrong_sections_are_refused() {
        let mut blob = Vec::new();
        sample(2).encode(&mut blob);
        let good = sections_of(&blob);
        let edited = |edit: &dyn Fn(&mut Raw)| {
            let mut sections = good.clone();
            edit(&mut sections);
            MachineState::decode(&blob_of(&sections)).err()
        };
        assert_eq!(edited(&|_| {}), None);
        // vCPU 1's REGS one byte short.
        let regs1 = tag::of(tag::REGS, 1);
        assert!(matches!(
            edited(&|s| s.iter_mut().find(|x| x.0 == regs1).unwrap().1.pop().map(drop).unwrap()),
            Some(StateError::SectionSize { tag, .. }) if tag == regs1
        ));
        // vCPU 1's SREGS missing.
        let sregs1 = tag::of(tag::SREGS, 1);
        assert_eq!(
            edited(&|s| s.retain(|x| x.0 != sregs1)),
            Some(StateError::Missing {
                section: "SREGS",
                owner: "vCPU 1".into()
            })
        );
        // Only vCPU 0 has a LAPIC.
        let lapic1 = tag::of(tag::LAPIC, 1);
        assert!(matches!(
            edited(&|s| s.retain(|x| x.0 != lapic1)),
            Some(StateError::Missing {
                section: "LAPIC",
                ..
            })
        ));
        // A section of a third vCPU, an unknown kind, a repeated section.
        let regs2 = tag::of(tag::REGS, 2);
        assert_eq!(
            edited(&|s| s.push((regs2, s[1].1.clone()))),
            Some(StateError::Section(regs2))
        );
        assert_eq!(
            edited(&|s| s.push((99, Vec::new()))),
            Some(StateError::Section(99))
        );
        assert_eq!(
            edited(&|s| s.push(s[1].clone())),
            Some(StateError::Section(good[1].0))
        );
        // No VM clock.
        assert!(matches!(
            edited(&|s| s.retain(|x| x.0 != tag::CLOCK)),
            Some(StateError::Missing {
                section: "CLOCK",
                ..
            })
        ));
        // With LAPICs, no PIT; a PIT one byte short; the slave PIC's section holding
        // the master's state.
        assert_eq!(
            edited(&|s| s.retain(|x| x.0 != tag::PIT)),
            Some(StateError::Missing {
                section: "PIT",
                owner: "the VM".into()
            })
        );
        assert!(matches!(
            edited(&|s| s
                .iter_mut()
                .find(|x| x.0 == tag::PIT)
                .unwrap()
                .1
                .pop()
                .map(drop)
                .unwrap()),
            Some(StateError::SectionSize { tag: tag::PIT, .. })
        ));
        let master = good
            .iter()
            .find(|x| x.0 == tag::PIC_MASTER)
            .unwrap()
            .1
            .clone();
        assert!(matches!(
            edited(&|s| s.iter_mut().find(|x| x.0 == tag::PIC_SLAVE).unwrap().1 = master.clone()),
            Some(StateError::Inconsistent(_))
        ));
        // Without LAPICs (no irqchip) the irqchip and PIT sections are refused.
        let lapics = [tag::of(tag::LAPIC, 0), tag::of(tag::LAPIC, 1)];
        assert_eq!(
            edited(&|s| s.retain(|x| !lapics.contains(&x.0))),
            Some(StateError::Section(tag::PIC_MASTER))
        );
        let kernel = [tag::PIC_MASTER, tag::PIC_SLAVE, tag::IOAPIC, tag::PIT];
        assert_eq!(
            edited(&|s| s.retain(|x| !lapics.contains(&x.0) && !kernel.contains(&x.0))),
            None
        );
        // A vCPU count out of range, and devices for another count.
        let machine = |vcpus: u32| {
            let mut m = (64u64 << 20).to_le_bytes().to_vec();
            m.extend_from_slice(&3u32.to_le_bytes());
            m.extend_from_slice(&vcpus.to_le_bytes());
            m
        };
        assert!(matches!(
            edited(&|s| s[0].1 = machine(0)),
            Some(StateError::Inconsistent(_))
        ));
        assert!(matches!(
            edited(&|s| s[0].1 = machine(MAX_VCPUS as u32 + 1)),
            Some(StateError::Inconsistent(_))
        ));
        assert!(matches!(
            edited(&|s| {
                let devices = s.iter_mut().find(|x| x.0 == tag::DEVICES).unwrap();
                devices.1[0] = 1;
            }),
            Some(StateError::Inconsistent(_))
        ));
    }
}
