//! `pumpwatch speedo` (SPEC §4.5): speedometers. Consumes every report in `xreport` and,
//! every interval, publishes per client, per source and for the whole pump how many
//! transfers went well or failed and how fast, to `xreport` (admins) and to each
//! `xr_<source>` (that source's products only); zeros too, until a meter has been silent
//! for `expire`.
//!
//! The counting is the pure [`meter`] core; the wire format is [`body`]; who a report is
//! about is the pump's one [`Attributor`]. This file is the shell: a consume loop that records and acks, and a
//! timer that publishes.
//!
//! **When it acks.** Each report is acked as soon as it is recorded, in memory. Counts are
//! cumulative per run by design (a restart shows as a decrease, which readers treat as a
//! counter reset), so nothing is kept on disk: a crash loses at most the counts since the
//! last speedo, and a clean stop (SIGTERM) loses nothing, since it publishes a last speedo
//! for every meter (with the partial interval) before exiting. A report redelivered after
//! a lost connection is counted again (at least once).

pub mod body;
pub mod meter;

pub use body::{Decoded, Reading, SpeedoError, Subject, decode, encode};
pub use meter::{Counts, Sample, Settings, Speedo, Speedometers, Target, UNKNOWN};

use super::{Common, Error, UsageError, parse_duration};
use crate::broker::amqp::{
    AmqpError, Client, ConnectOptions, ExchangeDecl, PendingConfirm, Topology,
};
use crate::broker::names;
use crate::broker::url::BrokerUrl;
use crate::config::{Config as PumpConfig, Role};
use crate::core::attribution::Attributor;
use crate::core::report::{self, Message, Report};
use crate::core::text;
use crate::shutdown::Shutdown;
use jiff::{SignedDuration, Timestamp};
use std::collections::HashSet;
use std::fmt;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// `pumpwatch speedo` flags; each overrides the `[speedo]` table of the configuration.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Publish each client's and source's speedo this often [default: speedo.interval, 60 s].
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub interval: Option<Duration>,
    /// Publish the pump's totals (`.all`) this often [default: speedo.all_interval, 1 s].
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub all_interval: Option<Duration>,
    /// Stop publishing zeros for a client or source silent this long [default: speedo.expire, 24 h].
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub expire: Option<Duration>,
    /// Unacknowledged reports the broker may send ahead [default: 500].
    #[arg(long)]
    pub prefetch: Option<u16>,
}

/// Everything `speedo` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub broker: BrokerUrl,
    pub pump: PumpConfig,
    /// The account speedo runs as; names its queue (`q_<feeder>.speedo`).
    pub feeder: String,
    pub settings: Settings,
    pub prefetch: u16,
    /// How long a stop may spend on the last speedos and their confirms.
    pub drain: Duration,
}

impl Config {
    /// The configuration with the flags applied; a bad flag value is a usage error.
    pub fn from_args(args: Args, common: &Common) -> Result<Config, UsageError> {
        let pump = common.file.clone();
        let mut settings = Settings::from_config(&pump);
        for (flag, value, slot) in [
            ("--interval", args.interval, &mut settings.interval),
            (
                "--all-interval",
                args.all_interval,
                &mut settings.all_interval,
            ),
        ] {
            if let Some(v) = value {
                if v < Duration::from_millis(100) {
                    return Err(UsageError(format!(
                        "invalid {flag} {v:?}: must be at least 0.1 s"
                    )));
                }
                *slot = v;
            }
        }
        if let Some(e) = args.expire {
            settings.expire = e;
        }
        if args.prefetch == Some(0) {
            return Err(UsageError::new("invalid --prefetch 0: must be at least 1"));
        }
        Ok(Config {
            feeder: names::feeder(&pump, common.broker.user()),
            broker: common.broker.clone(),
            settings,
            pump,
            prefetch: args.prefetch.unwrap_or(500),
            drain: Duration::from_secs(3),
        })
    }
}

/// `pumpwatch speedo`: runs until `shutdown`, then publishes a last speedo and exits.
pub async fn run(cfg: Config, shutdown: Shutdown) -> Result<(), Error> {
    let summary = run_counting(cfg, shutdown).await?;
    tracing::info!("speedo stopped: {summary}");
    Ok(())
}

