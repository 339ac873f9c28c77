//! What `serve` knows, pure: speedo readings in ([`Board::apply`]), per client, per
//! source and per (source, client) pair a window of history, counters, learned baselines
//! and health out. No clock and no I/O: `now` is passed in, so every rule is tested
//! without a broker.
//!
//! Counters survive a restart of `speedo`: a cumulative count that goes down is a restart
//! (speedo's counts are per run), so the last value before it is added to an offset, as
//! Prometheus does with counter resets. The errors of an interval are the difference of
//! the cumulative error counts (the body carries no per-interval error count).
//!
//! **Pairs.** In the admin view, the per-client speedos of each declared source's
//! `xr_<source>` are the pairs: a client that still receives other sources' products but
//! stopped receiving one source's is named for that pair (`cfs stopped on radar`). A pair
//! is judged with its client's thresholds. In a source's view the clients already are
//! that source's pairs.
//!
//! **Learning.** Every interval of a client and of a source teaches its baseline
//! (`core::baseline`, good files/s per hour of the week); pairs and the totals learn
//! nothing. The owner persists [`Board::learning`]'s changes and loads them back.
//!
//! **Scopes.** [`Scope`] narrows what is reported (`check --client`, and later one
//! account's own rows): a client with its pairs, or a source with its pairs.

use crate::cmd::speedo::{Counts, Decoded, Reading, Subject};
use crate::config::{Config as PumpConfig, Role, Thresholds};
use crate::core::baseline::{
    Baselines, DEFAULT_FLOOR, DEFAULT_MIN_DROP, Expectation, UnusualRule, WindowInterval,
    hour_of_week,
};
use crate::core::health::{self, Health, Interval, IntervalLag, Observed, State};
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

/// Whose view `serve` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// Everything in `xreport`, and the pairs from every declared `xr_<source>`.
    Admin,
    /// One source's `xr_<source>`: its products only.
    Source(String),
}

impl View {
    pub fn label(&self) -> String {
        match self {
            View::Admin => "admin".into(),
            View::Source(s) => format!("source {s}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Client,
    Source,
    /// One client's transfers of one source's products.
    Pair,
    /// The pump's (or the source's) totals.
    Total,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "client" => Some(Kind::Client),
            "source" => Some(Kind::Source),
            "pair" => Some(Kind::Pair),
            "total" => Some(Kind::Total),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Client => "client",
            Kind::Source => "source",
            Kind::Pair => "pair",
            Kind::Total => "total",
        }
    }
}

/// What a report is narrowed to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Scope {
    /// Everything the view holds.
    #[default]
    All,
    /// One client's row and its pairs.
    Client(String),
    /// One source's row and its pairs (in a source's view, its clients).
    Source(String),
}

impl Scope {
    /// Whether an entity shown as `kind`/`name` (a pair's `source`) is within. `within`
    /// is the source whose products a client row counts, when the rows are one source's
    /// view: there `?source=` is that source and its clients.
    fn admits(&self, kind: Kind, name: &str, source: Option<&str>, within: Option<&str>) -> bool {
        match self {
            Scope::All => true,
            Scope::Client(c) => matches!(kind, Kind::Client | Kind::Pair) && name == c,
            Scope::Source(s) => match kind {
                Kind::Source => name == s,
                Kind::Pair => source == Some(s.as_str()),
                Kind::Client => within == Some(s.as_str()),
                Kind::Total => false,
            },
        }
    }
}

/// Whose eyes a report is made for: what one logged-in account may see of the board
/// (SPEC §3: only a source and the admins read a source's reports; the page and the API
/// are ways of reading them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Access {
    /// Everything the view holds: role admin or feeder, the broker's `administrator`
    /// tag, the metrics token, or `--auth none`.
    Admin,
    /// One source: its own row, its products' clients (the admin view's pairs of that
    /// source, shown as clients, as in a source's own view) and its own row as totals.
    Source(String),
    /// One subscriber: its own client row (its deliveries across all sources), which is
    /// also its totals.
    Subscriber(String),
}

impl Access {
    pub fn label(&self) -> String {
        match self {
            Access::Admin => "admin".into(),
            Access::Source(s) => format!("source {s}"),
            Access::Subscriber(c) => format!("client {c}"),
        }
    }
}

/// One entity as an account sees it: in a source's eyes its pairs are its clients.
#[derive(Clone, Copy)]
struct Shown<'a> {
    kind: Kind,
    source: Option<&'a str>,
    /// The source whose products a client row counts (a source's view), for [`Scope`].
    within: Option<&'a str>,
    e: &'a Entity,
}

impl<'a> Shown<'a> {
    fn name(&self) -> &'a str {
        &self.e.name
    }

    fn within(&self, scope: &Scope) -> bool {
        scope.admits(self.kind, &self.e.name, self.source, self.within)
    }

    fn status(&self, now: Timestamp) -> EntityStatus {
        let mut s = self.e.status(now);
        if s.kind != self.kind {
            s.kind = self.kind;
            s.source = self.source.map(str::to_owned);
            s.label = s.name.clone();
        }
        s
    }
}

/// One interval's delivery lag, from the speedo's headers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LagPoint {
    pub p50: Option<f64>,
    pub p95: f64,
    pub max: Option<f64>,
    /// Lags it was taken over (`lag_count`, else the interval's good files, at least 1).
    pub count: u64,
}

/// One interval of history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub end: Timestamp,
    pub secs: f64,
    pub files: u64,
    pub bytes: u64,
    pub errors: u64,
    pub lag: Option<LagPoint>,
}

impl Point {
    fn per_s(&self, n: u64) -> f64 {
        if self.secs > 0.0 {
            n as f64 / self.secs
        } else {
            0.0
        }
    }

    fn interval(&self) -> Interval {
        Interval {
            end: self.end,
            secs: self.secs,
            good: self.files,
            errors: self.errors,
            lag: self.lag.map(|l| IntervalLag {
                p95: l.p95,
                count: l.count,
            }),
        }
    }
}

/// One client, source, pair, or the totals.
#[derive(Debug, Clone)]
pub struct Entity {
    pub kind: Kind,
    /// The client's name for a pair.
    pub name: String,
    /// The source of a pair.
    pub source: Option<String>,
    points: VecDeque<Point>,
    last: Option<Reading>,
    /// Counts before the last restarts of speedo.
    offset: Counts,
    pub restarts: u32,
    first_seen: Option<Timestamp>,
    last_good: Option<Timestamp>,
    /// When the last speedo arrived (serve's clock).
    heard: Option<Timestamp>,
    /// Declared in the configuration: kept while silent.
    declared: bool,
    pub health: Health,
    /// The baseline's verdict at the last evaluation.
    pub expectation: Expectation,
    /// The window's figures at the last evaluation.
    window: health::WindowSums,
    version: u64,
}

fn counts(r: &Reading) -> Counts {
    Counts {
        good: r.good,
        errors: r.errors,
        good_bytes: r.good_bytes,
        bad_bytes: r.bad_bytes,
    }
}

fn plus(a: Counts, b: Counts) -> Counts {
    Counts {
        good: a.good.saturating_add(b.good),
        errors: a.errors.saturating_add(b.errors),
        good_bytes: a.good_bytes.saturating_add(b.good_bytes),
        bad_bytes: a.bad_bytes.saturating_add(b.bad_bytes),
    }
}

