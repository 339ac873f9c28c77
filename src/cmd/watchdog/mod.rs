//! `pumpwatch watchdog` (SPEC §7, §4.9): what every node has in flight, and what was lost
//! when one went silent. Reads every report of `xreport` through its durable queue
//! `q_<feeder>.watchdog` (so nothing is missed while it restarts), feeds them to the pure
//! [`core::watchdog`](crate::core::watchdog), and when a node fails publishes
//! `v01.watchdog.node.<host>` to `xreport` and, with `repost = true`, re-announces each
//! lost product on `repost_exchange` in the format family its 102 report came in.
//!
//! **When it acks.** Reports are recorded in memory as they arrive and held. About every
//! tenth of a second (or every few hundred reports) the daemon *flushes*: it ticks the
//! core, publishes what the tick says (failure and recovery notices, reposts) and awaits
//! their confirms, writes the core's journal to SQLite in one transaction, and only then
//! acks the held reports. So an acked report's effect is on disk, and a failure that was
//! stored as announced was announced. A crash loses nothing: the unacked reports come
//! again (duplicates and finals without a start are harmless), and a failure whose notice
//! was not confirmed is found again after the restart.
//!
//! **Standby.** Its queue has a single active consumer: a second watchdog (with its own
//! `--state-dir` and `--listen`) stands by, ticking and publishing nothing, and takes over
//! when the active one goes. It then forgets what its state file held: the active one read
//! the reports that ended those transfers, so they would be announced as lost for
//! nothing. Transfers started before the takeover are not watched (the reports of the
//! downtime are: they waited in the queue).
//!
//! The state file is [`state`]; `/api/inflight`, `/metrics` and `/healthz` are [`routes`].

pub mod routes;
pub mod state;

use super::{Common, Error, Tasks, UsageError, parse_listen};
use crate::broker::amqp::{
    Activity, AmqpError, Client, ConnectOptions, Consumer, Delivery, ExchangeDecl, PendingConfirm,
    Topology,
};
use crate::broker::names;
use crate::broker::url::BrokerUrl;
use crate::config::{Config as PumpConfig, WatchdogSettings};
use crate::core::attribution::Attributor;
use crate::core::emit::Outgoing;
use crate::core::report::{self, Message};
use crate::core::text;
use crate::core::watchdog::{Event, Ignored, Outcome, Watchdog, announcement};
use crate::http::{Limits, Listener};
use crate::shutdown::Shutdown;
use jiff::Timestamp;
use state::Store;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// `pumpwatch watchdog` flags; each overrides the `[watchdog]` table.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Serve /api/inflight, /metrics and /healthz here [default: watchdog.listen, 127.0.0.1:8090].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Keep the state (SQLite) in this directory [default: watchdog.state_dir; one is needed].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Unacknowledged reports the broker may send ahead [default: 1000].
    #[arg(long)]
    pub prefetch: Option<u16>,
}

/// Everything `watchdog` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub broker: BrokerUrl,
    pub pump: PumpConfig,
    /// The account it runs as; names its queue (`q_<feeder>.watchdog`).
    pub feeder: String,
    pub settings: WatchdogSettings,
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub prefetch: u16,
    /// How often the core is ticked (failures, stuck transfers) when no report comes.
    pub tick: Duration,
    /// How long a report may wait for its flush (store, then ack).
    pub flush_after: Duration,
    /// How long a stop may spend settling what it holds.
    pub drain: Duration,
    pub limits: Limits,
}

