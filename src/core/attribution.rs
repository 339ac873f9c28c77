//! Who is the client and whose product is it (SPEC §2), written once: [`Attributor`].
//!
//! `route` decides once, from the report, the exchange it was posted to and the
//! announcement index ([`Attributor::decide_client`], [`Attributor::decide_source`]), and
//! stamps `pumpwatch_client`/`pumpwatch_source`. Every later component (speedo, serve,
//! log's filters, watchdog, archive) asks [`Attributor::client`] / [`Attributor::source`],
//! which read the stamps first and fall back to the same rules (without the index) only for
//! reports that entered `xreport` another way; so `log --source X` and the speedometers
//! can never disagree about a report.

use super::report::{Announcement, Identity, Report};
use super::stamp::Stamp;
use regex::Regex;
use std::collections::{HashMap, HashSet, VecDeque};

/// The relPath pattern of the pump tree `YYYYMMDD/<source>/...` (`route.relpath_pattern`).
pub const DEFAULT_RELPATH_PATTERN: &str = r"^/?\d{8}/(?P<source>[^/]+)/";

/// The declared accounts, as far as attribution cares. With none declared (no
/// configuration), any `source` value is believed: there is nothing to check it against.
#[derive(Debug, Clone, Default)]
pub struct Accounts {
    pub sources: HashSet<String>,
    /// Subscribers, the feeder, admins: accounts that consume and report.
    pub others: HashSet<String>,
    /// Neighbour pumps' accounts: what they post was attributed by the pump it came from.
    pub clusters: HashSet<String>,
}

impl Accounts {
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty() && self.others.is_empty() && self.clusters.is_empty()
    }

    pub fn is_cluster(&self, name: &str) -> bool {
        self.clusters.contains(name)
    }

    /// Whether `name` may be taken as a product's source.
    pub fn is_source(&self, name: &str) -> bool {
        if self.is_empty() {
            !name.is_empty()
        } else {
            self.sources.contains(name)
        }
    }
}

/// The rules of SPEC §2 "Who is the client?" and "Whose product is it?", built once from
/// the configuration and shared by every component.
#[derive(Debug, Clone)]
pub struct Attributor {
    pub accounts: Accounts,
    pub relpath: Regex,
}

impl Attributor {
    pub fn new(accounts: Accounts, relpath: Regex) -> Attributor {
        Attributor { accounts, relpath }
    }

    /// `route`'s decision, stamps ignored (a user's own `pumpwatch_*` headers are never
    /// believed): the report's own user field, else `owner` (the owner of the `xs_<user>`
    /// exchange it was posted to), else the AMQP `user_id`, else a `source` value naming a
    /// declared non-source account (sr3 puts its own user there).
    pub fn decide_client(
        &self,
        r: &Report,
        owner: Option<&str>,
        user_id: Option<&str>,
    ) -> Option<String> {
        r.user
            .as_deref()
            .filter(|u| !u.is_empty())
            .or(owner.filter(|o| !o.is_empty()))
            .or(user_id.filter(|u| !u.is_empty()))
            .or_else(|| {
                r.source
                    .as_deref()
                    .filter(|s| self.accounts.others.contains(*s))
            })
            .map(str::to_owned)
    }

    /// `route`'s decision, stamps ignored: a `source` value naming a declared source, else
    /// the announcement it answers (when `index` is given), else the relPath pattern.
    pub fn decide_source(&self, r: &Report, index: Option<&AnnouncementIndex>) -> Option<String> {
        if let Some(s) = r.source.as_deref().filter(|s| self.accounts.is_source(s)) {
            return Some(s.to_owned());
        }
        if let Some(s) = index.and_then(|i| i.lookup(r)) {
            return Some(s.to_owned());
        }
        source_from_path(&r.rel_path, &self.relpath).filter(|s| self.accounts.is_source(s))
    }

    /// The client as every component after `route` sees it: the stamp, else
    /// [`decide_client`](Self::decide_client) without an exchange owner.
    pub fn client(&self, r: &Report, user_id: Option<&str>) -> Option<String> {
        match r.stamped_client.as_deref() {
            Some(c) if !c.is_empty() => Some(c.to_owned()),
            _ => self.decide_client(r, None, user_id),
        }
    }

