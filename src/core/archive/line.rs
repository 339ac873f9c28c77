//! One archive line per report (SPEC §4.10), written by `archive` and read back by `trace`.
//!
//! ```text
//! <time> <code> <source> <client>@<host> <flow> <from_cluster> <relPath> <baseUrl> <message> <topic> [key=value ...]\n
//! ```
//! Every field is one token escaped by [`super::escape`] (`-` = empty or unknown), so a
//! line is always one line and splits on single spaces. Times are UTC in the Sarracenia
//! `pubTime` form `YYYYMMDDTHHMMSS.fff`, with 6 or 9 fraction digits only when needed to
//! keep the value exact; they sort as text and `grep` finds the stamp a message carried.
//!
//! `<source>` and `<client>` are as the pump's `Attributor::who` tells them (`route`'s
//! stamps, else the same rules without the index), passed in as a [`Who`]; `<host>` is the
//! consumer host the report states.
//!
//! `<time>` is the report time: the consumer's completion time (`timeCompleted`, sr3) when
//! the report states one (and it is not more than [`FUTURE_TOLERANCE_S`] after the archive
//! time), else the time the report was archived; [`TimeSource::Archived`] makes it always
//! the latter. The hour file is the daemon's choice ([`hour_path`] of the archive time), so
//! a late report sits in the hour it arrived and the index's time range says so.
//!
//! After the ten SPEC fields come `key=value` pairs, each written only when known, in this
//! order (a reader keeps keys it does not know in [`ArchiveLine::other`], so new keys can
//! be added without breaking old readers):
//! - `pub=` the product's `pubTime`: it survives every pump and sr3's rewriting of relPath,
//!   so (pubTime, file name) names one publication across pumps, and `time - pub` is the
//!   delivery lag;
//! - `id=<method>,<value>` the product's identity/sum: links a product's reports when the
//!   file was renamed on the way;
//! - `dur=` the consumer's own transfer duration in seconds;
//! - `size=` bytes of the product (or of this part);
//! - `hops=` how many pumps forwarded the report (`pumpwatch_hops`), to tell a local
//!   report from one that crossed pumps;
//! - `to=` the product's destination clusters, comma separated: where it was still going.
//!
//! A line ends with `\n`; [`ArchiveLine::parse`] refuses one without it (a write cut short
//! by a crash), so a partial last line is never read as a shorter, valid one.

use super::escape::{EscapeError, Extra, escape_into, unescape};
use crate::core::attribution::Who;
use crate::core::report::{Identity, Report};
use crate::core::stamp::Stamp;
use serde::Serialize;

/// The header `route` stamps with the number of pumps a report crossed (route's `H_HOPS`).
pub const HOPS_HEADER: &str = "pumpwatch_hops";

/// The mandatory fields, in line order (used in error messages).
pub const FIELDS: [&str; 10] = [
    "time",
    "code",
    "source",
    "client@host",
    "flow",
    "from_cluster",
    "relPath",
    "baseUrl",
    "message",
    "topic",
];

/// One report as archived. Text fields are empty when unknown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArchiveLine {
    pub time: Stamp,
    pub code: u16,
    pub source: String,
    pub client: String,
    pub host: String,
    pub flow: String,
    pub from_cluster: String,
    pub rel_path: String,
    pub base_url: String,
    pub message: String,
    pub topic: String,
    pub pub_time: Option<Stamp>,
    pub identity: Option<Identity>,
    pub duration_s: Option<f64>,
    pub size: Option<u64>,
    pub hops: Option<u32>,
    pub to_clusters: Vec<String>,
    /// `key=value` pairs this version does not know, kept in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other: Vec<(String, String)>,
}

/// Which time a line carries first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeSource {
    /// The report's completion time when it states one, else the time it was archived.
    #[default]
    Completed,
    /// Always the time it was archived.
    Archived,
}

/// Why a line could not be read. Never quotes the line: it may be hostile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("partial line (no end of line)")]
    Partial,
    #[error("line break inside the line")]
    Break,
    #[error("{found} fields, expected at least 10")]
    Fields { found: usize },
    #[error("empty field {at} (double or trailing space)")]
    EmptyField { at: usize },
    #[error("field {field}: {error}")]
    Escape {
        field: &'static str,
        error: EscapeError,
    },
    #[error("invalid {0}")]
    Invalid(&'static str),
    #[error("field {at}: expected key=value")]
    NotPair { at: usize },
    #[error("key {0:?} given twice")]
    Duplicate(String),
}

