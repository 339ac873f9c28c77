//! `pumpwatch trace` (SPEC §4.10): searches the archives that `pumpwatch archive` writes
//! and prints the life of each matching product in time order: every pump, host and
//! client it passed, codes, durations and delays.
//!
//! `--dir` takes one or more directories, each either what `archive --dir` was given
//! (holding `<cluster>/YYYY/...`, one subdirectory per pump) or one pump's own directory
//! (`<dir>/<cluster>`, the cluster named after its last component); several pumps'
//! archives (copied or mounted side by side) are searched as one.
//!
//! How it searches is in [`search`](mod@search): hours are skipped by their time and sidecar index,
//! the rest are read in parallel, and a second pass collects the whole life of each
//! product found.

pub mod search;

use super::{Common, Error, UsageError, parse_duration};
use crate::core::Stamp;
use crate::core::archive::{FileMatch, Query, render_json, render_text};
use crate::core::code::CodeRange;
use crate::shutdown::Shutdown;
pub use search::{Found, SearchStats, search};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// `pumpwatch trace` flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Regex over each archive line as written (escaped; see the README), like grep -E.
    #[arg(value_name = "REGEX")]
    pub pattern: Option<String>,
    /// Archive directories: what `archive --dir` was given, or one pump's <dir>/<cluster>.
    #[arg(long, required = true, num_args = 1.., value_name = "DIR")]
    pub dir: Vec<PathBuf>,
    /// Products of this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Reports by this client (consumer account).
    #[arg(long)]
    pub client: Option<String>,
    /// Reports from this consumer host.
    #[arg(long)]
    pub host: Option<String>,
    /// Reports of this flow.
    #[arg(long)]
    pub flow: Option<String>,
    /// This file name (the last component of relPath, exact): uses the hour indexes.
    #[arg(long, value_name = "NAME", conflicts_with = "file_regex")]
    pub file: Option<String>,
    /// relPath matching this regex.
    #[arg(long, value_name = "REGEX")]
    pub file_regex: Option<String>,
    /// Reports with these codes: 4xx, 499, 200-299, or a comma list.
    #[arg(long, value_name = "CODES")]
    pub code: Option<CodeRange>,
    /// Reports at or after this time: 20240101T1200, 2024-01-01T12:00Z, or an age (2h).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Reports before this time (same forms).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// At most this many products, the first found (0 = all) [default: 100].
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Follow a product's reports this long after the last one found [default: 1d].
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub follow: Option<Duration>,
    /// One JSON object per product and line.
    #[arg(long)]
    pub json: bool,
    /// Threads reading hours in parallel [default: the cores, at most 8].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Print what was read and skipped on stderr.
    #[arg(long)]
    pub stats: bool,
}

/// Everything `trace` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub dirs: Vec<PathBuf>,
    pub query: Query,
    pub follow: Duration,
    pub json: bool,
    pub threads: usize,
    pub stats: bool,
}

/// The default `--limit`.
pub const DEFAULT_LIMIT: usize = 100;

/// A `--since`/`--until` value: a time stamp in any form pumps write, a date, or an age.
pub fn parse_time(s: &str, now: Stamp) -> Result<Stamp, String> {
    if let Some(t) = Stamp::parse(s.trim()) {
        return Ok(t);
    }
    let age = parse_duration(s).map_err(|_| {
        format!("{s:?} is neither a time (20240101T1200, 2024-01-01T12:00:00Z) nor an age (2h)")
    })?;
    let d = jiff::SignedDuration::try_from(age).map_err(|e| e.to_string())?;
    now.0
        .checked_sub(d)
        .map(Stamp)
        .map_err(|_| format!("{s:?} is too far back"))
}

impl Config {
    pub fn from_args(a: Args, _common: &Common) -> Result<Config, UsageError> {
        for d in &a.dir {
            if !d.is_dir() {
                return Err(UsageError(format!(
                    "invalid --dir {}: not a directory",
                    d.display()
                )));
            }
        }
        let now = Stamp(jiff::Timestamp::now());
        let time = |flag: &str, v: &Option<String>| match v {
            Some(s) => parse_time(s, now)
                .map(Some)
                .map_err(|e| UsageError(format!("invalid {flag}: {e}"))),
            None => Ok(None),
        };
        let since = time("--since", &a.since)?;
        let until = time("--until", &a.until)?;
        if let (Some(s), Some(u)) = (since, until)
            && s >= u
        {
            return Err(UsageError::new("--since must be before --until"));
        }
        let regex = match &a.pattern {
            Some(p) => Some(
                regex::bytes::RegexBuilder::new(p)
                    .size_limit(64 << 20)
                    .build()
                    .map_err(|e| UsageError(format!("invalid REGEX: {}", last_line(&e))))?,
            ),
            None => None,
        };
        let file =
            match (a.file, &a.file_regex) {
                (Some(n), _) => Some(FileMatch::Name(n)),
                (None, Some(r)) => Some(FileMatch::Regex(regex::Regex::new(r).map_err(|e| {
                    UsageError(format!("invalid --file-regex: {}", last_line(&e)))
                })?)),
                (None, None) => None,
            };
        let limit = match a.limit.unwrap_or(DEFAULT_LIMIT) {
            0 => None,
            n => Some(n),
        };
        if a.threads == Some(0) {
            return Err(UsageError::new("invalid --threads 0: must be at least 1"));
        }
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Config {
            dirs: a.dir,
            query: Query {
                source: a.source,
                client: a.client,
                host: a.host,
                flow: a.flow,
                file,
                code: a.code,
                since,
                until,
                regex,
                limit,
            },
            follow: a.follow.unwrap_or(Duration::from_secs(24 * 3600)),
            json: a.json,
            threads: a.threads.unwrap_or(cores.min(8)),
            stats: a.stats,
        })
    }
}

fn last_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .lines()
        .last()
        .unwrap_or("invalid regex")
        .trim()
        .to_owned()
}

/// `pumpwatch trace`: searches, prints the lives on stdout and a summary on stderr.
pub async fn run(cfg: Config, shutdown: Shutdown) -> Result<(), Error> {
    let (json, stats) = (cfg.json, cfg.stats);
    let limit = cfg.query.limit;
    let found = tokio::task::spawn_blocking(move || search(&cfg, &shutdown))
        .await
        .map_err(|e| Error::from_join("trace", e))??;
    let text = if json {
        render_json(&found.lives)
    } else {
        render_text(&found.lives)
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    let s = &found.stats;
    if s.malformed > 0 {
        eprintln!(
            "pumpwatch trace: warning: skipped {} malformed or partial lines",
            s.malformed
        );
    }
    if s.unreadable > 0 {
        eprintln!(
            "pumpwatch trace: warning: {} hour files could not be read (see above)",
            s.unreadable
        );
    }
    if found.lives.is_empty() {
        eprintln!("pumpwatch trace: no product matches");
    } else if s.limited
        && let Some(n) = limit
    {
        eprintln!("pumpwatch trace: showing the first {n} products; --limit N for more (0 = all)");
    }
    if stats {
        eprintln!("pumpwatch trace: {s}");
    }
    Ok(())
}
