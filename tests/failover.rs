//! Replication between a primary and a backup over real TCP, then failover: the
//! backup's program continues exactly where the primary's last committed checkpoint
//! stood.

mod common;

use fgbi::backup::{self, BackupOptions};
use std::time::{Duration, Instant};

use fgbi::primary::{self, Link, PrimaryEvent};
use fgbi_engine::memory_digest;
use fgbi_hyp::memory::Region;
use fgbi_hyp::protected::Protected;
use fgbi_hyp::synthetic::{SyntheticMachine, Tracking};
use fgbi_transport::Implementation;

use common::{Pair, sent_digest};

/// The settings of `fgbi backup` for `pair`: two slots, replica digests on.
fn backup_options(pair: &Pair) -> BackupOptions {
    BackupOptions {
        encoder: pair.encoder.clone(),
        transport: pair.transport.clone(),
        slots: 2,
        max_state: 4096,
        digest: true,
        fence: Default::default(),
        metrics: None,
    }
}

#[test]
fn the_backup_takes_over_exactly_where_the_last_committed_checkpoint_stood() {
    for implementation in [Implementation::Std, Implementation::Uring] {
        if !fgbi_hyp::feature::available(implementation.as_str(), implementation.available()) {
            continue;
        }
        let mem = 16usize << 20;
        let mut pair = Pair::new(
            &format!("failover-{}", implementation.as_str()),
            mem,
            2 << 20,
            implementation,
        );
        let (backup_options, backup_key) = (backup_options(&pair), pair.key());
        let listener = pair.listener.take().unwrap();
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
        let options = pair.primary_options(12);
        let mut digests = std::collections::HashMap::new();
        let last = primary::run(
            &mut machine,
            |m| m.run().map_err(Into::into),
            &options,
            &pair.key(),
            |e| digests.extend(sent_digest(&e)),
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
}

#[test]
fn a_backup_that_dies_and_comes_back_empty_is_resynced_while_the_program_runs() {
    let mem = 8usize << 20;
    let mut pair = Pair::new("resync", mem, 1 << 20, Implementation::Std);
    let (options, key) = (backup_options(&pair), pair.key());
    let listener = pair.listener.take().unwrap();
    let backup = std::thread::spawn(move || {
        // The first backup commits five epochs, then dies.
        common::serve_by_hand(
            &listener,
            &options.encoder,
            &options.transport,
            &key,
            |mut link, applier, replica| {
                for _ in 0..5 {
                    link.serve_one(applier, replica).unwrap();
                }
            },
        );
        // A new, empty backup takes its place.
        backup::run(
            &listener,
            &options,
            &key,
            Region::new(mem).unwrap(),
            |replica, state, _| SyntheticMachine::restore(replica, state, Tracking::Kernel),
            |machine| machine.run(),
            |_| {},
        )
    });
    let mut machine = SyntheticMachine::new("sys", mem, 4, Tracking::Kernel, false).unwrap();
    let options = pair.primary_options(15);
    let (mut digests, mut unprotected, mut connections) = (std::collections::HashMap::new(), 0, 0);
    primary::run(
        &mut machine,
        |m| m.run().map_err(Into::into),
        &options,
        &pair.key(),
        |e| {
            digests.extend(sent_digest(&e));
            match e {
                PrimaryEvent::Unprotected { .. } => unprotected += 1,
                PrimaryEvent::Connected(_) => connections += 1,
                _ => {}
            }
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
}

#[test]
fn an_epoch_committed_whose_acknowledgement_was_lost_is_acknowledged_on_reconnect() {
    use std::collections::HashMap;
    use std::time::Duration;

    use fgbi_engine::Applier;
    use fgbi_transport::{Backup, ReceiveRegion};

    let mem = 8usize << 20;
    let mut pair = Pair::new("lost-ack", mem, 1 << 20, Implementation::Std);
    let listener = pair.listener.take().unwrap();
    let (encoder, transport, key) = (pair.encoder.clone(), pair.transport.clone(), pair.key());
    let backup = std::thread::spawn(move || {
        let geometry = encoder.geometry;
        let pages = geometry.pages() as usize;
        let mut region = ReceiveRegion::for_epochs(&encoder, pages, 4096, 2).unwrap();
        let mut applier = Applier::new(geometry);
        let mut replica = Region::new(mem).unwrap();
        let mut digests = HashMap::new();
        {
            let (stream, _) = listener.accept().unwrap();
            let mut link = Backup::accept(stream, &mut region, &transport, &key, 0).unwrap();
            for _ in 0..3 {
                link.serve_one(&mut applier, &mut replica).unwrap();
                digests.insert(applier.committed(), memory_digest(&replica));
            }
            // The fourth epoch commits, but its acknowledgement comes after the
            // primary gave up waiting (four liveness timeouts of 100 ms).
            let received = link.recv_epoch().unwrap();
            let epoch = received.epoch;
            applier.apply(&mut replica, received.bytes).unwrap();
            digests.insert(epoch, memory_digest(&replica));
            std::thread::sleep(Duration::from_millis(700));
            let _ = link.ack(epoch);
        }
        // The primary comes back to the same replica.
        let (stream, _) = listener.accept().unwrap();
        let committed = applier.committed();
        let mut link = Backup::accept(stream, &mut region, &transport, &key, committed).unwrap();
        while link.serve_one(&mut applier, &mut replica).is_ok() {
            digests.insert(applier.committed(), memory_digest(&replica));
        }
        digests
    });
    let mut machine = SyntheticMachine::new("web", mem, 2, Tracking::Kernel, false).unwrap();
    let options = primary::PrimaryOptions {
        pre_copy: false,
        ..pair.primary_options(8)
    };
    let (mut sent, mut connected, mut steps) = (HashMap::new(), Vec::new(), 0);
    let last = primary::run(
        &mut machine,
        |m| {
            // 8 epochs take a few dozen; a primary that cannot catch up runs on.
            steps += 1;
            assert!(steps < 1000, "the primary never caught up with the backup");
            m.run().map_err(Into::into)
        },
        &options,
        &pair.key(),
        |e| {
            sent.extend(sent_digest(&e));
            if let PrimaryEvent::Connected(held) = e {
                connected.push(held);
            }
        },
    )
    .unwrap();
    assert_eq!(last, 8);
    assert_eq!(
        connected,
        [0, 4],
        "reconnected to the backup holding epoch 4"
    );
    let replicas = backup.join().unwrap();
    for epoch in [4, 8] {
        assert_eq!(
            replicas.get(&epoch),
            sent.get(&epoch),
            "replica = checkpoint {epoch}"
        );
    }
}

/// A backup whose kernel accepts the connection but that never answers (frozen, or
/// another service on its port) costs a reconnect attempt the whole handshake
/// timeout. The attempts run beside the checkpoints, which keep their pace: they
/// release the program's outputs while it runs unprotected.
#[test]
fn a_backup_that_never_answers_does_not_hold_up_checkpoints() {
    let mem = 4usize << 20;
    let mut pair = Pair::new("silent-backup", mem, 1 << 20, Implementation::Std);
    let listener = pair.listener.take().unwrap();
    let (held, accepted) = std::sync::mpsc::channel();
    // Accepts every connection and holds it, saying nothing.
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if held.send(stream).is_err() {
                return;
            }
        }
    });
    let key = pair.key();
    let mut link = Link::new(
        pair.encoder.clone(),
        pair.transport.clone(),
        pair.address,
        &key,
    )
    .unwrap();
    let mut machine = SyntheticMachine::new("web", mem, 3, Tracking::Kernel, false).unwrap();
    let handshake = pair.transport.handshake_timeout;
    let checkpoints = 20;
    let started = Instant::now();
    for _ in 0..checkpoints {
        machine.run().unwrap();
        link.checkpoint(&mut machine, false, &mut |_| {}).unwrap();
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < handshake,
        "{checkpoints} checkpoints took {elapsed:?}: they waited for a backup that never answers (handshake timeout {handshake:?})"
    );
    assert!(
        accepted.recv_timeout(Duration::from_secs(5)).is_ok(),
        "the link never tried to reach the backup"
    );
    assert!(!link.connected());
}

/// A backup that stays unreachable is reported once; when one comes up that refuses
/// the primary (here another key), that reason is reported as well, so the
/// operator learns what to fix.
#[test]
fn a_new_reason_to_be_unprotected_is_reported_and_a_repeated_one_is_not() {
    let mem = 4usize << 20;
    let mut pair = Pair::new("unprotected-reasons", mem, 1 << 20, Implementation::Std);
    // Nobody listens on the pair's address until the wrong backup starts.
    drop(pair.listener.take());
    let key = pair.key();
    let mut link = Link::new(
        pair.encoder.clone(),
        pair.transport.clone(),
        pair.address,
        &key,
    )
    .unwrap();
    let mut machine = SyntheticMachine::new("web", mem, 5, Tracking::Kernel, false).unwrap();
    let reasons = std::cell::RefCell::new(Vec::new());
    let mut record = |e: PrimaryEvent| {
        if let PrimaryEvent::Unprotected { reason } = e {
            reasons.borrow_mut().push(reason);
        }
    };
    assert!(link.connect(Instant::now(), &mut record).is_err());
    let checkpoint = |link: &mut Link<'_>,
                      machine: &mut SyntheticMachine,
                      record: &mut dyn FnMut(PrimaryEvent)| {
        machine.run().unwrap();
        link.checkpoint(machine, false, record).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    };
    for _ in 0..20 {
        checkpoint(&mut link, &mut machine, &mut record);
    }

    // A backup with another key.
    let other = pair.other_key();
    let listener = std::net::TcpListener::bind(pair.address).unwrap();
    let options = backup_options(&pair);
    std::thread::spawn(move || {
        let _ = backup::run(
            &listener,
            &options,
            &other,
            Region::new(mem).unwrap(),
            |replica, state, _| SyntheticMachine::restore(replica, state, Tracking::Kernel),
            |machine| machine.run(),
            |_| {},
        );
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while reasons.borrow().len() < 2 && Instant::now() < deadline {
        checkpoint(&mut link, &mut machine, &mut record);
    }
    for _ in 0..20 {
        checkpoint(&mut link, &mut machine, &mut record);
    }
    let reasons = reasons.take();
    assert_eq!(reasons.len(), 2, "{reasons:#?}");
    assert!(
        reasons[0].contains("connecting to the backup"),
        "{reasons:#?}"
    );
    assert!(
        reasons[1].contains("pre-shared key") || reasons[1].contains("refused"),
        "{reasons:#?}"
    );
    assert!(!link.connected());
}

/// Peers that fail the handshake (garbage, another key) are refused one after the
/// other while the backup waits for its primary, which it then serves and fails
/// over from as if nobody else had called.
#[test]
fn a_backup_refuses_bad_peers_and_goes_on_to_serve_its_primary() {
    use std::io::Write;

    let mem = 4usize << 20;
    let mut pair = Pair::new("bad-peers", mem, 1 << 20, Implementation::Std);
    let (options, key) = (backup_options(&pair), pair.key());
    let listener = pair.listener.take().unwrap();
    let backup = std::thread::spawn(move || {
        backup::run(
            &listener,
            &options,
            &key,
            Region::new(mem).unwrap(),
            |replica, state, _| SyntheticMachine::restore(replica, state, Tracking::Kernel),
            |machine| machine.run(),
            |_| {},
        )
    });
    // Garbage, then a peer that hangs up at once, then a primary with another key.
    let mut garbage = std::net::TcpStream::connect(pair.address).unwrap();
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut closed = std::net::TcpStream::connect(pair.address).unwrap();
    closed.flush().unwrap();
    drop(closed);
    let other = pair.other_key();
    let stream = std::net::TcpStream::connect(pair.address).unwrap();
    let refused = fgbi_transport::Primary::connect(stream, &pair.transport, &other);
    assert!(refused.is_err(), "a primary with another key was accepted");
    assert!(!backup.is_finished(), "a refused peer ended the backup");

    let mut machine = SyntheticMachine::new("sys", mem, 13, Tracking::Kernel, false).unwrap();
    let mut digests = std::collections::HashMap::new();
    let last = primary::run(
        &mut machine,
        |m| m.run().map_err(Into::into),
        &pair.primary_options(6),
        &pair.key(),
        |e| digests.extend(sent_digest(&e)),
    )
    .unwrap();
    let (report, _) = backup.join().unwrap().unwrap();
    assert_eq!(report.epoch, last);
    assert_eq!(
        report.digest,
        digests.get(&last).copied(),
        "replica = checkpoint {last}"
    );
}
