//! Consuming: a [`Consumer`] handle that outlives connections, and the [`Delivery`]
//! values it yields.
//!
//! Why it re-subscribes itself: a daemon's consume loop should read like
//! `while let Some(d) = consumer.next().await`, with outages invisible except for a
//! pause. When the stream of the current subscription ends, `next` waits for the
//! supervisor's next connection and subscribes again with the same prefetch. Deliveries
//! that were in flight are requeued by the broker (their channel is gone), so acking
//! them is a harmless no-op and they come back with `redelivered` set.
//!
//! **Single active consumer.** On a queue declared with `x-single-active-consumer`, the
//! broker delivers to one consumer at a time and tells nobody which: AMQP 0-9-1 has no
//! such notice. A consumer started with [`Client::consume_single_active`] finds out by
//! itself: any delivery means it is the active one; while it has had none, it publishes a
//! small *probe* into its own queue (through the default exchange) every
//! [`PROBE_EVERY`], which whoever is active receives, so a consumer that received none of
//! its probes within that time is a standby ([`Activity`]). Probes are acked here and never
//! yielded. A standby learns it took over within a probe period even on an idle queue.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info};

use super::client::{Client, Live, backoff};
use super::convert::{MessageProps, short_name};
use super::error::{AmqpError, from_lapin};
use crate::core::emit::Outgoing;
use crate::core::report::Incoming;
use crate::core::{HeaderValue, Headers};

/// How often a consumer that has had no delivery yet probes its queue, and how long it
/// waits for a probe before it calls itself a standby.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The header a standby probe carries (its value: the consumer's instance id).
pub const PROBE_HEADER: &str = "pumpwatch_probe";

/// Where a consumer of a single-active-consumer queue stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Not known yet (just subscribed, no delivery and no probe answered yet), or a
    /// consumer of an ordinary queue.
    Unknown,
    /// The broker delivers to this consumer.
    Active,
    /// Another consumer is active; this one takes over when it goes.
    Standby,
}

impl Activity {
    pub fn name(self) -> &'static str {
        match self {
            Activity::Unknown => "unknown",
            Activity::Active => "active",
            Activity::Standby => "standby",
        }
    }
}

/// The probing of a single-active-consumer subscription.
struct Probe {
    role: watch::Sender<Activity>,
    /// This process's consumer, in the probes it sends (for the logs of the active one).
    id: String,
    /// When the next probe goes (only while not active).
    next: Instant,
    /// Whether a probe went on the current subscription (so silence means standby).
    sent: bool,
    /// Set when a standby became active; taken by [`Consumer::took_over`].
    took_over: bool,
    /// Set by a probe the broker refused (no write permission on the default exchange).
    refused: Arc<std::sync::atomic::AtomicBool>,
}

/// The channel one subscription lives on. Deliveries keep it open, so a delivery can
/// still be acked after its consumer was cancelled or dropped.
struct SubChannel {
    live: Arc<Live>,
    channel: Channel,
}

struct Subscription {
    chan: Arc<SubChannel>,
    stream: lapin::Consumer,
}

/// Deliveries from one queue, across reconnects. Dropping it stops the subscription
/// (unacked deliveries still held stay ackable until they are dropped too).
pub struct Consumer {
    client: Client,
    queue: String,
    prefetch: u16,
    sub: Option<Subscription>,
    /// The generation whose subscription died: wait for a newer connection.
    dead: Option<u64>,
    /// Consecutive failed subscribes on a live connection, for backoff.
    failures: u32,
    cancelled: bool,
    finished: bool,
    /// Only for [`Client::consume_single_active`].
    probe: Option<Probe>,
    /// A re-subscription under way, in a task of its own: `next` is raced against timers
    /// in `select!`s and dropped, and a subscribe dropped halfway would leave a channel and
    /// a consumer behind, or, when it always takes longer than the shortest timer, never
    /// finish (the same for the backoff before it).
    pending: Option<tokio::task::JoinHandle<Result<Subscription, AmqpError>>>,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if let Some(t) = self.pending.take() {
            t.abort();
        }
    }
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .finish()
    }
}

