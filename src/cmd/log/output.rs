//! The three output modes of `log`: a readable line, a JSON object, the raw message.

use crate::core::Report;
use crate::core::attribution::Who;
use crate::core::report::{Identity, Incoming};
use crate::core::stamp::Stamp;
use crate::core::text;
use serde::Serialize;
use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    #[default]
    Text,
    Json,
    Raw,
}

/// The field escaped as one word (see [`text::field`]), or `-` when missing or empty.
fn or_dash(s: Option<&str>) -> Cow<'_, str> {
    match s.filter(|s| !s.is_empty()) {
        Some(s) => text::field(s),
        None => Cow::Borrowed("-"),
    }
}

/// `2015-06-01 13:57:01.345 201 anonymous@castor ec_cmc exp13 NRDPS/GIF/f.gif "Downloaded" v02.report.NRDPS.GIF`
///
/// Every field comes from the report, so every field is escaped ([`crate::core::text`]):
/// the line is always one line, without control or invisible characters, and each
/// unquoted field is one word (a space shows as `\x20`).
pub fn text_line(r: &Report, who: &Who) -> String {
    let time = r.pub_time.map(|t| {
        t.to_string()
            .replace('T', " ")
            .trim_end_matches('Z')
            .to_owned()
    });
    format!(
        "{} {} {}@{} {} {} {} {} {}",
        // Rendered from a parsed stamp (digits, `-`, `:`, `.`, one space): nothing to
        // escape, but escaped like the rest all the same.
        text::escape(time.as_deref().unwrap_or("-")),
        r.code,
        or_dash(who.client.as_deref()),
        or_dash(r.host.as_deref()),
        or_dash(who.source.as_deref()),
        or_dash(r.flow.as_deref()),
        or_dash(Some(&r.rel_path)),
        text::quoted(r.message.as_deref().unwrap_or("")),
        or_dash(Some(&r.topic))
    )
}

#[derive(Serialize)]
struct JsonReport<'a> {
    format: &'static str,
    topic: &'a str,
    exchange: &'a str,
    code: u16,
    code_class: &'static str,
    message: Option<&'a str>,
    pub_time: Option<Stamp>,
    time_completed: Option<Stamp>,
    base_url: &'a str,
    rel_path: &'a str,
    client: Option<&'a str>,
    host: Option<&'a str>,
    user: Option<&'a str>,
    source: Option<&'a str>,
    flow: Option<&'a str>,
    from_cluster: Option<&'a str>,
    to_clusters: &'a [String],
    size: Option<u64>,
    duration: Option<f64>,
    identity: Option<&'a Identity>,
    headers: &'a crate::core::Headers,
}

/// One JSON object: the normalised report, with `client`/`source` as attributed. Control,
/// bidi and invisible characters are `\u` escapes ([`text::json_safe`]), so the line is
/// safe on a terminal and means the same to a JSON reader.
pub fn json_line(r: &Report, who: &Who) -> String {
    let j = JsonReport {
        format: r.format.name(),
        topic: &r.topic,
        exchange: &r.exchange,
        code: r.code,
        code_class: crate::core::CodeClass::of(r.code).label(),
        message: r.message.as_deref(),
        pub_time: r.pub_time,
        time_completed: r.time_completed,
        base_url: &r.base_url,
        rel_path: &r.rel_path,
        client: who.client.as_deref(),
        host: r.host.as_deref(),
        user: r.user.as_deref(),
        source: who.source.as_deref(),
        flow: r.flow.as_deref(),
        from_cluster: r.from_cluster.as_deref(),
        to_clusters: &r.to_clusters,
        size: r.size_bytes,
        duration: r.duration_s,
        identity: r.identity.as_ref(),
        headers: &r.extra,
    };
    text::json_safe(&serde_json::to_string(&j).unwrap_or_default()).into_owned()
}

