//! `pumpwatch log [PATTERN]` (SPEC §4.3): bind a queue to the report exchange and print
//! the reports that pass the filters, live. Reads `xreport` (admins) or `xr_<user>` (a
//! source); acks each message once its line is written and flushed, so a durable `--queue`
//! resumes after a restart without losing or skipping anything.

mod output;

use super::{Common, Error, FilterArgs, UsageError, parse_duration, parse_regex};
use crate::broker::amqp::{AmqpError, Client, ConnectOptions, QueueDecl, Topology};
use crate::broker::names;
use crate::broker::url::BrokerUrl;
use crate::config::Role;
use crate::core::Headers;
use crate::core::attribution::Attributor;
use crate::core::filter::Filter;
use crate::core::report::{self, Message};
use crate::core::text;
use crate::shutdown::Shutdown;
pub use output::{Output, json_line, raw_line, text_line};
use regex::Regex;
use std::io::Write;
use std::time::Duration;

/// `pumpwatch log` flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Regex over topic, body and header values.
    #[arg(value_parser = parse_regex)]
    pub pattern: Option<Regex>,
    /// Bind to this exchange instead of xreport (admins) or xr_<user> (a source).
    #[arg(long, value_name = "NAME")]
    pub exchange: Option<String>,
    #[command(flatten)]
    pub filters: FilterArgs,
    /// One JSON object per line (the normalised report).
    #[arg(long, conflicts_with = "raw")]
    pub json: bool,
    /// The message as received (exchange, topic, headers, body), one JSON object per line.
    #[arg(long)]
    pub raw: bool,
    /// Stop after printing N reports.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Stop after this long (seconds, or 5m, 1h…).
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Stop after this long without a message.
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub idle: Option<Duration>,
    /// Use a durable named queue (q_<user>.log.NAME) so a restart resumes where it stopped.
    #[arg(long, value_name = "NAME")]
    pub queue: Option<String>,
    /// Print counts (printed, filtered, skipped) on stderr at the end.
    #[arg(long)]
    pub stats: bool,
    /// Messages the broker may send before an ack [default: 200].
    #[arg(long)]
    pub prefetch: Option<u16>,
}

/// Everything `log` needs, already validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub broker: BrokerUrl,
    /// Bind here; `None` = the report exchange for admins, `xr_<user>` for a source.
    pub exchange: Option<String>,
    /// The pump's report exchange name (`xreport`).
    pub report_exchange: String,
    /// True when the configuration declares the broker user as a source.
    pub user_is_source: bool,
    pub filter: Filter,
    /// Who a report's client and source are, as every component sees them.
    pub attributor: Attributor,
    pub output: Output,
    pub count: Option<u64>,
    /// Stop after this long in all.
    pub timeout: Option<Duration>,
    /// Stop after this long without a message.
    pub idle: Option<Duration>,
    /// A durable named queue, so a restart resumes where it stopped.
    pub queue: Option<String>,
    pub prefetch: u16,
    /// Print the counts on stderr at the end.
    pub stats: bool,
}

impl Config {
    pub fn from_args(a: Args, common: &Common) -> Result<Config, UsageError> {
        let file = &common.file;
        if a.prefetch == Some(0) {
            return Err(UsageError::new("invalid --prefetch 0: must be at least 1"));
        }
        if let Some(q) = &a.queue
            && (q.is_empty() || q.len() > 200)
        {
            return Err(UsageError::new("invalid --queue: 1 to 200 characters"));
        }
        if let Some(x) = &a.exchange {
            super::check_object_name("--exchange", x)?;
        }
        Ok(Config {
            broker: common.broker.clone(),
            exchange: a.exchange,
            report_exchange: file.exchanges.report.clone(),
            user_is_source: file.role_of(common.broker.user()) == Some(Role::Source),
            filter: a.filters.over(Filter {
                pattern: a.pattern,
                ..Filter::default()
            }),
            attributor: file.attributor(),
            output: if a.json {
                Output::Json
            } else if a.raw {
                Output::Raw
            } else {
                Output::Text
            },
            count: a.count,
            timeout: a.timeout,
            idle: a.idle,
            queue: a.queue,
            prefetch: a.prefetch.unwrap_or(200),
            stats: a.stats,
        })
    }
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

/// `pumpwatch log`: prints to stdout until done; a closed pipe (`| head`) is the reader
/// saying it has seen enough, not an error.
pub async fn run(cfg: Config, shutdown: Shutdown) -> Result<(), Error> {
    let stats = cfg.stats;
    let mut out = std::io::BufWriter::new(std::io::stdout());
    match stream(cfg, shutdown, &mut out).await {
        Ok(s) => {
            if stats {
                eprintln!("pumpwatch log: {s}");
            }
            Ok(())
        }
        Err(Error::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e),
    }
}

/// Runs until `count` reports were printed, a time limit passed, or `shutdown`.
pub async fn stream(
    cfg: Config,
    shutdown: Shutdown,
    out: &mut (dyn Write + Send),
) -> Result<Stats, Error> {
    let user = cfg.broker.user();
    let queue = match &cfg.queue {
        // A durable queue survives restarts; otherwise the broker removes it with `log`.
        Some(q) if q.starts_with("q_") => QueueDecl::durable(q.clone()),
        Some(q) => QueueDecl::durable(names::named_queue(user, "log", q)),
        None => QueueDecl::exclusive(names::private_queue(user, "log")),
    };
    let own = names::source_exchange(user);
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
            .map(Error::from)
            .unwrap_or_else(|| Error::Broker(AmqpError::Closed("no exchange to bind".into()))));
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
                let who = cfg.attributor.who(&r, inc.user_id);
                if cfg.filter.matches(&r, &who, &inc) {
                    Some(match cfg.output {
                        Output::Text => text_line(&r, &who),
                        Output::Json => json_line(&r, &who),
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
                    tracing::debug!(
                        topic = %text::escape(inc.routing_key),
                        "skipping malformed message: {}",
                        text::escape(&e.to_string())
                    );
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
