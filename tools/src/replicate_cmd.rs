//! `fgbi primary`, `fgbi backup` and `fgbi demo`: replication between two processes
//! (or hosts) and failover, on a synthetic workload.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use fgbi::backup::{self, BackupOptions};
use fgbi::bench::Percentiles;
use fgbi::primary::{self, PrimaryEvent, PrimaryOptions};
use fgbi_engine::{EncoderConfig, Geometry, Mode};
use fgbi_hyp::synthetic::{SyntheticMachine, Tracking};
use fgbi_transport::{Liveness, PresharedKey, TransportConfig};

use crate::size::parse_size;
use crate::transport_arg::TransportArgs;

/// Settings both sides must agree on.
#[derive(Args, Debug, Clone)]
pub struct Shared {
    /// Protected memory size (K, M, G suffixes).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    mem: u64,
    /// Block size in bytes.
    #[arg(long, default_value = "64", value_parser = parse_size)]
    block: u64,
    /// Pre-shared key file (at least 16 bytes, readable by its owner only).
    #[arg(long)]
    key: PathBuf,
    #[command(flatten)]
    link: TransportArgs,
    /// Heartbeat interval, milliseconds; a peer silent for four intervals is dead.
    #[arg(long, default_value_t = 25)]
    heartbeat_ms: u64,
}

impl Shared {
    fn configs(&self, mode: Mode) -> Result<(EncoderConfig, TransportConfig), String> {
        let block = usize::try_from(self.block).map_err(|_| "--block is too large".to_string())?;
        let geometry = Geometry::new(self.mem, block).map_err(|e| e.to_string())?;
        let implementation = self.link.implementation()?;
        let mut transport = TransportConfig::new(geometry, implementation);
        transport.rdma = self.link.rdma();
        let interval = Duration::from_millis(self.heartbeat_ms.max(1));
        transport.liveness = Liveness {
            interval,
            timeout: interval * 4,
        };
        Ok((EncoderConfig::new(geometry, mode), transport))
    }

    fn key(&self) -> Result<PresharedKey, String> {
        PresharedKey::from_file(&self.key).map_err(|e| e.to_string())
    }
}

/// Arguments of `fgbi primary`.
#[derive(Args, Debug, Clone)]
pub struct PrimaryArgs {
    #[command(flatten)]
    shared: Shared,
    /// The backup's address.
    #[arg(long)]
    backup: SocketAddr,
    /// Workload to protect.
    #[arg(long, default_value = "web")]
    workload: String,
    /// Encoding mode.
    #[arg(long, default_value = "fgbi")]
    mode: Mode,
    /// Epoch length, milliseconds.
    #[arg(long, default_value_t = 25)]
    epoch_ms: u64,
    /// Stop after this many committed epochs (default: run until killed).
    #[arg(long)]
    epochs: Option<u64>,
    /// Workload seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print each checkpoint's digest (costs a pass over memory, outside the pause).
    #[arg(long)]
    digests: bool,
}

