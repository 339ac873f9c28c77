//! The state and its rules. Memory is the constraint (a million open transfers in about
//! 150 bytes each), so a transfer is a fixed 40-byte [`Slot`] in one vector plus a cell in
//! the [`Arena`] for what is its own ([`blob`]: file name, size, identity); what transfers
//! share is interned: the (node, client) pair and the origin (base URL, directory of the
//! relPath, source, clusters, flow).
//!
//! Slots are chained oldest first, so eviction, expiry and the stuck scan walk from the
//! front and touch only what they act on; failure detection walks the whole chain, but
//! only in a tick where some node fails.

use super::arena::{Arena, cell_size};
use super::blob;
use super::index::{Index, MAX_SLOTS};
use super::intern::{FpMap, Interner};
use super::persist::TransferRow;
use super::{
    Counts, Event, Failure, Gauges, Ignored, MAX_FIELD, MAX_GROUP, MAX_IDENTITY, MAX_NAME, Outcome,
    Recovery, STUCK_SAMPLE, Settings, Stuck, UNKNOWN,
};
use crate::core::report::{Format, Identity, Report};
use crate::core::stamp::Stamp;
use jiff::Timestamp;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::time::Duration;

pub(super) const NIL: u32 = u32::MAX;
/// `pub_ms` of a report without pubTime (never a real millisecond: jiff stops at year 9999).
pub(super) const NO_PUB: i64 = i64::MIN;
/// `started` counts seconds from 2000-01-01, so it fits a u32 until 2136.
const EPOCH_S: i64 = 946_684_800;

// Slot flags.
pub(super) const USED: u8 = 1;
pub(super) const FAILED: u8 = 2;
pub(super) const STUCK: u8 = 4;
/// The row is in the store (so removing it must be written).
pub(super) const PERSISTED: u8 = 8;
/// Queued in `dirty` (changed since the last flush).
pub(super) const DIRTY: u8 = 16;

pub(super) const FORMATS: [Format; 5] = [
    Format::V01,
    Format::V02,
    Format::V02Sr3,
    Format::V03,
    Format::V03Sr2,
];

/// Bytes a transfer costs besides its blob and interned strings: its slot and its share
/// of the index (4-byte buckets at most 70 % full, half full on average).
pub(super) const FIXED: usize = std::mem::size_of::<Slot>() + 8;

/// One open transfer (or a free slot, `flags == 0`).
pub(super) struct Slot {
    /// Bumped when the slot is freed, so a transfer's id (gen, slot) is never reused.
    pub(super) generation: u32,
    /// Seconds since [`EPOCH_S`].
    pub(super) started: u32,
    pub(super) pub_ms: i64,
    pub(super) prev: u32,
    pub(super) next: u32,
    /// The interned (node, client).
    pub(super) pair: u32,
    pub(super) origin: u32,
    /// The blob's cell in the arena and its length.
    pub(super) cell: u32,
    pub(super) blob_len: u16,
    pub(super) flags: u8,
    /// Index in [`FORMATS`].
    pub(super) format: u8,
}

impl Slot {
    fn empty() -> Slot {
        Slot {
            generation: 0,
            started: 0,
            pub_ms: 0,
            prev: NIL,
            next: NIL,
            pair: 0,
            origin: 0,
            cell: 0,
            blob_len: 0,
            flags: 0,
            format: 0,
        }
    }
}

/// A client on a node: what a transfer belongs to.
pub(super) struct Pair {
    pub(super) node: u32,
    pub(super) client: Box<str>,
}

/// What transfers share besides host and client: where the product is and whose it is.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Origin {
    pub(super) base_url: Box<str>,
    pub(super) dir: Box<str>,
    pub(super) source: Option<Box<str>>,
    pub(super) from_cluster: Option<Box<str>>,
    pub(super) to_clusters: Box<[Box<str>]>,
    pub(super) flow: Option<Box<str>>,
}

impl Origin {
    fn heap_bytes(&self) -> usize {
        let opt = |o: &Option<Box<str>>| o.as_ref().map_or(0, |s| s.len());
        self.base_url.len()
            + self.dir.len()
            + opt(&self.source)
            + opt(&self.from_cluster)
            + opt(&self.flow)
            + self.to_clusters.iter().map(|c| c.len() + 16).sum::<usize>()
            + std::mem::size_of::<Origin>()
    }
}

/// An origin borrowed from a report or a row, to look it up without allocating.
#[derive(Hash)]
pub(super) struct OriginRef<'a> {
    pub(super) base_url: &'a str,
    pub(super) dir: &'a str,
    pub(super) source: Option<&'a str>,
    pub(super) from_cluster: Option<&'a str>,
    pub(super) to_clusters: &'a [String],
    pub(super) flow: Option<&'a str>,
}