fn later(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

impl Entity {
    fn new(kind: Kind, name: &str, declared: bool) -> Entity {
        Entity {
            kind,
            name: name.to_owned(),
            source: None,
            points: VecDeque::new(),
            last: None,
            offset: Counts::default(),
            restarts: 0,
            first_seen: None,
            last_good: None,
            heard: None,
            declared,
            health: Health::unknown("nothing seen yet"),
            expectation: Expectation::NotLearned,
            window: health::WindowSums::default(),
            version: 0,
        }
    }

    fn pair(source: &str, client: &str) -> Entity {
        Entity {
            source: Some(source.to_owned()),
            ..Entity::new(Kind::Pair, client, false)
        }
    }

    /// `cfs`, `source radar`, `cfs on radar`: how people read it.
    pub fn label(&self) -> String {
        match (self.kind, &self.source) {
            (Kind::Pair, Some(s)) => format!("{} on {s}", self.name),
            (Kind::Source, _) => format!("source {}", self.name),
            _ => self.name.clone(),
        }
    }

    /// Counts since serve started watching, speedo restarts included.
    pub fn totals(&self) -> Counts {
        plus(
            self.offset,
            self.last.as_ref().map(counts).unwrap_or_default(),
        )
    }

    pub fn last_point(&self) -> Option<&Point> {
        self.points.back()
    }

    pub fn points(&self) -> impl Iterator<Item = &Point> {
        self.points.iter()
    }

    pub fn last_good(&self) -> Option<Timestamp> {
        self.last_good
    }

    /// The latest interval's lag, if the speedo carried one.
    pub fn last_lag(&self) -> Option<LagPoint> {
        self.points.back().and_then(|p| p.lag)
    }

    /// The p95 lag over the window, at the last evaluation.
    pub fn window_lag_p95(&self) -> Option<f64> {
        self.window.lag_p95
    }

    /// Takes a reading; false when it is not newer than the last one (a duplicate).
    fn observe(&mut self, r: &Reading, lag: Option<LagPoint>, history: Duration) -> bool {
        let end = r.end.0;
        let errors = match &self.last {
            Some(prev) if end <= prev.end.0 => return false,
            Some(prev) => {
                let (p, c) = (counts(prev), counts(r));
                if c.good < p.good
                    || c.errors < p.errors
                    || c.good_bytes < p.good_bytes
                    || c.bad_bytes < p.bad_bytes
                {
                    // speedo restarted: its counts start again from zero.
                    self.offset = plus(self.offset, p);
                    self.restarts += 1;
                    r.errors
                } else {
                    c.errors - p.errors
                }
            }
            // The first reading covers all of speedo's run only if every good file of the
            // run is in this interval; otherwise the errors' interval is unknown.
            None if r.good == r.interval_files => r.errors,
            None => 0,
        };
        let start = end
            .checked_sub(SignedDuration::from_secs_f64(r.interval_s.min(1e9)))
            .unwrap_or(end);
        self.first_seen.get_or_insert(start);
        if r.interval_files > 0 {
            self.last_good = Some(end);
        }
        self.points.push_back(Point {
            end,
            secs: r.interval_s,
            files: r.interval_files,
            bytes: r.interval_bytes,
            errors,
            lag,
        });
        let keep_from = end
            .checked_sub(SignedDuration::try_from(history).unwrap_or(SignedDuration::MAX))
            .unwrap_or(Timestamp::MIN);
        while self.points.front().is_some_and(|p| p.end <= keep_from) {
            self.points.pop_front();
        }
        self.last = Some(*r);
        true
    }

    /// Evaluates the rules at `now` and keeps the result; whether the state or the rules
    /// that fired changed. `scratch` is reused between entities.
    fn evaluate(
        &mut self,
        t: &Thresholds,
        baselines: Option<&Baselines>,
        scratch: &mut Vec<Interval>,
        now: Timestamp,
    ) -> bool {
        scratch.clear();
        let window = t.window.as_secs_f64();
        // Only the window's intervals (and one before, which `window_sums` skips).
        for p in self.points.iter().rev() {
            scratch.push(p.interval());
            if now.duration_since(p.end).as_secs_f64() >= window {
                break;
            }
        }
        scratch.reverse();
        let expectation = match baselines {
            Some(b) => {
                let rule = UnusualRule {
                    k: t.k,
                    min_samples: u64::from(t.min_samples),
                    min_drop: DEFAULT_MIN_DROP,
                    floor: DEFAULT_FLOOR,
                    window_s: window,
                };
                let win = scratch
                    .iter()
                    .filter(|i| now.duration_since(i.end).as_secs_f64() < window)
                    .map(|i| WindowInterval {
                        hour: hour_of_week(i.end),
                        secs: i.secs,
                        value: if i.secs > 0.0 {
                            i.good as f64 / i.secs
                        } else {
                            0.0
                        },
                    });
                b.expectation(&self.name, &rule, win)
            }
            None => Expectation::NotLearned,
        };
        let o = Observed {
            first_seen: self.first_seen,
            last_good: self.last_good,
            intervals: scratch,
        };
        let h = health::evaluate(t, &o, &expectation, now);
        self.window = health::window_sums(scratch, t.window, now);
        self.expectation = expectation;
        let same = h.state == self.health.state
            && h.reasons.len() == self.health.reasons.len()
            && h.reasons
                .iter()
                .zip(&self.health.reasons)
                .all(|(a, b)| a.rule == b.rule);
        self.health = h;
        !same
    }

    pub fn status(&self, now: Timestamp) -> EntityStatus {
        let totals = self.totals();
        let p = self.points.back();
        let lag = p.and_then(|p| p.lag);
        EntityStatus {
            kind: self.kind,
            name: self.name.clone(),
            source: self.source.clone(),
            label: self.label(),
            state: self.health.state,
            reason: self.health.summary(),
            reasons: self.health.reasons.clone(),
            files_per_s: p.map_or(0.0, |p| p.per_s(p.files)),
            bytes_per_s: p.map_or(0.0, |p| p.per_s(p.bytes)),
            errors_per_s: p.map_or(0.0, |p| p.per_s(p.errors)),
            window_files_per_s: self.window.files_per_s(),
            window_error_ratio: self.window.error_ratio(),
            lag_p50_s: lag.and_then(|l| l.p50),
            lag_p95_s: lag.map(|l| l.p95),
            lag_max_s: lag.and_then(|l| l.max),
            window_lag_p95_s: self.window.lag_p95,
            expected: match self.expectation {
                Expectation::NotLearned => "learning",
                Expectation::Quiet => "quiet hour",
                Expectation::Usual => "usual",
                Expectation::Unusual { .. } => "unusual",
            },
            good_total: totals.good,
            errors_total: totals.errors,
            good_bytes_total: totals.good_bytes,
            bad_bytes_total: totals.bad_bytes,
            last_good: self.last_good.map(|t| t.to_string()),
            last_good_unix: self.last_good.map(unix),
            since_last_good_s: self
                .last_good
                .map(|t| now.duration_since(t).as_secs_f64().max(0.0)),
            last_speedo: self.last.map(|r| r.end.0.to_string()),
            interval_s: self.last.map(|r| r.interval_s),
            restarts: self.restarts,
            point: p.map(|p| PointJson {
                t: unix(p.end),
                files_per_s: p.per_s(p.files),
                bytes_per_s: p.per_s(p.bytes),
                errors_per_s: p.per_s(p.errors),
                lag_p95_s: p.lag.map(|l| l.p95),
            }),
        }
    }
}

fn unix(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

/// A client's, source's, pair's or the totals' status, as `/api/status` and the page
/// show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntityStatus {
    pub kind: Kind,
    /// The client's name for a pair.
    pub name: String,
    /// The source of a pair.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `cfs`, `source radar`, `cfs on radar`.
    pub label: String,
    pub state: State,
    /// The reasons on one line (`ok` when none).
    pub reason: String,
    pub reasons: Vec<health::Reason>,
    /// Good files per second in the last interval.
    pub files_per_s: f64,
    pub bytes_per_s: f64,
    pub errors_per_s: f64,
    /// Good files per second over the rules' window.
    pub window_files_per_s: f64,
    /// Failed share of the window's transfers (none without transfers).
    pub window_error_ratio: Option<f64>,
    /// The last interval's delivery lag quantiles, seconds.
    pub lag_p50_s: Option<f64>,
    pub lag_p95_s: Option<f64>,
    pub lag_max_s: Option<f64>,
    /// The window's p95 lag, as the `late` rule sees it.
    pub window_lag_p95_s: Option<f64>,
    /// The learned baseline's verdict: learning, quiet hour, usual, unusual.
    pub expected: &'static str,
    /// Since serve started (speedo restarts included).
    pub good_total: u64,
    pub errors_total: u64,
    pub good_bytes_total: u64,
    pub bad_bytes_total: u64,
    /// End of the last interval with a good delivery (RFC 3339).
    pub last_good: Option<String>,
    pub last_good_unix: Option<f64>,
    pub since_last_good_s: Option<f64>,
    /// End time of the last speedo received.
    pub last_speedo: Option<String>,
    pub interval_s: Option<f64>,
    /// speedo restarts seen (a cumulative count went down).
    pub restarts: u32,
    /// The latest interval, for charts.
    pub point: Option<PointJson>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PointJson {
    /// Unix seconds (end of the interval).
    pub t: f64,
    pub files_per_s: f64,
    pub bytes_per_s: f64,
    pub errors_per_s: f64,
    pub lag_p95_s: Option<f64>,
}

/// How many are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCounts {
    pub ok: usize,
    pub warning: usize,
    pub critical: usize,
    pub unknown: usize,
}

impl StateCounts {
    fn add(&mut self, s: State) {
        match s {
            State::Ok => self.ok += 1,
            State::Warning => self.warning += 1,
            State::Critical => self.critical += 1,
            State::Unknown => self.unknown += 1,
        }
    }

    pub fn total(&self) -> usize {
        self.ok + self.warning + self.critical + self.unknown
    }

    pub fn get(&self, s: State) -> usize {
        match s {
            State::Ok => self.ok,
            State::Warning => self.warning,
            State::Critical => self.critical,
            State::Unknown => self.unknown,
        }
    }
}

/// The pump's (or the scope's) overall state: the worst one, offenders first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PumpStatus {
    pub view: String,
    pub state: State,
    /// `CRITICAL - 1 critical, 0 warning, 0 unknown, 2 ok; cfs stopped (…)`
    pub text: String,
    /// Clients and sources together, by state.
    pub counts: BTreeMap<State, usize>,
    pub clients: StateCounts,
    pub sources: StateCounts,
    pub pairs: StateCounts,
    /// Clients in trouble in their own row or in one of their pairs.
    pub clients_in_trouble: usize,
    pub sources_in_trouble: usize,
    /// Every WARNING and CRITICAL, worst first, then by label.
    pub offenders: Vec<Offender>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offender {
    pub kind: Kind,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub state: State,
    /// The reasons on one line.
    pub reason: String,
    pub reasons: Vec<health::Reason>,
}

/// `/api/check`: what `pumpwatch check` needs, in one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckAnswer {
    pub view: String,
    pub generated: String,
    pub clients: StateCounts,
    pub sources: StateCounts,
    pub pairs: StateCounts,
    pub clients_in_trouble: usize,
    pub sources_in_trouble: usize,
    /// The first [`CHECK_OFFENDERS`] offenders, worst first.
    pub offenders: Vec<Offender>,
    /// Offenders left out of `offenders`.
    pub more_offenders: usize,
    /// The totals' good files and errors per second over their window.
    pub files_per_s: f64,
    pub errors_per_s: f64,
    /// The client or source asked for (`?client=` / `?source=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<CheckSubject>,
}

