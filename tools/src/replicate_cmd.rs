//! `fgbi primary` and `fgbi backup`: replication between two processes (or hosts)
//! and failover, of a synthetic workload or (`fgbi backup --restart`) of an
//! application protected through the library, restarted from the replica, or
//! (`--vm`, [`crate::vm_protect`]) of a KVM micro-VM.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use clap::Args;
use fgbi::backup::{self, BackupOptions, FailoverReport};
use fgbi::fence::{Fence, UNFENCED_WARNING};
use fgbi::input_log::{self, InputLogger};
use fgbi::metrics::{self, Metrics};
use fgbi::primary::{self, PrimaryEvent, PrimaryOptions};
use fgbi::restart::{self, Restarted, SharedMemory};
use fgbi_engine::{EncoderConfig, Geometry, Mode};
use fgbi_hyp::memory::Region;
use fgbi_hyp::synthetic::{SyntheticMachine, Tracking};
use fgbi_transport::{Liveness, PresharedKey, TransportConfig};

use crate::size::parse_size;
use crate::transport_arg::TransportArgs;
use crate::vm_protect::{self, VmArgs};

/// Settings both sides must agree on.
#[derive(Args, Debug, Clone)]
pub struct Shared {
    /// Protected memory size (K, M, G suffixes); with --vm the guest memory, a multiple
    /// of 2 MiB from 4 MiB.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub(crate) mem: u64,
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
    pub(crate) fn configs(&self, mode: Mode) -> Result<(EncoderConfig, TransportConfig), String> {
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

    pub(crate) fn key(&self) -> Result<PresharedKey, String> {
        PresharedKey::from_file(&self.key).map_err(|e| e.to_string())
    }
}

/// Arguments of `fgbi primary`.
#[derive(Args, Debug, Clone)]
pub struct PrimaryArgs {
    #[command(flatten)]
    pub(crate) shared: Shared,
    #[command(flatten)]
    pub(crate) vm: VmArgs,
    /// The backup's address.
    #[arg(long)]
    backup: SocketAddr,
    /// Workload to protect.
    #[arg(long, default_value = "web", conflicts_with = "vm")]
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
    /// Workload (or guest) seed.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Where dirty pages come from and how a checkpoint keeps them: kernel (pages
    /// copied in the pause), cow (copy-on-write: the pause only write-protects them,
    /// they are copied after the program resumes) or generator (the workload's own
    /// record; not with --vm). With --vm the dirty pages come from KVM's dirty log.
    #[arg(long, default_value = "kernel")]
    pub(crate) tracking: Tracking,
    /// Print each checkpoint's digest (costs a pass over memory, outside the pause).
    #[arg(long)]
    digests: bool,
    /// Every this many epochs, have the backup compare 1 MiB of its replica with
    /// the checkpoint's digests, going round memory; 0 turns scrubbing off.
    #[arg(long, default_value_t = primary::DEFAULT_SCRUB_EVERY)]
    scrub_every: u64,
    /// Sync a backup that connects empty in the pause of the next checkpoint, which
    /// then copies the whole memory, instead of by pre-copy while the program runs
    /// (`synced` lines) and a small final pause.
    #[arg(long)]
    no_pre_copy: bool,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

/// Runs `fgbi primary`: protects a workload and replicates it to the backup.
pub fn primary(args: PrimaryArgs) -> Result<ExitCode, String> {
    if args.vm.guest.is_some() {
        return vm_protect::primary(&args);
    }
    let key = args.shared.key()?;
    let mem = usize::try_from(args.shared.mem).map_err(|_| "--mem is too large".to_string())?;
    let mut machine = SyntheticMachine::new(&args.workload, mem, args.seed, args.tracking, false)
        .map_err(|e| e.to_string())?;
    let options = args.options()?;
    let metrics = start_metrics(args.metrics, "primary")?;
    let mut out = std::io::stdout().lock();
    let last = primary::run(
        &mut machine,
        |m| m.run().map_err(Into::into),
        &options,
        &key,
        |e| {
            if let Some(m) = &metrics {
                m.primary_event(&e);
            }
            print_event(&mut out, &e);
        },
    )
    .map_err(|e| e.to_string())?;
    println!("done committed={last}");
    Ok(ExitCode::SUCCESS)
}

impl PrimaryArgs {
    /// The primary loop's options.
    pub(crate) fn options(&self) -> Result<PrimaryOptions, String> {
        let (encoder, transport) = self.shared.configs(self.mode)?;
        Ok(PrimaryOptions {
            encoder,
            transport,
            backup: self.backup,
            epoch: Duration::from_millis(self.epoch_ms.max(1)),
            epochs: self.epochs,
            connect_timeout: Duration::from_secs(10),
            digests: self.digests,
            scrub_every: self.scrub_every,
            pre_copy: !self.no_pre_copy,
        })
    }
}

/// Prints one line for a primary event (`sent`, `committed`, `synced`,
/// `unprotected`, `connected`, `scrubbed`).
pub(crate) fn print_event(out: &mut impl Write, e: &PrimaryEvent) {
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
        PrimaryEvent::Committed { epoch, .. } => format!("committed {epoch}"),
        PrimaryEvent::Synced {
            epoch,
            round,
            pages,
            bytes,
            pause,
            left,
        } => format!(
            "synced {epoch} round={round} pages={pages} bytes={bytes} pause_us={} left={left}",
            pause.as_micros()
        ),
        PrimaryEvent::Unprotected { reason } => {
            format!("unprotected: no backup holds the workload ({reason}); it keeps running")
        }
        PrimaryEvent::Connected(n) => format!("connected backup_committed={n}"),
        PrimaryEvent::Scrubbed {
            epoch,
            range,
            diverged,
        } => format!(
            "scrubbed {epoch} bytes={}..{} diverged_pages={}",
            range.start,
            range.end,
            diverged.len()
        ),
    };
    // A closed stdout must not stop replication.
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Arguments of `fgbi backup`.
#[derive(Args, Debug, Clone)]
pub struct BackupArgs {
    #[command(flatten)]
    pub(crate) shared: Shared,
    #[command(flatten)]
    pub(crate) vm: VmArgs,
    /// Address to listen on.
    #[arg(long)]
    pub(crate) listen: SocketAddr,
    /// The primary is an application protected through the library: on failover,
    /// run this command with `/bin/sh -c`, handing it the replica's memory (see
    /// docs/operations.md), then wait for it to end and exit with its status.
    /// Without it the primary is `fgbi primary`'s synthetic workload, rebuilt here.
    #[arg(long, value_name = "CMD", conflicts_with = "vm")]
    restart: Option<String>,
    /// How long the restarted command may take to say it serves, milliseconds.
    #[arg(long, default_value_t = 30_000)]
    ready_timeout_ms: u64,
    /// With --restart: keep the inputs an LLM-mode primary forwards (`fgbi kv --mode
    /// llm --input-log ADDR`), received on this address, and hand those its last
    /// committed checkpoint does not reflect to the restarted command for replay.
    #[arg(long, value_name = "ADDR", requires = "restart")]
    input_log: Option<SocketAddr>,
    /// After failover of a synthetic workload, run it for this many epochs and report.
    #[arg(long, default_value_t = 20)]
    run_epochs: u64,
    /// Before failing over, run this command with `/bin/sh -c` to make sure the
    /// primary is stopped (power it off, stop its instance, shut its switch port);
    /// only its exit status 0 lets the backup fail over. See docs/operations.md.
    #[arg(long, value_name = "CMD")]
    fence: Option<String>,
    /// How long the fence command may run before it is killed and counts as failed.
    #[arg(long, default_value_t = 10_000)]
    fence_timeout_ms: u64,
    /// After a failed fence, how long to wait for the primary to come back before
    /// fencing again.
    #[arg(long, default_value_t = 1_000)]
    fence_retry_ms: u64,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

impl BackupArgs {
    /// The backup loop's settings (`digest`: take the replica's digest at
    /// failover); warns when no fence command is configured.
    pub(crate) fn options(&self, digest: bool) -> Result<BackupOptions, String> {
        let (encoder, transport) = self.shared.configs(Mode::Fgbi)?;
        if self.fence.is_none() {
            eprintln!("fgbi: {UNFENCED_WARNING}");
        }
        Ok(BackupOptions {
            encoder,
            transport,
            slots: 2,
            max_state: 1 << 20,
            digest,
            fence: Fence {
                command: self.fence.clone(),
                timeout: Duration::from_millis(self.fence_timeout_ms),
                retry: Duration::from_millis(self.fence_retry_ms.max(1)),
                primary_known_dead: false,
            },
            metrics: start_metrics(self.metrics, "backup")?,
        })
    }
}

/// Runs `fgbi backup`: holds the replica and fails over when the primary dies.
pub fn backup(args: BackupArgs) -> Result<ExitCode, String> {
    if args.vm.guest.is_some() {
        return vm_protect::backup(&args);
    }
    let key = args.shared.key()?;
    let mem = usize::try_from(args.shared.mem).map_err(|_| "--mem is too large".to_string())?;
    let listener = TcpListener::bind(args.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let mut options = args.options(args.restart.is_none())?;
    let listening = listener.local_addr().map_err(|e| e.to_string())?;
    let committed = |n| println!("committed {n}");
    let Some(command) = &args.restart else {
        let replica = Region::new(mem).map_err(|e| e.to_string())?;
        println!("listening {listening}");
        let (report, mut machine) = backup::run(
            &listener,
            &options,
            &key,
            replica,
            |replica, state, _| SyntheticMachine::restore(replica, state, Tracking::Kernel),
            |m: &mut SyntheticMachine| m.run(),
            committed,
        )
        .map_err(|e| e.to_string())?;
        print_failover(&report);
        for _ in 0..args.run_epochs {
            machine.run().map_err(|e| e.to_string())?;
        }
        println!("running epochs={} on the backup", machine.epochs());
        return Ok(ExitCode::SUCCESS);
    };
    options.digest = false;
    let replica = SharedMemory::new("fgbi-replica", mem).map_err(|e| e.to_string())?;
    let logger = match args.input_log {
        Some(addr) => {
            let log_listener = TcpListener::bind(addr)
                .map_err(|e| format!("cannot listen on {addr} for the input log: {e}"))?;
            let key = Arc::new(args.shared.key()?);
            Some(
                InputLogger::start(log_listener, key, args.shared.mem)
                    .map_err(|e| e.to_string())?,
            )
        }
        None => None,
    };
    println!("listening {listening} replica={}", replica.backing());
    let timeout = Duration::from_millis(args.ready_timeout_ms);
    let (report, (mut restarted, ready)) = backup::run(
        &listener,
        &options,
        &key,
        replica,
        |replica, state, epoch| {
            let inputs = logger.as_ref().map(|l| input_log::encode(&l.close()));
            restart::spawn(command, replica, state, epoch, inputs.as_deref())
                .map(|r| (r, String::new()))
        },
        |(restarted, ready): &mut (Restarted, String)| {
            *ready = restarted.wait_ready(timeout).inspect_err(|_| {
                // It will not serve: do not leave it behind.
                let _ = restarted.child.kill();
            })?;
            Ok::<(), restart::RestartError>(())
        },
        committed,
    )
    .map_err(|e| e.to_string())?;
    print_failover(&report);
    println!("restarted pid={} {ready}", restarted.child.id());
    let _ = std::io::stdout().flush();
    let status = restarted
        .child
        .wait()
        .map_err(|e| format!("cannot wait for the restarted command: {e}"))?;
    println!("restarted command ended: {status}");
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

/// Starts serving the metrics of `role` on `address`, when given, and says where.
fn start_metrics(
    address: Option<SocketAddr>,
    role: &'static str,
) -> Result<Option<Arc<Metrics>>, String> {
    let Some(address) = address else {
        return Ok(None);
    };
    let m = Arc::new(Metrics::new(role));
    let bound = metrics::serve(address, Arc::clone(&m))
        .map_err(|e| format!("cannot serve metrics on {address}: {e}"))?;
    println!("metrics http://{bound}/metrics");
    Ok(Some(m))
}

/// Prints the `failover` line: the epoch, type I downtime in parts, the cause.
pub(crate) fn print_failover(report: &FailoverReport) {
    let detected_ns = report
        .detected_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    println!(
        "failover epoch={}{} detected_ns={detected_ns} silence_us={} finish_us={} fence_us={} restore_us={} first_run_us={} cause={:?}",
        report.epoch,
        report
            .digest
            .map(|d| format!(" digest={d:032x}"))
            .unwrap_or_default(),
        report.silence.as_micros(),
        report.finish.as_micros(),
        report.fence.as_micros(),
        report.restore.as_micros(),
        report.first_run.as_micros(),
        report.cause
    );
    let _ = std::io::stdout().flush();
}
