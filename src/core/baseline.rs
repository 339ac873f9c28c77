//! Learned expected rates (SPEC §6 `unusual`): per name (a client, a source or a pair) and
//! per hour of the week, the running mean and variance of the good-file rate of each
//! interval (Welford's method: one pass, numerically stable, 24 bytes a slot). Pure: the
//! caller passes the hour of the week ([`hour_of_week`] of the interval's end) and the
//! value; `serve` persists the [`Row`]s and loads them back after a restart.
//!
//! The `unusual` rule, like Burrow's sliding-window rules, fires only when **every**
//! interval of a full window is below its own slot's threshold; one good interval clears
//! it. It says nothing until the slots are learned, nor for quiet hours (expected rate
//! below `floor`), so a restart or a night never pages anyone.
//!
//! Three choices keep it from paging people for nothing:
//! - **Trusted after `min_samples` distinct weeks** (default 3), not samples: one hour of
//!   one week gives a slot 60 samples at a 60 s interval, all from the same Monday; the
//!   slot counts the weeks it was seen in ([`Slot::weeks`]).
//! - **A minimum relative drop** ([`UnusualRule::min_drop`], default 25 %): the threshold
//!   is `min(mean − k·σ, mean·(1 − min_drop))`, so a perfectly steady client (σ ≈ 0)
//!   dipping 1 % is not unusual; a drop to half still is.
//! - **It forgets** ([`DEFAULT_MEMORY_WEEKS`], 6): each time a slot starts a new week past
//!   the memory, its weight (n and m2, the variance kept) is scaled by `(M − 1)/M`, so old
//!   weeks fade geometrically and a permanent change (a client that now really moves half
//!   as much) stops being unusual within a few weeks instead of never.
//! - **This hour of this week is not compared with itself**: a name's samples of the
//!   current (hour, week) gather apart and are merged into their slot (Chan's parallel
//!   Welford) only when the hour or week changes, so a drop is judged against the
//!   previous weeks alone (otherwise the hour's own low samples would pull the
//!   expectation down within minutes). A restart of `serve` loses at most that hour,
//!   unless it stops cleanly ([`Baselines::settle`]).
//!
//! Values are best given as files per second of the interval (not files per interval), so
//! a change of speedo interval does not invalidate what was learned.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Slots in a week: hour 0 is Monday 00:00–00:59 UTC, hour 167 Sunday 23:00–23:59.
pub const HOURS_PER_WEEK: usize = 168;

/// Longest name kept (bytes): names arrive in reports and are data, not trusted.
pub const MAX_NAME_BYTES: usize = 255;

/// Below one file per five minutes a quiet hour is mostly empty intervals: "below the
/// expectation in every interval" is then normal, not news.
pub const DEFAULT_FLOOR: f64 = 1.0 / 300.0;

/// Largest value learned: no pump moves 10¹² files/s, and the cap keeps `m2` finite.
pub const MAX_VALUE: f64 = 1e12;

/// Weeks a slot remembers at full weight (see the module doc).
pub const DEFAULT_MEMORY_WEEKS: u16 = 6;

/// The smallest drop below the mean that can be unusual, as a share of the mean.
pub const DEFAULT_MIN_DROP: f64 = 0.25;

/// The week of `t` (weeks since the Monday 1969-12-29 00:00 UTC), clamped to `u32`.
pub fn week_of(t: Timestamp) -> u32 {
    let w = (t.as_second() + 3 * 86_400).div_euclid(7 * 86_400);
    w.clamp(0, i64::from(u32::MAX)) as u32
}

fn valid(x: f64) -> bool {
    (0.0..=MAX_VALUE).contains(&x)
}

/// An hour of the week, `0..168`, Monday 00h UTC = 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct HourOfWeek(u8);

impl HourOfWeek {
    pub fn new(h: u8) -> Option<HourOfWeek> {
        (usize::from(h) < HOURS_PER_WEEK).then_some(HourOfWeek(h))
    }

    pub fn get(self) -> u8 {
        self.0
    }

    /// `Mon 13h`, for people.
    pub fn label(self) -> String {
        const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
        format!("{} {:02}h", DAYS[usize::from(self.0 / 24)], self.0 % 24)
    }
}

impl TryFrom<u8> for HourOfWeek {
    type Error = String;
    fn try_from(h: u8) -> Result<Self, String> {
        HourOfWeek::new(h).ok_or_else(|| format!("hour of week {h} is not in 0..168"))
    }
}

impl From<HourOfWeek> for u8 {
    fn from(h: HourOfWeek) -> u8 {
        h.0
    }
}

/// The hour of the week of `t` in UTC (Monday 00h = 0).
pub fn hour_of_week(t: Timestamp) -> HourOfWeek {
    let secs = t.as_second();
    // 1970-01-01 was a Thursday: day 0 is weekday 3 counted from Monday.
    let weekday = (secs.div_euclid(86_400) + 3).rem_euclid(7);
    let hour = secs.rem_euclid(86_400) / 3600;
    HourOfWeek((weekday * 24 + hour) as u8)
}

