//! The hot loop of `route`: consume → decide → publish once → confirm → ack, all in one
//! task on one connection ([`crate::broker::wire`]): every batch of frames read is
//! decided, published and settled before the next read, with no thread hand-off.
//!
//! **At least once, nothing lost.** Inputs are settled in delivery order. Consecutive
//! inputs whose output the broker confirmed (or that needed none) are acked with one
//! `multiple` ack per batch; an input whose output was refused (nacked, or its channel
//! closed under it) is nacked back to the queue on its own, after the acks before it, so a
//! `multiple` ack never covers it. An output refused **for good** (an access refused, a
//! policy) goes to `xrejected` with the reason instead of being retried forever; an
//! exchange deleted under route is declared again and the input retried; a nack (the
//! broker cannot take it now, e.g. a quorum queue without its majority while a cluster
//! node is down) is retried with back-off for minutes before it counts as refused. When the
//! connection goes, nothing unacked was acked: the broker redelivers it (duplicates
//! possible, losses not), and route reconnects with backoff.
//!
//! **Memory bounded in bytes.** Of a message larger than `route.max_body` only the first
//! [`REJECT_KEEP`] bytes are ever held (the rest is read off the socket and dropped; it is
//! rejected as too large with those bytes as evidence). What is held until confirmed is
//! counted, and over `max_inflight_bytes` the consumer's channel is capped at what it
//! holds, so the broker sends no more until confirms free room.

use super::decide::{Decider, Outcome, Reason, Route};
use super::stats::Counters;
use super::{Config, Error};
use crate::broker::amqp::{Client, Topology};
use crate::broker::names::{self, H_CLIENT, H_EXCHANGE, H_HOPS, H_REASON, H_SOURCE};
use crate::broker::url::BrokerUrl;
use crate::broker::wire::{Delivery, Event, Properties, Session, WireError};
use crate::core::HeaderValue;
use crate::core::report::Incoming;
use crate::core::topic::{MAX_SHORT, truncated};
use crate::shutdown::Shutdown;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// An oversized message is rejected with this much of its body (and its size).
pub const REJECT_KEEP: usize = 64 * 1024;

/// The header telling how large a truncated reject was.
const H_SIZE: &str = "pumpwatch_size";

pub struct Pipeline {
    broker: BrokerUrl,
    name: String,
    queue: String,
    counters: Arc<Counters>,
    shutdown: Shutdown,
    report_exchange: String,
    rejected: String,
    prefetch: u16,
    drain: Duration,
    budget: usize,
    max_body: usize,
    /// The topology connection (lapin): declares again what was deleted under route.
    admin: Client,
    topology: Topology,
    /// Up while the hot-path connection is (for `/healthz`).
    connected: Arc<AtomicBool>,
}

/// Where one input stands.
enum State {
    /// Waiting for the confirm of publish `seq`.
    Waiting(u64),
    /// Its output was confirmed (or it needed none).
    Done,
    /// Put it back on the queue.
    Requeue,
    /// Its output was refused by the broker, for this reason.
    Refused(u16, String),
}

/// What to count once an input's output is confirmed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Nothing,
    Source,
    Forward,
    Unrouted,
    Rejected,
}

/// The code of a refusal that was a nack (the broker's refusals by channel close carry an
/// AMQP reply code, never 0).
const NACKED: u16 = 0;
/// Consecutive refusals through which nacks are retried (with the back-off of `settle`,
/// about six minutes) before a nacked output goes to `xrejected`.
const MAX_NACK_RETRIES: u32 = 100;

struct Input {
    tag: u64,
    state: State,
    kind: Kind,
    /// The output, kept until confirmed in case it must go elsewhere.
    exchange: String,
    routing_key: String,
    properties: Properties,
    body: Vec<u8>,
    /// Returned by the broker as unroutable (no queue at all took it).
    returned: bool,
    /// Refused for good and sent on to xrejected: counted as refused once xrejected has
    /// it (a divert lost with its channel is retried, and must not count twice).
    refused: bool,
}

impl Input {
    fn bytes(&self) -> usize {
        self.body.len()
    }
}

/// How a served connection ended.
enum End {
    Stopped,
    Lost(WireError),
}

impl Pipeline {
    pub fn new(cfg: &Config, admin: &Client, topology: Topology, shutdown: &Shutdown) -> Pipeline {
        Pipeline {
            broker: cfg.broker.clone(),
            name: format!("pumpwatch route ({})", cfg.feeder),
            queue: names::route_queue(&cfg.pump, &cfg.feeder).name,
            counters: cfg.counters.clone(),
            shutdown: shutdown.clone(),
            report_exchange: cfg.pump.exchanges.report.clone(),
            rejected: cfg.pump.exchanges.rejected.clone(),
            prefetch: cfg.prefetch,
            drain: cfg.drain,
            budget: cfg.max_inflight_bytes.max(1),
            max_body: cfg.pump.route.max_body,
            admin: admin.clone(),
            topology,
            connected: Arc::new(AtomicBool::new(false)),
        }
    }

