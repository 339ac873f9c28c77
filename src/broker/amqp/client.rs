//! The client: one broker connection at a time, a supervisor task that replaces it when
//! it dies, and publishing with confirms on top.
//!
//! Why our own supervisor rather than lapin's `enable_auto_recover`: lapin gives up after
//! a fixed number of attempts, has no jitter or outage logging, and leaves callers to
//! call `wait_for_recovery` on every error; what the daemons need (publishes that wait
//! for the next connection, consumers that re-subscribe under the same handle, acks of
//! old deliveries that are harmless no-ops) is simplest as one small loop over plain
//! connections.
//!
//! How it fits together: [`Shared::state`] (a `watch`) holds the current [`Session`]
//! (connection + publish channel), `Down` while reconnecting, or `Closed`. Publishers
//! and consumers take the current session without waiting on the fast path; when an
//! operation fails because its connection died, it pokes the supervisor (`wake`) and
//! waits on the watch for a session of a newer generation.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use super::consumer::{Consumer, Delivery};
use super::convert::{
    MessageProps, short_lossy, short_name, to_amqp_value, to_field_table, truncate_short,
};
use super::error::{AmqpError, connect_error, describe, from_lapin, one_line, scrub};
use super::topology::{Topology, declare_on};
use crate::broker::url::BrokerUrl;
use crate::core::Headers;
use crate::core::emit::Outgoing;

/// How long one connection attempt (TCP, handshake, channel setup, declarations) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `publish` and `declare` wait for a connection while the broker is away
/// before giving up with [`AmqpError::Closed`].
pub const RECONNECT_WAIT: Duration = Duration::from_secs(30);
/// The longest pause between two reconnect attempts (the default `max_backoff`): once the
/// broker is back, a daemon is back within this, however long the outage was
/// (`tests/reliability.rs` measures it). Attempts are cheap (a refused TCP connect), so
/// a short cap costs nothing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the supervisor looks at an idle connection (failing operations wake it
/// sooner).
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the supervisor waits for lapin's error event to name an outage's cause.
const EVENT_GRACE: Duration = Duration::from_millis(100);

/// How to connect. `ConnectOptions { name: "route".into(), ..Default::default() }`.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The `connection_name` client property, shown in the management UI.
    pub name: String,
    /// Declared on connect and after every reconnect.
    pub topology: Topology,
    /// Replace a lost connection (daemons) or give up on loss (one-shot commands).
    pub reconnect: bool,
    /// First reconnect delay; doubles per failed attempt (with jitter) up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            name: "pumpwatch".to_owned(),
            topology: Topology::default(),
            reconnect: true,
            min_backoff: Duration::from_millis(250),
            max_backoff: MAX_BACKOFF,
        }
    }
}

impl ConnectOptions {
    pub fn new(name: impl Into<String>) -> Self {
        ConnectOptions {
            name: name.into(),
            ..Default::default()
        }
    }
}

/// One broker connection, numbered: a delivery or confirm belongs to one generation.
pub(crate) struct Live {
    pub(crate) generation: u64,
    pub(crate) conn: Connection,
    /// The first error seen on this connection, for the outage warning.
    /// (informative, text): see `note`.
    reason: Mutex<Option<(bool, String)>>,
}

impl Live {
    pub(crate) fn is_up(&self) -> bool {
        self.conn.status().connected()
    }

    /// Records why the connection died. The broker's or the network's own words win
    /// over a later operation's "invalid channel state".
    pub(crate) fn note(&self, e: &lapin::Error) {
        let informative = !matches!(
            e.kind(),
            lapin::ErrorKind::InvalidChannelState(..)
                | lapin::ErrorKind::InvalidConnectionState(_)
                | lapin::ErrorKind::InvalidChannel(_)
        );
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        match &*reason {
            Some((true, _)) => {}
            Some((false, _)) if !informative => {}
            _ => *reason = Some((informative, describe(e))),
        }
    }

    fn has_informative_reason(&self) -> bool {
        matches!(
            &*self.reason.lock().unwrap_or_else(|p| p.into_inner()),
            Some((true, _))
        )
    }

    fn reason(&self) -> String {
        let reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        match &*reason {
            Some((_, r)) => r.clone(),
            None => {
                let st = self.conn.status();
                let what = if st.errored() {
                    "failed"
                } else if st.closing() || st.closed() {
                    "closed by the broker or the network"
                } else {
                    "lost"
                };
                format!("connection {what}")
            }
        }
    }
}

