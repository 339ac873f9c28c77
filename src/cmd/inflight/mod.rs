//! `pumpwatch inflight` (SPEC §4.9): asks a running `watchdog` what is in flight and
//! prints it: a table per node (node, state, in flight, oldest, last seen), then, when a
//! node is named (or `--older-than` given), its transfers oldest first. `--json` prints
//! the watchdog's answer as it came. Nothing listening, or an error answer: exit 1 with
//! one line.
//!
//! Every name and path in the table comes from reports, so every field is escaped
//! ([`text::field`]): a host name cannot forge a line, move the cursor or split a column.

use super::{Common, Error, UsageError, parse_duration};
use crate::core::text;
use crate::shutdown::Shutdown;
use serde::Deserialize;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// The watchdog's address [default: http:// + watchdog.listen, http://127.0.0.1:8090].
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Only this node, and list its transfers.
    #[arg(long, value_name = "HOST")]
    pub node: Option<String>,
    /// Only transfers open at least this long (seconds, or 5m, 1h), and list them.
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub older_than: Option<Duration>,
    /// Transfers listed at most [default: 1000].
    #[arg(long)]
    pub limit: Option<usize>,
    /// The watchdog's JSON answer instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Give up after this long [default: 10 s].
    #[arg(short = 't', long, value_name = "SECS", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// `http://host:port`, no trailing slash.
    pub url: String,
    pub node: Option<String>,
    pub older_than: Option<Duration>,
    pub limit: Option<usize>,
    pub json: bool,
    pub timeout: Duration,
}

impl Config {
    pub fn from_args(a: Args, common: &Common) -> Result<Config, UsageError> {
        let url = match a.url {
            Some(u) => u,
            None => format!("http://{}", common.file.watchdog_settings().listen),
        };
        let parsed =
            url::Url::parse(&url).map_err(|e| UsageError(format!("invalid --url {url:?}: {e}")))?;
        if parsed.scheme() != "http" {
            return Err(UsageError(format!(
                "invalid --url {url:?}: must start with http://"
            )));
        }
        if a.limit == Some(0) {
            return Err(UsageError::new("invalid --limit 0: must be at least 1"));
        }
        let timeout = a.timeout.unwrap_or(Duration::from_secs(10));
        if timeout.is_zero() {
            return Err(UsageError::new("invalid --timeout 0"));
        }
        Ok(Config {
            url: url.trim_end_matches('/').to_owned(),
            node: a.node,
            older_than: a.older_than,
            limit: a.limit,
            json: a.json,
            timeout,
        })
    }

    /// The request URL.
    pub fn request_url(&self) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(n) = &self.node {
            q.append_pair("node", n);
        }
        if let Some(d) = self.older_than {
            q.append_pair("older_than", &format!("{}", d.as_secs_f64()));
        }
        if let Some(l) = self.limit {
            q.append_pair("limit", &l.to_string());
        }
        let q = q.finish();
        if q.is_empty() {
            format!("{}/api/inflight", self.url)
        } else {
            format!("{}/api/inflight?{q}", self.url)
        }
    }
}

