//! `fgbi demo`: failover of a protected key-value service, on one host.
//!
//! The demo starts `fgbi backup --restart "fgbi kv --restart ..."`, then the
//! key-value service (`fgbi kv`, examples/kv) protected by that backup with output
//! commit, drives it from several client connections that record every write the
//! service acknowledges, kills the service with SIGKILL in the middle of the load,
//! waits for the backup to restart it from the replica, reconnects the clients, writes
//! on, and reads every acknowledged write back. It prints type II downtime (from the
//! primary's per-epoch lines), type I downtime in parts, bytes per epoch, and the
//! writes acknowledged and lost; `--json` writes the same. It exits 1 if a write was
//! lost, 2 if the failover did not happen. With `--vm` the service is the `kv` guest
//! in a KVM micro-VM: `fgbi primary --vm kv` and `fgbi backup --vm kv`, which
//! restores the VM and serves it on the same port.

mod client;
mod synthetic;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use fgbi::bench::Percentiles;
use fgbi::fault::FAULT_ENV;
use fgbi_engine::Mode;
use fgbi_hyp::synthetic::Tracking;
use serde_json::json;

use crate::children::{
    Kill, Scratch, StderrLog, field, free_port, lines, shell_quote, wait_for, write_key,
};
use crate::size::parse_size;
use crate::transport_arg::TransportArgs;
use client::{Conn, Ledger};

/// Client connections, unless `--clients` says otherwise.
const CLIENTS: usize = 4;
/// Heartbeat interval in milliseconds, unless `--heartbeat-ms` says otherwise.
const HEARTBEAT_MS: u64 = 25;

/// Arguments of `fgbi demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Mode of the protected service: remus, xbzrle or fgbi (output commit), or llm
    /// (inputs logged at the backup, replies at once, replay after failover).
    #[arg(long, default_value = "fgbi")]
    mode: Mode,
    /// Size of the service's store (protected memory).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    mem: u64,
    /// Milliseconds between checkpoints [default: 25, llm mode 200].
    #[arg(long)]
    epoch_ms: Option<u64>,
    /// Client connections writing at once.
    #[arg(long, default_value_t = CLIENTS)]
    clients: usize,
    /// Milliseconds of load before the service is killed.
    #[arg(long, default_value_t = 3000)]
    kill_after_ms: u64,
    /// Milliseconds of load on the restarted service before the check.
    #[arg(long, default_value_t = 1000)]
    after_ms: u64,
    /// Also write the results to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    link: TransportArgs,
    /// The backup's RDMA device [default: --rdma-device] (two devices of one host
    /// carry the link as two hosts' would).
    #[arg(long, value_name = "DEVICE")]
    backup_rdma_device: Option<String>,
    /// Heartbeat interval, milliseconds; a peer silent for four intervals is dead.
    #[arg(long, default_value_t = HEARTBEAT_MS)]
    heartbeat_ms: u64,
    /// Instead of killing the service after --kill-after-ms (the workload after
    /// --epochs), let it kill itself at POINT@N (sync, pause, transfer, sent, acked
    /// or released, the last not with --workload; the Nth time): docs/operations.md.
    #[arg(long, value_name = "POINT@N", hide = true)]
    fault: Option<String>,
    /// Reply before the backup committed (to show what output commit prevents).
    #[arg(long, hide = true, conflicts_with = "vm")]
    no_output_commit: bool,
    /// With --mode llm: restart without replaying the input log (to show what the
    /// replay prevents).
    #[arg(long, hide = true)]
    no_replay: bool,
    /// Run the key-value service inside a KVM micro-VM (the kv guest, `fgbi primary
    /// --vm kv`), restored by the backup (`fgbi backup --vm kv`) on failover.
    #[arg(long, conflicts_with = "workload")]
    vm: bool,
    /// Protect a synthetic workload (web, npb-ep, sys, dense, dup, idle) instead of the
    /// service, kill it after --epochs committed epochs, and compare digests.
    #[arg(long)]
    workload: Option<String>,
    /// With --vm or --workload: where the primary's dirty pages come from and how a
    /// checkpoint keeps them, as `fgbi primary --tracking`: kernel (copied in the
    /// pause) or cow (copy-on-write), or generator with --workload.
    #[arg(long)]
    tracking: Option<Tracking>,
    /// With --workload: committed epochs before the primary is killed.
    #[arg(long, default_value_t = 40, requires = "workload")]
    epochs: u64,
}

