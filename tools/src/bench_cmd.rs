//! `fgbi bench`: argument parsing, the profiles, the results table and progress;
//! the files are written by `fgbi::bench::report`. The synthetic workloads and traces
//! run in `fgbi::bench`, the real programs in [`programs`].

mod heat;
mod kv;
mod programs;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use fgbi::bench::{
    self, BenchConfig, NetworkSetting, ProgramResult, RunResult, TRACE_PREFIX, report,
};
use fgbi_engine::Mode;
use fgbi_engine::stats::PAGE_ENCODINGS;
use fgbi_hyp::synthetic::Tracking;
use fgbi_hyp::workload::NAMES;
use fgbi_transport::Implementation;

use crate::size::parse_size;
use crate::transport_arg::TransportArgs;
use programs::{Program, ProgramSettings};

/// Arguments of `fgbi bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Comma-separated workloads: the synthetic web, npb-ep, sys, dense, dup, idle;
    /// the real programs kv (the key-value service under redis-benchmark) and heat
    /// (the C solver of examples/heat, linking the libfgbi.so beside fgbi), each
    /// killed and restarted by its backup in every round; or all (every one of
    /// them, leaving out, with a line that says why, a program that cannot run here).
    #[arg(long, default_value = "all", value_delimiter = ',')]
    workload: Vec<String>,
    /// Replay this trace (recorded by `fgbi record`) instead of a synthetic workload;
    /// memory is the trace's size and --mem is ignored.
    #[arg(long, conflicts_with = "workload")]
    trace: Option<PathBuf>,
    /// Comma-separated modes: remus, llm, xbzrle, fgbi.
    #[arg(long, default_value = "remus,llm,xbzrle,fgbi", value_delimiter = ',')]
    modes: Vec<Mode>,
    /// The quick profile: 10 epochs, 64 MiB, 16 MiB cache, 1 failover, 5 networked
    /// epochs per round (flags given explicitly still win).
    #[arg(long)]
    quick: bool,
    /// Measured epochs per workload and mode (after the initial sync) [default: 40;
    /// quick: 10].
    #[arg(long)]
    epochs: Option<usize>,
    /// Protected memory size (K, M, G suffixes) [default: 256M; quick: 64M].
    #[arg(long, value_parser = parse_size)]
    mem: Option<u64>,
    /// Block size in bytes: a power of two from 32 to 4096.
    #[arg(long, default_value = "64", value_parser = parse_size)]
    block: u64,
    /// Encoder worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Pin encoder workers to cores.
    #[arg(long)]
    pin: bool,
    /// Page cache budget for xbzrle and fgbi (K, M, G suffixes) [default: 64M;
    /// quick: 16M].
    #[arg(long, value_parser = parse_size)]
    cache: Option<u64>,
    /// Workload seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// fgbi ablation: never send a block as a reference to an identical one.
    #[arg(long)]
    no_sharing: bool,
    /// fgbi ablation: never use lz4.
    #[arg(long)]
    no_compression: bool,
    /// Where dirty pages come from, comma-separated variants run side by side:
    /// kernel (userfaultfd write-protect, pages copied in the pause), cow (the same,
    /// with copy-on-write checkpoints: the pause only protects the pages) or
    /// generator (the workload's own record). The first measures everything, each
    /// other its type II downtime and overhead too.
    #[arg(long, default_value = "kernel,cow", value_delimiter = ',')]
    tracking: Vec<Tracking>,
    /// Compare the kernel's dirty pages with the workload's own record every epoch
    /// and fail if the kernel missed a page.
    #[arg(long)]
    check_tracking: bool,
    /// The networked pass's transport, between this process and its backup
    /// process on loopback.
    #[command(flatten)]
    link: TransportArgs,
    /// Run the in-process pass only: no transport, no failover, no overhead.
    #[arg(long, conflicts_with = "transport")]
    local: bool,
    /// Injected primary failures per workload and mode [default: 3; quick: 1]; for a
    /// program, its rounds.
    #[arg(long)]
    failovers: Option<usize>,
    /// Measured epochs per protected round of the networked pass [default: 10;
    /// quick: 5]. Programs' rounds run for the time their load takes.
    #[arg(long)]
    net_epochs: Option<usize>,
    /// Epoch length of the networked pass, milliseconds.
    #[arg(long, default_value_t = 25)]
    epoch_ms: u64,
    /// Pace the networked pass's workload to at most this dirty rate: pages per
    /// second (`12000`, `12000pages/s`) or bytes per second (`48MB/s`, `46MiB/s`).
    /// Default: as fast as it runs.
    #[arg(long, value_parser = parse_rate)]
    dirty_rate: Option<f64>,
    /// kv: requests of each redis-benchmark test (SET, GET, INCR) per round
    /// [default: 100000; quick: 20000].
    #[arg(long)]
    requests: Option<u64>,
    /// Also write the results as JSON (schema 3, docs/bench.md) to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write the results as CSV (one row per workload and mode) to this file.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Also draw the pause distribution and the bytes per epoch of each mode as SVG
    /// to this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Also print the table in Markdown after the runs.
    #[arg(long)]
    markdown: bool,
}

