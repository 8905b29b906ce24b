//! An application's own memory, protected: threads write while checkpoints are taken
//! at safepoints, and every checkpoint reaches the replica exactly.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fgbi::local::LocalReplication;
use fgbi_engine::{EncoderConfig, Geometry, Mode};
use fgbi_hyp::cow::CowTracker;
use fgbi_hyp::memory::Backing;
use fgbi_hyp::process::{PageSafety, parse_state, protect, protect_with};
use fgbi_hyp::protected::Protected;
use fgbi_hyp::tracking::DirtyTracker;
use fgbi_hyp::workload::Rng;

#[test]
fn checkpoints_of_a_running_multithreaded_application_are_exact() {
    if !fgbi_hyp::feature::available("kernel dirty tracking", DirtyTracker::probe()) {
        return;
    }
    checkpoints_are_exact(PageSafety::Copy);
}

/// Copy-on-write: the pages are copied after the threads resume, while they write;
/// every checkpoint must still reach the replica as it was at the pause.
#[test]
fn copy_on_write_checkpoints_of_a_running_multithreaded_application_are_exact() {
    if !fgbi_hyp::feature::available(
        "copy-on-write snapshots",
        CowTracker::probe(Backing::TransparentHuge),
    ) {
        return;
    }
    checkpoints_are_exact(PageSafety::CopyOnWrite);
}

fn checkpoints_are_exact(safety: PageSafety) {
    let (handle, mut memory) =
        protect_with(&[3 << 20, 5 << 20], Duration::from_secs(5), safety).unwrap();
    assert_eq!(
        memory.copy_on_write().is_some(),
        safety == PageSafety::CopyOnWrite
    );
    let running = Arc::new(AtomicBool::new(true));
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let (handle, running) = (handle.clone(), Arc::clone(&running));
            std::thread::spawn(move || {
                let safepoint = handle.register(&format!("app-{t}"));
                let (base, len) = handle.region(t).unwrap();
                let mut rng = Rng::new(t as u64);
                let mut iteration = 0u64;
                while running.load(Ordering::Relaxed) {
                    // A burst of writes, then a consistent point.
                    for _ in 0..64 {
                        let at = rng.below(len as u64 / 8) as usize * 8;
                        // SAFETY: `at + 8 <= len`, the region is live while `handle`
                        // is, and this thread is the only writer of region `t`.
                        unsafe { base.add(at).cast::<u64>().write_unaligned(rng.next_u64()) };
                    }
                    iteration += 1;
                    if t == 0 {
                        handle.set_state(&iteration.to_le_bytes());
                    }
                    safepoint.pass();
                }
            })
        })
        .collect();

    let mem = memory.mem_bytes();
    let mut config = EncoderConfig::new(Geometry::new(mem, 64).unwrap(), Mode::Fgbi);
    config.cache_bytes = 1 << 20;
    let mut replication = LocalReplication::new(config).unwrap();
    let mut last_state = 0u64;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(2));
        let report = replication.checkpoint(&mut memory, true).unwrap();
        assert_eq!(report.verified, Some(true), "epoch {}", report.epoch);
        // The state blob is the regions' layout and the application's record.
        let (layout, record) = parse_state(replication.state()).unwrap();
        assert_eq!(layout, memory.layout());
        if record.len() == 8 {
            let iteration = u64::from_le_bytes(record.try_into().unwrap());
            assert!(iteration >= last_state, "the restart record moves forward");
            last_state = iteration;
        }
    }
    assert!(
        last_state > 0,
        "the application's state travelled with the epochs"
    );
    running.store(false, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn a_thread_that_never_reaches_a_safepoint_fails_the_checkpoint_clearly() {
    if !fgbi_hyp::feature::available("kernel dirty tracking", DirtyTracker::probe()) {
        return;
    }
    let (handle, mut memory) = protect(&[1 << 20], Duration::from_millis(30)).unwrap();
    let _stuck = handle.register("solver");
    let config = EncoderConfig::new(Geometry::new(memory.mem_bytes(), 64).unwrap(), Mode::Fgbi);
    let mut replication = LocalReplication::new(config).unwrap();
    let err = replication.checkpoint(&mut memory, false).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("solver") && message.contains("safepoint"),
        "{message}"
    );
}

#[test]
fn the_replicator_checkpoints_continuously_and_hands_back_the_replica() {
    use fgbi::replicator::{Replicator, ReplicatorOptions};
    if !fgbi_hyp::feature::available("kernel dirty tracking", DirtyTracker::probe()) {
        return;
    }
    let options = ReplicatorOptions {
        epoch: Duration::from_millis(5),
        cache_bytes: 1 << 20,
        ..ReplicatorOptions::default()
    };
    let (handle, replicator) = Replicator::start(&[1 << 20, 64 << 10], options).unwrap();
    let app = {
        let handle = handle.clone();
        std::thread::spawn(move || {
            let safepoint = handle.register("app");
            let (base, len) = handle.region(1).unwrap();
            for i in 0..20_000u64 {
                let at = (i as usize * 24) % (len - 8);
                // SAFETY: in bounds of region 1, written only by this thread.
                unsafe { base.add(at).cast::<u64>().write_unaligned(i) };
                if i % 100 == 0 {
                    handle.set_state(&i.to_le_bytes());
                    safepoint.pass();
                }
            }
        })
    };
    app.join().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let summary = replicator.finish().unwrap();
    assert!(summary.epochs >= 2, "{} epochs", summary.epochs);
    assert_eq!(summary.mismatches, 0);
    assert_eq!(summary.verified, summary.epochs);
    let replica = summary
        .replica
        .as_ref()
        .expect("a local target hands back its replica");
    assert_eq!(summary.committed, summary.epochs);
    assert_eq!(replica.regions(), 2);
    let (base, len) = handle.region(1).unwrap();
    // SAFETY: the application thread has finished; nothing writes the region.
    let live = unsafe { std::slice::from_raw_parts(base, len) };
    assert_eq!(replica.region(1).unwrap(), live);
    assert_eq!(replica.state(), 19_900u64.to_le_bytes());
}