impl DemoArgs {
    /// One failover of the key-value service in `mode` as `fgbi bench` runs it:
    /// `mem` bytes of store, a checkpoint every `epoch_ms` over `link`, killed after
    /// `load_ms[0]` of load and loaded `load_ms[1]` more once restarted.
    pub(crate) fn service(
        mode: Mode,
        mem: u64,
        epoch_ms: u64,
        link: TransportArgs,
        load_ms: [u64; 2],
    ) -> Self {
        let [kill_after_ms, after_ms] = load_ms;
        Self {
            mode,
            mem,
            epoch_ms: Some(epoch_ms),
            clients: CLIENTS,
            kill_after_ms,
            after_ms,
            json: None,
            link,
            backup_rdma_device: None,
            heartbeat_ms: HEARTBEAT_MS,
            fault: None,
            no_output_commit: false,
            no_replay: false,
            vm: false,
            workload: None,
            tracking: None,
            epochs: 0,
        }
    }

    /// `--tracking` for the primary, when given.
    fn tracking_args(&self) -> Vec<String> {
        self.tracking
            .map(|t| vec!["--tracking".into(), t.as_str().into()])
            .unwrap_or_default()
    }
}

/// Runs `fgbi demo`.
pub fn run(args: DemoArgs) -> Result<ExitCode, String> {
    if args.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    if args.tracking.is_some() && !args.vm && args.workload.is_none() {
        return Err(
            "--tracking goes with --vm or --workload: the kv application keeps its pages by copying them in the pause".into(),
        );
    }
    // Refused here, before any process starts, if it cannot run.
    args.link.implementation()?;
    match &args.workload {
        Some(workload) => synthetic::run(&args, workload),
        None => kv(&args),
    }
}

/// What the primary's per-epoch lines said.
#[derive(Default)]
pub(crate) struct PrimaryStats {
    /// The pause of each checkpoint, microseconds.
    pub pauses: Vec<f64>,
    /// Bytes sent, every checkpoint.
    pub wire_bytes: u64,
    /// The last epoch committed.
    pub committed: u64,
}

/// Type I downtime's parts, microseconds, from the backup's `failover` line and the
/// kill's time.
pub(crate) struct Failover {
    /// The epoch the backup restarted the service from.
    pub epoch: u64,
    /// From the kill to the backup's verdict.
    pub detect: f64,
    /// Finishing the last epoch.
    pub apply: f64,
    /// Handing the replica over until the restarted service serves, replay aside.
    pub restore: f64,
    /// Replaying the input log (LLM), part of the restore's time.
    pub replay: f64,
    /// Inputs replayed.
    pub replayed: u64,
    /// From the kill to the first reply of the restarted service.
    pub first_reply: f64,
    /// What the restarted service said when it served.
    pub ready: String,
}

