//! Machine state for the checkpoint's state blob: everything of the vCPU and the VM
//! that is not guest memory, captured while the vCPU is stopped, and a versioned,
//! checksummed encoding of it.
//!
//! # Format (version 1)
//!
//! ```text
//! magic "FGBIKVM\0" | version u32 | flags u32 (0)
//! section*          : tag u32 | len u32 | payload (len bytes)
//! checksum u64      : xxh3-64 of every byte before it
//! ```
//!
//! All integers are little-endian; KVM structures are stored as their x86-64 C
//! layout. Sections, each once, in this order: machine (memory size, privilege),
//! REGS, SREGS, XSAVE (x87, SSE and AVX state: it supersedes KVM_GET_FPU), XCRS, MSRS
//! (an array of `kvm_msr_entry`), VCPU_EVENTS, MP_STATE, DEBUGREGS, LAPIC (only with
//! an in-kernel irqchip), CLOCK (`kvm_clock_data`), devices (doorbell progress u64,
//! fault code u32, then the console bytes). A decoder refuses a bad magic, another
//! version, a bad checksum, an unknown or repeated tag, a wrong section size, or a
//! missing section.

use kvm_bindings::{
    Msrs, kvm_clock_data, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::KvmError;
use super::guest::Privilege;
use super::sys;

/// The blob's first bytes.
const MAGIC: &[u8; 8] = b"FGBIKVM\0";
/// The format version this module writes and reads.
pub const VERSION: u32 = 1;

/// Section tags, in the order they are written.
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
        "state blob section {tag} is {len} bytes, expected {expected}: the blob is damaged or from another build"
    )]
    SectionSize {
        /// Section tag.
        tag: u32,
        /// Its size.
        len: usize,
        /// The size its structure has.
        expected: usize,
    },
    /// An unknown or repeated section.
    #[error(
        "state blob has an unexpected section {0} (unknown or repeated): the blob is from another build"
    )]
    Section(u32),
    /// A required section is missing.
    #[error("state blob lacks its {0} section: the blob is incomplete")]
    Missing(&'static str),
}

/// The VMM's devices: the doorbell and console ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// The guest's iteration count as last reported on the doorbell.
    pub progress: u64,
    /// The fault code the guest reported (0: none).
    pub fault: u32,
    /// Console output so far.
    pub console: Vec<u8>,
}

/// Everything of a stopped machine that is not guest memory.
pub struct MachineState {
    /// Guest memory size in bytes.
    pub mem_bytes: u64,
    /// The guest's privilege level.
    pub privilege: Privilege,
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
    /// The VM's kvmclock.
    pub clock: kvm_clock_data,
    /// The VMM's devices.
    pub devices: DeviceState,
}

/// What a restore could not carry over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// MSRs KVM refused to set (each skipped; the rest were set).
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

/// Captures the vCPU's and the VM's state. `msrs` is the list of readable MSRs
/// (pruned as [`read_msrs`] does).
pub fn capture(
    vcpu: &VcpuFd,
    vm: &VmFd,
    msrs: &mut Vec<u32>,
    irqchip: bool,
    mem_bytes: u64,
    privilege: Privilege,
    devices: DeviceState,
) -> Result<MachineState, KvmError> {
    let e = KvmError::ioctl;
    Ok(MachineState {
        mem_bytes,
        privilege,
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
        clock: vm.get_clock().map_err(|x| e("KVM_GET_CLOCK", x))?,
        devices,
    })
}

