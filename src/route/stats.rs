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
