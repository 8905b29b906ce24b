//! `fgbi record`: records a running process's memory, epoch by epoch, into a trace
//! file that `fgbi bench --trace` replays.

use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use fgbi::bench::Percentiles;
use fgbi_hyp::trace::{RecordError, Recorder, TraceWriter};

/// Arguments of `fgbi record`.
#[derive(Args, Debug)]
pub struct RecordArgs {
    /// The process to record (root, or the owner with ptrace permission).
    #[arg(long)]
    pid: i32,
    /// Epoch length, milliseconds: the process is stopped and copied this often.
    #[arg(long, default_value_t = 100)]
    epoch_ms: u32,
    /// How long to record, seconds (recording ends early if the process exits).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// The trace file to write.
    #[arg(short = 'o', long)]
    output: PathBuf,
}

/// Records the process and prints what it cost.
pub fn run(args: RecordArgs) -> Result<ExitCode, String> {
    if args.epoch_ms == 0 {
        return Err("--epoch-ms must be at least 1".into());
    }
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        return Err("--seconds must be a positive number".into());
    }
    let epoch = Duration::from_millis(u64::from(args.epoch_ms));
    let epochs = ((args.seconds * 1000.0) / f64::from(args.epoch_ms)).ceil() as u32;
    let mut recorder = Recorder::new(args.pid).map_err(|e| e.to_string())?;
    let path = args.output.display().to_string();
    let file = File::create(&args.output).map_err(|e| format!("cannot create {path}: {e}"))?;
    let mut writer =
        TraceWriter::new(BufWriter::new(file), args.epoch_ms).map_err(|e| e.to_string())?;
    let (mut stops, mut changed) = (Vec::new(), 0u64);
    let start = Instant::now();
    // Epoch 0 is the initial copy; epochs 1..=epochs hold the changes.
    for i in 0..=epochs {
        if let Some(wait) = (start + epoch * i).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let capture = match recorder.capture() {
            Ok(capture) => capture,
            Err(RecordError::Gone(pid)) if i > 0 => {
                eprintln!("fgbi: process {pid} exited; the trace ends after {i} epochs");
                break;
            }
            Err(e) => return Err(e.to_string()),
        };
        stops.push(capture.stopped.as_secs_f64() * 1e6);
        if i > 0 {
            changed += capture.epoch.len() as u64;
        }
        writer
            .write_epoch(&capture.epoch)
            .map_err(|e| format!("{path}: {e}"))?;
    }
    let recorded = writer.epochs();
    writer
        .finish(recorder.pages())
        .map_err(|e| format!("{path}: {e}"))?;
    let size = std::fs::metadata(&args.output).map_or(0, |m| m.len());
    let stop = Percentiles::of(&mut stops);
    println!(
        "recorded process {}: {} epochs of {} ms, {} pages ({:.1} MiB) of writable memory, {:.1} changed pages per epoch",
        args.pid,
        recorded,
        args.epoch_ms,
        recorder.pages(),
        recorder.pages() as f64 / 256.0,
        changed as f64 / f64::from(recorded.saturating_sub(1).max(1)),
    );
    println!(
        "stop time per epoch: p50 {:.0} us, p99 {:.0} us, max {:.0} us; trace {} ({} KiB)",
        stop.p50,
        stop.p99,
        stop.max,
        path,
        size / 1024
    );
    Ok(ExitCode::SUCCESS)
}
