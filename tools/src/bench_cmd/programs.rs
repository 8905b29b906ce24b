//! The real programs `fgbi bench` runs beside the synthetic workloads and traces:
//! each mode in rounds, each an unprotected run of the program and a protected one
//! (through a backup process) that ends with the program killed and restarted by
//! its backup.

use fgbi::bench::{FailoverMs, Percentiles, ProgramResult, Throughput};
use fgbi::percentiles::median;
use fgbi_engine::Mode;

use super::{heat, kv};
use crate::transport_arg::TransportArgs;

/// How the programs are run.
pub struct ProgramSettings {
    /// Protected memory, bytes.
    pub mem: u64,
    /// Epoch length, milliseconds.
    pub epoch_ms: u64,
    /// The link to the backup process.
    pub link: TransportArgs,
    /// Rounds per mode: each one unprotected run, one protected, one failover.
    pub rounds: usize,
    /// kv: requests of each `redis-benchmark` test.
    pub requests: u64,
    /// kv: milliseconds of load before the kill.
    pub kill_after_ms: u64,
    /// kv: milliseconds of load on the restarted service.
    pub after_ms: u64,
    /// heat: the grid's side.
    pub heat_n: u64,
    /// heat: iterations of a run.
    pub heat_iterations: u64,
}

/// What one round measured.
pub struct Round {
    /// The program's rate unprotected.
    pub unprotected: f64,
    /// Its rate protected.
    pub protected: f64,
    /// Checkpoints taken.
    pub checkpoints: u64,
    /// Bytes sent for them.
    pub wire_bytes: u64,
    /// The pause of each, microseconds, if the program says.
    pub pauses: Vec<f64>,
    /// Else their p50, p99 and max, microseconds.
    pub pause_percentiles: Option<[f64; 3]>,
    /// The failover's type I downtime.
    pub failover: FailoverMs,
    /// Whether the restarted program had everything it should.
    pub verified: bool,
    /// What was checked, in words.
    pub check: String,
}

/// A real program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// The key-value service under `redis-benchmark`.
    Kv,
    /// The C heat solver.
    Heat,
}

impl Program {
    /// Every program, in the order `--workload all` runs them.
    pub const ALL: [Self; 2] = [Self::Kv, Self::Heat];

    /// The program called `name`, if one is.
    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "kv" => Some(Self::Kv),
            "heat" => Some(Self::Heat),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kv => "kv",
            Self::Heat => "heat",
        }
    }

    /// What its rate counts.
    fn unit(self) -> &'static str {
        match self {
            Self::Kv => "requests/s",
            Self::Heat => "iterations/s",
        }
    }

    /// Whether it can run here; what to install if not.
    pub fn check(self) -> Result<(), String> {
        match self {
            Self::Kv => kv::check(),
            Self::Heat => heat::check(),
        }
    }

    fn round(self, settings: &ProgramSettings, mode: Mode) -> Result<Round, String> {
        match self {
            Self::Kv => kv::round(settings, mode),
            Self::Heat => heat::round(settings, mode),
        }
    }

    /// The memory it protects, bytes.
    fn mem(self, settings: &ProgramSettings) -> u64 {
        match self {
            Self::Kv => settings.mem,
            Self::Heat => heat::protected_bytes(settings.heat_n),
        }
    }
}

