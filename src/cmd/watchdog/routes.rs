//! The watchdog's HTTP face, on the shared [`crate::http`] listener:
//!
//! - `/api/inflight?node=HOST&older_than=SECS&limit=N`: the core's
//!   [`Snapshot`](crate::core::watchdog::Snapshot) as JSON: per node its state, in flight,
//!   oldest start, last sign of life and counts; then the transfers (of `node`, at least
//!   `older_than` old) oldest first with their age, at most `limit` (default 1000, at most
//!   100 000; `matched` and `truncated` say how many there were);
//! - `/metrics`: totals and sizes, and per node its transfers in flight and its state;
//! - `/healthz`: 200 while the broker connection is up and the state file writable
//!   (`ok standby` while another watchdog is the active one).

use super::{Shared, get};
use crate::core::watchdog::{NodeState, Query};
use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use jiff::Timestamp;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;

/// Transfers one answer lists at most.
pub const MAX_LIMIT: usize = 100_000;

pub fn router(shared: Arc<Shared>) -> axum::Router {
    let mut registry = Registry::with_prefix("pumpwatch");
    registry.register_collector(Box::new(WatchdogCollector(shared.clone())));
    let health = shared.clone();
    axum::Router::new()
        .route("/api/inflight", axum::routing::get(inflight))
        .route("/metrics", crate::http::metrics(Arc::new(registry)))
        .route(
            "/healthz",
            crate::http::healthz_with(move || {
                if !health.is_healthy() {
                    Err("reconnecting to the broker, or the state file cannot be written")
                } else if health.is_standby() {
                    Ok("ok standby")
                } else {
                    Ok("ok")
                }
            }),
        )
        .with_state(shared)
}

/// Parses `node`, `older_than` (seconds) and `limit`; unknown parameters are refused, so a
/// typo is not silently a different question.
pub fn parse_query(raw: Option<&str>) -> Result<Query, String> {
    let mut q = Query::default();
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match &*k {
            "node" => q.node = Some(v.into_owned()),
            "older_than" => {
                let d =
                    crate::config::parse_duration(&v).map_err(|e| format!("older_than: {e}"))?;
                q.older_than = Some(d);
            }
            "limit" => {
                let n: usize = v.parse().map_err(|_| {
                    format!("limit: not a number: {:?}", crate::core::text::escape(&v))
                })?;
                q.limit = n.min(MAX_LIMIT);
            }
            other => {
                return Err(format!(
                    "unknown parameter {:?} (node, older_than, limit)",
                    crate::core::text::escape(other)
                ));
            }
        }
    }
    Ok(q)
}

async fn inflight(State(s): State<Arc<Shared>>, RawQuery(raw): RawQuery) -> Response {
    let q = match parse_query(raw.as_deref()) {
        Ok(q) => q,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    // Walks every open transfer: off the async workers.
    let snap = tokio::task::spawn_blocking(move || s.lock().snapshot(&q, Timestamp::now())).await;
    match snap {
        Ok(snap) => Json(snap).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "snapshot failed\n").into_response(),
    }
}

/// Reads the watchdog at scrape time.
#[derive(Debug)]
struct WatchdogCollector(Arc<Shared>);

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

const STATES: [NodeState; 4] = [
    NodeState::Failed,
    NodeState::Stuck,
    NodeState::Recovered,
    NodeState::Ok,
];

