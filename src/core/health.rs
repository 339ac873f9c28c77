//! The health of a client or a source (SPEC §6), pure: what was observed and `now` in, a
//! state and the reasons out. `serve` evaluates it continuously; `check` reads the result.
//!
//! Rules, each with its threshold from `[thresholds.<name>]` (or `default`):
//! - CRITICAL `stopped`: no good delivery for longer than `td` (counted from the first
//!   interval seen when there was none yet);
//! - WARNING `slow`: good files/s over the last `window` below `tminr`;
//! - WARNING `errors`: error share over the last `window` above `max_error_ratio`;
//! - WARNING `unusual`: below the learned expectation (the [`Learned`] verdict; baselines
//!   are learned elsewhere — until they are, the rule says nothing);
//! - UNKNOWN: nothing seen yet; OK otherwise.
//!
//! Severity for "the worst": OK < UNKNOWN < WARNING < CRITICAL (an account never seen
//! must not hide one that is failing).

use jiff::Timestamp;
use serde::Serialize;
use std::fmt;
use std::time::Duration;

/// The thresholds of the rules (SPEC §5 `[thresholds.<name>]`), for one name or the
/// default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// No good delivery for longer than this: CRITICAL `stopped`.
    pub td: Duration,
    /// Good files/s over `window` below this: WARNING `slow`.
    pub tminr: f64,
    pub window: Duration,
    /// Error share over `window` above this: WARNING `errors`.
    pub max_error_ratio: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            td: Duration::from_secs(300),
            tminr: 0.01,
            window: Duration::from_secs(600),
            max_error_ratio: 0.5,
        }
    }
}

/// Nagios-style states.
/// (`Ord` is the declaration order, for map keys; use [`State::severity`] to compare.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    NoData,
    Stopped,
    Slow,
    Errors,
    Unusual,
}

impl Rule {
    pub fn label(self) -> &'static str {
        match self {
            Rule::NoData => "no data",
            Rule::Stopped => "stopped",
            Rule::Slow => "slow",
            Rule::Errors => "errors",
            Rule::Unusual => "unusual",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reason {
    pub rule: Rule,
    pub state: State,
    /// One line for people, e.g. `no good delivery for 412 s (td 300 s)`.
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

    /// `stopped: no good delivery for 412 s (td 300 s); errors: …`, or `ok`.
    pub fn summary(&self) -> String {
        if self.reasons.is_empty() {
            return "ok".into();
        }
        self.reasons
            .iter()
            .map(|r| format!("{}: {}", r.rule.label(), r.text))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// One interval as seen through a speedo.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub end: Timestamp,
    pub secs: f64,
    pub good: u64,
    pub errors: u64,
}

/// The learned-baseline verdict for the current window (a later component learns them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Learned {
    /// No baseline (yet): the `unusual` rule says nothing.
    NotYet,
    /// Within expectation in at least one interval of the window.
    Usual,
    /// Below `expected` files/s in every interval of the window.
    Unusual { expected: f64 },
}

/// What `serve` knows about one client or source.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// Start of the first interval seen; `None` = nothing seen yet.
    pub first_seen: Option<Timestamp>,
    /// End of the last interval with a good delivery.
    pub last_good: Option<Timestamp>,
    /// The intervals seen, oldest first (older ones than the window are ignored).
    pub intervals: &'a [Interval],
}

/// Evaluates SPEC §6 at `now`.
pub fn evaluate(t: &Thresholds, o: &Observed<'_>, learned: Learned, now: Timestamp) -> Health {
    let Some(first_seen) = o.first_seen else {
        return Health::unknown("nothing seen yet");
    };
    let mut reasons = Vec::new();
    let since = o.last_good.unwrap_or(first_seen);
    let quiet = now.duration_since(since).as_secs_f64();
    if quiet > t.td.as_secs_f64() {
        let what = if o.last_good.is_some() {
            "no good delivery for"
        } else {
            "no good delivery since first seen,"
        };
        reasons.push(Reason {
            rule: Rule::Stopped,
            state: State::Critical,
            text: format!("{what} {} (td {})", secs(quiet), secs(t.td.as_secs_f64())),
        });
    }
    let window = t.window.as_secs_f64();
    let (mut covered, mut good, mut errors) = (0.0, 0u64, 0u64);
    for i in o.intervals.iter().rev() {
        let age = now.duration_since(i.end).as_secs_f64();
        if age >= window {
            break;
        }
        covered += i.secs;
        good += i.good;
        errors += i.errors;
    }
    let covered = covered.min(window);
    if covered > 0.0 {
        let rate = good as f64 / covered;
        if rate < t.tminr {
            reasons.push(Reason {
                rule: Rule::Slow,
                state: State::Warning,
                text: format!(
                    "{} good files/s over the last {} (tminr {})",
                    num(rate),
                    secs(covered),
                    num(t.tminr)
                ),
            });
        }
        let total = good + errors;
        if total > 0 {
            let share = errors as f64 / total as f64;
            if share > t.max_error_ratio {
                reasons.push(Reason {
                    rule: Rule::Errors,
                    state: State::Warning,
                    text: format!(
                        "{errors} of {total} transfers failed ({:.0} %) over the last {} (max {:.0} %)",
                        share * 100.0,
                        secs(covered),
                        t.max_error_ratio * 100.0
                    ),
                });
            }
        }
    }
    if let Learned::Unusual { expected } = learned {
        reasons.push(Reason {
            rule: Rule::Unusual,
            state: State::Warning,
            text: format!(
                "below the expected {} files/s in every interval of the window",
                num(expected)
            ),
        });
    }
    let state = reasons.iter().fold(State::Ok, |s, r| s.worst(r.state));
    reasons.sort_by_key(|r| std::cmp::Reverse(r.state.severity()));
    Health { state, reasons }
}

/// `412 s`, `2.5 s`, `3 h 5 min`.
fn secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{s:.0} s")
    } else {
        let m = (s / 60.0).round() as u64;
        format!("{} h {} min", m / 60, m % 60)
    }
}

