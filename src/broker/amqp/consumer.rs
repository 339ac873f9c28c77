//! Consuming: a [`Consumer`] handle that outlives connections, and the [`Delivery`]
//! values it yields.
//!
//! Why it re-subscribes itself: a daemon's consume loop should read like
//! `while let Some(d) = consumer.next().await`, with outages invisible except for a
//! pause. When the stream of the current subscription ends, `next` waits for the
//! supervisor's next connection and subscribes again with the same prefetch. Deliveries
//! that were in flight are requeued by the broker (their channel is gone), so acking
//! them is a harmless no-op and they come back with `redelivered` set.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use tracing::debug;

use super::client::{Client, Live, backoff};
use super::convert::{MessageProps, short_name};
use super::error::{AmqpError, from_lapin};
use crate::core::report::Incoming;

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
        };
        consumer.sub = Some(consumer.subscribe().await?);
        Ok(consumer)
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
            let Some(sub) = self.sub.as_mut() else {
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
                if self.failures > 0 {
                    let (min, max) = (
                        self.client.shared.min_backoff,
                        self.client.shared.max_backoff,
                    );
                    tokio::time::sleep(backoff(min, max, self.failures - 1)).await;
                }
                match self.subscribe().await {
                    Ok(sub) => {
                        debug!(queue = %self.queue, "re-subscribed");
                        self.failures = 0;
                        self.sub = Some(sub);
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
            };
            match sub.stream.next().await {
                Some(Ok(d)) => return Some(Ok(Delivery::new(d, &sub.chan))),
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
        match &self.sub {
            Some(sub) if sub.chan.live.is_up() && sub.chan.channel.status().connected() => sub
                .chan
                .channel
                .basic_cancel(sub.stream.tag(), BasicCancelOptions::default())
                .await
                .map_err(|e| {
                    from_lapin(&e, &format!("cancelling the consumer of '{}'", self.queue))
                }),
            Some(_) => {
                self.sub = None;
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn subscribe(&mut self) -> Result<Subscription, AmqpError> {
        let mut avoid = self.dead.take();
        loop {
            let session = self.client.session(avoid, None).await?;
            let live = &session.live;
            match open(live, &self.queue, self.prefetch).await {
                Ok(sub) => return Ok(sub),
                Err(e) if live.is_up() => return Err(e),
                Err(_) => {
                    self.client.shared.wake.notify_one();
                    avoid = Some(live.generation);
                }
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