    /// True while the hot-path connection is up.
    pub fn health(&self) -> Arc<AtomicBool> {
        self.connected.clone()
    }

    /// Connects (the first failure is an error: the command exits 1) and serves until
    /// `shutdown`, reconnecting with backoff after a loss.
    pub async fn run(self, mut decider: Decider) -> Result<(), Error> {
        let keep = self.max_body.max(REJECT_KEEP) + 1;
        let mut attempt = 0u32;
        let mut first = true;
        // With several hosts (a cluster's nodes): where the next connection starts.
        let mut host = 0usize;
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            let opened = async {
                let (mut s, at) = Session::open_from(&self.broker, host, &self.name, keep).await?;
                host = at;
                if let Err(e) = s.consume(&self.queue, self.prefetch).await {
                    // E.g. a classic queue whose node is down: another node may serve it.
                    host = at + 1;
                    return Err(e);
                }
                Ok::<_, WireError>(s)
            };
            let mut session = match opened.await {
                Ok(s) => s,
                Err(e) if first => return Err(Error::Failed(format!("route: {e}"))),
                Err(e) => {
                    tracing::debug!(attempt, "route reconnect failed: {e}");
                    let wait = crate::broker::amqp::backoff(
                        Duration::from_millis(200),
                        crate::broker::amqp::MAX_BACKOFF,
                        attempt,
                    );
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            };
            if !first {
                tracing::info!(
                    "route: reconnected to {} (host {})",
                    self.broker,
                    self.broker.hosts()[host % self.broker.hosts().len()]
                );
            }
            first = false;
            attempt = 0;
            self.connected.store(true, Ordering::Release);
            let end = self.serve(&mut session, &mut decider).await;
            self.connected.store(false, Ordering::Release);
            match end {
                End::Stopped => {
                    session.close().await;
                    return Ok(());
                }
                End::Lost(e) => {
                    // That node may be gone: start with the next one.
                    host += 1;
                    tracing::warn!(
                        "route: connection to {} lost ({e}); reconnecting, unsettled inputs come back",
                        self.broker
                    );
                }
            }
        }
    }

    /// One connection's life: until shutdown (and the drain) or its loss.
    async fn serve(&self, s: &mut Session, decider: &mut Decider) -> End {
        let mut inflight: VecDeque<Input> = VecDeque::new();
        let mut events = Vec::with_capacity(256);
        let mut held = 0usize;
        let mut limited = false;
        let mut stop_at: Option<Instant> = None;
        let mut refusals = 0u32;
        loop {
            let far = Instant::now() + Duration::from_secs(3600);
            let read = tokio::select! {
                biased;
                _ = self.shutdown.cancelled(), if stop_at.is_none() => {
                    // Stop taking new messages; settle what is held, within the bound.
                    s.cancel();
                    if inflight.is_empty() {
                        let _ = s.flush().await;
                        return End::Stopped;
                    }
                    stop_at = Some(Instant::now() + self.drain);
                    continue;
                }
                _ = tokio::time::sleep_until(stop_at.unwrap_or(far)), if stop_at.is_some() => {
                    if !inflight.is_empty() {
                        tracing::warn!(
                            held = inflight.len(),
                            "drain deadline passed; unsettled inputs will be redelivered by the broker"
                        );
                    }
                    let _ = s.flush().await;
                    return End::Stopped;
                }
                r = s.next_events(&mut events) => r,
            };
            if let Err(e) = read {
                return End::Lost(e);
            }
            for ev in events.drain(..) {
                match ev {
                    Event::Delivery(d) => {
                        let input = self.take(s, decider, *d);
                        held += input.bytes();
                        inflight.push_back(input);
                    }
                    Event::Confirm { seq, multiple, ok } => {
                        // Publishes are in input order: stop past `seq`.
                        for i in inflight.iter_mut() {
                            let State::Waiting(w) = i.state else { continue };
                            if w > seq {
                                break;
                            }
                            if w == seq || multiple {
                                i.state = if ok {
                                    State::Done
                                } else {
                                    State::Refused(NACKED, "the broker refused (nacked) it".into())
                                };
                            }
                        }
                    }
                    Event::Returned {
                        exchange,
                        routing_key,
                        ..
                    } => {
                        // Returns come before the confirm of their publish: the oldest
                        // one waiting with that destination.
                        if let Some(i) = inflight.iter_mut().find(|i| {
                            matches!(i.state, State::Waiting(_))
                                && !i.returned
                                && i.exchange == exchange
                                && truncated(&i.routing_key, MAX_SHORT) == routing_key
                        }) {
                            i.returned = true;
                        }
                    }
                    Event::PublishRefused {
                        code,
                        text,
                        last_seq,
                    } => {
                        let text = crate::core::text::escape(&text).into_owned();
                        tracing::warn!("route: the broker refused a publish: {code} {text}");
                        for i in inflight.iter_mut() {
                            let State::Waiting(w) = i.state else { continue };
                            if w > last_seq {
                                break;
                            }
                            i.state = State::Refused(code, text.clone());
                        }
                    }
                    Event::Blocked(true) => {
                        tracing::warn!("route: the broker blocked publishing (resource alarm)")
                    }
                    Event::Blocked(false) => {
                        tracing::info!("route: the broker unblocked publishing")
                    }
                }
            }
            if let Err(e) = self
                .settle(s, &mut inflight, &mut held, &mut refusals)
                .await
            {
                return End::Lost(e);
            }
            // Over budget: the broker sends no more until confirms free room.
            if held >= self.budget && !limited {
                s.limit(u16::try_from(inflight.len()).unwrap_or(u16::MAX));
                limited = true;
            } else if limited && held < self.budget / 2 {
                s.limit(self.prefetch);
                limited = false;
            }
            if stop_at.is_some() && inflight.is_empty() {
                let _ = s.flush().await;
                return End::Stopped;
            }
        }
    }

