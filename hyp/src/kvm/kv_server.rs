//! The TCP front end of the key-value service that runs inside a VM (the `kv` guest):
//! it speaks the Redis protocol ([`crate::resp`]) to clients such as `redis-cli` and
//! `redis-benchmark`, hands each request to the VM's key-value device
//! ([`super::kv::KvDevice`]) and writes back the reply the guest produced once the
//! device releases it (with output commit, once the epoch that produced it is on the
//! backup). The store and every command's meaning live in the guest; the front end
//! only frames, except QUIT, which it answers itself.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::kv::{KvDevice, encode_request};
use crate::resp::{self, ProtocolError};

/// Most connections served at once; more are told so and closed.
const MAX_CLIENTS: usize = 256;
/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 64 << 10;
/// How long a connection waits for one reply before giving up on the VM.
const REPLY_WAIT: Duration = Duration::from_secs(60);

/// A listening front end; dropping it stops accepting (open connections end when
/// their clients leave or the VM goes).
pub struct KvServer {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl KvServer {
    /// Serves `device` to every client that connects to `listener`.
    pub fn start(listener: TcpListener, device: Arc<KvDevice>) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stopping);
        let accept = std::thread::Builder::new()
            .name("kv-accept".into())
            .spawn(move || accept(listener, device, &flag))?;
        Ok(Self {
            addr,
            stopping,
            accept: Some(accept),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for KvServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // Wakes the accept loop; if the connection fails the loop is already gone.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn accept(listener: TcpListener, device: Arc<KvDevice>, stopping: &AtomicBool) {
    let clients = Arc::new(AtomicUsize::new(0));
    for (number, stream) in listener.incoming().enumerate() {
        if stopping.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut stream) = stream else { continue };
        if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::AcqRel);
            // Best effort: the client is refused whether or not it reads this.
            let _ = stream.write_all(b"-ERR max number of clients reached\r\n");
            continue;
        }
        let (device, count) = (Arc::clone(&device), Arc::clone(&clients));
        let spawned = std::thread::Builder::new()
            .name(format!("kv-vm-conn-{number}"))
            .spawn(move || {
                // A connection ends on any socket error: the client is gone.
                let _ = serve(stream, &device);
                count.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            clients.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// What a parsed request waits on.
enum Answer {
    /// The VM's reply to a submitted request.
    Vm(u64),
    /// A reply the front end gives itself.
    Local(Vec<u8>),
}

/// Serves one connection: every complete request in the input is submitted at
/// once (pipelined requests share a batch), then the replies are written in order.
fn serve(mut stream: TcpStream, device: &KvDevice) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut input = Vec::new();
    let mut output = Vec::new();
    let mut args: Vec<Range<usize>> = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        input.extend_from_slice(&chunk[..n]);
        let mut answers = Vec::new();
        let mut quit = false;
        let mut at = 0;
        while !quit {
            args.clear();
            match resp::parse(&input, at, &mut args) {
                Ok(Some(next)) => {
                    at = next;
                    let argv = args.iter().map(|r| &input[r.clone()]);
                    if args.is_empty() {
                        continue;
                    }
                    if input[args[0].clone()].eq_ignore_ascii_case(b"QUIT") {
                        answers.push(Answer::Local(b"+OK\r\n".to_vec()));
                        quit = true;
                        continue;
                    }
                    answers.push(match encode_request(argv) {
                        Some(request) => Answer::Vm(device.submit(request)),
                        None => Answer::Local(
                            b"-ERR request larger than the VM's request slot\r\n".to_vec(),
                        ),
                    });
                }
                Ok(None) => break,
                Err(ProtocolError(message)) => {
                    answers.push(Answer::Local(
                        format!("-ERR Protocol error: {message}\r\n").into_bytes(),
                    ));
                    quit = true;
                }
            }
        }
        input.drain(..at);
        for answer in answers {
            match answer {
                Answer::Local(reply) => output.extend_from_slice(&reply),
                Answer::Vm(id) => match device.wait_reply(id, REPLY_WAIT) {
                    Some(reply) => output.extend_from_slice(&reply),
                    None => {
                        output.extend_from_slice(b"-ERR the VM did not answer\r\n");
                        quit = true;
                        break;
                    }
                },
            }
        }
        stream.write_all(&output)?;
        output.clear();
        if quit {
            return Ok(());
        }
    }
}