/// A live connection with its publish channel (confirm mode). Replaced as a whole when
/// the publish channel has to be reopened.
pub(crate) struct Session {
    pub(crate) live: Arc<Live>,
    publisher: Channel,
}

pub(crate) enum State {
    Up(Arc<Session>),
    /// Reconnecting.
    Down,
    /// For good: closed by the client, or lost with `reconnect` off.
    Closed(String),
}

pub(crate) struct Shared {
    pub(crate) url: BrokerUrl,
    name: String,
    reconnect: bool,
    pub(crate) min_backoff: Duration,
    pub(crate) max_backoff: Duration,
    /// Everything declared so far, replayed on every new connection.
    topology: Mutex<Topology>,
    pub(crate) state: watch::Sender<State>,
    /// Pokes the supervisor to look at the connection now.
    pub(crate) wake: Notify,
    /// Serialises reopening the publish channel.
    publisher_lock: tokio::sync::Mutex<()>,
    pub(crate) closed: AtomicBool,
    /// The host (index in the URL) of the current or last connection.
    host: AtomicUsize,
    /// The host the next connection attempt starts with.
    next_host: AtomicUsize,
}

/// A handle on the broker connection; cheap to clone, all clones share the connection.
#[derive(Clone)]
pub struct Client {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("broker", &self.shared.url)
            .field("name", &self.shared.name)
            .finish()
    }
}

/// The reconnect delay before attempt `attempt` (0-based): `min * 2^attempt`, capped at
/// `max`, times a random factor in [0.5, 1] so a fleet does not reconnect in lockstep.
pub(crate) fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let min = min.max(Duration::from_millis(10));
    let max = max.max(min);
    let base = min
        .saturating_mul(2u32.saturating_pow(attempt.min(30)))
        .min(max);
    base.mul_f64(rand::random_range(0.5..=1.0))
}

impl Client {
    /// Connects (once: fails fast, for commands that exit 1 on it) and declares
    /// `opts.topology`. URL: `amqp[s]://user:password@host[:port]/vhost`, the vhost
    /// percent-encoded (`%2f` is `/`), no vhost meaning `/`.
    pub async fn connect(url: &BrokerUrl, opts: ConnectOptions) -> Result<Client, AmqpError> {
        let url = url.clone();
        opts.topology.validate()?;
        let (state, _) = watch::channel(State::Down);
        let shared = Arc::new(Shared {
            url,
            name: opts.name,
            reconnect: opts.reconnect,
            min_backoff: opts.min_backoff,
            max_backoff: opts.max_backoff,
            topology: Mutex::new(opts.topology),
            state,
            wake: Notify::new(),
            publisher_lock: tokio::sync::Mutex::new(()),
            closed: AtomicBool::new(false),
            host: AtomicUsize::new(0),
            next_host: AtomicUsize::new(0),
        });
        let session = establish(&shared, 1).await?;
        let live = session.live.clone();
        shared.state.send_replace(State::Up(session));
        debug!(broker = %shared.url, name = %shared.name, "connected");
        tokio::spawn(supervise(Arc::downgrade(&shared), live));
        Ok(Client { shared })
    }

    /// The broker URL (displays with the password hidden).
    pub fn url(&self) -> &BrokerUrl {
        &self.shared.url
    }

    /// The user this client logs in as (what the broker checks `user_id` against).
    pub fn username(&self) -> &str {
        self.shared.url.user()
    }

    /// True while a connection is up (false while reconnecting and after close).
    pub fn is_connected(&self) -> bool {
        self.current().is_some_and(|s| s.live.is_up())
    }

