//! Every report format of SPEC §2, parsed from body + properties + headers into one
//! [`Report`]. The decision "report or announcement" is made from the bytes and headers,
//! never from the topic or the content type alone, because real producers get both wrong.
//! Parsing never panics: bad input is a [`ParseError`] naming what is wrong.

use super::headers::{HeaderValue, Headers};
use super::stamp::Stamp;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;

/// Bodies larger than this are refused before any parsing (a report is a few hundred bytes).
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

/// Header names pumpwatch stamps during validation (SPEC §2 "Attribution happens once").
pub const H_CLIENT: &str = "pumpwatch_client";
pub const H_SOURCE: &str = "pumpwatch_source";
/// How many pumps a report crossed (set by `route`, SPEC §4.2).
pub const H_HOPS: &str = "pumpwatch_hops";

/// A message as received: what the adapter hands to the core.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub content_type: Option<&'a str>,
    pub user_id: Option<&'a str>,
    pub headers: &'a Headers,
}

/// The wire format a report was recognised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Format {
    /// 2015 v01 log line (14 space-separated fields).
    #[serde(rename = "v01")]
    V01,
    /// v02 report: 7-field text body, post headers.
    #[serde(rename = "v02")]
    V02,
    /// sr3 writing v02: 3-field announcement body plus a nested `report` header table.
    #[serde(rename = "v02-sr3")]
    V02Sr3,
    /// v03 JSON body with a `report` object (either schema), whatever the topic says.
    #[serde(rename = "v03")]
    V03,
    /// sr2 in v03 mode: JSON content type, 7-field v02 body, v03 fields as headers.
    #[serde(rename = "v03-sr2")]
    V03Sr2,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::V01 => "v01",
            Format::V02 => "v02",
            Format::V02Sr3 => "v02-sr3",
            Format::V03 => "v03",
            Format::V03Sr2 => "v03-sr2",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A checksum or identity of the product (`identity`/`integrity` in v03, `sum` in v02).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Identity {
    pub method: String,
    pub value: String,
}

/// One report, normalised.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub format: Format,
    pub topic: String,
    pub exchange: String,
    pub pub_time: Option<Stamp>,
    pub base_url: String,
    pub rel_path: String,
    pub code: u16,
    pub message: Option<String>,
    /// The consumer's host and user as the report states them (sr3 states none).
    pub host: Option<String>,
    pub user: Option<String>,
    pub duration_s: Option<f64>,
    pub source: Option<String>,
    pub from_cluster: Option<String>,
    pub to_clusters: Vec<String>,
    pub flow: Option<String>,
    pub size_bytes: Option<u64>,
    pub identity: Option<Identity>,
    /// sr3's `report.timeCompleted`.
    pub time_completed: Option<Stamp>,
    /// `pumpwatch_client` / `pumpwatch_source` stamped by `route`.
    pub stamped_client: Option<String>,
    pub stamped_source: Option<String>,
    /// Headers not mapped to a field above, kept as received.
    pub extra: Headers,
}

impl Report {
    /// The file name: the last component of `rel_path`.
    pub fn file_name(&self) -> &str {
        file_name(&self.rel_path)
    }
}

/// An announcement (post): what `route` indexes to find whose product a report is about.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Announcement {
    pub format: Format,
    pub topic: String,
    pub pub_time: Option<Stamp>,
    pub base_url: String,
    pub rel_path: String,
    pub source: Option<String>,
    pub identity: Option<Identity>,
    pub size_bytes: Option<u64>,
}

/// Messages that share report exchanges but are neither reports nor announcements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Control {
    /// `v01.speedo.*`, published by `speedo`.
    Speedo,
    /// `v01.watchdog.*`, published by `watchdog`.
    Watchdog,
}

/// What a message turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Report(Box<Report>),
    Announcement(Box<Announcement>),
    Control(Control),
}