/// Times a line can hold: from year 0000 (the text form has four year digits) to the end
/// of jiff's range, late in 9999.
pub fn representable(t: Stamp) -> bool {
    let n = t.0.as_nanosecond();
    (MIN_NANOS..=MAX_NANOS).contains(&n)
}

/// 0000-01-01T00:00:00Z and jiff's last instant, 9999-12-30T22:00:00.999999999Z, in
/// nanoseconds.
const MIN_NANOS: i128 = -62_167_219_200 * 1_000_000_000;
const MAX_NANOS: i128 = 253_402_207_201 * 1_000_000_000 - 1;

fn clamp(t: Stamp) -> Stamp {
    if representable(t) {
        return t;
    }
    let n = t.0.as_nanosecond().clamp(MIN_NANOS, MAX_NANOS);
    jiff::Timestamp::from_nanosecond(n).map(Stamp).unwrap_or(t)
}

/// The borrowed fields one line is written from, so a report can be written without
/// building an [`ArchiveLine`] first.
struct View<'a> {
    time: Stamp,
    code: u16,
    text: [&'a str; 9],
    pub_time: Option<Stamp>,
    identity: Option<&'a Identity>,
    duration_s: Option<f64>,
    size: Option<u64>,
    hops: Option<u32>,
    to_clusters: &'a [String],
    other: &'a [(String, String)],
}

/// A completion time later than this after the report was archived is a broken clock or
/// a lie (a report cannot be archived before it was sent); the archive time is used.
pub const FUTURE_TOLERANCE_S: i64 = 3600;

fn report_time(r: &Report, archived_at: Stamp, time: TimeSource) -> Stamp {
    let latest = archived_at.0.as_nanosecond() + i128::from(FUTURE_TOLERANCE_S) * 1_000_000_000;
    match (time, r.time_completed) {
        (TimeSource::Completed, Some(t)) if representable(t) && t.0.as_nanosecond() <= latest => t,
        _ => clamp(archived_at),
    }
}

fn hops_of(r: &Report) -> Option<u32> {
    let h = r.extra.get(HOPS_HEADER)?.as_i64()?;
    u32::try_from(h).ok()
}

impl<'a> View<'a> {
    fn of_report(r: &'a Report, who: &'a Who, archived_at: Stamp, time: TimeSource) -> View<'a> {
        View {
            time: report_time(r, archived_at, time),
            code: r.code,
            text: [
                who.source.as_deref().unwrap_or(""),
                who.client.as_deref().unwrap_or(""),
                r.host.as_deref().unwrap_or(""),
                r.flow.as_deref().unwrap_or(""),
                r.from_cluster.as_deref().unwrap_or(""),
                &r.rel_path,
                &r.base_url,
                r.message.as_deref().unwrap_or(""),
                &r.topic,
            ],
            pub_time: r.pub_time.filter(|t| representable(*t)),
            identity: r.identity.as_ref(),
            duration_s: r.duration_s.filter(|d| d.is_finite()),
            size: r.size_bytes,
            hops: hops_of(r),
            to_clusters: &r.to_clusters,
            other: &[],
        }
    }

    fn of_line(l: &'a ArchiveLine) -> View<'a> {
        View {
            time: l.time,
            code: l.code,
            text: [
                &l.source,
                &l.client,
                &l.host,
                &l.flow,
                &l.from_cluster,
                &l.rel_path,
                &l.base_url,
                &l.message,
                &l.topic,
            ],
            pub_time: l.pub_time,
            identity: l.identity.as_ref(),
            duration_s: l.duration_s,
            size: l.size,
            hops: l.hops,
            to_clusters: &l.to_clusters,
            other: &l.other,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        let [source, client, host, flow, from, rel, base, message, topic] = self.text;
        write_time(self.time, out);
        out.push(b' ');
        write_u64(u64::from(self.code), out);
        out.push(b' ');
        escape_into(source, Extra::None, out);
        out.push(b' ');
        escape_into(client, Extra::At, out);
        out.push(b'@');
        escape_into(host, Extra::At, out);
        for f in [flow, from, rel, base, message, topic] {
            out.push(b' ');
            escape_into(f, Extra::None, out);
        }
        if let Some(t) = self.pub_time {
            out.extend_from_slice(b" pub=");
            write_time(t, out);
        }
        if let Some(id) = self.identity {
            out.extend_from_slice(b" id=");
            write_identity(id, out);
        }
        if let Some(d) = self.duration_s.filter(|d| d.is_finite()) {
            // Debug is the shortest text that reads back to the same f64.
            use std::io::Write;
            let _ = write!(out, " dur={d:?}");
        }
        if let Some(s) = self.size {
            out.extend_from_slice(b" size=");
            write_u64(s, out);
        }
        if let Some(h) = self.hops {
            out.extend_from_slice(b" hops=");
            write_u64(u64::from(h), out);
        }
        if !self.to_clusters.is_empty() {
            out.extend_from_slice(b" to=");
            for (i, c) in self.to_clusters.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                escape_into(c, Extra::Comma, out);
            }
        }
        for (i, (k, v)) in self.other.iter().enumerate() {
            // Keys that would not read back (bad, known or repeated) are dropped rather
            // than make the whole line unreadable.
            let repeated = self.other[..i].iter().any(|(o, _)| o == k);
            if valid_key(k.as_bytes()) && !KNOWN.contains(&k.as_str()) && !repeated {
                out.push(b' ');
                out.extend_from_slice(k.as_bytes());
                out.push(b'=');
                escape_into(v, Extra::None, out);
            }
        }
        out.push(b'\n');
    }
}

