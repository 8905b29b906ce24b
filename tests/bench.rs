//! The bench driver's in-process pass: every workload under every mode verifies,
//! fgbi's wire bytes stand where the design says they should, and bad settings are
//! refused. The networked pass needs the `fgbi` executable for its backup process:
//! its tests are tools/tests/bench.rs.

use std::time::Duration;

use fgbi::bench::{self, BenchConfig};
use fgbi_engine::Mode;
use fgbi_engine::stats::PAGE_ENCODINGS;
use fgbi_hyp::synthetic::Tracking;
use fgbi_hyp::workload::NAMES;

fn config(workloads: &[&str], modes: Vec<Mode>) -> BenchConfig {
    BenchConfig {
        workloads: workloads.iter().map(|s| s.to_string()).collect(),
        modes,
        epochs: 6,
        mem_bytes: 16 << 20,
        block_size: 64,
        workers: 2,
        pin_workers: false,
        cache_bytes: 4 << 20,
        seed: 3,
        sharing: true,
        compression: true,
        tracking: vec![Tracking::Kernel],
        check_tracking: true,
        network: None,
        failovers: 1,
        net_epochs: 4,
        epoch: Duration::from_millis(5),
        dirty_rate: None,
    }
}

#[test]
fn every_workload_and_mode_verifies() {
    let mut reported = 0;
    let runs = bench::run(&config(&NAMES, Mode::ALL.to_vec()), |_| reported += 1).unwrap();
    assert_eq!(runs.len(), NAMES.len() * Mode::ALL.len());
    assert_eq!(reported, runs.len());
    for r in &runs {
        assert!(r.verified, "{} {} did not verify", r.workload, r.mode);
        assert_eq!(r.epochs, 6);
        assert!(r.encode_seconds > 0.0 && r.apply_seconds > 0.0);
        let pages: u64 = PAGE_ENCODINGS.iter().map(|k| r.encodings[k]).sum();
        assert_eq!(
            pages, r.dirty_pages,
            "{} {}: every dirty page has one encoding",
            r.workload, r.mode
        );
    }
    for name in NAMES {
        let bytes = |mode: &str| {
            runs.iter()
                .find(|r| r.workload == name && r.mode == mode)
                .map(|r| r.wire_bytes)
                .unwrap()
        };
        let (remus, xbzrle, fgbi) = (bytes("remus"), bytes("xbzrle"), bytes("fgbi"));
        assert_eq!(bytes("llm"), remus, "{name}: llm encodes as remus");
        assert!(
            fgbi as f64 <= remus as f64 * 1.01,
            "{name}: fgbi {fgbi} > remus {remus} + 1%"
        );
        assert!(fgbi <= xbzrle, "{name}: fgbi {fgbi} > xbzrle {xbzrle}");
        if name == "web" || name == "sys" {
            assert!(
                fgbi * 4 <= remus,
                "{name}: fgbi {fgbi} above 25% of remus {remus}"
            );
        }
    }
}

#[test]
fn ablations_change_what_is_chosen_but_still_verify() {
    let mut c = config(&["dup"], vec![Mode::Fgbi]);
    let full = &bench::run(&c, |_| {}).unwrap()[0];
    c.sharing = false;
    c.compression = false;
    let plain = &bench::run(&c, |_| {}).unwrap()[0];
    assert!(full.verified && plain.verified);
    assert!(full.encodings["shared_blocks"] > 0);
    assert_eq!(plain.encodings["shared_blocks"], 0);
    assert_eq!(plain.encodings["lz4_attempts"], 0);
    assert!(full.wire_bytes < plain.wire_bytes);
}

#[test]
fn bad_settings_are_refused_with_a_reason() {
    let mut c = config(&["web"], vec![Mode::Fgbi]);
    c.block_size = 48;
    assert!(
        bench::run(&c, |_| {})
            .unwrap_err()
            .to_string()
            .contains("power of two")
    );
    let c = config(&["apache"], vec![Mode::Fgbi]);
    assert!(
        bench::run(&c, |_| {})
            .unwrap_err()
            .to_string()
            .contains("unknown workload")
    );
    let mut c = config(&["web"], vec![Mode::Fgbi]);
    c.epochs = 0;
    assert!(
        bench::run(&c, |_| {})
            .unwrap_err()
            .to_string()
            .contains("--epochs")
    );
    let mut c = config(&["web"], vec![Mode::Fgbi]);
    c.tracking = vec![Tracking::Kernel, Tracking::Kernel];
    assert!(
        bench::run(&c, |_| {})
            .unwrap_err()
            .to_string()
            .contains("--tracking names kernel twice")
    );
    let mut c = config(&["web"], vec![Mode::Fgbi]);
    c.tracking = Vec::new();
    assert!(
        bench::run(&c, |_| {})
            .unwrap_err()
            .to_string()
            .contains("at least one tracking variant")
    );
    let mut c = config(&["web"], vec![Mode::Fgbi]);
    c.workers = 0;
    assert!(
        bench::run(&c, |_| {})
            .unwrap_err()
            .to_string()
            .contains("workers")
    );
}

#[test]
fn copy_and_copy_on_write_pauses_are_reported_side_by_side() {
    let mut c = config(&["web"], vec![Mode::Fgbi]);
    c.tracking = vec![Tracking::Kernel, Tracking::CopyOnWrite];
    let runs = bench::run(&c, |_| {}).unwrap();
    let r = &runs[0];
    assert!(r.verified);
    assert_eq!(
        r.tracking, "kernel",
        "the first variant measures everything"
    );
    // The sync and 6 epochs, compared under each variant.
    assert_eq!(r.verified_checkpoints, 2 * 7);
    let keys: Vec<&str> = r.pause_by_tracking.keys().copied().collect();
    assert_eq!(keys, ["cow", "kernel"]);
    let kernel = &r.pause_by_tracking["kernel"];
    assert_eq!(kernel.pause_us, r.pause_us);
    for (name, f) in &r.pause_by_tracking {
        let p = f.pause_us;
        assert!(
            0.0 < p.p50 && p.p50 <= p.p99 && p.p99 <= p.max,
            "{name}: {p:?}"
        );
        assert_eq!(f.pause_samples_us.len(), 6, "{name}");
        assert_eq!(f.overhead_pct, None, "{name}: no networked pass");
    }
}
