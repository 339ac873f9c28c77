//! What `pumpwatch trace` asks of archive lines and how it turns them into each product's
//! life across pumps.
//!
//! A search runs in two passes so that a product found by one report shows its whole life
//! (every pump, host and client it passed), not only the reports the query matched:
//! 1. every line goes through [`Matcher::check`]; hits go to [`Lives::add`], tagged with
//!    the cluster whose archive held them. [`Lives::retain_first`] then applies the limit.
//! 2. [`Lives::follow`] gives a [`Follow`]: every line goes through [`Follow::check`],
//!    which returns the lines of the products already found that pass 1 did not take;
//!    they go to [`Lives::add`] too. [`super::index::Index::may_hold`] skips hours.
//!
//! [`Lives::finish`] gives the lives in time order; [`render_text`] and [`render_json`]
//! print them.
//!
//! **One product across pumps.** Two lines are the same product when they share a key:
//! (pubTime, identity), for identities that name content (not `cod`, whose value is an
//! algorithm name, and at least 8 characters); (pubTime, file name), which survive sr3's
//! rewriting of relPath; and, for a line with neither, its relPath. pubTime is part of the
//! identity key because the same content published twice (an empty file, a daily file
//! that did not change) is two products. Keys are joined transitively (union-find), so a
//! renamed copy joins its product through the identity.
//!
//! **Duplicates.** The same report archived twice (a crash between write and ack, so the
//! broker delivered it again) is the same line in the same cluster, but for its time when
//! the report states no completion time (the archive time is used, and differs): lines of
//! one cluster identical but for their time are shown once, at the earliest, and counted
//! in `duplicates`.

use super::escape::{Extra, escape, escape_into};
use super::line::{ArchiveLine, LineError, identity_token, time_text};
use crate::core::code::CodeRange;
use crate::core::report::Identity;
use crate::core::stamp::Stamp;
use memchr::memmem::Finder;
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// `--file`: a file name (the last component of relPath), or a regex over relPath.
#[derive(Debug, Clone)]
pub enum FileMatch {
    Name(String),
    Regex(regex::Regex),
}

/// What `trace` looks for. Every filter is optional; a line must pass all that are set.
/// Text filters compare whole fields (empty = unknown).
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub source: Option<String>,
    pub client: Option<String>,
    pub host: Option<String>,
    pub flow: Option<String>,
    pub file: Option<FileMatch>,
    pub code: Option<CodeRange>,
    /// The line's time is at or after `since`...
    pub since: Option<Stamp>,
    /// ...and before `until`.
    pub until: Option<Stamp>,
    /// Over the whole line as written (escaped, without its `\n`), like `grep -E`.
    pub regex: Option<regex::bytes::Regex>,
    /// At most this many products (the earliest ones).
    pub limit: Option<usize>,
}

impl Query {
    /// Whether `line` passes every filter, the regex included (matched against the line as
    /// written).
    pub fn matches(&self, line: &ArchiveLine) -> bool {
        self.matches_fields(line)
            && self.regex.as_ref().is_none_or(|re| {
                let mut buf = Vec::with_capacity(256);
                line.write(&mut buf);
                re.is_match(strip_eol(&buf))
            })
    }

