//! `fgbi primary` killed (SIGKILL, by `FGBI_FAULT`) in the middle of an epoch's
//! transfer and during initial sync: the backup fails over to the last checkpoint it
//! committed in the first case; in the second it holds no checkpoint, says it was
//! never protected, and does not fail over.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::children::Kill;
use common::{device, env, key_file, lines, scratch, wait_for};
use fgbi_transport::Implementation;

/// What the two sides printed.
struct Run {
    /// The primary's stdout.
    primary: Vec<String>,
    /// The backup's stdout and stderr, and its exit code.
    backup: Vec<String>,
    backup_err: Vec<String>,
    backup_code: Option<i32>,
}

/// The flags both sides take: memory, key, heartbeat and transport.
fn shared(key: &str, transport: &str) -> Vec<String> {
    let heartbeat = env("FGBI_TEST_HEARTBEAT_MS").unwrap_or_else(|| "25".into());
    [
        "--mem",
        "16M",
        "--key",
        key,
        "--heartbeat-ms",
        &heartbeat,
        "--transport",
        transport,
    ]
    .map(String::from)
    .to_vec()
}

/// Starts `fgbi backup` on `listen` (its device `FGBI_RDMA_DEVICE_B`), to run two
/// epochs after failing over; its stdout and stderr as lines.
fn backup(listen: &str, shared: &[String]) -> (Kill, Receiver<String>, Receiver<String>) {
    let mut backup = Command::new(env!("CARGO_BIN_EXE_fgbi"))
        .args(["backup", "--listen", listen, "--run-epochs", "2"])
        .args(shared)
        .args(device("FGBI_RDMA_DEVICE_B"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines(backup.stdout.take().unwrap());
    let err = lines(backup.stderr.take().unwrap());
    (Kill(backup), out, err)
}

/// Starts `fgbi primary --workload web` against `address` (its device
/// `FGBI_RDMA_DEVICE_A`), with `FGBI_FAULT=fault` if given; its stdout as lines.
fn primary(address: &str, shared: &[String], fault: Option<&str>) -> (Kill, Receiver<String>) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fgbi"));
    command
        .args(["primary", "--backup", address, "--workload", "web"])
        .args(["--digests", "--epoch-ms", "10"])
        .args(shared)
        .args(device("FGBI_RDMA_DEVICE_A"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    match fault {
        Some(fault) => command.env("FGBI_FAULT", fault),
        None => command.env_remove("FGBI_FAULT"),
    };
    let mut primary = command.spawn().unwrap();
    let out = lines(primary.stdout.take().unwrap());
    (Kill(primary), out)
}

/// Waits up to a minute for `child` to end; its exit code.
fn exit_code(child: &mut Child, what: &str) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(Instant::now() < deadline, "{what}: the backup never ended");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `fgbi backup` and `fgbi primary --workload web` (16 MiB: initial sync is a
/// few pre-copy epochs) over `transport`, the primary with `FGBI_FAULT=fault`, until
/// both have ended.
fn run(name: &str, transport: &str, fault: &str) -> Run {
    let dir = scratch(&format!("kill-{name}-{transport}"));
    let key = key_file(&dir);
    let shared = shared(key.to_str().unwrap(), transport);
    let (mut backup, backup_out, backup_err) = backup("127.0.0.1:0", &shared);
    let mut seen = Vec::new();
    let listening = wait_for(&backup_out, "listening", &mut seen);
    let address = listening.split_whitespace().nth(1).unwrap().to_string();
    let (mut primary, primary_out) = primary(&address, &shared, Some(fault));
    let status = primary.0.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "{fault}: the primary killed itself"
    );
    let code = exit_code(&mut backup.0, fault);
    std::fs::remove_dir_all(&dir).unwrap();
    seen.extend(backup_out.iter());
    Run {
        primary: primary_out.iter().collect(),
        backup: seen,
        backup_err: backup_err.iter().collect(),
        backup_code: code,
    }
}

/// The transports to kill over, as `--transport` names them: `FGBI_TEST_TRANSPORT`
/// alone when set (the Soft-RoCE guest sets `rdma`, and `FGBI_TEST_HEARTBEAT_MS`), or
/// else every one this machine runs over TCP.
fn transports() -> Vec<String> {
    if let Some(transport) = env("FGBI_TEST_TRANSPORT") {
        return vec![transport];
    }
    [
        (Implementation::Std, "std"),
        (Implementation::Uring, "uring"),
    ]
    .into_iter()
    .filter(|(i, _)| fgbi_hyp::feature::available(i.as_str(), i.available()))
    .map(|(_, name)| name.to_string())
    .collect()
}

/// The value of `name=` in `line`.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

#[test]
fn killed_mid_transfer_the_backup_keeps_the_last_committed_checkpoint_and_fails_over() {
    for transport in &transports() {
        // The fourth checkpoint's transfer: initial sync is over by then.
        let run = run("transfer", transport, "transfer@4");
        let failover = run
            .backup
            .iter()
            .find(|l| l.starts_with("failover "))
            .unwrap_or_else(|| panic!("{transport}: no failover: {:#?}", run.backup_err));
        let epoch = field(failover, "epoch").unwrap();
        let digest = field(failover, "digest").unwrap();
        let sent = run
            .primary
            .iter()
            .rev()
            .find(|l| l.starts_with("sent "))
            .unwrap();
        let committed = run
            .primary
            .iter()
            .rev()
            .find(|l| l.starts_with("committed "));
        // The torn epoch was never reported sent: the last one sent is the last
        // committed, and the replica holds exactly it. (Epochs pipeline: the primary
        // may have died before it read that commit.)
        assert_eq!(sent.split_whitespace().nth(1), Some(epoch), "{transport}");
        let committed: u64 = committed
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        assert!(
            committed <= epoch.parse().unwrap(),
            "{transport}: the primary saw commit {committed}, the replica holds {epoch}"
        );
        assert_eq!(field(sent, "digest"), Some(digest), "{transport}");
        // Over TCP the backup was reading the torn epoch when the connection closed.
        // Over RDMA the half epoch went into its ring without its CPU: it sees only
        // the connection close, and the epoch's commit never came.
        assert!(
            failover.contains("in the middle of an epoch")
                || (transport == "rdma" && failover.contains("closed the connection")),
            "{transport}: {failover}"
        );
        assert!(run.backup.iter().any(|l| l.starts_with("running epochs=")));
        assert_eq!(run.backup_code, Some(0), "{transport}");
    }
}

#[test]
fn killed_during_initial_sync_the_backup_says_it_was_never_protected_and_does_not_fail_over() {
    for transport in &transports() {
        // After the first pre-copy epoch, and in the middle of the checkpoint that
        // would have ended the sync.
        for fault in ["sync@1", "transfer@1"] {
            let run = run("sync", transport, fault);
            assert!(
                run.primary.iter().any(|l| l.starts_with("synced 1 ")),
                "{transport} {fault}: {:#?}",
                run.primary
            );
            assert!(
                !run.primary.iter().any(|l| l.starts_with("committed ")),
                "{transport} {fault}: no checkpoint committed"
            );
            assert!(
                !run.backup.iter().any(|l| l.starts_with("failover ")),
                "{transport} {fault}: {:#?}",
                run.backup
            );
            let said = run.backup_err.join("\n");
            assert!(
                said.contains("was never protected and does NOT fail over"),
                "{transport} {fault}: {said}"
            );
            assert_eq!(run.backup_code, Some(2), "{transport} {fault}");
        }
    }
}

#[test]
fn a_killed_backup_is_replaced_the_primary_syncs_the_new_one_and_fails_over_to_it() {
    for transport in &transports() {
        let dir = scratch(&format!("kill-backup-{transport}"));
        let key = key_file(&dir);
        let shared = shared(key.to_str().unwrap(), transport);
        let listen = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().to_string()
        };
        let (mut first, first_out, _first_err) = backup(&listen, &shared);
        let mut seen = Vec::new();
        wait_for(&first_out, "listening", &mut seen);
        let (mut primary, primary_out) = primary(&listen, &shared, None);
        wait_for(&primary_out, "committed 3", &mut seen);
        first.0.kill().unwrap();
        first.0.wait().unwrap();
        wait_for(&primary_out, "unprotected", &mut seen);
        // A new, empty backup on the same address: synced while the program runs.
        let (mut second, second_out, second_err) = backup(&listen, &shared);
        let connected = wait_for(&primary_out, "connected", &mut seen);
        assert!(
            connected.contains("backup_committed=0"),
            "{transport}: the new backup is empty: {connected}"
        );
        // Protected again: a checkpoint committed after the sync.
        wait_for(&primary_out, "committed ", &mut seen);
        wait_for(&primary_out, "committed ", &mut seen);
        primary.0.kill().unwrap();
        primary.0.wait().unwrap();
        let sent: Vec<String> = seen
            .iter()
            .cloned()
            .chain(primary_out.iter())
            .filter(|l| l.starts_with("sent "))
            .collect();
        let code = exit_code(&mut second.0, transport);
        let backup_said: Vec<String> = second_out.iter().collect();
        let failover = backup_said
            .iter()
            .find(|l| l.starts_with("failover "))
            .unwrap_or_else(|| {
                panic!(
                    "{transport}: no failover: {backup_said:#?} {:#?}",
                    second_err.iter().collect::<Vec<_>>()
                )
            });
        let epoch = field(failover, "epoch").unwrap();
        let digest = field(failover, "digest").unwrap();
        let checkpoint = sent
            .iter()
            .rev()
            .find(|l| l.split_whitespace().nth(1) == Some(epoch))
            .unwrap_or_else(|| panic!("{transport}: epoch {epoch} was never sent: {sent:#?}"));
        assert_eq!(
            field(checkpoint, "digest"),
            Some(digest),
            "{transport}: the new backup's replica equals checkpoint {epoch}"
        );
        assert_eq!(code, Some(0), "{transport}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
