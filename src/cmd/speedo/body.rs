//! A speedo message on the wire (SPEC §4.5): the topic names what it measures, the
//! `source`/`client` headers say the same without topic-word ambiguity, and the body is
//! eight space-separated fields. Pure, so `speedo` writes and `serve` reads with the same
//! code, and the round trip is a property test.
//!
//! ```text
//! topic   v01.speedo.client.cfs              headers client=cfs
//! body    20240101120000.500 300 100 3000000 1000000 30000 3 0.500
//!         <end> <good> <errors> <goodbytes> <badbytes> <bytes/interval> <files/interval> <interval s>
//! ```

use crate::core::emit::Outgoing;
use crate::core::lag::LagHeaders;
use crate::core::report::Incoming;
use crate::core::stamp::Stamp;
use crate::core::topic::{MAX_SHORT, decode_word, encode_word, truncate_utf8, truncated};
use crate::core::{HeaderValue, Headers};
use serde::Serialize;
use std::fmt;

/// Every speedo topic starts with this.
pub const PREFIX: &str = "v01.speedo.";
/// The topic word of the totals.
pub const ALL: &str = "all";
/// Header naming the client a speedo is about.
pub const H_CLIENT: &str = "client";
/// Header naming the source a speedo is about, or whose products it counts.
pub const H_SOURCE: &str = "source";

/// What a speedo measures.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum Subject {
    /// `v01.speedo.client.<name>`: one client (on `xr_<s>`: its transfers of s's products).
    Client(String),
    /// `v01.speedo.source.<name>`: every transfer of one source's products.
    Source(String),
    /// `v01.speedo.client.all`: every client (on `xr_<s>`: over s's products only).
    AllClients,
    /// `v01.speedo.source.all`: every source.
    AllSources,
}

impl Subject {
    /// The routing key, each name encoded as a topic word and cut to 255 bytes.
    pub fn topic(&self) -> String {
        let (kind, name) = match self {
            Subject::Client(n) => ("client", n.as_str()),
            Subject::Source(n) => ("source", n.as_str()),
            Subject::AllClients => ("client", ALL),
            Subject::AllSources => ("source", ALL),
        };
        let mut t = String::with_capacity(PREFIX.len() + kind.len() + 1 + name.len());
        t.push_str(PREFIX);
        t.push_str(kind);
        t.push('.');
        encode_word(name, &mut t);
        truncate_utf8(&mut t, MAX_SHORT);
        t
    }
}

/// One reading: the body of a speedo message.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Reading {
    /// End of the interval (UTC; millisecond precision on the wire).
    pub end: Stamp,
    /// Good (2xx/3xx) reports since this speedo started.
    pub good: u64,
    /// Error (4xx/5xx) reports since this speedo started.
    pub errors: u64,
    /// Bytes of the good reports since this speedo started.
    pub good_bytes: u64,
    /// Bytes of the failed reports since this speedo started.
    pub bad_bytes: u64,
    /// Good bytes within this interval.
    pub interval_bytes: u64,
    /// Good files within this interval.
    pub interval_files: u64,
    /// The interval's length in seconds.
    pub interval_s: f64,
}

impl fmt::Display for Reading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {} {} {} {} {:.3}",
            self.end.v02(),
            self.good,
            self.errors,
            self.good_bytes,
            self.bad_bytes,
            self.interval_bytes,
            self.interval_files,
            self.interval_s
        )
    }
}

/// Why a speedo body or message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpeedoError {
    #[error("not a speedo topic: {0:?}")]
    Topic(String),
    #[error("speedo body is not UTF-8")]
    NotUtf8,
    #[error("speedo body has {0} fields, expected 8")]
    Fields(usize),
    #[error("invalid speedo {field}: {value:?}")]
    Invalid { field: &'static str, value: String },
}

fn invalid(field: &'static str, value: &str) -> SpeedoError {
    SpeedoError::Invalid {
        field,
        value: truncated(value, 40).to_owned(),
    }
}

