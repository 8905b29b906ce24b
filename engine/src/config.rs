//! Encoding modes and encoder settings.

use std::fmt;
use std::str::FromStr;

use crate::geometry::{Geometry, PAGE_SIZE};
use crate::page_cache::DEFAULT_CACHE_BYTES;
use crate::wire::{COMMIT_BODY_BYTES, FRAME_HEADER_BYTES, HEADER_BODY_BYTES, MAX_RECORD_BYTES};

/// How dirty pages are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Remus: every dirty page sent whole and raw.
    Remus,
    /// LLM: Remus's encoding (its longer epochs and input replay belong to replication).
    Llm,
    /// QEMU's XBZRLE: run delta against a cached previous copy, else the raw page.
    Xbzrle,
    /// FGBI: changed blocks by digest, sharing, and the cheapest of the hybrid encodings.
    Fgbi,
}

impl Mode {
    /// Every mode, in the order benchmarks print them.
    pub const ALL: [Mode; 4] = [Mode::Remus, Mode::Llm, Mode::Xbzrle, Mode::Fgbi];

    /// The mode's name on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Remus => "remus",
            Mode::Llm => "llm",
            Mode::Xbzrle => "xbzrle",
            Mode::Fgbi => "fgbi",
        }
    }

    /// The mode's byte in the epoch header.
    pub fn wire_id(self) -> u8 {
        match self {
            Mode::Remus => 1,
            Mode::Llm => 2,
            Mode::Xbzrle => 3,
            Mode::Fgbi => 4,
        }
    }

    /// Whether the mode keeps a page cache.
    pub fn uses_cache(self) -> bool {
        matches!(self, Mode::Xbzrle | Mode::Fgbi)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown mode {s:?}: use one of remus, llm, xbzrle, fgbi"))
    }
}

/// Default bytes of page records per pages frame.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// Everything the encoder needs to know before its first epoch.
#[derive(Clone, Debug)]
pub struct EncoderConfig {
    /// Memory and block size.
    pub geometry: Geometry,
    /// Encoding mode.
    pub mode: Mode,
    /// Worker threads; each owns an interleaved stripe of pages.
    pub workers: usize,
    /// Pin worker `i` to core `i` (modulo the cores available).
    pub pin_workers: bool,
    /// Page cache budget in bytes, split evenly across workers (xbzrle and fgbi).
    pub cache_bytes: usize,
    /// Upper bound on a pages frame's body; the transport's chunk size.
    pub chunk_bytes: usize,
    /// fgbi: send changed blocks identical to earlier ones as references.
    pub sharing: bool,
    /// fgbi: consider lz4 encodings.
    pub compression: bool,
}

impl EncoderConfig {
    /// Defaults for `mode` over `geometry`: one worker, 64 MiB cache, sharing and
    /// compression on.
    pub fn new(geometry: Geometry, mode: Mode) -> Self {
        Self {
            geometry,
            mode,
            workers: 1,
            pin_workers: false,
            cache_bytes: DEFAULT_CACHE_BYTES,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            sharing: true,
            compression: true,
        }
    }

    /// Upper bound on the size of an epoch of `pages` dirty pages and a `state_len`
    /// state blob encoded with these settings: what a transport reserves per epoch.
    pub fn max_epoch_bytes(&self, pages: usize, state_len: usize) -> usize {
        let per_chunk = (self.chunk_bytes / MAX_RECORD_BYTES).max(1);
        let chunks = pages.div_ceil(per_chunk) + self.workers;
        2 * FRAME_HEADER_BYTES
            + HEADER_BODY_BYTES
            + chunks * FRAME_HEADER_BYTES
            + pages * MAX_RECORD_BYTES
            + FRAME_HEADER_BYTES
            + state_len
            + COMMIT_BODY_BYTES
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), String> {
        if self.workers == 0 || self.workers > 256 {
            return Err(format!("{} workers requested: use 1 to 256", self.workers));
        }
        if self.chunk_bytes < MAX_RECORD_BYTES + PAGE_SIZE
            || self.chunk_bytes > u32::MAX as usize / 2
        {
            return Err(format!(
                "chunk size {} is out of range: use 8 KiB to 2 GiB",
                self.chunk_bytes
            ));
        }
        Ok(())
    }
}
