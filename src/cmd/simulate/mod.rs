//! `pumpwatch simulate` (SPEC §4.4): a synthetic pump that publishes reports as consumers
//! would, at a target rate, always bounded by a count or a duration. The traffic comes
//! from the pure [`generate`] module; this file only paces and publishes it.

pub mod generate;

use super::{Common, Error, UsageError, parse_duration};
use crate::broker::amqp::{
    AmqpError, Client, ConnectOptions, ExchangeDecl, ExchangeKind, PendingConfirm, Topology,
};
use crate::broker::names;
use crate::broker::url::BrokerUrl;
use crate::core::CodeClass;
use crate::core::stamp::Stamp;
use crate::shutdown::Shutdown;
pub use generate::{FailingNode, FormatChoice, Generator, Plan, Sim};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

/// `pumpwatch simulate` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 2)]
    pub sources: u32,
    #[arg(long, default_value_t = 3)]
    pub clients: u32,
    #[arg(long, default_value_t = 2)]
    pub hosts: u32,
    /// Products per second (0 = as fast as the broker confirms).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Stop after this many products (default 1000 when --duration is not given either).
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this long.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Share of failed transfers (0 to 1).
    #[arg(long, default_value_t = 0.1)]
    pub error_ratio: f64,
    /// One client's own share of failed transfers, as CLIENT=RATIO (repeatable).
    #[arg(long, value_name = "CLIENT=RATIO", value_parser = parse_client_ratio)]
    pub client_error_ratio: Vec<(String, f64)>,
    #[arg(long, value_enum, default_value_t = FormatChoice::Mix)]
    pub format: FormatChoice,
    /// Publish to this exchange instead of each client's xs_<client>.
    #[arg(long, value_name = "NAME")]
    pub exchange: Option<String>,
    /// Also send a 102 (transfer started) before each outcome.
    #[arg(long)]
    pub starts: bool,
    /// Random seed, for reproducible runs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Stamp pumpwatch_client/pumpwatch_source as route would [default: when --exchange is not an xs_ exchange].
    #[arg(long)]
    pub stamp: Option<bool>,
    /// This host (node1..nodeH) starts transfers (102) and holds back their finals, then
    /// goes silent at --fail-after: what it held stays in flight for a watchdog to find.
    /// Implies --starts.
    #[arg(long, value_name = "HOST")]
    pub fail_node: Option<String>,
    /// When --fail-node goes silent, from the start [default: 10 s].
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub fail_after: Option<Duration>,
    /// This client (one of the simulated ones) stops reporting at --stop-after, as a
    /// subscriber that stopped downloading would: serve turns it CRITICAL after td.
    #[arg(long, value_name = "CLIENT")]
    pub stop_client: Option<String>,
    /// When --stop-client stops, from the start [default: 60 s].
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub stop_after: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub broker: BrokerUrl,
    pub plan: Plan,
    /// Products per second; 0 = as fast as the broker confirms.
    pub rate: f64,
    pub count: Option<u64>,
    pub duration: Option<Duration>,
    /// `--fail-node` and when it fails.
    pub fail: Option<(String, Duration)>,
    /// `--stop-client` and when it stops.
    pub stop: Option<(String, Duration)>,
}

/// What was sent: printed at the end.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub products: u64,
    pub started: u64,
    pub unroutable: u64,
    pub elapsed: Duration,
    pub by_class: BTreeMap<CodeClass, u64>,
    pub by_source: BTreeMap<String, u64>,
    pub by_client: BTreeMap<String, u64>,
    pub exchanges: BTreeSet<String>,
    /// `--fail-node`: the host, when it went silent (after the start), and the products
    /// it left in flight (their 102 sent, their final never).
    pub failed: Option<(String, Duration, Vec<Sim>)>,
    /// `--stop-client`: the client, when it stopped (after the start).
    pub stopped: Option<(String, Duration)>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let list = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            f,
            "simulate: sent {} reports (+{} started) in {:.2} s ({:.0}/s) to {}",
            self.products,
            self.started,
            secs,
            (self.products + self.started) as f64 / secs,
            self.exchanges
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        let classes: Vec<String> = self
            .by_class
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(f, "  by class:  {}", classes.join(", "))?;
        writeln!(f, "  by source: {}", list(&self.by_source))?;
        writeln!(f, "  by client: {}", list(&self.by_client))?;
        if let Some((host, after, lost)) = &self.failed {
            writeln!(
                f,
                "  {host} went silent after {:.1} s with {} transfers in flight",
                after.as_secs_f64(),
                lost.len()
            )?;
        }
        if let Some((client, after)) = &self.stopped {
            writeln!(
                f,
                "  {client} stopped reporting after {:.1} s",
                after.as_secs_f64()
            )?;
        }
        write!(f, "  unroutable (no queue bound): {}", self.unroutable)
    }
}

