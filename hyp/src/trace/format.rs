//! The trace file: a versioned, checksummed header, then one lz4-compressed,
//! checksummed record per epoch holding the pages that changed (docs/trace-format.md).

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use thiserror::Error;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::workload::PAGE;

/// First bytes of every trace file.
pub const MAGIC: &[u8; 8] = b"FGBTRACE";

/// The format version this code writes and reads.
pub const VERSION: u32 = 1;

/// Bytes in the header, checksum included.
const HEADER_LEN: usize = 40;

/// Bytes before each record's compressed payload: raw length, compressed length,
/// checksum.
const RECORD_HEAD_LEN: usize = 16;

/// The epoch count of a header the recorder has not finished.
const UNFINISHED: u32 = u32::MAX;

/// A trace file could not be read or written.
#[derive(Debug, Error)]
pub enum TraceError {
    /// The underlying file failed.
    #[error("trace I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The file could not be opened.
    #[error("cannot open trace {path}: {source}")]
    Open {
        /// The path given.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file does not start with the trace magic.
    #[error("not an fgbi trace: the file does not start with {MAGIC:?}")]
    Magic,
    /// The file is from another format version.
    #[error("trace format version {0} is not supported (this fgbi reads version {VERSION})")]
    Version(u32),
    /// The page size is not 4 KiB.
    #[error("trace page size is {0} bytes; only {PAGE}-byte pages are supported")]
    PageSize(u32),
    /// The header's checksum does not match its contents.
    #[error("trace header checksum mismatch: the file is corrupt")]
    HeaderChecksum,
    /// The recorder stopped before it finished the file.
    #[error("the trace was never finished (the recorder was interrupted): record it again")]
    Unfinished,
    /// The file ends inside the header or an epoch record.
    #[error("trace is truncated: it ends inside epoch {epoch} of {epochs}")]
    Truncated {
        /// The epoch being read.
        epoch: u32,
        /// Epochs the header promises.
        epochs: u32,
    },
    /// An epoch record's checksum does not match its contents.
    #[error("trace epoch {0} is corrupt: checksum mismatch")]
    Checksum(u32),
    /// An epoch record is malformed.
    #[error("trace epoch {epoch} is corrupt: {what}")]
    Corrupt {
        /// The epoch.
        epoch: u32,
        /// What is wrong with it.
        what: &'static str,
    },
    /// Bytes follow the last epoch the header promises.
    #[error("trace has bytes after its last epoch: the file is corrupt")]
    Trailing,
    /// A page index lies outside the trace's memory.
    #[error("page {page} is outside the trace's {pages} pages")]
    PageRange {
        /// The page.
        page: u64,
        /// Pages in the trace.
        pages: u64,
    },
}

/// The trace's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Pages of the flat protected memory the trace covers.
    pub pages: u64,
    /// The recording's epoch length, milliseconds.
    pub epoch_ms: u32,
    /// Epochs recorded (epoch 0 is the initial contents).
    pub epochs: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(PAGE as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.pages.to_le_bytes());
        b[24..28].copy_from_slice(&self.epoch_ms.to_le_bytes());
        b[28..32].copy_from_slice(&self.epochs.to_le_bytes());
        let sum = xxh3_64(&b[..32]);
        b[32..].copy_from_slice(&sum.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, TraceError> {
        if &b[..8] != MAGIC {
            return Err(TraceError::Magic);
        }
        if xxh3_64(&b[..32]) != u64_at(b, 32) {
            return Err(TraceError::HeaderChecksum);
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(TraceError::Version(version));
        }
        let page_size = u32_at(b, 12);
        if page_size as usize != PAGE {
            return Err(TraceError::PageSize(page_size));
        }
        let header = Self {
            pages: u64_at(b, 16),
            epoch_ms: u32_at(b, 24),
            epochs: u32_at(b, 28),
        };
        if header.epochs == UNFINISHED {
            return Err(TraceError::Unfinished);
        }
        Ok(header)
    }
}

/// A record's checksum: its compressed bytes, seeded with its two lengths (the first
/// 8 bytes of its head), so a flipped bit anywhere in the record is caught.
fn record_sum(head: &[u8], compressed: &[u8]) -> u64 {
    xxh3_64_with_seed(compressed, u64_at(head, 0))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The pages one epoch changed, each stored whole, in increasing page order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Epoch {
    pages: Vec<u64>,
    data: Vec<u8>,
}

impl Epoch {
    /// An epoch with no changes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds page `page` with contents `bytes`; pages must be added in increasing order.
    pub fn push(&mut self, page: u64, bytes: &[u8; PAGE]) {
        debug_assert!(self.pages.last().is_none_or(|&p| p < page));
        self.pages.push(page);
        self.data.extend_from_slice(bytes);
    }

    /// Number of pages changed.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// True if no page changed.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// The changed pages, in increasing order, with their contents.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.pages.iter().copied().zip(self.data.chunks_exact(PAGE))
    }

    fn raw(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(4 + self.pages.len() * 8 + self.data.len());
        raw.extend_from_slice(&(self.pages.len() as u32).to_le_bytes());
        for page in &self.pages {
            raw.extend_from_slice(&page.to_le_bytes());
        }
        raw.extend_from_slice(&self.data);
        raw
    }

    fn from_raw(raw: &[u8], pages: u64, epoch: u32) -> Result<Self, TraceError> {
        let corrupt = |what| TraceError::Corrupt { epoch, what };
        if raw.len() < 4 {
            return Err(corrupt("record shorter than its page count"));
        }
        let count = u32_at(raw, 0) as usize;
        if raw.len() != 4 + count * (8 + PAGE) {
            return Err(corrupt("record length does not match its page count"));
        }
        let index_end = 4 + count * 8;
        let indices: Vec<u64> = raw[4..index_end]
            .chunks_exact(8)
            .map(|w| u64_at(w, 0))
            .collect();
        if indices.windows(2).any(|w| w[0] >= w[1]) {
            return Err(corrupt("page indices are not strictly increasing"));
        }
        if let Some(&page) = indices.iter().find(|&&p| p >= pages) {
            return Err(TraceError::PageRange { page, pages });
        }
        Ok(Self {
            pages: indices,
            data: raw[index_end..].to_vec(),
        })
    }
}

/// Writes a trace epoch by epoch; [`TraceWriter::finish`] completes the header.
pub struct TraceWriter<W: Write + Seek> {
    out: W,
    epoch_ms: u32,
    epochs: u32,
    pages: u64,
}

impl<W: Write + Seek> TraceWriter<W> {
    /// Starts a trace of epochs `epoch_ms` long in `out`, at its current position 0.
    pub fn new(mut out: W, epoch_ms: u32) -> Result<Self, TraceError> {
        let header = Header {
            pages: 0,
            epoch_ms,
            epochs: UNFINISHED,
        };
        out.write_all(&header.encode())?;
        Ok(Self {
            out,
            epoch_ms,
            epochs: 0,
            pages: 0,
        })
    }

