//! Nemeses: the faults, and the schedule that injects them. Faults change
//! over the run (each window picks anew, sometimes two at once) with quiet
//! periods in between, and every start and stop goes into the timeline.

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;

use crate::cluster::TestCluster;
use crate::proxy::LinkState;

/// The kinds of fault a run may use (`--nemesis kill,pause,...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// kill -9 a random node, the leader, a minority or a majority; restart
    /// them when the window ends.
    Kill,
    /// SIGSTOP a random node, the leader or a majority; SIGCONT later.
    Pause,
    /// Partitions: isolate a node or the leader, split one-way, or cut one
    /// pair (a "bridge" on three nodes: the two ends still reach the
    /// middle).
    Partition,
    /// Hold every message 20–300 ms (with jitter, order kept).
    Delay,
    /// Kill every node at once and restart them (a power failure; with
    /// `lose-unsynced` what was not fsync'd is gone).
    Power,
}

impl Kind {
    pub fn parse_list(s: &str) -> Result<Vec<Kind>, String> {
        let mut v = Vec::new();
        for w in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            v.extend(match w {
                "none" => vec![],
                "kill" => vec![Kind::Kill],
                "pause" => vec![Kind::Pause],
                "partition" => vec![Kind::Partition],
                "delay" => vec![Kind::Delay],
                "power" => vec![Kind::Power],
                "all" => vec![
                    Kind::Kill,
                    Kind::Pause,
                    Kind::Partition,
                    Kind::Delay,
                    Kind::Power,
                ],
                other => return Err(format!("unknown nemesis {other:?}")),
            });
        }
        Ok(v)
    }
}

/// One injected fault, as it was applied.
#[derive(Clone, Debug, Serialize)]
pub struct Fault {
    pub kind: Kind,
    pub detail: String,
    killed: Vec<u64>,
    paused: Vec<u64>,
    links: Vec<(u64, u64)>,
    delayed: bool,
}

/// A timeline line.
#[derive(Serialize)]
struct Line<'a> {
    time: u64,
    action: &'a str,
    kind: Option<Kind>,
    detail: &'a str,
}

pub struct Timeline {
    out: Mutex<std::io::BufWriter<std::fs::File>>,
    /// (start ns, end ns, description) of every fault window.
    pub windows: Mutex<Vec<(u64, u64, String)>>,
}

impl Timeline {
    pub fn create(path: &std::path::Path) -> std::io::Result<Timeline> {
        Ok(Timeline {
            out: Mutex::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
            windows: Mutex::default(),
        })
    }

    fn write(&self, time: u64, action: &str, kind: Option<Kind>, detail: &str) {
        if let Ok(s) = serde_json::to_string(&Line {
            time,
            action,
            kind,
            detail,
        }) {
            let mut o = self.out.lock().expect("timeline lock");
            let _ = writeln!(o, "{s}");
            let _ = o.flush();
        }
    }
}

fn pick_nodes(rng: &mut StdRng, ids: &[u64], n: usize) -> Vec<u64> {
    let mut v = ids.to_vec();
    v.shuffle(rng);
    v.truncate(n);
    v
}

async fn target(tc: &TestCluster, rng: &mut StdRng, allow_majority: bool) -> (Vec<u64>, String) {
    let ids = tc.ids();
    let majority = ids.len() / 2 + 1;
    let choice = rng.gen_range(0..if allow_majority { 4 } else { 3 });
    match choice {
        0 => {
            let v = pick_nodes(rng, &ids, 1);
            (v.clone(), format!("random node {v:?}"))
        }
        1 => match tc.leader(cfs_log::ShardId(0)).await {
            Some(l) => (vec![l], format!("leader of shard 0 (node {l})")),
            None => {
                let v = pick_nodes(rng, &ids, 1);
                (v.clone(), format!("random node {v:?} (no leader known)"))
            }
        },
        2 => {
            let v = pick_nodes(rng, &ids, ids.len() - majority);
            (v.clone(), format!("minority {v:?}"))
        }
        _ => {
            let v = pick_nodes(rng, &ids, majority);
            (v.clone(), format!("majority {v:?}"))
        }
    }
}