/// One client or source, for `check --client/--source`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckSubject {
    pub kind: Kind,
    pub name: String,
    /// Whether serve knows it at all.
    pub known: bool,
    /// Its own row's state (its pairs are in the offenders).
    pub state: State,
    pub reasons: Vec<health::Reason>,
    /// Good files/s over its window.
    pub files_per_s: f64,
    pub error_ratio: Option<f64>,
    pub since_last_good_s: Option<f64>,
    pub lag_p95_s: Option<f64>,
}

/// How many offenders `/api/check` lists (the plugin's text is cut at 2 KiB anyway).
pub const CHECK_OFFENDERS: usize = 500;

/// `/api/status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub generated: String,
    pub pump: PumpStatus,
    pub total: EntityStatus,
    pub clients: Vec<EntityStatus>,
    pub sources: Vec<EntityStatus>,
    pub pairs: Vec<EntityStatus>,
}

/// What changed since a version: one server-sent event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delta {
    pub version: u64,
    /// A full snapshot: forget everything not in `entities`.
    pub full: bool,
    pub generated: String,
    pub pump: PumpStatus,
    pub total: EntityStatus,
    pub entities: Vec<EntityStatus>,
    pub removed: Vec<Removed>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Removed {
    pub kind: Kind,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Chart data of one entity: unix seconds and per-second rates, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Series {
    pub t: Vec<f64>,
    pub files_per_s: Vec<f64>,
    pub bytes_per_s: Vec<f64>,
    pub errors_per_s: Vec<f64>,
    /// The interval's p95 lag (null when it carried none).
    pub lag_p95_s: Vec<Option<f64>>,
}

/// What was done with the speedos received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Intake {
    pub applied: u64,
    /// Not for this view, or the duplicate `.all` (`source.all` = `client.all`).
    pub ignored: u64,
    /// Not newer than the last reading of the same meter.
    pub stale: u64,
    pub malformed: u64,
}

/// How many removals are remembered for event streams that are behind.
const REMOVED_KEEP: usize = 10_000;

/// Thresholds per name, with the default.
#[derive(Debug, Clone, PartialEq)]
pub struct ThresholdSet {
    pub default: Thresholds,
    pub by_name: BTreeMap<String, Thresholds>,
}

impl ThresholdSet {
    pub fn from_config(pump: &PumpConfig) -> ThresholdSet {
        ThresholdSet {
            default: pump.default_thresholds,
            by_name: pump.thresholds.clone(),
        }
    }

    pub fn get(&self, name: &str) -> &Thresholds {
        self.by_name.get(name).unwrap_or(&self.default)
    }
}

/// The learned baselines, per client and per source.
#[derive(Debug, Clone, Default)]
pub struct Learning {
    pub clients: Baselines,
    pub sources: Baselines,
}

impl Learning {
    pub fn of(&self, kind: Kind) -> Option<&Baselines> {
        match kind {
            Kind::Client => Some(&self.clients),
            Kind::Source => Some(&self.sources),
            Kind::Pair | Kind::Total => None,
        }
    }

    pub fn of_mut(&mut self, kind: Kind) -> Option<&mut Baselines> {
        match kind {
            Kind::Client => Some(&mut self.clients),
            Kind::Source => Some(&mut self.sources),
            Kind::Pair | Kind::Total => None,
        }
    }
}

type PairKey = (String, String);

/// Everything `serve` knows.
#[derive(Debug)]
pub struct Board {
    view: View,
    history: Duration,
    thresholds: ThresholdSet,
    clients: HashMap<String, Entity>,
    sources: HashMap<String, Entity>,
    /// (source, client), ordered so that one source's pairs are one range.
    pairs: BTreeMap<PairKey, Entity>,
    total: Entity,
    /// The totals of an account whose own row is not there (yet).
    nothing: Entity,
    version: u64,
    removed: VecDeque<(u64, Removed)>,
    pub intake: Intake,
    pub learning: Learning,
    scratch: Vec<Interval>,
}

impl Board {
    /// An empty board; the accounts the configuration declares are shown (UNKNOWN) until
    /// their first speedo.
    pub fn new(pump: &PumpConfig, view: View, history: Duration) -> Board {
        let mut clients = HashMap::new();
        let mut sources = HashMap::new();
        match &view {
            View::Admin => {
                for u in pump.users.values() {
                    match u.role {
                        Role::Source => {
                            sources
                                .insert(u.name.clone(), Entity::new(Kind::Source, &u.name, true));
                        }
                        Role::Subscriber => {
                            clients
                                .insert(u.name.clone(), Entity::new(Kind::Client, &u.name, true));
                        }
                        Role::Feeder | Role::Admin | Role::Cluster => {}
                    }
                }
            }
            View::Source(s) => {
                sources.insert(s.clone(), Entity::new(Kind::Source, s, true));
            }
        }
        Board {
            total: Entity::new(Kind::Total, "all", true),
            nothing: Entity::new(Kind::Total, "all", true),
            view,
            history,
            thresholds: ThresholdSet::from_config(pump),
            clients,
            sources,
            pairs: BTreeMap::new(),
            version: 1,
            removed: VecDeque::new(),
            intake: Intake::default(),
            learning: Learning::default(),
            scratch: Vec::new(),
        }
    }

