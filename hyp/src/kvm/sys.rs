//! The KVM interfaces kvm-ioctls 0.25 does not wrap, with safe APIs above them:
//! `KVM_CLEAR_DIRTY_LOG`, the per-vCPU dirty ring (its mapping, harvest and
//! `KVM_RESET_DIRTY_RINGS`), the `immediate_exit` byte of a vCPU's `kvm_run` page
//! written from another thread, and guest memory as the vCPU threads' devices reach
//! it. All of the VMM's `unsafe` code is here, except the blocks in `vm.rs` that call
//! [`set_memory`] and [`GuestMemory::new`] (and those of `kv.rs`'s unit tests).

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_DIRTY_LOG_PAGE_OFFSET, KVMIO, kvm_clear_dirty_log, kvm_dirty_gfn,
    kvm_userspace_memory_region, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

/// `KVM_DIRTY_GFN_F_DIRTY`: the entry names a dirty page the VMM has not collected.
/// kvm-bindings 0.14 lacks it (include/uapi/linux/kvm.h).
pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// `KVM_DIRTY_GFN_F_RESET`: the VMM collected the entry; KVM may re-protect the page.
pub const KVM_DIRTY_GFN_F_RESET: u32 = 1 << 1;

ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// Registers `len` bytes at `host` as guest memory slot `slot` at guest-physical 0.
///
/// # Safety
///
/// `host..host + len` must be a mapping of this process that stays mapped, and is
/// not otherwise aliased in a way the guest's writes could break, for as long as the
/// VM exists.
pub unsafe fn set_memory(
    vm: &VmFd,
    slot: u32,
    host: *mut u8,
    len: usize,
    flags: u32,
) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: 0,
        memory_size: len as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the caller guarantees the mapping outlives the VM.
    unsafe { vm.set_user_memory_region(region) }
}

/// Loads `xsave` into the vCPU.
///
/// `xsave_size` is what `KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)` returned for this VM
/// (0 when the capability is absent, meaning the legacy 4096-byte area); returns
/// `None`, without touching the vCPU, if KVM's XSAVE area is larger than `kvm_xsave`.
pub fn set_xsave(
    vcpu: &VcpuFd,
    xsave: &kvm_xsave,
    xsave_size: usize,
) -> Option<Result<(), kvm_ioctls::Error>> {
    if xsave_size > size_of::<kvm_xsave>() {
        return None;
    }
    // SAFETY: KVM reads at most its XSAVE size, which was just checked to fit in
    // `kvm_xsave`; no XSTATE feature is enabled with arch_prctl in this process.
    Some(unsafe { vcpu.set_xsave(xsave) })
}

/// Clears (re-protects) the pages set in `bitmap` in memory slot `slot`
/// (`KVM_CLEAR_DIRTY_LOG`, with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled). `bitmap`
/// covers `pages` pages from page 0 of the slot, `pages` being the slot's size.
pub fn clear_dirty_log(vm: &VmFd, slot: u32, pages: u32, bitmap: &[u64]) -> io::Result<()> {
    if bitmap.len() * 64 < pages as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "dirty bitmap shorter than the slot",
        ));
    }
    let mut clear = kvm_clear_dirty_log {
        slot,
        num_pages: pages,
        first_page: 0,
        ..Default::default()
    };
    clear.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr().cast_mut().cast();
    // SAFETY: `clear` points at `bitmap`, which holds at least `pages` bits and which
    // KVM only reads during the call.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks KVM to re-protect the pages of every collected (RESET-marked) ring entry.
pub fn reset_dirty_rings(vm: &VmFd) -> io::Result<u32> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and only touches KVM's state.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    u32::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// One vCPU's dirty ring, mapped from its file descriptor.
pub struct DirtyRing {
    entries: NonNull<kvm_dirty_gfn>,
    len: u32,
    fetch: u32,
}

