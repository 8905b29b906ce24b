//! `fgbi bench`: argument parsing, the results table and the JSON file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use fgbi::bench::{self, BenchConfig, RunResult, TRACE_PREFIX};
use fgbi_engine::Mode;
use fgbi_engine::stats::PAGE_ENCODINGS;
use fgbi_hyp::synthetic::Tracking;
use fgbi_hyp::workload::NAMES;

use crate::size::parse_size;

/// Arguments of `fgbi bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Workload: web, npb-ep, sys, dense, dup, idle, or all.
    #[arg(long, default_value = "all")]
    workload: String,
    /// Replay this trace (recorded by `fgbi record`) instead of a synthetic workload;
    /// memory is the trace's size and --mem is ignored.
    #[arg(long, conflicts_with = "workload")]
    trace: Option<PathBuf>,
    /// Comma-separated modes: remus, llm, xbzrle, fgbi.
    #[arg(long, default_value = "remus,llm,xbzrle,fgbi", value_delimiter = ',')]
    modes: Vec<Mode>,
    /// Measured epochs per workload and mode (after the initial sync).
    #[arg(long, default_value_t = 40)]
    epochs: usize,
    /// Protected memory size (K, M, G suffixes).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// Block size in bytes: a power of two from 32 to 4096.
    #[arg(long, default_value = "64", value_parser = parse_size)]
    block: u64,
    /// Encoder worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Pin encoder workers to cores.
    #[arg(long)]
    pin: bool,
    /// Page cache budget for xbzrle and fgbi (K, M, G suffixes).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    cache: u64,
    /// Workload seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// fgbi ablation: never send a block as a reference to an identical one.
    #[arg(long)]
    no_sharing: bool,
    /// fgbi ablation: never use lz4.
    #[arg(long)]
    no_compression: bool,
    /// Where dirty pages come from: kernel (userfaultfd write-protect, pages copied
    /// in the pause), cow (the same, synchronous, with copy-on-write checkpoints: the
    /// pause only protects the pages) or generator (the workload's own record).
    #[arg(long, default_value = "kernel")]
    tracking: Tracking,
    /// Compare the kernel's dirty pages with the workload's own record every epoch
    /// and fail if the kernel missed a page.
    #[arg(long)]
    check_tracking: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write the results as CSV (one row per workload and mode) to this file.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Also print the table in Markdown after the runs.
    #[arg(long)]
    markdown: bool,
}

/// The table's columns, in the text and Markdown tables.
const COLUMNS: [&str; 12] = [
    "workload",
    "mode",
    "dirty",
    "wire KiB",
    "vs remus",
    "enc GB/s",
    "app GB/s",
    "pause p50/99us",
    "digest MiB",
    "cache MiB",
    "verified",
    "chosen",
];

/// The CSV file's columns: [`RunResult`]'s fields, percentiles flattened.
const CSV_COLUMNS: &str = "workload,mode,epochs,block_size,mem_bytes,workers,backing,tracking,dirty_pages,wire_bytes,sync_bytes,encode_seconds,apply_seconds,encode_us_p50,apply_us_p50,pause_us_p50,pause_us_p99,pause_us_max,verified,digest_bytes,cache_bytes";