/// A dirty rate in pages (4 KiB) per second: `N`, `Npages/s`, `NMB/s` (10^6 bytes)
/// or `NMiB/s`.
fn parse_rate(text: &str) -> Result<f64, String> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a rate: give e.g. 12000pages/s or 48MB/s"))?;
    let page = fgbi_engine::PAGE_SIZE as f64;
    let pages = match unit {
        "" | "pages/s" => value,
        "MB/s" => value * 1e6 / page,
        "MiB/s" => value * 1_048_576.0 / page,
        other => {
            return Err(format!(
                "unknown rate unit {other:?}: use pages/s, MB/s or MiB/s (e.g. 12000pages/s, 48MB/s)"
            ));
        }
    };
    if pages > 0.0 && pages.is_finite() {
        Ok(pages)
    } else {
        Err(format!("the dirty rate {text:?} must be above zero"))
    }
}

/// Settings that differ between the full and the quick profile.
struct Profile {
    epochs: usize,
    net_epochs: usize,
    mem: u64,
    cache: u64,
    failovers: usize,
    requests: u64,
    /// Programs: milliseconds of load before the kill, and after the restart.
    load_ms: [u64; 2],
    /// heat: the grid's side and the iterations of a run.
    heat: [u64; 2],
}

const FULL: Profile = Profile {
    epochs: 40,
    net_epochs: 10,
    mem: 256 << 20,
    cache: 64 << 20,
    failovers: 3,
    requests: 100_000,
    load_ms: [2000, 1000],
    heat: [1024, 3000],
};

const QUICK: Profile = Profile {
    epochs: 10,
    net_epochs: 5,
    mem: 64 << 20,
    cache: 16 << 20,
    failovers: 1,
    requests: 20_000,
    load_ms: [1000, 500],
    heat: [1024, 600],
};

/// The table's columns, in the text and Markdown tables.
const COLUMNS: [&str; 14] = [
    "workload",
    "mode",
    "dirty",
    "wire KiB",
    "vs remus",
    "enc GB/s",
    "app GB/s",
    "pause p50/99us",
    "type I ms",
    "overhead",
    "digest MiB",
    "cache MiB",
    "verified",
    "chosen",
];

