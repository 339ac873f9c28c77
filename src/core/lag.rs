//! Delivery lag (SPEC §6 `late`): how long after a product was announced its delivery
//! completed, `lag = completion − pubTime`, where completion is the report's
//! `timeCompleted` when it has one, else the time `route` saw the report. Per meter
//! (client, source, pair) a [`LagMeter`] collects an interval's lags and gives p50, p95
//! and max at its end; speedo sends them as headers (`lag_p50`, `lag_p95`, `lag_max`).
//!
//! Every time stamp here is hostile, so [`LagRules`] refuse what cannot be a lag (and
//! the meter counts each refusal by reason):
//! - no `pubTime`, or a lag that is not a number;
//! - a `pubTime` more than `max_skew_s` (60 s) after the completion: the future (a
//!   lag between −60 s and 0 is clock skew between hosts and counts as 0);
//! - a completion more than `max_skew_s` after `route` saw the report;
//! - a lag above `max_lag_s` (30 days): year-0 and other absurd `pubTime`s.
//!
//! Per report: `lag_of(..)` then [`LagRules::accept`] once (≈ 30 ns: it works out the
//! histogram bucket), then [`LagMeter::tally`] in each meter the report counts in (≈ 10 ns
//! when the meter is in cache). At the end of the interval, [`LagMeter::take`].
//!
//! Memory per meter is bounded whatever the rate: the quantiles come from a log-bucket
//! histogram (the DDSketch mapping) with a **relative error of at most 1 %** on p50 and
//! p95 for lags above 1 ms (below 1 ms, an absolute error under 1 ms); max is exact.
//! Buckets are kept only across the span of lags actually seen: at most 2 049 `u32`
//! counters (8 KiB), typically a few hundred bytes.

use super::headers::{HeaderValue, Headers};
use super::report::Report;
use super::stamp::Stamp;
use jiff::Timestamp;

/// Speedo headers: the interval's lag quantiles in seconds (`12.345`).
pub const H_LAG_P50: &str = "lag_p50";
pub const H_LAG_P95: &str = "lag_p95";
pub const H_LAG_MAX: &str = "lag_max";
/// How many lags the interval's quantiles were taken over, so a reader can weigh
/// intervals (see `core::health::window_lag_p95`).
pub const H_LAG_COUNT: &str = "lag_count";

/// Why a lag was not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum LagReject {
    #[error("the product has no pubTime")]
    NoPubTime,
    #[error("the lag is not a number")]
    NotANumber,
    #[error("pubTime is in the future")]
    Future,
    #[error("completion time is later than the report was seen")]
    CompletedInFuture,
    #[error("the lag is longer than the longest believable")]
    TooOld,
}

impl LagReject {
    pub const ALL: [LagReject; 5] = [
        LagReject::NoPubTime,
        LagReject::NotANumber,
        LagReject::Future,
        LagReject::CompletedInFuture,
        LagReject::TooOld,
    ];

