//! Route's counters per stage and outcome: logged every minute and read by `/metrics`.
//! Labels come from small fixed sets (stage, outcome, reason), never from names.

use super::decide::{Consumed, Reason};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// (outcome, reason) → count.
pub type Snapshot = BTreeMap<(&'static str, &'static str), u64>;

#[derive(Debug, Default)]
pub struct Counters {
    map: Mutex<Snapshot>,
}

impl Counters {
    fn add(&self, outcome: &'static str, reason: &'static str) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((outcome, reason)).or_default() += 1;
    }

    /// Published to `xreport` and, through it, to the product's source.
    pub fn routed(&self) {
        self.add("routed", "");
    }

    /// Published to `xreport` and, through it, towards another pump.
    pub fn forwarded(&self) {
        self.add("forwarded", "");
    }

    /// Published to `xreport` and `xrejected`: nobody's source could be found.
    pub fn unrouted(&self) {
        self.add("unrouted", Reason::UnknownSource.label());
    }

    pub fn rejected(&self, reason: Reason) {
        self.add("rejected", reason.label());
    }

    pub fn consumed(&self, c: Consumed) {
        let outcome = match c {
            Consumed::AnnouncementIndexed => "announcement_indexed",
            Consumed::AnnouncementAmbiguous => "announcement_ambiguous",
            Consumed::AnnouncementUnkeyed => "announcement_unkeyed",
            Consumed::AnnouncementIgnored => "announcement_ignored",
        };
        self.add(outcome, "");
    }

    /// Published, but no queue at all was bound for it (not even on `xreport`).
    pub fn unheard(&self) {
        self.add("unheard", "");
    }

    /// An output the broker refused for good, sent to `xrejected` with the reason.
    pub fn refused(&self) {
        self.add("refused", "");
    }

    pub fn retried(&self) {
        self.add("retried", "");
    }

    pub fn snapshot(&self) -> Snapshot {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The count of `outcome`, all reasons together.
    pub fn get(&self, outcome: &str) -> u64 {
        self.snapshot()
            .iter()
            .filter(|((o, _), _)| *o == outcome)
            .map(|(_, n)| n)
            .sum()
    }

    /// `routed 10, rejected (spoofed) 2, announcement_indexed 3`
    pub fn summary(&self) -> String {
        let snap = self.snapshot();
        if snap.is_empty() {
            return "nothing yet".into();
        }
        snap.into_iter()
            .map(|((outcome, reason), n)| {
                if reason.is_empty() {
                    format!("{outcome} {n}")
                } else {
                    format!("{outcome} ({reason}) {n}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `pumpwatch_route_messages_total{outcome, reason}` for a Prometheus registry with
/// the `pumpwatch` prefix (route's own `--listen`, or `serve` when run in one process).
impl prometheus_client::collector::Collector for Counters {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::{MetricType, counter::ConstCounter};
        let mut m = enc.encode_descriptor(
            "route_messages",
            "Messages handled by route, by outcome and reject reason.",
            None,
            MetricType::Counter,
        )?;
        for ((outcome, reason), n) in self.snapshot() {
            let labels = [("outcome", outcome), ("reason", reason)];
            ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The text exposition of `counters` alone (`/metrics` of `route --listen`).
pub fn exposition(counters: &std::sync::Arc<Counters>) -> String {
    let mut registry = prometheus_client::registry::Registry::with_prefix("pumpwatch");
    registry.register_collector(Box::new(Shared(counters.clone())));
    let mut out = String::new();
    // Encoding into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

/// Lets a registry own a handle on counters the daemon keeps updating.
#[derive(Debug)]
pub struct Shared(pub std::sync::Arc<Counters>);

impl prometheus_client::collector::Collector for Shared {
    fn encode(
        &self,
        enc: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        self.0.encode(enc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_name_outcome_and_reason() {
        let c = std::sync::Arc::new(Counters::default());
        c.routed();
        c.routed();
        c.rejected(Reason::Spoofed);
        c.unrouted();
        c.consumed(Consumed::AnnouncementAmbiguous);
        let text = exposition(&c);
        for want in [
            "# TYPE pumpwatch_route_messages_total counter",
            r#"pumpwatch_route_messages_total{outcome="routed",reason=""} 2"#,
            r#"pumpwatch_route_messages_total{outcome="rejected",reason="spoofed"} 1"#,
            r#"pumpwatch_route_messages_total{outcome="unrouted",reason="unknown source"} 1"#,
            r#"pumpwatch_route_messages_total{outcome="announcement_ambiguous",reason=""} 1"#,
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
        assert_eq!(
            c.summary(),
            "announcement_ambiguous 1, rejected (spoofed) 1, routed 2, unrouted (unknown source) 1"
        );
        assert_eq!(c.get("routed"), 2);
    }
}
