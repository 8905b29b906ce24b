//! Copy-on-write snapshots of protected memory: the pause write-protects a
//! checkpoint's pages and lets the program run at once; a page is copied out before
//! the program's first write to it, or by the replication loop, whichever comes first.
//!
//! A Remus-style pause copies every dirty page while the program is stopped, so the
//! pause grows with the dirty set (about 0.4 ms per 1,000 pages on this machine kind,
//! tens of milliseconds for a dense writer). With a [`CowTracker`] the pause only
//! write-protects the pages ([`CowTracker::arm`]); after the program resumes,
//! [`Armed::finish`] copies them out while a handler thread serves the program's
//! write faults: a write to a page not yet copied blocks until the handler has copied
//! it, then proceeds. This is QEMU's background snapshot, per epoch.
//!
//! Memory is copied and unprotected in [`Granule`]s (4 KiB to 2 MiB, aligned): a
//! write fault copies every armed page of its granule and lifts the granule's
//! protection with one call, and the copier lifts each granule's protection as soon
//! as it has copied its pages, so a writer faults only on granules the copier has
//! not reached. Coarser granules mean fewer faults and protection calls and keep
//! transparent huge pages whole; finer ones make a fault wait for less copying.
//! [`Granule::default`] was chosen by measurement (docs/performance.md).
//!
//! The tracker uses a userfaultfd in synchronous write-protect mode that handles
//! faults from kernel mode too, so writes by the kernel on the program's behalf
//! (`read(2)` into the memory, KVM writing guest memory) are caught like the
//! program's own; that needs root, `CAP_SYS_PTRACE` or `vm.unprivileged_userfaultfd=1`.
//!
//! Two modes ([`CowMode`]):
//! - [`CowMode::Record`]: the tracker is also the dirty tracker. Every page stays
//!   write-protected; the first write to a page in an epoch faults, the handler marks
//!   the page dirty and lifts the protection. [`CowTracker::harvest`] reads the
//!   marks at the pause and protects those pages again. This replaces [`crate::tracking::DirtyTracker`] (a range
//!   has one userfaultfd, and the asynchronous mode that tracker uses never lets a
//!   write wait for a copy), at a higher price per first write: a round trip through
//!   the handler thread instead of a fault the kernel resolves itself.
//! - [`CowMode::Snapshot`]: something else tracks dirty pages (KVM's dirty log); only
//!   the granules holding an armed snapshot's pages are protected, and each is
//!   unprotected again once its pages are copied.
//!
//! In [`CowMode::Record`] a fault lifts the protection of its whole granule, so the
//! whole granule counts as written: a granule above 4 KiB enlarges the dirty set of a
//! scattered writer. [`crate::tracking::RegionTracker`] therefore records at 4 KiB.
//!
//! # Limits
//! Writes that do not go through the page tables (device DMA, RDMA into registered
//! memory, io_uring fixed buffers) are not seen, as with dirty tracking. A program
//! that blocks on a write fault while holding a lock the replication loop needs
//! cannot deadlock it: the handler thread takes no lock the program can hold.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::memory::Backing;
use crate::tracking::{TrackingError, wp_features};
use crate::uffd::{Faults, UffdMsg, WpUffd};
use crate::workload::PAGE;

/// A page with no copy pending.
const IDLE: u32 = u32::MAX;
/// Set in a slot while its page is being copied.
const COPYING: u32 = 1 << 31;
/// Fault messages read at once.
const MESSAGES: usize = 64;
/// Runs of written pages closer than this many pages are protected again with one
/// call: one `UFFDIO_WRITEPROTECT` costs about 1.1 µs (its TLB flush), walking a page
/// table entry that needs no change about 21 ns (measured on this machine kind).
const MERGE_GAP: u64 = 32;
/// When one call per merged run would cost more than one call over the whole range
/// (runs × this > pages), the whole range is protected at once.
const CALL_COST_IN_ENTRIES: usize = 50;

/// How a [`CowTracker`] learns which pages were written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CowMode {
    /// The tracker records writes itself (see the [module documentation](self)).
    Record,
    /// Dirty pages come from elsewhere; only armed pages are protected.
    Snapshot,
}

