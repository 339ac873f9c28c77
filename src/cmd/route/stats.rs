//! Route's counters per stage and outcome: logged every minute and read by `/metrics`.
//! Labels come from small fixed sets (stage, outcome, reason), never from names.

use super::decide::{Consumed, ForwardKind, Reason};
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Validate,
    Dispatch,
}

impl Stage {
    pub fn label(self) -> &'static str {
        match self {
            Stage::Validate => "validate",
            Stage::Dispatch => "dispatch",
        }
    }
}

/// (stage, outcome, reason) → count.
pub type Snapshot = BTreeMap<(&'static str, &'static str, &'static str), u64>;

#[derive(Debug, Default)]
pub struct Counters {
    map: Mutex<Snapshot>,
}

impl Counters {
    fn add(&self, stage: Stage, outcome: &'static str, reason: &'static str) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((stage.label(), outcome, reason)).or_default() += 1;
    }

    pub fn forwarded(&self, stage: Stage, kind: ForwardKind) {
        let outcome = match kind {
            ForwardKind::Validated => "validated",
            ForwardKind::ToSource => "routed",
            ForwardKind::ToPump => "forwarded",
        };
        self.add(stage, outcome, "");
    }

    pub fn rejected(&self, stage: Stage, reason: Reason) {
        self.add(stage, "rejected", reason.label());
    }

    pub fn consumed(&self, stage: Stage, c: Consumed) {
        let outcome = match c {
            Consumed::AnnouncementIndexed => "announcement_indexed",
            Consumed::AnnouncementUnkeyed => "announcement_unkeyed",
            Consumed::Control => "control_ignored",
        };
        self.add(stage, outcome, "");
    }

    /// Routed to a source exchange that nothing is bound to.
    pub fn unheard(&self, stage: Stage) {
        self.add(stage, "unheard", "");
    }

    pub fn retried(&self, stage: Stage) {
        self.add(stage, "retried", "");
    }

    pub fn snapshot(&self) -> Snapshot {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn get(&self, stage: &str, outcome: &str) -> u64 {
        self.snapshot()
            .iter()
            .filter(|((s, o, _), _)| *s == stage && *o == outcome)
            .map(|(_, n)| n)
            .sum()
    }

    /// `validate: validated 10, rejected (spoofed) 2; dispatch: routed 10`
    pub fn summary(&self) -> String {
        let snap = self.snapshot();
        if snap.is_empty() {
            return "nothing yet".into();
        }
        let mut parts: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for ((stage, outcome, reason), n) in snap {
            let what = if reason.is_empty() {
                outcome.to_owned()
            } else {
                format!("{outcome} ({reason})")
            };
            parts.entry(stage).or_default().push(format!("{what} {n}"));
        }
        parts
            .into_iter()
            .map(|(s, v)| format!("{s}: {}", v.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// `pumpwatch_route_messages_total{stage, outcome, reason}` for a Prometheus registry with
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
            "Messages handled by route, by stage, outcome and reject reason.",
            None,
            MetricType::Counter,
        )?;
        for ((stage, outcome, reason), n) in self.snapshot() {
            let labels = [("stage", stage), ("outcome", outcome), ("reason", reason)];
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
    fn metrics_name_stage_outcome_and_reason() {
        let c = std::sync::Arc::new(Counters::default());
        c.forwarded(Stage::Validate, ForwardKind::Validated);
        c.forwarded(Stage::Validate, ForwardKind::Validated);
        c.rejected(Stage::Validate, Reason::Spoofed);
        c.forwarded(Stage::Dispatch, ForwardKind::ToSource);
        let text = exposition(&c);
        for want in [
            "# TYPE pumpwatch_route_messages_total counter",
            r#"pumpwatch_route_messages_total{stage="validate",outcome="validated",reason=""} 2"#,
            r#"pumpwatch_route_messages_total{stage="validate",outcome="rejected",reason="spoofed"} 1"#,
            r#"pumpwatch_route_messages_total{stage="dispatch",outcome="routed",reason=""} 1"#,
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
        assert_eq!(
            c.summary(),
            "dispatch: routed 1; validate: rejected (spoofed) 1, validated 2"
        );
    }
}
