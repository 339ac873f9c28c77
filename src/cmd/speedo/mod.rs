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
//!
//! **Standby.** Its queue has a single active consumer: a second `speedo` on the same pump
//! stands by, publishing nothing, and takes over when the active one goes (the broker
//! hands it the queue, unacked reports included). It then counts from zero: the counts
//! are per run, so readers see a decrease, as after a restart (SPEC §4.5).

pub mod body;
pub mod meter;

pub use body::{Decoded, Reading, SpeedoError, Subject, decode, encode};
pub use meter::{Counts, Sample, Settings, Speedo, Speedometers, Target, UNKNOWN};

use super::{Common, Error, UsageError, parse_duration};
use crate::broker::amqp::{
    Activity, AmqpError, Client, ConnectOptions, ExchangeDecl, PendingConfirm, Topology,
};
use crate::broker::names;
use crate::broker::url::BrokerUrl;
use crate::config::{Config as PumpConfig, Role};
use crate::core::attribution::Attributor;
use crate::core::emit::Outgoing;
use crate::core::lag::LagRules;
use crate::core::report::{self, Message, Report};
use crate::core::text;
use crate::shutdown::Shutdown;
use jiff::{SignedDuration, Timestamp};
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
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
    /// Speedo messages sent again alone after their first confirm failed (the publish
    /// channel closed under them); counted again in `published`, `unheard` or `failed`.
    pub resent: u64,
    /// Good deliveries whose lag was not counted (no `pubTime`, or an absurd one).
    pub lag_ignored: u64,
    /// Times this instance went from standby to active.
    pub takeovers: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "recorded {}, not counted {}, announcements {}, speedo/watchdog {}, malformed {}; \
             speedos published {}, unheard {}, failed {} (resent {}); lag ignored {}; \
             took over {} times",
            self.recorded,
            self.not_counted,
            self.announcements,
            self.control,
            self.malformed,
            self.published,
            self.unheard,
            self.failed,
            self.resent,
            self.lag_ignored,
            self.takeovers
        )
    }
}