/// Runs the bench and prints the table; fails if any run did not verify.
pub fn run(args: BenchArgs) -> Result<ExitCode, String> {
    let profile = if args.quick { QUICK } else { FULL };
    let (workloads, programs) = match &args.trace {
        Some(trace) => (vec![format!("{TRACE_PREFIX}{}", trace.display())], vec![]),
        None => split_workloads(&args.workload)?,
    };
    let epochs = args.epochs.unwrap_or(profile.epochs);
    if epochs == 0 {
        return Err("--epochs must be at least 1".into());
    }
    let net_epochs = args.net_epochs.unwrap_or(profile.net_epochs);
    if net_epochs == 0 {
        return Err("--net-epochs must be at least 1".into());
    }
    let failovers = args.failovers.unwrap_or(profile.failovers);
    if failovers == 0 && !args.local {
        return Err("--failovers must be at least 1 (every protected round ends with one); use --local for no networked pass".into());
    }
    if args.epoch_ms == 0 {
        return Err("--epoch-ms must be at least 1".into());
    }
    if args.check_tracking && args.tracking.contains(&Tracking::Generator) {
        return Err("--check-tracking compares kernel tracking with the workload: use it with --tracking kernel or cow".into());
    }
    let network = if args.local {
        None
    } else {
        let program = std::env::current_exe()
            .map_err(|e| format!("cannot find this executable to start the backup: {e}"))?;
        Some(NetworkSetting {
            implementation: args.link.implementation()?,
            rdma: args.link.rdma(),
            program,
        })
    };
    let implementation = network.as_ref().map(|n| n.implementation);
    let programs = program_settings(&args, &profile, programs, implementation)?;
    let cache = args.cache.unwrap_or(profile.cache);
    let config = BenchConfig {
        workloads,
        modes: args.modes.clone(),
        epochs,
        mem_bytes: args.mem.unwrap_or(profile.mem),
        block_size: usize::try_from(args.block).map_err(|_| "--block is too large".to_string())?,
        workers: args.workers,
        pin_workers: args.pin,
        cache_bytes: usize::try_from(cache).map_err(|_| "--cache is too large".to_string())?,
        seed: args.seed,
        sharing: !args.no_sharing,
        compression: !args.no_compression,
        tracking: args.tracking.clone(),
        check_tracking: args.check_tracking,
        network,
        failovers,
        net_epochs,
        epoch: Duration::from_millis(args.epoch_ms),
        dirty_rate: args.dirty_rate,
    };
    if !config.workloads.is_empty() {
        print_header(&args, &config);
    }
    let total =
        (config.workloads.len() + programs.as_ref().map_or(0, |p| p.0.len())) * config.modes.len();
    let progress = Progress::new(total);
    let results = if config.workloads.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        run_synthetic(&config, &progress)?
    };
    let (results, rows) = results;
    let program_results = match &programs {
        Some((programs, settings)) => {
            run_programs(programs, &config.modes, settings, &progress, rows.len())?
        }
        None => (Vec::new(), Vec::new()),
    };
    let (program_results, program_rows) = program_results;
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("results written to {}", path.display());
        Ok::<(), String>(())
    };
    if let Some(path) = &args.json {
        let text =
            serde_json::to_string_pretty(&report::json::document(&results, &program_results))
                .map_err(|e| e.to_string())?;
        write(path, text)?;
    }
    if let Some(path) = &args.csv {
        write(path, report::csv::document(&results, &program_results))?;
    }
    if let Some(path) = &args.plot {
        write(path, report::plot::svg(&results, &program_results))?;
    }
    if args.markdown {
        if !rows.is_empty() {
            markdown(&COLUMNS, &rows);
        }
        if !program_rows.is_empty() {
            markdown(&programs::COLUMNS, &program_rows);
        }
    }
    if results.iter().all(|r| r.verified) && program_results.iter().all(|r| r.verified) {
        if !results.is_empty() {
            println!(
                "every run verified: replica digest equal to the primary's after every in-process epoch and at every failover"
            );
        }
        for r in &program_results {
            println!("{} {} verified: {}", r.workload, r.mode, r.check);
        }
        Ok(ExitCode::SUCCESS)
    } else {
        for r in program_results.iter().filter(|r| !r.verified) {
            eprintln!(
                "fgbi: {} {} did NOT verify: {}",
                r.workload, r.mode, r.check
            );
        }
        eprintln!("fgbi: some runs did NOT verify: the replica differed from the primary");
        Ok(ExitCode::FAILURE)
    }
}

/// The synthetic runs' settings, in one line.
fn print_header(args: &BenchArgs, config: &BenchConfig) {
    let memory = match &args.trace {
        Some(_) => "memory sized by the trace".to_string(),
        None => format!("{} MiB memory", config.mem_bytes >> 20),
    };
    let pipeline = match &config.network {
        Some(_) => format!(
            "networked pass to a backup process on this host ({} failover(s), {} epochs of {} ms per round)",
            config.failovers, config.net_epochs, args.epoch_ms
        ),
        None => "in-process pass only".to_string(),
    };
    println!(
        "fgbi bench: {memory}, {}-byte blocks, {} epochs, {} worker(s), {} MiB cache, seed {}, {pipeline}",
        config.block_size,
        config.epochs,
        config.workers,
        config.cache_bytes >> 20,
        config.seed
    );
}