/// Loads `state` into a fresh vCPU and VM, in the order that works on KVM: SREGS,
/// REGS, XSAVE, XCRS, MSRS, VCPU_EVENTS, MP_STATE, DEBUGREGS, CLOCK, LAPIC.
pub fn restore(
    vcpu: &VcpuFd,
    vm: &VmFd,
    state: &MachineState,
    xsave_size: usize,
) -> Result<RestoreReport, KvmError> {
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
    let mut report = RestoreReport::default();
    let mut rest = state.msrs.as_slice();
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest)
            .map_err(|x| KvmError::Config(format!("{} MSRs: {x:?}", rest.len())))?;
        let set = vcpu.set_msrs(&msrs).map_err(|x| e("KVM_SET_MSRS", x))?;
        if set >= rest.len() {
            break;
        }
        report.skipped_msrs.push(rest[set].index);
        rest = &rest[set + 1..];
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(|x| e("KVM_SET_VCPU_EVENTS", x))?;
    vcpu.set_mp_state(state.mp_state)
        .map_err(|x| e("KVM_SET_MP_STATE", x))?;
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(|x| e("KVM_SET_DEBUGREGS", x))?;
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(|x| e("KVM_SET_CLOCK", x))?;
    if let Some(lapic) = &state.lapic {
        vcpu.set_lapic(lapic).map_err(|x| e("KVM_SET_LAPIC", x))?;
    }
    Ok(report)
}

impl MachineState {
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
        let mut machine = self.mem_bytes.to_le_bytes().to_vec();
        machine.extend_from_slice(&privilege.to_le_bytes());
        section(out, tag::MACHINE, &machine);
        section(out, tag::REGS, self.regs.as_bytes());
        section(out, tag::SREGS, self.sregs.as_bytes());
        section(out, tag::XSAVE, self.xsave.as_bytes());
        section(out, tag::XCRS, self.xcrs.as_bytes());
        section(out, tag::MSRS, self.msrs.as_bytes());
        section(out, tag::EVENTS, self.events.as_bytes());
        section(out, tag::MP_STATE, self.mp_state.as_bytes());
        section(out, tag::DEBUGREGS, self.debugregs.as_bytes());
        if let Some(lapic) = &self.lapic {
            section(out, tag::LAPIC, lapic.as_bytes());
        }
        section(out, tag::CLOCK, self.clock.as_bytes());
        let mut devices = self.devices.progress.to_le_bytes().to_vec();
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
        let version = u32::from_le_bytes(blob[8..12].try_into().unwrap_or_default());
        if version != VERSION {
            return Err(StateError::Version(version));
        }
        let (body, stored) = blob.split_at(blob.len() - 8);
        let stored = u64::from_le_bytes(stored.try_into().unwrap_or_default());
        let computed = xxh3_64(body);
        if stored != computed {
            return Err(StateError::Checksum { stored, computed });
        }
        let mut sections: Vec<(u32, &[u8])> = Vec::new();
        let mut at = header;
        while at < body.len() {
            let head = body.get(at..at + 8).ok_or(StateError::Truncated(at))?;
            let tag = u32::from_le_bytes(head[..4].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(head[4..].try_into().unwrap_or_default()) as usize;
            let payload = body
                .get(at + 8..at + 8 + len)
                .ok_or(StateError::Truncated(at))?;
            if !(tag::MACHINE..=tag::DEVICES).contains(&tag) || sections.iter().any(|s| s.0 == tag)
            {
                return Err(StateError::Section(tag));
            }
            sections.push((tag, payload));
            at += 8 + len;
        }
        let find = |tag: u32, name: &'static str| {
            sections
                .iter()
                .find(|s| s.0 == tag)
                .map(|s| s.1)
                .ok_or(StateError::Missing(name))
        };
        let machine = find(tag::MACHINE, "machine")?;
        if machine.len() != 12 {
            return Err(StateError::SectionSize {
                tag: tag::MACHINE,
                len: machine.len(),
                expected: 12,
            });
        }
        let privilege = match machine[8] {
            0 => Privilege::Kernel,
            _ => Privilege::User,
        };
        let devices = find(tag::DEVICES, "devices")?;
        if devices.len() < 12 {
            return Err(StateError::SectionSize {
                tag: tag::DEVICES,
                len: devices.len(),
                expected: 12,
            });
        }
        let msrs = find(tag::MSRS, "MSRS")?;
        let entry = size_of::<kvm_msr_entry>();
        if msrs.len() % entry != 0 {
            return Err(StateError::SectionSize {
                tag: tag::MSRS,
                len: msrs.len(),
                expected: msrs.len().next_multiple_of(entry),
            });
        }
        let msrs = msrs
            .chunks_exact(entry)
            .map(|bytes| structure(bytes, tag::MSRS))
            .collect::<Result<Vec<kvm_msr_entry>, _>>()?;
        Ok(Self {
            mem_bytes: u64::from_le_bytes(machine[..8].try_into().unwrap_or_default()),
            privilege,
            regs: structure(find(tag::REGS, "REGS")?, tag::REGS)?,
            sregs: structure(find(tag::SREGS, "SREGS")?, tag::SREGS)?,
            xsave: structure(find(tag::XSAVE, "XSAVE")?, tag::XSAVE)?,
            xcrs: structure(find(tag::XCRS, "XCRS")?, tag::XCRS)?,
            msrs,
            events: structure(find(tag::EVENTS, "VCPU_EVENTS")?, tag::EVENTS)?,
            mp_state: structure(find(tag::MP_STATE, "MP_STATE")?, tag::MP_STATE)?,
            debugregs: structure(find(tag::DEBUGREGS, "DEBUGREGS")?, tag::DEBUGREGS)?,
            lapic: match find(tag::LAPIC, "LAPIC") {
                Ok(bytes) => Some(structure(bytes, tag::LAPIC)?),
                Err(_) => None,
            },
            clock: structure(find(tag::CLOCK, "CLOCK")?, tag::CLOCK)?,
            devices: DeviceState {
                progress: u64::from_le_bytes(devices[..8].try_into().unwrap_or_default()),
                fault: u32::from_le_bytes(devices[8..12].try_into().unwrap_or_default()),
                console: devices[12..].to_vec(),
            },
        })
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