    /// Short, fixed, for metric labels.
    pub fn label(self) -> &'static str {
        match self {
            LagReject::NoPubTime => "no_pub_time",
            LagReject::NotANumber => "not_a_number",
            LagReject::Future => "future",
            LagReject::CompletedInFuture => "completed_in_future",
            LagReject::TooOld => "too_old",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What counts as a lag.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LagRules {
    /// Clock difference tolerated between hosts, in seconds.
    pub max_skew_s: f64,
    /// The longest believable lag, in seconds.
    pub max_lag_s: f64,
}

impl LagRules {
    pub const DEFAULT: LagRules = LagRules {
        max_skew_s: 60.0,
        max_lag_s: 30.0 * 86_400.0,
    };

    /// The lag to count for `lag_s` seconds (skew folded to 0), or why not.
    pub fn check(&self, lag_s: f64) -> Result<f64, LagReject> {
        if lag_s.is_nan() {
            Err(LagReject::NotANumber)
        } else if lag_s < -self.max_skew_s {
            Err(LagReject::Future)
        } else if lag_s > self.max_lag_s {
            Err(LagReject::TooOld)
        } else {
            Ok(lag_s.max(0.0))
        }
    }

    /// The lag to count, with its histogram bucket worked out once: a report counts in
    /// several meters (client, source, pair, totals), each then only adds.
    pub fn accept(&self, lag_s: f64) -> Result<Lag, LagReject> {
        let secs = self.check(lag_s)?;
        Ok(Lag {
            secs,
            bucket: bucket(secs) as u16,
        })
    }

    /// The lag of one report seen (by `route`) at `seen_at`.
    pub fn lag_of(&self, r: &Report, seen_at: Timestamp) -> Result<f64, LagReject> {
        let published = r.pub_time.ok_or(LagReject::NoPubTime)?;
        let completed = r.time_completed.unwrap_or(Stamp(seen_at));
        if secs_between(seen_at, completed.0) > self.max_skew_s {
            return Err(LagReject::CompletedInFuture);
        }
        self.check(secs_between(published.0, completed.0))
    }
}

impl Default for LagRules {
    fn default() -> Self {
        LagRules::DEFAULT
    }
}

/// `to − from` in seconds (jiff's range makes this exact to the nanosecond and finite).
fn secs_between(from: Timestamp, to: Timestamp) -> f64 {
    to.duration_since(from).as_secs_f64()
}

/// The lag of one report under [`LagRules::DEFAULT`].
pub fn lag_of(r: &Report, seen_at: Timestamp) -> Result<f64, LagReject> {
    LagRules::DEFAULT.lag_of(r, seen_at)
}

/// Relative error of the quantiles (α of DDSketch).
pub const RELATIVE_ERROR: f64 = 0.01;
/// Bucket ratio γ = (1 + α) / (1 − α).
const GAMMA: f64 = (1.0 + RELATIVE_ERROR) / (1.0 - RELATIVE_ERROR);
/// Lags up to this many seconds share bucket 0 (and read back as the interval's minimum).
const SMALLEST_S: f64 = 1e-3;
/// The last bucket; it reaches 1 ms·γ²⁰⁴⁸ ≈ 5·10¹⁴ s, far past any `max_lag_s`.
const MAX_INDEX: usize = 2048;

/// Bucket `i ≥ 1` holds (1 ms·γ^(i−1), 1 ms·γ^i].
fn bucket(x: f64) -> usize {
    if x <= SMALLEST_S {
        return 0;
    }
    let i = ((x / SMALLEST_S).ln() / GAMMA.ln()).ceil();
    if i >= MAX_INDEX as f64 {
        MAX_INDEX
    } else {
        (i as usize).max(1)
    }
}

/// The value within α of every value of bucket `i`.
fn representative(i: usize) -> f64 {
    if i == 0 {
        0.0
    } else {
        SMALLEST_S * 2.0 * GAMMA.powi(i as i32) / (GAMMA + 1.0)
    }
}

/// A lag the rules accepted (see [`LagRules::accept`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    secs: f64,
    bucket: u16,
}

impl Lag {
    pub fn secs(&self) -> f64 {
        self.secs
    }
}

/// Counts per bucket over the span `lo .. lo + counts.len()` seen so far.
#[derive(Debug, Clone, Default)]
struct Histogram {
    lo: usize,
    counts: Vec<u32>,
}

impl Histogram {
    fn add(&mut self, i: usize) {
        if self.counts.is_empty() {
            self.lo = i;
            self.counts.push(0);
        } else if i < self.lo {
            let grow = self.lo - i;
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.lo = i;
        } else if i >= self.lo + self.counts.len() {
            self.counts.resize(i - self.lo + 1, 0);
        }
        let c = &mut self.counts[i - self.lo];
        // 4·10⁹ lags in one bucket in one interval is beyond any pump; saturate anyway.
        *c = c.saturating_add(1);
    }