impl Reading {
    /// Parses a body: exactly eight fields separated by white space.
    pub fn parse(text: &str) -> Result<Reading, SpeedoError> {
        let mut f = [""; 8];
        let mut n = 0;
        for w in text.split_ascii_whitespace() {
            if n < 8 {
                f[n] = w;
            }
            n += 1;
        }
        if n != 8 {
            return Err(SpeedoError::Fields(n));
        }
        let count = |i: usize, field: &'static str| -> Result<u64, SpeedoError> {
            f[i].parse().map_err(|_| invalid(field, f[i]))
        };
        let interval_s: f64 = f[7].parse().map_err(|_| invalid("interval", f[7]))?;
        if !(interval_s.is_finite() && interval_s >= 0.0) {
            return Err(invalid("interval", f[7]));
        }
        Ok(Reading {
            end: Stamp::parse(f[0]).ok_or_else(|| invalid("datetime", f[0]))?,
            good: count(1, "goodcount")?,
            errors: count(2, "errorcount")?,
            good_bytes: count(3, "goodbytecount")?,
            bad_bytes: count(4, "badbytecount")?,
            interval_bytes: count(5, "bytes/interval")?,
            interval_files: count(6, "files/interval")?,
            interval_s,
        })
    }

    /// Good files per second within the interval (0 for an empty interval).
    pub fn files_per_s(&self) -> f64 {
        rate(self.interval_files, self.interval_s)
    }

    /// Good bytes per second within the interval.
    pub fn bytes_per_s(&self) -> f64 {
        rate(self.interval_bytes, self.interval_s)
    }
}

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// A speedo message as `serve` sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub subject: Subject,
    /// The `source` header of a client speedo: whose products it counts (on `xr_<s>`).
    pub scope: Option<String>,
    pub reading: Reading,
    /// The `lag_*` headers, each only when believable (`core::lag::LagHeaders`).
    pub lag: LagHeaders,
}

/// The speedo message for `subject`, counting `scope`'s products only when given.
pub fn encode(subject: &Subject, scope: Option<&str>, reading: &Reading) -> Outgoing {
    let mut headers = Headers::new();
    let short = |s: &str| HeaderValue::Str(truncated(s, MAX_SHORT).to_owned());
    match subject {
        Subject::Client(c) => headers.set(H_CLIENT, short(c)),
        Subject::Source(s) => headers.set(H_SOURCE, short(s)),
        Subject::AllClients | Subject::AllSources => {}
    }
    if let (Some(s), Subject::Client(_) | Subject::AllClients) = (scope, subject) {
        headers.set(H_SOURCE, short(s));
    }
    Outgoing {
        routing_key: subject.topic(),
        body: reading.to_string().into_bytes(),
        content_type: "text/plain",
        headers,
    }
}