/// Runs `program` in `mode` for every round; the medians of the rates and of each
/// part of type I downtime, every pause.
pub fn run(
    program: Program,
    mode: Mode,
    settings: &ProgramSettings,
) -> Result<ProgramResult, String> {
    let rounds = (0..settings.rounds.max(1))
        .map(|_| program.round(settings, mode))
        .collect::<Result<Vec<Round>, String>>()
        .map_err(|e| format!("{} in {mode} mode: {e}", program.name()))?;
    let mut pauses: Vec<f64> = rounds.iter().flat_map(|r| r.pauses.clone()).collect();
    let checkpoints = rounds.iter().map(|r| r.checkpoints).sum::<u64>();
    let wire_bytes = rounds.iter().map(|r| r.wire_bytes).sum::<u64>();
    let med = |value: fn(&Round) -> f64| {
        let mut values: Vec<f64> = rounds.iter().map(value).collect();
        median(&mut values).unwrap_or(0.0)
    };
    let throughput = Throughput {
        unprotected: med(|r| r.unprotected),
        protected: med(|r| r.protected),
    };
    Ok(ProgramResult {
        workload: program.name().to_string(),
        mode: mode.to_string(),
        transport: settings.link.transport.clone(),
        mem_bytes: program.mem(settings),
        epoch_ms: settings.epoch_ms,
        checkpoints,
        wire_bytes,
        bytes_per_epoch: wire_bytes as f64 / checkpoints.max(1) as f64,
        pause_us: if pauses.is_empty() {
            // The program reports percentiles only: their medians over the rounds.
            Percentiles {
                p50: med(|r| r.pause_percentiles.map_or(0.0, |p| p[0])),
                p99: med(|r| r.pause_percentiles.map_or(0.0, |p| p[1])),
                max: med(|r| r.pause_percentiles.map_or(0.0, |p| p[2])),
            }
        } else {
            Percentiles::of(&mut pauses)
        },
        pause_samples_us: pauses,
        failovers: rounds.len(),
        failover_ms: FailoverMs {
            detect: med(|r| r.failover.detect),
            apply: med(|r| r.failover.apply),
            restore: med(|r| r.failover.restore),
            first_run: med(|r| r.failover.first_run),
            total: med(|r| r.failover.total),
        },
        throughput,
        throughput_unit: program.unit(),
        overhead_pct: (throughput.unprotected > 0.0)
            .then(|| (1.0 - throughput.protected / throughput.unprotected) * 100.0),
        verified: rounds.iter().all(|r| r.verified),
        check: rounds
            .iter()
            .map(|r| r.check.as_str())
            .collect::<Vec<_>>()
            .join("; "),
    })
}

/// The programs' table columns.
pub const COLUMNS: [&str; 11] = [
    "program",
    "mode",
    "ckpts",
    "KiB/ckpt",
    "vs remus",
    "pause p50/99/max us",
    "type I ms",
    "detect/apply/restore/first ms",
    "rate unprot/prot",
    "overhead",
    "verified",
];

/// One program run's cells, in [`COLUMNS`] order; `remus_bytes` is the same
/// program's Remus bytes per checkpoint, if it ran.
pub fn cells(r: &ProgramResult, remus_bytes: Option<f64>) -> [String; 11] {
    let f = r.failover_ms;
    let p = r.pause_us;
    [
        r.workload.clone(),
        r.mode.clone(),
        r.checkpoints.to_string(),
        format!("{:.1}", r.bytes_per_epoch / 1024.0),
        match remus_bytes {
            Some(b) if b > 0.0 => format!("{:.1}%", r.bytes_per_epoch * 100.0 / b),
            _ => "-".into(),
        },
        format!("{:.0}/{:.0}/{:.0}", p.p50, p.p99, p.max),
        format!("{:.1}", f.total),
        format!(
            "{:.1}/{:.1}/{:.1}/{:.1}",
            f.detect, f.apply, f.restore, f.first_run
        ),
        format!(
            "{:.0}/{:.0} {}",
            r.throughput.unprotected, r.throughput.protected, r.throughput_unit
        ),
        r.overhead_pct
            .map(|o| format!("{o:.1}%"))
            .unwrap_or_else(|| "-".into()),
        r.verified.to_string(),
    ]
}

/// Prints a row of the programs' table.
pub fn print_row(row: &[String; 11]) {
    let [c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10] = row;
    println!(
        "{c0:<8} {c1:<7} {c2:>6} {c3:>9} {c4:>8} {c5:>20} {c6:>9} {c7:>30} {c8:>30} {c9:>8}  {c10}"
    );
}
