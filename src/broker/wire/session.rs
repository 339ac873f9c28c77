//! One AMQP connection driven by its caller's task: reads, writes, heartbeats and the
//! two channels (consume, confirmed publish) of `route`'s hot path.

use super::codec::{
    self, CodecError, FRAME_BODY, FRAME_HEADER, FRAME_METHOD, Method, PROTOCOL_HEADER, Properties,
    Writer, parse_content_header, parse_frame, parse_method, write_heartbeat, write_method,
    write_publish,
};
use crate::broker::url::BrokerUrl;
use crate::core::{HeaderValue, Headers};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Instant;

/// How long connecting and the handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the session ended. Every variant ends the connection: the caller reconnects, and
/// the broker redelivers whatever was not acked.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("connection lost: {0}")]
    Io(String),
    #[error("protocol error: {0}")]
    Codec(#[from] CodecError),
    #[error("the broker closed the connection: {code} {text}")]
    Closed { code: u16, text: String },
    #[error("the broker closed the consumer's channel: {code} {text}")]
    ConsumerClosed { code: u16, text: String },
    #[error("the broker cancelled the consumer (queue deleted?)")]
    Cancelled,
    #[error("no heartbeat from the broker for {0:?}")]
    HeartbeatTimeout(Duration),
    #[error("{0}")]
    Refused(String),
}

impl WireError {
    /// True when logging in itself was refused (bad credentials, vhost): not worth a fast
    /// retry, and a command should say so.
    pub fn is_refused(&self) -> bool {
        matches!(self, WireError::Refused(_))
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A message delivered to the consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub tag: u64,
    pub redelivered: bool,
    pub exchange: String,
    pub routing_key: String,
    pub properties: Properties,
    /// The headers as the core reads them.
    pub headers: Headers,
    /// At most the session's `max_keep` bytes of the body.
    pub body: Vec<u8>,
    /// The body's size as sent; more than `body.len()` when it was cut.
    pub body_size: u64,
    /// The properties could not be read (hostile or broken): `properties` and `headers`
    /// are empty and the message can only be rejected.
    pub bad_properties: Option<CodecError>,
}

impl Delivery {
    pub fn truncated(&self) -> bool {
        self.body_size > self.body.len() as u64
    }
}

/// What [`Session::next_events`] found.
#[derive(Debug, Clone)]
pub enum Event {
    Delivery(Box<Delivery>),
    /// The broker confirmed (`ok`) or refused publishes up to `seq` (one, or all not yet
    /// settled up to it when `multiple`). Sequence numbers are the session's own, across
    /// publish channels.
    Confirm {
        seq: u64,
        multiple: bool,
        ok: bool,
    },
    /// A `mandatory` publish no queue took (it is confirmed after this).
    Returned {
        code: u16,
        text: String,
        exchange: String,
        routing_key: String,
    },
    /// The broker closed the publishing channel (e.g. an exchange deleted, a permission
    /// taken away): every publish not yet confirmed, up to `last_seq`, will never be. A
    /// new channel is opened; later publishes go there.
    PublishRefused {
        code: u16,
        text: String,
        last_seq: u64,
    },
    /// `connection.blocked` (resource alarm) or unblocked.
    Blocked(bool),
}

/// A message being assembled from its frames: the `basic.deliver` or `basic.return` that
/// announced it, then its properties and body.
struct Partial {
    method: Method,
    properties: Option<Result<Properties, CodecError>>,
    body_size: u64,
    received: u64,
    body: Vec<u8>,
}

impl Partial {
    fn new(method: Method) -> Partial {
        Partial {
            method,
            properties: None,
            body_size: 0,
            received: 0,
            body: Vec::new(),
        }
    }
}

/// The state of the publishing channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PubState {
    Ready,
    /// channel.open sent; confirm.select follows open-ok.
    Opening,
    /// confirm.select sent.
    Selecting,
}

