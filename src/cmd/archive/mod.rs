//! `pumpwatch archive` (SPEC §4.10): keeps every report of the pump in files, one line
//! per report, so `pumpwatch trace` can tell any product's life later.
//!
//! **What it reads.** The durable queue `q_<feeder>.archive` bound to `xreport`
//! ([`names::archive_queue`]; `setup` declares it when the configuration has an `[archive]`
//! table, the daemon declares it too), so reports wait in the broker while the archive is
//! down. Announcements, speedos and malformed messages are acked and counted, not written;
//! the filters (`--code`, `--source`, ... as `log`'s) leave out what a site does not want.
//!
//! **What it writes.** `<dir>/<cluster>/YYYY/MM/DD/HH.log` for the hour (UTC) a report was
//! archived in, one line per report as [`core::archive`](crate::core::archive) writes it,
//! the client and source as the pump's one `Attributor` tells them. A background thread
//! compresses each closed hour to `HH.log.zst` with its sidecar index `HH.idx`, and removes
//! hours older than `retention_days`. The layout and the crash rules are in [`store`].
//!
//! **When it acks.** Deliveries are taken in batches (up to `batch`, or what arrives within
//! a few milliseconds); a batch is acked only after its lines are written and flushed to the
//! OS, and with `fsync = every-batch` (the default) `fsync`ed too. A write that fails (disk
//! full, directory not writable) acks nothing: the batch is kept and written again with
//! backoff (1 s doubling to 30 s), the failure is logged, `/healthz` answers 503 and
//! `pumpwatch_archive_blocked` is 1; the broker holds everything else. A crash between the
//! write and the ack archives the batch twice (the broker redelivers it); `trace` shows
//! identical lines once.
//!
//! **Standby.** Its queue has a single active consumer: a second archive (with its own
//! `--dir`) stands by, writing nothing, and takes over when the active one goes; the
//! reports it was handed unacked are archived again (at least once). Each directory then
//! holds the hours its archive was active; `trace --dir A --dir B` reads both. Two
//! archives on one directory are refused: `<dir>/<cluster>/archive.lock` is held.

pub mod store;

use super::{Common, Error, FilterArgs, UsageError, parse_duration, parse_listen};
use crate::broker::amqp::{Activity, Client, ConnectOptions, Delivery, ExchangeDecl, Topology};
use crate::broker::names;
use crate::broker::url::BrokerUrl;
use crate::config::{ARCHIVE_BATCH_MAX, ArchiveSettings, Fsync};
use crate::core::archive::{TimeSource, hour_path, write_report};
use crate::core::attribution::{Attributor, Who};
use crate::core::filter::Filter;
use crate::core::report::{self, Message, Report};
use crate::core::{Stamp, text};
use crate::http::{Limits, Listener};
use crate::shutdown::Shutdown;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::Writer;
use tokio::time::Instant;

/// How `fsync` is used (`--fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FsyncArg {
    /// After every batch, before its acks.
    EveryBatch,
    /// Every --fsync-interval; acks once written to the OS.
    Interval,
}

/// `pumpwatch archive` flags; each overrides its key of the `[archive]` table.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Archive root: files go to DIR/<cluster>/YYYY/MM/DD/HH.log [default: archive.dir].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Serve /metrics and /healthz here, e.g. 127.0.0.1:9102 [default: archive.listen].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// When to fsync [default: archive.fsync, every-batch].
    #[arg(long, value_enum)]
    pub fsync: Option<FsyncArg>,
    /// With --fsync interval: how often [default: archive.fsync_interval, 1 s].
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub fsync_interval: Option<Duration>,
    /// Remove hours older than this many days [default: archive.retention_days, keep all].
    #[arg(long, value_name = "DAYS")]
    pub retention_days: Option<u32>,
    /// Reports written and acked together at most [default: archive.batch, 500].
    #[arg(long, value_name = "N")]
    pub batch: Option<usize>,
    /// zstd level of closed hours, 1 to 19 [default: archive.zstd_level, 6].
    #[arg(long, value_name = "N")]
    pub zstd_level: Option<i32>,
    /// Only archive the reports passing these (as `log`'s) [default: archive.filter].
    #[command(flatten)]
    pub filters: FilterArgs,
}

