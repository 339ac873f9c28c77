//! From a report to what a speedo counts: client, source, code, size. Attribution happens
//! once (SPEC §2): the `pumpwatch_client`/`pumpwatch_source` stamps of `route` are read
//! first; the fallback rules (without the announcement index) are only for reports that
//! entered `xreport` another way. Who cannot be told is counted as [`UNKNOWN`]: admins see
//! those in `xreport` (and `route` rejects them), so the pump's totals still add up.

use super::meter::{Sample, UNKNOWN};
use crate::config::Config;
use crate::core::attribution::{self, Accounts};
use crate::core::report::Report;
use regex::Regex;

/// The attribution rules a speedo needs, built once from the configuration.
#[derive(Debug, Clone)]
pub struct Attributor {
    accounts: Accounts,
    relpath: Regex,
}

impl Attributor {
    pub fn new(config: &Config) -> Attributor {
        Attributor {
            accounts: config.accounts(),
            relpath: config.route.relpath_pattern.clone(),
        }
    }

    /// The stamp, else the report's user field, else the fallbacks of SPEC §2.
    pub fn client(&self, r: &Report, user_id: Option<&str>) -> String {
        match attribution::client_of(r) {
            Some(c) if !c.is_empty() => c.to_owned(),
            _ => attribution::client(r, user_id, &self.accounts)
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| UNKNOWN.to_owned()),
        }
    }

    /// The stamp, else a declared source named in the report, else the relPath pattern.
    pub fn source(&self, r: &Report) -> String {
        match r.stamped_source.as_deref() {
            Some(s) if !s.is_empty() => s.to_owned(),
            _ => attribution::source(r, &self.accounts, None, &self.relpath)
                .unwrap_or_else(|| UNKNOWN.to_owned()),
        }
    }

    /// Calls `f` with the sample of `r` (borrowing the names where they can be borrowed).
    pub fn with_sample<T>(
        &self,
        r: &Report,
        user_id: Option<&str>,
        f: impl FnOnce(&Sample<'_>) -> T,
    ) -> T {
        let client = self.client(r, user_id);
        let source = self.source(r);
        f(&Sample {
            client: &client,
            source: &source,
            code: r.code,
            bytes: r.size_bytes.unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Headers;
    use crate::core::report::Format;

    fn report() -> Report {
        Report {
            format: Format::V02,
            topic: "v02.report.a".into(),
            exchange: "xreport".into(),
            pub_time: None,
            base_url: "http://h".into(),
            rel_path: "20240101/radar/x.h5".into(),
            code: 201,
            message: None,
            host: None,
            user: None,
            duration_s: None,
            source: None,
            from_cluster: None,
            to_clusters: vec![],
            flow: None,
            size_bytes: Some(5),
            identity: None,
            time_completed: None,
            stamped_client: None,
            stamped_source: None,
            extra: Headers::new(),
        }
    }

    fn config() -> Config {
        Config::parse(
            "[users.radar]\nrole = \"source\"\n[users.cfs]\nrole = \"subscriber\"\n",
            "t.toml",
        )
        .unwrap()
    }

    #[test]
    fn stamps_first_then_fallbacks_then_unknown() {
        let a = Attributor::new(&config());
        let mut r = report();
        r.stamped_client = Some("edu".into());
        r.stamped_source = Some("sat".into());
        r.user = Some("cfs".into());
        assert_eq!(
            (a.client(&r, None), a.source(&r)),
            ("edu".into(), "sat".into())
        );
        r.stamped_client = None;
        r.stamped_source = None;
        // user field; relPath pattern (a declared source).
        assert_eq!(
            (a.client(&r, None), a.source(&r)),
            ("cfs".into(), "radar".into())
        );
        // sr3: no user, its own user in `source`.
        r.user = None;
        r.source = Some("cfs".into());
        r.rel_path = "/home/cfs/x.h5".into();
        assert_eq!(
            (a.client(&r, None), a.source(&r)),
            ("cfs".into(), UNKNOWN.into())
        );
        r.source = None;
        assert_eq!(a.client(&r, Some("uid")), "uid");
        assert_eq!(a.client(&r, None), UNKNOWN);
        let n = a.with_sample(&r, None, |s| (s.code, s.bytes, s.client.to_owned()));
        assert_eq!(n, (201, 5, UNKNOWN.to_owned()));
    }
}
