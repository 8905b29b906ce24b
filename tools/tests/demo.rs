//! `fgbi demo`: the protected key-value service killed under load and restarted by
//! its backup, and what output commit guarantees when the primary dies at any point
//! of a checkpoint.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use fgbi_hyp::kvm::{DirtyTracking, probe};
use fgbi_hyp::tracking::DirtyTracker;
use serde_json::Value;

/// The demos run one at a time: each is three processes and a load.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The link of the pair, from the environment: `FGBI_TEST_TRANSPORT` (the demo's
/// `--transport`; unset: its default), the primary's RDMA device `FGBI_RDMA_DEVICE_A`
/// and the backup's `FGBI_RDMA_DEVICE_B` (as in the transport's RDMA tests), and
/// `FGBI_TEST_HEARTBEAT_MS` (unset: the demo's default). The Soft-RoCE guest
/// (tests/rdma/guest.sh) runs these tests over RDMA with them.
fn link_flags() -> Vec<String> {
    let mut flags = Vec::new();
    for (var, flag) in [
        ("FGBI_TEST_TRANSPORT", "--transport"),
        ("FGBI_RDMA_DEVICE_A", "--rdma-device"),
        ("FGBI_RDMA_DEVICE_B", "--backup-rdma-device"),
        ("FGBI_TEST_HEARTBEAT_MS", "--heartbeat-ms"),
    ] {
        if let Some(value) = std::env::var(var).ok().filter(|v| !v.is_empty()) {
            flags.extend([flag.to_string(), value]);
        }
    }
    flags
}

/// Runs `fgbi demo` with `args` over the link of [`link_flags`]; its exit code and
/// output. `None` (said loudly) without kernel dirty tracking.
fn run_demo(args: &[&str]) -> Option<(i32, String)> {
    if !fgbi_hyp::feature::available("kernel dirty tracking", DirtyTracker::probe()) {
        return None;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(env!("CARGO_BIN_EXE_fgbi"))
        .arg("demo")
        .args(args)
        .args(link_flags())
        .output()
        .unwrap();
    let printed = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.code().unwrap_or(-1), printed))
}

/// Runs `fgbi demo` (shortened) with `extra` flags; its exit code, output and JSON.
fn demo(name: &str, extra: &[&str]) -> Option<(i32, String, Value)> {
    let json: PathBuf =
        std::env::temp_dir().join(format!("fgbi-demo-{name}-{}.json", std::process::id()));
    let json_arg = json.to_str().unwrap();
    let mut args = vec![
        "--mem",
        "32M",
        "--kill-after-ms",
        "1500",
        "--after-ms",
        "300",
        "--json",
        json_arg,
    ];
    args.extend_from_slice(extra);
    let (code, printed) = run_demo(&args)?;
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("{e}: {printed}"));
    std::fs::remove_file(&json).unwrap();
    let value = serde_json::from_str(&text).unwrap();
    Some((code, printed, value))
}

fn number(value: &Value, path: &[&str]) -> f64 {
    let mut v = value;
    for key in path {
        v = &v[key];
    }
    v.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {value}"))
}

#[test]
fn the_demo_fails_over_and_loses_no_acknowledged_write() {
    let Some((code, printed, json)) = demo("json", &[]) else {
        return;
    };
    assert_eq!(code, 0, "{printed}");
    assert_eq!(json["mode"], "fgbi");
    assert!(number(&json, &["epochs"]) > 0.0, "{json}");
    for part in ["p50", "p99", "max"] {
        assert!(number(&json, &["pause_us", part]) > 0.0, "{json}");
    }
    for part in ["detect", "apply", "restore", "total"] {
        number(&json, &["failover_ms", part]);
    }
    let f = |p| number(&json, &["failover_ms", p]);
    assert!(f("restore") > 0.0 && f("total") >= f("restore"), "{json}");
    assert!(number(&json, &["wire_bytes"]) > 0.0, "{json}");
    assert!(
        number(&json, &["requests_acknowledged_before_kill"]) > 0.0,
        "{json}"
    );
    assert!(
        number(&json, &["requests_acknowledged"])
            > number(&json, &["requests_acknowledged_before_kill"]),
        "the restarted service took writes: {json}"
    );
    assert_eq!(number(&json, &["requests_lost"]), 0.0, "{printed}");
    assert!(printed.contains("type I downtime"), "{printed}");
    assert!(printed.contains("requests lost: 0"), "{printed}");
}

/// A pseudo-random checkpoint number in 20..60, different per run (printed).
fn some_checkpoint(salt: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    20 + (u64::from(nanos) ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15)) % 40
}

#[test]
fn with_output_commit_no_reply_announces_a_write_a_crash_at_any_point_loses() {
    for (salt, point) in ["pause", "transfer", "sent", "acked", "released"]
        .into_iter()
        .enumerate()
    {
        let fault = format!("{point}@{}", some_checkpoint(salt as u64));
        let Some((code, printed, json)) = demo(point, &["--fault", &fault]) else {
            return;
        };
        assert_eq!(code, 0, "{fault}: {printed}");
        assert_eq!(json["fault"], fault.as_str());
        // The service says which transport carries its checkpoints.
        if let Some(name) = std::env::var("FGBI_TEST_TRANSPORT")
            .ok()
            .filter(|t| ["rdma", "std"].contains(&t.as_str()))
        {
            assert!(printed.contains(&format!(" over {name}, ")), "{printed}");
        }
        assert!(
            number(&json, &["requests_acknowledged_before_kill"]) > 0.0,
            "{fault}: {json}"
        );
        assert_eq!(number(&json, &["requests_lost"]), 0.0, "{fault}: {printed}");
    }
}