/// Runs `fgbi primary`: protects a workload and replicates it to the backup.
pub fn primary(args: PrimaryArgs) -> Result<ExitCode, String> {
    let (encoder, transport) = args.shared.configs(args.mode)?;
    let key = args.shared.key()?;
    let mem = usize::try_from(args.shared.mem).map_err(|_| "--mem is too large".to_string())?;
    let mut machine =
        SyntheticMachine::new(&args.workload, mem, args.seed, Tracking::Kernel, false)
            .map_err(|e| e.to_string())?;
    let options = PrimaryOptions {
        encoder,
        transport,
        backup: args.backup,
        epoch: Duration::from_millis(args.epoch_ms.max(1)),
        epochs: args.epochs,
        connect_timeout: Duration::from_secs(10),
        digests: args.digests,
    };
    let mut out = std::io::stdout().lock();
    let last = primary::run(
        &mut machine,
        |m| m.run().map_err(Into::into),
        &options,
        &key,
        |e| {
            let line = match e {
                PrimaryEvent::Sent {
                    epoch,
                    pause,
                    bytes,
                    digest,
                } => format!(
                    "sent {epoch} pause_us={} bytes={bytes}{}",
                    pause.as_micros(),
                    digest
                        .map(|d| format!(" digest={d:032x}"))
                        .unwrap_or_default()
                ),
                PrimaryEvent::Committed(n) => format!("committed {n}"),
                PrimaryEvent::Unprotected => {
                    "unprotected: the backup is unreachable; the workload keeps running".into()
                }
                PrimaryEvent::Connected(n) => format!("connected backup_committed={n}"),
            };
            // A closed stdout must not stop replication.
            let _ = writeln!(out, "{line}").and_then(|()| out.flush());
        },
    )
    .map_err(|e| e.to_string())?;
    println!("done committed={last}");
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `fgbi backup`.
#[derive(Args, Debug, Clone)]
pub struct BackupArgs {
    #[command(flatten)]
    shared: Shared,
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// After failover, run the workload for this many epochs and report.
    #[arg(long, default_value_t = 20)]
    run_epochs: u64,
}

/// Runs `fgbi backup`: holds the replica and fails over when the primary dies.
pub fn backup(args: BackupArgs) -> Result<ExitCode, String> {
    let (encoder, transport) = args.shared.configs(Mode::Fgbi)?;
    let key = args.shared.key()?;
    let listener = TcpListener::bind(args.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    println!(
        "listening {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let options = BackupOptions {
        encoder,
        transport,
        slots: 2,
        max_state: 1 << 20,
    };
    let (report, mut machine) = backup::run(
        &listener,
        &options,
        &key,
        |replica, state| SyntheticMachine::restore(replica, state, Tracking::Kernel),
        |m: &mut SyntheticMachine| m.run(),
        |n| println!("committed {n}"),
    )
    .map_err(|e| e.to_string())?;
    let detected_ns = report
        .detected_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    println!(
        "failover epoch={} digest={:032x} detected_ns={detected_ns} silence_us={} finish_us={} restore_us={} first_run_us={} cause={:?}",
        report.epoch,
        report.digest,
        report.silence.as_micros(),
        report.finish.as_micros(),
        report.restore.as_micros(),
        report.first_run.as_micros(),
        report.cause
    );
    for _ in 0..args.run_epochs {
        machine.run().map_err(|e| e.to_string())?;
    }
    println!("running epochs={} on the backup", machine.epochs());
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `fgbi demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Workload to protect.
    #[arg(long, default_value = "web")]
    workload: String,
    /// Protected memory size.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    mem: u64,
    /// Committed epochs before the primary is killed.
    #[arg(long, default_value_t = 40)]
    epochs: u64,
    /// Transport: rdma, tcp, uring, std or auto (as for `fgbi primary`).
    #[arg(long, default_value = "auto")]
    transport: String,
}

/// Runs `fgbi demo`: a backup and a primary as two processes, the primary killed with
/// SIGKILL, the backup taking over; prints type I downtime in parts.
pub fn demo(args: DemoArgs) -> Result<ExitCode, String> {
    let dir = std::env::temp_dir().join(format!("fgbi-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let key = write_key(&dir)?;
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let common = |cmd: &mut Command| {
        cmd.arg("--mem")
            .arg(args.mem.to_string())
            .arg("--key")
            .arg(&key)
            .arg("--transport")
            .arg(&args.transport)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
    };
    let mut backup_cmd = Command::new(&exe);
    backup_cmd.args(["backup", "--listen", &format!("127.0.0.1:{port}")]);
    common(&mut backup_cmd);
    let mut backup = Kill(
        backup_cmd
            .spawn()
            .map_err(|e| format!("cannot start the backup: {e}"))?,
    );
    let backup_lines = lines(&mut backup.0)?;
    wait_for(&backup_lines, "listening", Duration::from_secs(10))?;

    let mut primary_cmd = Command::new(&exe);
    primary_cmd.args([
        "primary",
        "--backup",
        &format!("127.0.0.1:{port}"),
        "--workload",
        &args.workload,
        "--digests",
    ]);
    common(&mut primary_cmd);
    let mut primary = Kill(
        primary_cmd
            .spawn()
            .map_err(|e| format!("cannot start the primary: {e}"))?,
    );
    let primary_lines = lines(&mut primary.0)?;
    let mut digests = std::collections::HashMap::new();
    let mut pauses = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = primary_lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| {
                "the primary stopped or stalled before the failure was injected".to_string()
            })?;
        if let Some(rest) = line.strip_prefix("sent ") {
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
        if let Some(n) = line
            .strip_prefix("committed ")
            .and_then(|n| n.parse::<u64>().ok())
        {
            if n >= args.epochs {
                break;
            }
        }
    }
    let killed_at = SystemTime::now();
    primary
        .0
        .kill()
        .map_err(|e| format!("cannot kill the primary: {e}"))?;
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
    println!(
        "fgbi demo: {} on {} MiB, primary killed (SIGKILL) after epoch {}",
        args.workload,
        args.mem >> 20,
        args.epochs
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
    let _ = std::fs::remove_dir_all(&dir);
    if matches {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}

/// A child process killed when dropped, so no demo leaves one behind.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_key(dir: &Path) -> Result<PathBuf, String> {
    let path = dir.join("link.key");
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(&key))
        .map_err(|e| format!("cannot write the key file {}: {e}", path.display()))?;
    Ok(path)
}

/// The child's stdout as a channel of lines.
fn lines(child: &mut Child) -> Result<mpsc::Receiver<String>, String> {
    let stdout = child.stdout.take().ok_or("the child has no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

fn wait_for(
    lines: &mpsc::Receiver<String>,
    prefix: &str,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| format!("no {prefix:?} line within {timeout:?}"))?;
        if line.starts_with(prefix) {
            return Ok(line);
        }
    }
}

/// The value after `name` in `line`, up to `end`.
fn field<'a>(line: &'a str, name: &str, end: char) -> Option<&'a str> {
    let start = line.find(name)? + name.len();
    let rest = &line[start..];
    Some(rest.split(end).next().unwrap_or(rest))
}