/// Running mean and variance of one slot (Welford), with the weeks it was seen in.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Slot {
    n: u32,
    /// Distinct weeks with a sample (saturating).
    weeks: u16,
    /// The week of the latest sample ([`week_of`]).
    last_week: u32,
    mean: f64,
    /// Sum of squared differences from the mean.
    m2: f64,
}

impl Slot {
    /// Adds one value seen in `week`, remembering `memory` weeks at full weight. Values
    /// that are negative (no rate is), above [`MAX_VALUE`] or not numbers are refused and
    /// change nothing.
    pub fn observe(&mut self, week: u32, x: f64, memory: u16) -> bool {
        if !valid(x) {
            return false;
        }
        self.new_week(week, memory);
        self.add(x);
        true
    }

    /// Welford's step for one value.
    fn add(&mut self, x: f64) {
        self.n = self.n.saturating_add(1);
        let delta = x - self.mean;
        self.mean += delta / f64::from(self.n);
        // (x − old mean)·(x − new mean) ≥ 0: m2 never decreases, never goes negative.
        self.m2 += delta * (x - self.mean);
    }

    /// Counts `week` if it is a new one (fading the old weight past `memory` weeks).
    fn new_week(&mut self, week: u32, memory: u16) {
        if self.n == 0 || week > self.last_week {
            self.weeks = self.weeks.saturating_add(1);
            self.last_week = week;
            if self.weeks > memory.max(2) {
                self.fade(memory.max(2));
            }
        }
    }

    /// Merges the samples `b` gathered in `week` (Chan et al.'s parallel update).
    fn merge(&mut self, week: u32, b: &Slot, memory: u16) {
        if b.n == 0 {
            return;
        }
        self.new_week(week, memory);
        let (na, nb) = (f64::from(self.n), f64::from(b.n));
        let n = na + nb;
        let delta = b.mean - self.mean;
        self.mean += delta * nb / n;
        self.m2 += b.m2 + delta * delta * na * nb / n;
        self.n = self.n.saturating_add(b.n);
    }

    /// Scales the weight of what was learned by `(m − 1)/m`, keeping mean and variance.
    fn fade(&mut self, m: u16) {
        if self.n < 2 {
            return;
        }
        let variance = self.variance();
        let n = (u64::from(self.n) * u64::from(m - 1) / u64::from(m)).max(2);
        self.n = n as u32;
        self.m2 = variance * (n - 1) as f64;
    }

    pub fn n(&self) -> u64 {
        u64::from(self.n)
    }

    /// Distinct weeks this slot has samples from.
    pub fn weeks(&self) -> u32 {
        u32::from(self.weeks)
    }

    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// Sample variance (n − 1); 0 below two samples.
    pub fn variance(&self) -> f64 {
        if self.n < 2 {
            0.0
        } else {
            self.m2 / f64::from(self.n - 1)
        }
    }

    pub fn std_dev(&self) -> f64 {
        self.variance().sqrt()
    }

    /// `min(mean − k·σ, mean·(1 − min_drop))`: below it, an interval is below the
    /// expectation.
    pub fn threshold(&self, k: f64, min_drop: f64) -> f64 {
        let (spread, drop) = (self.mean - k * self.std_dev(), self.mean * (1.0 - min_drop));
        // NaN stays NaN (`f64::min` would drop it), so a wild parameter never alarms.
        if spread.is_nan() || drop.is_nan() {
            f64::NAN
        } else {
            spread.min(drop)
        }
    }
}

/// The parameters of the `unusual` rule (`[thresholds.<name>]`: `k`, `min_samples`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnusualRule {
    /// How many standard deviations below the mean is unusual (SPEC default 3).
    pub k: f64,
    /// Distinct weeks a slot needs before it is trusted (it also needs two samples: one
    /// has no spread).
    pub min_samples: u64,
    /// The smallest drop below the mean that can be unusual (share of the mean).
    pub min_drop: f64,
    /// A slot whose mean is below this (same unit as the values) is a quiet hour.
    pub floor: f64,
    /// Seconds the intervals given must cover, e.g. `window` of the thresholds.
    pub window_s: f64,
}

impl Default for UnusualRule {
    fn default() -> Self {
        UnusualRule {
            k: 3.0,
            min_samples: 3,
            min_drop: DEFAULT_MIN_DROP,
            floor: DEFAULT_FLOOR,
            window_s: 600.0,
        }
    }
}

/// Intervals may cover a little less than the window: speedo's timers jitter by
/// milliseconds, so ten 60 s intervals can sum to 599.98 s.
const COVER: f64 = 0.99;

