//! `pumpwatch route` (SPEC §4.2): validate reports posted to every `xs_<user>` and dispatch
//! everything in `xreport` to the source of each product. Both stages run in one process,
//! each on its own durable queue, and any number of instances may share the queues.
//!
//! At least once, nothing lost: every input is acked only after each of its outputs was
//! confirmed by the broker; a publish the broker cannot route or refuses is retried by
//! requeueing the input, and an input of a lost connection is redelivered by the broker.
//! Publishing is pipelined: the consume loop publishes and hands (delivery, confirm) pairs
//! to an acker task that awaits the confirms in order, so thousands are in flight at once.

pub mod decide;
pub mod stats;

use super::{Common, Error, UsageError, parse_duration, parse_listen};
use crate::broker::amqp::{
    AmqpError, Client, ConnectOptions, Delivery, ExchangeDecl, PendingConfirm, Topology,
};
use crate::broker::names::{self, H_CLIENT, H_EXCHANGE, H_REASON, H_SOURCE, H_STAGE};
use crate::broker::url::BrokerUrl;
use crate::config::{Config as PumpConfig, Role};
use crate::core::attribution::AnnouncementIndex;
use crate::core::{HeaderValue, Headers};
use crate::http::{Limits, Listener};
use crate::shutdown::Shutdown;
pub use decide::{Consumed, Dispatcher, ForwardKind, Outcome, Reason, Validator};
pub use stats::{Counters, Stage as StageName};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Stage {
    Validate,
    Dispatch,
    #[default]
    All,
}

/// `pumpwatch route` flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Which stage(s) to run in this process.
    #[arg(long, value_enum, default_value_t = Stage::All)]
    pub stage: Stage,
    /// Unacknowledged messages per stage [default: route.prefetch, 500].
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
    pub stage: Stage,
    pub pump: PumpConfig,
    /// The account route runs as; names its queues (`q_<feeder>.route.*`).
    pub feeder: String,
    pub prefetch: u16,
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
            stage: a.stage,
            prefetch: a.prefetch.unwrap_or(pump.route.prefetch),
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
}

/// `/metrics` (route's counters, Prometheus text) and `/healthz` on `addr`, until
/// `shutdown`. Returns the bound address (port 0 picks one).
pub async fn serve_metrics(
    addr: SocketAddr,
    counters: Arc<Counters>,
    clients: Vec<Client>,
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
                move || clients.iter().all(Client::is_connected),
                "reconnecting to the broker",
            ),
        );
    tokio::spawn(listener.serve(app, shutdown, Duration::from_secs(1)));
    Ok(local)
}

/// Everything route publishes to or reads from; declared at start and after reconnects.
pub fn topology(cfg: &Config) -> Topology {
    let p = &cfg.pump;
    let mut exchanges = vec![
        ExchangeDecl::topic(&p.exchanges.report),
        ExchangeDecl::topic(&p.exchanges.rejected),
        ExchangeDecl::topic(&p.exchanges.public),
    ];
    for u in p.users.values() {
        exchanges.push(ExchangeDecl::topic(names::user_exchange(&u.name)));
        if u.role == Role::Source {
            exchanges.push(ExchangeDecl::topic(names::source_exchange(&u.name)));
        }
    }
    let mut shapes = vec![
        names::rejected_queue(p, &cfg.feeder),
        names::dispatch_queue(p, &cfg.feeder),
    ];
    for hop in names::next_hops(p) {
        exchanges.push(ExchangeDecl::topic(names::forward_exchange(hop)));
        shapes.push(names::forward_queue(p, &cfg.feeder, hop));
    }
    if cfg.stage != Stage::Dispatch {
        shapes.push(names::validate_queue(p, &cfg.feeder));
    }
    let mut t = Topology {
        exchanges,
        ..Topology::default()
    };
    for s in &shapes {
        t.merge(&s.topology());
    }
    t
}

