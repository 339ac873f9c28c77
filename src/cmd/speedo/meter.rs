//! The speedometers themselves, pure: [`Speedometers::record`] counts one report,
//! [`Speedometers::tick`] says which speedos are due at `now` and resets their interval.
//! No clock and no broker in here; the daemon passes `now` in.
//!
//! Three kinds of meter: per client and per source (published to `xreport`), and per
//! (source, client) pair (published to `xr_<source>`), plus the pump's totals (`.all`).
//! Meters that share an interval share a schedule, so their windows are aligned and
//! sums over clients equal the totals at the same tick.
//!
//! Counts are cumulative since this `Speedometers` was made: a restart of `speedo` shows
//! as a decrease, and telling a restart from a reset is the reader's concern (`serve`
//! treats a decrease like a Prometheus counter reset).

use super::body::{Reading, Subject};
use crate::config::Config;
use crate::core::CodeClass;
use crate::core::lag::{Lag, LagMeter, LagReject, LagSummary};
use crate::core::stamp::Stamp;
use crate::core::topic::{MAX_SHORT, truncated};
use jiff::{SignedDuration, Timestamp};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Names come from the reports: a randomly seeded hasher (foldhash: fast on short keys,
/// minimally DoS-resistant), since `record` does three lookups per report.
type Map<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;
use std::time::Duration;

/// The name counted for a report whose client or source nobody could tell.
pub const UNKNOWN: &str = "unknown";

/// When to publish, and for how long to publish zeros.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Per client and per source, unless overridden by name.
    pub interval: Duration,
    /// The pump's totals (`v01.speedo.{client,source}.all` on `xreport`).
    pub all_interval: Duration,
    /// A meter silent longer than this is forgotten (no more zero speedos).
    pub expire: Duration,
    /// `users.<name>.interval`: for a source, its speedos everywhere and everything on its
    /// `xr_<source>`; for a client, its speedo on `xreport`.
    pub overrides: BTreeMap<String, Duration>,
    /// The declared sources: only they get their own view on `xr_<source>`. A source name
    /// that only a report states (a relPath, a header) is data, not an account of ours
    /// (SPEC §2 "Names"): it counts in the admins' speedos under its name, and never
    /// names an exchange.
    pub views: BTreeSet<String>,
}

impl Settings {
    pub fn from_config(c: &Config) -> Settings {
        Settings {
            interval: c.speedo.interval,
            all_interval: c.speedo.all_interval,
            expire: c.speedo.expire,
            overrides: c
                .users
                .values()
                .filter_map(|u| Some((u.name.clone(), u.interval?)))
                .collect(),
            views: c.sources().map(|u| u.name.clone()).collect(),
        }
    }

    pub fn interval_for(&self, name: &str) -> Duration {
        self.overrides.get(name).copied().unwrap_or(self.interval)
    }
}

/// One report, reduced to what a speedo counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample<'a> {
    pub client: &'a str,
    pub source: &'a str,
    pub code: u16,
    /// The product's (or part's) size; 0 when the report does not say.
    pub bytes: u64,
    /// The delivery lag (`core::lag`), or why there is none; `None`: not measured.
    /// Counted for good deliveries only.
    pub lag: Option<Result<Lag, LagReject>>,
}

/// The four cumulative counts of a speedo.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub good: u64,
    pub errors: u64,
    pub good_bytes: u64,
    pub bad_bytes: u64,
}

/// Where a speedo goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// The pump's report exchange (`xreport`): the admins' view.
    Report,
    /// `xr_<source>`: the source's view of its own products.
    Source(String),
}

/// One speedo message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Speedo {
    pub target: Target,
    pub subject: Subject,
    pub reading: Reading,
    /// The interval's delivery lags (`lag_*` headers); `None` when none was counted.
    pub lag: Option<LagSummary>,
}

impl Speedo {
    /// The message: topic, `client`/`source` headers and body.
    pub fn outgoing(&self) -> crate::core::emit::Outgoing {
        let scope = match &self.target {
            Target::Report => None,
            Target::Source(s) => Some(s.as_str()),
        };
        let mut out = super::body::encode(&self.subject, scope, &self.reading);
        if let Some(l) = &self.lag {
            l.set_headers(&mut out.headers);
        }
        out
    }
}

/// A set of meters published together.
#[derive(Debug, Clone)]
struct Schedule {
    every: Duration,
    next_due: Timestamp,
    /// End of the previous interval (start of the current one).
    last_end: Timestamp,
}

