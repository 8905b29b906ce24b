//! LLM's input log: the protected program forwards every input (a client request) to
//! the backup before executing it, releases its output as soon as the backup has
//! received that input, and after failover replays the inputs the replica's
//! checkpoint does not reflect.
//!
//! The log travels on its own TCP connection to the backup (`fgbi backup
//! --input-log ADDR`), authenticated by the transport's handshake with the same
//! pre-shared key: the offer names the protected memory size and a block size of 0
//! (a log has no blocks; the backup offers one slot of the largest frame), so a
//! replication primary that dials the log port by mistake is refused. After the handshake:
//!
//! * primary → backup, one frame per input: `lsn u64, epoch u64, reflected u64,
//!   conn u64, seq u64, len u32` (little-endian) and `len` bytes. `lsn` numbers the
//!   inputs of the connection from 1 in the order the program executes them, `epoch`
//!   is the output epoch the input is executed in, `reflected` is the highest `lsn`
//!   the program knows a committed checkpoint reflects, `conn`/`seq` name the input
//!   for the program (its client connection and the request's number on it).
//! * backup → primary: `lsn u64`, cumulative: every input up to it is in the
//!   backup's memory.
//!
//! The backup drops the entries up to `reflected`; at failover it stops taking
//! inputs and hands the rest to the restarted program ([`encode`], [`decode`]),
//! which skips those its restart record says it executed.

use std::collections::VecDeque;
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use fgbi_transport::handshake::{self, Offer, PROTOCOL_VERSION, Role};
use fgbi_transport::{HandshakeError, PresharedKey};
use thiserror::Error;

/// Environment variable of a restarted program: descriptor of a memory file holding
/// the inputs to replay ([`encode`]d).
pub const INPUTS_FD_ENV: &str = "FGBI_RESTART_INPUTS_FD";

/// Bytes of a frame's header.
const HEADER: usize = 44;
/// Longest input accepted.
pub const MAX_INPUT: usize = 64 << 20;
/// How long each handshake message may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the input log failed.
#[derive(Debug, Error)]
pub enum InputLogError {
    /// The backup's log port cannot be reached.
    #[error(
        "cannot reach the backup's input log at {addr}: {source}; start `fgbi backup` with --input-log {addr}"
    )]
    Connect {
        /// The address dialled.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The handshake failed.
    #[error("input log handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// A socket or thread failed.
    #[error("input log: {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Encoded inputs are cut short or malformed.
    #[error("the input log is malformed: {0}")]
    Malformed(String),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> InputLogError {
    move |source| InputLogError::Io { what, source }
}

/// One logged input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its number in the log, from 1, in execution order.
    pub lsn: u64,
    /// The output epoch it was executed in.
    pub epoch: u64,
    /// The program's connection it came from.
    pub conn: u64,
    /// Its number on that connection, from 1.
    pub seq: u64,
    /// The input's bytes.
    pub bytes: Vec<u8>,
}

fn frame(entry: &Entry, reflected: u64, out: &mut Vec<u8>) {
    for word in [entry.lsn, entry.epoch, reflected, entry.conn, entry.seq] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.extend_from_slice(&(entry.bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&entry.bytes);
}

/// Reads one frame; `None` at a clean end of stream. Returns the entry and `reflected`.
fn read_frame(input: &mut impl Read) -> Result<Option<(Entry, u64)>, InputLogError> {
    let mut header = [0u8; HEADER];
    match input.read_exact(&mut header[..1]) {
        // A primary that dies resets its connection: the end of its log too.
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            return Ok(None);
        }
        other => other.map_err(io("reading an input"))?,
    }
    input
        .read_exact(&mut header[1..])
        .map_err(io("reading an input"))?;
    let word = |i: usize| {
        u64::from_le_bytes(
            header[i * 8..i * 8 + 8]
                .try_into()
                .unwrap_or_else(|_| unreachable!("eight bytes")),
        )
    };
    let len = u32::from_le_bytes([header[40], header[41], header[42], header[43]]) as usize;
    if len > MAX_INPUT {
        return Err(InputLogError::Malformed(format!(
            "an input of {len} bytes exceeds {MAX_INPUT}"
        )));
    }
    let mut bytes = vec![0; len];
    input
        .read_exact(&mut bytes)
        .map_err(io("reading an input"))?;
    let entry = Entry {
        lsn: word(0),
        epoch: word(1),
        conn: word(3),
        seq: word(4),
        bytes,
    };
    Ok(Some((entry, word(2))))
}

/// The entries, as handed to a restarted program.
pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in entries {
        frame(entry, 0, &mut out);
    }
    out
}

/// Entries [`encode`]d.
pub fn decode(mut bytes: &[u8]) -> Result<Vec<Entry>, InputLogError> {
    let mut entries = Vec::new();
    while let Some((entry, _)) = read_frame(&mut bytes).map_err(|e| match e {
        InputLogError::Io { source, .. } => InputLogError::Malformed(source.to_string()),
        e => e,
    })? {
        entries.push(entry);
    }
    Ok(entries)
}

