//! `pumpwatch setup` (SPEC §4.1): make the broker match the declared pump — users with
//! their tags, passwords and anchored permissions (§3), the pump's exchanges, and the
//! durable queues and bindings the daemons consume from — through the management API.
//!
//! Why a plan: `setup` is run again and again (after every config change, by hand or
//! from configuration management), so it must be idempotent, show what it would do
//! (`--dry-run`) and refuse clearly what it cannot do (a queue with other arguments
//! cannot be redeclared). The shape is ripgrep's two stages and mini-redis's pure core:
//! [`desired`] computes the target from the configuration, [`broker::fetch`] reads the
//! broker, [`plan::plan`] (pure) lists the differences, and only then are they applied,
//! one line of output per change. Problems are reported as `!` lines and turn into a
//! non-zero exit once everything else has been applied.
//!
//! Queue names and arguments come from [`crate::names`], shared with the daemons.
//! The §4.8 shovels (`xforward_<cluster>`, its queue and the dynamic shovel) are the
//! next step: see the marks in [`desired::Desired`] and [`plan::plan`].

pub mod broker;
pub mod desired;
pub mod plan;
pub mod sarracenia;

use std::io::Write;
use std::path::PathBuf;

use percent_encoding::percent_decode_str;

use crate::config::Config;
use crate::mgmt::{MgmtClient, MgmtError, redact_url};
pub use desired::{Desired, Inputs};
pub use plan::{Actual, Change, plan};
pub use sarracenia::{Import, ImportError};

/// `pumpwatch setup` options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Print what would change and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also remove what is no longer declared: users (never guest, the user running
    /// setup or the broker URL's), x* exchanges, and the retained q_<source>.reports
    /// queues of sources that are gone.
    #[arg(long)]
    pub prune: bool,
    /// Import users, roles, passwords and the cluster name from a Sarracenia config
    /// directory (admin.conf, default.conf, credentials.conf); the config wins on
    /// conflicts.
    #[arg(long, value_name = "DIR")]
    pub from_sarracenia: Option<PathBuf>,
    /// The vhost to set up [default: the broker URL's, "/" if none].
    #[arg(long, value_name = "NAME")]
    pub vhost: Option<String>,
}

/// Why `setup` failed. One line; never a password.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The broker URL, admin URL or vhost cannot be used (exit 2).
    #[error("setup: {0}")]
    Usage(String),
    /// The Sarracenia directory could not be read or parsed (exit 2).
    #[error("setup: --from-sarracenia: {0}")]
    Import(#[from] ImportError),
    /// The broker could not be read.
    #[error("setup: reading the broker: {0}")]
    Read(MgmtError),
    /// A change failed; the ones printed before it were applied.
    #[error("setup: {change}: {source}")]
    Apply {
        /// The change's line (`+ queue q_radar.reports (max 1000)`).
        change: String,
        source: MgmtError,
    },
    /// Everything else was applied, but `problems` `!` lines need the operator.
    #[error(
        "setup: {problems} problem{} left (the lines starting with '!')",
        plural_s(*.problems)
    )]
    Unresolved { problems: usize },
    #[error("setup: cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

fn plural_s(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

impl SetupError {
    /// True for bad arguments, configuration or import (exit 2); false for broker and
    /// runtime failures and unresolved problems (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, SetupError::Usage(_) | SetupError::Import(_))
    }
}

/// What a successful `setup` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub vhost: String,
    /// Changes applied (or, with `dry_run`, that would be).
    pub changes: usize,
    pub dry_run: bool,
}

/// The subcommand: passwords come from the environment (`password_env`) or the
/// Sarracenia `credentials.conf`.
pub async fn main(
    args: Args,
    config: &Config,
    broker_url: &str,
    admin_url: &str,
    out: &mut dyn Write,
) -> Result<Summary, SetupError> {
    let env = |var: &str| std::env::var(var).ok();
    run(&args, config, broker_url, admin_url, &env, out).await
}

/// [`main`] with the environment lookup given, so tests (and embedders) can hand
/// passwords in without touching the process environment.
pub async fn run(
    args: &Args,
    config: &Config,
    broker_url: &str,
    admin_url: &str,
    env: &dyn Fn(&str) -> Option<String>,
    out: &mut dyn Write,
) -> Result<Summary, SetupError> {
    let vhost = match &args.vhost {
        Some(v) if v.is_empty() => return Err(SetupError::Usage("--vhost is empty".into())),
        Some(v) => v.clone(),
        None => vhost_of(broker_url)?,
    };
    let import = match &args.from_sarracenia {
        Some(dir) => Some(sarracenia::load(dir)?),
        None => None,
    };
    let mgmt = MgmtClient::from_urls(admin_url, broker_url).map_err(usage_or_read)?;
    let parsed = url::Url::parse(broker_url).ok();
    let desired = Desired::build(&Inputs {
        config,
        import: import.as_ref(),
        env,
        vhost: vhost.clone(),
        broker_user: crate::log::broker_user(broker_url),
        broker_host: parsed.and_then(|u| u.host_str().map(str::to_owned)),
        running_user: mgmt.user().to_owned(),
        prune: args.prune,
    });
    let actual = broker::fetch(&mgmt, admin_url, &desired)
        .await
        .map_err(usage_or_read)?;
    let changes = plan(&desired, &actual);

    let mut applied = 0;
    let mut problems = 0;
    for change in &changes {
        if change.is_problem() {
            problems += 1;
            writeln!(out, "{change}")?;
            continue;
        }
        if args.dry_run {
            writeln!(out, "would {change}")?;
        } else {
            broker::apply(&mgmt, &vhost, change)
                .await
                .map_err(|source| SetupError::Apply {
                    change: change.to_string(),
                    source,
                })?;
            writeln!(out, "{change}")?;
        }
        applied += 1;
    }
    writeln!(out, "{}", final_line(applied, problems, args.dry_run))?;
    out.flush()?;
    if problems > 0 {
        return Err(SetupError::Unresolved { problems });
    }
    Ok(Summary {
        vhost,
        changes: applied,
        dry_run: args.dry_run,
    })
}