impl OriginRef<'_> {
    fn matches(&self, o: &Origin) -> bool {
        *self.base_url == *o.base_url
            && *self.dir == *o.dir
            && self.source == o.source.as_deref()
            && self.from_cluster == o.from_cluster.as_deref()
            && self.flow == o.flow.as_deref()
            && self.to_clusters.len() == o.to_clusters.len()
            && self
                .to_clusters
                .iter()
                .zip(o.to_clusters.iter())
                .all(|(a, b)| a.as_str() == &**b)
    }

    fn to_owned(&self) -> Origin {
        Origin {
            base_url: self.base_url.into(),
            dir: self.dir.into(),
            source: self.source.map(Into::into),
            from_cluster: self.from_cluster.map(Into::into),
            to_clusters: self.to_clusters.iter().map(|c| c.as_str().into()).collect(),
            flow: self.flow.map(Into::into),
        }
    }

    /// Whether every field is within [`MAX_FIELD`].
    pub(super) fn fits(&self) -> bool {
        let ok = |s: &str| s.len() <= MAX_FIELD;
        ok(self.base_url)
            && ok(self.dir)
            && self.source.is_none_or(ok)
            && self.from_cluster.is_none_or(ok)
            && self.flow.is_none_or(ok)
            && self.to_clusters.len() <= 64
            && self.to_clusters.iter().all(|c| ok(c))
    }
}

/// The directory part of a relPath (shared, interned) and the rest (file name and any
/// trailing `/`), so that `dir + tail` is the relPath exactly.
pub(super) fn split_rel(rel: &str) -> (&str, &str) {
    let t = rel.trim_end_matches('/');
    let cut = t.rfind('/').map_or(0, |i| i + 1);
    rel.split_at(cut)
}

pub(super) struct Node {
    pub(super) name: Box<str>,
    pub(super) last_seen: i64,
    pub(super) failed_at: Option<i64>,
    pub(super) recovered_at: Option<i64>,
    pub(super) in_flight: u64,
    /// In flight and not failed over.
    pub(super) live: u64,
    pub(super) stuck: u64,
    pub(super) counts: Counts,
    /// Queued in `dirty_nodes`.
    pub(super) dirty: bool,
    pub(super) persisted: bool,
}

impl Node {
    pub(super) fn new(name: &str, last_seen: i64) -> Node {
        Node {
            name: name.into(),
            last_seen,
            failed_at: None,
            recovered_at: None,
            in_flight: 0,
            live: 0,
            stuck: 0,
            counts: Counts::default(),
            dirty: false,
            persisted: false,
        }
    }
}

/// Finals seen without their start, by fingerprint, until when they excuse a late start.
struct Orphans {
    map: FpMap<i64>,
    order: VecDeque<(u64, i64)>,
}

const MAX_ORPHANS: usize = 100_000;

impl Orphans {
    fn remember(&mut self, fps: [Option<u64>; 2], until: i64) {
        for fp in fps.into_iter().flatten() {
            while self.order.len() >= MAX_ORPHANS {
                self.pop();
            }
            self.map.insert(fp, until);
            self.order.push_back((fp, until));
        }
    }

    fn pop(&mut self) {
        if let Some((fp, until)) = self.order.pop_front()
            && self.map.get(&fp) == Some(&until)
        {
            self.map.remove(&fp);
        }
    }

    /// Whether a final for these fingerprints was seen and is still within its window.
    fn take(&mut self, fps: [Option<u64>; 2], now: i64) -> bool {
        let mut hit = false;
        for fp in fps.into_iter().flatten() {
            if let Some(until) = self.map.remove(&fp) {
                hit |= until >= now;
            }
        }
        hit
    }

    fn expire(&mut self, now: i64) {
        while self.order.front().is_some_and(|&(_, until)| until < now) {
            self.pop();
        }
    }
}

pub(super) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(super) fn started_ms(s: u32) -> i64 {
    (EPOCH_S + i64::from(s)) * 1000
}

pub(super) fn started_of(ms: i64) -> u32 {
    (ms.div_euclid(1000) - EPOCH_S).clamp(0, i64::from(u32::MAX)) as u32
}

pub(super) fn stamp(ms: i64) -> Stamp {
    Stamp(Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH))
}

pub(super) fn pub_ms_of(t: Option<Stamp>) -> i64 {
    t.map_or(NO_PUB, |s| s.0.as_millisecond())
}

pub(super) fn transfer_id(generation: u32, slot: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(slot)
}