    /// Decides what to do with one delivery and queues its publish.
    fn take(&self, s: &mut Session, decider: &mut Decider, d: Delivery) -> Input {
        let outcome = if let Some(e) = &d.bad_properties {
            Outcome::Reject {
                reason: Reason::Malformed,
                detail: format!("unreadable message properties: {e}"),
            }
        } else if d.truncated() {
            Outcome::Reject {
                reason: Reason::TooLarge,
                detail: format!("{} bytes, more than {}", d.body_size, self.max_body),
            }
        } else {
            decider.decide(&Incoming {
                exchange: &d.exchange,
                routing_key: &d.routing_key,
                body: &d.body,
                content_type: d.properties.content_type_str(),
                user_id: d.properties.user_id_str(),
                headers: &d.headers,
            })
        };
        let mut properties = d.properties;
        // A sender's own routing instructions are never passed on.
        let mut headers = properties.headers.take().unwrap_or_default();
        for k in names::ROUTING_HEADERS {
            headers.remove(k);
        }
        let (exchange, kind, body) = match outcome {
            Outcome::Consumed(c) => {
                self.counters.consumed(c);
                return Input {
                    tag: d.tag,
                    state: State::Done,
                    kind: Kind::Nothing,
                    exchange: String::new(),
                    routing_key: String::new(),
                    properties: Properties::default(),
                    body: Vec::new(),
                    returned: false,
                    refused: false,
                };
            }
            Outcome::Reject { reason, detail } => {
                self.counters.rejected(reason);
                headers.set(H_REASON, &short(&Outcome::reason_text(reason, &detail)));
                headers.set(H_EXCHANGE, &short(&d.exchange));
                let mut body = d.body;
                if d.body_size > REJECT_KEEP as u64 {
                    // Keep the evidence, not the payload: the rejected queue keeps 100 000.
                    headers.set(H_SIZE, &HeaderValue::Int(d.body_size as i64));
                    body.truncate(REJECT_KEEP);
                }
                (self.rejected.clone(), Kind::Rejected, body)
            }
            Outcome::Publish(p) => {
                headers.set(H_CLIENT, &short(p.client.as_deref().unwrap_or("")));
                headers.set(H_SOURCE, &short(p.source.as_deref().unwrap_or("")));
                headers.set(H_HOPS, &HeaderValue::Int(p.hops));
                headers.set(
                    "BCC",
                    &HeaderValue::Array(vec![HeaderValue::Str(p.route.bcc_key())]),
                );
                let kind = match p.route {
                    Route::Source(_) => Kind::Source,
                    Route::Forward(_) => Kind::Forward,
                    Route::Unrouted => {
                        headers.set(H_REASON, &short(Reason::UnknownSource.label()));
                        Kind::Unrouted
                    }
                };
                (self.report_exchange.clone(), kind, d.body)
            }
        };
        properties.headers = Some(headers);
        // Never claim to be somebody we are not: the broker checks user_id.
        if properties.user_id.as_deref() != Some(self.broker.user().as_bytes()) {
            properties.user_id = None;
        }
        properties.delivery_mode = Some(properties.delivery_mode.unwrap_or(2));
        let seq = s.publish(&exchange, &d.routing_key, &properties, &body);
        Input {
            tag: d.tag,
            state: State::Waiting(seq),
            kind,
            exchange,
            routing_key: d.routing_key,
            properties,
            body,
            returned: false,
            refused: false,
        }
    }