#[test]
fn a_workload_killed_at_any_point_of_a_checkpoint_resumes_from_a_replica_equal_to_it() {
    for (salt, point) in ["pause", "sent", "acked"].into_iter().enumerate() {
        let fault = format!("{point}@{}", some_checkpoint(salt as u64));
        let args = ["--workload", "web", "--mem", "16M", "--fault", &fault];
        let Some((code, printed)) = run_demo(&args) else {
            return;
        };
        assert_eq!(code, 0, "{fault}: {printed}");
        assert!(
            printed.contains(&format!("primary killed itself at {fault} (SIGKILL)")),
            "{printed}"
        );
        assert!(
            printed.contains("digest equals the primary's checkpoint"),
            "{fault}: {printed}"
        );
        assert!(printed.contains("backup: running epochs="), "{printed}");
    }
}

/// The negative control: replying before the commit, a crash inside the pause loses
/// writes the clients were told had succeeded. Whether a given pause has replied
/// writes behind it depends on scheduling, so up to three runs are made; under the
/// demo's continuous load every pause has had hundreds.
#[test]
fn without_output_commit_a_crash_in_the_pause_loses_acknowledged_writes() {
    loses_acknowledged_writes("control", "output commit off", |salt| {
        let fault = format!("pause@{}", some_checkpoint(salt));
        vec!["--no-output-commit".into(), "--fault".into(), fault]
    });
}

/// Runs the demo with `flags(run)` up to three times until it reports lost writes
/// (a negative control: whether a given kill has unreplicated acknowledged writes
/// behind it depends on scheduling), and checks that the loss fails the demo and
/// that its report says `marker`.
fn loses_acknowledged_writes(name: &str, marker: &str, flags: impl Fn(u64) -> Vec<String>) {
    let mut runs = Vec::new();
    for run in 0..3 {
        let flags = flags(run);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let Some((code, printed, json)) = demo(name, &flags) else {
            return;
        };
        if number(&json, &["requests_lost"]) > 0.0 {
            assert_eq!(code, 1, "lost writes fail the demo: {printed}");
            assert!(printed.contains(marker), "{printed}");
            return;
        }
        runs.push(printed);
    }
    panic!("no acknowledged write was lost in three runs: {runs:#?}");
}

#[test]
fn in_llm_mode_replies_leave_at_once_and_the_replay_loses_no_acknowledged_write() {
    let Some((code, printed, json)) = demo("llm", &["--mode", "llm"]) else {
        return;
    };
    assert_eq!(code, 0, "{printed}");
    assert_eq!(json["mode"], "llm");
    assert_eq!(json["output_commit"], false, "{json}");
    assert_eq!(json["inputs_logged"], true, "{json}");
    assert_eq!(number(&json, &["epoch_ms"]), 200.0, "LLM's default: {json}");
    number(&json, &["inputs_replayed"]);
    let f = |p| number(&json, &["failover_ms", p]);
    assert!(
        f("total") >= f("restore") + f("replay") && f("replay") >= 0.0,
        "{json}"
    );
    assert!(
        number(&json, &["requests_acknowledged_before_kill"]) > 0.0,
        "{json}"
    );
    assert_eq!(number(&json, &["requests_lost"]), 0.0, "{printed}");
    assert!(
        printed.contains("inputs logged at the backup and replayed"),
        "{printed}"
    );
    assert!(printed.contains("logged inputs in"), "{printed}");
}

/// The negative control: LLM's replies do not wait for a checkpoint, so without the
/// replay the writes acknowledged since the last committed checkpoint are lost.
/// Under the demo's continuous load a 200 ms epoch has thousands behind it; up to
/// three runs are made in case the kill falls right after a commit.
#[test]
fn in_llm_mode_without_the_replay_acknowledged_writes_are_lost() {
    loses_acknowledged_writes("llm-control", "NOT replayed", |_| {
        ["--mode", "llm", "--no-replay"].map(String::from).to_vec()
    });
}

#[test]
fn the_demo_fails_over_a_kvm_micro_vm_and_loses_no_acknowledged_write() {
    vm_demo("vm", "kernel", "in a KVM micro-VM,");
}

#[test]
fn the_demo_fails_over_a_kvm_micro_vm_checkpointed_copy_on_write() {
    vm_demo("vm-cow", "cow", "in a KVM micro-VM, copy-on-write,");
}

/// `fgbi demo --vm --tracking tracking`, whose first line says `shown`.
fn vm_demo(name: &str, tracking: &str, shown: &str) {
    if !fgbi_hyp::feature::available("KVM", probe(DirtyTracking::Classic)) {
        return;
    }
    let Some((code, printed, json)) = demo(name, &["--vm", "--tracking", tracking]) else {
        return;
    };
    assert_eq!(code, 0, "{printed}");
    assert_eq!(json["vm"], true, "{json}");
    assert_eq!(json["tracking"], tracking, "{json}");
    assert!(printed.contains(shown), "{printed}");
    assert!(number(&json, &["epochs"]) > 0.0, "{json}");
    assert!(number(&json, &["failover_epoch"]) > 0.0, "{json}");
    assert!(number(&json, &["failover_ms", "restore"]) > 0.0, "{json}");
    assert!(
        number(&json, &["requests_acknowledged_before_kill"]) > 0.0,
        "{json}"
    );
    assert!(
        number(&json, &["requests_acknowledged"])
            > number(&json, &["requests_acknowledged_before_kill"]),
        "the restored VM took writes: {json}"
    );
    assert_eq!(number(&json, &["requests_lost"]), 0.0, "{printed}");
}