/// Copy-on-write could not be set up, or its handler failed.
#[derive(Debug, Error)]
pub enum CowError {
    /// The kernel's userfaultfd cannot do synchronous write-protect on this memory.
    #[error(transparent)]
    Tracking(#[from] TrackingError),
    /// The memory is not a whole number of pages, or is empty.
    #[error(
        "cannot snapshot {len} bytes copy-on-write: the memory must be a non-empty multiple of \
         4096 bytes (2 MiB on hugetlb)"
    )]
    Range {
        /// Bytes asked for.
        len: usize,
    },
    /// An armed page lies outside the memory or the list is not sorted.
    #[error("page {page} cannot be snapshotted: pages must be sorted, distinct and below {pages}")]
    Page {
        /// The page.
        page: u64,
        /// Pages of memory.
        pages: usize,
    },
    /// A snapshot is already armed.
    #[error("a copy-on-write snapshot is already armed: finish it before arming the next")]
    Busy,
    /// A granule that is not a power of two from 4 KiB to 2 MiB.
    #[error(
        "a copy-on-write granule of {bytes} bytes is not possible: use a power of two from \
         4 KiB to 2 MiB"
    )]
    Granule {
        /// Bytes asked for.
        bytes: usize,
    },
    /// The fault handler failed; protection was lifted so the program keeps running,
    /// and dirty pages may have been missed.
    #[error(
        "the copy-on-write fault handler failed ({0}); protection was lifted so the program \
         keeps running, but its writes since may be unrecorded: re-synchronise the backup \
         with a full copy"
    )]
    Handler(String),
    /// A kernel call failed.
    #[error("cannot {what} ({source}): the kernel refused a call copy-on-write depends on")]
    Kernel {
        /// What was being done.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// The unit in which a [`CowTracker`] copies a snapshot and lifts its protection: a
/// power of two from 4 KiB to 2 MiB, aligned to itself from the start of the
/// memory (see the [module documentation](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Granule {
    /// log2 of the granule's pages.
    shift: u8,
}

impl Granule {
    /// One page, 4 KiB.
    pub const MIN: Granule = Granule { shift: 0 };
    /// A huge page, 2 MiB (the granule hugetlb memory always gets).
    pub const MAX: Granule = Granule { shift: 9 };

    /// The granule of `bytes`, a power of two from 4 KiB to 2 MiB.
    pub fn new(bytes: usize) -> Result<Self, CowError> {
        if bytes.is_power_of_two() && (Self::MIN.bytes()..=Self::MAX.bytes()).contains(&bytes) {
            Ok(Self {
                shift: (bytes / PAGE).trailing_zeros() as u8,
            })
        } else {
            Err(CowError::Granule { bytes })
        }
    }

    /// Its size in bytes.
    pub fn bytes(self) -> usize {
        PAGE << self.shift
    }

    /// Its size in 4 KiB pages.
    pub fn pages(self) -> usize {
        1 << self.shift
    }
}

impl Default for Granule {
    /// 2 MiB: chosen by measurement (docs/performance.md, `cargo bench --bench cow`).
    fn default() -> Self {
        Self::MAX
    }
}

impl std::fmt::Display for Granule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.bytes() {
            b if b >= 1 << 20 => write!(f, "{}M", b >> 20),
            b => write!(f, "{}K", b >> 10),
        }
    }
}

/// What the handler thread did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CowStats {
    /// Write faults served.
    pub faults: u64,
    /// Time the handler spent serving them (copying the faulting granule's pages and
    /// lifting its protection): what faulting writers waited for, besides the wake-up.
    pub serving: Duration,
    /// Pages the handler copied because the program wrote them before the copier.
    pub handler_copies: u64,
    /// Pages the copier ([`Armed::finish`]) copied.
    pub copier_copies: u64,
}

struct Shared {
    uffd: WpUffd,
    /// The memory's first byte.
    base: *mut u8,
    pages: usize,
    mode: CowMode,
    /// Pages per granule.
    granule: usize,
    /// One bit per page written since the last [`CowTracker::harvest`]
    /// ([`CowMode::Record`] only).
    dirty: Vec<AtomicU64>,
    /// Per page: [`IDLE`], or the armed buffer slot awaiting its copy, with
    /// [`COPYING`] set while someone copies it.
    slots: Vec<AtomicU32>,
    /// The armed snapshot's buffer (null when none is armed).
    buffer: AtomicPtr<u8>,
    /// Held by the handler from marking a granule written to lifting its protection,
    /// and by [`CowTracker::harvest`] from taking the marks to protecting the pages
    /// again ([`CowMode::Record`] only). A fault message can be served after a later
    /// harvest (two writers fault on one granule, the first one's serve lifts the
    /// protection, the second message is still queued); without this lock a harvest
    /// could take the mark before that serve lifted the protection it had just set,
    /// and later writes to the granule would go unseen. The program's threads never
    /// take it.
    marking: Mutex<()>,
    failure: Mutex<Option<String>>,
    faults: AtomicU64,
    serving_nanos: AtomicU64,
    handler_copies: AtomicU64,
    copier_copies: AtomicU64,
}

