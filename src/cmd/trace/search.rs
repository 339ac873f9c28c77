//! The search behind `pumpwatch trace`, over the files [`store`] lays out.
//!
//! 1. **Hours.** Every hour file of every cluster found under the `--dir`s, in hour order
//!    (then cluster). An hour is skipped without opening it when it ends more than an hour
//!    before `--since` (lines carry at most an hour of future completion time), and
//!    skipped after reading only its sidecar index when [`Index::may_contain`] says no
//!    line can match. Closed hours without an index, and the open `.log` hours, are read.
//! 2. **Pass 1** reads the remaining hours in parallel (`--threads`), in waves in hour
//!    order: each hour is streamed (decompressed on the fly) in chunks, candidate lines are
//!    found by one search over each chunk ([`Matcher::candidates`]) and checked. After each
//!    wave the matches go to [`Lives`]; once `--limit` products are found, pass 1 stops.
//! 3. **Pass 2** collects the other lines of each product found, so each product shows
//!    its whole life across every pump, not only the lines the query matched. An hour
//!    pass 1 read is kept in memory while it fits (512 MB over all threads), and the other
//!    lines of the products found in it are taken from there; then only the hours that
//!    may hold a product found elsewhere ([`Index::may_hold`], from an hour before the
//!    first line found to `--follow` after the last) are read again.
//!
//! Malformed and partial lines met on the way are skipped and counted (one warning).

use super::Config;
use crate::cmd::Error;
use crate::cmd::archive::store::{self, IDX, LOG, ZST, hour_base, with_ext};
use crate::core::Stamp;
use crate::core::archive::line::identity_token;
use crate::core::archive::{ArchiveLine, Follow, Index, Life, LineError, Lives, Matcher, SetKind};
use crate::shutdown::Shutdown;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What a search found.
#[derive(Debug)]
pub struct Found {
    pub lives: Vec<Life>,
    pub stats: SearchStats,
}

/// What a search read and skipped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SearchStats {
    pub clusters: usize,
    pub hours: usize,
    pub skipped_by_time: usize,
    pub skipped_by_index: usize,
    /// Hours read in pass 1 and in pass 2.
    pub read: usize,
    pub followed: usize,
    /// Bytes of lines looked at (decompressed).
    pub bytes: u64,
    /// Lines that matched the query (pass 1).
    pub matched: usize,
    pub malformed: u64,
    /// Index files that could not be used (the hour was read instead).
    pub bad_indexes: usize,
    /// Hour files that could not be read at all.
    pub unreadable: usize,
    /// Pass 1 stopped at the limit.
    pub limited: bool,
}

impl fmt::Display for SearchStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} clusters, {} hours: {} skipped by time, {} by index, {} read, {} read again to follow; {} MB looked at, {} lines matched, {} malformed; {} bad indexes{}",
            self.clusters,
            self.hours,
            self.skipped_by_time,
            self.skipped_by_index,
            self.read,
            self.followed,
            self.bytes / 1_000_000,
            self.matched,
            self.malformed,
            self.bad_indexes,
            if self.limited {
                "; stopped at the limit"
            } else {
                ""
            }
        )
    }
}

/// One hour of one cluster.
#[derive(Debug, Clone)]
struct Unit {
    cluster: String,
    dir: PathBuf,
    hour: String,
    start: Option<Stamp>,
    zst: bool,
    idx: bool,
}

impl Unit {
    fn base(&self) -> PathBuf {
        hour_base(&self.dir, &self.hour)
    }

    fn index(&self) -> Result<Option<Index>, String> {
        if !(self.zst && self.idx) {
            return Ok(None);
        }
        let bytes = std::fs::read(with_ext(&self.base(), IDX)).map_err(|e| e.to_string())?;
        Index::decode(&bytes).map(Some).map_err(|e| e.to_string())
    }

    /// Streams the hour's lines through `data` (see [`store::for_each_chunk_in`]); a
    /// `.log` compressed meanwhile is read from its `.zst`.
    fn read(
        &self,
        data: &mut Vec<u8>,
        cap: usize,
        f: &mut dyn FnMut(&[u8]) -> bool,
    ) -> std::io::Result<Option<usize>> {
        let base = self.base();
        if self.zst {
            return store::for_each_chunk_in(&with_ext(&base, ZST), true, data, cap, f);
        }
        match store::for_each_chunk_in(&with_ext(&base, LOG), false, data, cap, f) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                store::for_each_chunk_in(&with_ext(&base, ZST), true, data, cap, f)
            }
            r => r,
        }
    }
}

