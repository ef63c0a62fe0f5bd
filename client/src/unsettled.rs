//! Changes a node answered before they were decided (early answers,
//! docs/decisions.md D30). Each is kept from the moment it is sent until
//! the node says it is settled (`ServerMsg::Settled`); a change answered
//! but not settled when its session ends is replayed, with the same
//! operation id, on the next session before anything else is sent there
//! (the log applies an operation id once). A change that did not apply as
//! answered is remembered against the inodes it touched: the next fsync or
//! close of one of them reports it (EIO, or the change's own error).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cfs_proto::ops::{Op, Reply, Request};
use cfs_proto::types::{Errno, Ino};
use tokio::sync::Notify;

/// Changes kept at most; a mutation past this waits for settles first.
pub const KEPT_MAX: usize = 4096;

struct Kept {
    req: Request,
    /// The answer, once it came (a change still unanswered is being
    /// retried by its caller, not replayed).
    told: Option<Result<Reply, Errno>>,
}

#[derive(Default)]
struct State {
    kept: BTreeMap<u64, Kept>,
    /// Failures not reported yet, by inode.
    failed: HashMap<Ino, Errno>,
}

#[derive(Default)]
pub struct Unsettled {
    state: Mutex<State>,
    changed: Notify,
}

/// The inodes a change touched, for reporting its failure.
fn touched(req: &Request, told: Option<&Result<Reply, Errno>>) -> Vec<Ino> {
    let mut v = Vec::new();
    if let Request::Mutate { op, .. } = req {
        v.push(op.home());
        if let Op::Rename { newparent, .. } = op {
            v.push(*newparent);
        }
        if let Some(Ok(Reply::Attr(i))) = told {
            v.push(i.ino);
        }
    }
    v
}

impl Unsettled {
    /// Changes kept (sent early, not settled).
    pub fn len(&self) -> usize {
        self.state.lock().expect("unsettled lock").kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until fewer than [`KEPT_MAX`] changes are kept.
    pub async fn room(&self) {
        while self.len() >= KEPT_MAX {
            let _ = tokio::time::timeout(Duration::from_millis(10), self.changed.notified()).await;
        }
    }

    /// `req` (operation `op_id`) is about to be sent asking for an early
    /// answer.
    pub fn sent(&self, op_id: u64, req: &Request) {
        self.state.lock().expect("unsettled lock").kept.insert(
            op_id,
            Kept {
                req: req.clone(),
                told: None,
            },
        );
    }

    /// The answer came.
    pub fn answered(&self, op_id: u64, told: &Result<Reply, Errno>) {
        if let Some(k) = self
            .state
            .lock()
            .expect("unsettled lock")
            .kept
            .get_mut(&op_id)
        {
            k.told = Some(told.clone());
        }
    }

    /// The caller gave up on the change (no node answered): not kept.
    pub fn abandoned(&self, op_id: u64) {
        self.state
            .lock()
            .expect("unsettled lock")
            .kept
            .remove(&op_id);
        self.changed.notify_waiters();
    }

    /// The node settled the change; `failed` says why it did not apply as
    /// answered. Returns whether it failed.
    pub fn settled(&self, op_id: u64, failed: Option<Errno>) -> bool {
        let mut st = self.state.lock().expect("unsettled lock");
        let k = st.kept.remove(&op_id);
        let failed = match (k, failed) {
            (Some(k), Some(e)) => {
                for ino in touched(&k.req, k.told.as_ref()) {
                    st.failed.insert(ino, e);
                }
                true
            }
            _ => false,
        };
        drop(st);
        self.changed.notify_waiters();
        failed
    }

    /// The changes answered but not settled, in order, for replay on a new
    /// session (they stay kept until the replay settles them).
    pub fn to_replay(&self) -> Vec<(u64, Request, Result<Reply, Errno>)> {
        self.state
            .lock()
            .expect("unsettled lock")
            .kept
            .iter()
            .filter_map(|(id, k)| k.told.clone().map(|t| (*id, k.req.clone(), t)))
            .collect()
    }

    /// A replayed change answered `got`: settled, failed unless that is
    /// what the first answer said.
    pub fn replayed(&self, op_id: u64, got: &Result<Reply, Errno>) -> bool {
        let told = self
            .state
            .lock()
            .expect("unsettled lock")
            .kept
            .get(&op_id)
            .and_then(|k| k.told.clone());
        let same = told.as_ref().is_none_or(|t| same_answer(t, got));
        let failed = (!same).then_some(match got {
            Err(e) => *e,
            Ok(_) => Errno::EIO,
        });
        self.settled(op_id, failed)
    }

    /// Waits until every change sent before this call is settled (or
    /// `wait` passed: then EIO).
    pub async fn settle_all(&self, wait: Duration) -> Result<(), Errno> {
        let upto = {
            let st = self.state.lock().expect("unsettled lock");
            match st.kept.keys().next_back() {
                Some(id) => *id,
                None => return Ok(()),
            }
        };
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            let done = self
                .state
                .lock()
                .expect("unsettled lock")
                .kept
                .keys()
                .next()
                .is_none_or(|first| *first > upto);
            if done {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Errno::EIO);
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(100)), notified).await;
        }
    }

    /// The failure of a change that touched `ino`, once (it is reported).
    pub fn take_failure(&self, ino: Ino) -> Option<Errno> {
        self.state
            .lock()
            .expect("unsettled lock")
            .failed
            .remove(&ino)
    }

    /// Any failure not reported yet, once (all of them are reported).
    pub fn take_any_failure(&self) -> Option<Errno> {
        let mut st = self.state.lock().expect("unsettled lock");
        let e = st.failed.values().next().copied();
        st.failed.clear();
        e
    }
}

