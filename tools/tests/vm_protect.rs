//! `fgbi primary --vm` and `fgbi backup --vm`: a KVM micro-VM running the kv guest
//! is replicated between two processes, its primary is killed with SIGKILL, and the
//! VM the backup restores answers Debian's unmodified `redis-cli` on the same port
//! with every acknowledged write. Skips, loudly, without KVM or redis-cli.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::children::Kill;
use common::free_port;
use fgbi_hyp::kvm::{DirtyTracking, probe};

/// A key file readable by its owner only, in a directory of its own.
fn key_file(name: &str) -> PathBuf {
    common::key_file(&common::scratch(name))
}

/// `child`'s stdout as a channel of lines.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    common::lines(child.stdout.take().unwrap())
}

/// Waits for a line containing `text`.
fn wait_for(lines: &mpsc::Receiver<String>, text: &str) -> String {
    common::wait_for(lines, text, &mut Vec::new())
}

fn available() -> bool {
    if !fgbi_hyp::feature::available("KVM", probe(DirtyTracking::Classic)) {
        return false;
    }
    let cli_here = Command::new("redis-cli")
        .arg("--version")
        .output()
        .map(drop)
        .map_err(|_| "redis-cli not on PATH; install Debian's redis-tools (.ci/run does)");
    fgbi_hyp::feature::available("redis-cli", cli_here)
}

