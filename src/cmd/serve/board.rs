//! What `serve` knows, pure: speedo readings in ([`Board::apply`]), per client and per
//! source a window of history, counters and health out. No clock and no I/O: `now` is
//! passed in, so every rule is tested without a broker.
//!
//! Counters survive a restart of `speedo`: a cumulative count that goes down is a restart
//! (speedo's counts are per run), so the last value before it is added to an offset, as
//! Prometheus does with counter resets. The errors of an interval are the difference of
//! the cumulative error counts (the body carries no per-interval error count).

use crate::cmd::speedo::{Counts, Decoded, Reading, Subject};
use crate::config::{Config as PumpConfig, Role, Thresholds};
use crate::core::health::{self, Health, Interval, Learned, Observed, State};
use jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

/// Whose view `serve` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// Everything in `xreport`.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Client,
    Source,
    /// The pump's (or the source's) totals.
    Total,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "client" => Some(Kind::Client),
            "source" => Some(Kind::Source),
            "total" => Some(Kind::Total),
            _ => None,
        }
    }
}

/// One interval of history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub end: Timestamp,
    pub secs: f64,
    pub files: u64,
    pub bytes: u64,
    pub errors: u64,
}

impl Point {
    fn per_s(&self, n: u64) -> f64 {
        if self.secs > 0.0 {
            n as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// One client, source, or the totals.
#[derive(Debug, Clone)]
pub struct Entity {
    pub kind: Kind,
    pub name: String,
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
            points: VecDeque::new(),
            last: None,
            offset: Counts::default(),
            restarts: 0,
            first_seen: None,
            last_good: None,
            heard: None,
            declared,
            health: Health::unknown("nothing seen yet"),
            version: 0,
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

    /// Takes a reading; false when it is not newer than the last one (a duplicate).
    fn observe(&mut self, r: &Reading, history: Duration) -> bool {
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

    fn evaluate(&self, t: &Thresholds, now: Timestamp) -> Health {
        let intervals: Vec<Interval> = self
            .points
            .iter()
            .map(|p| Interval {
                end: p.end,
                secs: p.secs,
                good: p.files,
                errors: p.errors,
            })
            .collect();
        let o = Observed {
            first_seen: self.first_seen,
            last_good: self.last_good,
            intervals: &intervals,
        };
        health::evaluate(t, &o, Learned::NotYet, now)
    }

    pub fn status(&self, now: Timestamp) -> EntityStatus {
        let totals = self.totals();
        let p = self.points.back();
        EntityStatus {
            kind: self.kind,
            name: self.name.clone(),
            state: self.health.state,
            reason: self.health.summary(),
            reasons: self.health.reasons.clone(),
            files_per_s: p.map_or(0.0, |p| p.per_s(p.files)),
            bytes_per_s: p.map_or(0.0, |p| p.per_s(p.bytes)),
            errors_per_s: p.map_or(0.0, |p| p.per_s(p.errors)),
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
            }),
        }
    }
}

fn unix(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

/// A client's, source's or the totals' status, as `/api/status` and the page show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntityStatus {
    pub kind: Kind,
    pub name: String,
    pub state: State,
    /// The reasons on one line (`ok` when none).
    pub reason: String,
    pub reasons: Vec<health::Reason>,
    /// Good files per second in the last interval.
    pub files_per_s: f64,
    pub bytes_per_s: f64,
    pub errors_per_s: f64,
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
}

/// The pump's (or the source's) overall state: the worst one, offenders first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PumpStatus {
    pub view: String,
    pub state: State,
    /// `CRITICAL - 1 critical, 0 warning, 2 ok, 0 unknown: client cfs stopped: …`
    pub text: String,
    pub counts: BTreeMap<State, usize>,
    pub offenders: Vec<Offender>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Offender {
    pub kind: Kind,
    pub name: String,
    pub state: State,
    pub reason: String,
}

/// `/api/status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub generated: String,
    pub pump: PumpStatus,
    pub total: EntityStatus,
    pub clients: Vec<EntityStatus>,
    pub sources: Vec<EntityStatus>,
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
}

/// Chart data of one entity: unix seconds and per-second rates, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Series {
    pub t: Vec<f64>,
    pub files_per_s: Vec<f64>,
    pub bytes_per_s: Vec<f64>,
    pub errors_per_s: Vec<f64>,
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

/// Everything `serve` knows.
#[derive(Debug)]
pub struct Board {
    view: View,
    history: Duration,
    default_thresholds: Thresholds,
    thresholds: BTreeMap<String, Thresholds>,
    clients: HashMap<String, Entity>,
    sources: HashMap<String, Entity>,
    total: Entity,
    version: u64,
    removed: VecDeque<(u64, Removed)>,
    pub intake: Intake,
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
                        Role::Feeder | Role::Admin => {}
                    }
                }
            }
            View::Source(s) => {
                sources.insert(s.clone(), Entity::new(Kind::Source, s, true));
            }
        }
        Board {
            total: Entity::new(Kind::Total, "all", true),
            view,
            history,
            default_thresholds: pump.default_thresholds,
            thresholds: pump.thresholds.clone(),
            clients,
            sources,
            version: 1,
            removed: VecDeque::new(),
            intake: Intake::default(),
        }
    }

    pub fn view(&self) -> &View {
        &self.view
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn thresholds_for(&self, name: &str) -> Thresholds {
        self.thresholds
            .get(name)
            .copied()
            .unwrap_or(self.default_thresholds)
    }

    pub fn clients(&self) -> impl Iterator<Item = &Entity> {
        self.clients.values()
    }

    pub fn sources(&self) -> impl Iterator<Item = &Entity> {
        self.sources.values()
    }

    pub fn total(&self) -> &Entity {
        &self.total
    }

    pub fn entity(&self, kind: Kind, name: &str) -> Option<&Entity> {
        match kind {
            Kind::Client => self.clients.get(name),
            Kind::Source => self.sources.get(name),
            Kind::Total => Some(&self.total),
        }
    }

    /// Takes one speedo received at `now`.
    pub fn apply(&mut self, d: &Decoded, now: Timestamp) {
        let scope_ok = match (&self.view, &d.scope) {
            (View::Admin, None) => true,
            (View::Source(s), Some(scope)) => s == scope,
            (View::Source(s), None) => matches!(&d.subject, Subject::Source(n) if n == s),
            (View::Admin, Some(_)) => false,
        };
        let (kind, name) = match &d.subject {
            Subject::Client(c) if scope_ok => (Kind::Client, c.as_str()),
            Subject::Source(s) if scope_ok => (Kind::Source, s.as_str()),
            Subject::AllClients if scope_ok => (Kind::Total, "all"),
            _ => {
                self.intake.ignored += 1;
                return;
            }
        };
        if let (View::Source(me), Kind::Source) = (&self.view, kind)
            && me != name
        {
            self.intake.ignored += 1;
            return;
        }
        let thresholds = self.thresholds_for(name);
        let version = self.version + 1;
        let history = self.history;
        let e = match kind {
            Kind::Client => self
                .clients
                .entry(name.to_owned())
                .or_insert_with(|| Entity::new(Kind::Client, name, false)),
            Kind::Source => self
                .sources
                .entry(name.to_owned())
                .or_insert_with(|| Entity::new(Kind::Source, name, false)),
            Kind::Total => &mut self.total,
        };
        if !e.observe(&d.reading, history) {
            self.intake.stale += 1;
            return;
        }
        e.heard = Some(now);
        e.health = e.evaluate(&thresholds, now);
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
        for (kind, map) in [
            (Kind::Client, &mut self.clients),
            (Kind::Source, &mut self.sources),
        ] {
            map.retain(|name, e| {
                let silent = e.heard.is_some_and(|h| later(h, history) < now);
                if silent && !e.declared {
                    gone.push(Removed {
                        kind,
                        name: name.clone(),
                    });
                    return false;
                }
                true
            });
        }
        let thresholds = |name: &str| {
            self.thresholds
                .get(name)
                .copied()
                .unwrap_or(self.default_thresholds)
        };
        for e in self
            .clients
            .values_mut()
            .chain(self.sources.values_mut())
            .chain(std::iter::once(&mut self.total))
        {
            let h = e.evaluate(&thresholds(&e.name), now);
            let same = h.state == e.health.state
                && h.reasons.len() == e.health.reasons.len()
                && h.reasons
                    .iter()
                    .zip(&e.health.reasons)
                    .all(|(a, b)| a.rule == b.rule);
            if !same {
                e.version = version;
                changed = true;
            }
            e.health = h;
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

    /// The pump's state: the worst of every client and source.
    pub fn pump(&self) -> PumpStatus {
        let mut counts: BTreeMap<State, usize> = State::ALL.iter().map(|s| (*s, 0)).collect();
        let mut offenders = Vec::new();
        for e in self.clients.values().chain(self.sources.values()) {
            *counts.entry(e.health.state).or_default() += 1;
            if matches!(e.health.state, State::Warning | State::Critical) {
                offenders.push(Offender {
                    kind: e.kind,
                    name: e.name.clone(),
                    state: e.health.state,
                    reason: e.health.summary(),
                });
            }
        }
        offenders.sort_by(|a, b| {
            b.state
                .severity()
                .cmp(&a.state.severity())
                .then_with(|| a.name.cmp(&b.name))
        });
        let state = if self.clients.is_empty() && self.sources.is_empty() {
            State::Unknown
        } else {
            offenders
                .first()
                .map(|o| o.state)
                .unwrap_or(if counts[&State::Ok] > 0 {
                    State::Ok
                } else {
                    State::Unknown
                })
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
            let kind = if o.kind == Kind::Client {
                "client"
            } else {
                "source"
            };
            text.push_str(&format!("; {kind} {} {}", o.name, o.reason));
        }
        PumpStatus {
            view: self.view.label(),
            state,
            text,
            counts,
            offenders,
        }
    }

    fn sorted(map: &HashMap<String, Entity>, now: Timestamp) -> Vec<EntityStatus> {
        let mut v: Vec<&Entity> = map.values().collect();
        v.sort_by(|a, b| {
            b.health
                .state
                .severity()
                .cmp(&a.health.state.severity())
                .then_with(|| a.name.cmp(&b.name))
        });
        v.into_iter().map(|e| e.status(now)).collect()
    }

    /// `/api/status`: every client and source, worst first, then by name.
    pub fn status(&self, now: Timestamp) -> Status {
        Status {
            generated: now.to_string(),
            pump: self.pump(),
            total: self.total.status(now),
            clients: Board::sorted(&self.clients, now),
            sources: Board::sorted(&self.sources, now),
        }
    }

    /// What changed after `since` (0 = everything), as one event.
    pub fn delta(&self, since: u64, now: Timestamp) -> Delta {
        let full = since == 0
            || self
                .removed
                .front()
                .is_some_and(|(v, _)| *v > since && self.removed.len() >= REMOVED_KEEP);
        let entities = self
            .clients
            .values()
            .chain(self.sources.values())
            .filter(|e| full || e.version > since)
            .map(|e| e.status(now))
            .collect();
        let removed = if full {
            vec![]
        } else {
            self.removed
                .iter()
                .filter(|(v, _)| *v > since)
                .map(|(_, r)| r.clone())
                .collect()
        };
        Delta {
            version: self.version,
            full,
            generated: now.to_string(),
            pump: self.pump(),
            total: self.total.status(now),
            entities,
            removed,
        }
    }

    /// The chart data of one entity.
    pub fn series(&self, kind: Kind, name: &str) -> Option<Series> {
        let e = self.entity(kind, name)?;
        let mut s = Series::default();
        for p in &e.points {
            s.t.push(unix(p.end));
            s.files_per_s.push(p.per_s(p.files));
            s.bytes_per_s.push(p.per_s(p.bytes));
            s.errors_per_s.push(p.per_s(p.errors));
        }
        Some(s)
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
        let delta = b.delta(v - 1, t(181.0));
        assert_eq!(delta.entities.len(), 1);
        assert_eq!(b.pump().state, State::Critical);
        assert!(
            b.pump().text.contains("client cfs stopped"),
            "{}",
            b.pump().text
        );
        // Not heard of for the whole history: gone (declared accounts stay).
        assert!(b.sweep(t(700.0)));
        assert!(b.entity(Kind::Client, "cfs").is_none());
        assert!(b.entity(Kind::Client, "edu").is_some());
        let delta = b.delta(v, t(700.0));
        assert_eq!(
            delta.removed,
            [Removed {
                kind: Kind::Client,
                name: "cfs".into()
            }]
        );
    }

    #[test]
    fn declared_accounts_are_unknown_until_seen() {
        let b = Board::new(&pump(), View::Admin, Duration::from_secs(600));
        let s = b.status(t(0.0));
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
}