/// A program `--workload` asked for: by name, or as part of `all`.
struct Wanted {
    program: Program,
    named: bool,
}

/// The synthetic workloads (and traces) of `--workload`, and its programs; `all`
/// stands for every synthetic workload and every program.
fn split_workloads(names: &[String]) -> Result<(Vec<String>, Vec<Wanted>), String> {
    let (mut workloads, mut programs) = (Vec::new(), Vec::<Wanted>::new());
    for name in names {
        let name = name.trim();
        if name == "all" {
            workloads.extend(NAMES.iter().map(|s| s.to_string()));
            for program in Program::ALL {
                if !programs.iter().any(|w| w.program == program) {
                    programs.push(Wanted {
                        program,
                        named: false,
                    });
                }
            }
        } else if let Some(program) = Program::by_name(name) {
            match programs.iter_mut().find(|w| w.program == program) {
                Some(wanted) if wanted.named => {
                    return Err(format!("--workload names {name} twice"));
                }
                Some(wanted) => wanted.named = true,
                None => programs.push(Wanted {
                    program,
                    named: true,
                }),
            }
        } else if name.is_empty() {
            return Err("--workload has an empty name: give comma-separated names without spaces around the commas".into());
        } else {
            workloads.push(name.to_string());
        }
    }
    for (i, name) in workloads.iter().enumerate() {
        if workloads[..i].contains(name) {
            return Err(format!("--workload names {name} twice"));
        }
    }
    Ok((workloads, programs))
}

/// Why no program can run with these flags, if none can: the flags that apply to
/// synthetic workloads only, and `--local`.
fn programs_refused(args: &BenchArgs, local: bool) -> Option<String> {
    let flag = if local {
        return Some("the programs always run through a backup process: drop --local".into());
    } else if args.no_sharing {
        "--no-sharing"
    } else if args.no_compression {
        "--no-compression"
    } else if args.block != fgbi_engine::DEFAULT_BLOCK_SIZE as u64 {
        "--block"
    } else if args.dirty_rate.is_some() {
        "--dirty-rate"
    } else {
        return None;
    };
    Some(format!(
        "{flag} applies to the synthetic workloads and traces; the programs run each mode as they ship: leave it out or run them separately"
    ))
}

/// How the programs run, if `--workload` asks for any that can. A program named
/// that cannot run (with these flags, or here) is an error; one of `all` is left out
/// with a line that says why. `implementation` is the transport chosen for the
/// synthetic workloads (none with `--local`).
fn program_settings(
    args: &BenchArgs,
    profile: &Profile,
    wanted: Vec<Wanted>,
    implementation: Option<Implementation>,
) -> Result<Option<(Vec<Program>, ProgramSettings)>, String> {
    let refused = programs_refused(args, implementation.is_none());
    let mut programs = Vec::new();
    for Wanted { program, named } in wanted {
        let why = match &refused {
            Some(why) => Err(why.clone()),
            None => program.check(),
        };
        match why {
            Ok(()) => programs.push(program),
            Err(why) if named => return Err(format!("{}: {why}", program.name())),
            Err(why) => eprintln!(
                "fgbi bench: NOT running the program {} of --workload all: {why}",
                program.name()
            ),
        }
    }
    let Some(implementation) = implementation.filter(|_| !programs.is_empty()) else {
        return Ok(None);
    };
    let requests = args.requests.unwrap_or(profile.requests);
    if requests == 0 {
        return Err("--requests must be at least 1".into());
    }
    // Chosen once, so that every process of every round uses the same.
    let mut link = args.link.clone();
    link.transport = match implementation {
        Implementation::Uring => "uring",
        other => other.as_str(),
    }
    .to_string();
    let settings = ProgramSettings {
        mem: args.mem.unwrap_or(profile.mem),
        epoch_ms: args.epoch_ms,
        link,
        rounds: args.failovers.unwrap_or(profile.failovers),
        requests,
        kill_after_ms: profile.load_ms[0],
        after_ms: profile.load_ms[1],
        heat_n: profile.heat[0],
        heat_iterations: profile.heat[1],
    };
    Ok(Some((programs, settings)))
}

