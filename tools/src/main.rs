//! The `fgbi` command line.

mod bench_cmd;
mod record_cmd;
mod replicate_cmd;
mod size;
mod vm_cmd;

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
    /// Protects a synthetic workload and replicates it to a backup.
    Primary(replicate_cmd::PrimaryArgs),
    /// Holds the replica, and fails over when the primary dies.
    Backup(replicate_cmd::BackupArgs),
    /// Runs a backup and a primary as two processes, kills the primary, and reports
    /// type I and type II downtime.
    Demo(replicate_cmd::DemoArgs),
    /// Lists the built-in KVM guest programs, or runs one in a micro-VM.
    Vm(vm_cmd::VmArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench_cmd::run(args),
        Command::Record(args) => record_cmd::run(args),
        Command::Primary(args) => replicate_cmd::primary(args),
        Command::Backup(args) => replicate_cmd::backup(args),
        Command::Demo(args) => replicate_cmd::demo(args),
        Command::Vm(args) => vm_cmd::run(args),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("fgbi: {message}");
            ExitCode::from(2)
        }
    }
}
