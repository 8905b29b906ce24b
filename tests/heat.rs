//! The C example, built with the system C compiler against the libfgbi.so cargo just
//! built, run, and checked: its live and replicated results agree, every checkpoint
//! verified, and the restart record names the last iteration.

use std::path::{Path, PathBuf};
use std::process::Command;

use fgbi_hyp::tracking::DirtyTracker;

const ITERATIONS: u64 = 400;

/// Warnings are errors: the header and the example must compile cleanly.
const WARNINGS: [&str; 4] = ["-Wall", "-Wextra", "-pedantic", "-Werror"];

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
    if !available("cc") {
        eprintln!("SKIPPED: no C compiler `cc` on PATH; install gcc to build examples/heat");
        return;
    }
    if let Err(e) = DirtyTracker::probe() {
        eprintln!("SKIPPED: kernel dirty tracking unavailable: {e}");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = library_dir();
    let heat = Path::new(env!("CARGO_TARGET_TMPDIR")).join("heat");
    run(Command::new("cc")
        .args(["-O2", "-std=c99"])
        .args(WARNINGS)
        .arg("-I")
        .arg(root.join("include"))
        .arg("-o")
        .arg(&heat)
        .arg(root.join("examples/heat/heat.c"))
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lfgbi", "-pthread"]));

    let report = run(Command::new(&heat).args(["192", &ITERATIONS.to_string(), "2", "2"]));
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
}

#[test]
fn the_header_compiles_as_cpp() {
    if !available("c++") {
        eprintln!("SKIPPED: no C++ compiler `c++` on PATH; install g++ to check include/fgbi.h");
        return;
    }
    let header = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/fgbi.h");
    run(Command::new("c++")
        .arg("-fsyntax-only")
        .args(WARNINGS)
        .args(["-x", "c++"])
        .arg(header));
}