/// Why a message could not be read. The `Display` text is what goes into
/// `pumpwatch_reason` (prefixed with `malformed: `).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("body of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("empty body")]
    Empty,
    #[error("body is not valid UTF-8 (at byte {0})")]
    NotUtf8(usize),
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("invalid {field}: {value:?}")]
    Invalid { field: &'static str, value: String },
    #[error("unrecognised body: {0}")]
    Shape(String),
}

fn invalid(field: &'static str, value: &str) -> ParseError {
    let mut value = value.to_owned();
    super::topic::truncate_utf8(&mut value, 60);
    ParseError::Invalid { field, value }
}

/// Parses a message with the default body limit.
pub fn parse(msg: &Incoming<'_>) -> Result<Message, ParseError> {
    parse_limited(msg, DEFAULT_MAX_BODY)
}

/// Parses a message, refusing bodies over `max_body` bytes.
pub fn parse_limited(msg: &Incoming<'_>, max_body: usize) -> Result<Message, ParseError> {
    // Recognised by the topic before the size: a watchdog failure notice lists up to
    // 10 000 transfers (megabytes), and is pumpwatch's own message, not a report too large.
    if let Some(rest) = msg.routing_key.strip_prefix("v01.") {
        if rest.starts_with("speedo.") {
            return Ok(Message::Control(Control::Speedo));
        }
        if rest.starts_with("watchdog.") {
            return Ok(Message::Control(Control::Watchdog));
        }
    }
    if msg.body.len() > max_body {
        return Err(ParseError::TooLarge {
            size: msg.body.len(),
            max: max_body,
        });
    }
    let text = std::str::from_utf8(msg.body).map_err(|e| ParseError::NotUtf8(e.valid_up_to()))?;
    let text = text.trim_start_matches('\u{feff}').trim_start();
    if text.is_empty() {
        return Err(ParseError::Empty);
    }
    if text.starts_with('{') {
        return parse_json(msg, text);
    }
    let line = text.split('\n').next().unwrap_or("").trim_end_matches('\r');
    let mut fields = [""; 16];
    let mut n = 0;
    for f in line.split_ascii_whitespace() {
        if n == fields.len() {
            n += 1;
            break;
        }
        fields[n] = f;
        n += 1;
    }
    let table = msg.headers.get("report").and_then(HeaderValue::as_table);
    if n >= 13 && looks_v01(&fields[..n.min(16)]) {
        return parse_v01(msg, &fields[..n.min(16)]);
    }
    if n >= 9 && looks_v01(&fields[..n.min(16)]) {
        return Ok(Message::Announcement(Box::new(v01_announcement(
            msg,
            &fields[..n],
        )?)));
    }
    match n {
        7..=16 => parse_v02(msg, &fields[..7], table),
        3..=6 => match table {
            Some(t) => parse_v02(msg, &fields[..3], Some(t)),
            None => Ok(Message::Announcement(Box::new(v02_announcement(
                msg,
                &fields[..3],
            )?))),
        },
        _ => Err(ParseError::Shape(format!(
            "{n} field{} on the first line; a v02 report has 7, an announcement 3",
            if n == 1 { "" } else { "s" }
        ))),
    }
}

fn looks_v01(f: &[&str]) -> bool {
    f.len() >= 9
        && f[1..5]
            .iter()
            .all(|w| w.bytes().all(|b| b.is_ascii_digit()))
}

fn parse_stamp(field: &'static str, s: &str) -> Result<Stamp, ParseError> {
    Stamp::parse(s).ok_or_else(|| invalid(field, s))
}

fn parse_code(field: &'static str, v: &HeaderValue) -> Result<u16, ParseError> {
    match v.as_i64() {
        Some(c) if (100..=999).contains(&c) => Ok(c as u16),
        _ => Err(invalid(field, &v.to_text())),
    }
}

fn parse_code_str(field: &'static str, s: &str) -> Result<u16, ParseError> {
    match s.parse::<u16>() {
        Ok(c) if (100..=999).contains(&c) => Ok(c),
        _ => Err(invalid(field, s)),
    }
}