fn group_hash(h: &foldhash::quality::RandomState, t: &Slot) -> u64 {
    h.hash_one((t.pair, t.pub_ms))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Removal {
    Closed,
    Evicted,
    Expired,
}

/// A product as a report names it.
struct Key<'a> {
    node: u32,
    host: &'a str,
    client: &'a str,
    pub_ms: i64,
    name: &'a str,
    identity: Option<&'a Identity>,
}

struct Lookup {
    found: Option<u32>,
    /// Open transfers sharing (node, client, pubTime), and the oldest of them (both
    /// complete only when nothing was found).
    group: usize,
    oldest: u32,
}

/// A transfer to store: from a 102 report or from a stored row.
pub(super) struct NewTransfer<'a> {
    pub(super) node: u32,
    pub(super) client: &'a str,
    pub(super) origin: OriginRef<'a>,
    /// From [`blob::encode`].
    pub(super) blob: &'a [u8],
    pub(super) pub_ms: i64,
    pub(super) format: u8,
    pub(super) started: u32,
    /// FAILED / STUCK / PERSISTED from a stored row.
    pub(super) flags: u8,
    /// The stored (slot, generation) to keep the row's id, when free.
    pub(super) place: Option<(u32, u32)>,
}

/// The watchdog's whole state. See the module documentation for how a daemon drives it.
pub struct Watchdog {
    pub(super) settings: Settings,
    hasher: foldhash::quality::RandomState,
    pub(super) slots: Vec<Slot>,
    pub(super) free: Vec<u32>,
    /// Oldest and newest open transfer.
    pub(super) head: u32,
    pub(super) tail: u32,
    /// The next transfer the stuck scan has not passed yet.
    pub(super) frontier: u32,
    pub(super) len: usize,
    index: Index,
    pub(super) nodes: Interner<Node>,
    pub(super) pairs: Interner<Pair>,
    pub(super) origins: Interner<Origin>,
    arena: Arena,
    /// Reused to encode blobs without allocating.
    scratch: Vec<u8>,
    orphans: Orphans,
    pub(super) totals: Counts,
    /// Blob cell and interned-string bytes.
    bytes: usize,
    /// Of which blob cells (the arena's pages count instead in `memory`).
    arena_cells: usize,
    pending: Vec<Event>,
    pub(super) dirty: Vec<u32>,
    pub(super) removed: Vec<u64>,
    pub(super) dirty_nodes: Vec<u32>,
    pub(super) removed_nodes: Vec<String>,
    /// No failure is declared before this (after a restore, nodes get a fresh timeout).
    pub(super) grace_until: i64,
}

