//! Kernel dirty-page tracking of process memory: which 4 KiB pages of a [`Region`]
//! were written since the last look.
//!
//! [`DirtyTracker`] registers the region with a userfaultfd in asynchronous
//! write-protect mode (`UFFD_FEATURE_WP_ASYNC` with `UFFD_FEATURE_WP_UNPOPULATED`) and
//! write-protects it. A write to a protected page faults once; the kernel resolves the
//! fault itself by lifting the protection of that page, without blocking or signalling
//! the writer. [`DirtyTracker::harvest`] issues one `PAGEMAP_SCAN` ioctl on
//! `/proc/self/pagemap` (Linux 6.7 and later) that lists the unprotected (written)
//! pages and protects them again in the same page-table walk, under the page-table
//! lock and with the TLB flushed before the ioctl returns. A write racing with a
//! harvest is therefore either reported by this harvest (and, having happened before
//! the ioctl returned, is visible to whoever reads the page afterwards) or faults on the
//! new protection and is reported by the next one; none is lost.
//!
//! # Huge pages
//!
//! Regions from [`crate::memory`] are backed by transparent huge pages. Measured on
//! Linux 6.18 (the test `thp_backed_region_is_tracked_per_4k_page` prints these
//! figures): tracking stays **4 KiB-granular** on them. Registering and write-protecting
//! keeps the huge pages (1024 of 1024 MiB still `AnonHugePages`); the first write into a
//! protected huge page makes the kernel split it into 512 page-table entries that keep
//! the protection and unprotect only the 4 KiB page written. One byte written in each of
//! the 512 huge pages of a 1 GiB region was reported as exactly those 512 pages, never
//! as 2 MiB ranges, so a harvest costs no extra bandwidth and `MADV_NOHUGEPAGE` is not
//! needed for precision.
//!
//! What it costs is the huge pages themselves. Every huge page written once stays split
//! while tracked (after the writes above `AnonHugePages` was 0 MiB; khugepaged does not
//! collapse write-protected entries), and:
//!
//! - the first write into a protected huge page, which splits it, took about 14 µs
//!   (0.03 to 0.2 µs untracked); later first writes into a protected 4 KiB page take
//!   about 1.1 µs (0.015 µs untracked), the price of write-protect tracking itself;
//! - random 8-byte reads over the 1 GiB region took 26 to 50 ns once split against 22
//!   to 30 ns on huge pages (+17 % to +80 % across runs on this noisy machine);
//! - harvests walk 4 KiB entries where huge pages were split: 0.04 ms for an untouched
//!   1 GiB region, 0.4 ms for the same region fully split, both with nothing written.
//!
//! Turning huge pages off (`MADV_NOHUGEPAGE`) would only move these costs up front to
//! all of the region, including the parts never written, so tracked regions keep the
//! huge page advice: the split is paid once per 2 MiB written, on the first write.
//! Hugetlb regions cannot be split: there the kernel reports whole 2 MiB pages,
//! [`harvest`](DirtyTracker::harvest) expands each into its 512 page indices (a
//! superset of the pages written, up to 512 times the bandwidth for sparse writes), and
//! ranges must be 2 MiB-aligned. No hugetlb pages are reserved on the development
//! machine, so that path is not exercised by the tests.
//!
//! # Timings
//!
//! One harvest of a 1 GiB region on the development machine (the test
//! `a_1_gib_region_with_37000_written_pages_is_harvested_without_a_miss` prints these):
//! 0.04 ms with nothing written, 2.6 to 4.3 ms with 37,000 pages written, 6.1 to 10.7 ms
//! with 100,000 pages written, 0.4 ms with nothing written once the huge pages are split.
//!
//! # Limits
//!
//! - Writes that do not go through the page tables are not seen: device DMA or RDMA
//!   into pinned pages, io_uring registered buffers. Writes by the kernel on the
//!   process's behalf, such as `read(2)` into the region, fault like user writes and are
//!   seen.
//! - The tracker reads the page tables of the process that created it.
//! - The tracker does not keep the region alive. If the region is unmapped first, the
//!   harvest reports nothing for it, or fails if another mapping took its place.

mod sys;

use std::io;

use thiserror::Error;

use crate::cow::{CowMode, CowTracker, Granule};
use crate::memory::{Backing, HUGE_PAGE, Region};
use crate::protected::HypError;
use crate::workload::PAGE;
use sys::{PageRegion, Pagemap};

use crate::uffd::{self, Faults, WpUffd};

/// Entries of the `PAGEMAP_SCAN` output vector (24 bytes each). One entry holds a run of
/// consecutive written pages; when more runs than this are dirty, a harvest takes more
/// than one ioctl.
const SCAN_VECTOR: usize = 8192;

