//! `--metrics`: both sides of a protected pair, and the protected key-value service,
//! answer `GET /metrics` in the Prometheus text format, and the values move while
//! epochs are committed and requests served.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use common::{key_file, lines, scratch, wait_for};

/// Scrapes `url` (`http://ADDR/metrics`) and parses every sample as
/// `name{labels}` → value.
fn scrape(url: &str) -> HashMap<String, f64> {
    let address = url
        .strip_prefix("http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap();
    let mut stream = TcpStream::connect(address).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
    assert!(head.contains("Content-Type: text/plain"), "{head}");
    let mut samples = HashMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap_or_else(|e| panic!("{line}: {e}"));
        samples.insert(name.to_string(), value);
    }
    // Every sample is announced by its HELP and TYPE.
    for name in samples.keys() {
        let family = name.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                family
                    .strip_suffix(s)
                    .filter(|_| family.starts_with("fgbi_pause"))
            })
            .unwrap_or(family);
        assert!(body.contains(&format!("# TYPE {family} ")), "{family}");
    }
    samples
}

fn value(samples: &HashMap<String, f64>, name: &str, role: &str) -> f64 {
    *samples
        .get(&format!("{name}{{role=\"{role}\"}}"))
        .unwrap_or_else(|| panic!("no {name} for {role}: {samples:#?}"))
}