impl Config {
    pub fn from_args(args: Args, common: &Common) -> Result<Config, UsageError> {
        let pump = common.file.clone();
        let settings = pump.watchdog_settings();
        let listen = match &args.listen {
            Some(l) => parse_listen(l).map_err(|e| UsageError(format!("invalid --listen: {e}")))?,
            None => parse_listen(&settings.listen)
                .map_err(|e| UsageError(format!("config {}: watchdog.listen: {e}", pump.origin)))?,
        };
        let state_dir = args
            .state_dir
            .or_else(|| settings.state_dir.clone())
            .ok_or_else(|| {
                UsageError::new(
                    "watchdog needs --state-dir DIR (or watchdog.state_dir in the configuration)",
                )
            })?;
        if state_dir.as_os_str().is_empty() {
            return Err(UsageError::new("invalid --state-dir: empty"));
        }
        if args.prefetch == Some(0) {
            return Err(UsageError::new("invalid --prefetch 0: must be at least 1"));
        }
        // A failure is seen within a quarter of node_timeout, and at least once a second.
        let tick = (settings.rules.node_timeout / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(1));
        Ok(Config {
            feeder: names::feeder(&pump, common.broker.user()),
            broker: common.broker.clone(),
            settings,
            pump,
            listen,
            state_dir,
            prefetch: args.prefetch.unwrap_or(1000),
            tick,
            flush_after: Duration::from_millis(100),
            drain: Duration::from_secs(4),
            limits: Limits::default(),
        })
    }
}

/// Counters of one run (also on `/metrics`).
#[derive(Debug, Default)]
pub struct Stats {
    pub reports: AtomicU64,
    /// Announcements, speedo and watchdog messages (its own notices come back too).
    pub skipped: AtomicU64,
    pub malformed: AtomicU64,
    /// Reports the core did not track (over its limits).
    pub ignored: AtomicU64,
    pub acked: AtomicU64,
    pub failures: AtomicU64,
    pub recoveries: AtomicU64,
    pub notices: AtomicU64,
    pub reposts: AtomicU64,
    /// Reposts no queue was bound for (nobody takes products from that exchange).
    pub reposts_unheard: AtomicU64,
    /// Messages given up on after the broker refused them for good.
    pub publish_failed: AtomicU64,
    pub flushes: AtomicU64,
    /// Times this instance went from standby to active.
    pub takeovers: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// What one run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub reports: u64,
    pub skipped: u64,
    pub malformed: u64,
    pub acked: u64,
    pub failures: u64,
    pub recoveries: u64,
    pub reposts: u64,
    pub publish_failed: u64,
}

impl Stats {
    fn summary(&self) -> Summary {
        Summary {
            reports: get(&self.reports),
            skipped: get(&self.skipped),
            malformed: get(&self.malformed),
            acked: get(&self.acked),
            failures: get(&self.failures),
            recoveries: get(&self.recoveries),
            reposts: get(&self.reposts),
            publish_failed: get(&self.publish_failed),
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "reports {}, skipped {}, malformed {}, acked {}; failures {}, recoveries {}, \
             reposts {}, given up {}",
            self.reports,
            self.skipped,
            self.malformed,
            self.acked,
            self.failures,
            self.recoveries,
            self.reposts,
            self.publish_failed
        )
    }
}

/// What the consumer, the flusher and the HTTP handlers share.
pub struct Shared {
    pub watchdog: Mutex<Watchdog>,
    pub stats: Stats,
    /// False once the state file could not be written (the daemon is stopping).
    pub store_ok: AtomicBool,
    client: Client,
    /// Active or standby (its queue has a single active consumer).
    pub role: tokio::sync::watch::Receiver<Activity>,
}

impl Shared {
    /// The watchdog, also when a panic poisoned the lock (the core never panics; the lock
    /// is only a guard against ourselves).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Watchdog> {
        self.watchdog.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_healthy(&self) -> bool {
        self.client.is_connected() && self.store_ok.load(Ordering::Relaxed)
    }

    /// Whether another watchdog is the active one and this one stands by.
    pub fn is_standby(&self) -> bool {
        *self.role.borrow() == Activity::Standby
    }
}

