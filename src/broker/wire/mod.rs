//! A minimal AMQP 0-9-1 client for `route`'s hot path: one connection, one consuming and
//! one confirming publishing channel, driven from **one task** with no thread hand-offs.
//!
//! Why besides the `amqp` adapter (lapin): lapin runs every connection's I/O on its own
//! thread, so each delivery, publish and confirm crosses threads; profiled, more than half
//! of route's CPU went to those hand-offs (futex wake-ups, context switches), about 35 µs
//! per report in all. `amqprs`, a tokio-native client, measured 13.5 µs per report in a
//! spike of the same loop, but it decodes long strings as UTF-8 text: one report with a
//! non-UTF-8 header value (valid AMQP, passed on by RabbitMQ) kills the connection on every
//! redelivery, a poisoned queue. This client is small because route needs little, keeps
//! every header as bytes, and lets the caller do everything (decide, publish, settle) in
//! the same task as the reads and writes: [`Session::next_events`] reads what is there and
//! flushes what was queued.
//!
//! Topology and everything else stay on the `amqp` adapter.

pub mod codec;
mod session;

pub use codec::{Properties, RawTable};
pub use session::{Delivery, Event, Session, WireError};
