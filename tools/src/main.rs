//! The `fgbi` command line.

mod bench_cmd;
mod size;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench_cmd::run(args),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("fgbi: {message}");
            ExitCode::from(2)
        }
    }
}
