//! Runs the deterministic simulation of the log (`cfs_log::sim`).
//!
//! * `many_seeds`: seeds `CFS_SIM_SEED_START..+CFS_SIM_SEEDS` (default
//!   `0..DEFAULT_SEEDS`, about 30 s in a debug build), `CFS_SIM_STEPS` faulty
//!   steps each. Every failing seed is printed with its replay command.
//! * `one_seed`: replays `CFS_SIM_SEED` (does nothing if unset);
//!   `CFS_SIM_TRACE=1` prints every message, decision and fault.
//! * Regression seeds that failed before a fix, and sabotaged runs proving
//!   that the checks do fail.
//!
//! More on demand, e.g. `CFS_SIM_SEED_START=100000 CFS_SIM_SEEDS=20000 cargo
//! test --release -p cfs-log --test sim many_seeds -- --nocapture`.

use cfs_log::sim::{self, Options, Sabotage, Stats};

/// Seeds run by default (about 30 s in a debug build on 2 cores).
const DEFAULT_SEEDS: u64 = 500;
/// Faulty steps per run by default (then a calm phase until caught up).
const DEFAULT_STEPS: usize = 1500;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={v:?} is not a number"),
    }
}

fn steps() -> usize {
    env_u64("CFS_SIM_STEPS").map_or(DEFAULT_STEPS, |n| n as usize)
}

fn replay_line(seed: u64) -> String {
    format!("replay: CFS_SIM_SEED={seed} cargo test -p cfs-log --test sim one_seed -- --nocapture")
}

/// Runs one seed; on failure prints the report and the replay command.
fn run_seed(seed: u64, steps: usize) -> Result<Stats, String> {
    sim::run(seed, steps).inspect_err(|e| eprintln!("{e}\n{}", replay_line(seed)))
}