/// The message as received, as one JSON object: body as text when it is UTF-8, else
/// base64; escaped like [`json_line`].
pub fn raw_line(m: &Incoming<'_>) -> String {
    use base64::Engine;
    let mut j = serde_json::json!({
        "exchange": m.exchange,
        "topic": m.routing_key,
        "content_type": m.content_type,
        "user_id": m.user_id,
        "headers": super::headers_json(m.headers),
    });
    match std::str::from_utf8(m.body) {
        Ok(text) => j["body"] = text.into(),
        Err(_) => {
            j["body_base64"] = base64::engine::general_purpose::STANDARD
                .encode(m.body)
                .into()
        }
    }
    text::json_safe(&j.to_string()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Headers;
    use crate::core::report::{Message, parse};

    #[test]
    fn text_line_has_everything_a_reader_needs() {
        let h: Headers = [
            ("source", "ec_cmc"),
            ("flow", "exp13"),
            ("message", "Downloaded"),
        ]
        .into_iter()
        .collect();
        let body = b"20150601135701.345 sftp://h/f.gif NRDPS/GIF/f.gif 201 castor anonymous 0.1";
        let inc = Incoming {
            exchange: "xreport",
            routing_key: "v02.report.NRDPS.GIF",
            body,
            content_type: None,
            user_id: None,
            headers: &h,
        };
        let Ok(Message::Report(r)) = parse(&inc) else {
            panic!()
        };
        let who = crate::core::attribution::Attributor::default().who(&r, None);
        assert_eq!(
            text_line(&r, &who),
            r#"2015-06-01 13:57:01.345 201 anonymous@castor ec_cmc exp13 NRDPS/GIF/f.gif "Downloaded" v02.report.NRDPS.GIF"#
        );
        let j: serde_json::Value = serde_json::from_str(&json_line(&r, &who)).unwrap();
        for key in [
            "format",
            "topic",
            "exchange",
            "code",
            "message",
            "pub_time",
            "base_url",
            "rel_path",
            "client",
            "host",
            "source",
            "flow",
            "from_cluster",
            "to_clusters",
            "size",
            "duration",
            "identity",
        ] {
            assert!(j.get(key).is_some(), "missing {key}");
        }
        assert_eq!(j["identity"], serde_json::Value::Null);
        assert_eq!(j["client"], "anonymous");
        let raw: serde_json::Value = serde_json::from_str(&raw_line(&inc)).unwrap();
        assert_eq!(raw["headers"]["flow"], "exp13");
    }

    #[test]
    fn hostile_fields_never_forge_a_line_or_reach_the_terminal() {
        let evil = "x\n2015-06-01 13:57:01.345 201 admin@pump radar\r\x1b[2J\x1b]0;t\x07\0\u{9b}\u{202e}\u{2066}\u{200b}\x7f";
        let h: Headers = [
            ("source", evil),
            ("flow", evil),
            ("message", evil),
            ("from_cluster", evil),
        ]
        .into_iter()
        .collect();
        let enc = |s: &str| {
            s.replace(' ', "%20")
                .replace('\n', "%0A")
                .replace('\r', "%0D")
        };
        let body = format!(
            "20150601135701.345 sftp://h/f {} 499 {} {} 0.1",
            enc(evil),
            enc(evil),
            enc(evil)
        );
        let topic = format!("v02.report.{evil}");
        let inc = Incoming {
            exchange: "xreport",
            routing_key: &topic,
            body: body.as_bytes(),
            content_type: None,
            user_id: None,
            headers: &h,
        };
        let mut r = match parse(&inc) {
            Ok(Message::Report(r)) => r,
            other => panic!("{other:?}"),
        };
        // Whatever the parser kept, put the raw hostile text in every field.
        r.host = Some(evil.into());
        r.rel_path = evil.into();
        r.flow = Some(evil.into());
        r.message = Some(evil.into());
        let who = Who {
            client: Some(evil.into()),
            source: Some(evil.into()),
        };
        for line in [text_line(&r, &who), json_line(&r, &who), raw_line(&inc)] {
            assert!(
                !line.chars().any(|c| text::is_unsafe(c) || c == '\n'),
                "{line:?}"
            );
        }
        let line = text_line(&r, &who);
        // Ten fields: date, time, code, client@host, source, flow, relPath, "message"
        // (spaces kept inside its quotes), topic.
        let (head, rest) = line.split_once(" \"").unwrap();
        let (message, topic) = rest.rsplit_once("\" ").unwrap();
        assert_eq!(head.split(' ').count(), 7, "{line}");
        assert!(!topic.contains(' '), "{line}");
        assert_eq!(text::unescape(message).unwrap(), evil);
        assert_eq!(text::unescape(topic).unwrap(), r.topic);
        assert_eq!(
            text::unescape(head.split(' ').nth(6).unwrap()).unwrap(),
            evil
        );
    }
}
