//! `pumpwatch serve` (SPEC §4.6): the dashboard. Consumes speedo messages, keeps per
//! client and per source a window of history ([`board`], pure), evaluates health
//! continuously (`crate::core::health`), and serves on `--listen`:
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
pub mod metrics;
mod routes;

pub use board::{Board, Kind, Status, View};

use super::{Common, Error, UsageError, parse_duration, parse_listen};
use crate::broker::amqp::{AmqpError, Client, ConnectOptions, QueueDecl, Topology};
use crate::broker::names;
use crate::broker::url::BrokerUrl;
use crate::cmd::speedo;
use crate::config::{Config as PumpConfig, Role};
use crate::core::text;
use crate::http::{Limits, Listener};
use crate::shutdown::Shutdown;
use jiff::Timestamp;
use prometheus_client::collector::Collector;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// `pumpwatch serve` flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Address to serve on [default: serve.listen, 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Show one source's view (its xr_<source>) [default: the broker user's, when the
    /// configuration declares it a source; else the admin view of xreport].
    #[arg(long, value_name = "NAME")]
    pub source: Option<String>,
    /// How much history to keep per client and source [default: serve.history, 1 h].
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub history: Option<Duration>,
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub broker: BrokerUrl,
    pub pump: PumpConfig,
    pub listen: SocketAddr,
    pub limits: Limits,
    pub view: View,
    pub history: Duration,
    /// How often events are pushed to the page (and health re-evaluated).
    pub push_every: Duration,
}

impl Config {
    pub fn from_args(args: Args, common: &Common) -> Result<Config, UsageError> {
        let pump = common.file.clone();
        let user = common.broker.user();
        let mut view = if pump.role_of(user) == Some(Role::Source) {
            View::Source(user.to_owned())
        } else {
            View::Admin
        };
        let listen = args.listen.as_deref().unwrap_or(&pump.serve.listen);
        let listen =
            parse_listen(listen).map_err(|e| UsageError(format!("invalid --listen: {e}")))?;
        if let Some(s) = args.source {
            if !crate::config::is_valid_name(&s) {
                return Err(UsageError(format!(
                    "invalid --source {s:?}: {}",
                    crate::config::NAME_RULE
                )));
            }
            view = View::Source(s);
        }
        let history = args.history.unwrap_or(pump.serve.history);
        if history < Duration::from_secs(1) {
            return Err(UsageError(format!(
                "invalid --history {history:?}: must be at least 1 s"
            )));
        }
        Ok(Config {
            broker: common.broker.clone(),
            listen,
            limits: Limits::default(),
            view,
            history,
            pump,
            push_every: Duration::from_secs(1),
        })
    }
}

/// Connects again and again (backoff from [`WAIT_MIN`] to [`WAIT_MAX`]) until the
/// exchange `serve` reads exists; `None` when `shutdown` came first. A broker that goes
/// away meanwhile is waited for too; a refusal (credentials, permissions) ends the wait
/// with the error (exit 1).
async fn wait_for_exchange(
    broker: &BrokerUrl,
    opts: &ConnectOptions,
    exchange: &str,
    shutdown: &Shutdown,
) -> Result<Option<Client>, Error> {
    let mut delay = WAIT_MIN;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        match Client::connect(broker, opts.clone()).await {
            Ok(c) => {
                tracing::info!("exchange {exchange} is there: serving its speedos");
                return Ok(Some(c));
            }
            Err(AmqpError::NotFound(_) | AmqpError::Connect { .. } | AmqpError::Closed(_)) => {
                delay = (delay * 2).min(WAIT_MAX);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// `pumpwatch serve`: binds, prints the URL on stderr, serves until `shutdown`.
pub async fn run(cfg: Config, shutdown: Shutdown) -> Result<(), Error> {
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
    pub(crate) registry: Arc<Registry>,
    /// Set once connected: `serve` may start before the exchange it reads exists.
    pub(crate) client: Arc<OnceLock<Client>>,
    pub(crate) push_every: Duration,
    pub(crate) shutdown: Shutdown,
}

/// A bound `serve`, not yet serving: [`Server::local_addr`] tells where (`--listen
/// 127.0.0.1:0` picks a free port), [`Server::with_collector`] adds metrics. Connected,
/// or waiting for the exchange it reads (`xreport`, or `xr_<source>`) to be declared.
pub struct Server {
    cfg: Config,
    listener: Listener,
    /// `None` while the exchange does not exist yet: [`Server::run`] keeps trying.
    client: Option<Client>,
    opts: ConnectOptions,
    exchange: String,
    queue: String,
    board: Arc<Mutex<Board>>,
    registry: Registry,
}

/// The first retry of a connection that found no exchange, doubling up to [`WAIT_MAX`].
const WAIT_MIN: Duration = Duration::from_millis(250);
const WAIT_MAX: Duration = Duration::from_secs(5);

impl Server {
    /// Binds `cfg.listen` and connects to the broker. Both fail fast (exit 1), except
    /// when the broker is there but the exchange `serve` reads is not: `setup` has not
    /// run yet, so `serve` waits for it ([`Server::run`] retries with backoff; `/healthz`
    /// answers 503 meanwhile), as the other daemons do.
    pub async fn bind(cfg: Config) -> Result<Server, Error> {
        let listener = Listener::bind(cfg.listen, cfg.limits).await?;
        let queue = names::private_queue(cfg.broker.user(), "serve");
        let exchange = match &cfg.view {
            View::Admin => cfg.pump.exchanges.report.clone(),
            View::Source(s) => names::source_exchange(s),
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
        let client = match Client::connect(&cfg.broker, opts.clone()).await {
            Ok(c) => Some(c),
            Err(AmqpError::NotFound(e)) => {
                tracing::warn!(
                    "exchange {exchange} does not exist yet ({}); waiting for it (pumpwatch setup declares it)",
                    text::escape(&e)
                );
                None
            }
            Err(e) => return Err(e.into()),
        };
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
            opts,
            exchange,
            queue,
            board,
            registry,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
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
            opts,
            exchange,
            queue,
            board,
            registry,
        } = self;
        tracing::info!(
            listen = %listener.local_addr(),
            view = %cfg.view.label(),
            "serve started"
        );
        let connected = Arc::new(OnceLock::new());
        let shared = Arc::new(Shared {
            board: board.clone(),
            registry: Arc::new(registry),
            client: connected.clone(),
            push_every: cfg.push_every,
            shutdown: shutdown.clone(),
        });
        let app = routes::router(shared);
        let http = tokio::spawn(listener.serve(app, shutdown.clone(), Duration::from_secs(2)));
        let client = match client {
            Some(c) => c,
            None => match wait_for_exchange(&cfg.broker, &opts, &exchange, &shutdown).await {
                Ok(Some(c)) => c,
                // Stopped while waiting (Ok), or refused for good (Err): stop serving too.
                outcome => {
                    shutdown.cancel();
                    let _ = tokio::time::timeout(Duration::from_secs(3), http).await;
                    return outcome.map(|_| ());
                }
            },
        };
        let _ = connected.set(client.clone());
        let mut consumer = client.consume(&queue, 1000).await?;
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
                                tracing::debug!(
                                    topic = %text::escape(&d.routing_key),
                                    "not a speedo: {}",
                                    text::escape(&e.to_string())
                                );
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
        let result = match tokio::time::timeout(Duration::from_secs(3), http).await {
            Ok(Ok(())) => result,
            Ok(Err(e)) => result.and(Err(Error::from_join("serve's HTTP server", e))),
            Err(_) => {
                tracing::warn!("http server did not stop within 3 s");
                result
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(1500), client.close()).await;
        result
    }
}