/// Dirty tracking could not be set up or harvested.
#[derive(Debug, Error)]
pub enum TrackingError {
    /// The range asked for is empty, misaligned or outside the region.
    #[error(
        "cannot track {len} bytes at offset {offset} of a {region_len}-byte region: offset \
         and length must be multiples of {granule} bytes, the length non-zero, and the \
         range inside the region"
    )]
    Range {
        /// Byte offset of the range in the region.
        offset: usize,
        /// Bytes in the range.
        len: usize,
        /// Bytes in the region.
        region_len: usize,
        /// The alignment required: 4 KiB, or 2 MiB for hugetlb-backed regions.
        granule: usize,
    },
    /// The kernel has no userfaultfd.
    #[error(
        "this kernel has no userfaultfd ({0}): dirty tracking needs Linux 6.7 or later \
         built with CONFIG_USERFAULTFD"
    )]
    NoUserfaultfd(#[source] io::Error),
    /// The kernel or a security policy refused to create a userfaultfd.
    #[error(
        "creating a userfaultfd was refused ({0}): run as root or with CAP_SYS_PTRACE, set \
         the sysctl vm.unprivileged_userfaultfd=1, or allow the userfaultfd syscall in the \
         seccomp or container policy"
    )]
    PermissionDenied(#[source] io::Error),
    /// The kernel's userfaultfd lacks features dirty tracking needs.
    #[error(
        "this kernel's userfaultfd lacks {missing}: asynchronous write-protect tracking \
         needs Linux 6.7 or later built with CONFIG_PTE_MARKER_UFFD_WP"
    )]
    MissingFeatures {
        /// Names of the missing `UFFD_FEATURE_*` bits.
        missing: String,
    },
    /// `/proc/self/pagemap` has no `PAGEMAP_SCAN` ioctl.
    #[error(
        "this kernel has no PAGEMAP_SCAN ioctl on /proc/self/pagemap: dirty tracking needs \
         Linux 6.7 or later"
    )]
    NoPagemapScan,
    /// The range could not be registered with the userfaultfd.
    #[error(
        "cannot register the range for write-protect tracking ({0}): the memory must be \
         private anonymous, shmem or hugetlbfs, and not already tracked by another \
         DirtyTracker"
    )]
    Register(#[source] io::Error),
    /// Part of the range is no longer registered: the region was unmapped or remapped.
    #[error(
        "part of the tracked range is no longer registered for write-protect tracking \
         ({0}): the region was unmapped or remapped while tracked; create a new \
         DirtyTracker for the new mapping"
    )]
    Untracked(#[source] io::Error),
    /// Any other kernel call failed.
    #[error("cannot {what} ({source}): the kernel refused a call dirty tracking depends on")]
    Kernel {
        /// What was being done.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// Tracks which 4 KiB pages of one memory range were written, using userfaultfd
/// write-protect in asynchronous mode and the `PAGEMAP_SCAN` ioctl (see the
/// [module documentation](self)).
///
/// The tracker never reads or writes the memory it tracks; the program keeps writing
/// through its own references while harvests run, from any thread.
///
/// Construction is safe although it changes the page tables of memory the caller keeps
/// using: in asynchronous mode a write to a protected page is completed by the kernel
/// as if the page had never been protected (the fault is resolved in the kernel, the
/// writer is never blocked or signalled), so no access by the program changes meaning,
/// and the tracker only hands addresses to the kernel, which checks them. Misuse, such
/// as dropping the region first, can only give wrong page lists or errors.
pub struct DirtyTracker {
    /// Keeps the registration alive; closing it unregisters the range.
    _uffd: WpUffd,
    pagemap: Pagemap,
    /// First byte address of the range.
    start: u64,
    /// Byte address just past the range.
    end: u64,
    /// Output vector of `PAGEMAP_SCAN`, reused across harvests.
    scan: Vec<PageRegion>,
}

impl DirtyTracker {
    /// Checks that this kernel supports dirty tracking, with the error [`new`](Self::new)
    /// would give if not.
    pub fn probe() -> Result<(), TrackingError> {
        features_for(Backing::Base).map(drop)
    }

    /// Tracks the whole of `region` and write-protects it: the first harvest reports the
    /// pages written after this call.
    pub fn new(region: &Region) -> Result<Self, TrackingError> {
        Self::with_range(region, 0, region.len())
    }

    /// Tracks `len` bytes of `region` from byte `offset` (both multiples of 4 KiB, or of
    /// 2 MiB for hugetlb-backed regions) and write-protects them. Harvests report page
    /// indices relative to `offset`.
    pub fn with_range(region: &Region, offset: usize, len: usize) -> Result<Self, TrackingError> {
        let granule = match region.backing() {
            Backing::Hugetlb => HUGE_PAGE,
            Backing::TransparentHuge | Backing::Base => PAGE,
        };
        let range_error = || TrackingError::Range {
            offset,
            len,
            region_len: region.len(),
            granule,
        };
        let range_end = offset.checked_add(len).ok_or_else(range_error)?;
        if len == 0 || offset % granule != 0 || len % granule != 0 || range_end > region.len() {
            return Err(range_error());
        }
        let features = features_for(region.backing())?;
        let uffd =
            WpUffd::open(Faults::UserOnly, features).map_err(|source| TrackingError::Kernel {
                what: "enable asynchronous write-protect on a userfaultfd",
                source,
            })?;
        let pagemap = Pagemap::open().map_err(|source| TrackingError::Kernel {
            what: "open /proc/self/pagemap",
            source,
        })?;
        let start = (region.as_ptr().addr() + offset) as u64;
        uffd.register_wp(start, len as u64)
            .map_err(TrackingError::Register)?;
        uffd.write_protect(start, len as u64)
            .map_err(|source| TrackingError::Kernel {
                what: "write-protect the tracked range",
                source,
            })?;
        Ok(Self {
            _uffd: uffd,
            pagemap,
            start,
            end: start + len as u64,
            scan: vec![PageRegion::default(); SCAN_VECTOR],
        })
    }

    /// Appends to `dirty`, in increasing order, the index (relative to the start of the
    /// range, in 4 KiB pages) of every page written since the last harvest or since the
    /// tracker was created, and write-protects those pages again in the same walk. A
    /// write racing with the harvest is reported by this harvest or by the next one,
    /// never by neither: read the reported pages after this returns.
    pub fn harvest(&mut self, dirty: &mut Vec<u64>) -> Result<(), TrackingError> {
        let page = PAGE as u64;
        let mut cursor = self.start;
        loop {
            let scanned = self
                .pagemap
                .scan_written(cursor, self.end, &mut self.scan)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::EPERM) => TrackingError::Untracked(e),
                    _ => TrackingError::Kernel {
                        what: "scan /proc/self/pagemap for written pages",
                        source: e,
                    },
                })?;
            let runs = &self.scan[..scanned.regions];
            for run in runs {
                dirty.extend((run.start - self.start) / page..(run.end - self.start) / page);
            }
            // The kernel stops before the end of the range only when the output vector
            // is full (or on an error, reported above).
            let Some(last) = runs.last().filter(|_| runs.len() == self.scan.len()) else {
                return Ok(());
            };
            // Go on after the last run reported. `walk_end` alone does not say where:
            // Linux leaves it where its internal 512-entry buffer last filled, even when
            // the walk then went on further (measured on 6.18), and scanning again from
            // there would report pages rewritten since twice, out of order.
            cursor = scanned.walk_end.max(last.end);
            if cursor >= self.end {
                return Ok(());
            }
        }
    }
}