/// How the protected key-value service is run: the commands of its two sides and
/// what they print.
struct Service {
    /// The backup, listening at once.
    backup: Command,
    /// The protected service, replicating to the backup.
    primary: Command,
    /// The lines the primary prints once it serves and once a backup holds it.
    ready: [&'static str; 2],
    /// What the primary's lines start with (its per-epoch lines follow it).
    prefix: &'static str,
    /// The line the backup prints when the restarted service has ended.
    ended: Option<&'static str>,
}

/// The key-value service of examples/kv (`fgbi kv`), restarted by `fgbi backup
/// --restart` from the replica's memory.
/// With `input_log` (LLM mode), both sides also get the input log's address.
fn application(
    args: &DemoArgs,
    exe: &Path,
    common: &[String],
    service: SocketAddr,
    input_log: Option<SocketAddr>,
) -> Service {
    let mem = args.mem.to_string();
    let port = service.port().to_string();
    let restart = format!(
        "exec {} kv --restart --port {port} --mem {mem}{}",
        shell_quote(exe),
        if args.no_replay { " --no-replay" } else { "" }
    );
    let mut backup = Command::new(exe);
    backup
        .arg("backup")
        .args(common)
        .args(["--restart", &restart]);
    let mut primary = Command::new(exe);
    primary
        .args(["kv", "--port", &port])
        .args(common)
        .args(["--verify-every", "0", "--log-epochs"])
        .args(link_flags(args, false));
    if let Some(addr) = input_log {
        backup.args(["--input-log", &addr.to_string()]);
        primary.args(["--input-log", &addr.to_string()]);
    }
    if args.no_output_commit {
        primary.arg("--no-output-commit");
    }
    Service {
        backup,
        primary,
        ready: ["kv: listening", "kv: connected"],
        prefix: "kv: ",
        ended: Some("restarted command ended"),
    }
}

/// The kv guest in a KVM micro-VM (`fgbi primary --vm kv`), restored by `fgbi
/// backup --vm kv`.
fn virtual_machine(args: &DemoArgs, exe: &Path, common: &[String], service: SocketAddr) -> Service {
    let vm = ["--vm", "kv", "--port", &service.port().to_string()].map(String::from);
    let mut backup = Command::new(exe);
    backup.arg("backup").args(common).args(&vm);
    let mut primary = Command::new(exe);
    primary
        .arg("primary")
        .args(common)
        .args(&vm)
        .args(link_flags(args, false))
        .args(args.tracking_args());
    Service {
        backup,
        primary,
        ready: ["serving the Redis protocol", "connected"],
        prefix: "",
        ended: None,
    }
}

fn kv(args: &DemoArgs) -> Result<ExitCode, String> {
    let outcome = run_service(args, false, &mut |_| Ok(()))?;
    let results = Results { args, outcome };
    results.print();
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&results.json()).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(if results.outcome.lost == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One failover of the protected key-value service: starts the backup and the
/// service, calls `measure` with the service's address once a backup holds it, loads
/// it from `--clients` connections that record every acknowledged write, kills it
/// (or lets it kill itself at `--fault`), waits for the backup to restart it, loads
/// the restarted service and reads every acknowledged write back.
/// With `quiet` (as `fgbi bench` runs it), the service's lines are not echoed and
/// both sides' standard errors go to files, whose last lines an error quotes.
pub(crate) fn run_service(
    args: &DemoArgs,
    quiet: bool,
    measure: &mut dyn FnMut(SocketAddr) -> Result<(), String>,
) -> Result<Outcome, String> {
    let dir = Scratch::new()?;
    let logs = [
        StderrLog::new(&dir.0, "backup", quiet),
        StderrLog::new(&dir.0, "service", quiet),
    ];
    service_failover(args, &dir, &logs, measure).map_err(|e| {
        let tails: String = logs.iter().map(StderrLog::tail).collect();
        format!("{e}{tails}")
    })
}

/// [`run_service`] in `dir`, the backup's and the service's standard errors to
/// `logs`.
fn service_failover(
    args: &DemoArgs,
    dir: &Scratch,
    logs: &[StderrLog; 2],
    measure: &mut dyn FnMut(SocketAddr) -> Result<(), String>,
) -> Result<Outcome, String> {
    let key = write_key(&dir.0)?;
    let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let (backup_addr, service_addr) = (local(free_port()?), local(free_port()?));
    let llm = args.mode == Mode::Llm;
    let input_log = if llm { Some(local(free_port()?)) } else { None };
    if args.no_replay && !llm {
        return Err("--no-replay goes with --mode llm".into());
    }
    if llm && args.vm {
        return Err(
            "--mode llm logs the inputs of the kv application; the VM's service has no input log: drop --vm or --mode llm".into(),
        );
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let common = [
        "--mem".into(),
        args.mem.to_string(),
        "--key".into(),
        key.display().to_string(),
        "--heartbeat-ms".into(),
        args.heartbeat_ms.to_string(),
    ];
    let mut service = match args.vm {
        true => virtual_machine(args, &exe, &common, service_addr),
        false => application(args, &exe, &common, service_addr, input_log),
    };
    let mut backup = Kill(
        service
            .backup
            .args(["--listen", &backup_addr.to_string()])
            .args(link_flags(args, true))
            .stdout(Stdio::piped())
            .stderr(logs[0].stdio()?)
            .spawn()
            .map_err(|e| format!("cannot start the backup: {e}"))?,
    );
    let backup_lines = lines(&mut backup.0)?;
    wait_for(&backup_lines, "listening", Duration::from_secs(10))?;

    let primary_cmd = service
        .primary
        .args(["--backup", &backup_addr.to_string()])
        .args(["--mode", &args.mode.to_string()])
        .args(["--epoch-ms", &epoch_ms(args).to_string()])
        .stdout(Stdio::piped())
        .stderr(logs[1].stdio()?);
    match &args.fault {
        Some(fault) => primary_cmd.env(FAULT_ENV, fault),
        None => primary_cmd.env_remove(FAULT_ENV),
    };
    let mut primary = Kill(
        primary_cmd
            .spawn()
            .map_err(|e| format!("cannot start the service: {e}"))?,
    );
    let stats = Arc::new(Mutex::new(PrimaryStats::default()));
    let echo = !logs[1].is_file();
    let primary_lines = collect(&mut primary.0, service.prefix, echo, Arc::clone(&stats))?;
    for ready in service.ready {
        wait_for(&primary_lines, ready, Duration::from_secs(30))?;
    }
    measure(service_addr)?;
    let early = early_failover(&backup_lines);
    if !early.is_empty() {
        return Err(format!("the service was not killed yet{early}"));
    }

    // Load until the service dies.
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    // Half the keys the store's table takes (three quarters of its slots, an eighth
    // of the store in 16-byte slots), shared among the clients.
    let budget = args.mem * 3 / 512 / 2 / args.clients as u64;
    let ledgers: Vec<Ledger> = (0..args.clients)
        .map(|c| Ledger::new(c, run_id, budget))
        .collect();
    let never = Arc::new(AtomicBool::new(false));
    let loaders = start_load(service_addr, ledgers, &never)?;
    let killed_at = match &args.fault {
        None => {
            std::thread::sleep(Duration::from_millis(args.kill_after_ms));
            let at = SystemTime::now();
            primary
                .0
                .kill()
                .map_err(|e| format!("cannot kill the service: {e}"))?;
            let _ = primary.0.wait();
            at
        }
        Some(fault) => {
            wait_exit(&mut primary.0, fault).map_err(|e| e + &early_failover(&backup_lines))?
        }
    };
    let mut ledgers = finish_load(loaders)?;
    let before: u64 = ledgers.iter().map(Ledger::acknowledged).sum();
    let mut latencies: Vec<f64> = ledgers
        .iter_mut()
        .flat_map(|l| std::mem::take(&mut l.latencies))
        .collect();
    let latency = Percentiles::of(&mut latencies);

    let failover = await_failover(&backup_lines, killed_at, service_addr)?;

    // Load on the restarted service, then read everything back.
    let stop = Arc::new(AtomicBool::new(false));
    let loaders = start_load(service_addr, ledgers, &stop)?;
    std::thread::sleep(Duration::from_millis(args.after_ms));
    stop.store(true, Ordering::Relaxed);
    let ledgers = finish_load(loaders)?;
    let acknowledged: u64 = ledgers.iter().map(Ledger::acknowledged).sum();
    let mut check = Conn::connect(service_addr)
        .map_err(|e| format!("cannot reach the restarted service: {e}"))?;
    let mut lost = 0;
    for ledger in &ledgers {
        lost += client::lost(&mut check, ledger)
            .map_err(|e| format!("cannot read the writes back: {e}"))?;
    }
    if let Some(ended) = service.ended {
        // SHUTDOWN ends the restarted service, and with it the backup.
        let _ = check.send(&[vec![b"SHUTDOWN".to_vec()]]);
        let _ = wait_for(&backup_lines, ended, Duration::from_secs(10));
    }

    let stats = std::mem::take(&mut *stats.lock().unwrap_or_else(PoisonError::into_inner));
    Ok(Outcome {
        stats,
        failover,
        acknowledged,
        before,
        latency,
        lost,
    })
}

/// The transport flags of the primary's side (`backup` false) or the backup's.
fn link_flags(args: &DemoArgs, backup: bool) -> Vec<String> {
    let device = match backup {
        true => args.backup_rdma_device.as_ref(),
        false => None,
    };
    transport_flags(&args.link, device)
}

/// `link` as flags of another `fgbi` command, the RDMA device `device` if given,
/// else the one `link` names.
pub(crate) fn transport_flags(link: &TransportArgs, device: Option<&String>) -> Vec<String> {
    let mut flags = vec![
        "--transport".to_string(),
        link.transport.clone(),
        "--rdma-port".to_string(),
        link.rdma_port.to_string(),
    ];
    if let Some(device) = device.or(link.rdma_device.as_ref()) {
        flags.extend(["--rdma-device".to_string(), device.clone()]);
    }
    if let Some(index) = link.rdma_gid_index {
        flags.extend(["--rdma-gid-index".to_string(), index.to_string()]);
    }
    flags
}

/// Milliseconds between checkpoints: as asked, else the service's default for the
/// mode (LLM's epochs are long).
fn epoch_ms(args: &DemoArgs) -> u64 {
    args.epoch_ms.unwrap_or(match args.mode {
        Mode::Llm => 200,
        _ => 25,
    })
}

/// Whether replies wait for their epoch's commit (LLM logs inputs instead).
fn output_commit(args: &DemoArgs) -> bool {
    !args.no_output_commit && args.mode != Mode::Llm
}

/// What one failover of the service measured.
pub(crate) struct Outcome {
    /// The primary's per-epoch lines.
    pub stats: PrimaryStats,
    /// Type I downtime's parts.
    pub failover: Failover,
    /// Writes acknowledged, before the kill and after.
    pub acknowledged: u64,
    /// Writes acknowledged before the kill.
    pub before: u64,
    /// From a batch's write to its last reply, before the kill, microseconds.
    pub latency: Percentiles,
    /// Acknowledged writes the restarted service lacks.
    pub lost: u64,
}

impl Outcome {
    /// Type II downtime: the pause of every checkpoint.
    pub fn pauses(&self) -> Percentiles {
        Percentiles::of(&mut self.stats.pauses.clone())
    }

    /// Bytes sent per checkpoint, on average.
    pub fn bytes_per_epoch(&self) -> f64 {
        self.stats.wire_bytes as f64 / self.stats.pauses.len().max(1) as f64
    }

    /// Type I downtime until the restarted service serves, milliseconds.
    pub fn total_ms(&self) -> f64 {
        let f = &self.failover;
        (f.detect + f.apply + f.restore + f.replay) / 1e3
    }
}

/// Everything the report says.
struct Results<'a> {
    args: &'a DemoArgs,
    outcome: Outcome,
}

impl Results<'_> {
    fn print(&self) {
        let (a, f, pause) = (self.args, &self.outcome.failover, self.outcome.pauses());
        println!(
            "fgbi demo: key-value service{}, {} MiB store, {} mode, {} ms epochs, output commit {}{}, {} clients",
            match (a.vm, a.tracking) {
                (true, Some(Tracking::CopyOnWrite)) => " in a KVM micro-VM, copy-on-write",
                (true, _) => " in a KVM micro-VM",
                (false, _) => "",
            },
            a.mem >> 20,
            a.mode,
            epoch_ms(a),
            if output_commit(a) { "on" } else { "off" },
            match (a.mode == Mode::Llm, a.no_replay) {
                (true, false) => ", inputs logged at the backup and replayed",
                (true, true) => ", inputs logged at the backup but NOT replayed",
                _ => "",
            },
            a.clients
        );
        match &a.fault {
            Some(fault) => println!("primary killed itself at {fault} (SIGKILL)"),
            None => println!(
                "primary killed (SIGKILL) after {} ms of load",
                a.kill_after_ms
            ),
        }
        println!(
            "backup restarted the service from epoch {}: {}",
            f.epoch, f.ready
        );
        println!(
            "type II downtime (pause per checkpoint): p50 {:.0} us, p99 {:.0} us, max {:.0} us over {} checkpoints ({} committed)",
            pause.p50,
            pause.p99,
            pause.max,
            self.outcome.stats.pauses.len(),
            self.outcome.stats.committed
        );
        println!(
            "bytes per epoch: {:.0} on average, {} in all",
            self.outcome.bytes_per_epoch(),
            self.outcome.stats.wire_bytes
        );
        println!("type I downtime: {:.1} ms in all", self.outcome.total_ms());
        println!(
            "  detection (kill to backup's verdict)           {:>9.3} ms",
            f.detect / 1e3
        );
        println!(
            "  finishing the last epoch                       {:>9.3} ms",
            f.apply / 1e3
        );
        let restore = match a.vm {
            true => "restore (VM from replica and state, listen)  ",
            false => "restore (hand over, exec, map, check, listen)",
        };
        println!("  {restore}  {:>9.3} ms", f.restore / 1e3);
        println!(
            "  replay of {:>6} logged inputs                 {:>9.3} ms",
            f.replayed,
            f.replay / 1e3
        );
        println!(
            "  first reply to a reconnected client, from the kill {:>5.1} ms",
            f.first_reply / 1e3
        );
        println!(
            "reply latency before the kill (a batch of {} pipelined requests): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            client::PIPELINE,
            self.outcome.latency.p50 / 1e3,
            self.outcome.latency.p99 / 1e3,
            self.outcome.latency.max / 1e3
        );
        println!(
            "requests acknowledged: {} ({} before the kill, {} after)",
            self.outcome.acknowledged,
            self.outcome.before,
            self.outcome.acknowledged - self.outcome.before
        );
        println!("requests lost: {}", self.outcome.lost);
    }

    fn json(&self) -> serde_json::Value {
        let (a, f, pause) = (self.args, &self.outcome.failover, self.outcome.pauses());
        json!({
            "mode": a.mode.to_string(),
            "vm": a.vm,
            "tracking": a.tracking.unwrap_or(Tracking::Kernel).as_str(),
            "mem_bytes": a.mem,
            "epoch_ms": epoch_ms(a),
            "clients": a.clients,
            "output_commit": output_commit(a),
            "inputs_logged": a.mode == Mode::Llm,
            "inputs_replayed": f.replayed,
            "fault": a.fault,
            "epochs": self.outcome.stats.committed,
            "checkpoints": self.outcome.stats.pauses.len(),
            "pause_us": pause,
            "failover_epoch": f.epoch,
            "failover_ms": {
                "detect": f.detect / 1e3,
                "apply": f.apply / 1e3,
                "restore": f.restore / 1e3,
                "replay": f.replay / 1e3,
                "total": self.outcome.total_ms(),
                "first_reply": f.first_reply / 1e3,
            },
            "wire_bytes": self.outcome.stats.wire_bytes,
            "bytes_per_epoch": self.outcome.bytes_per_epoch(),
            "requests_acknowledged": self.outcome.acknowledged,
            "requests_acknowledged_before_kill": self.outcome.before,
            "batch_latency_us": self.outcome.latency,
            "requests_lost": self.outcome.lost,
        })
    }
}

/// Starts one loading thread per ledger, each on its own connection.
fn start_load(
    addr: SocketAddr,
    ledgers: Vec<Ledger>,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<std::thread::JoinHandle<Result<Ledger, String>>>, String> {
    ledgers
        .into_iter()
        .map(|mut ledger| {
            let mut conn =
                Conn::connect(addr).map_err(|e| format!("cannot connect a client: {e}"))?;
            let stop = Arc::clone(stop);
            Ok(std::thread::spawn(move || {
                // Ends with an error when the service dies: that is expected.
                let _ = client::load(&mut conn, &mut ledger, &stop);
                Ok(ledger)
            }))
        })
        .collect()
}

fn finish_load(
    loaders: Vec<std::thread::JoinHandle<Result<Ledger, String>>>,
) -> Result<Vec<Ledger>, String> {
    loaders
        .into_iter()
        .map(|l| {
            l.join()
                .map_err(|_| "a client thread panicked".to_string())?
        })
        .collect()
}

/// Waits for the service to kill itself at its fault point; when it ended.
fn wait_exit(child: &mut Child, fault: &str) -> Result<SystemTime, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            // Only its own SIGKILL is the fault; any other end is a failure of the run.
            return match std::os::unix::process::ExitStatusExt::signal(&status) {
                Some(9) => Ok(SystemTime::now()),
                _ => Err(format!(
                    "the service ended ({status}) before its fault point {fault}: see its output above"
                )),
            };
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the service did not reach its fault point {fault} in 60 s: choose an earlier checkpoint (a smaller N) or a longer --heartbeat-ms"
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Why a primary may have missed its fault point: the backup's `failover` line if it
/// printed one while the primary ran (the link broke, or one side waited longer than
/// the liveness timeout, and the primary went on unprotected), for an error message;
/// empty otherwise.
fn early_failover(backup: &mpsc::Receiver<String>) -> String {
    match backup.try_iter().find(|l| l.starts_with("failover ")) {
        Some(line) => format!(
            "; the backup failed over while the primary ran ({line}): on a loaded or slow machine, raise --heartbeat-ms (a peer silent for four heartbeats is dead, an epoch unanswered for sixteen is lost)"
        ),
        None => String::new(),
    }
}

/// Waits for the backup's failover and the restarted service's first reply.
fn await_failover(
    backup: &mpsc::Receiver<String>,
    killed_at: SystemTime,
    service: SocketAddr,
) -> Result<Failover, String> {
    let mut failover = await_restart(backup, killed_at, "service")?;
    let first = client::wait_serving(service, Instant::now() + Duration::from_secs(30))
        .map_err(|e| format!("the restarted service does not answer: {e}"))?;
    drop(first);
    failover.first_reply = since(killed_at);
    Ok(failover)
}

/// Waits for the backup (`fgbi backup --restart`) to fail over and for the program
/// it restarts (the `what`) to say it serves; type I downtime's parts from the
/// backup's lines, `first_reply` left 0.
pub(crate) fn await_restart(
    backup: &mpsc::Receiver<String>,
    killed_at: SystemTime,
    what: &str,
) -> Result<Failover, String> {
    let line = wait_for(backup, "failover ", Duration::from_secs(30))
        .map_err(|e| format!("the backup did not fail over: {e}"))?;
    let ready = wait_for(backup, "restarted pid=", Duration::from_secs(30))
        .map_err(|e| format!("the backup did not restart the {what}: {e}"))?;
    Ok(restart_parts(&line, &ready, killed_at))
}

/// Type I downtime's parts from the backup's `failover` line and its `restarted`
/// line (`ready`), the program killed at `killed_at`; `first_reply` left 0.
pub(crate) fn restart_parts(line: &str, ready: &str, killed_at: SystemTime) -> Failover {
    let get = |name: &str| {
        field(line, name, ' ')
            .and_then(|v| v.parse::<u128>().ok())
            .unwrap_or(0)
    };
    let killed_ns = killed_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    // The restarted service's line: `... replayed N logged inputs in T us ...`.
    let (replayed, replay) = field(ready, "replayed ", ',')
        .and_then(|text| {
            let (count, rest) = text.split_once(" logged inputs in ")?;
            let us = rest.split_once(" us")?.0;
            Some((count.parse::<u64>().ok()?, us.parse::<f64>().ok()?))
        })
        .unwrap_or((0, 0.0));
    let restore = (get("restore_us=") + get("first_run_us=")) as f64;
    Failover {
        epoch: get("epoch=") as u64,
        detect: get("detected_ns=").saturating_sub(killed_ns) as f64 / 1e3,
        apply: get("finish_us=") as f64,
        // The replay happens before the restarted service says it serves.
        restore: (restore - replay).max(0.0),
        replay,
        replayed,
        first_reply: 0.0,
        ready: ready
            .split_once(' ')
            .and_then(|(_, rest)| rest.split_once(' '))
            .map_or(ready.to_string(), |(_, rest)| rest.to_string()),
    }
}

/// Microseconds since `at`.
fn since(at: SystemTime) -> f64 {
    SystemTime::now()
        .duration_since(at)
        .map(|d| d.as_secs_f64() * 1e6)
        .unwrap_or(0.0)
}

/// The service's stdout as a channel of lines, with its per-epoch lines counted into
/// `stats` as they come; the others also printed if `echo`.
fn collect(
    child: &mut Child,
    prefix: &'static str,
    echo: bool,
    stats: Arc<Mutex<PrimaryStats>>,
) -> Result<mpsc::Receiver<String>, String> {
    let stdout = child.stdout.take().ok_or("the service has no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let own = line.strip_prefix(prefix).unwrap_or_default();
            if let Some(rest) = own.strip_prefix("sent ") {
                let mut stats = stats.lock().unwrap_or_else(PoisonError::into_inner);
                let number = |name| field(rest, name, ' ').and_then(|v| v.parse::<u64>().ok());
                if let (Some(pause), Some(bytes)) = (number("pause_us="), number("bytes=")) {
                    stats.pauses.push(pause as f64);
                    stats.wire_bytes += bytes;
                }
            } else if let Some(n) = own.strip_prefix("committed ") {
                let mut stats = stats.lock().unwrap_or_else(PoisonError::into_inner);
                stats.committed = n.parse().unwrap_or(stats.committed);
            } else {
                if echo {
                    println!("{line}");
                }
                // Nobody listens any more once the demo is done.
                let _ = tx.send(line);
            }
        }
    });
    Ok(rx)
}