    /// Both, as every component after `route` sees them.
    pub fn who(&self, r: &Report, user_id: Option<&str>) -> Who {
        Who {
            client: self.client(r, user_id),
            source: self.source(r),
        }
    }

    /// The source as every component after `route` sees it: the stamp, else
    /// [`decide_source`](Self::decide_source) without the index.
    pub fn source(&self, r: &Report) -> Option<String> {
        match r.stamped_source.as_deref() {
            Some(s) if !s.is_empty() => Some(s.to_owned()),
            _ => self.decide_source(r, None),
        }
    }
}

/// A report's client and source, as the components after `route` see them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Who {
    pub client: Option<String>,
    pub source: Option<String>,
}

impl Default for Attributor {
    fn default() -> Self {
        Attributor {
            accounts: Accounts::default(),
            relpath: Regex::new(DEFAULT_RELPATH_PATTERN)
                .unwrap_or_else(|e| unreachable!("the default pattern compiles: {e}")),
        }
    }
}

/// The `source` group of the relPath pattern (default: the pump tree `YYYYMMDD/<source>/`).
pub fn source_from_path(rel_path: &str, relpath: &Regex) -> Option<String> {
    relpath
        .captures(rel_path)?
        .name("source")
        .map(|m| m.as_str().to_owned())
        .filter(|s| !s.is_empty())
}

/// Keys under which an announcement is remembered and a report looked up.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// (pubTime, file name): both survive sr3's rewriting of relPath.
    Time(Stamp, String),
    Identity(String),
}

fn file_name(p: &str) -> &str {
    let t = p.trim_end_matches('/');
    t.rsplit('/').next().unwrap_or(t)
}

/// What [`AnnouncementIndex::insert`] did with an announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Indexed {
    /// Remembered (or already known for the same source).
    Yes,
    /// A key was already claimed by another source: it is ambiguous now and attributes
    /// nothing (nobody may redirect another source's reports).
    Ambiguous,
    /// Neither a pubTime nor a usable identity: nothing to key it by.
    Unkeyed,
}

/// A bounded index from announcements to their source: the oldest entries are forgotten
/// first, so memory stays flat whatever the traffic.
///
/// A security boundary (SPEC §2): the caller passes the account that **posted** the
/// announcement as its source, never a field of the body. A key claimed by two different
/// sources becomes ambiguous for as long as it is remembered; a report whose keys disagree
/// (pubTime + name says one source, identity another) is attributed to neither.
#[derive(Debug)]
pub struct AnnouncementIndex {
    capacity: usize,
    /// `None`: ambiguous.
    map: HashMap<Key, Option<String>>,
    order: VecDeque<Key>,
}