    pub fn view(&self) -> &View {
        &self.view
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn thresholds_for(&self, name: &str) -> Thresholds {
        *self.thresholds.get(name)
    }

    /// New thresholds (SIGHUP): every state is evaluated again at the next sweep.
    pub fn set_thresholds(&mut self, t: ThresholdSet) {
        self.thresholds = t;
    }

    pub fn clients(&self) -> impl Iterator<Item = &Entity> {
        self.clients.values()
    }

    pub fn sources(&self) -> impl Iterator<Item = &Entity> {
        self.sources.values()
    }

    pub fn pairs(&self) -> impl Iterator<Item = &Entity> {
        self.pairs.values()
    }

    pub fn total(&self) -> &Entity {
        &self.total
    }

    pub fn entity(&self, kind: Kind, name: &str) -> Option<&Entity> {
        match kind {
            Kind::Client => self.clients.get(name),
            Kind::Source => self.sources.get(name),
            Kind::Pair => self.pairs.values().find(|e| e.label() == name),
            Kind::Total => Some(&self.total),
        }
    }

    pub fn pair(&self, source: &str, client: &str) -> Option<&Entity> {
        self.pairs.get(&(source.to_owned(), client.to_owned()))
    }

    /// Takes one speedo received at `now`.
    pub fn apply(&mut self, d: &Decoded, now: Timestamp) {
        enum Target<'a> {
            Client(&'a str),
            Source(&'a str),
            Pair(&'a str, &'a str),
            Total,
        }
        let target = match (&self.view, &d.scope, &d.subject) {
            (View::Admin, None, Subject::Client(c)) => Target::Client(c),
            (View::Admin, None, Subject::Source(s)) => Target::Source(s),
            (View::Admin, None, Subject::AllClients) => Target::Total,
            // From xr_<source>: one client's transfers of that source's products.
            (View::Admin, Some(s), Subject::Client(c)) => Target::Pair(s, c),
            (View::Source(me), Some(s), Subject::Client(c)) if me == s => Target::Client(c),
            (View::Source(me), Some(s), Subject::AllClients) if me == s => Target::Total,
            (View::Source(me), None, Subject::Source(s)) if me == s => Target::Source(s),
            _ => {
                self.intake.ignored += 1;
                return;
            }
        };
        let lag = d.lag.p95.map(|p95| LagPoint {
            p50: d.lag.p50,
            p95,
            max: d.lag.max,
            count: d.lag.count.unwrap_or(d.reading.interval_files).max(1),
        });
        let version = self.version + 1;
        let history = self.history;
        let (e, thresholds) = match target {
            Target::Client(c) => (
                self.clients
                    .entry(c.to_owned())
                    .or_insert_with(|| Entity::new(Kind::Client, c, false)),
                self.thresholds.get(c),
            ),
            Target::Source(s) => (
                self.sources
                    .entry(s.to_owned())
                    .or_insert_with(|| Entity::new(Kind::Source, s, false)),
                self.thresholds.get(s),
            ),
            Target::Pair(s, c) => (
                self.pairs
                    .entry((s.to_owned(), c.to_owned()))
                    .or_insert_with(|| Entity::pair(s, c)),
                self.thresholds.get(c),
            ),
            Target::Total => (&mut self.total, self.thresholds.get("all")),
        };
        if !e.observe(&d.reading, lag, history) {
            self.intake.stale += 1;
            return;
        }
        let r = &d.reading;
        if let Some(b) = self.learning.of_mut(e.kind)
            && r.interval_s > 0.0
        {
            b.observe(&e.name, r.end.0, r.interval_files as f64 / r.interval_s);
        }
        e.heard = Some(now);
        e.evaluate(thresholds, self.learning.of(e.kind), &mut self.scratch, now);
        e.version = version;
        self.version = version;
        self.intake.applied += 1;
    }

    /// Re-evaluates every state at `now` (time alone turns a silent client CRITICAL) and
    /// forgets what has not been heard of for the whole history window. Returns whether
    /// anything changed.
    pub fn sweep(&mut self, now: Timestamp) -> bool {
        let version = self.version + 1;
        let mut changed = false;
        let history = self.history;
        let mut gone = Vec::new();
        let silent = |e: &Entity| e.heard.is_some_and(|h| later(h, history) < now) && !e.declared;
        for map in [&mut self.clients, &mut self.sources] {
            map.retain(|_, e| {
                if silent(e) {
                    gone.push(removed(e));
                    return false;
                }
                true
            });
        }
        self.pairs.retain(|_, e| {
            if silent(e) {
                gone.push(removed(e));
                return false;
            }
            true
        });
        let Board {
            thresholds,
            clients,
            sources,
            pairs,
            total,
            learning,
            scratch,
            ..
        } = self;
        for e in clients
            .values_mut()
            .chain(sources.values_mut())
            .chain(pairs.values_mut())
            .chain(std::iter::once(total))
        {
            let key = match e.kind {
                Kind::Total => "all",
                _ => e.name.as_str(),
            };
            let t = *thresholds.get(key);
            if e.evaluate(&t, learning.of(e.kind), scratch, now) {
                e.version = version;
                changed = true;
            }
        }
        if !gone.is_empty() {
            changed = true;
            for r in gone {
                self.removed.push_back((version, r));
            }
            while self.removed.len() > REMOVED_KEEP {
                self.removed.pop_front();
            }
        }
        if changed {
            self.version = version;
        }
        changed
    }

    /// Whether `access` sees anything of this board: one source's own `serve` shows that
    /// source and the admins only.
    pub fn sees(&self, access: &Access) -> bool {
        match (&self.view, access) {
            (View::Admin, _) | (View::Source(_), Access::Admin) => true,
            (View::Source(v), Access::Source(s)) => v == s,
            (View::Source(_), Access::Subscriber(_)) => false,
        }
    }

    /// Whether `access` sees the whole view as it is (no presentation needed).
    fn sees_all(&self, access: &Access) -> bool {
        match (&self.view, access) {
            (_, Access::Admin) => true,
            (View::Source(v), Access::Source(s)) => v == s,
            _ => false,
        }
    }

    /// The clients, sources and pairs `access` may see (not the totals), as it sees them.
    fn shown<'a>(&'a self, access: &'a Access) -> Box<dyn Iterator<Item = Shown<'a>> + 'a> {
        let within = match &self.view {
            View::Admin => None,
            View::Source(v) => Some(v.as_str()),
        };
        let as_is = move |e: &'a Entity| Shown {
            kind: e.kind,
            source: e.source.as_deref(),
            within: if e.kind == Kind::Client { within } else { None },
            e,
        };
        if self.sees_all(access) {
            return Box::new(
                self.clients
                    .values()
                    .chain(self.sources.values())
                    .chain(self.pairs.values())
                    .map(as_is),
            );
        }
        match (&self.view, access) {
            (View::Admin, Access::Source(s)) => Box::new(
                self.sources
                    .get(s)
                    .map(as_is)
                    .into_iter()
                    .chain(self.pairs_of(s).map(move |e| Shown {
                        kind: Kind::Client,
                        source: None,
                        within: Some(s.as_str()),
                        e,
                    })),
            ),
            (View::Admin, Access::Subscriber(c)) => {
                Box::new(self.clients.get(c).map(as_is).into_iter())
            }
            _ => Box::new(std::iter::empty()),
        }
    }