/// What watchdog reads from and publishes to; declared at start and after reconnects.
pub fn topology(cfg: &Config) -> Topology {
    let p = &cfg.pump;
    let mut t = Topology {
        exchanges: vec![ExchangeDecl::topic(&p.exchanges.report)],
        ..names::watchdog_queue(p, &cfg.feeder).topology()
    };
    if cfg.settings.repost {
        t.exchanges
            .push(ExchangeDecl::topic(&cfg.settings.repost_exchange));
    }
    t
}

/// A started watchdog: [`Daemon::addr`] is where it serves (`--listen 127.0.0.1:0` picks
/// a port); [`Daemon::join`] waits until it stops.
pub struct Daemon {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    tasks: Tasks,
}

/// `pumpwatch watchdog`: runs until `shutdown`.
pub async fn run(cfg: Config, shutdown: Shutdown) -> Result<(), Error> {
    let d = Daemon::start(cfg, shutdown).await?;
    let summary = d.join().await?;
    tracing::info!("watchdog stopped: {summary}");
    Ok(())
}

impl Daemon {
    /// Opens the state (refused when another watchdog holds it), restores, connects to the
    /// broker and binds the listener; each fails fast with exit 1.
    pub async fn start(cfg: Config, shutdown: Shutdown) -> Result<Daemon, Error> {
        let dir = cfg.state_dir.clone();
        let rules = cfg.settings.rules.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let mut store = Store::open(&dir)?;
            let loaded = store.load(rules, Timestamp::now())?;
            Ok::<_, state::StoreError>((store, loaded))
        })
        .await
        .map_err(|e| Error::from_join("watchdog's state loader", e))?;
        let (store, (watchdog, loaded)) = opened.map_err(|e| Error::Failed(e.to_string()))?;
        let r = loaded.core;
        tracing::info!(
            state = %store.path().display(),
            nodes = r.nodes,
            transfers = r.transfers,
            rejected = r.rejected + loaded.unreadable,
            evicted = r.evicted,
            "watchdog state restored"
        );
        let opts = ConnectOptions {
            name: format!("pumpwatch watchdog ({})", cfg.feeder),
            topology: topology(&cfg),
            ..ConnectOptions::default()
        };
        let client = Client::connect(&cfg.broker, opts).await?;
        let queue = names::watchdog_queue(&cfg.pump, &cfg.feeder).name;
        let consumer = client.consume_single_active(&queue, cfg.prefetch).await?;
        let listener = Listener::bind(cfg.listen, cfg.limits).await?;
        let addr = listener.local_addr();
        let shared = Arc::new(Shared {
            watchdog: Mutex::new(watchdog),
            stats: Stats::default(),
            store_ok: AtomicBool::new(true),
            client: client.clone(),
            role: consumer.activity_changes(),
        });
        tracing::info!(
            broker = %cfg.broker,
            queue = %queue,
            node_timeout = ?cfg.settings.rules.node_timeout,
            repost = cfg.settings.repost,
            "watchdog listening on http://{addr}"
        );
        let mut tasks = Tasks::new("watchdog", &shutdown);
        let app = routes::router(shared.clone());
        let stop = shutdown.clone();
        tasks.spawn(async move {
            listener.serve(app, stop, Duration::from_secs(2)).await;
            Ok(())
        });
        let engine = Engine {
            attributor: cfg.pump.attributor(),
            client,
            store: Some(store),
            shared: shared.clone(),
            held: Vec::new(),
            first_held: None,
            batch: usize::from(cfg.prefetch / 2).max(1),
            topology: topology(&cfg),
            outbox: Vec::new(),
            cfg,
        };
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let result = engine.run(consumer, stop.clone()).await;
            // The HTTP server stops with the engine, whatever ended it.
            stop.cancel();
            result
        });
        Ok(Daemon {
            addr,
            shared,
            tasks,
        })
    }

    /// Waits until the daemon stops (shutdown, or a task that failed).
    pub async fn join(self) -> Result<Summary, Error> {
        self.tasks.join().await?;
        Ok(self.shared.stats.summary())
    }
}

