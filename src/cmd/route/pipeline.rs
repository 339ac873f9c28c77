//! The hot loop of `route`: consume → decide → publish once → await the confirm → ack.
//!
//! **At least once, nothing lost.** Every input goes to the settler in delivery order,
//! with the confirm of its one output (or none). The settler awaits the confirms in that
//! order and acks consecutive successes with one `multiple` ack; an input whose output was
//! not confirmed, or whose publish failed, is nacked back to the queue on its own first, so
//! a `multiple` ack never covers an input that was not published. A confirm lost with the
//! connection leaves its input unacked: the broker redelivers it (duplicates possible,
//! losses not).
//!
//! **Memory bounded in bytes.** Bodies are dropped as soon as they are published (the
//! settler keeps only what it needs to ack); rejects of oversized messages carry only the
//! first [`REJECT_KEEP`] bytes; and while more than `max_inflight_bytes` are published and
//! not yet confirmed, the loop stops taking deliveries and caps the channel's prefetch at
//! what it holds, so the broker sends no more until confirms come back.

use super::decide::{Decider, Outcome, Publish, Route};
use super::stats::Counters;
use super::{Config, Error};
use crate::broker::amqp::{AmqpError, Client, Consumer, Delivery, PendingConfirm};
use crate::broker::names::{H_CLIENT, H_EXCHANGE, H_HOPS, H_REASON, H_SOURCE};
use crate::core::topic::{MAX_SHORT, truncated};
use crate::core::{HeaderValue, Headers};
use crate::shutdown::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

/// An oversized message is rejected with this much of its body (and its size).
pub const REJECT_KEEP: usize = 64 * 1024;

/// Acks are sent as one `multiple` ack per this many settled inputs at most (fewer frames,
/// fewer wake-ups); any gap in the stream flushes sooner.
const ACK_BATCH: usize = 64;

/// The header telling how large a truncated reject was.
const H_SIZE: &str = "pumpwatch_size";

pub struct Pipeline {
    client: Client,
    counters: Arc<Counters>,
    shutdown: Shutdown,
    report_exchange: String,
    rejected: String,
    prefetch: u16,
    drain: Duration,
    budget: usize,
}

/// What the settler does with one input.
enum Settle {
    /// Ack once this confirm (if any) arrives.
    Confirm(Option<PendingConfirm>, Done),
    /// Put it back on the queue: its publish failed.
    Requeue,
}

/// What to count once an input is settled.
#[derive(Clone, Copy)]
enum Done {
    Nothing,
    Routed(RouteKind),
    Rejected,
}

#[derive(Clone, Copy)]
enum RouteKind {
    Source,
    Forward,
    Unrouted,
}

struct Held {
    delivery: Delivery,
    settle: Settle,
    bytes: usize,
}

/// Bytes published and not yet settled, shared by the loop and the settler.
#[derive(Default)]
struct Budget {
    held: AtomicUsize,
    freed: Notify,
}

impl Pipeline {
    pub fn new(cfg: &Config, client: &Client, shutdown: &Shutdown) -> Pipeline {
        Pipeline {
            client: client.clone(),
            counters: cfg.counters.clone(),
            shutdown: shutdown.clone(),
            report_exchange: cfg.pump.exchanges.report.clone(),
            rejected: cfg.pump.exchanges.rejected.clone(),
            prefetch: cfg.prefetch,
            drain: cfg.drain,
            budget: cfg.max_inflight_bytes.max(1),
        }
    }

