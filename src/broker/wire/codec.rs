//! AMQP 0-9-1 frames, pure: bytes in, values out, and values to bytes. Only what `route`'s
//! hot path speaks (connection handshake, channels, qos, consume, deliver, publish,
//! confirms, acks, returns, closes, heartbeats).
//!
//! Everything the broker passes on comes from hostile publishers: header tables and
//! property strings are kept as **bytes** (a long string need not be UTF-8), every length
//! is checked against what is left, nesting is bounded, and nothing here panics. Header
//! tables are kept raw ([`RawTable`]) so that a forwarded message keeps every value with
//! its exact AMQP type; [`RawTable::headers`] decodes them for the core.

use crate::core::{HeaderValue, Headers};

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;
/// What a client sends first.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// The smallest frame size a peer must accept (AMQP 0-9-1 §4.2.3).
pub const FRAME_MIN: u32 = 4096;
/// Frame header (7) + frame end (1).
pub const FRAME_OVERHEAD: usize = 8;
/// Nested tables and arrays deeper than this are refused (a hostile header would
/// otherwise recurse as deep as the frame is long).
pub const MAX_DEPTH: usize = 32;

/// Why bytes could not be read as AMQP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("frame of {size} bytes, over the negotiated maximum {max}")]
    FrameTooLarge { size: usize, max: usize },
    #[error("frame does not end with 0xCE")]
    BadFrameEnd,
    #[error("unknown field type {0:#04x}")]
    UnknownFieldType(u8),
    #[error("header tables nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("unexpected method {0}.{1}")]
    UnexpectedMethod(u16, u16),
    #[error("a name or key over 255 bytes")]
    TooLong,
}

/// One frame, its payload borrowed from the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: u8,
    pub channel: u16,
    pub payload: &'a [u8],
}

