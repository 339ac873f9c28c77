//! Broker URLs, parsed once: [`BrokerUrl`] carries the user, the password (never shown),
//! the vhost, TLS and the connection options, and displays itself redacted. [`redact`] is
//! the one redactor for any other text that may hold a URL with a password (errors the
//! broker echoes back, shovel URIs, a URL that did not parse).
//!
//! Why our own type: lapin's parser would default an unknown host to `localhost` and
//! leaves heartbeats off; `setup`, the management client, `log`, `serve` and the daemons
//! all need the user and the vhost; and every one of them prints the URL in errors. Parsed
//! once and carried in every command's `Config`, the defaults cannot disagree.
//!
//! Defaults (RabbitMQ's URI spec): no user at all means `guest`/`guest`; a user without a
//! password means an empty password; no path or an empty one means the vhost `/`; the
//! vhost is percent-decoded (`%2f` is `/`).
//!
//! **Several hosts** (the nodes of a RabbitMQ cluster): `amqp://u:p@h1:5672,h2:5673/vhost`,
//! the hosts separated by commas, each with its own port or the scheme's default. The
//! account, vhost and options are the same for all. Connections try the hosts in turn,
//! first to last on start and from the host after the lost one on reconnect
//! ([`BrokerUrl::hosts`], [`BrokerUrl::at`]).

use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use std::fmt;

/// The broker of SPEC §4 when none is given.
pub const DEFAULT_BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Heartbeat asked of the broker unless the URL has `?heartbeat=N`.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// What cannot be used in a broker URL; the text never holds the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid broker URL {shown}: {reason}")]
pub struct UrlError {
    /// The URL redacted, or a placeholder when even that could leak.
    pub shown: String,
    pub reason: String,
}

/// URL userinfo and path segments: everything but RFC 3986 unreserved characters.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A parsed `amqp[s]://user:password@host[:port][,host[:port]...][/vhost][?heartbeat=N&...]`.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    tls: bool,
    user: String,
    password: String,
    /// At least one; the first is where connections start.
    hosts: Vec<Host>,
    vhost: String,
    heartbeat: u16,
    frame_max: Option<u32>,
    channel_max: Option<u16>,
    connection_timeout: Option<u64>,
    auth_mechanism: Option<String>,
}

/// One node of the broker: a host name or address (IPv6 without brackets) and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub port: u16,
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.contains(':') {
            write!(f, "[{}]:{}", self.name, self.port)
        } else {
            write!(f, "{}:{}", self.name, self.port)
        }
    }
}