    /// Every filter but the regex.
    pub fn matches_fields(&self, l: &ArchiveLine) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.source, &l.source)
            && eq(&self.client, &l.client)
            && eq(&self.host, &l.host)
            && eq(&self.flow, &l.flow)
            && self.code.as_ref().is_none_or(|c| c.contains(l.code))
            && self.since.is_none_or(|s| l.time >= s)
            && self.until.is_none_or(|u| l.time < u)
            && match &self.file {
                None => true,
                Some(FileMatch::Name(n)) => l.file_name() == n,
                Some(FileMatch::Regex(re)) => re.is_match(&l.rel_path),
            }
    }

    /// The query ready to run over raw lines.
    pub fn matcher(&self) -> Matcher {
        let mut needles = Vec::new();
        let mut token = |prefix: &[u8], v: &str, extra: Extra, suffix: &[u8]| {
            let mut n = prefix.to_vec();
            escape_into(v, extra, &mut n);
            n.extend_from_slice(suffix);
            needles.push(Finder::new(&n).into_owned());
        };
        // The file name is written inside relPath; as a substring its escaped form is
        // exact except for the special tokens of the empty and `-` values.
        if let Some(FileMatch::Name(n)) = &self.file
            && !n.is_empty()
            && n != "-"
        {
            token(b"", n, Extra::None, b"");
        }
        if let Some(s) = &self.source {
            token(b" ", s, Extra::None, b" ");
        }
        if let Some(c) = &self.client {
            token(b" ", c, Extra::At, b"@");
        }
        if let Some(h) = &self.host {
            token(b"@", h, Extra::At, b" ");
        }
        if let Some(f) = &self.flow {
            token(b" ", f, Extra::None, b" ");
        }
        let buffer_regex = self.regex.as_ref().and_then(|re| buffer_regex(re.as_str()));
        Matcher {
            query: self.clone(),
            needles,
            buffer_regex,
        }
    }
}

/// The line regex for searching a whole buffer of lines at once (`^`/`$` at every line
/// boundary), or `None` when the pattern could mean something else there (inline flags,
/// `\A`/`\z` text anchors): then every line is looked at.
fn buffer_regex(pattern: &str) -> Option<regex::bytes::Regex> {
    if pattern.contains("(?") || pattern.contains("\\A") || pattern.contains("\\z") {
        return None;
    }
    regex::bytes::RegexBuilder::new(pattern)
        .multi_line(true)
        .size_limit(64 << 20)
        .build()
        .ok()
}

fn strip_eol(raw: &[u8]) -> &[u8] {
    let r = raw.strip_suffix(b"\n").unwrap_or(raw);
    r.strip_suffix(b"\r").unwrap_or(r)
}

/// A [`Query`] with the byte patterns that let most lines be refused before parsing.
#[derive(Debug, Clone)]
pub struct Matcher {
    query: Query,
    needles: Vec<Finder<'static>>,
    /// The regex in multi-line mode, to find candidate lines in a whole buffer.
    buffer_regex: Option<regex::bytes::Regex>,
}

impl Matcher {
    pub fn query(&self) -> &Query {
        &self.query
    }

    /// Cheap test on the raw line: false means the line cannot match (for lines as
    /// [`ArchiveLine::write`] writes them).
    pub fn may_match(&self, raw: &[u8]) -> bool {
        self.needles.iter().all(|f| f.find(raw).is_some())
            && self
                .query
                .regex
                .as_ref()
                .is_none_or(|re| re.is_match(strip_eol(raw)))
    }

    /// The lines of `buf` (whole lines, the last one possibly partial) that may match,
    /// each with its `\n`: a superset of the lines [`check`](Self::check) accepts. It jumps
    /// from one occurrence of the first byte pattern (the file name when one is asked for)
    /// or of the regex to the next, so a selective query never looks at most lines, and a
    /// regex runs over the whole buffer at once (like `grep`) instead of once per line.
    pub fn candidates<'a>(&'a self, buf: &'a [u8]) -> Candidates<'a> {
        let jump = match (self.needles.first(), &self.buffer_regex, &self.query.regex) {
            (Some(f), _, _) => Jump::Needle(f),
            (None, Some(re), _) => Jump::Regex(re),
            (None, None, Some(_)) | (None, None, None) => Jump::Every,
        };
        Candidates { buf, pos: 0, jump }
    }

    /// The line if it matches; `Ok(None)` if it does not; an error if it had to be parsed
    /// and was malformed or partial (trace skips it with a warning).
    pub fn check(&self, raw: &[u8]) -> Result<Option<ArchiveLine>, LineError> {
        if !self.may_match(raw) {
            return Ok(None);
        }
        let line = ArchiveLine::parse(raw)?;
        Ok(self.query.matches_fields(&line).then_some(line))
    }
}

