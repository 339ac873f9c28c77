//! `/metrics`: the board as Prometheus text (format 0.0.4), read at scrape time by a
//! `prometheus-client` collector. Names are `pumpwatch_<what>_<unit>[_total]`; labels are
//! `client`/`source` names and `state` from a fixed set, never a file name.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `pumpwatch_{client,source}_good_files_total` | counter | client / source |
//! | `pumpwatch_{client,source}_error_files_total` | counter | client / source |
//! | `pumpwatch_{client,source}_good_bytes_total` | counter | client / source |
//! | `pumpwatch_{client,source}_error_bytes_total` | counter | client / source |
//! | `pumpwatch_{client,source}_good_files_per_second` | gauge (last interval) | client / source |
//! | `pumpwatch_{client,source}_good_bytes_per_second` | gauge | client / source |
//! | `pumpwatch_{client,source}_error_files_per_second` | gauge | client / source |
//! | `pumpwatch_{client,source}_last_good_timestamp_seconds` | gauge | client / source |
//! | `pumpwatch_{client,source}_state` | gauge, 1 for the current state | client / source, state |
//! | `pumpwatch_{client,source}_lag_seconds` | gauge: the last interval's delivery lag | client / source, quantile (0.5, 0.95, 1 = max) |
//! | `pumpwatch_{client,source}_window_lag_p95_seconds` | gauge: p95 lag over the rules' window (the `late` rule) | client / source |
//! | `pumpwatch_pump_*` | the same for the totals, no name label | (state) |
//! | `pumpwatch_serve_speedos_total` | counter | outcome (applied, ignored, stale, malformed) |
//! | `pumpwatch_serve_logins_total` | counter (with `--auth broker`) | outcome (accepted, remembered, token, wrong_password, unknown_user, refused, bad_header, bad_token, broker_unreachable, forbidden, rate_limited) |
//!
//! Other components (e.g. `route`'s counters in `demo`) add their own collectors to the
//! same registry: see [`super::Server::with_collector`].

use super::board::{Board, Entity};
use crate::core::health::State;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use std::fmt::Error;
use std::sync::{Arc, Mutex};

/// Reads the board on every scrape.
#[derive(Debug)]
pub struct BoardCollector(pub Arc<Mutex<Board>>);

type Value = fn(&Entity) -> Number;

#[derive(Clone, Copy)]
enum Number {
    Count(u64),
    Gauge(f64),
}

const COUNTERS: [(&str, &str, Value); 4] = [
    ("good_files", "Good (2xx/3xx) transfers.", |e| {
        Number::Count(e.totals().good)
    }),
    ("error_files", "Failed (4xx/5xx) transfers.", |e| {
        Number::Count(e.totals().errors)
    }),
    ("good_bytes", "Bytes of good transfers.", |e| {
        Number::Count(e.totals().good_bytes)
    }),
    ("error_bytes", "Bytes of failed transfers.", |e| {
        Number::Count(e.totals().bad_bytes)
    }),
];

const GAUGES: [(&str, &str, Value); 4] = [
    (
        "good_files_per_second",
        "Good files per second in the last speedo interval.",
        |e| Number::Gauge(e.last_point().map_or(0.0, |p| ratio(p.files, p.secs))),
    ),
    (
        "good_bytes_per_second",
        "Good bytes per second in the last speedo interval.",
        |e| Number::Gauge(e.last_point().map_or(0.0, |p| ratio(p.bytes, p.secs))),
    ),
    (
        "error_files_per_second",
        "Failed transfers per second in the last speedo interval.",
        |e| Number::Gauge(e.last_point().map_or(0.0, |p| ratio(p.errors, p.secs))),
    ),
    (
        "last_good_timestamp_seconds",
        "End of the last interval with a good transfer (Unix time; 0 = none yet).",
        |e| {
            Number::Gauge(
                e.last_good()
                    .map_or(0.0, |t| t.as_millisecond() as f64 / 1000.0),
            )
        },
    ),
];

