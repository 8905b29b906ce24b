//! Helpers shared by the transport's integration tests.

#![allow(dead_code)]

pub mod suite;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fgbi_engine::Geometry;
use fgbi_transport::handshake::{MESSAGE_BYTES, Offer, PROTOCOL_VERSION, Role};
use fgbi_transport::rdma::{RdmaReceiver, RdmaWriter};
use fgbi_transport::{
    Implementation, Liveness, PresharedKey, RdmaConfig, ReceiveRegion, TransportConfig,
};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Writes `contents` to a fresh file with permission bits `mode`.
pub fn file_with(contents: &[u8], mode: u32) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("fgbi-transport-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("key{}", NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// A pre-shared key derived from `seed`, read from an owner-only file.
pub fn key(seed: u8) -> PresharedKey {
    let bytes: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(31) ^ seed).collect();
    PresharedKey::from_file(file_with(&bytes, 0o600)).unwrap()
}

/// 16 MiB in 64-byte blocks.
pub fn geometry() -> Geometry {
    Geometry::new(16 << 20, 64).unwrap()
}

/// How a test's primary and backup are connected: the implementation, each side's
/// RDMA device, and the address the backup listens on.
#[derive(Clone, Debug)]
pub struct Link {
    /// The implementation both sides use.
    pub implementation: Implementation,
    /// The primary's RDMA device.
    pub primary_rdma: RdmaConfig,
    /// The backup's RDMA device.
    pub backup_rdma: RdmaConfig,
    /// Where the backup listens.
    pub listen: IpAddr,
}

impl Link {
    /// Both sides on loopback with `implementation`.
    pub fn local(implementation: Implementation) -> Self {
        Self {
            implementation,
            primary_rdma: RdmaConfig::default(),
            backup_rdma: RdmaConfig::default(),
            listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    /// The implementation's name, for messages.
    pub fn name(&self) -> &'static str {
        self.implementation.as_str()
    }

    /// The primary's settings; a peer silent for `timeout_ms` is dead.
    pub fn primary(&self, timeout_ms: u64) -> TransportConfig {
        self.config(timeout_ms, &self.primary_rdma)
    }

    /// The backup's settings; a peer silent for `timeout_ms` is dead.
    pub fn backup(&self, timeout_ms: u64) -> TransportConfig {
        self.config(timeout_ms, &self.backup_rdma)
    }

    fn config(&self, timeout_ms: u64, rdma: &RdmaConfig) -> TransportConfig {
        let mut config = config(self.implementation, timeout_ms);
        config.rdma = rdma.clone();
        if self.implementation == Implementation::Rdma {
            // Opening the device and registering the ring precede the handshake.
            config.handshake_timeout = Duration::from_secs(10);
        }
        config
    }

    /// A listener on a free port of the backup's address.
    pub fn listener(&self) -> TcpListener {
        TcpListener::bind((self.listen, 0)).unwrap()
    }
}

/// The TCP implementations this host can run; says loudly when io_uring is skipped.
pub fn tcp_links() -> Vec<Link> {
    Implementation::TCP
        .into_iter()
        .filter(|imp| fgbi_hyp::feature::available(imp.as_str(), imp.available()))
        .map(Link::local)
        .collect()
}

/// The RDMA link between the devices `FGBI_RDMA_DEVICE_A` (primary) and
/// `FGBI_RDMA_DEVICE_B` (backup, listening on `FGBI_RDMA_ADDR_B`), or both on the
/// first active device over loopback when unset. Empty (and said loudly) where no
/// device is usable, which fails only with `FGBI_RDMA_REQUIRED=1`.
pub fn rdma_links() -> Vec<Link> {
    let device = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
    let listen = std::env::var("FGBI_RDMA_ADDR_B")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let link = Link {
        implementation: Implementation::Rdma,
        primary_rdma: RdmaConfig {
            device: device("FGBI_RDMA_DEVICE_A"),
            ..RdmaConfig::default()
        },
        backup_rdma: RdmaConfig {
            device: device("FGBI_RDMA_DEVICE_B"),
            ..RdmaConfig::default()
        },
        listen,
    };
    let probe = link
        .primary_rdma
        .available()
        .and_then(|()| link.backup_rdma.available());
    if fgbi_hyp::feature::available_if_required(fgbi_hyp::feature::RDMA_REQUIRED, "rdma", probe) {
        vec![link]
    } else {
        Vec::new()
    }
}

/// A primary that ran the handshake (and, on RDMA, connected its queue pair) and
/// then does whatever the test says.
pub struct RawPrimary {
    /// The TCP connection.
    pub stream: TcpStream,
    /// What the backup offered.
    pub backup: Offer,
    /// The RDMA writer, on an RDMA link.
    pub rdma: Option<RdmaWriter>,
}

impl RawPrimary {
    /// Connects to `listener` over `link`.
    pub fn connect(link: &Link, listener: &TcpListener) -> Self {
        let mut stream = connect(listener);
        let backup = fgbi_transport::handshake::connect(
            &mut stream,
            &primary_offer(),
            &key(1),
            Duration::from_secs(2),
        )
        .unwrap();
        let rdma = (link.implementation == Implementation::Rdma)
            .then(|| RdmaWriter::establish(&mut stream, &link.primary(2000), &backup).unwrap());
        Self {
            stream,
            backup,
            rdma,
        }
    }

