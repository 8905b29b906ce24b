//! `fgbi primary` and `fgbi backup`: replication between two processes (or hosts)
//! and failover, of a synthetic workload or (`fgbi backup --restart`) of an
//! application protected through the library, restarted from the replica, or
//! (`--vm`, [`crate::vm_protect`]) of a KVM micro-VM.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use clap::Args;
use fgbi::backup::{self, BackupOptions, FailoverReport};
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
    /// Print each checkpoint's digest (costs a pass over memory, outside the pause).
    #[arg(long)]
    digests: bool,
}

/// Runs `fgbi primary`: protects a workload and replicates it to the backup.
pub fn primary(args: PrimaryArgs) -> Result<ExitCode, String> {
    if args.vm.guest.is_some() {
        return vm_protect::primary(&args);
    }
    let key = args.shared.key()?;
    let mem = usize::try_from(args.shared.mem).map_err(|_| "--mem is too large".to_string())?;
    let mut machine =
        SyntheticMachine::new(&args.workload, mem, args.seed, Tracking::Kernel, false)
            .map_err(|e| e.to_string())?;
    let options = args.options()?;
    let mut out = std::io::stdout().lock();
    let last = primary::run(
        &mut machine,
        |m| m.run().map_err(Into::into),
        &options,
        &key,
        |e| print_event(&mut out, &e),
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
        })
    }
}

/// Prints one line for a primary event (`sent`, `committed`, `unprotected`,
/// `connected`).
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
        PrimaryEvent::Committed(n) => format!("committed {n}"),
        PrimaryEvent::Unprotected { reason } => {
            format!("unprotected: no backup holds the workload ({reason}); it keeps running")
        }
        PrimaryEvent::Connected(n) => format!("connected backup_committed={n}"),
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
    /// After failover of a synthetic workload, run it for this many epochs and report.
    #[arg(long, default_value_t = 20)]
    run_epochs: u64,
}

/// Runs `fgbi backup`: holds the replica and fails over when the primary dies.
pub fn backup(args: BackupArgs) -> Result<ExitCode, String> {
    if args.vm.guest.is_some() {
        return vm_protect::backup(&args);
    }
    let (encoder, transport) = args.shared.configs(Mode::Fgbi)?;
    let key = args.shared.key()?;
    let mem = usize::try_from(args.shared.mem).map_err(|_| "--mem is too large".to_string())?;
    let listener = TcpListener::bind(args.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let mut options = BackupOptions {
        encoder,
        transport,
        slots: 2,
        max_state: 1 << 20,
        digest: args.restart.is_none(),
    };
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
    println!("listening {listening} replica={}", replica.backing());
    let timeout = Duration::from_millis(args.ready_timeout_ms);
    let (report, (mut restarted, ready)) = backup::run(
        &listener,
        &options,
        &key,
        replica,
        |replica, state, epoch| {
            restart::spawn(command, replica, state, epoch).map(|r| (r, String::new()))
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

/// Prints the `failover` line: the epoch, type I downtime in parts, the cause.
pub(crate) fn print_failover(report: &FailoverReport) {
    let detected_ns = report
        .detected_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    println!(
        "failover epoch={}{} detected_ns={detected_ns} silence_us={} finish_us={} restore_us={} first_run_us={} cause={:?}",
        report.epoch,
        report
            .digest
            .map(|d| format!(" digest={d:032x}"))
            .unwrap_or_default(),
        report.silence.as_micros(),
        report.finish.as_micros(),
        report.restore.as_micros(),
        report.first_run.as_micros(),
        report.cause
    );
    let _ = std::io::stdout().flush();
}
