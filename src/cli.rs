//! What the user typed: the clap definitions. `main` turns these into each component's
//! validated `Config`; nothing here touches the network.

use crate::core::CodeRange;
use crate::simulate::FormatChoice;
use clap::{Args, Parser, Subcommand, ValueEnum};
use regex::Regex;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "pumpwatch",
    version,
    about = "Monitoring and report propagation for Sarracenia-style data pumps"
)]
pub struct Cli {
    /// TOML configuration (default: ./pumpwatch.toml if present, else built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// AMQP broker URL [default: amqp://guest:guest@127.0.0.1:5672/%2f].
    #[arg(
        long,
        global = true,
        env = "PUMPWATCH_BROKER",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub broker: Option<String>,
    /// RabbitMQ management API URL [default: http://127.0.0.1:15672, broker credentials].
    #[arg(long, global = true, value_name = "URL")]
    pub admin_url: Option<String>,
    /// More log output on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Dump reports live, with filters.
    Log(LogArgs),
    /// Publish one report.
    Report(ReportArgs),
    /// Drive a synthetic pump: publish simulated reports.
    Simulate(SimulateArgs),
    /// Validate reports and route each to its product's source (daemon).
    Route(RouteArgs),
    /// Declare the pump on the broker: users, permissions, exchanges, queues.
    Setup(crate::setup::Args),
    /// Publish speedometers (per client, per source, all) at set intervals (daemon).
    Speedo(crate::speedo::Args),
    /// Live dashboard, /api/status, /api/events, /metrics (daemon).
    Serve(crate::serve::Args),
}

#[derive(Debug, Args)]
pub struct RouteArgs {
    /// Which stage(s) to run in this process.
    #[arg(long, value_enum, default_value_t = crate::route::Stage::All)]
    pub stage: crate::route::Stage,
    /// Unacknowledged messages per stage [default: route.prefetch, 500].
    #[arg(long)]
    pub prefetch: Option<u16>,
    /// How often to log the counters.
    #[arg(long, value_parser = parse_duration, default_value = "60")]
    pub log_every: Duration,
    /// Serve /metrics (route's counters) and /healthz on this address, e.g. 127.0.0.1:9101.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
}

pub fn parse_regex(s: &str) -> Result<Regex, String> {
    Regex::new(s).map_err(|e| {
        e.to_string()
            .lines()
            .last()
            .unwrap_or("invalid regex")
            .trim()
            .to_owned()
    })
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Regex over topic, body and header values.
    #[arg(value_parser = parse_regex)]
    pub pattern: Option<Regex>,
    /// Bind to this exchange instead of xreport (admins) or xr_<user> (a source).
    #[arg(long, value_name = "NAME")]
    pub exchange: Option<String>,
    /// Only reports about this source's products.
    #[arg(long)]
    pub source: Option<String>,
    /// Only reports by this client (consumer account).
    #[arg(long)]
    pub client: Option<String>,
    /// Only reports from this consumer host.
    #[arg(long)]
    pub host: Option<String>,
    /// Only reports whose relPath matches this regex.
    #[arg(long, value_name = "REGEX", value_parser = parse_regex)]
    pub file: Option<Regex>,
    /// Only reports of this flow.
    #[arg(long)]
    pub flow: Option<String>,
    /// Only these codes: 4xx, 499, 200-299, or a comma list.
    #[arg(long, value_name = "CODES")]
    pub code: Option<CodeRange>,
    /// Only reports from or to this cluster.
    #[arg(long)]
    pub cluster: Option<String>,
    /// One JSON object per line (the normalised report).
    #[arg(long, conflicts_with = "raw")]
    pub json: bool,
    /// The message as received (exchange, topic, headers, body), one JSON object per line.
    #[arg(long)]
    pub raw: bool,
    /// Stop after printing N reports.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Stop after this long (seconds, or 5m, 1h…).
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Stop after this long without a message.
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub idle: Option<Duration>,
    /// Use a durable named queue (q_<user>.log.NAME) so a restart resumes where it stopped.
    #[arg(long, value_name = "NAME")]
    pub queue: Option<String>,
    /// Print counts (printed, filtered, skipped) on stderr at the end.
    #[arg(long)]
    pub stats: bool,
    /// Messages the broker may send before an ack.
    #[arg(long, default_value_t = 200)]
    pub prefetch: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    V02,
    V03,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The outcome code (201 downloaded, 499 failed, 102 started, …).
    #[arg(long, value_parser = clap::value_parser!(u16).range(100..=999))]
    pub code: u16,
    /// The product's relative path.
    #[arg(long)]
    pub relpath: String,
    #[arg(long, default_value = "file:/")]
    pub base_url: String,
    /// The product's source.
    #[arg(long)]
    pub source: Option<String>,
    /// The consumer account reporting (default: the broker user).
    #[arg(long)]
    pub client: Option<String>,
    /// The consumer host (default: this host's name).
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long)]
    pub message: Option<String>,
    #[arg(long)]
    pub flow: Option<String>,
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    #[arg(long, value_name = "BYTES")]
    pub size: Option<u64>,
    /// The announcement's pubTime (default: now).
    #[arg(long, value_name = "STAMP")]
    pub pub_time: Option<String>,
    #[arg(long, value_enum, default_value_t = ReportFormat::V02)]
    pub format: ReportFormat,
    /// Publish here instead of xs_<broker user>.
    #[arg(long, value_name = "NAME")]
    pub exchange: Option<String>,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
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
}
