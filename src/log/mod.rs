//! `pumpwatch log [PATTERN]` (SPEC §4.3): bind a queue to the report exchange and print
//! the reports that pass the filters, live. Reads `xreport` (admins) or `xr_<user>` (a
//! source); acks each message once its line is written and flushed, so a durable `--queue`
//! resumes after a restart without losing or skipping anything.

mod output;

use crate::amqp::{AmqpError, Client, ConnectOptions, QueueDecl, Topology};
use crate::core::Headers;
use crate::core::filter::Filter;
use crate::core::report::{self, Message};
use crate::shutdown::Shutdown;
pub use output::{Output, json_line, raw_line, text_line};
use std::io::Write;
use std::time::Duration;

/// Everything `log` needs, already validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub broker: String,
    /// Bind here; `None` = the report exchange for admins, `xr_<user>` for a source.
    pub exchange: Option<String>,
    /// The pump's report exchange name (`xreport`).
    pub report_exchange: String,
    /// True when the configuration declares the broker user as a source.
    pub user_is_source: bool,
    pub filter: Filter,
    pub output: Output,
    pub count: Option<u64>,
    /// Stop after this long in all.
    pub timeout: Option<Duration>,
    /// Stop after this long without a message.
    pub idle: Option<Duration>,
    /// A durable named queue, so a restart resumes where it stopped.
    pub queue: Option<String>,
    pub prefetch: u16,
}

/// What `log` saw, printed at the end with `--stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub printed: u64,
    pub filtered: u64,
    pub announcements: u64,
    pub control: u64,
    pub malformed: u64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "printed {}, filtered out {}, announcements skipped {}, speedo/watchdog skipped {}, malformed {}",
            self.printed, self.filtered, self.announcements, self.control, self.malformed
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{0}")]
    Broker(#[from] AmqpError),
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

/// The broker user named in an AMQP URL (`guest` when none).
pub fn broker_user(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .map(|u| {
            percent_encoding::percent_decode_str(u.username())
                .decode_utf8_lossy()
                .into_owned()
        })
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "guest".to_owned())
}

/// Runs until `count` reports were printed, a time limit passed, or `shutdown`.
pub async fn run(
    cfg: Config,
    shutdown: Shutdown,
    out: &mut (dyn Write + Send),
) -> Result<Stats, LogError> {
    let user = broker_user(&cfg.broker);
    let queue = match &cfg.queue {
        // A durable queue survives restarts; otherwise the broker removes it with `log`.
        Some(q) if q.starts_with("q_") => QueueDecl::durable(q.clone()),
        Some(q) => QueueDecl::durable(format!("q_{user}.log.{q}")),
        None => QueueDecl::exclusive(crate::names::private_queue(&user, "log")),
    };
    let own = format!("xr_{user}");
    let candidates: Vec<String> = match &cfg.exchange {
        Some(x) => vec![x.clone()],
        None if cfg.user_is_source => vec![own],
        // Unknown role: try the admin view first, then the source's own exchange.
        None => vec![cfg.report_exchange.clone(), own],
    };
    let mut last_err = None;
    let mut client = None;
    for exchange in &candidates {
        let opts = ConnectOptions {
            name: "pumpwatch log".into(),
            topology: Topology::bound_queue(queue.clone(), exchange, "#"),
            ..ConnectOptions::default()
        };
        match Client::connect(&cfg.broker, opts).await {
            Ok(c) => {
                client = Some((c, exchange.clone()));
                break;
            }
            Err(e @ AmqpError::AccessRefused(_)) if candidates.len() > 1 => last_err = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    let Some((client, exchange)) = client else {
        return Err(last_err
            .map(LogError::from)
            .unwrap_or_else(|| LogError::Broker(AmqpError::Closed("no exchange to bind".into()))));
    };
    eprintln!(
        "pumpwatch log: listening on {exchange} (queue {})",
        queue.name
    );
    let mut consumer = client.consume(&queue.name, cfg.prefetch).await?;
    let mut stats = Stats::default();
    let deadline = cfg.timeout.map(|t| tokio::time::Instant::now() + t);
    let result = loop {
        if cfg.count.is_some_and(|n| stats.printed >= n) {
            break Ok(());
        }
        let idle = cfg.idle.map(|d| tokio::time::Instant::now() + d);
        let limit = match (deadline, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let next = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = sleep_until(limit) => break Ok(()),
            d = consumer.next() => d,
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => break Err(e.into()),
            None => break Ok(()),
        };
        let inc = delivery.incoming();
        let line = match report::parse(&inc) {
            Ok(Message::Report(r)) => {
                if cfg.filter.matches(&r, &inc) {
                    Some(match cfg.output {
                        Output::Text => text_line(&r),
                        Output::Json => json_line(&r),
                        Output::Raw => raw_line(&inc),
                    })
                } else {
                    stats.filtered += 1;
                    None
                }
            }
            other => {
                match &other {
                    Ok(Message::Announcement(_)) => stats.announcements += 1,
                    Ok(Message::Control(_)) => stats.control += 1,
                    _ => stats.malformed += 1,
                }
                if let Err(e) = &other {
                    tracing::debug!(topic = inc.routing_key, "skipping malformed message: {e}");
                }
                // Raw mode shows what arrives, reports or not, unless a field filter is set.
                (cfg.output == Output::Raw
                    && cfg.filter.is_pattern_only()
                    && cfg.filter.pattern_matches(&inc))
                .then(|| raw_line(&inc))
            }
        };
        if let Some(line) = line {
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
            out.flush()?;
            stats.printed += 1;
        }
        delivery.ack().await?;
    };
    client.close().await;
    result.map(|()| stats)
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Header tables for `--raw` and `--json`.
pub(crate) fn headers_json(h: &Headers) -> serde_json::Value {
    serde_json::to_value(h).unwrap_or(serde_json::Value::Null)
}