    /// The current session without waiting.
    fn current(&self) -> Option<Arc<Session>> {
        match &*self.shared.state.borrow() {
            State::Up(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// Waits for a session whose generation is not `avoid` (the one seen dead), until
    /// `deadline` if given. `Closed` when the client is closed for good.
    pub(crate) async fn session(
        &self,
        avoid: Option<u64>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Arc<Session>, AmqpError> {
        let mut rx = self.shared.state.subscribe();
        let ready = rx.wait_for(|s| match s {
            State::Up(s) => Some(s.live.generation) != avoid,
            State::Down => false,
            State::Closed(_) => true,
        });
        let result = match deadline {
            None => ready.await,
            Some(d) => match tokio::time::timeout_at(d, ready).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(AmqpError::Closed(format!(
                        "no connection to {} within {} s",
                        self.shared.url,
                        RECONNECT_WAIT.as_secs()
                    )));
                }
            },
        };
        let state = result.map_err(|_| AmqpError::Closed("client dropped".to_owned()))?;
        match &*state {
            State::Up(s) => Ok(s.clone()),
            State::Closed(reason) => Err(AmqpError::Closed(reason.clone())),
            State::Down => unreachable!("wait_for only returns Up or Closed"),
        }
    }

    /// Tells the supervisor `live` died and returns its generation, to wait past it.
    pub(crate) fn report_dead(&self, live: &Live, e: &lapin::Error) -> Option<u64> {
        live.note(e);
        self.shared.wake.notify_one();
        Some(live.generation)
    }

    /// True once the client will never connect again.
    pub(crate) fn is_closed_for_good(&self) -> bool {
        matches!(&*self.shared.state.borrow(), State::Closed(_))
    }

    /// Declares `t` now and remembers it, so it is declared again on every new connection.
    pub async fn declare(&self, t: &Topology) -> Result<(), AmqpError> {
        t.validate()?;
        let deadline = tokio::time::Instant::now() + RECONNECT_WAIT;
        let mut avoid = None;
        loop {
            let session = self.session(avoid, Some(deadline)).await?;
            let live = &session.live;
            if let Err(e) = declare_on(&live.conn, t).await {
                if live.is_up() {
                    return Err(e);
                }
                self.shared.wake.notify_one();
                avoid = Some(live.generation);
                continue;
            }
            self.shared
                .topology
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .merge(t);
            // A reconnect that read the remembered topology before the merge above did
            // not declare `t`: then declare it again on the newer connection.
            let current = match &*self.shared.state.borrow() {
                State::Up(s) => Some(s.live.generation),
                State::Down => None,
                State::Closed(_) => return Ok(()),
            };
            if current == Some(live.generation) && live.is_up() {
                return Ok(());
            }
            avoid = Some(live.generation);
        }
    }

    /// Publishes `msg` to `exchange`: persistent, `mandatory`, content type and headers
    /// from `msg`. Returns once the message is handed to the connection; the returned
    /// [`PendingConfirm`] resolves when the broker has taken responsibility for it (or
    /// not). While the broker is away this waits for the next connection, up to
    /// [`RECONNECT_WAIT`].
    pub async fn publish(
        &self,
        exchange: &str,
        msg: &Outgoing,
    ) -> Result<PendingConfirm, AmqpError> {
        self.send(exchange, &msg.routing_key, &msg.body, || {
            let p = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(short_lossy(msg.content_type));
            if msg.headers.is_empty() {
                p
            } else {
                p.with_headers(to_field_table(&msg.headers))
            }
        })
        .await
    }

    /// Publishes raw parts (`mandatory`, with confirms). `props` are sent as given,
    /// except: no `delivery_mode` means persistent, and a `user_id` other than this
    /// client's user is left out (the broker would refuse the publish and close the
    /// channel; attribution travels in headers instead).
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: &MessageProps,
    ) -> Result<PendingConfirm, AmqpError> {
        let keep_user = props.user_id.as_deref() == Some(self.username());
        self.send(exchange, routing_key, body, || props.to_basic(keep_user))
            .await
    }

    /// Republishes `delivery` (its body and properties exactly as received, header value
    /// kinds included) to `exchange` with `routing_key`, adding or replacing
    /// `extra_headers`. The same rules as [`publish_raw`](Self::publish_raw) apply to
    /// `delivery_mode` and `user_id`; the sender's own `CC`/`BCC` headers are dropped
    /// (only `extra_headers` may route it further). This is what a router uses.
    pub async fn forward(
        &self,
        exchange: &str,
        routing_key: &str,
        delivery: &Delivery,
        extra_headers: &Headers,
    ) -> Result<PendingConfirm, AmqpError> {
        let raw = delivery.raw_props();
        let keep_user = raw.user_id().as_ref().map(|u| u.as_str()) == Some(self.username());
        self.send(exchange, routing_key, &delivery.body, || {
            forward_props(raw, keep_user, extra_headers)
        })
        .await
    }

    /// [`forward`](Self::forward) with another body (e.g. the first bytes of an oversized
    /// message kept as evidence).
    pub async fn forward_body(
        &self,
        exchange: &str,
        routing_key: &str,
        delivery: &Delivery,
        body: &[u8],
        extra_headers: &Headers,
    ) -> Result<PendingConfirm, AmqpError> {
        let raw = delivery.raw_props();
        let keep_user = raw.user_id().as_ref().map(|u| u.as_str()) == Some(self.username());
        self.send(exchange, routing_key, body, || {
            forward_props(raw, keep_user, extra_headers)
        })
        .await
    }

    async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: impl Fn() -> BasicProperties,
    ) -> Result<PendingConfirm, AmqpError> {
        let routing_key = truncate_short(routing_key);
        let mut deadline = None;
        let mut avoid = None;
        let mut reopened = 0;
        loop {
            let session = match (avoid, self.current()) {
                (None, Some(s)) => s,
                _ => {
                    let d = *deadline
                        .get_or_insert_with(|| tokio::time::Instant::now() + RECONNECT_WAIT);
                    self.session(avoid, Some(d)).await?
                }
            };
            let sent = session
                .publisher
                .basic_publish(
                    short_name(exchange, "exchange")?,
                    short_lossy(routing_key),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    body,
                    props(),
                )
                .await;
            let e = match sent {
                Ok(confirm) => {
                    return Ok(PendingConfirm {
                        inner: Some(confirm),
                        exchange: exchange.to_owned(),
                        routing_key: routing_key.to_owned(),
                    });
                }
                Err(e) => e,
            };
            if !session.live.is_up() {
                avoid = self.report_dead(&session.live, &e);
            } else if !session.publisher.status().connected() && reopened < 3 {
                // The broker closed the publish channel (e.g. an earlier publish to a
                // missing exchange); the connection is fine: open another.
                reopened += 1;
                if let Err(e) = self.reopen_publisher(&session).await {
                    if session.live.is_up() {
                        return Err(e);
                    }
                    avoid = Some(session.live.generation);
                }
            } else {
                return Err(from_lapin(
                    &e,
                    &format!("publishing to exchange '{exchange}'"),
                ));
            }
        }
    }