enum Jump<'a> {
    Needle(&'a Finder<'static>),
    Regex(&'a regex::bytes::Regex),
    Every,
}

/// The candidate lines of a buffer: see [`Matcher::candidates`] and
/// [`Follow::candidates`].
pub struct Candidates<'a> {
    buf: &'a [u8],
    /// Always the start of a line.
    pos: usize,
    jump: Jump<'a>,
}

impl<'a> Iterator for Candidates<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let (buf, pos) = (self.buf, self.pos);
        if pos >= buf.len() {
            return None;
        }
        let hit = match &self.jump {
            Jump::Needle(f) => f.find(&buf[pos..]).map(|i| pos + i),
            // A match that starts at a line's `\n` (`$`) belongs to that line.
            Jump::Regex(re) => re.find_at(buf, pos).map(|m| m.start()),
            Jump::Every => Some(pos),
        };
        let Some(hit) = hit else {
            self.pos = buf.len();
            return None;
        };
        let hit = hit.min(buf.len() - 1);
        let start = memchr::memrchr(b'\n', &buf[pos..hit]).map_or(pos, |i| pos + i + 1);
        let end = memchr::memchr(b'\n', &buf[hit..]).map_or(buf.len(), |i| hit + i + 1);
        self.pos = end;
        Some(&buf[start..end])
    }
}

/// A key that names one product across pumps (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProductKey {
    Identity {
        pub_time: Option<Stamp>,
        token: String,
    },
    Published {
        pub_time: Stamp,
        file: String,
    },
    Path(String),
}

/// Whether an identity names the content (and so the product).
pub fn names_content(id: &Identity) -> bool {
    id.method != "cod" && id.value.len() >= 8
}

/// The keys of a line: one or two.
pub fn product_keys(l: &ArchiveLine) -> Vec<ProductKey> {
    let mut keys = Vec::with_capacity(2);
    if let Some(id) = l.identity.as_ref().filter(|id| names_content(id)) {
        keys.push(ProductKey::Identity {
            pub_time: l.pub_time,
            token: identity_token(id),
        });
    }
    if let Some(t) = l.pub_time {
        keys.push(ProductKey::Published {
            pub_time: t,
            file: l.file_name().to_owned(),
        });
    }
    if keys.is_empty() {
        keys.push(ProductKey::Path(l.rel_path.clone()));
    }
    keys
}

/// One report in a product's life: the line and the cluster whose archive held it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub cluster: String,
    #[serde(flatten)]
    pub line: ArchiveLine,
    /// The line's time minus the product's pubTime: how late this step was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_s: Option<f64>,
}

/// One product's life, in time order.
#[derive(Debug, Clone, Serialize)]
pub struct Life {
    /// The file name of the first event.
    pub file: String,
    /// The first non-empty source.
    pub source: String,
    pub pub_time: Option<Stamp>,
    pub identity: Option<Identity>,
    pub size: Option<u64>,
    pub first: Stamp,
    pub last: Stamp,
    /// Seconds from the first event to the last.
    pub span_s: f64,
    /// Clusters, hosts, clients and codes, in order of first appearance.
    pub pumps: Vec<String>,
    pub hosts: Vec<String>,
    pub clients: Vec<String>,
    pub codes: Vec<u16>,
    /// Identical lines of the same cluster shown once.
    pub duplicates: usize,
    pub events: Vec<Event>,
}

/// Lines grouped into products as they arrive (see the module doc).
#[derive(Debug, Default)]
pub struct Lives {
    keys: HashMap<ProductKey, usize>,
    parent: Vec<usize>,
    events: Vec<(usize, String, ArchiveLine)>,
    products: usize,
}

impl Lives {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many products so far.
    pub fn products(&self) -> usize {
        self.products
    }

    /// How many lines so far (duplicates included).
    pub fn lines(&self) -> usize {
        self.events.len()
    }

