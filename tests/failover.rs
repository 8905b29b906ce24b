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
use fgbi_hyp::memory::Region;
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
        if !fgbi_hyp::feature::available(implementation.as_str(), implementation.available()) {
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
            digest: true,
            fence: Default::default(),
            metrics: None,
        };
        let backup_key = PresharedKey::from_file(&key_path).unwrap();
        let backup = std::thread::spawn(move || {
            backup::run(
                &listener,
                &backup_options,
                &backup_key,
                Region::new(mem).unwrap(),
                |replica, state, _| SyntheticMachine::restore(replica, state, Tracking::Kernel),
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
            scrub_every: primary::DEFAULT_SCRUB_EVERY,
            pre_copy: true,
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
            report.digest,
            digests.get(&12).copied(),
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

#[test]
fn a_backup_that_dies_and_comes_back_empty_is_resynced_while_the_program_runs() {
    use fgbi_engine::Applier;
    use fgbi_transport::{Backup, ReceiveRegion};

    let dir = std::env::temp_dir().join(format!("fgbi-resync-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_path = key_file(&dir);
    let mem = 8usize << 20;
    let geometry = Geometry::new(mem as u64, 64).unwrap();
    let mut encoder = EncoderConfig::new(geometry, Mode::Fgbi);
    encoder.cache_bytes = 1 << 20;
    let transport = TransportConfig::new(geometry, Implementation::Std);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (backup_encoder, backup_transport) = (encoder.clone(), transport.clone());
    let backup_key = PresharedKey::from_file(&key_path).unwrap();
    let backup = std::thread::spawn(move || {
        // The first backup commits five epochs, then dies.
        {
            let pages = geometry.pages() as usize;
            let mut region = ReceiveRegion::for_epochs(&backup_encoder, pages, 4096, 2).unwrap();
            let (stream, _) = listener.accept().unwrap();
            let mut applier = Applier::new(geometry);
            let mut replica = Region::new(mem).unwrap();
            let mut link =
                Backup::accept(stream, &mut region, &backup_transport, &backup_key, 0).unwrap();
            for _ in 0..5 {
                link.serve_one(&mut applier, &mut replica).unwrap();
            }
        }
        // A new, empty backup takes its place.
        let options = BackupOptions {
            encoder: backup_encoder,
            transport: backup_transport,
            slots: 2,
            max_state: 4096,
            digest: true,
            fence: Default::default(),
            metrics: None,
        };
        backup::run(
            &listener,
            &options,
            &backup_key,
            Region::new(mem).unwrap(),
            |replica, state, _| SyntheticMachine::restore(replica, state, Tracking::Kernel),
            |machine| machine.run(),
            |_| {},
        )
    });
    let key = PresharedKey::from_file(&key_path).unwrap();
    let mut machine = SyntheticMachine::new("sys", mem, 4, Tracking::Kernel, false).unwrap();
    let options = PrimaryOptions {
        encoder,
        transport,
        backup: address,
        epoch: Duration::from_millis(5),
        epochs: Some(15),
        connect_timeout: Duration::from_secs(5),
        digests: true,
        scrub_every: primary::DEFAULT_SCRUB_EVERY,
        pre_copy: true,
    };
    let (mut digests, mut unprotected, mut connections) = (std::collections::HashMap::new(), 0, 0);
    primary::run(
        &mut machine,
        |m| m.run().map_err(Into::into),
        &options,
        &key,
        |e| match e {
            PrimaryEvent::Sent {
                epoch,
                digest: Some(d),
                ..
            } => {
                digests.insert(epoch, d);
            }
            PrimaryEvent::Unprotected { .. } => unprotected += 1,
            PrimaryEvent::Connected(_) => connections += 1,
            _ => {}
        },
    )
    .unwrap();
    assert!(unprotected >= 1, "the first backup's death was noticed");
    assert_eq!(connections, 2, "the primary reconnected");
    let (report, restored) = backup.join().unwrap().unwrap();
    assert_eq!(report.epoch, 15);
    assert_eq!(
        report.digest,
        digests.get(&15).copied(),
        "the re-synced replica = checkpoint 15"
    );
    machine.run().unwrap();
    assert_eq!(
        memory_digest(restored.memory()),
        memory_digest(machine.memory())
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
