//! The TCP side: one thread per connection, each registered as a safepoint of the
//! protected process. A connection thread parses every complete request in its input
//! buffer, applies them all under the store's lock (pipelined requests cost one lock),
//! sets the restart record, writes the replies, and passes its safepoint. Socket
//! reads and writes and waits for the lock happen in `Safepoint::outside`, so a
//! checkpoint never waits for a client.
//!
//! With output commit ([`Replies::AfterCommit`]) the replies of a batch are tagged
//! with the output epoch they were computed in and handed to the connection's writer
//! thread, which writes them once the backup has committed that epoch's checkpoint.
//! The connection thread goes on reading and executing meanwhile; the writer has no
//! safepoint (it never touches the store), so held replies never hold back a
//! checkpoint.
//!
//! In LLM mode ([`Replies::Logged`]) replies leave at once, without output commit:
//! each request is forwarded to the backup's input log under the store's lock,
//! right before it executes, and the batch's replies are written once the backup
//! has acknowledged receiving every input up to the batch's last.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fgbi::input_log::InputForwarder;
use fgbi_hyp::process::ProcessHandle;
use fgbi_hyp::resp::{self, Reply};
use fgbi_hyp::safepoint::Safepoint;

use super::commands::{self, LiveStore, Next, Request};
use super::metrics::ServiceMetrics;

/// Most connections served at once; more are told so and closed.
const MAX_CLIENTS: usize = 256;
/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 64 << 10;
/// Batches of replies a connection may have held before it stops reading.
const HELD_BATCHES: usize = 256;

/// When replies leave.
pub enum Replies {
    /// The store is not protected: at once.
    Unprotected,
    /// The store lives in this protected process; replies leave at once.
    AtOnce(ProcessHandle),
    /// The store lives in this protected process; a reply leaves once the checkpoint
    /// of the output epoch that computed it is committed.
    AfterCommit(ProcessHandle),
    /// LLM: the store lives in this protected process, every request is forwarded to
    /// the backup's input log before it executes, and a reply leaves once the backup
    /// has received every request executed up to it.
    Logged(ProcessHandle, Arc<InputForwarder>),
}

/// The restart record: the mutations applied, then (LLM) the last input executed.
pub fn record(mutations: u64, last_input: Option<u64>) -> Vec<u8> {
    let mut out = mutations.to_le_bytes().to_vec();
    if let Some(lsn) = last_input {
        out.extend_from_slice(&lsn.to_le_bytes());
    }
    out
}

/// What every connection shares.
pub struct Service {
    /// The store, behind the lock that serialises its users.
    pub store: Mutex<LiveStore>,
    replies: Replies,
    /// Told once when a client asks for SHUTDOWN.
    pub shutdown: Sender<()>,
    clients: AtomicUsize,
    metrics: Arc<ServiceMetrics>,
}

impl Service {
    /// A service over `store` whose replies leave as `replies` says, that reports
    /// SHUTDOWN on `shutdown` and counts what it does in `metrics`.
    pub fn new(
        store: LiveStore,
        replies: Replies,
        shutdown: Sender<()>,
        metrics: Arc<ServiceMetrics>,
    ) -> Self {
        Self {
            store: Mutex::new(store),
            replies,
            shutdown,
            clients: AtomicUsize::new(0),
            metrics,
        }
    }

    /// The protected process the store lives in, if protected.
    fn process(&self) -> Option<&ProcessHandle> {
        match &self.replies {
            Replies::Unprotected => None,
            Replies::AtOnce(process)
            | Replies::AfterCommit(process)
            | Replies::Logged(process, _) => Some(process),
        }
    }