    async fn reopen_publisher(&self, old: &Arc<Session>) -> Result<(), AmqpError> {
        let _one_at_a_time = self.shared.publisher_lock.lock().await;
        match self.current() {
            Some(cur) if Arc::ptr_eq(&cur, old) => {}
            _ => return Ok(()), // someone else replaced it, or we are reconnecting
        }
        let publisher = open_publisher(&old.live.conn).await?;
        let session = Arc::new(Session {
            live: old.live.clone(),
            publisher,
        });
        self.shared.state.send_if_modified(|s| match s {
            State::Up(cur) if Arc::ptr_eq(cur, old) => {
                *s = State::Up(session);
                true
            }
            _ => false,
        });
        debug!(broker = %self.shared.url, "publish channel reopened");
        Ok(())
    }

    /// Starts consuming `queue` with `prefetch` unacknowledged deliveries at most. The
    /// consumer re-subscribes by itself after a reconnect.
    pub async fn consume(&self, queue: &str, prefetch: u16) -> Result<Consumer, AmqpError> {
        Consumer::start(self.clone(), queue, prefetch).await
    }

    /// [`consume`](Self::consume) from a queue declared with `x-single-active-consumer`:
    /// the consumer also finds out whether it is the active one or a standby
    /// ([`Consumer::activity`]; see the consumer module's notes on probes).
    pub async fn consume_single_active(
        &self,
        queue: &str,
        prefetch: u16,
    ) -> Result<Consumer, AmqpError> {
        Consumer::start_single_active(self.clone(), queue, prefetch).await
    }

    /// The host (of the URL's list) the current or last connection is on.
    pub fn connected_host(&self) -> &crate::broker::url::Host {
        let hosts = self.shared.url.hosts();
        &hosts[self.shared.host.load(Ordering::Relaxed) % hosts.len()]
    }

    /// Closes the connection for good. Consumers then end (`next` gives `None`); pending
    /// confirms not yet received fail with `Closed`. Await confirms before closing.
    pub async fn close(&self) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let previous = self
            .shared
            .state
            .send_replace(State::Closed("closed by the client".into()));
        self.shared.wake.notify_one();
        if let State::Up(session) = previous {
            close_quietly(&session.live.conn).await;
        }
        debug!(broker = %self.shared.url, "closed");
    }
}