#[derive(Debug, Default)]
struct UnitResult {
    /// Lines the query matched (pass 1) or lines of the products followed (pass 2).
    lines: Vec<ArchiveLine>,
    /// Pass 1, hour held whole: the other lines of the products found in it.
    related: Vec<ArchiveLine>,
    /// Pass 1: `related` holds every other line of those products in this hour.
    covered: bool,
    malformed: u64,
    bytes: u64,
    skipped_by_time: bool,
    skipped_by_index: bool,
    bad_index: bool,
    unreadable: bool,
}

/// Hours end an hour after they start, and a line's time is at most
/// [`FUTURE_TOLERANCE_S`](crate::core::archive::line::FUTURE_TOLERANCE_S) after the hour
/// it was archived in.
fn ends_before(start: Option<Stamp>, t: Stamp) -> bool {
    let slack = 3600 + crate::core::archive::line::FUTURE_TOLERANCE_S;
    start.is_some_and(|s| s.0.as_second() + slack <= t.0.as_second())
}

/// Checks one raw line: the line if it is wanted, or why it is malformed.
type Pick<'a> = dyn FnMut(&[u8]) -> Result<Option<ArchiveLine>, LineError> + 'a;
/// Hands each candidate line of a chunk to the callback.
type Cands<'a> = dyn Fn(&[u8], &mut dyn FnMut(&[u8])) + 'a;

/// Reads the hour, handing each candidate line to `pick`; returns the hour's length when
/// it was kept whole in `data` (at most `cap` bytes).
fn scan(
    u: &Unit,
    stop: &Shutdown,
    result: &mut UnitResult,
    pick: &mut Pick,
    candidates: &Cands,
    data: &mut Vec<u8>,
    cap: usize,
) -> Option<usize> {
    let r = u.read(data, cap, &mut |chunk| {
        result.bytes += chunk.len() as u64;
        candidates(chunk, &mut |raw| match pick(raw) {
            Ok(Some(l)) => result.lines.push(l),
            Ok(None) => {}
            Err(_) => result.malformed += 1,
        });
        !stop.is_cancelled()
    });
    match r {
        Ok(kept) => kept,
        Err(e) => {
            tracing::warn!(
                "trace: cannot read {}/{} ({}): {e}",
                u.dir.display(),
                u.hour,
                u.cluster
            );
            result.unreadable = true;
            None
        }
    }
}

/// Pass 1 of one hour. The hour's text is kept while it fits in `cap`, so the other
/// lines of the products found here are collected from memory, not read again in pass 2.
fn pass1(u: &Unit, m: &Matcher, stop: &Shutdown, data: &mut Vec<u8>, cap: usize) -> UnitResult {
    let mut r = UnitResult::default();
    let q = m.query();
    if q.since.is_some_and(|s| ends_before(u.start, s)) {
        r.skipped_by_time = true;
        return r;
    }
    match u.index() {
        Ok(Some(ix)) if !ix.may_contain(q) => {
            r.skipped_by_index = true;
            return r;
        }
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(
                "trace: index of {}/{}: {e}; reading the hour",
                u.dir.display(),
                u.hour
            );
            r.bad_index = true;
        }
    }
    let kept = scan(
        u,
        stop,
        &mut r,
        &mut |raw| m.check(raw),
        &|chunk, f| m.candidates(chunk).for_each(&mut *f),
        data,
        cap,
    );
    if let Some(len) = kept
        && !r.lines.is_empty()
    {
        let text = &data[..len];
        let mut found = Lives::new();
        for l in &r.lines {
            found.add("", l.clone());
        }
        let follow = found.follow(q);
        for raw in follow.candidates(text) {
            if let Ok(Some(l)) = follow.check(raw) {
                r.related.push(l);
            }
        }
        r.covered = true;
    }
    r
}

/// How pass 2 reads an hour.
enum Again<'a> {
    /// Not read in pass 1: every line of a product followed.
    All,
    /// Read in pass 1 (not held whole): lines the query did not match.
    Unmatched,
    /// Held whole in pass 1: only for products found in other hours (`files`,
    /// `identities`), and none of the lines already taken from it.
    Others {
        files: Vec<&'a str>,
        identities: Vec<&'a str>,
        taken: &'a HashSet<String>,
    },
}