/// One interval of the window, as the rule sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowInterval {
    pub hour: HourOfWeek,
    /// The interval's length in seconds.
    pub secs: f64,
    /// The learned quantity over this interval (files/s).
    pub value: f64,
}

/// What the learned expectation says about a window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Expectation {
    /// No interval, or some interval's slot has fewer than `min_samples` samples: there
    /// is nothing to compare with, and the health rule must not alarm (nor say UNKNOWN).
    NotLearned,
    /// Some interval falls in a quiet hour (expected rate below the floor).
    Quiet,
    /// At least one interval at or above its slot's `mean − k·σ` (or the window is not
    /// yet full, so "every interval" cannot be claimed).
    Usual,
    /// Every interval of a full window below its slot's threshold. The figures are
    /// those of the latest interval.
    Unusual {
        expected: f64,
        threshold: f64,
        observed: f64,
    },
}

impl Expectation {
    pub fn is_unusual(&self) -> bool {
        matches!(self, Expectation::Unusual { .. })
    }
}

/// One name's 168 slots.
#[derive(Debug, Clone, PartialEq)]
pub struct Baseline {
    slots: Box<[Slot; HOURS_PER_WEEK]>,
    /// Slots changed since the last [`Baselines::drain_changed`].
    changed: [u64; 3],
    /// The samples of the current (hour, week), not yet in their slot.
    pending: Option<Pending>,
    /// In [`Baselines`]'s list of changed names.
    listed: bool,
}

/// One hour of one week, gathering.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pending {
    hour: u8,
    week: u32,
    samples: Slot,
}

impl Default for Baseline {
    fn default() -> Self {
        Baseline {
            slots: Box::new([Slot::default(); HOURS_PER_WEEK]),
            changed: [0; 3],
            pending: None,
            listed: false,
        }
    }
}

impl Baseline {
    /// Learns `value` for the interval that ended at `at`: gathered with the other
    /// samples of the same hour of the same week, merged into the slot once that hour is
    /// over (see the module doc).
    pub fn observe(&mut self, at: Timestamp, value: f64, memory: u16) -> bool {
        if !valid(value) {
            return false;
        }
        let (hour, week) = (hour_of_week(at).0, week_of(at));
        match &mut self.pending {
            Some(p) if p.hour == hour && p.week == week => p.samples.add(value),
            _ => {
                self.settle(memory);
                let mut samples = Slot::default();
                samples.add(value);
                self.pending = Some(Pending {
                    hour,
                    week,
                    samples,
                });
            }
        }
        true
    }

    /// Merges the gathering hour into its slot now (a clean stop, a test).
    pub fn settle(&mut self, memory: u16) {
        if let Some(p) = self.pending.take() {
            let h = usize::from(p.hour);
            self.slots[h].merge(p.week, &p.samples, memory);
            self.changed[h / 64] |= 1 << (h % 64);
        }
    }

    pub fn slot(&self, hour: HourOfWeek) -> &Slot {
        &self.slots[usize::from(hour.0)]
    }

    /// The slots with at least one sample, with their hour.
    pub fn learned(&self) -> impl Iterator<Item = (HourOfWeek, &Slot)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.n > 0)
            .map(|(h, s)| (HourOfWeek(h as u8), s))
    }

    /// The rule over one window of intervals (any order; the latest is the last given).
    pub fn expectation(
        &self,
        rule: &UnusualRule,
        window: impl IntoIterator<Item = WindowInterval>,
    ) -> Expectation {
        let (mut seen, mut unlearned, mut quiet) = (false, false, false);
        let mut covered = 0.0;
        let mut latest = None;
        for w in window {
            seen = true;
            if w.secs.is_finite() && w.secs > 0.0 {
                covered += w.secs;
            }
            let slot = self.slot(w.hour);
            if u64::from(slot.weeks) < rule.min_samples || slot.n < 2 {
                unlearned = true;
                continue;
            }
            if slot.mean < rule.floor {
                quiet = true;
                continue;
            }
            let threshold = slot.threshold(rule.k, rule.min_drop);
            // Tested as "below" so that a NaN (value or threshold) clears, never alarms.
            let below = w.value < threshold;
            if !below {
                return Expectation::Usual;
            }
            latest = Some(Expectation::Unusual {
                expected: slot.mean,
                threshold,
                observed: w.value,
            });
        }
        if !seen || unlearned {
            Expectation::NotLearned
        } else if quiet {
            Expectation::Quiet
        } else if covered < rule.window_s * COVER || rule.window_s.is_nan() {
            Expectation::Usual
        } else {
            latest.unwrap_or(Expectation::NotLearned)
        }
    }
}

/// One persisted slot: the table `serve` keeps in SQLite, one row per (name, hour).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub hour_of_week: u8,
    pub n: u64,
    /// Distinct weeks seen.
    pub weeks: u32,
    /// The week of the latest sample ([`week_of`]).
    pub last_week: u32,
    pub mean: f64,
    pub m2: f64,
}