/// Counts `r` under its client and source as the pump's [`Attributor`] tells them
/// ([`UNKNOWN`] when it cannot); false when the report counts in nothing (102 started).
///
/// Its delivery lag is `timeCompleted − pubTime`, or, for reports that carry no
/// completion time (v01, v02), `seen_at − pubTime` with `seen_at` the time speedo takes
/// the report: route stamps no time of its own, and forwards within milliseconds, so this
/// is "the time route saw it" unless speedo's queue has a backlog (which then shows as
/// lag: the reports did reach the monitoring late).
fn record(
    meters: &mut Speedometers,
    who: &Attributor,
    r: &Report,
    user_id: Option<&str>,
    seen_at: Timestamp,
) -> bool {
    let client = who.client(r, user_id);
    let source = who.source(r);
    let rules = LagRules::DEFAULT;
    meters.record(&Sample {
        client: client.as_deref().unwrap_or(UNKNOWN),
        source: source.as_deref().unwrap_or(UNKNOWN),
        code: r.code,
        bytes: r.size_bytes.unwrap_or(0),
        lag: Some(rules.lag_of(r, seen_at).and_then(|x| rules.accept(x))),
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

/// One speedo handed to the broker, with what it takes to send it again.
struct Sent {
    exchange: String,
    msg: Outgoing,
    confirm: PendingConfirm,
}

/// Exchanges speedo publishes to: only those of its topology (`xreport` and each declared
/// source's `xr_<source>`), declared at start and after every reconnect. Never one named by
/// a report (SPEC §2 "Names"); an exchange the broker refused (deleted and not
/// re-creatable, no permission) is skipped from then on, so it cannot close the publish
/// channel under everybody else's speedos every interval.
#[derive(Debug, Default)]
struct Exchanges {
    known: HashSet<String>,
    refused: std::sync::Mutex<HashSet<String>>,
}

impl Exchanges {
    fn usable(&self, x: &str) -> bool {
        self.known.contains(x)
            && !self
                .refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(x)
    }

    fn refuse(&self, x: &str) {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(x.to_owned());
    }
}

/// Publishes speedos and hands them, with their confirms, to the settler.
struct Publisher {
    client: Client,
    report_exchange: String,
    exchanges: Arc<Exchanges>,
    confirms: mpsc::Sender<Sent>,
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
                Target::Source(src) => names::source_exchange(src),
            };
            if !self.exchanges.usable(&exchange) {
                continue;
            }
            let msg = s.outgoing();
            match self.client.publish(&exchange, &msg).await {
                Ok(confirm) => {
                    let sent = Sent {
                        exchange,
                        msg,
                        confirm,
                    };
                    if self.confirms.send(sent).await.is_err() {
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

/// What the settler saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Settled {
    ok: u64,
    unheard: u64,
    failed: u64,
    /// Published again, one at a time, after their first confirm failed.
    retried: u64,
}

/// Awaits each confirm in order. A publish the broker refuses (an exchange deleted under
/// speedo) closes the publish channel, and with it every publish sent behind it before
/// the close arrived: so a speedo whose confirm failed while the connection is up is sent
/// again **alone**, its confirm awaited before the next, and only a speedo that fails
/// alone is the culprit. Its exchange is declared again (it is one of speedo's own) and,
/// if that is refused too, skipped from then on. One bad exchange never costs the others
/// their speedos.
async fn settle(
    client: Client,
    exchanges: Arc<Exchanges>,
    mut rx: mpsc::Receiver<Sent>,
) -> Settled {
    let mut n = Settled::default();
    while let Some(sent) = rx.recv().await {
        let Sent {
            exchange,
            msg,
            confirm,
        } = sent;
        match confirm.wait().await {
            Ok(()) => n.ok += 1,
            // Nobody listens on that exchange (yet): a speedo is a reading, not a record.
            Err(AmqpError::Unroutable { .. }) => n.unheard += 1,
            Err(e) if !client.is_connected() => {
                tracing::debug!("speedo not confirmed (connection lost): {e}");
                n.failed += 1;
            }
            Err(first) => {
                n.retried += 1;
                match resend(&client, &exchanges, &exchange, &msg).await {
                    Ok(()) => n.ok += 1,
                    Err(AmqpError::Unroutable { .. }) => n.unheard += 1,
                    Err(e) => {
                        tracing::debug!(
                            "speedo to {exchange} not confirmed ({first}), nor sent again alone: {e}"
                        );
                        n.failed += 1;
                    }
                }
            }
        }
    }
    n
}

/// Sends one speedo alone and waits for its confirm (bounded). A refused exchange is
/// declared again once; refused again, it is skipped from then on.
async fn resend(
    client: &Client,
    exchanges: &Exchanges,
    exchange: &str,
    msg: &Outgoing,
) -> Result<(), AmqpError> {
    let once = async { client.publish(exchange, msg).await?.wait().await };
    let first = match tokio::time::timeout(RESEND_WAIT, once).await {
        Ok(r) => r,
        Err(_) => return Err(AmqpError::Closed("no confirm in time".into())),
    };
    match first {
        Err(AmqpError::NotFound(_) | AmqpError::AccessRefused(_)) => {}
        other => return other,
    }
    let t = Topology {
        exchanges: vec![ExchangeDecl::topic(exchange)],
        ..Topology::default()
    };
    let again = async {
        client.declare(&t).await?;
        client.publish(exchange, msg).await?.wait().await
    };
    let r = match tokio::time::timeout(RESEND_WAIT, again).await {
        Ok(r) => r,
        Err(_) => Err(AmqpError::Closed("no confirm in time".into())),
    };
    if let Err(e @ (AmqpError::NotFound(_) | AmqpError::AccessRefused(_))) = &r {
        tracing::warn!("the broker refuses speedos to {exchange}; skipping it from now on: {e}");
        exchanges.refuse(exchange);
    }
    r
}

/// How long sending one speedo again may take.
const RESEND_WAIT: Duration = Duration::from_secs(5);

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
    let mut consumer = client.consume_single_active(&queue, cfg.prefetch).await?;
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
    let exchanges = Arc::new(Exchanges {
        known: topology(&cfg)
            .exchanges
            .into_iter()
            .map(|x| x.name)
            .collect(),
        refused: Default::default(),
    });
    let settler = tokio::spawn(settle(client.clone(), exchanges.clone(), rx));
    let mut publisher = Publisher {
        client: client.clone(),
        report_exchange: cfg.pump.exchanges.report.clone(),
        exchanges,
        confirms: tx,
        failed: 0,
    };
    let mut summary = Summary::default();
    // While the broker is away, ticks wait (the interval just gets longer) instead of
    // spinning.
    let mut hold = clock.mono;
    let result = loop {
        if consumer.took_over() {
            // What this instance counted before it stood by belongs to another run: count
            // again from zero (a decrease, as after a restart).
            meters = Speedometers::new(cfg.settings.clone(), clock.now());
            summary.takeovers += 1;
            tracing::info!(queue = %queue, "speedo took over: counting from zero");
        }
        let due = clock.instant_of(meters.next_due()).max(hold);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            _ = tokio::time::sleep_until(due) => {
                // A standby publishes nothing: the active speedo does.
                if client.is_connected() && consumer.activity() == Activity::Active {
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
                        if record(&mut meters, &attributor, &r, inc.user_id, clock.now()) {
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
    summary.lag_ignored = meters.lag_rejected().map(|(_, n)| n).sum();
    for (why, n) in meters.lag_rejected().filter(|(_, n)| *n > 0) {
        tracing::info!("lag of {n} deliveries not counted: {why}");
    }
    let deadline = Instant::now() + cfg.drain;
    if client.is_connected() && consumer.activity() == Activity::Active {
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
        Ok(Ok(n)) => {
            summary.published = n.ok;
            summary.unheard = n.unheard;
            summary.failed += n.failed;
            summary.resent = n.retried;
        }
        Ok(Err(e)) => {
            result = result.and(Err(Error::from_join("speedo's confirm task", e)));
        }
        Err(_) => tracing::warn!("the last speedos were not all confirmed in time"),
    }
    let _ = tokio::time::timeout(Duration::from_millis(1500), client.close()).await;
    result.map(|()| summary)
}