    /// The store, even if a connection thread panicked while holding it (each
    /// store operation leaves it consistent or fails before writing).
    pub fn lock(&self) -> MutexGuard<'_, LiveStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Accepts connections forever, one thread each.
pub fn accept(listener: TcpListener, service: Arc<Service>) {
    for (number, stream) in (1..).zip(listener.incoming()) {
        let Ok(mut stream) = stream else { continue };
        if service.clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            service.clients.fetch_sub(1, Ordering::AcqRel);
            // Best effort: the client is refused whether or not it reads this.
            let _ = stream.write_all(b"-ERR max number of clients reached\r\n");
            continue;
        }
        let service = Arc::clone(&service);
        let spawned = std::thread::Builder::new()
            .name(format!("kv-conn-{number}"))
            .spawn(move || {
                service.metrics.connected();
                serve(stream, &service, number);
                service.metrics.disconnected();
                service.clients.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            eprintln!("kv: cannot start a connection thread: {e}");
        }
    }
}

/// A connection's safepoint, absent when the store is not protected.
struct Gate(Option<Safepoint>);

impl Gate {
    fn pass(&self) {
        if let Some(safepoint) = &self.0 {
            safepoint.pass();
        }
    }

    fn outside<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.0 {
            Some(safepoint) => safepoint.outside(f),
            None => f(),
        }
    }
}

/// A batch of replies held for output commit.
struct Held {
    /// The output epoch that computed them.
    epoch: u64,
    /// How many replies.
    replies: u64,
    /// When they were held.
    since: Instant,
    bytes: Vec<u8>,
}

/// Where a connection's replies go.
enum Out {
    /// Straight to the socket.
    Socket,
    /// To the writer thread.
    Held(SyncSender<Held>),
}

/// The writer thread of a connection with output commit: writes each batch once its
/// output epoch is committed (together with the batches committed by then). After a
/// failed write it shuts the socket, so the connection thread ends too, and drops
/// what is still held until the connection thread closes the channel.
fn release(
    mut stream: TcpStream,
    process: ProcessHandle,
    held: Receiver<Held>,
    metrics: &ServiceMetrics,
) {
    let mut open = true;
    let mut next = held.recv().ok();
    while let Some(first) = next.take() {
        while open && !process.wait_committed(first.epoch, Duration::from_secs(1)) {}
        let committed = process.committed_epoch();
        let mut batches = vec![(first.replies, first.since)];
        let mut bytes = first.bytes;
        loop {
            match held.try_recv() {
                Ok(more) if more.epoch <= committed => {
                    batches.push((more.replies, more.since));
                    bytes.extend_from_slice(&more.bytes);
                }
                Ok(later) => {
                    next = Some(later);
                    break;
                }
                Err(_) => break,
            }
        }
        // Counted before they leave: a client that read them sees them counted.
        for (replies, since) in batches {
            metrics.released(replies, since.elapsed());
        }
        if open && stream.write_all(&bytes).is_err() {
            open = false;
            // The connection thread's next read fails at once.
            let _ = stream.shutdown(Shutdown::Both);
        }
        if next.is_none() {
            next = held.recv().ok();
        }
    }
}

