//! Conversions between lapin's wire types and the core's broker-neutral ones.
//!
//! Why here: the core never sees lapin, and this is the one place that knows how each
//! AMQP field kind maps onto a `HeaderValue`. Nothing in here panics on long input:
//! lapin's `ShortString::from` would, so every short string goes through `short*`.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

use super::error::AmqpError;
use crate::core::{HeaderValue, Headers};

/// The most bytes an AMQP short string (names, routing keys, header keys) can hold.
pub const MAX_SHORT: usize = 255;

/// `text` cut to at most 255 bytes on a UTF-8 boundary.
pub fn truncate_short(text: &str) -> &str {
    if text.len() <= MAX_SHORT {
        return text;
    }
    let mut end = MAX_SHORT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A short string, truncated (on a UTF-8 boundary) if needed: for routing keys and
/// property values, where the spec says to truncate rather than fail.
pub fn short_lossy(text: &str) -> ShortString {
    ShortString::try_new(truncate_short(text)).unwrap_or_default()
}

/// A short string for a name that must not change (exchange, queue): too long is an error.
pub fn short_name(text: &str, what: &str) -> Result<ShortString, AmqpError> {
    ShortString::try_new(text).map_err(|_| {
        AmqpError::Invalid(format!(
            "{what} name is {} bytes, AMQP allows {MAX_SHORT}: '{}...'",
            text.len(),
            crate::core::text::escape(crate::core::topic::truncated(text, 40))
        ))
    })
}

/// Headers to a field table. Strings become long strings (never cut), ints 64-bit,
/// floats doubles, bytes long strings (as they arrived), nested tables and arrays nest.
/// Keys over 255 bytes are cut on a UTF-8 boundary; a repeated key keeps its last value.
pub fn to_field_table(headers: &Headers) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in &headers.0 {
        table.insert(short_lossy(key), to_amqp_value(value));
    }
    table
}

pub(crate) fn to_amqp_value(value: &HeaderValue) -> AMQPValue {
    match value {
        HeaderValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
        HeaderValue::Float(f) => AMQPValue::Double(*f),
        HeaderValue::Bool(b) => AMQPValue::Boolean(*b),
        HeaderValue::Bytes(b) => AMQPValue::LongString(LongString::from(b.as_slice())),
        HeaderValue::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(to_amqp_value).collect::<Vec<_>>(),
        )),
        HeaderValue::Table(t) => AMQPValue::FieldTable(to_field_table(t)),
        HeaderValue::Void => AMQPValue::Void,
    }
}

/// A field table to headers (in the table's key order). Long strings are `Str` when
/// UTF-8, else `Bytes`; every integer kind and timestamps are `Int`; decimals are their
/// exact decimal text as `Str`.
pub fn from_field_table(table: &FieldTable) -> Headers {
    Headers(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), from_amqp_value(v)))
            .collect(),
    )
}

fn from_amqp_value(value: &AMQPValue) -> HeaderValue {
    match value {
        AMQPValue::Boolean(b) => HeaderValue::Bool(*b),
        AMQPValue::ShortShortInt(i) => HeaderValue::Int((*i).into()),
        AMQPValue::ShortShortUInt(i) => HeaderValue::Int((*i).into()),
        AMQPValue::ShortInt(i) => HeaderValue::Int((*i).into()),
        AMQPValue::ShortUInt(i) => HeaderValue::Int((*i).into()),
        AMQPValue::LongInt(i) => HeaderValue::Int((*i).into()),
        AMQPValue::LongUInt(i) => HeaderValue::Int((*i).into()),
        AMQPValue::LongLongInt(i) => HeaderValue::Int(*i),
        AMQPValue::Timestamp(t) => HeaderValue::Int(i64::try_from(*t).unwrap_or(i64::MAX)),
        AMQPValue::Float(f) => HeaderValue::Float((*f).into()),
        AMQPValue::Double(f) => HeaderValue::Float(*f),
        AMQPValue::DecimalValue(d) => HeaderValue::Str(decimal_text(d.value, d.scale)),
        AMQPValue::ShortString(s) => HeaderValue::Str(s.as_str().to_owned()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => HeaderValue::Str(text.to_owned()),
            Err(_) => HeaderValue::Bytes(s.as_bytes().to_vec()),
        },
        AMQPValue::ByteArray(b) => HeaderValue::Bytes(b.as_slice().to_vec()),
        AMQPValue::FieldArray(a) => {
            HeaderValue::Array(a.as_slice().iter().map(from_amqp_value).collect())
        }
        AMQPValue::FieldTable(t) => HeaderValue::Table(from_field_table(t)),
        AMQPValue::Void => HeaderValue::Void,
    }
}