/// Writes the archive line of `r` (as [`ArchiveLine::from_report`] then
/// [`ArchiveLine::write`] would) without copying its fields.
pub fn write_report(
    r: &Report,
    who: &Who,
    archived_at: Stamp,
    time: TimeSource,
    out: &mut Vec<u8>,
) {
    View::of_report(r, who, archived_at, time).write(out);
}

const KNOWN: [&str; 6] = ["pub", "id", "dur", "size", "hops", "to"];

fn valid_key(k: &[u8]) -> bool {
    !k.is_empty()
        && k.len() <= 32
        && k.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

impl ArchiveLine {
    /// The line for `r`, attributed to `who` (the pump's `Attributor::who`), archived at
    /// `archived_at`; the time is the completion time when the report states one (see
    /// [`TimeSource`]).
    pub fn from_report(r: &Report, who: &Who, archived_at: Stamp) -> ArchiveLine {
        Self::from_report_with(r, who, archived_at, TimeSource::Completed)
    }

    pub fn from_report_with(
        r: &Report,
        who: &Who,
        archived_at: Stamp,
        time: TimeSource,
    ) -> ArchiveLine {
        let v = View::of_report(r, who, archived_at, time);
        let [source, client, host, flow, from, rel, base, message, topic] =
            v.text.map(str::to_owned);
        ArchiveLine {
            time: v.time,
            code: v.code,
            source,
            client,
            host,
            flow,
            from_cluster: from,
            rel_path: rel,
            base_url: base,
            message,
            topic,
            pub_time: v.pub_time,
            identity: v.identity.cloned(),
            duration_s: v.duration_s,
            size: v.size,
            hops: v.hops,
            to_clusters: v.to_clusters.to_vec(),
            other: Vec::new(),
        }
    }

    /// Appends the line, `\n` included. Times outside years 0000–9999 are written clamped
    /// and a non-finite duration is left out (`from_report` never produces either).
    pub fn write(&self, out: &mut Vec<u8>) {
        let mut v = View::of_line(self);
        v.time = clamp(v.time);
        v.pub_time = v.pub_time.map(clamp);
        v.write(out);
    }

    /// The line as text, `\n` included.
    pub fn to_line(&self) -> String {
        let mut out = Vec::with_capacity(256);
        self.write(&mut out);
        // The writer emits whole characters and ASCII escapes only.
        String::from_utf8(out).unwrap_or_default()
    }

    /// The file name: the last component of relPath.
    pub fn file_name(&self) -> &str {
        file_name(&self.rel_path)
    }

    /// Reads one line, which must end with `\n` (a `\r` before it is allowed).
    pub fn parse(line: &[u8]) -> Result<ArchiveLine, LineError> {
        let body = line.strip_suffix(b"\n").ok_or(LineError::Partial)?;
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        if memchr::memchr2(b'\n', b'\r', body).is_some() {
            return Err(LineError::Break);
        }
        let mut tokens = body.split(|&c| c == b' ');
        let mut f: [&[u8]; 10] = [b""; 10];
        for (i, slot) in f.iter_mut().enumerate() {
            match tokens.next() {
                Some(t) if !t.is_empty() => *slot = t,
                Some(_) => return Err(LineError::EmptyField { at: i + 1 }),
                None => return Err(LineError::Fields { found: i }),
            }
        }
        let text = |i: usize| {
            unescape(f[i]).map_err(|error| LineError::Escape {
                field: FIELDS[i],
                error,
            })
        };
        let time = parse_time(f[0]).ok_or(LineError::Invalid("time"))?;
        let code = parse_u64(f[1])
            .and_then(|c| u16::try_from(c).ok())
            .ok_or(LineError::Invalid("code"))?;
        let at = memchr::memchr(b'@', f[3]).ok_or(LineError::Invalid("client@host"))?;
        let (client, host) = (&f[3][..at], &f[3][at + 1..]);
        if memchr::memchr(b'@', host).is_some() {
            return Err(LineError::Invalid("client@host"));
        }
        let part = |t: &[u8]| {
            unescape(t).map_err(|error| LineError::Escape {
                field: "client@host",
                error,
            })
        };
        let mut line = ArchiveLine {
            time,
            code,
            source: text(2)?,
            client: part(client)?,
            host: part(host)?,
            flow: text(4)?,
            from_cluster: text(5)?,
            rel_path: text(6)?,
            base_url: text(7)?,
            message: text(8)?,
            topic: text(9)?,
            pub_time: None,
            identity: None,
            duration_s: None,
            size: None,
            hops: None,
            to_clusters: Vec::new(),
            other: Vec::new(),
        };
        let mut seen = 0u8;
        for (n, t) in tokens.enumerate() {
            let at = 11 + n;
            if t.is_empty() {
                return Err(LineError::EmptyField { at });
            }
            let eq = memchr::memchr(b'=', t).ok_or(LineError::NotPair { at })?;
            let (k, v) = (&t[..eq], &t[eq + 1..]);
            if !valid_key(k) {
                return Err(LineError::NotPair { at });
            }
            let known = KNOWN.iter().position(|name| name.as_bytes() == k);
            if let Some(i) = known {
                if seen & (1 << i) != 0 {
                    return Err(LineError::Duplicate(KNOWN[i].to_owned()));
                }
                seen |= 1 << i;
            }
            let bad = |key: &'static str| LineError::Invalid(key);
            match known {
                Some(0) => line.pub_time = Some(parse_time(v).ok_or(bad("pub"))?),
                Some(1) => line.identity = Some(parse_identity(v).ok_or(bad("id"))?),
                Some(2) => {
                    let d = std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<f64>().ok())
                        .filter(|d| d.is_finite())
                        .ok_or(bad("dur"))?;
                    line.duration_s = Some(d);
                }
                Some(3) => line.size = Some(parse_u64(v).ok_or(bad("size"))?),
                Some(4) => {
                    line.hops = Some(
                        parse_u64(v)
                            .and_then(|h| u32::try_from(h).ok())
                            .ok_or(bad("hops"))?,
                    )
                }
                Some(_) => {
                    line.to_clusters = v
                        .split(|&c| c == b',')
                        .map(unescape)
                        .collect::<Result<_, _>>()
                        .map_err(|_| bad("to"))?
                }
                None => {
                    // Keys are ASCII by `valid_key`.
                    let key = String::from_utf8_lossy(k).into_owned();
                    if line.other.iter().any(|(o, _)| *o == key) {
                        return Err(LineError::Duplicate(key));
                    }
                    let value = unescape(v).map_err(|_| LineError::Invalid("extra value"))?;
                    line.other.push((key, value));
                }
            }
        }
        Ok(line)
    }
}

