//! The health of a client, a source or a (source, client) pair (SPEC §6), pure: what was
//! observed and `now` in, a state and the reasons out. `serve` evaluates it on every
//! speedo and on a timer (time alone turns a silent client CRITICAL); `check` reads the
//! result.
//!
//! Rules, each with its threshold from `[thresholds.<name>]` (or `default`):
//! - CRITICAL `stopped`: no good delivery for longer than `td` (counted from the first
//!   interval seen when there was none yet);
//! - WARNING `slow`: good files/s over the last `window` below `tminr`;
//! - WARNING `errors`: error share over the last `window` above `max_error_ratio`, once
//!   at least `min_transfers` transfers were seen in it (2 failures of 3 are noise);
//! - WARNING `unusual`: below the learned expectation in every interval of the window
//!   (the verdict of [`crate::core::baseline`]; until learned, the rule says nothing);
//! - WARNING `late`: the p95 delivery lag over the window above `max_lag` (off unless
//!   set). Speedos carry each interval's p95 and how many lags it was taken over
//!   (`lag_count`); the window's p95 is the **count-weighted 95th percentile of the
//!   intervals' p95s** ([`window_lag_p95`]): exact when every interval has the same lag
//!   distribution, never above the largest interval p95, and one late interval of a few
//!   files among busy ones does not make the window late;
//! - UNKNOWN: nothing seen yet; OK otherwise.
//!
//! Severity for "the worst": OK < UNKNOWN < WARNING < CRITICAL (an account never seen
//! must not hide one that is failing).

use super::baseline::Expectation;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// The thresholds of the rules (SPEC §5 `[thresholds.<name>]`), for one name or the
/// default. A pair (source, client) uses its client's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// No good delivery for longer than this: CRITICAL `stopped`.
    pub td: Duration,
    /// Good files/s over `window` below this: WARNING `slow`.
    pub tminr: f64,
    pub window: Duration,
    /// Error share over `window` above this: WARNING `errors`...
    pub max_error_ratio: f64,
    /// ... once at least this many transfers (good + failed) were seen in the window.
    pub min_transfers: u64,
    /// `unusual`: standard deviations below the learned mean.
    pub k: f64,
    /// `unusual`: distinct weeks a slot of the week needs before it is trusted.
    pub min_samples: u32,
    /// p95 delivery lag over `window` above this: WARNING `late`; `None` = off.
    pub max_lag: Option<Duration>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            td: Duration::from_secs(300),
            tminr: 0.01,
            window: Duration::from_secs(600),
            max_error_ratio: 0.5,
            min_transfers: 10,
            k: 3.0,
            min_samples: 3,
            max_lag: None,
        }
    }
}

/// Nagios-style states.
/// (`Ord` is the declaration order, for map keys; use [`State::severity`] to compare.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    Ok,
    Warning,
    Critical,
    Unknown,
}

impl State {
    pub const ALL: [State; 4] = [State::Ok, State::Warning, State::Critical, State::Unknown];

    /// Higher is worse: OK 0, UNKNOWN 1, WARNING 2, CRITICAL 3.
    pub fn severity(self) -> u8 {
        match self {
            State::Ok => 0,
            State::Unknown => 1,
            State::Warning => 2,
            State::Critical => 3,
        }
    }

    pub fn worst(self, other: State) -> State {
        if other.severity() > self.severity() {
            other
        } else {
            self
        }
    }

    /// The Nagios plugin exit code.
    pub fn exit_code(self) -> u8 {
        match self {
            State::Ok => 0,
            State::Warning => 1,
            State::Critical => 2,
            State::Unknown => 3,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            State::Ok => "OK",
            State::Warning => "WARNING",
            State::Critical => "CRITICAL",
            State::Unknown => "UNKNOWN",
        }
    }