    /// The bucket of the `rank`-th smallest value (1-based).
    fn at_rank(&self, rank: u64) -> usize {
        let mut seen = 0u64;
        for (k, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return self.lo + k;
            }
        }
        self.lo + self.counts.len().saturating_sub(1)
    }
}

/// One interval's lags, as speedo sends them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LagSummary {
    pub p50: f64,
    pub p95: f64,
    /// Exact.
    pub max: f64,
    /// Lags counted in the interval.
    pub count: u64,
}

impl LagSummary {
    /// Sets `lag_p50`, `lag_p95`, `lag_max` (seconds, millisecond precision) and
    /// `lag_count`.
    pub fn set_headers(&self, h: &mut Headers) {
        h.set(H_LAG_P50, format!("{:.3}", self.p50));
        h.set(H_LAG_P95, format!("{:.3}", self.p95));
        h.set(H_LAG_MAX, format!("{:.3}", self.max));
        h.set(
            H_LAG_COUNT,
            HeaderValue::Int(i64::try_from(self.count).unwrap_or(i64::MAX)),
        );
    }
}

/// The lag headers of a received speedo; each is `None` when missing or not a believable
/// lag (not a number, negative, beyond [`LagRules::DEFAULT`]'s `max_lag_s`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LagHeaders {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub max: Option<f64>,
    /// `lag_count`: an integer from 1 to 10¹²; `None` when missing or anything else.
    pub count: Option<u64>,
}

impl LagHeaders {
    pub fn read(h: &Headers) -> LagHeaders {
        let field = |key| {
            h.get(key)
                .and_then(|v| v.as_f64())
                .filter(|x| (0.0..=LagRules::DEFAULT.max_lag_s).contains(x))
        };
        LagHeaders {
            p50: field(H_LAG_P50),
            p95: field(H_LAG_P95),
            max: field(H_LAG_MAX),
            count: h
                .get(H_LAG_COUNT)
                .and_then(HeaderValue::as_i64)
                .filter(|n| (1..=1_000_000_000_000).contains(n))
                .map(|n| n as u64),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.p50.is_none() && self.p95.is_none() && self.max.is_none() && self.count.is_none()
    }
}

/// Refusals by reason, since the meter was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RejectCounts([u64; 5]);

impl RejectCounts {
    pub fn get(&self, why: LagReject) -> u64 {
        self.0[why.index()]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Each reason with its count.
    pub fn iter(&self) -> impl Iterator<Item = (LagReject, u64)> + '_ {
        LagReject::ALL.into_iter().map(|r| (r, self.get(r)))
    }
}

/// The lags of one meter over the current interval.
#[derive(Debug, Clone)]
pub struct LagMeter {
    rules: LagRules,
    hist: Histogram,
    count: u64,
    min: f64,
    max: f64,
    rejected: RejectCounts,
}

impl Default for LagMeter {
    fn default() -> Self {
        LagMeter::new(LagRules::DEFAULT)
    }
}

impl LagMeter {
    pub fn new(rules: LagRules) -> LagMeter {
        LagMeter {
            rules,
            hist: Histogram::default(),
            count: 0,
            min: f64::INFINITY,
            max: 0.0,
            rejected: RejectCounts::default(),
        }
    }

    /// Counts one lag in seconds under this meter's rules, or counts its refusal.
    pub fn record(&mut self, lag_s: f64) -> Result<(), LagReject> {
        let lag = self.rules.accept(lag_s);
        self.tally(lag);
        lag.map(|_| ())
    }

    /// Counts an accepted lag.
    pub fn add(&mut self, lag: Lag) {
        self.hist.add(usize::from(lag.bucket));
        self.count += 1;
        self.min = self.min.min(lag.secs);
        self.max = self.max.max(lag.secs);
    }

    /// Counts a lag or its refusal, e.g. `lag_of(..).and_then(|x| rules.accept(x))`.
    pub fn tally(&mut self, lag: Result<Lag, LagReject>) {
        match lag {
            Ok(l) => self.add(l),
            Err(why) => self.reject(why),
        }
    }