fn parse_duration(field: &'static str, s: &str) -> Result<f64, ParseError> {
    match s.parse::<f64>() {
        Ok(d) if d.is_finite() => Ok(d),
        _ => Err(invalid(field, s)),
    }
}

/// Text formats write `-` for an absent host, user or flow.
fn dash_none(s: &str) -> Option<String> {
    (s != "-" && !s.is_empty()).then(|| s.to_owned())
}

fn file_name(rel_path: &str) -> &str {
    let t = rel_path.trim_end_matches('/');
    t.rsplit('/').next().unwrap_or(t)
}

/// Size of the product (method `1`) or of this part (`p`/`i`, see [`part_size`]) from a
/// v02 `parts` header.
pub fn size_from_parts(parts: &str) -> Result<u64, ParseError> {
    let bad = || invalid("parts", parts);
    let mut it = parts.split(',');
    let method = it.next().ok_or_else(bad)?;
    let mut num = || -> Result<u64, ParseError> {
        it.next()
            .ok_or_else(bad)?
            .trim()
            .parse::<u64>()
            .map_err(|_| bad())
    };
    let blocksize = num()?;
    match method {
        "1" => Ok(blocksize),
        "p" | "i" => {
            let (count, remainder, blockno) = (num()?, num()?, num()?);
            Ok(part_size(blocksize, count, remainder, blockno))
        }
        _ => Err(bad()),
    }
}

fn identity_from_sum(sum: &str) -> Option<Identity> {
    let (m, v) = sum.split_once(',')?;
    Some(Identity {
        method: method_from_letter(m).to_owned(),
        value: v.trim().to_owned(),
    })
}

/// v01/v02 name checksum methods with one letter.
fn method_from_letter(m: &str) -> &str {
    match m {
        "d" => "md5",
        "s" => "sha512",
        "n" => "md5name",
        "0" => "random",
        "z" => "cod",
        "a" => "arbitrary",
        other => other,
    }
}

/// The header fields shared by v02, sr3-v02 and sr2-v03 reports. Known headers fill
/// fields; everything else stays in `extra`.
#[derive(Default)]
struct HeaderFields {
    source: Option<String>,
    from_cluster: Option<String>,
    to_clusters: Vec<String>,
    flow: Option<String>,
    message: Option<String>,
    size: Option<u64>,
    identity: Option<Identity>,
    stamped_client: Option<String>,
    stamped_source: Option<String>,
    extra: Headers,
}

fn split_clusters(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn header_fields(h: &Headers) -> Result<HeaderFields, ParseError> {
    let mut out = HeaderFields::default();
    let text = |v: &HeaderValue| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_text());
    for (k, v) in h.iter() {
        match k {
            "source" => out.source = Some(text(v)),
            "from_cluster" => out.from_cluster = Some(text(v)),
            "to_clusters" => out.to_clusters = split_clusters(&text(v)),
            "flow" => out.flow = Some(text(v)),
            "message" => out.message = Some(text(v)),
            "parts" => out.size = Some(size_from_parts(&text(v))?),
            "size" if out.size.is_none() => {
                out.size = Some(
                    v.as_i64()
                        .and_then(|i| u64::try_from(i).ok())
                        .ok_or_else(|| invalid("size", &v.to_text()))?,
                )
            }
            "sum" => out.identity = identity_from_sum(&text(v)),
            "identity" | "integrity" => {
                if let Some(t) = v.as_table()
                    && let (Some(m), Some(val)) = (t.get_str("method"), t.get_str("value"))
                {
                    out.identity = Some(Identity {
                        method: m.into(),
                        value: val.into(),
                    });
                }
            }
            // `route` stamps an empty value when it could not decide.
            H_CLIENT => out.stamped_client = Some(text(v)).filter(|s| !s.is_empty()),
            H_SOURCE => out.stamped_source = Some(text(v)).filter(|s| !s.is_empty()),
            "report" => {}
            _ => out.extra.0.push((k.to_owned(), v.clone())),
        }
    }
    Ok(out)
}