    /// Lower-case, for metric labels.
    pub fn metric_label(self) -> &'static str {
        match self {
            State::Ok => "ok",
            State::Warning => "warning",
            State::Critical => "critical",
            State::Unknown => "unknown",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Which rule fired: a small fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    NoData,
    Stopped,
    Slow,
    Errors,
    Unusual,
    Late,
}

impl Rule {
    pub fn label(self) -> &'static str {
        match self {
            Rule::NoData => "no data",
            Rule::Stopped => "stopped",
            Rule::Slow => "slow",
            Rule::Errors => "errors",
            Rule::Unusual => "unusual",
            Rule::Late => "late",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    pub rule: Rule,
    pub state: State,
    /// The evidence, one line for people, e.g. `no delivery for 612s > td 300s`.
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    pub state: State,
    /// The rules that fired, worst first; empty when OK.
    pub reasons: Vec<Reason>,
}

impl Health {
    pub fn unknown(text: &str) -> Health {
        Health {
            state: State::Unknown,
            reasons: vec![Reason {
                rule: Rule::NoData,
                state: State::Unknown,
                text: text.to_owned(),
            }],
        }
    }

    /// `stopped (no delivery for 612s > td 300s), errors (…)`, or `ok`.
    pub fn summary(&self) -> String {
        if self.reasons.is_empty() {
            return "ok".into();
        }
        self.reasons
            .iter()
            .map(|r| format!("{} ({})", r.rule.label(), r.text))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One interval as seen through a speedo.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub end: Timestamp,
    pub secs: f64,
    pub good: u64,
    pub errors: u64,
    /// The interval's delivery lag, when the speedo carried it.
    pub lag: Option<IntervalLag>,
}

/// The lag headers of one speedo, as the `late` rule uses them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IntervalLag {
    pub p95: f64,
    /// Lags the p95 was taken over (the `lag_count` header; else the good files).
    pub count: u64,
}

/// What `serve` knows about one client, source or pair.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// Start of the first interval seen; `None` = nothing seen yet.
    pub first_seen: Option<Timestamp>,
    /// End of the last interval with a good delivery.
    pub last_good: Option<Timestamp>,
    /// The intervals seen, oldest first (older ones than the window are ignored).
    pub intervals: &'a [Interval],
}

/// The intervals of the window, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WindowSums {
    /// Seconds covered by the intervals (at most the window).
    pub covered: f64,
    pub good: u64,
    pub errors: u64,
    /// See [`window_lag_p95`].
    pub lag_p95: Option<f64>,
}

impl WindowSums {
    /// Good files per second over what the window covers (0 when it covers nothing).
    pub fn files_per_s(&self) -> f64 {
        if self.covered > 0.0 {
            self.good as f64 / self.covered
        } else {
            0.0
        }
    }

    /// Failed share of the transfers; `None` without transfers.
    pub fn error_ratio(&self) -> Option<f64> {
        let total = self.good.saturating_add(self.errors);
        (total > 0).then(|| self.errors as f64 / total as f64)
    }
}

/// The intervals that ended less than `window` before `now`, newest last.
fn in_window(intervals: &[Interval], window: Duration, now: Timestamp) -> &[Interval] {
    let w = window.as_secs_f64();
    let start = intervals
        .iter()
        .rposition(|i| now.duration_since(i.end).as_secs_f64() >= w)
        .map_or(0, |p| p + 1);
    &intervals[start..]
}

/// Sums the intervals of the window ending at `now`.
pub fn window_sums(intervals: &[Interval], window: Duration, now: Timestamp) -> WindowSums {
    let win = in_window(intervals, window, now);
    let mut s = WindowSums::default();
    for i in win {
        if i.secs.is_finite() && i.secs > 0.0 {
            s.covered += i.secs;
        }
        s.good = s.good.saturating_add(i.good);
        s.errors = s.errors.saturating_add(i.errors);
    }
    s.covered = s.covered.min(window.as_secs_f64());
    s.lag_p95 = window_lag_p95(win);
    s
}