/// Everything `archive` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub broker: BrokerUrl,
    pub pump: crate::config::Config,
    /// The account it runs as; names its queue (`q_<feeder>.archive`).
    pub feeder: String,
    /// `<dir>/<cluster>`: where this pump's hours go.
    pub cluster_dir: PathBuf,
    pub listen: Option<SocketAddr>,
    pub fsync: Fsync,
    pub retention_days: Option<u32>,
    pub batch: usize,
    pub zstd_level: i32,
    pub filter: Filter,
    pub attributor: Attributor,
    /// How long a batch waits for more deliveries after its first.
    pub linger: Duration,
    /// Counters, shared with `/metrics` (and tests).
    pub stats: Arc<Stats>,
}

impl Config {
    pub fn from_args(a: Args, common: &Common) -> Result<Config, UsageError> {
        let pump = common.file.clone();
        let mut s = pump.archive.clone().unwrap_or_else(|| ArchiveSettings {
            dir: None,
            listen: None,
            fsync: Fsync::EveryBatch,
            retention_days: None,
            batch: crate::config::ARCHIVE_BATCH,
            zstd_level: crate::config::ARCHIVE_ZSTD_LEVEL,
            filter: Filter::default(),
        });
        let dir = a.dir.or(s.dir.take()).ok_or_else(|| {
            UsageError::new("archive needs --dir DIR (or archive.dir in the configuration)")
        })?;
        let listen = match a.listen.or(s.listen.take()) {
            Some(l) => {
                Some(parse_listen(&l).map_err(|e| UsageError(format!("invalid --listen: {e}")))?)
            }
            None => None,
        };
        let interval = a.fsync_interval.or(match s.fsync {
            Fsync::Interval(d) => Some(d),
            Fsync::EveryBatch => None,
        });
        let fsync = match a.fsync {
            Some(FsyncArg::EveryBatch) => Fsync::EveryBatch,
            Some(FsyncArg::Interval) => Fsync::Interval(interval.unwrap_or(Duration::from_secs(1))),
            None => match (s.fsync, a.fsync_interval) {
                (Fsync::EveryBatch, Some(_)) => {
                    return Err(UsageError::new("--fsync-interval needs --fsync interval"));
                }
                (Fsync::Interval(_), Some(d)) => Fsync::Interval(d),
                (f, None) => f,
            },
        };
        if let Fsync::Interval(d) = fsync
            && (d.is_zero() || d > Duration::from_secs(3600))
        {
            return Err(UsageError::new(
                "invalid --fsync-interval: must be between 0 and 1 h",
            ));
        }
        let retention_days = a.retention_days.or(s.retention_days);
        if retention_days == Some(0) {
            return Err(UsageError::new(
                "invalid --retention-days 0: must be at least 1 (leave it out to keep everything)",
            ));
        }
        let batch = a.batch.unwrap_or(s.batch);
        if !(1..=ARCHIVE_BATCH_MAX).contains(&batch) {
            return Err(UsageError(format!(
                "invalid --batch {batch}: must be 1 to {ARCHIVE_BATCH_MAX}"
            )));
        }
        let zstd_level = a.zstd_level.unwrap_or(s.zstd_level);
        if !(1..=19).contains(&zstd_level) {
            return Err(UsageError(format!(
                "invalid --zstd-level {zstd_level}: must be 1 to 19"
            )));
        }
        let filter = a.filters.over(s.filter);
        Ok(Config {
            broker: common.broker.clone(),
            feeder: names::feeder(&pump, common.broker.user()),
            cluster_dir: dir.join(&pump.cluster),
            listen,
            fsync,
            retention_days,
            batch,
            zstd_level,
            filter,
            attributor: pump.attributor(),
            linger: Duration::from_millis(20),
            stats: Arc::new(Stats::default()),
            pump,
        })
    }
}

/// What archive did, for `/metrics` and the log.
#[derive(Debug, Default)]
pub struct Stats {
    pub lines: AtomicU64,
    pub bytes: AtomicU64,
    pub batches: AtomicU64,
    pub filtered: AtomicU64,
    pub announcements: AtomicU64,
    pub control: AtomicU64,
    pub malformed: AtomicU64,
    pub write_errors: AtomicU64,
    pub hours_compressed: AtomicU64,
    pub compressed_bytes: AtomicU64,
    pub hours_removed: AtomicU64,
    /// 1 while a batch cannot be written (nothing is acked).
    pub blocked: AtomicU64,
    /// The largest archive time − report time of the last batch, in milliseconds.
    pub lag_ms: AtomicU64,
    /// Why the last write failed (for the log, tests and the operator).
    pub last_error: Mutex<Option<String>>,
    /// 1 while this archive stands by (another one reads the queue).
    pub standby: AtomicU64,
}