    /// Counts a refusal found before the meter (e.g. by [`lag_of`]).
    pub fn reject(&mut self, why: LagReject) {
        let c = &mut self.rejected.0[why.index()];
        *c = c.saturating_add(1);
    }

    /// Refusals since the meter was made (not reset by [`take`](LagMeter::take)).
    pub fn rejected(&self) -> RejectCounts {
        self.rejected
    }

    /// Lags counted in the current interval.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Ends the interval: its summary (`None` when no lag was counted), and starts afresh.
    pub fn take(&mut self) -> Option<LagSummary> {
        if self.count == 0 {
            return None;
        }
        let quantile = |q: f64| {
            let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
            // Within α of the true value, and never outside what was seen.
            representative(self.hist.at_rank(rank)).clamp(self.min, self.max)
        };
        let s = LagSummary {
            p50: quantile(0.5),
            p95: quantile(0.95),
            max: self.max,
            count: self.count,
        };
        // Zeroed, not emptied: the next interval's lags span about the same buckets, and
        // growing the span again (a shift when a smaller lag comes) costs more than this.
        self.hist.counts.fill(0);
        self.count = 0;
        self.min = f64::INFINITY;
        self.max = 0.0;
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::HeaderValue;
    use proptest::prelude::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    /// The nearest-rank quantile of sorted `xs`: what the meter estimates.
    fn exact(xs: &[f64], q: f64) -> f64 {
        let rank = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len());
        xs[rank - 1]
    }

    fn within(est: f64, truth: f64) -> bool {
        (est - truth).abs() <= RELATIVE_ERROR * truth + 1e-9
            || (truth <= SMALLEST_S && est <= SMALLEST_S)
    }

    fn check(xs: &mut [f64]) {
        let mut m = LagMeter::default();
        for &x in xs.iter() {
            m.record(x).unwrap();
        }
        xs.sort_by(f64::total_cmp);
        let s = m.take().unwrap();
        for (q, est) in [(0.5, s.p50), (0.95, s.p95)] {
            let truth = exact(xs, q);
            assert!(within(est, truth), "q{q}: {est} vs {truth}");
        }
        assert_eq!(s.max, xs[xs.len() - 1]);
        assert_eq!(s.count, xs.len() as u64);
    }

    #[test]
    fn quantiles_of_known_distributions() {
        let mut rng = SmallRng::seed_from_u64(7);
        // Exponential with mean 30 s: p50 = 30·ln 2, p95 = 30·ln 20.
        let mut expo: Vec<f64> = (0..200_000)
            .map(|_| -30.0 * (1.0 - rng.random::<f64>()).ln())
            .collect();
        let mut m = LagMeter::default();
        for &x in &expo {
            m.record(x).unwrap();
        }
        let s = m.take().unwrap();
        assert!((s.p50 / (30.0 * 2f64.ln()) - 1.0).abs() < 0.02, "{s:?}");
        assert!((s.p95 / (30.0 * 20f64.ln()) - 1.0).abs() < 0.02, "{s:?}");
        check(&mut expo);
        // Log-uniform over 1 ms .. 1 day, uniform 0..600 s, a constant, one value.
        let mut wide: Vec<f64> = (0..50_000)
            .map(|_| 10f64.powf(rng.random_range(-3.0..4.94)))
            .collect();
        check(&mut wide);
        let mut uniform: Vec<f64> = (0..10_000).map(|i| f64::from(i) * 0.06).collect();
        check(&mut uniform);
        check(&mut [42.0; 100]);
        check(&mut [0.0004]);
    }

