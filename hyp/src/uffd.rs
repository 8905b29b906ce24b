//! The raw userfaultfd ABI behind dirty tracking ([`crate::tracking`]) and
//! copy-on-write snapshots ([`crate::cow`]), with safe wrappers.
//!
//! Debian 12's headers predate the interfaces used here, so the structures, ioctl
//! numbers and feature bits are defined from the kernel's
//! `include/uapi/linux/userfaultfd.h` (Linux 6.7 and later). Every `unsafe` block of
//! userfaultfd handling lives in this file.

use std::ffi::c_void;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `_IOC(_IOC_READ | _IOC_WRITE, ty, nr, size)` as encoded on x86-64.
pub(crate) const fn iowr(ty: u8, nr: u8, size: usize) -> libc::Ioctl {
    const IOC_WRITE_READ: libc::Ioctl = 3;
    (IOC_WRITE_READ << 30)
        | ((size as libc::Ioctl) << 16)
        | ((ty as libc::Ioctl) << 8)
        | nr as libc::Ioctl
}

/// `_IOC(_IOC_READ, ty, nr, size)` as encoded on x86-64.
const fn ior(ty: u8, nr: u8, size: usize) -> libc::Ioctl {
    const IOC_READ: libc::Ioctl = 2;
    (IOC_READ << 30)
        | ((size as libc::Ioctl) << 16)
        | ((ty as libc::Ioctl) << 8)
        | nr as libc::Ioctl
}

/// Issues `ioctl(fd, request, arg)` with `arg` pointing at a `T` the kernel reads and
/// writes back; returns the ioctl's non-negative result.
///
/// # Safety
///
/// `T` must be the structure `request` expects, and every address inside it must be
/// valid for what the kernel does with it under `request`.
pub(crate) unsafe fn ioctl<T>(
    fd: &impl AsRawFd,
    request: libc::Ioctl,
    arg: &mut T,
) -> io::Result<i64> {
    // SAFETY: `arg` is a live, exclusive `T` for the whole call; the caller guarantees
    // that `T` is what `request` reads and writes and that the addresses it carries are
    // valid, so the kernel touches no memory other than what the caller vouched for.
    let ret = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            request,
            std::ptr::from_mut(arg).cast::<c_void>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(i64::from(ret))
    }
}

/// `UFFD_USER_MODE_ONLY`: the descriptor handles faults from user mode only, which
/// needs no privilege.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
/// `UFFD_API`: the only API version.
const UFFD_API: u64 = 0xaa;
/// `UFFDIO`: the userfaultfd ioctl type.
const UFFDIO: u8 = 0xaa;

/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write-protect works on hugetlbfs and shmem.
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED`: write-protect also covers pages never touched.
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC`: the kernel resolves write-protect faults itself, clearing
/// the page's protection, instead of blocking the writer.
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `UFFDIO_REGISTER_MODE_WP`.
const REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`.
const WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

/// `UFFD_EVENT_PAGEFAULT`.
const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WP`: the fault is a write to a write-protected page.
const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// `struct uffdio_api`.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg`: an event read from the descriptor. Only page faults are asked
/// for, whose union member is `{ flags u64, address u64, ptid u32 }`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    rest: u64,
}

impl UffdMsg {
    /// The address of a write fault on a write-protected page, if this is one.
    pub fn write_protect_fault(&self) -> Option<u64> {
        (self.event == EVENT_PAGEFAULT && self.flags & PAGEFAULT_FLAG_WP != 0)
            .then_some(self.address)
    }
}

/// `UFFDIO_API = _IOWR(UFFDIO, 0x3f, struct uffdio_api)`.
const UFFDIO_API: libc::Ioctl = iowr(UFFDIO, 0x3f, size_of::<UffdioApi>());
/// `UFFDIO_REGISTER = _IOWR(UFFDIO, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::Ioctl = iowr(UFFDIO, 0x00, size_of::<UffdioRegister>());
/// `UFFDIO_UNREGISTER = _IOR(UFFDIO, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: libc::Ioctl = ior(UFFDIO, 0x01, size_of::<UffdioRange>());
/// `UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, 0x06, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: libc::Ioctl = iowr(UFFDIO, 0x06, size_of::<UffdioWriteprotect>());

// The layouts the kernel expects.
const _: () = assert!(size_of::<UffdioApi>() == 24);
const _: () = assert!(size_of::<UffdioRegister>() == 32);
const _: () = assert!(size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(size_of::<UffdMsg>() == 32);
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_aa01);