// SAFETY: the ring is plain shared memory; `DirtyRing` is its only user-space user,
// and `&mut self` serialises harvests.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of `bytes` bytes (the size given to `KVM_CAP_DIRTY_LOG_RING*`)
    /// from `vcpu`.
    pub fn map(vcpu: &VcpuFd, bytes: usize) -> io::Result<Self> {
        let entries = bytes / size_of::<kvm_dirty_gfn>();
        let len = u32::try_from(entries)
            .ok()
            .filter(|n| n.is_power_of_two())
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "ring size not a power of two")
            })?;
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let offset = libc::off_t::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page;
        // SAFETY: a new shared mapping of the vCPU's ring; no existing memory is
        // affected, and the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let entries = NonNull::new(ptr.cast()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self {
            entries,
            len,
            fetch: 0,
        })
    }

    /// Appends the page offsets of every dirty entry of slot `slot` from the fetch
    /// index on, marks them collected, and returns how many entries it took. The
    /// caller then issues [`reset_dirty_rings`].
    pub fn collect(&mut self, slot: u32, out: &mut Vec<u64>) -> u32 {
        let mut taken = 0;
        loop {
            let index = (self.fetch % self.len) as usize;
            // SAFETY: `index < len`, so the entry lies inside the mapping, which lives
            // as long as `self`; kvm_dirty_gfn is 16-byte aligned within the page.
            let entry = unsafe { self.entries.as_ptr().add(index) };
            // SAFETY: `flags` is the entry's first field, a u32 KVM and this process
            // access atomically (acquire/release is the ring protocol).
            let flags = unsafe { AtomicU32::from_ptr(&raw mut (*entry).flags) };
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                return taken;
            }
            // SAFETY: the DIRTY flag was observed with acquire ordering, so KVM's
            // writes of `slot` and `offset` are visible and KVM no longer writes them.
            let (entry_slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
            if entry_slot == slot {
                out.push(offset);
            }
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            taken += 1;
        }
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let bytes = self.len as usize * size_of::<kvm_dirty_gfn>();
        // SAFETY: unmaps exactly the mapping made in `map`, which nothing uses after.
        unsafe { libc::munmap(self.entries.as_ptr().cast(), bytes) };
    }
}

/// The `immediate_exit` byte of a vCPU's `kvm_run` page, settable from any thread:
/// set it and `KVM_RUN` returns `EINTR` at its next entry, after completing any I/O
/// the vCPU exited for.
pub struct ImmediateExit {
    byte: NonNull<u8>,
    /// Keeps the vCPU, and so its `kvm_run` mapping, alive while `byte` is used.
    _vcpu: Arc<Mutex<VcpuFd>>,
}

// SAFETY: the byte is only accessed atomically, and the mapping outlives `self`.
unsafe impl Send for ImmediateExit {}
// SAFETY: as above: shared access only ever makes atomic stores.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    /// The `immediate_exit` byte of `vcpu`.
    pub fn new(vcpu: Arc<Mutex<VcpuFd>>) -> Self {
        let byte = {
            let mut fd = vcpu.lock().unwrap_or_else(|e| e.into_inner());
            NonNull::from(&mut fd.get_kvm_run().immediate_exit)
        };
        Self { byte, _vcpu: vcpu }
    }

    /// Sets (`true`) or clears the byte.
    pub fn set(&self, on: bool) {
        // SAFETY: the byte lies in the vCPU's kvm_run mapping, kept alive by
        // `_vcpu`; every access from this process goes through this atomic (the
        // kernel reads it at KVM_RUN entry).
        let byte = unsafe { AtomicU8::from_ptr(self.byte.as_ptr()) };
        byte.store(u8::from(on), Ordering::SeqCst);
    }
}

/// Guest memory as a vCPU thread's device reaches it while its vCPU is out of
/// `KVM_RUN`: copies in and out at guest-physical addresses, checked against the
/// memory's size.
#[derive(Clone, Copy)]
pub struct GuestMemory {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a plain address range; `new`'s contract keeps it mapped while used, and
// the copies are of plain bytes.
unsafe impl Send for GuestMemory {}
// SAFETY: as above.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// A view of `len` bytes at `base`.
    ///
    /// # Safety
    ///
    /// `base..base + len` must stay mapped, readable and writable for as long as the
    /// view or a copy of it is used; callers copy only while the guest is not using
    /// the bytes (its vCPU is out of `KVM_RUN`) and the VMM is not reading them.
    pub unsafe fn new(base: *mut u8, len: usize) -> Option<Self> {
        NonNull::new(base).map(|base| Self { base, len })
    }

    /// Copies `bytes` to guest-physical `gpa`; false (and nothing copied) if they do
    /// not fit in guest memory.
    pub fn write(&self, gpa: u64, bytes: &[u8]) -> bool {
        let Some(at) = self.range(gpa, bytes.len()) else {
            return false;
        };
        // SAFETY: `at..at + bytes.len()` lies inside the mapping (checked), which the
        // contract of `new` keeps alive; `bytes` is host memory, not guest memory.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.as_ptr().add(at), bytes.len())
        };
        true
    }

    /// Copies guest-physical `gpa..gpa + out.len()` into `out`; false (and `out`
    /// untouched) if the range is not in guest memory.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> bool {
        let Some(at) = self.range(gpa, out.len()) else {
            return false;
        };
        // SAFETY: as in `write`, with the copy's direction reversed.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.as_ptr().add(at), out.as_mut_ptr(), out.len())
        };
        true
    }

    fn range(&self, gpa: u64, len: usize) -> Option<usize> {
        let at = usize::try_from(gpa).ok()?;
        (at.checked_add(len)? <= self.len).then_some(at)
    }
}