/// Runs the configured stages until `shutdown`, then settles what is held and returns.
/// A stage that fails or panics stops the others and is the error returned.
pub async fn run(cfg: Config, shutdown: Shutdown) -> Result<(), Error> {
    let counters = cfg.counters.clone();
    // One connection per stage: the broker then handles each stage's channel in its own
    // process (two cores instead of one), and a stage's publish confirms and returns never
    // mix with the other's.
    let topology = topology(&cfg);
    let connect = |stage: &str| {
        let opts = ConnectOptions {
            name: format!("pumpwatch route {stage} ({})", cfg.feeder),
            topology: topology.clone(),
            ..ConnectOptions::default()
        };
        Client::connect(&cfg.broker, opts)
    };
    let mut clients = Vec::new();
    if cfg.pump.users.is_empty() && cfg.stage != Stage::Dispatch {
        tracing::warn!(
            "no users declared in the configuration: validate binds to no xs_<user> exchange and sees only announcements on {}",
            cfg.pump.exchanges.public
        );
    }
    tracing::info!(broker = %cfg.broker, stage = ?cfg.stage, "route started");
    let p = &cfg.pump;
    let mut tasks = super::Tasks::new("route", &shutdown);
    if cfg.stage != Stage::Dispatch {
        let v = Validator {
            attributor: p.attributor(),
            index: AnnouncementIndex::new(p.route.index_size),
            max_body: p.route.max_body,
            report_exchange: p.exchanges.report.clone(),
        };
        let client = connect("validate").await?;
        clients.push(client.clone());
        let stage = StageRunner::new(&cfg, &client, &counters, &shutdown, StageName::Validate);
        let queue = names::validate_queue(p, &cfg.feeder).name;
        let consumer = client.consume(&queue, cfg.prefetch).await?;
        tasks.spawn(async move { Ok(stage.run(consumer, Decider::Validate(Box::new(v))).await?) });
    }
    if cfg.stage != Stage::Validate {
        let d = Dispatcher {
            attributor: p.attributor(),
            max_body: p.route.max_body,
            cluster: p.cluster.clone(),
            routes: p
                .neighbours
                .values()
                .map(|n| {
                    (
                        n.name.clone(),
                        n.via.clone().unwrap_or_else(|| n.name.clone()),
                    )
                })
                .collect(),
            max_hops: 8,
        };
        let client = connect("dispatch").await?;
        clients.push(client.clone());
        let stage = StageRunner::new(&cfg, &client, &counters, &shutdown, StageName::Dispatch);
        let queue = names::dispatch_queue(p, &cfg.feeder).name;
        let consumer = client.consume(&queue, cfg.prefetch).await?;
        tasks.spawn(async move { Ok(stage.run(consumer, Decider::Dispatch(Box::new(d))).await?) });
    }
    if let Some(addr) = cfg.listen {
        let local =
            serve_metrics(addr, counters.clone(), clients.clone(), shutdown.clone()).await?;
        tracing::info!("route metrics on http://{local}/metrics");
    }
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
    // All at once: closing one after the other took 5 s each, past SPEC's 5 s in all.
    futures_util::future::join_all(clients.iter().map(|c| c.close())).await;
    result
}

enum Decider {
    Validate(Box<Validator>),
    Dispatch(Box<Dispatcher>),
}

/// One stage: a consume loop that decides and publishes, and an acker that settles.
struct StageRunner {
    client: Client,
    counters: Arc<Counters>,
    shutdown: Shutdown,
    stage: StageName,
    rejected: String,
    prefetch: u16,
    drain: Duration,
    /// Source exchanges known to exist; others are declared before the first publish.
    declared: HashSet<String>,
}

/// A delivery waiting for the confirm of its one output (or for nothing).
struct InFlight {
    delivery: Delivery,
    confirm: Option<PendingConfirm>,
    kind: Option<ForwardKind>,
}

impl StageRunner {
    fn new(
        cfg: &Config,
        client: &Client,
        counters: &Arc<Counters>,
        shutdown: &Shutdown,
        stage: StageName,
    ) -> Self {
        StageRunner {
            client: client.clone(),
            counters: counters.clone(),
            shutdown: shutdown.clone(),
            stage,
            rejected: cfg.pump.exchanges.rejected.clone(),
            prefetch: cfg.prefetch,
            drain: cfg.drain,
            declared: cfg
                .pump
                .sources()
                .map(|u| names::source_exchange(&u.name))
                .collect(),
        }
    }