impl Config {
    pub fn from_args(a: Args, common: &Common) -> Result<Config, UsageError> {
        if !(0.0..=1.0).contains(&a.error_ratio) {
            return Err(UsageError(format!(
                "invalid --error-ratio {}: must be between 0 and 1",
                a.error_ratio
            )));
        }
        if !a.rate.is_finite() || a.rate < 0.0 {
            return Err(UsageError(format!(
                "invalid --rate {}: must be >= 0",
                a.rate
            )));
        }
        if a.sources == 0 || a.clients == 0 || a.hosts == 0 {
            return Err(UsageError::new(
                "--sources, --clients and --hosts must be at least 1",
            ));
        }
        let mut plan = Plan::new(a.sources, a.clients, a.hosts);
        plan.error_ratio = a.error_ratio;
        for (client, ratio) in a.client_error_ratio {
            if !plan.clients.contains(&client) {
                return Err(UsageError(format!(
                    "invalid --client-error-ratio {:?}: the simulated clients are {}",
                    crate::core::text::escape(&client),
                    plan.clients.join(", ")
                )));
            }
            plan.client_error_ratio.insert(client, ratio);
        }
        plan.format = a.format;
        plan.starts = a.starts;
        plan.seed = a.seed;
        // Past route (e.g. straight into xreport) nobody else would stamp the reports.
        plan.stamp = a.stamp.unwrap_or_else(|| {
            a.exchange
                .as_deref()
                .is_some_and(|x| names::exchange_owner(x).is_none())
        });
        if let Some(x) = &a.exchange {
            super::check_object_name("--exchange", x)?;
        }
        plan.exchange = a.exchange;
        let fail = match (a.fail_node, a.fail_after) {
            (Some(host), after) => {
                if !plan.hosts.contains(&host) {
                    return Err(UsageError(format!(
                        "invalid --fail-node {:?}: the simulated hosts are {}",
                        crate::core::text::escape(&host),
                        plan.hosts.join(", ")
                    )));
                }
                plan.starts = true;
                plan.fail_node = Some(host.clone());
                Some((host, after.unwrap_or(Duration::from_secs(10))))
            }
            (None, Some(_)) => {
                return Err(UsageError::new("--fail-after needs --fail-node HOST"));
            }
            (None, None) => None,
        };
        let stop = match (a.stop_client, a.stop_after) {
            (Some(client), after) => {
                if !plan.clients.contains(&client) {
                    return Err(UsageError(format!(
                        "invalid --stop-client {:?}: the simulated clients are {}",
                        crate::core::text::escape(&client),
                        plan.clients.join(", ")
                    )));
                }
                Some((client, after.unwrap_or(Duration::from_secs(60))))
            }
            (None, Some(_)) => {
                return Err(UsageError::new("--stop-after needs --stop-client CLIENT"));
            }
            (None, None) => None,
        };
        Ok(Config {
            broker: common.broker.clone(),
            plan,
            rate: a.rate,
            count: a.count,
            duration: a.duration,
            fail,
            stop,
        })
    }
}

/// `CLIENT=RATIO`, the ratio between 0 and 1.
fn parse_client_ratio(s: &str) -> Result<(String, f64), String> {
    let (client, ratio) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not CLIENT=RATIO"))?;
    let ratio: f64 = ratio
        .parse()
        .map_err(|_| format!("{ratio:?} is not a number"))?;
    if !(0.0..=1.0).contains(&ratio) {
        return Err(format!("{ratio} is not between 0 and 1"));
    }
    Ok((client.to_owned(), ratio))
}

/// Confirms kept in flight before waiting for the oldest.
const WINDOW: usize = 2_000;

