//! Counts of what the encoder chose, per epoch and in total.

use std::ops::AddAssign;

/// How often each encoding was chosen, and what block identification found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncodingCounts {
    /// Dirty pages whose blocks all kept their digests: nothing sent.
    pub unchanged: u64,
    /// Pages sent as a zero-page record.
    pub zero_page: u64,
    /// Pages sent whole, raw.
    pub raw_page: u64,
    /// Pages sent whole, lz4-compressed.
    pub lz4_page: u64,
    /// Pages sent as a run delta against their cached previous contents.
    pub runs: u64,
    /// Pages sent as changed blocks with a raw payload.
    pub blocks: u64,
    /// Pages sent as changed blocks with an lz4-compressed payload.
    pub blocks_lz4: u64,
    /// Blocks whose digest changed.
    pub changed_blocks: u64,
    /// Changed blocks that were all zeros.
    pub zero_blocks: u64,
    /// Changed blocks sent as a reference to an identical block sent earlier.
    pub shared_blocks: u64,
    /// Digest matches whose bytes differed (never shared).
    pub collisions: u64,
    /// Pages whose previous contents were in the page cache.
    pub cache_hits: u64,
    /// lz4 compressions attempted.
    pub lz4_attempts: u64,
}

/// The counters of [`EncodingCounts::fields`] that name a page's encoding (one per
/// dirty page); the others count blocks and attempts.
pub const PAGE_ENCODINGS: [&str; 7] = [
    "unchanged",
    "zero_page",
    "raw_page",
    "lz4_page",
    "runs",
    "blocks",
    "blocks_lz4",
];

impl EncodingCounts {
    /// Every counter with its name, for tables and JSON.
    pub fn fields(&self) -> [(&'static str, u64); 13] {
        [
            ("unchanged", self.unchanged),
            ("zero_page", self.zero_page),
            ("raw_page", self.raw_page),
            ("lz4_page", self.lz4_page),
            ("runs", self.runs),
            ("blocks", self.blocks),
            ("blocks_lz4", self.blocks_lz4),
            ("changed_blocks", self.changed_blocks),
            ("zero_blocks", self.zero_blocks),
            ("shared_blocks", self.shared_blocks),
            ("collisions", self.collisions),
            ("cache_hits", self.cache_hits),
            ("lz4_attempts", self.lz4_attempts),
        ]
    }
}

impl AddAssign for EncodingCounts {
    fn add_assign(&mut self, o: Self) {
        self.unchanged += o.unchanged;
        self.zero_page += o.zero_page;
        self.raw_page += o.raw_page;
        self.lz4_page += o.lz4_page;
        self.runs += o.runs;
        self.blocks += o.blocks;
        self.blocks_lz4 += o.blocks_lz4;
        self.changed_blocks += o.changed_blocks;
        self.zero_blocks += o.zero_blocks;
        self.shared_blocks += o.shared_blocks;
        self.collisions += o.collisions;
        self.cache_hits += o.cache_hits;
        self.lz4_attempts += o.lz4_attempts;
    }
}