fn num(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: f64) -> Timestamp {
        Timestamp::from_nanosecond((1_700_000_000.0e9 + s * 1e9) as i128).unwrap()
    }

    /// SPEC §5's defaults: td 300 s, tminr 0.01, window 600 s, max_error_ratio 0.5.
    fn th() -> Thresholds {
        Thresholds::default()
    }

    fn iv(end: f64, good: u64, errors: u64) -> Interval {
        Interval {
            end: t(end),
            secs: 60.0,
            good,
            errors,
        }
    }

    fn eval(first: Option<f64>, last_good: Option<f64>, iv: &[Interval], now: f64) -> Health {
        let o = Observed {
            first_seen: first.map(t),
            last_good: last_good.map(t),
            intervals: iv,
        };
        evaluate(&th(), &o, Learned::NotYet, t(now))
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
    }

    #[test]
    fn unusual_is_a_warning_only_with_a_verdict() {
        let busy: Vec<Interval> = (1..=10).map(|i| iv(60.0 * i as f64, 60, 0)).collect();
        let o = Observed {
            first_seen: Some(t(0.0)),
            last_good: Some(t(600.0)),
            intervals: &busy,
        };
        let h = evaluate(&th(), &o, Learned::Unusual { expected: 5.0 }, t(601.0));
        assert_eq!((h.state, rules(&h)), (State::Warning, vec![Rule::Unusual]));
        assert_eq!(
            evaluate(&th(), &o, Learned::Usual, t(601.0)).state,
            State::Ok
        );
    }

    #[test]
    fn worst_and_texts() {
        assert_eq!(State::Ok.worst(State::Unknown), State::Unknown);
        assert_eq!(State::Warning.worst(State::Unknown), State::Warning);
        assert_eq!(State::Critical.worst(State::Warning), State::Critical);
        let h = eval(Some(0.0), Some(60.0), &[], 4000.0);
        assert_eq!(
            h.summary(),
            "stopped: no good delivery for 1 h 6 min (td 300 s)"
        );
        assert_eq!(State::Critical.exit_code(), 2);
    }
}
