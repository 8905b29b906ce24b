//! The raw kernel ABI behind [`DirtyTracker`](super::DirtyTracker): userfaultfd in
//! asynchronous write-protect mode and the `PAGEMAP_SCAN` ioctl, with safe wrappers.
//!
//! Debian 12's headers predate these interfaces, so the structures, ioctl numbers and
//! feature bits are defined here from the kernel's `include/uapi/linux/userfaultfd.h`
//! and `include/uapi/linux/fs.h` (Linux 6.7 and later). Every `unsafe` block of the
//! tracker lives in this file.

use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `_IOC(_IOC_READ | _IOC_WRITE, ty, nr, size)` as encoded on x86-64.
const fn iowr(ty: u8, nr: u8, size: usize) -> libc::Ioctl {
    const IOC_WRITE_READ: libc::Ioctl = 3;
    (IOC_WRITE_READ << 30)
        | ((size as libc::Ioctl) << 16)
        | ((ty as libc::Ioctl) << 8)
        | nr as libc::Ioctl
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

/// `UFFDIO_API = _IOWR(UFFDIO, 0x3f, struct uffdio_api)`.
const UFFDIO_API: libc::Ioctl = iowr(UFFDIO, 0x3f, size_of::<UffdioApi>());
/// `UFFDIO_REGISTER = _IOWR(UFFDIO, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::Ioctl = iowr(UFFDIO, 0x00, size_of::<UffdioRegister>());
/// `UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, 0x06, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: libc::Ioctl = iowr(UFFDIO, 0x06, size_of::<UffdioWriteprotect>());

/// `PAGE_IS_WRITTEN`: the page was written since it was last write-protected.
const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PM_SCAN_WP_MATCHING`: write-protect the pages reported, atomically with the scan.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail with `EPERM` on memory not in async write-protect mode.
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct page_region`: pages `start..end` (byte addresses, end exclusive) that share
/// the same categories.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PageRegion {
    /// First byte address.
    pub start: u64,
    /// Byte address just past the last page.
    pub end: u64,
    /// `PAGE_IS_*` bits of the pages.
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::Ioctl = iowr(b'f', 16, size_of::<PmScanArg>());

// The layouts the kernel expects.
const _: () = assert!(size_of::<UffdioApi>() == 24);
const _: () = assert!(size_of::<UffdioRegister>() == 32);
const _: () = assert!(size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(size_of::<PageRegion>() == 24);
const _: () = assert!(size_of::<PmScanArg>() == 96);
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);

/// Issues `ioctl(fd, request, arg)` with `arg` pointing at a `T` the kernel reads and
/// writes back; returns the ioctl's non-negative result.
///
/// # Safety
///
/// `T` must be the structure `request` expects, and every address inside it must be
/// valid for what the kernel does with it under `request`.
unsafe fn ioctl<T>(fd: &impl AsRawFd, request: libc::Ioctl, arg: &mut T) -> io::Result<i64> {
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

/// Opens a userfaultfd (close-on-exec, non-blocking, user-mode faults only).
fn open_userfaultfd() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
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
/// descriptor accepts only one handshake).
pub fn supported_features() -> io::Result<u64> {
    api_handshake(&open_userfaultfd()?, 0)
}

/// A userfaultfd whose handshake enabled [`FEATURE_WP_ASYNC`]: write-protect faults on
/// memory registered with it are resolved by the kernel and never block or signal the
/// writer, so registering and protecting memory changes no program's behaviour.
pub struct AsyncWpUffd(OwnedFd);

impl AsyncWpUffd {
    /// Opens a userfaultfd with `features`, which must include [`FEATURE_WP_ASYNC`].
    pub fn open(features: u64) -> io::Result<Self> {
        if features & FEATURE_WP_ASYNC == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "asynchronous write-protect was not requested",
            ));
        }
        let fd = open_userfaultfd()?;
        api_handshake(&fd, features)?;
        Ok(Self(fd))
    }

    /// Registers `len` bytes at address `start` for write-protect tracking.
    pub fn register_wp(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`; the range
        // it carries is only validated and looked up by the kernel, never dereferenced,
        // and the descriptor is in async mode, so no write to it will ever block.
        unsafe { ioctl(&self.0, UFFDIO_REGISTER, &mut reg) }.map(drop)
    }

    /// Write-protects `len` bytes at `start`, which must be registered.
    pub fn write_protect(&self, start: u64, len: u64) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: WRITEPROTECT_MODE_WP,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads a `struct uffdio_writeprotect`; it changes
        // page-table protection of the range only, and in async mode the kernel resolves
        // the resulting write faults itself, so no access by this process changes meaning.
        unsafe { ioctl(&self.0, UFFDIO_WRITEPROTECT, &mut wp) }.map(drop)
    }
}

/// `/proc/self/pagemap`, the file the `PAGEMAP_SCAN` ioctl is issued on.
pub struct Pagemap(File);

/// Where one `PAGEMAP_SCAN` call stopped.
pub struct Scanned {
    /// Entries of the output vector filled.
    pub regions: usize,
    /// Address up to which the range was scanned; the end of the range when complete.
    pub walk_end: u64,
}

impl Pagemap {
    /// Opens this process's pagemap.
    pub fn open() -> io::Result<Self> {
        File::open("/proc/self/pagemap").map(Self)
    }

    /// Finds pages in `start..end` written since they were last write-protected, fills
    /// `out` with them and write-protects them again in the same page-table walk. Stops
    /// early when `out` is full. Fails with `EPERM` if part of the range is mapped but not
    /// registered in async write-protect mode.
    pub fn scan_written(
        &self,
        start: u64,
        end: u64,
        out: &mut [PageRegion],
    ) -> io::Result<Scanned> {
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            start,
            end,
            walk_end: 0,
            vec: out.as_mut_ptr() as u64,
            vec_len: out.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: PAGE_IS_WRITTEN,
            category_anyof_mask: 0,
            return_mask: PAGE_IS_WRITTEN,
        };
        // SAFETY: PAGEMAP_SCAN reads and writes a `struct pm_scan_arg`. The only address
        // the kernel writes through is `vec`, which points at `out`: `vec_len` entries of
        // `struct page_region`, exclusively borrowed for the call. `start..end` is only
        // walked in the page tables (protection changed as in `write_protect`), never
        // dereferenced.
        let filled = unsafe { ioctl(&self.0, PAGEMAP_SCAN, &mut arg) }?;
        let regions = usize::try_from(filled)
            .map_err(|_| io::Error::other("PAGEMAP_SCAN returned an invalid count"))?;
        if regions > out.len() {
            return Err(io::Error::other(
                "PAGEMAP_SCAN reported more regions than it was given room for",
            ));
        }
        Ok(Scanned {
            regions,
            walk_end: arg.walk_end,
        })
    }

    /// Whether this kernel implements `PAGEMAP_SCAN` (Linux 6.7 and later): scans an
    /// empty range.
    pub fn supports_scan(&self) -> io::Result<bool> {
        match self.scan_written(0, 0, &mut []) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