impl Consumer {
    pub(crate) async fn start(
        client: Client,
        queue: &str,
        prefetch: u16,
    ) -> Result<Self, AmqpError> {
        short_name(queue, "queue")?;
        let mut consumer = Consumer {
            client,
            queue: queue.to_owned(),
            prefetch,
            sub: None,
            dead: None,
            failures: 0,
            cancelled: false,
            finished: false,
            probe: None,
            pending: None,
        };
        let client = consumer.client.clone();
        consumer.sub = Some(subscribe(client, consumer.queue.clone(), prefetch, None).await?);
        Ok(consumer)
    }

    /// [`start`](Self::start) on a single-active-consumer queue: tracks its [`Activity`].
    pub(crate) async fn start_single_active(
        client: Client,
        queue: &str,
        prefetch: u16,
    ) -> Result<Self, AmqpError> {
        let mut c = Self::start(client, queue, prefetch).await?;
        let (role, _) = watch::channel(Activity::Unknown);
        c.probe = Some(Probe {
            role,
            id: format!("{}.{:08x}", std::process::id(), rand::random::<u32>()),
            next: Instant::now(),
            sent: false,
            took_over: false,
            refused: Default::default(),
        });
        Ok(c)
    }

    /// Where this consumer stands now ([`Activity::Unknown`] for an ordinary queue).
    pub fn activity(&self) -> Activity {
        self.probe
            .as_ref()
            .map_or(Activity::Unknown, |p| *p.role.borrow())
    }

    /// A receiver of the role's changes (for `/healthz`, `/metrics`, waiting to be active).
    pub fn activity_changes(&self) -> watch::Receiver<Activity> {
        match &self.probe {
            Some(p) => p.role.subscribe(),
            None => watch::channel(Activity::Unknown).1,
        }
    }

    /// True once after this consumer went from standby to active: another instance read
    /// the queue meanwhile, so what this one kept from before is stale.
    pub fn took_over(&mut self) -> bool {
        self.probe
            .as_mut()
            .is_some_and(|p| std::mem::take(&mut p.took_over))
    }

    fn set_role(&mut self, new: Activity) {
        let Some(p) = self.probe.as_mut() else { return };
        let old = *p.role.borrow();
        if old == new {
            return;
        }
        p.role.send_replace(new);
        match (old, new) {
            (Activity::Standby, Activity::Active) => {
                p.took_over = true;
                info!(queue = %self.queue, "active: took over the queue from the consumer that was active");
            }
            (_, Activity::Active) => {
                info!(queue = %self.queue, "active: the broker delivers this queue to this consumer")
            }
            (_, Activity::Standby) => info!(
                queue = %self.queue,
                "standby: another consumer is active on this queue (single active consumer); taking over when it goes"
            ),
            (_, Activity::Unknown) => {
                debug!(queue = %self.queue, "subscribed again: role unknown until a delivery or probe")
            }
        }
    }

