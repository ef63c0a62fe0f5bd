//! Linearizability checker for a single read/write/compare-and-swap register.
//!
//! The algorithm is Wing & Gong's search with Gavin Lowe's memoization, i.e.
//! the "WGL" algorithm used by Porcupine and by Knossos' `linear` checker:
//!
//! 1. Every operation becomes a *call* event and a *return* event, sorted by
//!    time into a doubly linked list (index based: `Vec` of prev/next).
//! 2. The search walks the list from the front. At a call event it tries to
//!    linearize that operation now: if the operation is legal in the current
//!    register state and the resulting configuration (set of linearized
//!    operations, register state) has not been seen before, the operation's
//!    call and return events are *lifted* out of the list, the previous state
//!    is pushed on a stack and the walk restarts from the front.
//! 3. Reaching a return event means that operation had to be linearized by
//!    now but was not, so the search backtracks: it pops the most recently
//!    linearized operation, *unlifts* its events and continues the walk
//!    after that operation's call event.
//! 4. The memo cache (a `HashSet` of bitset-of-linearized-ops plus register
//!    state) guarantees each configuration is explored at most once.
//!
//! # Time and tie rule
//!
//! Events are ordered by time. When a return event and a call event happen
//! at the **same instant, the return goes first**: an operation that
//! completes at `t` *precedes* an operation invoked at `t` (operations that
//! only touch at an instant are **not** concurrent). An operation whose
//! `complete == invoke` is a zero-length operation: it comes after every
//! (non-zero-length) return at that instant and before every
//! (non-zero-length) call at that instant; zero-length operations at the same
//! instant are concurrent with each other. A `complete` earlier than `invoke`
//! (malformed input) is treated as `complete == invoke`.
//!
//! # Indeterminate operations
//!
//! An operation with `complete == None` timed out: it may have taken effect
//! at any instant after its invocation, or never. Indeterminate reads have no
//! effect and constrain nothing, so they are dropped. Indeterminate writes
//! and cas operations get a return event at +infinity (after every real
//! event): the search may linearize them anywhere after their invocation, and
//! once every determinate operation has been linearized the history is
//! accepted whether or not they were. Many indeterminate writes that stay
//! pending for the rest of the history can make the search expensive (each
//! one doubles the number of reachable configurations in the worst case);
//! the `budget` bounds that.
//!
//! # Failed compare-and-swap
//!
//! [`RegOp::Cas`] means a cas that *succeeded*. A failed cas has no effect;
//! the caller must either drop it or, if it knows the value the register held
//! (`x`, with `x != expected`), pass it as `RegOp::Read(Some(x))` (or
//! `RegOp::Read(None)` if it knows the register was unset).
//!
//! # Cost
//!
//! Memory is `O(states * n / 64)` words for the memo cache (each state
//! stores a bitset over the `n` retained operations). For typical
//! linearizable histories the search is nearly greedy and the number of
//! states is close to `n` times the concurrency.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};

/// One operation on one register, from a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegOp {
    /// A read that returned the given value (`None` = register unset).
    Read(Option<i64>),
    /// A write of the given value.
    Write(i64),
    /// A compare-and-swap `Cas(expected, new)` that **succeeded**. Failed cas
    /// operations must be dropped by the caller, or given as
    /// `Read(Some(x))` (with `x != expected`) when the caller knows the value
    /// `x` the register held.
    Cas(i64, i64),
}

/// One operation of a history, with its real-time interval.
#[derive(Clone, Debug)]
pub struct Op {
    /// Index of the operation in the caller's history (for reports).
    pub index: usize,
    /// The process (client) that performed the operation. Informational only
    /// (used in reports); the checker derives all ordering from the times.
    pub process: u64,
    /// Invocation time (ns, any monotonic origin).
    pub invoke: u64,
    /// Completion time; `None` = indeterminate (timed out: it may or may not
    /// have taken effect, at any time after `invoke`).
    pub complete: Option<u64>,
    /// What the operation did. For `Read`: the value it returned. `Cas` is a
    /// cas that succeeded (see [`RegOp::Cas`] for failed ones).
    pub op: RegOp,
}

