//! The CI smoke of the Jepsen suite: every workload under faults for a
//! short while must be valid, and the deliberately broken builds must be
//! caught (a checker that cannot fail proves nothing). Longer runs:
//! jepsen/long.sh, results in docs/jepsen.md.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// One cluster at a time: they share two cores.
static SERIAL: Mutex<()> = Mutex::new(());

const SECONDS: &str = "20";

struct Run {
    out: PathBuf,
    code: i32,
    verdict: serde_json::Value,
    output: String,
}

fn jepsen(name: &str, args: &[&str]) -> Run {
    jepsen_for(name, args, SECONDS)
}

/// [`jepsen`] for `seconds` instead of [`SECONDS`].
fn jepsen_for(name: &str, args: &[&str], seconds: &str) -> Run {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = std::env::temp_dir().join(format!("cfs-jepsen-smoke-{name}-{}", std::process::id()));
    let o = Command::new(env!("CARGO_BIN_EXE_jepsen"))
        .args(args)
        .args(["--time-limit", seconds, "--out"])
        .arg(&out)
        .output()
        .expect("run jepsen");
    let output =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    let verdict = std::fs::read(out.join("verdict.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    for f in ["history.jsonl", "timeline.jsonl", "final.json"] {
        assert!(
            PathBuf::from(&out).join(f).exists(),
            "{name}: no {f}\n{output}"
        );
    }
    let run = Run {
        out,
        code: o.status.code().unwrap_or(-1),
        verdict,
        output,
    };
    // The broken-build runs are expected to fail: nothing to keep.
    if args.iter().any(|a| a.starts_with("--faults")) {
        let _ = std::fs::remove_dir_all(&run.out);
    }
    run
}

fn assert_valid(name: &str, args: &[&str]) {
    let r = jepsen(name, args);
    assert_eq!(r.code, 0, "{name}: not valid\n{}", r.output);
    assert_eq!(r.verdict["valid"], true, "{name}");
    assert!(
        r.verdict["operations"].as_u64().unwrap_or(0) > 50,
        "{name}: too few operations\n{}",
        r.output
    );
    // Kept when a check above failed (the cluster's data and logs, for
    // ns-dump, fsck and the mounts' logs).
    let _ = std::fs::remove_dir_all(&r.out);
}

fn anomaly_kinds(r: &Run) -> Vec<String> {
    r.verdict["anomalies"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["kind"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn log_under_kills_pauses_and_partitions() {
    assert_valid(
        "log",
        &[
            "--workload",
            "log",
            "--nemesis",
            "kill,pause,partition",
            "--seed",
            "11",
        ],
    );
}

#[test]
fn registers_under_partitions_and_delay() {
    assert_valid(
        "register",
        &[
            "--workload",
            "register",
            "--nemesis",
            "partition,delay",
            "--seed",
            "12",
        ],
    );
}

#[test]
fn log_survives_power_failures_that_lose_unsynced_writes() {
    assert_valid(
        "power",
        &[
            "--workload",
            "log",
            "--nemesis",
            "power",
            "--faults",
            "lose-unsynced",
            "--seed",
            "13",
        ],
    );
}

#[test]
fn set_on_mounts_under_kills_and_partitions() {
    assert_valid(
        "set",
        &[
            "--workload",
            "set",
            "--nemesis",
            "kill,partition",
            "--seed",
            "14",
        ],
    );
}

#[test]
fn bank_on_mounts_under_kills_pauses_and_partitions() {
    assert_valid(
        "bank",
        &[
            "--workload",
            "bank",
            "--nemesis",
            "kill,pause,partition",
            "--seed",
            "15",
        ],
    );
}

#[test]
fn file_registers_on_mounts_under_kills_and_partitions() {
    assert_valid(
        "fs-register",
        &[
            "--workload",
            "fs-register",
            "--nemesis",
            "kill,partition",
            "--seed",
            "18",
        ],
    );
}

/// The same with close-to-open mounts: opens and stats answered under
/// leases, every rename recalled from the other mounts' caches first.
#[test]
fn file_registers_with_leases_under_kills_and_partitions() {
    assert_valid(
        "fs-register-leases",
        &[
            "--workload",
            "fs-register",
            "--nemesis",
            "kill,partition",
            "--cache-mode",
            "close-to-open",
            "--seed",
            "19",
        ],
    );
}

/// Many small namespace changes answered early (D30) with fsync points,
/// checked against a model, read from other mounts.
#[test]
fn fs_ops_on_mounts_under_kills_and_partitions() {
    assert_valid(
        "fs-ops",
        &[
            "--workload",
            "fs-ops",
            "--nemesis",
            "kill,partition",
            "--seed",
            "20",
        ],
    );
}

/// Read barriers answered from the node's own state: the linearizability
/// checker must find stale reads. A stale read needs a partition to cut a
/// node off while clients read there, which 20 s did not always give (it
/// went unnoticed in 2 of 5 runs here): 40 s.
#[test]
fn broken_stale_reads_are_caught() {
    let r = jepsen_for(
        "broken-stale",
        &[
            "--workload",
            "register",
            "--nemesis",
            "partition",
            "--faults",
            "stale-reads",
            "--seed",
            "16",
        ],
        "40",
    );
    assert_eq!(r.code, 1, "stale reads went unnoticed\n{}", r.output);
    assert!(
        anomaly_kinds(&r).iter().any(|k| k == "not-linearizable"),
        "{:?}",
        anomaly_kinds(&r)
    );
}

/// fdatasync that does not sync (acknowledged before durable), then power
/// failures: the log checker must find acknowledged appends lost.
#[test]
fn broken_fsync_is_caught() {
    let r = jepsen(
        "broken-fsync",
        &[
            "--workload",
            "log",
            "--nemesis",
            "power",
            "--faults",
            "fsync-lies",
            "--seed",
            "17",
        ],
    );
    assert_eq!(r.code, 1, "lost writes went unnoticed\n{}", r.output);
    // Caught either by the checker (an acknowledged append missing from
    // the final log) or by a replica that stopped its shard rather than
    // let entries it had decided be overwritten.
    let overwrite_refused = r.verdict["anomalies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["kind"] == "shard-failed")
        .any(|a| {
            a["problems"]
                .to_string()
                .contains("overwrite decided entries")
        });
    assert!(
        anomaly_kinds(&r).iter().any(|k| k == "lost") || overwrite_refused,
        "{:?}",
        anomaly_kinds(&r)
    );
}