/// The outcome carried in a nested `report` table (sr3 writing v02, sr2 writing v03).
struct TableOutcome {
    code: u16,
    message: Option<String>,
    host: Option<String>,
    user: Option<String>,
    duration: Option<f64>,
    time_completed: Option<Stamp>,
}

fn table_outcome(t: &Headers) -> Result<TableOutcome, ParseError> {
    let code = match t.get("code").or_else(|| t.get("resultCode")) {
        Some(v) => parse_code("report.code", v)?,
        None => return Err(ParseError::Missing("report.code")),
    };
    let duration = match t.get("elapsedTime") {
        Some(v) => Some(
            v.as_f64()
                .filter(|d| d.is_finite())
                .ok_or_else(|| invalid("report.elapsedTime", &v.to_text()))?,
        ),
        None => None,
    };
    let time_completed = match t.get_str("timeCompleted") {
        Some(s) => Some(parse_stamp("report.timeCompleted", s)?),
        None => None,
    };
    Ok(TableOutcome {
        code,
        message: t.get_str("message").map(str::to_owned),
        host: t.get_str("host").map(str::to_owned),
        user: t.get_str("user").map(str::to_owned),
        duration,
        time_completed,
    })
}

fn is_json_label(ct: Option<&str>) -> bool {
    ct.is_some_and(|c| c.contains("json"))
}

/// v02 report (7 fields), sr3-v02 (3 fields + `report` table), sr2-v03 (7 fields, JSON
/// label and/or `report` table).
fn parse_v02(
    msg: &Incoming<'_>,
    f: &[&str],
    table: Option<&Headers>,
) -> Result<Message, ParseError> {
    let pub_time = parse_stamp("pubTime", f[0])?;
    let hf = header_fields(msg.headers)?;
    let outcome = table.map(table_outcome).transpose()?;
    let (format, code, host, user, duration) = if f.len() >= 7 {
        let format = if table.is_some() || is_json_label(msg.content_type) {
            Format::V03Sr2
        } else {
            Format::V02
        };
        let code = parse_code_str("code", f[3])?;
        (
            format,
            code,
            dash_none(f[4]),
            dash_none(f[5]),
            Some(parse_duration("duration", f[6])?),
        )
    } else {
        let o = outcome.as_ref().ok_or(ParseError::Missing("report"))?;
        (Format::V02Sr3, o.code, None, None, None)
    };
    let (mut message, mut time_completed) = (hf.message, None);
    let (mut host, mut user, mut duration) = (host, user, duration);
    if let Some(o) = outcome {
        message = o.message.or(message);
        host = host.or(o.host);
        user = user.or(o.user);
        duration = duration.or(o.duration);
        time_completed = o.time_completed;
    }
    Ok(Message::Report(Box::new(Report {
        format,
        topic: msg.routing_key.to_owned(),
        exchange: msg.exchange.to_owned(),
        pub_time: Some(pub_time),
        base_url: f[1].to_owned(),
        rel_path: f[2].to_owned(),
        code,
        message,
        host,
        user,
        duration_s: duration,
        source: hf.source,
        from_cluster: hf.from_cluster,
        to_clusters: hf.to_clusters,
        flow: hf.flow,
        size_bytes: hf.size,
        identity: hf.identity,
        time_completed,
        stamped_client: hf.stamped_client,
        stamped_source: hf.stamped_source,
        extra: hf.extra,
    })))
}

fn v02_announcement(msg: &Incoming<'_>, f: &[&str]) -> Result<Announcement, ParseError> {
    let hf = header_fields(msg.headers)?;
    Ok(Announcement {
        format: Format::V02,
        topic: msg.routing_key.to_owned(),
        pub_time: Some(parse_stamp("pubTime", f[0])?),
        base_url: f[1].to_owned(),
        rel_path: f[2].to_owned(),
        source: hf.source,
        identity: hf.identity,
        size_bytes: hf.size,
    })
}