/// Runs the synthetic workloads and traces, printing a row as each finishes; their
/// results and rows.
fn run_synthetic(
    config: &BenchConfig,
    progress: &Progress,
) -> Result<(Vec<RunResult>, Vec<[String; 14]>), String> {
    let mut announced = false;
    print_row(&COLUMNS.map(String::from));
    let mut rows = Vec::new();
    let mut remus: Option<(String, u64)> = None;
    progress.draw(0, next_run(config, 0));
    let results = bench::run(config, |r| {
        progress.clear();
        if r.mode == "remus" {
            remus = Some((r.workload.clone(), r.wire_bytes));
        }
        if !announced {
            let others: Vec<&str> = r
                .pause_by_tracking
                .keys()
                .copied()
                .filter(|t| *t != r.tracking)
                .collect();
            let also = if others.is_empty() {
                String::new()
            } else {
                format!(" (pauses also with {})", others.join(", "))
            };
            println!(
                "(memory backed by {} pages, dirty pages from the {}{also}, transport {}, memcpy {:.1} GB/s)",
                r.backing, r.tracking, r.transport, r.memcpy_gbps
            );
            announced = true;
        }
        let baseline = remus
            .as_ref()
            .filter(|(workload, _)| *workload == r.workload)
            .map(|(_, bytes)| *bytes);
        let row = cells(r, baseline);
        print_row(&row);
        rows.push(row);
        progress.draw(rows.len(), next_run(config, rows.len()));
    });
    progress.clear();
    Ok((results.map_err(|e| e.to_string())?, rows))
}

/// Runs every program in every mode, printing a row as each finishes; `done` runs
/// came before. Their results and rows.
fn run_programs(
    programs: &[Program],
    modes: &[Mode],
    settings: &ProgramSettings,
    progress: &Progress,
    mut done: usize,
) -> Result<(Vec<ProgramResult>, Vec<[String; 11]>), String> {
    println!(
        "programs: {} ms epochs, transport {}, {} round(s) per mode (unprotected run, protected run, kill and restart by the backup); kv: {} MiB store, {} requests per redis-benchmark test; heat: {}x{} grid, {} iterations",
        settings.epoch_ms,
        settings.link.transport,
        settings.rounds,
        settings.mem >> 20,
        settings.requests,
        settings.heat_n,
        settings.heat_n,
        settings.heat_iterations
    );
    programs::print_row(&programs::COLUMNS.map(String::from));
    let (mut results, mut rows) = (Vec::new(), Vec::new());
    for &program in programs {
        let mut remus = None;
        for &mode in modes {
            progress.draw(done, Some(format!("{} {mode}", program.name())));
            let result = programs::run(program, mode, settings);
            progress.clear();
            let result = result?;
            if mode == Mode::Remus {
                remus = Some(result.bytes_per_epoch);
            }
            let row = programs::cells(&result, remus);
            programs::print_row(&row);
            rows.push(row);
            results.push(result);
            done += 1;
        }
    }
    Ok((results, rows))
}

/// Prints a table in Markdown.
fn markdown<const N: usize>(columns: &[&str; N], rows: &[[String; N]]) {
    println!();
    println!("| {} |", columns.join(" | "));
    println!("|{}", "---|".repeat(N));
    for row in rows {
        let escaped: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
        println!("| {} |", escaped.join(" | "));
    }
}

/// The name of run `index` (workloads in order, modes within each), if any.
fn next_run(config: &BenchConfig, index: usize) -> Option<String> {
    let modes = config.modes.len().max(1);
    let workload = config.workloads.get(index / modes)?;
    let mode = config.modes.get(index % modes)?;
    Some(format!("{workload} {mode}"))
}