fn pass2(
    u: &Unit,
    follow: &Follow,
    again: &Again,
    stop: &Shutdown,
    data: &mut Vec<u8>,
) -> Option<UnitResult> {
    let index = u.index().ok().flatten();
    match again {
        Again::Others {
            files, identities, ..
        } => {
            let wanted = match &index {
                Some(ix) => {
                    files.iter().any(|f| ix.may_contain_value(SetKind::File, f))
                        || identities
                            .iter()
                            .any(|i| ix.may_contain_value(SetKind::Identity, i))
                }
                None => !(files.is_empty() && identities.is_empty()),
            };
            if !wanted {
                return None;
            }
        }
        _ => {
            if index.is_some_and(|ix| !ix.may_hold(follow)) {
                return None;
            }
        }
    }
    let mut r = UnitResult::default();
    let mut pick = |raw: &[u8]| match again {
        Again::All => follow.check_any(raw),
        Again::Unmatched => follow.check(raw),
        Again::Others { taken, .. } => follow
            .check(raw)
            .map(|l| l.filter(|l| !taken.contains(&l.to_line()))),
    };
    scan(
        u,
        stop,
        &mut r,
        &mut pick,
        &|chunk, f| follow.candidates(chunk).for_each(&mut *f),
        data,
        0,
    );
    Some(r)
}

