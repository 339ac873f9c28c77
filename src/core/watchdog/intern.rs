//! Reference-counted interning: hosts, clients and "origins" (base URL, directory,
//! source, clusters, flow) are shared by many transfers, so each is stored once and a
//! transfer holds a 4-byte id. The value is freed with its last transfer, so hostile
//! names cannot pile up.
//!
//! The lookup map is keyed by a 64-bit fingerprint from the machine's randomly seeded
//! hasher, not by the value, so a value is never stored twice. A fingerprint collision
//! (not forgeable without the seed) only costs sharing: the newcomer lives unmapped.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The keys are already hashes: pass them through.
#[derive(Default)]
pub(super) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

pub(super) type FpMap<V> = HashMap<u64, V, BuildHasherDefault<Prehashed>>;

struct Item<T> {
    value: T,
    fp: u64,
    refs: u32,
}

pub(super) struct Interner<T> {
    items: Vec<Option<Item<T>>>,
    free: Vec<u32>,
    map: FpMap<u32>,
}

impl<T> Interner<T> {
    pub(super) fn new() -> Self {
        Interner {
            items: Vec::new(),
            free: Vec::new(),
            map: FpMap::default(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.items.len() - self.free.len()
    }

    pub(super) fn find(&self, fp: u64, eq: impl Fn(&T) -> bool) -> Option<u32> {
        let id = *self.map.get(&fp)?;
        let item = self.items.get(id as usize)?.as_ref()?;
        eq(&item.value).then_some(id)
    }

    /// The id of the value `eq` recognises, with one more reference; made with `make`
    /// when absent (then the second result is true).
    pub(super) fn acquire(
        &mut self,
        fp: u64,
        eq: impl Fn(&T) -> bool,
        make: impl FnOnce() -> T,
    ) -> (u32, bool) {
        if let Some(id) = self.find(fp, eq)
            && let Some(Some(item)) = self.items.get_mut(id as usize)
        {
            item.refs = item.refs.saturating_add(1);
            return (id, false);
        }
        let item = Some(Item {
            value: make(),
            fp,
            refs: 1,
        });
        let id = match self.free.pop() {
            Some(id) => {
                self.items[id as usize] = item;
                id
            }
            None => {
                self.items.push(item);
                (self.items.len() - 1) as u32
            }
        };
        self.map.entry(fp).or_insert(id);
        (id, true)
    }

    /// Drops one reference; returns the value when it was the last.
    pub(super) fn release(&mut self, id: u32) -> Option<T> {
        let entry = self.items.get_mut(id as usize)?;
        let item = entry.as_mut()?;
        item.refs = item.refs.saturating_sub(1);
        if item.refs > 0 {
            return None;
        }
        let item = entry.take()?;
        if self.map.get(&item.fp) == Some(&id) {
            self.map.remove(&item.fp);
        }
        self.free.push(id);
        Some(item.value)
    }

    pub(super) fn get(&self, id: u32) -> Option<&T> {
        Some(&self.items.get(id as usize)?.as_ref()?.value)
    }

    pub(super) fn get_mut(&mut self, id: u32) -> Option<&mut T> {
        Some(&mut self.items.get_mut(id as usize)?.as_mut()?.value)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.items
            .iter()
            .enumerate()
            .filter_map(|(i, it)| Some((i as u32, &it.as_ref()?.value)))
    }
}