/// A progress bar on stderr, drawn only when stderr is a terminal.
struct Progress {
    total: usize,
    on: bool,
    started: Instant,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self {
            total,
            on: std::io::stderr().is_terminal(),
            started: Instant::now(),
        }
    }

    fn draw(&self, done: usize, running: Option<String>) {
        if !self.on {
            return;
        }
        const WIDTH: usize = 30;
        let filled = WIDTH * done / self.total.max(1);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[K[{}{}] {done}/{} {:.0}s {}",
            "#".repeat(filled),
            ".".repeat(WIDTH - filled),
            self.total,
            self.started.elapsed().as_secs_f64(),
            running.unwrap_or_default()
        );
        let _ = err.flush();
    }

    fn clear(&self) {
        if self.on {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

/// One run's cells, in [`COLUMNS`] order; `remus_bytes` is the same workload's Remus
/// wire bytes, if it ran.
fn cells(r: &RunResult, remus_bytes: Option<u64>) -> [String; 14] {
    let vs_remus = match remus_bytes {
        Some(b) if b > 0 => format!("{:.1}%", r.wire_bytes as f64 * 100.0 / b as f64),
        _ => "-".into(),
    };
    let mut chosen: Vec<(&str, u64)> = r
        .encodings
        .iter()
        .filter(|(k, v)| **v > 0 && PAGE_ENCODINGS.contains(k))
        .map(|(k, v)| (*k, *v))
        .collect();
    chosen.sort_by_key(|c| std::cmp::Reverse(c.1));
    let total: u64 = chosen.iter().map(|c| c.1).sum::<u64>().max(1);
    let chosen: Vec<String> = chosen
        .iter()
        .take(3)
        .map(|(k, v)| format!("{k} {:.0}%", *v as f64 * 100.0 / total as f64))
        .collect();
    [
        r.workload.clone(),
        r.mode.clone(),
        r.dirty_pages.to_string(),
        format!("{:.0}", r.wire_bytes as f64 / 1024.0),
        vs_remus,
        format!("{:.2}", r.encode_gbps()),
        format!("{:.2}", r.apply_gbps()),
        pauses(r),
        r.failover_ms
            .map(|f| format!("{:.1}", f.total))
            .unwrap_or_else(|| "-".into()),
        r.overhead_pct
            .map(|o| format!("{o:.1}%"))
            .unwrap_or_else(|| "-".into()),
        format!("{:.1}", r.digest_bytes as f64 / 1_048_576.0),
        format!("{:.1}", r.cache_bytes as f64 / 1_048_576.0),
        r.verified.to_string(),
        chosen.join(", "),
    ]
}

/// The pause cell: p50/p99 of the main variant, then of each other as `NAME p50/p99`.
fn pauses(r: &RunResult) -> String {
    let mut cell = format!("{:.0}/{:.0}", r.pause_us.p50, r.pause_us.p99);
    for (tracking, figures) in &r.pause_by_tracking {
        if *tracking != r.tracking {
            let p = figures.pause_us;
            cell.push_str(&format!(" {tracking} {:.0}/{:.0}", p.p50, p.p99));
        }
    }
    cell
}

fn print_row(row: &[String; 14]) {
    let [c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13] = row;
    println!(
        "{c0:<8} {c1:<7} {c2:>9} {c3:>10} {c4:>8} {c5:>8} {c6:>8} {c7:>22} {c8:>9} {c9:>8} {c10:>10} {c11:>9}  {c12:<8} {c13}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_stands_for_every_workload_and_names_make_a_program_required() {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (workloads, programs) = split_workloads(&names(&["all", "kv"])).unwrap();
        assert_eq!(workloads, NAMES.map(String::from).to_vec());
        let wanted: Vec<(Program, bool)> = programs.iter().map(|w| (w.program, w.named)).collect();
        assert_eq!(wanted, [(Program::Kv, true), (Program::Heat, false)]);
        let (workloads, programs) = split_workloads(&names(&["heat", "web"])).unwrap();
        assert_eq!(workloads, ["web"]);
        assert!(programs.len() == 1 && programs[0].program == Program::Heat && programs[0].named);
        for (bad, why) in [
            (&["kv", "all", "kv"][..], "names kv twice"),
            (&["web", "all"][..], "names web twice"),
            (&["web", ""][..], "empty name"),
        ] {
            let e = split_workloads(&names(bad)).err().unwrap();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn rates_are_read_in_pages_per_second() {
        assert_eq!(parse_rate("12000").unwrap(), 12000.0);
        assert_eq!(parse_rate("12000pages/s").unwrap(), 12000.0);
        assert_eq!(parse_rate("4.096MB/s").unwrap(), 1000.0);
        assert_eq!(parse_rate("4MiB/s").unwrap(), 1024.0);
        for (bad, why) in [
            ("0", "above zero"),
            ("fast", "not a rate"),
            ("12GB/h", "unknown rate unit"),
            ("", "not a rate"),
        ] {
            let e = parse_rate(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