    #[test]
    fn take_resets_and_none_when_empty() {
        let mut m = LagMeter::default();
        assert_eq!(m.take(), None);
        m.record(10.0).unwrap();
        m.record(1000.0).unwrap();
        let s = m.take().unwrap();
        assert_eq!((s.count, s.max), (2, 1000.0));
        assert!(within(s.p50, 10.0), "{s:?}");
        assert_eq!(m.take(), None);
        m.record(0.5).unwrap();
        let s = m.take().unwrap();
        assert_eq!((s.p50, s.p95, s.max), (0.5, 0.5, 0.5));
    }

    #[test]
    fn absurd_lags_are_counted_not_kept() {
        let mut m = LagMeter::default();
        let day = 86_400.0;
        let cases = [
            (f64::NAN, Err(LagReject::NotANumber)),
            (-61.0, Err(LagReject::Future)),
            (f64::NEG_INFINITY, Err(LagReject::Future)),
            (31.0 * day, Err(LagReject::TooOld)),
            (f64::INFINITY, Err(LagReject::TooOld)),
            (-30.0, Ok(())),
            (30.0 * day, Ok(())),
        ];
        for (x, want) in cases {
            assert_eq!(m.record(x), want, "{x}");
        }
        m.reject(LagReject::NoPubTime);
        let r = m.rejected();
        assert_eq!(r.total(), 6);
        assert_eq!(r.get(LagReject::Future), 2);
        assert_eq!(r.iter().filter(|(_, n)| *n > 0).count(), 4);
        let s = m.take().unwrap();
        assert_eq!((s.count, s.p50, s.max), (2, 0.0, 30.0 * day));
        assert_eq!(m.rejected().total(), 6, "refusals are not per interval");
    }

    fn report(pub_time: Option<&str>, completed: Option<&str>) -> Report {
        Report {
            format: crate::core::Format::V03,
            topic: "v03.x".into(),
            exchange: String::new(),
            pub_time: pub_time.and_then(Stamp::parse),
            base_url: String::new(),
            rel_path: "x".into(),
            code: 201,
            message: None,
            host: None,
            user: None,
            duration_s: None,
            source: None,
            from_cluster: None,
            to_clusters: Vec::new(),
            flow: None,
            size_bytes: None,
            identity: None,
            time_completed: completed.and_then(Stamp::parse),
            stamped_client: None,
            stamped_source: None,
            extra: Headers::new(),
        }
    }

    #[test]
    fn lag_of_reports() {
        let seen = Stamp::parse("20240101T130500").unwrap().0;
        let cases = [
            (
                Some("20240101T130000"),
                Some("20240101T130241.5"),
                Ok(161.5),
            ),
            (Some("20240101T130000"), None, Ok(300.0)),
            (None, None, Err(LagReject::NoPubTime)),
            (Some("20240101T131000"), None, Err(LagReject::Future)),
            (Some("20240101T130530"), None, Ok(0.0)),
            (Some("00000101T000000"), None, Err(LagReject::TooOld)),
            (
                Some("20240101T130000"),
                Some("20240101T140000"),
                Err(LagReject::CompletedInFuture),
            ),
            (
                Some("20240101T130000"),
                Some("00000101T000000"),
                Err(LagReject::Future),
            ),
        ];
        for (p, c, want) in cases {
            assert_eq!(lag_of(&report(p, c), seen), want, "{p:?} {c:?}");
        }
        let mut m = LagMeter::default();
        let rules = LagRules::DEFAULT;
        for r in [report(None, None), report(Some("20240101T130000"), None)] {
            m.tally(lag_of(&r, seen).and_then(|x| rules.accept(x)));
        }
        assert_eq!((m.count(), m.rejected().get(LagReject::NoPubTime)), (1, 1));
    }