    fn find(&mut self, mut g: usize) -> usize {
        let mut root = g;
        while self.parent[root] != root {
            root = self.parent[root];
        }
        while self.parent[g] != root {
            let next = self.parent[g];
            self.parent[g] = root;
            g = next;
        }
        root
    }

    /// Adds a line archived by `cluster`.
    pub fn add(&mut self, cluster: &str, line: ArchiveLine) {
        let keys = product_keys(&line);
        let mut root = None;
        for k in &keys {
            if let Some(&g) = self.keys.get(k) {
                let r = self.find(g);
                root = match root {
                    None => Some(r),
                    Some(x) if x == r => Some(x),
                    Some(x) => {
                        self.parent[r] = x;
                        self.products -= 1;
                        Some(x)
                    }
                };
            }
        }
        let g = root.unwrap_or_else(|| {
            self.parent.push(self.parent.len());
            self.products += 1;
            self.parent.len() - 1
        });
        for k in keys {
            self.keys.entry(k).or_insert(g);
        }
        self.events.push((g, cluster.to_owned(), line));
    }

    /// Events grouped by product, products in order of their first event.
    fn groups(&mut self) -> Vec<Vec<(String, ArchiveLine)>> {
        let events = std::mem::take(&mut self.events);
        let mut by_root: HashMap<usize, Vec<(String, ArchiveLine)>> = HashMap::new();
        for (g, cluster, line) in events {
            let r = self.find(g);
            by_root.entry(r).or_default().push((cluster, line));
        }
        let mut groups: Vec<_> = by_root.into_values().collect();
        let first = |g: &Vec<(String, ArchiveLine)>| {
            g.iter()
                .map(|(_, l)| (l.time, l.file_name().to_owned(), l.rel_path.clone()))
                .min()
        };
        groups.sort_by_cached_key(first);
        groups
    }

    /// Keeps the `n` products whose first line is earliest (the limit of a query).
    pub fn retain_first(&mut self, n: usize) {
        if self.products <= n {
            return;
        }
        let groups = self.groups();
        *self = Lives::new();
        for (cluster, line) in groups.into_iter().take(n).flatten() {
            self.add(&cluster, line);
        }
    }

    /// What pass 2 needs to find the other lines of the products found so far.
    pub fn follow(&self, query: &Query) -> Follow {
        let mut files = HashSet::new();
        let mut identities = HashSet::new();
        for (_, _, l) in &self.events {
            files.insert(l.file_name().to_owned());
            if let Some(id) = &l.identity {
                identities.insert(identity_token(id));
            }
        }
        Follow::new(
            self.keys.keys().cloned().collect(),
            files,
            identities,
            query,
        )
    }

    /// The lives, earliest first, at most `limit` of them.
    pub fn finish(mut self, limit: Option<usize>) -> Vec<Life> {
        let mut groups = self.groups();
        if let Some(n) = limit {
            groups.truncate(n);
        }
        groups.into_iter().map(life).collect()
    }
}

fn push_new<T: PartialEq>(v: &mut Vec<T>, x: T) {
    if !v.contains(&x) {
        v.push(x);
    }
}

