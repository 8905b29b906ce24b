//! The `fgbi` binary: its bench runs, writes JSON, CSV and SVG, and refuses bad flags
//! clearly.

use std::process::Command;

fn fgbi(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fgbi"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether `program` runs (`--version`); says loudly which `package` to install when
/// it does not (a skip that `FGBI_REQUIRE_ALL` turns into a failure).
fn installed(program: &str, package: &str) -> bool {
    let runs = match Command::new(program).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        _ => Err(format!("not on PATH; install {package} (.ci/run does)")),
    };
    fgbi_hyp::feature::available(program, runs)
}

/// A small bench of `workload` in remus and fgbi modes (8 MiB, 1 MiB cache), with
/// `extra` flags.
fn small_bench(workload: &str, epochs: &str, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "bench",
        "--workload",
        workload,
        "--modes",
        "remus,fgbi",
        "--epochs",
        epochs,
        "--mem",
        "8M",
        "--cache",
        "1M",
    ];
    args.extend_from_slice(extra);
    fgbi(&args)
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fgbi-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn bench_prints_a_table_and_writes_json() {
    let dir = scratch("json");
    let json = dir.join("out.json");
    let (code, stdout, stderr) = small_bench("sys", "3", &["--json", json.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("every run verified"), "{stdout}");
    let text = std::fs::read_to_string(&json).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let runs = value["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        for field in [
            "workload",
            "mode",
            "epochs",
            "block_size",
            "mem_bytes",
            "dirty_pages",
            "wire_bytes",
            "encode_seconds",
            "apply_seconds",
            "verified",
            "encodings",
        ] {
            assert!(!run[field].is_null(), "missing {field}");
        }
        assert_eq!(run["verified"], true);
        assert!(run["pause_us"]["p99"].as_f64() >= run["pause_us"]["p50"].as_f64());
        assert_eq!(run["mem_bytes"], 8 << 20);
    }
    assert_eq!(runs[1]["mode"], "fgbi");
    assert!(runs[1]["wire_bytes"].as_u64() < runs[0]["wire_bytes"].as_u64());
    std::fs::remove_dir_all(dir).unwrap();
}