/// Reads a speedo message. Names come from the headers, else from the topic (a name with
/// a `.` in it spans several topic words).
pub fn decode(msg: &Incoming<'_>) -> Result<Decoded, SpeedoError> {
    let rest = msg
        .routing_key
        .strip_prefix(PREFIX)
        .ok_or_else(|| SpeedoError::Topic(msg.routing_key.to_owned()))?;
    let (kind, word) = rest
        .split_once('.')
        .ok_or_else(|| SpeedoError::Topic(msg.routing_key.to_owned()))?;
    let header = |k: &str| msg.headers.get_str(k).filter(|s| !s.is_empty());
    let subject = match kind {
        "client" => match header(H_CLIENT) {
            Some(c) => Subject::Client(c.to_owned()),
            None if word == ALL => Subject::AllClients,
            None => Subject::Client(decode_word(word)),
        },
        "source" => match header(H_SOURCE) {
            Some(s) => Subject::Source(s.to_owned()),
            None if word == ALL => Subject::AllSources,
            None => Subject::Source(decode_word(word)),
        },
        _ => return Err(SpeedoError::Topic(msg.routing_key.to_owned())),
    };
    let scope = match subject {
        Subject::Client(_) | Subject::AllClients => header(H_SOURCE).map(str::to_owned),
        _ => None,
    };
    let text = std::str::from_utf8(msg.body).map_err(|_| SpeedoError::NotUtf8)?;
    Ok(Decoded {
        subject,
        scope,
        reading: Reading::parse(text)?,
        lag: LagHeaders::read(msg.headers),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn incoming(out: &Outgoing) -> Incoming<'_> {
        Incoming {
            exchange: "xreport",
            routing_key: &out.routing_key,
            body: &out.body,
            content_type: Some(out.content_type),
            user_id: None,
            headers: &out.headers,
        }
    }

    fn reading() -> Reading {
        Reading {
            end: Stamp::parse("20240101T120000.5").unwrap(),
            good: 300,
            errors: 100,
            good_bytes: 3_000_000,
            bad_bytes: 1_000_000,
            interval_bytes: 30_000,
            interval_files: 3,
            interval_s: 0.5,
        }
    }

    #[test]
    fn body_text_is_the_spec_shape() {
        assert_eq!(
            reading().to_string(),
            "20240101120000.500 300 100 3000000 1000000 30000 3 0.500"
        );
        assert_eq!(
            Reading::parse("20240101120000.500 300 100 3000000 1000000 30000 3 0.500\n").unwrap(),
            reading()
        );
        assert_eq!(reading().files_per_s(), 6.0);
    }

    #[test]
    fn bad_bodies_say_what_is_wrong() {
        let table = [
            ("", "0 fields"),
            ("20240101120000.5 1 2 3 4 5 6", "7 fields"),
            ("20240101120000.5 1 2 3 4 5 6 7 8", "9 fields"),
            ("yesterday 1 2 3 4 5 6 7", "datetime"),
            ("20240101120000.5 -1 2 3 4 5 6 7", "goodcount"),
            ("20240101120000.5 1 2 3 4 5 6 NaN", "interval"),
            ("20240101120000.5 1 2 3 4 5 6 -1", "interval"),
            (
                "20240101120000.5 1 2 3 99999999999999999999 5 6 1",
                "badbytecount",
            ),
        ];
        for (text, want) in table {
            let e = Reading::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    /// (subject, scope, topic, headers)
    type Case = (
        Subject,
        Option<&'static str>,
        &'static str,
        &'static [(&'static str, &'static str)],
    );

    #[test]
    fn topics_and_headers() {
        let r = reading();
        let table: [Case; 6] = [
            (
                Subject::Client("cfs".into()),
                None,
                "v01.speedo.client.cfs",
                &[("client", "cfs")],
            ),
            (
                Subject::Source("radar".into()),
                None,
                "v01.speedo.source.radar",
                &[("source", "radar")],
            ),
            (Subject::AllClients, None, "v01.speedo.client.all", &[]),
            (Subject::AllSources, None, "v01.speedo.source.all", &[]),
            (
                Subject::Client("a b#c".into()),
                Some("radar"),
                "v01.speedo.client.a%20b%23c",
                &[("client", "a b#c"), ("source", "radar")],
            ),
            (
                Subject::AllClients,
                Some("radar"),
                "v01.speedo.client.all",
                &[("source", "radar")],
            ),
        ];
        for (subject, scope, topic, headers) in table {
            let out = encode(&subject, scope, &r);
            assert_eq!(out.routing_key, topic);
            let got: Vec<(&str, &str)> = out
                .headers
                .iter()
                .map(|(k, v)| (k, v.as_str().unwrap()))
                .collect();
            assert_eq!(got, headers, "{topic}");
            let d = decode(&incoming(&out)).unwrap();
            assert_eq!(d.subject, subject);
            assert_eq!(d.scope.as_deref(), scope);
            assert_eq!(d.reading, r);
        }
    }

    #[test]
    fn names_with_dots_and_a_client_called_all() {
        let r = reading();
        for subject in [
            Subject::Client("a.b".into()),
            Subject::Client("all".into()),
            Subject::Source("all".into()),
            Subject::Source("x.y.z".into()),
        ] {
            let out = encode(&subject, None, &r);
            assert_eq!(decode(&incoming(&out)).unwrap().subject, subject);
        }
        // Without headers (another producer), the topic still names it.
        let h = Headers::new();
        let inc = Incoming {
            exchange: "xreport",
            routing_key: "v01.speedo.client.a.b",
            body: b"20240101120000.5 1 2 3 4 5 6 7",
            content_type: None,
            user_id: None,
            headers: &h,
        };
        assert_eq!(decode(&inc).unwrap().subject, Subject::Client("a.b".into()));
    }

    #[test]
    fn long_names_are_cut_in_the_topic_only() {
        let name = "é".repeat(200);
        let out = encode(&Subject::Client(name.clone()), None, &reading());
        assert!(out.routing_key.len() <= 255);
        assert!(out.headers.get_str("client").unwrap().len() <= 255);
    }

    #[test]
    fn not_a_speedo() {
        let h = Headers::new();
        for key in [
            "v02.report.x",
            "v01.speedo.",
            "v01.speedo.node.x",
            "v01.speedo.client",
        ] {
            let inc = Incoming {
                exchange: "xreport",
                routing_key: key,
                body: b"",
                content_type: None,
                user_id: None,
                headers: &h,
            };
            assert!(matches!(decode(&inc), Err(SpeedoError::Topic(_))), "{key}");
        }
    }

    proptest! {
        #[test]
        fn body_round_trip(
            ms in 0i64..4_102_444_800_000,
            good: u64, errors: u64, gb: u64, bb: u64, ib: u64, files: u64,
            interval_ms in 0u64..100_000_000,
        ) {
            let r = Reading {
                end: Stamp::from_unix(ms.div_euclid(1000), (ms.rem_euclid(1000) * 1_000_000) as i32).unwrap(),
                good, errors, good_bytes: gb, bad_bytes: bb, interval_bytes: ib,
                interval_files: files,
                interval_s: interval_ms as f64 / 1000.0,
            };
            let back = Reading::parse(&r.to_string()).unwrap();
            prop_assert_eq!(back, r);
        }

        #[test]
        fn parsing_never_panics(s in ".{0,200}") {
            let _ = Reading::parse(&s);
        }
    }
}