/// Answers that say the same thing. A replay the log had already applied
/// returns the recorded outcome itself; one it applies now carries the new
/// node's clock, so times may differ: the same inode, type, owner, size and
/// link count is the same change.
fn same_answer(a: &Result<Reply, Errno>, b: &Result<Reply, Errno>) -> bool {
    match (a, b) {
        (Ok(Reply::Attr(x)), Ok(Reply::Attr(y))) => {
            (x.ino, x.mode, x.uid, x.gid, x.size, x.nlink, x.rdev)
                == (y.ino, y.mode, y.uid, y.gid, y.size, y.nlink, y.rdev)
        }
        (Ok(Reply::None), Ok(Reply::None)) => true,
        (Ok(Reply::Lock(x)), Ok(Reply::Lock(y))) => x == y,
        (Err(x), Err(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cfs_proto::types::Creds;

    fn req(parent: Ino) -> Request {
        Request::Mutate {
            op_id: 0,
            creds: Creds {
                uid: 0,
                gid: 0,
                groups: vec![],
            },
            op: Op::Rmdir {
                parent,
                name: b"x".to_vec(),
            },
            early: true,
        }
    }

    #[tokio::test]
    async fn a_failed_change_is_reported_once_on_what_it_touched() {
        let u = Unsettled::default();
        u.sent(1, &req(7));
        u.answered(1, &Ok(Reply::None));
        assert_eq!(u.to_replay().len(), 1);
        assert!(u.settled(1, Some(Errno::ENOTEMPTY)));
        assert!(u.is_empty());
        assert_eq!(u.take_failure(8), None);
        assert_eq!(u.take_failure(7), Some(Errno::ENOTEMPTY));
        assert_eq!(u.take_failure(7), None);
    }

    #[tokio::test]
    async fn settle_all_waits_for_what_was_sent_before_it() {
        let u = std::sync::Arc::new(Unsettled::default());
        u.sent(1, &req(7));
        u.answered(1, &Ok(Reply::None));
        assert_eq!(
            u.settle_all(Duration::from_millis(30)).await,
            Err(Errno::EIO)
        );
        let u2 = u.clone();
        let t = tokio::spawn(async move { u2.settle_all(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // A later change does not hold back a wait that began before it.
        u.sent(2, &req(7));
        assert!(!u.settled(1, None));
        assert_eq!(t.await.expect("join"), Ok(()));
        assert!(!u.replayed(2, &Ok(Reply::None)));
        assert!(u.is_empty());
    }

    #[tokio::test]
    async fn a_replay_answered_otherwise_is_a_failure() {
        let u = Unsettled::default();
        u.sent(3, &req(9));
        u.answered(3, &Ok(Reply::None));
        assert!(u.replayed(3, &Err(Errno::ENOENT)));
        assert_eq!(u.take_any_failure(), Some(Errno::ENOENT));
        assert_eq!(u.take_any_failure(), None);
    }
}