    /// Sends a probe into the queue through the default exchange, in a task of its own (a
    /// `next` dropped by a `select!` must not cut a publish in half).
    fn send_probe(&mut self) {
        let Some(p) = self.probe.as_mut() else { return };
        let mut headers = Headers::new();
        headers.set(PROBE_HEADER, HeaderValue::Str(p.id.clone()));
        let msg = Outgoing {
            routing_key: self.queue.clone(),
            body: b"pumpwatch standby probe".to_vec(),
            content_type: "text/plain",
            headers,
        };
        let client = self.client.clone();
        let refused = p.refused.clone();
        tokio::spawn(async move {
            let r = match client.publish("", &msg).await {
                Ok(confirm) => confirm.wait().await,
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => {}
                Err(AmqpError::AccessRefused(e)) => {
                    refused.store(true, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(
                        "cannot probe queue (no write permission on the default exchange: {e}); \
                         taking this consumer for the active one"
                    );
                }
                Err(e) => debug!("standby probe not sent or not confirmed: {e}"),
            }
        });
        p.sent = true;
        p.next = Instant::now() + PROBE_EVERY;
    }

    /// What the probing wants next while not active: the time of the next probe.
    fn probe_due(&self) -> Option<Instant> {
        let p = self.probe.as_ref()?;
        (*p.role.borrow() != Activity::Active).then_some(p.next)
    }

    fn on_probe_due(&mut self) {
        if self
            .probe
            .as_ref()
            .is_some_and(|p| p.refused.load(std::sync::atomic::Ordering::Relaxed))
        {
            // Cannot tell: behave as before single active consumer (active).
            self.set_role(Activity::Active);
            return;
        }
        if self.probe.as_ref().is_some_and(|p| p.sent) {
            // A whole period without any delivery, our probe included: someone else has
            // the queue.
            self.set_role(Activity::Standby);
        }
        self.send_probe();
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next delivery. Waits through outages (re-subscribing on the new connection).
    /// `Some(Err(_))` when subscribing is refused (e.g. the queue was deleted: the next
    /// call retries after a backoff) or, with `reconnect` off, once when the connection
    /// is lost. `None` after [`Client::close`], after [`cancel`](Self::cancel) once the
    /// already received deliveries are drained, and after that one `Closed` error.
    pub async fn next(&mut self) -> Option<Result<Delivery, AmqpError>> {
        loop {
            if self.finished {
                return None;
            }
            if self.sub.is_none() {
                if self.cancelled
                    || self
                        .client
                        .shared
                        .closed
                        .load(std::sync::atomic::Ordering::Acquire)
                {
                    self.finished = true;
                    return None;
                }
                if self.pending.is_none() {
                    let delay = match self.failures {
                        0 => Duration::ZERO,
                        n => backoff(
                            self.client.shared.min_backoff,
                            self.client.shared.max_backoff,
                            n - 1,
                        ),
                    };
                    let (client, queue, prefetch) =
                        (self.client.clone(), self.queue.clone(), self.prefetch);
                    let avoid = self.dead.take();
                    self.pending = Some(tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        subscribe(client, queue, prefetch, avoid).await
                    }));
                }
                let Some(task) = self.pending.as_mut() else {
                    continue;
                };
                let done = task.await;
                self.pending = None;
                let done = done.unwrap_or_else(|e| {
                    Err(AmqpError::Protocol(format!("subscribing failed: {e}")))
                });
                match done {
                    Ok(sub) => {
                        debug!(queue = %self.queue, "re-subscribed");
                        self.failures = 0;
                        self.sub = Some(sub);
                        // A new subscription is last in the broker's line: find out again.
                        if let Some(p) = self.probe.as_mut() {
                            p.sent = false;
                            p.next = Instant::now();
                        }
                        let standby = self.activity() == Activity::Standby;
                        if !standby {
                            self.set_role(Activity::Unknown);
                        }
                    }
                    Err(e) => {
                        if self
                            .client
                            .shared
                            .closed
                            .load(std::sync::atomic::Ordering::Acquire)
                        {
                            self.finished = true;
                            return None;
                        }
                        if self.client.is_closed_for_good() {
                            self.finished = true;
                        } else {
                            self.failures = self.failures.saturating_add(1);
                        }
                        return Some(Err(e));
                    }
                }
                continue;
            }
            let due = self.probe_due();
            let Some(sub) = self.sub.as_mut() else {
                continue;
            };
            let next = match due {
                None => sub.stream.next().await,
                Some(at) => tokio::select! {
                    d = sub.stream.next() => d,
                    _ = tokio::time::sleep_until(at) => {
                        self.on_probe_due();
                        continue;
                    }
                },
            };
            let Some(sub) = self.sub.as_mut() else {
                continue;
            };
            match next {
                Some(Ok(d)) => {
                    let d = Delivery::new(d, &sub.chan);
                    if self.probe.is_some() {
                        self.set_role(Activity::Active);
                        if d.is_probe() {
                            // Not awaited here: a `next` dropped mid-ack would leave it
                            // unacked, holding a prefetch slot.
                            tokio::spawn(async move {
                                if let Err(e) = d.ack().await {
                                    debug!("ack of a probe failed: {e}");
                                }
                            });
                            continue;
                        }
                    }
                    return Some(Ok(d));
                }
                Some(Err(e)) => {
                    if !sub.chan.live.is_up() {
                        self.dead = self.client.report_dead(&sub.chan.live, &e);
                    }
                    debug!(queue = %self.queue, error = %e, "subscription ended");
                }
                None => {
                    if self.cancelled {
                        // Keep the channel: the caller may still ack what it holds.
                        self.finished = true;
                        return None;
                    }
                    if !sub.chan.live.is_up() {
                        self.client.shared.wake.notify_one();
                        self.dead = Some(sub.chan.live.generation);
                    }
                    debug!(queue = %self.queue, "subscription cancelled");
                }
            }
            self.sub = None;
        }
    }