pub struct Session {
    reader: ReadHalf<Box<dyn Io>>,
    writer: WriteHalf<Box<dyn Io>>,
    /// Read bytes are `rbuf[rpos..rlen]`; the rest of `rbuf` is room to read into.
    rbuf: Vec<u8>,
    rpos: usize,
    rlen: usize,
    wbuf: Vec<u8>,
    /// Publishes waiting for the publishing channel to be ready again.
    deferred: Vec<u8>,
    frame_max: usize,
    heartbeat: Option<Duration>,
    last_read: Instant,
    last_write: Instant,
    consume_ch: u16,
    publish_ch: u16,
    next_channel: u16,
    channel_max: u16,
    pub_state: PubState,
    /// Global sequence number of the next publish.
    next_seq: u64,
    /// Global sequence number before the current channel's first publish.
    seq_base: u64,
    /// Messages being assembled: a delivery on the consuming channel, a return on the
    /// publishing one (frames of different channels may interleave).
    delivering: Option<Partial>,
    returning: Option<Partial>,
    /// Every frame of the content of a message is read, but at most this much body kept.
    max_keep: usize,
    /// The consumer's tag, to cancel it.
    consumer_tag: String,
    url: String,
}

impl Session {
    /// Connects, logs in, opens a consuming and a confirmed publishing channel. Bodies of
    /// delivered messages are kept up to `max_keep` bytes (the rest is read and dropped).
    /// With several hosts in `url`, tries them in turn from the first.
    pub async fn open(url: &BrokerUrl, name: &str, max_keep: usize) -> Result<Session, WireError> {
        Self::open_from(url, 0, name, max_keep)
            .await
            .map(|(s, _)| s)
    }

    /// [`open`](Self::open) trying the hosts of `url` in turn from host `start` (modulo
    /// their number); returns the session and the index of the host it is on. A refused
    /// login is not tried elsewhere (every node has the same accounts).
    pub async fn open_from(
        url: &BrokerUrl,
        start: usize,
        name: &str,
        max_keep: usize,
    ) -> Result<(Session, usize), WireError> {
        let n = url.hosts().len();
        let mut failures = Vec::new();
        let mut last = None;
        for k in 0..n {
            let i = (start + k) % n;
            match Self::open_one(&url.at(i), name, max_keep).await {
                Ok(s) => return Ok((s, i)),
                Err(e) if e.is_refused() => return Err(e),
                Err(e) => {
                    let why = match &e {
                        WireError::Connect { reason, .. } => reason.clone(),
                        other => other.to_string(),
                    };
                    failures.push(format!("{}: {why}", url.hosts()[i]));
                    last = Some(e);
                }
            }
        }
        match last {
            Some(_) if n > 1 => Err(WireError::Connect {
                url: url.to_string(),
                reason: format!("no host answered ({})", failures.join("; ")),
            }),
            Some(e) => Err(e),
            None => Err(WireError::Io("a broker URL without hosts".into())),
        }
    }