fn ratio(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

fn put(m: MetricEncoder<'_>, v: Number) -> Result<(), Error> {
    match v {
        Number::Count(n) => ConstCounter::new(n).encode(m),
        Number::Gauge(g) => ConstGauge::new(g).encode(m),
    }
}

impl Collector for BoardCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), Error> {
        let board = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut clients: Vec<&Entity> = board.clients().collect();
        clients.sort_by(|a, b| a.name.cmp(&b.name));
        let mut sources: Vec<&Entity> = board.sources().collect();
        sources.sort_by(|a, b| a.name.cmp(&b.name));
        let groups: [(&str, Option<&str>, Vec<&Entity>); 3] = [
            ("client", Some("client"), clients),
            ("source", Some("source"), sources),
            ("pump", None, vec![board.total()]),
        ];
        for (prefix, label, entities) in &groups {
            for (what, help, value, kind) in COUNTERS
                .iter()
                .map(|(w, h, v)| (w, h, v, MetricType::Counter))
                .chain(GAUGES.iter().map(|(w, h, v)| (w, h, v, MetricType::Gauge)))
            {
                let name = format!("{prefix}_{what}");
                let mut m = enc.encode_descriptor(&name, help, None, kind)?;
                for e in entities {
                    let labels: Vec<(&str, &str)> = match label {
                        Some(l) => vec![(*l, e.name.as_str())],
                        None => vec![],
                    };
                    put(m.encode_family(&labels)?, value(e))?;
                }
            }
            if let Some(l) = label {
                // Delivery lag, for the rows whose speedos carry it. (A quantile gauge, not a
                // histogram: serve receives each interval's quantiles, not the lags.)
                let lag_name = format!("{prefix}_lag_seconds");
                let mut m = enc.encode_descriptor(
                    &lag_name,
                    "Delivery lag (completion - pubTime) in the last speedo interval, by quantile (1 = max).",
                    None,
                    MetricType::Gauge,
                )?;
                for e in entities {
                    let Some(lag) = e.last_lag() else { continue };
                    for (q, v) in [("0.5", lag.p50), ("0.95", Some(lag.p95)), ("1", lag.max)] {
                        if let Some(v) = v {
                            let labels = [(*l, e.name.as_str()), ("quantile", q)];
                            ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
                        }
                    }
                }
                let window_name = format!("{prefix}_window_lag_p95_seconds");
                let mut m = enc.encode_descriptor(
                    &window_name,
                    "p95 delivery lag over the health window (the late rule).",
                    None,
                    MetricType::Gauge,
                )?;
                for e in entities {
                    if let Some(v) = e.window_lag_p95() {
                        ConstGauge::new(v).encode(m.encode_family(&[(*l, e.name.as_str())])?)?;
                    }
                }
            }
            let name = format!("{prefix}_state");
            let mut m = enc.encode_descriptor(
                &name,
                "1 for the current health state (SPEC §6), 0 for the others.",
                None,
                MetricType::Gauge,
            )?;
            let states: Vec<(String, State)> = match label {
                Some(_) => entities
                    .iter()
                    .map(|e| (e.name.clone(), e.health.state))
                    .collect(),
                None => vec![(String::new(), board.pump(&super::board::Scope::All).state)],
            };
            for (n, current) in &states {
                for s in State::ALL {
                    let v = i64::from(s == *current);
                    let mut labels = vec![("state", s.metric_label())];
                    if let Some(l) = label {
                        labels.insert(0, (*l, n.as_str()));
                    }
                    ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        let intake = board.intake;
        let mut m = enc.encode_descriptor(
            "serve_speedos",
            "Speedo messages received, by what was done with them.",
            None,
            MetricType::Counter,
        )?;
        for (outcome, n) in [
            ("applied", intake.applied),
            ("ignored", intake.ignored),
            ("stale", intake.stale),
            ("malformed", intake.malformed),
        ] {
            ConstCounter::new(n).encode(m.encode_family(&[("outcome", outcome)])?)?;
        }
        Ok(())
    }
}

/// `pumpwatch_serve_logins_total{outcome}`: how logins ended (`auth.rs`): accepted by
/// the broker, remembered, the metrics token; refused as a wrong password, an unknown
/// user, either (`refused`: serve could not look the user up), an unreadable header or
/// a wrong token; not checked because the broker could not be asked; forbidden (logged
/// in, nothing to see); answered 429.
#[derive(Debug)]
pub struct LoginCollector(pub Arc<super::auth::Gate>);

impl Collector for LoginCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), Error> {
        if self.0.mode() == crate::config::AuthMode::None {
            return Ok(());
        }
        let mut m = enc.encode_descriptor(
            "serve_logins",
            "Logins to serve, by how they ended.",
            None,
            MetricType::Counter,
        )?;
        for (outcome, n) in self.0.counts.snapshot() {
            ConstCounter::new(n).encode(m.encode_family(&[("outcome", outcome)])?)?;
        }
        Ok(())
    }
}
