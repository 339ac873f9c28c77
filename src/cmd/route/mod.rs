//! `pumpwatch route` (SPEC §4.2): validate every report posted to an `xs_<account>` and
//! publish it **once**, stamped, to `xreport`, with a `BCC` key that the broker's own
//! exchange-to-exchange bindings turn into a copy for the product's source
//! (`xr_<source>`), the next pump (`xforward_<hop>`) or `xrejected` (nobody's).
//!
//! Files by role: [`decide`] is the pure decision; [`pipeline`] the consume → publish →
//! confirm → ack loop (at least once, nothing lost, memory bounded in bytes); [`stats`] the
//! counters behind the log line and `/metrics`. This file: flags, config, topology, and
//! starting the tasks. Any number of instances may share the queue.

pub mod decide;
pub mod pipeline;
pub mod stats;

use super::{Common, Error, Tasks, UsageError, parse_duration, parse_listen};
use crate::broker::amqp::{Client, ConnectOptions, ExchangeBindingDecl, ExchangeDecl, Topology};
use crate::broker::names;
use crate::broker::url::BrokerUrl;
use crate::config::Config as PumpConfig;
use crate::core::attribution::AnnouncementIndex;
use crate::http::{Limits, Listener};
use crate::shutdown::Shutdown;
pub use decide::{Consumed, Decider, Outcome, Publish, Reason, Route};
pub use stats::Counters;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// `pumpwatch route` flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Unacknowledged messages the broker may send ahead [default: route.prefetch, 500].
    #[arg(long)]
    pub prefetch: Option<u16>,
    /// How often to log the counters [default: 60 s].
    #[arg(long, value_parser = parse_duration)]
    pub log_every: Option<Duration>,
    /// Serve /metrics (route's counters) and /healthz on this address, e.g. 127.0.0.1:9101.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub broker: BrokerUrl,
    pub pump: PumpConfig,
    /// The account route runs as; names its queue (`q_<feeder>.route.validate`).
    pub feeder: String,
    pub prefetch: u16,
    /// Bytes of messages held at most (published, not yet confirmed).
    pub max_inflight_bytes: usize,
    /// How often the counters are logged.
    pub log_every: Duration,
    /// How long SIGTERM may take to settle what is held.
    pub drain: Duration,
    /// Serve `/metrics` (the counters) and `/healthz` here, if set.
    pub listen: Option<SocketAddr>,
    /// What route counts; shared so a test or `demo` can read it while route runs.
    pub counters: Arc<Counters>,
}

impl Config {
    pub fn from_args(a: Args, common: &Common) -> Result<Config, UsageError> {
        let pump = common.file.clone();
        if a.prefetch == Some(0) {
            return Err(UsageError::new("invalid --prefetch 0: must be at least 1"));
        }
        let listen = match &a.listen {
            Some(l) => {
                Some(parse_listen(l).map_err(|e| UsageError(format!("invalid --listen: {e}")))?)
            }
            None => None,
        };
        Ok(Config {
            broker: common.broker.clone(),
            prefetch: a.prefetch.unwrap_or(pump.route.prefetch),
            max_inflight_bytes: pump.route.max_inflight_bytes,
            feeder: names::feeder(&pump, common.broker.user()),
            pump,
            log_every: a
                .log_every
                .unwrap_or(Duration::from_secs(60))
                .max(Duration::from_secs(1)),
            drain: Duration::from_secs(4),
            listen,
            counters: Arc::new(Counters::default()),
        })
    }

    /// The pure decision, built from the pump's configuration.
    pub fn decider(&self) -> Decider {
        let p = &self.pump;
        Decider {
            attributor: p.attributor(),
            index: AnnouncementIndex::new(p.route.index_size),
            max_body: p.route.max_body,
            cluster: p.cluster.clone(),
            routes: p
                .neighbours
                .values()
                .map(|n| (n.name.clone(), n.next_hop.clone()))
                .collect(),
            public_exchange: p.exchanges.public.clone(),
            max_hops: decide::MAX_HOPS,
        }
    }
}

