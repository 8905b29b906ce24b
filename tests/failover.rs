//! Replication between a primary and a backup over real TCP, then failover: the
//! backup's program continues exactly where the primary's last committed checkpoint
//! stood.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use fgbi::backup::{self, BackupOptions};
use fgbi::primary::{self, PrimaryEvent, PrimaryOptions};
use fgbi_engine::{EncoderConfig, Geometry, Mode, memory_digest};
use fgbi_hyp::protected::Protected;
use fgbi_hyp::synthetic::{SyntheticMachine, Tracking};
use fgbi_transport::{Implementation, PresharedKey, TransportConfig};

fn key_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("link.key");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    file.write_all(b"0123456789abcdef0123456789abcdef").unwrap();
    path
}

#[test]
fn the_backup_takes_over_exactly_where_the_last_committed_checkpoint_stood() {
    let dir = std::env::temp_dir().join(format!("fgbi-failover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_path = key_file(&dir);
    let key = PresharedKey::from_file(&key_path).unwrap();
    for implementation in [Implementation::Std, Implementation::Uring] {
        if implementation.available().is_err() {
            eprintln!("SKIPPED: {} transport unavailable", implementation.as_str());
            continue;
        }
        let mem = 16usize << 20;
        let geometry = Geometry::new(mem as u64, 64).unwrap();
        let mut encoder = EncoderConfig::new(geometry, Mode::Fgbi);
        encoder.cache_bytes = 2 << 20;
        let transport = TransportConfig::new(geometry, implementation);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let backup_options = BackupOptions {
            encoder: encoder.clone(),
            transport: transport.clone(),
            slots: 2,
            max_state: 4096,
        };
        let backup_key = PresharedKey::from_file(&key_path).unwrap();
        let backup = std::thread::spawn(move || {
            backup::run(
                &listener,
                &backup_options,
                &backup_key,
                |replica, state| SyntheticMachine::restore(replica, state, Tracking::Kernel),
                |machine| machine.run(),
                |_| {},
            )
        });

        let mut machine = SyntheticMachine::new("web", mem, 11, Tracking::Kernel, false).unwrap();
        let options = PrimaryOptions {
            encoder,
            transport,
            backup: address,
            epoch: Duration::from_millis(5),
            epochs: Some(12),
            connect_timeout: Duration::from_secs(5),
            digests: true,
        };
        let mut digests = std::collections::HashMap::new();
        let last = primary::run(
            &mut machine,
            |m| m.run().map_err(Into::into),
            &options,
            &key,
            |e| {
                if let PrimaryEvent::Sent {
                    epoch,
                    digest: Some(d),
                    ..
                } = e
                {
                    digests.insert(epoch, d);
                }
            },
        )
        .unwrap();
        assert_eq!(last, 12);
        // The primary dies here: its connection closes.
        let (report, mut restored) = backup.join().unwrap().unwrap();
        assert_eq!(report.epoch, 12, "{}", implementation.as_str());
        assert_eq!(
            Some(&report.digest),
            digests.get(&12),
            "replica = checkpoint 12"
        );
        // The backup's program has run one epoch since the restore; so does the
        // (dead) primary's, from the same checkpoint: they must agree byte for byte.
        machine.run().unwrap();
        assert_eq!(
            memory_digest(restored.memory()),
            memory_digest(machine.memory())
        );
        assert!(restored.epochs() == machine.epochs());
        restored.run().unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
