//! The bench driver: every workload under every mode verifies, fgbi's wire bytes
//! stand where the design says they should, the networked pass fails over and
//! reports sane figures, and the JSON, CSV and SVG reports hold what they promise.

use std::time::Duration;

use fgbi::bench::report::{csv, json, plot};
use fgbi::bench::{self, BenchConfig, TransportChoice};
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
        tracking: Tracking::Kernel,
        check_tracking: true,
        transport: None,
        failovers: 1,
        net_epochs: 4,
        epoch: Duration::from_millis(5),
    }
}

/// A small networked run of `workload` in `modes` with `failovers` injected failures.
fn networked(workload: &str, modes: Vec<Mode>, failovers: usize) -> BenchConfig {
    let mut c = config(&[workload], modes);
    c.epochs = 4;
    c.mem_bytes = 8 << 20;
    c.cache_bytes = 1 << 20;
    c.transport = Some(TransportChoice::Tcp);
    c.failovers = failovers;
    c
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
    c.workers = 0;
    assert!(
        bench::run(&c, |_| {})
            .unwrap_err()
            .to_string()
            .contains("workers")
    );
}

#[test]
fn the_networked_pass_fails_over_and_reports_sane_figures() {
    let runs = bench::run(&networked("web", vec![Mode::Remus, Mode::Fgbi], 2), |_| {}).unwrap();
    assert_eq!(runs.len(), 2);
    for r in &runs {
        let what = format!("{} {}", r.workload, r.mode);
        assert!(r.verified, "{what} did not verify");
        assert_eq!(
            r.transport, "std",
            "{what}: tcp runs the std implementation"
        );
        assert_eq!(r.failovers, 2, "{what}");
        // Every in-process checkpoint (the sync and 4 epochs) and every failover.
        assert_eq!(r.verified_checkpoints, 5 + 2, "{what}");
        let p = r.pause_us;
        assert!(
            0.0 < p.p50 && p.p50 <= p.p99 && p.p99 <= p.max,
            "{what}: {p:?}"
        );
        assert_eq!(
            r.pause_samples_us.len(),
            2 * 4,
            "{what}: two rounds of 4 epochs"
        );
        assert_eq!(r.net_epochs, Some(8), "{what}");
        assert!(r.net_dirty_pages.unwrap() > 0 && r.net_wire_bytes.unwrap() > 0);
        let f = r.failover_ms.unwrap();
        for part in [f.detect, f.apply, f.restore, f.first_run] {
            assert!(part >= 0.0 && part <= f.total, "{what}: {f:?}");
        }
        let t = r.throughput.unwrap();
        assert!(t.unprotected > 0.0 && t.protected > 0.0, "{what}: {t:?}");
        let overhead = r.overhead_pct.unwrap();
        assert!(overhead < 100.0, "{what}: {overhead}");
        assert!(r.pipeline_cpu_seconds.unwrap() > 0.0, "{what}");
        assert!(
            r.receive_ring_bytes >= 2 * (8 << 20),
            "{what}: two slots of all memory"
        );
        assert!(r.staging_bytes > 0 && r.memcpy_gbps > 0.0, "{what}");
    }
    assert!(runs[1].wire_bytes < runs[0].wire_bytes);
}

#[test]
fn a_recorded_trace_fails_over_too() {
    let trace = format!(
        "{}/tests/data/mawk-strings.fgbt",
        env!("CARGO_MANIFEST_DIR")
    );
    let name = format!("{}{trace}", bench::TRACE_PREFIX);
    let runs = bench::run(&networked(&name, vec![Mode::Fgbi], 1), |_| {}).unwrap();
    assert!(runs[0].verified && runs[0].failovers == 1);
}

#[test]
fn the_reports_hold_every_field_once_per_run() {
    let runs = bench::run(&networked("dup", vec![Mode::Xbzrle, Mode::Fgbi], 1), |_| {}).unwrap();
    let doc = json::document(&runs);
    assert_eq!(doc["schema"], 2);
    assert!(doc["memcpy_gbps"].as_f64().unwrap() > 0.0);
    for run in doc["runs"].as_array().unwrap() {
        for field in [
            "workload",
            "mode",
            "epochs",
            "block_size",
            "mem_bytes",
            "workers",
            "backing",
            "tracking",
            "dirty_pages",
            "wire_bytes",
            "sync_bytes",
            "encode_seconds",
            "apply_seconds",
            "encode_us_p50",
            "apply_us_p50",
            "verified",
            "digest_bytes",
            "cache_bytes",
            "encodings",
            "transport",
            "verified_checkpoints",
            "failovers",
            "overhead_pct",
            "staging_bytes",
            "receive_ring_bytes",
            "pipeline_cpu_seconds",
            "pipeline_cpu_us_per_epoch",
            "memcpy_gbps",
            "encode_vs_memcpy",
            "apply_vs_memcpy",
        ] {
            assert!(!run[field].is_null(), "missing {field}");
        }
        assert_eq!(run["verified"], true);
        assert!(run["transport"].is_string() && run["overhead_pct"].is_f64());
        for pauses in ["pause_us", "local_pause_us"] {
            let p = |q: &str| run[pauses][q].as_f64().unwrap();
            assert!(p("p50") <= p("p99") && p("p99") <= p("max"), "{pauses}");
        }
        for part in ["detect", "apply", "restore", "first_run", "total"] {
            assert!(run["failover_ms"][part].as_f64().unwrap() >= 0.0, "{part}");
        }
        assert!(run["throughput"]["protected"].as_f64().unwrap() > 0.0);
        assert!(
            run.get("pause_samples_us").is_none(),
            "samples stay out of the JSON"
        );
    }

    let text = csv::document(&runs);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    let header = lines[0].split(',').count();
    assert!(lines[1..].iter().all(|l| l.split(',').count() == header));

    let svg = plot::svg(&runs);
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<g").count(), svg.matches("</g>").count());
    for mode in ["xbzrle", "fgbi"] {
        for kind in ["pause", "bytes"] {
            let series = format!(r#"class="series {kind}" data-mode="{mode}""#);
            assert_eq!(svg.matches(&series).count(), 1, "{series}");
        }
    }
    assert!(svg.contains("Type II downtime") && svg.contains("Wire bytes per epoch"));
}