impl Collector for WatchdogCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let q = Query {
            limit: 0,
            ..Query::default()
        };
        let snap = self.0.lock().snapshot(&q, Timestamp::now());
        let t = snap.totals;
        let counters: [(&str, &str, u64); 10] = [
            (
                "watchdog_transfers_opened",
                "102 reports that opened a transfer.",
                t.opened,
            ),
            (
                "watchdog_transfers_closed",
                "Transfers ended by their final report.",
                t.closed,
            ),
            (
                "watchdog_transfers_evicted",
                "Transfers dropped to stay within max_inflight/max_bytes.",
                t.evicted,
            ),
            (
                "watchdog_transfers_expired",
                "Transfers dropped after forget_after.",
                t.expired,
            ),
            (
                "watchdog_transfers_failed_over",
                "Transfers listed in a node failure.",
                t.failed_over,
            ),
            (
                "watchdog_transfers_stuck",
                "Transfers that became stuck.",
                t.stuck,
            ),
            (
                "watchdog_orphan_finals",
                "Final reports that matched no open transfer.",
                t.orphan_finals,
            ),
            (
                "watchdog_duplicate_starts",
                "102 reports for a transfer already open.",
                t.duplicates,
            ),
            (
                "watchdog_late_starts",
                "102 reports that came after their final.",
                t.late_starts,
            ),
            (
                "watchdog_reports_ignored",
                "Reports over the limits, not tracked.",
                t.ignored,
            ),
        ];
        for (name, help, v) in counters {
            let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(m)?;
        }
        let st = &self.0.stats;
        let run: [(&str, &str, u64); 8] = [
            (
                "watchdog_reports_read",
                "Reports read from the queue (this run).",
                get(&st.reports),
            ),
            (
                "watchdog_reports_acked",
                "Messages acked after their flush (this run).",
                get(&st.acked),
            ),
            (
                "watchdog_malformed",
                "Messages that were not reports (this run).",
                get(&st.malformed),
            ),
            (
                "watchdog_node_failures",
                "Node failures announced (this run).",
                get(&st.failures),
            ),
            (
                "watchdog_node_recoveries",
                "Node recoveries announced (this run).",
                get(&st.recoveries),
            ),
            (
                "watchdog_reposts",
                "Products re-announced and confirmed (this run).",
                get(&st.reposts),
            ),
            (
                "watchdog_reposts_unheard",
                "Reposts no queue was bound for (this run).",
                get(&st.reposts_unheard),
            ),
            (
                "watchdog_publish_given_up",
                "Notices or reposts the broker refused for good (this run).",
                get(&st.publish_failed),
            ),
        ];
        for (name, help, v) in run {
            let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(m)?;
        }
        let m = enc.encode_descriptor(
            "watchdog_takeovers",
            "Times this instance went from standby to active (this run).",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(get(&st.takeovers)).encode(m)?;
        let m = enc.encode_descriptor(
            "watchdog_standby",
            "1 while this instance stands by (another watchdog reads the queue).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(self.0.is_standby())).encode(m)?;
        let g = snap.gauges;
        let gauges: [(&str, &str, u64); 6] = [
            ("watchdog_in_flight", "Open transfers.", g.in_flight),
            (
                "watchdog_stuck",
                "Open transfers older than stuck_after.",
                g.stuck,
            ),
            (
                "watchdog_stale",
                "Failed-over transfers still open.",
                g.stale,
            ),
            ("watchdog_nodes", "Nodes tracked.", g.nodes),
            (
                "watchdog_failed_nodes",
                "Nodes failed and not heard from since.",
                g.failed_nodes,
            ),
            (
                "watchdog_memory_bytes",
                "Approximate bytes the state holds.",
                g.bytes,
            ),
        ];
        for (name, help, v) in gauges {
            let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v as i64).encode(m)?;
        }
        // Node names come from reports: the encoder quotes and escapes label values.
        let mut m = enc.encode_descriptor(
            "watchdog_node_in_flight",
            "Open transfers per node.",
            None,
            MetricType::Gauge,
        )?;
        for n in &snap.nodes {
            let host = crate::core::text::escape(&n.host);
            ConstGauge::new(n.in_flight as i64).encode(m.encode_family(&[("node", &*host)])?)?;
        }
        let mut m = enc.encode_descriptor(
            "watchdog_node_state",
            "1 for the node's current state, 0 for the others.",
            None,
            MetricType::Gauge,
        )?;
        for n in &snap.nodes {
            let host = crate::core::text::escape(&n.host);
            for s in STATES {
                let labels = [("node", &*host), ("state", s.name())];
                ConstGauge::new(i64::from(n.state == s)).encode(m.encode_family(&labels)?)?;
            }
        }
        let m = enc.encode_descriptor(
            "watchdog_node_timeout_seconds",
            "A node silent this long while holding transfers is failed.",
            None,
            MetricType::Gauge,
        )?;
        let timeout: Duration = self.0.lock().settings().node_timeout;
        ConstGauge::new(timeout.as_secs_f64()).encode(m)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries() {
        let q = parse_query(Some("node=n%201&older_than=90&limit=5")).unwrap();
        assert_eq!(q.node.as_deref(), Some("n 1"));
        assert_eq!(q.older_than, Some(Duration::from_secs(90)));
        assert_eq!(q.limit, 5);
        assert_eq!(parse_query(None).unwrap(), Query::default());
        assert_eq!(
            parse_query(Some("limit=99999999999")).unwrap().limit,
            MAX_LIMIT
        );
        for bad in ["limit=x", "older_than=-1", "nod=a", "older_than=soon"] {
            assert!(parse_query(Some(bad)).is_err(), "{bad}");
        }
    }
}