/// Copies `raw` field by field (lapin cannot unset a property), dropping `user_id`
/// unless `keep_user`, defaulting `delivery_mode` to persistent, adding `extra`.
fn forward_props(raw: &BasicProperties, keep_user: bool, extra: &Headers) -> BasicProperties {
    let mut p = BasicProperties::default().with_delivery_mode(raw.delivery_mode().unwrap_or(2));
    macro_rules! copy {
        ($get:ident, $set:ident) => {
            if let Some(v) = raw.$get() {
                p = p.$set(v.clone());
            }
        };
    }
    copy!(content_type, with_content_type);
    copy!(content_encoding, with_content_encoding);
    copy!(priority, with_priority);
    copy!(correlation_id, with_correlation_id);
    copy!(reply_to, with_reply_to);
    copy!(expiration, with_expiration);
    copy!(message_id, with_message_id);
    copy!(timestamp, with_timestamp);
    copy!(kind, with_type);
    copy!(app_id, with_app_id);
    copy!(cluster_id, with_cluster_id);
    if keep_user {
        copy!(user_id, with_user_id);
    }
    if !extra.is_empty() || raw.headers().is_some() {
        let mut map = raw
            .headers()
            .as_ref()
            .map(|t| t.inner().clone())
            .unwrap_or_default();
        // The sender's own routing instructions (sender-selected distribution) are never
        // passed on: the broker would act on them for whoever forwards the message.
        for k in crate::broker::names::ROUTING_HEADERS {
            map.remove(k);
        }
        for (k, v) in &extra.0 {
            map.insert(short_lossy(k), to_amqp_value(v));
        }
        p = p.with_headers(lapin::types::FieldTable::from(map));
    }
    p
}

/// A broker answer to one publish, awaited with [`wait`](Self::wait) (or `.await`).
/// Publish many, then await their confirms: the broker confirms in batches.
#[must_use = "await it to know whether the broker took the message"]
pub struct PendingConfirm {
    inner: Option<lapin::PublisherConfirm>,
    /// Where it went: lapin hands a returned message to whichever confirm completes next
    /// (with `multiple` acks, in no set order), so a return is only believed when it names
    /// this publish's exchange and routing key.
    exchange: String,
    routing_key: String,
}

impl std::fmt::Debug for PendingConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingConfirm")
    }
}

impl PendingConfirm {
    /// `Ok` once the broker acked; `Unroutable` if it returned the message (no queue
    /// bound); `Nacked`; `Closed` if the connection died first (the message may or may
    /// not have been taken: publish it again, duplicates are the at-least-once price);
    /// `NotFound`/`AccessRefused` when the broker closed the publish channel.
    pub async fn wait(mut self) -> Result<(), AmqpError> {
        let Some(confirm) = self.inner.take() else {
            return Err(AmqpError::Protocol("confirm already awaited".into()));
        };
        match confirm.await {
            Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => Ok(()),
            Ok(Confirmation::Ack(Some(returned)))
                if returned.delivery.exchange.as_str() != self.exchange
                    || returned.delivery.routing_key.as_str() != self.routing_key =>
            {
                tracing::debug!("a returned message of another publish; this one was confirmed");
                Ok(())
            }
            Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned)))
                if returned.reply_code == 312 =>
            {
                Err(AmqpError::Unroutable {
                    exchange: returned.delivery.exchange.to_string(),
                    routing_key: returned.delivery.routing_key.to_string(),
                })
            }
            Ok(Confirmation::Ack(Some(returned))) => Err(AmqpError::Protocol(format!(
                "message returned: {} {}",
                returned.reply_code,
                one_line(returned.reply_text.as_str())
            ))),
            Ok(Confirmation::Nack(_)) => Err(AmqpError::Nacked),
            Err(e) => Err(from_lapin(&e, "waiting for the publish confirm")),
        }
    }
}

impl IntoFuture for PendingConfirm {
    type Output = Result<(), AmqpError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.wait())
    }
}

impl Drop for PendingConfirm {
    fn drop(&mut self) {
        // lapin keeps a dropped, unresolved confirm until someone calls
        // `wait_for_confirms`, which we never do: await it in the background instead.
        if let Some(confirm) = self.inner.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = confirm.await;
            });
        }
    }
}

async fn open_publisher(conn: &Connection) -> Result<Channel, AmqpError> {
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| from_lapin(&e, "opening the publish channel"))?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| from_lapin(&e, "enabling publisher confirms"))?;
    Ok(ch)
}