/// Runs the bench and prints the table; fails if any run did not verify.
pub fn run(args: BenchArgs) -> Result<ExitCode, String> {
    let workloads = if let Some(trace) = &args.trace {
        vec![format!("{TRACE_PREFIX}{}", trace.display())]
    } else if args.workload == "all" {
        NAMES.iter().map(|s| s.to_string()).collect()
    } else {
        vec![args.workload.clone()]
    };
    if args.epochs == 0 {
        return Err("--epochs must be at least 1".into());
    }
    let config = BenchConfig {
        workloads,
        modes: args.modes.clone(),
        epochs: args.epochs,
        mem_bytes: args.mem,
        block_size: usize::try_from(args.block).map_err(|_| "--block is too large".to_string())?,
        workers: args.workers,
        pin_workers: args.pin,
        cache_bytes: usize::try_from(args.cache).map_err(|_| "--cache is too large".to_string())?,
        seed: args.seed,
        sharing: !args.no_sharing,
        compression: !args.no_compression,
        tracking: args.tracking,
        check_tracking: args.check_tracking,
    };
    if args.check_tracking && args.tracking == Tracking::Generator {
        return Err("--check-tracking compares kernel tracking with the workload: use it with --tracking kernel or cow".into());
    }
    let memory = match &args.trace {
        Some(_) => "memory sized by the trace".to_string(),
        None => format!("{} MiB memory", config.mem_bytes >> 20),
    };
    println!(
        "fgbi bench: {memory}, {}-byte blocks, {} epochs, {} worker(s), {} MiB cache, seed {}",
        config.block_size,
        config.epochs,
        config.workers,
        config.cache_bytes >> 20,
        config.seed
    );
    let mut announced = false;
    let [c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11] = COLUMNS;
    println!(
        "{c0:<8} {c1:<7} {c2:>9} {c3:>10} {c4:>8} {c5:>8} {c6:>8} {c7:>13} {c8:>9} {c9:>9}  {c10:<8} {c11}"
    );
    let mut rows = Vec::new();
    let mut remus: Option<(String, u64)> = None;
    let results = bench::run(&config, |r| {
        if r.mode == "remus" {
            remus = Some((r.workload.clone(), r.wire_bytes));
        }
        if !announced {
            println!(
                "(memory backed by {} pages, dirty pages from the {})",
                r.backing, r.tracking
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
    })
    .map_err(|e| e.to_string())?;
    if let Some(path) = &args.json {
        let json = serde_json::json!({ "schema": 1, "runs": results });
        let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("results written to {}", path.display());
    }
    if let Some(path) = &args.csv {
        std::fs::write(path, csv(&results))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("results written to {}", path.display());
    }
    if args.markdown {
        println!();
        println!("| {} |", COLUMNS.join(" | "));
        println!("|{}", "---|".repeat(COLUMNS.len()));
        for row in &rows {
            let escaped: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
            println!("| {} |", escaped.join(" | "));
        }
    }
    if results.iter().all(|r| r.verified) {
        println!("every run verified: replica digest equal to the primary's after every epoch");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("fgbi: some runs did NOT verify: the replica differed from the primary");
        Ok(ExitCode::FAILURE)
    }
}

/// One run's cells, in [`COLUMNS`] order; `remus_bytes` is the same workload's Remus
/// wire bytes, if it ran.
fn cells(r: &RunResult, remus_bytes: Option<u64>) -> [String; 12] {
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
        format!("{:.0}/{:.0}", r.pause_us.p50, r.pause_us.p99),
        format!("{:.1}", r.digest_bytes as f64 / 1_048_576.0),
        format!("{:.1}", r.cache_bytes as f64 / 1_048_576.0),
        r.verified.to_string(),
        chosen.join(", "),
    ]
}

fn print_row(row: &[String; 12]) {
    let [c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11] = row;
    println!(
        "{c0:<8} {c1:<7} {c2:>9} {c3:>10} {c4:>8} {c5:>8} {c6:>8} {c7:>13} {c8:>9} {c9:>9}  {c10:<8} {c11}"
    );
}

/// The results as CSV: a header line, then one line per run ([`CSV_COLUMNS`]).
fn csv(results: &[RunResult]) -> String {
    let mut out = format!("{CSV_COLUMNS}\n");
    for r in results {
        let fields = [
            csv_field(&r.workload),
            csv_field(&r.mode),
            r.epochs.to_string(),
            r.block_size.to_string(),
            r.mem_bytes.to_string(),
            r.workers.to_string(),
            r.backing.to_string(),
            r.tracking.to_string(),
            r.dirty_pages.to_string(),
            r.wire_bytes.to_string(),
            r.sync_bytes.to_string(),
            r.encode_seconds.to_string(),
            r.apply_seconds.to_string(),
            r.encode_us_p50.to_string(),
            r.apply_us_p50.to_string(),
            r.pause_us.p50.to_string(),
            r.pause_us.p99.to_string(),
            r.pause_us.max.to_string(),
            r.verified.to_string(),
            r.digest_bytes.to_string(),
            r.cache_bytes.to_string(),
        ];
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

/// A CSV field, quoted if it holds a comma, quote or line break (RFC 4180).
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::csv_field;

    #[test]
    fn csv_fields_with_separators_are_quoted() {
        assert_eq!(csv_field("trace:a.fgbt"), "trace:a.fgbt");
        assert_eq!(csv_field("trace:a,b"), "\"trace:a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