impl Watchdog {
    pub fn new(settings: Settings) -> Watchdog {
        Watchdog {
            settings,
            hasher: foldhash::quality::RandomState::default(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            frontier: NIL,
            len: 0,
            index: Index::new(),
            nodes: Interner::new(),
            pairs: Interner::new(),
            origins: Interner::new(),
            arena: Arena::default(),
            scratch: Vec::new(),
            orphans: Orphans {
                map: FpMap::default(),
                order: VecDeque::new(),
            },
            totals: Counts::default(),
            bytes: 0,
            arena_cells: 0,
            pending: Vec::new(),
            dirty: Vec::new(),
            removed: Vec::new(),
            dirty_nodes: Vec::new(),
            removed_nodes: Vec::new(),
            grace_until: i64::MIN,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Open transfers (stale ones of failed or recovered nodes included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn totals(&self) -> Counts {
        self.totals
    }

    pub fn gauges(&self) -> Gauges {
        let mut g = Gauges {
            in_flight: self.len as u64,
            bytes: self.memory() as u64,
            ..Gauges::default()
        };
        for (_, n) in self.nodes.iter() {
            g.nodes += 1;
            g.stuck += n.stuck;
            g.stale += n.in_flight.saturating_sub(n.live);
            g.failed_nodes += u64::from(n.failed_at.is_some());
        }
        g
    }

    /// The node a transfer belongs to.
    pub(super) fn node_of(&self, t: &Slot) -> u32 {
        self.pairs.get(t.pair).map_or(NIL, |p| p.node)
    }

    pub(super) fn blob_of(&self, t: &Slot) -> &[u8] {
        self.arena.get(t.blob_len, t.cell)
    }

    fn find_pair(&self, node: u32, client: &str) -> Option<u32> {
        self.pairs.find(self.hasher.hash_one((node, client)), |p| {
            p.node == node && &*p.client == client
        })
    }

    /// Approximate bytes held: what `max_bytes` limits.
    fn cost(&self) -> usize {
        self.bytes + self.len * FIXED
    }

    /// Approximate bytes held including spare capacity.
    pub(super) fn memory(&self) -> usize {
        self.bytes.saturating_sub(self.arena_cells)
            + self.arena.heap_bytes()
            + self.slots.capacity() * std::mem::size_of::<Slot>()
            + self.index.heap_bytes()
            + self.free.capacity() * 4
    }

    /// Takes one report seen at `now`, from `client` as the pump's
    /// [`Attributor::client`](crate::core::attribution::Attributor::client) tells it. Any
    /// code is a sign of life of the report's host; 102 opens a transfer, a final (>= 200)
    /// closes one.
    pub fn record(&mut self, r: &Report, client: Option<&str>, now: Timestamp) -> Outcome {
        let now_ms = now.as_millisecond();
        let client = client.filter(|c| !c.is_empty()).unwrap_or(UNKNOWN);
        let host = r
            .host
            .as_deref()
            .filter(|h| !h.is_empty())
            .unwrap_or(client);
        if host.len() > MAX_NAME || client.len() > MAX_NAME {
            self.totals.ignored += 1;
            return Outcome::Ignored(Ignored::TooLong);
        }
        let Some(node) = self.node_for(host, now_ms) else {
            self.totals.ignored += 1;
            return Outcome::Ignored(Ignored::NodeLimit);
        };
        self.sign_of_life(node, now_ms);
        let key = Key {
            node,
            host,
            client,
            pub_ms: pub_ms_of(r.pub_time),
            name: r.file_name(),
            identity: r.identity.as_ref(),
        };
        match r.code {
            102 => self.start(&key, r, now_ms),
            c if c >= 200 => self.finish(&key, now_ms),
            _ => Outcome::Progress,
        }
    }

    /// Advances time: returns recoveries seen since the last tick, then newly failed
    /// nodes, then newly stuck transfers; drops what `forget_after` says to drop.
    pub fn tick(&mut self, now: Timestamp) -> Vec<Event> {
        let now_ms = now.as_millisecond();
        let mut events = std::mem::take(&mut self.pending);
        self.orphans.expire(now_ms);
        self.detect_failures(now_ms, &mut events);
        self.detect_stuck(now_ms, &mut events);
        let forget = ms(self.settings.forget_after);
        while self.head != NIL
            && started_ms(self.slots[self.head as usize].started).saturating_add(forget) <= now_ms
        {
            self.remove(self.head, Removal::Expired);
        }
        self.forget_nodes(now_ms);
        events
    }

    fn fp(&self, kind: u8, s: &str) -> u64 {
        self.hasher.hash_one((kind, s))
    }

    pub(super) fn find_node(&self, host: &str) -> Option<u32> {
        self.nodes.find(self.fp(0, host), |n| &*n.name == host)
    }

    /// The node of `host`, created if new and there is room.
    pub(super) fn node_for(&mut self, host: &str, seen: i64) -> Option<u32> {
        let fp = self.fp(0, host);
        if let Some(id) = self.nodes.find(fp, |n| &*n.name == host) {
            return Some(id);
        }
        if self.nodes.len() >= self.settings.max_nodes.max(1) {
            return None;
        }
        let (id, _) = self
            .nodes
            .acquire(fp, |n| &*n.name == host, || Node::new(host, seen));
        self.touch_node(id);
        Some(id)
    }

    pub(super) fn touch_node(&mut self, id: u32) {
        if let Some(n) = self.nodes.get_mut(id)
            && !n.dirty
        {
            n.dirty = true;
            self.dirty_nodes.push(id);
        }
    }

    fn touch_slot(&mut self, s: u32) {
        if let Some(t) = self.slots.get_mut(s as usize)
            && t.flags & DIRTY == 0
        {
            t.flags |= DIRTY;
            self.dirty.push(s);
        }
    }

    /// Adds to a node's counts and to the totals.
    fn count(&mut self, node: u32, f: impl Fn(&mut Counts)) {
        f(&mut self.totals);
        if let Some(n) = self.nodes.get_mut(node) {
            f(&mut n.counts);
        }
        self.touch_node(node);
    }

    fn sign_of_life(&mut self, node: u32, now_ms: i64) {
        let Some(n) = self.nodes.get_mut(node) else {
            return;
        };
        n.last_seen = n.last_seen.max(now_ms);
        if let Some(failed_at) = n.failed_at.take() {
            n.recovered_at = Some(now_ms);
            self.pending.push(Event::Recovered(Recovery {
                host: n.name.to_string(),
                failed_at: stamp(failed_at),
                at: stamp(now_ms),
                stale: n.in_flight.saturating_sub(n.live),
            }));
        }
        self.touch_node(node);
    }

    fn lookup(&self, k: &Key<'_>, pair: u32) -> Lookup {
        let h = self.hasher.hash_one((pair, k.pub_ms));
        let (slots, arena) = (&self.slots, &self.arena);
        let (mut group, mut oldest, mut by_identity) = (0, NIL, None);
        let by_name = self.index.find(h, |s| {
            let Some(t) = slots.get(s as usize) else {
                return false;
            };
            if t.pair != pair || t.pub_ms != k.pub_ms {
                return false;
            }
            group += 1;
            if oldest == NIL
                || slots
                    .get(oldest as usize)
                    .is_some_and(|o| t.started < o.started)
            {
                oldest = s;
            }
            let p = blob::parts(arena.get(t.blob_len, t.cell));
            if p.name() == k.name {
                return true;
            }
            if by_identity.is_none() && p.identity_is(k.identity) {
                by_identity = Some(s);
            }
            false
        });
        Lookup {
            found: by_name.or(by_identity),
            group,
            oldest,
        }
    }

    fn orphan_fps(&self, k: &Key<'_>) -> [Option<u64>; 2] {
        let by_name = self
            .hasher
            .hash_one((2u8, k.host, k.client, k.pub_ms, k.name));
        let by_identity = k.identity.map(|i| {
            self.hasher
                .hash_one((3u8, k.host, k.client, k.pub_ms, &i.method, &i.value))
        });
        [Some(by_name), by_identity]
    }

    fn start(&mut self, k: &Key<'_>, r: &Report, now_ms: i64) -> Outcome {
        let mut group = (0, NIL);
        if let Some(pair) = self.find_pair(k.node, k.client) {
            let l = self.lookup(k, pair);
            if l.found.is_some() {
                self.count(k.node, |c| c.duplicates += 1);
                return Outcome::Duplicate;
            }
            group = (l.group, l.oldest);
        }
        if !self.orphans.map.is_empty() && self.orphans.take(self.orphan_fps(k), now_ms) {
            self.count(k.node, |c| c.late_starts += 1);
            return Outcome::LateStart;
        }
        let (dir, tail) = split_rel(&r.rel_path);
        let origin = OriginRef {
            base_url: &r.base_url,
            dir,
            source: r.source.as_deref(),
            from_cluster: r.from_cluster.as_deref(),
            to_clusters: &r.to_clusters,
            flow: r.flow.as_deref(),
        };
        if !origin.fits()
            || tail.len() > MAX_FIELD
            || r.identity
                .as_ref()
                .is_some_and(|i| i.value.len() > MAX_IDENTITY || i.method.len() > MAX_NAME)
        {
            self.count(k.node, |c| c.ignored += 1);
            return Outcome::Ignored(Ignored::TooLong);
        }
        if group.0 >= MAX_GROUP && group.1 != NIL {
            self.remove(group.1, Removal::Evicted);
        }
        let format = FORMATS.iter().position(|f| *f == r.format).unwrap_or(1) as u8;
        let mut scratch = std::mem::take(&mut self.scratch);
        blob::encode(&mut scratch, tail, r.identity.as_ref(), r.size_bytes);
        self.open(NewTransfer {
            node: k.node,
            client: k.client,
            origin,
            blob: &scratch,
            pub_ms: k.pub_ms,
            format,
            started: started_of(now_ms),
            flags: 0,
            place: None,
        });
        self.scratch = scratch;
        self.count(k.node, |c| c.opened += 1);
        Outcome::Opened
    }

    fn finish(&mut self, k: &Key<'_>, now_ms: i64) -> Outcome {
        if let Some(pair) = self.find_pair(k.node, k.client)
            && let Some(s) = self.lookup(k, pair).found
        {
            self.remove(s, Removal::Closed);
            return Outcome::Closed;
        }
        self.count(k.node, |c| c.orphan_finals += 1);
        let until = now_ms.saturating_add(ms(self.settings.reorder_window));
        let fps = self.orphan_fps(k);
        self.orphans.remember(fps, until);
        Outcome::OrphanFinal
    }

    /// Stores a transfer, evicting the oldest first when full. Returns its slot.
    pub(super) fn open(&mut self, t: NewTransfer<'_>) -> u32 {
        // Take the references before evicting: an eviction may drop the last other user.
        let (node, client) = (t.node, t.client);
        let (pair, new) = self.pairs.acquire(
            self.hasher.hash_one((node, client)),
            |p| p.node == node && &*p.client == client,
            || Pair {
                node,
                client: client.into(),
            },
        );
        if new {
            self.bytes += client.len() + std::mem::size_of::<Pair>();
        }
        let origin_fp = self.hasher.hash_one(&t.origin);
        let (origin, new) =
            self.origins
                .acquire(origin_fp, |o| t.origin.matches(o), || t.origin.to_owned());
        if new && let Some(o) = self.origins.get(origin) {
            self.bytes += o.heap_bytes();
        }
        // Blobs are shorter than 3 KB (the field limits), so their length fits a u16.
        let blob = &t.blob[..t.blob.len().min(usize::from(u16::MAX))];
        let cell = cell_size(blob.len());
        let max = self.settings.max_inflight.clamp(1, MAX_SLOTS - 1);
        while self.head != NIL
            && (self.len >= max || self.cost() + cell + FIXED > self.settings.max_bytes)
        {
            self.remove(self.head, Removal::Evicted);
        }
        let s = self.alloc(t.place);
        self.bytes += cell;
        self.arena_cells += cell;
        let blob_cell = self.arena.alloc(blob);
        let mut flags = USED | (t.flags & (FAILED | STUCK | PERSISTED));
        if flags & FAILED != 0 {
            flags &= !STUCK;
        }
        let tail = self.tail;
        let slot = &mut self.slots[s as usize];
        if let Some((_, generation)) = t.place {
            slot.generation = generation;
        }
        slot.started = t.started;
        slot.pub_ms = t.pub_ms;
        slot.prev = tail;
        slot.next = NIL;
        slot.pair = pair;
        slot.origin = origin;
        slot.cell = blob_cell;
        slot.blob_len = blob.len() as u16;
        slot.flags = flags;
        slot.format = t.format;
        if tail != NIL {
            self.slots[tail as usize].next = s;
        } else {
            self.head = s;
        }
        self.tail = s;
        if self.frontier == NIL {
            self.frontier = s;
        }
        if flags & PERSISTED == 0 {
            self.touch_slot(s);
        }
        let h = group_hash(&self.hasher, &self.slots[s as usize]);
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index
            .insert(h, s, |x| group_hash(hasher, &slots[x as usize]));
        if let Some(n) = self.nodes.get_mut(t.node) {
            n.in_flight += 1;
            if flags & FAILED == 0 {
                n.live += 1;
            }
            if flags & STUCK != 0 {
                n.stuck += 1;
            }
        }
        self.len += 1;
        s
    }

    /// A free slot: the wanted one when given (restore: it must be free), else a recycled
    /// one, else a new one.
    fn alloc(&mut self, place: Option<(u32, u32)>) -> u32 {
        if let Some((s, _)) = place {
            let need = s as usize + 1;
            if self.slots.len() < need {
                self.slots.resize_with(need, Slot::empty);
            }
            return s;
        }
        match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot::empty());
                (self.slots.len() - 1) as u32
            }
        }
    }

    pub(super) fn remove(&mut self, s: u32, why: Removal) {
        let Some(t) = self.slots.get(s as usize) else {
            return;
        };
        if t.flags & USED == 0 {
            return;
        }
        let (node, pair, origin, flags) = (self.node_of(t), t.pair, t.origin, t.flags);
        let (prev, next, generation) = (t.prev, t.next, t.generation);
        let (blob_len, blob_cell) = (t.blob_len, t.cell);
        let h = group_hash(&self.hasher, t);
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index
            .remove(h, s, |x| group_hash(hasher, &slots[x as usize]));
        if prev != NIL {
            self.slots[prev as usize].next = next;
        } else {
            self.head = next;
        }
        if next != NIL {
            self.slots[next as usize].prev = prev;
        } else {
            self.tail = prev;
        }
        if self.frontier == s {
            self.frontier = next;
        }
        if let Some(n) = self.nodes.get_mut(node) {
            n.in_flight = n.in_flight.saturating_sub(1);
            if flags & FAILED == 0 {
                n.live = n.live.saturating_sub(1);
            }
            if flags & STUCK != 0 {
                n.stuck = n.stuck.saturating_sub(1);
            }
        }
        self.count(node, |c| match why {
            Removal::Closed => c.closed += 1,
            Removal::Evicted => c.evicted += 1,
            Removal::Expired => c.expired += 1,
        });
        if let Some(p) = self.pairs.release(pair) {
            let freed = p.client.len() + std::mem::size_of::<Pair>();
            self.bytes = self.bytes.saturating_sub(freed);
        }
        if let Some(o) = self.origins.release(origin) {
            self.bytes = self.bytes.saturating_sub(o.heap_bytes());
        }
        self.arena.free(blob_len, blob_cell);
        let cell = cell_size(usize::from(blob_len));
        self.bytes = self.bytes.saturating_sub(cell);
        self.arena_cells = self.arena_cells.saturating_sub(cell);
        if flags & PERSISTED != 0 {
            self.removed.push(transfer_id(generation, s));
        }
        let t = &mut self.slots[s as usize];
        t.flags = 0;
        t.generation = generation.wrapping_add(1);
        self.free.push(s);
        self.len -= 1;
    }

    fn detect_failures(&mut self, now_ms: i64, events: &mut Vec<Event>) {
        if now_ms < self.grace_until {
            return;
        }
        let timeout = ms(self.settings.node_timeout);
        let failing: Vec<u32> = self
            .nodes
            .iter()
            .filter(|(_, n)| {
                n.failed_at.is_none() && n.live > 0 && n.last_seen.saturating_add(timeout) <= now_ms
            })
            .map(|(id, _)| id)
            .collect();
        if failing.is_empty() {
            return;
        }
        let pos: HashMap<u32, usize> = failing.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        let mut lists: Vec<Vec<u32>> = vec![Vec::new(); failing.len()];
        let mut s = self.head;
        while let Some(t) = self.slots.get(s as usize) {
            if t.flags & FAILED == 0
                && let Some(&i) = pos.get(&self.node_of(t))
            {
                lists[i].push(s);
            }
            s = t.next;
        }
        for (node, list) in failing.into_iter().zip(lists) {
            let mut rows = Vec::with_capacity(list.len());
            let mut unstuck = 0;
            for &s in &list {
                let t = &mut self.slots[s as usize];
                unstuck += u64::from(t.flags & STUCK != 0);
                t.flags = (t.flags | FAILED) & !STUCK;
                self.touch_slot(s);
                rows.push(self.row(s));
            }
            let failed = list.len() as u64;
            self.count(node, |c| c.failed_over += failed);
            let Some(n) = self.nodes.get_mut(node) else {
                continue;
            };
            n.live = n.live.saturating_sub(failed);
            n.stuck = n.stuck.saturating_sub(unstuck);
            n.failed_at = Some(now_ms);
            n.recovered_at = None;
            events.push(Event::Failed(Failure {
                host: n.name.to_string(),
                last_seen: stamp(n.last_seen),
                at: stamp(now_ms),
                transfers: rows,
            }));
        }
    }

    fn detect_stuck(&mut self, now_ms: i64, events: &mut Vec<Event>) {
        let after = ms(self.settings.stuck_after);
        let mut found: Vec<(u32, Stuck)> = Vec::new();
        while let Some(t) = self.slots.get(self.frontier as usize) {
            if started_ms(t.started).saturating_add(after) > now_ms {
                break;
            }
            let (s, node) = (self.frontier, self.node_of(t));
            self.frontier = t.next;
            if t.flags & (FAILED | STUCK) != 0 {
                continue;
            }
            self.slots[s as usize].flags |= STUCK;
            self.touch_slot(s);
            if let Some(n) = self.nodes.get_mut(node) {
                n.stuck += 1;
            }
            self.count(node, |c| c.stuck += 1);
            let i = match found.iter().position(|(n, _)| *n == node) {
                Some(i) => i,
                None => {
                    let host = self.nodes.get(node).map_or("", |n| &n.name).to_owned();
                    found.push((
                        node,
                        Stuck {
                            host,
                            count: 0,
                            sample: Vec::new(),
                        },
                    ));
                    found.len() - 1
                }
            };
            found[i].1.count += 1;
            if found[i].1.sample.len() < STUCK_SAMPLE {
                let row = self.row(s);
                found[i].1.sample.push(row);
            }
        }
        events.extend(found.into_iter().map(|(_, s)| Event::Stuck(s)));
    }

    fn forget_nodes(&mut self, now_ms: i64) {
        let forget = ms(self.settings.forget_after);
        let mut idle: Vec<(i64, u32)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.in_flight == 0)
            .map(|(id, n)| (n.last_seen, id))
            .collect();
        let over = if self.nodes.len() > self.settings.max_nodes {
            // Make room for a tenth more, so new hosts are not refused at every report.
            self.nodes.len() - self.settings.max_nodes * 9 / 10
        } else {
            0
        };
        if over > 0 {
            idle.sort_unstable();
        }
        for (i, (seen, id)) in idle.into_iter().enumerate() {
            if i < over || seen.saturating_add(forget) <= now_ms {
                if let Some(n) = self.nodes.release(id)
                    && n.persisted
                {
                    self.removed_nodes.push(n.name.into());
                }
            } else if over > 0 {
                break;
            }
        }
    }

