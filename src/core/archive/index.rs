//! The sidecar index of one hour file: enough to tell, without opening (and
//! decompressing) the hour, that a query cannot match anything in it.
//!
//! It holds the line count, the first and last report time, each code with its count, and
//! one set per field `trace` filters on: file names (the last component of relPath),
//! sources, clients, hosts, flows and identities (as `id=` writes them, for following a
//! renamed product). A set is stored as its sorted values while it is small (at most
//! [`EXACT_MAX_ITEMS`] values and [`EXACT_MAX_BYTES`] bytes: sources, clients, hosts and
//! flows nearly always are, and the values can be listed), else as a Bloom filter of
//! [`BITS_PER_ITEM`] bits per distinct value with [`HASHES`] hashes: a false-positive rate
//! of about 0.05 % (an hour opened for nothing), never a false negative. The rate matters
//! more than the size: `trace` asks each hour about every product it follows (tens of
//! names), and at 0.8 % (10 bits) a third of the hours answered "maybe" to 50 names.
//! File names and identities of a busy hour cost 16 bits each: about 2 MB per million
//! distinct file names (plus as much for identities), far below the hour's compressed
//! lines.
//!
//! Format (version 1, little-endian, `varint` = unsigned LEB128, `zigzag` for signed):
//! ```text
//! "PWIX" u8 version=1
//! varint lines
//! u8 has_time (0|1) [zigzag min_secs, varint min_nanos, zigzag max_secs, varint max_nanos]
//! varint n_codes, n × (varint code, varint count)        codes ascending, counts sum to lines
//! varint n_sets, n × (u8 kind, u8 repr, varint len, len bytes of body)
//!     repr 0 (exact): varint n, n × (varint len, UTF-8 bytes)   strictly ascending
//!     repr 1 (bloom): varint distinct, u8 hashes, varint words, words × u64
//! u64 checksum of every byte before it
//! ```
//! Unknown set kinds are skipped and unknown representations answer "maybe", so later
//! versions can add sets without a new version number. A set missing from an index also
//! answers "maybe". The checksum matters: a flipped bit in a Bloom filter would otherwise be
//! a silent false negative. The hash is defined here (not std's, which may change between
//! Rust releases) because indexes outlive the binary that wrote them.

use super::line::{ArchiveLine, identity_token};
use super::trace::{FileMatch, Follow, Query};
use crate::core::stamp::Stamp;
use std::collections::{BTreeMap, BTreeSet, HashSet};

pub const MAGIC: &[u8; 4] = b"PWIX";
pub const VERSION: u8 = 1;
pub const BITS_PER_ITEM: usize = 16;
pub const HASHES: u8 = 11;
pub const EXACT_MAX_ITEMS: usize = 1024;
pub const EXACT_MAX_BYTES: usize = 32 * 1024;

/// The fields an index keeps a set of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetKind {
    File,
    Source,
    Client,
    Host,
    Flow,
    Identity,
}

impl SetKind {
    pub const ALL: [SetKind; 6] = [
        SetKind::File,
        SetKind::Source,
        SetKind::Client,
        SetKind::Host,
        SetKind::Flow,
        SetKind::Identity,
    ];

    fn tag(self) -> u8 {
        self as u8 + 1
    }

    fn from_tag(t: u8) -> Option<SetKind> {
        SetKind::ALL.get(usize::from(t).checked_sub(1)?).copied()
    }

    fn at(self) -> usize {
        self as usize
    }
}

/// Why an index could not be read: the caller then opens the hour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("truncated index")]
    Truncated,
    #[error("not a pumpwatch index")]
    Magic,
    #[error("index version {0} (this pumpwatch reads version 1)")]
    Version(u8),
    #[error("index checksum mismatch (corrupt)")]
    Checksum,
    #[error("invalid index: {0}")]
    Invalid(&'static str),
}

// ---- the stable hash ----

const K0: u64 = 0x243f_6a88_85a3_08d3;
const K1: u64 = 0x1319_8a2e_0370_7344;
const K2: u64 = 0xa409_3822_299f_31d0;

fn fold_mul(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// A 64-bit hash fixed for the life of index version 1 (a folded-multiply hash in the
/// style of foldhash/wyhash; not for adversarial use, a collision only costs a read).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h = K0 ^ (bytes.len() as u64).wrapping_mul(K1);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = fold_mul(h ^ u64::from_le_bytes(w), K1);
    }
    let rest = chunks.remainder();
    let mut w = [0u8; 8];
    w[..rest.len()].copy_from_slice(rest);
    h = fold_mul(h ^ u64::from_le_bytes(w) ^ K2, K1 ^ K0);
    fold_mul(h, K2)
}

// ---- Bloom filter ----

