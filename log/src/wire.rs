//! Messages between nodes, and between clients and nodes, as carried in
//! frames (`frame`) with bincode bodies.
//!
//! A connection starts with [`Wire::Hello`]; the acceptor answers
//! [`Wire::Welcome`] or [`Wire::Refused`] (and closes). Until the handshake
//! completes, frames are limited to [`HELLO_FRAME_BYTES_MAX`], so an
//! unauthenticated peer cannot make a node allocate much.

use omnipaxos::messages::Message;
use omnipaxos::util::NodeId;
use serde::{Deserialize, Serialize};

use crate::entry::Entry;
use crate::shard::{Position, ShardId};

/// Protocol version; a peer speaking another is refused.
pub const PROTOCOL_VERSION: u32 = 3;
/// Largest frame before the handshake completes.
pub const HELLO_FRAME_BYTES_MAX: usize = 64 << 10;
/// Largest frame after it. OmniPaxos sends a lagging follower its whole
/// missing suffix in one message; trimming bounds that suffix, and this
/// bounds memory per connection.
pub const FRAME_BYTES_MAX: usize = 256 << 20;
/// Most proposals a client puts in one [`Wire::ProposeBatch`] frame (and
/// a node hands its shard thread in one input).
pub const PROPOSE_BATCH_MAX: usize = 1024;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A replica: sends OmniPaxos traffic.
    Peer,
    /// A client of the log API.
    Client,
}

/// Why a proposal or read did not complete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum LogError {
    #[error("not the leader of shard {shard}; leader is {leader:?} at {addr:?}")]
    NotLeader {
        shard: ShardId,
        leader: Option<NodeId>,
        addr: Option<String>,
    },
    #[error("no leader for shard {0} right now (election in progress)")]
    NoLeader(ShardId),
    #[error("unknown shard {0}")]
    UnknownShard(ShardId),
    #[error("timed out; the outcome is unknown (the entry may still be decided)")]
    Timeout,
    #[error("entry rejected: {0}")]
    Invalid(String),
    #[error("positions below {0} were trimmed")]
    Trimmed(Position),
    #[error("too many reads pending on shard {0}")]
    Busy(ShardId),
    #[error("node is shutting down")]
    ShuttingDown,
    #[error("connection failed: {0}")]
    Connection(String),
    /// The node's log disk is below its free-space headroom: it takes no
    /// new proposals (ENOSPC) until space comes back.
    #[error("no space for the log: {0}")]
    NoSpace(String),
}

/// Status of one shard on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStatus {
    pub shard: ShardId,
    pub leader: Option<NodeId>,
    pub is_leader: bool,
    /// One past the last decided position.
    pub decided: Position,
    /// First position this replica still holds (below it: trimmed).
    #[serde(default)]
    pub trimmed: Position,
    pub config_id: u32,
    /// Round of the ballot this replica promised (a new leadership term
    /// has a higher one).
    pub ballot: u32,
    /// While this replica leads: where its term begins (the barrier it
    /// appended first, `ShardCore::term_start`).
    pub term_start: Option<Position>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Wire {
    Hello {
        protocol: u32,
        cluster_id: String,
        role: Role,
        /// For peers, the sender's node id; for clients, 0.
        node_id: NodeId,
        /// Random per process start: tells a restart from an impostor.
        incarnation: u64,
    },
    Welcome {
        node_id: NodeId,
    },
    Refused {
        reason: String,
    },
    /// OmniPaxos traffic of one shard.
    Paxos {
        shard: ShardId,
        config_id: u32,
        msg: Message<Entry>,
    },
    /// Proposals a follower forwards to the leader it knows.
    Forward {
        shard: ShardId,
        entries: Vec<Entry>,
    },
    /// A replica's trim floor: every local subscriber of `shard` has
    /// persisted everything below `floor`. The leader trims below the
    /// minimum over all replicas.
    Persisted {
        shard: ShardId,
        floor: Position,
    },
    /// A read-index confirmation round (see `read_index`).
    ReadIndex {
        shard: ShardId,
        config_id: u32,
        msg: crate::read_index::ReadMsg,
    },
    /// A follower's linearizable read, sent to the leader it knows.
    ReadForward {
        shard: ShardId,
        seq: u64,
    },
    /// The leader's answer to a `ReadForward`.
    ReadDone {
        shard: ShardId,
        seq: u64,
        result: Result<crate::runtime::ReadPoint, LogError>,
    },
    /// Client requests; `id` matches replies to requests on one connection.
    Propose {
        id: u64,
        shard: ShardId,
        entry: Entry,
    },
    /// Several proposals to one shard in one frame: what a client had
    /// queued on its connection when it wrote (at most
    /// [`PROPOSE_BATCH_MAX`]). Each is answered on its own (`Decided`).
    ProposeBatch {
        shard: ShardId,
        proposals: Vec<(u64, Entry)>,
    },
    ReadBarrier {
        id: u64,
        shard: ShardId,
    },
    Status {
        id: u64,
    },
    /// Stream decided entries from `from` on.
    Subscribe {
        id: u64,
        shard: ShardId,
        from: Position,
    },
    /// Reply to `Propose` / `ReadBarrier`: the decided position.
    Decided {
        id: u64,
        result: Result<Position, LogError>,
    },
    StatusReply {
        id: u64,
        node_id: NodeId,
        shards: Vec<ShardStatus>,
    },
    Entries {
        id: u64,
        result: Result<Vec<(Position, Entry)>, LogError>,
    },
}

impl Wire {
    /// Serializes into one frame appended to `out`.
    pub fn encode_frame(&self, out: &mut Vec<u8>) {
        crate::frame::encode_with(out, |o| bincode::serialize_into(o, self))
            .expect("wire messages serialize");
    }

    pub fn decode(body: &[u8]) -> Result<Wire, String> {
        crate::frame::decode_body(body, FRAME_BYTES_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut rng = 7u64;
        for len in 0..512 {
            let body: Vec<u8> = (0..len)
                .map(|_| {
                    rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (rng >> 33) as u8
                })
                .collect();
            let _ = Wire::decode(&body);
        }
    }

    #[test]
    fn roundtrip() {
        let w = Wire::Propose {
            id: 3,
            shard: ShardId(1),
            entry: Entry::barrier(),
        };
        let mut f = Vec::new();
        w.encode_frame(&mut f);
        let (body, _) = crate::frame::decode(&f, FRAME_BYTES_MAX).unwrap().unwrap();
        assert!(matches!(
            Wire::decode(body).unwrap(),
            Wire::Propose {
                id: 3,
                shard: ShardId(1),
                ..
            }
        ));
    }
}