#[derive(Debug, Clone)]
struct Meter {
    total: Counts,
    interval_files: u64,
    interval_bytes: u64,
    /// Counted something since the last tick.
    active: bool,
    /// The last tick at which it had counted something in the interval.
    last_active: Timestamp,
    schedule: u16,
    lag: LagMeter,
}

impl Meter {
    fn new(schedule: u16, now: Timestamp) -> Meter {
        Meter {
            total: Counts::default(),
            interval_files: 0,
            interval_bytes: 0,
            active: false,
            last_active: now,
            schedule,
            lag: LagMeter::default(),
        }
    }

    #[inline]
    fn add(&mut self, good: bool, bytes: u64, lag: Option<Lag>) {
        let t = &mut self.total;
        if let Some(l) = lag {
            self.lag.add(l);
        }
        if good {
            t.good += 1;
            t.good_bytes = t.good_bytes.saturating_add(bytes);
            self.interval_files += 1;
            self.interval_bytes = self.interval_bytes.saturating_add(bytes);
        } else {
            t.errors += 1;
            t.bad_bytes = t.bad_bytes.saturating_add(bytes);
        }
        self.active = true;
    }

    /// Ends the interval: the reading and its lags; `None` once the meter expired.
    fn close(
        &mut self,
        end: Timestamp,
        interval_s: f64,
        expire: Duration,
    ) -> Option<(Reading, Option<LagSummary>)> {
        if self.active {
            self.last_active = end;
        } else if end.duration_since(self.last_active)
            > SignedDuration::try_from(expire).unwrap_or(SignedDuration::MAX)
        {
            return None;
        }
        let r = Reading {
            end: Stamp(end),
            good: self.total.good,
            errors: self.total.errors,
            good_bytes: self.total.good_bytes,
            bad_bytes: self.total.bad_bytes,
            interval_bytes: self.interval_bytes,
            interval_files: self.interval_files,
            interval_s,
        };
        self.interval_files = 0;
        self.interval_bytes = 0;
        self.active = false;
        Some((r, self.lag.take()))
    }
}

#[derive(Debug, Clone)]
struct SourceMeters {
    meter: Meter,
    /// A declared source, with its own view on `xr_<source>`.
    view: bool,
    /// Per client, this source's products only (only for a source with a view).
    clients: Map<Meter>,
}

impl SourceMeters {
    #[inline]
    fn add(&mut self, s: &Sample<'_>, good: bool, lag: Option<Lag>, now: Timestamp) {
        self.meter.add(good, s.bytes, lag);
        if !self.view {
            return;
        }
        match self.clients.get_mut(s.client) {
            Some(m) => m.add(good, s.bytes, lag),
            None => {
                let mut m = Meter::new(self.meter.schedule, now);
                m.add(good, s.bytes, lag);
                self.clients.insert(s.client.into(), m);
            }
        }
    }
}

/// Every speedometer of one `speedo` process.
#[derive(Debug, Clone)]
pub struct Speedometers {
    settings: Settings,
    /// Named meters' schedules, one per distinct interval.
    schedules: Vec<Schedule>,
    /// The `.all` schedule.
    all_schedule: Schedule,
    clients: Map<Meter>,
    sources: Map<SourceMeters>,
    all: Meter,
    /// The latest `now` seen, for meters made between ticks.
    clock: Timestamp,
    /// Good deliveries whose lag was not counted, by reason (indexed as `LagReject::ALL`).
    lag_rejected: [u64; 5],
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

impl Schedule {
    fn new(every: Duration, start: Timestamp) -> Schedule {
        Schedule {
            every,
            next_due: add(start, every),
            last_end: start,
        }
    }

