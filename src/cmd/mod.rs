//! The subcommands. Every one is a folder with the same face:
//!
//! - `Args`: its clap flags (what the user typed);
//! - `Config::from_args(args, &Common) -> Result<Config, UsageError>`: every check and
//!   default in one place, so a bad value is refused before anything is connected;
//! - `run(config, shutdown) -> Result<(), Error>`: does the work until done or `shutdown`.
//!
//! [`Common`] is what every command gets besides its own flags (the configuration file and
//! the global options, resolved); [`Error`] is the one error type whose
//! [`exit_code`](Error::exit_code) decides the exit status, the same for the same failure
//! in every command. `main` is one match over [`Command`].

pub mod archive;
pub mod baseline;
pub mod check;
pub mod demo;
pub mod inflight;
pub mod log;
pub mod report;
pub mod route;
pub mod serve;
pub mod setup;
pub mod simulate;
pub mod speedo;
pub mod trace;
pub mod watchdog;

use crate::broker::amqp::AmqpError;
use crate::broker::mgmt::MgmtError;
use crate::broker::url::BrokerUrl;
use crate::config::{self, Config as FileConfig};
use crate::shutdown::Shutdown;
use clap::{Parser, Subcommand};
use regex::Regex;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "pumpwatch",
    version = crate::LONG_VERSION,
    about = "Monitoring and report propagation for Sarracenia-style data pumps"
)]
pub struct Cli {
    /// TOML configuration (default: ./pumpwatch.toml if present, else built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// AMQP broker URL (default: amqp://guest:guest@127.0.0.1:5672/%2f).
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
    /// Log lines on stderr as text, or as one JSON object per line (for journald or a
    /// log shipper).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "PUMPWATCH_LOG_FORMAT",
        default_value_t = LogFormat::Text,
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Dump reports live, with filters.
    Log(log::Args),
    /// Publish one report.
    Report(report::Args),
    /// Drive a synthetic pump: publish simulated reports.
    Simulate(simulate::Args),
    /// Validate reports and route each to its product's source (daemon).
    Route(route::Args),
    /// Declare the pump on the broker: users, permissions, exchanges, queues.
    Setup(setup::Args),
    /// Publish speedometers (per client, per source, all) at set intervals (daemon).
    Speedo(speedo::Args),
    /// Live dashboard, /api/status, /api/events, /api/check, /metrics (daemon).
    Serve(serve::Args),
    /// Keep every report in hourly files, compressed and indexed (daemon).
    Archive(archive::Args),
    /// Search the archive: each matching product's life across pumps.
    Trace(trace::Args),
    /// Nagios plugin: ask serve, print one status line, exit 0/1/2/3.
    Check(check::Args),
    /// Show or reset the expected rates serve learned (--state-dir).
    Baseline(baseline::Args),
    /// What every node has in flight; announce and repost what a failed node held (daemon).
    Watchdog(watchdog::Args),
    /// Ask the watchdog what is in flight, per node.
    Inflight(inflight::Args),
    /// A whole simulated pump in one process: every daemon, the dashboard, and the
    /// commands to try against it (Ctrl-C stops and removes it).
    Demo(demo::Args),
}

impl Command {
    /// Long-running services log what they do at info; one-shot commands only warn.
    pub fn is_daemon(&self) -> bool {
        matches!(
            self,
            Command::Route(_)
                | Command::Speedo(_)
                | Command::Serve(_)
                | Command::Archive(_)
                | Command::Watchdog(_)
        )
    }

    /// Validates the flags against `common`, then runs the command until it is done or
    /// `shutdown` is cancelled.
    pub async fn run(self, common: &Common, shutdown: Shutdown) -> Result<(), Error> {
        match self {
            Command::Log(a) => log::run(log::Config::from_args(a, common)?, shutdown).await,
            Command::Report(a) => {
                report::run(report::Config::from_args(a, common)?, shutdown).await
            }
            Command::Simulate(a) => {
                simulate::run(simulate::Config::from_args(a, common)?, shutdown).await
            }
            Command::Route(a) => route::run(route::Config::from_args(a, common)?, shutdown).await,
            Command::Setup(a) => setup::run(setup::Config::from_args(a, common)?, shutdown).await,
            Command::Speedo(a) => {
                speedo::run(speedo::Config::from_args(a, common)?, shutdown).await
            }
            Command::Serve(a) => serve::run(serve::Config::from_args(a, common)?, shutdown).await,
            Command::Archive(a) => {
                archive::run(archive::Config::from_args(a, common)?, shutdown).await
            }
            Command::Trace(a) => trace::run(trace::Config::from_args(a, common)?, shutdown).await,
            // A plugin answers every problem with its own UNKNOWN line, exit 3.
            Command::Check(a) => match check::Config::from_args(a, common) {
                Ok(c) => check::run(c, shutdown).await,
                Err(e) => check::print_exit(check::unknown(e)),
            },
            Command::Baseline(a) => {
                baseline::run(baseline::Config::from_args(a, common)?, shutdown).await
            }
            Command::Watchdog(a) => {
                watchdog::run(watchdog::Config::from_args(a, common)?, shutdown).await
            }
            Command::Inflight(a) => {
                inflight::run(inflight::Config::from_args(a, common)?, shutdown).await
            }
            Command::Demo(a) => demo::run(demo::Config::from_args(a, common)?, shutdown).await,
        }
    }
}