/// The parts of the watchdog's answer the table shows.
#[derive(Debug, Clone, Deserialize)]
pub struct Answer {
    pub at: String,
    pub nodes: Vec<Node>,
    pub transfers: Vec<Transfer>,
    pub matched: u64,
    pub truncated: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Node {
    pub host: String,
    pub state: String,
    pub in_flight: u64,
    pub stuck: u64,
    pub stale: u64,
    pub oldest_age_s: Option<i64>,
    pub last_seen: String,
    pub silent_s: i64,
    pub failed_at: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Transfer {
    pub host: String,
    pub client: String,
    pub state: String,
    #[serde(rename = "relPath")]
    pub rel_path: String,
    pub started: String,
    pub age_s: i64,
    pub format: String,
}

/// `pumpwatch inflight`: asks, prints.
pub async fn run(cfg: Config, _shutdown: Shutdown) -> Result<(), Error> {
    let body = fetch(&cfg).await?;
    let mut out = std::io::stdout().lock();
    if cfg.json {
        out.write_all(body.trim_end().as_bytes())?;
        out.write_all(b"\n")?;
    } else {
        let answer: Answer = serde_json::from_str(&body).map_err(|e| {
            Error::Failed(format!(
                "{} did not answer like a watchdog: {}",
                cfg.url,
                text::escape(&e.to_string())
            ))
        })?;
        let list = cfg.node.is_some() || cfg.older_than.is_some();
        out.write_all(render(&answer, list).as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

/// The answer's body, or why there is none.
pub async fn fetch(cfg: &Config) -> Result<String, Error> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(cfg.timeout)
        .build()
        .map_err(|e| Error::Failed(format!("cannot make an HTTP client: {e}")))?;
    let url = cfg.request_url();
    let fail = |e: reqwest::Error| {
        let why = if e.is_timeout() {
            format!("no answer within {:?}", cfg.timeout)
        } else if e.is_connect() {
            "nothing listening (is pumpwatch watchdog running?)".to_owned()
        } else {
            one_line(&text::error_chain(&e))
        };
        Error::Failed(format!("cannot reach the watchdog at {}: {why}", cfg.url))
    };
    let response = http.get(&url).send().await.map_err(fail)?;
    let status = response.status();
    let body = response.text().await.map_err(fail)?;
    if !status.is_success() {
        let mut why = one_line(&body);
        crate::core::topic::truncate_utf8(&mut why, 200);
        return Err(Error::Failed(format!(
            "the watchdog at {} answered {}: {why}",
            cfg.url,
            status.as_u16()
        )));
    }
    Ok(body)
}

fn one_line(s: &str) -> String {
    text::escape(s.trim()).into_owned()
}

/// `3 s`, `4 min`, `2 h 05`, `3 d 4 h`: an age at a glance.
pub fn age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86_400 => format!("{} h {:02}", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Rows as left-aligned columns, except those in `right` (numbers); two spaces between.
fn table(head: &[&str], rows: &[Vec<String>], right: &[usize]) -> String {
    let mut width: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            let last = i + 1 == cells.len();
            if right.contains(&i) {
                l.push_str(&" ".repeat(pad));
                l.push_str(c);
            } else {
                l.push_str(c);
                if !last {
                    l.push_str(&" ".repeat(pad));
                }
            }
            if !last {
                l.push_str("  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    let head: Vec<String> = head.iter().map(|s| s.to_string()).collect();
    line(&mut out, &head);
    for r in rows {
        line(&mut out, r);
    }
    out
}

/// The text `inflight` prints: the node table, then the transfers when `list`.
pub fn render(a: &Answer, list: bool) -> String {
    let mut out = String::new();
    if a.nodes.is_empty() {
        out.push_str("no nodes\n");
    } else {
        let rows: Vec<Vec<String>> = a
            .nodes
            .iter()
            .map(|n| {
                let mut state = text::field(&n.state).into_owned();
                if n.stuck > 0 {
                    let _ = write!(state, " ({} stuck)", n.stuck);
                }
                if n.stale > 0 && n.state != "failed" {
                    let _ = write!(state, " ({} stale)", n.stale);
                }
                vec![
                    text::field(&n.host).into_owned(),
                    state,
                    n.in_flight.to_string(),
                    n.oldest_age_s.map_or_else(|| "-".into(), age),
                    format!("{} ago ({})", age(n.silent_s), text::field(&n.last_seen)),
                ]
            })
            .collect();
        out.push_str(&table(
            &["NODE", "STATE", "IN FLIGHT", "OLDEST", "LAST SEEN"],
            &rows,
            &[2],
        ));
    }
    if list {
        out.push('\n');
        if a.transfers.is_empty() {
            out.push_str("no transfers\n");
        } else {
            let rows: Vec<Vec<String>> = a
                .transfers
                .iter()
                .map(|t| {
                    vec![
                        text::field(&t.started).into_owned(),
                        age(t.age_s),
                        text::field(&t.state).into_owned(),
                        text::field(&t.host).into_owned(),
                        text::field(&t.client).into_owned(),
                        text::field(&t.format).into_owned(),
                        text::field(&t.rel_path).into_owned(),
                    ]
                })
                .collect();
            out.push_str(&table(
                &[
                    "STARTED", "AGE", "STATE", "NODE", "CLIENT", "FORMAT", "RELPATH",
                ],
                &rows,
                &[1],
            ));
        }
        if a.truncated {
            let _ = writeln!(
                out,
                "({} of {} listed: --limit N for more)",
                a.transfers.len(),
                a.matched
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> Answer {
        serde_json::from_str(
            r#"{"at":"2026-01-01T00:00:10.000Z","gauges":{},"totals":{},
            "nodes":[
              {"host":"node1","state":"ok","in_flight":12,"stuck":0,"stale":0,"oldest":null,
               "oldest_age_s":75,"last_seen":"2026-01-01T00:00:09.000Z","silent_s":1,
               "failed_at":null,"recovered_at":null,"counts":{}},
              {"host":"evil\u001b[2J\nnode9 ok","state":"failed","in_flight":3,"stuck":0,
               "stale":3,"oldest_age_s":4000,"last_seen":"2026-01-01T00:00:00.000Z",
               "silent_s":10,"failed_at":"2026-01-01T00:00:08.000Z","counts":{}}],
            "transfers":[
              {"id":1,"host":"node1","client":"cfs","state":"open","relPath":"a b\rc.h5",
               "baseUrl":"x","pubTime":null,"started":"2026-01-01T00:00:00.000Z","age_s":10,
               "format":"v02","size":null}],
            "matched":4,"truncated":true}"#,
        )
        .unwrap()
    }

    #[test]
    fn every_field_is_escaped_and_columns_line_up() {
        let out = render(&answer(), true);
        assert!(!out.contains('\u{1b}') && !out.contains('\r'), "{out}");
        assert!(out.contains(r"evil\x1b[2J\nnode9\x20ok"), "{out}");
        assert!(out.contains(r"a\x20b\rc.h5"), "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 7, "{out}");
        assert!(lines[0].starts_with("NODE"));
        assert!(lines[1].contains("   12  1 min"), "{out}");
        assert!(lines[2].contains("failed  "), "{out}");
        assert_eq!(lines[6], "(1 of 4 listed: --limit N for more)");
        let no_list = render(&answer(), false);
        assert_eq!(no_list.lines().count(), 3);
    }

    #[test]
    fn ages() {
        assert_eq!(age(-3), "0 s");
        assert_eq!(age(59), "59 s");
        assert_eq!(age(61), "1 min");
        assert_eq!(age(3 * 3600 + 5 * 60), "3 h 05");
        assert_eq!(age(2 * 86_400 + 3600), "2 d 1 h");
    }

    #[test]
    fn request_urls() {
        let c = Config {
            url: "http://h:1".into(),
            node: Some("n 1&x".into()),
            older_than: Some(Duration::from_secs(90)),
            limit: Some(5),
            json: false,
            timeout: Duration::from_secs(1),
        };
        assert_eq!(
            c.request_url(),
            "http://h:1/api/inflight?node=n+1%26x&older_than=90&limit=5"
        );
    }
}
