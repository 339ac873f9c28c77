//! Who is the client and whose product is it (SPEC §2). `route` decides once and stamps
//! `pumpwatch_client`/`pumpwatch_source`; everything later reads the stamps first and falls
//! back to these rules (without the announcement index) only for reports that entered
//! `xreport` another way.

use super::report::{Announcement, Report};
use super::stamp::Stamp;
use regex::Regex;
use std::collections::{HashMap, HashSet, VecDeque};

/// The client as later components see it: the stamp, else the report's own user field.
pub fn client_of(r: &Report) -> Option<&str> {
    r.stamped_client.as_deref().or(r.user.as_deref())
}

/// The source as later components see it: the stamp, else the report's `source` value.
pub fn source_of(r: &Report) -> Option<&str> {
    r.stamped_source.as_deref().or(r.source.as_deref())
}

/// The owner of a per-user exchange `xs_<user>`.
pub fn exchange_owner(exchange: &str) -> Option<&str> {
    exchange.strip_prefix("xs_").filter(|u| !u.is_empty())
}

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

/// SPEC §2 "Who is the client?": the report's own user field, else the owner of the
/// `xs_<user>` exchange it was posted to, else the AMQP `user_id`, else a `source` value
/// naming a declared non-source account (sr3 puts its own user there).
pub fn client(r: &Report, user_id: Option<&str>, accounts: &Accounts) -> Option<String> {
    r.user
        .as_deref()
        .or_else(|| exchange_owner(&r.exchange))
        .or(user_id.filter(|u| !u.is_empty()))
        .or_else(|| r.source.as_deref().filter(|s| accounts.others.contains(*s)))
        .map(str::to_owned)
}

/// SPEC §2 "Whose product is it?", with the index when `route` has one.
pub fn source(
    r: &Report,
    accounts: &Accounts,
    index: Option<&AnnouncementIndex>,
    relpath: &Regex,
) -> Option<String> {
    if let Some(s) = r.source.as_deref().filter(|s| accounts.is_source(s)) {
        return Some(s.to_owned());
    }
    if let Some(s) = index.and_then(|i| i.lookup(r)) {
        return Some(s.to_owned());
    }
    source_from_path(&r.rel_path, relpath).filter(|s| accounts.is_source(s))
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
        Regex::new(crate::config::DEFAULT_RELPATH_PATTERN).unwrap()
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

    #[test]
    fn client_rules_in_order() {
        let a = accounts();
        assert_eq!(
            client(&rep(Some("u"), None, "xs_cfs", ""), None, &a).as_deref(),
            Some("u")
        );
        assert_eq!(
            client(&rep(None, None, "xs_cfs", ""), Some("x"), &a).as_deref(),
            Some("cfs")
        );
        assert_eq!(
            client(&rep(None, None, "xreport", ""), Some("x"), &a).as_deref(),
            Some("x")
        );
        assert_eq!(
            client(&rep(None, Some("edu"), "xreport", ""), None, &a).as_deref(),
            Some("edu")
        );
        assert_eq!(
            client(&rep(None, Some("radar"), "xreport", ""), None, &a),
            None
        );
    }

    #[test]
    fn source_rules_in_order() {
        let a = accounts();
        let mut idx = AnnouncementIndex::new(10);
        // sr3 overwrote source with its own user and relPath with a local path.
        let r = rep(None, Some("cfs"), "xs_cfs", "/home/cfs/data/f.h5");
        assert_eq!(source(&r, &a, Some(&idx), &re()), None);
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
        assert_eq!(source(&r, &a, Some(&idx), &re()).as_deref(), Some("sat"));
        assert_eq!(
            source(&rep(None, Some("radar"), "", "x"), &a, None, &re()).as_deref(),
            Some("radar")
        );
        assert_eq!(
            source(&rep(None, None, "", "20240101/radar/x"), &a, None, &re()).as_deref(),
            Some("radar")
        );
        assert_eq!(
            source(&rep(None, None, "", "20240101/nobody/x"), &a, None, &re()),
            None
        );
        // Without declared accounts the source value is believed.
        assert_eq!(
            source(
                &rep(None, Some("zz"), "", "x"),
                &Accounts::default(),
                None,
                &re()
            )
            .as_deref(),
            Some("zz")
        );
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