#[derive(Debug, Clone, PartialEq, Eq)]
struct Bloom {
    hashes: u8,
    words: Vec<u64>,
}

impl Bloom {
    fn sized(distinct: usize) -> Bloom {
        let bits = distinct.saturating_mul(BITS_PER_ITEM).max(64);
        Bloom {
            hashes: HASHES,
            words: vec![0; bits.div_ceil(64)],
        }
    }

    /// Kirsch–Mitzenmacher double hashing; each probe mapped onto the bits by a multiply
    /// (no modulo, any size).
    fn probes(&self, h: u64) -> impl Iterator<Item = usize> + use<> {
        let m = self.words.len() as u128 * 64;
        let step = fold_mul(h, K0) | 1;
        (0..u64::from(self.hashes)).map(move |i| {
            let x = h.wrapping_add(i.wrapping_mul(step));
            ((u128::from(x) * m) >> 64) as usize
        })
    }

    fn insert(&mut self, h: u64) {
        for p in self.probes(h) {
            self.words[p / 64] |= 1 << (p % 64);
        }
    }

    fn contains(&self, h: u64) -> bool {
        self.probes(h)
            .all(|p| self.words[p / 64] & (1 << (p % 64)) != 0)
    }
}

// ---- building ----

#[derive(Debug, Default)]
struct SetBuilder {
    /// The values while the set is small; `None` once it outgrew the limits.
    exact: Option<BTreeSet<String>>,
    exact_bytes: usize,
    max_items: usize,
    hashes: HashSet<u64, foldhash::fast::RandomState>,
}

impl SetBuilder {
    fn new(max_items: usize) -> Self {
        SetBuilder {
            exact: Some(BTreeSet::new()),
            max_items,
            ..Default::default()
        }
    }

    fn add(&mut self, v: &str) {
        self.hashes.insert(stable_hash(v.as_bytes()));
        if let Some(ex) = &mut self.exact
            && !ex.contains(v)
        {
            self.exact_bytes += v.len();
            if ex.len() >= self.max_items || self.exact_bytes > EXACT_MAX_BYTES {
                self.exact = None;
            } else {
                ex.insert(v.to_owned());
            }
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let mut body = Vec::new();
        let repr = match &self.exact {
            Some(values) => {
                put_varint(&mut body, values.len() as u64);
                for v in values {
                    put_varint(&mut body, v.len() as u64);
                    body.extend_from_slice(v.as_bytes());
                }
                0
            }
            None => {
                let mut bloom = Bloom::sized(self.hashes.len());
                for &h in &self.hashes {
                    bloom.insert(h);
                }
                put_varint(&mut body, self.hashes.len() as u64);
                body.push(bloom.hashes);
                put_varint(&mut body, bloom.words.len() as u64);
                for w in &bloom.words {
                    body.extend_from_slice(&w.to_le_bytes());
                }
                1
            }
        };
        out.push(repr);
        put_varint(out, body.len() as u64);
        out.extend_from_slice(&body);
    }
}

/// Collects one hour's lines; [`IndexBuilder::finish`] gives the sidecar's bytes.
/// Memory: the values of small sets, and 8 bytes (plus table overhead) per distinct value
/// of large ones.
#[derive(Debug)]
pub struct IndexBuilder {
    lines: u64,
    time: Option<(Stamp, Stamp)>,
    codes: BTreeMap<u16, u64>,
    sets: [SetBuilder; 6],
}

impl Default for IndexBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl IndexBuilder {
    pub fn new() -> Self {
        IndexBuilder {
            lines: 0,
            time: None,
            codes: BTreeMap::new(),
            sets: std::array::from_fn(|_| SetBuilder::new(EXACT_MAX_ITEMS)),
        }
    }

    /// A builder that keeps a set exact only up to `items` values (0: always a Bloom
    /// filter); the default is [`EXACT_MAX_ITEMS`].
    pub fn with_exact_limit(items: usize) -> Self {
        IndexBuilder {
            sets: std::array::from_fn(|_| SetBuilder::new(items)),
            ..Self::new()
        }
    }

    pub fn lines(&self) -> u64 {
        self.lines
    }

    pub fn add(&mut self, l: &ArchiveLine) {
        self.lines += 1;
        self.time = Some(match self.time {
            None => (l.time, l.time),
            Some((lo, hi)) => (lo.min(l.time), hi.max(l.time)),
        });
        *self.codes.entry(l.code).or_default() += 1;
        self.sets[SetKind::File.at()].add(l.file_name());
        self.sets[SetKind::Source.at()].add(&l.source);
        self.sets[SetKind::Client.at()].add(&l.client);
        self.sets[SetKind::Host.at()].add(&l.host);
        self.sets[SetKind::Flow.at()].add(&l.flow);
        if let Some(id) = &l.identity {
            self.sets[SetKind::Identity.at()].add(&identity_token(id));
        }
    }

