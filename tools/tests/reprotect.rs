//! A service restarted from a replica is protected again. `fgbi kv` is protected by
//! backup A, whose restart command protects the restarted service with backup B.
//! The primary, then the service A restarted, are killed with SIGKILL; every write
//! either of them acknowledged is on the service B restarts.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::children::Kill;
use common::free_port;

/// Starts `fgbi` with `args`, its stdout as lines.
fn fgbi(args: &[&str]) -> (Kill, Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fgbi"))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = common::lines(child.stdout.take().unwrap());
    (Kill(child), lines)
}

/// A Redis-protocol connection to the service on `port`, once it answers.
struct Client(BufReader<TcpStream>);

impl Client {
    fn connect(port: u16) -> Self {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(stream) => return Self(BufReader::new(stream)),
                Err(e) if Instant::now() > deadline => panic!("port {port}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Sends one command and returns its reply: a status line, or a bulk string's
    /// contents (`None` for a missing key).
    fn call(&mut self, args: &[&str]) -> Option<String> {
        let mut request = format!("*{}\r\n", args.len());
        for a in args {
            request += &format!("${}\r\n{a}\r\n", a.len());
        }
        self.0.get_mut().write_all(request.as_bytes()).unwrap();
        let mut line = String::new();
        self.0.read_line(&mut line).unwrap();
        let line = line.trim_end().to_string();
        match line.strip_prefix('$') {
            Some("-1") => None,
            Some(len) => {
                let mut value = vec![0; len.parse::<usize>().unwrap() + 2];
                std::io::Read::read_exact(&mut self.0, &mut value).unwrap();
                value.truncate(value.len() - 2);
                Some(String::from_utf8(value).unwrap())
            }
            None => Some(line),
        }
    }

    /// SETs keys `keys`, each acknowledged.
    fn set(&mut self, keys: std::ops::Range<u32>) {
        for k in keys {
            let reply = self.call(&["SET", &format!("key{k}"), &format!("value{k}")]);
            assert_eq!(reply.as_deref(), Some("+OK"), "SET key{k}");
        }
    }
}

/// The pid in a backup's `restarted pid=P ...` line.
fn restarted_pid(line: &str) -> u32 {
    let rest = line.split_once("restarted pid=").unwrap().1;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_restarted_service_protected_again_survives_a_second_failover() {
    let key = common::key_file(&common::scratch("reprotect"))
        .display()
        .to_string();
    let fgbi_exe = env!("CARGO_BIN_EXE_fgbi");
    let [port0, port1, port2, listen_a, listen_b] = [(); 5].map(|()| free_port());
    let addr = |port: u16| format!("127.0.0.1:{port}");
    let common = ["--mem", "16M", "--key", &key, "--heartbeat-ms", "10"];
    let (_b, b_lines) = fgbi(
        &[
            &["backup", "--listen", &addr(listen_b)][..],
            &common,
            &[
                "--restart",
                &format!("exec {fgbi_exe} kv --restart --port {port2} --mem 16M"),
            ],
        ]
        .concat(),
    );
    let restart_a = format!(
        "exec {fgbi_exe} kv --restart --port {port1} --mem 16M --backup {} --key {key} --heartbeat-ms 10",
        addr(listen_b)
    );
    let (_a, a_lines) = fgbi(
        &[
            &["backup", "--listen", &addr(listen_a)][..],
            &common,
            &["--restart", &restart_a],
        ]
        .concat(),
    );
    let (mut primary, primary_lines) = fgbi(&[
        "kv",
        "--port",
        &port0.to_string(),
        "--mem",
        "16M",
        "--backup",
        &addr(listen_a),
        "--key",
        &key,
        "--heartbeat-ms",
        "10",
    ]);
    let mut seen = Vec::new();
    common::wait_for(&primary_lines, "kv: connected", &mut seen);
    Client::connect(port0).set(0..200);
    primary.0.kill().unwrap();

    let line = common::wait_for(&a_lines, "restarted pid=", &mut seen);
    eprintln!("backup A: {line}");
    assert!(
        line.contains("protected again"),
        "the restarted service says it is protected: {line}"
    );
    let restarted = restarted_pid(&line);
    let mut second = Client::connect(port1);
    assert_eq!(second.call(&["GET", "key199"]).as_deref(), Some("value199"));
    second.set(200..400);
    let killed = Command::new("kill")
        .args(["-KILL", &restarted.to_string()])
        .status()
        .unwrap();
    assert!(killed.success(), "kill -KILL {restarted}");

    let line = common::wait_for(&b_lines, "restarted pid=", &mut seen);
    assert!(line.contains("unprotected"), "{line}");
    let mut third = Client::connect(port2);
    for k in 0..400 {
        assert_eq!(
            third.call(&["GET", &format!("key{k}")]),
            Some(format!("value{k}")),
            "key{k}, acknowledged before one of the two failovers"
        );
    }
    third.call(&["SHUTDOWN"]);
}
