//! The decisions of both `route` stages, pure: a message in, an [`Outcome`] out. The shell
//! (`route/mod.rs`) publishes what the outcome says and acks after the broker confirmed.

use crate::broker::names::{self, H_CLIENT, H_HOPS, H_SOURCE, exchange_owner};
use crate::core::attribution::{self, AnnouncementIndex, Attributor};
use crate::core::report::{self, Incoming, Message};

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
    pub attributor: Attributor,
    pub index: AnnouncementIndex,
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
                let accounts = &self.attributor.accounts;
                let source = a
                    .source
                    .as_deref()
                    .filter(|s| accounts.is_source(s))
                    .or(owner.filter(|o| accounts.is_source(o)))
                    .map(str::to_owned)
                    .or_else(|| {
                        attribution::source_from_path(&a.rel_path, &self.attributor.relpath)
                    });
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
                if let (Some(user), Some(owner)) = (r.user.as_deref(), owner)
                    && user != owner
                {
                    return reject(
                        Reason::Spoofed,
                        format!("user field {user:?} posted on {}", m.exchange),
                    );
                }
                let mut stamps = Vec::with_capacity(2);
                if let Some(c) = self.attributor.decide_client(&r, owner, m.user_id) {
                    stamps.push((H_CLIENT, c));
                }
                if let Some(s) = self.attributor.decide_source(&r, Some(&self.index)) {
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
    pub attributor: Attributor,
    pub max_body: usize,
    /// This pump's cluster name: reports from here are not forwarded.
    pub cluster: String,
    /// Cluster → next hop neighbour (a neighbour is its own next hop).
    pub routes: std::collections::HashMap<String, String>,
    pub max_hops: u32,
}

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
        if let Some(from) = r.from_cluster.as_deref().filter(|c| *c != self.cluster)
            && let Some(hop) = self.routes.get(from)
        {
            let hops = m.headers.get(H_HOPS).and_then(|v| v.as_i64()).unwrap_or(0);
            if hops >= i64::from(self.max_hops) {
                return reject(Reason::TooManyHops, format!("{hops} hops, from {from}"));
            }
            return Outcome::Forward {
                exchange: names::forward_exchange(hop),
                stamps: vec![(H_HOPS, (hops + 1).to_string())],
                kind: ForwardKind::ToPump,
            };
        }
        let stamped = r
            .stamped_source
            .as_deref()
            .filter(|s| self.attributor.accounts.is_source(s))
            .map(str::to_owned);
        match stamped.or_else(|| self.attributor.decide_source(&r, None)) {
            Some(s) => Outcome::Forward {
                exchange: names::source_exchange(&s),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Headers;
    use std::collections::HashMap;

    fn attributor() -> Attributor {
        let accounts = crate::core::attribution::Accounts {
            sources: ["radar".to_owned()].into(),
            others: ["cfs".to_owned(), "edu".to_owned()].into(),
        };
        Attributor {
            accounts,
            ..Attributor::default()
        }
    }

    fn validator() -> Validator {
        Validator {
            attributor: attributor(),
            index: AnnouncementIndex::new(100),
            max_body: 1000,
            report_exchange: "xreport".into(),
        }
    }

    fn dispatcher() -> Dispatcher {
        Dispatcher {
            attributor: attributor(),
            max_body: 1000,
            cluster: "here".into(),
            routes: HashMap::from([
                ("far".to_owned(), "near".to_owned()),
                ("near".to_owned(), "near".to_owned()),
            ]),
            max_hops: 8,
        }
    }

    fn msg<'a>(exchange: &'a str, key: &'a str, body: &'a [u8], h: &'a Headers) -> Incoming<'a> {
        Incoming {
            exchange,
            routing_key: key,
            body,
            content_type: None,
            user_id: None,
            headers: h,
        }
    }

    const V02: &[u8] = b"20240101T000000 http://h 20240101/radar/a.h5 201 n1 cfs 0.1";

    #[test]
    fn validate_outcomes() {
        let mut v = validator();
        let h = Headers::new();
        match v.validate(&msg("xs_cfs", "v02.report.a", V02, &h)) {
            Outcome::Forward {
                exchange,
                stamps,
                kind,
            } => {
                assert_eq!(
                    (exchange.as_str(), kind),
                    ("xreport", ForwardKind::Validated)
                );
                assert_eq!(
                    stamps,
                    vec![(H_CLIENT, "cfs".to_owned()), (H_SOURCE, "radar".to_owned())]
                );
            }
            o => panic!("{o:?}"),
        }
        let cases: [(&str, &[u8], Reason); 4] = [
            ("xs_edu", V02, Reason::Spoofed),
            ("xs_cfs", b"garbage", Reason::Malformed),
            ("xs_cfs", &[b'x'; 2000], Reason::TooLarge),
            ("xs_cfs", b"", Reason::Malformed),
        ];
        for (x, body, want) in cases {
            match v.validate(&msg(x, "v02.report.a", body, &h)) {
                Outcome::Reject { reason, detail } => assert_eq!(reason, want, "{detail}"),
                o => panic!("{o:?}"),
            }
        }
        let speedo = v.validate(&msg("xs_cfs", "v01.speedo.client.all", b"x", &h));
        assert!(matches!(
            speedo,
            Outcome::Reject {
                reason: Reason::NotAReport,
                ..
            }
        ));
        let ann = v.validate(&msg(
            "xs_radar",
            "v02.post.a",
            b"20240101T000000 http://h /x/a.h5",
            &h,
        ));
        assert_eq!(ann, Outcome::Consumed(Consumed::AnnouncementIndexed));
    }

    #[test]
    fn dispatch_outcomes() {
        let d = dispatcher();
        let mut h = Headers::new();
        h.set(H_SOURCE, "radar");
        let o = d.dispatch(&msg("xreport", "v02.report.a", V02, &h));
        assert!(
            matches!(o, Outcome::Forward { ref exchange, ref stamps, kind: ForwardKind::ToSource } if exchange == "xr_radar" && stamps.is_empty()),
            "{o:?}"
        );
        let none = Headers::new();
        let o = d.dispatch(&msg(
            "xreport",
            "v02.report.a",
            b"20240101T000000 http://h x/a.h5 201 n1 cfs 0.1",
            &none,
        ));
        assert!(
            matches!(
                o,
                Outcome::Reject {
                    reason: Reason::UnknownSource,
                    ..
                }
            ),
            "{o:?}"
        );
        let mut far = Headers::new();
        far.set("from_cluster", "far");
        let o = d.dispatch(&msg("xreport", "v02.report.a", V02, &far));
        assert!(
            matches!(o, Outcome::Forward { ref exchange, kind: ForwardKind::ToPump, .. } if exchange == "xforward_near"),
            "{o:?}"
        );
        far.set(H_HOPS, 8i64);
        let o = d.dispatch(&msg("xreport", "v02.report.a", V02, &far));
        assert!(
            matches!(
                o,
                Outcome::Reject {
                    reason: Reason::TooManyHops,
                    ..
                }
            ),
            "{o:?}"
        );
        assert_eq!(
            d.dispatch(&msg("xreport", "v01.speedo.client.x", b"1", &none)),
            Outcome::Consumed(Consumed::Control)
        );
    }
}