/// `setup: 12 changes`, `setup: would make 3 changes`, `setup: no change (...)`.
fn final_line(changes: usize, problems: usize, dry_run: bool) -> String {
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    let mut line = match (changes, dry_run) {
        (0, _) if problems == 0 => return "setup: no change (broker matches the topology)".into(),
        (0, _) => "setup: no change".to_owned(),
        (n, true) => format!("setup: would make {}", plural(n, "change")),
        (n, false) => format!("setup: {}", plural(n, "change")),
    };
    if problems > 0 {
        line.push_str(&format!(", {} (see '!')", plural(problems, "problem")));
    }
    line
}

/// The vhost of an AMQP URL, percent-decoded: `amqp://h/%2f` and `amqp://h` are `/`.
pub fn vhost_of(broker_url: &str) -> Result<String, SetupError> {
    let url = url::Url::parse(broker_url).map_err(|e| {
        SetupError::Usage(format!(
            "invalid broker URL {}: {e}",
            redact_url(broker_url)
        ))
    })?;
    let path = url.path().strip_prefix('/').unwrap_or(url.path());
    if path.is_empty() {
        return Ok("/".to_owned());
    }
    percent_decode_str(path)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| {
            SetupError::Usage(format!(
                "invalid broker URL {}: the vhost is not UTF-8",
                redact_url(broker_url)
            ))
        })
}

/// A URL or name the management client refused is a usage error; anything else is
/// the broker's.
fn usage_or_read(e: MgmtError) -> SetupError {
    match e {
        MgmtError::InvalidUrl { .. } | MgmtError::InvalidName { .. } => {
            SetupError::Usage(e.to_string())
        }
        e => SetupError::Read(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhost_from_the_broker_url() {
        let table = [
            ("amqp://guest:guest@127.0.0.1:5672/%2f", "/"),
            ("amqp://h:5672/%2F", "/"),
            ("amqp://h", "/"),
            ("amqp://h/", "/"),
            ("amqp://u:p@h/pump", "pump"),
            ("amqp://h/a%20b%2Fc", "a b/c"),
        ];
        for (url, want) in table {
            assert_eq!(vhost_of(url).unwrap(), want, "{url}");
        }
        let e = vhost_of("amqp://u:hunter22@[bad/").unwrap_err();
        assert!(e.is_usage() && !e.to_string().contains("hunter22"), "{e}");
    }

    #[test]
    fn final_lines() {
        let table = [
            (
                0,
                0,
                false,
                "setup: no change (broker matches the topology)",
            ),
            (0, 0, true, "setup: no change (broker matches the topology)"),
            (1, 0, false, "setup: 1 change"),
            (12, 0, false, "setup: 12 changes"),
            (3, 0, true, "setup: would make 3 changes"),
            (2, 1, false, "setup: 2 changes, 1 problem (see '!')"),
            (0, 2, false, "setup: no change, 2 problems (see '!')"),
        ];
        for (changes, problems, dry, want) in table {
            assert_eq!(final_line(changes, problems, dry), want);
        }
    }

    #[test]
    fn errors_are_one_line_and_classified() {
        let usage = [
            SetupError::Usage("bad".into()),
            SetupError::Import(ImportError::Syntax {
                file: "admin.conf".into(),
                line: 3,
                reason: "x".into(),
            }),
        ];
        for e in usage {
            assert!(e.is_usage(), "{e}");
        }
        let e = SetupError::Unresolved { problems: 1 };
        assert!(!e.is_usage());
        assert_eq!(
            e.to_string(),
            "setup: 1 problem left (the lines starting with '!')"
        );
        let e = usage_or_read(MgmtError::InvalidUrl {
            url: "x".into(),
            reason: "y".into(),
        });
        assert!(e.is_usage());
    }

    #[tokio::test]
    async fn usage_errors_come_before_any_broker_access() {
        let config = Config::default();
        let env = |_: &str| None;
        let mut out = Vec::new();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin.conf"), "declare source\n").unwrap();
        let args = Args {
            from_sarracenia: Some(dir.path().to_owned()),
            ..Args::default()
        };
        // An admin URL nobody listens on: the import error comes first.
        let e = run(
            &args,
            &config,
            "amqp://h/",
            "http://127.0.0.1:1",
            &env,
            &mut out,
        )
        .await
        .unwrap_err();
        assert!(
            e.is_usage() && e.to_string().contains("admin.conf:1:"),
            "{e}"
        );
        let e = run(
            &Args::default(),
            &config,
            "amqp://h/",
            "ftp://h",
            &env,
            &mut out,
        )
        .await
        .unwrap_err();
        assert!(e.is_usage(), "{e}");
        assert!(out.is_empty());
    }
}
