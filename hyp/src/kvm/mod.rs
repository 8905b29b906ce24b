//! KVM micro-VMs as protected programs: vCPUs running a small freestanding guest
//! program in 64-bit long mode, its memory a [`crate::memory::Region`] registered with
//! KVM's dirty logging, stopped and resumed per epoch by signalling their threads, its
//! machine state captured into a versioned, checksummed blob that a fresh VM restores.
//!
//! - [`vm`]: the VM ([`KvmVm`]): creation, boot, restore, the [`crate::protected::Protected`] impl;
//! - [`vcpu`]: the vCPU thread, its port I/O devices, stop and resume;
//! - [`dirty`]: the three dirty tracking methods;
//! - [`state`]: machine state capture, restore and its encoding;
//! - [`guest`]: the guest memory layout, the guest programs and the CPU setup;
//! - [`ep`]: the result the NPB EP guest reports, and the host's check of it;
//! - [`kv`]: the key-value device and its output commit; [`kv_server`]: its TCP
//!   front end in the Redis protocol;
//! - `sys`: the raw ioctls kvm-ioctls lacks and the devices' view of guest memory,
//!   with their `unsafe` blocks (the others: `vm.rs` registers guest memory and makes
//!   that view of it; `kv.rs`'s unit tests make views of their buffers).
//!
//! On PVM hosts (nested KVM without VT-x/AMD-V, such as the development machines)
//! only user-mode (CPL3) guest code runs natively; kernel-mode (CPL0) code is
//! emulated instruction by instruction. [`guest::Privilege`] chooses.

pub mod dirty;
pub mod ep;
pub mod guest;
pub mod kv;
pub mod kv_server;
pub mod state;
mod sys;
pub mod vcpu;
pub mod vm;

use std::io;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;

pub use dirty::DirtyTracking;
pub use guest::{GuestArgs, Privilege, Program};
pub use state::{MachineState, RestoreReport, StateError};
pub use vcpu::GuestStop;
pub use vm::{KvmVm, VmConfig};

/// What failed in the VMM, and what to do about it.
#[derive(Debug, Error)]
pub enum KvmError {
    /// Copy-on-write checkpoints could not be set up.
    #[error(transparent)]
    Cow(#[from] crate::cow::CowError),
    /// /dev/kvm cannot be opened.
    #[error(
        "cannot open /dev/kvm ({0}): run on a host with KVM (load kvm_intel, kvm_amd or kvm_pvm) and give this user read-write access to /dev/kvm"
    )]
    Open(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error(
        "{what} failed ({source}): the host's KVM refused it; check `dmesg` and the KVM version"
    )]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A system call around KVM failed.
    #[error("{what} failed ({source})")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The host's KVM lacks a capability.
    #[error("this host's KVM lacks {0}: use another dirty tracking method or a newer kernel")]
    Unsupported(&'static str),
    /// The configuration cannot work.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// Guest memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// A state blob could not be decoded.
    #[error(transparent)]
    State(#[from] StateError),
    /// The vCPU thread could not be started.
    #[error("cannot start the vCPU thread ({0}): raise the thread limit or free memory")]
    Thread(#[source] io::Error),
    /// The kick signal could not be installed or sent.
    #[error("cannot signal the vCPU thread: {0}")]
    Signal(String),
    /// The guest stopped for good.
    #[error("{0}: see the guest's console output")]
    Guest(GuestStop),
    /// The guest did not make the progress waited for.
    #[error(
        "the guest reached iteration {reached}, not {target}, within {waited:?}: it is stuck or too slow"
    )]
    Timeout {
        /// Iterations waited for.
        target: u64,
        /// Iterations reached.
        reached: u64,
        /// How long.
        waited: Duration,
    },
    /// The guest program did not finish in time.
    #[error(
        "the guest did not finish within {waited:?} (it reached iteration {reached}): it is stuck or too slow"
    )]
    NotFinished {
        /// Iterations reached.
        reached: u64,
        /// How long.
        waited: Duration,
    },
    /// An operation was called in the wrong state.
    #[error("{0}")]
    Order(&'static str),
}

impl KvmError {
    fn ioctl(what: &'static str, source: kvm_ioctls::Error) -> Self {
        KvmError::Ioctl { what, source }
    }

    fn io(what: &'static str, source: io::Error) -> Self {
        KvmError::Io { what, source }
    }
}

/// Whether this host's KVM can run a VM with `tracking`; the error says what is
/// missing. Tests call it and skip, loudly, when it fails.
pub fn probe(tracking: DirtyTracking) -> Result<(), KvmError> {
    let kvm = kvm_ioctls::Kvm::new().map_err(KvmError::Open)?;
    let vm = kvm
        .create_vm()
        .map_err(|e| KvmError::ioctl("KVM_CREATE_VM", e))?;
    dirty::check(&vm, tracking)
}

/// Whether KVM here is PVM (nested, without hardware virtualization): then only CPL3
/// guest code runs natively.
pub fn is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}