#[test]
fn many_seeds() {
    let start = env_u64("CFS_SIM_SEED_START").unwrap_or(0);
    let n = env_u64("CFS_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let steps = steps();
    let t = std::time::Instant::now();
    let mut total = Stats::default();
    let mut failed = Vec::new();
    for seed in start..start + n {
        match run_seed(seed, steps) {
            Ok(s) => total.add(&s),
            Err(_) => failed.push(seed),
        }
    }
    eprintln!(
        "sim: {n} seeds from {start}, {steps} steps each, {:.1}s: {total:?}",
        t.elapsed().as_secs_f64()
    );
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
    if n >= 40 && steps >= DEFAULT_STEPS {
        // The runs must exercise what they claim to.
        assert!(
            total.acknowledged > n * 50,
            "too little progress: {total:?}"
        );
        assert!(total.crashes > 0 && total.power_cuts > 0 && total.torn_tails > 0);
        assert!(total.partitions > 0 && total.dropped > 0 && total.delayed > 0);
        assert!(total.duplicated > 0 && total.retries > 0 && total.deduplicated > 0);
        assert!(total.trims > 0 && total.segments_deleted > 0 && total.epochs_joined > 0);
        assert!(total.segments_recycled > 0, "{total:?}");
        // Waiters answered by the runtime's own `policy::Proposals`, most
        // of the new requests (the rest were refused or lost with a crash).
        assert!(total.answered * 2 > total.proposals, "{total:?}");
    }
}

#[test]
fn one_seed() {
    let Some(seed) = env_u64("CFS_SIM_SEED") else {
        eprintln!("CFS_SIM_SEED not set: nothing to replay");
        return;
    };
    let opts = Options {
        steps: steps() as u64,
        trace: std::env::var_os("CFS_SIM_TRACE").is_some(),
        ..Options::default()
    };
    match sim::run_with(seed, &opts) {
        Ok(s) => eprintln!("seed {seed} passed: {s:?}"),
        Err(e) => panic!("{e}\n{}", replay_line(seed)),
    }
}

#[test]
fn same_seed_same_run() {
    let a = sim::run(7, 600).expect("seed 7");
    let b = sim::run(7, 600).expect("seed 7");
    assert_eq!(a, b);
    let c = sim::run(8, 600).expect("seed 8");
    assert_ne!(a.fingerprint, c.fingerprint);
}

/// Seeds that failed before a fix (each fails again if its fix is
/// reverted). They depend on the simulation's random stream: after changing
/// what the simulation draws, find new ones by reverting the fix.
fn regression(seeds: &[u64]) {
    for seed in seeds {
        if let Err(e) = run_seed(*seed, DEFAULT_STEPS) {
            panic!("regression seed {seed}: {e}");
        }
    }
}

/// shard.rs: a Promise handled between queuing an AcceptDecide and taking
/// the outgoing buffer made OmniPaxos send later entries only in a stale
/// session: a follower decided different entries (agreement violated).
#[test]
fn regression_stale_accept_cache() {
    regression(&[2, 9]);
}

/// shard.rs: a log sync counting the stop sign at `end + 1` made OmniPaxos
/// count it twice (storage asked to append past its end; phantom decided
/// index; epochs ending at different positions).
#[test]
fn regression_stop_sign_counted_twice() {
    regression(&[0, 8]);
}

/// shard.rs: a sync from an older Promise started below the decided index
/// (OmniPaxos' assertion; rewrite of decided entries in release builds).
#[test]
fn regression_sync_below_decided() {
    regression(&[543, 662]);
}

/// shard.rs: a no-op resync of a replica whose stop sign is decided.
#[test]
fn regression_resync_after_decided_stop_sign() {
    regression(&[8, 14]);
}

/// shard.rs: a replica that recovered an unsent promise above the leader's
/// ballot was locked out of the replica set (liveness).
#[test]
fn regression_recovered_promise_above_leader() {
    regression(&[1291]);
}

/// wal.rs: only the header of a cut torn tail was zeroed; its leftover bytes
/// made the next recovery report corruption.
#[test]
fn regression_torn_tail_leftovers() {
    regression(&[488]);
}

/// wal.rs: removing an empty last segment at recovery was not made durable;
/// after another crash it reappeared behind a segment with a torn tail.
#[test]
fn regression_empty_segment_removal_durable() {
    regression(&[3692]);
}

/// Finds a seed (among a few) whose clean run crashed a replica and
/// delivered entries, so a sabotage has something to break.
fn busy_seed(steps: usize) -> u64 {
    (0..20)
        .find(|s| sim::run(*s, steps).is_ok_and(|st| st.crashes > 0 && st.acknowledged > 20))
        .expect("some seed crashes a replica")
}

#[test]
fn corrupted_delivery_is_caught() {
    let seed = busy_seed(600);
    let opts = Options {
        steps: 600,
        sabotage: Some(Sabotage::CorruptDelivery),
        ..Options::default()
    };
    let err = sim::run_with(seed, &opts).expect_err("a corrupted delivery must be caught");
    assert!(
        err.contains("agreement") && err.contains(&format!("seed {seed} step")),
        "{err}"
    );
}

#[test]
fn resuming_past_the_snapshot_is_caught() {
    let seed = busy_seed(600);
    let opts = Options {
        steps: 600,
        sabotage: Some(Sabotage::ResumePastSnapshot),
        ..Options::default()
    };
    let err = sim::run_with(seed, &opts).expect_err("a skipped position must be caught");
    assert!(err.contains("delivery"), "{err}");
}

#[test]
fn trimming_past_a_durable_decided_position_is_caught() {
    // Floors reported past the lazily written decided index (D39 without
    // `reportable_floor`): some seed must trim past a replica's durable
    // decided position.
    let caught = (0..40).find_map(|seed| {
        let opts = Options {
            steps: 800,
            sabotage: Some(Sabotage::FloorPastDurable),
            ..Options::default()
        };
        sim::run_with(seed, &opts)
            .err()
            .filter(|e| e.contains("trim:"))
    });
    assert!(
        caught.is_some(),
        "no seed caught a trim past a durable decided position"
    );
}

#[test]
fn stale_reads_are_caught() {
    // Reads answered from a replica's own position: some seed (with
    // partitions and crashes) must catch one behind the decided log.
    let caught = (0..40).find_map(|seed| {
        let opts = Options {
            steps: 800,
            sabotage: Some(Sabotage::StaleReads),
            ..Options::default()
        };
        sim::run_with(seed, &opts)
            .err()
            .filter(|e| e.contains("stale read"))
    });
    assert!(caught.is_some(), "no seed caught a stale read");
}

#[test]
fn reads_are_answered() {
    // Clean runs serve linearizable reads (checked at every answer).
    let total: u64 = (0..10)
        .map(|seed| run_seed(seed, 600).expect("clean run").reads)
        .sum();
    assert!(total > 50, "only {total} reads answered");
}