impl Stats {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub fn is_blocked(&self) -> bool {
        Self::get(&self.blocked) == 1
    }

    pub fn is_standby(&self) -> bool {
        Self::get(&self.standby) == 1
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `lines 10, bytes 2300, skipped: filtered 0, announcements 1, ...`
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| Self::get(c);
        format!(
            "archived {} lines ({} bytes) in {} batches; skipped: filtered {}, announcements {}, speedo/watchdog {}, malformed {}; write errors {}; hours compressed {}, removed {}",
            g(&self.lines),
            g(&self.bytes),
            g(&self.batches),
            g(&self.filtered),
            g(&self.announcements),
            g(&self.control),
            g(&self.malformed),
            g(&self.write_errors),
            g(&self.hours_compressed),
            g(&self.hours_removed),
        )
    }
}

/// `pumpwatch_archive_*` for a registry with the `pumpwatch` prefix.
#[derive(Debug)]
struct StatsCollector(Arc<Stats>);

impl prometheus_client::collector::Collector for StatsCollector {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let s = &self.0;
        let g = |c: &AtomicU64| Stats::get(c);
        for (name, help, v) in [
            (
                "archive_lines",
                "Reports written to the archive.",
                g(&s.lines),
            ),
            (
                "archive_bytes",
                "Bytes written to the archive (uncompressed).",
                g(&s.bytes),
            ),
            (
                "archive_batches",
                "Batches written and acked.",
                g(&s.batches),
            ),
            (
                "archive_write_errors",
                "Failed attempts to write a batch.",
                g(&s.write_errors),
            ),
            (
                "archive_hours_compressed",
                "Closed hours compressed.",
                g(&s.hours_compressed),
            ),
            (
                "archive_compressed_bytes",
                "Bytes of the compressed hours written.",
                g(&s.compressed_bytes),
            ),
            (
                "archive_hours_removed",
                "Hours removed by retention.",
                g(&s.hours_removed),
            ),
        ] {
            let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(m)?;
        }
        let mut m = enc.encode_descriptor(
            "archive_skipped",
            "Messages acked without a line, by reason.",
            None,
            MetricType::Counter,
        )?;
        for (reason, v) in [
            ("filtered", g(&s.filtered)),
            ("announcement", g(&s.announcements)),
            ("control", g(&s.control)),
            ("malformed", g(&s.malformed)),
        ] {
            ConstCounter::new(v).encode(m.encode_family(&[("reason", reason)])?)?;
        }
        let m = enc.encode_descriptor(
            "archive_standby",
            "1 while this archive stands by (another archive reads the queue).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(g(&s.standby) as i64).encode(m)?;
        let m = enc.encode_descriptor(
            "archive_blocked",
            "1 while a batch cannot be written and nothing is acked.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(g(&s.blocked) as i64).encode(m)?;
        let m = enc.encode_descriptor(
            "archive_lag_seconds",
            "Archive time minus report time (completion, else publication), largest of the last batch.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(g(&s.lag_ms) as f64 / 1000.0).encode(m)?;
        Ok(())
    }
}

/// What archive declares at start and after reconnects: `xreport` and its queue.
pub fn topology(cfg: &Config) -> Topology {
    let q = names::archive_queue(&cfg.pump, &cfg.feeder);
    Topology {
        exchanges: vec![ExchangeDecl::topic(&cfg.pump.exchanges.report)],
        ..q.topology()
    }
}

/// A delivery held until its batch is written, with its line's makings (`None`: nothing
/// to write, only to ack).
struct Held {
    delivery: Delivery,
    report: Option<(Box<Report>, Who)>,
}

fn now() -> Stamp {
    Stamp(jiff::Timestamp::now())
}

/// `pumpwatch archive`: runs until `shutdown`.
pub async fn run(cfg: Config, shutdown: Shutdown) -> Result<(), Error> {
    let stats = cfg.stats.clone();
    // Before connecting: a second archive on this directory must not even stand by
    // (the two would write the same hours when one takes over).
    let lock = match try_lock(&cfg.cluster_dir) {
        Lock::Held(f) => Some(f),
        Lock::Busy => return Err(Error::Failed(busy(&cfg.cluster_dir))),
        Lock::Failed(e) => {
            tracing::debug!("archive: cannot take {LOCK_FILE} yet: {e}");
            None
        }
    };
    let opts = ConnectOptions {
        name: format!("pumpwatch archive ({})", cfg.feeder),
        topology: topology(&cfg),
        ..ConnectOptions::default()
    };
    let client = Client::connect(&cfg.broker, opts).await?;
    let queue = names::archive_queue(&cfg.pump, &cfg.feeder).name;
    let prefetch = u16::try_from(cfg.batch * 2).unwrap_or(u16::MAX);
    let consumer = client.consume_single_active(&queue, prefetch).await?;
    tracing::info!(
        broker = %cfg.broker,
        queue = %queue,
        dir = %cfg.cluster_dir.display(),
        "archive started"
    );
    let mut tasks = super::Tasks::new("archive", &shutdown);
    if let Some(addr) = cfg.listen {
        let listener = Listener::bind(addr, Limits::default()).await?;
        tracing::info!(
            "archive metrics on http://{}/metrics",
            listener.local_addr()
        );
        let mut registry = prometheus_client::registry::Registry::with_prefix("pumpwatch");
        registry.register_collector(Box::new(StatsCollector(stats.clone())));
        let (c, s) = (client.clone(), stats.clone());
        let app = axum::Router::new()
            .route("/metrics", crate::http::metrics(Arc::new(registry)))
            .route(
                "/healthz",
                crate::http::healthz_with(move || {
                    if !c.is_connected() || s.is_blocked() {
                        Err("not archiving: the archive directory cannot be written (see the log) or the broker is away")
                    } else if s.is_standby() {
                        Ok("ok standby")
                    } else {
                        Ok("ok")
                    }
                }),
            );
        let stop = shutdown.clone();
        tasks.spawn(async move {
            listener.serve(app, stop, Duration::from_secs(1)).await;
            Ok(())
        });
    }
    let (to_compress, hours) = std::sync::mpsc::channel::<String>();
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (dir, level, days) = (cfg.cluster_dir.clone(), cfg.zstd_level, cfg.retention_days);
        let (stop, stats) = (stop.clone(), stats.clone());
        tasks.spawn(async move {
            tokio::task::spawn_blocking(move || compressor(dir, level, days, hours, &stop, &stats))
                .await
                .map_err(|e| Error::from_join("archive's compressor", e))?
        });
    }
    {
        let (stop, s) = (stop.clone(), shutdown.clone());
        tasks.spawn(async move {
            s.cancelled().await;
            stop.store(true, Ordering::Relaxed);
            Ok(())
        });
    }
    {
        // The consumer's role, for `/healthz` and `/metrics`.
        let (mut roles, s, stats) = (consumer.activity_changes(), shutdown.clone(), stats.clone());
        tasks.spawn(async move {
            loop {
                let standby = *roles.borrow_and_update() == Activity::Standby;
                stats.standby.store(u64::from(standby), Ordering::Relaxed);
                tokio::select! {
                    _ = s.cancelled() => return Ok(()),
                    changed = roles.changed() => if changed.is_err() { return Ok(()) },
                }
            }
        });
    }
    let consume = Consume {
        writer: Some(Writer::new(&cfg.cluster_dir)),
        cfg,
        to_compress,
        shutdown: shutdown.clone(),
        unsynced: false,
        lock,
    };
    tasks.spawn(consume.run(consumer));
    let result = tasks.join().await;
    tracing::info!("archive stopped: {}", stats.summary());
    let _ = tokio::time::timeout(Duration::from_millis(1500), client.close()).await;
    result
}

/// The lock file a running archive holds in its directory.
pub const LOCK_FILE: &str = "archive.lock";

/// What taking `dir/archive.lock` gave.
enum Lock {
    /// Held until the file is dropped (an OS lock: a crash releases it too).
    Held(std::fs::File),
    /// Another archive holds it.
    Busy,
    /// The directory or the file cannot be made: the writes will fail the same way (the
    /// archive is blocked, and takes the lock once it can write).
    Failed(std::io::Error),
}

fn try_lock(dir: &std::path::Path) -> Lock {
    if let Err(e) = std::fs::create_dir_all(dir) {
        return Lock::Failed(e);
    }
    let file = match std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
    {
        Ok(f) => f,
        Err(e) => return Lock::Failed(e),
    };
    match file.try_lock() {
        Ok(()) => Lock::Held(file),
        Err(std::fs::TryLockError::WouldBlock) => Lock::Busy,
        Err(std::fs::TryLockError::Error(e)) => Lock::Failed(e),
    }
}

fn busy(dir: &std::path::Path) -> String {
    format!(
        "archive directory {} is used by another pumpwatch archive (it holds {LOCK_FILE}); \
         a standby archive needs a --dir of its own",
        dir.display()
    )
}

/// Backoff of a blocked writer.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often the open hour is checked for closing when no report comes.
const HOUR_CHECK: Duration = Duration::from_secs(10);

struct Consume {
    cfg: Config,
    /// `None` only while a blocking write has it.
    writer: Option<Writer>,
    to_compress: std::sync::mpsc::Sender<String>,
    shutdown: Shutdown,
    /// Written since the last fsync (interval policy).
    unsynced: bool,
    /// `archive.lock`, once it could be taken.
    lock: Option<std::fs::File>,
}

impl Consume {
    async fn run(mut self, mut consumer: crate::broker::amqp::Consumer) -> Result<(), Error> {
        let stats = self.cfg.stats.clone();
        let mut held: Vec<Held> = Vec::new();
        let mut retry = RETRY_MIN;
        let mut next_try: Option<Instant> = None;
        let sync_every = match self.cfg.fsync {
            Fsync::Interval(d) => d,
            Fsync::EveryBatch => Duration::from_secs(3600),
        };
        let mut sync_tick = tokio::time::interval(sync_every);
        let mut hour_tick = tokio::time::interval(HOUR_CHECK);
        // The start-up repair, as soon as possible (and again on failure, with backoff).
        let mut result = Ok(());
        if let Err(e) = self.housekeeping().await {
            self.blocked(&e, 0);
            next_try = Some(Instant::now() + retry);
        }
        loop {
            if let Some(at) = next_try {
                // Blocked: hold what we have, take nothing more, try again later.
                tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    _ = tokio::time::sleep_until(at) => {}
                }
                match self.write(&held).await {
                    Ok(()) => {
                        tracing::info!(
                            "archive: writing again to {} ({} reports held were written)",
                            self.cfg.cluster_dir.display(),
                            held.len()
                        );
                        stats.blocked.store(0, Ordering::Relaxed);
                        ack(&mut held).await;
                        retry = RETRY_MIN;
                        next_try = None;
                    }
                    Err(e) => {
                        retry = (retry * 2).min(RETRY_MAX);
                        self.blocked(&e, held.len());
                        next_try = Some(Instant::now() + retry);
                    }
                }
                continue;
            }
            let first = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = sync_tick.tick() => {
                    self.sync().await;
                    continue;
                }
                _ = hour_tick.tick() => {
                    if let Err(e) = self.housekeeping().await {
                        self.blocked(&e, 0);
                        next_try = Some(Instant::now() + retry);
                    }
                    continue;
                }
                d = consumer.next() => d,
            };
            match first {
                Some(Ok(d)) => held.push(self.take(d)),
                Some(Err(e)) => {
                    result = Err(Error::from(e));
                    break;
                }
                None => break,
            }
            let until = Instant::now() + self.cfg.linger;
            while held.len() < self.cfg.batch {
                match tokio::time::timeout_at(until, consumer.next()).await {
                    Ok(Some(Ok(d))) => held.push(self.take(d)),
                    Ok(Some(Err(e))) => {
                        result = Err(Error::from(e));
                        break;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            if result.is_err() {
                break;
            }
            match self.write(&held).await {
                Ok(()) => ack(&mut held).await,
                Err(e) => {
                    self.blocked(&e, held.len());
                    next_try = Some(Instant::now() + retry);
                }
            }
        }
        // Stop: take nothing more; write and ack what was received, unless blocked.
        let _ = consumer.cancel().await;
        if next_try.is_none() {
            let drain = async {
                while let Some(Ok(d)) = consumer.next().await {
                    held.push(self.take(d));
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
            match self.write(&held).await {
                Ok(()) => ack(&mut held).await,
                Err(e) => self.blocked(&e, held.len()),
            }
        }
        self.sync().await;
        result
    }

    /// Parses a delivery, attributes and filters it.
    fn take(&self, delivery: Delivery) -> Held {
        let stats = &self.cfg.stats;
        let inc = delivery.incoming();
        let report = match report::parse_limited(&inc, self.cfg.pump.route.max_body) {
            Ok(Message::Report(r)) => {
                let who = self.cfg.attributor.who(&r, inc.user_id);
                if self.cfg.filter.matches(&r, &who, &inc) {
                    Some((r, who))
                } else {
                    Stats::add(&stats.filtered, 1);
                    None
                }
            }
            Ok(Message::Announcement(_)) => {
                Stats::add(&stats.announcements, 1);
                None
            }
            Ok(Message::Control(_)) => {
                Stats::add(&stats.control, 1);
                None
            }
            Err(e) => {
                Stats::add(&stats.malformed, 1);
                tracing::debug!(
                    topic = %text::escape(inc.routing_key),
                    "not archived, malformed: {}",
                    text::escape(&e.to_string())
                );
                None
            }
        };
        Held { delivery, report }
    }

    /// Writes the lines of `held` (as archived now) and flushes them, `fsync`ing with the
    /// every-batch policy. Nothing is acked here.
    async fn write(&mut self, held: &[Held]) -> std::io::Result<()> {
        self.lock_dir()?;
        let at = now();
        let mut buf = Vec::with_capacity(held.len() * 256);
        let mut lines = 0u64;
        let mut lag = 0i128;
        for h in held {
            if let Some((r, who)) = &h.report {
                write_report(r, who, at, TimeSource::Completed, &mut buf);
                lines += 1;
                if let Some(t) = r.time_completed.or(r.pub_time) {
                    lag = lag.max(at.0.as_nanosecond() - t.0.as_nanosecond());
                }
            }
        }
        let sync = self.cfg.fsync == Fsync::EveryBatch;
        let n = buf.len() as u64;
        self.blocking(move |w| {
            if !w.is_prepared() {
                prepare(w, at)?;
            }
            if !buf.is_empty() {
                let hour = w.hour_for(at);
                w.append(&hour, &buf, sync)?;
            }
            Ok(())
        })
        .await?;
        let s = &self.cfg.stats;
        Stats::add(&s.lines, lines);
        Stats::add(&s.bytes, n);
        Stats::add(&s.batches, 1);
        if lines > 0 {
            s.lag_ms
                .store((lag.max(0) / 1_000_000) as u64, Ordering::Relaxed);
        }
        self.unsynced |= !sync && n > 0;
        self.hand_over();
        Ok(())
    }

    /// The start-up repair until it succeeded, then closing an hour the clock left.
    async fn housekeeping(&mut self) -> std::io::Result<()> {
        self.lock_dir()?;
        let at = now();
        self.blocking(move |w| {
            if !w.is_prepared() {
                prepare(w, at)?;
            }
            let hour = w.hour_for(at);
            w.close_before(&hour)
        })
        .await?;
        self.hand_over();
        Ok(())
    }

    /// Takes the directory's lock if not yet held (it could not be made at start): until
    /// then nothing is written, as when the directory cannot be written.
    fn lock_dir(&mut self) -> std::io::Result<()> {
        if self.lock.is_some() {
            return Ok(());
        }
        match try_lock(&self.cfg.cluster_dir) {
            Lock::Held(f) => {
                self.lock = Some(f);
                Ok(())
            }
            Lock::Busy => Err(std::io::Error::other(busy(&self.cfg.cluster_dir))),
            Lock::Failed(e) => Err(e),
        }
    }

    async fn sync(&mut self) {
        if !self.unsynced {
            return;
        }
        match self.blocking(|w| w.sync()).await {
            Ok(()) => self.unsynced = false,
            Err(e) => tracing::warn!("archive: fsync failed: {e}"),
        }
    }

    /// Closed hours go to the compressor.
    fn hand_over(&mut self) {
        if let Some(w) = self.writer.as_mut() {
            for h in w.take_closed() {
                let _ = self.to_compress.send(h);
            }
        }
    }

    /// Runs `f` on the writer in a blocking thread.
    async fn blocking<F>(&mut self, f: F) -> std::io::Result<()>
    where
        F: FnOnce(&mut Writer) -> std::io::Result<()> + Send + 'static,
    {
        let Some(mut w) = self.writer.take() else {
            return Err(std::io::Error::other("the writer was lost"));
        };
        let (w, r) = tokio::task::spawn_blocking(move || {
            let r = f(&mut w);
            (w, r)
        })
        .await
        .map_err(|e| std::io::Error::other(format!("the writer panicked: {e}")))?;
        self.writer = Some(w);
        r
    }

    fn blocked(&self, e: &std::io::Error, holding: usize) {
        let s = &self.cfg.stats;
        Stats::add(&s.write_errors, 1);
        let first = s.blocked.swap(1, Ordering::Relaxed) == 0;
        let why = format!("cannot write to {}: {e}", self.cfg.cluster_dir.display());
        let changed = s.last_error().as_deref() != Some(why.as_str());
        if first || changed {
            tracing::error!(
                "archive: {why}; not acknowledging ({holding} reports held, the rest wait in the broker); retrying"
            );
        } else {
            tracing::debug!("archive: still blocked: {why}");
        }
        *s.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }
}

fn prepare(w: &mut Writer, at: Stamp) -> std::io::Result<()> {
    let closed = w.prepare(at)?;
    // Hours a previous run left uncompressed: closed now.
    for h in closed {
        tracing::info!("archive: {h} was left uncompressed; compressing it");
    }
    Ok(())
}

/// Acks a written batch: one `multiple` ack per channel run (deliveries come in order).
async fn ack(held: &mut Vec<Held>) {
    let n = held.len();
    for i in 0..n {
        let last_of_run = i + 1 == n || !held[i].delivery.same_channel(&held[i + 1].delivery);
        if last_of_run && let Err(e) = held[i].delivery.ack_multiple().await {
            tracing::debug!("ack failed (the broker redelivers; archived twice): {e}");
        }
    }
    held.clear();
}

/// The background thread: compresses closed hours and applies the retention.
fn compressor(
    dir: PathBuf,
    level: i32,
    retention_days: Option<u32>,
    hours: std::sync::mpsc::Receiver<String>,
    stop: &AtomicBool,
    stats: &Stats,
) -> Result<(), Error> {
    use std::sync::mpsc::RecvTimeoutError;
    let mut next_retention = std::time::Instant::now();
    let mut retry: Vec<(std::time::Instant, String)> = Vec::new();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let now_i = std::time::Instant::now();
        if let Some(days) = retention_days
            && now_i >= next_retention
        {
            next_retention = now_i + Duration::from_secs(600);
            let cutoff = now().0 - jiff::SignedDuration::from_hours(24 * i64::from(days));
            match store::remove_before(&dir, &hour_path(Stamp(cutoff))) {
                Ok(0) => {}
                Ok(n) => {
                    Stats::add(&stats.hours_removed, n as u64);
                    tracing::info!("archive: removed {n} hours older than {days} days");
                }
                Err(e) => tracing::warn!("archive: retention: {e}"),
            }
        }
        let hour = match retry.iter().position(|(at, _)| *at <= now_i) {
            Some(i) => retry.remove(i).1,
            None => match hours.recv_timeout(Duration::from_millis(250)) {
                Ok(h) => h,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            },
        };
        match store::compress_hour(&dir, &hour, level, stop) {
            Ok(n) => {
                Stats::add(&stats.hours_compressed, 1);
                Stats::add(&stats.compressed_bytes, n.zst_bytes);
                tracing::info!(
                    "archive: compressed {hour}: {} lines, {} → {} bytes (index {} bytes){}",
                    n.lines,
                    n.raw_bytes,
                    n.zst_bytes,
                    n.idx_bytes,
                    if n.malformed > 0 {
                        format!(", {} malformed lines kept", n.malformed)
                    } else {
                        String::new()
                    }
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => {
                tracing::warn!(
                    "archive: cannot compress {hour}: {e}; it stays a readable .log, retried in 5 minutes"
                );
                retry.push((now_i + Duration::from_secs(300), hour));
            }
        }
    }
}