/// What every subcommand gets besides its own flags: the configuration file and the
/// global options, resolved (flag, else environment, else file, else default).
#[derive(Debug, Clone)]
pub struct Common {
    /// `-v` as many times as given (logging; `check` prints its offenders).
    pub verbose: u8,
    pub file: FileConfig,
    pub broker: BrokerUrl,
    /// The management API (`http://host:15672`); its credentials default to the broker's.
    pub admin_url: String,
}

impl Common {
    /// From the global flags: loads the configuration and parses the broker URL.
    pub fn from_cli(cli: &Cli) -> Result<Common, UsageError> {
        let file =
            FileConfig::load(cli.config.as_deref()).map_err(|e| UsageError(e.to_string()))?;
        let mut c = Common::new(file, cli.broker.as_deref(), cli.admin_url.as_deref())?;
        c.verbose = cli.verbose;
        Ok(c)
    }

    /// `broker`/`admin_url` override the file's; `None` takes the file's or the default.
    pub fn new(
        file: FileConfig,
        broker: Option<&str>,
        admin_url: Option<&str>,
    ) -> Result<Common, UsageError> {
        let text = broker
            .or(file.broker.as_deref())
            .unwrap_or(config::DEFAULT_BROKER);
        let broker = BrokerUrl::parse(text).map_err(|e| UsageError(e.to_string()))?;
        let admin_url = admin_url
            .or(file.admin_url.as_deref())
            .unwrap_or(config::DEFAULT_ADMIN_URL)
            .to_owned();
        Ok(Common {
            verbose: 0,
            file,
            broker,
            admin_url,
        })
    }

    /// For tests and embedders: `file` with `broker`, the default management API.
    pub fn with_broker(file: FileConfig, broker: &BrokerUrl) -> Common {
        Common {
            verbose: 0,
            admin_url: file
                .admin_url
                .clone()
                .unwrap_or_else(|| config::DEFAULT_ADMIN_URL.to_owned()),
            file,
            broker: broker.clone(),
        }
    }
}

/// Bad arguments or configuration: exit 2, before anything was done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl UsageError {
    pub fn new(text: impl Into<String>) -> Self {
        UsageError(text.into())
    }
}

/// Why a command failed. [`exit_code`](Error::exit_code): 2 for [`Error::Usage`], 1 for
/// everything that happened while running. One line, never a password.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(#[from] UsageError),
    #[error("{0}")]
    Broker(#[from] AmqpError),
    #[error("{0}")]
    Mgmt(#[from] MgmtError),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    /// A task of a daemon panicked or was aborted: the daemon stopped.
    #[error("{0} stopped unexpectedly: {1}")]
    Task(&'static str, String),
    /// Any other failure while running, with its own one-line text.
    #[error("{0}")]
    Failed(String),
    /// The command printed its own result (a plugin's state): exit with this status,
    /// saying nothing more.
    #[error("exit status {0}")]
    Exit(u8),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            Error::Exit(code) => *code,
            _ => 1,
        }
    }

    /// A joined task's failure (panic or abort) as an error naming the task.
    pub fn from_join(task: &'static str, e: tokio::task::JoinError) -> Error {
        let why = if e.is_panic() {
            "it panicked".to_owned()
        } else {
            "it was aborted".to_owned()
        };
        Error::Task(task, why)
    }
}

/// The tasks of a daemon, supervised: the first that fails, panics or is aborted cancels
/// `shutdown` (so the others stop too) and is the daemon's error. A daemon never goes on
/// with a dead task, and never exits 0 after one died.
pub struct Tasks {
    set: tokio::task::JoinSet<Result<(), Error>>,
    shutdown: Shutdown,
    name: &'static str,
}