/// Why a stored row was not loaded (a corrupt or hand-edited database).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("baseline row {name:?} hour {hour}: {reason}")]
pub struct RowError {
    pub name: String,
    pub hour: u8,
    pub reason: &'static str,
}

impl Row {
    fn check(&self) -> Result<(HourOfWeek, Slot), RowError> {
        let fail = |reason| RowError {
            name: self.name.chars().take(64).collect(),
            hour: self.hour_of_week,
            reason,
        };
        if self.name.is_empty() || self.name.len() > MAX_NAME_BYTES {
            return Err(fail("name is empty or longer than 255 bytes"));
        }
        let hour = HourOfWeek::new(self.hour_of_week).ok_or_else(|| fail("hour not in 0..168"))?;
        if self.n == 0 || self.n > u64::from(u32::MAX) {
            return Err(fail("no samples, or more than a slot counts"));
        }
        if self.weeks == 0 || self.weeks > u32::from(u16::MAX) {
            return Err(fail("weeks not in 1..=65535"));
        }
        if !valid(self.mean) {
            return Err(fail("mean is not a possible rate"));
        }
        if !(self.m2.is_finite() && self.m2 >= 0.0) || (self.n == 1 && self.m2 != 0.0) {
            return Err(fail("m2 is not a possible sum of squares"));
        }
        Ok((
            hour,
            Slot {
                n: self.n as u32,
                weeks: self.weeks as u16,
                last_week: self.last_week,
                mean: self.mean,
                m2: self.m2,
            },
        ))
    }
}

type Map<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;

/// Every name's baseline.
#[derive(Debug, Clone)]
pub struct Baselines {
    names: Map<Baseline>,
    /// Names with slots changed since the last drain (may hold forgotten names).
    changed: Vec<Box<str>>,
    /// Weeks remembered at full weight.
    memory: u16,
}

impl Default for Baselines {
    fn default() -> Self {
        Baselines::with_memory(DEFAULT_MEMORY_WEEKS)
    }
}

impl Baselines {
    pub fn new() -> Baselines {
        Baselines::default()
    }

