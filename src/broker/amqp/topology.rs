//! What a daemon needs to exist on the broker (exchanges, queues, bindings), as plain
//! values, and the one function that declares them on a connection.
//!
//! Why values: the client remembers every declaration and replays it after a reconnect
//! (exclusive queues vanish with their connection; a restarted broker may have lost
//! transient ones), so declarations must outlive the connection they were made on.

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;

use super::convert::{short_lossy, short_name, to_field_table};
use super::error::{AmqpError, from_lapin};
use crate::core::Headers;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Topic,
    Fanout,
    Direct,
    Headers,
}

impl From<ExchangeKind> for lapin::ExchangeKind {
    fn from(k: ExchangeKind) -> Self {
        match k {
            ExchangeKind::Topic => lapin::ExchangeKind::Topic,
            ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
            ExchangeKind::Direct => lapin::ExchangeKind::Direct,
            ExchangeKind::Headers => lapin::ExchangeKind::Headers,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeDecl {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
}

impl ExchangeDecl {
    /// A durable topic exchange, the kind every pump exchange is.
    pub fn topic(name: impl Into<String>) -> Self {
        ExchangeDecl {
            name: name.into(),
            kind: ExchangeKind::Topic,
            durable: true,
        }
    }
}

/// A queue. The name must not be empty (a broker-named queue would get another name
/// after a reconnect); `arguments` are `x-message-ttl`, `x-max-length`, ...
#[derive(Debug, Clone, PartialEq)]
pub struct QueueDecl {
    pub name: String,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: Headers,
}

impl QueueDecl {
    /// A durable, shared queue (what the daemons consume from).
    pub fn durable(name: impl Into<String>) -> Self {
        QueueDecl {
            name: name.into(),
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: Headers::new(),
        }
    }

    /// A private queue the broker removes when its connection goes (one reader's view).
    pub fn exclusive(name: impl Into<String>) -> Self {
        QueueDecl {
            name: name.into(),
            durable: false,
            exclusive: true,
            auto_delete: true,
            arguments: Headers::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingDecl {
    pub queue: String,
    pub exchange: String,
    pub routing_key: String,
}

impl BindingDecl {
    pub fn new(
        queue: impl Into<String>,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Self {
        BindingDecl {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        }
    }
}

/// An exchange-to-exchange binding: what `source` routes with `routing_key` (or a `BCC`
/// key) is delivered to `destination` too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeBindingDecl {
    pub source: String,
    pub destination: String,
    pub routing_key: String,
}

/// Declarations, applied in order: exchanges, then queues, then bindings.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Topology {
    pub exchanges: Vec<ExchangeDecl>,
    pub queues: Vec<QueueDecl>,
    pub bindings: Vec<BindingDecl>,
    pub exchange_bindings: Vec<ExchangeBindingDecl>,
}

impl Topology {
    pub fn is_empty(&self) -> bool {
        self.exchanges.is_empty()
            && self.queues.is_empty()
            && self.bindings.is_empty()
            && self.exchange_bindings.is_empty()
    }

    /// Adds `other`: a declaration of an already known exchange or queue replaces it,
    /// a known binding is not repeated.
    /// One queue bound to one exchange with one routing key.
    pub fn bound_queue(queue: QueueDecl, exchange: &str, routing_key: &str) -> Topology {
        Topology {
            exchanges: vec![],
            bindings: vec![BindingDecl {
                queue: queue.name.clone(),
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            }],
            queues: vec![queue],
            exchange_bindings: vec![],
        }
    }

    pub fn merge(&mut self, other: &Topology) {
        for x in &other.exchanges {
            match self.exchanges.iter_mut().find(|e| e.name == x.name) {
                Some(e) => *e = x.clone(),
                None => self.exchanges.push(x.clone()),
            }
        }
        for q in &other.queues {
            match self.queues.iter_mut().find(|e| e.name == q.name) {
                Some(e) => *e = q.clone(),
                None => self.queues.push(q.clone()),
            }
        }
        for b in &other.bindings {
            if !self.bindings.contains(b) {
                self.bindings.push(b.clone());
            }
        }
        for b in &other.exchange_bindings {
            if !self.exchange_bindings.contains(b) {
                self.exchange_bindings.push(b.clone());
            }
        }
    }

    /// Checks what the broker would refuse in a way that could not be retried.
    pub(crate) fn validate(&self) -> Result<(), AmqpError> {
        for x in &self.exchanges {
            short_name(&x.name, "exchange")?;
        }
        for q in &self.queues {
            if q.name.is_empty() {
                return Err(AmqpError::Invalid(
                    "queue names must be given (a broker-named queue cannot survive a reconnect)"
                        .into(),
                ));
            }
            short_name(&q.name, "queue")?;
        }
        for b in &self.bindings {
            short_name(&b.queue, "queue")?;
            short_name(&b.exchange, "exchange")?;
        }
        for b in &self.exchange_bindings {
            short_name(&b.source, "exchange")?;
            short_name(&b.destination, "exchange")?;
        }
        Ok(())
    }
}

/// Declares `t` on a fresh channel of `conn` (a refused declaration closes its channel,
/// so the publish channel is never used for this), then closes that channel.
pub(crate) async fn declare_on(conn: &lapin::Connection, t: &Topology) -> Result<(), AmqpError> {
    if t.is_empty() {
        return Ok(());
    }
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| from_lapin(&e, "opening a channel to declare"))?;
    let result = declare_all(&ch, t).await;
    if ch.status().connected() {
        let _ = ch.close(200, "declared".into()).await;
    }
    result
}

async fn declare_all(ch: &lapin::Channel, t: &Topology) -> Result<(), AmqpError> {
    for x in &t.exchanges {
        if x.name.is_empty() {
            continue; // the default exchange always exists and cannot be declared
        }
        let options = ExchangeDeclareOptions {
            durable: x.durable,
            // `amq.*` names are reserved: only a passive check is allowed.
            passive: x.name.starts_with("amq."),
            ..ExchangeDeclareOptions::default()
        };
        ch.exchange_declare(
            short_name(&x.name, "exchange")?,
            x.kind.into(),
            options,
            FieldTable::default(),
        )
        .await
        .map_err(|e| from_lapin(&e, &format!("declaring exchange '{}'", x.name)))?;
    }
    for q in &t.queues {
        let options = QueueDeclareOptions {
            durable: q.durable,
            exclusive: q.exclusive,
            auto_delete: q.auto_delete,
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare(
            short_name(&q.name, "queue")?,
            options,
            to_field_table(&q.arguments),
        )
        .await
        .map_err(|e| queue_error(from_lapin(&e, &format!("declaring queue '{}'", q.name))))?;
    }
    for b in &t.bindings {
        ch.queue_bind(
            short_name(&b.queue, "queue")?,
            short_name(&b.exchange, "exchange")?,
            short_lossy(&b.routing_key),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            from_lapin(
                &e,
                &format!(
                    "binding queue '{}' to '{}' with '{}'",
                    b.queue, b.exchange, b.routing_key
                ),
            )
        })?;
    }
    for b in &t.exchange_bindings {
        ch.exchange_bind(
            short_name(&b.destination, "exchange")?,
            short_name(&b.source, "exchange")?,
            short_lossy(&b.routing_key),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            from_lapin(
                &e,
                &format!(
                    "binding exchange '{}' to '{}' with '{}'",
                    b.destination, b.source, b.routing_key
                ),
            )
        })?;
    }
    Ok(())
}

/// A queue that exists with other arguments (PRECONDITION_FAILED, "inequivalent arg")
/// was declared by an earlier version or by hand: say where to look, since the broker's
/// words alone do not tell an operator what to do.
fn queue_error(e: AmqpError) -> AmqpError {
    match e {
        AmqpError::Protocol(text) if text.contains("inequivalent arg") => {
            AmqpError::Protocol(format!(
                "{text} (the queue exists with other arguments, e.g. declared by an earlier \
                 pumpwatch: `pumpwatch setup --dry-run` says how to change it)"
            ))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_replaces_and_dedups() {
        let mut t = Topology {
            exchanges: vec![ExchangeDecl::topic("x")],
            queues: vec![QueueDecl::durable("q")],
            bindings: vec![BindingDecl::new("q", "x", "#")],
            exchange_bindings: vec![],
        };
        let mut q2 = QueueDecl::durable("q");
        q2.durable = false;
        t.merge(&Topology {
            exchanges: vec![ExchangeDecl::topic("x"), ExchangeDecl::topic("y")],
            queues: vec![q2.clone()],
            bindings: vec![
                BindingDecl::new("q", "x", "#"),
                BindingDecl::new("q", "y", "#"),
            ],
            exchange_bindings: vec![],
        });
        assert_eq!(t.exchanges.len(), 2);
        assert_eq!(t.queues, vec![q2]);
        assert_eq!(t.bindings.len(), 2);
    }

    #[test]
    fn validate_refuses_unnamed_and_long() {
        let t = Topology {
            queues: vec![QueueDecl::durable("")],
            ..Default::default()
        };
        assert!(matches!(t.validate(), Err(AmqpError::Invalid(_))));
        let t = Topology {
            exchanges: vec![ExchangeDecl::topic("x".repeat(300))],
            ..Default::default()
        };
        assert!(matches!(t.validate(), Err(AmqpError::Invalid(_))));
    }
}
