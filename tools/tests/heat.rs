//! The C example, built with the system C compiler against the libfgbi.so cargo just
//! built, run, and checked: its live and replicated results agree, every checkpoint
//! verified, and the restart record names the last iteration; every mode computes
//! the unprotected run's result; bad options fail with fgbi's message. Protected by
//! `fgbi backup --restart` and killed mid-run, heat is resumed by the backup (and,
//! protected again by a second backup and killed again, by that one) and ends with
//! the checksum of an uninterrupted run. Also: the header compiles as C++, and the
//! Fortran binding (examples/fortran) builds and runs.

mod common;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::children::Kill;
use common::{free_port, key_file, lines, scratch, wait_for};
use fgbi_hyp::tracking::DirtyTracker;

const ITERATIONS: u64 = 400;

/// The failover tests' run: long enough to be killed in the middle.
const LONG: [&str; 4] = ["256", "20000", "2", "10"];

/// Warnings are errors: the header and the example must compile cleanly.
const WARNINGS: [&str; 4] = ["-Wall", "-Wextra", "-pedantic", "-Werror"];

/// The repository's root.
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tools crate is in the repository")
}

/// The directory holding the libfgbi.so built with this test: an ancestor of the
/// test executable (target/<profile>/deps/heat-<hash>).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.ancestors()
        .find(|dir| dir.join("libfgbi.so").is_file())
        .unwrap_or_else(|| panic!("no libfgbi.so next to or above {}", exe.display()))
        .to_path_buf()
}

/// Whether `program` runs at all.
fn available(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok()
}

/// Whether `compiler` is installed (`package` provides it) and the kernel can track
/// dirty pages; says loudly which is missing.
fn ready(compiler: &str, package: &str) -> bool {
    installed(compiler, package)
        && fgbi_hyp::feature::available("kernel dirty tracking", DirtyTracker::probe())
}

/// Whether `compiler` (from `package`) is on PATH; says loudly when it is not.
fn installed(compiler: &str, package: &str) -> bool {
    let on_path = if available(compiler) {
        Ok(())
    } else {
        Err(format!("not on PATH; install {package} to run this test"))
    };
    fgbi_hyp::feature::available(compiler, on_path)
}

/// Compiles `source` (a path in the repository) with `compiler` and `flags`, linked
/// against the libfgbi.so built with this test, into `name` in the test's scratch
/// directory; the program's path.
fn build(compiler: &str, flags: &[&OsStr], source: &str, name: &str) -> PathBuf {
    let lib = library_dir();
    let program = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    run(Command::new(compiler)
        .args(flags)
        .arg("-o")
        .arg(&program)
        .arg(repo().join(source))
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lfgbi"));
    program
}

/// Runs `command`, failing the test with its output unless it succeeds; its stdout.
fn run(command: &mut Command) -> String {
    let output = command.output().expect("the command starts");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout.into_owned()
}

/// heat, built once for the tests of this binary.
fn heat() -> &'static Path {
    static HEAT: OnceLock<PathBuf> = OnceLock::new();
    HEAT.get_or_init(|| {
        let include = repo().join("include");
        let mut flags: Vec<&OsStr> = ["-O2", "-std=c99", "-pthread"].map(OsStr::new).into();
        flags.extend(WARNINGS.map(OsStr::new));
        flags.extend([OsStr::new("-I"), include.as_os_str()]);
        build("cc", &flags, "examples/heat/heat.c", "heat")
    })
}

/// A command running heat with the libfgbi.so built with this test, whatever the
/// `LD_LIBRARY_PATH` cargo gives tests says (it may name an older build's).
fn heat_command() -> Command {
    let mut command = Command::new(heat());
    command.env("LD_LIBRARY_PATH", library_dir());
    command
}

/// The `key=value` fields of the `heat: result` line of `report`.
fn result(report: &str) -> HashMap<&str, &str> {
    let line = report
        .lines()
        .find_map(|line| line.strip_prefix("heat: result "))
        .unwrap_or_else(|| panic!("no `heat: result` line in:\n{report}"));
    line.split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .collect()
}

/// The checksum of heat's result computed with `args` in ordinary memory.
fn unprotected(args: &[&str]) -> String {
    let report = run(heat_command().args(args).arg("--unprotected"));
    result(&report)["checksum"].to_string()
}

/// A field of `result` as a number.
fn count(result: &HashMap<&str, &str>, key: &str) -> u64 {
    result[key]
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number: {result:?}"))
}

