//! What the daemon stores and how the state comes back. The core keeps a journal of what
//! changed since the last [`Watchdog::take_changes`]: transfers opened or changed (as full
//! rows), ids of stored transfers that ended, nodes changed, nodes forgotten, and the
//! totals. A transfer opened and closed between two flushes never reaches the store.
//!
//! A transfer's id is (generation << 32 | slot): unique for the life of the store, and it
//! lets [`Watchdog::restore`] put each row back in its slot without a lookup table.

use super::blob;
use super::index::MAX_SLOTS;
use super::machine::{
    FAILED, NewTransfer, OriginRef, PERSISTED, STUCK, USED, Watchdog, pub_ms_of, stamp, started_of,
};
use super::{Counts, MAX_FIELD, MAX_IDENTITY, MAX_NAME, Settings};
use crate::core::report::{Format, Identity};
use crate::core::stamp::Stamp;
use jiff::Timestamp;

/// One open transfer as stored, with everything a repost needs. Store `format` with
/// [`Format::name`] and read it back with [`super::format_from_name`].
#[derive(Debug, Clone, PartialEq)]
pub struct TransferRow {
    pub id: u64,
    pub host: String,
    pub client: String,
    /// The format of its 102 report (the repost uses the same family).
    pub format: Format,
    /// When the watchdog saw the 102 (whole seconds).
    pub started: Stamp,
    /// The product's pubTime (milliseconds, as the wire formats carry it).
    pub pub_time: Option<Stamp>,
    pub base_url: String,
    pub rel_path: String,
    pub identity: Option<Identity>,
    pub size: Option<u64>,
    pub source: Option<String>,
    pub from_cluster: Option<String>,
    pub to_clusters: Vec<String>,
    pub flow: Option<String>,
    /// Listed in a failure already (stale: closes when its final arrives).
    pub failed_over: bool,
    pub stuck: bool,
}

impl Default for TransferRow {
    fn default() -> Self {
        TransferRow {
            id: 0,
            host: String::new(),
            client: String::new(),
            format: Format::V02,
            started: stamp(0),
            pub_time: None,
            base_url: String::new(),
            rel_path: String::new(),
            identity: None,
            size: None,
            source: None,
            from_cluster: None,
            to_clusters: Vec::new(),
            flow: None,
            failed_over: false,
            stuck: false,
        }
    }
}

/// One node as stored (its in-flight numbers are recomputed from the transfers).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    pub host: String,
    pub last_seen: Stamp,
    pub failed_at: Option<Stamp>,
    pub recovered_at: Option<Stamp>,
    pub counts: Counts,
}

/// What to write since the last flush. Apply in one transaction: first delete
/// `removed` transfers and `removed_nodes`, then upsert `transfers` and `nodes` (a host
/// forgotten and seen again appears in both), then store `totals`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    pub transfers: Vec<TransferRow>,
    pub removed: Vec<u64>,
    pub nodes: Vec<NodeRow>,
    pub removed_nodes: Vec<String>,
    pub totals: Counts,
    /// More transfers are waiting (the limit was reached): flush again soon.
    pub more: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.transfers.is_empty()
            && self.removed.is_empty()
            && self.nodes.is_empty()
            && self.removed_nodes.is_empty()
    }
}

/// What [`Watchdog::restore`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreReport {
    pub nodes: u64,
    pub transfers: u64,
    /// Rows refused (duplicate host, fields over the limits, no room): their ids are in the
    /// first [`Changes::removed`], so the store forgets them.
    pub rejected: u64,
    /// Rows whose id could not be kept (slot taken or out of range): stored again under a
    /// new id by the first flush.
    pub renumbered: u64,
    /// Evicted to fit `max_inflight`/`max_bytes`.
    pub evicted: u64,
    /// `opened` adjusted so that opened = in flight + closed + evicted + expired (rows
    /// lost between flushes).
    pub reconciled: u64,
}

fn row_fits(r: &TransferRow) -> bool {
    let name = |s: &str| !s.is_empty() && s.len() <= MAX_NAME;
    name(&r.host)
        && name(&r.client)
        && r.rel_path.len() <= MAX_FIELD
        && r.identity
            .as_ref()
            .is_none_or(|i| i.value.len() <= MAX_IDENTITY && i.method.len() <= MAX_NAME)
}

impl Watchdog {
    /// The changes since the last call, at most `limit` transfer rows (the rest stay
    /// queued; `more` says so). Call after publishing the events of a tick and before
    /// acking, so that what was announced is stored as announced.
    pub fn take_changes(&mut self, limit: usize) -> Changes {
        let mut transfers = Vec::new();
        let mut taken = 0;
        while taken < self.dirty.len() && transfers.len() < limit {
            let s = self.dirty[taken];
            taken += 1;
            let Some(t) = self.slots.get_mut(s as usize) else {
                continue;
            };
            if t.flags & USED == 0 || t.flags & super::machine::DIRTY == 0 {
                continue;
            }
            t.flags = (t.flags & !super::machine::DIRTY) | PERSISTED;
            transfers.push(self.row(s));
        }
        self.dirty.drain(..taken);
        let mut nodes = Vec::new();
        for id in std::mem::take(&mut self.dirty_nodes) {
            let Some(n) = self.nodes.get_mut(id) else {
                continue;
            };
            if !n.dirty {
                continue;
            }
            n.dirty = false;
            n.persisted = true;
            nodes.push(NodeRow {
                host: n.name.to_string(),
                last_seen: stamp(n.last_seen),
                failed_at: n.failed_at.map(stamp),
                recovered_at: n.recovered_at.map(stamp),
                counts: n.counts,
            });
        }
        Changes {
            transfers,
            removed: std::mem::take(&mut self.removed),
            nodes,
            removed_nodes: std::mem::take(&mut self.removed_nodes),
            totals: self.totals,
            more: !self.dirty.is_empty(),
        }
    }