/// Connects to the first host that answers, from [`Shared::next_host`] on in the URL's
/// order, opens the publish channel and declares the remembered topology. With several
/// hosts, the error names each host's failure.
async fn establish(shared: &Shared, generation: u64) -> Result<Arc<Session>, AmqpError> {
    let n = shared.url.hosts().len();
    let start = shared.next_host.load(Ordering::Relaxed);
    let mut failures = Vec::new();
    let mut last = None;
    for k in 0..n {
        let i = (start + k) % n;
        match establish_at(shared, &shared.url.at(i), generation).await {
            Ok(session) => {
                shared.host.store(i, Ordering::Relaxed);
                shared.next_host.store(i, Ordering::Relaxed);
                if k > 0 || n > 1 {
                    debug!(broker = %shared.url, host = %shared.url.hosts()[i], "connected to host");
                }
                return Ok(session);
            }
            Err(e) => {
                if n > 1 {
                    debug!(host = %shared.url.hosts()[i], error = %e, "host failed; trying the next");
                }
                failures.push(match &e {
                    AmqpError::Connect { reason, .. } => {
                        format!("{}: {reason}", shared.url.hosts()[i])
                    }
                    other => format!("{}: {other}", shared.url.hosts()[i]),
                });
                last = Some(e);
            }
        }
    }
    match last {
        Some(AmqpError::Connect { .. }) if n > 1 => Err(AmqpError::Connect {
            url_redacted: shared.url.to_string(),
            reason: format!("no host answered ({})", failures.join("; ")),
        }),
        Some(e) => Err(e),
        None => Err(AmqpError::Invalid("a broker URL without hosts".into())),
    }
}

/// [`establish`] on one host (`url` holds only it).
async fn establish_at(
    shared: &Shared,
    url: &BrokerUrl,
    generation: u64,
) -> Result<Arc<Session>, AmqpError> {
    let redacted = &url.to_string();
    let props = ConnectionProperties::default()
        .with_connection_name(shared.name.as_str().into())
        .with_client_property("product".into(), "pumpwatch".into())
        .with_client_property("version".into(), env!("CARGO_PKG_VERSION").into());
    let connecting = Connection::connect_uri(url.amqp_uri(), props);
    let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => {
            return Err(AmqpError::Connect {
                url_redacted: redacted.clone(),
                reason: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            });
        }
        Ok(Err(e)) => return Err(scrubbed(connect_error(&e, redacted), shared)),
        Ok(Ok(conn)) => conn,
    };
    let setup = async {
        let publisher = open_publisher(&conn).await?;
        let topology = shared
            .topology
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        declare_on(&conn, &topology).await?;
        Ok::<_, AmqpError>(publisher)
    };
    let publisher = match tokio::time::timeout(CONNECT_TIMEOUT, setup).await {
        Ok(Ok(publisher)) => publisher,
        Ok(Err(e)) => {
            close_quietly(&conn).await;
            return Err(e);
        }
        Err(_) => {
            close_quietly(&conn).await;
            return Err(AmqpError::Connect {
                url_redacted: redacted.clone(),
                reason: "channel setup or declarations timed out".into(),
            });
        }
    };
    let live = Arc::new(Live {
        generation,
        conn,
        reason: Mutex::new(None),
    });
    Ok(Arc::new(Session { live, publisher }))
}

fn scrubbed(e: AmqpError, shared: &Shared) -> AmqpError {
    let secret = shared.url.secret();
    match e {
        AmqpError::Connect {
            url_redacted,
            reason,
        } => AmqpError::Connect {
            url_redacted,
            reason: scrub(reason, secret),
        },
        AmqpError::AccessRefused(r) => AmqpError::AccessRefused(scrub(r, secret)),
        other => other,
    }
}

async fn close_quietly(conn: &Connection) {
    if conn.status().connected() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "bye".into())).await;
    }
}