/// `value / 10^scale` written exactly: (12345, 2) → "123.45".
fn decimal_text(value: u32, scale: u8) -> String {
    let digits = value.to_string();
    let scale = usize::from(scale);
    if scale == 0 {
        return digits;
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{int}.{frac}")
}

/// Every property of an AMQP message, in plain types, so a forwarder can republish
/// exactly what it received (see `Client::publish_raw`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageProps {
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub headers: Headers,
    /// 1 transient, 2 persistent. `None` is published as 2 (persistent).
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub expiration: Option<String>,
    pub message_id: Option<String>,
    /// Seconds since the epoch, as AMQP carries it.
    pub timestamp: Option<u64>,
    /// The AMQP `type` property.
    pub message_type: Option<String>,
    /// Set by the publisher; the broker checks it names the publishing user.
    pub user_id: Option<String>,
    pub app_id: Option<String>,
    pub cluster_id: Option<String>,
}

fn opt_str(s: &Option<ShortString>) -> Option<String> {
    s.as_ref().map(|s| s.as_str().to_owned())
}

impl From<&BasicProperties> for MessageProps {
    fn from(p: &BasicProperties) -> Self {
        MessageProps {
            content_type: opt_str(p.content_type()),
            content_encoding: opt_str(p.content_encoding()),
            headers: p
                .headers()
                .as_ref()
                .map(from_field_table)
                .unwrap_or_default(),
            delivery_mode: *p.delivery_mode(),
            priority: *p.priority(),
            correlation_id: opt_str(p.correlation_id()),
            reply_to: opt_str(p.reply_to()),
            expiration: opt_str(p.expiration()),
            message_id: opt_str(p.message_id()),
            timestamp: *p.timestamp(),
            message_type: opt_str(p.kind()),
            user_id: opt_str(p.user_id()),
            app_id: opt_str(p.app_id()),
            cluster_id: opt_str(p.cluster_id()),
        }
    }
}