    /// One source's pairs (one range of the ordered map).
    fn pairs_of<'a>(&'a self, source: &'a str) -> impl Iterator<Item = &'a Entity> + 'a {
        self.pairs
            .range((source.to_owned(), String::new())..)
            .take_while(move |((s, _), _)| s == source)
            .map(|(_, e)| e)
    }

    /// The one client or source `access` knows by `name`, as it sees it.
    fn shown_one<'a>(&'a self, access: &'a Access, kind: Kind, name: &str) -> Option<Shown<'a>> {
        if self.sees_all(access) {
            return self.entity(kind, name).map(|e| Shown {
                kind: e.kind,
                source: e.source.as_deref(),
                within: match (&self.view, e.kind) {
                    (View::Source(v), Kind::Client) => Some(v.as_str()),
                    _ => None,
                },
                e,
            });
        }
        let (kind, within, e) = match (&self.view, access, kind) {
            (View::Admin, Access::Source(s), Kind::Source) if name == s => {
                (kind, None, self.sources.get(name)?)
            }
            (View::Admin, Access::Source(s), Kind::Client) => (
                kind,
                Some(s.as_str()),
                self.pairs.get(&(s.clone(), name.to_owned()))?,
            ),
            (View::Admin, Access::Subscriber(c), Kind::Client) if name == c => {
                (kind, None, self.clients.get(name)?)
            }
            _ => return None,
        };
        Some(Shown {
            kind,
            source: None,
            within,
            e,
        })
    }

    /// What `access` sees as the totals: the view's, or its own row.
    fn total_of(&self, access: &Access) -> &Entity {
        if self.sees_all(access) {
            return &self.total;
        }
        let own = match (&self.view, access) {
            (View::Admin, Access::Source(s)) => self.sources.get(s),
            (View::Admin, Access::Subscriber(c)) => self.clients.get(c),
            _ => None,
        };
        own.unwrap_or(&self.nothing)
    }

    fn total_status(&self, access: &Access, now: Timestamp) -> EntityStatus {
        let mut s = self.total_of(access).status(now);
        if s.kind != Kind::Total {
            s.kind = Kind::Total;
            s.name = "all".into();
            s.label = "all".into();
            s.source = None;
        }
        s
    }

    /// A removal as `access` sees it; `None` when it is none of its business.
    fn shown_removed(&self, access: &Access, r: &Removed) -> Option<Removed> {
        if self.sees_all(access) {
            return Some(r.clone());
        }
        match (&self.view, access, r.kind) {
            (View::Admin, Access::Source(s), Kind::Pair) if r.source.as_ref() == Some(s) => {
                Some(Removed {
                    kind: Kind::Client,
                    name: r.name.clone(),
                    source: None,
                })
            }
            (View::Admin, Access::Source(s), Kind::Source) if r.name == *s => Some(r.clone()),
            (View::Admin, Access::Subscriber(c), Kind::Client) if r.name == *c => Some(r.clone()),
            _ => None,
        }
    }

    fn view_label(&self, access: &Access) -> String {
        if self.sees_all(access) {
            self.view.label()
        } else {
            access.label()
        }
    }

    /// The pump's state within `scope`: the worst of every client, source and pair.
    pub fn pump(&self, scope: &Scope) -> PumpStatus {
        self.pump_as(&Access::Admin, scope)
    }

    /// The state of what `access` sees within `scope`.
    pub fn pump_as(&self, access: &Access, scope: &Scope) -> PumpStatus {
        let mut clients = StateCounts::default();
        let mut sources = StateCounts::default();
        let mut pairs = StateCounts::default();
        let mut offenders = Vec::new();
        let mut troubled: std::collections::HashSet<&str> = Default::default();
        for sh in self.shown(access).filter(|sh| sh.within(scope)) {
            let e = sh.e;
            match sh.kind {
                Kind::Client => clients.add(e.health.state),
                Kind::Source => sources.add(e.health.state),
                Kind::Pair => pairs.add(e.health.state),
                Kind::Total => {}
            }
            if matches!(e.health.state, State::Warning | State::Critical) {
                if sh.kind != Kind::Source {
                    troubled.insert(sh.name());
                }
                offenders.push(Offender {
                    kind: sh.kind,
                    name: e.name.clone(),
                    source: sh.source.map(str::to_owned),
                    state: e.health.state,
                    reason: e.health.summary(),
                    reasons: e.health.reasons.clone(),
                });
            }
        }
        offenders.sort_by(|a, b| {
            b.state
                .severity()
                .cmp(&a.state.severity())
                .then_with(|| a.name.cmp(&b.name))
                .then_with(|| a.kind.cmp(&b.kind))
                .then_with(|| a.source.cmp(&b.source))
        });
        let mut counts: BTreeMap<State, usize> = State::ALL.iter().map(|s| (*s, 0)).collect();
        for s in State::ALL {
            *counts.entry(s).or_default() += clients.get(s) + sources.get(s);
        }
        let state = match offenders.first() {
            Some(o) => o.state,
            None if clients.ok + sources.ok + pairs.ok > 0 => State::Ok,
            None => State::Unknown,
        };
        let mut text = format!(
            "{state} - {} critical, {} warning, {} unknown, {} ok",
            counts[&State::Critical],
            counts[&State::Warning],
            counts[&State::Unknown],
            counts[&State::Ok]
        );
        for (i, o) in offenders.iter().enumerate() {
            if i == 10 {
                text.push_str(&format!("; and {} more", offenders.len() - 10));
                break;
            }
            text.push_str(&format!("; {} {}", offender_label(o), o.reason));
        }
        PumpStatus {
            view: self.view_label(access),
            state,
            text,
            counts,
            clients_in_trouble: troubled.len(),
            sources_in_trouble: sources.warning + sources.critical,
            clients,
            sources,
            pairs,
            offenders,
        }
    }

    /// `/api/check`: counts, offenders and the totals within `scope`, and the client or
    /// source the scope names.
    pub fn check(&self, scope: &Scope, now: Timestamp) -> CheckAnswer {
        self.check_as(&Access::Admin, scope, now)
    }

    /// [`Board::check`] of what `access` sees: a client or source it does not see is
    /// answered as one serve does not know.
    pub fn check_as(&self, access: &Access, scope: &Scope, now: Timestamp) -> CheckAnswer {
        let mut p = self.pump_as(access, scope);
        let more = p.offenders.len().saturating_sub(CHECK_OFFENDERS);
        p.offenders.truncate(CHECK_OFFENDERS);
        let w = &self.total_of(access).window;
        let subject = match scope {
            Scope::All => None,
            Scope::Client(n) | Scope::Source(n) => {
                let kind = if matches!(scope, Scope::Client(_)) {
                    Kind::Client
                } else {
                    Kind::Source
                };
                Some(match self.shown_one(access, kind, n).map(|sh| sh.e) {
                    Some(e) => CheckSubject {
                        kind,
                        name: n.clone(),
                        known: true,
                        state: e.health.state,
                        reasons: e.health.reasons.clone(),
                        files_per_s: e.window.files_per_s(),
                        error_ratio: e.window.error_ratio(),
                        since_last_good_s: e
                            .last_good
                            .map(|t| now.duration_since(t).as_secs_f64().max(0.0)),
                        lag_p95_s: e.window.lag_p95,
                    },
                    None => CheckSubject {
                        kind,
                        name: n.clone(),
                        known: false,
                        state: State::Unknown,
                        reasons: vec![],
                        files_per_s: 0.0,
                        error_ratio: None,
                        since_last_good_s: None,
                        lag_p95_s: None,
                    },
                })
            }
        };
        CheckAnswer {
            view: p.view,
            generated: now.to_string(),
            clients: p.clients,
            sources: p.sources,
            pairs: p.pairs,
            clients_in_trouble: p.clients_in_trouble,
            sources_in_trouble: p.sources_in_trouble,
            offenders: p.offenders,
            more_offenders: more,
            files_per_s: w.files_per_s(),
            errors_per_s: if w.covered > 0.0 {
                w.errors as f64 / w.covered
            } else {
                0.0
            },
            subject,
        }
    }

    /// Worst first, then by name.
    fn sorted<'a>(it: impl Iterator<Item = Shown<'a>>, now: Timestamp) -> Vec<EntityStatus> {
        let mut v: Vec<Shown<'a>> = it.collect();
        v.sort_by(|a, b| {
            b.e.health
                .state
                .severity()
                .cmp(&a.e.health.state.severity())
                .then_with(|| a.e.name.cmp(&b.e.name))
                .then_with(|| a.source.cmp(&b.source))
        });
        v.into_iter().map(|sh| sh.status(now)).collect()
    }

    /// `/api/status` within `scope`: every client, source and pair, worst first, then
    /// by name.
    pub fn status(&self, scope: &Scope, now: Timestamp) -> Status {
        self.status_as(&Access::Admin, scope, now)
    }

    /// [`Board::status`] of what `access` sees.
    pub fn status_as(&self, access: &Access, scope: &Scope, now: Timestamp) -> Status {
        let of = |kind: Kind| {
            Board::sorted(
                self.shown(access)
                    .filter(|sh| sh.kind == kind && sh.within(scope)),
                now,
            )
        };
        Status {
            generated: now.to_string(),
            pump: self.pump_as(access, scope),
            total: self.total_status(access, now),
            clients: of(Kind::Client),
            sources: of(Kind::Source),
            pairs: of(Kind::Pair),
        }
    }

    /// What changed after `since` (0 = everything) within `scope`, as one event.
    pub fn delta(&self, since: u64, scope: &Scope, now: Timestamp) -> Delta {
        self.delta_as(&Access::Admin, since, scope, now)
    }

    /// [`Board::delta`] of what `access` sees.
    pub fn delta_as(&self, access: &Access, since: u64, scope: &Scope, now: Timestamp) -> Delta {
        let full = since == 0
            || self
                .removed
                .front()
                .is_some_and(|(v, _)| *v > since && self.removed.len() >= REMOVED_KEEP);
        let entities = self
            .shown(access)
            .filter(|sh| sh.within(scope) && (full || sh.e.version > since))
            .map(|sh| sh.status(now))
            .collect();
        let removed = if full {
            vec![]
        } else {
            self.removed
                .iter()
                .filter(|(v, _)| *v > since)
                .filter_map(|(_, r)| self.shown_removed(access, r))
                .collect()
        };
        Delta {
            version: self.version,
            full,
            generated: now.to_string(),
            pump: self.pump_as(access, scope),
            total: self.total_status(access, now),
            entities,
            removed,
        }
    }

    /// The chart data of one entity (a pair by its label, `cfs on radar`).
    pub fn series(&self, kind: Kind, name: &str) -> Option<Series> {
        self.series_as(&Access::Admin, kind, name)
    }

    /// [`Board::series`] of what `access` sees (`total` is its own totals).
    pub fn series_as(&self, access: &Access, kind: Kind, name: &str) -> Option<Series> {
        let e = match kind {
            Kind::Total => self.total_of(access),
            Kind::Pair if self.sees_all(access) => self.entity(kind, name)?,
            Kind::Pair => return None,
            _ => self.shown_one(access, kind, name)?.e,
        };
        let mut s = Series::default();
        for p in &e.points {
            s.t.push(unix(p.end));
            s.files_per_s.push(p.per_s(p.files));
            s.bytes_per_s.push(p.per_s(p.bytes));
            s.errors_per_s.push(p.per_s(p.errors));
            s.lag_p95_s.push(p.lag.map(|l| l.p95));
        }
        Some(s)
    }
}