/// Everything route reads from or publishes through; declared at start and after every
/// reconnect (as the feeder it may), the same as `setup` declares.
pub fn topology(cfg: &Config) -> Topology {
    let p = &cfg.pump;
    let mut t = names::route_queue(p, &cfg.feeder).topology();
    let mut exchanges = vec![
        ExchangeDecl::topic(&p.exchanges.report),
        ExchangeDecl::topic(&p.exchanges.rejected),
        ExchangeDecl::topic(&p.exchanges.public),
    ];
    for u in p.users.values() {
        exchanges.push(ExchangeDecl::topic(names::user_exchange(&u.name)));
    }
    for s in p.sources() {
        exchanges.push(ExchangeDecl::topic(names::source_exchange(&s.name)));
    }
    for hop in names::next_hops(p) {
        exchanges.push(ExchangeDecl::topic(names::forward_exchange(hop)));
        t.merge(&names::forward_queue(p, &cfg.feeder, hop).topology());
    }
    t.merge(&names::rejected_queue(p, &cfg.feeder).topology());
    t.exchanges = exchanges;
    t.exchange_bindings = names::report_bindings(p)
        .into_iter()
        .map(|(source, destination, routing_key)| ExchangeBindingDecl {
            source,
            destination,
            routing_key,
        })
        .collect();
    t
}

/// `/metrics` (route's counters, Prometheus text) and `/healthz` (200 while `up`) on
/// `addr`, until `shutdown`. Returns the bound address (port 0 picks one).
pub async fn serve_metrics(
    addr: SocketAddr,
    counters: Arc<Counters>,
    up: Arc<AtomicBool>,
    shutdown: Shutdown,
) -> Result<SocketAddr, Error> {
    let listener = Listener::bind(addr, Limits::default()).await?;
    let local = listener.local_addr();
    let mut registry = prometheus_client::registry::Registry::with_prefix("pumpwatch");
    registry.register_collector(Box::new(stats::Shared(counters)));
    let app = axum::Router::new()
        .route("/metrics", crate::http::metrics(Arc::new(registry)))
        .route(
            "/healthz",
            crate::http::healthz(
                move || up.load(Ordering::Acquire),
                "reconnecting to the broker",
            ),
        );
    tokio::spawn(listener.serve(app, shutdown, Duration::from_secs(1)));
    Ok(local)
}

/// Runs until `shutdown`, then settles what is held and returns. A task that fails or
/// panics stops the others and is the error returned.
pub async fn run(cfg: Config, shutdown: Shutdown) -> Result<(), Error> {
    if cfg.pump.users.is_empty() {
        tracing::warn!(
            "no users declared in the configuration: route binds to no xs_<user> exchange and sees only announcements on {}",
            cfg.pump.exchanges.public
        );
    }
    // The topology goes through the adapter (it fails fast on a bad URL or password, and
    // declares again after its own reconnects); the hot path has its own connection.
    let topology = topology(&cfg);
    let opts = ConnectOptions {
        name: format!("pumpwatch route topology ({})", cfg.feeder),
        topology: topology.clone(),
        ..ConnectOptions::default()
    };
    let admin = Client::connect(&cfg.broker, opts).await?;
    let queue = names::route_queue(&cfg.pump, &cfg.feeder).name;
    tracing::info!(broker = %cfg.broker, queue = %queue, "route started");
    let counters = cfg.counters.clone();
    let mut tasks = Tasks::new("route", &shutdown);
    let pipeline = pipeline::Pipeline::new(&cfg, &admin, topology, &shutdown);
    if let Some(addr) = cfg.listen {
        let local =
            serve_metrics(addr, counters.clone(), pipeline.health(), shutdown.clone()).await?;
        tracing::info!("route metrics on http://{local}/metrics");
    }
    let decider = cfg.decider();
    tasks.spawn(async move { pipeline.run(decider).await });
    let (log_counters, log_every, log_stop) = (counters.clone(), cfg.log_every, shutdown.clone());
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(log_every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = log_stop.cancelled() => return Ok(()),
                _ = tick.tick() => tracing::info!("route: {}", log_counters.summary()),
            }
        }
    });
    let result = tasks.join().await;
    tracing::info!("route stopped: {}", counters.summary());
    admin.close().await;
    result
}