/// Splits a comma-separated host list out of `text`: the URL with only its first host,
/// and the others as written (`host[:port]`). Works on the raw text since the URL parser
/// would take `5672,h2:5673` for a bad port. The authority ends at the first `/`, `?` or
/// `#` (as for the URL parser) and its hosts start after its last `@`.
fn split_hosts(text: &str) -> (String, Vec<&str>) {
    let Some(i) = text.find("://") else {
        return (text.to_owned(), vec![]);
    };
    let start = i + 3;
    let rest = &text[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let hosts_at = authority.rfind('@').map_or(0, |a| a + 1);
    let list = &authority[hosts_at..];
    if !list.contains(',') {
        return (text.to_owned(), vec![]);
    }
    let mut entries = list.split(',');
    let first = entries.next().unwrap_or("");
    let one = format!(
        "{}{}{first}{}",
        &text[..start],
        &authority[..hosts_at],
        &rest[end..]
    );
    (one, entries.collect())
}

impl Default for BrokerUrl {
    fn default() -> Self {
        BrokerUrl::parse(DEFAULT_BROKER)
            .unwrap_or_else(|e| unreachable!("the default broker URL parses: {e}"))
    }
}

impl BrokerUrl {
    pub fn parse(text: &str) -> Result<BrokerUrl, UrlError> {
        let text = text.trim();
        if !text.contains("://") {
            // Not shown: without `scheme://` we cannot tell which part is a password.
            return Err(UrlError {
                shown: "(not shown)".into(),
                reason: "expected amqp[s]://user:password@host[:port]/vhost".into(),
            });
        }
        let shown = redact(text);
        let bad = |reason: String| UrlError {
            shown: shown.clone(),
            reason,
        };
        let (first, more) = split_hosts(text);
        let parsed = url::Url::parse(&first).map_err(|e| bad(e.to_string()))?;
        let tls = match parsed.scheme() {
            "amqp" => false,
            "amqps" => true,
            other => return Err(bad(format!("scheme must be amqp or amqps, not '{other}'"))),
        };
        let default_port = if tls { 5671 } else { 5672 };
        let host = |u: &url::Url| -> Result<Host, UrlError> {
            let name = u
                .host_str()
                .filter(|h| !h.is_empty())
                .ok_or_else(|| bad("no host".into()))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            Ok(Host {
                name,
                port: u.port().unwrap_or(default_port),
            })
        };
        let mut hosts = vec![host(&parsed)?];
        for entry in more {
            let entry = entry.trim();
            // Only `host[:port]`: a user, path or query here would be another URL's.
            if entry.is_empty() || entry.contains(['@', '/', '?', '#']) {
                return Err(bad(format!(
                    "hosts are separated by commas, each host[:port] ({:?} is not one)",
                    redact(entry)
                )));
            }
            let u = url::Url::parse(&format!("{}://{entry}", parsed.scheme()))
                .map_err(|e| bad(format!("host {entry:?}: {e}")))?;
            let h = host(&u)?;
            if hosts.contains(&h) {
                return Err(bad(format!("host {h} is listed twice")));
            }
            hosts.push(h);
        }
        let decode = |part: &str, what: &str| -> Result<String, UrlError> {
            percent_decode_str(part)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| bad(format!("{what} is not UTF-8 once percent-decoded")))
        };
        let (user, password) = match parsed.username() {
            "" => ("guest".to_owned(), "guest".to_owned()),
            u => (
                decode(u, "the user")?,
                decode(parsed.password().unwrap_or(""), "the password")?,
            ),
        };
        let vhost = match parsed.path().strip_prefix('/').unwrap_or(parsed.path()) {
            "" => "/".to_owned(),
            v => decode(v, "the vhost")?,
        };
        let mut url = BrokerUrl {
            tls,
            user,
            password,
            hosts,
            vhost,
            heartbeat: DEFAULT_HEARTBEAT_SECS,
            frame_max: None,
            channel_max: None,
            connection_timeout: None,
            auth_mechanism: None,
        };
        for (key, value) in parsed.query_pairs() {
            let int = |v: &str| -> Result<u64, UrlError> {
                v.parse()
                    .map_err(|_| bad(format!("{key} must be a number")))
            };
            match &*key {
                "heartbeat" => url.heartbeat = int(&value)?.min(u16::MAX.into()) as u16,
                "frame_max" => url.frame_max = Some(int(&value)?.min(u32::MAX.into()) as u32),
                "channel_max" => url.channel_max = Some(int(&value)?.min(u16::MAX.into()) as u16),
                "connection_timeout" => url.connection_timeout = Some(int(&value)?),
                "auth_mechanism" => {
                    let known = AMQPQueryString {
                        auth_mechanism: value.parse().ok(),
                        ..AMQPQueryString::default()
                    };
                    if known.auth_mechanism.is_none() {
                        return Err(bad(format!("unknown auth_mechanism '{value}'")));
                    }
                    url.auth_mechanism = Some(value.into_owned());
                }
                _ => {} // other clients' options (e.g. sr3's): ignored, as they do
            }
        }
        Ok(url)
    }

    /// The account this URL logs in as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The password; only for handing to the broker (never print it).
    pub fn password(&self) -> &str {
        &self.password
    }

    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    /// The first host (where connections start).
    pub fn host(&self) -> &str {
        &self.hosts[0].name
    }

    /// The first host's port.
    pub fn port(&self) -> u16 {
        self.hosts[0].port
    }

    /// Every host, in the order connections try them (at least one).
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The same URL with only host `i` (modulo the number of hosts): one connection
    /// attempt's target.
    pub fn at(&self, i: usize) -> BrokerUrl {
        BrokerUrl {
            hosts: vec![self.hosts[i % self.hosts.len()].clone()],
            ..self.clone()
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The heartbeat to ask of the broker, in seconds (0: none).
    pub fn heartbeat(&self) -> u16 {
        self.heartbeat
    }

    /// The same broker and options as another account.
    pub fn with_credentials(&self, user: &str, password: &str) -> BrokerUrl {
        BrokerUrl {
            user: user.to_owned(),
            password: password.to_owned(),
            ..self.clone()
        }
    }

    /// The same broker and account on another vhost.
    pub fn with_vhost(&self, vhost: &str) -> BrokerUrl {
        BrokerUrl {
            vhost: vhost.to_owned(),
            ..self.clone()
        }
    }

    /// The full URL **with the password**, for the few places that must hand it on (a
    /// shovel definition stored in the broker). Never log it.
    pub fn expose_password(&self) -> String {
        self.render(Some(&self.password))
    }

    /// `scheme://user:<password or ****>@host:port/vhost[?options]`, every part encoded.
    fn render(&self, password: Option<&str>) -> String {
        let enc = |s: &str| utf8_percent_encode(s, COMPONENT).to_string();
        let hosts: Vec<String> = self.hosts.iter().map(Host::to_string).collect();
        let secret = match password {
            Some(p) => enc(p),
            None => "****".to_owned(),
        };
        let mut s = format!(
            "{}://{}:{secret}@{}/{}",
            if self.tls { "amqps" } else { "amqp" },
            enc(&self.user),
            hosts.join(","),
            enc(&self.vhost)
        );
        let mut query = Vec::new();
        if self.heartbeat != DEFAULT_HEARTBEAT_SECS {
            query.push(format!("heartbeat={}", self.heartbeat));
        }
        if let Some(v) = self.frame_max {
            query.push(format!("frame_max={v}"));
        }
        if let Some(v) = self.channel_max {
            query.push(format!("channel_max={v}"));
        }
        if let Some(v) = self.connection_timeout {
            query.push(format!("connection_timeout={v}"));
        }
        if let Some(v) = &self.auth_mechanism {
            query.push(format!("auth_mechanism={}", enc(v)));
        }
        if !query.is_empty() {
            s.push('?');
            s.push_str(&query.join("&"));
        }
        s
    }

    /// What lapin connects with: the first host (see [`at`](Self::at) for the others).
    pub(crate) fn amqp_uri(&self) -> AMQPUri {
        AMQPUri {
            scheme: if self.tls {
                AMQPScheme::AMQPS
            } else {
                AMQPScheme::AMQP
            },
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo {
                    username: self.user.clone(),
                    password: self.password.clone(),
                },
                host: self.hosts[0].name.clone(),
                port: self.hosts[0].port,
            },
            vhost: self.vhost.clone(),
            query: AMQPQueryString {
                heartbeat: Some(self.heartbeat),
                frame_max: self.frame_max,
                channel_max: self.channel_max,
                connection_timeout: self.connection_timeout,
                auth_mechanism: self.auth_mechanism.as_deref().and_then(|m| m.parse().ok()),
            },
        }
    }

    /// The password when scrubbing it from free texts makes sense: not empty and not the
    /// user name (scrubbing that would mangle every message naming the user).
    pub(crate) fn secret(&self) -> Option<&str> {
        (!self.password.is_empty() && self.password != self.user).then_some(&self.password)
    }
}

/// The URL with the password as `****`: safe to print.
impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(None))
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for BrokerUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BrokerUrl::parse(s)
    }
}

