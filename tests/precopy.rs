//! Initial sync by iterative pre-copy: a backup that joins late, or comes back empty
//! after a restart, receives the memory of an application whose threads keep writing
//! while it is read, and ends with exactly the checkpoint's bytes; the pause that
//! ends the sync copies a small part of memory, where syncing in a pause copies it
//! all; a backup that reconnects with its partial replica is synced on.

use std::cell::Cell;
use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use fgbi::backup::{self, BackupOptions, FailoverReport};
use fgbi::local::ReplicationError;
use fgbi::primary::{Link, PrimaryEvent};
use fgbi_engine::{Applier, EncoderConfig, Geometry, Mode};
use fgbi_hyp::memory::Region;
use fgbi_hyp::process::{ProcessHandle, protect};
use fgbi_hyp::protected::Protected;
use fgbi_hyp::synthetic::{SyntheticMachine, Tracking};
use fgbi_hyp::tracking::DirtyTracker;
use fgbi_hyp::workload::Rng;
use fgbi_transport::{Backup, Implementation, PresharedKey, ReceiveRegion, TransportConfig};

/// Two regions of 8 MiB: 4096 pages, two pre-copy chunks.
const REGION: usize = 8 << 20;

fn key(dir: &std::path::Path) -> std::path::PathBuf {
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

/// Application threads: each fills its region, then writes on until stopped, mostly
/// to a hot set of 64 pages, one write in 200 anywhere.
struct Application {
    running: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Application {
    fn start(handle: &ProcessHandle) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let threads = (0..2)
            .map(|t| {
                let (handle, running) = (handle.clone(), Arc::clone(&running));
                std::thread::spawn(move || {
                    let safepoint = handle.register(&format!("app-{t}"));
                    let (base, len) = handle.region(t).unwrap();
                    let mut rng = Rng::new(t as u64 + 7);
                    let write = |at: usize, value: u64| {
                        // SAFETY: `at + 8 <= len`, the region is live while `handle` is,
                        // and this thread is its only writer.
                        unsafe { base.add(at).cast::<u64>().write_unaligned(value) };
                    };
                    for at in (0..len).step_by(512) {
                        write(at, rng.next_u64());
                    }
                    let pages = len as u64 / 4096;
                    while running.load(Ordering::Relaxed) {
                        for _ in 0..16 {
                            let page = match rng.below(200) {
                                0 => rng.below(pages),
                                _ => rng.below(64),
                            };
                            let at = page * 4096 + rng.below(512) * 8;
                            write(at as usize, rng.next_u64());
                        }
                        safepoint.pass();
                        safepoint.outside(|| std::thread::sleep(Duration::from_micros(200)));
                    }
                })
            })
            .collect();
        Self { running, threads }
    }
}

impl Drop for Application {
    fn drop(&mut self) {
        self.running.store(false, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What the primary saw.
#[derive(Default)]
struct Seen {
    /// Digest of each checkpoint sent.
    digests: HashMap<u64, u128>,
    /// Pre-copy epochs committed, per sync (a new sync starts at each `Connected(0)`).
    synced: Vec<u64>,
    /// Pre-copy epochs of a round after the first (pages written while read).
    later_rounds: u64,
    /// The last pre-copy round.
    max_round: u32,
    unprotected: u64,
    /// Dirty pages of the first checkpoint each sync ended with.
    final_pages: Vec<u64>,
    /// The last committed checkpoint.
    last: u64,
}

/// How a test runs.
struct Plan {
    name: &'static str,
    pre_copy: bool,
    /// Epochs a first backup serves before it dies (a new, empty one takes over).
    first_backup: Option<usize>,
    /// Committed checkpoints after the (last) sync before the primary stops.
    protected: u64,
}

/// Runs `program` (one `step` before each checkpoint) protected by a [`Link`] whose
/// backup is not there at first: unprotected checkpoints, then a backup joins and is
/// synced by pre-copy (or in a pause when `!pre_copy`); after `protected` committed
/// checkpoints the primary stops, and the backup fails over. Returns what the
/// primary saw, the failover report and the epoch the restore was given.
fn late_join<P: Protected>(
    plan: Plan,
    memory: &mut P,
    mut step: impl FnMut(&mut P),
) -> (Seen, FailoverReport, u64) {
    let Plan {
        name,
        pre_copy,
        first_backup,
        protected,
    } = plan;
    let dir = std::env::temp_dir().join(format!("fgbi-precopy-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_path = key(&dir);
    let key = PresharedKey::from_file(&key_path).unwrap();
    let mem = memory.mem_bytes() as usize;
    let geometry = Geometry::new(memory.mem_bytes(), 64).unwrap();
    let mut encoder = EncoderConfig::new(geometry, Mode::Fgbi);
    encoder.cache_bytes = 1 << 20;
    let transport = TransportConfig::new(geometry, Implementation::Std);
    // An address nobody listens on yet.
    let address: SocketAddr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut link = Link::new(encoder.clone(), transport.clone(), address, &key).unwrap();
    link.pre_copy(pre_copy);
    let mut seen = Seen::default();
    let record = |e: PrimaryEvent, seen: &mut Seen| match e {
        PrimaryEvent::Sent {
            epoch,
            digest: Some(d),
            ..
        } => {
            seen.digests.insert(epoch, d);
        }
        PrimaryEvent::Synced { round, .. } => {
            *seen.synced.last_mut().unwrap() += 1;
            seen.later_rounds += u64::from(round > 0);
            seen.max_round = seen.max_round.max(round);
        }
        PrimaryEvent::Connected(0) => seen.synced.push(0),
        PrimaryEvent::Unprotected { .. } => seen.unprotected += 1,
        _ => {}
    };
    assert!(
        link.connect(std::time::Instant::now(), &mut |e| record(e, &mut seen))
            .is_err()
    );
    let mut checkpoint = |link: &mut Link<'_>, seen: &mut Seen| {
        std::thread::sleep(Duration::from_millis(3));
        step(memory);
        let mut events = Vec::new();
        let shipped = link
            .checkpoint(memory, true, &mut |e| events.push(e))
            .unwrap();
        link.drain(&mut |e| events.push(e)).unwrap();
        let committed = events
            .iter()
            .any(|e| matches!(e, PrimaryEvent::Committed { epoch, .. } if *epoch >= shipped.epoch));
        events.into_iter().for_each(|e| record(e, seen));
        (shipped, committed)
    };
    for _ in 0..8 {
        let (_, committed) = checkpoint(&mut link, &mut seen);
        assert!(!committed && !link.protected());
    }

    let listener = TcpListener::bind(address).unwrap();
    let backup_key = PresharedKey::from_file(&key_path).unwrap();
    let (backup_encoder, backup_transport) = (encoder, transport);
    let backup = std::thread::spawn(move || {
        if let Some(epochs) = first_backup {
            let pages = geometry.pages() as usize;
            let mut region = ReceiveRegion::for_epochs(&backup_encoder, pages, 4096, 2).unwrap();
            let (stream, _) = listener.accept().unwrap();
            let mut applier = Applier::new(geometry);
            let mut replica = Region::new(mem).unwrap();
            let mut served =
                Backup::accept(stream, &mut region, &backup_transport, &backup_key, 0).unwrap();
            for _ in 0..epochs {
                served.serve_one(&mut applier, &mut replica).unwrap();
            }
        }
        let options = BackupOptions {
            encoder: backup_encoder,
            transport: backup_transport,
            slots: 2,
            max_state: 4096,
            digest: true,
            fence: fgbi::fence::Fence {
                primary_known_dead: true,
                ..Default::default()
            },
            metrics: None,
        };
        backup::run(
            &listener,
            &options,
            &backup_key,
            Region::new(mem).unwrap(),
            |_, _, epoch| Ok::<u64, ReplicationError>(epoch),
            |_| Ok::<(), ReplicationError>(()),
            |_| {},
        )
    });
    let syncs = if first_backup.is_some() { 2 } else { 1 };
    let mut committed = 0;
    let mut ended_sync = false;
    while committed < protected {
        let (shipped, committed_now) = checkpoint(&mut link, &mut seen);
        if committed_now {
            if !ended_sync {
                seen.final_pages.push(shipped.dirty_pages);
            }
            ended_sync = true;
            committed += u64::from(seen.synced.len() == syncs);
            seen.last = shipped.epoch;
            assert!(link.protected());
        } else if link.connected() {
            assert!(!link.protected(), "unprotected during initial sync");
        }
        if !link.connected() {
            // The first backup died: the next one syncs anew.
            ended_sync = false;
        }
    }
    // The primary goes away; the backup fails over to its last checkpoint.
    drop(link);
    let (report, epoch) = backup.join().unwrap().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (seen, report, epoch)
}

fn skip() -> bool {
    !fgbi_hyp::feature::available("kernel dirty tracking", DirtyTracker::probe())
}

/// Pages of the application's memory.
const PAGES: u64 = (2 * REGION / 4096) as u64;

/// Runs the two-thread application under `plan`.
fn application(plan: Plan) -> (Seen, FailoverReport, u64) {
    let (handle, mut memory) = protect(&[REGION, REGION], Duration::from_secs(5)).unwrap();
    let app = Application::start(&handle);
    let outcome = late_join(plan, &mut memory, |_| {});
    drop(app);
    outcome
}

#[test]
fn a_backup_that_joins_late_is_synced_while_the_application_writes_and_takes_over_exactly() {
    if skip() {
        return;
    }
    let plan = Plan {
        name: "late",
        pre_copy: true,
        first_backup: None,
        protected: 6,
    };
    let (seen, report, epoch) = application(plan);
    assert_eq!(seen.synced.len(), 1, "one sync");
    assert!(seen.synced[0] >= 2, "pre-copy epochs: {:?}", seen.synced);
    assert!(seen.unprotected >= 1);
    assert_eq!(report.epoch, seen.last);
    assert_eq!(epoch, seen.last);
    assert_eq!(
        report.digest,
        seen.digests.get(&seen.last).copied(),
        "the replica is exactly the last committed checkpoint"
    );
    // The pause that ended the sync copied a small part of memory.
    let copied = seen.final_pages[0];
    assert!(copied * 4 < PAGES, "{copied} of {PAGES} pages in the pause");
}

#[test]
fn synced_in_a_pause_instead_the_first_checkpoint_copies_all_memory() {
    if skip() {
        return;
    }
    // The control of the test above: the same run without pre-copy.
    let plan = Plan {
        name: "pause",
        pre_copy: false,
        first_backup: None,
        protected: 3,
    };
    let (seen, report, _) = application(plan);
    assert_eq!(seen.synced, [0], "no pre-copy epoch");
    assert_eq!(report.digest, seen.digests.get(&seen.last).copied());
    let copied = seen.final_pages[0];
    assert!(copied >= PAGES, "{copied} of {PAGES} pages in the pause");
}

#[test]
fn a_backup_that_comes_back_empty_is_synced_again_while_the_application_writes() {
    if skip() {
        return;
    }
    // The first backup dies after one epoch, in the middle of the first sync.
    let plan = Plan {
        name: "rejoin",
        pre_copy: true,
        first_backup: Some(1),
        protected: 4,
    };
    let (seen, report, _) = application(plan);
    assert_eq!(seen.synced.len(), 2, "synced twice: {:?}", seen.synced);
    assert_eq!(seen.final_pages.len(), 1, "the first sync never ended");
    assert!(seen.synced[1] >= 2, "pre-copy epochs: {:?}", seen.synced);
    assert_eq!(report.epoch, seen.last);
    assert_eq!(
        report.digest,
        seen.digests.get(&seen.last).copied(),
        "the re-synced replica is exactly the last committed checkpoint"
    );
    let copied = *seen.final_pages.last().unwrap();
    assert!(copied * 4 < PAGES, "{copied} of {PAGES} pages in the pause");
}

#[test]
fn pages_written_during_a_round_are_sent_again_in_the_next_until_rounds_stop_shrinking() {
    if skip() {
        return;
    }
    // web writes about 340 of these 4096 pages per step, more than a final pause
    // takes: round 0 (all memory), round 1 (what round 0 saw written), and as round
    // 1 does not shrink the set, the final checkpoint.
    let mut machine = SyntheticMachine::new("web", 16 << 20, 5, Tracking::Kernel, false).unwrap();
    let plan = Plan {
        name: "rounds",
        pre_copy: true,
        first_backup: None,
        protected: 4,
    };
    let (seen, report, _) = late_join(plan, &mut machine, |m| m.run().unwrap());
    assert!(seen.later_rounds >= 1, "a second round: {:?}", seen.synced);
    assert!(
        seen.max_round < fgbi::precopy::MAX_ROUNDS,
        "stopped as the rounds stopped shrinking, round {}",
        seen.max_round
    );
    assert_eq!(report.digest, seen.digests.get(&seen.last).copied());
    let copied = seen.final_pages[0];
    assert!(copied * 4 < 4096, "{copied} of 4096 pages in the pause");
}

#[test]
fn a_backup_that_reconnects_with_its_partial_replica_is_synced_on_not_from_scratch() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("fgbi-precopy-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_path = key(&dir);
    let key = PresharedKey::from_file(&key_path).unwrap();
    let mut machine = SyntheticMachine::new("dense", 16 << 20, 9, Tracking::Kernel, false).unwrap();
    let geometry = Geometry::new(16 << 20, 64).unwrap();
    let mut encoder = EncoderConfig::new(geometry, Mode::Fgbi);
    encoder.cache_bytes = 1 << 20;
    let transport = TransportConfig::new(geometry, Implementation::Std);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let backup_key = PresharedKey::from_file(&key_path).unwrap();
    let (backup_encoder, backup_transport) = (encoder.clone(), transport.clone());
    // One backup process whose connection breaks after two pre-copy epochs; it keeps
    // its replica and accepts the primary again, announcing the epoch it holds.
    let backup = std::thread::spawn(move || {
        let pages = geometry.pages() as usize;
        let mut region = ReceiveRegion::for_epochs(&backup_encoder, pages, 4096, 2).unwrap();
        let mut applier = Applier::new(geometry);
        let mut replica = Region::new(16 << 20).unwrap();
        for connection in 0..2 {
            let (stream, _) = listener.accept().unwrap();
            let mut served = Backup::accept(
                stream,
                &mut region,
                &backup_transport,
                &backup_key,
                applier.committed(),
            )
            .unwrap();
            let mut epochs = 0;
            while connection == 1 || epochs < 2 {
                if served.serve_one(&mut applier, &mut replica).is_err() {
                    break;
                }
                epochs += 1;
            }
        }
        (
            applier.committed(),
            applier.holds_checkpoint(),
            fgbi_engine::memory_digest(&replica),
        )
    });
    let mut link = Link::new(encoder, transport, address, &key).unwrap();
    let (mut connected, mut digests, committed) = (Vec::new(), HashMap::new(), Cell::new(0));
    let mut record = |e: PrimaryEvent| match e {
        PrimaryEvent::Connected(n) => connected.push(n),
        PrimaryEvent::Committed { .. } => committed.set(committed.get() + 1),
        PrimaryEvent::Sent {
            epoch,
            digest: Some(d),
            ..
        } => {
            digests.insert(epoch, d);
        }
        _ => {}
    };
    link.connect(
        std::time::Instant::now() + Duration::from_secs(5),
        &mut record,
    )
    .unwrap();
    while committed.get() < 3 {
        machine.run().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        link.checkpoint(&mut machine, true, &mut record).unwrap();
        link.drain(&mut record).unwrap();
    }
    drop(link);
    let (epoch, holds, digest) = backup.join().unwrap();
    assert_eq!(connected.len(), 2, "{connected:?}");
    assert_eq!(connected[0], 0);
    assert!(
        connected[1] >= 1,
        "the backup kept its pre-copy epochs: {connected:?}"
    );
    assert!(holds);
    assert_eq!(Some(digest), digests.get(&epoch).copied());
    std::fs::remove_dir_all(&dir).unwrap();
}
