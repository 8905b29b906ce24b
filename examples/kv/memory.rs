//! The bytes the store lives in: a protected region reached through a raw pointer, a
//! replica handed over by a backup, or an ordinary heap buffer when protection is
//! off. This is the only unsafe code of the key-value service; everything above it
//! sees a `&[u8]` or `&mut [u8]`.

use fgbi::restart::Restart;
use fgbi_hyp::process::ProcessHandle;

/// The store's memory, handed out as byte slices.
pub enum StoreMemory {
    /// Region `0` of a protected process: written by connection threads between
    /// safepoints, read by the epoch thread while they are parked.
    Protected {
        /// Keeps the mapping alive.
        _mapping: ProcessHandle,
        /// Start of the region.
        base: *mut u8,
        /// Length of the region.
        len: usize,
    },
    /// Region `0` of the replica a backup handed over at failover.
    Restored(Restart),
    /// Unprotected memory, for comparison runs.
    Heap(Box<[u8]>),
}

// SAFETY: the pointer of `Protected` addresses a mapping owned by `_mapping`, which is
// Send and Sync and keeps the mapping alive; the slices made from it are only handed
// out through `&self` / `&mut self`, so Rust's borrow rules on `StoreMemory` (kept
// behind the server's mutex) order every access made by the application's threads.
unsafe impl Send for StoreMemory {}

impl StoreMemory {
    /// The first region of `handle`, which must exist.
    pub fn protected(handle: ProcessHandle) -> Option<Self> {
        let (base, len) = handle.region(0)?;
        Some(Self::Protected {
            _mapping: handle,
            base,
            len,
        })
    }

    /// Region `0` of a replica handed over, which must exist.
    pub fn restored(restart: Restart) -> Option<Self> {
        restart.region(0)?;
        Some(Self::Restored(restart))
    }

    /// `len` zeroed bytes on the heap.
    pub fn heap(len: usize) -> Self {
        Self::Heap(vec![0; len].into_boxed_slice())
    }
}

impl AsRef<[u8]> for StoreMemory {
    fn as_ref(&self) -> &[u8] {
        match self {
            // SAFETY: `base..base + len` is region 0 of the live mapping `_mapping` keeps
            // (ProcessHandle::region), zero-filled at creation so every byte is
            // initialised. The only concurrent reader is the epoch thread, which reads
            // only while every registered thread is parked at a safepoint, and threads
            // park only after the server has dropped its borrow of this memory.
            Self::Protected { base, len, .. } => unsafe { std::slice::from_raw_parts(*base, *len) },
            // Checked to exist by `restored`.
            Self::Restored(restart) => restart.region(0).unwrap_or_default(),
            Self::Heap(bytes) => bytes,
        }
    }
}

impl AsMut<[u8]> for StoreMemory {
    fn as_mut(&mut self) -> &mut [u8] {
        match self {
            // SAFETY: as for `as_ref`; `&mut self` makes this the only slice of the
            // region alive in the application, and the epoch thread does not read
            // while it is alive (see above).
            Self::Protected { base, len, .. } => unsafe {
                std::slice::from_raw_parts_mut(*base, *len)
            },
            Self::Restored(restart) => restart.region_mut(0).unwrap_or_default(),
            Self::Heap(bytes) => bytes,
        }
    }
}
