//! The service's command line and life: protect the store (in-process replica, or a
//! backup over the network with output commit), or take it over from a backup's
//! replica; serve; on SHUTDOWN or after `--seconds`, finish and report.
//!
//! The whole store (hash table, value arena, free lists) is one region protected by
//! [`Replicator`]; every epoch the connection threads are stopped at their
//! safepoints and the pages they dirtied are replicated. With a local replica, the
//! end takes a final checkpoint, opens the replica's region as a store, checks that
//! it holds the same keys and values as the live one and that the restart record
//! agrees, prints the summary and exits (status 1 if anything differs).

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use clap::Parser;
use fgbi::input_log::{self, Entry, InputForwarder, InputLogError};
use fgbi::local::ReplicationError;
use fgbi::metrics::{self, Metrics};
use fgbi::primary::PrimaryEvent;
use fgbi::replicator::{Observer, Remote, Replicator, ReplicatorOptions, Summary, Target};
use fgbi::restart::{Ready, Restart, RestartError};
use fgbi_engine::Mode;
use fgbi_transport::{Liveness, PresharedKey};
use thiserror::Error;

use super::commands::{self, LiveStore, Request};
use super::memory::StoreMemory;
use super::metrics::ServiceMetrics;
use super::server::{Replies, Service};
use super::store::{Store, StoreError};
use crate::transport_arg::TransportArgs;
use fgbi_hyp::resp::{self, Reply};

/// Command line.
#[derive(Parser, Debug, Clone)]
#[command(about = "Key-value service (Redis protocol) on fgbi-protected memory")]
pub struct Args {
    /// TCP port to listen on (0: any free port, printed at start).
    #[arg(long)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Size of the store's region (K, M, G suffixes): an eighth holds the hash table.
    #[arg(long, default_value = "256M", value_parser = crate::size::parse_size)]
    mem: u64,
    /// Milliseconds between checkpoints [default: 25, llm mode 200].
    #[arg(long)]
    epoch_ms: Option<u64>,
    /// Compare the in-process replica with the checkpoint every this many epochs (0:
    /// only the final one). Each comparison hashes the whole region while the
    /// service is stopped.
    #[arg(long, default_value_t = 40)]
    verify_every: u64,
    /// Serve for this many seconds, then finish as on SHUTDOWN.
    #[arg(long)]
    seconds: Option<u64>,
    /// Keep the store in ordinary memory, without protection (for comparison).
    #[arg(long, conflicts_with_all = ["backup", "restart"])]
    unprotected: bool,
    /// Replicate to `fgbi backup` at this address instead of an in-process replica.
    #[arg(long, requires = "key")]
    backup: Option<SocketAddr>,
    /// Key file shared with the backup (at least 16 bytes, owner-only).
    #[arg(long)]
    key: Option<PathBuf>,
    /// With --backup: how the checkpoints travel.
    #[command(flatten)]
    link: TransportArgs,
    /// Encoding mode: remus, llm, xbzrle or fgbi. With --backup, llm also forwards
    /// every request to the backup's input log (--input-log) and sends replies once
    /// the backup holds their requests, instead of output commit.
    #[arg(long, default_value = "fgbi")]
    mode: Mode,
    /// With --mode llm: the backup's input log address (`fgbi backup --input-log`).
    #[arg(long, value_name = "ADDR", requires = "backup")]
    input_log: Option<SocketAddr>,
    /// Heartbeat interval to the backup, milliseconds; silent for four is dead.
    #[arg(long, default_value_t = 25)]
    heartbeat_ms: u64,
    /// How long to wait for the backup at start before serving unprotected, ms.
    #[arg(long, default_value_t = 5000)]
    connect_timeout_ms: u64,
    /// With --backup: send each reply at once instead of after the backup committed
    /// the epoch that produced it (a reply may then announce a write that a
    /// failover loses).
    #[arg(long, requires = "backup")]
    no_output_commit: bool,
    /// Print a line per checkpoint (`sent N pause_us=... bytes=...`, `committed N`).
    #[arg(long)]
    log_epochs: bool,
    /// Serve Prometheus metrics on this address (`GET /metrics`): the service's
    /// requests and held replies, and its replication's epochs.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Take over from the replica `fgbi backup --restart` hands over (automatic when
    /// its environment is present), then serve: unprotected, or with --backup
    /// protected again by that (another) backup.
    #[arg(long)]
    restart: bool,
    /// With --restart: do not replay the inputs the backup logged (to show what the
    /// replay prevents: writes acknowledged after the last checkpoint are lost).
    #[arg(long, hide = true, requires = "restart")]
    no_replay: bool,
}