/// Verdict of [`check_register`].
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A linearization exists.
    Linearizable,
    /// No linearization exists. `stuck` is the index ([`Op::index`]) of an
    /// operation that could not be placed at the deepest point the search
    /// reached; `prefix` the indices of the longest linearized prefix found
    /// (in order, at most the last 20); `detail` a one-line human
    /// explanation.
    NotLinearizable {
        /// [`Op::index`] of the operation that could not be placed.
        stuck: usize,
        /// [`Op::index`] of the last (at most 20) operations of the longest
        /// linearized prefix, in linearization order.
        prefix: Vec<usize>,
        /// One-line human explanation.
        detail: String,
    },
    /// The search visited more than `budget` states without deciding.
    Unknown,
}

/// Register state: `None` = unset.
type State = Option<i64>;

/// Sentinel "no node" in the linked list.
const NIL: usize = usize::MAX;
/// Head sentinel node of the linked list.
const HEAD: usize = 0;
/// Number of prefix entries reported in [`Outcome::NotLinearizable`].
const MAX_PREFIX: usize = 20;

/// Applies `op` to `state`; `None` if the operation is illegal there.
fn step(state: State, op: &RegOp) -> Option<State> {
    match *op {
        RegOp::Read(v) => (state == v).then_some(state),
        RegOp::Write(v) => Some(Some(v)),
        RegOp::Cas(expected, new) => (state == Some(expected)).then_some(Some(new)),
    }
}

/// SplitMix64 finalizer, used to derive per-operation Zobrist keys.
fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A search configuration: the set of linearized operations (bitset) plus
/// the register state. `zobrist` is the XOR of the per-operation keys of the
/// set bits, maintained incrementally so hashing is O(1).
#[derive(Clone)]
struct Config {
    words: Vec<u64>,
    zobrist: u64,
    state: State,
}

impl Config {
    fn new(n: usize, state: State) -> Self {
        Config {
            words: vec![0; n.div_ceil(64)],
            zobrist: 0,
            state,
        }
    }

    /// Toggles bit `i` (used both to set and to clear).
    fn toggle(&mut self, i: usize, key: u64) {
        self.words[i / 64] ^= 1u64 << (i % 64);
        self.zobrist ^= key;
    }
}

impl PartialEq for Config {
    fn eq(&self, other: &Self) -> bool {
        self.zobrist == other.zobrist && self.state == other.state && self.words == other.words
    }
}

impl Eq for Config {}

impl Hash for Config {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // Equal configs have equal words, hence equal zobrist and state.
        self.zobrist.hash(h);
        self.state.hash(h);
    }
}

/// Sort key of an event; see the module docs for the tie rule.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct EventKey {
    /// Return events of indeterminate ops sort after every real event.
    infinite: bool,
    time: u64,
    /// 0 = return of a non-zero-length op, 1 = call of a zero-length op,
    /// 2 = return of a zero-length op, 3 = call of a non-zero-length op.
    rank: u8,
    op: usize,
}

/// The event list: node 0 is the head sentinel, nodes `1..=2n` are events.
struct EventList {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// Internal operation index of each node.
    node_op: Vec<usize>,
    /// For call nodes: the matching return node; `NIL` for return nodes.
    mate: Vec<usize>,
    /// Whether a node is a return event at +infinity.
    infinite: Vec<bool>,
}

impl EventList {
    fn new(ops: &[&Op]) -> Self {
        let mut events: Vec<(EventKey, bool)> = Vec::with_capacity(2 * ops.len());
        for (i, o) in ops.iter().enumerate() {
            let call = |rank| EventKey {
                infinite: false,
                time: o.invoke,
                rank,
                op: i,
            };
            match o.complete {
                Some(c) if c > o.invoke => {
                    events.push((call(3), true));
                    events.push((
                        EventKey {
                            infinite: false,
                            time: c,
                            rank: 0,
                            op: i,
                        },
                        false,
                    ));
                }
                Some(_) => {
                    events.push((call(1), true));
                    events.push((
                        EventKey {
                            infinite: false,
                            time: o.invoke,
                            rank: 2,
                            op: i,
                        },
                        false,
                    ));
                }
                None => {
                    events.push((call(3), true));
                    events.push((
                        EventKey {
                            infinite: true,
                            time: 0,
                            rank: 0,
                            op: i,
                        },
                        false,
                    ));
                }
            }
        }
        events.sort_unstable();

        let nodes = events.len() + 1;
        let mut list = EventList {
            next: (1..=nodes)
                .map(|k| if k == nodes { NIL } else { k })
                .collect(),
            prev: (0..nodes).map(|k| k.wrapping_sub(1)).collect(),
            node_op: vec![NIL; nodes],
            mate: vec![NIL; nodes],
            infinite: vec![false; nodes],
        };
        list.prev[HEAD] = NIL;
        let mut call_node = vec![NIL; ops.len()];
        for (k, (key, is_call)) in events.iter().enumerate() {
            let node = k + 1;
            list.node_op[node] = key.op;
            list.infinite[node] = key.infinite;
            if *is_call {
                call_node[key.op] = node;
            } else {
                // The call sorts before its return, so it is already known.
                list.mate[call_node[key.op]] = node;
            }
        }
        list
    }

