//! The three ways KVM reports the guest pages written since the last look, behind
//! one [`DirtyLog`]:
//!
//! - [`DirtyTracking::Classic`]: `KVM_GET_DIRTY_LOG` returns the slot's bitmap and,
//!   in the same call, clears it and write-protects the pages again.
//! - [`DirtyTracking::ManualProtect`]: with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`
//!   enabled, `KVM_GET_DIRTY_LOG` only reads the bitmap; `KVM_CLEAR_DIRTY_LOG`
//!   re-protects the pages it names.
//! - [`DirtyTracking::Ring`]: with `KVM_CAP_DIRTY_LOG_RING(_ACQ_REL)` enabled before
//!   the vCPUs exist, KVM pushes each newly dirtied page into the ring of the vCPU
//!   that wrote it (one ring per vCPU); the VMM collects every ring's entries, marks
//!   them reset, and `KVM_RESET_DIRTY_RINGS` re-protects them.
//!   When a ring fills, the vCPU exits (`KVM_EXIT_DIRTY_RING_FULL`) and its thread
//!   collects into [`RingLog::pending`] before running on.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, kvm_enable_cap,
};
use kvm_ioctls::{VcpuFd, VmFd};

use super::KvmError;
use super::sys::{self, DirtyRing};

/// The memory slot of guest memory (the only one).
pub const SLOT: u32 = 0;
/// The largest dirty ring asked for: 64 Ki entries.
const RING_BYTES_MAX: u32 = 1 << 20;

/// How dirty guest pages are found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyTracking {
    /// `KVM_GET_DIRTY_LOG`: get, clear and re-protect in one call.
    Classic,
    /// `KVM_GET_DIRTY_LOG` then `KVM_CLEAR_DIRTY_LOG` (manual protect).
    ManualProtect,
    /// The per-vCPU dirty ring and `KVM_RESET_DIRTY_RINGS`.
    Ring,
}

impl DirtyTracking {
    /// Every method.
    pub const ALL: [DirtyTracking; 3] = [
        DirtyTracking::Classic,
        DirtyTracking::ManualProtect,
        DirtyTracking::Ring,
    ];

    /// The method's name, as [`FromStr`] accepts it.
    pub fn name(self) -> &'static str {
        match self {
            DirtyTracking::Classic => "classic",
            DirtyTracking::ManualProtect => "manual",
            DirtyTracking::Ring => "ring",
        }
    }
}

impl fmt::Display for DirtyTracking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl FromStr for DirtyTracking {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown dirty tracking {s:?}: use classic, manual or ring"))
    }
}

/// The ring capability this VM uses, and its largest size in bytes.
fn ring_capability(vm: &VmFd) -> Option<(u32, u32)> {
    [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
        .into_iter()
        .find_map(|cap| {
            let max = vm.check_extension_raw(cap.into());
            u32::try_from(max).ok().filter(|&m| m > 0).map(|m| (cap, m))
        })
}

/// Whether `vm` supports `tracking`, and if not, what is missing.
pub fn check(vm: &VmFd, tracking: DirtyTracking) -> Result<(), KvmError> {
    let missing = match tracking {
        DirtyTracking::Classic => None,
        DirtyTracking::ManualProtect => (vm
            .check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into())
            & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as i32
            == 0)
            .then_some("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (Linux 5.8+)"),
        DirtyTracking::Ring => ring_capability(vm)
            .is_none()
            .then_some("KVM_CAP_DIRTY_LOG_RING (Linux 5.11+)"),
    };
    match missing {
        Some(cap) => Err(KvmError::Unsupported(cap)),
        None => Ok(()),
    }
}

/// A ring's state shared by the vCPU thread (ring-full exits) and the VMM (harvests).
pub struct RingLog {
    ring: DirtyRing,
    /// Pages collected on ring-full exits since the last harvest.
    pub pending: Vec<u64>,
}

impl RingLog {
    /// Collects every dirty entry into `pending` and lets KVM re-protect their pages.
    pub fn collect(&mut self, vm: &VmFd) -> Result<(), KvmError> {
        if self.ring.collect(SLOT, &mut self.pending) > 0 {
            sys::reset_dirty_rings(vm).map_err(|e| KvmError::io("KVM_RESET_DIRTY_RINGS", e))?;
        }
        Ok(())
    }
}

/// A ring log shared between the vCPU thread and the VMM.
pub type SharedRing = Arc<Mutex<RingLog>>;

/// Dirty tracking of the guest memory slot, by one method.
pub enum DirtyLog {
    /// See [`DirtyTracking::Classic`].
    Classic,
    /// See [`DirtyTracking::ManualProtect`].
    ManualProtect,
    /// See [`DirtyTracking::Ring`]: one ring per vCPU.
    Ring {
        /// Ring size in bytes (each).
        bytes: u32,
        /// Every vCPU's ring, in vCPU order.
        rings: Vec<SharedRing>,
    },
}