/// The log's offer: no blocks; the backup takes one stream of frames up to
/// [`MAX_INPUT`] bytes of input each.
fn offer(role: Role, mem_bytes: u64) -> Offer {
    let backup = role == Role::Backup;
    Offer {
        version: PROTOCOL_VERSION,
        role,
        mem_bytes,
        block_size: 0,
        slots: u32::from(backup),
        slot_bytes: if backup {
            (HEADER + MAX_INPUT) as u64
        } else {
            0
        },
        committed: 0,
    }
}

/// What the primary knows of the backup's receipts.
struct Receipts {
    /// Every input up to this one is in the backup's memory.
    received: u64,
    /// The link broke: nothing more will be received.
    broken: bool,
}

/// Inputs forwarded but not yet known reflected, per output epoch.
struct Pending {
    next_lsn: u64,
    /// Highest lsn known reflected by a committed checkpoint.
    reflected: u64,
    /// (epoch, last lsn executed in it), oldest first.
    epochs: VecDeque<(u64, u64)>,
    frames: Sender<Vec<u8>>,
}

/// The primary's side: forwards inputs, learns which the backup received.
pub struct InputForwarder {
    pending: Mutex<Pending>,
    receipts: Arc<(Mutex<Receipts>, Condvar)>,
}

impl InputForwarder {
    /// Connects to the backup's input log at `addr`, protecting `mem_bytes` of memory.
    pub fn connect(
        addr: SocketAddr,
        key: &PresharedKey,
        mem_bytes: u64,
    ) -> Result<Self, InputLogError> {
        let mut stream = TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT)
            .map_err(|source| InputLogError::Connect { addr, source })?;
        handshake::connect(
            &mut stream,
            &offer(Role::Primary, mem_bytes),
            key,
            HANDSHAKE_TIMEOUT,
        )?;
        stream
            .set_read_timeout(None)
            .and_then(|()| stream.set_write_timeout(None))
            .and_then(|()| stream.set_nodelay(true))
            .map_err(io("setting up the connection"))?;
        let receipts = Arc::new((
            Mutex::new(Receipts {
                received: 0,
                broken: false,
            }),
            Condvar::new(),
        ));
        let (frames, queue) = channel::<Vec<u8>>();
        let writer = stream.try_clone().map_err(io("cloning the socket"))?;
        let broken = Arc::clone(&receipts);
        std::thread::Builder::new()
            .name("fgbi-input-send".into())
            .spawn(move || {
                let mut out = BufWriter::new(writer);
                let mut sent = || -> std::io::Result<()> {
                    while let Ok(frame) = queue.recv() {
                        out.write_all(&frame)?;
                        // Batch what is queued already, then flush.
                        while let Ok(frame) = queue.try_recv() {
                            out.write_all(&frame)?;
                        }
                        out.flush()?;
                    }
                    Ok(())
                };
                if sent().is_err() {
                    mark_broken(&broken);
                }
            })
            .map_err(io("starting the sending thread"))?;
        let acks = Arc::clone(&receipts);
        std::thread::Builder::new()
            .name("fgbi-input-acks".into())
            .spawn(move || {
                let mut input = BufReader::new(stream);
                let mut word = [0u8; 8];
                while input.read_exact(&mut word).is_ok() {
                    let (lock, changed) = &*acks;
                    let mut r = lock.lock().unwrap_or_else(PoisonError::into_inner);
                    r.received = r.received.max(u64::from_le_bytes(word));
                    changed.notify_all();
                }
                mark_broken(&acks);
            })
            .map_err(io("starting the receipt thread"))?;
        Ok(Self {
            pending: Mutex::new(Pending {
                next_lsn: 1,
                reflected: 0,
                epochs: VecDeque::new(),
                frames,
            }),
            receipts,
        })
    }

    /// Forwards the input `bytes`, request `seq` of connection `conn`, which the
    /// program executes next, in output epoch `epoch`; `committed` is the highest
    /// output epoch whose checkpoint is committed. Call in execution order (under the
    /// lock that orders execution). Returns the input's lsn.
    pub fn forward(&self, epoch: u64, committed: u64, conn: u64, seq: u64, bytes: &[u8]) -> u64 {
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let lsn = p.next_lsn;
        p.next_lsn += 1;
        while let Some(&(e, last)) = p.epochs.front() {
            if e > committed {
                break;
            }
            p.reflected = last;
            p.epochs.pop_front();
        }
        match p.epochs.back_mut() {
            Some((e, last)) if *e == epoch => *last = lsn,
            _ => p.epochs.push_back((epoch, lsn)),
        }
        let entry = Entry {
            lsn,
            epoch,
            conn,
            seq,
            bytes: bytes.to_vec(),
        };
        let mut out = Vec::with_capacity(HEADER + bytes.len());
        frame(&entry, p.reflected, &mut out);
        if p.frames.send(out).is_err() {
            mark_broken(&self.receipts);
        }
        lsn
    }

    /// Waits up to `timeout` until the backup has received every input up to `lsn`,
    /// or the link to it broke (the program then runs unprotected, as its replication
    /// does without a backup); true if so.
    pub fn wait_received(&self, lsn: u64, timeout: Duration) -> bool {
        let (lock, changed) = &*self.receipts;
        let r = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let (r, _) = changed
            .wait_timeout_while(r, timeout, |r| r.received < lsn && !r.broken)
            .unwrap_or_else(PoisonError::into_inner);
        r.received >= lsn || r.broken
    }
}