    /// Caps the deliveries the broker may have outstanding on this subscription's channel
    /// at `n` (channel-wide `basic.qos`, which RabbitMQ applies at once, unlike the
    /// per-consumer prefetch given at subscribe time), until called again. A consumer
    /// uses it to hold fewer bytes when messages turn out large. Lost with the
    /// connection: a new subscription starts with the subscribe-time prefetch only.
    pub async fn limit(&self, n: u16) -> Result<(), AmqpError> {
        match &self.sub {
            Some(sub) if sub.chan.channel.status().connected() => sub
                .chan
                .channel
                .basic_qos(n.max(1), BasicQosOptions { global: true })
                .await
                .map_err(|e| from_lapin(&e, "limiting the prefetch")),
            _ => Ok(()),
        }
    }

    /// Stops the subscription: the broker sends no more; `next` yields what was already
    /// received, then `None`. Deliveries held can still be acked (shutdown: cancel,
    /// drain, finish, ack, exit).
    pub async fn cancel(&mut self) -> Result<(), AmqpError> {
        self.cancelled = true;
        if let Some(t) = self.pending.take() {
            t.abort();
        }
        match &self.sub {
            Some(sub) if sub.chan.live.is_up() && sub.chan.channel.status().connected() => {
                let cancelling = sub
                    .chan
                    .channel
                    .basic_cancel(sub.stream.tag(), BasicCancelOptions::default());
                match tokio::time::timeout(CANCEL_WAIT, cancelling).await {
                    Ok(r) => r.map_err(|e| {
                        from_lapin(&e, &format!("cancelling the consumer of '{}'", self.queue))
                    }),
                    // A stop must not hang on the broker: what was delivered can still be
                    // acked, and the rest goes back when the connection closes.
                    Err(_) => {
                        self.sub = None;
                        Err(AmqpError::Closed(format!(
                            "no answer to cancelling the consumer of '{}' within {} s",
                            self.queue,
                            CANCEL_WAIT.as_secs()
                        )))
                    }
                }
            }
            Some(_) => {
                self.sub = None;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// How long a stop waits for the broker to confirm a consumer's cancel.
const CANCEL_WAIT: Duration = Duration::from_secs(3);

/// Subscribes on the current connection (waiting for one newer than `avoid`, the one
/// seen dead), again on the next if this one dies meanwhile.
async fn subscribe(
    client: Client,
    queue: String,
    prefetch: u16,
    mut avoid: Option<u64>,
) -> Result<Subscription, AmqpError> {
    loop {
        let session = client.session(avoid, None).await?;
        let live = &session.live;
        match open(live, &queue, prefetch).await {
            Ok(sub) => return Ok(sub),
            Err(e) if live.is_up() => return Err(e),
            Err(_) => {
                client.shared.wake.notify_one();
                avoid = Some(live.generation);
            }
        }
    }
}

async fn open(live: &Arc<Live>, queue: &str, prefetch: u16) -> Result<Subscription, AmqpError> {
    let channel = live
        .conn
        .create_channel()
        .await
        .map_err(|e| from_lapin(&e, "opening a consumer channel"))?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| from_lapin(&e, "setting the prefetch"))?;
    let tag = ShortString::try_new(format!(
        "pumpwatch.{}.{:08x}",
        live.generation,
        rand::random::<u32>()
    ))
    .unwrap_or_default();
    let stream = channel
        .basic_consume(
            short_name(queue, "queue")?,
            tag,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| from_lapin(&e, &format!("consuming from queue '{queue}'")))?;
    Ok(Subscription {
        chan: Arc::new(SubChannel {
            live: live.clone(),
            channel,
        }),
        stream,
    })
}

/// One message as received. Settle it with [`ack`](Self::ack) or [`nack`](Self::nack);
/// one never settled is redelivered after the connection or consumer goes away.
pub struct Delivery {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub props: MessageProps,
    pub redelivered: bool,
    raw: BasicProperties,
    acker: lapin::Acker,
    chan: Arc<SubChannel>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("body_len", &self.body.len())
            .field("props", &self.props)
            .field("redelivered", &self.redelivered)
            .field("generation", &self.chan.live.generation)
            .finish()
    }
}

impl Delivery {
    fn new(d: lapin::message::Delivery, chan: &Arc<SubChannel>) -> Self {
        Delivery {
            props: MessageProps::from(&d.properties),
            exchange: d.exchange.into(),
            routing_key: d.routing_key.into(),
            body: d.data,
            redelivered: d.redelivered,
            raw: d.properties,
            acker: d.acker,
            chan: chan.clone(),
        }
    }

    /// A standby probe (see the module's notes): through the default exchange, with the
    /// probe header. Reports reach the queues through `xreport`, never so.
    fn is_probe(&self) -> bool {
        self.exchange.is_empty() && self.props.headers.get(PROBE_HEADER).is_some()
    }

    /// The message as the core parses it (borrowed, no copies).
    pub fn incoming(&self) -> Incoming<'_> {
        Incoming {
            exchange: &self.exchange,
            routing_key: &self.routing_key,
            body: &self.body,
            content_type: self.props.content_type.as_deref(),
            user_id: self.props.user_id.as_deref(),
            headers: &self.props.headers,
        }
    }

    /// The properties exactly as received (for [`Client::forward`]).
    pub(crate) fn raw_props(&self) -> &BasicProperties {
        &self.raw
    }

    /// Acknowledges. If the connection (or channel) this came on is gone, this is a
    /// no-op `Ok`: the broker requeued the message and will deliver it again.
    pub async fn ack(&self) -> Result<(), AmqpError> {
        self.settle(None).await
    }

    /// Rejects; `requeue` puts it back on the queue, otherwise it is dropped (or
    /// dead-lettered). A no-op `Ok` when the connection is gone, as for `ack`.
    pub async fn nack(&self, requeue: bool) -> Result<(), AmqpError> {
        self.settle(Some(requeue)).await
    }

    /// Acknowledges this delivery and every earlier unsettled one of the same channel in
    /// one frame (AMQP `multiple`). Only for callers that settle strictly in delivery
    /// order and never settle those earlier ones again.
    pub async fn ack_multiple(&self) -> Result<(), AmqpError> {
        self.settle_with(None, true).await
    }

    /// Whether `other` came on the same channel (so one `ack_multiple` covers both).
    pub fn same_channel(&self, other: &Delivery) -> bool {
        Arc::ptr_eq(&self.chan, &other.chan)
    }

    fn gone(&self) -> bool {
        self.acker.poisoned() || !self.chan.live.is_up() || !self.chan.channel.status().connected()
    }

    async fn settle(&self, nack_requeue: Option<bool>) -> Result<(), AmqpError> {
        self.settle_with(nack_requeue, false).await
    }

    async fn settle_with(
        &self,
        nack_requeue: Option<bool>,
        multiple: bool,
    ) -> Result<(), AmqpError> {
        if self.gone() {
            debug!(
                generation = self.chan.live.generation,
                "settling a delivery of a closed channel: no-op, the broker redelivers it"
            );
            return Ok(());
        }
        let result = match nack_requeue {
            None => self.acker.ack(BasicAckOptions { multiple }).await,
            Some(requeue) => {
                self.acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue,
                    })
                    .await
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(_) if self.gone() => {
                debug!(
                    generation = self.chan.live.generation,
                    "channel closed while settling: no-op, the broker redelivers it"
                );
                Ok(())
            }
            Err(e) => Err(from_lapin(&e, "acknowledging a delivery")),
        }
    }
}