/// Serves connection `conn` until it closes, errs, or asks for QUIT or SHUTDOWN.
fn serve(mut stream: TcpStream, service: &Service, conn: u64) {
    // Nagle's delay would hold back each reply of a request-response client.
    let _ = stream.set_nodelay(true);
    let name = std::thread::current()
        .name()
        .unwrap_or("kv-conn")
        .to_string();
    let out = match &service.replies {
        Replies::AfterCommit(process) => {
            let (tx, rx) = sync_channel(HELD_BATCHES);
            let process = process.clone();
            let metrics = Arc::clone(&service.metrics);
            let spawned = stream.try_clone().and_then(|writer| {
                std::thread::Builder::new()
                    .name(format!("{name}-out"))
                    .spawn(move || release(writer, process, rx, &metrics))
            });
            if let Err(e) = spawned {
                eprintln!("kv: cannot start a connection's writer thread: {e}");
                return;
            }
            Out::Held(tx)
        }
        Replies::Unprotected | Replies::AtOnce(_) | Replies::Logged(..) => Out::Socket,
    };
    let log = match &service.replies {
        Replies::Logged(process, log) => Some((process, log)),
        _ => None,
    };
    // Requests of this connection forwarded so far; the last input forwarded.
    let (mut seq, mut forwarded) = (0, 0);
    let gate = Gate(service.process().map(|p| p.register(&name)));
    let mut input: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut output = Vec::new();
    let mut args: Vec<Range<usize>> = Vec::new();
    // Each request's arguments (as ranges of `args`) and bytes (a range of `input`).
    let mut requests: Vec<(Range<usize>, Range<usize>)> = Vec::new();
    loop {
        gate.pass();
        // Every complete request in the buffer.
        let (mut at, mut failure) = (0, None);
        args.clear();
        requests.clear();
        loop {
            let first = args.len();
            match resp::parse(&input, at, &mut args) {
                Ok(Some(next)) => {
                    if args.len() > first {
                        requests.push((first..args.len(), at..next));
                    }
                    at = next;
                }
                Ok(None) => break,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let mut next = Next::Continue;
        let mut executed = 0;
        if !requests.is_empty() {
            let mut store = gate.outside(|| service.lock());
            let mutations = store.mutations();
            let mut reply = Reply(&mut output);
            for (request, bytes) in &requests {
                // Under the store's lock, so the log's order is the execution order,
                // and before the next safepoint, so `output_epoch` is the epoch whose
                // checkpoint reflects the execution.
                if let Some((process, log)) = log {
                    seq += 1;
                    forwarded = log.forward(
                        process.output_epoch(),
                        process.committed_epoch(),
                        conn,
                        seq,
                        &input[bytes.clone()],
                    );
                }
                let request = Request {
                    buf: &input,
                    args: &args[request.clone()],
                };
                next = commands::execute(&mut store, &request, &mut reply);
                executed += 1;
                if next != Next::Continue {
                    break;
                }
            }
            // The restart record, set while the store is consistent and locked, so it
            // always matches the memory it travels with.
            if let (Some(process), Ok(count)) = (service.process(), store.mutations()) {
                if log.is_some() {
                    process.set_state(&record(count, Some(forwarded)));
                } else if mutations.as_ref() != Ok(&count) {
                    process.set_state(&record(count, None));
                }
            }
        }
        service.metrics.served(executed);
        if let Some(resp::ProtocolError(message)) = &failure {
            Reply(&mut output).error(&format!("ERR Protocol error: {message}"));
        }
        input.drain(..at);
        if !output.is_empty() {
            let written = match &out {
                Out::Socket => gate
                    .outside(|| {
                        // LLM: a reply (or anything it depends on) never leaves before
                        // the backup holds every input executed up to it.
                        if let Some((_, log)) = log {
                            while !log.wait_received(forwarded, Duration::from_secs(1)) {}
                        }
                        (&stream).write_all(&output)
                    })
                    .is_ok(),
                Out::Held(writer) => {
                    // Read before the next safepoint: everything this batch read or
                    // wrote is in the checkpoint that closes this epoch.
                    let batch = Held {
                        epoch: service.process().map_or(0, ProcessHandle::output_epoch),
                        replies: executed + u64::from(failure.is_some()),
                        since: Instant::now(),
                        bytes: std::mem::take(&mut output),
                    };
                    let replies = batch.replies;
                    // Counted before the writer can release them.
                    service.metrics.held(replies);
                    let sent = gate.outside(|| writer.send(batch));
                    if sent.is_err() {
                        service.metrics.released(replies, Duration::ZERO);
                    }
                    sent.is_ok()
                }
            };
            output.clear();
            if !written {
                return;
            }
        }
        match next {
            Next::Continue if failure.is_none() => {}
            Next::Shutdown => {
                drop(gate);
                // The receiver lives as long as the process does.
                let _ = service.shutdown.send(());
                return;
            }
            _ => return,
        }
        let before = input.len();
        input.resize(before + READ_CHUNK, 0);
        let read = gate.outside(|| {
            loop {
                match stream.read(&mut input[before..]) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    other => break other,
                }
            }
        });
        match read {
            Ok(n) if n > 0 => input.truncate(before + n),
            // Closed by the client, or the socket failed: nothing to answer.
            _ => return,
        }
    }
}