// SAFETY: `base` points into memory the creator of the tracker keeps mapped for the
// tracker's life and every `Armed`'s (the contract of `CowTracker::new`). Through it
// pages are only read while write-protected and claimed by a slot's compare-exchange,
// so no two threads copy the same page and nobody writes it meanwhile; the buffer
// pointer is written only through a claimed slot. Everything else is atomic or locked.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    fn address(&self, page: usize) -> u64 {
        self.base.wrapping_add(page * PAGE).addr() as u64
    }

    fn failed(&self) -> Result<(), CowError> {
        match &*self.failure.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => Err(CowError::Handler(why.clone())),
            None => Ok(()),
        }
    }

    /// Copies `page` into its armed slot if it is pending and nobody else claimed it;
    /// waits for a copy someone else is making. Returns whether this call copied.
    fn copy_if_pending(&self, page: usize) -> bool {
        let slot = &self.slots[page];
        loop {
            let value = slot.load(Ordering::Acquire);
            if value == IDLE {
                return false;
            }
            if value & COPYING != 0 {
                std::hint::spin_loop();
                continue;
            }
            if slot
                .compare_exchange(value, value | COPYING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                let buffer = self.buffer.load(Ordering::Acquire);
                // SAFETY: a pending slot exists only while a snapshot is armed, whose
                // buffer (`buffer`, non-null, room for `slots * PAGE` bytes) outlives every pending
                // slot: `Armed` waits for all of them to return to IDLE before releasing
                // it. Slot `value` is below the armed page count, so its page lies inside
                // the buffer, and winning the compare-exchange makes this the only copy
                // into it. The source page lies inside the tracked memory (which the
                // creator keeps mapped) and is write-protected until the slot is IDLE.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.base.add(page * PAGE),
                        buffer.add(value as usize * PAGE),
                        PAGE,
                    );
                }
                slot.store(IDLE, Ordering::Release);
                return true;
            }
        }
    }

    /// The granule holding `page`: its pages `first..end`.
    fn granule_of(&self, page: usize) -> (usize, usize) {
        let first = page / self.granule * self.granule;
        (first, (first + self.granule).min(self.pages))
    }

    /// Lifts protection from pages `first..end` and wakes their writers.
    fn unprotect(&self, first: usize, end: usize) -> io::Result<()> {
        self.uffd
            .unprotect(self.address(first), ((end - first) * PAGE) as u64, true)
    }

    /// Serves one write fault at `address`: copies the pending pages of its granule
    /// and lifts the granule's protection (in [`CowMode::Record`] the whole granule
    /// then counts as written, since its next writes go unseen).
    fn serve(&self, address: u64) -> io::Result<()> {
        let started = Instant::now();
        let page_addr = address & !(PAGE as u64 - 1);
        let page = page_addr
            .checked_sub(self.address(0))
            .and_then(|offset| usize::try_from(offset / PAGE as u64).ok())
            .filter(|&p| p < self.pages);
        let result = match page {
            Some(page) => {
                let (first, end) = self.granule_of(page);
                let _marking = (self.mode == CowMode::Record)
                    .then(|| self.marking.lock().unwrap_or_else(|e| e.into_inner()));
                if self.mode == CowMode::Record {
                    for p in first..end {
                        self.dirty[p / 64].fetch_or(1 << (p % 64), Ordering::Release);
                    }
                }
                let copied = (first..end).filter(|&p| self.copy_if_pending(p)).count();
                self.handler_copies
                    .fetch_add(copied as u64, Ordering::Relaxed);
                self.unprotect(first, end)
            }
            None => self.uffd.unprotect(page_addr, PAGE as u64, true),
        };
        self.faults.fetch_add(1, Ordering::Relaxed);
        self.serving_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        result
    }

    /// Protects or unprotects the granules holding `pages` (sorted, distinct), run
    /// by run.
    fn change_granules(&self, pages: &[u64], protect: bool) -> io::Result<()> {
        for (first, end) in granule_runs(pages, self.granule as u64, self.pages as u64) {
            let (first, end) = (first as usize, end as usize);
            if protect {
                self.uffd
                    .write_protect(self.address(first), ((end - first) * PAGE) as u64)?;
            } else {
                self.unprotect(first, end)?;
            }
        }
        Ok(())
    }
}

/// Consecutive runs `(first, end)` of sorted, distinct pages.
fn runs(pages: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    granule_runs(pages, 1, u64::MAX)
}

