//! What the replication tests share: a key file, a listener, matching encoder and
//! transport settings, and a backup served by hand on a thread.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use fgbi::primary::{DEFAULT_SCRUB_EVERY, PrimaryEvent, PrimaryOptions};
use fgbi_engine::{Applier, EncoderConfig, Geometry, Mode};
use fgbi_hyp::memory::Region;
use fgbi_transport::{Backup, Implementation, PresharedKey, ReceiveRegion, TransportConfig};

/// A primary's and a backup's matching settings, with a key file in a directory of
/// their own (removed on drop).
pub struct Pair {
    pub dir: PathBuf,
    pub key_path: PathBuf,
    pub encoder: EncoderConfig,
    pub transport: TransportConfig,
    pub listener: Option<TcpListener>,
    pub address: SocketAddr,
}

impl Pair {
    /// `mem` bytes of 64-byte blocks in fgbi mode with a `cache` byte page cache,
    /// over `implementation`; `name` keeps concurrent tests' directories apart.
    pub fn new(name: &str, mem: usize, cache: usize, implementation: Implementation) -> Self {
        let dir = std::env::temp_dir().join(format!("fgbi-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key_path = dir.join("link.key");
        write_key(&key_path, b"0123456789abcdef0123456789abcdef");
        let geometry = Geometry::new(mem as u64, 64).unwrap();
        let mut encoder = EncoderConfig::new(geometry, Mode::Fgbi);
        encoder.cache_bytes = cache;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        Self {
            dir,
            key_path,
            encoder,
            transport: TransportConfig::new(geometry, implementation),
            address: listener.local_addr().unwrap(),
            listener: Some(listener),
        }
    }

    /// A primary of this pair that stops after `epochs` committed epochs: 5 ms
    /// epochs, checkpoint digests, the default scrub, initial sync by pre-copy.
    pub fn primary_options(&self, epochs: u64) -> PrimaryOptions {
        PrimaryOptions {
            encoder: self.encoder.clone(),
            transport: self.transport.clone(),
            backup: self.address,
            epoch: Duration::from_millis(5),
            epochs: Some(epochs),
            connect_timeout: Duration::from_secs(5),
            digests: true,
            scrub_every: DEFAULT_SCRUB_EVERY,
            pre_copy: true,
        }
    }

    /// The key both sides share.
    pub fn key(&self) -> PresharedKey {
        PresharedKey::from_file(&self.key_path).unwrap()
    }

    /// A key neither side holds: what a stranger or a misconfigured host presents.
    pub fn other_key(&self) -> PresharedKey {
        let path = self.dir.join("other.key");
        write_key(&path, b"another key of thirty-two bytes!");
        PresharedKey::from_file(&path).unwrap()
    }

    /// Accepts one primary on a thread and serves it by hand ([`serve_by_hand`]).
    pub fn serve_by_hand<T: Send + 'static>(
        &mut self,
        serve: impl FnOnce(Backup<'_>, &mut Applier, &mut Region) -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let listener = self.listener.take().expect("one backup per pair");
        let (encoder, transport, key) = (self.encoder.clone(), self.transport.clone(), self.key());
        std::thread::spawn(move || serve_by_hand(&listener, &encoder, &transport, &key, serve))
    }
}

/// Writes `key` into an owner-only key file at `path`.
fn write_key(path: &Path, key: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap()
        .write_all(key)
        .unwrap();
}

/// The epoch and checkpoint digest a `Sent` event carries, when digests are taken:
/// what tests collect to compare a replica with the checkpoint it should equal.
pub fn sent_digest(event: &PrimaryEvent) -> Option<(u64, u128)> {
    match *event {
        PrimaryEvent::Sent {
            epoch,
            digest: Some(digest),
            ..
        } => Some((epoch, digest)),
        _ => None,
    }
}

/// Accepts one primary on `listener`, with two receive slots and an empty replica,
/// and hands the connection, applier and replica to `serve`.
pub fn serve_by_hand<T>(
    listener: &TcpListener,
    encoder: &EncoderConfig,
    transport: &TransportConfig,
    key: &PresharedKey,
    serve: impl FnOnce(Backup<'_>, &mut Applier, &mut Region) -> T,
) -> T {
    let geometry = encoder.geometry;
    let pages = geometry.pages() as usize;
    let mut region = ReceiveRegion::for_epochs(encoder, pages, 4096, 2).unwrap();
    let (stream, _) = listener.accept().unwrap();
    let mut applier = Applier::new(geometry);
    let mut replica = Region::new(geometry.mem_bytes() as usize).unwrap();
    let link = Backup::accept(stream, &mut region, transport, key, 0).unwrap();
    serve(link, &mut applier, &mut replica)
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