    /// Settles the inputs at the front that are settled: acks the longest prefix of done
    /// ones at once; requeues or redirects the refused ones, each on its own after the
    /// acks before it.
    async fn settle(
        &self,
        s: &mut Session,
        inflight: &mut VecDeque<Input>,
        held: &mut usize,
        refusals: &mut u32,
    ) -> Result<(), WireError> {
        let mut ack_upto: Option<u64> = None;
        while let Some(front) = inflight.front_mut() {
            match &front.state {
                State::Waiting(_) => break,
                State::Done => {
                    let i = inflight.pop_front().unwrap_or_else(|| unreachable!());
                    *held -= i.bytes();
                    self.count(&i);
                    ack_upto = Some(i.tag);
                    *refusals = 0;
                }
                State::Requeue => {
                    let i = inflight.pop_front().unwrap_or_else(|| unreachable!());
                    *held -= i.bytes();
                    if let Some(t) = ack_upto.take() {
                        s.ack(t, true);
                    }
                    s.nack(i.tag, true);
                    self.counters.retried();
                }
                State::Refused(code, text) => {
                    let (code, text) = (*code, text.clone());
                    *refusals += 1;
                    if let Some(t) = ack_upto.take() {
                        s.ack(t, true);
                    }
                    // A nack is the broker not taking responsibility for now (a quorum queue
                    // bound to the exchange without its majority, while a cluster node is
                    // down): retried, for minutes, before it counts as refused for good.
                    let nacked = code == NACKED && *refusals <= MAX_NACK_RETRIES;
                    if nacked && *refusals == 1 {
                        tracing::warn!(
                            "route: the broker nacked a publish to {} (a queue bound to it cannot \
                             take it now, e.g. a quorum queue without its majority); retrying",
                            crate::core::text::escape(&front.exchange)
                        );
                    }
                    let retry = code == 404 || front.kind == Kind::Rejected || nacked;
                    if retry && *refusals > 3 {
                        // The broker keeps refusing what we retry: do not spin. (A report
                        // refused for good goes on to xrejected below; that is progress, so
                        // it waits for nothing.)
                        s.flush().await?;
                        let pause = Duration::from_millis(100 * u64::from((*refusals).min(50)));
                        tokio::time::sleep(pause).await;
                    }
                    if code == 404 && front.kind != Kind::Rejected {
                        // An exchange deleted under route: declare it again, then retry.
                        if let Err(e) = self.admin.declare(&self.topology).await {
                            tracing::warn!("route: cannot declare the topology again: {e}");
                        }
                        front.state = State::Requeue;
                        continue;
                    }
                    if front.kind == Kind::Rejected || nacked {
                        // Even xrejected refuses it, or the refusal may pass: it stays on
                        // our queue.
                        front.state = State::Requeue;
                        continue;
                    }
                    // Refused for good: to xrejected with the reason, nothing lost.
                    let mut headers = front.properties.headers.take().unwrap_or_default();
                    for k in ["BCC", "CC"] {
                        headers.remove(k);
                    }
                    let reason = if code == 0 {
                        format!("refused: {text}")
                    } else {
                        format!("refused: {code} {text}")
                    };
                    headers.set(H_REASON, &short(&reason));
                    headers.set(H_EXCHANGE, &short(&front.exchange));
                    front.properties.headers = Some(headers);
                    front.exchange = self.rejected.clone();
                    front.kind = Kind::Rejected;
                    front.returned = false;
                    let seq = s.publish(
                        &self.rejected,
                        &front.routing_key,
                        &front.properties,
                        &front.body,
                    );
                    front.state = State::Waiting(seq);
                    front.refused = true;
                    break;
                }
            }
        }
        if let Some(t) = ack_upto {
            s.ack(t, true);
        }
        Ok(())
    }

    fn count(&self, i: &Input) {
        if i.refused {
            self.counters.refused();
            return;
        }
        if i.returned {
            self.counters.unheard();
            return;
        }
        match i.kind {
            Kind::Nothing | Kind::Rejected => {}
            Kind::Source => self.counters.routed(),
            Kind::Forward => self.counters.forwarded(),
            Kind::Unrouted => self.counters.unrouted(),
        }
    }
}

fn short(s: &str) -> HeaderValue {
    HeaderValue::Str(truncated(s, MAX_SHORT).to_owned())
}
