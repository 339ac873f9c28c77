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
//! 3. **Pass 2** reads the hours that may hold one of those products ([`Index::may_hold`],
//!    from an hour before the first line found to `--follow` after the last) for their
//!    other lines, so each product shows its whole life across every pump, not only the
//!    lines the query matched.
//!
//! Malformed and partial lines met on the way are skipped and counted (one warning).

use super::Config;
use crate::cmd::Error;
use crate::cmd::archive::store::{self, IDX, LOG, ZST, hour_base, with_ext};
use crate::core::Stamp;
use crate::core::archive::{ArchiveLine, Follow, Index, Life, LineError, Lives, Matcher};
use crate::shutdown::Shutdown;
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

    /// Streams the hour's lines; a `.log` compressed meanwhile is read from its `.zst`.
    fn read(&self, f: &mut dyn FnMut(&[u8]) -> bool) -> std::io::Result<()> {
        let base = self.base();
        if self.zst {
            return store::for_each_chunk(&with_ext(&base, ZST), true, f);
        }
        match store::for_each_chunk(&with_ext(&base, LOG), false, f) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                store::for_each_chunk(&with_ext(&base, ZST), true, f)
            }
            r => r,
        }
    }
}

#[derive(Debug, Default)]
struct UnitResult {
    lines: Vec<ArchiveLine>,
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

fn scan(u: &Unit, stop: &Shutdown, result: &mut UnitResult, pick: &mut Pick, candidates: &Cands) {
    let r = u.read(&mut |chunk| {
        result.bytes += chunk.len() as u64;
        candidates(chunk, &mut |raw| match pick(raw) {
            Ok(Some(l)) => result.lines.push(l),
            Ok(None) => {}
            Err(_) => result.malformed += 1,
        });
        !stop.is_cancelled()
    });
    if let Err(e) = r {
        tracing::warn!(
            "trace: cannot read {}/{} ({}): {e}",
            u.dir.display(),
            u.hour,
            u.cluster
        );
        result.unreadable = true;
    }
}

fn pass1(u: &Unit, m: &Matcher, stop: &Shutdown) -> UnitResult {
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
    scan(u, stop, &mut r, &mut |raw| m.check(raw), &|chunk, f| {
        m.candidates(chunk).for_each(&mut *f)
    });
    r
}

fn pass2(u: &Unit, follow: &Follow, all: bool, stop: &Shutdown) -> Option<UnitResult> {
    match u.index() {
        Ok(Some(ix)) if !ix.may_hold(follow) => return None,
        _ => {}
    }
    let mut r = UnitResult::default();
    let mut pick = |raw: &[u8]| {
        if all {
            follow.check_any(raw)
        } else {
            follow.check(raw)
        }
    };
    scan(u, stop, &mut r, &mut pick, &|chunk, f| {
        follow.candidates(chunk).for_each(&mut *f)
    });
    Some(r)
}

/// Runs `work` over `items` on `threads` threads; results in the order of `items`.
fn parallel<T: Sync, R: Send + Default>(
    items: &[T],
    threads: usize,
    work: &(dyn Fn(&T) -> R + Sync),
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let threads = threads.clamp(1, items.len().max(1));
    let mut results: Vec<R> = Vec::with_capacity(items.len());
    results.resize_with(items.len(), R::default);
    let slots: Vec<std::sync::Mutex<Option<R>>> = (0..items.len())
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = work(item);
                    *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                }
            });
        }
    });
    for (i, slot) in slots.into_iter().enumerate() {
        if let Some(r) = slot.into_inner().unwrap_or_else(|p| p.into_inner()) {
            results[i] = r;
        }
    }
    results
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

/// Searches the archives of `cfg.dirs` (blocking; stops early when `stop` is cancelled).
pub fn search(cfg: &Config, stop: &Shutdown) -> Result<Found, Error> {
    let mut stats = SearchStats::default();
    let units = units(&cfg.dirs, &mut stats)?;
    let q = &cfg.query;
    let matcher = q.matcher();
    let mut lives = Lives::new();
    // Earliest and latest time of what was found, for the window of pass 2.
    let mut span: Option<(Stamp, Stamp)> = None;
    let mut read_in_pass1 = vec![false; units.len()];
    let mut at = 0;
    let mut wave = cfg.threads * 2;
    while at < units.len() && !stop.is_cancelled() {
        let end = (at + wave).min(units.len());
        let results = parallel(&units[at..end], cfg.threads, &|u| pass1(u, &matcher, stop));
        for (i, r) in results.into_iter().enumerate() {
            stats.skipped_by_time += usize::from(r.skipped_by_time);
            stats.skipped_by_index += usize::from(r.skipped_by_index);
            stats.bad_indexes += usize::from(r.bad_index);
            stats.unreadable += usize::from(r.unreadable);
            let read = !(r.skipped_by_time || r.skipped_by_index);
            stats.read += usize::from(read);
            read_in_pass1[at + i] = read;
            stats.bytes += r.bytes;
            stats.malformed += r.malformed;
            stats.matched += r.lines.len();
            for l in r.lines {
                let lo = l.pub_time.map_or(l.time, |p| p.min(l.time));
                span = Some(match span {
                    None => (lo, l.time),
                    Some((a, b)) => (a.min(lo), b.max(l.time)),
                });
                lives.add(&units[at + i].cluster, l);
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
        let todo: Vec<(usize, &Unit)> = units
            .iter()
            .enumerate()
            .filter(|(_, u)| u.hour >= from && u.hour <= to)
            .collect();
        let results = parallel(&todo, cfg.threads, &|(i, u)| {
            pass2(u, &follow, !read_in_pass1[*i], stop)
        });
        for ((i, u), r) in todo.iter().zip(results) {
            let Some(r) = r else { continue };
            stats.followed += 1;
            stats.bytes += r.bytes;
            if !read_in_pass1[*i] {
                stats.malformed += r.malformed;
                stats.unreadable += usize::from(r.unreadable);
            }
            for l in r.lines {
                lives.add(&u.cluster, l);
            }
        }
    }
    Ok(Found {
        lives: lives.finish(q.limit),
        stats,
    })
}