/// What one run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Reports counted.
    pub recorded: u64,
    /// Reports counted in nothing (102 started, codes of no class).
    pub not_counted: u64,
    pub announcements: u64,
    /// Speedo and watchdog messages (including this speedo's own), skipped.
    pub control: u64,
    pub malformed: u64,
    /// Speedo messages confirmed by the broker.
    pub published: u64,
    /// Speedo messages no queue was bound for (nobody listening: fine).
    pub unheard: u64,
    /// Speedo messages not published or not confirmed.
    pub failed: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "recorded {}, not counted {}, announcements {}, speedo/watchdog {}, malformed {}; \
             speedos published {}, unheard {}, failed {}",
            self.recorded,
            self.not_counted,
            self.announcements,
            self.control,
            self.malformed,
            self.published,
            self.unheard,
            self.failed
        )
    }
}

/// Counts `r` under its client and source as the pump's [`Attributor`] tells them
/// ([`UNKNOWN`] when it cannot); false when the report counts in nothing (102 started).
fn record(meters: &mut Speedometers, who: &Attributor, r: &Report, user_id: Option<&str>) -> bool {
    let client = who.client(r, user_id);
    let source = who.source(r);
    meters.record(&Sample {
        client: client.as_deref().unwrap_or(UNKNOWN),
        source: source.as_deref().unwrap_or(UNKNOWN),
        code: r.code,
        bytes: r.size_bytes.unwrap_or(0),
    })
}

/// Wall time that only moves forward with the monotonic clock: a jump of the system clock
/// neither skips nor repeats intervals. Tokio's clock, so tests can pause it.
#[derive(Debug, Clone, Copy)]
struct Clock {
    wall: Timestamp,
    mono: Instant,
}

impl Clock {
    fn start() -> Clock {
        Clock {
            wall: Timestamp::now(),
            mono: Instant::now(),
        }
    }

    fn now(&self) -> Timestamp {
        let d = SignedDuration::try_from(self.mono.elapsed()).unwrap_or(SignedDuration::MAX);
        self.wall.checked_add(d).unwrap_or(Timestamp::MAX)
    }

    fn instant_of(&self, t: Timestamp) -> Instant {
        let d = t.duration_since(self.wall);
        match Duration::try_from(d) {
            Ok(d) => self.mono.checked_add(d).unwrap_or(self.mono + YEAR),
            Err(_) => self.mono,
        }
    }
}

const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// What speedo reads from and publishes to; declared at start and after reconnects.
pub fn topology(cfg: &Config) -> Topology {
    let p = &cfg.pump;
    let q = names::speedo_queue(p, &cfg.feeder);
    let mut t = Topology {
        exchanges: vec![ExchangeDecl::topic(&p.exchanges.report)],
        ..q.topology()
    };
    for u in p.users.values().filter(|u| u.role == Role::Source) {
        t.exchanges
            .push(ExchangeDecl::topic(names::source_exchange(&u.name)));
    }
    t
}

/// Publishes speedos and hands their confirms to the settler.
struct Publisher {
    client: Client,
    report_exchange: String,
    /// `xr_<source>` exchanges known to exist; others are declared before the first use.
    declared: HashSet<String>,
    /// Sources whose exchange could not be declared (e.g. no permission): skipped.
    refused: HashSet<String>,
    confirms: mpsc::Sender<PendingConfirm>,
    failed: u64,
}

impl Publisher {
    /// Publishes `speedos`; stops early (counting the rest as failed) when the connection
    /// goes away, since the next speedo carries the same cumulative counts.
    async fn publish(&mut self, speedos: Vec<Speedo>) {
        let n = speedos.len();
        for (i, s) in speedos.into_iter().enumerate() {
            let exchange = match &s.target {
                Target::Report => self.report_exchange.clone(),
                Target::Source(src) => {
                    let x = names::source_exchange(src);
                    if self.refused.contains(&x) {
                        continue;
                    }
                    if !self.declared.contains(&x) {
                        let t = Topology {
                            exchanges: vec![ExchangeDecl::topic(&x)],
                            ..Topology::default()
                        };
                        if let Err(e) = self.client.declare(&t).await {
                            if e.is_transient() {
                                self.failed += (n - i) as u64;
                                return;
                            }
                            tracing::warn!("cannot declare {x}, its speedos are skipped: {e}");
                            self.refused.insert(x);
                            continue;
                        }
                        self.declared.insert(x.clone());
                    }
                    x
                }
            };
            match self.client.publish(&exchange, &s.outgoing()).await {
                Ok(p) => {
                    if self.confirms.send(p).await.is_err() {
                        return;
                    }
                }
                Err(e) if e.is_transient() => {
                    tracing::debug!("speedo publish failed, skipping this interval: {e}");
                    self.failed += (n - i) as u64;
                    return;
                }
                Err(e) => {
                    tracing::warn!("speedo publish to {exchange} failed: {e}");
                    self.failed += 1;
                }
            }
        }
    }
}