    /// Starts epoch `epoch` of `bytes` but delivers only its first half, uncommitted.
    pub fn half_epoch(&mut self, epoch: u64, bytes: &[u8]) {
        let half = &bytes[..bytes.len() / 2];
        match &mut self.rdma {
            Some(writer) => writer.write(&[half]).unwrap(),
            None => {
                self.stream
                    .write_all(&control(1, 0, epoch, bytes.len() as u64))
                    .unwrap();
                self.stream.write_all(half).unwrap();
            }
        }
    }

    /// Declares epoch `epoch` of `len` bytes and delivers `payload` as its start.
    pub fn declare(&mut self, epoch: u64, len: u64, payload: &[u8]) {
        match &mut self.rdma {
            Some(writer) => {
                writer.write(&[payload]).unwrap();
                writer
                    .commit(&control(1, 0, epoch, len), epoch as u32)
                    .unwrap();
            }
            None => {
                self.stream.write_all(&control(1, 0, epoch, len)).unwrap();
                self.stream.write_all(payload).unwrap();
            }
        }
    }
}

/// A backup that ran the handshake (and, on RDMA, connected its queue pair) and
/// then says nothing at all.
pub fn silent_backup(link: &Link, listener: TcpListener, until: std::sync::mpsc::Receiver<()>) {
    let (mut stream, _) = listener.accept().unwrap();
    let offer = Offer {
        version: PROTOCOL_VERSION,
        role: Role::Backup,
        mem_bytes: geometry().mem_bytes(),
        block_size: 64,
        slots: 2,
        slot_bytes: full_slot() as u64,
        committed: 0,
    };
    let mut region = ReceiveRegion::new(2, full_slot()).unwrap();
    fgbi_transport::handshake::accept(&mut stream, &offer, &key(1), Duration::from_secs(2))
        .unwrap();
    let _ring = (link.implementation == Implementation::Rdma)
        .then(|| RdmaReceiver::establish(&mut stream, &mut region, &link.backup(2000)).unwrap());
    // Takes the epoch into its socket buffer or ring, then says nothing.
    let _ = until.recv();
}

/// Defines one test per case of [`suite`], each running over every link `$links()`
/// returns.
#[allow(unused_macros)]
macro_rules! cases {
    ($links:path; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                for link in $links() {
                    common::suite::$case(&link);
                }
            }
        )*
    };
}

/// Settings for tests: heartbeats every 10 ms; a peer silent for `timeout_ms` is dead.
pub fn config(implementation: Implementation, timeout_ms: u64) -> TransportConfig {
    let mut config = TransportConfig::new(geometry(), implementation);
    config.liveness = Liveness {
        interval: Duration::from_millis(10),
        timeout: Duration::from_millis(timeout_ms),
    };
    config.handshake_timeout = Duration::from_millis(1000);
    config
}

/// A listener on a free loopback port.
pub fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

/// Connects to `listener`.
pub fn connect(listener: &TcpListener) -> TcpStream {
    TcpStream::connect(listener.local_addr().unwrap()).unwrap()
}