    /// Appends the next epoch's changed pages.
    pub fn write_epoch(&mut self, epoch: &Epoch) -> Result<(), TraceError> {
        if self.epochs == UNFINISHED - 1 {
            return Err(TraceError::Corrupt {
                epoch: self.epochs,
                what: "too many epochs for one trace",
            });
        }
        let raw = epoch.raw();
        let compressed = lz4_flex::block::compress(&raw);
        let raw_len = u32::try_from(raw.len()).map_err(|_| TraceError::Corrupt {
            epoch: self.epochs,
            what: "epoch larger than 4 GiB",
        })?;
        let mut head = [0u8; RECORD_HEAD_LEN];
        head[..4].copy_from_slice(&raw_len.to_le_bytes());
        head[4..8].copy_from_slice(&(compressed.len() as u32).to_le_bytes());
        let sum = record_sum(&head, &compressed);
        head[8..].copy_from_slice(&sum.to_le_bytes());
        self.out.write_all(&head)?;
        self.out.write_all(&compressed)?;
        if let Some(&last) = epoch.pages.last() {
            self.pages = self.pages.max(last + 1);
        }
        self.epochs += 1;
        Ok(())
    }

    /// Epochs written so far.
    pub fn epochs(&self) -> u32 {
        self.epochs
    }

