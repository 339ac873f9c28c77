//! The view behind `/api/inflight` and `pumpwatch inflight`: per node its state, in
//! flight, oldest start and last sign of life, then the transfers oldest first with their
//! age, filtered by node and minimum age and cut at a limit (a million transfers do not
//! belong in one HTTP answer; `matched` says how many there were).

use super::machine::{FAILED, STUCK, Watchdog, ms, stamp, started_ms};
use super::{Counts, Gauges};
use crate::core::report::Format;
use crate::core::stamp::Stamp;
use jiff::Timestamp;
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Only this host.
    pub node: Option<String>,
    /// Only transfers at least this old.
    pub older_than: Option<Duration>,
    /// Transfers listed at most.
    pub limit: usize,
}

impl Default for Query {
    fn default() -> Self {
        Query {
            node: None,
            older_than: None,
            limit: 1000,
        }
    }
}

/// A node's state, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Silent for `node_timeout` while holding transfers; not heard from since.
    Failed,
    /// Holds transfers open longer than `stuck_after`.
    Stuck,
    /// Reported again after a failure: still holds stale transfers, or recovered less than
    /// `node_timeout` ago.
    Recovered,
    Ok,
}

impl NodeState {
    pub fn name(self) -> &'static str {
        match self {
            NodeState::Failed => "failed",
            NodeState::Stuck => "stuck",
            NodeState::Recovered => "recovered",
            NodeState::Ok => "ok",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransferState {
    Open,
    Stuck,
    /// Listed in a failure of its node; closes when its final arrives.
    FailedOver,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeView {
    pub host: String,
    pub state: NodeState,
    pub in_flight: u64,
    pub stuck: u64,
    /// Failed-over transfers still open.
    pub stale: u64,
    pub oldest: Option<Stamp>,
    pub oldest_age_s: Option<i64>,
    pub last_seen: Stamp,
    pub silent_s: i64,
    pub failed_at: Option<Stamp>,
    pub recovered_at: Option<Stamp>,
    pub counts: Counts,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransferView {
    pub id: u64,
    pub host: String,
    pub client: String,
    pub state: TransferState,
    #[serde(rename = "relPath")]
    pub rel_path: String,
    #[serde(rename = "baseUrl")]
    pub base_url: String,
    #[serde(rename = "pubTime")]
    pub pub_time: Option<Stamp>,
    pub started: Stamp,
    pub age_s: i64,
    pub format: Format,
    pub size: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    pub at: Stamp,
    pub gauges: Gauges,
    pub totals: Counts,
    /// Sorted by host.
    pub nodes: Vec<NodeView>,
    /// Oldest first.
    pub transfers: Vec<TransferView>,
    /// Transfers that passed the filters (more than listed when `truncated`).
    pub matched: u64,
    pub truncated: bool,
}

impl Watchdog {
    /// The state at `now` as `q` asks for it. Walks every open transfer once.
    pub fn snapshot(&self, q: &Query, now: Timestamp) -> Snapshot {
        let now_ms = now.as_millisecond();
        let wanted = match &q.node {
            Some(h) => match self.find_node(h) {
                Some(id) => Some(id),
                None => {
                    return Snapshot {
                        at: stamp(now_ms),
                        gauges: self.gauges(),
                        totals: self.totals,
                        nodes: Vec::new(),
                        transfers: Vec::new(),
                        matched: 0,
                        truncated: false,
                    };
                }
            },
            None => None,
        };
        let min_age = q.older_than.map_or(i64::MIN, ms);
        let mut oldest: HashMap<u32, i64> = HashMap::new();
        let mut transfers = Vec::new();
        let mut matched = 0u64;
        for (s, t) in self.chain() {
            let node = self.node_of(t);
            if wanted.is_some_and(|n| n != node) {
                continue;
            }
            let started = started_ms(t.started);
            let e = oldest.entry(node).or_insert(started);
            *e = (*e).min(started);
            if now_ms.saturating_sub(started) < min_age {
                continue;
            }
            matched += 1;
            if transfers.len() < q.limit {
                let r = self.row(s);
                transfers.push(TransferView {
                    id: r.id,
                    host: r.host,
                    client: r.client,
                    state: if t.flags & FAILED != 0 {
                        TransferState::FailedOver
                    } else if t.flags & STUCK != 0 {
                        TransferState::Stuck
                    } else {
                        TransferState::Open
                    },
                    rel_path: r.rel_path,
                    base_url: r.base_url,
                    pub_time: r.pub_time,
                    started: r.started,
                    age_s: now_ms.saturating_sub(started) / 1000,
                    format: r.format,
                    size: r.size,
                });
            }
        }
        let timeout = ms(self.settings.node_timeout);
        let mut nodes: Vec<NodeView> = self
            .nodes
            .iter()
            .filter(|(id, _)| wanted.is_none_or(|w| w == *id))
            .map(|(id, n)| {
                let stale = n.in_flight.saturating_sub(n.live);
                let state = if n.failed_at.is_some() {
                    NodeState::Failed
                } else if n.stuck > 0 {
                    NodeState::Stuck
                } else if stale > 0
                    || n.recovered_at
                        .is_some_and(|r| now_ms.saturating_sub(r) < timeout)
                {
                    NodeState::Recovered
                } else {
                    NodeState::Ok
                };
                let old = oldest.get(&id).copied();
                NodeView {
                    host: n.name.to_string(),
                    state,
                    in_flight: n.in_flight,
                    stuck: n.stuck,
                    stale,
                    oldest: old.map(stamp),
                    oldest_age_s: old.map(|o| now_ms.saturating_sub(o) / 1000),
                    last_seen: stamp(n.last_seen),
                    silent_s: now_ms.saturating_sub(n.last_seen) / 1000,
                    failed_at: n.failed_at.map(stamp),
                    recovered_at: n.recovered_at.map(stamp),
                    counts: n.counts,
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.host.cmp(&b.host));
        Snapshot {
            at: stamp(now_ms),
            gauges: self.gauges(),
            totals: self.totals,
            nodes,
            truncated: matched > transfers.len() as u64,
            transfers,
            matched,
        }
    }
}
