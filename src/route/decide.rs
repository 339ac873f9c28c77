//! The decisions of both `route` stages, pure: a message in, an [`Outcome`] out. The shell
//! (`route/mod.rs`) publishes what the outcome says and acks after the broker confirmed.

use crate::core::attribution::{self, Accounts, AnnouncementIndex, exchange_owner};
use crate::core::report::{self, H_CLIENT, H_SOURCE, Incoming, Message};
use regex::Regex;

/// What to do with one input message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Publish the original message to `exchange` with `stamps` set as headers.
    Forward {
        exchange: String,
        stamps: Vec<(&'static str, String)>,
        kind: ForwardKind,
    },
    /// Publish the original bytes to the rejected exchange with this reason.
    Reject { reason: Reason, detail: String },
    /// Nothing to publish; just ack.
    Consumed(Consumed),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForwardKind {
    /// validate → xreport
    Validated,
    /// dispatch → xr_<source>
    ToSource,
    /// dispatch → xforward_<hop>
    ToPump,
}

/// Why a message was refused; a small fixed set, so it can label a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Spoofed,
    Malformed,
    TooLarge,
    UnknownSource,
    NotAReport,
    TooManyHops,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Spoofed => "spoofed",
            Reason::Malformed => "malformed",
            Reason::TooLarge => "too large",
            Reason::UnknownSource => "unknown source",
            Reason::NotAReport => "not a report",
            Reason::TooManyHops => "too many hops",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Consumed {
    AnnouncementIndexed,
    AnnouncementUnkeyed,
    /// Speedo or watchdog messages on `xreport`: pumpwatch's own, not reports.
    Control,
}

impl Outcome {
    /// The `pumpwatch_reason` header text of a reject.
    pub fn reason_text(reason: Reason, detail: &str) -> String {
        if detail.is_empty() {
            reason.label().to_owned()
        } else {
            format!("{}: {detail}", reason.label())
        }
    }
}

fn reject(reason: Reason, detail: impl Into<String>) -> Outcome {
    Outcome::Reject {
        reason,
        detail: detail.into(),
    }
}

fn parse_error(e: report::ParseError) -> Outcome {
    match e {
        report::ParseError::TooLarge { .. } => reject(Reason::TooLarge, e.to_string()),
        _ => reject(Reason::Malformed, e.to_string()),
    }
}

/// Stage 1: reports posted by users to their `xs_<user>`, and announcements.
#[derive(Debug)]
pub struct Validator {
    pub accounts: Accounts,
    pub index: AnnouncementIndex,
    pub relpath: Regex,
    pub max_body: usize,
    /// Where valid reports go (`xreport`).
    pub report_exchange: String,
}

impl Validator {
    pub fn validate(&mut self, m: &Incoming<'_>) -> Outcome {
        let parsed = match report::parse_limited(m, self.max_body) {
            Ok(p) => p,
            Err(e) => return parse_error(e),
        };
        let owner = exchange_owner(m.exchange);
        match parsed {
            Message::Announcement(a) => {
                // Whose product: its own `source`, else the source whose xs_ it came on,
                // else the pump tree.
                let source = a
                    .source
                    .as_deref()
                    .filter(|s| self.accounts.is_source(s))
                    .or(owner.filter(|o| self.accounts.is_source(o)))
                    .map(str::to_owned)
                    .or_else(|| attribution::source_from_path(&a.rel_path, &self.relpath));
                match source {
                    Some(s) if self.index.insert(&a, &s) => {
                        Outcome::Consumed(Consumed::AnnouncementIndexed)
                    }
                    _ => Outcome::Consumed(Consumed::AnnouncementUnkeyed),
                }
            }
            Message::Control(_) => reject(
                Reason::NotAReport,
                format!("{} is reserved for pumpwatch", m.routing_key),
            ),
            Message::Report(r) => {
                if let (Some(user), Some(owner)) = (r.user.as_deref(), owner) {
                    if user != owner {
                        return reject(
                            Reason::Spoofed,
                            format!("user field {user:?} posted on {}", m.exchange),
                        );
                    }
                }
                let mut stamps = Vec::with_capacity(2);
                if let Some(c) = attribution::client(&r, m.user_id, &self.accounts) {
                    stamps.push((H_CLIENT, c));
                }
                if let Some(s) =
                    attribution::source(&r, &self.accounts, Some(&self.index), &self.relpath)
                {
                    stamps.push((H_SOURCE, s));
                }
                Outcome::Forward {
                    exchange: self.report_exchange.clone(),
                    stamps,
                    kind: ForwardKind::Validated,
                }
            }
        }
    }
}

/// Stage 2: everything in `xreport`, to each product's source (or another pump).
#[derive(Debug)]
pub struct Dispatcher {
    pub accounts: Accounts,
    pub relpath: Regex,
    pub max_body: usize,
    /// This pump's cluster name: reports from here are not forwarded.
    pub cluster: String,
    /// Cluster → next hop neighbour (a neighbour is its own next hop).
    pub routes: std::collections::HashMap<String, String>,
    pub max_hops: u32,
}

/// The hop counter header of reports forwarded between pumps.
pub const H_HOPS: &str = "pumpwatch_hops";

impl Dispatcher {
    pub fn dispatch(&self, m: &Incoming<'_>) -> Outcome {
        let r = match report::parse_limited(m, self.max_body) {
            Ok(Message::Report(r)) => r,
            Ok(Message::Control(_)) => return Outcome::Consumed(Consumed::Control),
            Ok(Message::Announcement(_)) => {
                return reject(
                    Reason::NotAReport,
                    "an announcement was published to the report exchange",
                );
            }
            Err(e) => return parse_error(e),
        };
        if let Some(from) = r.from_cluster.as_deref().filter(|c| *c != self.cluster) {
            if let Some(hop) = self.routes.get(from) {
                let hops = m.headers.get(H_HOPS).and_then(|v| v.as_i64()).unwrap_or(0);
                if hops >= i64::from(self.max_hops) {
                    return reject(Reason::TooManyHops, format!("{hops} hops, from {from}"));
                }
                return Outcome::Forward {
                    exchange: format!("xforward_{hop}"),
                    stamps: vec![(H_HOPS, (hops + 1).to_string())],
                    kind: ForwardKind::ToPump,
                };
            }
        }
        let stamped = r
            .stamped_source
            .as_deref()
            .filter(|s| self.accounts.is_source(s))
            .map(str::to_owned);
        match stamped.or_else(|| attribution::source(&r, &self.accounts, None, &self.relpath)) {
            Some(s) => Outcome::Forward {
                exchange: format!("xr_{s}"),
                stamps: if r.stamped_source.is_none() {
                    vec![(H_SOURCE, s)]
                } else {
                    vec![]
                },
                kind: ForwardKind::ToSource,
            },
            None => reject(Reason::UnknownSource, r.rel_path.clone()),
        }
    }
}