/// How a region's writes are tracked, which decides how a checkpoint's pages are kept
/// safe from later writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PageSafety {
    /// Asynchronous write-protect tracking ([`DirtyTracker`]); the replication loop
    /// copies the dirty pages during the pause (Remus).
    #[default]
    Copy,
    /// Synchronous write-protect tracking ([`CowTracker`] in [`CowMode::Record`]); the
    /// pause only protects the dirty pages and they are copied after the program
    /// resumes, each before its first write (needs root, `CAP_SYS_PTRACE` or
    /// `vm.unprivileged_userfaultfd=1`).
    CopyOnWrite,
}

impl std::str::FromStr for PageSafety {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "copy" => Ok(PageSafety::Copy),
            "cow" => Ok(PageSafety::CopyOnWrite),
            _ => Err(format!("unknown pause {s:?}: use copy or cow")),
        }
    }
}

/// Kernel dirty tracking of a whole region, as [`PageSafety`] asks.
pub enum RegionTracker {
    /// [`PageSafety::Copy`].
    Async(DirtyTracker),
    /// [`PageSafety::CopyOnWrite`].
    CopyOnWrite(CowTracker),
}

impl RegionTracker {
    /// Checks that this kernel can track memory with `backing` as `safety` asks.
    pub fn probe(safety: PageSafety, backing: Backing) -> Result<(), HypError> {
        match safety {
            PageSafety::Copy => DirtyTracker::probe()?,
            PageSafety::CopyOnWrite => CowTracker::probe(backing)?,
        }
        Ok(())
    }

