//! The `PAGEMAP_SCAN` ioctl behind [`DirtyTracker`](super::DirtyTracker), with a safe
//! wrapper (the userfaultfd half is in [`crate::uffd`]).
//!
//! Debian 12's headers predate this interface, so the structures and ioctl number are
//! defined here from the kernel's `include/uapi/linux/fs.h` (Linux 6.7 and later).

use std::fs::File;
use std::io;
use std::mem::size_of;

use crate::uffd::{ioctl, iowr};

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
const _: () = assert!(size_of::<PageRegion>() == 24);
const _: () = assert!(size_of::<PmScanArg>() == 96);
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);

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
