//! The one AMQP adapter every pumpwatch daemon and command shares: connect, declare,
//! consume with prefetch, publish with confirms, and survive broker loss.
//!
//! Why one adapter: reconnecting, redeclaring, re-subscribing and the at-least-once
//! rules (ack an input only after its outputs are confirmed) are easy to get subtly
//! wrong; written once here, every component gets them the same way and the rest of
//! the code never touches lapin.
//!
//! - [`Client::connect`] fails fast (commands exit 1); afterwards, with `reconnect`
//!   on, a supervisor task replaces a lost connection with exponential backoff and
//!   jitter (capped at [`MAX_BACKOFF`]), logs one WARN per outage (redacted URL and reason) and redeclares every
//!   [`Topology`] ever declared.
//! - [`Client::publish`] / [`Client::publish_raw`] / [`Client::forward`] return once the
//!   message is sent, with a [`PendingConfirm`] to await later, so thousands can be in
//!   flight. While the broker is away they wait for the next connection (bounded by
//!   [`RECONNECT_WAIT`]).
//! - A [`Consumer`] keeps yielding across reconnects; acking a [`Delivery`] whose
//!   connection is gone is an `Ok` no-op (the broker redelivers it).
//! - Errors are one line and never show a password (URLs are [`BrokerUrl`]s, which
//!   display redacted).
//!
//! lapin logs by itself: returned (unroutable) messages at WARN with their body and
//! connection losses at ERROR. Daemons that log outages through this module may want
//! a `lapin=off` (or `lapin=error`) directive in their tracing filter.

mod client;
mod consumer;
mod convert;
mod error;
mod topology;

pub use crate::broker::url::BrokerUrl;

pub(crate) use client::backoff;
pub use client::{
    CONNECT_TIMEOUT, Client, ConnectOptions, MAX_BACKOFF, PendingConfirm, RECONNECT_WAIT,
};
pub use consumer::{Activity, Consumer, Delivery, PROBE_EVERY, PROBE_HEADER};
pub use convert::{MAX_SHORT, MessageProps, truncate_short};
pub use error::AmqpError;
pub use topology::{
    BindingDecl, ExchangeBindingDecl, ExchangeDecl, ExchangeKind, QueueDecl, Topology,
};
