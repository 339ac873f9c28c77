//! The archive on disk: one directory per cluster, one file per hour, shared by the
//! `archive` daemon (which writes it) and `trace` (which reads it).
//!
//! ```text
//! <dir>/<cluster>/YYYY/MM/DD/HH.log       the open hour (and hours not compressed yet)
//! <dir>/<cluster>/YYYY/MM/DD/HH.log.zst   a closed hour, zstd
//! <dir>/<cluster>/YYYY/MM/DD/HH.idx       its sidecar index (core::archive::index)
//! ```
//! The hour is the UTC hour the lines were **archived** in. A `.log` only ever grows by
//! whole lines; a crash can leave one partial last line, which readers skip and the
//! [`Writer`] cuts when it opens the file again. Compression writes `.idx` and `.log.zst`
//! under temporary names, renames them, and only then removes the `.log`, so a crash at
//! any point leaves either the `.log` (compressed again at the next start) or both; a
//! reader prefers the `.log.zst` when both exist.
//!
//! Blocking I/O only: the daemon calls it from `spawn_blocking` and a thread of its own.

use crate::core::Stamp;
use crate::core::archive::{ArchiveLine, IndexBuilder, complete_len, hour_path, split_lines};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

pub const LOG: &str = ".log";
pub const ZST: &str = ".log.zst";
pub const IDX: &str = ".idx";
const TMP: &str = ".tmp";

/// How much of a file is read (or decompressed) at once.
pub const CHUNK: usize = 4 << 20;

/// `<base><ext>`: `…/DD/HH` + `.log`.
pub fn with_ext(base: &Path, ext: &str) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(ext);
    PathBuf::from(s)
}

/// The path of an hour (`YYYY/MM/DD/HH`, as [`hour_path`] gives it) without extension.
pub fn hour_base(cluster_dir: &Path, hour: &str) -> PathBuf {
    cluster_dir.join(hour)
}

/// The start of an hour `YYYY/MM/DD/HH`; `None` if it is not one.
pub fn hour_start(hour: &str) -> Option<Stamp> {
    let b = hour.as_bytes();
    let shape = b.len() == 13
        && b.iter().enumerate().all(|(i, c)| {
            matches!(i, 4 | 7 | 10) == (*c == b'/') && (*c == b'/' || c.is_ascii_digit())
        });
    if !shape {
        return None;
    }
    let n = |r: std::ops::Range<usize>| hour[r].parse::<i16>().ok();
    // `DateTime::new` refuses what is out of range (`Date::at` would panic).
    let t = jiff::civil::DateTime::new(
        n(0..4)?,
        n(5..7)? as i8,
        n(8..10)? as i8,
        n(11..13)? as i8,
        0,
        0,
        0,
    )
    .ok()?
    .to_zoned(jiff::tz::TimeZone::UTC)
    .ok()?;
    Some(Stamp(t.timestamp()))
}

/// What is on disk for one hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hour {
    /// `YYYY/MM/DD/HH`
    pub hour: String,
    pub log: bool,
    pub zst: bool,
    pub idx: bool,
}