    /// Baselines that remember `weeks` weeks at full weight (at least 2).
    pub fn with_memory(weeks: u16) -> Baselines {
        Baselines {
            names: Map::default(),
            changed: Vec::new(),
            memory: weeks.max(2),
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Baseline> {
        self.names.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(|k| &**k)
    }

    /// Learns `value` for `name`, for the interval that ended at `at`; false (and
    /// nothing learned) for a value [`Slot::observe`] refuses or a name that is empty or
    /// too long.
    pub fn observe(&mut self, name: &str, at: Timestamp, value: f64) -> bool {
        if name.is_empty() || name.len() > MAX_NAME_BYTES || !valid(value) {
            return false;
        }
        let b = match self.names.get_mut(name) {
            Some(b) => b,
            None => self.names.entry(name.into()).or_default(),
        };
        b.observe(at, value, self.memory);
        // A merge marks a slot changed: remember the name once for the next drain.
        if b.changed != [0; 3] && !b.listed {
            b.listed = true;
            self.changed.push(name.into());
        }
        true
    }

    /// Merges every name's gathering hour into its slot (before a last save).
    pub fn settle(&mut self) {
        for (name, b) in self.names.iter_mut() {
            b.settle(self.memory);
            if b.changed != [0; 3] && !b.listed {
                b.listed = true;
                self.changed.push(name.clone());
            }
        }
    }

    /// The rule for `name`; [`Expectation::NotLearned`] for a name never seen.
    pub fn expectation(
        &self,
        name: &str,
        rule: &UnusualRule,
        window: impl IntoIterator<Item = WindowInterval>,
    ) -> Expectation {
        match self.names.get(name) {
            Some(b) => b.expectation(rule, window),
            None => Expectation::NotLearned,
        }
    }

    /// Forgets `name` (`pumpwatch baseline reset NAME`); true if it was known.
    pub fn forget(&mut self, name: &str) -> bool {
        self.names.remove(name).is_some()
    }

    /// Every learned slot as a row (for `baseline show` and a full save).
    pub fn rows(&self) -> impl Iterator<Item = Row> + '_ {
        self.names
            .iter()
            .flat_map(|(name, b)| b.learned().map(move |(h, s)| row(name, h, s)))
    }

    /// The rows changed since the last call, for a batched write; marks them saved.
    pub fn drain_changed(&mut self) -> Vec<Row> {
        let mut out = Vec::new();
        for name in std::mem::take(&mut self.changed) {
            let Some(b) = self.names.get_mut(&name) else {
                continue;
            };
            let bits = std::mem::take(&mut b.changed);
            b.listed = false;
            for (h, s) in b.slots.iter().enumerate() {
                if bits[h / 64] & (1 << (h % 64)) != 0 {
                    out.push(row(&name, HourOfWeek(h as u8), s));
                }
            }
        }
        out
    }

    /// Loads stored rows (they are not marked changed). Bad rows are skipped and returned,
    /// so one corrupt row costs one slot, not the whole baseline.
    pub fn load(&mut self, rows: impl IntoIterator<Item = Row>) -> Vec<RowError> {
        let mut errors = Vec::new();
        for r in rows {
            match r.check() {
                Ok((hour, slot)) => {
                    let b = match self.names.get_mut(r.name.as_str()) {
                        Some(b) => b,
                        None => self.names.entry(r.name.as_str().into()).or_default(),
                    };
                    b.slots[usize::from(hour.0)] = slot;
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }
}

fn row(name: &str, hour: HourOfWeek, s: &Slot) -> Row {
    Row {
        name: name.to_owned(),
        hour_of_week: hour.0,
        n: u64::from(s.n),
        weeks: u32::from(s.weeks),
        last_week: s.last_week,
        mean: s.mean,
        m2: s.m2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Monday 2024-01-01 00:00:00 UTC.
    const MONDAY: i64 = 1_704_067_200;
    const INTERVAL: i64 = 60;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    /// A steady client: `rate(hour)` files/s with ±10 % deterministic wobble.
    fn rate(h: u8, i: i64) -> f64 {
        let base = if h % 24 < 6 {
            0.001
        } else {
            2.0 + f64::from(h % 7)
        };
        base * (1.0 + 0.1 * ((i * 7919) % 21 - 10) as f64 / 10.0)
    }

    /// Learns `weeks` weeks of 60 s intervals for `name`.
    fn learn(b: &mut Baselines, name: &str, weeks: i64) {
        for i in 0..weeks * 7 * 24 * 60 {
            let t = at(MONDAY + i * INTERVAL);
            let h = hour_of_week(t);
            b.observe(name, t, rate(h.get(), i));
        }
        b.settle();
    }

    /// The window ending at `end` (10 intervals), each with `value(i)`.
    fn window(end: i64, value: impl Fn(i64) -> f64) -> Vec<WindowInterval> {
        (0..10)
            .rev()
            .map(|k| {
                let t = end - k * INTERVAL;
                WindowInterval {
                    hour: hour_of_week(at(t)),
                    secs: INTERVAL as f64,
                    value: value(t),
                }
            })
            .collect()
    }

    #[test]
    fn hour_of_week_from_utc() {
        assert_eq!(hour_of_week(at(MONDAY)).get(), 0);
        assert_eq!(hour_of_week(at(MONDAY - 1)).get(), 167);
        assert_eq!(hour_of_week(at(MONDAY + 13 * 3600 + 59)).get(), 13);
        assert_eq!(
            hour_of_week(at(MONDAY + 6 * 86_400 + 23 * 3600)).label(),
            "Sun 23h"
        );
        assert_eq!(hour_of_week(at(0)).label(), "Thu 00h");
        // Before the epoch too: 1969-12-29 was a Monday.
        assert_eq!(hour_of_week(at(-3 * 86_400)).get(), 0);
        for secs in [-62_000_000_000i64, 0, MONDAY, 250_000_000_000] {
            let t = at(secs);
            let z = t.to_zoned(jiff::tz::TimeZone::UTC);
            let want = (z.weekday().to_monday_zero_offset() as i64) * 24 + i64::from(z.hour());
            assert_eq!(i64::from(hour_of_week(t).get()), want, "{t}");
        }
        assert!(hour_of_week(Timestamp::MIN).get() < 168);
        assert!(hour_of_week(Timestamp::MAX).get() < 168);
    }

    #[test]
    fn welford_matches_two_pass() {
        let xs: Vec<f64> = (0..1000).map(|i| f64::from(i % 17) * 0.37).collect();
        let mut s = Slot::default();
        for &x in &xs {
            assert!(s.observe(7, x, 6));
        }
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (xs.len() - 1) as f64;
        assert!((s.mean() - mean).abs() < 1e-12);
        assert!((s.variance() - var).abs() < 1e-10);
        assert!(
            !s.observe(7, f64::NAN, 6) && !s.observe(7, -1.0, 6) && !s.observe(7, f64::INFINITY, 6)
        );
        assert_eq!(s.weeks(), 1);
        assert_eq!(s.n(), 1000);
    }

    /// A huge offset and millions of samples: the naive Σx² − n·mean² form loses every
    /// digit of the variance here; Welford keeps it.
    #[test]
    fn numerically_stable_with_large_counts() {
        let mut s = Slot::default();
        let n = 2_000_000u64;
        // (one week: nothing fades)
        for i in 0..n {
            s.observe(1, 1e9 + if i % 2 == 0 { 1.0 } else { -1.0 }, 6);
        }
        assert_eq!(s.n(), n);
        assert!((s.mean() - 1e9).abs() < 1e-6, "{}", s.mean());
        let want = n as f64 / (n - 1) as f64;
        assert!((s.variance() - want).abs() < 1e-6, "{}", s.variance());
    }

    #[test]
    fn a_drop_to_half_is_unusual_only_after_a_full_window() {
        let mut b = Baselines::new();
        learn(&mut b, "cfs", 4);
        let rule = UnusualRule::default();
        // Week 5, Wednesday 14:00: the client drops to half at `drop`.
        let drop = MONDAY + 4 * 7 * 86_400 + 2 * 86_400 + 14 * 3600;
        let value = |t: i64| {
            let h = hour_of_week(at(t)).get();
            let r = rate(h, (t - MONDAY) / INTERVAL);
            if t > drop { r / 2.0 } else { r }
        };
        // Every interval after the drop, until the window holds only dropped ones.
        for k in 0..10 {
            let end = drop + k * INTERVAL;
            let e = b.expectation("cfs", &rule, window(end, value));
            assert_eq!(e, Expectation::Usual, "{k} intervals after the drop");
        }
        let e = b.expectation("cfs", &rule, window(drop + 10 * INTERVAL, value));
        let Expectation::Unusual {
            expected,
            threshold,
            observed,
        } = e
        else {
            panic!("{e:?}")
        };
        assert!(observed < threshold && threshold < expected, "{e:?}");
        assert!((observed / expected - 0.5).abs() < 0.1, "{e:?}");
    }

    #[test]
    fn one_good_interval_clears() {
        let mut b = Baselines::new();
        learn(&mut b, "cfs", 4);
        let rule = UnusualRule::default();
        let end = MONDAY + 4 * 7 * 86_400 + 10 * 3600;
        let normal = |t: i64| rate(hour_of_week(at(t)).get(), (t - MONDAY) / INTERVAL);
        assert!(
            b.expectation("cfs", &rule, window(end, |t| normal(t) / 2.0))
                .is_unusual()
        );
        for good in 0..10 {
            let w = window(end, |t| {
                if t == end - good * INTERVAL {
                    normal(t)
                } else {
                    normal(t) / 2.0
                }
            });
            assert_eq!(b.expectation("cfs", &rule, w), Expectation::Usual, "{good}");
        }
        assert!(b.expectation("cfs", &rule, window(end, normal)) == Expectation::Usual);
    }

    #[test]
    fn min_samples_counts_weeks_not_samples() {
        let mut b = Baselines::new();
        let rule = UnusualRule::default(); // 3 weeks
        // Wednesday 10:00 of week w, minute m.
        let wed = |w: i64, m: i64| at(MONDAY + w * 7 * 86_400 + 2 * 86_400 + 10 * 3600 + m * 60);
        let w = |end: Timestamp| {
            (0..10).map(move |_| WindowInterval {
                hour: hour_of_week(end),
                secs: 60.0,
                value: 0.0,
            })
        };
        assert_eq!(
            b.expectation("x", &rule, w(wed(0, 0))),
            Expectation::NotLearned
        );
        // 60 samples of one week gather apart: nothing in the slot yet.
        for m in 0..60 {
            b.observe("x", wed(0, m), 10.0 + (m % 2) as f64);
        }
        let slot = |b: &Baselines| *b.get("x").unwrap().slot(hour_of_week(wed(0, 0)));
        assert_eq!((slot(&b).n(), slot(&b).weeks()), (0, 0));
        // The next week's first sample merges them: one week, not trusted.
        for m in 0..60 {
            b.observe("x", wed(1, m), 10.0 + (m % 2) as f64);
            if m == 0 {
                assert_eq!((slot(&b).n(), slot(&b).weeks()), (60, 1));
            }
        }
        assert_eq!(
            b.expectation("x", &rule, w(wed(1, 30))),
            Expectation::NotLearned
        );
        for m in 0..60 {
            b.observe("x", wed(2, m), 10.0 + (m % 2) as f64);
        }
        assert_eq!(
            b.expectation("x", &rule, w(wed(2, 30))),
            Expectation::NotLearned
        );
        // The fourth week's first sample makes it three weeks learned.
        b.observe("x", wed(3, 0), 10.0);
        assert_eq!(slot(&b).weeks(), 3);
        assert!(b.expectation("x", &rule, w(wed(3, 30))).is_unusual());
        // This week's low samples do not pull the expectation down within the hour.
        for m in 1..60 {
            b.observe("x", wed(3, m), 0.0);
        }
        assert!(b.expectation("x", &rule, w(wed(3, 59))).is_unusual());
        let mixed_end = wed(3, 30);
        // One interval in an unlearned slot: not learned, never a false alarm.
        let mut mixed: Vec<_> = w(mixed_end).collect();
        mixed[0].hour = HourOfWeek::new(11).unwrap();
        assert_eq!(b.expectation("x", &rule, mixed), Expectation::NotLearned);
        // One sample has no spread: not learned, even with min_samples 1.
        let mut c = Baselines::new();
        let one = UnusualRule {
            min_samples: 1,
            ..rule
        };
        c.observe("y", wed(0, 0), 10.0);
        assert_eq!(
            c.expectation("y", &one, w(wed(0, 30))),
            Expectation::NotLearned
        );
        assert_eq!(b.expectation("x", &rule, []), Expectation::NotLearned);
    }

    #[test]
    fn a_steady_client_dipping_a_little_is_not_unusual() {
        let mut b = Baselines::new();
        let rule = UnusualRule::default();
        // σ = 0: exactly 10 files/s every interval for four weeks.
        for i in 0..4 * 7 * 24 * 60 {
            b.observe("steady", at(MONDAY + i * INTERVAL), 10.0);
        }
        b.settle();
        let end = MONDAY + 4 * 7 * 86_400 + 12 * 3600;
        for (value, unusual) in [(9.9, false), (8.0, false), (7.4, true), (5.0, true)] {
            let e = b.expectation("steady", &rule, window(end, |_| value));
            assert_eq!(e.is_unusual(), unusual, "{value}: {e:?}");
        }
    }

    #[test]
    fn a_permanent_change_is_learned_within_weeks() {
        let mut b = Baselines::new();
        let rule = UnusualRule::default();
        let week = 7 * 24 * 60;
        // Twenty weeks at 10 files/s (±10 %), then the client really moves half as much.
        let value = |i: i64, level: f64| level * (1.0 + 0.1 * ((i * 7919) % 21 - 10) as f64 / 10.0);
        for i in 0..20 * week {
            b.observe("cfs", at(MONDAY + i * INTERVAL), value(i, 10.0));
        }
        let mut unusual_weeks = 0;
        for w in 20..30 {
            let end = MONDAY + w * 7 * 86_400 + 12 * 3600;
            if b.expectation("cfs", &rule, window(end, |t| value(t / 60, 5.0)))
                .is_unusual()
            {
                unusual_weeks += 1;
            }
            for i in w * week..(w + 1) * week {
                b.observe("cfs", at(MONDAY + i * INTERVAL), value(i, 5.0));
            }
        }
        assert!(
            (1..=5).contains(&unusual_weeks),
            "unusual for {unusual_weeks} weeks after a permanent change"
        );
        let slot = b
            .get("cfs")
            .unwrap()
            .slot(hour_of_week(at(MONDAY + 12 * 3600)));
        assert!(
            slot.n() <= 60 * u64::from(DEFAULT_MEMORY_WEEKS),
            "{}",
            slot.n()
        );
        assert_eq!(slot.weeks(), 30);
    }

    #[test]
    fn quiet_hours_never_alarm() {
        let mut b = Baselines::new();
        learn(&mut b, "cfs", 4);
        let rule = UnusualRule::default();
        // 03:00 on a Tuesday: 0.001 files/s expected, below the floor; nothing arrives.
        let end = MONDAY + 4 * 7 * 86_400 + 86_400 + 3 * 3600 + 1800;
        assert_eq!(
            b.expectation("cfs", &rule, window(end, |_| 0.0)),
            Expectation::Quiet
        );
        let loud = UnusualRule { floor: 0.0, ..rule };
        assert_eq!(
            b.expectation("cfs", &loud, window(end, |_| 0.0)),
            Expectation::Unusual {
                expected: b.get("cfs").unwrap().slot(hour_of_week(at(end))).mean(),
                threshold: b
                    .get("cfs")
                    .unwrap()
                    .slot(hour_of_week(at(end)))
                    .threshold(3.0, DEFAULT_MIN_DROP),
                observed: 0.0
            }
        );
    }

    #[test]
    fn a_short_window_or_nan_never_alarms() {
        let mut b = Baselines::new();
        learn(&mut b, "cfs", 3);
        let rule = UnusualRule::default();
        let end = MONDAY + 3 * 7 * 86_400 + 12 * 3600;
        let w = window(end, |_| 0.0);
        assert!(b.expectation("cfs", &rule, w.clone()).is_unusual());
        assert_eq!(
            b.expectation("cfs", &rule, w[1..].to_vec()),
            Expectation::Usual
        );
        let mut nan = w.clone();
        nan[4].value = f64::NAN;
        assert_eq!(b.expectation("cfs", &rule, nan), Expectation::Usual);
        let wild = UnusualRule {
            k: f64::NAN,
            ..rule
        };
        assert_eq!(b.expectation("cfs", &wild, w), Expectation::Usual);
        assert_eq!(
            b.expectation("nobody", &rule, window(end, |_| 0.0)),
            Expectation::NotLearned
        );
    }

    #[test]
    fn rows_round_trip_and_changes_drain() {
        let mut b = Baselines::new();
        learn(&mut b, "cfs", 1);
        learn(&mut b, "radar", 1);
        let mut rows: Vec<Row> = b.rows().collect();
        assert_eq!(rows.len(), 2 * HOURS_PER_WEEK);
        let mut changed = b.drain_changed();
        assert_eq!(changed.len(), 2 * HOURS_PER_WEEK);
        assert!(b.drain_changed().is_empty());
        let key = |r: &Row| (r.name.clone(), r.hour_of_week);
        rows.sort_by_key(key);
        changed.sort_by_key(key);
        assert_eq!(rows, changed);

        let mut c = Baselines::new();
        assert!(c.load(rows.clone()).is_empty());
        assert!(c.drain_changed().is_empty(), "loading is not a change");
        let mut again: Vec<Row> = c.rows().collect();
        again.sort_by_key(key);
        assert_eq!(again, rows);

        let h = at(MONDAY + 5 * 3600);
        c.observe("cfs", h, 1.0);
        c.observe("cfs", h, 1.0);
        c.settle();
        let d = c.drain_changed();
        assert_eq!((d.len(), d[0].hour_of_week), (1, 5));
        assert!(c.forget("cfs") && !c.forget("cfs"));
        c.observe("edu", h, 1.0);
        c.observe("cfs", h, 1.0);
        c.settle();
        assert!(c.forget("cfs"));
        assert_eq!(
            c.drain_changed().len(),
            1,
            "forgotten names are not written"
        );
    }

    #[test]
    fn bad_rows_are_refused_one_by_one() {
        let good = Row {
            name: "cfs".into(),
            hour_of_week: 3,
            n: 10,
            weeks: 3,
            last_week: 2800,
            mean: 2.0,
            m2: 4.0,
        };
        let bad = [
            Row {
                hour_of_week: 168,
                ..good.clone()
            },
            Row {
                n: 0,
                ..good.clone()
            },
            Row {
                mean: f64::NAN,
                ..good.clone()
            },
            Row {
                mean: -1.0,
                ..good.clone()
            },
            Row {
                m2: -0.5,
                ..good.clone()
            },
            Row {
                n: 1,
                m2: 1.0,
                ..good.clone()
            },
            Row {
                name: String::new(),
                ..good.clone()
            },
            Row {
                name: "x".repeat(300),
                ..good.clone()
            },
            Row {
                weeks: 0,
                ..good.clone()
            },
            Row {
                n: u64::MAX,
                ..good.clone()
            },
        ];
        let mut b = Baselines::new();
        let errors = b.load(bad.iter().cloned().chain([good.clone()]));
        assert_eq!(errors.len(), bad.len());
        assert_eq!(
            errors[0].to_string(),
            "baseline row \"cfs\" hour 168: hour not in 0..168"
        );
        assert_eq!(b.rows().collect::<Vec<_>>(), vec![good]);
        let json = serde_json::to_string(&b.rows().next().unwrap()).unwrap();
        assert_eq!(
            json,
            r#"{"name":"cfs","hour_of_week":3,"n":10,"weeks":3,"last_week":2800,"mean":2.0,"m2":4.0}"#
        );
    }

    #[test]
    fn hostile_names_and_values_are_refused() {
        let mut b = Baselines::new();
        let h = at(MONDAY);
        assert!(!b.observe("", h, 1.0));
        assert!(!b.observe(&"x".repeat(256), h, 1.0));
        assert!(!b.observe("a", h, f64::NAN));
        assert!(!b.observe("a", h, -0.5));
        assert!(!b.observe("a", h, 1e13));
        assert!(b.is_empty());
        assert!(HourOfWeek::new(168).is_none());
        assert!(serde_json::from_str::<HourOfWeek>("200").is_err());
    }

    proptest! {
        #[test]
        fn rule_never_panics(
            values in proptest::collection::vec((any::<i32>(), any::<f64>()), 0..40),
            window in proptest::collection::vec((0u8..168, any::<f64>(), any::<f64>()), 0..12),
            k in any::<f64>(),
            min_samples in any::<u64>(),
            min_drop in any::<f64>(),
            floor in any::<f64>(),
            window_s in any::<f64>(),
        ) {
            let mut b = Baselines::new();
            for (secs, v) in values {
                b.observe("n", at(i64::from(secs) * 100), v);
            }
            let rule = UnusualRule { k, min_samples, min_drop, floor, window_s };
            let w = window.into_iter().map(|(h, secs, value)| WindowInterval {
                hour: HourOfWeek::new(h).unwrap(),
                secs,
                value,
            });
            let _ = b.expectation("n", &rule, w);
            for r in b.rows() {
                prop_assert!(r.mean.is_finite() && r.m2.is_finite() && r.m2 >= 0.0);
            }
        }
    }
}