/// The consume-record-flush loop.
struct Engine {
    cfg: Config,
    attributor: Attributor,
    client: Client,
    /// Taken while a write runs on the blocking pool.
    store: Option<Store>,
    shared: Arc<Shared>,
    held: Vec<Delivery>,
    first_held: Option<Instant>,
    batch: usize,
    topology: Topology,
    /// Messages of events not yet confirmed: nothing is stored or acked while any wait.
    outbox: Vec<Out>,
}

/// One message to publish for an event, until confirmed or given up.
#[derive(Clone)]
struct Out {
    exchange: String,
    msg: Outgoing,
    repost: bool,
    refused: u32,
}

/// Publishes `outs`, then awaits their confirms; returns those to send again and whether
/// any was refused (rather than lost with the connection).
async fn send_round(client: &Client, stats: &Stats, outs: Vec<Out>) -> (Vec<Out>, bool) {
    let mut sent: Vec<(Out, Result<PendingConfirm, AmqpError>)> = Vec::with_capacity(outs.len());
    for o in outs {
        let r = client.publish(&o.exchange, &o.msg).await;
        sent.push((o, r));
    }
    let mut again = Vec::new();
    let mut refused_any = false;
    let mut unheard = std::collections::BTreeMap::new();
    for (mut o, r) in sent {
        let r = match r {
            Ok(confirm) => confirm.wait().await,
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => inc(if o.repost {
                &stats.reposts
            } else {
                &stats.notices
            }),
            Err(AmqpError::Unroutable { .. }) => {
                if o.repost {
                    inc(&stats.reposts_unheard);
                }
                *unheard.entry(o.exchange).or_insert(0u64) += 1;
            }
            Err(e) if e.is_transient() || !client.is_connected() => {
                tracing::debug!("publish not confirmed, sending again: {e}");
                again.push(o);
            }
            Err(e) => {
                o.refused += 1;
                if o.refused >= MAX_REFUSED {
                    inc(&stats.publish_failed);
                    tracing::error!(
                        "giving up on {} to {}: {e}",
                        text::escape(&o.msg.routing_key),
                        text::escape(&o.exchange)
                    );
                } else {
                    refused_any = true;
                    again.push(o);
                }
            }
        }
    }
    for (exchange, n) in unheard {
        tracing::warn!(
            "{n} messages to {} not delivered: no queue is bound to it",
            text::escape(&exchange)
        );
    }
    (again, refused_any)
}

/// Refusals (not lost connections) after which a message is given up.
const MAX_REFUSED: u32 = 3;
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Journal rows written per transaction at most.
const WRITE_ROWS: usize = 20_000;

