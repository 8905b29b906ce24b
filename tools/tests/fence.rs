//! A network partition between `fgbi primary` and `fgbi backup` (a proxy that stops
//! forwarding both ways without closing anything): the backup fences before failing
//! over, so one copy runs, never two.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use common::{key_file, lines, wait_for};

/// Forwards connections to `target` until `partitioned` is set; from then on it
/// reads and drops everything both ways, and holds new connections open silently.
fn proxy(target: SocketAddr, partitioned: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let server = if partitioned.load(Ordering::SeqCst) {
                None
            } else {
                TcpStream::connect(target).ok()
            };
            let pairs = match server {
                Some(server) => vec![
                    (
                        client.try_clone().unwrap(),
                        Some(server.try_clone().unwrap()),
                    ),
                    (server, Some(client)),
                ],
                None => vec![(client, None)],
            };
            for (mut from, mut to) in pairs {
                let partitioned = Arc::clone(&partitioned);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64 << 10];
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        if partitioned.load(Ordering::SeqCst) {
                            continue;
                        }
                        if let Some(to) = to.as_mut() {
                            if to.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                    // Keep the other side open: a partition closes nothing.
                    std::thread::sleep(Duration::from_secs(3600));
                });
            }
        }
    });
    address
}

struct Pair {
    primary: Child,
    primary_out: Receiver<String>,
    backup: Child,
    backup_out: Receiver<String>,
    backup_err: Receiver<String>,
    partitioned: Arc<AtomicBool>,
    /// Where the backup listens (the primary talks to it through the proxy).
    listening: SocketAddr,
}

/// Starts a backup fencing with `fence` and a primary talking to it through a
/// proxy, and waits until the backup committed a few epochs.
fn start(dir: &Path, fence: &str) -> Pair {
    let key = key_file(dir);
    let key = key.to_str().unwrap();
    let mut shared = ["--mem", "8M", "--key", key].map(String::from).to_vec();
    shared.extend(common::link(25));
    let mut backup = Command::new(env!("CARGO_BIN_EXE_fgbi"))
        .args(["backup", "--listen", "127.0.0.1:0", "--run-epochs", "3"])
        .args(&shared)
        .args(common::device("FGBI_RDMA_DEVICE_B"))
        .args(["--fence", fence, "--fence-timeout-ms", "5000"])
        .args(["--fence-retry-ms", "100"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let backup_out = lines(backup.stdout.take().unwrap());
    let backup_err = lines(backup.stderr.take().unwrap());
    let mut seen = Vec::new();
    let listening = wait_for(&backup_out, "listening", &mut seen);
    let target: SocketAddr = listening
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let partitioned = Arc::new(AtomicBool::new(false));
    let via = proxy(target, Arc::clone(&partitioned));
    let mut primary = Command::new(env!("CARGO_BIN_EXE_fgbi"))
        .args([
            "primary",
            "--backup",
            &via.to_string(),
            "--workload",
            "idle",
        ])
        .args(["--epoch-ms", "10"])
        .args(&shared)
        .args(common::device("FGBI_RDMA_DEVICE_A"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(dir.join("primary.pid"), primary.id().to_string()).unwrap();
    let primary_out = lines(primary.stdout.take().unwrap());
    wait_for(&backup_out, "committed 5", &mut seen);
    Pair {
        primary,
        primary_out,
        backup,
        backup_out,
        backup_err,
        partitioned,
        listening: target,
    }
}

fn scratch(name: &str) -> PathBuf {
    common::scratch(&format!("fence-{name}"))
}

#[test]
fn a_partitioned_primary_is_fenced_before_the_backup_takes_over() {
    let dir = scratch("kill");
    let fenced = dir.join("fenced");
    let fence = format!(
        "kill -9 \"$(cat {})\" && echo \"$FGBI_FENCE_PRIMARY $FGBI_FENCE_EPOCH\" > {}",
        dir.join("primary.pid").display(),
        fenced.display()
    );
    let mut pair = start(&dir, &fence);
    pair.partitioned.store(true, Ordering::SeqCst);
    let mut seen = Vec::new();
    let failover = wait_for(&pair.backup_out, "failover epoch=", &mut seen);
    assert!(failover.contains("fence_us="), "{failover}");
    // The fence ran first and stopped the primary: one copy runs.
    let status = pair.primary.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "the fence killed the primary");
    let record = std::fs::read_to_string(&fenced).unwrap();
    let epoch: u64 = failover["failover epoch=".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        record.starts_with("127.0.0.1:") && record.trim_end().ends_with(&format!(" {epoch}")),
        "the fence was told the primary's address and the epoch: {record}"
    );
    wait_for(&pair.backup_out, "running epochs=", &mut seen);
    assert!(pair.backup.wait().unwrap().success());
    drop(pair.primary_out);
    drop(pair.backup_err);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn when_the_fence_fails_the_backup_does_not_take_over_and_the_primary_runs_on() {
    let dir = scratch("fail");
    let mut pair = start(&dir, "echo cannot reach the power switch >&2; exit 3");
    pair.partitioned.store(true, Ordering::SeqCst);
    let mut seen = Vec::new();
    let line = wait_for(&pair.backup_err, "NOT failing over", &mut seen);
    assert!(line.contains("exit status: 3"), "{line}");
    // While the backup waits for the primary, strangers call more often than the
    // fence retry interval, every other one saying nothing until the handshake
    // times out: each is refused, and the fence is still retried.
    let stop = Arc::new(AtomicBool::new(false));
    let strangers = {
        let (stop, target) = (Arc::clone(&stop), pair.listening);
        std::thread::spawn(move || {
            let mut silent = Vec::new();
            for call in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(mut stream) = TcpStream::connect(target) {
                    if call % 2 == 0 {
                        let _ = stream.write_all(b"HELO stranger\r\n");
                    } else {
                        silent.push(stream);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let line = wait_for(&pair.backup_err, "NOT failing over", &mut seen);
    assert!(line.contains("exit status: 3"), "{line}");
    stop.store(true, Ordering::SeqCst);
    strangers.join().unwrap();
    assert!(
        seen.iter()
            .any(|l| l.contains("fgbi: refused a connection from")),
        "{seen:#?}"
    );
    let mut primary_seen = Vec::new();
    wait_for(&pair.primary_out, "unprotected", &mut primary_seen);
    // One copy: the primary runs on, the backup has not failed over.
    assert!(
        pair.primary.try_wait().unwrap().is_none(),
        "the primary runs"
    );
    assert!(
        pair.backup.try_wait().unwrap().is_none(),
        "the backup waits"
    );
    let backup_lines: Vec<String> = pair.backup_out.try_iter().collect();
    assert!(
        !backup_lines.iter().any(|l| l.contains("failover")),
        "{backup_lines:#?}"
    );
    pair.primary.kill().unwrap();
    pair.backup.kill().unwrap();
    pair.primary.wait().unwrap();
    pair.backup.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