fn life(group: Vec<(String, ArchiveLine)>) -> Life {
    // Each line as written without its time: what a duplicate has in common.
    let mut rows: Vec<(Stamp, String, Vec<u8>, ArchiveLine)> = group
        .into_iter()
        .map(|(c, l)| {
            let mut w = Vec::with_capacity(256);
            l.write(&mut w);
            let rest = w.iter().position(|&b| b == b' ').map_or(0, |i| i + 1);
            w.drain(..rest);
            (l.time, c, w, l)
        })
        .collect();
    rows.sort_by(|a, b| (a.0, &a.1, &a.2).cmp(&(b.0, &b.1, &b.2)));
    let before = rows.len();
    let mut seen = HashSet::new();
    rows.retain(|(_, c, w, _)| seen.insert((c.clone(), w.clone())));
    let duplicates = before - rows.len();
    let lines: Vec<(String, ArchiveLine)> = rows.into_iter().map(|(_, c, _, l)| (c, l)).collect();
    let pub_time = lines.iter().find_map(|(_, l)| l.pub_time);
    let identity = lines
        .iter()
        .filter_map(|(_, l)| l.identity.as_ref())
        .find(|id| names_content(id))
        .or_else(|| lines.iter().find_map(|(_, l)| l.identity.as_ref()))
        .cloned();
    let (mut pumps, mut hosts, mut clients, mut codes) = (vec![], vec![], vec![], vec![]);
    for (c, l) in &lines {
        push_new(&mut pumps, c.clone());
        if !l.host.is_empty() {
            push_new(&mut hosts, l.host.clone());
        }
        if !l.client.is_empty() {
            push_new(&mut clients, l.client.clone());
        }
        push_new(&mut codes, l.code);
    }
    let first = lines
        .first()
        .map(|(_, l)| l.time)
        .unwrap_or(Stamp(jiff::Timestamp::UNIX_EPOCH));
    let last = lines.last().map(|(_, l)| l.time).unwrap_or(first);
    Life {
        file: lines
            .first()
            .map(|(_, l)| l.file_name().to_owned())
            .unwrap_or_default(),
        source: lines
            .iter()
            .map(|(_, l)| l.source.as_str())
            .find(|s| !s.is_empty())
            .unwrap_or("")
            .to_owned(),
        pub_time,
        identity,
        size: lines.iter().find_map(|(_, l)| l.size),
        first,
        last,
        span_s: seconds(first, last),
        pumps,
        hosts,
        clients,
        codes,
        duplicates,
        events: lines
            .into_iter()
            .map(|(cluster, line)| Event {
                lag_s: pub_time.map(|p| seconds(p, line.time)),
                cluster,
                line,
            })
            .collect(),
    }
}

fn seconds(from: Stamp, to: Stamp) -> f64 {
    (to.0.as_nanosecond() - from.0.as_nanosecond()) as f64 / 1e9
}

/// Above this many names pass 2 parses every line instead of searching for each name.
const MAX_FOLLOW_NEEDLES: usize = 4096;

/// Pass 2 of a search: the other lines of the products pass 1 found.
#[derive(Debug, Clone)]
pub struct Follow {
    keys: HashSet<ProductKey>,
    files: HashSet<String>,
    identities: HashSet<String>,
    /// Any of the names as written in a line (`None`: parse every line).
    prefilter: Option<regex::bytes::Regex>,
    query: Query,
}

impl Follow {
    fn new(
        keys: HashSet<ProductKey>,
        files: HashSet<String>,
        identities: HashSet<String>,
        query: &Query,
    ) -> Follow {
        let exact = files.iter().all(|f| !f.is_empty() && f != "-");
        let prefilter = (exact && files.len() + identities.len() <= MAX_FOLLOW_NEEDLES)
            .then(|| {
                let alts: Vec<String> = files
                    .iter()
                    .map(|f| regex::escape(&escape(f, Extra::None)))
                    .chain(
                        identities
                            .iter()
                            .map(|i| regex::escape(&format!(" id={i}"))),
                    )
                    .collect();
                regex::bytes::RegexBuilder::new(&alts.join("|"))
                    .size_limit(64 << 20)
                    .build()
                    .ok()
            })
            .flatten();
        Follow {
            keys,
            files,
            identities,
            prefilter,
            query: query.clone(),
        }
    }

    /// File names of the products followed (for [`super::index::Index::may_hold`]).
    pub fn files(&self) -> impl Iterator<Item = &str> {
        self.files.iter().map(String::as_str)
    }

    /// Identities of the products followed, as `id=` writes them.
    pub fn identities(&self) -> impl Iterator<Item = &str> {
        self.identities.iter().map(String::as_str)
    }

    /// Whether a parsed line belongs to a product followed.
    pub fn wants(&self, line: &ArchiveLine) -> bool {
        product_keys(line).iter().any(|k| self.keys.contains(k))
    }