impl MessageProps {
    /// The lapin properties to publish these with. An empty header table is left out;
    /// `user_id` only when `keep_user_id` (the broker refuses another user's id).
    pub(crate) fn to_basic(&self, keep_user_id: bool) -> BasicProperties {
        let mut p = BasicProperties::default().with_delivery_mode(self.delivery_mode.unwrap_or(2));
        let s = |v: &String| short_lossy(v);
        if let Some(v) = &self.content_type {
            p = p.with_content_type(s(v));
        }
        if let Some(v) = &self.content_encoding {
            p = p.with_content_encoding(s(v));
        }
        if !self.headers.is_empty() {
            p = p.with_headers(to_field_table(&self.headers));
        }
        if let Some(v) = self.priority {
            p = p.with_priority(v);
        }
        if let Some(v) = &self.correlation_id {
            p = p.with_correlation_id(s(v));
        }
        if let Some(v) = &self.reply_to {
            p = p.with_reply_to(s(v));
        }
        if let Some(v) = &self.expiration {
            p = p.with_expiration(s(v));
        }
        if let Some(v) = &self.message_id {
            p = p.with_message_id(s(v));
        }
        if let Some(v) = self.timestamp {
            p = p.with_timestamp(v);
        }
        if let Some(v) = &self.message_type {
            p = p.with_type(s(v));
        }
        if let (true, Some(v)) = (keep_user_id, &self.user_id) {
            p = p.with_user_id(s(v));
        }
        if let Some(v) = &self.app_id {
            p = p.with_app_id(s(v));
        }
        if let Some(v) = &self.cluster_id {
            p = p.with_cluster_id(s(v));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Headers {
        let report: Headers = [
            ("code", HeaderValue::Int(201)),
            ("message", "Downloaded".into()),
        ]
        .into_iter()
        .collect();
        Headers(vec![
            ("b_long".into(), HeaderValue::Str("x".repeat(400))),
            ("c_float".into(), HeaderValue::Float(0.25)),
            ("d_bool".into(), HeaderValue::Bool(true)),
            ("e_bytes".into(), HeaderValue::Bytes(vec![0xff, 0x00, 0xfe])),
            (
                "f_array".into(),
                HeaderValue::Array(vec![HeaderValue::Int(-1), "two".into(), HeaderValue::Void]),
            ),
            ("g_report".into(), HeaderValue::Table(report)),
            ("h_void".into(), HeaderValue::Void),
            ("i_int".into(), HeaderValue::Int(i64::MIN)),
        ])
    }

    #[test]
    fn headers_round_trip() {
        let h = sample();
        assert_eq!(from_field_table(&to_field_table(&h)), h);
    }

    #[test]
    fn foreign_kinds_become_core_values() {
        let mut t = FieldTable::default();
        t.insert(
            "dec".into(),
            AMQPValue::DecimalValue(lapin::types::DecimalValue { scale: 3, value: 5 }),
        );
        t.insert("f32".into(), AMQPValue::Float(1.5));
        t.insert("short".into(), AMQPValue::ShortString("hi".into()));
        t.insert("ts".into(), AMQPValue::Timestamp(1_700_000_000));
        t.insert("u8".into(), AMQPValue::ShortShortUInt(200));
        t.insert("xbytes".into(), AMQPValue::ByteArray(vec![1, 2].into()));
        let h = from_field_table(&t);
        assert_eq!(h.get("dec"), Some(&HeaderValue::Str("0.005".into())));
        assert_eq!(h.get("f32"), Some(&HeaderValue::Float(1.5)));
        assert_eq!(h.get_str("short"), Some("hi"));
        assert_eq!(h.get("ts"), Some(&HeaderValue::Int(1_700_000_000)));
        assert_eq!(h.get("u8"), Some(&HeaderValue::Int(200)));
        assert_eq!(h.get("xbytes"), Some(&HeaderValue::Bytes(vec![1, 2])));
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(decimal_text(12345, 2), "123.45");
        assert_eq!(decimal_text(7, 0), "7");
        assert_eq!(decimal_text(7, 2), "0.07");
    }

    #[test]
    fn long_keys_and_values_never_panic() {
        let key = "é".repeat(200); // 400 bytes
        let h: Headers = [(key.as_str(), "v")].into_iter().collect();
        let t = to_field_table(&h);
        let (k, _) = t.inner().iter().next().unwrap();
        assert!(k.as_str().len() <= MAX_SHORT);
        assert!(short_name(&"q".repeat(256), "queue").is_err());
        // Cut for the message on a character boundary, never inside a character.
        for name in [
            "€".repeat(100),
            format!("a{}", "€".repeat(100)),
            "é\n".repeat(200),
        ] {
            let e = short_name(&name, "exchange").unwrap_err().to_string();
            assert!(e.contains("exchange name is") && !e.contains('\n'), "{e}");
        }
        assert_eq!(short_lossy(&"k".repeat(300)).as_str().len(), 255);
        let props = MessageProps {
            message_id: Some("m".repeat(999)),
            ..Default::default()
        };
        let _ = props.to_basic(true);
    }

    #[test]
    fn props_round_trip() {
        let props = MessageProps {
            content_type: Some("text/plain".into()),
            content_encoding: Some("utf-8".into()),
            headers: sample(),
            delivery_mode: Some(1),
            priority: Some(3),
            correlation_id: Some("c".into()),
            reply_to: Some("r".into()),
            expiration: Some("60000".into()),
            message_id: Some("m".into()),
            timestamp: Some(1_700_000_000),
            message_type: Some("t".into()),
            user_id: Some("u".into()),
            app_id: Some("a".into()),
            cluster_id: Some("k".into()),
        };
        assert_eq!(MessageProps::from(&props.to_basic(true)), props);
        let without = MessageProps::from(&props.to_basic(false));
        assert_eq!(without.user_id, None);
        assert_eq!(
            MessageProps::default().to_basic(true).delivery_mode(),
            &Some(2)
        );
    }
}
