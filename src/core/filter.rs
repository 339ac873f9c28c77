//! The filters of `pumpwatch log` (SPEC §4.3), as one value checked against each report.

use super::attribution::Who;
use super::code::CodeRange;
use super::report::{Incoming, Report};
use regex::Regex;

/// Every filter is optional; a report must pass all that are set.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Regex over topic, body and header values (like `dd_log <pattern>`).
    pub pattern: Option<Regex>,
    pub source: Option<String>,
    pub client: Option<String>,
    pub host: Option<String>,
    /// Regex over relPath.
    pub file: Option<Regex>,
    pub flow: Option<String>,
    pub code: Option<CodeRange>,
    /// Matches `from_cluster` or any of `to_clusters`.
    pub cluster: Option<String>,
}

impl Filter {
    /// `who` is the report's client and source as [`Attributor::who`] tells them, so the
    /// filters agree with every other component.
    ///
    /// [`Attributor::who`]: super::attribution::Attributor::who
    pub fn matches(&self, r: &Report, who: &Who, raw: &Incoming<'_>) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| match want {
            Some(w) => have == Some(w.as_str()),
            None => true,
        };
        eq(&self.source, who.source.as_deref())
            && eq(&self.client, who.client.as_deref())
            && eq(&self.host, r.host.as_deref())
            && eq(&self.flow, r.flow.as_deref())
            && self.code.as_ref().is_none_or(|c| c.contains(r.code))
            && self.file.as_ref().is_none_or(|re| re.is_match(&r.rel_path))
            && self.cluster.as_ref().is_none_or(|c| {
                r.from_cluster.as_deref() == Some(c.as_str())
                    || r.to_clusters.iter().any(|t| t == c)
            })
            && self
                .pattern
                .as_ref()
                .is_none_or(|re| pattern_matches(re, raw))
    }
}

impl Filter {
    /// True when no filter needs a parsed report (only PATTERN, or nothing, is set).
    pub fn is_pattern_only(&self) -> bool {
        self.source.is_none()
            && self.client.is_none()
            && self.host.is_none()
            && self.file.is_none()
            && self.flow.is_none()
            && self.code.is_none()
            && self.cluster.is_none()
    }

    /// PATTERN alone, for messages that are not reports.
    pub fn pattern_matches(&self, raw: &Incoming<'_>) -> bool {
        self.pattern
            .as_ref()
            .is_none_or(|re| pattern_matches(re, raw))
    }
}

fn pattern_matches(re: &Regex, raw: &Incoming<'_>) -> bool {
    re.is_match(raw.routing_key)
        || re.is_match(&String::from_utf8_lossy(raw.body))
        || raw
            .headers
            .iter()
            .any(|(k, v)| re.is_match(k) || re.is_match(&v.to_text()))
}
