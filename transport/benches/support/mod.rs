//! A primary and a backup on loopback, for the bench and the latency example.

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fgbi_engine::{Encoder, EncoderConfig, Geometry, Mode};
use fgbi_transport::{
    Backup, Implementation, Liveness, PresharedKey, Primary, ReceiveRegion, Reply, TransportConfig,
};

/// 64 MiB in 64-byte blocks.
pub fn geometry() -> Geometry {
    Geometry::new(64 << 20, 64).unwrap()
}

fn key() -> PresharedKey {
    // Primary and backup threads read their keys at the same time: one file each.
    static FILES: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "fgbi-transport-bench-{}-{}.key",
        std::process::id(),
        FILES.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, [0x42u8; 32]).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = PresharedKey::from_file(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    key
}

/// Remus-encoded epochs of `pages` pseudo-random pages: every byte is sent raw.
pub struct Epochs {
    /// The encoder.
    pub encoder: Encoder,
    /// The protected memory.
    pub memory: Vec<u8>,
    /// The dirty pages of every epoch.
    pub dirty: Vec<u64>,
}

impl Epochs {
    /// Memory whose first `pages` pages hold pseudo-random bytes.
    pub fn new(pages: u64) -> Self {
        let mut memory = vec![0u8; geometry().mem_bytes() as usize];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for word in memory[..pages as usize * 4096].chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        Self {
            encoder: Encoder::new(EncoderConfig::new(geometry(), Mode::Remus)).unwrap(),
            memory,
            dirty: (0..pages).collect(),
        }
    }
}

/// Runs the calling thread on CPU `cpu` only.
pub fn pin(cpu: usize) {
    assert!(cpu < libc::CPU_SETSIZE as usize, "no CPU {cpu}");
    // SAFETY: cpu_set_t is a plain bit array, for which all-zero is the empty set;
    // CPU_SET writes bit `cpu`, inside the set (checked above); `set` is a valid
    // cpu_set_t of the size passed, and pid 0 is the calling thread.
    let res = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(
        res,
        0,
        "cannot pin to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
}

/// Connects a primary to a backup thread that receives every epoch into its region
/// and acknowledges it (without applying it: this measures the transport alone). The
/// backup thread runs on CPU `backup_cpu` only, if given.
pub fn connect(
    implementation: Implementation,
    slot_bytes: usize,
    backup_cpu: Option<usize>,
) -> Primary {
    let mut config = TransportConfig::new(geometry(), implementation);
    config.liveness = Liveness {
        interval: Duration::from_millis(25),
        timeout: Duration::from_secs(2),
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let backup_config = config.clone();
    std::thread::spawn(move || {
        if let Some(cpu) = backup_cpu {
            pin(cpu);
        }
        let (stream, _) = listener.accept().unwrap();
        let mut region = ReceiveRegion::new(2, slot_bytes).unwrap();
        let mut backup = Backup::accept(stream, &mut region, &backup_config, &key(), 0).unwrap();
        while let Ok(received) = backup.recv_epoch() {
            let epoch = received.epoch;
            if backup.ack(epoch).is_err() {
                break;
            }
        }
    });
    Primary::connect(TcpStream::connect(addr).unwrap(), &config, &key()).unwrap()
}

/// Sends `epoch` over `primary` and waits for its acknowledgement.
pub fn round_trip(primary: &mut Primary, epoch: &fgbi_engine::EncodedEpoch<'_>) {
    primary.send_epoch(epoch).unwrap();
    let reply = primary.wait_reply(Duration::from_secs(5)).unwrap();
    assert!(matches!(reply, Reply::Committed(_)));
}
