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
//! (`v01.speedo.#`) and to each declared source's `xr_<source>` (`v01.speedo.client.#`:
//! the (source, client) pairs); a source (`--source NAME`, or a broker user the
//! configuration declares as a source) binds to `xr_<source>` and sees its own products
//! only. Speedos are acked once applied to the board: they are readings, and the next one
//! carries the same cumulative counts, so losing one on a crash loses nothing but a chart
//! point.
//!
//! Health is evaluated on every speedo and every `push_every` (1 s), so a client that
//! stops sending turns CRITICAL by time alone. `SIGHUP` reads the configuration file
//! again and applies its thresholds; a file that does not parse is logged and the old
//! thresholds stay. With `--state-dir DIR` the learned baselines are kept in
//! `DIR/baselines.sqlite3` ([`state`]): loaded at start, written in batches.

pub mod auth;
pub mod board;
pub mod metrics;
mod routes;
pub mod state;

pub use auth::{Gate, GateConfig};
pub use board::{Access, Board, CheckAnswer, Kind, Scope, Status, View};

use super::{Common, Error, UsageError, parse_duration, parse_listen};
use crate::broker::amqp::{AmqpError, Client, ConnectOptions, QueueDecl, Topology};
use crate::broker::mgmt::MgmtClient;
use crate::broker::names;
use crate::broker::url::BrokerUrl;
use crate::cmd::speedo;
use crate::config::{AuthMode, Config as PumpConfig, Role};
use crate::core::text;
use crate::http::{Limits, Listener, Tls};
use crate::shutdown::Shutdown;
use jiff::Timestamp;
use prometheus_client::collector::Collector;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// Keep the learned baselines in DIR/baselines.sqlite3, so a restart keeps them
    /// [default: in memory only].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Who may look: `broker` (log in with your pump account; a source sees its own
    /// view, a subscriber its own row, an admin everything) or `none` (everyone sees
    /// everything: loopback only, or a pump without users) [default: serve.auth, broker].
    #[arg(long, value_enum, value_name = "MODE")]
    pub auth: Option<AuthMode>,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key) [default: serve.tls_cert].
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert [default: serve.tls_key].
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
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
    /// Where the learned baselines are kept; `None`: in memory only.
    pub state_dir: Option<PathBuf>,
    /// How often learned changes are written to the state database.
    pub state_every: Duration,
    /// Who may look, and how they log in (`auth.rs`).
    pub gate: GateConfig,
    /// HTTPS; `None`: plain HTTP (behind a reverse proxy, or on loopback).
    pub tls: Option<Tls>,
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
        if let Some(d) = &args.state_dir
            && d.as_os_str().is_empty()
        {
            return Err(UsageError::new("invalid --state-dir: empty path"));
        }
        let gate = gate_config(args.auth, common, &listen)?;
        let tls = match (
            args.tls_cert.as_ref().or(pump.serve.tls_cert.as_ref()),
            args.tls_key.as_ref().or(pump.serve.tls_key.as_ref()),
        ) {
            (Some(cert), Some(key)) => {
                Some(Tls::load(cert, key).map_err(|e| UsageError(e.to_string()))?)
            }
            _ => None,
        };
        Ok(Config {
            broker: common.broker.clone(),
            listen,
            limits: Limits::default(),
            view,
            history,
            pump,
            push_every: Duration::from_secs(1),
            state_dir: args.state_dir,
            state_every: Duration::from_secs(30),
            gate,
            tls,
        })
    }
}

/// The shortest metrics token accepted (a guessable one would open `/metrics`).
pub const MIN_TOKEN: usize = 16;