/// A trace of mawk building strings, recorded with `fgbi record` (docs/operating.md).
fn recorded_trace() -> String {
    format!(
        "{}/../tests/data/mawk-strings.fgbt",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn bench_replays_a_recorded_trace_in_every_mode() {
    let trace = recorded_trace();
    let (code, stdout, stderr) = fgbi(&["bench", "--trace", &trace, "--epochs", "14"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("memory sized by the trace"), "{stdout}");
    assert!(stdout.contains("every run verified"), "{stdout}");
    for mode in ["remus", "llm", "xbzrle", "fgbi"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with("trace:") && l.contains(&format!(" {mode} ")))
            .unwrap_or_else(|| panic!("no {mode} row: {stdout}"));
        assert!(row.contains("true"), "{row}");
    }
}

#[test]
fn bench_writes_csv_and_prints_markdown() {
    let dir = scratch("csv");
    let csv = dir.join("out.csv");
    let (code, stdout, stderr) =
        small_bench("dup", "2", &["--csv", csv.to_str().unwrap(), "--markdown"]);
    assert_eq!(code, 0, "{stderr}");
    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let header: Vec<&str> = lines[0].split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
    for (line, mode) in lines[1..].iter().zip(["remus", "fgbi"]) {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(fields.len(), header.len(), "{line}");
        assert_eq!(fields[column("workload")], "dup");
        assert_eq!(fields[column("mode")], mode);
        assert_eq!(fields[column("verified")], "true");
        assert_eq!(fields[column("mem_bytes")], (8 << 20).to_string());
    }
    let markdown: Vec<&str> = stdout.lines().filter(|l| l.starts_with('|')).collect();
    assert_eq!(markdown.len(), 4, "{stdout}");
    assert!(
        markdown[0].starts_with("| workload | mode | dirty |"),
        "{stdout}"
    );
    assert!(markdown[1].starts_with("|---|---|"), "{stdout}");
    assert!(markdown[2].starts_with("| dup | remus |"), "{stdout}");
    assert!(markdown[3].starts_with("| dup | fgbi |") && markdown[3].contains("| true |"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_flags_get_a_clear_error_and_no_panic() {
    for (args, expect) in [
        (vec!["bench", "--block", "48"], "power of two"),
        (
            vec!["bench", "--workload", "apache", "--epochs", "1"],
            "unknown workload",
        ),
        (vec!["bench", "--mem", "12X"], "unknown suffix"),
        (vec!["bench", "--modes", "remus,zip"], "unknown mode"),
        (
            vec!["bench", "--mem", "1000", "--epochs", "1"],
            "memory size",
        ),
        (vec!["bench", "--epochs", "0"], "--epochs"),
        (
            vec!["bench", "--transport", "infiniband"],
            "unknown transport",
        ),
        (
            vec!["bench", "--tracking", "kernel,kernel", "--epochs", "1"],
            "--tracking names kernel twice",
        ),
        (vec!["bench", "--failovers", "0"], "--failovers"),
        (vec!["bench", "--epoch-ms", "0"], "--epoch-ms"),
        (vec!["bench", "--net-epochs", "0"], "--net-epochs"),
        (
            vec!["bench", "--local", "--transport", "uring"],
            "cannot be used with",
        ),
        (
            vec!["bench", "--trace", "/nonexistent/x.fgbt", "--epochs", "1"],
            "cannot open trace",
        ),
        (vec!["bench", "--trace", "Cargo.toml"], "not an fgbi trace"),
        (vec!["bench", "--workload", "kv", "--local"], "drop --local"),
        (
            vec!["bench", "--workload", "kv", "--no-sharing"],
            "--no-sharing applies to the synthetic workloads",
        ),
        (vec!["bench", "--workload", "kv,web,kv"], "names kv twice"),
        (vec!["bench", "--workload", "web,"], "empty name"),
        (
            vec!["bench", "--workload", "kv", "--requests", "0"],
            "--requests",
        ),
        (
            vec!["demo", "--transport", "infiniband"],
            "unknown transport",
        ),
        (
            vec!["demo", "--workload", "web", "--fault", "released@3"],
            "use pause, sent or acked",
        ),
        (
            vec!["record", "--pid", "0", "-o", "/tmp/fgbi-never.fgbt"],
            "invalid process id",
        ),
        (
            vec!["demo", "--tracking", "cow"],
            "--tracking goes with --vm or --workload",
        ),
        (
            vec!["demo", "--vm", "--tracking", "copy"],
            "unknown tracking",
        ),
    ] {
        let (code, _, stderr) = fgbi(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn bench_quick_runs_the_networked_pass_and_draws_the_plot() {
    let dir = scratch("quick");
    let (json, svg) = (dir.join("q.json"), dir.join("q.svg"));
    let (code, stdout, stderr) = fgbi(&[
        "bench",
        "--quick",
        "--workload",
        "idle",
        "--modes",
        "remus,fgbi",
        "--transport",
        "std",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("64 MiB memory, 64-byte blocks, 10 epochs"),
        "{stdout}"
    );
    assert!(stdout.contains("1 failover(s), 5 epochs"), "{stdout}");
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(value["schema"], 3);
    for run in value["runs"].as_array().unwrap() {
        assert_eq!(run["transport"], "std");
        assert_eq!(run["failovers"], 1);
        assert_eq!(run["verified"], true);
        assert_eq!(run["tracking"], "kernel");
        assert!(run["pause_by_tracking"]["cow"]["pause_us"]["p50"].as_f64() > Some(0.0));
    }
    assert!(stdout.contains("(pauses also with cow)"), "{stdout}");
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(
        svg.matches(r#"class="series pause""#).count(),
        4,
        "two modes, copy and copy-on-write: {svg}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bench_over_rdma_runs_or_says_what_to_do() {
    let available = fgbi_transport::RdmaConfig::default().available();
    let (code, stdout, stderr) = small_bench("idle", "2", &["--transport", "rdma"]);
    match available {
        Ok(()) => {
            assert_eq!(code, 0, "{stdout}\n{stderr}");
            assert!(stdout.contains("transport rdma"), "{stdout}");
        }
        Err(why) => {
            eprintln!("no RDMA here ({why}): checking the error says what to do");
            assert_eq!(code, 2, "{stdout}\n{stderr}");
            assert!(
                stderr.contains("RDMA unavailable") && stderr.contains("--transport tcp"),
                "{stderr}"
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
}

#[test]
fn bench_local_skips_the_networked_pass() {
    let (code, stdout, stderr) = small_bench("web", "2", &["--local"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("in-process pass only"), "{stdout}");
    assert!(stdout.contains("transport local"), "{stdout}");
}

#[test]
fn demo_kills_the_primary_and_the_backup_takes_over_from_its_checkpoint() {
    let (code, stdout, stderr) = fgbi(&[
        "demo",
        "--workload",
        "web",
        "--epochs",
        "12",
        "--mem",
        "16M",
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("digest equals the primary's checkpoint"),
        "{stdout}"
    );
    assert!(stdout.contains("type I downtime"), "{stdout}");
    assert!(stdout.contains("running epochs="), "{stdout}");
}

#[test]
fn replication_commands_refuse_bad_keys_and_addresses_clearly() {
    let (code, _, stderr) = fgbi(&[
        "backup",
        "--listen",
        "127.0.0.1:0",
        "--key",
        "/nonexistent/fgbi.key",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("/nonexistent/fgbi.key"), "{stderr}");
    let (code, _, stderr) = fgbi(&["primary", "--backup", "nowhere", "--key", "k"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn vm_list_names_every_guest_with_a_description() {
    let (code, stdout, stderr) = fgbi(&["vm", "list"]);
    assert_eq!(code, 0, "{stderr}");
    for program in fgbi_hyp::kvm::Program::ALL {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(program.name()))
            .unwrap_or_else(|| panic!("{} missing from:\n{stdout}", program.name()));
        assert!(line.contains(program.summary()), "{line}");
    }
}

#[test]
fn vm_run_refuses_unknown_guests_and_bad_sizes() {
    let (code, _, stderr) = fgbi(&["vm", "run", "linux"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("unknown guest \"linux\""), "{stderr}");
    let (code, _, stderr) = fgbi(&["vm", "run", "web", "--mem", "3M"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("multiple of 2 MiB"), "{stderr}");
    let (code, _, stderr) = fgbi(&["vm", "run", "pit", "--vcpus", "2"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("use 1 to 1"), "{stderr}");
    let (code, _, stderr) = fgbi(&["vm", "run", "ep", "--vcpus", "2", "--mem", "4M"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("257 data pages per vCPU"), "{stderr}");
    let (code, _, stderr) = fgbi(&["vm", "run", "kv"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("needs --port"), "{stderr}");
}

#[test]
fn vm_run_prints_progress_and_the_ep_guest_verifies() {
    use fgbi_hyp::kvm::{DirtyTracking, probe};
    if !fgbi_hyp::feature::available("KVM", probe(DirtyTracking::Classic)) {
        return;
    }
    let (code, stdout, stderr) = fgbi(&[
        "vm",
        "run",
        "web",
        "--mem",
        "8M",
        "--seconds",
        "2",
        "--vcpus",
        "2",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("2 vCPU(s)"), "{stdout}");
    assert!(stdout.contains("per vCPU"), "{stdout}");
    assert!(stdout.contains("web: start"), "{stdout}");
    assert!(stdout.contains("stopped after"), "{stdout}");
    let (code, stdout, stderr) = fgbi(&["vm", "run", "ep", "--mem", "8M", "--seconds", "120"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("finished with exit code 0"), "{stdout}");
    assert!(stdout.contains(" verified"), "{stdout}");
    assert!(
        stdout.contains("host check of the class S sums: verified"),
        "{stdout}"
    );
}

#[test]
fn vm_run_serves_the_kv_guest_to_redis_cli() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    use fgbi_hyp::kvm::{DirtyTracking, probe};
    if !fgbi_hyp::feature::available("KVM", probe(DirtyTracking::Classic)) {
        return;
    }
    let cli_here = Command::new("redis-cli")
        .arg("--version")
        .output()
        .map(drop)
        .map_err(|_| "redis-cli not on PATH; install Debian's redis-tools (.ci/run does)");
    if !fgbi_hyp::feature::available("redis-cli", cli_here) {
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_fgbi"))
        .args([
            "vm",
            "run",
            "kv",
            "--mem",
            "8M",
            "--port",
            "0",
            "--seconds",
            "30",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("serving the Redis protocol on 127.0.0.1:")
                .and_then(|rest| rest.split_whitespace().next().map(str::to_string))
        })
        .expect("fgbi vm run kv prints its port");
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-p", &port])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli(&["SET", "k", "v"]), "OK");
    assert_eq!(cli(&["GET", "k"]), "v");
    assert_eq!(cli(&["INCR", "n"]), "1");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn bench_runs_the_kv_program_beside_a_synthetic_workload_and_reports_it() {
    if !installed("redis-benchmark", "Debian's redis-tools") {
        return;
    }
    let dir = scratch("kv");
    let (json, csv, plot) = (dir.join("r.json"), dir.join("r.csv"), dir.join("r.svg"));
    let (code, stdout, stderr) = fgbi(&[
        "bench",
        "--workload",
        "idle,kv",
        "--modes",
        "remus,fgbi",
        "--quick",
        "--epochs",
        "2",
        "--mem",
        "16M",
        "--requests",
        "2000",
        "--transport",
        "std",
        "--json",
        json.to_str().unwrap(),
        "--csv",
        csv.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
        "--markdown",
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("kv fgbi verified: 0 of "), "{stdout}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["runs"].as_array().unwrap().len(), 2);
    let programs = doc["programs"].as_array().unwrap();
    assert_eq!(programs.len(), 2);
    for (p, mode) in programs.iter().zip(["remus", "fgbi"]) {
        assert_eq!(p["workload"], "kv");
        assert_eq!(p["mode"], mode);
        assert_eq!(p["transport"], "std");
        assert_eq!(p["verified"], true);
        assert_eq!(p["failovers"], 1);
        assert_eq!(p["throughput_unit"], "requests/s");
        assert!(p["checkpoints"].as_u64().unwrap() > 0, "{p}");
        let rate = |which: &str| p["throughput"][which].as_f64().unwrap();
        assert!(rate("unprotected") > 0.0 && rate("protected") > 0.0, "{p}");
        assert!(p["overhead_pct"].is_f64(), "{p}");
        let q = |q: &str| p["pause_us"][q].as_f64().unwrap();
        assert!(
            0.0 < q("p50") && q("p50") <= q("p99") && q("p99") <= q("max"),
            "{p}"
        );
        let part = |name: &str| p["failover_ms"][name].as_f64().unwrap();
        assert!(part("detect") > 0.0 && part("restore") > 0.0, "{p}");
        let sum = part("detect") + part("apply") + part("restore") + part("first_run");
        // One round: the first answer's part is what the kill-to-answer total leaves.
        assert!(sum >= part("total") - 0.01, "{p}");
        assert!(p.get("pause_samples_us").is_none(), "{p}");
    }
    // Less data than Remus on the same service: the block-level deltas at work.
    let bytes = |i: usize| programs[i]["bytes_per_epoch"].as_f64().unwrap();
    assert!(
        bytes(1) < bytes(0),
        "fgbi {} vs remus {}",
        bytes(1),
        bytes(0)
    );

    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1 + 2 + 2, "{text}");
    let header: Vec<&str> = lines[0].split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
    for line in &lines[3..] {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(fields.len(), header.len(), "{line}");
        assert_eq!(fields[column("workload")], "kv", "{line}");
        assert!(!fields[column("failover_ms_total")].is_empty(), "{line}");
        assert!(fields[column("dirty_pages")].is_empty(), "{line}");
    }
    assert!(stdout.contains("| kv | fgbi |"), "{stdout}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    for mode in ["remus", "fgbi"] {
        assert!(svg.contains(&format!("<title>kv {mode}: ")), "{svg}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bench_runs_the_c_heat_solver_and_its_resumed_run_keeps_the_result() {
    if !installed("cc", "gcc") {
        return;
    }
    let dir = scratch("heat");
    let json = dir.join("r.json");
    let (code, stdout, stderr) = fgbi(&[
        "bench",
        "--workload",
        "heat",
        "--modes",
        "remus,fgbi",
        "--quick",
        "--transport",
        "std",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(doc["runs"].as_array().unwrap().is_empty());
    let programs = doc["programs"].as_array().unwrap();
    assert_eq!(programs.len(), 2);
    for (p, mode) in programs.iter().zip(["remus", "fgbi"]) {
        assert_eq!(p["workload"], "heat");
        assert_eq!(p["mode"], mode);
        assert_eq!(p["verified"], true, "{p}");
        assert_eq!(p["throughput_unit"], "iterations/s");
        // Two 1024 x 1024 grids of doubles.
        assert_eq!(p["mem_bytes"], 16 << 20);
        assert!(p["checkpoints"].as_u64().unwrap() > 2, "{p}");
        let check = p["check"].as_str().unwrap();
        // `resumed at epoch E, checksum 0x... (unprotected 0x...)`
        let checksums: Vec<&str> = check
            .split([' ', '(', ')'])
            .filter(|word| word.starts_with("0x"))
            .collect();
        assert_eq!(checksums.len(), 2, "{check}");
        assert_eq!(checksums[0], checksums[1], "{check}");
        let q = |q: &str| p["pause_us"][q].as_f64().unwrap();
        assert!(
            0.0 < q("p50") && q("p50") <= q("p99") && q("p99") <= q("max"),
            "{p}"
        );
        let part = |name: &str| p["failover_ms"][name].as_f64().unwrap();
        assert!(part("detect") > 0.0 && part("restore") > 0.0, "{p}");
        assert!(part("total") >= part("detect") + part("apply"), "{p}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
