//! The membership view and the pure state machine that maintains it.
//!
//! The state machine is fed liveliness Puts/Deletes, node infos and reconciliation results by
//! a single task (see `cluster.rs`), so it needs no locking and can be unit-tested without zenoh.
//!
//! Rules (per node id):
//! * Put with a higher incarnation than known (or an unknown id): the node is alive with that
//!   incarnation (`Left` for the old incarnation if it was still alive, then `Joined`).
//! * Put with the same incarnation while not alive: alive again (`Joined`). This is the
//!   Put -> Delete -> Put flapping zenoh produces when a link drops and comes back.
//! * Put with the same incarnation while alive, or a lower incarnation: ignored.
//! * Delete for the current incarnation while alive: not alive (`Left`); the entry is kept, so
//!   callers can report "node X lost". Deletes for other incarnations are ignored.
//! * This node's own entry is always alive; tokens that claim our id with another incarnation
//!   are ignored (and reported: two processes share a node id).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use crate::{NodeIdentity, NodeInfo};

/// All nodes ever seen, keyed by node id, this node included.
pub type Membership = BTreeMap<String, Member>;

/// What is known about one node.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// Node id.
    pub id: String,
    /// Latest incarnation seen for this node.
    pub incarnation: u64,
    /// Whether that incarnation's liveliness token is currently present.
    pub alive: bool,
    /// When `alive` (or `incarnation`) last changed.
    pub since: Instant,
    /// Latest info published by this incarnation, if any arrived yet.
    pub info: Option<NodeInfo>,
}

/// A membership change, as seen by this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// The node's incarnation became alive (first seen, restarted, or reconnected).
    Joined {
        /// Node id.
        id: String,
        /// Its incarnation.
        incarnation: u64,
    },
    /// The node's incarnation is gone (left, crashed, lease expired, or link lost).
    Left {
        /// Node id.
        id: String,
        /// Its incarnation.
        incarnation: u64,
    },
}

/// What the state machine wants done after handling an input.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Events to broadcast, in order.
    pub events: Vec<MemberEvent>,
    /// A node id is claimed by another process (different incarnation of our own id).
    pub id_conflict: Option<u64>,
}

pub(crate) struct MembershipState {
    me: NodeIdentity,
    members: Membership,
    /// Newest info per id; may be ahead of the liveliness token of that incarnation.
    infos: HashMap<String, NodeInfo>,
    /// Sequence number of the last liveliness change per id (see [`Self::reconcile`]).
    changed_at: HashMap<String, u64>,
    /// Counts liveliness inputs handled so far.
    seq: u64,
}

impl MembershipState {
    pub fn new(me: NodeIdentity) -> Self {
        let mut members = Membership::new();
        members.insert(
            me.id.clone(),
            Member {
                id: me.id.clone(),
                incarnation: me.incarnation,
                alive: true,
                since: Instant::now(),
                info: None,
            },
        );
        MembershipState {
            me,
            members,
            infos: HashMap::new(),
            changed_at: HashMap::new(),
            seq: 0,
        }
    }

    pub fn me(&self) -> &NodeIdentity {
        &self.me
    }

    pub fn members(&self) -> &Membership {
        &self.members
    }