/// The p95 lag of a window from its intervals' p95s, weighted by how many lags each was
/// taken over (nearest rank); `None` when no interval carried a lag.
pub fn window_lag_p95(intervals: &[Interval]) -> Option<f64> {
    let mut lags: Vec<(f64, u64)> = intervals
        .iter()
        .filter_map(|i| i.lag)
        .filter(|l| l.p95.is_finite() && l.p95 >= 0.0 && l.count > 0)
        .map(|l| (l.p95, l.count))
        .collect();
    if lags.is_empty() {
        return None;
    }
    lags.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: u64 = lags.iter().fold(0u64, |a, l| a.saturating_add(l.1));
    let rank = ((total as f64 * 0.95).ceil() as u64).clamp(1, total);
    let mut seen = 0u64;
    for (p95, count) in &lags {
        seen = seen.saturating_add(*count);
        if seen >= rank {
            return Some(*p95);
        }
    }
    lags.last().map(|l| l.0)
}

/// Evaluates SPEC §6 at `now`; `learned` is the baseline's verdict over the same window.
pub fn evaluate(t: &Thresholds, o: &Observed<'_>, learned: &Expectation, now: Timestamp) -> Health {
    let Some(first_seen) = o.first_seen else {
        return Health::unknown("nothing seen yet");
    };
    let mut reasons = Vec::new();
    let since = o.last_good.unwrap_or(first_seen);
    let quiet = now.duration_since(since).as_secs_f64();
    if quiet > t.td.as_secs_f64() {
        let what = if o.last_good.is_some() {
            "no delivery for"
        } else {
            "no delivery since first seen"
        };
        reasons.push(Reason {
            rule: Rule::Stopped,
            state: State::Critical,
            text: format!("{what} {} > td {}", secs(quiet), secs(t.td.as_secs_f64())),
        });
    }
    let w = window_sums(o.intervals, t.window, now);
    if w.covered > 0.0 {
        let rate = w.files_per_s();
        if rate < t.tminr {
            reasons.push(Reason {
                rule: Rule::Slow,
                state: State::Warning,
                text: format!("{} files/s < tminr {}", num(rate), num(t.tminr)),
            });
        }
        let total = w.good.saturating_add(w.errors);
        if let Some(share) = w.error_ratio()
            && total >= t.min_transfers
            && share > t.max_error_ratio
        {
            reasons.push(Reason {
                rule: Rule::Errors,
                state: State::Warning,
                text: format!(
                    "{} of {total} transfers failed, {:.0}% > {:.0}%",
                    w.errors,
                    share * 100.0,
                    t.max_error_ratio * 100.0
                ),
            });
        }
    }
    if let Expectation::Unusual {
        expected,
        threshold,
        observed,
    } = learned
    {
        reasons.push(Reason {
            rule: Rule::Unusual,
            state: State::Warning,
            text: format!(
                "{} files/s < {} in every interval, usually {} at this hour",
                num(*observed),
                num(*threshold),
                num(*expected)
            ),
        });
    }
    if let (Some(max), Some(p95)) = (t.max_lag, w.lag_p95)
        && p95 > max.as_secs_f64()
    {
        reasons.push(Reason {
            rule: Rule::Late,
            state: State::Warning,
            text: format!(
                "p95 lag {} > max_lag {}",
                secs(p95),
                secs(max.as_secs_f64())
            ),
        });
    }
    let state = reasons.iter().fold(State::Ok, |s, r| s.worst(r.state));
    reasons.sort_by_key(|r| std::cmp::Reverse(r.state.severity()));
    Health { state, reasons }
}

/// `612s`, `2.5s`, `3h05m`, `2d04h`.
pub fn secs(s: f64) -> String {
    if !s.is_finite() {
        "?".into()
    } else if s < 10.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{s:.0}s")
    } else if s < 86_400.0 * 2.0 {
        let m = (s / 60.0).round() as u64;
        format!("{}h{:02}m", m / 60, m % 60)
    } else {
        let h = (s / 3600.0).round() as u64;
        format!("{}d{:02}h", h / 24, h % 24)
    }
}