    pub fn finish(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        put_varint(&mut out, self.lines);
        match self.time {
            None => out.push(0),
            Some((lo, hi)) => {
                out.push(1);
                for t in [lo, hi] {
                    let n = t.0.as_nanosecond();
                    put_varint(&mut out, zigzag(n.div_euclid(1_000_000_000) as i64));
                    put_varint(&mut out, n.rem_euclid(1_000_000_000) as u64);
                }
            }
        }
        put_varint(&mut out, self.codes.len() as u64);
        for (&code, &count) in &self.codes {
            put_varint(&mut out, u64::from(code));
            put_varint(&mut out, count);
        }
        put_varint(&mut out, self.sets.len() as u64);
        for (kind, set) in SetKind::ALL.iter().zip(&self.sets) {
            out.push(kind.tag());
            set.encode(&mut out);
        }
        let sum = stable_hash(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

// ---- reading ----

#[derive(Debug, Clone, PartialEq, Eq)]
enum Set {
    /// Missing or of a representation this version does not know: answers "maybe".
    Unknown,
    Exact(Vec<String>),
    Bloom(Bloom),
}

impl Set {
    fn may_contain(&self, v: &str) -> bool {
        match self {
            Set::Unknown => true,
            Set::Exact(values) => values.binary_search_by(|x| x.as_str().cmp(v)).is_ok(),
            Set::Bloom(b) => b.contains(stable_hash(v.as_bytes())),
        }
    }
}

/// A decoded index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    lines: u64,
    time: Option<(Stamp, Stamp)>,
    codes: Vec<(u16, u64)>,
    sets: [Set; 6],
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, IndexError> {
        let (&b, rest) = self.0.split_first().ok_or(IndexError::Truncated)?;
        self.0 = rest;
        Ok(b)
    }

    fn bytes(&mut self, n: u64) -> Result<&'a [u8], IndexError> {
        let n = usize::try_from(n).map_err(|_| IndexError::Truncated)?;
        if n > self.0.len() {
            return Err(IndexError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn varint(&mut self) -> Result<u64, IndexError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let part = u64::from(b & 0x7f);
            if shift == 63 && part > 1 {
                return Err(IndexError::Invalid("varint overflow"));
            }
            v |= part << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(IndexError::Invalid("varint overflow"))
    }

    /// A count of items each at least `min_size` bytes long: refused when the input
    /// cannot hold them, so a corrupt count never drives an allocation.
    fn count(&mut self, min_size: usize) -> Result<usize, IndexError> {
        let n = self.varint()?;
        match usize::try_from(n) {
            Ok(n) if n.saturating_mul(min_size) <= self.0.len() => Ok(n),
            _ => Err(IndexError::Truncated),
        }
    }

    fn stamp(&mut self) -> Result<Stamp, IndexError> {
        let secs = unzigzag(self.varint()?);
        let nanos = self.varint()?;
        if nanos >= 1_000_000_000 {
            return Err(IndexError::Invalid("time"));
        }
        Stamp::from_unix(secs, nanos as i32).ok_or(IndexError::Invalid("time"))
    }
}

fn decode_set(repr: u8, body: &[u8]) -> Result<Set, IndexError> {
    let mut r = Reader(body);
    let set = match repr {
        0 => {
            let n = r.count(1)?;
            let mut values: Vec<String> = Vec::with_capacity(n);
            for _ in 0..n {
                let len = r.varint()?;
                let v = std::str::from_utf8(r.bytes(len)?)
                    .map_err(|_| IndexError::Invalid("value not UTF-8"))?;
                if values.last().is_some_and(|last| last.as_str() >= v) {
                    return Err(IndexError::Invalid("values not sorted"));
                }
                values.push(v.to_owned());
            }
            Set::Exact(values)
        }
        1 => {
            let _distinct = r.varint()?;
            let hashes = r.byte()?;
            if !(1..=32).contains(&hashes) {
                return Err(IndexError::Invalid("bloom hashes"));
            }
            let n = r.count(8)?;
            if n == 0 {
                return Err(IndexError::Invalid("empty bloom filter"));
            }
            let words = r
                .bytes(n as u64 * 8)?
                .chunks_exact(8)
                .map(|c| {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(c);
                    u64::from_le_bytes(w)
                })
                .collect();
            Set::Bloom(Bloom { hashes, words })
        }
        _ => return Ok(Set::Unknown),
    };
    if !r.0.is_empty() {
        return Err(IndexError::Invalid("set body too long"));
    }
    Ok(set)
}

impl Index {
    /// Reads an index; any damage is an error (the caller then reads the hour).
    pub fn decode(b: &[u8]) -> Result<Index, IndexError> {
        if b.len() < MAGIC.len() + 1 + 8 {
            return Err(if b.starts_with(&MAGIC[..b.len().min(4)]) {
                IndexError::Truncated
            } else {
                IndexError::Magic
            });
        }
        if &b[..4] != MAGIC {
            return Err(IndexError::Magic);
        }
        if b[4] != VERSION {
            return Err(IndexError::Version(b[4]));
        }
        let (payload, sum) = b.split_at(b.len() - 8);
        let mut want = [0u8; 8];
        want.copy_from_slice(sum);
        if stable_hash(payload) != u64::from_le_bytes(want) {
            return Err(IndexError::Checksum);
        }
        let mut r = Reader(&payload[5..]);
        let lines = r.varint()?;
        let time = match r.byte()? {
            0 => None,
            1 => {
                let (lo, hi) = (r.stamp()?, r.stamp()?);
                if lo > hi {
                    return Err(IndexError::Invalid("time range"));
                }
                Some((lo, hi))
            }
            _ => return Err(IndexError::Invalid("time flag")),
        };
        if (lines == 0) != time.is_none() {
            return Err(IndexError::Invalid("time range"));
        }
        let n = r.count(2)?;
        let mut codes: Vec<(u16, u64)> = Vec::with_capacity(n);
        let mut total = 0u64;
        for _ in 0..n {
            let code = u16::try_from(r.varint()?).map_err(|_| IndexError::Invalid("code"))?;
            let count = r.varint()?;
            if count == 0 || codes.last().is_some_and(|(c, _)| *c >= code) {
                return Err(IndexError::Invalid("codes"));
            }
            total = total.saturating_add(count);
            codes.push((code, count));
        }
        if total != lines {
            return Err(IndexError::Invalid("code counts"));
        }
        let mut sets: [Set; 6] = std::array::from_fn(|_| Set::Unknown);
        let mut seen = [false; 6];
        for _ in 0..r.count(3)? {
            let tag = r.byte()?;
            let repr = r.byte()?;
            let len = r.varint()?;
            let body = r.bytes(len)?;
            let Some(kind) = SetKind::from_tag(tag) else {
                continue;
            };
            if std::mem::replace(&mut seen[kind.at()], true) {
                return Err(IndexError::Invalid("set given twice"));
            }
            sets[kind.at()] = decode_set(repr, body)?;
        }
        if !r.0.is_empty() {
            return Err(IndexError::Invalid("trailing bytes"));
        }
        Ok(Index {
            lines,
            time,
            codes,
            sets,
        })
    }

    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// The first and last report time in the hour (`None` for an empty hour).
    pub fn time_range(&self) -> Option<(Stamp, Stamp)> {
        self.time
    }

    /// Each code present with its count, ascending.
    pub fn codes(&self) -> &[(u16, u64)] {
        &self.codes
    }

    /// The values of a set when it was stored exactly (small sets).
    pub fn values(&self, kind: SetKind) -> Option<&[String]> {
        match &self.sets[kind.at()] {
            Set::Exact(v) => Some(v),
            _ => None,
        }
    }

    /// False only if no line of the hour has `value` in that field.
    pub fn may_contain_value(&self, kind: SetKind, value: &str) -> bool {
        self.sets[kind.at()].may_contain(value)
    }

    /// False only if no line of the hour can match `q` (never a false negative).
    pub fn may_contain(&self, q: &Query) -> bool {
        let Some((lo, hi)) = self.time else {
            return false;
        };
        if q.since.is_some_and(|s| hi < s) || q.until.is_some_and(|u| lo >= u) {
            return false;
        }
        if let Some(c) = &q.code
            && !self.codes.iter().any(|(code, _)| c.contains(*code))
        {
            return false;
        }
        let fields = [
            (SetKind::Source, &q.source),
            (SetKind::Client, &q.client),
            (SetKind::Host, &q.host),
            (SetKind::Flow, &q.flow),
        ];
        if fields.iter().any(|(kind, v)| {
            v.as_deref()
                .is_some_and(|v| !self.may_contain_value(*kind, v))
        }) {
            return false;
        }
        match &q.file {
            Some(FileMatch::Name(n)) => self.may_contain_value(SetKind::File, n),
            // A regex is over relPath; the index keeps file names only.
            Some(FileMatch::Regex(_)) | None => true,
        }
    }

    /// False only if no line of the hour can belong to a product `f` follows.
    pub fn may_hold(&self, f: &Follow) -> bool {
        self.lines > 0
            && (f.files().any(|n| self.may_contain_value(SetKind::File, n))
                || f.identities()
                    .any(|i| self.may_contain_value(SetKind::Identity, i)))
    }
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