/// Watches the current connection; when it dies, warns once, reconnects with backoff,
/// redeclares the topology and installs the new session. Ends when the client is closed
/// or every handle on it is dropped.
async fn supervise(weak: Weak<Shared>, mut live: Arc<Live>) {
    loop {
        // lapin reports the cause of a connection error (the broker's close text, the
        // socket error) as an event: the best reason for the outage warning.
        let mut events = live.conn.events_listener().fuse();
        loop {
            let Some(shared) = weak.upgrade() else {
                close_quietly(&live.conn).await;
                return;
            };
            if shared.closed.load(Ordering::Acquire) {
                return;
            }
            if !live.is_up() {
                break;
            }
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                Some(event) = events.next() => {
                    if let lapin::Event::Error(e) = event {
                        live.note(&e);
                    }
                }
            }
        }
        // The event is sent as the connection fails; give it a moment to arrive.
        let grace = tokio::time::Instant::now() + EVENT_GRACE;
        while !live.has_informative_reason() {
            match tokio::time::timeout_at(grace, events.next()).await {
                Ok(Some(lapin::Event::Error(e))) => live.note(&e),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        drop(events);
        let Some(shared) = weak.upgrade() else { return };
        let reason = scrub(live.reason(), shared.url.secret());
        let dead = live.generation;
        if !shared.reconnect {
            warn!(broker = %shared.url, name = %shared.name, %reason, "broker connection lost (reconnect is off)");
            shared.state.send_if_modified(|s| match s {
                State::Closed(_) => false,
                _ => {
                    *s = State::Closed(reason.clone());
                    true
                }
            });
            return;
        }
        shared.state.send_if_modified(|s| match s {
            State::Up(cur) if cur.live.generation == dead => {
                *s = State::Down;
                true
            }
            _ => false,
        });
        // The node may be gone: a cluster's next host is the better first try.
        let lost_host = shared.host.load(Ordering::Relaxed);
        shared.next_host.store(
            (lost_host + 1) % shared.url.hosts().len(),
            Ordering::Relaxed,
        );
        warn!(broker = %shared.url, host = %shared.url.hosts()[lost_host % shared.url.hosts().len()], name = %shared.name, %reason, "broker connection lost; reconnecting");
        let started = Instant::now();
        let (min, max) = (shared.min_backoff, shared.max_backoff);
        drop(shared);
        let mut attempt: u32 = 0;
        live = loop {
            tokio::time::sleep(backoff(min, max, attempt)).await;
            attempt += 1;
            let Some(shared) = weak.upgrade() else { return };
            if shared.closed.load(Ordering::Acquire) {
                return;
            }
            match establish(&shared, dead + 1).await {
                Ok(session) => {
                    let new_live = session.live.clone();
                    let installed = shared.state.send_if_modified(|s| match s {
                        State::Closed(_) => false,
                        _ => {
                            *s = State::Up(session);
                            true
                        }
                    });
                    if !installed {
                        close_quietly(&new_live.conn).await;
                        return;
                    }
                    info!(
                        broker = %shared.url,
                        host = %shared.url.hosts()[shared.host.load(Ordering::Relaxed)],
                        attempts = attempt,
                        down_ms = started.elapsed().as_millis() as u64,
                        "broker connection restored"
                    );
                    break new_live;
                }
                Err(e) => {
                    debug!(broker = %shared.url, attempt, error = %e, "reconnect attempt failed");
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldTable;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..40 {
            let d = backoff(min, max, attempt);
            let base = (min * 2u32.saturating_pow(attempt.min(30))).min(max);
            assert!(
                d <= base && d >= base / 2,
                "attempt {attempt}: {d:?} vs {base:?}"
            );
        }
        assert!(backoff(Duration::ZERO, Duration::ZERO, 0) >= Duration::from_millis(5));
    }

    #[test]
    fn forward_keeps_kinds_and_adds_headers() {
        let mut t = FieldTable::default();
        t.insert("n".into(), lapin::types::AMQPValue::ShortInt(7));
        let raw = BasicProperties::default()
            .with_headers(t)
            .with_user_id("alice".into())
            .with_priority(4);
        let extra: Headers = [("pumpwatch_source", "ec_cmc")].into_iter().collect();
        let p = forward_props(&raw, false, &extra);
        let h = p.headers().clone().unwrap();
        assert_eq!(
            h.inner().get("n"),
            Some(&lapin::types::AMQPValue::ShortInt(7))
        );
        assert!(h.contains_key("pumpwatch_source"));
        assert_eq!(p.user_id(), &None);
        assert_eq!(p.priority(), &Some(4));
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(
            forward_props(&raw, true, &Headers::new())
                .user_id()
                .as_ref()
                .map(|u| u.as_str()),
            Some("alice")
        );
    }
}