/// `pumpwatch simulate`: sends, then prints what it sent.
pub async fn run(cfg: Config, shutdown: Shutdown) -> Result<(), Error> {
    let summary = send(cfg, shutdown).await?;
    println!("{summary}");
    Ok(())
}

/// Publishes the simulated traffic; returns what was sent.
pub async fn send(cfg: Config, shutdown: Shutdown) -> Result<Summary, AmqpError> {
    let exchanges: BTreeSet<String> = match &cfg.plan.exchange {
        Some(x) => [x.clone()].into(),
        None => cfg
            .plan
            .clients
            .iter()
            .map(|c| names::user_exchange(c))
            .collect(),
    };
    let topology = Topology {
        exchanges: exchanges
            .iter()
            .map(|name| ExchangeDecl {
                name: name.clone(),
                kind: ExchangeKind::Topic,
                durable: true,
            })
            .collect(),
        ..Topology::default()
    };
    let opts = ConnectOptions {
        name: "pumpwatch simulate".into(),
        topology,
        ..ConnectOptions::default()
    };
    let client = Client::connect(&cfg.broker, opts).await?;
    // Bounded always: with neither limit given, 1 000 products.
    let count = match (cfg.count, cfg.duration) {
        (None, None) => Some(1_000),
        (c, _) => c,
    };
    let mut generator = Generator::new(cfg.plan.clone());
    let mut summary = Summary {
        exchanges,
        ..Summary::default()
    };
    let mut pending: VecDeque<PendingConfirm> = VecDeque::with_capacity(WINDOW);
    let mut failing = cfg.fail.as_ref().map(|(h, _)| FailingNode::new(h));
    // Products made, sent or not (a failed node's are not): what --count and --rate count.
    let mut made = 0u64;
    let start = Instant::now();
    let tstart = tokio::time::Instant::now();
    let mut result = Ok(());
    while count.is_none_or(|c| made < c) && cfg.duration.is_none_or(|d| start.elapsed() < d) {
        if shutdown.is_cancelled() {
            break;
        }
        if cfg.rate > 0.0 {
            let due = tstart + Duration::from_secs_f64(made as f64 / cfg.rate);
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        let mut sims = generator.next_product(now());
        made += 1;
        if let (Some(f), Some((_, after))) = (failing.as_mut(), &cfg.fail) {
            if !f.has_failed() && start.elapsed() >= *after {
                f.fail();
                summary.failed = Some((f.host.clone(), start.elapsed(), f.lost.clone()));
            }
            sims = f.pass(sims);
        }
        if let Some((client, after)) = &cfg.stop
            && start.elapsed() >= *after
        {
            // The product is still made (the rate and --count are the pump's), but the
            // stopped client reports nothing of it.
            if summary.stopped.is_none() {
                summary.stopped = Some((client.clone(), start.elapsed()));
            }
            sims.retain(|s| s.client != *client);
        }
        for sim in sims {
            match client.publish(&sim.exchange, &sim.out).await {
                Ok(p) => pending.push_back(p),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            if sim.code == crate::core::code::STARTED {
                summary.started += 1;
            } else {
                summary.products += 1;
                *summary.by_class.entry(CodeClass::of(sim.code)).or_default() += 1;
                *summary.by_source.entry(sim.source).or_default() += 1;
                *summary.by_client.entry(sim.client).or_default() += 1;
            }
        }
        if result.is_err() {
            break;
        }
        while pending.len() >= WINDOW {
            if let Some(p) = pending.pop_front() {
                settle(p.wait().await, &mut summary, &mut result);
            }
        }
        if result.is_err() {
            break;
        }
    }
    for p in pending {
        settle(p.wait().await, &mut summary, &mut result);
    }
    summary.elapsed = start.elapsed();
    client.close().await;
    result.map(|()| summary)
}

/// An unroutable report is counted (nobody listens on that exchange yet); any other
/// failure to confirm ends the run with that error.
fn settle(r: Result<(), AmqpError>, summary: &mut Summary, result: &mut Result<(), AmqpError>) {
    match r {
        Ok(()) => {}
        Err(AmqpError::Unroutable { .. }) => summary.unroutable += 1,
        Err(e) => {
            if result.is_ok() {
                *result = Err(e);
            }
        }
    }
}

fn now() -> Stamp {
    Stamp(jiff::Timestamp::now())
}
