//! The demo's clients: RESP over TCP, each writing keys of its own (SET of fresh keys,
//! INCR of its own counter) and recording every write the service acknowledged.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Requests sent before their replies are read.
pub const PIPELINE: usize = 16;
/// Every this many requests of a batch, one is an INCR.
const INCR_EVERY: usize = 4;
/// Longest a reply may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A RESP2 reply.
#[derive(Debug, PartialEq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

/// One connection.
pub struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

fn protocol(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

impl Conn {
    /// Connects to `addr`.
    pub fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            stream,
        })
    }

    /// Sends `commands` in one write.
    pub fn send(&mut self, commands: &[Vec<Vec<u8>>]) -> std::io::Result<()> {
        let mut out = Vec::new();
        for args in commands {
            out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for arg in args {
                out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
                out.extend_from_slice(arg);
                out.extend_from_slice(b"\r\n");
            }
        }
        self.stream.write_all(&out)
    }

    /// Reads one reply.
    pub fn read(&mut self) -> std::io::Result<Reply> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        let bad = || protocol(format!("not a reply: {line:?}"));
        let (kind, text) = line.split_at_checked(1).ok_or_else(bad)?;
        Ok(match kind {
            "+" => Reply::Simple(text.into()),
            "-" => Reply::Error(text.into()),
            ":" => Reply::Int(text.parse().map_err(|_| bad())?),
            "$" if text == "-1" => Reply::Bulk(None),
            "$" => {
                let len: usize = text.parse().map_err(|_| bad())?;
                let mut data = vec![0; len + 2];
                self.reader.read_exact(&mut data)?;
                data.truncate(len);
                Reply::Bulk(Some(data))
            }
            "*" => {
                let n: usize = text.parse().map_err(|_| bad())?;
                Reply::Array((0..n).map(|_| self.read()).collect::<Result<_, _>>()?)
            }
            _ => return Err(bad()),
        })
    }
}

/// What one client wrote and what the service acknowledged.
pub struct Ledger {
    client: usize,
    run: u64,
    /// Next key number.
    next: u64,
    /// Keys this client may create: past them it only increments its counter, so the
    /// store never fills.
    budget: u64,
    /// How long each batch took from its write to its last reply, microseconds.
    pub latencies: Vec<f64>,
    /// Keys whose SET was acknowledged: their numbers (the value follows).
    pub sets: Vec<u64>,
    /// The last value an INCR of the client's counter returned.
    pub incr_acked: i64,
    /// INCRs sent (acknowledged or not): the counter can be no higher.
    pub incr_sent: i64,
    /// INCRs acknowledged.
    pub incrs: u64,
    /// INCRs acknowledged with a value no higher than one acknowledged before: each
    /// means an acknowledged increment is missing.
    pub regressions: u64,
}

impl Ledger {
    /// An empty ledger for client `client` of run `run` (values differ per run), which
    /// creates at most `budget` keys.
    pub fn new(client: usize, run: u64, budget: u64) -> Self {
        Self {
            client,
            run,
            next: 0,
            budget,
            latencies: Vec::new(),
            sets: Vec::new(),
            incr_acked: 0,
            incr_sent: 0,
            incrs: 0,
            regressions: 0,
        }
    }

    /// Writes acknowledged.
    pub fn acknowledged(&self) -> u64 {
        self.sets.len() as u64 + self.incrs
    }

    fn key(&self, n: u64) -> String {
        format!("demo:{}:{n}", self.client)
    }

    fn value(&self, n: u64) -> String {
        format!("{:x}-{}-{n}", self.run, self.client)
    }

    fn counter(&self) -> String {
        format!("demo:{}:counter", self.client)
    }
}

/// Writes through `conn` until `stop` is set or the connection fails (the error).
pub fn load(conn: &mut Conn, ledger: &mut Ledger, stop: &AtomicBool) -> std::io::Result<()> {
    while !stop.load(Ordering::Relaxed) {
        let mut batch = Vec::with_capacity(PIPELINE);
        let mut keys = Vec::with_capacity(PIPELINE);
        for i in 0..PIPELINE {
            if i % INCR_EVERY == INCR_EVERY - 1 || ledger.next >= ledger.budget {
                batch.push(vec![b"INCR".to_vec(), ledger.counter().into_bytes()]);
                keys.push(None);
            } else {
                let n = ledger.next;
                ledger.next += 1;
                batch.push(vec![
                    b"SET".to_vec(),
                    ledger.key(n).into_bytes(),
                    ledger.value(n).into_bytes(),
                ]);
                keys.push(Some(n));
            }
        }
        // Counted before the write: a failed write may still have delivered some.
        ledger.incr_sent += keys.iter().filter(|k| k.is_none()).count() as i64;
        let sent = Instant::now();
        conn.send(&batch)?;
        for key in keys {
            match (key, conn.read()?) {
                (Some(n), Reply::Simple(ok)) if ok == "OK" => ledger.sets.push(n),
                (None, Reply::Int(v)) => {
                    ledger.regressions += u64::from(v <= ledger.incr_acked);
                    ledger.incr_acked = ledger.incr_acked.max(v);
                    ledger.incrs += 1;
                }
                (_, other) => return Err(protocol(format!("unexpected reply {other:?}"))),
            }
        }
        ledger.latencies.push(sent.elapsed().as_secs_f64() * 1e6);
    }
    Ok(())
}

/// Connects to `addr` until a PING is answered or `deadline` passes.
pub fn wait_serving(addr: SocketAddr, deadline: Instant) -> std::io::Result<Conn> {
    loop {
        let attempt = Conn::connect(addr).and_then(|mut conn| {
            conn.send(&[vec![b"PING".to_vec()]])?;
            match conn.read()? {
                Reply::Simple(pong) if pong == "PONG" => Ok(conn),
                other => Err(protocol(format!("PING answered {other:?}"))),
            }
        });
        match attempt {
            Ok(conn) => return Ok(conn),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Reads back every acknowledged write of `ledger`; returns how many are missing or
/// wrong. For the counter: the regressions seen, plus the acknowledged increments it
/// still lacks, or one if it is higher than the increments sent.
pub fn lost(conn: &mut Conn, ledger: &Ledger) -> std::io::Result<u64> {
    let mut lost = ledger.regressions;
    for chunk in ledger.sets.chunks(256) {
        let gets: Vec<_> = chunk
            .iter()
            .map(|&n| vec![b"GET".to_vec(), ledger.key(n).into_bytes()])
            .collect();
        conn.send(&gets)?;
        for &n in chunk {
            let expected = ledger.value(n).into_bytes();
            if conn.read()? != Reply::Bulk(Some(expected)) {
                lost += 1;
            }
        }
    }
    conn.send(&[vec![b"GET".to_vec(), ledger.counter().into_bytes()]])?;
    let counter = match conn.read()? {
        Reply::Bulk(Some(v)) => String::from_utf8_lossy(&v).parse().unwrap_or(-1),
        _ => 0,
    };
    if counter < ledger.incr_acked {
        lost += u64::try_from(ledger.incr_acked - counter.max(0)).unwrap_or(0);
    } else if counter > ledger.incr_sent {
        lost += 1;
    }
    Ok(lost)
}