    /// If due at `now` (or `force`d): the interval's length, and the schedule moves on.
    fn due(&mut self, now: Timestamp, force: bool) -> Option<f64> {
        if !(force || now >= self.next_due) {
            return None;
        }
        let secs = now.duration_since(self.last_end).as_secs_f64().max(0.0);
        self.last_end = now;
        if now >= self.next_due {
            self.next_due = add(self.next_due, self.every);
            if self.next_due <= now {
                // Behind by more than an interval (a stall): start afresh from now.
                self.next_due = add(now, self.every);
            }
        }
        Some(secs)
    }
}

impl Speedometers {
    /// Starts counting at `now`; the first speedos are due one interval later.
    pub fn new(settings: Settings, now: Timestamp) -> Speedometers {
        let mut everies: Vec<Duration> = std::iter::once(settings.interval)
            .chain(settings.overrides.values().copied())
            .collect();
        everies.sort();
        everies.dedup();
        let every = |d: Duration| d.max(Duration::from_millis(1));
        Speedometers {
            schedules: everies
                .into_iter()
                .map(|d| Schedule::new(every(d), now))
                .collect(),
            all_schedule: Schedule::new(every(settings.all_interval), now),
            clients: Map::default(),
            sources: Map::default(),
            all: Meter::new(0, now),
            clock: now,
            settings,
            lag_rejected: [0; 5],
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn schedule_for(&self, name: &str) -> u16 {
        let d = self
            .settings
            .interval_for(name)
            .max(Duration::from_millis(1));
        self.schedules
            .iter()
            .position(|s| s.every == d)
            .unwrap_or(0) as u16
    }

    /// Counts one report. A 1xx (102 = started) or a code of no known class counts in
    /// nothing; returns whether it counted.
    ///
    /// Names are kept to their first 255 bytes (cut on a character boundary), as topics
    /// and headers carry them: a name from a report can be any size, and two names that
    /// only differ past that would otherwise publish different counts under one topic.
    pub fn record(&mut self, s: &Sample<'_>) -> bool {
        let class = CodeClass::of(s.code);
        let good = class.is_good();
        if !good && !class.is_error() {
            return false;
        }
        let s = &Sample {
            client: truncated(s.client, MAX_SHORT),
            source: truncated(s.source, MAX_SHORT),
            ..*s
        };
        // Delivery lag is about deliveries: a failure has none.
        let lag = match s.lag {
            Some(Ok(l)) if good => Some(l),
            Some(Err(why)) if good => {
                if let Some(i) = LagReject::ALL.iter().position(|r| *r == why) {
                    self.lag_rejected[i] = self.lag_rejected[i].saturating_add(1);
                }
                None
            }
            _ => None,
        };
        self.all.add(good, s.bytes, lag);
        match self.clients.get_mut(s.client) {
            Some(m) => m.add(good, s.bytes, lag),
            None => {
                let mut m = Meter::new(self.schedule_for(s.client), self.clock);
                m.add(good, s.bytes, lag);
                self.clients.insert(s.client.into(), m);
            }
        }
        match self.sources.get_mut(s.source) {
            Some(src) => src.add(s, good, lag, self.clock),
            None => {
                let mut src = SourceMeters {
                    meter: Meter::new(self.schedule_for(s.source), self.clock),
                    view: s.source != UNKNOWN && self.settings.views.contains(s.source),
                    clients: Map::default(),
                };
                src.add(s, good, lag, self.clock);
                self.sources.insert(s.source.into(), src);
            }
        }
        true
    }

    /// When the next speedo is due.
    pub fn next_due(&self) -> Timestamp {
        self.schedules
            .iter()
            .map(|s| s.next_due)
            .fold(self.all_schedule.next_due, Timestamp::min)
    }

    /// The speedos due at `now`, each meter's interval reset. Meters silent for longer than
    /// `expire` are dropped instead (the totals never are).
    pub fn tick(&mut self, now: Timestamp) -> Vec<Speedo> {
        self.tick_inner(now, false)
    }

    /// Every speedo now, due or not (a last reading before stopping).
    pub fn flush(&mut self, now: Timestamp) -> Vec<Speedo> {
        self.tick_inner(now, true)
    }

    fn tick_inner(&mut self, now: Timestamp, force: bool) -> Vec<Speedo> {
        let now = now.max(self.clock);
        self.clock = now;
        let expire = self.settings.expire;
        let mut out = Vec::new();
        if let Some(secs) = self.all_schedule.due(now, force)
            && let Some((r, lag)) = self.all.close(now, secs, Duration::MAX)
        {
            for subject in [Subject::AllClients, Subject::AllSources] {
                out.push(Speedo {
                    target: Target::Report,
                    subject,
                    reading: r,
                    lag,
                });
            }
        }
        let due: Vec<Option<f64>> = self
            .schedules
            .iter_mut()
            .map(|s| s.due(now, force))
            .collect();
        if due.iter().all(Option::is_none) {
            return out;
        }
        self.clients.retain(|name, m| {
            let Some(secs) = due[usize::from(m.schedule)] else {
                return true;
            };
            match m.close(now, secs, expire) {
                Some((r, lag)) => {
                    out.push(Speedo {
                        target: Target::Report,
                        subject: Subject::Client(name.to_string()),
                        reading: r,
                        lag,
                    });
                    true
                }
                None => false,
            }
        });
        self.sources.retain(|name, src| {
            let Some(secs) = due[usize::from(src.meter.schedule)] else {
                return true;
            };
            let Some((r, lag)) = src.meter.close(now, secs, expire) else {
                return false;
            };
            out.push(Speedo {
                target: Target::Report,
                subject: Subject::Source(name.to_string()),
                reading: r,
                lag,
            });
            if !src.view {
                return true;
            }
            let target = Target::Source(name.to_string());
            for subject in [Subject::Source(name.to_string()), Subject::AllClients] {
                out.push(Speedo {
                    target: target.clone(),
                    subject,
                    reading: r,
                    lag,
                });
            }
            src.clients
                .retain(|client, m| match m.close(now, secs, expire) {
                    Some((r, lag)) => {
                        out.push(Speedo {
                            target: target.clone(),
                            subject: Subject::Client(client.to_string()),
                            reading: r,
                            lag,
                        });
                        true
                    }
                    None => false,
                });
            true
        });
        out
    }

    /// How many meters are kept: (clients, sources, (source, client) pairs).
    pub fn sizes(&self) -> (usize, usize, usize) {
        (
            self.clients.len(),
            self.sources.len(),
            self.sources.values().map(|s| s.clients.len()).sum(),
        )
    }

    /// The cumulative counts of a client (on `xreport`), if tracked.
    pub fn client_counts(&self, client: &str) -> Option<Counts> {
        self.clients.get(client).map(|m| m.total)
    }

    /// The pump's cumulative counts.
    pub fn all_counts(&self) -> Counts {
        self.all.total
    }

    /// Good deliveries whose lag was not counted (no or absurd `pubTime`), by reason,
    /// since this `Speedometers` was made.
    pub fn lag_rejected(&self) -> impl Iterator<Item = (LagReject, u64)> + '_ {
        LagReject::ALL.into_iter().zip(self.lag_rejected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(secs: f64) -> Timestamp {
        Timestamp::from_nanosecond((1_700_000_000.0e9 + secs * 1e9) as i128).unwrap()
    }

    fn settings() -> Settings {
        Settings {
            interval: Duration::from_secs(60),
            all_interval: Duration::from_secs(1),
            expire: Duration::from_secs(3600),
            overrides: BTreeMap::new(),
            views: ["radar", "sat", "s1", "s2", "s3"]
                .into_iter()
                .map(String::from)
                .collect(),
        }
    }

    fn rec(m: &mut Speedometers, client: &str, source: &str, code: u16, bytes: u64) -> bool {
        m.record(&Sample {
            client,
            source,
            code,
            bytes,
            lag: None,
        })
    }

    fn find<'a>(out: &'a [Speedo], target: &Target, subject: &Subject) -> Option<&'a Reading> {
        out.iter()
            .find(|s| &s.target == target && &s.subject == subject)
            .map(|s| &s.reading)
    }

    fn client(n: &str) -> Subject {
        Subject::Client(n.into())
    }

    fn source(n: &str) -> Subject {
        Subject::Source(n.into())
    }

    fn xr(n: &str) -> Target {
        Target::Source(n.into())
    }

    #[test]
    fn counts_per_interval_and_cumulative() {
        let mut m = Speedometers::new(settings(), t(0.0));
        for _ in 0..3 {
            assert!(rec(&mut m, "cfs", "radar", 201, 1000));
        }
        assert!(rec(&mut m, "cfs", "radar", 499, 50));
        assert!(rec(&mut m, "cfs", "radar", 304, 0));
        // Before the interval ends only the totals are due.
        let out = m.tick(t(30.0));
        assert!(
            out.iter()
                .all(|s| matches!(s.subject, Subject::AllClients | Subject::AllSources))
        );
        let out = m.tick(t(60.0));
        let r = find(&out, &Target::Report, &client("cfs")).unwrap();
        assert_eq!(
            (r.good, r.errors, r.good_bytes, r.bad_bytes),
            (4, 1, 3000, 50)
        );
        assert_eq!((r.interval_files, r.interval_bytes), (4, 3000));
        assert_eq!(r.interval_s, 60.0);
        assert_eq!(r.end, Stamp(t(60.0)));
        for (target, subject) in [
            (Target::Report, source("radar")),
            (xr("radar"), source("radar")),
            (xr("radar"), Subject::AllClients),
            (xr("radar"), client("cfs")),
        ] {
            assert_eq!(
                find(&out, &target, &subject),
                Some(r),
                "{target:?} {subject:?}"
            );
        }
        // The next interval: cumulative counts stay, interval counts restart.
        rec(&mut m, "cfs", "radar", 201, 7);
        let out = m.tick(t(120.0));
        let r = find(&out, &Target::Report, &client("cfs")).unwrap();
        assert_eq!((r.good, r.interval_files, r.interval_bytes), (5, 1, 7));
    }

    #[test]
    fn zeros_for_silent_clients_until_expire() {
        let mut s = settings();
        s.expire = Duration::from_secs(150);
        let mut m = Speedometers::new(s, t(0.0));
        rec(&mut m, "cfs", "radar", 201, 10);
        let mut seen = vec![];
        for k in 1..=6 {
            let out = m.tick(t(60.0 * k as f64));
            seen.push(find(&out, &Target::Report, &client("cfs")).copied());
        }
        // Active at 60; silent 120 (60 s), 180 (120 s): zeros; 240 (180 s > 150): gone.
        assert!(seen[0].is_some_and(|r| r.interval_files == 1));
        for r in &seen[1..3] {
            let r = r.expect("zeros until expire");
            assert_eq!((r.good, r.interval_files), (1, 0));
        }
        assert!(seen[3..].iter().all(Option::is_none));
        assert_eq!(m.sizes(), (0, 0, 0));
        // A client that comes back starts again; the totals never expire.
        rec(&mut m, "cfs", "radar", 201, 10);
        let out = m.tick(t(420.0));
        assert_eq!(find(&out, &Target::Report, &client("cfs")).unwrap().good, 1);
        assert_eq!(
            find(&out, &Target::Report, &Subject::AllClients)
                .unwrap()
                .good,
            2
        );
    }

    #[test]
    fn per_source_interval_override() {
        let mut s = settings();
        s.overrides.insert("radar".into(), Duration::from_secs(10));
        let mut m = Speedometers::new(s, t(0.0));
        rec(&mut m, "cfs", "radar", 201, 1);
        rec(&mut m, "cfs", "sat", 201, 1);
        let out = m.tick(t(10.0));
        assert!(find(&out, &Target::Report, &source("radar")).is_some());
        assert!(find(&out, &xr("radar"), &client("cfs")).is_some());
        assert!(find(&out, &xr("radar"), &Subject::AllClients).is_some());
        assert_eq!(
            find(&out, &xr("radar"), &source("radar"))
                .unwrap()
                .interval_s,
            10.0
        );
        assert!(find(&out, &Target::Report, &source("sat")).is_none());
        assert!(find(&out, &Target::Report, &client("cfs")).is_none());
        assert_eq!(m.next_due(), t(11.0)); // the totals, every second
        let out = m.tick(t(60.0));
        assert!(find(&out, &Target::Report, &source("sat")).is_some());
        assert!(find(&out, &Target::Report, &client("cfs")).is_some());
        assert!(find(&out, &Target::Report, &source("radar")).is_some());
    }

    #[test]
    fn started_and_odd_codes_count_in_nothing() {
        let mut m = Speedometers::new(settings(), t(0.0));
        assert!(!rec(&mut m, "cfs", "radar", 102, 100));
        assert!(!rec(&mut m, "cfs", "radar", 100, 100));
        assert!(!rec(&mut m, "cfs", "radar", 999, 100));
        assert!(!rec(&mut m, "cfs", "radar", 0, 100));
        assert_eq!(m.sizes(), (0, 0, 0));
        assert_eq!(m.all_counts(), Counts::default());
        for code in [200, 201, 205, 304, 307] {
            assert!(rec(&mut m, "cfs", "radar", code, 1));
        }
        for code in [404, 499, 500, 503] {
            assert!(rec(&mut m, "cfs", "radar", code, 1));
        }
        let c = m.client_counts("cfs").unwrap();
        assert_eq!((c.good, c.errors), (5, 4));
    }

    #[test]
    fn unknown_source_counts_for_the_admins_only() {
        let mut m = Speedometers::new(settings(), t(0.0));
        rec(&mut m, "cfs", UNKNOWN, 201, 1);
        let out = m.flush(t(5.0));
        assert!(find(&out, &Target::Report, &source(UNKNOWN)).is_some());
        assert!(find(&out, &Target::Report, &client("cfs")).is_some());
        assert!(out.iter().all(|s| s.target == Target::Report));
    }

    #[test]
    fn an_undeclared_source_counts_for_the_admins_only_and_never_names_an_exchange() {
        let mut m = Speedometers::new(settings(), t(0.0));
        let hostile = [
            "<img src=x onerror=alert(1)>",
            "evil\nsource",
            "xr_radar",
            "a.b.c",
            "#",
            "\u{202e}radar",
        ];
        for h in hostile {
            rec(&mut m, "cfs", h, 201, 1);
        }
        rec(&mut m, "cfs", "radar", 201, 1);
        let out = m.flush(t(5.0));
        for h in hostile {
            assert!(find(&out, &Target::Report, &source(h)).is_some(), "{h:?}");
        }
        let views: Vec<&Target> = out
            .iter()
            .map(|s| &s.target)
            .filter(|t| **t != Target::Report)
            .collect();
        assert!(views.iter().all(|t| **t == xr("radar")), "{views:?}");
        assert_eq!(
            m.sizes(),
            (1, 7, 1),
            "no per-client meters for undeclared sources"
        );
    }

    #[test]
    fn names_are_kept_to_255_bytes() {
        let mut m = Speedometers::new(settings(), t(0.0));
        let long = "€".repeat(100); // 300 bytes
        rec(&mut m, &long, &format!("{long}a"), 201, 1);
        rec(&mut m, &format!("{long}b"), &long, 201, 1);
        let out = m.flush(t(5.0));
        let cut = &long[..255];
        let r = find(&out, &Target::Report, &client(cut)).unwrap();
        assert_eq!(r.good, 2, "one meter under the first 255 bytes");
        assert_eq!(find(&out, &Target::Report, &source(cut)).unwrap().good, 2);
        assert!(out.iter().all(|s| s.outgoing().routing_key.len() <= 255));
    }

    #[test]
    fn absurd_sizes_saturate() {
        let mut m = Speedometers::new(settings(), t(0.0));
        rec(&mut m, "cfs", "radar", 201, u64::MAX);
        rec(&mut m, "cfs", "radar", 201, u64::MAX);
        rec(&mut m, "cfs", "radar", 499, u64::MAX);
        rec(&mut m, "cfs", "radar", 499, u64::MAX);
        let c = m.client_counts("cfs").unwrap();
        assert_eq!((c.good_bytes, c.bad_bytes), (u64::MAX, u64::MAX));
    }

    #[test]
    fn a_stall_restarts_the_schedule_and_the_interval_says_how_long() {
        let mut m = Speedometers::new(settings(), t(0.0));
        rec(&mut m, "cfs", "radar", 201, 1);
        let out = m.tick(t(250.0));
        assert_eq!(
            find(&out, &Target::Report, &client("cfs"))
                .unwrap()
                .interval_s,
            250.0
        );
        assert_eq!(
            m.schedules[0].next_due,
            t(310.0),
            "re-anchored one interval after the late tick"
        );
        // A clock that goes back is treated as no time passing.
        let out = m.tick(t(100.0));
        assert!(out.is_empty());
    }

    #[test]
    fn lags_per_meter_for_good_deliveries_only() {
        use crate::core::lag::{H_LAG_COUNT, H_LAG_P95, LagRules};
        let rules = LagRules::DEFAULT;
        let mut m = Speedometers::new(settings(), t(0.0));
        let mut lagged = |client: &str, source: &str, code: u16, lag: Result<f64, LagReject>| {
            m.record(&Sample {
                client,
                source,
                code,
                bytes: 1,
                lag: Some(lag.and_then(|x| rules.accept(x))),
            })
        };
        for i in 0..100 {
            lagged("cfs", "radar", 201, Ok(f64::from(i)));
        }
        lagged("edu", "radar", 201, Ok(600.0));
        lagged("edu", "radar", 499, Ok(9000.0));
        lagged("edu", "radar", 201, Err(LagReject::NoPubTime));
        lagged("edu", "radar", 201, Ok(-3600.0));
        let out = m.tick(t(60.0));
        let lag_of = |target: &Target, subject: &Subject| {
            out.iter()
                .find(|s| &s.target == target && &s.subject == subject)
                .and_then(|s| s.lag)
        };
        let cfs = lag_of(&Target::Report, &client("cfs")).unwrap();
        assert_eq!((cfs.count, cfs.max), (100, 99.0));
        assert!((cfs.p95 - 94.0).abs() <= 1.0, "{cfs:?}");
        let edu = lag_of(&Target::Report, &client("edu")).unwrap();
        assert_eq!(
            (edu.count, edu.max),
            (1, 600.0),
            "failures and refusals not counted"
        );
        assert_eq!(
            lag_of(&Target::Report, &source("radar")).unwrap().count,
            101
        );
        assert_eq!(lag_of(&xr("radar"), &client("edu")), Some(edu));
        let rejected: Vec<(LagReject, u64)> = m.lag_rejected().filter(|r| r.1 > 0).collect();
        assert_eq!(
            rejected,
            [(LagReject::NoPubTime, 1), (LagReject::Future, 1)]
        );
        let o = out
            .iter()
            .find(|s| s.subject == client("cfs"))
            .unwrap()
            .outgoing();
        assert!(o.headers.get_str(H_LAG_P95).is_some());
        assert_eq!(
            o.headers.get(H_LAG_COUNT).and_then(|v| v.as_i64()),
            Some(100)
        );
        // The next interval, nothing lagged: no lag headers.
        rec(&mut m, "cfs", "radar", 201, 1);
        let out = m.tick(t(120.0));
        assert!(out.iter().all(|s| s.lag.is_none()));
        assert!(
            out.iter()
                .all(|s| s.outgoing().headers.get(H_LAG_P95).is_none())
        );
    }

    #[test]
    fn flush_emits_everything_with_the_partial_interval() {
        let mut m = Speedometers::new(settings(), t(0.0));
        rec(&mut m, "cfs", "radar", 201, 1);
        let out = m.flush(t(12.5));
        // client, source, source on xr, client.all on xr, pair, 2 totals
        assert_eq!(out.len(), 7);
        assert!(out.iter().all(|s| s.reading.interval_s == 12.5));
    }

    proptest! {
        #[test]
        fn sums_over_clients_and_sources_equal_the_totals(
            reports in proptest::collection::vec((0usize..6, 0usize..4, 0usize..5, 0u64..10_000), 0..300),
        ) {
            let clients = ["a", "b", "c", "d", "e", "f"];
            let sources = ["s1", "s2", "s3", UNKNOWN];
            let codes = [201, 304, 499, 503, 102];
            let mut m = Speedometers::new(settings(), t(0.0));
            for (c, s, code, bytes) in &reports {
                rec(&mut m, clients[*c], sources[*s], codes[*code], *bytes);
            }
            let out = m.flush(t(60.0));
            let sum = |pred: &dyn Fn(&Speedo) -> bool| {
                out.iter().filter(|s| pred(s)).fold([0u64; 6], |mut acc, s| {
                    let r = s.reading;
                    for (a, v) in acc.iter_mut().zip([r.good, r.errors, r.good_bytes, r.bad_bytes, r.interval_files, r.interval_bytes]) {
                        *a += v;
                    }
                    acc
                })
            };
            let fields = |r: &Reading| [r.good, r.errors, r.good_bytes, r.bad_bytes, r.interval_files, r.interval_bytes];
            let all = *find(&out, &Target::Report, &Subject::AllClients).unwrap();
            prop_assert_eq!(find(&out, &Target::Report, &Subject::AllSources), Some(&all));
            prop_assert_eq!(sum(&|s| s.target == Target::Report && matches!(s.subject, Subject::Client(_))), fields(&all));
            prop_assert_eq!(sum(&|s| s.target == Target::Report && matches!(s.subject, Subject::Source(_))), fields(&all));
            let counted = reports.iter().filter(|r| r.2 != 4).count() as u64;
            prop_assert_eq!(all.good + all.errors, counted);
            for src in &sources[..3] {
                let x = xr(src);
                let per_client = sum(&|s| s.target == x && matches!(s.subject, Subject::Client(_)));
                match find(&out, &x, &Subject::AllClients) {
                    Some(total) => {
                        prop_assert_eq!(per_client, fields(total));
                        prop_assert_eq!(find(&out, &Target::Report, &source(src)), Some(total));
                    }
                    None => prop_assert_eq!(per_client, [0; 6]),
                }
            }
        }
    }
}
