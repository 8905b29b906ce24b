//! The bench's networked pass, whose backup is this package's `fgbi` executable run
//! as a process of its own: it fails over and reports sane figures, copy and
//! copy-on-write run side by side, the reports hold every field, a failing backup
//! process is reaped with a reason, and a killed bench takes its backup with it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fgbi::bench::report::{csv, json, plot};
use fgbi::bench::{self, BenchConfig, NetworkSetting};
use fgbi_engine::Mode;
use fgbi_hyp::synthetic::Tracking;
use fgbi_transport::{Implementation, RdmaConfig};

/// A fresh scratch directory named for `name` and this process.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fgbi-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A small networked run of `workload` in `modes`, over std TCP, with `failovers`
/// injected failures, dirty pages from the kernel.
fn networked(workload: &str, modes: Vec<Mode>, failovers: usize) -> BenchConfig {
    BenchConfig {
        workloads: vec![workload.to_string()],
        modes,
        epochs: 4,
        mem_bytes: 8 << 20,
        block_size: 64,
        workers: 2,
        pin_workers: false,
        cache_bytes: 1 << 20,
        seed: 3,
        sharing: true,
        compression: true,
        tracking: vec![Tracking::Kernel],
        check_tracking: true,
        network: Some(NetworkSetting {
            implementation: Implementation::Std,
            rdma: RdmaConfig::default(),
            program: PathBuf::from(env!("CARGO_BIN_EXE_fgbi")),
        }),
        failovers,
        net_epochs: 4,
        epoch: Duration::from_millis(5),
        dirty_rate: None,
    }
}

#[test]
fn the_networked_pass_fails_over_and_reports_sane_figures() {
    let runs = bench::run(&networked("web", vec![Mode::Remus, Mode::Fgbi], 2), |_| {}).unwrap();
    assert_eq!(runs.len(), 2);
    for r in &runs {
        let what = format!("{} {}", r.workload, r.mode);
        assert!(r.verified, "{what} did not verify");
        assert_eq!(r.transport, "std", "{what}");
        assert_eq!(r.failovers, 2, "{what}");
        // Every in-process checkpoint (the sync and 4 epochs) and every failover.
        assert_eq!(r.verified_checkpoints, 5 + 2, "{what}");
        let p = r.pause_us;
        assert!(
            0.0 < p.p50 && p.p50 <= p.p99 && p.p99 <= p.max,
            "{what}: {p:?}"
        );
        assert_eq!(
            r.pause_by_tracking["kernel"].pause_samples_us.len(),
            2 * 4,
            "{what}: two rounds of 4 epochs"
        );
        assert_eq!(r.net_epochs, Some(8), "{what}");
        assert!(r.net_dirty_pages.unwrap() > 0 && r.net_wire_bytes.unwrap() > 0);
        let f = r.failover_ms.unwrap();
        for part in [f.detect, f.apply, f.restore, f.first_run] {
            assert!(part >= 0.0 && part <= f.total, "{what}: {f:?}");
        }
        assert!(f.restore > 0.0 && f.first_run > 0.0, "{what}: {f:?}");
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
        "{}/../tests/data/mawk-strings.fgbt",
        env!("CARGO_MANIFEST_DIR")
    );
    let name = format!("{}{trace}", bench::TRACE_PREFIX);
    let runs = bench::run(&networked(&name, vec![Mode::Fgbi], 1), |_| {}).unwrap();
    assert!(runs[0].verified && runs[0].failovers == 1);
}