    fn is_call(&self, node: usize) -> bool {
        self.mate[node] != NIL
    }

    fn unlink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = node;
        if n != NIL {
            self.prev[n] = node;
        }
    }

    /// Removes a call node and its return node from the list.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        self.unlink(self.mate[call]);
    }

    /// Undoes [`EventList::lift`] (in reverse order).
    fn unlift(&mut self, call: usize) {
        self.relink(self.mate[call]);
        self.relink(call);
    }
}

/// The deepest point of the search, kept for failure reports.
struct Deepest {
    depth: usize,
    /// Internal index of the op whose return could not be passed.
    stuck: usize,
    /// `Op::index` of the last `MAX_PREFIX` linearized ops.
    prefix: Vec<usize>,
    state: State,
    /// Number of other ops invoked but not linearized at that point.
    concurrent: usize,
}

/// Most register states remembered per operation for failure reports.
const MAX_SEEN: usize = 8;

/// Register states in which the search tried an operation, for reports.
#[derive(Clone, Default)]
struct Seen {
    /// Distinct states in which the operation was illegal (at most
    /// [`MAX_SEEN`]).
    states: Vec<State>,
    /// There were more such states than recorded.
    more: bool,
    /// The operation was legal in some state the search reached.
    ever_legal: bool,
}

impl Seen {
    fn refused(&mut self, state: State) {
        if !self.states.contains(&state) {
            if self.states.len() < MAX_SEEN {
                self.states.push(state);
            } else {
                self.more = true;
            }
        }
    }
}

/// Checks whether `ops` (a history of one register) is linearizable.
///
/// `initial` is the register's value before any operation (`None` = unset; a
/// `Read(None)` reads it). `budget` bounds the number of distinct search
/// states visited; beyond it the result is [`Outcome::Unknown`]. See the
/// module documentation for the tie rule on equal timestamps and for the
/// treatment of indeterminate operations and failed cas.
pub fn check_register(ops: &[Op], initial: Option<i64>, budget: usize) -> Outcome {
    // Indeterminate reads have no effect: drop them.
    let ops: Vec<&Op> = ops
        .iter()
        .filter(|o| o.complete.is_some() || !matches!(o.op, RegOp::Read(_)))
        .collect();
    let determinate: Vec<bool> = ops.iter().map(|o| o.complete.is_some()).collect();
    let n_det = determinate.iter().filter(|&&d| d).count();
    if n_det == 0 {
        return Outcome::Linearizable;
    }
    let zobrist: Vec<u64> = (0..ops.len() as u64).map(mix64).collect();

    let mut list = EventList::new(&ops);
    let mut cfg = Config::new(ops.len(), initial);
    let mut cache: HashSet<Config> = HashSet::new();
    // (call node, state before linearizing it)
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut linearized_det = 0usize;
    let mut visited = 0usize;
    let mut deepest: Option<Deepest> = None;
    let mut seen: Vec<Seen> = vec![Seen::default(); ops.len()];

    let mut entry = list.next[HEAD];
    while entry != NIL {
        let i = list.node_op[entry];
        if list.is_call(entry) {
            match step(cfg.state, &ops[i].op) {
                None => seen[i].refused(cfg.state),
                Some(new_state) => {
                    seen[i].ever_legal = true;
                    let old_state = cfg.state;
                    cfg.toggle(i, zobrist[i]);
                    cfg.state = new_state;
                    if !cache.contains(&cfg) {
                        visited += 1;
                        if visited > budget {
                            return Outcome::Unknown;
                        }
                        cache.insert(cfg.clone());
                        stack.push((entry, old_state));
                        list.lift(entry);
                        if determinate[i] {
                            linearized_det += 1;
                            if linearized_det == n_det {
                                return Outcome::Linearizable;
                            }
                        }
                        entry = list.next[HEAD];
                        continue;
                    }
                    cfg.toggle(i, zobrist[i]);
                    cfg.state = old_state;
                }
            }
            entry = list.next[entry];
        } else {
            if list.infinite[entry] {
                // Only reachable once every determinate op is linearized
                // (which returns above); kept as the textbook success case.
                return Outcome::Linearizable;
            }
            // A determinate op that must be linearized by now but is not.
            let depth = stack.len();
            if deepest.as_ref().is_none_or(|d| depth > d.depth) {
                // Every node before `entry` is the call of a pending op,
                // one of them the stuck op's own.
                let mut concurrent = 0usize;
                let mut node = list.next[HEAD];
                while node != entry && node != NIL {
                    concurrent += usize::from(list.node_op[node] != i);
                    node = list.next[node];
                }
                deepest = Some(Deepest {
                    depth,
                    stuck: i,
                    prefix: stack[depth.saturating_sub(MAX_PREFIX)..]
                        .iter()
                        .map(|&(call, _)| ops[list.node_op[call]].index)
                        .collect(),
                    state: cfg.state,
                    concurrent,
                });
            }
            let Some((call, old_state)) = stack.pop() else {
                let d = deepest.expect("the deepest point is recorded at every return event");
                return Outcome::NotLinearizable {
                    stuck: ops[d.stuck].index,
                    detail: describe(ops[d.stuck], &seen[d.stuck], d.state, d.depth, d.concurrent),
                    prefix: d.prefix,
                };
            };
            let j = list.node_op[call];
            cfg.toggle(j, zobrist[j]);
            cfg.state = old_state;
            list.unlift(call);
            if determinate[j] {
                linearized_det -= 1;
            }
            entry = list.next[call];
        }
    }
    Outcome::Linearizable
}