    async fn run(
        mut self,
        mut consumer: crate::broker::amqp::Consumer,
        mut decider: Decider,
    ) -> Result<(), AmqpError> {
        let (tx, rx) = mpsc::channel::<InFlight>(usize::from(self.prefetch).max(16));
        let acker = tokio::spawn(acker(rx, self.counters.clone(), self.stage));
        let result = loop {
            let delivery = tokio::select! {
                _ = self.shutdown.cancelled() => break Ok(()),
                d = consumer.next() => match d {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => break Err(e),
                    None => break Ok(()),
                },
            };
            let outcome = match &mut decider {
                Decider::Validate(v) => v.validate(&delivery.incoming()),
                Decider::Dispatch(d) => d.dispatch(&delivery.incoming()),
            };
            match self.publish(&delivery, outcome).await {
                Ok((confirm, kind)) => {
                    if tx
                        .send(InFlight {
                            delivery,
                            confirm,
                            kind,
                        })
                        .await
                        .is_err()
                    {
                        break Ok(());
                    }
                }
                // The connection went away: the broker redelivers this input.
                Err(e) if e.is_transient() => {
                    tracing::debug!("publish failed, input will be redelivered: {e}")
                }
                Err(e) => {
                    tracing::warn!("publish failed, requeueing the input: {e}");
                    self.counters.retried(self.stage);
                    // A refusal that repeats (e.g. a missing permission) must not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let _ = delivery.nack(true).await;
                }
            }
        };
        // Stop taking new messages, then settle everything held, within the drain bound.
        let _ = consumer.cancel().await;
        drop(tx);
        match tokio::time::timeout(self.drain, acker).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(stage = ?self.stage, "drain deadline passed; unsettled inputs will be redelivered")
            }
        }
        result
    }

    /// Publishes what `outcome` says; returns the confirm to wait for.
    async fn publish(
        &mut self,
        d: &Delivery,
        outcome: Outcome,
    ) -> Result<(Option<PendingConfirm>, Option<ForwardKind>), AmqpError> {
        match outcome {
            Outcome::Consumed(c) => {
                self.counters.consumed(self.stage, c);
                Ok((None, None))
            }
            Outcome::Reject { reason, detail } => {
                self.counters.rejected(self.stage, reason);
                let mut h = Headers::new();
                h.set(H_REASON, short(&Outcome::reason_text(reason, &detail)));
                h.set(H_STAGE, self.stage.label());
                h.set(H_EXCHANGE, d.exchange.as_str());
                let c = self
                    .client
                    .forward(&self.rejected, &d.routing_key, d, &h)
                    .await?;
                Ok((Some(c), None))
            }
            Outcome::Forward {
                exchange,
                stamps,
                kind,
            } => {
                if kind == ForwardKind::ToSource && !self.declared.contains(&exchange) {
                    // Only reached without declared accounts (permissive mode): route is the
                    // feeder and may create the source's exchange.
                    let t = Topology {
                        exchanges: vec![ExchangeDecl::topic(&exchange)],
                        ..Topology::default()
                    };
                    self.client.declare(&t).await?;
                    self.declared.insert(exchange.clone());
                }
                let mut h = Headers::new();
                for (k, v) in stamps {
                    h.set(k, short(&v));
                }
                if kind == ForwardKind::Validated {
                    // A user's own pumpwatch_* headers are never believed.
                    for k in [H_CLIENT, H_SOURCE] {
                        if h.get(k).is_none() {
                            h.set(k, "");
                        }
                    }
                }
                let c = self
                    .client
                    .forward(&exchange, &d.routing_key, d, &h)
                    .await?;
                Ok((Some(c), Some(kind)))
            }
        }
    }
}

fn short(s: &str) -> HeaderValue {
    HeaderValue::Str(crate::core::topic::truncated(s, crate::core::topic::MAX_SHORT).to_owned())
}

/// Acks are sent as one `multiple` ack per this many settled inputs at most (fewer frames,
/// fewer wake-ups); any gap in the stream flushes sooner.
const ACK_BATCH: usize = 64;

/// Awaits each confirm in order and settles its input. Ack only after the confirm. Inputs
/// arrive in delivery order from one consumer channel, so consecutive successes are acked
/// together with `multiple`; a failure first flushes the acks before it.
async fn acker(mut rx: mpsc::Receiver<InFlight>, counters: Arc<Counters>, stage: StageName) {
    let mut held: Option<Delivery> = None;
    let mut batched = 0usize;
    async fn flush(held: &mut Option<Delivery>, batched: &mut usize) {
        if let Some(d) = held.take() {
            let _ = d.ack_multiple().await;
        }
        *batched = 0;
    }
    loop {
        let f = match rx.try_recv() {
            Ok(f) => f,
            Err(mpsc::error::TryRecvError::Empty) => {
                flush(&mut held, &mut batched).await;
                match rx.recv().await {
                    Some(f) => f,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        let result = match f.confirm {
            Some(c) => c.wait().await,
            None => Ok(()),
        };
        let ok = match result {
            Ok(()) => {
                if let Some(k) = f.kind {
                    counters.forwarded(stage, k);
                }
                true
            }
            // Nobody listens to this source's reports and it keeps none: the source was
            // offline with no retained queue. The broker dropped it; count it and go on.
            Err(AmqpError::Unroutable { .. }) if f.kind == Some(ForwardKind::ToSource) => {
                counters.unheard(stage);
                true
            }
            // Connection lost: the input is redelivered by the broker; acking is a no-op.
            Err(e) if e.is_transient() => {
                tracing::debug!("confirm lost: {e}");
                false
            }
            Err(e) => {
                tracing::warn!(?stage, "output not confirmed ({e}); requeueing the input");
                counters.retried(stage);
                flush(&mut held, &mut batched).await;
                // Do not spin on a broker that keeps refusing.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = f.delivery.nack(true).await;
                false
            }
        };
        if ok {
            if held.as_ref().is_some_and(|h| !h.same_channel(&f.delivery)) {
                flush(&mut held, &mut batched).await;
            }
            held = Some(f.delivery);
            batched += 1;
            if batched >= ACK_BATCH {
                flush(&mut held, &mut batched).await;
            }
        }
    }
    flush(&mut held, &mut batched).await;
}