    /// The full description of the transfer in slot `s`.
    pub(super) fn row(&self, s: u32) -> TransferRow {
        let Some(t) = self.slots.get(s as usize) else {
            return TransferRow::default();
        };
        let p = blob::parts(self.blob_of(t));
        let o = self.origins.get(t.origin);
        let pair = self.pairs.get(t.pair);
        let text = |f: fn(&Origin) -> Option<&str>| o.and_then(f).map(str::to_owned);
        let mut rel_path = String::with_capacity(p.tail.len() + o.map_or(0, |o| o.dir.len()));
        rel_path.push_str(o.map_or("", |o| &o.dir));
        rel_path.push_str(p.tail);
        TransferRow {
            id: transfer_id(t.generation, s),
            host: pair
                .and_then(|p| self.nodes.get(p.node))
                .map_or("", |n| &n.name)
                .to_owned(),
            client: pair.map_or("", |p| &p.client).to_owned(),
            format: FORMATS
                .get(usize::from(t.format))
                .copied()
                .unwrap_or(Format::V02),
            started: stamp(started_ms(t.started)),
            pub_time: (t.pub_ms != NO_PUB).then(|| stamp(t.pub_ms)),
            base_url: o.map_or("", |o| &o.base_url).to_owned(),
            rel_path,
            identity: p.identity(),
            size: p.size,
            source: text(|o| o.source.as_deref()),
            from_cluster: text(|o| o.from_cluster.as_deref()),
            to_clusters: o.map_or_else(Vec::new, |o| {
                o.to_clusters.iter().map(|c| c.to_string()).collect()
            }),
            flow: text(|o| o.flow.as_deref()),
            failed_over: t.flags & FAILED != 0,
            stuck: t.flags & STUCK != 0,
        }
    }