    /// Completes the header with the memory's final size, `pages` (at least every
    /// page written), and returns the output.
    pub fn finish(mut self, pages: u64) -> Result<W, TraceError> {
        if pages < self.pages {
            return Err(TraceError::PageRange {
                page: self.pages - 1,
                pages,
            });
        }
        let header = Header {
            pages,
            epoch_ms: self.epoch_ms,
            epochs: self.epochs,
        };
        self.out.seek(SeekFrom::Start(0))?;
        self.out.write_all(&header.encode())?;
        self.out.seek(SeekFrom::End(0))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// A whole trace, read and checked.
#[derive(Clone, Debug)]
pub struct Trace {
    header: Header,
    epochs: Vec<Epoch>,
}

impl Trace {
    /// Reads and checks the trace at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, TraceError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| TraceError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::read(BufReader::new(file))
    }

    /// Reads and checks a trace from `input`, which must hold nothing after it.
    pub fn read(mut input: impl Read) -> Result<Self, TraceError> {
        let mut head = [0u8; HEADER_LEN];
        read_exact(&mut input, &mut head, 0, 0)?;
        let header = Header::decode(&head)?;
        let max_raw = header
            .pages
            .saturating_mul((8 + PAGE) as u64)
            .saturating_add(4);
        let mut epochs = Vec::new();
        for epoch in 0..header.epochs {
            let mut rh = [0u8; RECORD_HEAD_LEN];
            read_exact(&mut input, &mut rh, epoch, header.epochs)?;
            let raw_len = u32_at(&rh, 0) as usize;
            let compressed_len = u32_at(&rh, 4) as usize;
            if raw_len as u64 > max_raw
                || compressed_len > lz4_flex::block::get_maximum_output_size(raw_len)
            {
                return Err(TraceError::Corrupt {
                    epoch,
                    what: "record length exceeds the trace's memory",
                });
            }
            let mut compressed = vec![0u8; compressed_len];
            read_exact(&mut input, &mut compressed, epoch, header.epochs)?;
            if record_sum(&rh, &compressed) != u64_at(&rh, 8) {
                return Err(TraceError::Checksum(epoch));
            }
            let mut raw = vec![0u8; raw_len];
            match lz4_flex::block::decompress_into(&compressed, &mut raw) {
                Ok(n) if n == raw_len => {}
                _ => {
                    return Err(TraceError::Corrupt {
                        epoch,
                        what: "lz4 data does not decompress to the recorded length",
                    });
                }
            }
            epochs.push(Epoch::from_raw(&raw, header.pages, epoch)?);
        }
        let mut extra = [0u8; 1];
        if input.read(&mut extra)? != 0 {
            return Err(TraceError::Trailing);
        }
        Ok(Self { header, epochs })
    }

    /// The trace's header.
    pub fn header(&self) -> Header {
        self.header
    }

    /// Bytes of flat memory the trace covers.
    pub fn mem_bytes(&self) -> u64 {
        self.header.pages.saturating_mul(PAGE as u64)
    }

    /// The recorded epochs; the first holds the initial contents.
    pub fn epochs(&self) -> &[Epoch] {
        &self.epochs
    }
}

fn read_exact(
    input: &mut impl Read,
    buf: &mut [u8],
    epoch: u32,
    epochs: u32,
) -> Result<(), TraceError> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => TraceError::Truncated { epoch, epochs },
        _ => TraceError::Io(e),
    })
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn page(fill: u8) -> [u8; PAGE] {
        let mut p = [fill; PAGE];
        p[7] = fill.wrapping_mul(3);
        p
    }

    fn sample() -> Vec<u8> {
        let mut w = TraceWriter::new(Cursor::new(Vec::new()), 100).unwrap();
        let mut e0 = Epoch::new();
        e0.push(0, &page(1));
        e0.push(5, &page(2));
        w.write_epoch(&e0).unwrap();
        w.write_epoch(&Epoch::new()).unwrap();
        let mut e2 = Epoch::new();
        e2.push(9, &page(3));
        w.write_epoch(&e2).unwrap();
        w.finish(12).unwrap().into_inner()
    }

    #[test]
    fn a_trace_round_trips() {
        let t = Trace::read(&sample()[..]).unwrap();
        assert_eq!(
            t.header(),
            Header {
                pages: 12,
                epoch_ms: 100,
                epochs: 3
            }
        );
        assert_eq!(t.mem_bytes(), 12 * PAGE as u64);
        let e = t.epochs();
        assert_eq!(e.len(), 3);
        let first: Vec<(u64, &[u8])> = e[0].iter().collect();
        assert_eq!(first, vec![(0, &page(1)[..]), (5, &page(2)[..])]);
        assert!(e[1].is_empty());
        assert_eq!(e[2].iter().next(), Some((9, &page(3)[..])));
    }

    #[test]
    fn every_bit_flip_and_truncation_is_a_clear_error() {
        let good = sample();
        for at in 0..good.len() {
            for bit in [0, 5] {
                let mut bad = good.clone();
                bad[at] ^= 1 << bit;
                assert!(Trace::read(&bad[..]).is_err(), "flip at {at} bit {bit}");
            }
        }
        for len in 0..good.len() {
            let err = Trace::read(&good[..len]).unwrap_err();
            assert!(
                matches!(err, TraceError::Truncated { .. }),
                "cut at {len}: {err}"
            );
        }
        let mut long = good;
        long.push(0);
        assert!(matches!(Trace::read(&long[..]), Err(TraceError::Trailing)));
    }

    #[test]
    fn bad_magic_version_page_size_and_unfinished_files_say_so() {
        let good = sample();
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(matches!(Trace::read(&magic[..]), Err(TraceError::Magic)));
        let reheader = |at: usize, value: u32| {
            let mut b = good.clone();
            b[at..at + 4].copy_from_slice(&value.to_le_bytes());
            let sum = xxh3_64(&b[..32]);
            b[32..40].copy_from_slice(&sum.to_le_bytes());
            Trace::read(&b[..]).unwrap_err()
        };
        assert!(matches!(reheader(8, 2), TraceError::Version(2)));
        assert!(matches!(reheader(12, 8192), TraceError::PageSize(8192)));
        assert!(matches!(reheader(28, UNFINISHED), TraceError::Unfinished));
        let err = reheader(8, 2).to_string();
        assert!(err.contains("version 2"), "{err}");
        assert!(matches!(
            Trace::open("/nonexistent/x.fgbt"),
            Err(TraceError::Open { .. })
        ));
    }

    #[test]
    fn finishing_below_the_highest_page_written_is_refused() {
        let mut w = TraceWriter::new(Cursor::new(Vec::new()), 1).unwrap();
        let mut e = Epoch::new();
        e.push(9, &page(0));
        w.write_epoch(&e).unwrap();
        assert!(matches!(w.finish(9), Err(TraceError::PageRange { .. })));
    }
}
