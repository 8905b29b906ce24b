//! The TCP side: one thread per connection, each registered as a safepoint of the
//! protected process. A connection thread parses every complete request in its input
//! buffer, applies them all under the store's lock (pipelined requests cost one lock),
//! sets the restart record, writes the replies, and passes its safepoint. Socket
//! reads and writes and waits for the lock happen in `Safepoint::outside`, so a
//! checkpoint never waits for a client.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};

use fgbi_hyp::process::ProcessHandle;
use fgbi_hyp::resp::{self, Reply};
use fgbi_hyp::safepoint::Safepoint;

use crate::commands::{self, LiveStore, Next, Request};

/// Most connections served at once; more are told so and closed.
const MAX_CLIENTS: usize = 256;
/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 64 << 10;

/// What every connection shares.
pub struct Service {
    /// The store, behind the lock that serialises its users.
    pub store: Mutex<LiveStore>,
    /// The protected process the store lives in, if protected.
    process: Option<ProcessHandle>,
    /// Told once when a client asks for SHUTDOWN.
    pub shutdown: Sender<()>,
    clients: AtomicUsize,
}

impl Service {
    /// A service over `store`, living in `process` if protected, that reports
    /// SHUTDOWN on `shutdown`.
    pub fn new(store: LiveStore, process: Option<ProcessHandle>, shutdown: Sender<()>) -> Self {
        Self {
            store: Mutex::new(store),
            process,
            shutdown,
            clients: AtomicUsize::new(0),
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
    for (number, stream) in listener.incoming().enumerate() {
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
                serve(stream, &service);
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

/// Serves one connection until it closes, errs, or asks for QUIT or SHUTDOWN.
fn serve(mut stream: TcpStream, service: &Service) {
    // Nagle's delay would hold back each reply of a request-response client.
    let _ = stream.set_nodelay(true);
    let name = std::thread::current()
        .name()
        .unwrap_or("kv-conn")
        .to_string();
    let gate = Gate(service.process.as_ref().map(|p| p.register(&name)));
    let mut input: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut output = Vec::new();
    let mut args: Vec<Range<usize>> = Vec::new();
    let mut requests: Vec<Range<usize>> = Vec::new();
    loop {
        gate.pass();
        // Every complete request in the buffer, as ranges of `args`.
        let (mut at, mut failure) = (0, None);
        args.clear();
        requests.clear();
        loop {
            let first = args.len();
            match resp::parse(&input, at, &mut args) {
                Ok(Some(next)) => {
                    at = next;
                    if args.len() > first {
                        requests.push(first..args.len());
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let mut next = Next::Continue;
        if !requests.is_empty() {
            let mut store = gate.outside(|| service.lock());
            let mutations = store.mutations();
            let mut reply = Reply(&mut output);
            for request in &requests {
                let request = Request {
                    buf: &input,
                    args: &args[request.clone()],
                };
                next = commands::execute(&mut store, &request, &mut reply);
                if next != Next::Continue {
                    break;
                }
            }
            // The restart record: mutations applied, set while the store is consistent
            // and locked, so it always matches the memory it travels with.
            if let (Some(process), Ok(count)) = (&service.process, store.mutations()) {
                if mutations.as_ref() != Ok(&count) {
                    process.set_state(&count.to_le_bytes());
                }
            }
        }
        if let Some(resp::ProtocolError(message)) = &failure {
            Reply(&mut output).error(&format!("ERR Protocol error: {message}"));
        }
        input.drain(..at);
        if !output.is_empty() {
            let written = gate.outside(|| stream.write_all(&output));
            output.clear();
            if written.is_err() {
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