/// Runs `(first, end)` of consecutive granules of `granule` pages holding sorted,
/// distinct `pages`, ends clipped to `limit`.
fn granule_runs(pages: &[u64], granule: u64, limit: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *pages.get(i)? / granule * granule;
        let mut end = first + granule;
        i += 1;
        while let Some(&page) = pages.get(i) {
            let start = page / granule * granule;
            if start > end {
                break;
            }
            end = start + granule;
            i += 1;
        }
        Some((first, end.min(limit)))
    })
}

/// Joins runs `(first, end)` separated by fewer than `gap` pages.
fn merge(runs: impl Iterator<Item = (u64, u64)>, gap: u64) -> impl Iterator<Item = (u64, u64)> {
    let mut runs = runs.peekable();
    std::iter::from_fn(move || {
        let (first, mut end) = runs.next()?;
        while let Some(&(next, next_end)) = runs.peek() {
            if next - end >= gap {
                break;
            }
            end = next_end;
            runs.next();
        }
        Some((first, end))
    })
}

/// Copy-on-write protection of one memory range, with its fault handler thread (see
/// the [module documentation](self)).
pub struct CowTracker {
    shared: Arc<Shared>,
    stop: EventFd,
    handler: Option<JoinHandle<()>>,
}

impl CowTracker {
    /// Checks that this kernel and this process can snapshot memory with `backing`
    /// copy-on-write, with the error [`new`](Self::new) would give if not.
    pub fn probe(backing: Backing) -> Result<(), CowError> {
        wp_features(Faults::All, backing, false)?;
        Ok(())
    }

    /// Sets up copy-on-write on `len` bytes at `base`, copied and unprotected in
    /// `granule`s (at least 2 MiB on hugetlb), and starts the fault handler. In
    /// [`CowMode::Record`] the whole range is write-protected at once: the first
    /// [`harvest`](Self::harvest) reports the pages written after this call.
    ///
    /// # Safety
    ///
    /// `base..base + len` must be mapped private anonymous, shmem or hugetlbfs memory,
    /// 4 KiB-aligned (2 MiB on hugetlb), and stay mapped and readable until the
    /// tracker and every [`Armed`] it returned are dropped.
    pub unsafe fn new(
        base: *mut u8,
        len: usize,
        backing: Backing,
        mode: CowMode,
        granule: Granule,
    ) -> Result<Self, CowError> {
        if len == 0 || len % PAGE != 0 || base.addr() % PAGE != 0 {
            return Err(CowError::Range { len });
        }
        let features = wp_features(Faults::All, backing, false)?;
        let kernel = |what| move |source| CowError::Kernel { what, source };
        let uffd = WpUffd::open(Faults::All, features)
            .map_err(kernel("open a synchronous write-protect userfaultfd"))?;
        let start = base.addr() as u64;
        uffd.register_wp(start, len as u64)
            .map_err(|e| CowError::Tracking(TrackingError::Register(e)))?;
        if mode == CowMode::Record {
            uffd.write_protect(start, len as u64)
                .map_err(kernel("write-protect the range"))?;
        }
        let pages = len / PAGE;
        let dirty_words = if mode == CowMode::Record {
            pages.div_ceil(64)
        } else {
            0
        };
        let shared = Arc::new(Shared {
            uffd,
            base,
            pages,
            mode,
            granule: match backing {
                Backing::Hugetlb => Granule::MAX.pages(),
                Backing::TransparentHuge | Backing::Base => granule.pages(),
            },
            dirty: (0..dirty_words).map(|_| AtomicU64::new(0)).collect(),
            slots: (0..pages).map(|_| AtomicU32::new(IDLE)).collect(),
            buffer: AtomicPtr::new(std::ptr::null_mut()),
            marking: Mutex::new(()),
            failure: Mutex::new(None),
            faults: AtomicU64::new(0),
            serving_nanos: AtomicU64::new(0),
            handler_copies: AtomicU64::new(0),
            copier_copies: AtomicU64::new(0),
        });
        let stop = EventFd::new(EFD_NONBLOCK).map_err(kernel("create an eventfd"))?;
        let handler_stop = stop.try_clone().map_err(kernel("clone an eventfd"))?;
        let handler_shared = Arc::clone(&shared);
        let handler = std::thread::Builder::new()
            .name("fgbi-cow".into())
            .spawn(move || handle_faults(&handler_shared, &handler_stop))
            .map_err(kernel("start the copy-on-write fault handler"))?;
        Ok(Self {
            shared,
            stop,
            handler: Some(handler),
        })
    }