/// Why the service could not run.
#[derive(Debug, Error)]
enum KvError {
    #[error("--mem {0} does not fit this machine's address space; choose a smaller size")]
    Mem(u64),
    #[error(
        "the replica taken over holds {replica} bytes but --mem is {mem}: give the restarted service the primary's --mem"
    )]
    MemMismatch { replica: usize, mem: u64 },
    #[error("cannot protect the store: {0}")]
    Protect(#[source] ReplicationError),
    #[error("cannot lay out the store: {0}; choose a larger --mem")]
    Store(#[source] StoreError),
    #[error("cannot read the key file: {0}")]
    Key(String),
    #[error("{0}")]
    Transport(String),
    #[error("cannot take over the replica: {0}")]
    Restart(#[from] RestartError),
    #[error(
        "--restart: no replica was handed over; this mode is for a program started by `fgbi backup --restart`"
    )]
    NoReplica,
    #[error("the replica does not hold a consistent store: {0}")]
    Replica(#[source] StoreError),
    #[error("the replica's restart record says {record:?} mutations, its store {store}")]
    Record { record: Option<u64>, store: u64 },
    #[error("cannot listen on {addr}: {source}; choose another --port or --bind")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the accept thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("cannot serve metrics on {addr}: {source}; choose another --metrics address")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the final checkpoint failed: {0}")]
    Finish(#[source] ReplicationError),
    #[error(
        "--mode llm with --backup needs --input-log ADDR (the backup's `--input-log`); other modes take none"
    )]
    InputLogArg,
    #[error("{0}")]
    InputLog(#[from] InputLogError),
    #[error("cannot replay the input log: {0}")]
    Replay(String),
}

/// Milliseconds between checkpoints unless told: LLM's epochs are long (its inputs
/// are logged instead of its outputs held).
fn default_epoch_ms(mode: Mode) -> u64 {
    match mode {
        Mode::Llm => 200,
        _ => 25,
    }
}

/// Runs the service; the process's exit status.
pub fn run(args: &Args) -> ExitCode {
    match serve(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kv: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How the store is kept.
enum Protection {
    None,
    Protected(Replicator),
    Restarted,
}

/// Serves until SHUTDOWN or `--seconds`; true when the replica checked out.
fn serve(args: &Args) -> Result<bool, KvError> {
    let started = Instant::now();
    let restart = Restart::from_env()?;
    let mapped = started.elapsed();
    if args.restart && restart.is_none() {
        return Err(KvError::NoReplica);
    }
    let addr = SocketAddr::new(args.bind, args.port);
    let listen = || TcpListener::bind(addr).map_err(|source| KvError::Listen { addr, source });
    let mut ready = None;
    // The replication's side of the pair is the primary's; counted whether served or not.
    let replication = Arc::new(Metrics::new("primary"));
    let counted = Arc::new(ServiceMetrics::default());
    if let Some(addr) = args.metrics {
        let (replication, counted) = (Arc::clone(&replication), Arc::clone(&counted));
        let bound = metrics::serve_text(addr, move || {
            replication.render() + &counted.render("primary")
        })
        .map_err(|source| KvError::Metrics { addr, source })?;
        println!("kv: metrics http://{bound}/metrics");
    }
    let (store, protection, replies, banner) = match restart {
        Some(restart) => {
            let (store, restarted, banner) = take_over(restart, mapped, !args.no_replay)?;
            ready = Some(restarted);
            if args.backup.is_some() {
                let started = Instant::now();
                let (store, protection, replies, protected) =
                    protect(args, Some(store.into_memory()), &replication)?;
                let banner = format!(
                    "{banner}; {protected}, protected again in {} us",
                    started.elapsed().as_micros()
                );
                (store, protection, replies, banner)
            } else {
                let banner = format!("{banner}; unprotected");
                (store, Protection::Restarted, Replies::Unprotected, banner)
            }
        }
        None if args.unprotected => {
            let mem = usize::try_from(args.mem).map_err(|_| KvError::Mem(args.mem))?;
            let store = Store::create(StoreMemory::heap(mem)).map_err(KvError::Store)?;
            (
                store,
                Protection::None,
                Replies::Unprotected,
                "unprotected".into(),
            )
        }
        None => protect(args, None, &replication)?,
    };
    let listener = listen()?;
    let local = listener
        .local_addr()
        .map_err(|source| KvError::Listen { addr, source })?;
    let (tx, shutdown) = channel();
    let service = Arc::new(Service::new(store, replies, tx, counted));
    {
        let service = Arc::clone(&service);
        std::thread::Builder::new()
            .name("kv-accept".into())
            .spawn(move || super::server::accept(listener, service))
            .map_err(KvError::Thread)?;
    }
    println!(
        "kv: listening on {local}, {} MiB store, {banner}",
        args.mem >> 20
    );
    // The tests wait for this line.
    let _ = std::io::stdout().flush();
    if let Some(ready) = &ready {
        ready.send(&format!("listening {local} {banner}"))?;
    }

    let why = match args.seconds {
        Some(s) => match shutdown.recv_timeout(Duration::from_secs(s)) {
            Err(RecvTimeoutError::Timeout) => "time is up",
            _ => "SHUTDOWN",
        },
        None => {
            // `service` holds the sender, so this waits for a SHUTDOWN.
            let _ = shutdown.recv();
            "SHUTDOWN"
        }
    };
    // Holding the lock keeps connection threads out of the store from here on; a
    // thread waiting for it counts as stopped, so the final checkpoint completes.
    let live = service.lock();
    println!("kv: {why}: {} keys", live.keys().unwrap_or(0));
    match protection {
        Protection::None => {
            println!("kv: unprotected: no replica to check");
            Ok(true)
        }
        Protection::Restarted => {
            println!("kv: restarted from a replica: no replica of its own to check");
            Ok(true)
        }
        Protection::Protected(replicator) => {
            let summary = replicator.finish().map_err(KvError::Finish)?;
            Ok(report(&live, &summary))
        }
    }
}

/// Protects a new store, or (`from`) the store of a replica taken over: replicated
/// in-process, or to `--backup`; its checkpoints counted in `metrics`.
fn protect(
    args: &Args,
    from: Option<StoreMemory>,
    metrics: &Arc<Metrics>,
) -> Result<(LiveStore, Protection, Replies, String), KvError> {
    let mem = usize::try_from(args.mem).map_err(|_| KvError::Mem(args.mem))?;
    let llm = args.mode == Mode::Llm && args.backup.is_some();
    if llm != args.input_log.is_some() {
        return Err(KvError::InputLogArg);
    }
    let epoch_ms = args.epoch_ms.unwrap_or(default_epoch_ms(args.mode));
    let mut forwarder = None;
    let mut over = String::new();
    let target = match (&args.backup, &args.key) {
        (Some(backup), Some(key)) => {
            let implementation = args.link.implementation().map_err(KvError::Transport)?;
            over = format!(" over {}", implementation.as_str());
            let key = PresharedKey::from_file(key).map_err(|e| KvError::Key(e.to_string()))?;
            if let Some(addr) = args.input_log {
                forwarder = Some(Arc::new(InputForwarder::connect(addr, &key, args.mem)?));
            }
            let interval = Duration::from_millis(args.heartbeat_ms.max(1));
            Target::Remote(Remote {
                backup: *backup,
                key: Arc::new(key),
                implementation,
                rdma: args.link.rdma(),
                liveness: Liveness {
                    interval,
                    timeout: interval * 4,
                },
                connect_timeout: Duration::from_millis(args.connect_timeout_ms),
            })
        }
        _ => Target::Local,
    };
    let log_epochs = args.log_epochs;
    let metrics = Arc::clone(metrics);
    let options = ReplicatorOptions {
        epoch: Duration::from_millis(epoch_ms.max(1)),
        mode: args.mode,
        verify_every: args.verify_every,
        target,
        observer: Some(Observer(Arc::new(move |event| {
            metrics.primary_event(&event);
            log(event, log_epochs);
        }))),
        ..ReplicatorOptions::default()
    };
    if let Some(replica) = from.as_ref().map(|from| from.as_ref().len()) {
        if replica != mem {
            return Err(KvError::MemMismatch {
                replica,
                mem: args.mem,
            });
        }
    }
    let (handle, replicator) = match &from {
        // The store taken over, and its record, are in place before the first
        // checkpoint: no checkpoint of this process lacks them.
        Some(from) => Replicator::start_from(&[mem], options, |handle| {
            if let Some(mut memory) = StoreMemory::protected(handle.clone()) {
                memory.as_mut().copy_from_slice(from.as_ref());
                if let Ok(mutations) = Store::open(from).and_then(|s| s.mutations()) {
                    handle.set_state(&super::server::record(mutations, llm.then_some(0)));
                }
            }
        }),
        None => Replicator::start(&[mem], options),
    }
    .map_err(KvError::Protect)?;
    let memory = StoreMemory::protected(handle.clone())
        .expect("Replicator::start made the one region asked for");
    let store = match from {
        Some(_) => Store::open(memory).map_err(KvError::Replica)?,
        None => Store::create(memory).map_err(KvError::Store)?,
    };
    let (replies, banner) = match (&args.backup, args.no_output_commit) {
        (Some(backup), _) if forwarder.is_some() => (
            Replies::Logged(
                handle,
                forwarder.expect("checked to be present by the guard"),
            ),
            format!(
                "protected by the backup at {backup}{over}, llm mode, epoch {epoch_ms} ms, inputs logged at {}, replies once their inputs are logged",
                args.input_log.map(|a| a.to_string()).unwrap_or_default()
            ),
        ),
        (Some(backup), false) => (
            Replies::AfterCommit(handle),
            format!(
                "protected by the backup at {backup}{over}, {} mode, epoch {epoch_ms} ms, replies after commit",
                args.mode
            ),
        ),
        (Some(backup), true) => (
            Replies::AtOnce(handle),
            format!(
                "protected by the backup at {backup}{over}, {} mode, epoch {epoch_ms} ms, replies at once (no output commit)",
                args.mode
            ),
        ),
        (None, _) => (
            Replies::AtOnce(handle),
            format!(
                "protected, epoch {epoch_ms} ms, verify every {}",
                args.verify_every
            ),
        ),
    };
    Ok((store, Protection::Protected(replicator), replies, banner))
}

/// Prints an event of the epoch thread: connection changes always, checkpoints when
/// asked for (the format of `fgbi primary`).
fn log(event: PrimaryEvent, epochs: bool) {
    let line = match event {
        PrimaryEvent::Sent {
            epoch,
            pause,
            bytes,
            ..
        } if epochs => {
            format!("sent {epoch} pause_us={} bytes={bytes}", pause.as_micros())
        }
        PrimaryEvent::Committed { epoch, .. } if epochs => format!("committed {epoch}"),
        PrimaryEvent::Synced {
            epoch,
            round,
            pages,
            ..
        } if epochs => format!("synced {epoch} round={round} pages={pages}"),
        PrimaryEvent::Connected(n) => format!("connected backup_committed={n}"),
        PrimaryEvent::Unprotected { reason } => {
            format!("unprotected: no backup holds the store ({reason}); serving on")
        }
        _ => return,
    };
    println!("kv: {line}");
}

/// Opens the store the backup handed over, checks it against its restart record, and
/// (unless `replay_inputs` is false) replays the logged inputs the replica does not
/// reflect. `mapped` is how long mapping it took.
fn take_over(
    mut restart: Restart,
    mapped: Duration,
    replay_inputs: bool,
) -> Result<(LiveStore, Ready, String), KvError> {
    let started = Instant::now();
    let epoch = restart.epoch();
    let word = |i: usize| {
        restart
            .record()
            .get(i * 8..i * 8 + 8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
            .map(u64::from_le_bytes)
    };
    let (record, last_input) = (word(0), word(1).unwrap_or(0));
    let inputs = restart.inputs().map(input_log::decode).transpose()?;
    let ready = restart.take_ready();
    let memory = StoreMemory::restored(restart).ok_or(KvError::Replica(StoreError::Corrupt(
        "the replica has no region".into(),
    )))?;
    let mut store = Store::open(memory).map_err(KvError::Replica)?;
    let mutations = store.mutations().map_err(KvError::Replica)?;
    if record.is_some_and(|r| r != mutations) || (record.is_none() && mutations != 0) {
        return Err(KvError::Record {
            record,
            store: mutations,
        });
    }
    let checked = started.elapsed();
    let replayed = match inputs {
        Some(inputs) if !replay_inputs => {
            format!(", NOT replaying {} logged inputs", inputs.len())
        }
        Some(inputs) => {
            let started = Instant::now();
            let (done, skipped) = replay(&mut store, &inputs, last_input)?;
            format!(
                ", replayed {done} logged inputs in {} us (skipped {skipped} the checkpoint reflects)",
                started.elapsed().as_micros()
            )
        }
        None => String::new(),
    };
    let keys = store.keys().map_err(KvError::Replica)?;
    let banner = format!(
        "restarted from the replica at epoch {epoch}: {mutations} mutations as its restart record says, mapped in {} us, store checked in {} us{replayed}, {keys} keys",
        mapped.as_micros(),
        checked.as_micros()
    );
    Ok((store, ready, banner))
}

/// Executes, in their order, the logged inputs after `last_input` (the last one the
/// checkpoint reflects), discarding their replies: their clients were answered
/// before the failover, or were not and retry. Returns how many ran and were skipped.
fn replay(
    store: &mut LiveStore,
    inputs: &[Entry],
    last_input: u64,
) -> Result<(usize, usize), KvError> {
    let (mut args, mut output) = (Vec::new(), Vec::new());
    let mut done = 0;
    for entry in inputs.iter().filter(|e| e.lsn > last_input) {
        args.clear();
        output.clear();
        match resp::parse(&entry.bytes, 0, &mut args) {
            Ok(Some(end)) if end == entry.bytes.len() && !args.is_empty() => {}
            _ => {
                return Err(KvError::Replay(format!(
                    "input {} (request {} of connection {}) is not one request",
                    entry.lsn, entry.seq, entry.conn
                )));
            }
        }
        let request = Request {
            buf: &entry.bytes,
            args: &args,
        };
        // QUIT and SHUTDOWN ended the old primary's connection or service: nothing
        // to redo.
        commands::execute(store, &request, &mut Reply(&mut output));
        done += 1;
    }
    Ok((done, inputs.len() - done))
}

/// Prints protection's summary and, with a local replica, compares it with the live
/// store; true when every checkpoint verified and the replica holds the live store's
/// contents.
fn report(live: &LiveStore, summary: &Summary) -> bool {
    println!(
        "kv: epochs {}, committed {}, verified {}, mismatches {}, pause p50 {:.0} us, p99 {:.0} us, max {:.0} us (type II downtime), dirty pages {}, wire bytes {}",
        summary.epochs,
        summary.committed,
        summary.verified,
        summary.mismatches,
        summary.pause_us.p50,
        summary.pause_us.p99,
        summary.pause_us.max,
        summary.dirty_pages,
        summary.wire_bytes
    );
    let Some(view) = &summary.replica else {
        println!("kv: the replica is on the backup");
        return true;
    };
    let replica = view
        .region(0)
        .ok_or_else(|| StoreError::Corrupt("the replica has no region 0".into()))
        .and_then(Store::open);
    let record = <[u8; 8]>::try_from(view.state()).map(u64::from_le_bytes);
    let checked = replica.and_then(|replica| {
        Ok((
            live.same_contents(&replica)?,
            replica.keys()?,
            replica.mutations()?,
            live.mutations()?,
        ))
    });
    match (checked, record) {
        (Ok((true, keys, mutations, live_mutations)), Ok(record))
            if mutations == live_mutations && record == mutations =>
        {
            println!(
                "kv: replica: {keys} keys, equal to the live store; restart record {record} mutations, as in both stores"
            );
            summary.mismatches == 0
        }
        (Ok((true, _, 0, 0)), Err(_)) => {
            println!(
                "kv: replica: empty, equal to the live store; no restart record (nothing was written)"
            );
            summary.mismatches == 0
        }
        (Ok((equal, keys, mutations, live_mutations)), record) => {
            println!(
                "kv: REPLICA DIFFERS: contents equal: {equal}, {keys} keys, {mutations} mutations (live {live_mutations}), restart record {record:?}"
            );
            false
        }
        (Err(e), _) => {
            println!("kv: REPLICA DIFFERS: it does not open as a store: {e}");
            false
        }
    }
}