    #[test]
    fn headers_round_trip_and_hostile_values_are_ignored() {
        let s = LagSummary {
            p50: 1.2345,
            p95: 60.0,
            max: 600.5,
            count: 3,
        };
        let mut h = Headers::new();
        s.set_headers(&mut h);
        assert_eq!(h.get_str(H_LAG_P50), Some("1.234"));
        assert_eq!(
            LagHeaders::read(&h),
            LagHeaders {
                p50: Some(1.234),
                p95: Some(60.0),
                max: Some(600.5),
                count: Some(3),
            }
        );
        let mut bad = Headers::new();
        bad.set(H_LAG_P50, "NaN");
        bad.set(H_LAG_P95, HeaderValue::Float(-1.0));
        bad.set(H_LAG_MAX, "ten");
        bad.set(H_LAG_COUNT, "-4");
        assert!(LagHeaders::read(&bad).is_empty());
        for c in [
            HeaderValue::Int(0),
            HeaderValue::Int(i64::MAX),
            HeaderValue::from("1e3"),
            HeaderValue::Float(2.5),
            HeaderValue::from("inf"),
        ] {
            let mut h = Headers::new();
            h.set(H_LAG_COUNT, c.clone());
            assert_eq!(LagHeaders::read(&h).count, None, "{c:?}");
        }
        for v in [
            HeaderValue::from("inf"),
            HeaderValue::from("-inf"),
            HeaderValue::from("infinity"),
            HeaderValue::from("NaN"),
            HeaderValue::Float(f64::INFINITY),
            HeaderValue::Float(f64::NAN),
            HeaderValue::from("1e300"),
            HeaderValue::Bool(true),
            HeaderValue::Table(Headers::new()),
        ] {
            let mut h = Headers::new();
            h.set(H_LAG_MAX, v.clone());
            assert_eq!(LagHeaders::read(&h).max, None, "{v:?}");
        }
        let mut ok = Headers::new();
        ok.set(H_LAG_P95, HeaderValue::Int(7));
        ok.set(H_LAG_MAX, " 8.5 ");
        let r = LagHeaders::read(&ok);
        assert_eq!((r.p50, r.p95, r.max), (None, Some(7.0), Some(8.5)));
    }

    #[test]
    fn memory_is_bounded_by_the_span_of_lags() {
        let mut m = LagMeter::default();
        for i in 0..100_000 {
            m.record(f64::from(i % 1000) * 0.01 + 5.0).unwrap();
        }
        // 5 s .. 15 s is ln(3)/ln(γ) ≈ 55 buckets.
        assert!(m.hist.counts.len() < 60, "{}", m.hist.counts.len());
        m.record(0.0).unwrap();
        m.record(LagRules::DEFAULT.max_lag_s).unwrap();
        assert!(m.hist.counts.len() <= MAX_INDEX + 1);
        let wide = LagRules {
            max_skew_s: 0.0,
            max_lag_s: f64::MAX,
        };
        let mut m = LagMeter::new(wide);
        m.record(f64::MAX).unwrap();
        m.record(0.0).unwrap();
        assert_eq!(m.hist.counts.len(), MAX_INDEX + 1);
        let s = m.take().unwrap();
        assert_eq!((s.p50, s.max), (0.0, f64::MAX));
    }

    proptest! {
        #[test]
        fn quantiles_within_the_stated_error(
            mut xs in proptest::collection::vec(0.0f64..2_592_000.0, 1..300),
        ) {
            let mut m = LagMeter::default();
            for &x in &xs {
                m.record(x).unwrap();
            }
            xs.sort_by(f64::total_cmp);
            let s = m.take().unwrap();
            prop_assert!(s.p50 <= s.p95 && s.p95 <= s.max);
            for (q, est) in [(0.5, s.p50), (0.95, s.p95)] {
                let truth = exact(&xs, q);
                prop_assert!(within(est, truth), "q{}: {} vs {}", q, est, truth);
            }
        }

        #[test]
        fn record_never_panics(xs in proptest::collection::vec(any::<f64>(), 0..50)) {
            let mut m = LagMeter::default();
            for x in xs {
                let _ = m.record(x);
            }
            if let Some(s) = m.take() {
                prop_assert!(s.p50.is_finite() && s.p50 <= s.p95 && s.p95 <= s.max);
            }
        }
    }
}