    /// Sequence number of the last liveliness input; a reconciliation query started now only
    /// reflects inputs up to this number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn on_put(&mut self, id: &str, incarnation: u64) -> Outcome {
        self.seq += 1;
        self.apply_put(id, incarnation)
    }

    pub fn on_delete(&mut self, id: &str, incarnation: u64) -> Outcome {
        self.seq += 1;
        let mut out = Outcome::default();
        if id == self.me.id {
            return out;
        }
        if let Some(m) = self.members.get_mut(id) {
            if m.incarnation == incarnation && m.alive {
                m.alive = false;
                m.since = Instant::now();
                self.changed_at.insert(id.to_owned(), self.seq);
                out.events.push(MemberEvent::Left {
                    id: id.to_owned(),
                    incarnation,
                });
            }
        }
        out
    }

    /// Merges the tokens returned by a liveliness query started when [`Self::seq`] was
    /// `started`. A node whose liveliness changed after that point is skipped: the query may
    /// have been answered before that change, so its answer is older than what we know.
    pub fn reconcile(&mut self, started: u64, tokens: &[(String, u64)]) -> Outcome {
        let mut out = Outcome::default();
        for (id, incarnation) in tokens {
            if self.changed_at.get(id).is_some_and(|&at| at > started) {
                continue;
            }
            let o = self.apply_put(id, *incarnation);
            out.events.extend(o.events);
            out.id_conflict = out.id_conflict.or(o.id_conflict);
        }
        out
    }

    /// Stores `info`; returns true if a member's visible info changed.
    pub fn on_info(&mut self, info: NodeInfo) -> bool {
        if self
            .infos
            .get(&info.id)
            .is_some_and(|old| old.incarnation > info.incarnation)
        {
            return false;
        }
        let mut changed = false;
        if let Some(m) = self.members.get_mut(&info.id) {
            if m.incarnation == info.incarnation && m.info.as_ref() != Some(&info) {
                m.info = Some(info.clone());
                changed = true;
            }
        }
        self.infos.insert(info.id.clone(), info);
        changed
    }

    fn apply_put(&mut self, id: &str, incarnation: u64) -> Outcome {
        let mut out = Outcome::default();
        if id == self.me.id {
            if incarnation != self.me.incarnation {
                out.id_conflict = Some(incarnation);
            }
            return out;
        }
        let info = self
            .infos
            .get(id)
            .filter(|i| i.incarnation == incarnation)
            .cloned();
        let joined = MemberEvent::Joined {
            id: id.to_owned(),
            incarnation,
        };
        match self.members.get_mut(id) {
            None => {
                self.members.insert(
                    id.to_owned(),
                    Member {
                        id: id.to_owned(),
                        incarnation,
                        alive: true,
                        since: Instant::now(),
                        info,
                    },
                );
                out.events.push(joined);
            }
            Some(m) if incarnation > m.incarnation => {
                if m.alive {
                    out.events.push(MemberEvent::Left {
                        id: id.to_owned(),
                        incarnation: m.incarnation,
                    });
                }
                m.incarnation = incarnation;
                m.alive = true;
                m.since = Instant::now();
                m.info = info;
                out.events.push(joined);
            }
            Some(m) if incarnation == m.incarnation && !m.alive => {
                m.alive = true;
                m.since = Instant::now();
                out.events.push(joined);
            }
            Some(_) => {}
        }
        if !out.events.is_empty() {
            self.changed_at.insert(id.to_owned(), self.seq);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> MembershipState {
        MembershipState::new(NodeIdentity {
            id: "me".into(),
            incarnation: 3,
        })
    }

    fn joined(id: &str, incarnation: u64) -> MemberEvent {
        MemberEvent::Joined {
            id: id.into(),
            incarnation,
        }
    }

    fn left(id: &str, incarnation: u64) -> MemberEvent {
        MemberEvent::Left {
            id: id.into(),
            incarnation,
        }
    }

    #[test]
    fn flapping_and_incarnations() {
        let mut s = state();
        assert!(s.members()["me"].alive);
        assert_eq!(s.on_put("a", 1).events, vec![joined("a", 1)]);
        assert_eq!(s.on_put("a", 1).events, vec![]);
        assert_eq!(s.on_delete("a", 1).events, vec![left("a", 1)]);
        assert!(!s.members()["a"].alive);
        assert_eq!(s.on_put("a", 1).events, vec![joined("a", 1)]);
        // restart without a Delete of the old incarnation seen first
        assert_eq!(s.on_put("a", 2).events, vec![left("a", 1), joined("a", 2)]);
        // late Delete of the old incarnation and late Put of it are ignored
        assert_eq!(s.on_delete("a", 1).events, vec![]);
        assert_eq!(s.on_put("a", 1).events, vec![]);
        assert!(s.members()["a"].alive);
        assert_eq!(s.members()["a"].incarnation, 2);
        // own id
        assert_eq!(s.on_delete("me", 3).events, vec![]);
        assert_eq!(s.on_put("me", 4).id_conflict, Some(4));
        assert_eq!(s.members()["me"].incarnation, 3);
    }

    #[test]
    fn reconcile_skips_newer_changes() {
        let mut s = state();
        s.on_put("a", 1);
        let started = s.seq();
        s.on_delete("a", 1); // happened after the query started
        let out = s.reconcile(started, &[("a".into(), 1), ("b".into(), 5)]);
        assert_eq!(out.events, vec![joined("b", 5)]);
        assert!(!s.members()["a"].alive);
        // a query started after the Delete may resurrect (the Delete was stale)
        let out = s.reconcile(s.seq(), &[("a".into(), 1)]);
        assert_eq!(out.events, vec![joined("a", 1)]);
    }

    #[test]
    fn info_follows_incarnation() {
        let mut s = state();
        let info = |inc| NodeInfo {
            id: "a".into(),
            incarnation: inc,
            api_addr: "x".into(),
            cores: 1,
            mem_total_bytes: 1,
            mem_free_bytes: 1,
            runners: 0,
            instances: Vec::new(),
        };
        assert!(!s.on_info(info(2))); // before the token
        s.on_put("a", 1);
        assert_eq!(s.members()["a"].info, None);
        s.on_put("a", 2);
        assert_eq!(s.members()["a"].info, Some(info(2)));
        assert!(!s.on_info(info(1)));
        assert_eq!(s.members()["a"].info, Some(info(2)));
    }
}