    /// Appends, in increasing order, the pages written since the last call and
    /// write-protects them again ([`CowMode::Record`]; nothing in
    /// [`CowMode::Snapshot`]). Call while the program is stopped: a write racing with
    /// the harvest is reported by this harvest or the next.
    pub fn harvest(&self, out: &mut Vec<u64>) -> Result<(), CowError> {
        let shared = &self.shared;
        shared.failed()?;
        let _marking = shared.marking.lock().unwrap_or_else(|e| e.into_inner());
        let start = out.len();
        for (w, word) in shared.dirty.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                out.push((w * 64) as u64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        let merged: Vec<(u64, u64)> = merge(runs(&out[start..]), MERGE_GAP).collect();
        let protected = if merged.len().saturating_mul(CALL_COST_IN_ENTRIES) > shared.pages {
            shared
                .uffd
                .write_protect(shared.address(0), (shared.pages * PAGE) as u64)
        } else {
            merged.iter().try_for_each(|&(first, end)| {
                shared
                    .uffd
                    .write_protect(shared.address(first as usize), (end - first) * PAGE as u64)
            })
        };
        protected.map_err(|source| CowError::Kernel {
            what: "write-protect the written pages again",
            source,
        })
    }

    /// Takes `pages` (sorted, distinct) as the snapshot to copy into `buffer` (resized
    /// to hold them, page `pages[i]` at `i * 4096`), write-protecting the granules
    /// holding them in [`CowMode::Snapshot`] (in [`CowMode::Record`] every page not written since the
    /// last harvest is protected already). Call while the program is stopped; let it
    /// run, then [`Armed::finish`].
    pub fn arm(&self, pages: Vec<u64>, mut buffer: Vec<u8>) -> Result<Armed, CowError> {
        let shared = &self.shared;
        shared.failed()?;
        let mut previous = None;
        for &page in &pages {
            if page >= shared.pages as u64 || previous.is_some_and(|p| p >= page) {
                return Err(CowError::Page {
                    page,
                    pages: shared.pages,
                });
            }
            previous = Some(page);
        }
        // Room for every page, not filled: each page is written once, by the copier or
        // the handler, and the length is set only when all are (`Armed::finish`), so
        // the pause does not zero a buffer as large as the copy it avoids.
        buffer.clear();
        buffer.reserve(pages.len() * PAGE);
        if shared
            .buffer
            .compare_exchange(
                std::ptr::null_mut(),
                buffer.as_mut_ptr(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return Err(CowError::Busy);
        }
        for (i, &page) in pages.iter().enumerate() {
            // Slots fit: a buffer of 2^31 pages (8 TiB) cannot be allocated.
            shared.slots[page as usize].store(i as u32, Ordering::Release);
        }
        let armed = Armed {
            shared: Arc::clone(shared),
            pages,
            buffer: Some(buffer),
        };
        if shared.mode == CowMode::Snapshot {
            shared
                .change_granules(&armed.pages, true)
                .map_err(|source| CowError::Kernel {
                    what: "write-protect the snapshot's pages",
                    source,
                })?;
        }
        Ok(armed)
    }

    /// What the handler did so far.
    pub fn stats(&self) -> CowStats {
        CowStats {
            faults: self.shared.faults.load(Ordering::Relaxed),
            serving: Duration::from_nanos(self.shared.serving_nanos.load(Ordering::Relaxed)),
            handler_copies: self.shared.handler_copies.load(Ordering::Relaxed),
            copier_copies: self.shared.copier_copies.load(Ordering::Relaxed),
        }
    }
}

impl Drop for CowTracker {
    fn drop(&mut self) {
        // Lift all protection first, so no writer can block on a handler that is
        // about to exit; then stop the handler.
        let shared = &self.shared;
        let _ = shared
            .uffd
            .unregister(shared.address(0), (shared.pages * PAGE) as u64);
        let _ = self.stop.write(1);
        if let Some(handler) = self.handler.take() {
            let _ = handler.join();
        }
    }
}

/// The handler thread: serves write faults until `stop` is signalled. On a kernel
/// error it records the failure and unregisters the range, so the program never
/// blocks on a fault nobody will serve.
fn handle_faults(shared: &Shared, stop: &EventFd) {
    let mut messages = [UffdMsg::default(); MESSAGES];
    let result = (|| -> io::Result<()> {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: shared.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is an exclusively borrowed array of two `pollfd`s, and the
            // count passed is its length.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if ready < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[1].revents != 0 {
                return Ok(());
            }
            loop {
                let n = shared.uffd.read_faults(&mut messages)?;
                if n == 0 {
                    break;
                }
                for message in &messages[..n] {
                    if let Some(address) = message.write_protect_fault() {
                        shared.serve(address)?;
                    }
                }
            }
        }
    })();
    if let Err(e) = result {
        *shared.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        let _ = shared
            .uffd
            .unregister(shared.address(0), (shared.pages * PAGE) as u64);
    }
}

