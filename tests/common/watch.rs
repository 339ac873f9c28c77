//! Watching what arrives on an exchange: a queue of the test's own, consumed into a
//! [`Seen`] that the test reads and waits on (every message acked once recorded).

use pumpwatch::broker::amqp::{Client, ConnectOptions, ExchangeDecl, QueueDecl, Topology};
use pumpwatch::core::Headers;
use pumpwatch::core::headers::HeaderValue;
use pumpwatch::core::report::Incoming;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A message as a test queue received it.
#[derive(Debug, Clone)]
pub struct Got {
    /// When it arrived.
    pub at: Instant,
    pub exchange: String,
    pub routing_key: String,
    pub content_type: Option<String>,
    pub user_id: Option<String>,
    pub headers: Headers,
    pub body: Vec<u8>,
}

impl Got {
    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// An integer header.
    pub fn int(&self, h: &str) -> Option<i64> {
        match self.headers.get(h) {
            Some(HeaderValue::Int(i)) => Some(*i),
            _ => None,
        }
    }

    /// The relPath of a text (v01/v02-style) body: its third word.
    pub fn rel_path(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.body);
        text.split_whitespace().nth(2).map(str::to_owned)
    }

    /// The message as the core parses it.
    pub fn incoming(&self) -> Incoming<'_> {
        Incoming {
            exchange: &self.exchange,
            routing_key: &self.routing_key,
            body: &self.body,
            content_type: self.content_type.as_deref(),
            user_id: self.user_id.as_deref(),
            headers: &self.headers,
        }
    }
}

/// Everything a watch received so far, in arrival order.
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<Vec<Got>>>);

impl Seen {
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn all(&self) -> Vec<Got> {
        self.0.lock().unwrap().clone()
    }

    /// Those whose routing key starts with `p`.
    pub fn with_prefix(&self, p: &str) -> Vec<Got> {
        self.all()
            .into_iter()
            .filter(|g| g.routing_key.starts_with(p))
            .collect()
    }

    /// The relPaths of text bodies (see [`Got::rel_path`]).
    pub fn rel_paths(&self) -> HashSet<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(Got::rel_path)
            .collect()
    }

    /// Waits until at least `n` messages arrived (panics naming `what` after `deadline`).
    pub async fn wait_len(&self, n: usize, what: &str, deadline: Duration) {
        super::wait_until(what, deadline, || {
            let len = self.len();
            async move { len >= n }
        })
        .await;
    }
}

/// Consumes `queue` (which exists) as the URL's user into `seen`, until the client closes.
pub async fn consume(url: &str, queue: &str, seen: &Seen) -> Client {
    let client = Client::connect(
        &super::broker(url),
        ConnectOptions::new(format!("test reader {queue}")),
    )
    .await
    .unwrap();
    record(&client, queue, seen).await;
    client
}

/// Everything arriving on the topic exchange `exchange` (declared if missing) under `key`,
/// through `queue` (declared and bound here).
pub async fn watch(url: &str, exchange: &str, key: &str, queue: QueueDecl) -> (Client, Seen) {
    let name = queue.name.clone();
    let topology = Topology {
        exchanges: vec![ExchangeDecl::topic(exchange)],
        ..Topology::bound_queue(queue, exchange, key)
    };
    let client = Client::connect(
        &super::broker(url),
        ConnectOptions {
            topology,
            ..ConnectOptions::new(format!("watch {exchange}"))
        },
    )
    .await
    .unwrap();
    let seen = Seen::default();
    record(&client, &name, &seen).await;
    (client, seen)
}

async fn record(client: &Client, queue: &str, seen: &Seen) {
    let mut consumer = client.consume(queue, 1000).await.unwrap();
    let seen = seen.clone();
    tokio::spawn(async move {
        // An error is a refused re-subscription (the next call retries after a backoff):
        // recording goes on across broker outages until the client closes.
        while let Some(d) = consumer.next().await {
            let Ok(d) = d else { continue };
            seen.0.lock().unwrap().push(Got {
                at: Instant::now(),
                exchange: d.exchange.clone(),
                routing_key: d.routing_key.clone(),
                content_type: d.props.content_type.clone(),
                user_id: d.props.user_id.clone(),
                headers: d.props.headers.clone(),
                body: d.body.clone(),
            });
            let _ = d.ack().await;
        }
    });
}