fn fmt_value(v: State) -> String {
    v.map_or_else(|| "unset".to_string(), |x| x.to_string())
}

/// Builds the one-line explanation for an operation that could not be
/// placed. `seen` holds the register states in which the search found the
/// operation illegal (`more` if there were more than [`MAX_SEEN`]),
/// `ever_legal` whether it was legal in some reachable state, `state` the
/// register state after the longest linearizable prefix (`depth` ops) and
/// `concurrent` the number of other operations pending at that point.
fn describe(op: &Op, seen: &Seen, state: State, depth: usize, concurrent: usize) -> String {
    let when = format!(
        "by process {} at [{}, {}]",
        op.process,
        op.invoke,
        op.complete
            .map_or_else(|| "?".to_string(), |c| c.to_string())
    );
    let what = match op.op {
        RegOp::Read(v) => format!("read {}", fmt_value(v)),
        RegOp::Write(v) => format!("write {v}"),
        RegOp::Cas(a, b) => format!("cas {a}->{b}"),
    };
    if !seen.ever_legal && !seen.states.is_empty() {
        let mut states = seen.states.clone();
        states.sort_unstable();
        let mut vals: Vec<String> = states.into_iter().map(fmt_value).collect();
        if seen.more {
            vals.push("...".to_string());
        }
        let vals = if vals.len() == 1 {
            vals.join("")
        } else {
            format!("one of {}", vals.join(", "))
        };
        format!("{what} {when} but the register could only hold {vals}")
    } else {
        format!(
            "{what} {when} cannot be ordered consistently with the {concurrent} concurrent \
             operations (the register held {} after the longest linearizable prefix of {depth} ops)",
            fmt_value(state)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const BUDGET: usize = 10_000_000;

    fn mk(index: usize, process: u64, invoke: u64, complete: Option<u64>, op: RegOp) -> Op {
        Op {
            index,
            process,
            invoke,
            complete,
            op,
        }
    }

    fn w(index: usize, invoke: u64, complete: u64, v: i64) -> Op {
        mk(index, index as u64, invoke, Some(complete), RegOp::Write(v))
    }

    fn r(index: usize, invoke: u64, complete: u64, v: Option<i64>) -> Op {
        mk(index, index as u64, invoke, Some(complete), RegOp::Read(v))
    }

    fn cas(index: usize, invoke: u64, complete: u64, a: i64, b: i64) -> Op {
        mk(
            index,
            index as u64,
            invoke,
            Some(complete),
            RegOp::Cas(a, b),
        )
    }

    fn check(ops: &[Op], initial: Option<i64>) -> Outcome {
        check_register(ops, initial, BUDGET)
    }

    fn stuck_of(o: &Outcome) -> Option<usize> {
        match o {
            Outcome::NotLinearizable { stuck, .. } => Some(*stuck),
            _ => None,
        }
    }

    #[test]
    fn empty_history() {
        assert_eq!(check(&[], None), Outcome::Linearizable);
    }

    #[test]
    fn sequential_history() {
        let ops = vec![
            r(0, 0, 1, None),
            w(1, 2, 3, 1),
            r(2, 4, 5, Some(1)),
            w(3, 6, 7, 2),
            r(4, 8, 9, Some(2)),
            cas(5, 10, 11, 2, 3),
            r(6, 12, 13, Some(3)),
        ];
        assert_eq!(check(&ops, None), Outcome::Linearizable);
        // Same history with a wrong final read.
        let mut bad = ops.clone();
        bad[6].op = RegOp::Read(Some(2));
        assert_eq!(stuck_of(&check(&bad, None)), Some(6));
    }

    #[test]
    fn concurrent_write_read_sees_either_value() {
        let new = vec![w(0, 0, 10, 1), r(1, 5, 15, Some(1))];
        assert_eq!(check(&new, Some(0)), Outcome::Linearizable);
        let old = vec![w(0, 0, 10, 1), r(1, 5, 15, Some(0))];
        assert_eq!(check(&old, Some(0)), Outcome::Linearizable);
        // Read before the write's invocation ends: may still see old value.
        let both = vec![w(0, 0, 10, 1), r(1, 1, 3, Some(0)), r(2, 5, 8, Some(1))];
        assert_eq!(check(&both, Some(0)), Outcome::Linearizable);
        // But new-then-old across two sequential reads is not linearizable.
        let flip = vec![w(0, 0, 10, 1), r(1, 1, 3, Some(1)), r(2, 5, 8, Some(0))];
        assert_eq!(stuck_of(&check(&flip, Some(0))), Some(2));
    }

    #[test]
    fn stale_read_is_reported() {
        let ops = vec![w(0, 0, 10, 1), r(1, 20, 30, Some(0))];
        match check(&ops, Some(0)) {
            Outcome::NotLinearizable {
                stuck,
                prefix,
                detail,
            } => {
                assert_eq!(stuck, 1);
                assert_eq!(prefix, vec![0]);
                assert!(detail.contains("read 0"), "{detail}");
                assert!(detail.contains("[20, 30]"), "{detail}");
                assert!(detail.contains("could only hold 1"), "{detail}");
            }
            other => panic!("expected NotLinearizable, got {other:?}"),
        }
    }

    #[test]
    fn caller_indices_are_reported() {
        // Op::index values are the caller's, not positions in the slice.
        let ops = vec![w(40, 0, 10, 1), r(17, 20, 30, Some(0))];
        assert_eq!(stuck_of(&check(&ops, Some(0))), Some(17));
    }

    #[test]
    fn tie_rule_return_before_call() {
        // The write completes at 10 and the read is invoked at 10: they are
        // not concurrent, so the read must see the write.
        let ops = vec![w(0, 0, 10, 1), r(1, 10, 20, Some(0))];
        assert_eq!(stuck_of(&check(&ops, Some(0))), Some(1));
        let ops = vec![w(0, 0, 10, 1), r(1, 10, 20, Some(1))];
        assert_eq!(check(&ops, Some(0)), Outcome::Linearizable);
        // One instant later in the other direction they do overlap.
        let ops = vec![w(0, 0, 10, 1), r(1, 9, 20, Some(0))];
        assert_eq!(check(&ops, Some(0)), Outcome::Linearizable);
    }

    #[test]
    fn zero_length_ops() {
        // Zero-length ops at the same instant are concurrent with each other.
        let ops = vec![w(0, 5, 5, 1), r(1, 5, 5, Some(0))];
        assert_eq!(check(&ops, Some(0)), Outcome::Linearizable);
        // ...but follow an op that returns at that instant.
        let ops = vec![w(0, 0, 5, 1), r(1, 5, 5, Some(0))];
        assert_eq!(stuck_of(&check(&ops, Some(0))), Some(1));
        // ...and precede an op invoked at that instant.
        let ops = vec![w(0, 5, 5, 1), r(1, 5, 9, Some(0))];
        assert_eq!(stuck_of(&check(&ops, Some(0))), Some(1));
    }

    #[test]
    fn cas_sequences() {
        let ok = vec![cas(0, 0, 1, 0, 1), cas(1, 2, 3, 1, 2), r(2, 4, 5, Some(2))];
        assert_eq!(check(&ok, Some(0)), Outcome::Linearizable);
        // Second cas expects 0 but the first already changed it to 1.
        let bad = vec![cas(0, 0, 1, 0, 1), cas(1, 2, 3, 0, 2)];
        match check(&bad, Some(0)) {
            Outcome::NotLinearizable { stuck, detail, .. } => {
                assert_eq!(stuck, 1);
                assert!(detail.contains("cas 0->2"), "{detail}");
            }
            other => panic!("expected NotLinearizable, got {other:?}"),
        }
        // A failed cas(0, 5) given as the read of the value it saw.
        let failed = vec![cas(0, 0, 1, 0, 1), r(1, 2, 3, Some(1))];
        assert_eq!(check(&failed, Some(0)), Outcome::Linearizable);
        // Concurrent cas ops must be ordered by their values, not invocations.
        let reorder = vec![
            cas(0, 0, 10, 1, 2),
            cas(1, 1, 9, 0, 1),
            r(2, 11, 12, Some(2)),
        ];
        assert_eq!(check(&reorder, Some(0)), Outcome::Linearizable);
        // Two successful cas(0, 1) cannot both succeed.
        let twice = vec![cas(0, 0, 10, 0, 1), cas(1, 1, 9, 0, 1)];
        assert!(matches!(
            check(&twice, Some(0)),
            Outcome::NotLinearizable { .. }
        ));
        // Cas on an unset register cannot succeed.
        assert!(matches!(
            check(&[cas(0, 0, 1, 0, 1)], None),
            Outcome::NotLinearizable { stuck: 0, .. }
        ));
    }

    #[test]
    fn indeterminate_operations() {
        let info_w = |index, invoke, v| mk(index, 9, invoke, None, RegOp::Write(v));
        // Must have happened: a later read sees it.
        let seen = vec![info_w(0, 0, 1), r(1, 100, 110, Some(1))];
        assert_eq!(check(&seen, Some(0)), Outcome::Linearizable);
        // Never observed.
        let unseen = vec![
            info_w(0, 0, 1),
            r(1, 10, 20, Some(0)),
            r(2, 30, 40, Some(0)),
        ];
        assert_eq!(check(&unseen, Some(0)), Outcome::Linearizable);
        // Observed, then not observed: impossible.
        let flip = vec![
            info_w(0, 0, 1),
            r(1, 10, 20, Some(1)),
            r(2, 30, 40, Some(0)),
        ];
        assert_eq!(stuck_of(&check(&flip, Some(0))), Some(2));
        // Cannot take effect before its invocation.
        let early = vec![info_w(0, 50, 1), r(1, 10, 20, Some(1))];
        assert_eq!(stuck_of(&check(&early, Some(0))), Some(1));
        // Indeterminate cas that must have happened.
        let info_cas = mk(0, 9, 0, None, RegOp::Cas(0, 7));
        assert_eq!(
            check(&[info_cas, r(1, 5, 6, Some(7))], Some(0)),
            Outcome::Linearizable
        );
        // Indeterminate reads are dropped, whatever they claim.
        let info_r = mk(0, 9, 0, None, RegOp::Read(Some(99)));
        assert_eq!(
            check(&[info_r.clone(), r(1, 5, 6, Some(0))], Some(0)),
            Outcome::Linearizable
        );
        assert_eq!(check(&[info_r], Some(0)), Outcome::Linearizable);
    }

    #[test]
    fn read_of_value_never_written() {
        let ops = vec![w(0, 0, 10, 1), r(1, 5, 15, Some(7)), w(2, 20, 30, 2)];
        match check(&ops, Some(0)) {
            Outcome::NotLinearizable { stuck, detail, .. } => {
                assert_eq!(stuck, 1);
                assert!(detail.contains("read 7"), "{detail}");
                assert!(detail.contains("one of 0, 1"), "{detail}");
            }
            other => panic!("expected NotLinearizable, got {other:?}"),
        }
    }

    #[test]
    fn budget_exhaustion_is_unknown() {
        let ops: Vec<Op> = (0..10)
            .map(|k| w(k, 2 * k as u64, 2 * k as u64 + 1, 1))
            .collect();
        assert_eq!(check_register(&ops, None, 3), Outcome::Unknown);
        assert_eq!(check_register(&ops, None, 10), Outcome::Linearizable);
    }

    /// xorshift64 RNG.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Rng(mix64(seed) | 1)
        }
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, per_mille: u64) -> bool {
            self.below(1000) < per_mille
        }
    }

    #[derive(Clone, Copy)]
    enum Kind {
        Read,
        Write,
        Cas,
    }

    /// Simulates `n_procs` processes issuing `n_ops` operations against a
    /// real register; each op takes effect at a random instant strictly
    /// inside its interval. Crashed ops (probability `crash_per_mille`)
    /// become indeterminate, take effect with probability 1/2, and their
    /// process continues under a fresh id.
    fn random_history(
        rng: &mut Rng,
        n_ops: usize,
        n_procs: usize,
        crash_per_mille: u64,
    ) -> (Vec<Op>, Option<i64>) {
        struct Planned {
            process: u64,
            invoke: u64,
            complete: u64,
            effect: u64,
            kind: Kind,
            crashed: bool,
            takes_effect: bool,
        }
        let mut clocks: Vec<u64> = (0..n_procs).map(|_| rng.below(10)).collect();
        let mut ids: Vec<u64> = (0..n_procs as u64).collect();
        let mut plan = Vec::with_capacity(n_ops);
        for k in 0..n_ops {
            let p = k % n_procs;
            let invoke = clocks[p] + rng.below(4);
            let duration = 2 + rng.below(30);
            let complete = invoke + duration;
            let effect = invoke + 1 + rng.below(duration - 1);
            clocks[p] = complete;
            let kind = match rng.below(10) {
                0..=3 => Kind::Read,
                4..=6 => Kind::Write,
                _ => Kind::Cas,
            };
            let crashed = rng.chance(crash_per_mille);
            let takes_effect = !crashed || rng.chance(500);
            plan.push(Planned {
                process: ids[p],
                invoke,
                complete,
                effect,
                kind,
                crashed,
                takes_effect,
            });
            if crashed {
                ids[p] += n_procs as u64;
            }
        }

        let initial = if rng.chance(500) { Some(0) } else { None };
        let mut order: Vec<usize> = (0..n_ops).filter(|&k| plan[k].takes_effect).collect();
        order.sort_by_key(|&k| (plan[k].effect, k));
        let mut result: Vec<Option<RegOp>> = vec![None; n_ops];
        let mut value = initial;
        for &k in &order {
            result[k] = match plan[k].kind {
                Kind::Read => Some(RegOp::Read(value)),
                Kind::Write => {
                    let v = rng.below(5) as i64;
                    value = Some(v);
                    Some(RegOp::Write(v))
                }
                Kind::Cas => {
                    let new = rng.below(5) as i64;
                    match value {
                        Some(cur) if rng.chance(600) => {
                            value = Some(new);
                            Some(RegOp::Cas(cur, new))
                        }
                        // Failed cas: report as the read of what it saw, or drop.
                        Some(cur) if rng.chance(500) => Some(RegOp::Read(Some(cur))),
                        _ => None,
                    }
                }
            };
        }
        // Crashed ops that never took effect: arbitrary arguments.
        for (k, pl) in plan.iter().enumerate() {
            if !pl.takes_effect {
                let v = rng.below(5) as i64;
                result[k] = Some(match pl.kind {
                    Kind::Read => RegOp::Read(Some(v)),
                    Kind::Write => RegOp::Write(v),
                    Kind::Cas => RegOp::Cas(rng.below(5) as i64, v),
                });
            }
        }

        let ops = plan
            .iter()
            .zip(result)
            .enumerate()
            .filter_map(|(k, (pl, res))| {
                res.map(|op| Op {
                    index: k,
                    process: pl.process,
                    invoke: pl.invoke,
                    complete: (!pl.crashed).then_some(pl.complete),
                    op,
                })
            })
            .collect();
        (ops, initial)
    }

    #[test]
    fn random_linearizable_histories_and_corruptions() {
        for seed in 0..200u64 {
            let mut rng = Rng::new(seed);
            let n_ops = 50 + rng.below(250) as usize;
            let n_procs = 1 + rng.below(8) as usize;
            let (mut ops, initial) = random_history(&mut rng, n_ops, n_procs, 30);
            assert_eq!(
                check(&ops, initial),
                Outcome::Linearizable,
                "seed {seed}: simulated history rejected"
            );

            let reads: Vec<usize> = (0..ops.len())
                .filter(|&k| ops[k].complete.is_some() && matches!(ops[k].op, RegOp::Read(_)))
                .collect();
            assert!(!reads.is_empty(), "seed {seed}: no determinate read");
            let victim = reads[rng.below(reads.len() as u64) as usize];
            ops[victim].op = RegOp::Read(Some(1_000_000));
            match check(&ops, initial) {
                Outcome::NotLinearizable { detail, .. } => assert!(!detail.is_empty()),
                other => panic!("seed {seed}: corrupted history gave {other:?}"),
            }
        }
    }

    /// Reference checker: tries every order consistent with real time.
    fn brute_force(ops: &[Op], initial: Option<i64>) -> bool {
        fn zero(o: &Op) -> bool {
            o.complete.is_some_and(|c| c <= o.invoke)
        }
        fn precedes(a: &Op, b: &Op) -> bool {
            match a.complete {
                None => false,
                Some(c) => c < b.invoke || (c == b.invoke && !(zero(a) && zero(b))),
            }
        }
        fn go(ops: &[Op], placed: &mut [bool], state: State) -> bool {
            if (0..ops.len()).all(|k| placed[k] || ops[k].complete.is_none()) {
                return true;
            }
            for k in 0..ops.len() {
                if placed[k] {
                    continue;
                }
                let blocked = (0..ops.len()).any(|j| {
                    j != k && !placed[j] && ops[j].complete.is_some() && precedes(&ops[j], &ops[k])
                });
                if blocked {
                    continue;
                }
                if let Some(next) = step(state, &ops[k].op) {
                    placed[k] = true;
                    let ok = go(ops, placed, next);
                    placed[k] = false;
                    if ok {
                        return true;
                    }
                }
            }
            false
        }
        // Indeterminate reads may be placed or not; they have no effect, but
        // a placed read must still be legal, so simply drop them here too.
        let kept: Vec<Op> = ops
            .iter()
            .filter(|o| o.complete.is_some() || !matches!(o.op, RegOp::Read(_)))
            .cloned()
            .collect();
        go(&kept, &mut vec![false; kept.len()], initial)
    }

    #[test]
    fn agrees_with_brute_force_on_small_random_histories() {
        let mut rng = Rng::new(0xC0FFEE);
        let (mut yes, mut no) = (0, 0);
        for case in 0..3000 {
            let n = 1 + rng.below(7) as usize;
            let ops: Vec<Op> = (0..n)
                .map(|k| {
                    let invoke = rng.below(12);
                    let complete = if rng.chance(150) {
                        None
                    } else {
                        Some(invoke + rng.below(6))
                    };
                    let v = rng.below(3) as i64;
                    let op = match rng.below(3) {
                        0 => RegOp::Read(if rng.chance(150) { None } else { Some(v) }),
                        1 => RegOp::Write(v),
                        _ => RegOp::Cas(rng.below(3) as i64, v),
                    };
                    mk(k, k as u64, invoke, complete, op)
                })
                .collect();
            let initial = if rng.chance(300) { None } else { Some(0) };
            let expected = brute_force(&ops, initial);
            let got = check(&ops, initial);
            assert_eq!(
                got == Outcome::Linearizable,
                expected,
                "case {case}: {ops:?} initial {initial:?} gave {got:?}"
            );
            if expected {
                yes += 1;
            } else {
                no += 1;
            }
        }
        // Make sure both verdicts were exercised.
        assert!(yes > 300 && no > 300, "yes {yes} no {no}");
    }

    #[test]
    fn performance_5000_ops_10_processes() {
        let mut rng = Rng::new(42);
        let (ops, initial) = random_history(&mut rng, 5_000, 10, 0);
        let start = Instant::now();
        let outcome = check(&ops, initial);
        let elapsed = start.elapsed();
        eprintln!("5000 ops / 10 processes: {elapsed:?}");
        assert_eq!(outcome, Outcome::Linearizable);
        assert!(elapsed.as_secs_f64() < 2.0, "took {elapsed:?}");
    }
}