    /// Rebuilds the state from stored rows. Give the transfers oldest first (`ORDER BY
    /// started`), so eviction and the stuck scan keep their order. Bad rows are refused,
    /// never a panic. No node is declared failed before `now + node_timeout`: the
    /// reports queued while the watchdog was down must be read first.
    pub fn restore(
        settings: Settings,
        now: Timestamp,
        totals: Counts,
        nodes: impl IntoIterator<Item = NodeRow>,
        transfers: impl IntoIterator<Item = TransferRow>,
    ) -> (Watchdog, RestoreReport) {
        let mut w = Watchdog::new(settings);
        let mut rep = RestoreReport::default();
        w.totals = totals;
        for row in nodes {
            let ok = !row.host.is_empty() && row.host.len() <= MAX_NAME;
            if !ok || w.find_node(&row.host).is_some() {
                rep.rejected += 1;
                continue;
            }
            let Some(id) = w.node_for(&row.host, row.last_seen.0.as_millisecond()) else {
                rep.rejected += 1;
                continue;
            };
            if let Some(n) = w.nodes.get_mut(id) {
                n.failed_at = row.failed_at.map(|t| t.0.as_millisecond());
                n.recovered_at = row.recovered_at.map(|t| t.0.as_millisecond());
                n.counts = row.counts;
                n.persisted = true;
                n.dirty = false;
            }
            rep.nodes += 1;
        }
        w.dirty_nodes.clear();
        let max_slot = w.settings.max_inflight.clamp(1, MAX_SLOTS - 1) as u32;
        let mut later = Vec::new();
        for row in transfers {
            if let Some(row) = w.restore_row(row, max_slot, true, &mut rep) {
                later.push(row);
            }
        }
        // Free slots: every hole, lowest first out. Rows that could not keep their slot
        // come last, in fresh slots.
        w.free = (0..w.slots.len() as u32)
            .rev()
            .filter(|&s| w.slots[s as usize].flags & USED == 0)
            .collect();
        for row in later {
            w.restore_row(row, max_slot, false, &mut rep);
        }
        rep.evicted = w.totals.evicted.saturating_sub(totals.evicted);
        rep.reconciled = w.reconcile();
        w.frontier = w.head;
        w.grace_until = now
            .as_millisecond()
            .saturating_add(super::machine::ms(w.settings.node_timeout));
        (w, rep)
    }

    /// Puts a stored row back. With `keep_id`, a row whose slot is taken or out of range
    /// is handed back to be placed later under a new id.
    fn restore_row(
        &mut self,
        row: TransferRow,
        max_slot: u32,
        keep_id: bool,
        rep: &mut RestoreReport,
    ) -> Option<TransferRow> {
        let (slot, generation) = (row.id as u32, (row.id >> 32) as u32);
        let place = if keep_id {
            let free = slot < max_slot
                && self
                    .slots
                    .get(slot as usize)
                    .is_none_or(|t| t.flags & USED == 0);
            if !free {
                return Some(row);
            }
            Some((slot, generation))
        } else {
            None
        };
        let started_ms = row.started.0.as_millisecond();
        let (dir, tail) = super::machine::split_rel(&row.rel_path);
        let origin = OriginRef {
            base_url: &row.base_url,
            dir,
            source: row.source.as_deref(),
            from_cluster: row.from_cluster.as_deref(),
            to_clusters: &row.to_clusters,
            flow: row.flow.as_deref(),
        };
        let node = if row_fits(&row) && origin.fits() {
            match self.find_node(&row.host) {
                Some(n) => Some(n),
                None => self.node_for(&row.host, started_ms),
            }
        } else {
            None
        };
        // A row whose id another row kept (a duplicate id) must not delete it.
        let held = !keep_id
            && self
                .slots
                .get(slot as usize)
                .is_some_and(|t| t.flags & USED != 0 && t.generation == generation);
        let Some(node) = node else {
            rep.rejected += 1;
            if !held {
                self.removed.push(row.id);
            }
            return None;
        };
        let mut flags = if keep_id { PERSISTED } else { 0 };
        if !keep_id {
            rep.renumbered += 1;
            if !held {
                self.removed.push(row.id);
            }
        }
        if row.failed_over {
            flags |= FAILED;
        } else if row.stuck {
            flags |= STUCK;
        }
        let format = super::machine::FORMATS
            .iter()
            .position(|f| *f == row.format)
            .unwrap_or(1) as u8;
        let mut scratch = Vec::new();
        blob::encode(&mut scratch, tail, row.identity.as_ref(), row.size);
        self.open(NewTransfer {
            node,
            client: &row.client,
            origin,
            blob: &scratch,
            pub_ms: pub_ms_of(row.pub_time),
            format,
            started: started_of(started_ms),
            flags,
            place,
        });
        rep.transfers += 1;
        None
    }

    /// Makes opened = in flight + closed + evicted + expired, per node and in total;
    /// returns by how much the totals moved.
    fn reconcile(&mut self) -> u64 {
        let ids: Vec<u32> = self.nodes.iter().map(|(id, _)| id).collect();
        for id in ids {
            if let Some(n) = self.nodes.get_mut(id) {
                let c = &mut n.counts;
                let want = n.in_flight + c.closed + c.evicted + c.expired;
                if c.opened != want {
                    c.opened = want;
                    self.touch_node(id);
                }
            }
        }
        let c = &mut self.totals;
        let want = self.len as u64 + c.closed + c.evicted + c.expired;
        let moved = c.opened.abs_diff(want);
        c.opened = want;
        moved
    }
}