/// Replaces the password of every `scheme://user:password@host` in `text` with `****`.
///
/// Works on anything, also text that does not parse as a URL: the user info of a URL is
/// taken to end at the **last** `@` before the next whitespace or quote, so a password
/// holding a raw `@`, `/`, `:`, `?`, `#` or `%` is hidden whole. The price is that an `@`
/// later in the same word (in a path) hides a little more than needed: the safe side.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let start = i + 3;
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let end = rest
            .find(|c: char| matches!(c, '"' | '\'' | '<' | '>' | '`') || c.is_whitespace())
            .unwrap_or(rest.len());
        let word = &rest[..end];
        match word.rfind('@') {
            Some(at) => {
                let userinfo = &word[..at];
                match userinfo.find(':') {
                    // `://` inside the user info is another URL's start: leave it to the
                    // next round rather than swallow it.
                    Some(colon) if !userinfo[..colon].contains("://") => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":****");
                        out.push_str(&word[at..]);
                    }
                    _ => out.push_str(word),
                }
            }
            None => out.push_str(word),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parts_and_defaults() {
        let u = BrokerUrl::parse("amqp://feeder:p%40ss@10.0.0.1:5673/%2f").unwrap();
        assert_eq!(
            (u.user(), u.password(), u.host(), u.port(), u.vhost()),
            ("feeder", "p@ss", "10.0.0.1", 5673, "/")
        );
        assert_eq!(u.to_string(), "amqp://feeder:****@10.0.0.1:5673/%2F");
        let u = BrokerUrl::parse("amqps://broker.example").unwrap();
        assert_eq!(
            (u.port(), u.vhost(), u.user(), u.password()),
            (5671, "/", "guest", "guest")
        );
        assert!(u.is_tls());
        // A user without a password has an empty one (not guest's).
        let u = BrokerUrl::parse("amqp://bob@h/").unwrap();
        assert_eq!((u.user(), u.password()), ("bob", ""));
        let u = BrokerUrl::parse("amqp://h/pump%2Fa?heartbeat=30").unwrap();
        assert_eq!((u.vhost(), u.heartbeat), ("pump/a", 30));
        assert_eq!(
            u.to_string(),
            "amqp://guest:****@h:5672/pump%2Fa?heartbeat=30"
        );
        assert_eq!(
            BrokerUrl::parse("amqp://[::1]:5672/v").unwrap().host(),
            "::1"
        );
        assert_eq!(BrokerUrl::default().vhost(), "/");
    }

    #[test]
    fn several_hosts_table() {
        let h = |name: &str, port: u16| Host {
            name: name.into(),
            port,
        };
        let ok: &[(&str, &[Host], &str, &str)] = &[
            (
                "amqp://u:p@h1:5672,h2:5673/v",
                &[h("h1", 5672), h("h2", 5673)],
                "v",
                "amqp://u:****@h1:5672,h2:5673/v",
            ),
            (
                "amqp://u:p@h1,h2,h3",
                &[h("h1", 5672), h("h2", 5672), h("h3", 5672)],
                "/",
                "amqp://u:****@h1:5672,h2:5672,h3:5672/%2F",
            ),
            (
                "amqps://u:p%2C@a:5671,b:6671/%2f?heartbeat=5",
                &[h("a", 5671), h("b", 6671)],
                "/",
                "amqps://u:****@a:5671,b:6671/%2F?heartbeat=5",
            ),
            (
                "amqp://[::1]:5672,127.0.0.1:5673/v",
                &[h("::1", 5672), h("127.0.0.1", 5673)],
                "v",
                "amqp://guest:****@[::1]:5672,127.0.0.1:5673/v",
            ),
            (
                "amqp://u:p@h1:5672, h2:5673/v",
                &[h("h1", 5672), h("h2", 5673)],
                "v",
                "amqp://u:****@h1:5672,h2:5673/v",
            ),
            (
                "amqp://h/v",
                &[h("h", 5672)],
                "v",
                "amqp://guest:****@h:5672/v",
            ),
        ];
        for (text, hosts, vhost, shown) in ok {
            let u = BrokerUrl::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(u.hosts(), *hosts, "{text}");
            assert_eq!(u.vhost(), *vhost, "{text}");
            assert_eq!(u.to_string(), *shown, "{text}");
            assert_eq!(
                (u.host(), u.port()),
                (hosts[0].name.as_str(), hosts[0].port)
            );
            // Round trip, and each host alone keeps everything else.
            assert_eq!(&BrokerUrl::parse(&u.expose_password()).unwrap(), &u);
            for (i, want) in hosts.iter().enumerate() {
                let one = u.at(i);
                assert_eq!(one.hosts(), std::slice::from_ref(want));
                assert_eq!(
                    (one.user(), one.password(), one.vhost()),
                    (u.user(), u.password(), u.vhost())
                );
                assert_eq!(one.amqp_uri().authority.host, want.name);
            }
            assert_eq!(u.at(hosts.len()), u.at(0));
        }
        let u = BrokerUrl::parse("amqp://u:p%2C@a:5671,b:6671/v").unwrap();
        assert_eq!(u.password(), "p,");
        for bad in [
            "amqp://u:s3cret@h1,,h2/v",
            "amqp://u:s3cret@h1,/v",
            "amqp://u:s3cret@h1,h2:x/v",
            "amqp://u:s3cret@h1,h1/v",
            "amqp://u:s3cret@h1:5672,h1/v",
            "amqp://u:s3cret@,h2/v",
        ] {
            let e = BrokerUrl::parse(bad).expect_err(bad).to_string();
            assert!(!e.contains("s3cret"), "{bad}: {e}");
        }
    }

    #[test]
    fn passwords_with_separators_round_trip_and_never_show() {
        for pw in ["a/b", "a@b", "a:b", "a%b", "p@ss/w:rd%25", "/@:%", "x y"] {
            let url = format!("amqp://bob:{}@h:5672/v", utf8_percent_encode(pw, COMPONENT));
            let u = BrokerUrl::parse(&url).unwrap();
            assert_eq!(u.password(), pw, "{url}");
            let shown = u.to_string();
            assert_eq!(shown, "amqp://bob:****@h:5672/v");
            assert_eq!(BrokerUrl::parse(&u.expose_password()).unwrap(), u);
            if pw.contains(' ') {
                continue; // a raw space cannot be told from the text around a URL
            }
            // The same password written raw (not encoded), as people do: never printed.
            let raw = format!("amqp://bob:{pw}@h:5672/v");
            let r = redact(&raw);
            assert!(!r.contains(&format!(":{pw}@")), "{raw} -> {r}");
            if let Err(e) = BrokerUrl::parse(&raw) {
                assert!(!e.to_string().contains(&format!(":{pw}")), "{e}");
            }
        }
    }

    #[test]
    fn redaction_table() {
        let cases = [
            ("amqp://bob:s3cret@h:5672/%2f", "amqp://bob:****@h:5672/%2f"),
            ("amqps://bob:p@ss/w?rd@h/v", "amqps://bob:****@h/v"),
            ("amqp://u:a:b@c@h/v", "amqp://u:****@h/v"),
            ("amqp://u:@h", "amqp://u:****@h"),
            ("amqp://h:5672/%2f", "amqp://h:5672/%2f"),
            ("amqp://bob@h/", "amqp://bob@h/"),
            ("http://127.0.0.1:15672", "http://127.0.0.1:15672"),
            ("not a url", "not a url"),
            ("", ""),
            (
                r#"bad uri "amqp://feeder:hunter2@a/x" and <<"amqps://b:pw@b:5671">> ok"#,
                r#"bad uri "amqp://feeder:****@a/x" and <<"amqps://b:****@b:5671">> ok"#,
            ),
            ("é amqp://ü:ö@h é", "é amqp://ü:****@h é"),
        ];
        for (input, want) in cases {
            assert_eq!(redact(input), want, "{input}");
        }
    }

    #[test]
    fn bad_urls_never_show_the_password() {
        for url in [
            "http://bob:s3cret@h/",
            "amqp://bob:s3cret@h:notaport/",
            "amqp://bob:s3cret@h/?heartbeat=x",
            "bob:s3cret",
            "amqp://bob:s3cret@[bad/",
            "amqp://bob:s3/cret@h/",
        ] {
            match BrokerUrl::parse(url) {
                Err(e) => {
                    let text = e.to_string();
                    assert!(
                        !text.contains("s3cret") && !text.contains("s3/cret"),
                        "{url}: {text}"
                    );
                    assert!(!text.contains('\n'));
                }
                Ok(u) => assert!(!u.to_string().contains("cret"), "{url}"),
            }
        }
    }

    proptest! {
        #[test]
        fn any_password_is_hidden(pw in "[ -~]{1,24}", user in "[a-z]{1,8}") {
            // A password that is part of what is shown anyway (`c:` for user `c`) proves nothing.
            prop_assume!(!format!("amqp://{user}:****@h:5672/v").contains(&pw));
            let encoded = format!("amqp://{user}:{}@h:5672/v", utf8_percent_encode(&pw, COMPONENT));
            let u = BrokerUrl::parse(&encoded).unwrap();
            prop_assert_eq!(u.password(), pw.as_str());
            prop_assert!(!u.to_string().contains(&pw));
            let secret = format!(":{}@", utf8_percent_encode(&pw, COMPONENT));
            prop_assert!(!redact(&encoded).contains(&secret));
        }
    }
}