fn parse_identity(v: &[u8]) -> Option<Identity> {
    let comma = memchr::memchr(b',', v)?;
    let (m, val) = (&v[..comma], &v[comma + 1..]);
    if memchr::memchr(b',', val).is_some() {
        return None;
    }
    Some(Identity {
        method: unescape(m).ok()?,
        value: unescape(val).ok()?,
    })
}

/// The identity as the `id=` value writes it (`method,value`, each escaped): one text per
/// identity, used as a key by the index and the trace.
pub fn identity_token(id: &Identity) -> String {
    let mut out = Vec::with_capacity(id.method.len() + id.value.len() + 1);
    write_identity(id, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

fn write_identity(id: &Identity, out: &mut Vec<u8>) {
    escape_into(&id.method, Extra::Comma, out);
    out.push(b',');
    escape_into(&id.value, Extra::Comma, out);
}

/// The lines of a buffer, each with its `\n`; a last piece without one is yielded too,
/// so that [`ArchiveLine::parse`] reports it as [`LineError::Partial`].
pub fn split_lines(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    buf.split_inclusive(|&c| c == b'\n')
}

/// How many bytes of `buf` are whole lines: what a restarted daemon keeps of the hour it
/// was writing when it died (the rest is a partial last line).
pub fn complete_len(buf: &[u8]) -> usize {
    memchr::memrchr(b'\n', buf).map_or(0, |i| i + 1)
}

/// The file name: the last component of a relPath (a trailing `/` ignored).
pub fn file_name(rel_path: &str) -> &str {
    let t = rel_path.trim_end_matches('/');
    t.rsplit('/').next().unwrap_or(t)
}

fn parse_u64(t: &[u8]) -> Option<u64> {
    if t.is_empty() || t.len() > 20 || !t.iter().all(u8::is_ascii_digit) {
        return None;
    }
    t.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn write_u64(mut n: u64, out: &mut Vec<u8>) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// A time as lines write it (`YYYYMMDDTHHMMSS.fff`, more digits when needed).
pub fn time_text(t: Stamp) -> String {
    let mut out = Vec::with_capacity(25);
    write_time(clamp(t), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// `YYYYMMDDTHHMMSS.fff`, `.ffffff` or `.fffffffff`: the shortest exact fraction.
fn parse_time(t: &[u8]) -> Option<Stamp> {
    // The strict shape keeps the text canonical: one spelling per time.
    let ok = matches!(t.len(), 19 | 22 | 25)
        && t[8] == b'T'
        && t[15] == b'.'
        && t.iter()
            .enumerate()
            .all(|(i, c)| i == 8 || i == 15 || c.is_ascii_digit());
    if !ok {
        return None;
    }
    // Validated ASCII above.
    Stamp::parse(std::str::from_utf8(t).ok()?)
}

fn write_time(t: Stamp, out: &mut Vec<u8>) {
    let (secs, nanos) = secs_nanos(t);
    let (y, mo, d, h, mi, s) = civil(secs);
    let mut b = [0u8; 25];
    let mut put = |at: usize, v: u32, width: usize| {
        let mut v = v;
        for i in (0..width).rev() {
            b[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, y as u32, 4);
    put(4, mo, 2);
    put(6, d, 2);
    put(9, h, 2);
    put(11, mi, 2);
    put(13, s, 2);
    put(16, nanos, 9);
    b[8] = b'T';
    b[15] = b'.';
    let len = if nanos.is_multiple_of(1_000_000) {
        19
    } else if nanos.is_multiple_of(1_000) {
        22
    } else {
        25
    };
    out.extend_from_slice(&b[..len]);
}

/// Whole seconds (floored) and the nanoseconds after them, without 128-bit division.
fn secs_nanos(t: Stamp) -> (i64, u32) {
    let (s, n) = (t.0.as_second(), t.0.subsec_nanosecond());
    if n < 0 {
        (s - 1, (n + 1_000_000_000) as u32)
    } else {
        (s, n as u32)
    }
}

/// Days since 1970-01-01 to the civil date and time of day (Howard Hinnant's algorithm;
/// `stamp` keeps its own copy private). Years are 0..=9999 here (see [`representable`]).
fn civil(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400) as u32;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y.clamp(0, 9999),
        m,
        d,
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
    )
}

/// The hour file an archive time belongs to, relative to the cluster's directory:
/// `YYYY/MM/DD/HH` (UTC); the daemon adds `.log` / `.log.zst`.
pub fn hour_path(t: Stamp) -> String {
    let (secs, _) = secs_nanos(clamp(t));
    let (y, mo, d, h, _, _) = civil(secs);
    format!("{y:04}/{mo:02}/{d:02}/{h:02}")
}

#[cfg(test)]
#[path = "line_tests.rs"]
mod tests;