fn numbered(dir: &Path, width: usize) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.len() == width && name.bytes().all(|c| c.is_ascii_digit()) && e.path().is_dir() {
            out.push(name.to_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Every hour of one cluster's archive, oldest first. A missing directory has none.
pub fn list_hours(cluster_dir: &Path) -> io::Result<Vec<Hour>> {
    let mut hours: Vec<Hour> = Vec::new();
    if !cluster_dir.exists() {
        return Ok(hours);
    }
    for y in numbered(cluster_dir, 4)? {
        let yd = cluster_dir.join(&y);
        for m in numbered(&yd, 2)? {
            let md = yd.join(&m);
            for d in numbered(&md, 2)? {
                let dd = md.join(&d);
                let mut day: std::collections::BTreeMap<String, Hour> = Default::default();
                for e in fs::read_dir(&dd)? {
                    let name = e?.file_name();
                    let Some(name) = name.to_str() else { continue };
                    let (hh, ext) = name.split_at(name.len().min(2));
                    if !(hh.len() == 2 && hh.bytes().all(|c| c.is_ascii_digit())) {
                        continue;
                    }
                    let h = day.entry(hh.to_owned()).or_insert_with(|| Hour {
                        hour: format!("{y}/{m}/{d}/{hh}"),
                        log: false,
                        zst: false,
                        idx: false,
                    });
                    match ext {
                        LOG => h.log = true,
                        ZST => h.zst = true,
                        IDX => h.idx = true,
                        _ => {}
                    }
                }
                hours.extend(day.into_values().filter(|h| h.log || h.zst));
            }
        }
    }
    Ok(hours)
}

/// The archive directories under `dir`: `dir` itself when it holds `YYYY` directories
/// (one cluster's archive, named after its last component), else each subdirectory that
/// does (`archive --dir` holds `<cluster>/`). Sorted by cluster name.
pub fn clusters_of(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let name_of = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string())
    };
    if !numbered(dir, 4)?.is_empty() {
        let canon = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
        return Ok(vec![(name_of(&canon), dir.to_owned())]);
    }
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() && !numbered(&p, 4)?.is_empty() {
            out.push((name_of(&p), p));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads an hour's text in pieces of whole lines (the last piece may end with a partial
/// line) and hands each to `f`, which returns false to stop early. `.log.zst` is
/// decompressed on the fly, so an hour never has to fit in memory.
pub fn for_each_chunk(
    path: &Path,
    compressed: bool,
    f: &mut dyn FnMut(&[u8]) -> bool,
) -> io::Result<()> {
    for_each_chunk_in(path, compressed, &mut Vec::new(), 0, f).map(|_| ())
}

/// [`for_each_chunk`] reading into `data` (a buffer the caller reuses, so its pages are
/// touched once), which keeps the whole hour while it fits in `cap` bytes: returns the
/// hour's length when it did (the text is then `data[..len]`), `None` when it did not
/// fit (or `f` stopped early).
pub fn for_each_chunk_in(
    path: &Path,
    compressed: bool,
    data: &mut Vec<u8>,
    cap: usize,
    f: &mut dyn FnMut(&[u8]) -> bool,
) -> io::Result<Option<usize>> {
    let file = File::open(path)?;
    let mut reader: Box<dyn Read> = if compressed {
        Box::new(zstd::stream::read::Decoder::new(file)?)
    } else {
        Box::new(file)
    };
    let mut kept = cap > 0;
    // data[done..filled]: read, not yet handed to `f`.
    let (mut done, mut filled) = (0usize, 0usize);
    loop {
        if data.len() - filled < CHUNK / 2 {
            if kept && filled + CHUNK > cap {
                kept = false;
            }
            if !kept && done > 0 {
                data.copy_within(done..filled, 0);
                filled -= done;
                done = 0;
            }
            if data.len() - filled < CHUNK / 2 {
                // Grows while kept, or for one line longer than the buffer (lines are
                // bounded by the largest message the broker accepted).
                data.resize(filled + CHUNK, 0);
            }
        }
        let n = match reader.read(&mut data[filled..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            if filled > done && !f(&data[done..filled]) {
                return Ok(None);
            }
            return Ok(kept.then_some(filled));
        }
        filled += n;
        if filled > cap {
            kept = false;
        }
        // Hand over large pieces: fewer, longer searches.
        if filled - done < CHUNK / 2 {
            continue;
        }
        let cut = done + complete_len(&data[done..filled]);
        if cut > done {
            if !f(&data[done..cut]) {
                return Ok(None);
            }
            done = cut;
        }
    }
}

/// How many bytes of the file at `path` are whole lines, reading only its tail.
fn whole_lines_len(file: &mut File) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let mut end = len;
    let mut block = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(block.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut block[..n])?;
        if let Some(i) = memchr::memrchr(b'\n', &block[..n]) {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Cuts a partial last line off a `.log` (what a crash mid-write leaves); returns how
/// many bytes were cut.
pub fn repair(path: &Path) -> io::Result<u64> {
    let mut f = OpenOptions::new().read(true).write(true).open(path)?;
    if !f.metadata()?.is_file() {
        return Ok(0);
    }
    let len = f.metadata()?.len();
    let keep = whole_lines_len(&mut f)?;
    if keep < len {
        f.set_len(keep)?;
        f.sync_all()?;
    }
    Ok(len - keep)
}

/// What compressing one hour did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compressed {
    pub lines: u64,
    /// Lines that did not parse (kept in the file, left out of the index).
    pub malformed: u64,
    /// A partial last line, cut.
    pub cut: u64,
    pub raw_bytes: u64,
    pub zst_bytes: u64,
    pub idx_bytes: u64,
}

fn sync_dir(dir: &Path) {
    // Makes the renames durable; not every file system allows it, and nothing is lost
    // if this fails (the .log is still there until removed after it).
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Compresses a closed hour: `HH.log` → `HH.log.zst` plus its sidecar `HH.idx`, then
/// removes the `.log`. Reads the hour once, streaming. `stop` abandons it (temporary
/// files removed, the `.log` kept for the next start).
pub fn compress_hour(
    cluster_dir: &Path,
    hour: &str,
    level: i32,
    stop: &AtomicBool,
) -> io::Result<Compressed> {
    let base = hour_base(cluster_dir, hour);
    let log = with_ext(&base, LOG);
    let (zst, idx) = (with_ext(&base, ZST), with_ext(&base, IDX));
    let (zst_tmp, idx_tmp) = (with_ext(&zst, TMP), with_ext(&idx, TMP));
    let result = (|| {
        let mut n = Compressed::default();
        let mut builder = IndexBuilder::new();
        let mut enc = zstd::stream::write::Encoder::new(File::create(&zst_tmp)?, level)?;
        let mut failed = None;
        for_each_chunk(&log, false, &mut |chunk| {
            if stop.load(Ordering::Relaxed) {
                failed = Some(io::Error::new(io::ErrorKind::Interrupted, "stopping"));
                return false;
            }
            let whole = complete_len(chunk);
            n.cut += (chunk.len() - whole) as u64;
            for raw in split_lines(&chunk[..whole]) {
                match ArchiveLine::parse(raw) {
                    Ok(l) => {
                        builder.add(&l);
                        n.lines += 1;
                    }
                    Err(_) => n.malformed += 1,
                }
            }
            n.raw_bytes += whole as u64;
            if let Err(e) = enc.write_all(&chunk[..whole]) {
                failed = Some(e);
                return false;
            }
            true
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        let file = enc.finish()?;
        file.sync_all()?;
        n.zst_bytes = file.metadata()?.len();
        let index = builder.finish();
        n.idx_bytes = index.len() as u64;
        let mut f = File::create(&idx_tmp)?;
        f.write_all(&index)?;
        f.sync_all()?;
        fs::rename(&idx_tmp, &idx)?;
        fs::rename(&zst_tmp, &zst)?;
        if let Some(dir) = base.parent() {
            sync_dir(dir);
        }
        fs::remove_file(&log)?;
        Ok(n)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&zst_tmp);
        let _ = fs::remove_file(&idx_tmp);
    }
    result
}

/// Removes every hour older than `cutoff` (`YYYY/MM/DD/HH`, exclusive) and the
/// directories left empty; returns how many hours went.
pub fn remove_before(cluster_dir: &Path, cutoff: &str) -> io::Result<usize> {
    let mut removed = 0;
    for h in list_hours(cluster_dir)? {
        if h.hour.as_str() >= cutoff {
            break;
        }
        let base = hour_base(cluster_dir, &h.hour);
        for ext in [ZST, IDX, LOG] {
            match fs::remove_file(with_ext(&base, ext)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        removed += 1;
        // Day, month and year directories, once empty (remove_dir refuses non-empty).
        let mut dir = base.parent().map(Path::to_owned);
        while let Some(d) = dir {
            if d == cluster_dir || fs::remove_dir(&d).is_err() {
                break;
            }
            dir = d.parent().map(Path::to_owned);
        }
    }
    Ok(removed)
}

/// The open hour.
#[derive(Debug)]
struct Open {
    hour: String,
    path: PathBuf,
    /// `None` after a failed write: reopened (and cut back to `len`) before the next.
    file: Option<File>,
    /// Bytes of whole lines written and kept: the file is cut back to this after a
    /// failed or unsynced write, so a batch written again never leaves half a copy.
    len: u64,
}

/// Appends batches of lines to the hour files of one cluster directory.
#[derive(Debug)]
pub struct Writer {
    dir: PathBuf,
    open: Option<Open>,
    /// The newest hour on disk or written: the writer never goes back to an older hour
    /// (a clock set back keeps writing the newest one), so an hour is never reopened
    /// after it was compressed.
    newest: Option<String>,
    prepared: bool,
    /// Hours closed and not yet handed over by [`take_closed`](Self::take_closed).
    closed: Vec<String>,
}

impl Writer {
    /// Touches nothing yet: see [`prepare`](Self::prepare).
    pub fn new(cluster_dir: impl Into<PathBuf>) -> Writer {
        Writer {
            dir: cluster_dir.into(),
            open: None,
            newest: None,
            prepared: false,
            closed: Vec::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_prepared(&self) -> bool {
        self.prepared
    }

    /// The start-up repair: creates the directory, cuts the partial last line of every
    /// `.log` (a crash mid-write), learns the newest hour, and returns the hours left
    /// uncompressed that are closed at `now` (also in [`take_closed`](Self::take_closed)).
    /// Idempotent until it succeeds.
    pub fn prepare(&mut self, now: Stamp) -> io::Result<Vec<String>> {
        fs::create_dir_all(&self.dir)?;
        let hours = list_hours(&self.dir)?;
        self.newest = hours.last().map(|h| h.hour.clone());
        let current = self.hour_for(now);
        let mut closed = Vec::new();
        for h in hours.iter().filter(|h| h.log) {
            let cut = repair(&with_ext(&hour_base(&self.dir, &h.hour), LOG))?;
            if cut > 0 {
                tracing::warn!(
                    "archive: cut a partial last line ({cut} bytes) off {}/{}{LOG} (left by a crash)",
                    self.dir.display(),
                    h.hour
                );
            }
            if h.hour != current {
                closed.push(h.hour.clone());
            }
        }
        self.prepared = true;
        self.closed.extend(closed.iter().cloned());
        Ok(closed)
    }

    /// The hour a batch archived at `now` goes to: `now`'s, or the newest hour already
    /// written if the clock went back.
    pub fn hour_for(&self, now: Stamp) -> String {
        let h = hour_path(now);
        match &self.newest {
            Some(n) if *n > h => n.clone(),
            _ => h,
        }
    }

    /// The open hour, if any.
    pub fn open_hour(&self) -> Option<&str> {
        self.open.as_ref().map(|o| o.hour.as_str())
    }

    /// Appends `lines` (whole lines) to `hour`'s `.log`, then `fsync`s it when `sync`,
    /// closing the open hour first if it is another one (see
    /// [`take_closed`](Self::take_closed)). On error nothing of `lines` stays in the file
    /// (it is cut back before the next write), so the caller writes the same batch again
    /// later.
    pub fn append(&mut self, hour: &str, lines: &[u8], sync: bool) -> io::Result<()> {
        if self.open.as_ref().is_some_and(|o| o.hour != hour) {
            self.close()?;
        }
        if self.open.is_none() {
            let path = with_ext(&hour_base(&self.dir, hour), LOG);
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            let mut file = OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .open(&path)?;
            let len = whole_lines_len(&mut file)?;
            if len < file.metadata()?.len() {
                file.set_len(len)?;
            }
            self.open = Some(Open {
                hour: hour.to_owned(),
                path,
                file: Some(file),
                len,
            });
            if self.newest.as_deref().is_none_or(|n| n < hour) {
                self.newest = Some(hour.to_owned());
            }
        }
        let Some(o) = self.open.as_mut() else {
            return Ok(());
        };
        match write_at_end(o, lines, sync) {
            Ok(()) => {
                o.len += lines.len() as u64;
                Ok(())
            }
            Err(e) => {
                o.file = None;
                Err(e)
            }
        }
    }

    /// The hours closed since the last call, oldest first (to compress).
    pub fn take_closed(&mut self) -> Vec<String> {
        std::mem::take(&mut self.closed)
    }

    /// `fsync`s the open hour (the `interval` policy).
    pub fn sync(&mut self) -> io::Result<()> {
        match self.open.as_ref().and_then(|o| o.file.as_ref()) {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }

    /// Closes the open hour when it is older than `hour` (the clock moved on with no
    /// report to write).
    pub fn close_before(&mut self, hour: &str) -> io::Result<()> {
        if self.open.as_ref().is_some_and(|o| o.hour.as_str() < hour) {
            self.close()?;
        }
        Ok(())
    }

    /// Syncs and closes the open hour (then in [`take_closed`](Self::take_closed)).
    pub fn close(&mut self) -> io::Result<()> {
        let Some(o) = self.open.as_mut() else {
            return Ok(());
        };
        if let Some(f) = &o.file {
            f.sync_all()?;
        } else {
            // After a failed write: make sure nothing of it stays.
            let f = OpenOptions::new().write(true).open(&o.path)?;
            if f.metadata()?.len() > o.len {
                f.set_len(o.len)?;
            }
            f.sync_all()?;
        }
        if let Some(o) = self.open.take() {
            self.closed.push(o.hour);
        }
        Ok(())
    }
}

/// Writes `lines` at the end of the open hour, reopening it (and cutting it back to the
/// bytes kept) after an earlier failure.
fn write_at_end(o: &mut Open, lines: &[u8], sync: bool) -> io::Result<()> {
    if o.file.is_none() {
        let f = OpenOptions::new().read(true).append(true).open(&o.path);
        let f = match f {
            Ok(f) => f,
            // Removed meanwhile (an operator cleaning up after a full disk): start again.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                o.len = 0;
                OpenOptions::new()
                    .read(true)
                    .append(true)
                    .create(true)
                    .open(&o.path)?
            }
            Err(e) => return Err(e),
        };
        let meta = f.metadata()?;
        if meta.is_file() {
            if meta.len() > o.len {
                f.set_len(o.len)?;
            } else {
                // Shorter than what we wrote: somebody cut it; keep what is there.
                o.len = meta.len();
            }
        }
        o.file = Some(f);
    }
    let Some(f) = o.file.as_mut() else {
        return Ok(());
    };
    f.write_all(lines)?;
    if sync {
        f.sync_data()?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