/// Runs `work` over `items` on `threads` threads, each with a scratch buffer of its own
/// from `pool` (kept between calls, so its pages are touched once); results in the order
/// of `items`.
fn parallel<T: Sync, R: Send + Default>(
    items: &[T],
    pool: &[std::sync::Mutex<Vec<u8>>],
    work: &(dyn Fn(&T, &mut Vec<u8>) -> R + Sync),
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let threads = pool.len().clamp(1, items.len().max(1));
    let slots: Vec<std::sync::Mutex<Option<R>>> = (0..items.len())
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    std::thread::scope(|s| {
        for scratch in &pool[..threads] {
            s.spawn(|| {
                let mut data = scratch.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = work(item, &mut data);
                    *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or_default()
        })
        .collect()
}

fn units(dirs: &[PathBuf], stats: &mut SearchStats) -> Result<Vec<Unit>, Error> {
    let mut units = Vec::new();
    for d in dirs {
        let clusters = store::clusters_of(d)
            .map_err(|e| Error::Failed(format!("cannot read {}: {e}", d.display())))?;
        if clusters.is_empty() {
            tracing::warn!(
                "trace: {} holds no archive (no <cluster>/YYYY/ nor YYYY/ directories)",
                d.display()
            );
        }
        for (cluster, dir) in clusters {
            stats.clusters += 1;
            let hours = store::list_hours(&dir)
                .map_err(|e| Error::Failed(format!("cannot read {}: {e}", dir.display())))?;
            for h in hours {
                units.push(Unit {
                    start: store::hour_start(&h.hour),
                    cluster: cluster.clone(),
                    dir: dir.clone(),
                    hour: h.hour,
                    zst: h.zst,
                    idx: h.idx,
                });
            }
        }
    }
    units.sort_by(|a, b| (&a.hour, &a.cluster).cmp(&(&b.hour, &b.cluster)));
    stats.hours = units.len();
    Ok(units)
}

/// How much decompressed text pass 1 may hold in memory, over all threads.
const HOLD_BUDGET: usize = 512 << 20;

/// Where each name (file name or identity token) of the lines taken was taken from.
#[derive(Default)]
struct Taken {
    files: HashMap<String, BTreeSet<usize>>,
    identities: HashMap<String, BTreeSet<usize>>,
}

impl Taken {
    fn note(&mut self, unit: usize, l: &ArchiveLine) {
        self.files
            .entry(l.file_name().to_owned())
            .or_default()
            .insert(unit);
        if let Some(id) = &l.identity {
            self.identities
                .entry(identity_token(id))
                .or_default()
                .insert(unit);
        }
    }

    /// The names of `follow` that were taken elsewhere than `unit` (or nowhere).
    fn elsewhere<'a>(&self, follow: &'a Follow, unit: usize) -> (Vec<&'a str>, Vec<&'a str>) {
        let only_here = |m: &HashMap<String, BTreeSet<usize>>, n: &str| {
            m.get(n).is_some_and(|u| u.len() == 1 && u.contains(&unit))
        };
        (
            follow
                .files()
                .filter(|f| !only_here(&self.files, f))
                .collect(),
            follow
                .identities()
                .filter(|i| !only_here(&self.identities, i))
                .collect(),
        )
    }
}

/// Searches the archives of `cfg.dirs` (blocking; stops early when `stop` is cancelled).
pub fn search(cfg: &Config, stop: &Shutdown) -> Result<Found, Error> {
    let mut stats = SearchStats::default();
    let units = units(&cfg.dirs, &mut stats)?;
    let q = &cfg.query;
    let matcher = q.matcher();
    let cap = (HOLD_BUDGET / cfg.threads.max(1)).clamp(16 << 20, 128 << 20);
    let pool: Vec<std::sync::Mutex<Vec<u8>>> = (0..cfg.threads.max(1))
        .map(|_| std::sync::Mutex::new(Vec::new()))
        .collect();
    let mut lives = Lives::new();
    // Earliest and latest time of what was found, for the window of pass 2.
    let mut span: Option<(Stamp, Stamp)> = None;
    let mut read_in_pass1 = vec![false; units.len()];
    // Hours held whole in pass 1, with the lines taken from them.
    let mut covered: HashMap<usize, HashSet<String>> = HashMap::new();
    let mut taken = Taken::default();
    let mut at = 0;
    let mut wave = cfg.threads * 2;
    while at < units.len() && !stop.is_cancelled() {
        let end = (at + wave).min(units.len());
        let results = parallel(&units[at..end], &pool, &|u, data| {
            pass1(u, &matcher, stop, data, cap)
        });
        for (i, r) in results.into_iter().enumerate() {
            let unit = at + i;
            stats.skipped_by_time += usize::from(r.skipped_by_time);
            stats.skipped_by_index += usize::from(r.skipped_by_index);
            stats.bad_indexes += usize::from(r.bad_index);
            stats.unreadable += usize::from(r.unreadable);
            let read = !(r.skipped_by_time || r.skipped_by_index);
            stats.read += usize::from(read);
            read_in_pass1[unit] = read;
            stats.bytes += r.bytes;
            stats.malformed += r.malformed;
            stats.matched += r.lines.len();
            if r.covered {
                let lines = r.lines.iter().chain(&r.related);
                covered.insert(unit, lines.map(ArchiveLine::to_line).collect());
            }
            for l in r.lines.into_iter().chain(r.related) {
                let lo = l.pub_time.map_or(l.time, |p| p.min(l.time));
                span = Some(match span {
                    None => (lo, l.time),
                    Some((a, b)) => (a.min(lo), b.max(l.time)),
                });
                taken.note(unit, &l);
                lives.add(&units[unit].cluster, l);
            }
        }
        at = end;
        if let Some(n) = q.limit
            && lives.products() >= n
        {
            // Bounded memory: only the first n products go on.
            lives.retain_first(n);
            if at < units.len() {
                stats.limited = true;
                break;
            }
        }
        wave = (wave * 2).min(64);
    }
    if let Some((first, last)) = span
        && !stop.is_cancelled()
    {
        let follow = lives.follow(q);
        let from =
            crate::core::archive::hour_path(Stamp(first.0 - jiff::SignedDuration::from_hours(1)));
        let follow_for = jiff::SignedDuration::try_from(cfg.follow)
            .unwrap_or(jiff::SignedDuration::from_hours(24));
        let to = crate::core::archive::hour_path(Stamp(
            last.0.checked_add(follow_for).unwrap_or(last.0),
        ));
        let todo: Vec<(usize, Again)> = units
            .iter()
            .enumerate()
            .filter(|(_, u)| u.hour >= from && u.hour <= to)
            .map(|(i, _)| {
                let again = match covered.get(&i) {
                    Some(lines) => {
                        let (files, identities) = taken.elsewhere(&follow, i);
                        Again::Others {
                            files,
                            identities,
                            taken: lines,
                        }
                    }
                    None if read_in_pass1[i] => Again::Unmatched,
                    None => Again::All,
                };
                (i, again)
            })
            .collect();
        let results = parallel(&todo, &pool, &|(i, again), data| {
            pass2(&units[*i], &follow, again, stop, data)
        });
        for ((i, _), r) in todo.iter().zip(results) {
            let Some(r) = r else { continue };
            stats.followed += 1;
            stats.bytes += r.bytes;
            if !read_in_pass1[*i] {
                stats.malformed += r.malformed;
                stats.unreadable += usize::from(r.unreadable);
            }
            for l in r.lines {
                lives.add(&units[*i].cluster, l);
            }
        }
    }
    Ok(Found {
        lives: lives.finish(q.limit),
        stats,
    })
}