    /// Tracks the whole of `region`: the first harvest reports the pages written
    /// after this call.
    ///
    /// # Safety
    ///
    /// With [`PageSafety::CopyOnWrite`] the tracker reads the region: it must stay
    /// mapped until the tracker, and every snapshot armed with it, are dropped.
    pub unsafe fn new(region: &mut Region, safety: PageSafety) -> Result<Self, HypError> {
        Ok(match safety {
            PageSafety::Copy => Self::Async(DirtyTracker::new(region)?),
            // SAFETY: the region is private anonymous memory, aligned to its page
            // size, which the caller keeps mapped as long as the tracker needs it.
            PageSafety::CopyOnWrite => Self::CopyOnWrite(unsafe {
                CowTracker::new(
                    region.as_mut_ptr(),
                    region.len(),
                    region.backing(),
                    CowMode::Record,
                    // A coarser granule would count whole granules as written.
                    Granule::MIN,
                )
            }?),
        })
    }

    /// Appends the pages written since the last harvest (in increasing order) and
    /// tracks anew.
    pub fn harvest(&mut self, dirty: &mut Vec<u64>) -> Result<(), HypError> {
        match self {
            Self::Async(tracker) => tracker.harvest(dirty)?,
            Self::CopyOnWrite(tracker) => tracker.harvest(dirty)?,
        }
        Ok(())
    }

    /// The copy-on-write tracker, with [`PageSafety::CopyOnWrite`].
    pub fn copy_on_write(&self) -> Option<&CowTracker> {
        match self {
            Self::Async(_) => None,
            Self::CopyOnWrite(tracker) => Some(tracker),
        }
    }
}

/// The userfaultfd features to ask for on memory with `backing`, after checking that
/// the kernel has them and `PAGEMAP_SCAN`.
fn features_for(backing: Backing) -> Result<u64, TrackingError> {
    let features = wp_features(Faults::UserOnly, backing, true)?;
    let pagemap = Pagemap::open().map_err(|source| TrackingError::Kernel {
        what: "open /proc/self/pagemap",
        source,
    })?;
    match pagemap.supports_scan() {
        Ok(true) => Ok(features),
        Ok(false) => Err(TrackingError::NoPagemapScan),
        Err(source) => Err(TrackingError::Kernel {
            what: "probe the PAGEMAP_SCAN ioctl",
            source,
        }),
    }
}

/// The userfaultfd features write-protecting memory with `backing` needs, in
/// asynchronous mode or not, after checking that a descriptor handling `faults` can be
/// created and has them.
pub(crate) fn wp_features(
    faults: Faults,
    backing: Backing,
    asynchronous: bool,
) -> Result<u64, TrackingError> {
    let supported = uffd::supported_features(faults).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => TrackingError::NoUserfaultfd(e),
        Some(libc::EPERM | libc::EACCES) => TrackingError::PermissionDenied(e),
        _ => TrackingError::Kernel {
            what: "create a userfaultfd",
            source: e,
        },
    })?;
    let mut needed = vec![(uffd::FEATURE_WP_UNPOPULATED, "UFFD_FEATURE_WP_UNPOPULATED")];
    if asynchronous {
        needed.push((uffd::FEATURE_WP_ASYNC, "UFFD_FEATURE_WP_ASYNC"));
    }
    if backing == Backing::Hugetlb {
        needed.push((
            uffd::FEATURE_WP_HUGETLBFS_SHMEM,
            "UFFD_FEATURE_WP_HUGETLBFS_SHMEM",
        ));
    }
    let missing: Vec<&str> = needed
        .iter()
        .filter(|&&(bit, _)| supported & bit == 0)
        .map(|&(_, name)| name)
        .collect();
    if !missing.is_empty() {
        return Err(TrackingError::MissingFeatures {
            missing: missing.join(" and "),
        });
    }
    Ok(needed.iter().fold(0, |all, &(bit, _)| all | bit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_harvest_that_fills_the_output_vector_goes_on_where_it_stopped() {
        if !crate::feature::available("kernel dirty tracking", DirtyTracker::probe()) {
            return;
        }
        let pages = 2048;
        let mut region = Region::new(pages * PAGE).unwrap();
        let mut tracker = DirtyTracker::new(&region).unwrap();
        // 600 runs (more than the kernel's internal 512-entry buffer), the last one
        // ending at the end of the range, and a 10-page run spanning two huge pages.
        let mut written: Vec<u64> = (0..600).map(|i| i * 3).collect();
        written.extend(506..516);
        written.push(pages as u64 - 1);
        written.sort_unstable();
        written.dedup();
        for vector in [1, 2, 3, 7, 512, 600, 601, SCAN_VECTOR] {
            tracker.scan.truncate(vector);
            for &p in &written {
                region[p as usize * PAGE] = 1;
            }
            let mut dirty = Vec::new();
            tracker.harvest(&mut dirty).unwrap();
            assert_eq!(dirty, written, "output vector of {vector} entries");
            tracker.scan.resize(SCAN_VECTOR, PageRegion::default());
        }
    }
}