    /// Runs until `shutdown` (or the consumer ends); then stops consuming and settles
    /// what is held, within the drain bound.
    pub async fn run(self, mut consumer: Consumer, mut decider: Decider) -> Result<(), Error> {
        let (tx, rx) = mpsc::channel::<Held>(usize::from(self.prefetch).max(16));
        let budget = Arc::new(Budget::default());
        let settler = tokio::spawn(settle(rx, self.counters.clone(), budget.clone()));
        let mut limited = false;
        let result = loop {
            // Over budget: take no more, and have the broker send no more, until confirms
            // free enough.
            while budget.held.load(Ordering::Acquire) >= self.budget {
                if !limited {
                    let _ = consumer.limit(1).await;
                    limited = true;
                }
                tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    _ = budget.freed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            if limited && budget.held.load(Ordering::Acquire) < self.budget / 2 {
                let _ = consumer.limit(self.prefetch).await;
                limited = false;
            }
            let mut delivery = tokio::select! {
                _ = self.shutdown.cancelled() => break Ok(()),
                d = consumer.next() => match d {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => break Err(Error::from(e)),
                    None => break Ok(()),
                },
            };
            let outcome = decider.decide(&delivery.incoming());
            let (settle, bytes) = match self.publish(&delivery, outcome).await {
                Ok((confirm, done, bytes)) => (Settle::Confirm(confirm, done), bytes),
                Err(e) => {
                    if e.is_transient() {
                        tracing::debug!("publish failed, requeueing the input: {e}");
                    } else {
                        tracing::warn!("publish failed, requeueing the input: {e}");
                        // A refusal that repeats (e.g. a missing permission) must not spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    self.counters.retried();
                    (Settle::Requeue, 0)
                }
            };
            // What was published is in the client's hands now; keep only what acks it.
            delivery.body = Vec::new();
            budget.held.fetch_add(bytes, Ordering::AcqRel);
            let held = Held {
                delivery,
                settle,
                bytes,
            };
            if tx.send(held).await.is_err() {
                break Ok(());
            }
        };
        // Stop taking new messages, then settle everything held, within the drain bound.
        let _ = consumer.cancel().await;
        drop(tx);
        match tokio::time::timeout(self.drain, settler).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return result.and(Err(Error::from_join("route's settler", e))),
            Err(_) => tracing::warn!(
                "drain deadline passed; unsettled inputs will be redelivered by the broker"
            ),
        }
        result
    }

    /// Publishes what `outcome` says; returns the confirm to wait for, what to count
    /// once it came, and the bytes it holds meanwhile.
    async fn publish(
        &self,
        d: &Delivery,
        outcome: Outcome,
    ) -> Result<(Option<PendingConfirm>, Done, usize), AmqpError> {
        match outcome {
            Outcome::Consumed(c) => {
                self.counters.consumed(c);
                Ok((None, Done::Nothing, 0))
            }
            Outcome::Reject { reason, detail } => {
                self.counters.rejected(reason);
                let mut h = Headers::new();
                h.set(H_REASON, short(&Outcome::reason_text(reason, &detail)));
                h.set(H_EXCHANGE, short(&d.exchange));
                let c = if d.body.len() > REJECT_KEEP {
                    // Keep the evidence, not the payload: the rejected queue keeps 100 000.
                    h.set(H_SIZE, HeaderValue::Int(d.body.len() as i64));
                    self.client
                        .forward_body(
                            &self.rejected,
                            &d.routing_key,
                            d,
                            &d.body[..REJECT_KEEP],
                            &h,
                        )
                        .await?
                } else {
                    self.client
                        .forward(&self.rejected, &d.routing_key, d, &h)
                        .await?
                };
                Ok((Some(c), Done::Rejected, d.body.len().min(REJECT_KEEP)))
            }
            Outcome::Publish(p) => {
                let kind = match p.route {
                    Route::Source(_) => RouteKind::Source,
                    Route::Forward(_) => RouteKind::Forward,
                    Route::Unrouted => RouteKind::Unrouted,
                };
                let h = stamps(&p);
                let c = self
                    .client
                    .forward(&self.report_exchange, &d.routing_key, d, &h)
                    .await?;
                Ok((Some(c), Done::Routed(kind), d.body.len()))
            }
        }
    }
}

/// The headers route sets on a report: its stamps (a user's own are always replaced, by
/// an empty value when route could not tell) and the `BCC` key the broker fans out on.
fn stamps(p: &Publish) -> Headers {
    let mut h = Headers::new();
    h.set(H_CLIENT, short(p.client.as_deref().unwrap_or("")));
    h.set(H_SOURCE, short(p.source.as_deref().unwrap_or("")));
    h.set(H_HOPS, HeaderValue::Int(p.hops));
    h.set(
        "BCC",
        HeaderValue::Array(vec![HeaderValue::Str(p.route.bcc_key())]),
    );
    if p.route == Route::Unrouted {
        h.set(H_REASON, super::decide::Reason::UnknownSource.label());
    }
    h
}

fn short(s: &str) -> HeaderValue {
    HeaderValue::Str(truncated(s, MAX_SHORT).to_owned())
}

/// Awaits each confirm in order and settles its input: ack only after the confirm.
/// Inputs arrive in delivery order from one consumer channel, so consecutive successes are
/// acked together with `multiple`; anything else first flushes the acks before it and is
/// then settled on its own.
async fn settle(mut rx: mpsc::Receiver<Held>, counters: Arc<Counters>, budget: Arc<Budget>) {
    let mut pending: Option<Delivery> = None;
    let mut batched = 0usize;
    async fn flush(pending: &mut Option<Delivery>, batched: &mut usize) {
        if let Some(d) = pending.take() {
            let _ = d.ack_multiple().await;
        }
        *batched = 0;
    }
    loop {
        let held = match rx.try_recv() {
            Ok(h) => h,
            Err(mpsc::error::TryRecvError::Empty) => {
                flush(&mut pending, &mut batched).await;
                match rx.recv().await {
                    Some(h) => h,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        let ok = match held.settle {
            Settle::Requeue => false,
            Settle::Confirm(confirm, done) => {
                let result = match confirm {
                    Some(c) => c.wait().await,
                    None => Ok(()),
                };
                match result {
                    Ok(()) => {
                        count(&counters, done);
                        true
                    }
                    // No queue at all took it (not even an admin's on xreport): it was
                    // heard by nobody, and retrying would not change that.
                    Err(AmqpError::Unroutable { .. }) => {
                        counters.unheard();
                        true
                    }
                    // The publish channel or connection went away: the input goes back.
                    Err(e) if e.is_transient() => {
                        tracing::debug!("confirm lost, requeueing the input: {e}");
                        false
                    }
                    Err(e) => {
                        tracing::warn!("output not confirmed ({e}); requeueing the input");
                        counters.retried();
                        // Do not spin on a broker that keeps refusing.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        false
                    }
                }
            }
        };
        if !ok {
            // Settled on its own, after the acks before it: a later `multiple` ack must
            // never cover an input whose output was not confirmed. (On a dead channel
            // this is a no-op and the broker redelivers it anyway.)
            flush(&mut pending, &mut batched).await;
            let _ = held.delivery.nack(true).await;
        }
        if held.bytes > 0 {
            budget.held.fetch_sub(held.bytes, Ordering::AcqRel);
            budget.freed.notify_one();
        }
        if ok {
            if pending
                .as_ref()
                .is_some_and(|p| !p.same_channel(&held.delivery))
            {
                flush(&mut pending, &mut batched).await;
            }
            pending = Some(held.delivery);
            batched += 1;
            if batched >= ACK_BATCH {
                flush(&mut pending, &mut batched).await;
            }
        }
    }
    flush(&mut pending, &mut batched).await;
}

fn count(counters: &Counters, done: Done) {
    match done {
        Done::Nothing => {}
        Done::Rejected => {}
        Done::Routed(RouteKind::Source) => counters.routed(),
        Done::Routed(RouteKind::Forward) => counters.forwarded(),
        Done::Routed(RouteKind::Unrouted) => counters.unrouted(),
    }
}