/// Which faults a userfaultfd is asked to handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Faults {
    /// Faults from user mode only: needs no privilege, but a write by the kernel on the
    /// process's behalf (`read(2)` into the memory, KVM writing guest memory) to a
    /// page whose fault the descriptor would have to resolve fails instead.
    UserOnly,
    /// Faults from user and kernel mode: needs root, `CAP_SYS_PTRACE` or the sysctl
    /// `vm.unprivileged_userfaultfd=1`.
    All,
}

/// Opens a userfaultfd (close-on-exec, non-blocking).
fn open_userfaultfd(faults: Faults) -> io::Result<OwnedFd> {
    let mut flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    if faults == Faults::UserOnly {
        flags |= UFFD_USER_MODE_ONLY;
    }
    // SAFETY: userfaultfd(2) takes one integer argument and touches no user memory.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(ret)
        .map_err(|_| io::Error::other("userfaultfd returned an out-of-range descriptor"))?;
    // SAFETY: the kernel just returned `fd` as a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Performs the `UFFDIO_API` handshake on `fd` asking for `features`; returns every
/// feature the kernel supports.
fn api_handshake(fd: &OwnedFd, features: u64) -> io::Result<u64> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which holds no addresses.
    unsafe { ioctl(fd, UFFDIO_API, &mut api) }?;
    Ok(api.features)
}

/// The userfaultfd features this kernel supports, from a throwaway descriptor (a
/// descriptor accepts only one handshake) handling `faults`.
pub fn supported_features(faults: Faults) -> io::Result<u64> {
    api_handshake(&open_userfaultfd(faults)?, 0)
}

/// A userfaultfd set up for write-protect faults.
///
/// With [`FEATURE_WP_ASYNC`] the kernel resolves every write-protect fault itself, so
/// registering and protecting memory changes no program's behaviour. Without it a
/// write to a protected page blocks the writer until someone reads the fault with
/// [`read_faults`](Self::read_faults) and lifts the protection with
/// [`unprotect`](Self::unprotect), or closes the descriptor; neither mode changes what
/// any access reads or writes, only when a write completes.
pub struct WpUffd(OwnedFd);

impl WpUffd {
    /// Opens a userfaultfd handling `faults` with `features`.
    pub fn open(faults: Faults, features: u64) -> io::Result<Self> {
        let fd = open_userfaultfd(faults)?;
        api_handshake(&fd, features)?;
        Ok(Self(fd))
    }

    /// Registers `len` bytes at address `start` for write-protect faults.
    pub fn register_wp(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`; the range
        // it carries is only validated and looked up by the kernel, never dereferenced.
        unsafe { ioctl(&self.0, UFFDIO_REGISTER, &mut reg) }.map(drop)
    }

    /// Unregisters `len` bytes at `start`: writers blocked on them are woken and no
    /// write there faults to this descriptor again.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads a `struct uffdio_range`, which the kernel only
        // looks up in the address space, never dereferences.
        unsafe { ioctl(&self.0, UFFDIO_UNREGISTER, &mut range) }.map(drop)
    }

    /// Write-protects `len` bytes at `start`, which must be registered.
    pub fn write_protect(&self, start: u64, len: u64) -> io::Result<()> {
        self.writeprotect(start, len, WRITEPROTECT_MODE_WP)
    }

    /// Lifts write protection from `len` bytes at `start` and, when `wake`, wakes the
    /// writers blocked on them.
    pub fn unprotect(&self, start: u64, len: u64, wake: bool) -> io::Result<()> {
        let mode = if wake { 0 } else { WRITEPROTECT_MODE_DONTWAKE };
        self.writeprotect(start, len, mode)
    }

    fn writeprotect(&self, start: u64, len: u64, mode: u64) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads a `struct uffdio_writeprotect`; it changes the
        // page-table protection of the range only (never its contents), which the kernel
        // checks is registered with this descriptor.
        unsafe { ioctl(&self.0, UFFDIO_WRITEPROTECT, &mut wp) }.map(drop)
    }

    /// Reads pending fault messages into `out` without blocking; returns how many were
    /// read (0 when none is pending).
    pub fn read_faults(&self, out: &mut [UffdMsg]) -> io::Result<usize> {
        let bytes = size_of_val(out);
        // SAFETY: `out` is an exclusively borrowed array of plain-data `uffd_msg`
        // structures `bytes` long; read(2) writes at most `bytes` bytes into it.
        let ret = unsafe { libc::read(self.0.as_raw_fd(), out.as_mut_ptr().cast(), bytes) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(0),
                _ => Err(e),
            };
        }
        Ok(ret.unsigned_abs() / size_of::<UffdMsg>())
    }
}

impl AsRawFd for WpUffd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}
