//! A key-value service whose store lives in protected memory and which speaks enough
//! of the Redis protocol (RESP2) for `redis-cli` and `redis-benchmark`.
//!
//!     cargo run --release --example kv -- --port 6379 [--mem 256M] [--epoch-ms 25]
//!         [--verify-every 40] [--seconds S] [--bind ADDR] [--unprotected]
//!
//! The whole store (hash table, value arena, free lists) is one region protected by
//! [`Replicator`]; every epoch the connection threads are stopped at their
//! safepoints and the pages they dirtied are replicated. On SHUTDOWN, or after
//! `--seconds`, the service takes a final checkpoint, opens the replica's region as a
//! store, checks that it holds the same keys and values as the live one and that the
//! restart record agrees, prints the summary and exits (status 1 if anything
//! differs). See docs/operating.md.

#[path = "kv/commands.rs"]
mod commands;
#[path = "kv/memory.rs"]
mod memory;
#[path = "kv/server.rs"]
mod server;
#[path = "../tools/src/size.rs"]
mod size;
#[path = "kv/store.rs"]
mod store;

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::Duration;

use clap::Parser;
use fgbi::local::ReplicationError;
use fgbi::replicator::{Replicator, ReplicatorOptions, Summary};
use thiserror::Error;

use crate::memory::StoreMemory;
use crate::server::Service;
use crate::store::{Store, StoreError};

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "Key-value service (Redis protocol) on fgbi-protected memory")]
struct Args {
    /// TCP port to listen on (0: any free port, printed at start).
    #[arg(long)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Size of the store's region (K, M, G suffixes): an eighth holds the hash table.
    #[arg(long, default_value = "256M", value_parser = size::parse_size)]
    mem: u64,
    /// Milliseconds between checkpoints.
    #[arg(long, default_value_t = 25)]
    epoch_ms: u64,
    /// Compare the replica with the checkpoint every this many epochs (0: only the
    /// final one). Each comparison hashes the whole region while the service is
    /// stopped.
    #[arg(long, default_value_t = 40)]
    verify_every: u64,
    /// Serve for this many seconds, then finish as on SHUTDOWN.
    #[arg(long)]
    seconds: Option<u64>,
    /// Keep the store in ordinary memory, without protection (for comparison).
    #[arg(long)]
    unprotected: bool,
}

/// Why the service could not run.
#[derive(Debug, Error)]
enum KvError {
    #[error("--mem {0} does not fit this machine's address space; choose a smaller size")]
    Mem(u64),
    #[error("cannot protect the store: {0}")]
    Protect(#[source] ReplicationError),
    #[error("cannot lay out the store: {0}; choose a larger --mem")]
    Store(#[source] StoreError),
    #[error("cannot listen on {addr}: {source}; choose another --port or --bind")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the accept thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the final checkpoint failed: {0}")]
    Finish(#[source] ReplicationError),
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kv: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves until SHUTDOWN or `--seconds`; true when the replica checked out.
fn run(args: &Args) -> Result<bool, KvError> {
    let mem = usize::try_from(args.mem).map_err(|_| KvError::Mem(args.mem))?;
    let (memory, protection) = if args.unprotected {
        (StoreMemory::heap(mem), None)
    } else {
        let options = ReplicatorOptions {
            epoch: Duration::from_millis(args.epoch_ms),
            verify_every: args.verify_every,
            ..ReplicatorOptions::default()
        };
        let (handle, replicator) = Replicator::start(&[mem], options).map_err(KvError::Protect)?;
        let memory = StoreMemory::protected(handle.clone())
            .expect("Replicator::start made the one region asked for");
        (memory, Some((handle, replicator)))
    };
    let store = Store::create(memory).map_err(KvError::Store)?;
    let addr = SocketAddr::new(args.bind, args.port);
    let listener = TcpListener::bind(addr).map_err(|source| KvError::Listen { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| KvError::Listen { addr, source })?;
    let (tx, shutdown) = channel();
    let process = protection.as_ref().map(|(handle, _)| handle.clone());
    let service = Arc::new(Service::new(store, process, tx));
    {
        let service = Arc::clone(&service);
        std::thread::Builder::new()
            .name("kv-accept".into())
            .spawn(move || server::accept(listener, service))
            .map_err(KvError::Thread)?;
    }
    println!(
        "kv: listening on {local}, {} MiB store, {}",
        mem >> 20,
        if protection.is_some() {
            format!(
                "protected, epoch {} ms, verify every {}",
                args.epoch_ms, args.verify_every
            )
        } else {
            "unprotected".to_string()
        }
    );
    // The tests wait for this line.
    let _ = std::io::stdout().flush();

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
    let Some((_, replicator)) = protection else {
        println!("kv: unprotected: no replica to check");
        return Ok(true);
    };
    let summary = replicator.finish().map_err(KvError::Finish)?;
    Ok(report(&live, &summary))
}

/// Prints protection's summary and compares the replica with the live store; true
/// when every checkpoint verified and the replica holds the live store's contents.
fn report(live: &commands::LiveStore, summary: &Summary) -> bool {
    println!(
        "kv: epochs {}, verified {}, mismatches {}, pause p50 {:.0} us, p99 {:.0} us, max {:.0} us (type II downtime), dirty pages {}, wire bytes {}",
        summary.epochs,
        summary.verified,
        summary.mismatches,
        summary.pause_us.p50,
        summary.pause_us.p99,
        summary.pause_us.max,
        summary.dirty_pages,
        summary.wire_bytes
    );
    let replica = summary
        .replica
        .region(0)
        .ok_or_else(|| StoreError::Corrupt("the replica has no region 0".into()))
        .and_then(Store::open);
    let record = <[u8; 8]>::try_from(summary.replica.state()).map(u64::from_le_bytes);
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