/// v01 fields: stamp blocksize blockcount remainder blockno flags sum, then either
/// `flow srcurl relpath` (2015 implementation) or `srcurl relpath flow` (2015 design).
fn v01_locations<'a>(f: &[&'a str]) -> (&'a str, &'a str, &'a str) {
    if f[7].contains("://") {
        (f[7], f[8], f[9])
    } else {
        (f[8], f[9], f[7])
    }
}

fn v01_size(f: &[&str]) -> Result<u64, ParseError> {
    let n = |i: usize, name: &'static str| f[i].parse::<u64>().map_err(|_| invalid(name, f[i]));
    let (bs, count, rem, no) = (
        n(1, "blocksize")?,
        n(2, "blockcount")?,
        n(3, "remainder")?,
        n(4, "blockno")?,
    );
    Ok(part_size(bs, count, rem, no))
}

/// The bytes one part carries (SPEC §2 "Size"): the remainder for the last block when the
/// remainder is not 0, else the block size. The one rule for v01 bodies and v02 `parts`
/// (`p`/`i`): a file smaller than one block is one block whose remainder is its size.
pub fn part_size(blocksize: u64, count: u64, remainder: u64, blockno: u64) -> u64 {
    if remainder > 0 && count.checked_sub(1) == Some(blockno) {
        remainder
    } else {
        blocksize
    }
}

/// v01 `relpath` is the destination directory when it ends in `/`; the file name then
/// comes from the source URL.
fn v01_rel_path(srcurl: &str, relpath: &str) -> String {
    if relpath.ends_with('/') {
        format!("{relpath}{}", file_name(srcurl))
    } else {
        relpath.to_owned()
    }
}

fn v01_identity(f: &[&str]) -> Option<Identity> {
    (f[6] != "0" && !f[6].is_empty()).then(|| Identity {
        method: method_from_letter(f[5]).to_owned(),
        value: f[6].to_owned(),
    })
}

fn parse_v01(msg: &Incoming<'_>, f: &[&str]) -> Result<Message, ParseError> {
    let pub_time = parse_stamp("pubTime", f[0])?;
    let (srcurl, relpath, flow) = v01_locations(f);
    let code = parse_code_str("code", f[10])?;
    let duration = match f.get(13) {
        Some(d) => Some(parse_duration("duration", d)?),
        None => None,
    };
    let hf = header_fields(msg.headers)?;
    // Early topic form: v01.log.<source>.<consumer>.<dirs...>; recognised when the
    // consumer word matches the body's user field.
    let mut words = msg.routing_key.split('.');
    let early_source = match (words.next(), words.next(), words.next(), words.next()) {
        (Some("v01"), Some("log"), Some(src), Some(consumer))
            if consumer == f[12] && f[12] != "-" =>
        {
            Some(super::topic::decode_word(src))
        }
        _ => None,
    };
    Ok(Message::Report(Box::new(Report {
        format: Format::V01,
        topic: msg.routing_key.to_owned(),
        exchange: msg.exchange.to_owned(),
        pub_time: Some(pub_time),
        base_url: srcurl.to_owned(),
        rel_path: v01_rel_path(srcurl, relpath),
        code,
        message: hf.message,
        host: dash_none(f[11]),
        user: dash_none(f[12]),
        duration_s: duration,
        source: hf.source.or(early_source),
        from_cluster: hf.from_cluster,
        to_clusters: hf.to_clusters,
        flow: dash_none(flow).or(hf.flow),
        size_bytes: Some(v01_size(f)?),
        identity: v01_identity(f).or(hf.identity),
        time_completed: None,
        stamped_client: hf.stamped_client,
        stamped_source: hf.stamped_source,
        extra: hf.extra,
    })))
}