/// The words after `key` on the line that starts with it.
fn field<'a>(report: &'a str, key: &str) -> Vec<&'a str> {
    let line = report
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .unwrap_or_else(|| panic!("no line `{key} ...` in:\n{report}"));
    line.split_whitespace().collect()
}

#[test]
fn the_c_heat_solver_restarts_from_an_exact_replica() {
    if !ready("cc", "gcc") {
        return;
    }
    let report = run(heat_command().args(["192", &ITERATIONS.to_string(), "2", "2"]));
    let live = field(&report, "checksum live");
    assert_eq!(live, field(&report, "checksum replica"), "{report}");
    assert_eq!(field(&report, "restart record"), [ITERATIONS.to_string()]);
    let counts = field(&report, "epochs");
    let epochs: u64 = counts[0].parse().unwrap();
    assert!(
        epochs >= 2,
        "only {epochs} epoch(s): the run ended before a checkpoint\n{report}"
    );
    assert_eq!(
        counts[1..],
        ["verified", counts[0], "mismatches", "0"],
        "{report}"
    );
    let pauses = field(&report, "pause_us");
    assert_eq!((pauses[0], pauses[2]), ("p50", "p99"), "{report}");
    let p50: f64 = pauses[1].parse().unwrap();
    assert!(p50 > 0.0, "{report}");
    let result = result(&report);
    assert_eq!(result["checksum"], live[0], "{report}");
    assert_eq!(count(&result, "epochs"), epochs, "{report}");
    assert_eq!(count(&result, "committed"), epochs, "{report}");
}

#[test]
fn every_mode_computes_the_unprotected_result() {
    if !ready("cc", "gcc") {
        return;
    }
    let args = ["160", "300", "2", "2"];
    let expected = unprotected(&args);
    for mode in ["fgbi", "remus", "llm", "xbzrle"] {
        // Success means the replica equals the live result and every epoch verified.
        let report = run(heat_command().args(args).args(["--mode", mode]));
        assert!(
            report.contains(&format!("protected in-process, mode {mode}")),
            "{report}"
        );
        let result = result(&report);
        assert_eq!(result["checksum"], expected, "{mode}:\n{report}");
        let epochs = count(&result, "epochs");
        assert!(
            epochs >= 2,
            "{mode}: the run ended before a checkpoint\n{report}"
        );
        assert_eq!(count(&result, "committed"), epochs, "{mode}:\n{report}");
        assert!(count(&result, "wire_bytes") > 0, "{mode}:\n{report}");
    }
}

/// Runs heat with `args`, expecting it to fail.
fn fails(args: &[&str]) -> Output {
    let output = heat_command().args(args).output().unwrap();
    assert!(!output.status.success(), "heat {args:?} succeeded");
    output
}

#[test]
fn bad_options_fail_with_the_reason_and_status() {
    if !installed("cc", "gcc") {
        return;
    }
    let key = key_file(&scratch("heat-options")).display().to_string();
    let small = ["64", "10", "1", "2"];
    let cases: [(&[&str], i32, &[&str]); 6] = [
        (
            &["--backup", "127.0.0.1:7000"],
            1,
            &["fgbi_protect", "returned -2", "key_file is NULL"],
        ),
        (
            &["--backup", "nonsense", "--key", &key],
            1,
            &["returned -2", "is not a host:port"],
        ),
        (
            &[
                "--backup",
                "127.0.0.1:7000",
                "--key",
                &key,
                "--transport",
                "pigeon",
            ],
            1,
            &["returned -2", "transport \"pigeon\" is unknown"],
        ),
        (&["--key", &key], 1, &["returned -2", "remote backup only"]),
        (&["--mode", "bogus"], 2, &["usage", "--mode must be"]),
        (
            &["--unprotected", "--mode", "remus"],
            2,
            &["--unprotected takes no other option"],
        ),
    ];
    for (options, code, words) in cases {
        let args = [&small[..], options].concat();
        let output = fails(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "heat {args:?}: {stderr}");
        for word in words {
            assert!(
                stderr.contains(word),
                "heat {args:?}: `{word}` missing: {stderr}"
            );
        }
    }
}

/// `--mem` for a backup of heat on an `n` x `n` grid: two regions, each on 2 MiB
/// boundaries.
fn backup_mem(n: &str) -> String {
    let n: usize = n.parse().unwrap();
    let region = (n * n * 8).next_multiple_of(2 << 20);
    format!("{}K", 2 * region / 1024)
}

