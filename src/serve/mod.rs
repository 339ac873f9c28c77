//! `pumpwatch serve` (SPEC §4.6): the dashboard. Consumes speedo messages, keeps per
//! client and per source a window of history ([`board`], pure), evaluates health
//! continuously (`crate::health`), and serves on `--listen`:
//!
//! - `/` a live page (updates pushed over SSE, no reload), `/assets/*` its files, embedded;
//! - `/api/status` JSON of every client and source, `/api/history` chart data,
//!   `/api/events` server-sent events;
//! - `/metrics` Prometheus text ([`metrics`]); `/healthz`.
//!
//! Which speedos: an admin binds an exclusive queue `q_<user>.serve.<random>` to `xreport`
//! (`v01.speedo.#`); a source (`--source NAME`, or a broker user the configuration declares
//! as a source) binds to `xr_<source>` and sees its own products only. Speedos are acked
//! once applied to the board: they are readings, and the next one carries the same
//! cumulative counts, so losing one on a crash loses nothing but a chart point.

pub mod board;
mod http;
pub mod metrics;

pub use crate::speedo::Error;
pub use board::{Board, Kind, Status, View};

use crate::amqp::{Client, ConnectOptions, QueueDecl, Topology};
use crate::config::{Config as PumpConfig, Role};
use crate::shutdown::Shutdown;
use crate::speedo;
use jiff::Timestamp;
use prometheus_client::collector::Collector;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `pumpwatch serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to serve on [default: serve.listen, 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Show one source's view (its xr_<source>) [default: the broker user's, when the
    /// configuration declares it a source; else the admin view of xreport].
    #[arg(long, value_name = "NAME")]
    pub source: Option<String>,
    /// How much history to keep per client and source [default: serve.history, 1 h].
    #[arg(long, value_name = "SECS", value_parser = crate::config::parse_duration)]
    pub history: Option<Duration>,
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub broker: String,
    pub pump: PumpConfig,
    pub listen: String,
    pub view: View,
    pub history: Duration,
    /// How often events are pushed to the page (and health re-evaluated).
    pub push_every: Duration,
}

impl Config {
    pub fn new(broker: String, pump: PumpConfig) -> Config {
        let user = crate::log::broker_user(&broker);
        let view = if pump.role_of(&user) == Some(Role::Source) {
            View::Source(user)
        } else {
            View::Admin
        };
        Config {
            listen: pump.serve.listen.clone(),
            history: pump.serve.history,
            broker,
            pump,
            view,
            push_every: Duration::from_secs(1),
        }
    }

    pub fn from_args(args: &Args, pump: &PumpConfig, broker: &str) -> Result<Config, Error> {
        let mut cfg = Config::new(broker.to_owned(), pump.clone());
        if let Some(l) = &args.listen {
            cfg.listen = l.clone();
        }
        if let Some(s) = &args.source {
            if s.is_empty() {
                return Err(Error::Usage("invalid --source: empty".into()));
            }
            cfg.view = View::Source(s.clone());
        }
        if let Some(h) = args.history {
            if h < Duration::from_secs(1) {
                return Err(Error::Usage(format!(
                    "invalid --history {h:?}: must be at least 1 s"
                )));
            }
            cfg.history = h;
        }
        Ok(cfg)
    }
}

/// `pumpwatch serve`: binds, prints the URL on stderr, serves until `shutdown`.
pub async fn main(
    args: Args,
    config: &PumpConfig,
    broker_url: &str,
    shutdown: Shutdown,
) -> Result<(), Error> {
    let cfg = Config::from_args(&args, config, broker_url)?;
    let server = Server::bind(cfg).await?;
    eprintln!(
        "pumpwatch serve: http://{} ({})",
        server.local_addr(),
        server.view().label()
    );
    server.run(shutdown).await
}

/// Shared between the consumer, the sweeper and the HTTP handlers.
pub(crate) struct Shared {
    pub(crate) board: Arc<Mutex<Board>>,
    pub(crate) registry: Registry,
    pub(crate) client: Client,
    pub(crate) push_every: Duration,
    pub(crate) shutdown: Shutdown,
}

/// A bound, connected `serve`, not yet serving: [`Server::local_addr`] tells where
/// (`--listen 127.0.0.1:0` picks a free port), [`Server::with_collector`] adds metrics.
pub struct Server {
    cfg: Config,
    listener: tokio::net::TcpListener,
    client: Client,
    queue: String,
    board: Arc<Mutex<Board>>,
    registry: Registry,
}

impl Server {
    /// Binds `cfg.listen` and connects to the broker (both fail fast: exit 2 / 1).
    pub async fn bind(cfg: Config) -> Result<Server, Error> {
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .map_err(|e| Error::Usage(format!("cannot listen on {}: {e}", cfg.listen)))?;
        let user = crate::log::broker_user(&cfg.broker);
        let queue = crate::names::private_queue(&user, "serve");
        let exchange = match &cfg.view {
            View::Admin => cfg.pump.exchanges.report.clone(),
            View::Source(s) => crate::names::source_exchange(s),
        };
        let topology = Topology::bound_queue(
            QueueDecl::exclusive(queue.clone()),
            &exchange,
            "v01.speedo.#",
        );
        let opts = ConnectOptions {
            name: format!("pumpwatch serve ({})", cfg.view.label()),
            topology,
            ..ConnectOptions::default()
        };
        let client = Client::connect(&cfg.broker, opts).await?;
        let board = Arc::new(Mutex::new(Board::new(
            &cfg.pump,
            cfg.view.clone(),
            cfg.history,
        )));
        let mut registry = Registry::with_prefix("pumpwatch");
        registry.register_collector(Box::new(metrics::BoardCollector(board.clone())));
        Ok(Server {
            cfg,
            listener,
            client,
            queue,
            board,
            registry,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn view(&self) -> &View {
        &self.cfg.view
    }

    /// The board, for a process that runs more than `serve` (`demo`) or a test.
    pub fn board(&self) -> Arc<Mutex<Board>> {
        self.board.clone()
    }

    /// Adds a collector to `/metrics` (its names get the `pumpwatch_` prefix too).
    pub fn with_collector(mut self, c: Box<dyn Collector>) -> Server {
        self.registry.register_collector(c);
        self
    }

    /// Serves until `shutdown`; open event streams are ended so the stop takes well under
    /// 5 s.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), Error> {
        let Server {
            cfg,
            listener,
            client,
            queue,
            board,
            registry,
        } = self;
        let mut consumer = client.consume(&queue, 1000).await?;
        tracing::info!(
            listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            view = %cfg.view.label(),
            "serve started"
        );
        let shared = Arc::new(Shared {
            board: board.clone(),
            registry,
            client: client.clone(),
            push_every: cfg.push_every,
            shutdown: shutdown.clone(),
        });
        let app = http::router(shared);
        let stop = shutdown.clone();
        let http = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        });
        let mut sweep = tokio::time::interval(cfg.push_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                _ = sweep.tick() => {
                    board.lock().unwrap_or_else(|p| p.into_inner()).sweep(Timestamp::now());
                }
                next = consumer.next() => {
                    let d = match next {
                        Some(Ok(d)) => d,
                        Some(Err(e)) => break Err(Error::from(e)),
                        None => break Ok(()),
                    };
                    let decoded = speedo::decode(&d.incoming());
                    {
                        let mut b = board.lock().unwrap_or_else(|p| p.into_inner());
                        match &decoded {
                            Ok(s) => b.apply(s, Timestamp::now()),
                            Err(e) => {
                                b.intake.malformed += 1;
                                tracing::debug!(topic = %d.routing_key, "not a speedo: {e}");
                            }
                        }
                    }
                    if let Err(e) = d.ack().await {
                        tracing::debug!("ack failed: {e}");
                    }
                }
            }
        };
        shutdown.cancel();
        let _ = consumer.cancel().await;
        match tokio::time::timeout(Duration::from_secs(3), http).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!("http server: {e}"),
            Ok(Err(e)) => tracing::warn!("http server task: {e}"),
            Err(_) => tracing::warn!("http server did not stop within 3 s"),
        }
        let _ = tokio::time::timeout(Duration::from_millis(1500), client.close()).await;
        result
    }
}