/// Who may look: `--auth` (else `serve.auth`), the management API to check logins with,
/// the metrics token from its environment variable. `--auth none` on an address others
/// can reach is refused when the pump declares users: it would show every source's
/// products to anyone.
fn gate_config(
    auth: Option<AuthMode>,
    common: &Common,
    listen: &SocketAddr,
) -> Result<GateConfig, UsageError> {
    let pump = &common.file;
    let mode = auth.unwrap_or(pump.serve.auth);
    if mode == AuthMode::None && !listen.ip().is_loopback() && !pump.users.is_empty() {
        return Err(UsageError(format!(
            "--auth none on {listen} would show every source's products to anyone who reaches it; \
             listen on a loopback address, or let people log in with their pump accounts (--auth broker)"
        )));
    }
    let metrics_token = match &pump.serve.metrics_token_env {
        None => None,
        Some(var) => {
            let t = std::env::var(var).map_err(|_| {
                UsageError(format!(
                    "serve.metrics_token_env names {var}, which is not set (or not UTF-8)"
                ))
            })?;
            if t.trim().len() < MIN_TOKEN {
                return Err(UsageError(format!(
                    "the metrics token in {var} is shorter than {MIN_TOKEN} characters"
                )));
            }
            Some(t.trim().to_owned())
        }
    };
    let mgmt = match mode {
        AuthMode::None => None,
        AuthMode::Broker => Some(
            MgmtClient::from_urls(&common.admin_url, &common.broker)
                .map_err(|e| UsageError(format!("--auth broker: {e}")))?,
        ),
    };
    Ok(GateConfig {
        mode,
        realm: format!("pumpwatch {}", pump.cluster),
        login_cache: pump.serve.login_cache,
        mgmt,
        metrics_token,
        trusted_proxies: pump.serve.trusted_proxies.clone(),
    })
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
            Err(
                e @ (AmqpError::NotFound(_) | AmqpError::Connect { .. } | AmqpError::Closed(_)),
            ) => {
                tracing::debug!("still waiting for {exchange}: {e}");
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
        "pumpwatch serve: {}://{} ({}; {})",
        if server.cfg.tls.is_some() {
            "https"
        } else {
            "http"
        },
        server.local_addr(),
        server.view().label(),
        match server.cfg.gate.mode {
            AuthMode::Broker => "log in with a pump account",
            AuthMode::None => "no login",
        }
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
    pub(crate) gate: Arc<Gate>,
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
    store: Option<state::Store>,
    gate: Arc<Gate>,
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
        let mut listener = Listener::bind(cfg.listen, cfg.limits).await?;
        if let Some(tls) = &cfg.tls {
            listener = listener.with_tls(tls.clone());
        }
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
        // The state first: a damaged or busy database stops serve before it connects.
        let (store, learning) = match &cfg.state_dir {
            Some(dir) => {
                let (store, learning) = open_state(dir)?;
                (Some(store), learning)
            }
            None => (None, board::Learning::default()),
        };
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
        let mut b = Board::new(&cfg.pump, cfg.view.clone(), cfg.history);
        b.learning = learning;
        let board = Arc::new(Mutex::new(b));
        let gate = Arc::new(Gate::new(cfg.gate.clone(), &cfg.pump));
        let mut registry = Registry::with_prefix("pumpwatch");
        registry.register_collector(Box::new(metrics::BoardCollector(board.clone())));
        registry.register_collector(Box::new(metrics::LoginCollector(gate.clone())));
        Ok(Server {
            gate,
            cfg,
            listener,
            client,
            opts,
            exchange,
            queue,
            board,
            registry,
            store,
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
            store,
            gate,
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
            gate: gate.clone(),
        });
        let app = routes::router(shared);
        let http = tokio::spawn(listener.serve(app, shutdown.clone(), Duration::from_secs(2)));
        let persist = store.map(|st| {
            tokio::spawn(persist(
                st,
                board.clone(),
                cfg.state_every,
                shutdown.clone(),
            ))
        });
        let mut hup = Hangup::new();
        let client = match client {
            Some(c) => c,
            None => match wait_for_exchange(&cfg.broker, &opts, &exchange, &shutdown).await {
                Ok(Some(c)) => c,
                // Stopped while waiting (Ok), or refused for good (Err): stop serving too.
                outcome => {
                    shutdown.cancel();
                    let _ = tokio::time::timeout(Duration::from_secs(3), http).await;
                    if let Some(p) = persist {
                        let _ = tokio::time::timeout(Duration::from_secs(3), p).await;
                    }
                    return outcome.map(|_| ());
                }
            },
        };
        let _ = connected.set(client.clone());
        let mut consumer = client.consume(&queue, 1000).await?;
        // The admin view binds each declared source's xr_<source> once, for every
        // source's view; sources declared later (SIGHUP) are bound then.
        let mut bound: std::collections::BTreeSet<String> =
            cfg.pump.sources().map(|u| u.name.clone()).collect();
        let mut pairs = Vec::new();
        if cfg.view == View::Admin {
            pairs.push(tokio::spawn(bind_pairs(
                client.clone(),
                queue.clone(),
                bound.iter().cloned().collect(),
                shutdown.clone(),
            )));
        }
        let mut sweep = tokio::time::interval(cfg.push_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                _ = sweep.tick() => {
                    board.lock().unwrap_or_else(|p| p.into_inner()).sweep(Timestamp::now());
                }
                _ = hup.recv() => {
                    let Some(new) = reload(&cfg, &board, &gate) else { continue };
                    let added: Vec<String> = new
                        .sources()
                        .map(|u| u.name.clone())
                        .filter(|n| !bound.contains(n))
                        .collect();
                    if cfg.view == View::Admin && !added.is_empty() {
                        tracing::info!("SIGHUP: {} new sources: binding their xr_ exchanges", added.len());
                        bound.extend(added.iter().cloned());
                        pairs.push(tokio::spawn(bind_pairs(
                            client.clone(),
                            queue.clone(),
                            added,
                            shutdown.clone(),
                        )));
                    }
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
        for p in pairs {
            let _ = tokio::time::timeout(Duration::from_secs(1), p).await;
        }
        let result = match tokio::time::timeout(Duration::from_secs(3), http).await {
            Ok(Ok(())) => result,
            Ok(Err(e)) => result.and(Err(Error::from_join("serve's HTTP server", e))),
            Err(_) => {
                tracing::warn!("http server did not stop within 3 s");
                result
            }
        };
        if let Some(p) = persist {
            match tokio::time::timeout(Duration::from_secs(3), p).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("{}", Error::from_join("serve's state writer", e)),
                Err(_) => tracing::warn!("the last learned baselines were not written within 3 s"),
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(1500), client.close()).await;
        result
    }
}

/// Serves a board on `listen` without a broker (`/healthz` answers 503): for benchmarks
/// and for a process that feeds the board itself. Returns the bound address; serves
/// until `shutdown`.
pub async fn serve_board(
    board: Arc<Mutex<Board>>,
    listen: SocketAddr,
    shutdown: Shutdown,
) -> Result<SocketAddr, Error> {
    let listener = Listener::bind(listen, Limits::default()).await?;
    let addr = listener.local_addr();
    let mut registry = Registry::with_prefix("pumpwatch");
    registry.register_collector(Box::new(metrics::BoardCollector(board.clone())));
    let shared = Arc::new(Shared {
        board,
        registry: Arc::new(registry),
        client: Arc::new(OnceLock::new()),
        push_every: Duration::from_secs(1),
        shutdown: shutdown.clone(),
        gate: Arc::new(Gate::open()),
    });
    tokio::spawn(listener.serve(routes::router(shared), shutdown, Duration::from_secs(1)));
    Ok(addr)
}

/// The admin view's pairs: binds the queue to each declared source's `xr_<source>`
/// (`v01.speedo.client.#`). An exchange `setup` has not declared yet is tried again
/// (backoff to 30 s) without holding up the rest; once bound, the client remembers the
/// binding across reconnects.
async fn bind_pairs(client: Client, queue: String, mut sources: Vec<String>, shutdown: Shutdown) {
    let mut delay = WAIT_MIN;
    let mut told = std::collections::HashSet::new();
    while !sources.is_empty() {
        let mut left = Vec::new();
        for s in sources {
            let exchange = names::source_exchange(&s);
            let t = Topology {
                bindings: vec![crate::broker::amqp::BindingDecl::new(
                    queue.clone(),
                    exchange.clone(),
                    "v01.speedo.client.#",
                )],
                ..Topology::default()
            };
            match client.declare(&t).await {
                Ok(()) => tracing::debug!("pairs of source {s}: bound to {exchange}"),
                Err(e) => {
                    if told.insert(s.clone()) {
                        tracing::info!(
                            "pairs of source {s}: cannot bind to {exchange} yet ({}); trying again",
                            text::escape(&e.to_string())
                        );
                    }
                    left.push(s);
                }
            }
        }
        sources = left;
        if sources.is_empty() {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// Opens the state directory and loads what was learned.
fn open_state(dir: &std::path::Path) -> Result<(state::Store, board::Learning), Error> {
    let store = state::Store::open_writer(dir).map_err(|e| Error::Failed(e.to_string()))?;
    let (rows, unreadable) = store.rows(None).map_err(|e| Error::Failed(e.to_string()))?;
    let mut learning = board::Learning::default();
    let (mut clients, mut sources) = (Vec::new(), Vec::new());
    for (owner, row) in rows {
        match owner {
            state::Owner::Client => clients.push(row),
            state::Owner::Source => sources.push(row),
        }
    }
    let n = clients.len() + sources.len();
    let mut refused = learning.clients.load(clients);
    refused.extend(learning.sources.load(sources));
    if unreadable + refused.len() > 0 {
        tracing::warn!(
            "state {}: {} stored slots not loaded (first: {})",
            store.file(),
            unreadable + refused.len(),
            refused
                .first()
                .map_or("unreadable values".to_owned(), |e| text::escape(
                    &e.to_string()
                )
                .into_owned())
        );
    }
    tracing::info!(
        "state {}: {} learned slots of {} clients and {} sources loaded",
        store.file(),
        n - refused.len(),
        learning.clients.len(),
        learning.sources.len()
    );
    Ok((store, learning))
}

/// Writes what was learned every `every`, and once more at the stop. A failed write is
/// logged and its rows kept for the next try (the latest value of each slot).
async fn persist(
    store: state::Store,
    board: Arc<Mutex<Board>>,
    every: Duration,
    shutdown: Shutdown,
) {
    type Key = (state::Owner, String, u8);
    let mut store = Some(store);
    let mut pending: HashMap<Key, crate::core::baseline::Row> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let last = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
        };
        {
            let mut b = board.lock().unwrap_or_else(|p| p.into_inner());
            if last {
                // Stopping: the hour being gathered goes in too.
                b.learning.clients.settle();
                b.learning.sources.settle();
            }
            for (owner, rows) in [
                (state::Owner::Client, b.learning.clients.drain_changed()),
                (state::Owner::Source, b.learning.sources.drain_changed()),
            ] {
                for r in rows {
                    pending.insert((owner, r.name.clone(), r.hour_of_week), r);
                }
            }
        }
        let Some(mut st) = store.take() else { return };
        let rows: Vec<(state::Owner, crate::core::baseline::Row)> =
            pending.iter().map(|(k, r)| (k.0, r.clone())).collect();
        let done = tokio::task::spawn_blocking(move || {
            let r = st.write(&rows);
            (st, r)
        })
        .await;
        let (st, result) = match done {
            Ok(x) => x,
            Err(e) => {
                tracing::error!("{}", Error::from_join("serve's state writer", e));
                return;
            }
        };
        store = Some(st);
        match result {
            Ok(forget) => {
                pending.clear();
                if !forget.is_empty() {
                    let mut b = board.lock().unwrap_or_else(|p| p.into_inner());
                    for (owner, name) in forget {
                        let learned = match owner {
                            state::Owner::Client => &mut b.learning.clients,
                            state::Owner::Source => &mut b.learning.sources,
                        };
                        if learned.forget(&name) {
                            tracing::info!(
                                "baseline of {} {} reset",
                                owner.as_str(),
                                text::escape(&name)
                            );
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("learned baselines not written (tried again later): {e}"),
        }
        if last {
            return;
        }
    }
}

/// Reads the configuration file again (SIGHUP) and applies its thresholds and roles
/// (remembered logins are forgotten), and reads the TLS certificate again; a file that
/// does not parse keeps the old ones. Returns the new configuration.
fn reload(cfg: &Config, board: &Mutex<Board>, gate: &Gate) -> Option<PumpConfig> {
    if let Some(tls) = &cfg.tls {
        match tls.reload() {
            Ok(()) => tracing::info!("SIGHUP: TLS certificate read again"),
            Err(e) => tracing::warn!("SIGHUP: kept the old TLS certificate: {e}"),
        }
    }
    let Some(path) = cfg.pump.path.as_deref() else {
        tracing::warn!("SIGHUP: serve runs on built-in defaults, there is no file to read again");
        return None;
    };
    match PumpConfig::from_file(path) {
        Ok(new) => {
            board
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_thresholds(board::ThresholdSet::from_config(&new));
            gate.reload(&new);
            tracing::info!(
                "SIGHUP: thresholds and roles read again from {}",
                path.display()
            );
            Some(new)
        }
        Err(e) => {
            tracing::warn!("SIGHUP: kept the old thresholds and roles: {e}");
            None
        }
    }
}

/// SIGHUP, as a stream of wake-ups; never fires where there is none (or it cannot be
/// installed).
struct Hangup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    fn new() -> Hangup {
        #[cfg(unix)]
        {
            let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(|e| tracing::warn!("SIGHUP will not reload the thresholds: {e}"))
                .ok();
            Hangup { signal }
        }
        #[cfg(not(unix))]
        Hangup {}
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(s) = &mut self.signal {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_file_on_sighup_keeps_the_old_thresholds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pumpwatch.toml");
        std::fs::write(&path, "[thresholds.cfs]\ntd = 60\n").unwrap();
        let pump = PumpConfig::from_file(&path).unwrap();
        let common =
            Common::with_broker(pump.clone(), &BrokerUrl::parse("amqp://localhost").unwrap());
        let cfg = Config::from_args(Args::default(), &common).unwrap();
        let board = Mutex::new(Board::new(&pump, View::Admin, Duration::from_secs(60)));
        let gate = Gate::open();
        std::fs::write(&path, "[thresholds.cfs\ntd = 1\n").unwrap();
        reload(&cfg, &board, &gate);
        let td = |b: &Mutex<Board>| b.lock().unwrap().thresholds_for("cfs").td;
        assert_eq!(td(&board), Duration::from_secs(60));
        std::fs::write(&path, "[thresholds.cfs]\ntd = 5\n").unwrap();
        reload(&cfg, &board, &gate);
        assert_eq!(td(&board), Duration::from_secs(5));
    }

    #[test]
    fn auth_none_is_refused_where_others_could_look() {
        let users = PumpConfig::parse("[users.radar]\nrole = \"source\"\n", "t.toml").unwrap();
        let broker = BrokerUrl::parse("amqp://localhost").unwrap();
        let args = |listen: &str| Args {
            listen: Some(listen.into()),
            auth: Some(AuthMode::None),
            ..Args::default()
        };
        let with_users = Common::with_broker(users, &broker);
        let e = Config::from_args(args("0.0.0.0:8080"), &with_users).unwrap_err();
        assert!(e.to_string().contains("--auth none on 0.0.0.0:8080"), "{e}");
        for ok in ["127.0.0.1:8080", "[::1]:8080"] {
            let c = Config::from_args(args(ok), &with_users).unwrap();
            assert_eq!(c.gate.mode, AuthMode::None);
        }
        // A pump without users has nothing to keep apart.
        let bare = Common::with_broker(PumpConfig::default(), &broker);
        assert!(Config::from_args(args("0.0.0.0:8080"), &bare).is_ok());
        // The default is to log in.
        let c = Config::from_args(Args::default(), &with_users).unwrap();
        assert_eq!(c.gate.mode, AuthMode::Broker);
        assert!(c.gate.mgmt.is_some());
    }

    #[test]
    fn a_tls_pair_that_does_not_load_is_a_usage_error() {
        let broker = BrokerUrl::parse("amqp://localhost").unwrap();
        let common = Common::with_broker(PumpConfig::default(), &broker);
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, "not a certificate").unwrap();
        std::fs::write(&key, "").unwrap();
        let args = Args {
            tls_cert: Some(cert),
            tls_key: Some(key),
            ..Args::default()
        };
        let e = Config::from_args(args, &common).unwrap_err().to_string();
        assert!(e.starts_with("TLS ") && e.contains("c.pem"), "{e}");
    }
}