/// The primary's offer for [`geometry`].
pub fn primary_offer() -> Offer {
    Offer {
        version: PROTOCOL_VERSION,
        role: Role::Primary,
        mem_bytes: geometry().mem_bytes(),
        block_size: geometry().block_size() as u32,
        slots: 0,
        slot_bytes: 0,
        committed: 0,
    }
}

/// A control message built from the specification in docs/transport.md.
pub fn control(kind: u8, code: u8, a: u64, b: u64) -> [u8; 32] {
    let mut m = [0u8; 32];
    m[0] = kind;
    m[1] = code;
    m[8..16].copy_from_slice(&a.to_le_bytes());
    m[16..24].copy_from_slice(&b.to_le_bytes());
    let sum = xxh3_64_with_seed(&m[..24], u64::from_le_bytes(*b"FGBTctl1"));
    m[24..].copy_from_slice(&sum.to_le_bytes());
    m
}

/// Bytes in a handshake message.
pub const HANDSHAKE: usize = MESSAGE_BYTES;

/// The protected side of a test: memory, a workload writing into it, and the encoder.
pub struct Protected {
    /// The protected memory.
    pub memory: Vec<u8>,
    /// The primary's encoder.
    pub encoder: fgbi_engine::Encoder,
    workload: Box<dyn fgbi_hyp::workload::Workload>,
    dirty: Vec<u64>,
    populated: bool,
}

impl Protected {
    /// The `web` workload over [`geometry`], seeded with `seed`.
    pub fn web(seed: u64) -> Self {
        let mem = geometry().mem_bytes() as usize;
        Self {
            memory: vec![0; mem],
            encoder: fgbi_engine::Encoder::new(encoder_config()).unwrap(),
            workload: fgbi_hyp::workload::by_name("web", mem, seed).unwrap(),
            dirty: Vec::new(),
            populated: false,
        }
    }

    /// Runs one epoch of the workload (the first populates memory) and encodes it.
    pub fn step(&mut self) -> fgbi_engine::EncodedEpoch<'_> {
        self.dirty.clear();
        if self.populated {
            self.workload.step(&mut self.memory, &mut self.dirty);
        } else {
            self.workload.populate(&mut self.memory, &mut self.dirty);
            self.populated = true;
        }
        self.write_pages(0);
        self.encode()
    }

    /// Writes `pages` pseudo-random pages and encodes them.
    pub fn write_pages(&mut self, pages: u64) {
        let total = geometry().pages();
        for i in 0..pages {
            let page = (self.encoder.next_epoch() * 7919 + i * 104_729) % total;
            let at = page as usize * 4096 + (i as usize * 8) % 4000;
            self.memory[at..at + 8].copy_from_slice(&(page ^ 0x5a5a).to_le_bytes());
            self.dirty.push(page);
        }
    }

    /// Encodes the pages written since the last epoch.
    pub fn encode(&mut self) -> fgbi_engine::EncodedEpoch<'_> {
        let dirty = std::mem::take(&mut self.dirty);
        let epoch = self.encoder.encode(&dirty, &self.memory, b"state").unwrap();
        self.dirty = dirty;
        self.dirty.clear();
        epoch
    }

    /// Digest of the protected memory.
    pub fn digest(&self) -> u128 {
        fgbi_engine::memory_digest(&self.memory)
    }

    /// After connecting: the backup committed `backup` epochs; everything later that
    /// was in flight is lost and will be re-sent.
    pub fn reconcile(&mut self, backup: u64) {
        if backup > self.encoder.committed() {
            self.encoder.acknowledge(backup).unwrap();
        }
        self.encoder.lose_all();
    }
}

/// The encoder settings of every test primary.
pub fn encoder_config() -> fgbi_engine::EncoderConfig {
    fgbi_engine::EncoderConfig::new(geometry(), fgbi_engine::Mode::Fgbi)
}

/// Runs one epoch of `protected` through `primary` and waits for its commit.
pub fn commit_one(primary: &mut fgbi_transport::Primary, protected: &mut Protected) -> u64 {
    let epoch = protected.step();
    let n = epoch.stats.epoch;
    primary.send_epoch(&epoch).unwrap();
    drop(epoch);
    let reply = primary.wait_reply(Duration::from_secs(10)).unwrap();
    assert_eq!(reply, fgbi_transport::Reply::Committed(n));
    protected.encoder.acknowledge(n).unwrap();
    n
}