/// Starts `fgbi backup` on `port` with `key`, sized for heat's `LONG` run, and
/// restarting heat with `restart` (its arguments); its stdout (with the restarted
/// heat's) as lines.
fn backup(port: u16, key: &str, restart: &str) -> (Kill, Receiver<String>) {
    let command = format!("exec {} {restart}", heat().display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_fgbi"))
        // The heat it restarts loads the library built with this test.
        .env("LD_LIBRARY_PATH", library_dir())
        .args([
            "backup",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--key",
            key,
        ])
        .args(["--mem", &backup_mem(LONG[0]), "--heartbeat-ms", "50"])
        .args(["--transport", &transport()])
        .args(["--restart", &command])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines(child.stdout.take().unwrap());
    (Kill(child), lines)
}

/// The transport of heat and its backups: `FGBI_TEST_TRANSPORT` (the Soft-RoCE
/// guest sets it), else tcp.
fn transport() -> String {
    common::env("FGBI_TEST_TRANSPORT").unwrap_or_else(|| "tcp".into())
}

/// Heat's arguments to be protected by the backup on `port`.
fn protected_by(port: u16, key: &str) -> String {
    format!(
        "--backup 127.0.0.1:{port} --key {key} --heartbeat-ms 50 --transport {}",
        transport()
    )
}

/// Heat's long run protected by the backup on `port`, once fgbi says a checkpoint
/// of it is committed there.
fn protected_heat(port: u16, key: &str, seen: &mut Vec<String>) -> Kill {
    let mut heat = heat_command()
        .args(LONG)
        .args(protected_by(port, key).split(' '))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(heat.stderr.take().unwrap());
    let heat = Kill(heat);
    wait_for(&err, "fgbi: protected", seen);
    heat
}

/// Waits for `n` more `committed` lines.
fn commits(from: &Receiver<String>, n: usize, seen: &mut Vec<String>) {
    for _ in 0..n {
        wait_for(from, "committed ", seen);
    }
}

/// The iteration in a restarted heat's `resuming at iteration K` line.
fn resumed_at(line: &str) -> u64 {
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// The lines `from` writes until it closes (within a minute).
fn rest(from: &Receiver<String>, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    loop {
        match from.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => lines.push(line),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => panic!("still running after a minute: {lines:#?}"),
        }
    }
    seen.extend(lines.iter().cloned());
    lines.join("\n")
}

#[test]
fn a_killed_heat_is_resumed_by_its_backup_with_the_uninterrupted_result() {
    if !ready("cc", "gcc") {
        return;
    }
    let expected = unprotected(&LONG);
    let key = key_file(&scratch("heat-failover")).display().to_string();
    let [port_a, port_b] = [(); 2].map(|()| free_port());
    // B restarts heat protected in-process; A restarts it protected by B.
    let long = LONG.join(" ");
    let (_b, b_lines) = backup(port_b, &key, &long);
    let restart_a = format!("{long} {}", protected_by(port_b, &key));
    let (_a, a_lines) = backup(port_a, &key, &restart_a);
    let mut seen = Vec::new();
    wait_for(&a_lines, "listening", &mut seen);
    wait_for(&b_lines, "listening", &mut seen);

    let mut primary = protected_heat(port_a, &key, &mut seen);
    commits(&a_lines, 5, &mut seen);
    assert!(
        primary.0.try_wait().unwrap().is_none(),
        "heat ended before it was killed: raise its iterations"
    );
    primary.0.kill().unwrap();

    // A restarts heat, protected by B: it resumes where A's replica was.
    let resumed = wait_for(&a_lines, "resuming at iteration", &mut seen);
    let first = resumed_at(&resumed);
    let line = wait_for(&a_lines, "restarted pid=", &mut seen);
    assert!(
        line.contains(&format!("heat resumed at iteration {first}")),
        "{line}"
    );
    assert!(first > 0, "A's replica holds no iteration: {resumed}");
    let pid = line
        .split_once("pid=")
        .unwrap()
        .1
        .split(' ')
        .next()
        .unwrap();
    commits(&b_lines, 5, &mut seen);
    let killed = Command::new("kill").args(["-KILL", pid]).status().unwrap();
    assert!(
        killed.success(),
        "the heat A restarted ended before it was killed"
    );

    // B restarts heat from its replica of the restarted run; it finishes.
    let resumed = wait_for(&b_lines, "resuming at iteration", &mut seen);
    let second = resumed_at(&resumed);
    assert!(second >= first, "{resumed}: A's restart resumed at {first}");
    let report = rest(&b_lines, &mut seen);
    assert!(
        report.contains("restarted command ended: exit status: 0"),
        "{seen:#?}"
    );
    // The end of type I downtime, which `fgbi bench` reads.
    assert!(
        report.contains("heat: first iteration after the restart done at_unix_ns="),
        "{seen:#?}"
    );
    let result = result(&report);
    assert_eq!(result["checksum"], expected, "{seen:#?}");
    assert_eq!(result["iterations"], LONG[1], "{seen:#?}");
}

#[test]
fn heat_finishing_under_its_backup_in_every_mode_reports_the_commits_and_ends_there_too() {
    if !ready("cc", "gcc") {
        return;
    }
    let args = [LONG[0], "3000", "2", "10"];
    let expected = unprotected(&args);
    let key = key_file(&scratch("heat-finish")).display().to_string();
    for mode in ["fgbi", "remus", "llm", "xbzrle"] {
        let port = free_port();
        let (_backup, backup_lines) = backup(port, &key, &args.join(" "));
        let mut seen = Vec::new();
        wait_for(&backup_lines, "listening", &mut seen);
        let report = run(heat_command()
            .args(args)
            .args(["--mode", mode])
            .args(protected_by(port, &key).split(' ')));
        assert!(
            report.contains(&format!(
                "protected by the backup at 127.0.0.1:{port} over {}, mode {mode}",
                transport()
            )),
            "{report}"
        );
        assert!(
            report.contains(&format!("replica on the backup at 127.0.0.1:{port}")),
            "{report}"
        );
        let done = result(&report);
        assert_eq!(done["checksum"], expected, "{mode}:\n{report}");
        let (epochs, committed) = (count(&done, "epochs"), count(&done, "committed"));
        assert!(committed >= 1 && committed <= epochs, "{mode}:\n{report}");

        // The backup takes a primary that ended for a dead one: the heat it restarts
        // resumes after the last iteration and reports the same result.
        let resumed = wait_for(&backup_lines, "resuming at iteration", &mut seen);
        assert_eq!(resumed_at(&resumed).to_string(), args[1], "{resumed}");
        let restarted = rest(&backup_lines, &mut seen);
        assert_eq!(
            result(&restarted)["checksum"],
            expected,
            "{mode}: {seen:#?}"
        );
    }
}

#[test]
fn a_restart_protecting_other_sizes_is_refused_saying_so() {
    if !ready("cc", "gcc") {
        return;
    }
    let key = key_file(&scratch("heat-sizes")).display().to_string();
    let port = free_port();
    // The restart command solves a smaller grid (its stderr joins the backup's
    // stdout, to be read here).
    let (mut backup, backup_lines) = backup(port, &key, "128 20000 2 10 2>&1");
    let mut seen = Vec::new();
    wait_for(&backup_lines, "listening", &mut seen);
    let mut primary = protected_heat(port, &key, &mut seen);
    primary.0.kill().unwrap();
    let refused = wait_for(&backup_lines, "returned -2", &mut seen);
    for words in [
        "restarted by `fgbi backup --restart`",
        "[524288, 524288]",
        "[131072, 131072]",
    ] {
        assert!(refused.contains(words), "`{words}` missing: {refused}");
    }
    let status = backup.0.wait().unwrap();
    assert!(
        !status.success(),
        "the backup reports the failed restart: {seen:#?}"
    );
}

#[test]
fn the_header_compiles_as_cpp() {
    if !installed("c++", "g++") {
        return;
    }
    let header = repo().join("include/fgbi.h");
    run(Command::new("c++")
        .arg("-fsyntax-only")
        .args(WARNINGS)
        .args(["-x", "c++"])
        .arg(header));
}

#[test]
fn the_fortran_binding_round_trips() {
    if !ready("gfortran", "gfortran") {
        return;
    }
    // -J: where the module file goes.
    let mut flags = ["-std=f2008", "-Wall", "-Werror", "-J"]
        .map(OsStr::new)
        .to_vec();
    flags.push(env!("CARGO_TARGET_TMPDIR").as_ref());
    let relax = build("gfortran", &flags, "examples/fortran/relax.f90", "relax");
    let report = run(&mut Command::new(&relax));
    assert_eq!(
        field(&report, "epochs")[1..],
        ["mismatches", "0", "replica", "equals", "live", "T"],
        "{report}"
    );
}