impl Tasks {
    pub fn new(name: &'static str, shutdown: &Shutdown) -> Tasks {
        Tasks {
            set: tokio::task::JoinSet::new(),
            shutdown: shutdown.clone(),
            name,
        }
    }

    pub fn spawn<F>(&mut self, task: F)
    where
        F: std::future::Future<Output = Result<(), Error>> + Send + 'static,
    {
        self.set.spawn(task);
    }

    /// Waits for every task; the first error (or panic) cancels the rest.
    pub async fn join(mut self) -> Result<(), Error> {
        let mut result = Ok(());
        while let Some(done) = self.set.join_next().await {
            let failed = match done {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(e) => Error::from_join(self.name, e),
            };
            tracing::error!("{}: {failed}", self.name);
            self.shutdown.cancel();
            if result.is_ok() {
                result = Err(failed);
            }
        }
        result
    }
}

/// The report filters `log` and `archive` share (SPEC §4.3), as flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FilterArgs {
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
    pub code: Option<crate::core::CodeRange>,
    /// Only reports from or to this cluster.
    #[arg(long)]
    pub cluster: Option<String>,
}

impl FilterArgs {
    /// `filter` with every flag given replacing its field.
    pub fn over(self, mut filter: crate::core::filter::Filter) -> crate::core::filter::Filter {
        let strings = [
            (&mut filter.source, self.source),
            (&mut filter.client, self.client),
            (&mut filter.host, self.host),
            (&mut filter.flow, self.flow),
            (&mut filter.cluster, self.cluster),
        ];
        for (slot, v) in strings {
            if v.is_some() {
                *slot = v;
            }
        }
        if self.code.is_some() {
            filter.code = self.code;
        }
        if self.file.is_some() {
            filter.file = self.file;
        }
        filter
    }
}

/// A regex flag value; the error is the last line of regex's explanation.
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

/// A duration flag value (`300`, `0.5`, `5m`, `1h 30m`, `PT5M`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
}

/// An exchange or queue name given on the command line: 1 to 255 bytes (an AMQP short
/// string), so a name the protocol cannot carry is a usage error (exit 2), not a failure
/// half-way through connecting.
pub fn check_object_name(flag: &str, name: &str) -> Result<(), UsageError> {
    let max = crate::broker::amqp::MAX_SHORT;
    if name.is_empty() || name.len() > max {
        return Err(UsageError(format!(
            "invalid {flag}: the name is {} bytes, AMQP allows 1 to {max}",
            name.len()
        )));
    }
    Ok(())
}

/// A `--listen` address: checked here so a typo is a usage error, not a runtime one.
pub fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?} is not a host:port address ({e})"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicked_task_stops_the_others_and_is_an_error() {
        let stop = Shutdown::new();
        let mut tasks = Tasks::new("test daemon", &stop);
        let s = stop.clone();
        tasks.spawn(async move {
            s.cancelled().await;
            Ok(())
        });
        tasks.spawn(async { panic!("boom") });
        let e = tasks.join().await.unwrap_err();
        assert!(stop.is_cancelled());
        assert_eq!(e.exit_code(), 1);
        assert_eq!(
            e.to_string(),
            "test daemon stopped unexpectedly: it panicked"
        );
    }

    #[tokio::test]
    async fn a_failed_task_is_the_error_and_clean_ends_are_ok() {
        let stop = Shutdown::new();
        let mut tasks = Tasks::new("d", &stop);
        tasks.spawn(async { Ok(()) });
        assert!(tasks.join().await.is_ok());
        let mut tasks = Tasks::new("d", &stop);
        tasks.spawn(async { Err(Error::Failed("lost".into())) });
        assert_eq!(tasks.join().await.unwrap_err().to_string(), "lost");
    }

    #[test]
    fn object_names_fit_a_short_string() {
        assert!(check_object_name("--exchange", "xreport").is_ok());
        assert!(check_object_name("--exchange", &"€".repeat(85)).is_ok());
        for bad in [String::new(), "€".repeat(100), "x".repeat(256)] {
            let e = check_object_name("--exchange", &bad)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("invalid --exchange: the name is"), "{e}");
        }
    }

    #[test]
    fn exit_codes_are_decided_once() {
        assert_eq!(Error::Usage(UsageError::new("x")).exit_code(), 2);
        for e in [
            Error::Failed("x".into()),
            Error::Listen {
                addr: "a".into(),
                reason: "b".into(),
            },
            Error::Broker(AmqpError::Nacked),
        ] {
            assert_eq!(e.exit_code(), 1, "{e}");
        }
    }
}
