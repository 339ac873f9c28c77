//! What `route` does with one message, pure: a message in, an [`Outcome`] out. The shell
//! (`pipeline.rs`) publishes what the outcome says and acks after the broker confirmed.
//!
//! One stage, one publish (SPEC §4.2): a report is published **once**, to `xreport`,
//! stamped, with a `BCC` key naming where else the broker must deliver it
//! ([`Route::bcc_key`]); the exchange-to-exchange bindings that `setup` declares do the
//! fan-out. Everything here treats the message as hostile: stamps from local accounts are
//! overwritten, their hop count too, `CC`/`BCC` headers they carry are dropped, and the
//! reserved `pumpwatch.` topic space is refused.

use crate::broker::names::{self, exchange_owner};
use crate::core::attribution::{self, AnnouncementIndex, Attributor, Indexed};
use crate::core::report::{self, Incoming, Message, Report};
use std::collections::HashMap;

/// What to do with one input message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Publish the original message once to `xreport` with these stamps, routed on.
    Publish(Publish),
    /// Publish the original bytes to the rejected exchange with this reason.
    Reject { reason: Reason, detail: String },
    /// Nothing to publish; just ack.
    Consumed(Consumed),
}

/// A report to publish to `xreport`.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    /// `pumpwatch_client`; `None` writes an empty stamp (a user's own is never kept).
    pub client: Option<String>,
    /// `pumpwatch_source`; `None` likewise.
    pub source: Option<String>,
    /// `pumpwatch_hops`: 0 for a report posted here, one more for one from a neighbour.
    pub hops: i64,
    pub route: Route,
}

/// Where, besides `xreport`, the broker delivers a report.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Route {
    /// This pump's source: `xr_<source>`.
    Source(String),
    /// Another pump, through this next hop: `xforward_<hop>`.
    Forward(String),
    /// Nobody's: `xrejected` (with reason `unknown source`); admins see it in `xreport`.
    Unrouted,
}

impl Route {
    /// The `BCC` routing key the exchange-to-exchange bindings of `setup` match.
    pub fn bcc_key(&self) -> String {
        match self {
            Route::Source(s) => names::source_route_key(s),
            Route::Forward(hop) => names::forward_route_key(hop),
            Route::Unrouted => names::UNROUTED_KEY.to_owned(),
        }
    }
}