    /// Slots in start order (oldest first).
    pub(super) fn chain(&self) -> impl Iterator<Item = (u32, &Slot)> {
        let mut s = self.head;
        std::iter::from_fn(move || {
            let t = self.slots.get(s as usize)?;
            let this = s;
            s = t.next;
            Some((this, t))
        })
    }

    #[cfg(test)]
    pub(super) fn cost_for_tests(&self) -> usize {
        self.cost()
    }

    #[cfg(test)]
    pub(super) fn check(&self) -> Result<(), String> {
        let mut n = 0;
        let mut prev = NIL;
        let mut per_node: HashMap<u32, (u64, u64, u64)> = HashMap::new();
        for (s, t) in self.chain() {
            if t.flags & USED == 0 {
                return Err(format!("free slot {s} in the chain"));
            }
            if t.prev != prev {
                return Err(format!("slot {s}: prev {} != {prev}", t.prev));
            }
            let h = group_hash(&self.hasher, t);
            if self.index.find(h, |x| x == s).is_none() {
                return Err(format!("slot {s} not in the index"));
            }
            let e = per_node.entry(self.node_of(t)).or_default();
            e.0 += 1;
            e.1 += u64::from(t.flags & FAILED == 0);
            e.2 += u64::from(t.flags & STUCK != 0);
            prev = s;
            n += 1;
            if n > self.slots.len() {
                return Err("cycle in the chain".into());
            }
        }
        if n != self.len || self.index.len() != self.len || prev != self.tail {
            return Err(format!(
                "len {} chain {n} index {}",
                self.len,
                self.index.len()
            ));
        }
        if self.free.len() + self.len != self.slots.len() {
            return Err(format!(
                "free {} + len {} != slots {}",
                self.free.len(),
                self.len,
                self.slots.len()
            ));
        }
        let c = self.totals;
        if c.opened != self.len as u64 + c.closed + c.evicted + c.expired {
            return Err(format!("totals inconsistent: {c:?} with {} open", self.len));
        }
        for (id, node) in self.nodes.iter() {
            let (f, l, st) = per_node.remove(&id).unwrap_or_default();
            if (node.in_flight, node.live, node.stuck) != (f, l, st) {
                return Err(format!(
                    "node {}: counters {:?} but chain says {:?}",
                    node.name,
                    (node.in_flight, node.live, node.stuck),
                    (f, l, st)
                ));
            }
            let c = node.counts;
            if c.opened != node.in_flight + c.closed + c.evicted + c.expired {
                return Err(format!("node {} counts inconsistent: {c:?}", node.name));
            }
        }
        if !per_node.is_empty() {
            return Err(format!("transfers of unknown nodes: {per_node:?}"));
        }
        Ok(())
    }
}
