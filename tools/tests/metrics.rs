//! `--metrics`: both sides of a protected pair answer `GET /metrics` in the
//! Prometheus text format, and the values move while epochs are committed.

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