fn v01_announcement(msg: &Incoming<'_>, f: &[&str]) -> Result<Announcement, ParseError> {
    let (srcurl, relpath, _flow) = if f.len() >= 10 {
        v01_locations(f)
    } else {
        (f[7], f[8], "")
    };
    let hf = header_fields(msg.headers)?;
    Ok(Announcement {
        format: Format::V01,
        topic: msg.routing_key.to_owned(),
        pub_time: Some(parse_stamp("pubTime", f[0])?),
        base_url: srcurl.to_owned(),
        rel_path: v01_rel_path(srcurl, relpath),
        source: hf.source,
        identity: v01_identity(f),
        size_bytes: Some(v01_size(f)?),
    })
}

// ---- v03 JSON ----

/// A number that may arrive as an integer, a float or numeric text.
#[derive(Debug, Clone, Copy)]
enum Num {
    I(i64),
    U(u64),
    F(f64),
    Bad,
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Num;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Num, E> {
                Ok(Num::I(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Num, E> {
                Ok(Num::U(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Num, E> {
                Ok(Num::F(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Num, E> {
                let v = v.trim();
                Ok(v.parse::<i64>()
                    .map(Num::I)
                    .or_else(|_| v.parse::<f64>().map(Num::F))
                    .unwrap_or(Num::Bad))
            }
        }
        d.deserialize_any(V)
    }
}

impl Num {
    fn as_u64(self) -> Option<u64> {
        match self {
            Num::I(i) => u64::try_from(i).ok(),
            Num::U(u) => Some(u),
            Num::F(f) if f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f < 1.8e19 => {
                Some(f as u64)
            }
            _ => None,
        }
    }
    fn as_f64(self) -> Option<f64> {
        match self {
            Num::I(i) => Some(i as f64),
            Num::U(u) => Some(u as f64),
            Num::F(f) if f.is_finite() => Some(f),
            _ => None,
        }
    }
    fn text(self) -> String {
        match self {
            Num::I(i) => i.to_string(),
            Num::U(u) => u.to_string(),
            Num::F(f) => f.to_string(),
            Num::Bad => "non-numeric text".into(),
        }
    }
}

#[derive(Deserialize)]
struct JsonIdentity<'a> {
    #[serde(borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow)]
    value: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Clusters<'a> {
    #[serde(borrow)]
    Text(Cow<'a, str>),
    List(Vec<String>),
}

#[derive(Deserialize)]
struct JsonOutcome<'a> {
    code: Option<Num>,
    #[serde(rename = "resultCode")]
    result_code: Option<Num>,
    #[serde(borrow)]
    message: Option<Cow<'a, str>>,
    #[serde(borrow)]
    host: Option<Cow<'a, str>>,
    #[serde(borrow)]
    user: Option<Cow<'a, str>>,
    #[serde(rename = "elapsedTime")]
    elapsed: Option<Num>,
    #[serde(rename = "timeCompleted", borrow)]
    time_completed: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct JsonMsg<'a> {
    #[serde(rename = "pubTime", borrow)]
    pub_time: Option<Cow<'a, str>>,
    #[serde(rename = "baseUrl", borrow)]
    base_url: Option<Cow<'a, str>>,
    #[serde(rename = "relPath", borrow)]
    rel_path: Option<Cow<'a, str>>,
    #[serde(borrow)]
    identity: Option<JsonIdentity<'a>>,
    #[serde(borrow)]
    integrity: Option<JsonIdentity<'a>>,
    #[serde(borrow)]
    sum: Option<Cow<'a, str>>,
    size: Option<Num>,
    #[serde(borrow)]
    parts: Option<Cow<'a, str>>,
    #[serde(borrow)]
    source: Option<Cow<'a, str>>,
    #[serde(borrow)]
    from_cluster: Option<Cow<'a, str>>,
    #[serde(borrow)]
    to_clusters: Option<Clusters<'a>>,
    #[serde(borrow)]
    flow: Option<Cow<'a, str>>,
    #[serde(borrow)]
    message: Option<Cow<'a, str>>,
    #[serde(borrow)]
    report: Option<&'a serde_json::value::RawValue>,
}

fn parse_json(msg: &Incoming<'_>, text: &str) -> Result<Message, ParseError> {
    let j: JsonMsg<'_> = serde_json::from_str(text).map_err(|e| ParseError::Json(e.to_string()))?;
    let hf = header_fields(msg.headers)?;
    let pub_time = match &j.pub_time {
        Some(s) => parse_stamp("pubTime", s)?,
        None => return Err(ParseError::Missing("pubTime")),
    };
    let base_url = j
        .base_url
        .ok_or(ParseError::Missing("baseUrl"))?
        .into_owned();
    let rel_path = j
        .rel_path
        .ok_or(ParseError::Missing("relPath"))?
        .into_owned();
    let identity = match j.identity.or(j.integrity) {
        Some(JsonIdentity {
            method: Some(m),
            value: Some(v),
        }) => Some(Identity {
            method: m.into_owned(),
            // base64 values may carry a newline.
            value: v.trim().to_owned(),
        }),
        _ => j.sum.as_deref().and_then(identity_from_sum),
    }
    .or(hf.identity);
    let size = match (j.size, &j.parts) {
        (Some(n), _) => Some(n.as_u64().ok_or_else(|| invalid("size", &n.text()))?),
        (None, Some(p)) => Some(size_from_parts(p)?),
        (None, None) => hf.size,
    };
    let source = j.source.map(Cow::into_owned).or(hf.source);
    let Some(report) = j.report else {
        return Ok(Message::Announcement(Box::new(Announcement {
            format: Format::V03,
            topic: msg.routing_key.to_owned(),
            pub_time: Some(pub_time),
            base_url,
            rel_path,
            source,
            identity,
            size_bytes: size,
        })));
    };
    let raw = report.get();
    if !raw.starts_with('{') {
        return Err(invalid("report", raw));
    }
    let o: JsonOutcome<'_> =
        serde_json::from_str(raw).map_err(|e| ParseError::Json(format!("report: {e}")))?;
    let code = match o.code.or(o.result_code) {
        Some(n) => match n.as_u64() {
            Some(c) if (100..=999).contains(&c) => c as u16,
            _ => return Err(invalid("report.code", &n.text())),
        },
        None => return Err(ParseError::Missing("report.code")),
    };
    let duration = match o.elapsed {
        Some(n) => Some(
            n.as_f64()
                .ok_or_else(|| invalid("report.elapsedTime", &n.text()))?,
        ),
        None => None,
    };
    let time_completed = match &o.time_completed {
        Some(s) => Some(parse_stamp("report.timeCompleted", s)?),
        None => None,
    };
    let to_clusters = match j.to_clusters {
        Some(Clusters::Text(t)) => split_clusters(&t),
        Some(Clusters::List(l)) => l,
        None => hf.to_clusters,
    };
    Ok(Message::Report(Box::new(Report {
        format: Format::V03,
        topic: msg.routing_key.to_owned(),
        exchange: msg.exchange.to_owned(),
        pub_time: Some(pub_time),
        base_url,
        rel_path,
        code,
        message: o.message.or(j.message).map(Cow::into_owned).or(hf.message),
        host: o.host.map(Cow::into_owned),
        user: o.user.map(Cow::into_owned),
        duration_s: duration,
        source,
        from_cluster: j.from_cluster.map(Cow::into_owned).or(hf.from_cluster),
        to_clusters,
        flow: j.flow.map(Cow::into_owned).or(hf.flow),
        size_bytes: size,
        identity,
        time_completed,
        stamped_client: hf.stamped_client,
        stamped_source: hf.stamped_source,
        extra: hf.extra,
    })))
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