    fn sample() -> MachineState {
        let mut state = MachineState {
            mem_bytes: 64 << 20,
            privilege: Privilege::User,
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                reserved: 0,
                data: 12345,
            }],
            events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state { mp_state: 0 },
            debugregs: kvm_debugregs::default(),
            lapic: Some(kvm_lapic_state::default()),
            clock: kvm_clock_data::default(),
            devices: DeviceState {
                progress: 99,
                fault: 0,
                console: b"hello\n".to_vec(),
            },
        };
        state.regs.rip = 0x10000;
        state.regs.rax = 42;
        state.sregs.cr3 = 0x2000;
        state.xsave.region[40] = 7;
        state
    }

    #[test]
    fn encode_decode_round_trips_every_field() {
        let state = sample();
        let mut blob = Vec::new();
        state.encode(&mut blob);
        let back = MachineState::decode(&blob).unwrap();
        assert_eq!(back.mem_bytes, state.mem_bytes);
        assert_eq!(back.privilege, state.privilege);
        assert_eq!(back.regs, state.regs);
        assert_eq!(back.sregs, state.sregs);
        assert_eq!(back.xsave.region, state.xsave.region);
        assert_eq!(back.msrs.as_bytes(), state.msrs.as_bytes());
        assert_eq!(back.lapic.map(|l| l.regs), state.lapic.map(|l| l.regs));
        assert_eq!(back.devices, state.devices);
        let mut again = Vec::new();
        back.encode(&mut again);
        assert_eq!(again, blob);
    }

    #[test]
    fn damaged_or_foreign_blobs_are_refused() {
        let mut blob = Vec::new();
        sample().encode(&mut blob);
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
        version[8] = 2;
        assert_eq!(
            MachineState::decode(&version).err(),
            Some(StateError::Version(2))
        );
        assert_eq!(
            MachineState::decode(&blob[..10]).err(),
            Some(StateError::Truncated(10))
        );
        // A well-formed blob whose REGS section is one byte short.
        let mut short = Vec::new();
        short.extend_from_slice(MAGIC);
        short.extend_from_slice(&VERSION.to_le_bytes());
        short.extend_from_slice(&0u32.to_le_bytes());
        section(&mut short, tag::MACHINE, &[0; 12]);
        section(&mut short, tag::DEVICES, &[0; 12]);
        section(&mut short, tag::MSRS, &[]);
        section(&mut short, tag::REGS, &[0; size_of::<kvm_regs>() - 1]);
        let checksum = xxh3_64(&short);
        short.extend_from_slice(&checksum.to_le_bytes());
        assert!(matches!(
            MachineState::decode(&short),
            Err(StateError::SectionSize { tag: tag::REGS, .. })
        ));
    }
}
