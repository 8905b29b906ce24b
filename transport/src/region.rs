//! The backup's receive region: a ring of epoch slots on 2 MiB pages.
//!
//! Epoch `n` lands in slot `n mod slots`. A slot holds the largest epoch the backup
//! accepts ([`fgbi_engine::EncoderConfig::max_epoch_bytes`] for its per-epoch page
//! limit); the primary refuses a larger epoch before sending a byte of it, and the
//! backup refuses a larger declared length before reading one.
//!
//! After the slots, the region holds one [`RECORD_BYTES`] commit record per slot:
//! the RDMA implementation's primary writes an epoch's number and length there with
//! the write that commits it (the TCP implementations send them as control
//! messages instead).

use std::ops::Range;

use fgbi_engine::EncoderConfig;
use fgbi_hyp::memory::{Backing, HUGE_PAGE, Region};

use crate::error::TransportError;

/// Most slots a region may have.
pub const MAX_SLOTS: usize = 1024;

/// Largest slot, in bytes (16 GiB).
pub const MAX_SLOT_BYTES: usize = 16 << 30;

/// Bytes of a slot's commit record (an EPOCH control message).
pub const RECORD_BYTES: usize = crate::control::CONTROL_BYTES;

const PAGE: usize = 4096;

/// The memory epochs are received into.
pub struct ReceiveRegion {
    memory: Region,
    slots: usize,
    slot_bytes: usize,
}

impl ReceiveRegion {
    /// Maps `slots` slots of `slot_bytes` each (rounded up to whole 4 KiB pages; the
    /// whole region to whole 2 MiB pages), populated up front.
    pub fn new(slots: usize, slot_bytes: usize) -> Result<Self, TransportError> {
        let bad = TransportError::RegionSize { slots, slot_bytes };
        if slots == 0 || slots > MAX_SLOTS || slot_bytes == 0 || slot_bytes > MAX_SLOT_BYTES {
            return Err(bad);
        }
        let slot_bytes = slot_bytes.next_multiple_of(PAGE);
        let len = slots
            .checked_mul(slot_bytes)
            .and_then(|n| n.checked_add((slots * RECORD_BYTES).next_multiple_of(PAGE)))
            .and_then(|n| n.checked_next_multiple_of(HUGE_PAGE))
            .ok_or(bad)?;
        Ok(Self {
            memory: Region::new(len)?,
            slots,
            slot_bytes,
        })
    }

    /// A region whose slots hold any epoch of up to `max_pages` dirty pages (at most
    /// the memory's) and a state blob of up to `max_state_bytes`, encoded with
    /// `config` (use the primary's settings: chunk size and workers change the bound).
    pub fn for_epochs(
        config: &EncoderConfig,
        max_pages: usize,
        max_state_bytes: usize,
        slots: usize,
    ) -> Result<Self, TransportError> {
        let pages = max_pages.min(usize::try_from(config.geometry.pages()).unwrap_or(usize::MAX));
        Self::new(slots, config.max_epoch_bytes(pages, max_state_bytes))
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Bytes per slot: the largest epoch accepted.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// What backs the region (hugetlb, transparent huge pages, or 4 KiB pages).
    pub fn backing(&self) -> Backing {
        self.memory.backing()
    }

    /// Where epoch `epoch` of `len` bytes lands (the caller checked `len`).
    pub(crate) fn range(&self, epoch: u64, len: usize) -> Range<usize> {
        let start = (epoch % self.slots as u64) as usize * self.slot_bytes;
        start..start + len
    }

    /// The slots' bytes.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.memory[..self.slots * self.slot_bytes]
    }

    /// The slots' bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.memory[..self.slots * self.slot_bytes]
    }

    /// The slots and their commit records (which start at [`ReceiveRegion::records_at`]).
    pub(crate) fn ring_mut(&mut self) -> &mut [u8] {
        &mut self.memory[..self.slots * (self.slot_bytes + RECORD_BYTES)]
    }

    /// Offset of slot 0's commit record in [`ReceiveRegion::ring_mut`].
    pub(crate) fn records_at(&self) -> usize {
        self.slots * self.slot_bytes
    }
}

#[cfg(test)]
mod tests {
    use fgbi_engine::{Geometry, Mode};

    use super::*;

    #[test]
    fn slots_are_rounded_to_pages_and_sized_from_the_encoder_bound() {
        let mut region = ReceiveRegion::new(3, 5000).unwrap();
        assert_eq!(region.slot_bytes(), 8192);
        assert_eq!(region.range(4, 100), 8192..8292);
        assert_eq!(region.bytes().len(), 3 * 8192);
        assert_eq!(region.records_at(), 3 * 8192);
        assert_eq!(region.ring_mut().len(), 3 * 8192 + 3 * RECORD_BYTES);
        let config = EncoderConfig::new(Geometry::new(16 << 20, 64).unwrap(), Mode::Fgbi);
        let region = ReceiveRegion::for_epochs(&config, 100, 64, 2).unwrap();
        assert!(region.slot_bytes() >= config.max_epoch_bytes(100, 64));
        assert!(matches!(
            ReceiveRegion::new(0, 4096),
            Err(TransportError::RegionSize { .. })
        ));
        assert!(matches!(
            ReceiveRegion::new(2, MAX_SLOT_BYTES + 1),
            Err(TransportError::RegionSize { .. })
        ));
    }
}