/// Applies one fault of `kind`.
pub async fn inject(tc: &TestCluster, rng: &mut StdRng, kind: Kind) -> anyhow::Result<Fault> {
    let mut f = Fault {
        kind,
        detail: String::new(),
        killed: vec![],
        paused: vec![],
        links: vec![],
        delayed: false,
    };
    let ids = tc.ids();
    match kind {
        Kind::Kill => {
            let (nodes, d) = target(tc, rng, true).await;
            for n in &nodes {
                tc.kill(*n)?;
            }
            f.killed = nodes;
            f.detail = format!("kill -9 {d}");
        }
        Kind::Power => {
            for n in &ids {
                tc.kill(*n)?;
            }
            f.killed = ids.clone();
            f.detail = "kill -9 every node (power failure)".into();
        }
        Kind::Pause => {
            let (nodes, d) = target(tc, rng, true).await;
            for n in &nodes {
                tc.signal(*n, libc::SIGSTOP);
            }
            f.paused = nodes;
            f.detail = format!("SIGSTOP {d}");
        }
        Kind::Partition => {
            let choice = rng.gen_range(0..4);
            let (cut, d): (Vec<(u64, u64)>, String) = match choice {
                0 | 1 => {
                    let n = if choice == 1 {
                        tc.leader(cfs_log::ShardId(0)).await.unwrap_or(ids[0])
                    } else {
                        pick_nodes(rng, &ids, 1)[0]
                    };
                    let mut cut = Vec::new();
                    for o in ids.iter().filter(|o| **o != n) {
                        cut.push((n, *o));
                        cut.push((*o, n));
                    }
                    let who = if choice == 1 { "the leader" } else { "node" };
                    (cut, format!("isolate {who} {n} (majority/minority)"))
                }
                2 => {
                    let n = pick_nodes(rng, &ids, 1)[0];
                    let cut = ids.iter().filter(|o| **o != n).map(|o| (n, *o)).collect();
                    (cut, format!("one-way: node {n} cannot send (still hears)"))
                }
                _ => {
                    let pair = pick_nodes(rng, &ids, 2);
                    let (a, b) = (pair[0], pair[1]);
                    (
                        vec![(a, b), (b, a)],
                        format!("bridge: {a} and {b} cut, both reach the others"),
                    )
                }
            };
            for (a, b) in &cut {
                tc.set_link(*a, *b, LinkState::Down);
            }
            f.links = cut;
            f.detail = format!("partition: {d}");
        }
        Kind::Delay => {
            let ms = rng.gen_range(20..300);
            let jitter = ms / 2;
            for l in tc.links.values() {
                l.set(LinkState::Delay { ms, jitter });
            }
            f.delayed = true;
            f.detail = format!("delay every link {ms} ± {jitter} ms");
        }
    }
    Ok(f)
}

/// Undoes `f`.
pub async fn heal(tc: &TestCluster, f: &Fault) -> anyhow::Result<()> {
    for n in &f.paused {
        tc.signal(*n, libc::SIGCONT);
    }
    for (a, b) in &f.links {
        tc.set_link(*a, *b, LinkState::Up);
    }
    if f.delayed {
        tc.heal_links();
    }
    for n in &f.killed {
        tc.start_node(*n)?;
    }
    Ok(())
}

/// Runs the schedule until `until` (ns on the history clock): quiet
/// 2–6 s, then a fault window of 4–12 s (a second fault joins in a third
/// of them), healed at its end. Returns having healed everything.
pub async fn run(
    tc: &TestCluster,
    kinds: &[Kind],
    seed: u64,
    timeline: &Timeline,
    now: impl Fn() -> u64,
    until: u64,
) -> anyhow::Result<()> {
    let mut rng: StdRng = rand::SeedableRng::seed_from_u64(seed ^ 0x6e656d65);
    if kinds.is_empty() {
        return Ok(());
    }
    let sleep_ms = |ms: u64| tokio::time::sleep(Duration::from_millis(ms));
    loop {
        let quiet = rng.gen_range(2000..6000);
        if now() + quiet * 1_000_000 >= until {
            return Ok(());
        }
        sleep_ms(quiet).await;
        let mut faults = Vec::new();
        let n = if kinds.len() > 1 && rng.gen_bool(1.0 / 3.0) {
            2
        } else {
            1
        };
        let mut chosen = kinds.to_vec();
        chosen.shuffle(&mut rng);
        // Two kill-like faults at once would just be a bigger kill.
        chosen.dedup_by(|a, b| {
            matches!((a, b), (Kind::Kill | Kind::Power, Kind::Kill | Kind::Power))
        });
        let start = now();
        for k in chosen.into_iter().take(n) {
            let f = inject(tc, &mut rng, k).await?;
            timeline.write(now(), "start", Some(k), &f.detail);
            faults.push(f);
        }
        // The window ends by the time the clients stop.
        let window = rng
            .gen_range(4000..12000)
            .min(until.saturating_sub(now()) / 1_000_000);
        sleep_ms(window).await;
        let desc: Vec<String> = faults.iter().map(|f| f.detail.clone()).collect();
        for f in faults.iter().rev() {
            heal(tc, f).await?;
            timeline.write(now(), "stop", Some(f.kind), &f.detail);
        }
        timeline
            .windows
            .lock()
            .expect("windows lock")
            .push((start, now(), desc.join(" + ")));
        if now() >= until {
            return Ok(());
        }
    }
}

/// Heals everything (end of run): links up, paused nodes continued,
/// stopped nodes started.
pub async fn heal_all(tc: &TestCluster, timeline: &Timeline, now: u64) -> anyhow::Result<()> {
    tc.heal_links();
    for id in tc.ids() {
        tc.signal(id, libc::SIGCONT);
        if !tc.is_running(id) {
            tc.start_node(id)?;
        }
    }
    timeline.write(now, "heal", None, "everything healed");
    Ok(())
}