/// Sends two epochs of `protected` before waiting for either reply (one per receive
/// slot), checks that both are committed in order within `wait`, and acknowledges
/// them.
pub fn commit_two_in_flight(
    primary: &mut fgbi_transport::Primary,
    protected: &mut Protected,
    wait: Duration,
) {
    let first = protected.step();
    let a = first.stats.epoch;
    primary.send_epoch(&first).unwrap();
    drop(first);
    let second = protected.step();
    let b = second.stats.epoch;
    primary.send_epoch(&second).unwrap();
    drop(second);
    for n in [a, b] {
        assert_eq!(
            primary.wait_reply(wait).unwrap(),
            fgbi_transport::Reply::Committed(n)
        );
    }
    protected.encoder.acknowledge(b).unwrap();
}

/// How one connection to a test backup ended.
#[derive(Debug)]
pub struct Ended {
    /// The error that ended it.
    pub error: fgbi_transport::TransportError,
    /// The replica's committed epoch afterwards.
    pub committed: u64,
    /// The replica's digest afterwards.
    pub digest: u128,
    /// Epochs refused during the connection.
    pub refused: Vec<(u64, fgbi_engine::ApplyError)>,
}

impl Ended {
    /// Checks that the primary closed the connection (`context` names the case).
    pub fn assert_peer_closed(&self, context: &str) {
        assert!(
            matches!(self.error, fgbi_transport::TransportError::PeerClosed(_)),
            "{context}: {}",
            self.error
        );
    }
}

/// A backup that serves `connections` connections in turn with a region of `slots`
/// slots of `slot_bytes`, reporting how each ended on the returned channel.
pub fn run_backup(
    listener: TcpListener,
    link: &Link,
    timeout_ms: u64,
    slots: usize,
    slot_bytes: usize,
    connections: usize,
) -> std::sync::mpsc::Receiver<Ended> {
    let (tx, rx) = std::sync::mpsc::channel();
    let config = link.backup(timeout_ms);
    std::thread::spawn(move || {
        let mut region = ReceiveRegion::new(slots, slot_bytes).unwrap();
        let mut replica = vec![0u8; geometry().mem_bytes() as usize];
        let mut applier = fgbi_engine::Applier::new(geometry());
        let key = key(1);
        for _ in 0..connections {
            let (stream, _) = listener.accept().unwrap();
            let mut refused = Vec::new();
            let error = match fgbi_transport::Backup::accept(
                stream,
                &mut region,
                &config,
                &key,
                applier.committed(),
            ) {
                Err(e) => e,
                Ok(mut backup) => loop {
                    match backup.serve_one(&mut applier, &mut replica) {
                        Ok(
                            fgbi_transport::Served::Committed(_)
                            | fgbi_transport::Served::Scrubbed { .. },
                        ) => {}
                        Ok(fgbi_transport::Served::Refused { epoch, error }) => {
                            refused.push((epoch, error))
                        }
                        Err(e) => break e,
                    }
                },
            };
            let ended = Ended {
                error,
                committed: applier.committed(),
                digest: fgbi_engine::memory_digest(&replica),
                refused,
            };
            if tx.send(ended).is_err() {
                return;
            }
        }
    });
    rx
}

/// A slot for any epoch of [`geometry`].
pub fn full_slot() -> usize {
    encoder_config().max_epoch_bytes(geometry().pages() as usize, 64)
}

impl Protected {
    /// Fills `pages` pages with fresh pseudo-random bytes (incompressible), so that
    /// the next epoch carries about `pages` × 4 KiB.
    pub fn scramble_pages(&mut self, pages: u64) {
        let total = geometry().pages();
        let mut x = self
            .encoder
            .next_epoch()
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            | 1;
        for i in 0..pages {
            let page = (self.encoder.next_epoch() * 7919 + i * 104_729) % total;
            let at = page as usize * 4096;
            for word in self.memory[at..at + 4096].chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes());
            }
            self.dirty.push(page);
        }
    }
}