/// Awaits each confirm in order: (published, unheard, failed).
async fn settle(mut rx: mpsc::Receiver<PendingConfirm>) -> (u64, u64, u64) {
    let (mut ok, mut unheard, mut failed) = (0, 0, 0);
    while let Some(p) = rx.recv().await {
        match p.wait().await {
            Ok(()) => ok += 1,
            // Nobody listens on that exchange (yet): a speedo is a reading, not a record.
            Err(AmqpError::Unroutable { .. }) => unheard += 1,
            Err(e) => {
                tracing::debug!("speedo not confirmed: {e}");
                failed += 1;
            }
        }
    }
    (ok, unheard, failed)
}

/// [`run`], returning what it did: runs until `shutdown`; then stops consuming, publishes
/// a last speedo for every meter (bounded by `cfg.drain`).
pub async fn run_counting(cfg: Config, shutdown: Shutdown) -> Result<Summary, Error> {
    let opts = ConnectOptions {
        name: format!("pumpwatch speedo ({})", cfg.feeder),
        topology: topology(&cfg),
        ..ConnectOptions::default()
    };
    let client = Client::connect(&cfg.broker, opts).await?;
    let queue = names::speedo_queue(&cfg.pump, &cfg.feeder).name;
    let mut consumer = client.consume(&queue, cfg.prefetch).await?;
    tracing::info!(
        broker = %cfg.broker,
        queue = %queue,
        interval = ?cfg.settings.interval,
        "speedo started"
    );
    let clock = Clock::start();
    let mut meters = Speedometers::new(cfg.settings.clone(), clock.now());
    let attributor = cfg.pump.attributor();
    let (tx, rx) = mpsc::channel(4096);
    let settler = tokio::spawn(settle(rx));
    let mut publisher = Publisher {
        client: client.clone(),
        report_exchange: cfg.pump.exchanges.report.clone(),
        declared: topology(&cfg)
            .exchanges
            .into_iter()
            .map(|x| x.name)
            .collect(),
        refused: HashSet::new(),
        confirms: tx,
        failed: 0,
    };
    let mut summary = Summary::default();
    // While the broker is away, ticks wait (the interval just gets longer) instead of
    // spinning.
    let mut hold = clock.mono;
    let result = loop {
        let due = clock.instant_of(meters.next_due()).max(hold);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            _ = tokio::time::sleep_until(due) => {
                if client.is_connected() {
                    let speedos = meters.tick(clock.now());
                    publisher.publish(speedos).await;
                } else {
                    hold = Instant::now() + Duration::from_millis(250);
                }
            }
            next = consumer.next() => {
                let delivery = match next {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => break Err(Error::from(e)),
                    None => break Ok(()),
                };
                let inc = delivery.incoming();
                match report::parse_limited(&inc, cfg.pump.route.max_body) {
                    Ok(Message::Report(r)) => {
                        if record(&mut meters, &attributor, &r, inc.user_id) {
                            summary.recorded += 1;
                        } else {
                            summary.not_counted += 1;
                        }
                    }
                    Ok(Message::Control(_)) => summary.control += 1,
                    Ok(Message::Announcement(_)) => summary.announcements += 1,
                    Err(e) => {
                        summary.malformed += 1;
                        tracing::debug!(
                            topic = %text::escape(inc.routing_key),
                            "not counted, malformed: {}",
                            text::escape(&e.to_string())
                        );
                    }
                }
                if let Err(e) = delivery.ack().await {
                    tracing::debug!("ack failed (redelivered later): {e}");
                }
            }
        }
    };
    let _ = consumer.cancel().await;
    let deadline = Instant::now() + cfg.drain;
    if client.is_connected() {
        let last = meters.flush(clock.now());
        if tokio::time::timeout_at(deadline, publisher.publish(last))
            .await
            .is_err()
        {
            tracing::warn!("the last speedos were not all published within the drain deadline");
        }
    }
    summary.failed = publisher.failed;
    drop(publisher);
    let mut result = result;
    match tokio::time::timeout_at(deadline, settler).await {
        Ok(Ok((ok, unheard, failed))) => {
            summary.published = ok;
            summary.unheard = unheard;
            summary.failed += failed;
        }
        Ok(Err(e)) => {
            result = result.and(Err(Error::from_join("speedo's confirm task", e)));
        }
        Err(_) => tracing::warn!("the last speedos were not all confirmed in time"),
    }
    let _ = tokio::time::timeout(Duration::from_millis(1500), client.close()).await;
    result.map(|()| summary)
}