/// A rate for people, three significant digits at most: `0`, `0.003`, `0.00833`,
/// `2.5`, `120`.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return "?".into();
    }
    if x == 0.0 {
        return "0".into();
    }
    let decimals = (2 - x.abs().log10().floor() as i32).clamp(0, 9) as usize;
    let mut s = format!("{x:.decimals$}");
    if s.contains('.') {
        let kept = s.trim_end_matches('0').trim_end_matches('.').len();
        s.truncate(kept);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: f64) -> Timestamp {
        Timestamp::from_nanosecond((1_700_000_000.0e9 + s * 1e9) as i128).unwrap()
    }

    /// SPEC §5's defaults: td 300 s, tminr 0.01, window 600 s, max_error_ratio 0.5,
    /// min_transfers 10.
    fn th() -> Thresholds {
        Thresholds::default()
    }

    fn iv(end: f64, good: u64, errors: u64) -> Interval {
        Interval {
            end: t(end),
            secs: 60.0,
            good,
            errors,
            lag: None,
        }
    }

    fn eval_with(
        th: &Thresholds,
        first: Option<f64>,
        last_good: Option<f64>,
        iv: &[Interval],
        now: f64,
    ) -> Health {
        let o = Observed {
            first_seen: first.map(t),
            last_good: last_good.map(t),
            intervals: iv,
        };
        evaluate(th, &o, &Expectation::NotLearned, t(now))
    }

    fn eval(first: Option<f64>, last_good: Option<f64>, iv: &[Interval], now: f64) -> Health {
        eval_with(&th(), first, last_good, iv, now)
    }

    fn rules(h: &Health) -> Vec<Rule> {
        h.reasons.iter().map(|r| r.rule).collect()
    }

    #[test]
    fn table() {
        let busy: Vec<Interval> = (1..=10).map(|i| iv(60.0 * i as f64, 60, 1)).collect();
        let failing: Vec<Interval> = (1..=10).map(|i| iv(60.0 * i as f64, 10, 20)).collect();
        let trickle: Vec<Interval> = (1..=10)
            .map(|i| iv(60.0 * i as f64, u64::from(i == 10), 0))
            .collect();
        // 2 of 3 transfers failed in the window: below min_transfers, not an alarm.
        let few: Vec<Interval> = (1..=10)
            .map(|i| iv(60.0 * i as f64, u64::from(i == 10) * 10, u64::from(i <= 2)))
            .collect();
        let cases: Vec<(&str, Health, State, Vec<Rule>)> = vec![
            (
                "nothing seen",
                eval(None, None, &[], 0.0),
                State::Unknown,
                vec![Rule::NoData],
            ),
            (
                "busy",
                eval(Some(0.0), Some(600.0), &busy, 601.0),
                State::Ok,
                vec![],
            ),
            (
                "not stopped at td",
                eval(Some(0.0), Some(600.0), &busy, 900.0),
                State::Ok,
                vec![],
            ),
            (
                "stopped after td",
                eval(Some(0.0), Some(600.0), &busy, 901.0),
                State::Critical,
                vec![Rule::Stopped],
            ),
            (
                "never delivered, seen for longer than td",
                eval(Some(0.0), None, &[iv(60.0, 0, 0)], 400.0),
                State::Critical,
                vec![Rule::Stopped, Rule::Slow],
            ),
            (
                "errors over the window",
                eval(Some(0.0), Some(600.0), &failing, 601.0),
                State::Warning,
                vec![Rule::Errors],
            ),
            (
                "slow: 1 file in 10 minutes",
                eval(Some(0.0), Some(600.0), &trickle, 601.0),
                State::Warning,
                vec![Rule::Slow],
            ),
            (
                "few transfers: errors need min_transfers",
                eval_with(
                    &Thresholds { tminr: 0.0, ..th() },
                    Some(0.0),
                    Some(600.0),
                    &[iv(540.0, 1, 2), iv(600.0, 0, 0)],
                    601.0,
                ),
                State::Ok,
                vec![],
            ),
            (
                "10 transfers, 2 failed: fine",
                eval(Some(0.0), Some(600.0), &few, 601.0),
                State::Ok,
                vec![],
            ),
            (
                "stopped and failing: critical first",
                eval(Some(0.0), Some(60.0), &failing[..2], 400.0),
                State::Critical,
                vec![Rule::Stopped, Rule::Errors],
            ),
        ];
        for (what, h, state, want) in cases {
            assert_eq!(h.state, state, "{what}: {h:?}");
            assert_eq!(rules(&h), want, "{what}: {h:?}");
        }
    }

    #[test]
    fn intervals_older_than_the_window_do_not_count() {
        // Old errors, then a clean window.
        let mut v: Vec<Interval> = (1..=10).map(|i| iv(60.0 * i as f64, 0, 50)).collect();
        v.extend((11..=20).map(|i| iv(60.0 * i as f64, 60, 0)));
        assert_eq!(eval(Some(0.0), Some(1200.0), &v, 1201.0).state, State::Ok);
        let w = window_sums(&v, Duration::from_secs(600), t(1201.0));
        assert_eq!((w.good, w.errors, w.covered), (600, 0, 600.0));
    }

    #[test]
    fn unusual_is_a_warning_only_with_a_verdict() {
        let busy: Vec<Interval> = (1..=10).map(|i| iv(60.0 * i as f64, 60, 0)).collect();
        let o = Observed {
            first_seen: Some(t(0.0)),
            last_good: Some(t(600.0)),
            intervals: &busy,
        };
        let unusual = Expectation::Unusual {
            expected: 2.0,
            threshold: 1.5,
            observed: 1.0,
        };
        let h = evaluate(&th(), &o, &unusual, t(601.0));
        assert_eq!((h.state, rules(&h)), (State::Warning, vec![Rule::Unusual]));
        assert_eq!(
            h.summary(),
            "unusual (1 files/s < 1.5 in every interval, usually 2 at this hour)"
        );
        for e in [
            Expectation::Usual,
            Expectation::Quiet,
            Expectation::NotLearned,
        ] {
            assert_eq!(evaluate(&th(), &o, &e, t(601.0)).state, State::Ok);
        }
    }

    fn lagged(end: f64, p95: f64, count: u64) -> Interval {
        Interval {
            lag: Some(IntervalLag { p95, count }),
            ..iv(end, 60, 0)
        }
    }

    #[test]
    fn late_on_the_count_weighted_p95_of_the_window() {
        let late = Thresholds {
            max_lag: Some(Duration::from_secs(300)),
            ..th()
        };
        // Every interval's p95 at 600 s: late.
        let all: Vec<Interval> = (1..=10)
            .map(|i| lagged(60.0 * i as f64, 600.0, 60))
            .collect();
        let h = eval_with(&late, Some(0.0), Some(600.0), &all, 601.0);
        assert_eq!(rules(&h), [Rule::Late]);
        assert_eq!(h.summary(), "late (p95 lag 600s > max_lag 300s)");
        // Off by default.
        assert_eq!(eval(Some(0.0), Some(600.0), &all, 601.0).state, State::Ok);
        // One interval of 3 late files among 9 busy punctual ones: not late.
        let mut one: Vec<Interval> = (1..=9).map(|i| lagged(60.0 * i as f64, 2.0, 60)).collect();
        one.push(lagged(600.0, 900.0, 3));
        assert_eq!(window_lag_p95(&one), Some(2.0));
        assert_eq!(
            eval_with(&late, Some(0.0), Some(600.0), &one, 601.0).state,
            State::Ok
        );
        // Half the lags late: the window's p95 is late.
        let mut half: Vec<Interval> = (1..=5).map(|i| lagged(60.0 * i as f64, 2.0, 60)).collect();
        half.extend((6..=10).map(|i| lagged(60.0 * i as f64, 700.0, 60)));
        assert_eq!(window_lag_p95(&half), Some(700.0));
        // Intervals without lag (no pubTime in the reports): nothing to say.
        assert_eq!(window_lag_p95(&[iv(60.0, 1, 0)]), None);
        let hostile = [
            lagged(60.0, f64::NAN, 10),
            lagged(120.0, -1.0, 10),
            lagged(180.0, 1.0, 0),
        ];
        assert_eq!(window_lag_p95(&hostile), None);
        // Old late intervals leave the window.
        let mut old = all.clone();
        old.extend((11..=20).map(|i| lagged(60.0 * i as f64, 1.0, 60)));
        assert_eq!(
            eval_with(&late, Some(0.0), Some(1200.0), &old, 1201.0).state,
            State::Ok
        );
    }

    #[test]
    fn worst_and_texts() {
        assert_eq!(State::Ok.worst(State::Unknown), State::Unknown);
        assert_eq!(State::Warning.worst(State::Unknown), State::Warning);
        assert_eq!(State::Critical.worst(State::Warning), State::Critical);
        let h = eval(Some(0.0), Some(60.0), &[], 4000.0);
        assert_eq!(h.summary(), "stopped (no delivery for 1h06m > td 300s)");
        let h = eval(Some(0.0), Some(600.0), &[iv(600.0, 0, 0)], 612.0);
        assert_eq!(h.summary(), "slow (0 files/s < tminr 0.01)");
        assert_eq!(State::Critical.exit_code(), 2);
        assert_eq!(secs(612.4), "612s");
        assert_eq!(secs(2.54), "2.5s");
        assert_eq!(secs(3.0 * 86_400.0), "3d00h");
        assert_eq!(secs(f64::INFINITY), "?");
        let nums = [
            (0.0, "0"),
            (0.003, "0.003"),
            (0.008_333, "0.00833"),
            (2.5, "2.5"),
            (120.4, "120"),
            (0.01, "0.01"),
        ];
        for (x, want) in nums {
            assert_eq!(num(x), want, "{x}");
        }
    }

    proptest! {
        #[test]
        fn evaluate_never_panics(
            ivs in proptest::collection::vec(
                (any::<i32>(), any::<f64>(), any::<u64>(), any::<u64>(), any::<Option<(f64, u64)>>()),
                0..30,
            ),
            first in any::<Option<i32>>(),
            last in any::<Option<i32>>(),
            now in any::<i32>(),
            td in 0u64..10_000_000,
            window in 0u64..10_000_000,
            ratio in any::<f64>(),
            tminr in any::<f64>(),
            min_transfers in any::<u64>(),
        ) {
            let mut intervals: Vec<Interval> = ivs
                .into_iter()
                .map(|(end, secs, good, errors, lag)| Interval {
                    end: t(f64::from(end)),
                    secs,
                    good,
                    errors,
                    lag: lag.map(|(p95, count)| IntervalLag { p95, count }),
                })
                .collect();
            intervals.sort_by_key(|i| i.end);
            let th = Thresholds {
                td: Duration::from_secs(td),
                window: Duration::from_secs(window),
                max_error_ratio: ratio,
                tminr,
                min_transfers,
                max_lag: Some(Duration::from_secs(1)),
                ..th()
            };
            let o = Observed {
                first_seen: first.map(|x| t(f64::from(x))),
                last_good: last.map(|x| t(f64::from(x))),
                intervals: &intervals,
            };
            let h = evaluate(&th, &o, &Expectation::NotLearned, t(f64::from(now)));
            prop_assert!(h.reasons.iter().all(|r| r.state.severity() <= h.state.severity()));
        }
    }
}
