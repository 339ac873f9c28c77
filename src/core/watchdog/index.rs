//! The index from a product's group key (node, client, pubTime) to the slots of its open
//! transfers: open addressing with linear probing over 4-byte buckets, 24 bits of slot
//! and 8 bits of hash tag (so most mismatches are skipped without touching the slot).
//! A general map would cost 20+ bytes per transfer; at a million transfers this costs 8 MB.
//!
//! Several transfers may share a group key (different files with the same pubTime), so
//! lookups visit every candidate and the caller decides; the machine caps a group's size,
//! which keeps probe runs short even under hostile input. Removal shifts the following
//! entries back (no tombstones), so the table never degrades.

const EMPTY: u32 = u32::MAX;
const SLOT_BITS: u32 = 24;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;
/// Slot numbers are below this (the all-ones slot number would look like an empty bucket).
pub(super) const MAX_SLOTS: usize = SLOT_MASK as usize;

fn tag(h: u64) -> u32 {
    ((h >> 56) as u32) << SLOT_BITS
}

pub(super) struct Index {
    buckets: Vec<u32>,
    len: usize,
}

impl Index {
    pub(super) fn new() -> Index {
        Index {
            buckets: vec![EMPTY; 16],
            len: 0,
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.buckets.capacity() * 4
    }

    fn mask(&self) -> usize {
        self.buckets.len() - 1
    }

    /// Offers every slot filed under a hash whose tag matches `h`, in probe order, to `f`
    /// until it answers true; returns that slot.
    pub(super) fn find(&self, h: u64, mut f: impl FnMut(u32) -> bool) -> Option<u32> {
        let mask = self.mask();
        let t = tag(h);
        let mut i = h as usize & mask;
        // The load factor stays below 0.7, so an empty bucket always ends the run.
        loop {
            let e = self.buckets[i];
            if e == EMPTY {
                return None;
            }
            if e & !SLOT_MASK == t && f(e & SLOT_MASK) {
                return Some(e & SLOT_MASK);
            }
            i = (i + 1) & mask;
        }
    }

    /// Files `slot` (below [`MAX_SLOTS`]) under `h`; `hash_of` gives the hash of any slot
    /// already filed (needed to grow).
    pub(super) fn insert(&mut self, h: u64, slot: u32, hash_of: impl Fn(u32) -> u64) {
        if (self.len + 1) * 10 > self.buckets.len() * 7 {
            let bigger = vec![EMPTY; self.buckets.len() * 2];
            let old = std::mem::replace(&mut self.buckets, bigger);
            for e in old {
                if e != EMPTY {
                    self.place(hash_of(e & SLOT_MASK), e & SLOT_MASK);
                }
            }
        }
        self.place(h, slot);
        self.len += 1;
    }

    fn place(&mut self, h: u64, slot: u32) {
        let mask = self.mask();
        let mut i = h as usize & mask;
        while self.buckets[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.buckets[i] = tag(h) | (slot & SLOT_MASK);
    }

    /// Removes `slot` filed under `h`; false if it was not there.
    pub(super) fn remove(&mut self, h: u64, slot: u32, hash_of: impl Fn(u32) -> u64) -> bool {
        let mask = self.mask();
        let want = tag(h) | (slot & SLOT_MASK);
        let mut i = h as usize & mask;
        loop {
            let e = self.buckets[i];
            if e == EMPTY {
                return false;
            }
            if e == want {
                break;
            }
            i = (i + 1) & mask;
        }
        // Knuth's algorithm R: pull back every later entry of the run that may live in
        // the hole, so lookups never need tombstones.
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let e = self.buckets[j];
            if e == EMPTY {
                break;
            }
            let home = hash_of(e & SLOT_MASK) as usize & mask;
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.buckets[hole] = e;
                hole = j;
            }
        }
        self.buckets[hole] = EMPTY;
        self.len -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        /// Against a model: inserts and removes with deliberately colliding hashes.
        #[test]
        fn behaves_like_a_multimap(ops in proptest::collection::vec((any::<bool>(), 0u32..40, 0u64..6), 0..300)) {
            let mut hashes: HashMap<u32, u64> = HashMap::new();
            let mut idx = Index::new();
            for (insert, slot, hv) in ops {
                // Few distinct hashes, spread tags: long runs and wrap-around.
                let h = hv.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 0xf;
                match (insert, hashes.get(&slot).copied()) {
                    (true, None) => {
                        hashes.insert(slot, h);
                        let hs = hashes.clone();
                        idx.insert(h, slot, |s| hs[&s]);
                    }
                    (false, Some(old)) => {
                        hashes.remove(&slot);
                        let mut hs = hashes.clone();
                        hs.insert(slot, old);
                        prop_assert!(idx.remove(old, slot, |s| hs[&s]));
                    }
                    _ => {}
                }
                prop_assert_eq!(idx.len(), hashes.len());
                for (&s, &h) in &hashes {
                    prop_assert_eq!(idx.find(h, |x| x == s), Some(s));
                }
            }
        }
    }
}