impl DirtyLog {
    /// Enables `tracking` on `vm`, which must have no vCPU yet. `ring_bytes` caps the
    /// ring's size (a power of two); by default the ring is as large as KVM allows,
    /// up to 1 MiB.
    pub fn enable(
        vm: &VmFd,
        tracking: DirtyTracking,
        ring_bytes: Option<u32>,
    ) -> Result<Self, KvmError> {
        check(vm, tracking)?;
        match tracking {
            DirtyTracking::Classic => Ok(DirtyLog::Classic),
            DirtyTracking::ManualProtect => {
                let cap = kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    args: [KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE.into(), 0, 0, 0],
                    ..Default::default()
                };
                vm.enable_cap(&cap)
                    .map_err(|e| KvmError::ioctl("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)", e))?;
                Ok(DirtyLog::ManualProtect)
            }
            DirtyTracking::Ring => {
                let (cap, max) =
                    ring_capability(vm).ok_or(KvmError::Unsupported("KVM_CAP_DIRTY_LOG_RING"))?;
                let bytes = ring_bytes.unwrap_or(RING_BYTES_MAX).min(max);
                if !bytes.is_power_of_two() || bytes < 4096 {
                    return Err(KvmError::Config(format!(
                        "dirty ring of {bytes} bytes: use a power of two from 4096 to {max}"
                    )));
                }
                let cap = kvm_enable_cap {
                    cap,
                    args: [bytes.into(), 0, 0, 0],
                    ..Default::default()
                };
                vm.enable_cap(&cap)
                    .map_err(|e| KvmError::ioctl("KVM_ENABLE_CAP(DIRTY_LOG_RING)", e))?;
                Ok(DirtyLog::Ring {
                    bytes,
                    rings: Vec::new(),
                })
            }
        }
    }

    /// Maps the ring of a new vCPU (ring tracking only); returns it for the vCPU
    /// thread's ring-full exits.
    pub fn attach(&mut self, vcpu: &VcpuFd) -> Result<Option<SharedRing>, KvmError> {
        let DirtyLog::Ring { bytes, rings } = self else {
            return Ok(None);
        };
        let mapped = DirtyRing::map(vcpu, *bytes as usize)
            .map_err(|e| KvmError::io("mapping the dirty ring", e))?;
        let shared = Arc::new(Mutex::new(RingLog {
            ring: mapped,
            pending: Vec::new(),
        }));
        rings.push(Arc::clone(&shared));
        Ok(Some(shared))
    }

    /// Appends the pages of the `mem_bytes`-byte slot written since the last harvest
    /// and re-protects them. Called with the vCPU stopped.
    pub fn harvest(
        &mut self,
        vm: &VmFd,
        mem_bytes: usize,
        out: &mut Vec<u64>,
    ) -> Result<(), KvmError> {
        match self {
            DirtyLog::Classic => {
                let bitmap = vm
                    .get_dirty_log(SLOT, mem_bytes)
                    .map_err(|e| KvmError::ioctl("KVM_GET_DIRTY_LOG", e))?;
                push_set_bits(&bitmap, out);
            }
            DirtyLog::ManualProtect => {
                let bitmap = vm
                    .get_dirty_log(SLOT, mem_bytes)
                    .map_err(|e| KvmError::ioctl("KVM_GET_DIRTY_LOG", e))?;
                if bitmap.iter().any(|&w| w != 0) {
                    let pages = u32::try_from(mem_bytes / 4096).map_err(|_| {
                        KvmError::Config(format!("{mem_bytes} bytes of guest memory"))
                    })?;
                    sys::clear_dirty_log(vm, SLOT, pages, &bitmap)
                        .map_err(|e| KvmError::io("KVM_CLEAR_DIRTY_LOG", e))?;
                }
                push_set_bits(&bitmap, out);
            }
            DirtyLog::Ring { rings, .. } => {
                if rings.is_empty() {
                    return Err(KvmError::Order(
                        "harvest before the vCPUs' rings are mapped",
                    ));
                }
                for ring in rings {
                    let mut log = ring.lock().unwrap_or_else(|e| e.into_inner());
                    log.collect(vm)?;
                    out.append(&mut log.pending);
                }
            }
        }
        Ok(())
    }
}

/// Appends the index of every bit set in `bitmap`.
fn push_set_bits(bitmap: &[u64], out: &mut Vec<u64>) {
    for (i, &word) in bitmap.iter().enumerate() {
        let mut w = word;
        while w != 0 {
            out.push(i as u64 * 64 + u64::from(w.trailing_zeros()));
            w &= w - 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_bits_become_page_numbers() {
        let mut out = Vec::new();
        push_set_bits(&[0b1001, 0, 1 << 63], &mut out);
        assert_eq!(out, [0, 3, 191]);
    }

    #[test]
    fn names_round_trip() {
        for t in DirtyTracking::ALL {
            assert_eq!(t.name().parse::<DirtyTracking>(), Ok(t));
        }
        assert!(
            "bitmap"
                .parse::<DirtyTracking>()
                .unwrap_err()
                .contains("classic")
        );
    }
}