impl AnnouncementIndex {
    pub fn new(capacity: usize) -> Self {
        AnnouncementIndex {
            capacity: capacity.max(1),
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn keys(pub_time: Option<Stamp>, rel_path: &str, identity: Option<&Identity>) -> Vec<Key> {
        let mut keys = Vec::with_capacity(2);
        if let Some(t) = pub_time {
            keys.push(Key::Time(t, file_name(rel_path).to_owned()));
        }
        // A checksum of nothing identifies nothing.
        if let Some(id) = identity.filter(|id| id.value.len() >= 8) {
            keys.push(Key::Identity(format!("{},{}", id.method, id.value)));
        }
        keys
    }

    /// Remembers that `source` (the account that posted `a`) announced it.
    pub fn insert(&mut self, a: &Announcement, source: &str) -> Indexed {
        let keys = Self::keys(a.pub_time, &a.rel_path, a.identity.as_ref());
        if keys.is_empty() {
            return Indexed::Unkeyed;
        }
        let mut outcome = Indexed::Yes;
        for k in keys {
            match self.map.get_mut(&k) {
                Some(Some(known)) if known == source => {}
                Some(slot) => {
                    *slot = None;
                    outcome = Indexed::Ambiguous;
                }
                None => {
                    self.map.insert(k.clone(), Some(source.to_owned()));
                    self.order.push_back(k);
                }
            }
        }
        while self.map.len() > self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        outcome
    }

    /// The source whose announcement `r` answers, when its keys agree on one.
    pub fn lookup(&self, r: &Report) -> Option<&str> {
        let mut found: Option<&str> = None;
        for k in Self::keys(r.pub_time, &r.rel_path, r.identity.as_ref()) {
            match self.map.get(&k) {
                None => {}
                Some(None) => return None,
                Some(Some(s)) => match found {
                    Some(f) if f != s => return None,
                    _ => found = Some(s),
                },
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Headers;
    use crate::core::report::{Format, Identity};

    fn re() -> Regex {
        Regex::new(DEFAULT_RELPATH_PATTERN).unwrap()
    }

    fn rep(user: Option<&str>, source: Option<&str>, exchange: &str, rel: &str) -> Report {
        Report {
            format: Format::V03,
            topic: String::new(),
            exchange: exchange.into(),
            pub_time: Stamp::parse("20240101T000000.5"),
            base_url: "http://h".into(),
            rel_path: rel.into(),
            code: 201,
            message: None,
            host: None,
            user: user.map(Into::into),
            duration_s: None,
            source: source.map(Into::into),
            from_cluster: None,
            to_clusters: vec![],
            flow: None,
            size_bytes: None,
            identity: Some(Identity {
                method: "sha512".into(),
                value: "abcdefgh12".into(),
            }),
            time_completed: None,
            stamped_client: None,
            stamped_source: None,
            extra: Headers::new(),
        }
    }

    fn accounts() -> Accounts {
        Accounts {
            sources: ["radar".to_owned(), "sat".to_owned()].into(),
            others: ["cfs".to_owned(), "edu".to_owned()].into(),
            clusters: Default::default(),
        }
    }

    fn attributor(accounts: Accounts) -> Attributor {
        Attributor::new(accounts, re())
    }

    #[test]
    fn client_rules_in_order() {
        let a = attributor(accounts());
        let c = |r: &Report, owner: Option<&str>, uid: Option<&str>| a.decide_client(r, owner, uid);
        assert_eq!(
            c(&rep(Some("u"), None, "", ""), Some("cfs"), None).as_deref(),
            Some("u")
        );
        assert_eq!(
            c(&rep(None, None, "", ""), Some("cfs"), Some("x")).as_deref(),
            Some("cfs")
        );
        assert_eq!(
            c(&rep(None, None, "", ""), None, Some("x")).as_deref(),
            Some("x")
        );
        assert_eq!(
            c(&rep(None, Some("edu"), "", ""), None, None).as_deref(),
            Some("edu")
        );
        assert_eq!(c(&rep(None, Some("radar"), "", ""), None, None), None);
        assert_eq!(c(&rep(Some(""), None, "", ""), Some(""), Some("")), None);
    }

    #[test]
    fn source_rules_in_order() {
        let a = attributor(accounts());
        let mut idx = AnnouncementIndex::new(10);
        // sr3 overwrote source with its own user and relPath with a local path.
        let r = rep(None, Some("cfs"), "xs_cfs", "/home/cfs/data/f.h5");
        assert_eq!(a.decide_source(&r, Some(&idx)), None);
        let ann = Announcement {
            format: Format::V03,
            topic: String::new(),
            pub_time: r.pub_time,
            base_url: "http://h".into(),
            rel_path: "20240101/sat/h5/f.h5".into(),
            source: Some("sat".into()),
            identity: None,
            size_bytes: None,
        };
        assert_eq!(idx.insert(&ann, "sat"), Indexed::Yes);
        assert_eq!(a.decide_source(&r, Some(&idx)).as_deref(), Some("sat"));
        assert_eq!(
            a.decide_source(&rep(None, Some("radar"), "", "x"), None)
                .as_deref(),
            Some("radar")
        );
        assert_eq!(
            a.decide_source(&rep(None, None, "", "20240101/radar/x"), None)
                .as_deref(),
            Some("radar")
        );
        assert_eq!(
            a.decide_source(&rep(None, None, "", "20240101/nobody/x"), None),
            None
        );
        // Without declared accounts the source value is believed.
        let open = attributor(Accounts::default());
        assert_eq!(
            open.decide_source(&rep(None, Some("zz"), "", "x"), None)
                .as_deref(),
            Some("zz")
        );
    }

    #[test]
    fn later_components_read_the_stamps_first_then_the_same_rules() {
        let a = attributor(accounts());
        let mut r = rep(Some("cfs"), None, "xreport", "20240101/radar/x.h5");
        r.stamped_client = Some("edu".into());
        r.stamped_source = Some("sat".into());
        assert_eq!(
            (a.client(&r, None), a.source(&r)),
            (Some("edu".into()), Some("sat".into()))
        );
        r.stamped_client = None;
        r.stamped_source = None;
        assert_eq!(
            (a.client(&r, None), a.source(&r)),
            (Some("cfs".into()), Some("radar".into()))
        );
        // sr3: no user, its own user in `source`, a local relPath.
        r.user = None;
        r.source = Some("cfs".into());
        r.rel_path = "/home/cfs/x.h5".into();
        assert_eq!(
            (a.client(&r, None), a.source(&r)),
            (Some("cfs".into()), None)
        );
        r.source = None;
        assert_eq!(a.client(&r, Some("uid")).as_deref(), Some("uid"));
        assert_eq!(a.client(&r, None), None);
        // An empty stamp is no stamp.
        r.stamped_client = Some(String::new());
        assert_eq!(a.client(&r, None), None);
    }

    #[test]
    fn index_is_bounded_oldest_first() {
        let mut idx = AnnouncementIndex::new(3);
        for i in 0..10 {
            let a = Announcement {
                format: Format::V02,
                topic: String::new(),
                pub_time: Stamp::from_unix(i, 0),
                base_url: String::new(),
                rel_path: format!("d/f{i}"),
                source: None,
                identity: None,
                size_bytes: None,
            };
            idx.insert(&a, &format!("s{i}"));
        }
        assert_eq!(idx.len(), 3);
        let mut r = rep(None, None, "", "x/f9");
        r.identity = None;
        r.pub_time = Stamp::from_unix(9, 0);
        assert_eq!(idx.lookup(&r), Some("s9"));
        r.rel_path = "x/f0".into();
        r.pub_time = Stamp::from_unix(0, 0);
        assert_eq!(idx.lookup(&r), None);
    }

    fn announcement(time: &str, rel: &str, id: Option<&str>) -> Announcement {
        Announcement {
            format: Format::V03,
            topic: String::new(),
            pub_time: Stamp::parse(time),
            base_url: "http://h".into(),
            rel_path: rel.into(),
            source: None,
            identity: id.map(|v| Identity {
                method: "sha512".into(),
                value: v.into(),
            }),
            size_bytes: None,
        }
    }

    #[test]
    fn a_key_claimed_by_two_sources_attributes_nothing() {
        let mut idx = AnnouncementIndex::new(100);
        let a = announcement(
            "20240101T000000.5",
            "20240101/radar/f.h5",
            Some("abcdefgh12"),
        );
        assert_eq!(idx.insert(&a, "radar"), Indexed::Yes);
        // The same announcement again, by the same source: still fine.
        assert_eq!(idx.insert(&a, "radar"), Indexed::Yes);
        let r = rep(None, Some("cfs"), "xs_cfs", "/local/f.h5");
        assert_eq!(idx.lookup(&r), Some("radar"));
        // Another source claims the same pubTime and file name.
        let b = announcement("20240101T000000.5", "elsewhere/f.h5", None);
        assert_eq!(idx.insert(&b, "sat"), Indexed::Ambiguous);
        assert_eq!(idx.lookup(&r), None);
        // Only the identity is claimed by another source: ambiguous too.
        let mut idx = AnnouncementIndex::new(100);
        idx.insert(&a, "radar");
        let c = announcement("20250101T000000", "x/other.h5", Some("abcdefgh12"));
        assert_eq!(idx.insert(&c, "sat"), Indexed::Ambiguous);
        assert_eq!(idx.lookup(&r), None);
    }

    #[test]
    fn keys_that_disagree_attribute_nothing() {
        let mut idx = AnnouncementIndex::new(100);
        idx.insert(&announcement("20240101T000000.5", "d/f.h5", None), "radar");
        idx.insert(
            &announcement("20250101T000000", "d/g.h5", Some("abcdefgh12")),
            "sat",
        );
        // pubTime + name point at radar, the identity at sat.
        assert_eq!(idx.lookup(&rep(None, None, "", "x/f.h5")), None);
        let mut only_time = rep(None, None, "", "x/f.h5");
        only_time.identity = None;
        assert_eq!(idx.lookup(&only_time), Some("radar"));
        assert_eq!(
            idx.insert(&announcement("", "d/h", None), "radar"),
            Indexed::Unkeyed
        );
    }
}