impl Engine {
    async fn run(mut self, mut consumer: Consumer, shutdown: Shutdown) -> Result<(), Error> {
        let mut next_tick = Instant::now() + self.cfg.tick;
        let result = loop {
            // Before anything is ticked or recorded as the active one.
            if consumer.took_over()
                && let Err(e) = self.forget().await
            {
                break Err(e);
            }
            let due = match self.first_held {
                Some(t) => (t + self.cfg.flush_after).min(next_tick),
                None => next_tick,
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                _ = tokio::time::sleep_until(due) => {
                    // A standby neither ticks nor publishes: the active watchdog does.
                    if consumer.activity() == Activity::Active && let Err(e) = self.flush(&shutdown).await {
                        break Err(e);
                    }
                    next_tick = Instant::now() + self.cfg.tick;
                }
                next = consumer.next() => {
                    match next {
                        Some(Ok(d)) => self.take(d),
                        Some(Err(e)) => break Err(Error::from(e)),
                        None => break Ok(()),
                    }
                    if self.held.len() >= self.batch && let Err(e) = self.flush(&shutdown).await {
                        break Err(e);
                    }
                }
            }
        };
        let _ = consumer.cancel().await;
        if result.is_ok() && self.client.is_connected() && consumer.activity() == Activity::Active {
            // A last flush, so what was read is stored and acked (bounded: past the
            // deadline the broker simply delivers the held reports again).
            let last = Shutdown::new();
            match tokio::time::timeout(self.cfg.drain, self.flush(&last)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("last flush failed: {e}"),
                Err(_) => tracing::warn!("the last flush did not finish in time"),
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(1500), self.client.close()).await;
        result
    }

    /// A standby took over: what it kept from before is stale (the active watchdog read
    /// the reports since), so it starts from an empty state, in memory and on disk.
    async fn forget(&mut self) -> Result<(), Error> {
        let stale = {
            let mut w = self.shared.lock();
            let n = w.len();
            *w = Watchdog::new(self.cfg.settings.rules.clone());
            n
        };
        self.shared.stats.takeovers.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            "watchdog took over; forgetting the {stale} transfers in flight kept from before it stood by"
        );
        let Some(mut store) = self.store.take() else {
            return Err(Error::Failed("watchdog state is not open".into()));
        };
        let (store, cleared) = tokio::task::spawn_blocking(move || {
            let r = store.clear();
            (store, r)
        })
        .await
        .map_err(|e| Error::from_join("watchdog's state writer", e))?;
        self.store = Some(store);
        cleared.map_err(|e| {
            self.shared.store_ok.store(false, Ordering::Relaxed);
            Error::Failed(e.to_string())
        })
    }

    /// Records one delivery in memory and holds it until the next flush.
    fn take(&mut self, d: Delivery) {
        let stats = &self.shared.stats;
        let inc_ = d.incoming();
        match report::parse_limited(&inc_, self.cfg.pump.route.max_body) {
            Ok(Message::Report(r)) => {
                let client = self.attributor.client(&r, inc_.user_id);
                let outcome = self
                    .shared
                    .lock()
                    .record(&r, client.as_deref(), Timestamp::now());
                inc(&stats.reports);
                if let Outcome::Ignored(why) = outcome {
                    inc(&stats.ignored);
                    tracing::debug!(
                        host = %text::escape(r.host.as_deref().unwrap_or("")),
                        "report not tracked: {}",
                        match why {
                            Ignored::TooLong => "a field over the limits",
                            Ignored::NodeLimit => "too many nodes",
                        }
                    );
                }
            }
            Ok(Message::Announcement(_) | Message::Control(_)) => inc(&stats.skipped),
            Err(e) => {
                inc(&stats.malformed);
                tracing::debug!(
                    topic = %text::escape(inc_.routing_key),
                    "not a report: {}",
                    text::escape(&e.to_string())
                );
            }
        }
        if self.first_held.is_none() {
            self.first_held = Some(Instant::now());
        }
        self.held.push(d);
    }

    /// Ticks the core, publishes what it says (awaiting the confirms), stores the journal,
    /// then acks what is held. Stopped by `shutdown` while the broker is away: then
    /// nothing is stored or acked (the reports come again, the failure is found again).
    async fn flush(&mut self, shutdown: &Shutdown) -> Result<(), Error> {
        inc(&self.shared.stats.flushes);
        let events = self.shared.lock().tick(Timestamp::now());
        let mut outs = std::mem::take(&mut self.outbox);
        for e in events {
            self.plan(e, &mut outs);
        }
        self.outbox = outs;
        if !self.publish(shutdown).await {
            return Ok(());
        }
        self.store().await?;
        self.ack().await;
        Ok(())
    }