/// redis-cli's answer to `args`; fails the test if none comes within 30 s (a reply
/// held for good).
fn redis_cli(port: u16, args: &[&str]) -> String {
    let mut child = Kill(
        Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "no answer to {args:?} in 30 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut out = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    out.trim().to_string()
}

/// A backup and a primary of `guest` (with `vm` flags, and `primary_only` for the
/// primary) on free ports, the primary connected; their stdout lines and the
/// primary's first line (the VM it runs).
struct Pair {
    backup: Kill,
    backup_lines: mpsc::Receiver<String>,
    primary: Kill,
    primary_lines: mpsc::Receiver<String>,
    key: PathBuf,
    vm_line: String,
}

impl Pair {
    fn start(name: &str, vm: &[&str], primary_only: &[&str]) -> Self {
        let key = key_file(name);
        let link = format!("127.0.0.1:{}", free_port());
        let command = |command: &str| {
            let mut c = Command::new(env!("CARGO_BIN_EXE_fgbi"));
            c.arg(command)
                .args(vm)
                .args(["--mem", "16M", "--key"])
                .arg(&key)
                // A peer is dead after four silent heartbeats: 400 ms, so that the
                // long pauses of VMs sharing two loaded cores are not taken for a
                // death (a killed primary closes its connection at once).
                .args(["--heartbeat-ms", "100"])
                .stdout(Stdio::piped());
            c
        };
        let mut backup = Kill(command("backup").args(["--listen", &link]).spawn().unwrap());
        let backup_lines = lines(&mut backup.0);
        wait_for(&backup_lines, "listening");
        let mut primary = Kill(
            command("primary")
                .args(["--backup", &link])
                .args(primary_only)
                .spawn()
                .unwrap(),
        );
        let primary_lines = lines(&mut primary.0);
        let vm_line = wait_for(&primary_lines, "vm ");
        wait_for(&primary_lines, "connected");
        Self {
            backup,
            backup_lines,
            primary,
            primary_lines,
            key,
            vm_line,
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.key);
    }
}

#[test]
fn a_protected_vm_survives_a_kill_of_its_primary_and_answers_redis_cli() {
    survives_a_kill_of_its_primary("vm-protect", "kernel", "pages copied in the pause");
}

#[test]
fn a_vm_protected_copy_on_write_survives_a_kill_of_its_primary_and_answers_redis_cli() {
    survives_a_kill_of_its_primary("vm-protect-cow", "cow", "copy-on-write at 2M");
}

/// The kv guest protected with `--tracking tracking` (the primary says `safety`):
/// writes acknowledged before the primary's SIGKILL are all in the restored VM.
fn survives_a_kill_of_its_primary(name: &str, tracking: &str, safety: &str) {
    if !available() {
        return;
    }
    let port = free_port();
    let mut pair = Pair::start(
        name,
        &["--vm", "kv", "--port", &port.to_string()],
        &["--tracking", tracking],
    );
    assert!(pair.vm_line.contains(safety), "{}", pair.vm_line);

    assert_eq!(redis_cli(port, &["SET", "city", "Kyoto"]), "OK");
    for n in 1..=3 {
        assert_eq!(redis_cli(port, &["INCR", "visits"]), n.to_string());
    }
    pair.primary.0.kill().unwrap();
    pair.primary.0.wait().unwrap();

    let failover = wait_for(&pair.backup_lines, "failover ");
    wait_for(&pair.backup_lines, "restarted pid=");
    assert_eq!(redis_cli(port, &["GET", "city"]), "Kyoto", "{failover}");
    assert_eq!(redis_cli(port, &["INCR", "visits"]), "4", "{failover}");
    assert_eq!(redis_cli(port, &["DBSIZE"]), "2");
}

#[test]
fn a_vm_whose_backup_dies_keeps_answering_unprotected() {
    if !available() {
        return;
    }
    let port = free_port();
    let mut pair = Pair::start(
        "vm-alone",
        &["--vm", "kv", "--port", &port.to_string()],
        &[],
    );
    assert_eq!(redis_cli(port, &["SET", "k", "1"]), "OK");
    pair.backup.0.kill().unwrap();
    pair.backup.0.wait().unwrap();
    // Held replies are released once the primary knows no backup holds the VM.
    assert_eq!(redis_cli(port, &["INCR", "k"]), "2");
    assert_eq!(redis_cli(port, &["GET", "k"]), "2");
    assert!(pair.primary.0.try_wait().unwrap().is_none());
}

#[test]
fn a_counter_vm_restored_on_the_backup_runs_on_without_a_gap() {
    counter_runs_on_after_failover("vm-counter", "kernel");
}

#[test]
fn a_counter_vm_protected_copy_on_write_runs_on_without_a_gap() {
    counter_runs_on_after_failover("vm-counter-cow", "cow");
}

/// The counter guest checks every page and its count after the restore, and faults
/// on a gap or a bad byte: the backup then exits with an error.
fn counter_runs_on_after_failover(name: &str, tracking: &str) {
    if !fgbi_hyp::feature::available("KVM", probe(DirtyTracking::Classic)) {
        return;
    }
    let mut pair = Pair::start(
        name,
        &["--vm", "counter", "--vcpus", "2"],
        &["--tracking", tracking],
    );
    wait_for(&pair.primary_lines, "committed 5");
    pair.primary.0.kill().unwrap();
    pair.primary.0.wait().unwrap();
    let failover = wait_for(&pair.backup_lines, "failover ");
    wait_for(&pair.backup_lines, "restarted pid=");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        pair.backup.0.try_wait().unwrap().is_none(),
        "the restored VM stopped: {failover}"
    );
}

#[test]
fn vm_flags_that_do_not_fit_get_a_clear_error() {
    let key = key_file("vm-flags");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fgbi"))
            .args(args)
            .arg("--key")
            .arg(&key)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let backup = ["--backup", "127.0.0.1:9"];
    let (code, err) = run(&[&["primary", "--vm", "web", "--port", "1"][..], &backup].concat());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--port goes with --vm kv"), "{err}");
    let (code, err) = run(&[&["primary", "--vm", "kv"][..], &backup].concat());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--vm kv needs --port"), "{err}");
    let (code, err) = run(&[&["primary", "--vm", "nope"][..], &backup].concat());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown guest"), "{err}");
    let (code, err) = run(&[
        &["primary", "--vm", "web", "--tracking", "generator"][..],
        &backup,
    ]
    .concat());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("KVM's dirty log"), "{err}");
    let (code, err) = run(&[
        "backup",
        "--vm",
        "kv",
        "--restart",
        "true",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
    std::fs::remove_file(&key).unwrap();
}
