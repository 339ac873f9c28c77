//! Broker URLs: parsing into what lapin needs, and redaction for anything we print.
//!
//! Why our own parser: lapin's would default an unknown host to `localhost` and leaves
//! the heartbeat off; we want errors that name the URL (redacted), a default vhost of
//! `/`, and heartbeats on unless the URL says otherwise.

use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use percent_encoding::percent_decode_str;

use super::error::AmqpError;

/// Heartbeat asked of the broker unless the URL has `?heartbeat=N`.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// A parsed broker URL.
#[derive(Clone)]
pub(crate) struct BrokerUrl {
    pub uri: AMQPUri,
    /// The URL as given, password replaced by `****`.
    pub redacted: String,
}

impl BrokerUrl {
    pub fn password(&self) -> &str {
        &self.uri.authority.userinfo.password
    }

    pub fn username(&self) -> &str {
        &self.uri.authority.userinfo.username
    }

    /// The password when scrubbing it from texts makes sense (see `error::scrub`).
    pub fn secret(&self) -> Option<&str> {
        let p = self.password();
        (p != self.username()).then_some(p)
    }
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// The URL with its password replaced by `****`: `amqp://user:****@host:5672/vhost`.
/// Works on text that does not parse as a URL too (the password is whatever follows the
/// first `:` of the part before the last `@`), so even a malformed URL never leaks.
pub fn redact_url(url: &str) -> String {
    let (prefix, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    // The user info ends at the LAST '@': a malformed URL's password may hold a raw
    // '@', '/', '?' or '#'. An '@' in the vhost then hides more than needed: safe side.
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!("{prefix}{}:****{}", &userinfo[..colon], &rest[at..]),
        None => url.to_owned(),
    }
}

fn decode(part: &str, what: &str, redacted: &str) -> Result<String, AmqpError> {
    percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| AmqpError::BadUrl(format!("{redacted}: {what} is not UTF-8 once decoded")))
}

/// Parses `amqp[s]://[user[:password]@]host[:port][/vhost][?heartbeat=N&...]`. The
/// vhost is percent-decoded (`%2f` is `/`); no or an empty path means `/`.
pub(crate) fn parse(url: &str) -> Result<BrokerUrl, AmqpError> {
    if !url.contains("://") {
        // Not shown: without `scheme://` we cannot tell which part is a password.
        return Err(AmqpError::BadUrl(
            "expected amqp[s]://user:password@host[:port]/vhost".to_owned(),
        ));
    }
    let redacted = redact_url(url);
    let bad = |reason: &str| AmqpError::BadUrl(format!("{redacted}: {reason}"));
    let parsed = url::Url::parse(url.trim()).map_err(|e| bad(&e.to_string()))?;
    let scheme = match parsed.scheme() {
        "amqp" => AMQPScheme::AMQP,
        "amqps" => AMQPScheme::AMQPS,
        other => return Err(bad(&format!("scheme must be amqp or amqps, not '{other}'"))),
    };
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad("no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = parsed.port().unwrap_or_else(|| scheme.default_port());
    let username = match parsed.username() {
        "" => "guest".to_owned(),
        u => decode(u, "user", &redacted)?,
    };
    let password = match parsed.password() {
        None => "guest".to_owned(),
        Some(p) => decode(p, "password", &redacted)?,
    };
    let vhost = match parsed.path().strip_prefix('/').unwrap_or(parsed.path()) {
        "" => "/".to_owned(),
        v => decode(v, "vhost", &redacted)?,
    };
    let mut query = AMQPQueryString {
        heartbeat: Some(DEFAULT_HEARTBEAT_SECS),
        ..AMQPQueryString::default()
    };
    for (key, value) in parsed.query_pairs() {
        let int = |v: &str| -> Result<u64, AmqpError> {
            v.parse()
                .map_err(|_| bad(&format!("{key} must be a number")))
        };
        match &*key {
            "heartbeat" => query.heartbeat = Some(int(&value)?.min(u16::MAX.into()) as u16),
            "frame_max" => query.frame_max = Some(int(&value)?.min(u32::MAX.into()) as u32),
            "channel_max" => query.channel_max = Some(int(&value)?.min(u16::MAX.into()) as u16),
            "connection_timeout" => query.connection_timeout = Some(int(&value)?),
            "auth_mechanism" => {
                query.auth_mechanism = Some(
                    value
                        .parse()
                        .map_err(|_| bad(&format!("unknown auth_mechanism '{value}'")))?,
                )
            }
            _ => {} // other clients' options (e.g. sr3's): ignored, as they do
        }
    }
    Ok(BrokerUrl {
        uri: AMQPUri {
            scheme,
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo { username, password },
                host,
                port,
            },
            vhost,
            query,
        },
        redacted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_table() {
        let cases = [
            ("amqp://bob:s3cret@h:5672/%2f", "amqp://bob:****@h:5672/%2f"),
            ("amqps://bob:p@ss/w?rd@h/v", "amqps://bob:****@h/v"),
            ("amqp://bob:pw@h/v@x", "amqp://bob:****@x"),
            // Ambiguous with a raw "/" in a password: over-redacted, never leaked.
            ("amqp://h:5672/v@x", "amqp://h:****@x"),
            ("amqp://h:5672/%2f", "amqp://h:5672/%2f"),
            ("amqp://bob@h/", "amqp://bob@h/"),
            ("not a url bob:pw@h", "not a url bob:****@h"),
            ("", ""),
        ];
        for (input, want) in cases {
            assert_eq!(redact_url(input), want, "{input}");
        }
    }

    #[test]
    fn parses_parts_and_defaults() {
        let u = parse("amqp://feeder:p%40ss@10.0.0.1:5673/%2f").unwrap();
        assert_eq!(u.username(), "feeder");
        assert_eq!(u.password(), "p@ss");
        assert_eq!(u.uri.authority.host, "10.0.0.1");
        assert_eq!(u.uri.authority.port, 5673);
        assert_eq!(u.uri.vhost, "/");
        assert_eq!(u.uri.query.heartbeat, Some(DEFAULT_HEARTBEAT_SECS));
        assert_eq!(u.redacted, "amqp://feeder:****@10.0.0.1:5673/%2f");

        let u = parse("amqps://broker.example").unwrap();
        assert_eq!(u.uri.authority.port, 5671);
        assert_eq!(u.uri.vhost, "/");
        assert_eq!(u.username(), "guest");

        let u = parse("amqp://h/pump%2Fa?heartbeat=30").unwrap();
        assert_eq!(u.uri.vhost, "pump/a");
        assert_eq!(u.uri.query.heartbeat, Some(30));

        assert_eq!(parse("amqp://h/").unwrap().uri.vhost, "/");
        assert_eq!(
            parse("amqp://[::1]:5672/v").unwrap().uri.authority.host,
            "::1"
        );
    }

    #[test]
    fn bad_urls_never_show_the_password() {
        for url in [
            "http://bob:s3cret@h/",
            "amqp://bob:s3cret@h:notaport/",
            "amqp://bob:s3cret@h/?heartbeat=x",
            "bob:s3cret",
        ] {
            let e = parse(url).unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, AmqpError::BadUrl(_)), "{url}: {text}");
            assert!(!text.contains("s3cret"), "{url}: {text}");
            assert!(!text.contains('\n'));
        }
    }
}