/// Why a message was refused; a small fixed set, so it can label a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Spoofed,
    Malformed,
    TooLarge,
    UnknownSource,
    NotAReport,
    Loop,
    ReservedTopic,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Spoofed => "spoofed",
            Reason::Malformed => "malformed",
            Reason::TooLarge => "too large",
            Reason::UnknownSource => "unknown source",
            Reason::NotAReport => "not a report",
            Reason::Loop => "loop",
            Reason::ReservedTopic => "reserved topic",
        }
    }

    pub const ALL: [Reason; 7] = [
        Reason::Spoofed,
        Reason::Malformed,
        Reason::TooLarge,
        Reason::UnknownSource,
        Reason::NotAReport,
        Reason::Loop,
        Reason::ReservedTopic,
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Consumed {
    AnnouncementIndexed,
    /// Claimed by another source too: the key now attributes nothing.
    AnnouncementAmbiguous,
    AnnouncementUnkeyed,
    /// Posted by an account that is not a source: never indexed.
    AnnouncementIgnored,
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

/// The decision for every message `route` reads.
#[derive(Debug)]
pub struct Decider {
    pub attributor: Attributor,
    pub index: AnnouncementIndex,
    pub max_body: usize,
    /// This pump's cluster name: reports from here go to this pump's sources.
    pub cluster: String,
    /// Cluster → next hop neighbour (a neighbour is its own next hop).
    pub routes: HashMap<String, String>,
    /// The public exchange: only the pump's own feeder posts there.
    pub public_exchange: String,
    /// More hops than this is a loop.
    pub max_hops: i64,
}

/// Hops past which a report is taken to be going round in circles (SPEC §4.2).
pub const MAX_HOPS: i64 = 8;

impl Decider {
    pub fn decide(&mut self, m: &Incoming<'_>) -> Outcome {
        // Before anything else: a topic in our space would be routed by our own bindings.
        if names::is_reserved_topic(m.routing_key) {
            return reject(
                Reason::ReservedTopic,
                "the pumpwatch. topic space is reserved",
            );
        }
        let parsed = match report::parse_limited(m, self.max_body) {
            Ok(p) => p,
            Err(e @ report::ParseError::TooLarge { .. }) => {
                return reject(Reason::TooLarge, e.to_string());
            }
            Err(e) => return reject(Reason::Malformed, e.to_string()),
        };
        let owner = exchange_owner(m.exchange);
        match parsed {
            Message::Announcement(a) => Outcome::Consumed(self.index_announcement(&a, m, owner)),
            Message::Control(_) => reject(
                Reason::NotAReport,
                format!("{} is reserved for pumpwatch", m.routing_key),
            ),
            Message::Report(r) => self.report(&r, m, owner),
        }
    }

    /// SPEC §2: the index's source is the account that posted the announcement (the
    /// owner of `xs_<source>`, or the feeder on the public exchange), never a body field.
    fn index_announcement(
        &mut self,
        a: &report::Announcement,
        m: &Incoming<'_>,
        owner: Option<&str>,
    ) -> Consumed {
        let accounts = &self.attributor.accounts;
        let source = match owner {
            Some(o) if accounts.is_source(o) => o.to_owned(),
            Some(_) => return Consumed::AnnouncementIgnored,
            // Only the pump itself writes the public exchange: its `source` is the pump's
            // word (a declared source), else the pump tree names it.
            None if m.exchange == self.public_exchange => {
                match a
                    .source
                    .as_deref()
                    .filter(|s| accounts.is_source(s))
                    .map(str::to_owned)
                    .or_else(|| {
                        attribution::source_from_path(&a.rel_path, &self.attributor.relpath)
                            .filter(|s| accounts.is_source(s))
                    }) {
                    Some(s) => s,
                    None => return Consumed::AnnouncementUnkeyed,
                }
            }
            None => return Consumed::AnnouncementIgnored,
        };
        match self.index.insert(a, &source) {
            Indexed::Yes => Consumed::AnnouncementIndexed,
            Indexed::Ambiguous => Consumed::AnnouncementAmbiguous,
            Indexed::Unkeyed => Consumed::AnnouncementUnkeyed,
        }
    }

    fn report(&self, r: &Report, m: &Incoming<'_>, owner: Option<&str>) -> Outcome {
        let accounts = &self.attributor.accounts;
        let neighbour = owner.filter(|o| accounts.is_cluster(o));
        let (client, source, hops) = match neighbour {
            // Attributed by the pump it came from: keep its stamps, count the hop.
            Some(_) => {
                let hops = m
                    .headers
                    .get(names::H_HOPS)
                    .and_then(|v| v.as_i64())
                    .unwrap_or(0)
                    .clamp(0, i64::MAX - 1)
                    + 1;
                if hops > self.max_hops {
                    return reject(Reason::Loop, format!("{hops} hops"));
                }
                let client = r
                    .stamped_client
                    .clone()
                    .or_else(|| self.attributor.decide_client(r, None, None));
                let source = r
                    .stamped_source
                    .clone()
                    .filter(|s| accounts.is_source(s))
                    .or_else(|| self.attributor.decide_source(r, Some(&self.index)));
                (client, source, hops)
            }
            None => {
                if let (Some(user), Some(owner)) = (r.user.as_deref(), owner)
                    && user != owner
                {
                    return reject(
                        Reason::Spoofed,
                        format!("user field {user:?} posted on {}", m.exchange),
                    );
                }
                let client = self.attributor.decide_client(r, owner, m.user_id);
                let source = self.attributor.decide_source(r, Some(&self.index));
                (client, source, 0)
            }
        };
        let far = r
            .from_cluster
            .as_deref()
            .filter(|c| *c != self.cluster)
            .and_then(|c| self.routes.get(c));
        let route = match (far, &source) {
            (Some(hop), _) => Route::Forward(hop.clone()),
            (None, Some(s)) => Route::Source(s.clone()),
            (None, None) => Route::Unrouted,
        };
        Outcome::Publish(Publish {
            client,
            source,
            hops,
            route,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Headers;
    use crate::core::attribution::Accounts;

    fn decider() -> Decider {
        let accounts = Accounts {
            sources: ["radar".to_owned(), "sat".to_owned()].into(),
            others: ["cfs".to_owned(), "edu".to_owned()].into(),
            clusters: ["pumpb".to_owned()].into(),
        };
        Decider {
            attributor: Attributor {
                accounts,
                ..Attributor::default()
            },
            index: AnnouncementIndex::new(100),
            max_body: 1000,
            cluster: "here".into(),
            routes: HashMap::from([
                ("far".to_owned(), "near".to_owned()),
                ("near".to_owned(), "near".to_owned()),
            ]),
            public_exchange: "xpublic".into(),
            max_hops: MAX_HOPS,
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

    fn publish(o: Outcome) -> Publish {
        match o {
            Outcome::Publish(p) => p,
            o => panic!("{o:?}"),
        }
    }

    fn reason(o: Outcome) -> Reason {
        match o {
            Outcome::Reject { reason, .. } => reason,
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn a_report_is_stamped_and_routed_to_its_source() {
        let mut d = decider();
        let h = Headers::new();
        let p = publish(d.decide(&msg("xs_cfs", "v02.report.a", V02, &h)));
        assert_eq!(
            p,
            Publish {
                client: Some("cfs".into()),
                source: Some("radar".into()),
                hops: 0,
                route: Route::Source("radar".into()),
            }
        );
        assert_eq!(p.route.bcc_key(), "pumpwatch.source.radar");
    }

    #[test]
    fn hostile_input_is_rejected_with_a_reason() {
        let mut d = decider();
        let h = Headers::new();
        let cases: [(&str, &str, &[u8], Reason); 7] = [
            ("xs_edu", "v02.report.a", V02, Reason::Spoofed),
            ("xs_cfs", "v02.report.a", b"garbage", Reason::Malformed),
            ("xs_cfs", "v02.report.a", &[b'x'; 2000], Reason::TooLarge),
            ("xs_cfs", "v02.report.a", b"", Reason::Malformed),
            ("xs_cfs", "v01.speedo.client.all", b"x", Reason::NotAReport),
            ("xs_cfs", "pumpwatch.source.sat", V02, Reason::ReservedTopic),
            ("xs_cfs", "pumpwatch.unrouted", V02, Reason::ReservedTopic),
        ];
        for (x, key, body, want) in cases {
            assert_eq!(reason(d.decide(&msg(x, key, body, &h))), want, "{key}");
        }
    }

    #[test]
    fn local_hop_counts_and_stamps_are_overwritten() {
        let mut d = decider();
        let mut h = Headers::new();
        h.set(names::H_HOPS, -1_000_000i64);
        h.set(names::H_SOURCE, "sat");
        h.set(names::H_CLIENT, "edu");
        let p = publish(d.decide(&msg("xs_cfs", "v02.report.a", V02, &h)));
        assert_eq!((p.hops, p.client.as_deref()), (0, Some("cfs")));
        assert_eq!(p.route, Route::Source("radar".into()));
    }

    #[test]
    fn neighbours_keep_their_stamps_and_count_the_hop() {
        let mut d = decider();
        let mut h = Headers::new();
        h.set(names::H_CLIENT, "far-client");
        h.set(names::H_SOURCE, "sat");
        h.set(names::H_HOPS, 2i64);
        let body = b"20240101T000000 http://h x/a.h5 201 n1 far-client 0.1";
        let p = publish(d.decide(&msg("xs_pumpb", "v02.report.a", body, &h)));
        assert_eq!(
            (p.client.as_deref(), p.source.as_deref(), p.hops),
            (Some("far-client"), Some("sat"), 3)
        );
        h.set(names::H_HOPS, 8i64);
        assert_eq!(
            reason(d.decide(&msg("xs_pumpb", "v02.report.a", body, &h))),
            Reason::Loop
        );
        h.set(names::H_HOPS, i64::MAX);
        assert_eq!(
            reason(d.decide(&msg("xs_pumpb", "v02.report.a", body, &h))),
            Reason::Loop
        );
    }

    #[test]
    fn reports_for_other_pumps_go_to_the_next_hop_and_unknown_ones_nowhere() {
        let mut d = decider();
        let mut far = Headers::new();
        far.set("from_cluster", "far");
        let p = publish(d.decide(&msg("xs_cfs", "v02.report.a", V02, &far)));
        assert_eq!(p.route, Route::Forward("near".into()));
        assert_eq!(p.route.bcc_key(), "pumpwatch.forward.near");
        // This pump's own name, or one without a route: its own sources.
        far.set("from_cluster", "here");
        let p = publish(d.decide(&msg("xs_cfs", "v02.report.a", V02, &far)));
        assert_eq!(p.route, Route::Source("radar".into()));
        let none = Headers::new();
        let body = b"20240101T000000 http://h x/a.h5 201 n1 cfs 0.1";
        let p = publish(d.decide(&msg("xs_cfs", "v02.report.a", body, &none)));
        assert_eq!((p.route.clone(), p.source), (Route::Unrouted, None));
        assert_eq!(p.route.bcc_key(), "pumpwatch.unrouted");
    }

    #[test]
    fn the_index_takes_the_posting_account_as_the_source() {
        let mut d = decider();
        let h = Headers::new();
        let ann = b"20240101T000000.5 http://h /x/a.h5";
        // sr3: no user, its own user as `source`, a local relPath.
        let mut sr3 = Headers::new();
        sr3.set("source", "cfs");
        let rep = b"20240101T000000.5 http://h /home/cfs/a.h5 201 n1 cfs 0.1";
        assert_eq!(
            d.decide(&msg("xs_radar", "v02.post.a", ann, &h)),
            Outcome::Consumed(Consumed::AnnouncementIndexed)
        );
        let p = publish(d.decide(&msg("xs_cfs", "v02.report.a", rep, &sr3)));
        assert_eq!(p.route, Route::Source("radar".into()));
        // A subscriber posting an "announcement" naming another source: ignored.
        let mut claim = Headers::new();
        claim.set("source", "sat");
        assert_eq!(
            d.decide(&msg("xs_edu", "v02.post.a", ann, &claim)),
            Outcome::Consumed(Consumed::AnnouncementIgnored)
        );
        // A second source announcing the same pubTime and file name: ambiguous.
        assert_eq!(
            d.decide(&msg(
                "xs_sat",
                "v02.post.a",
                b"20240101T000000.5 http://h /y/a.h5",
                &h
            )),
            Outcome::Consumed(Consumed::AnnouncementAmbiguous)
        );
        let p = publish(d.decide(&msg("xs_cfs", "v02.report.a", rep, &sr3)));
        assert_eq!(p.route, Route::Unrouted);
        // The pump's own announcements on xpublic carry the source in the pump's words.
        let mut pubh = Headers::new();
        pubh.set("source", "sat");
        assert_eq!(
            d.decide(&msg(
                "xpublic",
                "v02.post.b",
                b"20240102T000000 http://h /b.h5",
                &pubh
            )),
            Outcome::Consumed(Consumed::AnnouncementIndexed)
        );
        // Announcements on any other exchange are nobody's.
        assert_eq!(
            d.decide(&msg(
                "xreport",
                "v02.post.c",
                b"20240103T000000 http://h /c.h5",
                &h
            )),
            Outcome::Consumed(Consumed::AnnouncementIgnored)
        );
    }
}
