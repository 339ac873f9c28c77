//! `pumpwatch report`: publish one report from flags, for scripts and for consumers that
//! cannot report themselves. It publishes to the broker user's own `xs_<user>` unless told
//! otherwise, exactly as a consumer would, and waits for the broker's confirm.

use crate::amqp::{AmqpError, Client, ConnectOptions};
use crate::core::emit::emit;
use crate::core::report::{Format, Report};

#[derive(Debug, Clone)]
pub struct Config {
    pub broker: String,
    /// `None` = `xs_<broker user>`.
    pub exchange: Option<String>,
    pub format: Format,
    pub report: Report,
}

/// Where the report went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub exchange: String,
    pub routing_key: String,
}

pub async fn run(cfg: Config) -> Result<Published, AmqpError> {
    let exchange = cfg
        .exchange
        .clone()
        .unwrap_or_else(|| format!("xs_{}", crate::log::broker_user(&cfg.broker)));
    let out = emit(&cfg.report, cfg.format);
    let opts = ConnectOptions {
        name: "pumpwatch report".into(),
        reconnect: false,
        ..ConnectOptions::default()
    };
    let client = Client::connect(&cfg.broker, opts).await?;
    let result = match client.publish(&exchange, &out).await {
        Ok(p) => p.wait().await,
        Err(e) => Err(e),
    };
    client.close().await;
    result.map(|()| Published {
        exchange,
        routing_key: out.routing_key,
    })
}
