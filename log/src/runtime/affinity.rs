//! Leader affinity: one node leads every shard of a healthy cluster.
//!
//! A mount talks to one metadata node. Changes to a shard that node leads
//! are ordered and answered there (early answers, D30); changes to a shard
//! another node leads are forwarded and wait for their commit, and a
//! transaction spanning shards led by different nodes crosses the network
//! for every step. Elections place leaders independently per shard (a busy
//! machine's late heartbeat moves one shard and not the others), so this
//! task brings them back together: the node that leads the most shards
//! (ties: the highest id, the one OmniPaxos' initial ballots favour) takes
//! the lead of the others, one ballot round each (D34).

use std::time::Duration;

use omnipaxos::util::NodeId;

use crate::shard::ShardId;
use crate::wire::ShardStatus;

/// How often a node compares leaders. A move costs one election round
/// (a few ms) and fences the metadata leases of the shard moved.
pub const LEADER_AFFINITY_EVERY: Duration = Duration::from_secs(3);

/// How long a starting node reports split leadership as a problem
/// (`LogNode::problems`): two rounds of [`LEADER_AFFINITY_EVERY`] and their
/// elections.
pub const LEADERS_SETTLE_MAX: Duration = Duration::from_secs(10);

/// Whether one node leads every shard in `status`.
pub fn led_by_one(status: &[ShardStatus]) -> bool {
    let first = status.first().and_then(|s| s.leader);
    first.is_some() && status.iter().all(|s| s.leader == first)
}

/// Shards node `me` should campaign for: those it does not lead, when it is
/// the node leading the most shards (ties to the highest id) and every
/// shard has a leader (no election under way). Empty otherwise.
pub fn campaign_for(me: NodeId, status: &[ShardStatus]) -> Vec<ShardId> {
    let mut counts: Vec<(NodeId, usize)> = Vec::new();
    for s in status {
        let Some(l) = s.leader else {
            return Vec::new();
        };
        match counts.iter_mut().find(|(n, _)| *n == l) {
            Some((_, c)) => *c += 1,
            None => counts.push((l, 1)),
        }
    }
    let preferred = counts.iter().max_by_key(|(n, c)| (*c, *n)).map(|(n, _)| *n);
    if preferred != Some(me) {
        return Vec::new();
    }
    status
        .iter()
        .filter(|s| s.leader != Some(me))
        .map(|s| s.shard)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::Position;

    fn st(shard: u32, leader: Option<NodeId>) -> ShardStatus {
        ShardStatus {
            shard: ShardId(shard),
            leader,
            is_leader: false,
            decided: Position::ZERO,
            trimmed: Position::ZERO,
            config_id: 1,
            ballot: 1,
            term_start: None,
        }
    }

    #[test]
    fn the_node_leading_most_shards_takes_the_rest() {
        let s = [st(0, Some(2)), st(1, Some(2)), st(2, Some(1))];
        assert_eq!(campaign_for(2, &s), vec![ShardId(2)]);
        assert!(campaign_for(1, &s).is_empty());
        assert!(campaign_for(3, &s).is_empty());
    }

    #[test]
    fn a_tie_goes_to_the_highest_id() {
        let s = [st(0, Some(1)), st(1, Some(3))];
        assert_eq!(campaign_for(3, &s), vec![ShardId(0)]);
        assert!(campaign_for(1, &s).is_empty());
    }

    #[test]
    fn nothing_moves_during_an_election_or_when_together() {
        let electing = [st(0, Some(3)), st(1, None)];
        assert!(campaign_for(3, &electing).is_empty());
        let together = [st(0, Some(3)), st(1, Some(3))];
        assert!(campaign_for(3, &together).is_empty());
        assert!(led_by_one(&together));
        assert!(!led_by_one(&electing));
        assert!(!led_by_one(&[st(0, Some(3)), st(1, Some(2))]));
    }
}
