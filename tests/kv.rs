//! The key-value example (`examples/kv.rs`) as a client sees it: every command over
//! real TCP, pipelining, big and binary values, a full store, malformed input, and
//! Debian's unmodified `redis-benchmark` and `redis-cli`; after each, SHUTDOWN must
//! find the replica equal to the live store.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use fgbi_hyp::tracking::DirtyTracker;

/// The example binary cargo built beside this test (`target/<profile>/examples/kv`),
/// built on demand when only this test target was built.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    let binary = profile_dir.join("examples").join("kv");
    if !binary.exists() {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "--example", "kv"]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "cargo build --example kv failed");
    }
    binary
}

/// A running service on a free port; killed if a test fails before SHUTDOWN.
struct Server {
    child: Child,
    stdout: BufReader<ChildStdout>,
    port: u16,
    /// Lines printed before the banner.
    preamble: Vec<String>,
}

impl Server {
    /// Starts the service with `extra` flags, or says why not (no kernel tracking).
    fn start(extra: &[&str]) -> Option<Self> {
        if !fgbi_hyp::feature::available("kernel dirty tracking", DirtyTracker::probe()) {
            return None;
        }
        let mut child = Command::new(example_binary())
            .args(["--port", "0", "--epoch-ms", "5", "--verify-every", "1"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("the example starts");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut banner = String::new();
        let mut preamble = Vec::new();
        while !banner.starts_with("kv: listening") {
            if !banner.is_empty() {
                preamble.push(std::mem::take(&mut banner));
            }
            let read = stdout.read_line(&mut banner).expect("the example prints");
            assert!(read > 0, "the example ended before listening: {preamble:?}");
        }
        let port = banner
            .split_once("127.0.0.1:")
            .and_then(|(_, rest)| rest.split(',').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {banner:?}"));
        Some(Self {
            child,
            stdout,
            port,
            preamble,
        })
    }

    fn connect(&self) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).expect("the service accepts");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    /// Waits for the service to exit after a SHUTDOWN; asserts it exited 0 with a
    /// clean summary, and returns what it printed.
    fn expect_clean_exit(mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the service did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut printed = String::new();
        self.stdout.read_to_string(&mut printed).unwrap();
        assert!(status.success(), "exit {status}:\n{printed}");
        assert!(printed.contains("mismatches 0,"), "{printed}");
        assert!(printed.contains("equal to the live store"), "{printed}");
        printed
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Already gone after a clean exit; otherwise the test failed and this stops it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A RESP2 reply.
#[derive(Debug, PartialEq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

fn ok() -> Reply {
    Reply::Simple("OK".into())
}

fn bulk(bytes: &[u8]) -> Reply {
    Reply::Bulk(Some(bytes.to_vec()))
}

/// A minimal Redis client.
struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

fn encode(args: &[&[u8]], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

impl Client {
    fn call(&mut self, args: &[&[u8]]) -> Reply {
        let mut out = Vec::new();
        encode(args, &mut out);
        self.stream.write_all(&out).unwrap();
        self.read()
    }

    /// A command given as space-separated words.
    fn cmd(&mut self, words: &str) -> Reply {
        let args: Vec<&[u8]> = words.split(' ').map(str::as_bytes).collect();
        self.call(&args)
    }

    fn read(&mut self) -> Reply {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        let (kind, text) = line.trim_end().split_at(1);
        match kind {
            "+" => Reply::Simple(text.into()),
            "-" => Reply::Error(text.into()),
            ":" => Reply::Int(text.parse().unwrap()),
            "$" if text == "-1" => Reply::Bulk(None),
            "$" => {
                let mut data = vec![0; text.parse::<usize>().unwrap() + 2];
                self.reader.read_exact(&mut data).unwrap();
                data.truncate(data.len() - 2);
                Reply::Bulk(Some(data))
            }
            "*" => Reply::Array((0..text.parse().unwrap()).map(|_| self.read()).collect()),
            _ => panic!("not a reply: {line:?}"),
        }
    }

    /// Asks for SHUTDOWN, which closes the connection without a reply.
    fn shutdown(mut self) {
        self.stream.write_all(b"*1\r\n$8\r\nSHUTDOWN\r\n").unwrap();
        assert!(self.closed(), "SHUTDOWN closes the connection");
    }

    /// True once the service has closed this connection.
    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest).is_ok()
    }
}

fn is_error(reply: &Reply, part: &str) -> bool {
    matches!(reply, Reply::Error(e) if e.contains(part))
}

#[test]
fn every_command_works_and_the_replica_equals_the_store() {
    let Some(server) = Server::start(&["--mem", "32M"]) else {
        return;
    };
    let mut c = server.connect();
    assert_eq!(c.cmd("PING"), Reply::Simple("PONG".into()));
    assert_eq!(c.cmd("ping hi"), bulk(b"hi"));
    assert_eq!(c.cmd("ECHO hello"), bulk(b"hello"));
    assert_eq!(c.cmd("SET k v"), ok());
    assert_eq!(c.cmd("GET k"), bulk(b"v"));
    assert_eq!(c.cmd("GET nope"), Reply::Bulk(None));
    assert_eq!(c.cmd("SET k w NX"), Reply::Bulk(None));
    assert_eq!(c.cmd("SET k w XX"), ok());
    assert_eq!(c.cmd("SET fresh w XX"), Reply::Bulk(None));
    assert!(is_error(&c.cmd("SET k v EX 10"), "never expire"));
    assert!(is_error(&c.cmd("SET k v PX 10"), "never expire"));
    assert_eq!(c.cmd("GET k"), bulk(b"w"));
    assert_eq!(c.cmd("INCR n"), Reply::Int(1));
    assert_eq!(c.cmd("INCRBY n 41"), Reply::Int(42));
    assert_eq!(c.cmd("DECR n"), Reply::Int(41));
    assert_eq!(c.cmd("DECRBY n 50"), Reply::Int(-9));
    assert!(is_error(&c.cmd("INCR k"), "not an integer"));
    assert_eq!(c.cmd("SET max 9223372036854775807"), ok());
    assert!(is_error(&c.cmd("INCR max"), "overflow"));
    assert_eq!(c.cmd("MSET a 1 b 2 c 3"), ok());
    assert_eq!(
        c.cmd("MGET a b nope c"),
        Reply::Array(vec![bulk(b"1"), bulk(b"2"), Reply::Bulk(None), bulk(b"3")])
    );
    assert!(is_error(&c.cmd("MSET a"), "wrong number of arguments"));
    assert_eq!(c.cmd("EXISTS a b nope"), Reply::Int(2));
    assert_eq!(c.cmd("DEL a b nope"), Reply::Int(2));
    assert_eq!(c.cmd("EXISTS a"), Reply::Int(0));
    assert_eq!(c.cmd("DBSIZE"), Reply::Int(4));
    assert!(is_error(
        &c.cmd("GET"),
        "wrong number of arguments for 'get'"
    ));
    assert!(is_error(&c.cmd("HSET h f v"), "unknown command"));
    assert_eq!(
        c.cmd("CONFIG GET save"),
        Reply::Array(vec![bulk(b"save"), bulk(b"")])
    );
    assert_eq!(
        c.cmd("CONFIG GET appendonly"),
        Reply::Array(vec![bulk(b"appendonly"), bulk(b"no")])
    );
    assert_eq!(c.cmd("COMMAND DOCS"), Reply::Array(vec![]));

    // Binary-safe keys and values, and the largest value allowed.
    let binary: Vec<u8> = (0..=255).chain([b'\r', b'\n', 0]).collect();
    assert_eq!(c.call(&[b"SET", &binary, &binary]), ok());
    assert_eq!(
        c.call(&[b"GET", &binary]),
        Reply::Bulk(Some(binary.clone()))
    );
    let big: Vec<u8> = (0..512 << 10).map(|i: u32| (i % 251) as u8).collect();
    assert_eq!(c.call(&[b"SET", b"big", &big]), ok());
    assert_eq!(c.call(&[b"GET", b"big"]), Reply::Bulk(Some(big.clone())));
    let too_big = vec![1u8; (512 << 10) + 1];
    assert!(is_error(&c.call(&[b"SET", b"big", &too_big]), "limit"));
    assert_eq!(c.call(&[b"GET", b"big"]), Reply::Bulk(Some(big)));

    // Pipelining: a thousand requests in one write, the replies in order.
    let mut batch = Vec::new();
    for i in 0..1000 {
        let (key, value) = (format!("p{i}"), format!("v{i}"));
        encode(&[b"SET", key.as_bytes(), value.as_bytes()], &mut batch);
        encode(&[b"GET", key.as_bytes()], &mut batch);
    }
    c.stream.write_all(&batch).unwrap();
    for i in 0..1000 {
        assert_eq!(c.read(), ok());
        assert_eq!(c.read(), bulk(format!("v{i}").as_bytes()));
    }
    assert_eq!(c.cmd("DBSIZE"), Reply::Int(1006));
    assert_eq!(c.cmd("FLUSHALL"), ok());
    assert_eq!(c.cmd("DBSIZE"), Reply::Int(0));
    for i in 0..200 {
        assert_eq!(c.cmd(&format!("SET after{i} {i}")), ok());
    }

    let mut other = server.connect();
    assert_eq!(other.cmd("QUIT"), ok());
    assert!(other.closed());
    c.shutdown();
    let printed = server.expect_clean_exit();
    assert!(printed.contains("replica: 200 keys"), "{printed}");
}

#[test]
fn a_full_store_answers_with_an_error() {
    let Some(server) = Server::start(&["--mem", "2M"]) else {
        return;
    };
    let mut c = server.connect();
    let value = vec![b'x'; 100 << 10];
    let mut stored = 0;
    let error = loop {
        match c.call(&[b"SET", format!("f{stored}").as_bytes(), &value]) {
            Reply::Simple(_) => stored += 1,
            other => break other,
        }
    };
    assert!(is_error(&error, "store full"), "{error:?}");
    assert!(stored > 5, "only {stored} values fit");
    assert_eq!(c.cmd("GET f0"), Reply::Bulk(Some(value.clone())));
    assert_eq!(c.cmd("DEL f0"), Reply::Int(1));
    assert_eq!(c.call(&[b"SET", b"f0", &value]), ok());
    assert_eq!(c.cmd("DBSIZE"), Reply::Int(stored));
    c.shutdown();
    server.expect_clean_exit();
}

#[test]
fn malformed_input_closes_that_connection_only() {
    let Some(server) = Server::start(&["--mem", "16M"]) else {
        return;
    };
    let mut c = server.connect();
    assert_eq!(c.cmd("SET kept safe"), ok());
    let garbage: [&[u8]; 5] = [
        b"*1\r\n$999999999999\r\n",
        b"*2\r\n$3\r\nGET\r\n:5\r\n",
        b"*-x\r\n",
        b"*1\r\n$4\r\nPINGXX",
        &[b'z'; 70_000],
    ];
    for bad in garbage {
        let mut g = server.connect();
        g.stream.write_all(bad).unwrap();
        assert!(
            is_error(&g.read(), "Protocol error"),
            "{:?}",
            String::from_utf8_lossy(&bad[..bad.len().min(30)])
        );
        assert!(g.closed());
    }
    // Clients that vanish in the middle of a request.
    for partial in [
        &b"*3\r\n$3\r\nSET\r\n$4\r\nkept\r\n$5\r\nlo"[..],
        b"*2\r\n$3\r\nDEL\r\n",
    ] {
        let mut g = server.connect();
        g.stream.write_all(partial).unwrap();
        drop(g);
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(c.cmd("GET kept"), bulk(b"safe"));
    assert_eq!(c.cmd("DBSIZE"), Reply::Int(1));
    c.shutdown();
    server.expect_clean_exit();
}

/// Whether a program is on PATH.
fn on_path(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[test]
fn redis_benchmark_and_redis_cli_drive_it_unmodified() {
    let tools = if on_path("redis-benchmark") && on_path("redis-cli") {
        Ok(())
    } else {
        Err("not on PATH; install Debian's redis-tools (.ci/run does)")
    };
    if !fgbi_hyp::feature::available("redis-benchmark and redis-cli", tools) {
        return;
    }
    let Some(server) = Server::start(&["--mem", "64M"]) else {
        return;
    };
    let port = server.port.to_string();
    let bench = Command::new("redis-benchmark")
        .args(["-p", &port, "-n", "20000", "-c", "8", "-P", "4"])
        .args(["-t", "set,get,incr,mset", "-q"])
        .output()
        .expect("redis-benchmark runs");
    let report = String::from_utf8_lossy(&bench.stdout);
    assert!(bench.status.success(), "{report}");
    for test in ["SET:", "GET:", "INCR:", "MSET (10 keys):"] {
        let line = report
            .split(['\r', '\n'])
            .rfind(|l| l.trim_start().starts_with(test))
            .unwrap_or_else(|| panic!("no {test} result in {report}"));
        assert!(line.contains("requests per second"), "{line}");
    }
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-p", &port])
            .args(args)
            .output()
            .expect("redis-cli runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    };
    assert_eq!(cli(&["SET", "from-cli", "yes"]), (true, "OK".into()));
    assert_eq!(cli(&["GET", "from-cli"]), (true, "yes".into()));
    // redis-benchmark's INCR hits one counter 20000 times.
    assert_eq!(
        cli(&["GET", "counter:__rand_int__"]),
        (true, "20000".into())
    );
    assert!(cli(&["SHUTDOWN"]).0, "redis-cli SHUTDOWN succeeds");
    server.expect_clean_exit();
}

#[test]
fn without_a_reachable_backup_the_service_serves_unprotected_and_says_so() {
    let dir = std::env::temp_dir().join(format!("fgbi-kv-nobackup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("link.key");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key)
            .unwrap();
        file.write_all(b"0123456789abcdef0123456789abcdef").unwrap();
    }
    // A port nobody listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let backup = closed.to_string();
    let Some(mut server) = Server::start(&[
        "--mem",
        "8M",
        "--backup",
        &backup,
        "--key",
        key.to_str().unwrap(),
        "--connect-timeout-ms",
        "50",
    ]) else {
        return;
    };
    // Replies are held until a commit that cannot come, or released because nothing
    // protects the store: the service must answer.
    let mut c = server.connect();
    assert_eq!(c.cmd("SET k v"), ok());
    assert_eq!(c.cmd("GET k"), bulk(b"v"));
    let mut lines = std::mem::take(&mut server.preamble);
    while !lines
        .iter()
        .any(|l| l.starts_with("kv: unprotected: no backup holds the store"))
    {
        let mut line = String::new();
        assert!(server.stdout.read_line(&mut line).unwrap() > 0, "{lines:?}");
        lines.push(line);
    }
    c.shutdown();
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the service did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut printed = String::new();
    server.stdout.read_to_string(&mut printed).unwrap();
    assert!(
        printed.contains("the replica is on the backup"),
        "{printed}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn restart_mode_without_a_replica_handed_over_says_what_it_is_for() {
    let out = Command::new(example_binary())
        .args(["--port", "0", "--restart"])
        .env_remove("FGBI_RESTART_FD")
        .output()
        .expect("the example runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("fgbi backup --restart"), "{stderr}");
    let out = Command::new(example_binary())
        .args(["--port", "0"])
        .env("FGBI_RESTART_FD", "nonsense")
        .output()
        .expect("the example runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad restart environment"), "{stderr}");
}

#[test]
fn llm_mode_with_a_backup_and_the_input_log_go_together() {
    for mode_and_log in [&["--mode", "llm"][..], &["--input-log", "127.0.0.1:9"][..]] {
        let out = Command::new(example_binary())
            .args([
                "--port",
                "0",
                "--backup",
                "127.0.0.1:9",
                "--key",
                "/nonexistent",
            ])
            .args(mode_and_log)
            .output()
            .expect("the example runs");
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("needs --input-log ADDR"), "{stderr}");
    }
}

#[test]
fn a_transport_that_cannot_run_here_is_refused_clearly() {
    for (link, expect) in [
        (
            &["--transport", "infiniband"][..],
            "use rdma, tcp, uring, std or auto",
        ),
        (
            &[
                "--transport",
                "rdma",
                "--rdma-device",
                "fgbi-no-such-device",
            ][..],
            "RDMA unavailable",
        ),
    ] {
        let out = Command::new(example_binary())
            .args([
                "--port",
                "0",
                "--backup",
                "127.0.0.1:9",
                "--key",
                "/nonexistent",
            ])
            .args(link)
            .output()
            .expect("the example runs");
        assert!(!out.status.success(), "{link:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{link:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