#[test]
fn both_sides_serve_metrics_that_move_with_the_epochs() {
    let dir = scratch("metrics");
    let key = key_file(&dir);
    let key = key.to_str().unwrap();
    let shared = ["--mem", "8M", "--key", key, "--metrics", "127.0.0.1:0"];
    let mut backup = Command::new(env!("CARGO_BIN_EXE_fgbi"))
        .args(["backup", "--listen", "127.0.0.1:0", "--run-epochs", "1"])
        .args(shared)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let backup_out = lines(backup.stdout.take().unwrap());
    let mut seen = Vec::new();
    let backup_url =
        wait_for(&backup_out, "metrics http://", &mut seen)["metrics ".len()..].to_string();
    let listening = wait_for(&backup_out, "listening", &mut seen);
    let target = listening.split_whitespace().nth(1).unwrap().to_string();
    let mut primary = Command::new(env!("CARGO_BIN_EXE_fgbi"))
        .args(["primary", "--backup", &target, "--workload", "web"])
        .args(["--epoch-ms", "10", "--scrub-every", "3"])
        .args(shared)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let primary_out = lines(primary.stdout.take().unwrap());
    let mut primary_seen = Vec::new();
    let primary_url = wait_for(&primary_out, "metrics http://", &mut primary_seen)
        ["metrics ".len()..]
        .to_string();
    wait_for(&primary_out, "committed 5", &mut primary_seen);
    let (p1, b1) = (scrape(&primary_url), scrape(&backup_url));
    wait_for(&primary_out, "committed 15", &mut primary_seen);
    // The backup has committed what the primary saw acknowledged.
    wait_for(&backup_out, "committed 15", &mut seen);
    let (p2, b2) = (scrape(&primary_url), scrape(&backup_url));

    for (before, after, role) in [(&p1, &p2, "primary"), (&b1, &b2, "backup")] {
        let moved = |name| value(after, name, role) > value(before, name, role);
        assert!(
            value(before, "fgbi_epochs_committed_total", role) >= 5.0,
            "{role}"
        );
        assert!(moved("fgbi_epochs_committed_total"), "{role}");
        assert!(moved("fgbi_committed_epoch"), "{role}");
        assert!(value(after, "fgbi_protected", role) == 1.0, "{role}");
        assert_eq!(value(after, "fgbi_failovers_total", role), 0.0);
        assert!(value(after, "fgbi_last_commit_age_seconds", role) >= 0.0);
        assert!(value(after, "fgbi_scrubs_total", role) >= 1.0, "{role}");
        assert_eq!(value(after, "fgbi_scrub_mismatches_total", role), 0.0);
    }
    let moved = |name: &str, role| value(&p2, name, role) > value(&p1, name, role);
    assert!(moved("fgbi_bytes_sent_total", "primary"));
    assert!(
        value(&b2, "fgbi_bytes_received_total", "backup")
            > value(&b1, "fgbi_bytes_received_total", "backup")
    );
    assert!(moved("fgbi_pause_seconds_count", "primary"));
    assert!(value(&p2, "fgbi_pause_seconds_sum", "primary") > 0.0);
    let inf = p2["fgbi_pause_seconds_bucket{role=\"primary\",le=\"+Inf\"}"];
    assert_eq!(inf, value(&p2, "fgbi_pause_seconds_count", "primary"));
    assert!(value(&p2, "fgbi_epochs_in_flight", "primary") <= 1.0);

    primary.kill().unwrap();
    primary.wait().unwrap();
    wait_for(&backup_out, "failover epoch=", &mut seen);
    assert!(backup.wait().unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sends `count` pipelined `SET` requests on `stream` and reads their `+OK` replies.
fn set_keys(stream: &mut TcpStream, count: usize) {
    let mut requests = Vec::new();
    for i in 0..count {
        let (key, value) = (format!("key:{i}"), format!("value:{i}"));
        requests.extend_from_slice(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n",
                key.len(),
                value.len()
            )
            .as_bytes(),
        );
    }
    stream.write_all(&requests).unwrap();
    let expected = b"+OK\r\n".repeat(count);
    let mut replies = vec![0u8; expected.len()];
    stream.read_exact(&mut replies).unwrap();
    assert_eq!(replies, expected);
}

#[test]
fn the_kv_service_serves_its_requests_and_held_replies_as_metrics() {
    if !fgbi_hyp::feature::available(
        "kernel dirty tracking",
        fgbi_hyp::tracking::DirtyTracker::probe(),
    ) {
        return;
    }
    let dir = scratch("kv-metrics");
    let key = key_file(&dir);
    let key = key.to_str().unwrap();
    let shared = ["--mem", "8M", "--key", key, "--transport", "std"];
    let mut backup = Command::new(env!("CARGO_BIN_EXE_fgbi"))
        .args(["backup", "--listen", "127.0.0.1:0"])
        .args(shared)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let backup_out = lines(backup.stdout.take().unwrap());
    let mut seen = Vec::new();
    let listening = wait_for(&backup_out, "listening", &mut seen);
    let target = listening.split_whitespace().nth(1).unwrap().to_string();
    let mut kv = Command::new(env!("CARGO_BIN_EXE_fgbi"))
        .args(["kv", "--port", "0", "--backup", &target, "--log-epochs"])
        .args(["--metrics", "127.0.0.1:0"])
        .args(shared)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let kv_out = lines(kv.stdout.take().unwrap());
    let mut kv_seen = Vec::new();
    let url =
        wait_for(&kv_out, "kv: metrics http://", &mut kv_seen)["kv: metrics ".len()..].to_string();
    let banner = wait_for(&kv_out, "kv: listening on ", &mut kv_seen);
    assert!(banner.contains(" over std, "), "{banner}");
    assert!(banner.contains("replies after commit"), "{banner}");
    let address = banner["kv: listening on ".len()..]
        .split(',')
        .next()
        .unwrap()
        .to_string();
    wait_for(&kv_out, "kv: committed ", &mut kv_seen);
    let before = scrape(&url);
    assert_eq!(value(&before, "fgbi_kv_connections", "primary"), 0.0);

    let mut client = TcpStream::connect(&address).unwrap();
    set_keys(&mut client, 200);
    let during = scrape(&url);
    set_keys(&mut client, 100);
    wait_for(&kv_out, "kv: committed ", &mut kv_seen);
    let after = scrape(&url);

    let get = |samples, name| value(samples, name, "primary");
    assert_eq!(get(&during, "fgbi_kv_connections"), 1.0);
    assert_eq!(get(&after, "fgbi_kv_connections_total"), 1.0);
    assert_eq!(
        get(&after, "fgbi_kv_requests_total") - get(&before, "fgbi_kv_requests_total"),
        300.0
    );
    // Every reply waited for its checkpoint, and every one the client read left.
    let held = get(&after, "fgbi_kv_replies_held_total");
    assert_eq!(held - get(&before, "fgbi_kv_replies_held_total"), 300.0);
    assert_eq!(get(&after, "fgbi_kv_replies_released_total"), held);
    assert_eq!(get(&after, "fgbi_kv_replies_held"), 0.0);
    assert!(get(&after, "fgbi_kv_reply_hold_seconds_total") > 0.0);
    // The replication's metrics, from the same address.
    assert!(
        get(&after, "fgbi_epochs_committed_total") > get(&before, "fgbi_epochs_committed_total")
    );
    assert_eq!(get(&after, "fgbi_protected"), 1.0);
    assert!(get(&after, "fgbi_bytes_sent_total") > 0.0);

    drop(client);
    kv.kill().unwrap();
    kv.wait().unwrap();
    backup.kill().unwrap();
    backup.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