fn mark_broken(receipts: &(Mutex<Receipts>, Condvar)) {
    let (lock, changed) = receipts;
    lock.lock().unwrap_or_else(PoisonError::into_inner).broken = true;
    changed.notify_all();
}

/// The backup's log.
#[derive(Default)]
struct Log {
    entries: VecDeque<Entry>,
    /// Failover began: no more inputs are taken or acknowledged.
    closed: bool,
}

/// The backup's side: keeps the inputs a primary forwards.
pub struct InputLogger {
    log: Arc<Mutex<Log>>,
}

impl InputLogger {
    /// Serves primaries connecting to `listener` (one at a time), protecting
    /// `mem_bytes` of memory, on a thread of its own.
    pub fn start(
        listener: TcpListener,
        key: Arc<PresharedKey>,
        mem_bytes: u64,
    ) -> Result<Self, InputLogError> {
        let log = Arc::new(Mutex::new(Log::default()));
        let shared = Arc::clone(&log);
        std::thread::Builder::new()
            .name("fgbi-input-log".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    if let Err(e) = serve(stream, &key, mem_bytes, &shared) {
                        eprintln!("fgbi backup: {e}");
                    }
                    if shared.lock().unwrap_or_else(PoisonError::into_inner).closed {
                        return;
                    }
                }
            })
            .map_err(io("starting the logging thread"))?;
        Ok(Self { log })
    }

    /// Inputs held now.
    pub fn len(&self) -> usize {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
            .len()
    }

    /// Whether no input is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Failover: takes no more inputs (none after this was acknowledged, so no
    /// output depends on one) and returns those held, in execution order.
    pub fn close(&self) -> Vec<Entry> {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.closed = true;
        log.entries.drain(..).collect()
    }
}

/// Takes one primary's inputs until its connection ends or the log closes.
fn serve(
    mut stream: TcpStream,
    key: &PresharedKey,
    mem_bytes: u64,
    log: &Mutex<Log>,
) -> Result<(), InputLogError> {
    handshake::accept(
        &mut stream,
        &offer(Role::Backup, mem_bytes),
        key,
        HANDSHAKE_TIMEOUT,
    )?;
    stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_nodelay(true))
        .map_err(io("setting up the connection"))?;
    let mut acks = stream.try_clone().map_err(io("cloning the socket"))?;
    let mut input = BufReader::new(stream);
    while let Some((entry, reflected)) = read_frame(&mut input)? {
        let lsn = entry.lsn;
        {
            let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
            if log.closed {
                return Ok(());
            }
            while log.entries.front().is_some_and(|e| e.lsn <= reflected) {
                log.entries.pop_front();
            }
            log.entries.push_back(entry);
        }
        // Acknowledge once nothing more is buffered: one ack covers a burst.
        if input.buffer().is_empty() {
            acks.write_all(&lsn.to_le_bytes())
                .map_err(io("acknowledging inputs"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn key() -> PresharedKey {
        let dir = std::env::temp_dir().join(format!("fgbi-input-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, [7u8; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let key = PresharedKey::from_file(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        key
    }

    #[test]
    fn forwarded_inputs_are_received_pruned_when_reflected_and_survive_encoding() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let key = Arc::new(key());
        let logger = InputLogger::start(listener, Arc::clone(&key), 1 << 20).unwrap();
        assert!(matches!(
            InputForwarder::connect(addr, &key, 2 << 20),
            Err(InputLogError::Handshake(_))
        ));
        let forwarder = InputForwarder::connect(addr, &key, 1 << 20).unwrap();
        // Epoch 1: two inputs; epoch 2: one; then epoch 1 is committed.
        forwarder.forward(1, 0, 7, 1, b"SET a 1");
        forwarder.forward(1, 0, 8, 1, b"SET b 2");
        let last = forwarder.forward(2, 0, 7, 2, b"SET a 3");
        assert!(forwarder.wait_received(last, Duration::from_secs(10)));
        assert_eq!(logger.len(), 3);
        let last = forwarder.forward(2, 1, 8, 2, b"GET a");
        assert!(forwarder.wait_received(last, Duration::from_secs(10)));
        let entries = logger.close();
        let kept: Vec<_> = entries.iter().map(|e| (e.lsn, e.conn, e.seq)).collect();
        assert_eq!(kept, [(3, 7, 2), (4, 8, 2)]);
        assert_eq!(decode(&encode(&entries)).unwrap(), entries);
        let bytes = encode(&entries);
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Err(InputLogError::Malformed(_))
        ));
        // Closed: later inputs are neither kept nor acknowledged.
        let late = forwarder.forward(3, 1, 7, 3, b"SET c 4");
        // The logger hangs up on the closed log: the link counts as broken.
        assert!(forwarder.wait_received(late, Duration::from_secs(10)));
        assert!(logger.is_empty());
    }
}
