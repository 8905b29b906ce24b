//! `fgbi demo --workload NAME`: the synthetic workload's failover, replica digest
//! against checkpoint digest.

use std::collections::HashMap;
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fgbi::bench::Percentiles;
use fgbi::fault::FAULT_ENV;

use super::{DemoArgs, early_failover, link_flags};
use crate::children::{Kill, Scratch, field, free_port, lines, wait_for, write_key};

/// Runs `fgbi demo --workload NAME`: a backup and a primary of the synthetic
/// workload as two processes, the primary killed with SIGKILL after `--epochs`
/// committed epochs (or killing itself at `--fault POINT@N`), the backup rebuilding
/// the workload; prints type I downtime in parts and checks the replica's digest
/// against the primary's checkpoint.
pub fn run(args: &DemoArgs, workload: &str) -> Result<ExitCode, String> {
    if args
        .fault
        .as_deref()
        .is_some_and(|f| f.starts_with("released@"))
    {
        return Err(
            "--fault released@N is a point of output commit, which the key-value service has and a synthetic workload has not: use pause, sent or acked with --workload".into(),
        );
    }
    let dir = Scratch::new()?;
    let key = write_key(&dir.0)?;
    let port = free_port()?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let common = |cmd: &mut Command, backup| {
        cmd.arg("--mem")
            .arg(args.mem.to_string())
            .arg("--key")
            .arg(&key)
            .arg("--heartbeat-ms")
            .arg(args.heartbeat_ms.to_string())
            .args(link_flags(args, backup))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
    };
    let mut backup_cmd = Command::new(&exe);
    backup_cmd.args(["backup", "--listen", &format!("127.0.0.1:{port}")]);
    common(&mut backup_cmd, true);
    let mut backup = Kill(
        backup_cmd
            .spawn()
            .map_err(|e| format!("cannot start the backup: {e}"))?,
    );
    let backup_lines = lines(&mut backup.0)?;
    wait_for(&backup_lines, "listening", Duration::from_secs(10))?;

    let mut primary_cmd = Command::new(&exe);
    match &args.fault {
        Some(fault) => primary_cmd.env(FAULT_ENV, fault),
        None => primary_cmd.env_remove(FAULT_ENV),
    };
    primary_cmd.args([
        "primary",
        "--backup",
        &format!("127.0.0.1:{port}"),
        "--workload",
        workload,
        "--digests",
    ]);
    primary_cmd.args(args.tracking_args());
    common(&mut primary_cmd, false);
    let mut primary = Kill(
        primary_cmd
            .spawn()
            .map_err(|e| format!("cannot start the primary: {e}"))?,
    );
    let primary_lines = lines(&mut primary.0)?;
    let mut digests = HashMap::new();
    let mut pauses = Vec::new();
    let mut protected = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line =
            match primary_lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => line,
                // It killed itself at its fault point.
                Err(RecvTimeoutError::Disconnected) if args.fault.is_some() => break,
                Err(_) => {
                    return Err(match &args.fault {
                        Some(fault) => format!(
                            "the primary did not reach its fault point {fault} in 120 s{}",
                            early_failover(&backup_lines)
                        ),
                        None => "the primary stopped or stalled before the failure was injected"
                            .to_string(),
                    });
                }
            };
        // The failure is to come while a backup holds the workload (the primary is
        // unprotected during initial sync, before its first commit).
        if line.starts_with("unprotected") && protected {
            return Err(format!(
                "the primary lost its backup before the failure was injected: {line}{}",
                early_failover(&backup_lines)
            ));
        }
        protected |= line.starts_with("committed ");
        sent(&line, &mut digests, &mut pauses);
        if let Some(n) = line
            .strip_prefix("committed ")
            .and_then(|n| n.parse::<u64>().ok())
        {
            if n >= args.epochs && args.fault.is_none() {
                break;
            }
        }
    }
    let killed_at = SystemTime::now();
    if args.fault.is_none() {
        primary
            .0
            .kill()
            .map_err(|e| format!("cannot kill the primary: {e}"))?;
    }
    // The primary may have sent (and the backup committed) more before it died.
    let status = primary
        .0
        .wait()
        .map_err(|e| format!("cannot wait for the primary: {e}"))?;
    // Killed by us or, at its fault point, by itself: anything else failed the run.
    if std::os::unix::process::ExitStatusExt::signal(&status) != Some(9) {
        return Err(format!(
            "the primary ended ({status}) instead of being killed{}: see its output above",
            args.fault
                .as_ref()
                .map(|f| format!(" at its fault point {f}"))
                .unwrap_or_default()
        ));
    }
    for line in primary_lines.iter() {
        sent(&line, &mut digests, &mut pauses);
    }
    let killed_ns = killed_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let failover = wait_for(&backup_lines, "failover ", Duration::from_secs(30))?;
    let running = wait_for(&backup_lines, "running ", Duration::from_secs(60))?;
    let get = |name: &str| {
        field(&failover, name, ' ')
            .and_then(|v| v.parse::<u128>().ok())
            .unwrap_or(0)
    };
    let epoch = get("epoch=") as u64;
    let detect_us = get("detected_ns=").saturating_sub(killed_ns) as f64 / 1e3;
    let (finish, restore, first) = (get("finish_us="), get("restore_us="), get("first_run_us="));
    let replica_digest = field(&failover, "digest=", ' ')
        .unwrap_or_default()
        .to_string();
    let matches = digests.get(&epoch) == Some(&replica_digest);
    let pause = Percentiles::of(&mut pauses);
    let how = match &args.fault {
        Some(fault) => format!("killed itself at {fault}"),
        None => format!("killed after epoch {}", args.epochs),
    };
    println!(
        "fgbi demo: {workload} on {} MiB, primary {how} (SIGKILL)",
        args.mem >> 20
    );
    println!(
        "type II downtime (pause per checkpoint): p50 {:.0} us, p99 {:.0} us, max {:.0} us over {} checkpoints",
        pause.p50,
        pause.p99,
        pause.max,
        pauses.len()
    );
    println!(
        "type I downtime: {:.1} ms in all",
        (detect_us + (finish + restore + first) as f64) / 1e3
    );
    println!(
        "  detection (kill to backup's verdict) {:>10.1} ms",
        detect_us / 1e3
    );
    println!(
        "  finishing the last epoch            {:>10.3} ms",
        finish as f64 / 1e3
    );
    println!(
        "  rebuilding the program              {:>10.3} ms",
        restore as f64 / 1e3
    );
    println!(
        "  first epoch of the program          {:>10.3} ms",
        first as f64 / 1e3
    );
    println!(
        "replica at epoch {epoch}: digest {} the primary's checkpoint",
        if matches { "equals" } else { "DIFFERS FROM" }
    );
    println!("backup: {}", running.trim());
    if matches {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}

/// Takes the digest and pause of a `sent` line of the primary.
fn sent(line: &str, digests: &mut HashMap<u64, String>, pauses: &mut Vec<f64>) {
    let Some(rest) = line.strip_prefix("sent ") else {
        return;
    };
    let epoch: u64 = field(rest, "", ' ')
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if let Some(d) = field(rest, "digest=", ' ') {
        digests.insert(epoch, d.to_string());
    }
    if let Some(p) = field(rest, "pause_us=", ' ').and_then(|v| v.parse::<f64>().ok()) {
        pauses.push(p);
    }
}
