//! Emitting reports in each wire format, for `report`, `simulate` and the tests. Parsing
//! what is emitted gives back the same fields (proved by the round-trip property tests).

use super::headers::{HeaderValue, Headers};
use super::report::{Format, Identity, Report};
use super::stamp::Stamp;
use super::topic::{MAX_SHORT, topic_for, truncate_utf8};
use serde::Serialize;

/// A message ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub routing_key: String,
    pub body: Vec<u8>,
    pub content_type: &'static str,
    pub headers: Headers,
}

/// Emits `r` in `format`. For v03, a report with a consumer host or user is written in the
/// v2-writing-v03 schema under `v03.report`, one without in sr3's schema under plain `v03`
/// (as sr3 itself publishes).
pub fn emit(r: &Report, format: Format) -> Outgoing {
    match format {
        Format::V01 => v01(r),
        Format::V02 => v02(r),
        Format::V02Sr3 => v02_sr3(r),
        Format::V03 => v03(r),
        Format::V03Sr2 => v03_sr2(r),
    }
}

/// Body fields cannot contain spaces: encode them as Sarracenia does.
fn word(s: Option<&str>) -> String {
    match s {
        Some(s) if !s.is_empty() => s.replace(' ', "%20"),
        _ => "-".to_owned(),
    }
}

fn stamp(r: &Report) -> Stamp {
    r.pub_time.unwrap_or(Stamp(jiff::Timestamp::UNIX_EPOCH))
}

fn short(s: &str) -> HeaderValue {
    let mut s = s.to_owned();
    truncate_utf8(&mut s, MAX_SHORT);
    HeaderValue::Str(s)
}

fn sum_letter(method: &str) -> &str {
    match method {
        "md5" => "d",
        "sha512" => "s",
        "md5name" => "n",
        "random" => "0",
        "cod" => "z",
        "arbitrary" => "a",
        other => other,
    }
}

/// The post headers a v02-style message carries.
fn post_headers(r: &Report, with_message: bool) -> Headers {
    let mut h = Headers::new();
    if let Some(size) = r.size_bytes {
        h.set("parts", format!("1,{size},1,0,0"));
    }
    if let Some(Identity { method, value }) = &r.identity {
        h.set("sum", short(&format!("{},{value}", sum_letter(method))));
    }
    for (k, v) in [
        ("source", &r.source),
        ("from_cluster", &r.from_cluster),
        ("flow", &r.flow),
    ] {
        if let Some(v) = v {
            h.set(k, short(v));
        }
    }
    if !r.to_clusters.is_empty() {
        h.set("to_clusters", short(&r.to_clusters.join(",")));
    }
    if with_message && let Some(m) = &r.message {
        h.set("message", short(m));
    }
    for (k, v) in r.extra.iter() {
        if h.get(k).is_none() {
            h.0.push((k.to_owned(), v.clone()));
        }
    }
    h
}

fn seven_fields(r: &Report) -> String {
    format!(
        "{} {} {} {} {} {} {}",
        stamp(r).v02(),
        word(Some(&r.base_url)),
        word(Some(&r.rel_path)),
        r.code,
        word(r.host.as_deref()),
        word(r.user.as_deref()),
        r.duration_s.unwrap_or(0.0)
    )
}

fn v02(r: &Report) -> Outgoing {
    Outgoing {
        routing_key: topic_for("v02.report", &r.rel_path, false),
        body: seven_fields(r).into_bytes(),
        content_type: "text/plain",
        headers: post_headers(r, true),
    }
}

fn v01(r: &Report) -> Outgoing {
    let (flags, sum) = match &r.identity {
        Some(Identity { method, value }) => (sum_letter(method).to_owned(), value.clone()),
        None => ("0".to_owned(), "0".to_owned()),
    };
    let body = format!(
        "{} {} 1 0 0 {} {} {} {} {} {} {} {} {}",
        stamp(r).v02(),
        r.size_bytes.unwrap_or(0),
        word(Some(&flags)),
        word(Some(&sum)),
        word(r.flow.as_deref()),
        word(Some(&r.base_url)),
        word(Some(&r.rel_path)),
        r.code,
        word(r.host.as_deref()),
        word(r.user.as_deref()),
        r.duration_s.unwrap_or(0.0)
    );
    let prefix = match (&r.source, &r.user) {
        (Some(s), Some(u)) => {
            let mut p = "v01.log.".to_owned();
            super::topic::encode_word(s, &mut p);
            p.push('.');
            super::topic::encode_word(u, &mut p);
            p
        }
        _ => "v01.log".to_owned(),
    };
    let mut headers = Headers::new();
    if let Some(m) = &r.message {
        headers.set("message", short(m));
    }
    // The topic carries the source too, but a name with a dot is ambiguous there.
    for (k, v) in [("source", &r.source), ("from_cluster", &r.from_cluster)] {
        if let Some(v) = v {
            headers.set(k, short(v));
        }
    }
    if !r.to_clusters.is_empty() {
        headers.set("to_clusters", short(&r.to_clusters.join(",")));
    }
    Outgoing {
        routing_key: topic_for(&prefix, &r.rel_path, false),
        body: body.into_bytes(),
        content_type: "text/plain",
        headers,
    }
}