/// An armed snapshot: its pages are write-protected and copied out before anyone
/// writes them. Dropping it unfinished abandons the copy safely.
pub struct Armed {
    shared: Arc<Shared>,
    pages: Vec<u64>,
    buffer: Option<Vec<u8>>,
}

impl Armed {
    /// The snapshot's pages.
    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    /// Copies every page not yet copied granule by granule, lifting each granule's
    /// protection behind it in [`CowMode::Snapshot`], waits for the handler's copies,
    /// and returns the pages and the buffer holding their contents at the moment of
    /// [`CowTracker::arm`].
    pub fn finish(mut self) -> Result<(Vec<u64>, Vec<u8>), CowError> {
        let swept = self.sweep();
        // After a failed sweep every armed granule's protection is lifted.
        self.release(swept.is_err())?;
        swept.map_err(|source| CowError::Kernel {
            what: "lift a copied granule's write protection",
            source,
        })?;
        let mut buffer = self.buffer.take().unwrap_or_default();
        // SAFETY: `arm` reserved `pages.len() * PAGE` bytes. Every page's slot was
        // pending when armed and only a copy turns a pending slot IDLE while the
        // snapshot is being finished: the sweep claimed every slot the handler had
        // not, and waited for the handler's copies. So every byte below the new length
        // was written by exactly one page copy.
        unsafe { buffer.set_len(self.pages.len() * PAGE) };
        self.shared.failed()?;
        Ok((std::mem::take(&mut self.pages), buffer))
    }

    /// The copier's pass: granule by granule, copies the pages nobody copied yet,
    /// waits for copies in progress, then (in [`CowMode::Snapshot`]) lifts the
    /// granule's protection.
    fn sweep(&self) -> io::Result<()> {
        let shared = &self.shared;
        let mut copied = 0u64;
        let mut rest = &self.pages[..];
        let result = (|| {
            while let Some(&page) = rest.first() {
                let (first, end) = shared.granule_of(page as usize);
                let count = rest.partition_point(|&p| p < end as u64);
                for &page in &rest[..count] {
                    // The page's slot can only be claimed once; the handler may have
                    // won, and then this waits for its copy.
                    if shared.copy_if_pending(page as usize) {
                        copied += 1;
                    }
                }
                rest = &rest[count..];
                if shared.mode == CowMode::Snapshot {
                    shared.unprotect(first, end)?;
                }
            }
            Ok(())
        })();
        shared.copier_copies.fetch_add(copied, Ordering::Relaxed);
        result
    }