    /// The line if it belongs to a product followed and the query did not take it in
    /// pass 1; errors as [`Matcher::check`].
    pub fn check(&self, raw: &[u8]) -> Result<Option<ArchiveLine>, LineError> {
        if self.prefilter.as_ref().is_some_and(|re| !re.is_match(raw)) {
            return Ok(None);
        }
        let line = ArchiveLine::parse(raw)?;
        Ok((self.wants(&line) && !self.query.matches(&line)).then_some(line))
    }

    /// The line if it belongs to a product followed, whether the query matches it or not:
    /// for hours pass 1 did not read (it stopped at the limit).
    pub fn check_any(&self, raw: &[u8]) -> Result<Option<ArchiveLine>, LineError> {
        if self.prefilter.as_ref().is_some_and(|re| !re.is_match(raw)) {
            return Ok(None);
        }
        let line = ArchiveLine::parse(raw)?;
        Ok(self.wants(&line).then_some(line))
    }

    /// The lines of `buf` that may belong to a product followed (a superset of what
    /// [`check_any`](Self::check_any) accepts), found by one search over the buffer.
    pub fn candidates<'a>(&'a self, buf: &'a [u8]) -> Candidates<'a> {
        let jump = match &self.prefilter {
            Some(re) => Jump::Regex(re),
            None => Jump::Every,
        };
        Candidates { buf, pos: 0, jump }
    }
}

// ---- rendering ----

fn list(items: &[String]) -> String {
    let mut out = Vec::new();
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        escape_into(s, Extra::Comma, &mut out);
    }
    String::from_utf8(out).unwrap_or_default()
}

impl Life {
    /// The text block of one product: a header line, a summary line, one line per event.
    /// Every field is escaped as in the archive, and the message is quoted, so no field
    /// can start a line of its own.
    pub fn write_text(&self, out: &mut String) {
        use std::fmt::Write;
        let e = |s: &str| escape(s, Extra::None);
        let _ = write!(out, "{} source={}", e(&self.file), e(&self.source));
        if let Some(p) = self.pub_time {
            let _ = write!(out, " pub={}", time_text(p));
        }
        if let Some(id) = &self.identity {
            let _ = write!(out, " id={}", identity_token(id));
        }
        if let Some(s) = self.size {
            let _ = write!(out, " size={s}");
        }
        let _ = write!(
            out,
            "\n  pumps={} hosts={} clients={} codes={} events={} span={:.3}s",
            list(&self.pumps),
            list(&self.hosts),
            list(&self.clients),
            self.codes
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(","),
            self.events.len(),
            self.span_s,
        );
        if self.duplicates > 0 {
            let _ = write!(out, " duplicates={}", self.duplicates);
        }
        out.push('\n');
        for ev in &self.events {
            let l = &ev.line;
            let _ = write!(
                out,
                "  {} {} {} {}@{} {}",
                l.time,
                e(&ev.cluster),
                l.code,
                escape(&l.client, Extra::At),
                escape(&l.host, Extra::At),
                e(&l.rel_path),
            );
            if !l.flow.is_empty() {
                let _ = write!(out, " flow={}", e(&l.flow));
            }
            if let Some(d) = l.duration_s {
                let _ = write!(out, " dur={d:.3}s");
            }
            if let Some(lag) = ev.lag_s {
                let _ = write!(out, " lag={lag:.3}s");
            }
            if let Some(h) = l.hops {
                let _ = write!(out, " hops={h}");
            }
            let _ = writeln!(out, " \"{}\"", escape(&l.message, Extra::Quoted));
        }
    }

    /// One JSON object on one line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The lives as text blocks separated by an empty line.
pub fn render_text(lives: &[Life]) -> String {
    let mut out = String::new();
    for (i, l) in lives.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        l.write_text(&mut out);
    }
    out
}

/// The lives as JSON lines: one object per product.
pub fn render_json(lives: &[Life]) -> String {
    let mut out = String::new();
    for l in lives {
        out.push_str(&l.to_json());
        out.push('\n');
    }
    out
}

#[cfg(test)]
#[path = "trace_tests.rs"]
mod tests;