fn removed(e: &Entity) -> Removed {
    Removed {
        kind: e.kind,
        name: e.name.clone(),
        source: e.source.clone(),
    }
}

/// `cfs`, `source radar`, `cfs on radar`.
pub fn offender_label(o: &Offender) -> String {
    match (o.kind, &o.source) {
        (Kind::Pair, Some(s)) => format!("{} on {s}", o.name),
        (Kind::Source, _) => format!("source {}", o.name),
        _ => o.name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::stamp::Stamp;

    fn t(s: f64) -> Timestamp {
        Timestamp::from_nanosecond((1_700_000_000.0e9 + s * 1e9) as i128).unwrap()
    }

    fn reading(end: f64, good: u64, errors: u64, files: u64) -> Reading {
        Reading {
            end: Stamp(t(end)),
            good,
            errors,
            good_bytes: good * 10,
            bad_bytes: errors * 10,
            interval_bytes: files * 10,
            interval_files: files,
            interval_s: 60.0,
        }
    }

    fn d(subject: Subject, scope: Option<&str>, r: Reading) -> Decoded {
        Decoded {
            subject,
            scope: scope.map(Into::into),
            reading: r,
            lag: Default::default(),
        }
    }

    fn cfs() -> Subject {
        Subject::Client("cfs".into())
    }

    fn pump() -> PumpConfig {
        PumpConfig::parse(
            "[users.radar]\nrole = \"source\"\n[users.edu]\nrole = \"subscriber\"\n[thresholds.cfs]\ntd = 120\n",
            "t.toml",
        )
        .unwrap()
    }

    #[test]
    fn counters_rates_and_restarts() {
        let mut b = Board::new(&pump(), View::Admin, Duration::from_secs(3600));
        b.apply(&d(cfs(), None, reading(60.0, 30, 10, 30)), t(60.0));
        b.apply(&d(cfs(), None, reading(120.0, 90, 10, 60)), t(120.0));
        let e = b.entity(Kind::Client, "cfs").unwrap();
        assert_eq!((e.totals().good, e.totals().errors), (90, 10));
        let s = e.status(t(125.0));
        assert_eq!(s.files_per_s, 1.0);
        assert_eq!(s.since_last_good_s, Some(5.0));
        assert_eq!(s.state, State::Ok);
        // A duplicate is ignored; a decrease is a restart of speedo.
        b.apply(&d(cfs(), None, reading(120.0, 90, 10, 60)), t(121.0));
        assert_eq!(b.intake.stale, 1);
        b.apply(&d(cfs(), None, reading(180.0, 5, 2, 5)), t(180.0));
        let e = b.entity(Kind::Client, "cfs").unwrap();
        assert_eq!(
            (e.totals().good, e.totals().errors, e.restarts),
            (95, 12, 1)
        );
        let errors: Vec<u64> = e.points().map(|p| p.errors).collect();
        assert_eq!(errors, [10, 0, 2]);
    }

    #[test]
    fn a_first_reading_mid_run_does_not_invent_errors() {
        let mut b = Board::new(&pump(), View::Admin, Duration::from_secs(3600));
        b.apply(&d(cfs(), None, reading(60.0, 1000, 900, 10)), t(60.0));
        let e = b.entity(Kind::Client, "cfs").unwrap();
        assert_eq!(e.points().next().unwrap().errors, 0);
        assert_eq!(e.health.state, State::Ok);
    }

    #[test]
    fn health_moves_with_time_and_silent_entities_are_forgotten() {
        let mut b = Board::new(&pump(), View::Admin, Duration::from_secs(600));
        b.apply(&d(cfs(), None, reading(60.0, 30, 0, 30)), t(60.0));
        assert!(!b.sweep(t(100.0)));
        // thresholds.cfs.td = 120
        assert!(b.sweep(t(181.0)));
        let e = b.entity(Kind::Client, "cfs").unwrap();
        assert_eq!(e.health.state, State::Critical);
        let v = b.version();
        let delta = b.delta(v - 1, &Scope::All, t(181.0));
        assert_eq!(delta.entities.len(), 1);
        assert_eq!(b.pump(&Scope::All).state, State::Critical);
        assert!(
            b.pump(&Scope::All)
                .text
                .contains("; cfs stopped (no delivery for"),
            "{}",
            b.pump(&Scope::All).text
        );
        // Not heard of for the whole history: gone (declared accounts stay).
        assert!(b.sweep(t(700.0)));
        assert!(b.entity(Kind::Client, "cfs").is_none());
        assert!(b.entity(Kind::Client, "edu").is_some());
        let delta = b.delta(v, &Scope::All, t(700.0));
        assert_eq!(
            delta.removed,
            [Removed {
                kind: Kind::Client,
                name: "cfs".into(),
                source: None,
            }]
        );
    }

    #[test]
    fn declared_accounts_are_unknown_until_seen() {
        let b = Board::new(&pump(), View::Admin, Duration::from_secs(600));
        let s = b.status(&Scope::All, t(0.0));
        assert_eq!(s.clients.len(), 1);
        assert_eq!(s.sources.len(), 1);
        assert_eq!(s.clients[0].state, State::Unknown);
        assert_eq!(s.pump.state, State::Unknown);
    }

    #[test]
    fn views_take_only_their_own_speedos() {
        let mut admin = Board::new(&pump(), View::Admin, Duration::from_secs(600));
        let mut radar = Board::new(
            &pump(),
            View::Source("radar".into()),
            Duration::from_secs(600),
        );
        let msgs = [
            d(cfs(), None, reading(60.0, 3, 1, 3)),
            d(
                Subject::Source("radar".into()),
                None,
                reading(60.0, 3, 1, 3),
            ),
            d(Subject::Source("sat".into()), None, reading(60.0, 1, 1, 1)),
            d(Subject::AllClients, None, reading(60.0, 4, 2, 4)),
            d(Subject::AllSources, None, reading(60.0, 4, 2, 4)),
            d(cfs(), Some("radar"), reading(60.0, 3, 1, 3)),
            d(Subject::AllClients, Some("radar"), reading(60.0, 3, 1, 3)),
            d(
                Subject::Client("edu".into()),
                Some("sat"),
                reading(60.0, 1, 1, 1),
            ),
        ];
        for m in &msgs {
            admin.apply(m, t(60.0));
            radar.apply(m, t(60.0));
        }
        assert_eq!(admin.total().totals().good, 4);
        assert_eq!(admin.clients().count(), 2); // cfs + declared edu
        assert_eq!(admin.sources().count(), 2);
        assert_eq!(radar.total().totals().good, 3);
        assert_eq!(
            radar.clients().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["cfs"]
        );
        assert_eq!(radar.sources().count(), 1);
        let series = radar.series(Kind::Client, "cfs").unwrap();
        assert_eq!(series.files_per_s, [0.05]);
    }

    fn lagged(r: Reading, p95: f64, count: u64) -> Decoded {
        Decoded {
            lag: crate::core::lag::LagHeaders {
                p50: Some(p95 / 2.0),
                p95: Some(p95),
                max: Some(p95 * 2.0),
                count: Some(count),
            },
            ..d(cfs(), None, r)
        }
    }

    #[test]
    fn a_pair_that_stops_is_named_with_both() {
        let mut b = Board::new(&pump(), View::Admin, Duration::from_secs(3600));
        let mut good = 0;
        for k in 1..=10u32 {
            let end = 60.0 * f64::from(k);
            good += 20;
            // cfs keeps receiving (its own row), but radar's products stop after minute 3.
            b.apply(&d(cfs(), None, reading(end, good, 0, 20)), t(end));
            let radar = if k <= 3 { 10 * u64::from(k) } else { 30 };
            let files = if k <= 3 { 10 } else { 0 };
            b.apply(
                &d(cfs(), Some("radar"), reading(end, radar, 0, files)),
                t(end),
            );
        }
        // thresholds.cfs.td = 120: the pair stopped at 180 s, now 600 s.
        b.sweep(t(600.0));
        assert_eq!(
            b.entity(Kind::Client, "cfs").unwrap().health.state,
            State::Ok
        );
        let pair = b.pair("radar", "cfs").unwrap();
        assert_eq!(pair.health.state, State::Critical);
        assert_eq!(pair.label(), "cfs on radar");
        let p = b.pump(&Scope::All);
        assert_eq!((p.state, p.clients_in_trouble), (State::Critical, 1));
        assert_eq!(p.offenders[0].kind, Kind::Pair);
        assert_eq!(p.offenders[0].source.as_deref(), Some("radar"));
        // Narrowed to cfs, or to radar: the pair is there; to edu: not.
        for scope in [Scope::Client("cfs".into()), Scope::Source("radar".into())] {
            assert_eq!(b.check(&scope, t(600.0)).offenders.len(), 1, "{scope:?}");
        }
        let edu = b.check(&Scope::Client("edu".into()), t(600.0));
        assert!(edu.offenders.is_empty());
        assert_eq!(edu.subject.unwrap().state, State::Unknown);
        let st = b.status(&Scope::All, t(600.0));
        assert_eq!(st.pairs.len(), 1);
        // A source's view has no pairs: its clients are its pairs.
        let mut radar = Board::new(
            &pump(),
            View::Source("radar".into()),
            Duration::from_secs(600),
        );
        radar.apply(&d(cfs(), Some("radar"), reading(60.0, 10, 0, 10)), t(60.0));
        assert_eq!(radar.pairs().count(), 0);
        assert_eq!(radar.clients().count(), 1);
    }

    #[test]
    fn late_from_the_lag_headers_and_cleared_on_recovery() {
        let mut pump = pump();
        pump.thresholds.get_mut("cfs").unwrap().max_lag = Some(Duration::from_secs(300));
        let mut b = Board::new(&pump, View::Admin, Duration::from_secs(3600));
        for k in 1..=10u64 {
            let end = 60.0 * k as f64;
            b.apply(&lagged(reading(end, 10 * k, 0, 10), 600.0, 10), t(end));
        }
        let e = b.entity(Kind::Client, "cfs").unwrap();
        assert_eq!(e.health.state, State::Warning);
        assert_eq!(e.health.summary(), "late (p95 lag 600s > max_lag 300s)");
        let s = e.status(t(600.0));
        assert_eq!(
            (s.lag_p95_s, s.window_lag_p95_s),
            (Some(600.0), Some(600.0))
        );
        // Ten punctual intervals push the late ones out of the window.
        for k in 11..=20u64 {
            let end = 60.0 * k as f64;
            b.apply(&lagged(reading(end, 10 * k, 0, 10), 2.0, 10), t(end));
        }
        assert_eq!(
            b.entity(Kind::Client, "cfs").unwrap().health.state,
            State::Ok
        );
    }

    #[test]
    fn learned_baselines_make_a_drop_unusual_after_a_full_window() {
        // Monday 2024-01-01 00:00 UTC, in the board's seconds.
        let monday = 1_704_067_200.0 - 1_700_000_000.0;
        let mut b = Board::new(&pump(), View::Admin, Duration::from_secs(3600));
        // Three weeks of 60 files a minute for edu, at Mondays 10:00-11:00 only.
        let mut good = 0;
        let mut last = 0.0;
        for w in 0..3u32 {
            for m in 0..60u32 {
                let end =
                    monday + f64::from(w) * 7.0 * 86_400.0 + 10.0 * 3600.0 + 60.0 * f64::from(m);
                good += 60 + u64::from(m % 3);
                let r = reading(end, good, 0, 60 + u64::from(m % 3));
                b.apply(&d(Subject::Client("edu".into()), None, r), t(end));
                last = end;
            }
        }
        assert_eq!(b.learning.clients.len(), 1);
        // Week 4: half as much from 10:00.
        let start = monday + 3.0 * 7.0 * 86_400.0 + 10.0 * 3600.0;
        let mut states = Vec::new();
        for m in 1..=12 {
            let end = start + 60.0 * f64::from(m);
            good += 30;
            let r = reading(end, good, 0, 30);
            b.apply(&d(Subject::Client("edu".into()), None, r), t(end));
            let e = b.entity(Kind::Client, "edu").unwrap();
            states.push(e.health.state);
        }
        let _ = last;
        // Not before a full window (10 intervals) of lower rates, then WARNING unusual.
        assert!(states[..9].iter().all(|s| *s == State::Ok), "{states:?}");
        assert_eq!(states[10], State::Warning, "{states:?}");
        let e = b.entity(Kind::Client, "edu").unwrap();
        assert!(
            e.health.summary().starts_with("unusual (0.5 files/s <"),
            "{}",
            e.health.summary()
        );
        assert_eq!(e.status(t(start)).expected, "unusual");
        let rows = b.learning.clients.drain_changed();
        assert!(!rows.is_empty());
    }

    #[test]
    fn thresholds_reload_applies_at_the_next_sweep() {
        let mut b = Board::new(&pump(), View::Admin, Duration::from_secs(3600));
        b.apply(
            &d(
                Subject::Client("edu".into()),
                None,
                reading(60.0, 30, 0, 30),
            ),
            t(60.0),
        );
        b.sweep(t(200.0));
        assert_eq!(
            b.entity(Kind::Client, "edu").unwrap().health.state,
            State::Ok
        );
        let tighter = PumpConfig::parse("[thresholds.edu]\ntd = 100\n", "t.toml").unwrap();
        b.set_thresholds(ThresholdSet::from_config(&tighter));
        assert!(b.sweep(t(200.0)));
        assert_eq!(
            b.entity(Kind::Client, "edu").unwrap().health.state,
            State::Critical
        );
    }

    /// radar's and sat's products, cfs and edu receiving, with sat's pair of cfs stopped.
    fn two_sources() -> Board {
        let pump = PumpConfig::parse(
            "[users.radar]\nrole = \"source\"\n[users.sat]\nrole = \"source\"\n\
             [users.cfs]\nrole = \"subscriber\"\n[users.edu]\nrole = \"subscriber\"\n\
             [thresholds.default]\ntd = 120\n",
            "t.toml",
        )
        .unwrap();
        let mut b = Board::new(&pump, View::Admin, Duration::from_secs(3600));
        let edu = || Subject::Client("edu".into());
        for k in 1..=5u64 {
            let end = 60.0 * k as f64;
            let at = t(end);
            b.apply(&d(cfs(), None, reading(end, 30 * k, 0, 30)), at);
            b.apply(&d(edu(), None, reading(end, 10 * k, 0, 10)), at);
            b.apply(
                &d(
                    Subject::Source("radar".into()),
                    None,
                    reading(end, 20 * k, 0, 20),
                ),
                at,
            );
            b.apply(
                &d(
                    Subject::Source("sat".into()),
                    None,
                    reading(end, 20 * k, 0, 20),
                ),
                at,
            );
            b.apply(
                &d(Subject::AllClients, None, reading(end, 40 * k, 0, 40)),
                at,
            );
            b.apply(&d(cfs(), Some("radar"), reading(end, 20 * k, 0, 20)), at);
            // sat's products stop reaching cfs after the first minute.
            b.apply(
                &d(
                    cfs(),
                    Some("sat"),
                    reading(end, 10, 0, u64::from(k == 1) * 10),
                ),
                at,
            );
            b.apply(&d(edu(), Some("sat"), reading(end, 10 * k, 0, 10)), at);
        }
        b.sweep(t(300.0));
        b
    }

    fn json<T: Serialize>(v: &T) -> String {
        serde_json::to_string(v).unwrap()
    }

    #[test]
    fn a_source_sees_its_products_only() {
        let b = two_sources();
        let radar = Access::Source("radar".into());
        let now = t(301.0);
        let s = b.status_as(&radar, &Scope::All, now);
        let names = |v: &[EntityStatus]| v.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&s.clients), ["cfs"]);
        assert_eq!(names(&s.sources), ["radar"]);
        assert!(s.pairs.is_empty());
        // Its clients are its pairs: cfs's transfers of radar's products, not cfs's row.
        assert_eq!(s.clients[0].good_total, 100);
        assert_eq!(s.clients[0].kind, Kind::Client);
        assert_eq!(s.clients[0].label, "cfs");
        assert_eq!((s.total.name.as_str(), s.total.good_total), ("all", 100));
        assert_eq!(s.pump.view, "source radar");
        assert_eq!(s.pump.state, State::Ok, "{}", s.pump.text);
        for text in [
            json(&s),
            json(&b.delta_as(&radar, 0, &Scope::All, now)),
            json(&b.check_as(&radar, &Scope::All, now)),
        ] {
            assert!(!text.contains("sat") && !text.contains("edu"), "{text}");
        }
        // The whole pump sees sat's pair of cfs stopped.
        let all = b.pump(&Scope::All);
        assert_eq!(all.state, State::Critical, "{}", all.text);
        assert!(all.text.contains("cfs on sat stopped"), "{}", all.text);
        // Narrowed: ?client=cfs is radar's pair; ?source=radar everything; others nothing.
        let c = b.check_as(&radar, &Scope::Client("cfs".into()), now);
        let subject = c.subject.unwrap();
        assert!(subject.known);
        assert!(
            (subject.files_per_s - 20.0 / 60.0).abs() < 1e-9,
            "{subject:?}"
        );
        assert_eq!(
            b.status_as(&radar, &Scope::Source("radar".into()), now)
                .clients
                .len(),
            1
        );
        for scope in [Scope::Source("sat".into()), Scope::Client("edu".into())] {
            let c = b.check_as(&radar, &scope, now);
            assert!(!c.subject.as_ref().unwrap().known, "{scope:?}");
            assert_eq!(c.clients.total() + c.sources.total() + c.pairs.total(), 0);
        }
        // History: its own, by the names it sees.
        assert!(b.series_as(&radar, Kind::Client, "cfs").is_some());
        assert_eq!(
            b.series_as(&radar, Kind::Total, "all")
                .unwrap()
                .files_per_s
                .len(),
            5
        );
        for (kind, name) in [
            (Kind::Client, "edu"),
            (Kind::Source, "sat"),
            (Kind::Pair, "cfs on sat"),
            (Kind::Pair, "cfs on radar"),
        ] {
            assert!(b.series_as(&radar, kind, name).is_none(), "{name}");
        }
    }

    #[test]
    fn a_subscriber_sees_its_own_row_only() {
        let b = two_sources();
        let edu = Access::Subscriber("edu".into());
        let now = t(301.0);
        let s = b.status_as(&edu, &Scope::All, now);
        assert_eq!(s.clients.len(), 1);
        assert_eq!(s.clients[0].name, "edu");
        assert!(s.sources.is_empty() && s.pairs.is_empty());
        assert_eq!(s.total.good_total, 50);
        assert_eq!(s.pump.view, "client edu");
        for text in [
            json(&s),
            json(&b.delta_as(&edu, 0, &Scope::All, now)),
            json(&b.check_as(&edu, &Scope::All, now)),
        ] {
            for other in ["sat", "radar", "cfs"] {
                assert!(!text.contains(other), "{other} in {text}");
            }
        }
        // A name it asks about is echoed, but unknown.
        let c = b.check_as(&edu, &Scope::Source("sat".into()), now);
        assert!(!c.subject.unwrap().known);
        assert!(b.series_as(&edu, Kind::Client, "cfs").is_none());
        assert!(b.series_as(&edu, Kind::Client, "edu").is_some());
        // Someone the board never heard of sees an empty board, not an error.
        let nobody = Access::Subscriber("nobody".into());
        let s = b.status_as(&nobody, &Scope::All, now);
        assert!(s.clients.is_empty());
        assert_eq!((s.total.good_total, s.pump.state), (0, State::Unknown));
    }

    #[test]
    fn removals_reach_only_those_who_saw_them() {
        let mut b = two_sources();
        let v = b.version();
        // Nothing heard for the whole history: the undeclared pair rows go.
        b.sweep(t(300.0 + 3700.0));
        let radar = Access::Source("radar".into());
        let removed = b.delta_as(&radar, v, &Scope::All, t(4000.0)).removed;
        assert_eq!(
            removed,
            [Removed {
                kind: Kind::Client,
                name: "cfs".into(),
                source: None
            }]
        );
        let edu = b.delta_as(&Access::Subscriber("edu".into()), v, &Scope::All, t(4000.0));
        assert!(edu.removed.is_empty(), "{:?}", edu.removed);
        assert_eq!(b.delta(v, &Scope::All, t(4000.0)).removed.len(), 3);
    }

    #[test]
    fn one_sources_own_serve_shows_that_source_and_the_admins() {
        let b = Board::new(
            &pump(),
            View::Source("radar".into()),
            Duration::from_secs(60),
        );
        assert!(b.sees(&Access::Admin));
        assert!(b.sees(&Access::Source("radar".into())));
        assert!(!b.sees(&Access::Source("sat".into())));
        assert!(!b.sees(&Access::Subscriber("cfs".into())));
        let s = b.status_as(&Access::Source("sat".into()), &Scope::All, t(0.0));
        assert!(s.sources.is_empty());
    }
}