    /// Abandons copies not started, waits for those in progress, releases the
    /// buffer and, in [`CowMode::Snapshot`] when `unprotect`, lifts the protection of
    /// the snapshot's granules.
    fn release(&self, unprotect: bool) -> Result<(), CowError> {
        let shared = &self.shared;
        for (i, &page) in self.pages.iter().enumerate() {
            let slot = &shared.slots[page as usize];
            let _ = slot.compare_exchange(i as u32, IDLE, Ordering::AcqRel, Ordering::Acquire);
            while slot.load(Ordering::Acquire) != IDLE {
                std::hint::spin_loop();
            }
        }
        shared.buffer.store(std::ptr::null_mut(), Ordering::Release);
        if unprotect && shared.mode == CowMode::Snapshot {
            shared
                .change_granules(&self.pages, false)
                .map_err(|source| CowError::Kernel {
                    what: "lift the snapshot's write protection",
                    source,
                })?;
        }
        Ok(())
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        if self.buffer.is_some() {
            let _ = self.release(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::memory::Region;

    /// The granules every snapshot test runs at: the finest, a middle one, the
    /// coarsest.
    const GRANULES: [Granule; 3] = [Granule::MIN, Granule { shift: 4 }, Granule::MAX];

    fn tracker(region: &mut Region, mode: CowMode, granule: Granule) -> Option<CowTracker> {
        if !crate::feature::available(
            "copy-on-write snapshots",
            CowTracker::probe(region.backing()),
        ) {
            return None;
        }
        // SAFETY: the region is mapped private anonymous memory that every test keeps
        // alive (declared before the tracker, so dropped after it and its snapshots).
        Some(
            unsafe {
                CowTracker::new(
                    region.as_mut_ptr(),
                    region.len(),
                    region.backing(),
                    mode,
                    granule,
                )
            }
            .unwrap(),
        )
    }

    #[test]
    fn runs_and_merged_runs() {
        let pages = [1, 2, 3, 7, 8, 40, 41, 100];
        let r: Vec<_> = runs(&pages).collect();
        assert_eq!(r, [(1, 4), (7, 9), (40, 42), (100, 101)]);
        let m: Vec<_> = merge(r.iter().copied(), 32).collect();
        assert_eq!(m, [(1, 42), (100, 101)]);
        assert_eq!(runs(&[]).count(), 0);
        // Granules of 4 pages: 1-3, 7 and 8 lie in the adjacent granules 0-12; 40-41
        // in 40-44; 100 in 100-104, clipped to 102.
        let g: Vec<_> = granule_runs(&pages, 4, 102).collect();
        assert_eq!(g, [(0, 12), (40, 44), (100, 102)]);
        assert_eq!(granule_runs(&[0, 511, 512], 512, 1 << 20).count(), 1);
    }

    #[test]
    fn granules_are_powers_of_two_from_4_kib_to_2_mib() {
        for (bytes, shown) in [(4096, "4K"), (65536, "64K"), (2 << 20, "2M")] {
            let granule = Granule::new(bytes).unwrap();
            assert_eq!(
                (granule.bytes(), granule.to_string()),
                (bytes, shown.into())
            );
        }
        assert_eq!(Granule::new(16384).unwrap().pages(), 4);
        for bytes in [0, 2048, 12288, 4 << 20] {
            assert!(
                matches!(Granule::new(bytes), Err(CowError::Granule { bytes: b }) if b == bytes)
            );
        }
    }

    #[test]
    fn record_mode_reports_exactly_the_pages_written() {
        let pages = 1024;
        let mut region = Region::new(pages * PAGE).unwrap();
        let Some(cow) = tracker(&mut region, CowMode::Record, Granule::MIN) else {
            return;
        };
        // Every 11th page (runs merged into one protection call), every 40th (too
        // many calls: the whole range is protected at once), a few far apart.
        for (round, step) in [(0u64, 11u64), (1, 11), (2, 40), (3, 300)] {
            let written: Vec<u64> = (0..pages as u64)
                .filter(|p| (p * 7 + round) % step == 0)
                .collect();
            for &p in &written {
                region[p as usize * PAGE + 100] = round as u8 + 1;
            }
            let mut dirty = Vec::new();
            cow.harvest(&mut dirty).unwrap();
            assert_eq!(dirty, written, "round {round}");
        }
        let mut dirty = Vec::new();
        cow.harvest(&mut dirty).unwrap();
        assert!(dirty.is_empty(), "nothing written since the last harvest");
    }

    #[test]
    fn a_fault_served_after_the_harvest_that_protected_it_again_counts_as_a_write() {
        let mut region = Region::new(16 * PAGE).unwrap();
        let Some(cow) = tracker(&mut region, CowMode::Record, Granule::MIN) else {
            return;
        };
        region[3 * PAGE] = 1;
        let mut dirty = Vec::new();
        cow.harvest(&mut dirty).unwrap();
        assert_eq!(dirty, [3]);
        // A second writer's message for page 3, still queued when the first one's
        // serve lifted the protection, is served only now: it lifts the protection
        // the harvest just set, so the page must count as written in this epoch.
        cow.shared.serve(cow.shared.address(3) + 8).unwrap();
        region[3 * PAGE + 8] = 2;
        dirty.clear();
        cow.harvest(&mut dirty).unwrap();
        assert_eq!(dirty, [3], "a write after a late serve is not lost");
        region[3 * PAGE + 16] = 3;
        dirty.clear();
        cow.harvest(&mut dirty).unwrap();
        assert_eq!(dirty, [3], "and the page is protected again");
    }

    #[test]
    fn a_coarse_granule_records_whole_granules() {
        let mut region = Region::new(64 * PAGE).unwrap();
        let granule = Granule::new(4 * PAGE).unwrap();
        let Some(cow) = tracker(&mut region, CowMode::Record, granule) else {
            return;
        };
        region[5 * PAGE] = 1;
        region[6 * PAGE] = 1;
        region[40 * PAGE] = 1;
        let mut dirty = Vec::new();
        cow.harvest(&mut dirty).unwrap();
        assert_eq!(dirty, [4, 5, 6, 7, 40, 41, 42, 43]);
    }

    /// The snapshot holds every page as it was when armed although a writer rewrites
    /// all of them while the copier runs.
    fn snapshot_survives_concurrent_writes(mode: CowMode, granule: Granule) {
        let pages = 4096;
        let mut region = Region::new(pages * PAGE).unwrap();
        let Some(cow) = tracker(&mut region, mode, granule) else {
            return;
        };
        let base = region.as_mut_ptr().addr();
        let armed_pages: Vec<u64> = (0..pages as u64).filter(|p| p % 3 != 1).collect();
        let mut dirty = Vec::new();
        for epoch in 1..=4u8 {
            for &p in &armed_pages {
                region[p as usize * PAGE..(p as usize + 1) * PAGE].fill(epoch);
            }
            dirty.clear();
            cow.harvest(&mut dirty).unwrap();
            let armed = cow.arm(armed_pages.clone(), Vec::new()).unwrap();
            let started = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&started);
            let order: Vec<u64> = armed_pages.iter().rev().copied().collect();
            let writer = std::thread::spawn(move || {
                flag.store(true, Ordering::Release);
                for p in order {
                    let at = base + p as usize * PAGE;
                    // SAFETY: `at` is inside the region, which outlives this thread (it
                    // is joined below); the test reads it only after the join.
                    unsafe { std::ptr::write_volatile(at as *mut u8, 0xEE) };
                }
            });
            while !started.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
            let (got_pages, buffer) = armed.finish().unwrap();
            writer.join().unwrap();
            assert_eq!(got_pages, armed_pages);
            assert!(
                buffer.iter().all(|&b| b == epoch),
                "epoch {epoch}: a later write leaked into the snapshot"
            );
            for &p in &armed_pages {
                assert_eq!(region[p as usize * PAGE], 0xEE, "the writer's write landed");
            }
        }
        let stats = cow.stats();
        eprintln!(
            "{mode:?} at {granule}: {} faults, {} pages copied by the handler, {} by the copier",
            stats.faults, stats.handler_copies, stats.copier_copies
        );
        assert_eq!(
            stats.handler_copies + stats.copier_copies,
            4 * armed_pages.len() as u64,
            "every armed page copied exactly once"
        );
    }

    #[test]
    fn a_record_snapshot_survives_concurrent_writes_at_every_granule() {
        for granule in GRANULES {
            snapshot_survives_concurrent_writes(CowMode::Record, granule);
        }
    }

    #[test]
    fn a_snapshot_mode_snapshot_survives_concurrent_writes_at_every_granule() {
        for granule in GRANULES {
            snapshot_survives_concurrent_writes(CowMode::Snapshot, granule);
        }
    }

    #[test]
    fn a_kernel_write_into_an_armed_page_is_copied_first() {
        let mut region = Region::new(16 * PAGE).unwrap();
        region[5 * PAGE..6 * PAGE].fill(0x11);
        let Some(cow) = tracker(&mut region, CowMode::Snapshot, Granule::MIN) else {
            return;
        };
        let armed = cow.arm(vec![5], Vec::new()).unwrap();
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe(2) returns.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let message = [0x22u8; 64];
        // SAFETY: writes 64 bytes from `message` to the pipe's write end.
        let sent = unsafe { libc::write(fds[1], message.as_ptr().cast(), 64) };
        assert_eq!(sent, 64);
        // The kernel writes into the protected page on this thread's behalf: the
        // fault goes to the handler, which copies the page before the write lands.
        let target = region[5 * PAGE..].as_mut_ptr();
        // SAFETY: reads 64 bytes into the region, inside page 5.
        assert_eq!(unsafe { libc::read(fds[0], target.cast(), 64) }, 64);
        // SAFETY: both descriptors came from pipe(2) above and are closed once.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        let (_, buffer) = armed.finish().unwrap();
        assert!(
            buffer.iter().all(|&b| b == 0x11),
            "the snapshot predates the read"
        );
        assert!(region[5 * PAGE..5 * PAGE + 64].iter().all(|&b| b == 0x22));
        assert_eq!(cow.stats().handler_copies, 1);
    }

    #[test]
    fn an_abandoned_snapshot_never_blocks_writers_and_bad_arms_are_refused() {
        let mut region = Region::new(64 * PAGE).unwrap();
        let Some(cow) = tracker(&mut region, CowMode::Snapshot, Granule::MAX) else {
            return;
        };
        let armed = cow.arm(vec![1, 2, 3], Vec::new()).unwrap();
        assert!(matches!(cow.arm(vec![9], Vec::new()), Err(CowError::Busy)));
        drop(armed);
        region[2 * PAGE] = 9;
        assert!(matches!(
            cow.arm(vec![3, 2], Vec::new()),
            Err(CowError::Page { page: 2, .. })
        ));
        assert!(matches!(
            cow.arm(vec![64], Vec::new()),
            Err(CowError::Page { page: 64, .. })
        ));
        let (pages, buffer) = cow.arm(vec![2], Vec::new()).unwrap().finish().unwrap();
        assert_eq!((pages, buffer[0]), (vec![2], 9));
        region[2 * PAGE] = 10;
        assert_eq!(region[2 * PAGE], 10);
    }
}