    /// Logs an event and lists what it publishes.
    fn plan(&self, e: Event, outs: &mut Vec<Out>) {
        let stats = &self.shared.stats;
        let report = &self.cfg.pump.exchanges.report;
        match e {
            Event::Failed(f) => {
                inc(&stats.failures);
                tracing::warn!(
                    host = %text::escape(&f.host),
                    transfers = f.transfers.len(),
                    last_seen = %f.last_seen,
                    "node failed: silent while holding transfers{}",
                    if self.cfg.settings.repost { "; reposting them" } else { "" }
                );
                for msg in f.messages() {
                    outs.push(Out {
                        exchange: report.clone(),
                        msg,
                        repost: false,
                        refused: 0,
                    });
                }
                if self.cfg.settings.repost {
                    for t in &f.transfers {
                        outs.push(Out {
                            exchange: self.cfg.settings.repost_exchange.clone(),
                            msg: announcement(t),
                            repost: true,
                            refused: 0,
                        });
                    }
                }
            }
            Event::Recovered(r) => {
                inc(&stats.recoveries);
                tracing::info!(
                    host = %text::escape(&r.host),
                    stale = r.stale,
                    failed_at = %r.failed_at,
                    "node recovered"
                );
                outs.push(Out {
                    exchange: report.clone(),
                    msg: r.message(),
                    repost: false,
                    refused: 0,
                });
            }
            Event::Stuck(s) => {
                let sample: Vec<String> = s
                    .sample
                    .iter()
                    .map(|t| text::field(&t.rel_path).into_owned())
                    .collect();
                tracing::warn!(
                    host = %text::escape(&s.host),
                    count = s.count,
                    "transfers stuck: {}",
                    sample.join(" ")
                );
            }
        }
    }

    /// Publishes the outbox and awaits every confirm; what failed is sent again (a lost
    /// connection: until it comes back; a refusal: [`MAX_REFUSED`] times, the topology
    /// declared again in between, then given up and logged). False when `shutdown` came
    /// first: what is not confirmed stays in the outbox.
    async fn publish(&mut self, shutdown: &Shutdown) -> bool {
        let mut backoff = BACKOFF_MIN;
        while !self.outbox.is_empty() {
            let outs = std::mem::take(&mut self.outbox);
            // Kept to put back if the stop comes mid-round (some may then go twice).
            let backup = outs.clone();
            let round = send_round(&self.client, &self.shared.stats, outs);
            let (again, refused_any) = tokio::select! {
                _ = shutdown.cancelled() => {
                    self.outbox = backup;
                    return false;
                }
                r = round => r,
            };
            self.outbox = again;
            if self.outbox.is_empty() {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            if refused_any && let Err(e) = self.client.declare(&self.topology).await {
                tracing::debug!("declaring the topology again failed: {e}");
            }
        }
        true
    }

    /// Writes the core's journal, in transactions of at most [`WRITE_ROWS`] rows.
    async fn store(&mut self) -> Result<(), Error> {
        loop {
            let changes = self.shared.lock().take_changes(WRITE_ROWS);
            if changes.is_empty() && !changes.more {
                // The totals change with every report; they ride with the next write.
                return Ok(());
            }
            let Some(mut store) = self.store.take() else {
                return Err(Error::Failed("watchdog state is not open".into()));
            };
            let more = changes.more;
            let (store, written) = tokio::task::spawn_blocking(move || {
                let r = store.apply(&changes);
                (store, r)
            })
            .await
            .map_err(|e| Error::from_join("watchdog's state writer", e))?;
            self.store = Some(store);
            if let Err(e) = written {
                self.shared.store_ok.store(false, Ordering::Relaxed);
                return Err(Error::Failed(e.to_string()));
            }
            if !more {
                return Ok(());
            }
        }
    }

    /// Acks what is held: one `multiple` ack per channel (deliveries are settled only here,
    /// in order).
    async fn ack(&mut self) {
        let held = std::mem::take(&mut self.held);
        self.first_held = None;
        let n = held.len() as u64;
        let mut iter = held.iter().peekable();
        while let Some(d) = iter.next() {
            let last_of_channel = iter.peek().is_none_or(|next| !next.same_channel(d));
            if last_of_channel && let Err(e) = d.ack_multiple().await {
                tracing::debug!("ack failed (redelivered later): {e}");
            }
        }
        self.shared.stats.acked.fetch_add(n, Ordering::Relaxed);
    }
}
