//! The key-value service (examples/kv/): a Redis-protocol store in memory protected
//! by fgbi, replicated in-process or to `fgbi backup`, restartable from a backup's
//! replica.
//!
//!     cargo run --release --example kv -- --port 6379 [--mem 256M] [--epoch-ms 25]
//!         [--backup HOST:PORT --key FILE [--transport rdma|tcp|uring|std|auto]]
//!         [--restart] [--unprotected] ...
//!
//! `fgbi kv` runs the same service. See docs/operating.md and docs/operations.md.

#[path = "kv/mod.rs"]
mod kv;
#[path = "../tools/src/size.rs"]
mod size;
#[path = "../tools/src/transport_arg.rs"]
mod transport_arg;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    kv::run(&kv::Args::parse())
}