    async fn open_one(url: &BrokerUrl, name: &str, max_keep: usize) -> Result<Session, WireError> {
        let shown = url.to_string();
        let connect_err = |reason: String| WireError::Connect {
            url: shown.clone(),
            reason,
        };
        let addr = (url.host(), url.port());
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err("no answer".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = if url.is_tls() {
            Box::new(tls(tcp, url.host()).await.map_err(connect_err)?)
        } else {
            Box::new(tcp)
        };
        let (reader, writer) = tokio::io::split(io);
        let now = Instant::now();
        let mut s = Session {
            reader,
            writer,
            rbuf: vec![0; 256 * 1024],
            rpos: 0,
            rlen: 0,
            wbuf: Vec::with_capacity(256 * 1024),
            deferred: Vec::new(),
            frame_max: codec::FRAME_MIN as usize,
            heartbeat: None,
            last_read: now,
            last_write: now,
            consume_ch: 1,
            publish_ch: 2,
            next_channel: 3,
            channel_max: 2047,
            pub_state: PubState::Ready,
            next_seq: 1,
            seq_base: 0,
            delivering: None,
            returning: None,
            max_keep,
            consumer_tag: String::new(),
            url: shown.clone(),
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, s.handshake(url, name)).await {
            Ok(Ok(())) => Ok(s),
            Ok(Err(WireError::Io(e))) => Err(connect_err(e)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(connect_err("handshake timed out".into())),
        }
    }

    async fn handshake(&mut self, url: &BrokerUrl, name: &str) -> Result<(), WireError> {
        self.wbuf.extend_from_slice(PROTOCOL_HEADER);
        self.flush().await?;
        match self.next_method(0).await? {
            Method::ConnectionStart { mechanisms }
                if mechanisms.split(' ').any(|m| m == "PLAIN") => {}
            Method::ConnectionStart { mechanisms } => {
                return Err(WireError::Refused(format!(
                    "the broker offers no PLAIN login ({mechanisms})"
                )));
            }
            m => return Err(unexpected(&m)),
        }
        let mut props = Headers::new();
        props.set("product", "pumpwatch");
        props.set("version", crate::VERSION);
        props.set("connection_name", name);
        let mut caps = Headers::new();
        caps.set("publisher_confirms", HeaderValue::Bool(true));
        caps.set("consumer_cancel_notify", HeaderValue::Bool(true));
        caps.set("connection.blocked", HeaderValue::Bool(true));
        caps.set("basic.nack", HeaderValue::Bool(true));
        props.set("capabilities", HeaderValue::Table(caps));
        let mut response = Vec::new();
        response.push(0);
        response.extend_from_slice(url.user().as_bytes());
        response.push(0);
        response.extend_from_slice(url.password().as_bytes());
        write_method(&mut self.wbuf, 0, 10, 11, |b| {
            codec::write_headers(b, &props);
            b.shortstr(b"PLAIN");
            b.longstr(&response);
            b.shortstr(b"en_US");
        });
        self.flush().await?;
        let (channel_max, frame_max, heartbeat) = match self.next_method(0).await {
            Ok(Method::ConnectionTune {
                channel_max,
                frame_max,
                heartbeat,
            }) => (channel_max, frame_max, heartbeat),
            Ok(m) => return Err(unexpected(&m)),
            // RabbitMQ closes the socket on a failed login (or says why first).
            Err(WireError::Io(_)) => {
                return Err(WireError::Refused(format!(
                    "access refused: login as '{}' failed",
                    url.user()
                )));
            }
            Err(e) => return Err(e),
        };
        let frame_max = match frame_max {
            0 => 131_072,
            n => n.clamp(codec::FRAME_MIN, 1 << 20),
        };
        self.frame_max = frame_max as usize;
        self.channel_max = if channel_max == 0 { 2047 } else { channel_max };
        let wanted = url.heartbeat();
        let heartbeat = match (heartbeat, wanted) {
            (0, w) | (w, 0) => w,
            (a, b) => a.min(b),
        };
        self.heartbeat = (heartbeat > 0).then(|| Duration::from_secs(u64::from(heartbeat)));
        write_method(&mut self.wbuf, 0, 10, 31, |b| {
            b.u16(self.channel_max);
            b.u32(frame_max);
            b.u16(heartbeat);
        });
        write_method(&mut self.wbuf, 0, 10, 40, |b| {
            b.shortstr(url.vhost().as_bytes());
            b.shortstr(b"");
            b.u8(0);
        });
        self.flush().await?;
        match self.next_method(0).await? {
            Method::ConnectionOpenOk => {}
            Method::ConnectionClose { code, text } => {
                return Err(WireError::Refused(format!("{code} {text}")));
            }
            m => return Err(unexpected(&m)),
        }
        for ch in [self.consume_ch, self.publish_ch] {
            write_method(&mut self.wbuf, ch, 20, 10, |b| b.shortstr(b""));
        }
        write_method(&mut self.wbuf, self.publish_ch, 85, 10, |b| b.u8(0));
        self.flush().await?;
        let mut opened = 0;
        let mut selected = false;
        while opened < 2 || !selected {
            match self.next_any_method().await? {
                (_, Method::ChannelOpenOk) => opened += 1,
                (_, Method::SelectOk) => selected = true,
                (_, m) => return Err(unexpected(&m)),
            }
        }
        Ok(())
    }

    /// Starts consuming `queue` with `prefetch` unacknowledged messages at most.
    pub async fn consume(&mut self, queue: &str, prefetch: u16) -> Result<(), WireError> {
        let ch = self.consume_ch;
        write_method(&mut self.wbuf, ch, 60, 10, |b| {
            b.u32(0);
            b.u16(prefetch.max(1));
            b.u8(0);
        });
        let tag = format!("pumpwatch.route.{:08x}", rand::random::<u32>());
        self.consumer_tag = tag.clone();
        write_method(&mut self.wbuf, ch, 60, 20, |b| {
            b.u16(0);
            b.shortstr(queue.as_bytes());
            b.shortstr(tag.as_bytes());
            b.u8(0); // no-local, no-ack, exclusive, no-wait: all off
            b.u32(0); // arguments: empty table
        });
        self.flush().await?;
        let mut qos = false;
        loop {
            match self.next_any_method().await? {
                (_, Method::QosOk) => qos = true,
                (_, Method::ConsumeOk) if qos => return Ok(()),
                (c, Method::ChannelClose { code, text }) if c == ch => {
                    return Err(WireError::ConsumerClosed { code, text });
                }
                (_, m) => return Err(unexpected(&m)),
            }
        }
    }

    /// Caps the consumer's channel at `n` unacknowledged messages at once (channel-wide
    /// `basic.qos`, applied by RabbitMQ immediately), e.g. while holding too many bytes.
    pub fn limit(&mut self, n: u16) {
        write_method(&mut self.wbuf, self.consume_ch, 60, 10, |b| {
            b.u32(0);
            b.u16(n.max(1));
            b.u8(1);
        });
    }

    /// Stops the consumer: no more deliveries once the broker reads this (those already
    /// sent still arrive).
    pub fn cancel(&mut self) {
        let tag = std::mem::take(&mut self.consumer_tag);
        write_method(&mut self.wbuf, self.consume_ch, 60, 30, |b| {
            b.shortstr(tag.as_bytes());
            b.u8(1); // no-wait
        });
    }

    /// Queues a `mandatory` publish; returns its sequence number (what
    /// [`Event::Confirm`] refers to). Sent by the next [`next_events`](Self::next_events)
    /// or [`flush`](Self::flush).
    pub fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        props: &Properties,
        body: &[u8],
    ) -> u64 {
        let key = crate::core::topic::truncated(routing_key, 255);
        let out = if self.pub_state == PubState::Ready {
            &mut self.wbuf
        } else {
            &mut self.deferred
        };
        let m = codec::Publish {
            exchange: exchange.as_bytes(),
            routing_key: key.as_bytes(),
            mandatory: true,
            properties: props,
            body,
        };
        write_publish(out, self.publish_ch, &m, self.frame_max);
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Acknowledges delivery `tag` (and every earlier one with `multiple`).
    pub fn ack(&mut self, tag: u64, multiple: bool) {
        write_method(&mut self.wbuf, self.consume_ch, 60, 80, |b| {
            b.u64(tag);
            b.u8(u8::from(multiple));
        });
    }

    /// Gives delivery `tag` back to the queue (`requeue`) or drops it.
    pub fn nack(&mut self, tag: u64, requeue: bool) {
        write_method(&mut self.wbuf, self.consume_ch, 60, 120, |b| {
            b.u64(tag);
            b.u8(if requeue { 2 } else { 0 });
        });
    }

    /// Bytes queued and not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.wbuf.len() + self.deferred.len()
    }

    /// Writes everything queued. Cancel-safe: what was written is taken off the buffer
    /// after each write, so a cancelled flush never sends a byte twice.
    pub async fn flush(&mut self) -> Result<(), WireError> {
        while !self.wbuf.is_empty() {
            let n = self
                .writer
                .write(&self.wbuf)
                .await
                .map_err(|e| WireError::Io(e.to_string()))?;
            if n == 0 {
                return Err(WireError::Io("the broker stopped reading".into()));
            }
            self.wbuf.drain(..n);
            self.last_write = Instant::now();
        }
        Ok(())
    }

    /// Sends what is queued, then appends to `out` the events in what the broker sent,
    /// waiting for at least one (heartbeats are answered and checked meanwhile).
    pub async fn next_events(&mut self, out: &mut Vec<Event>) -> Result<(), WireError> {
        loop {
            self.flush().await?;
            self.process(out)?;
            if !out.is_empty() {
                return Ok(());
            }
            self.flush().await?;
            self.read_more().await?;
        }
    }

    /// Closes the connection politely (at most a second).
    pub async fn close(mut self) {
        write_method(&mut self.wbuf, 0, 10, 50, |b| {
            b.u16(200);
            b.shortstr(b"bye");
            b.u16(0);
            b.u16(0);
        });
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            self.flush().await?;
            loop {
                if let (0, Method::ConnectionCloseOk) = self.next_any_method().await? {
                    return Ok::<(), WireError>(());
                }
            }
        })
        .await;
        let _ = self.writer.shutdown().await;
    }

    /// Reads once (at least one byte), keeping the heartbeat: sends one when idle, gives
    /// up when the broker has been silent for two intervals.
    async fn read_more(&mut self) -> Result<(), WireError> {
        // Move what is unread to the front, and make room for at least 64 KiB (a frame can
        // be larger: grow to hold it whole).
        if self.rpos > 0 {
            self.rbuf.copy_within(self.rpos..self.rlen, 0);
            self.rlen -= self.rpos;
            self.rpos = 0;
        }
        let want = (self.rlen + 64 * 1024).max(self.frame_max + codec::FRAME_OVERHEAD);
        if self.rbuf.len() < want {
            self.rbuf.resize(want, 0);
        }
        loop {
            let wait = match self.heartbeat {
                Some(h) => (self.last_write + h / 2).min(self.last_read + h * 2),
                None => Instant::now() + Duration::from_secs(3600),
            };
            let read = tokio::select! {
                r = self.reader.read(&mut self.rbuf[self.rlen..]) => r,
                _ = tokio::time::sleep_until(wait) => {
                    let h = self.heartbeat.unwrap_or(Duration::from_secs(3600));
                    if Instant::now() >= self.last_read + h * 2 {
                        return Err(WireError::HeartbeatTimeout(h * 2));
                    }
                    if Instant::now() >= self.last_write + h / 2 {
                        write_heartbeat(&mut self.wbuf);
                        self.flush().await?;
                    }
                    continue;
                }
            };
            return match read {
                Ok(0) => Err(WireError::Io("the broker closed the socket".into())),
                Ok(n) => {
                    self.rlen += n;
                    self.last_read = Instant::now();
                    Ok(())
                }
                Err(e) => Err(WireError::Io(e.to_string())),
            };
        }
    }

    /// The next method on `channel` during the handshake (heartbeats skipped).
    async fn next_method(&mut self, channel: u16) -> Result<Method, WireError> {
        loop {
            let (c, m) = self.next_any_method().await?;
            if c == channel {
                return Ok(m);
            }
        }
    }

    /// The next method frame (handshake and setup only: content frames are not expected).
    async fn next_any_method(&mut self) -> Result<(u16, Method), WireError> {
        loop {
            if let Some((frame, n)) = parse_frame(
                &self.rbuf[self.rpos..self.rlen],
                self.frame_max.max(131_072),
            )? {
                let (kind, channel) = (frame.kind, frame.channel);
                let method = (kind == FRAME_METHOD).then(|| parse_method(frame.payload));
                self.rpos += n;
                match method {
                    Some(m) => {
                        let m = m?;
                        if let Method::ConnectionClose { code, text } = &m {
                            write_method(&mut self.wbuf, 0, 10, 51, |_| {});
                            let _ = self.flush().await;
                            return Err(WireError::Closed {
                                code: *code,
                                text: text.clone(),
                            });
                        }
                        return Ok((channel, m));
                    }
                    None => continue,
                }
            }
            self.read_more().await?;
        }
    }

    /// Turns every complete frame in the read buffer into events.
    fn process(&mut self, out: &mut Vec<Event>) -> Result<(), WireError> {
        while let Some((frame, n)) = parse_frame(&self.rbuf[self.rpos..self.rlen], self.frame_max)?
        {
            let (kind, channel) = (frame.kind, frame.channel);
            match kind {
                FRAME_METHOD => {
                    let m = parse_method(frame.payload)?;
                    self.rpos += n;
                    self.method(channel, m, out)?;
                }
                FRAME_HEADER => {
                    let (body_size, properties) = parse_content_header_lenient(frame.payload)?;
                    self.rpos += n;
                    if let Some(p) = self.slot(channel).as_mut() {
                        p.body_size = body_size;
                        p.properties = Some(properties);
                    }
                    self.finish_if_complete(channel, out);
                }
                FRAME_BODY => {
                    // Borrow the frame from the buffer and the message being built at once
                    // (distinct fields): no copy but into the kept body.
                    let payload = &self.rbuf[self.rpos + 7..self.rpos + n - 1];
                    let slot = if channel == self.consume_ch {
                        &mut self.delivering
                    } else {
                        &mut self.returning
                    };
                    if let Some(p) = slot.as_mut() {
                        p.received += payload.len() as u64;
                        let room = self.max_keep.saturating_sub(p.body.len());
                        p.body
                            .extend_from_slice(&payload[..payload.len().min(room)]);
                    }
                    self.rpos += n;
                    self.finish_if_complete(channel, out);
                }
                _ => self.rpos += n, // heartbeats: their arrival is what counts
            }
        }
        Ok(())
    }

    /// Where a message arriving on `channel` is assembled.
    fn slot(&mut self, channel: u16) -> &mut Option<Partial> {
        if channel == self.consume_ch {
            &mut self.delivering
        } else {
            &mut self.returning
        }
    }

    fn finish_if_complete(&mut self, channel: u16, out: &mut Vec<Event>) {
        let slot = self.slot(channel);
        let done = slot
            .as_ref()
            .is_some_and(|p| p.properties.is_some() && p.received >= p.body_size);
        if !done {
            return;
        }
        let Some(p) = slot.take() else { return };
        match p.method {
            Method::Deliver {
                delivery_tag,
                redelivered,
                exchange,
                routing_key,
            } => {
                let (properties, bad_properties) = match p.properties {
                    Some(Ok(props)) => (props, None),
                    Some(Err(e)) => (Properties::default(), Some(e)),
                    None => (Properties::default(), None),
                };
                let headers = properties
                    .headers
                    .as_ref()
                    .map(|t| t.headers())
                    .unwrap_or_default();
                out.push(Event::Delivery(Box::new(Delivery {
                    tag: delivery_tag,
                    redelivered,
                    exchange,
                    routing_key,
                    properties,
                    headers,
                    body: p.body,
                    body_size: p.body_size,
                    bad_properties,
                })));
            }
            Method::Return {
                code,
                text,
                exchange,
                routing_key,
            } => out.push(Event::Returned {
                code,
                text,
                exchange,
                routing_key,
            }),
            _ => {}
        }
    }

    fn method(&mut self, channel: u16, m: Method, out: &mut Vec<Event>) -> Result<(), WireError> {
        match m {
            m @ Method::Deliver { .. } => self.delivering = Some(Partial::new(m)),
            m @ Method::Return { .. } => self.returning = Some(Partial::new(m)),
            Method::Ack { tag, multiple } if channel == self.publish_ch => {
                out.push(Event::Confirm {
                    seq: self.seq_base + tag,
                    multiple,
                    ok: true,
                })
            }
            Method::Nack { tag, multiple } if channel == self.publish_ch => {
                out.push(Event::Confirm {
                    seq: self.seq_base + tag,
                    multiple,
                    ok: false,
                })
            }
            Method::ChannelClose { code, text } if channel == self.publish_ch => {
                write_method(&mut self.wbuf, channel, 20, 41, |_| {});
                out.push(Event::PublishRefused {
                    code,
                    text,
                    last_seq: self.next_seq - 1,
                });
                self.reopen_publisher()?;
            }
            Method::ChannelClose { code, text } if channel == self.consume_ch => {
                write_method(&mut self.wbuf, channel, 20, 41, |_| {});
                return Err(WireError::ConsumerClosed { code, text });
            }
            Method::ChannelOpenOk if channel == self.publish_ch => {
                write_method(&mut self.wbuf, channel, 85, 10, |b| b.u8(0));
                self.pub_state = PubState::Selecting;
            }
            Method::SelectOk if channel == self.publish_ch => {
                self.pub_state = PubState::Ready;
                let deferred = std::mem::take(&mut self.deferred);
                self.wbuf.extend_from_slice(&deferred);
            }
            Method::Cancel { .. } => return Err(WireError::Cancelled),
            Method::ConnectionClose { code, text } => {
                write_method(&mut self.wbuf, 0, 10, 51, |_| {});
                return Err(WireError::Closed { code, text });
            }
            Method::ConnectionBlocked { .. } => out.push(Event::Blocked(true)),
            Method::ConnectionUnblocked => out.push(Event::Blocked(false)),
            Method::ChannelFlow { active } => {
                write_method(&mut self.wbuf, channel, 20, 21, |b| b.u8(u8::from(active)));
            }
            // qos-ok, cancel-ok, close-ok of an old publish channel, ...
            _ => {}
        }
        Ok(())
    }

    /// A new publishing channel after the broker closed the last one: sequence numbers
    /// go on from where they were; publishes wait until it is ready.
    fn reopen_publisher(&mut self) -> Result<(), WireError> {
        let ch = self.next_channel;
        if ch >= self.channel_max {
            return Err(WireError::Io("out of channel numbers".into()));
        }
        self.next_channel += 1;
        self.publish_ch = ch;
        self.seq_base = self.next_seq - 1;
        self.pub_state = PubState::Opening;
        write_method(&mut self.wbuf, ch, 20, 10, |b| b.shortstr(b""));
        Ok(())
    }

    /// The broker URL, redacted (for logs).
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// A content header whose properties may be unreadable: the message is still read whole
/// (and rejected by the caller), not the connection killed.
fn parse_content_header_lenient(
    payload: &[u8],
) -> Result<(u64, Result<Properties, CodecError>), CodecError> {
    if payload.len() < 12 {
        return Err(CodecError::Truncated("content header"));
    }
    let body_size = u64::from_be_bytes(payload[4..12].try_into().unwrap_or([0; 8]));
    Ok((
        body_size,
        parse_content_header(payload).map(|h| h.properties),
    ))
}

fn unexpected(m: &Method) -> WireError {
    WireError::Io(format!("unexpected {m:?}"))
}

async fn tls(
    tcp: tokio::net::TcpStream,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    use std::sync::Arc;
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("invalid TLS name {host:?}: {e}"))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))
}
