//! The C example, built with the system C compiler against the libfgbi.so cargo just
//! built, run, and checked: its live and replicated results agree, every checkpoint
//! verified, and the restart record names the last iteration. Also: the header
//! compiles as C++, and the Fortran binding (examples/fortran) builds and runs.

use std::ffi::OsStr;
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
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(source))
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
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    let mut flags: Vec<&OsStr> = ["-O2", "-std=c99", "-pthread"].map(OsStr::new).into();
    flags.extend(WARNINGS.map(OsStr::new));
    flags.extend([OsStr::new("-I"), include.as_os_str()]);
    let heat = build("cc", &flags, "examples/heat/heat.c", "heat");

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
    if !installed("c++", "g++") {
        return;
    }
    let header = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/fgbi.h");
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
