//! Who is the client and whose product is it (SPEC §2), written once: [`Attributor`].
//!
//! `route` decides once, from the report, the exchange it was posted to and the
//! announcement index ([`Attributor::decide_client`], [`Attributor::decide_source`]), and
//! stamps `pumpwatch_client`/`pumpwatch_source`. Every later component (speedo, serve,
//! log's filters, watchdog, archive) asks [`Attributor::client`] / [`Attributor::source`],
//! which read the stamps first and fall back to the same rules (without the index) only for
//! reports that entered `xreport` another way; so `log --source X` and the speedometers
//! can never disagree about a report.

use super::report::{Announcement, Report};
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
    pub others: HashSet<String>,
}

impl Accounts {
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty() && self.others.is_empty()
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

/// A bounded index from announcements to their source: the oldest entries are forgotten
/// first, so memory stays flat whatever the traffic.
#[derive(Debug)]
pub struct AnnouncementIndex {
    capacity: usize,
    map: HashMap<Key, String>,
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

    /// Remembers whose product `a` is. Returns false when nothing could be keyed.
    pub fn insert(&mut self, a: &Announcement, source: &str) -> bool {
        let mut keys = Vec::with_capacity(2);
        if let Some(t) = a.pub_time {
            keys.push(Key::Time(t, file_name(&a.rel_path).to_owned()));
        }
        if let Some(id) = &a.identity {
            // A checksum of nothing identifies nothing.
            if id.value.len() >= 8 {
                keys.push(Key::Identity(format!("{},{}", id.method, id.value)));
            }
        }
        let any = !keys.is_empty();
        for k in keys {
            if self.map.insert(k.clone(), source.to_owned()).is_none() {
                self.order.push_back(k);
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
        any
    }

    pub fn lookup(&self, r: &Report) -> Option<&str> {
        if let Some(t) = r.pub_time
            && let Some(s) = self
                .map
                .get(&Key::Time(t, file_name(&r.rel_path).to_owned()))
        {
            return Some(s);
        }
        let id = r.identity.as_ref()?;
        self.map
            .get(&Key::Identity(format!("{},{}", id.method, id.value)))
            .map(String::as_str)
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
        assert!(idx.insert(&ann, "sat"));
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
}