/// The next complete frame at the start of `buf` and its total length, or `None` when more
/// bytes are needed.
pub fn parse_frame(buf: &[u8], max: usize) -> Result<Option<(Frame<'_>, usize)>, CodecError> {
    if buf.len() < 7 {
        return Ok(None);
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if size + FRAME_OVERHEAD > max.max(FRAME_MIN as usize) {
        return Err(CodecError::FrameTooLarge { size, max });
    }
    let total = 7 + size + 1;
    if buf.len() < total {
        return Ok(None);
    }
    if buf[total - 1] != FRAME_END {
        return Err(CodecError::BadFrameEnd);
    }
    Ok(Some((
        Frame {
            kind,
            channel,
            payload: &buf[7..7 + size],
        },
        total,
    )))
}

/// A cursor over a payload; every read checks what is left.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        if self.buf.len() < n {
            return Err(CodecError::Truncated(what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1, "octet")?[0])
    }

    pub fn u16(&mut self) -> Result<u16, CodecError> {
        let b = self.take(2, "short")?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, CodecError> {
        let b = self.take(4, "long")?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, CodecError> {
        let b = self.take(8, "long long")?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    pub fn shortstr(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u8()? as usize;
        self.take(n, "short string")
    }

    pub fn longstr(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u32()? as usize;
        self.take(n, "long string")
    }

    /// A field table's bytes (without its length prefix).
    pub fn table(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u32()? as usize;
        self.take(n, "field table")
    }

    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Appends AMQP values.
pub trait Writer {
    fn u8(&mut self, v: u8);
    fn u16(&mut self, v: u16);
    fn u32(&mut self, v: u32);
    fn u64(&mut self, v: u64);
    /// Cut at 255 bytes (callers check names before; routing keys are cut on a UTF-8
    /// boundary by the caller).
    fn shortstr(&mut self, s: &[u8]);
    fn longstr(&mut self, s: &[u8]);
}

impl Writer for Vec<u8> {
    fn u8(&mut self, v: u8) {
        self.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn shortstr(&mut self, s: &[u8]) {
        let s = &s[..s.len().min(255)];
        self.push(s.len() as u8);
        self.extend_from_slice(s);
    }
    fn longstr(&mut self, s: &[u8]) {
        self.u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
        self.extend_from_slice(&s[..s.len().min(u32::MAX as usize)]);
    }
}

/// Writes one frame around whatever `body` appends.
pub fn write_frame(out: &mut Vec<u8>, kind: u8, channel: u16, body: impl FnOnce(&mut Vec<u8>)) {
    out.push(kind);
    out.u16(channel);
    let len_at = out.len();
    out.u32(0);
    let start = out.len();
    body(out);
    let len = (out.len() - start) as u32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
    out.push(FRAME_END);
}

/// Writes a method frame.
pub fn write_method(
    out: &mut Vec<u8>,
    channel: u16,
    class: u16,
    method: u16,
    args: impl FnOnce(&mut Vec<u8>),
) {
    write_frame(out, FRAME_METHOD, channel, |b| {
        b.u16(class);
        b.u16(method);
        args(b);
    });
}

pub fn write_heartbeat(out: &mut Vec<u8>) {
    write_frame(out, FRAME_HEARTBEAT, 0, |_| {});
}

// ---- field tables ----

/// A header table kept as its entries' raw bytes, so re-encoding keeps every value's exact
/// AMQP type; the core's [`Headers`] are decoded from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawTable {
    /// (key, type tag + value bytes)
    entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl RawTable {
    /// Splits a table's bytes into entries, checking every value (types, lengths, depth).
    pub fn parse(bytes: &[u8]) -> Result<RawTable, CodecError> {
        let mut r = Reader::new(bytes);
        let mut entries = Vec::new();
        while !r.rest().is_empty() {
            let key = r.shortstr()?.to_vec();
            let before = r.rest();
            skip_value(&mut r, 0)?;
            let used = before.len() - r.rest().len();
            entries.push((key, before[..used].to_vec()));
        }
        Ok(RawTable { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops `key` (all occurrences).
    pub fn remove(&mut self, key: &str) {
        self.entries.retain(|(k, _)| k != key.as_bytes());
    }

    /// Sets `key` to `value` (replacing earlier entries of that key).
    pub fn set(&mut self, key: &str, value: &HeaderValue) {
        self.remove(key);
        let mut v = Vec::new();
        encode_value(&mut v, value, 0);
        self.entries
            .push((key.as_bytes()[..key.len().min(255)].to_vec(), v));
    }

    /// Appends the table with its length prefix.
    pub fn write(&self, out: &mut Vec<u8>) {
        let at = out.len();
        out.u32(0);
        let start = out.len();
        for (k, v) in &self.entries {
            out.shortstr(k);
            out.extend_from_slice(v);
        }
        let len = (out.len() - start) as u32;
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// The core's view: strings that are UTF-8 as `Str`, other long strings as `Bytes`,
    /// every integer kind and timestamps as `Int`, decimals as their exact text.
    pub fn headers(&self) -> Headers {
        let mut h = Headers(Vec::with_capacity(self.entries.len()));
        for (k, v) in &self.entries {
            let mut r = Reader::new(v);
            // Checked by `parse`; a failure here is impossible, and harmless (Void).
            let value = decode_value(&mut r, 0).unwrap_or(HeaderValue::Void);
            h.0.push((text(k), value));
        }
        h
    }
}

fn skip_value(r: &mut Reader<'_>, depth: usize) -> Result<(), CodecError> {
    if depth > MAX_DEPTH {
        return Err(CodecError::TooDeep);
    }
    match r.u8()? {
        b't' | b'b' | b'B' => drop(r.u8()?),
        b's' | b'u' => drop(r.u16()?),
        b'I' | b'i' | b'f' => drop(r.u32()?),
        b'l' | b'd' | b'T' => drop(r.u64()?),
        b'D' => {
            r.u8()?;
            r.u32()?;
        }
        b'S' | b'x' => drop(r.longstr()?),
        b'A' => {
            let mut inner = Reader::new(r.table()?);
            while !inner.rest().is_empty() {
                skip_value(&mut inner, depth + 1)?;
            }
        }
        b'F' => {
            let mut inner = Reader::new(r.table()?);
            while !inner.rest().is_empty() {
                inner.shortstr()?;
                skip_value(&mut inner, depth + 1)?;
            }
        }
        b'V' => {}
        other => return Err(CodecError::UnknownFieldType(other)),
    }
    Ok(())
}

fn decode_value(r: &mut Reader<'_>, depth: usize) -> Result<HeaderValue, CodecError> {
    if depth > MAX_DEPTH {
        return Err(CodecError::TooDeep);
    }
    Ok(match r.u8()? {
        b't' => HeaderValue::Bool(r.u8()? != 0),
        b'b' => HeaderValue::Int(i64::from(r.u8()? as i8)),
        b'B' => HeaderValue::Int(i64::from(r.u8()?)),
        b's' => HeaderValue::Int(i64::from(r.u16()? as i16)),
        b'u' => HeaderValue::Int(i64::from(r.u16()?)),
        b'I' => HeaderValue::Int(i64::from(r.u32()? as i32)),
        b'i' => HeaderValue::Int(i64::from(r.u32()?)),
        b'l' => HeaderValue::Int(r.u64()? as i64),
        b'T' => HeaderValue::Int(i64::try_from(r.u64()?).unwrap_or(i64::MAX)),
        b'f' => HeaderValue::Float(f64::from(f32::from_bits(r.u32()?))),
        b'd' => HeaderValue::Float(f64::from_bits(r.u64()?)),
        b'D' => {
            let scale = r.u8()?;
            let value = r.u32()?;
            HeaderValue::Str(decimal_text(value, scale))
        }
        b'S' => {
            let b = r.longstr()?;
            match std::str::from_utf8(b) {
                Ok(s) => HeaderValue::Str(s.to_owned()),
                Err(_) => HeaderValue::Bytes(b.to_vec()),
            }
        }
        b'x' => HeaderValue::Bytes(r.longstr()?.to_vec()),
        b'A' => {
            let mut inner = Reader::new(r.table()?);
            let mut items = Vec::new();
            while !inner.rest().is_empty() {
                items.push(decode_value(&mut inner, depth + 1)?);
            }
            HeaderValue::Array(items)
        }
        b'F' => {
            let mut inner = Reader::new(r.table()?);
            let mut t = Headers::new();
            while !inner.rest().is_empty() {
                let k = text(inner.shortstr()?);
                let v = decode_value(&mut inner, depth + 1)?;
                t.0.push((k, v));
            }
            HeaderValue::Table(t)
        }
        b'V' => HeaderValue::Void,
        other => return Err(CodecError::UnknownFieldType(other)),
    })
}

/// `value / 10^scale` written exactly: (12345, 2) → "123.45".
fn decimal_text(value: u32, scale: u8) -> String {
    let digits = value.to_string();
    let scale = usize::from(scale.min(30));
    if scale == 0 {
        return digits;
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{int}.{frac}")
}

fn encode_value(out: &mut Vec<u8>, v: &HeaderValue, depth: usize) {
    match v {
        HeaderValue::Str(s) => {
            out.u8(b'S');
            out.longstr(s.as_bytes());
        }
        HeaderValue::Bytes(b) => {
            out.u8(b'S');
            out.longstr(b);
        }
        HeaderValue::Int(i) => {
            out.u8(b'l');
            out.u64(*i as u64);
        }
        HeaderValue::Float(f) => {
            out.u8(b'd');
            out.u64(f.to_bits());
        }
        HeaderValue::Bool(b) => {
            out.u8(b't');
            out.u8(u8::from(*b));
        }
        HeaderValue::Void => out.u8(b'V'),
        // Our own values are shallow; deeper ones are written as void rather than recurse.
        HeaderValue::Array(_) | HeaderValue::Table(_) if depth >= MAX_DEPTH => out.u8(b'V'),
        HeaderValue::Array(items) => {
            out.u8(b'A');
            let at = out.len();
            out.u32(0);
            let start = out.len();
            for i in items {
                encode_value(out, i, depth + 1);
            }
            let len = (out.len() - start) as u32;
            out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
        HeaderValue::Table(t) => {
            out.u8(b'F');
            let at = out.len();
            out.u32(0);
            let start = out.len();
            for (k, v) in t.iter() {
                out.shortstr(k.as_bytes());
                encode_value(out, v, depth + 1);
            }
            let len = (out.len() - start) as u32;
            out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
    }
}

/// Encodes `h` as a table (client properties, consume arguments).
pub fn write_headers(out: &mut Vec<u8>, h: &Headers) {
    let mut t = RawTable::default();
    for (k, v) in h.iter() {
        t.set(k, v);
    }
    t.write(out);
}

// ---- content ----

/// The basic class's message properties, each as received (strings as bytes).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Properties {
    pub content_type: Option<Vec<u8>>,
    pub content_encoding: Option<Vec<u8>>,
    pub headers: Option<RawTable>,
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    pub correlation_id: Option<Vec<u8>>,
    pub reply_to: Option<Vec<u8>>,
    pub expiration: Option<Vec<u8>>,
    pub message_id: Option<Vec<u8>>,
    pub timestamp: Option<u64>,
    pub kind: Option<Vec<u8>>,
    pub user_id: Option<Vec<u8>>,
    pub app_id: Option<Vec<u8>>,
    pub cluster_id: Option<Vec<u8>>,
}

impl Properties {
    /// Reads the property list of a content header (after class, weight and body size).
    pub fn parse(r: &mut Reader<'_>) -> Result<Properties, CodecError> {
        let flags = r.u16()?;
        // More flag words may follow (bit 0): the basic class has none, skip them.
        let mut more = flags & 1 == 1;
        while more {
            more = r.u16()? & 1 == 1;
        }
        let mut p = Properties::default();
        let mut bit = 15;
        let mut has = || {
            let set = flags & (1 << bit) != 0;
            bit -= 1;
            set
        };
        let sstr = |r: &mut Reader<'_>| r.shortstr().map(<[u8]>::to_vec);
        if has() {
            p.content_type = Some(sstr(r)?);
        }
        if has() {
            p.content_encoding = Some(sstr(r)?);
        }
        if has() {
            p.headers = Some(RawTable::parse(r.table()?)?);
        }
        if has() {
            p.delivery_mode = Some(r.u8()?);
        }
        if has() {
            p.priority = Some(r.u8()?);
        }
        if has() {
            p.correlation_id = Some(sstr(r)?);
        }
        if has() {
            p.reply_to = Some(sstr(r)?);
        }
        if has() {
            p.expiration = Some(sstr(r)?);
        }
        if has() {
            p.message_id = Some(sstr(r)?);
        }
        if has() {
            p.timestamp = Some(r.u64()?);
        }
        if has() {
            p.kind = Some(sstr(r)?);
        }
        if has() {
            p.user_id = Some(sstr(r)?);
        }
        if has() {
            p.app_id = Some(sstr(r)?);
        }
        if has() {
            p.cluster_id = Some(sstr(r)?);
        }
        Ok(p)
    }

    /// Writes the property flags and list.
    pub fn write(&self, out: &mut Vec<u8>) {
        let present = [
            self.content_type.is_some(),
            self.content_encoding.is_some(),
            self.headers.is_some(),
            self.delivery_mode.is_some(),
            self.priority.is_some(),
            self.correlation_id.is_some(),
            self.reply_to.is_some(),
            self.expiration.is_some(),
            self.message_id.is_some(),
            self.timestamp.is_some(),
            self.kind.is_some(),
            self.user_id.is_some(),
            self.app_id.is_some(),
            self.cluster_id.is_some(),
        ];
        let mut flags = 0u16;
        for (i, p) in present.iter().enumerate() {
            if *p {
                flags |= 1 << (15 - i);
            }
        }
        out.u16(flags);
        let s = |out: &mut Vec<u8>, v: &Option<Vec<u8>>| {
            if let Some(v) = v {
                out.shortstr(v);
            }
        };
        s(out, &self.content_type);
        s(out, &self.content_encoding);
        if let Some(h) = &self.headers {
            h.write(out);
        }
        if let Some(v) = self.delivery_mode {
            out.u8(v);
        }
        if let Some(v) = self.priority {
            out.u8(v);
        }
        s(out, &self.correlation_id);
        s(out, &self.reply_to);
        s(out, &self.expiration);
        s(out, &self.message_id);
        if let Some(v) = self.timestamp {
            out.u64(v);
        }
        s(out, &self.kind);
        s(out, &self.user_id);
        s(out, &self.app_id);
        s(out, &self.cluster_id);
    }

    fn str_of(v: &Option<Vec<u8>>) -> Option<&str> {
        v.as_deref().and_then(|b| std::str::from_utf8(b).ok())
    }

    pub fn content_type_str(&self) -> Option<&str> {
        Self::str_of(&self.content_type)
    }

    pub fn user_id_str(&self) -> Option<&str> {
        Self::str_of(&self.user_id)
    }
}

/// A content header: body size and properties.
#[derive(Debug, Clone, PartialEq)]
pub struct ContentHeader {
    pub body_size: u64,
    pub properties: Properties,
}

pub fn parse_content_header(payload: &[u8]) -> Result<ContentHeader, CodecError> {
    let mut r = Reader::new(payload);
    let _class = r.u16()?;
    let _weight = r.u16()?;
    let body_size = r.u64()?;
    let properties = Properties::parse(&mut r)?;
    Ok(ContentHeader {
        body_size,
        properties,
    })
}

/// One message to publish.
pub struct Publish<'a> {
    pub exchange: &'a [u8],
    pub routing_key: &'a [u8],
    pub mandatory: bool,
    pub properties: &'a Properties,
    pub body: &'a [u8],
}

/// `basic.publish` + content header + body frames (split at `frame_max`).
pub fn write_publish(out: &mut Vec<u8>, channel: u16, m: &Publish<'_>, frame_max: usize) {
    write_method(out, channel, 60, 40, |b| {
        b.u16(0);
        b.shortstr(m.exchange);
        b.shortstr(m.routing_key);
        b.u8(u8::from(m.mandatory));
    });
    write_frame(out, FRAME_HEADER, channel, |b| {
        b.u16(60);
        b.u16(0);
        b.u64(m.body.len() as u64);
        m.properties.write(b);
    });
    let chunk = frame_max.max(FRAME_MIN as usize) - FRAME_OVERHEAD;
    for part in m.body.chunks(chunk) {
        write_frame(out, FRAME_BODY, channel, |b| b.extend_from_slice(part));
    }
}

// ---- methods ----

/// The methods the broker sends that the hot path handles.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    ConnectionStart {
        mechanisms: String,
    },
    ConnectionTune {
        channel_max: u16,
        frame_max: u32,
        heartbeat: u16,
    },
    ConnectionOpenOk,
    ConnectionClose {
        code: u16,
        text: String,
    },
    ConnectionCloseOk,
    ConnectionBlocked {
        reason: String,
    },
    ConnectionUnblocked,
    ChannelOpenOk,
    ChannelFlow {
        active: bool,
    },
    ChannelClose {
        code: u16,
        text: String,
    },
    ChannelCloseOk,
    QosOk,
    ConsumeOk,
    Cancel {
        consumer_tag: String,
    },
    CancelOk,
    Deliver {
        delivery_tag: u64,
        redelivered: bool,
        exchange: String,
        routing_key: String,
    },
    Return {
        code: u16,
        text: String,
        exchange: String,
        routing_key: String,
    },
    Ack {
        tag: u64,
        multiple: bool,
    },
    Nack {
        tag: u64,
        multiple: bool,
    },
    SelectOk,
    Other {
        class: u16,
        method: u16,
    },
}

pub fn parse_method(payload: &[u8]) -> Result<Method, CodecError> {
    let mut r = Reader::new(payload);
    let class = r.u16()?;
    let method = r.u16()?;
    let s = |b: &[u8]| text(b);
    Ok(match (class, method) {
        (10, 10) => {
            r.u8()?;
            r.u8()?;
            r.table()?;
            Method::ConnectionStart {
                mechanisms: s(r.longstr()?),
            }
        }
        (10, 30) => Method::ConnectionTune {
            channel_max: r.u16()?,
            frame_max: r.u32()?,
            heartbeat: r.u16()?,
        },
        (10, 41) => Method::ConnectionOpenOk,
        (10, 50) => Method::ConnectionClose {
            code: r.u16()?,
            text: s(r.shortstr()?),
        },
        (10, 51) => Method::ConnectionCloseOk,
        (10, 60) => Method::ConnectionBlocked {
            reason: s(r.shortstr()?),
        },
        (10, 61) => Method::ConnectionUnblocked,
        (20, 11) => Method::ChannelOpenOk,
        (20, 20) => Method::ChannelFlow {
            active: r.u8()? & 1 == 1,
        },
        (20, 40) => Method::ChannelClose {
            code: r.u16()?,
            text: s(r.shortstr()?),
        },
        (20, 41) => Method::ChannelCloseOk,
        (60, 11) => Method::QosOk,
        (60, 21) => Method::ConsumeOk,
        (60, 30) => Method::Cancel {
            consumer_tag: s(r.shortstr()?),
        },
        (60, 31) => Method::CancelOk,
        (60, 50) => Method::Return {
            code: r.u16()?,
            text: s(r.shortstr()?),
            exchange: s(r.shortstr()?),
            routing_key: s(r.shortstr()?),
        },
        (60, 60) => {
            r.shortstr()?;
            Method::Deliver {
                delivery_tag: r.u64()?,
                redelivered: r.u8()? & 1 == 1,
                exchange: s(r.shortstr()?),
                routing_key: s(r.shortstr()?),
            }
        }
        (60, 80) => Method::Ack {
            tag: r.u64()?,
            multiple: r.u8()? & 1 == 1,
        },
        (60, 120) => Method::Nack {
            tag: r.u64()?,
            multiple: r.u8()? & 1 == 1,
        },
        (85, 11) => Method::SelectOk,
        (class, method) => Method::Other { class, method },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip_and_need_their_end() {
        let mut out = Vec::new();
        write_method(&mut out, 3, 60, 80, |b| {
            b.u64(42);
            b.u8(1);
        });
        let (f, n) = parse_frame(&out, 131072).unwrap().unwrap();
        assert_eq!((f.kind, f.channel, n), (FRAME_METHOD, 3, out.len()));
        assert_eq!(
            parse_method(f.payload).unwrap(),
            Method::Ack {
                tag: 42,
                multiple: true
            }
        );
        for cut in 0..out.len() {
            assert_eq!(parse_frame(&out[..cut], 131072).unwrap(), None);
        }
        let mut bad = out.clone();
        *bad.last_mut().unwrap() = 0;
        assert_eq!(parse_frame(&bad, 131072), Err(CodecError::BadFrameEnd));
        let huge = [1, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            parse_frame(&huge, 131072),
            Err(CodecError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn headers_keep_their_types_and_bytes() {
        // A table as another client wrote it: a short-short, a non-UTF-8 long string, a
        // decimal, a timestamp, a nested table, an array.
        let mut raw = Vec::new();
        for (k, v) in [
            (&b"b"[..], &[b'b', 0xff][..]),
            (b"bin", &[b'S', 0, 0, 0, 2, 0xff, 0xfe]),
            (b"dec", &[b'D', 2, 0, 0, 0x30, 0x39]),
            (b"ts", &[b'T', 0, 0, 0, 0, 0x65, 0x92, 0x00, 0x80]),
            (b"t", &[b'F', 0, 0, 0, 4, 1, b'k', b't', 1]),
            (b"a", &[b'A', 0, 0, 0, 3, b't', 0, b'V']),
        ] {
            raw.shortstr(k);
            raw.extend_from_slice(v);
        }
        let t = RawTable::parse(&raw).unwrap();
        let h = t.headers();
        assert_eq!(h.get("b"), Some(&HeaderValue::Int(-1)));
        assert_eq!(h.get("bin"), Some(&HeaderValue::Bytes(vec![0xff, 0xfe])));
        assert_eq!(h.get("dec"), Some(&HeaderValue::Str("123.45".into())));
        assert_eq!(h.get("ts"), Some(&HeaderValue::Int(0x6592_0080)));
        let mut out = Vec::new();
        t.write(&mut out);
        assert_eq!(&out[4..], &raw[..], "re-encoded byte for byte");
        // Setting replaces; removing removes.
        let mut t = t;
        t.set("b", &HeaderValue::Str("x".into()));
        t.remove("bin");
        let h = t.headers();
        assert_eq!(h.get("b"), Some(&HeaderValue::Str("x".into())));
        assert!(h.get("bin").is_none());
    }

    #[test]
    fn hostile_tables_are_errors_not_panics() {
        let deep: Vec<u8> = {
            // 40 nested arrays.
            let mut v = vec![b'V'];
            for _ in 0..40 {
                let mut w = vec![b'A'];
                w.extend_from_slice(&(v.len() as u32).to_be_bytes());
                w.extend_from_slice(&v);
                v = w;
            }
            let mut t = Vec::new();
            t.shortstr(b"k");
            t.extend_from_slice(&v);
            t
        };
        assert_eq!(RawTable::parse(&deep), Err(CodecError::TooDeep));
        assert!(RawTable::parse(&[1, b'k', b'Z']).is_err());
        assert!(RawTable::parse(&[1, b'k', b'S', 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn properties_round_trip() {
        let mut t = RawTable::default();
        t.set("pumpwatch_hops", &HeaderValue::Int(0));
        let p = Properties {
            content_type: Some(b"text/plain".to_vec()),
            headers: Some(t),
            delivery_mode: Some(2),
            timestamp: Some(7),
            user_id: Some(vec![0xff]),
            cluster_id: Some(b"c".to_vec()),
            ..Properties::default()
        };
        let mut out = Vec::new();
        p.write(&mut out);
        let back = Properties::parse(&mut Reader::new(&out)).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.user_id_str(), None);
        assert_eq!(back.content_type_str(), Some("text/plain"));
    }

    #[test]
    fn publish_splits_the_body_into_frames() {
        let body = vec![7u8; 10_000];
        let mut out = Vec::new();
        let props = Properties::default();
        let m = Publish {
            exchange: b"xreport",
            routing_key: b"v02.report.a",
            mandatory: true,
            properties: &props,
            body: &body,
        };
        write_publish(&mut out, 2, &m, 4096);
        let mut at = 0;
        let mut kinds = Vec::new();
        let mut got = Vec::new();
        while let Some((f, n)) = parse_frame(&out[at..], 4096).unwrap() {
            kinds.push(f.kind);
            if f.kind == FRAME_BODY {
                got.extend_from_slice(f.payload);
            }
            at += n;
        }
        assert_eq!(at, out.len());
        assert_eq!(kinds, [1, 2, 3, 3, 3]);
        assert_eq!(got, body);
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_frame(&bytes, 4096);
            let _ = parse_method(&bytes);
            let _ = parse_content_header(&bytes);
            if let Ok(t) = RawTable::parse(&bytes) {
                let _ = t.headers();
                let mut out = Vec::new();
                t.write(&mut out);
                prop_assert_eq!(&out[4..], &bytes[..]);
            }
        }

        #[test]
        fn header_values_round_trip(s in ".{0,40}", i in any::<i64>(), b in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut t = RawTable::default();
            t.set("s", &HeaderValue::Str(s.clone()));
            t.set("i", &HeaderValue::Int(i));
            t.set("a", &HeaderValue::Array(vec![HeaderValue::Str(s.clone()), HeaderValue::Int(i)]));
            let mut out = Vec::new();
            t.write(&mut out);
            let back = RawTable::parse(&out[4..]).unwrap().headers();
            prop_assert_eq!(back.get("s"), Some(&HeaderValue::Str(s.clone())));
            prop_assert_eq!(back.get("i"), Some(&HeaderValue::Int(i)));
            let mut t = RawTable::default();
            t.set("b", &HeaderValue::Bytes(b.clone()));
            let mut out = Vec::new();
            t.write(&mut out);
            let back = RawTable::parse(&out[4..]).unwrap().headers();
            let want = match std::str::from_utf8(&b) {
                Ok(s) => HeaderValue::Str(s.to_owned()),
                Err(_) => HeaderValue::Bytes(b.clone()),
            };
            prop_assert_eq!(back.get("b"), Some(&want));
        }
    }
}
