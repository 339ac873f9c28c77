//! The watchdog (SPEC §7, §4.9): from 102 "transfer started" reports and the final
//! reports that follow, what every node (host) has in flight, since when, and which
//! products were lost when a node went silent. Pure: the daemon feeds parsed reports with
//! [`Watchdog::record`] and calls [`Watchdog::tick`] with the time; the core never reads a
//! clock, never does I/O and never panics on any report.
//!
//! What the daemon does with it:
//! - every parsed report: [`Watchdog::record`] with its client from the pump's
//!   [`Attributor`](crate::core::attribution::Attributor) (any code is a sign of life of its
//!   host);
//! - every second or so: [`Watchdog::tick`]; publish each [`Event`]: a [`Failure`] as
//!   [`Failure::messages`] on `xreport` and, with `repost`, [`announcement`] of each of its
//!   transfers on the repost exchange; a [`Recovery`] as [`Recovery::message`];
//! - after publishing and before acking: [`Watchdog::take_changes`] into SQLite in one
//!   transaction (so a failure, once announced, is stored as announced);
//! - at start: [`Watchdog::restore`] from the stored rows;
//! - `/api/inflight`: [`Watchdog::snapshot`]; `/metrics`: [`Watchdog::totals`] and
//!   [`Watchdog::gauges`].
//!
//! Keys. A transfer is (node, client, product). The node is the report's host, else its
//! client (sr3 reports name no host; an sr3 instance usually has its own account). The
//! product is matched by pubTime plus file name, or pubTime plus identity: consumers
//! rewrite relPath (sr3 writes its local path) and may rename the file, but pubTime, the
//! file name and the identity survive; pubTime is part of both so that the same file
//! announced again later is a new product.

mod arena;
mod blob;
mod index;
mod intern;
mod machine;
mod messages;
mod persist;
mod snapshot;
#[cfg(test)]
mod tests;

pub use machine::Watchdog;
pub use messages::{MAX_LISTED, announcement, format_from_name};
pub use persist::{Changes, NodeRow, RestoreReport, TransferRow};
pub use snapshot::{NodeState, NodeView, Query, Snapshot, TransferState, TransferView};

use crate::core::stamp::Stamp;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The client (and node) counted for a report that names neither.
pub const UNKNOWN: &str = "unknown";

/// Longest host or client name kept (longer ones are ignored: AMQP short strings are 255).
pub const MAX_NAME: usize = 255;
/// Longest relPath, baseUrl, source, flow or cluster list kept in a transfer.
pub const MAX_FIELD: usize = 2048;
/// Longest identity value kept (a sha512 in hex is 128).
pub const MAX_IDENTITY: usize = 512;
/// Most open transfers sharing (node, client, pubTime); beyond, the group's oldest is
/// evicted. Real producers give every announcement its own time stamp; this bounds the
/// work of a lookup when someone does not.
pub const MAX_GROUP: usize = 64;

/// The rules' parameters (`[watchdog]` in the configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// A node silent this long while holding transfers is failed.
    pub node_timeout: Duration,
    /// A transfer open this long on a living node is stuck.
    pub stuck_after: Duration,
    /// Open transfers kept at most; past it the oldest are evicted (at most 16 777 214).
    pub max_inflight: usize,
    /// Bytes the transfers may take (approximately, including interned strings); past it
    /// the oldest are evicted. Bounds memory whatever the field lengths.
    pub max_bytes: usize,
    /// A final seen this recently without its start makes that start, when it arrives,
    /// harmless (out-of-order delivery) instead of opening a transfer.
    pub reorder_window: Duration,
    /// Transfers open this long are dropped (counted as expired) — the stale ones of a node
    /// that never came back; nodes with nothing in flight silent this long are forgotten.
    pub forget_after: Duration,
    /// Nodes tracked at most; reports from new hosts past it are ignored until idle nodes
    /// are forgotten (at the next tick).
    pub max_nodes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            node_timeout: Duration::from_secs(600),
            stuck_after: Duration::from_secs(3600),
            max_inflight: 1_000_000,
            max_bytes: 256 << 20,
            reorder_window: Duration::from_secs(60),
            forget_after: Duration::from_secs(86_400),
            max_nodes: 10_000,
        }
    }
}

/// Cumulative counts, per node and in total. Always
/// `opened = in flight + closed + evicted + expired`. Deserialised with every missing
/// count 0 (the daemon stores them as JSON).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counts {
    /// 102 reports that opened a transfer.
    pub opened: u64,
    /// Transfers ended by their final report (including stale ones of a recovered node).
    pub closed: u64,
    /// Transfers dropped to stay within `max_inflight`/`max_bytes` (or `MAX_GROUP`).
    pub evicted: u64,
    /// Transfers dropped after `forget_after`.
    pub expired: u64,
    /// Transfers listed in a failure (each at most once).
    pub failed_over: u64,
    /// Transfers that became stuck.
    pub stuck: u64,
    /// Finals that matched no open transfer.
    pub orphan_finals: u64,
    /// 102 reports for a transfer already open.
    pub duplicates: u64,
    /// 102 reports arriving after their final (within `reorder_window`): not opened.
    pub late_starts: u64,
    /// Reports not tracked (see [`Ignored`]).
    pub ignored: u64,
}

/// What [`Watchdog::record`] did with a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Opened,
    Closed,
    Duplicate,
    LateStart,
    OrphanFinal,
    /// 1xx other than 102: only a sign of life.
    Progress,
    Ignored(Ignored),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// A host, client or field longer than the limits above.
    TooLong,
    /// A new host while `max_nodes` are tracked.
    NodeLimit,
}

/// What [`Watchdog::tick`] reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Failed(Failure),
    Recovered(Recovery),
    Stuck(Stuck),
}

/// A node silent for `node_timeout` while holding transfers; emitted once per failure.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub host: String,
    pub last_seen: Stamp,
    pub at: Stamp,
    /// Its open transfers not already failed over, oldest first, with what a repost needs.
    pub transfers: Vec<TransferRow>,
}

/// A failed node that reported again.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    pub host: String,
    pub failed_at: Stamp,
    pub at: Stamp,
    /// Its failed-over transfers still open: they close when their finals arrive.
    pub stale: u64,
}

/// Transfers of a node that became stuck since the last tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Stuck {
    pub host: String,
    pub count: u64,
    /// The first few of them (at most [`STUCK_SAMPLE`]), for the log.
    pub sample: Vec<TransferRow>,
}

pub const STUCK_SAMPLE: usize = 10;

/// Current sizes, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Gauges {
    pub in_flight: u64,
    pub stuck: u64,
    /// Failed-over transfers still open.
    pub stale: u64,
    pub nodes: u64,
    pub failed_nodes: u64,
    /// Approximate bytes held (what `max_bytes` limits).
    pub bytes: u64,
}