/// `<pubTime> <baseUrl> <relPath>`: the body of a v02 post (and of sr3 writing v02).
fn post_body(r: &Report) -> Vec<u8> {
    format!(
        "{} {} {}",
        stamp(r).v02(),
        word(Some(&r.base_url)),
        word(Some(&r.rel_path))
    )
    .into_bytes()
}

/// The announcement (post) of `r`'s product in `format`'s family: a v02 post
/// (`v02.post.<dirs>`, body `<pubTime> <baseUrl> <relPath>`, post headers) for v01, v02 and
/// sr3-writing-v02; a v03 post (`v03.<dirs>`, JSON without a `report` member) for v03 and
/// sr2-writing-v03. Code, host, user and message are not part of a post.
pub fn announcement(r: &Report, format: Format) -> Outgoing {
    match format {
        Format::V01 | Format::V02 | Format::V02Sr3 => Outgoing {
            routing_key: topic_for("v02.post", &r.rel_path, false),
            body: post_body(r),
            content_type: "text/plain",
            headers: post_headers(r, false),
        },
        Format::V03 | Format::V03Sr2 => {
            let mut headers = Headers::new();
            for (k, v) in r.extra.iter() {
                headers.0.push((k.to_owned(), v.clone()));
            }
            Outgoing {
                routing_key: topic_for("v03", &r.rel_path, false),
                // Serialising plain structs of strings and numbers cannot fail.
                body: serde_json::to_vec(&json_out(r, None)).unwrap_or_default(),
                content_type: "application/json",
                headers,
            }
        }
    }
}

fn v02_sr3(r: &Report) -> Outgoing {
    let mut table = Headers::new();
    table.set("code", i64::from(r.code));
    if let Some(t) = r.time_completed {
        table.set("timeCompleted", t.v03());
    }
    if let Some(m) = &r.message {
        table.set("message", short(m));
    }
    let mut headers = post_headers(r, false);
    headers.set("report", table);
    Outgoing {
        routing_key: topic_for("v02.post", &r.rel_path, false),
        body: post_body(r),
        content_type: "text/plain",
        headers,
    }
}

fn v03_sr2(r: &Report) -> Outgoing {
    let mut table = Headers::new();
    table.set("resultCode", i64::from(r.code));
    if let Some(h) = &r.host {
        table.set("host", short(h));
    }
    if let Some(u) = &r.user {
        table.set("user", short(u));
    }
    if let Some(d) = r.duration_s {
        table.set("elapsedTime", d);
    }
    let mut headers = post_headers(r, true);
    headers.set("report", table);
    Outgoing {
        routing_key: topic_for("v03.report", &r.rel_path, false),
        body: seven_fields(r).into_bytes(),
        content_type: "application/json",
        headers,
    }
}

#[derive(Serialize)]
struct JsonOut<'a> {
    #[serde(rename = "pubTime")]
    pub_time: String,
    #[serde(rename = "baseUrl")]
    base_url: &'a str,
    #[serde(rename = "relPath")]
    rel_path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from_cluster: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to_clusters: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    flow: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<&'a Identity>,
    /// Absent in an announcement.
    #[serde(skip_serializing_if = "Option::is_none")]
    report: Option<JsonReport<'a>>,
}

fn json_out<'a>(r: &'a Report, report: Option<JsonReport<'a>>) -> JsonOut<'a> {
    JsonOut {
        pub_time: stamp(r).v03(),
        base_url: &r.base_url,
        rel_path: &r.rel_path,
        source: r.source.as_deref(),
        from_cluster: r.from_cluster.as_deref(),
        to_clusters: (!r.to_clusters.is_empty()).then(|| r.to_clusters.join(",")),
        flow: r.flow.as_deref(),
        size: r.size_bytes,
        identity: r.identity.as_ref(),
        report,
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum JsonReport<'a> {
    Sr3 {
        code: u16,
        #[serde(rename = "timeCompleted", skip_serializing_if = "Option::is_none")]
        time_completed: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<&'a str>,
    },
    V2 {
        #[serde(rename = "resultCode")]
        result_code: u16,
        #[serde(skip_serializing_if = "Option::is_none")]
        host: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
        #[serde(rename = "elapsedTime", skip_serializing_if = "Option::is_none")]
        elapsed: Option<f64>,
    },
}

fn v03(r: &Report) -> Outgoing {
    let sr3 = r.host.is_none() && r.user.is_none();
    let report = if sr3 {
        JsonReport::Sr3 {
            code: r.code,
            time_completed: r.time_completed.map(|t| t.v03()),
            message: r.message.as_deref(),
        }
    } else {
        JsonReport::V2 {
            result_code: r.code,
            host: r.host.as_deref(),
            user: r.user.as_deref(),
            elapsed: r.duration_s,
        }
    };
    let j = json_out(r, Some(report));
    let mut headers = Headers::new();
    if !sr3 && let Some(m) = &r.message {
        headers.set("message", short(m));
    }
    for (k, v) in r.extra.iter() {
        headers.0.push((k.to_owned(), v.clone()));
    }
    Outgoing {
        routing_key: topic_for(if sr3 { "v03" } else { "v03.report" }, &r.rel_path, false),
        // Serialising plain structs of strings and numbers cannot fail.
        body: serde_json::to_vec(&j).unwrap_or_default(),
        content_type: "application/json",
        headers,
    }
}
