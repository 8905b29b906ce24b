//! The `fgbi` command line.

mod bench_cmd;
mod children;
mod demo_cmd;
// The key-value service of examples/kv, built in so that `fgbi demo` needs nothing
// but this binary.
#[path = "../../examples/kv/mod.rs"]
mod kv;
mod record_cmd;
mod replicate_cmd;
mod size;
mod transport_arg;
mod vm_cmd;
mod vm_protect;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Keeps a hot standby of a VM or an application's memory on a second host.
#[derive(Parser)]
#[command(name = "fgbi", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs every encoding mode over the same workloads, side by side, and verifies the
    /// replica after every epoch.
    Bench(bench_cmd::BenchArgs),
    /// Records a running process's memory, epoch by epoch, into a trace file that
    /// `fgbi bench --trace` replays.
    Record(record_cmd::RecordArgs),
    /// Protects a synthetic workload or a KVM micro-VM and replicates it to a backup.
    Primary(replicate_cmd::PrimaryArgs),
    /// Holds the replica, and fails over when the primary dies.
    Backup(replicate_cmd::BackupArgs),
    /// Runs a protected key-value service with a backup, kills the service mid-load,
    /// lets the backup restart it, checks that no acknowledged write was lost, and
    /// reports type I and type II downtime.
    Demo(demo_cmd::DemoArgs),
    /// The key-value service `fgbi demo` protects (examples/kv).
    #[command(hide = true)]
    Kv(kv::Args),
    /// Lists the built-in KVM guest programs, or runs one in a micro-VM.
    Vm(vm_cmd::VmArgs),
    /// The backup process `fgbi bench` starts for its networked pass.
    #[command(hide = true, name = fgbi::bench::backup_process::SUBCOMMAND)]
    BenchBackup {
        /// The link, as JSON (`fgbi::bench::link::LinkSpec`).
        #[arg(long)]
        spec: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench_cmd::run(args),
        Command::Record(args) => record_cmd::run(args),
        Command::Primary(args) => replicate_cmd::primary(args),
        Command::Backup(args) => replicate_cmd::backup(args),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Kv(args) => Ok(kv::run(&args)),
        Command::Vm(args) => vm_cmd::run(args),
        Command::BenchBackup { spec } => Ok(fgbi::bench::backup_process::serve(&spec)),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("fgbi: {message}");
            ExitCode::from(2)
        }
    }
}