#[test]
fn copy_and_copy_on_write_side_by_side_and_the_reports_hold_every_field() {
    let mut config = networked("dup", vec![Mode::Xbzrle, Mode::Fgbi], 1);
    config.tracking = vec![Tracking::Kernel, Tracking::CopyOnWrite];
    let runs = bench::run(&config, |_| {}).unwrap();
    for r in &runs {
        // The in-process sync and 4 epochs, and one failover under each variant.
        assert_eq!(r.verified_checkpoints, 5 + 2, "{}", r.mode);
        assert_eq!(r.pause_by_tracking["kernel"].pause_us, r.pause_us);
        assert_eq!(
            r.pause_by_tracking["cow"].pause_samples_us.len(),
            4,
            "{}: the cow variant's own networked round",
            r.mode
        );
    }
    let doc = json::document(&runs, &[]);
    assert_eq!(doc["schema"], 3);
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
            "pause_by_tracking",
        ] {
            assert!(!run[field].is_null(), "missing {field}");
        }
        assert_eq!(run["verified"], true);
        assert_eq!(run["tracking"], "kernel");
        assert!(run["transport"].is_string() && run["overhead_pct"].is_f64());
        let percentiles = |p: &serde_json::Value, what: &str| {
            let q = |q: &str| p[q].as_f64().unwrap();
            assert!(q("p50") <= q("p99") && q("p99") <= q("max"), "{what}");
        };
        percentiles(&run["pause_us"], "pause_us");
        percentiles(&run["local_pause_us"], "local_pause_us");
        for variant in ["kernel", "cow"] {
            let v = &run["pause_by_tracking"][variant];
            percentiles(&v["pause_us"], variant);
            assert!(v["overhead_pct"].is_f64(), "{variant}");
            assert!(v.get("pause_samples_us").is_none(), "{variant}");
        }
        assert_eq!(
            run["pause_by_tracking"]["kernel"]["pause_us"],
            run["pause_us"]
        );
        for part in ["detect", "apply", "restore", "first_run", "total"] {
            assert!(run["failover_ms"][part].as_f64().unwrap() >= 0.0, "{part}");
        }
        assert!(run["throughput"]["protected"].as_f64().unwrap() > 0.0);
    }

    let text = csv::document(&runs, &[]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    let header: Vec<&str> = lines[0].split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
    for line in &lines[1..] {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(fields.len(), header.len(), "{line}");
        for filled in [
            "kernel_pause_us_p50",
            "cow_pause_us_p50",
            "cow_overhead_pct",
        ] {
            assert!(!fields[column(filled)].is_empty(), "{filled}: {line}");
        }
        assert!(
            fields[column("generator_pause_us_p50")].is_empty(),
            "{line}"
        );
    }

    let svg = plot::svg(&runs, &[]);
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<g").count(), svg.matches("</g>").count());
    for mode in ["xbzrle", "fgbi"] {
        for tracking in ["kernel", "cow"] {
            let series =
                format!(r#"class="series pause" data-mode="{mode}" data-tracking="{tracking}""#);
            assert_eq!(svg.matches(&series).count(), 1, "{series}");
        }
        let series = format!(r#"class="series bytes" data-mode="{mode}""#);
        assert_eq!(svg.matches(&series).count(), 1, "{series}");
    }
    assert!(svg.contains("pause, cow"));
    assert!(svg.contains("Type II downtime") && svg.contains("Wire bytes per epoch"));
}

/// Whether process `pid` has ended (gone, or a zombie no one reaped yet).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn a_backup_process_that_misbehaves_is_killed_and_reaped_with_a_reason() {
    let dir = scratch("bench-bad-backup");
    let pid_file = dir.join("pid");
    // Reports a commit where it should say where it listens, then stays.
    let program = dir.join("fake-fgbi");
    std::fs::write(
        &program,
        format!(
            "#!/bin/sh\necho $$ > {}\necho '{{\"event\":\"committed\",\"epoch\":1}}'\nexec sleep 600\n",
            pid_file.display()
        ),
    )
    .unwrap();
    let mut permissions = std::fs::metadata(&program).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&program, permissions).unwrap();
    let mut config = networked("idle", vec![Mode::Fgbi], 1);
    if let Some(network) = &mut config.network {
        network.program = program;
    }
    let e = bench::run(&config, |_| {}).unwrap_err().to_string();
    assert!(
        e.contains("the backup process") && e.contains("not where it listens"),
        "{e}"
    );
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Dropped on the error path: killed and reaped at once.
    assert!(
        std::fs::metadata(format!("/proc/{pid}")).is_err(),
        "the backup process {pid} is still there"
    );

    // One that exits at once: its exit status is the reason.
    let mut config = networked("idle", vec![Mode::Fgbi], 1);
    if let Some(network) = &mut config.network {
        network.program = PathBuf::from("/bin/false");
    }
    let e = bench::run(&config, |_| {}).unwrap_err().to_string();
    assert!(e.contains("ended (exit status: 1)"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The children of process `parent`.
fn children(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn a_killed_bench_takes_its_backup_process_with_it() {
    // Long networked rounds so that a backup process is surely running when the
    // bench is killed.
    let mut bench = Command::new(env!("CARGO_BIN_EXE_fgbi"))
        .args([
            "bench",
            "--workload",
            "idle",
            "--modes",
            "fgbi",
            "--tracking",
            "kernel",
            "--transport",
            "std",
            "--epochs",
            "1",
            "--mem",
            "8M",
            "--cache",
            "1M",
            "--net-epochs",
            "1000",
            "--epoch-ms",
            "10",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let backups = loop {
        let found = children(bench.id());
        if !found.is_empty() {
            break found;
        }
        assert!(Instant::now() < deadline, "no backup process started");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Stopped, a backup cannot notice its primary's end and exit by itself: only
    // the signal it asked to get when the bench dies (SIGKILL) ends it.
    let signal = |name: &str| {
        for pid in &backups {
            let _ = Command::new("kill").args([name, &pid.to_string()]).status();
        }
    };
    signal("-STOP");
    let bench_pid = bench.id();
    bench.kill().unwrap();
    bench.wait().unwrap();
    // The killed bench could not remove its key directories.
    for entry in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
        let name = entry.file_name();
        if name
            .to_string_lossy()
            .starts_with(&format!("fgbi-bench-{bench_pid}-"))
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !backups.iter().all(|&pid| ended(pid)) {
        if Instant::now() > deadline {
            signal("-KILL");
            panic!("backup processes {backups:?} outlived the bench");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_paced_workload_runs_only_the_steps_whose_turn_came() {
    let mut config = networked("web", vec![Mode::Fgbi], 1);
    // Far below one step per round (the slowest pace is a step per hour): each
    // round runs its first step and no other.
    config.dirty_rate = Some(1e-300);
    let runs = bench::run(&config, |_| {}).unwrap();
    let r = &runs[0];
    assert!(r.verified);
    assert_eq!(r.dirty_rate_target, Some(1e-300));
    assert!(r.net_dirty_pages_per_sec.is_some());
    let net = r.net_dirty_pages.unwrap();
    // The in-process pass ran one step per epoch, 4 of them; the protected round
    // one step in all (unpaced, its epochs run several steps each).
    assert!(
        0 < net && net < r.dirty_pages,
        "{net} pages in the paced round, {} in 4 steps",
        r.dirty_pages
    );
}
