//! The FGBI engine: pure, deterministic computation, no I/O.
//!
//! Data flows one way. On the primary, [`Encoder::encode`] takes one checkpoint's
//! dirty pages and, on its [`worker`]s, re-hashes their blocks against the
//! [`digest`] table, shares blocks already sent in the epoch ([`sharing`]), picks the
//! cheapest encoding (changed blocks, [`runs`] against the [`page_cache`], lz4, whole
//! page) and writes [`wire`] frames. On the backup, [`Applier::apply`] validates a
//! whole epoch and only then applies it. Epochs are transactions: the encoder's state
//! moves forward only when the backup acknowledges.

pub mod apply;
pub mod config;
pub mod digest;
pub mod encoder;
pub mod error;
pub mod geometry;
pub mod page_cache;
pub mod runs;
pub mod sharing;
pub mod source;
pub mod stats;
pub mod threads;
pub mod wire;
pub mod worker;

pub use apply::{AppliedEpoch, Applier};
pub use config::{EncoderConfig, Mode};
pub use digest::memory_digest;
pub use encoder::{EncodedEpoch, Encoder, EpochStats};
pub use error::{ApplyError, EncodeError, GeometryError};
pub use geometry::{DEFAULT_BLOCK_SIZE, Geometry, PAGE_SIZE};
pub use source::PageSource;
pub use stats::EncodingCounts;
