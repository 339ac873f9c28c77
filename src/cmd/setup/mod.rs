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
//! Queue names and arguments come from [`crate::broker::names`], shared with the daemons.
//! Each neighbour (§4.8) gets `xforward_<cluster>`, its queue and a dynamic shovel to the
//! neighbour's `xs_<account>`; [`status`] (`--status`) says whether the shovels run.

pub mod broker;
pub mod desired;
pub mod plan;
pub mod sarracenia;
pub mod status;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use super::{Common, Error, UsageError};
use crate::broker::mgmt::{MgmtClient, MgmtError};
use crate::broker::url::BrokerUrl;
use crate::config::Config as FileConfig;
use crate::shutdown::Shutdown;
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
    /// Change nothing: print the state of each neighbour's shovel (running, starting,
    /// terminated: reason) and exit 1 if one is not running.
    #[arg(long, conflicts_with_all = ["dry_run", "prune"])]
    pub status: bool,
    /// The vhost to set up [default: the broker URL's, "/" if none].
    #[arg(long, value_name = "NAME")]
    pub vhost: Option<String>,
}

/// Where passwords come from (`password_env`): the process environment, or a map in tests.
pub type EnvLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Everything `setup` needs, validated: the import is read and the management client
/// built before anything is asked of the broker.
#[derive(Clone)]
pub struct Config {
    pub dry_run: bool,
    pub prune: bool,
    /// `--status`: report the shovels, change nothing.
    pub status: bool,
    pub file: FileConfig,
    pub broker: BrokerUrl,
    pub admin_url: String,
    pub mgmt: MgmtClient,
    pub import: Option<Import>,
    pub vhost: String,
    pub env: EnvLookup,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("setup::Config")
            .field("dry_run", &self.dry_run)
            .field("prune", &self.prune)
            .field("status", &self.status)
            .field("broker", &self.broker)
            .field("admin_url", &crate::broker::url::redact(&self.admin_url))
            .field("vhost", &self.vhost)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Passwords from the process environment.
    pub fn from_args(args: Args, common: &Common) -> Result<Config, UsageError> {
        Config::with_env(args, common, Arc::new(|var: &str| std::env::var(var).ok()))
    }

    /// [`from_args`](Self::from_args) with the environment lookup given, so tests (and
    /// embedders) can hand passwords in without touching the process environment.
    pub fn with_env(args: Args, common: &Common, env: EnvLookup) -> Result<Config, UsageError> {
        let vhost = match args.vhost {
            Some(v) if v.is_empty() => return Err(UsageError::new("setup: --vhost is empty")),
            Some(v) => v,
            None => common.broker.vhost().to_owned(),
        };
        let import = match &args.from_sarracenia {
            Some(dir) => Some(
                sarracenia::load(dir).map_err(|e| UsageError(SetupError::from(e).to_string()))?,
            ),
            None => None,
        };
        check_names(&common.file, import.as_ref(), common.broker.user())?;
        let mgmt = MgmtClient::from_urls(&common.admin_url, &common.broker)
            .map_err(|e| UsageError(format!("setup: {e}")))?;
        Ok(Config {
            dry_run: args.dry_run,
            prune: args.prune,
            status: args.status,
            file: common.file.clone(),
            broker: common.broker.clone(),
            admin_url: common.admin_url.clone(),
            mgmt,
            import,
            vhost,
            env,
        })
    }
}

/// Every name `setup` would put into queue names and permission patterns is
/// `[A-Za-z0-9_-]{1,64}` (SPEC §2 "Names"): with a dot, user `sat`'s anchored pattern
/// `^q_sat\..*` would match `q_sat.x.reports`, the retained queue of user `sat.x`. The
/// configuration file and the Sarracenia import refuse such names when read; this is the
/// last check before the broker is touched (a configuration built in code, and the broker
/// user, which names the daemons' queues when no feeder is declared).
fn check_names(
    file: &FileConfig,
    import: Option<&Import>,
    broker_user: &str,
) -> Result<(), UsageError> {
    use crate::config::{NAME_RULE, Role, is_valid_cluster_name, is_valid_name};
    for (key, u) in &file.users {
        if !is_valid_name(key) || u.name != *key {
            return Err(UsageError(format!(
                "setup: config {}: users.{key:?}: {NAME_RULE}",
                file.origin
            )));
        }
    }
    if let Some(import) = import {
        if let Some(bad) = import.users.keys().find(|n| !is_valid_name(n)) {
            return Err(UsageError(format!(
                "setup: --from-sarracenia: user {bad:?}: {NAME_RULE}"
            )));
        }
        if let Some(c) = import
            .cluster
            .as_deref()
            .filter(|c| !is_valid_cluster_name(c))
        {
            return Err(UsageError(format!(
                "setup: --from-sarracenia: cluster {c:?}: {}",
                crate::config::CLUSTER_RULE
            )));
        }
    }
    let feeder_declared = file.users.values().any(|u| u.role == Role::Feeder)
        || import.is_some_and(|i| i.users.values().any(|r| *r == Role::Feeder));
    if !feeder_declared && !is_valid_name(broker_user) {
        return Err(UsageError(format!(
            "setup: the broker user {broker_user:?} would name the daemons' queues (no \
             feeder is declared): {NAME_RULE}"
        )));
    }
    Ok(())
}

/// Why `setup` failed. One line; never a password.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The Sarracenia directory could not be read or parsed.
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

/// What a successful `setup` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub vhost: String,
    /// Changes applied (or, with `dry_run`, that would be).
    pub changes: usize,
    pub dry_run: bool,
}

/// `pumpwatch setup`: applies (or, with `--dry-run`, shows) the changes on stdout; with
/// `--status`, prints the shovels' states and fails when one is not running.
pub async fn run(cfg: Config, _shutdown: Shutdown) -> Result<(), Error> {
    let out = &mut std::io::stdout();
    if cfg.status {
        let found = status::status(&cfg, out)
            .await
            .map_err(|e| Error::Failed(e.to_string()))?;
        return match found.not_running() {
            0 => Ok(()),
            // The lines said which; the summary line too.
            _ => Err(Error::Exit(1)),
        };
    }
    apply(&cfg, out)
        .await
        .map(|_| ())
        .map_err(|e| Error::Failed(e.to_string()))
}

/// What the broker should hold, from the configuration, the import and the environment.
fn desired_of(cfg: &Config) -> Desired {
    Desired::build(&Inputs {
        config: &cfg.file,
        import: cfg.import.as_ref(),
        env: &*cfg.env,
        vhost: cfg.vhost.clone(),
        broker_user: cfg.broker.user().to_owned(),
        broker_host: Some(cfg.broker.host().to_owned()),
        running_user: cfg.mgmt.user().to_owned(),
        prune: cfg.prune,
    })
}

/// Plans and applies, one line of `out` per change.
pub async fn apply(cfg: &Config, out: &mut dyn Write) -> Result<Summary, SetupError> {
    let vhost = cfg.vhost.clone();
    let desired = desired_of(cfg);
    let mgmt = &cfg.mgmt;
    let actual = broker::fetch(mgmt, &cfg.admin_url, &desired)
        .await
        .map_err(SetupError::Read)?;
    let changes = plan(&desired, &actual);

    let mut applied = 0;
    let mut problems = 0;
    for change in &changes {
        if change.is_problem() {
            problems += 1;
            writeln!(out, "{}", shown(change))?;
            continue;
        }
        if cfg.dry_run {
            writeln!(out, "would {}", shown(change))?;
        } else {
            let done = broker::apply(mgmt, &vhost, change)
                .await
                .map_err(|source| SetupError::Apply {
                    change: shown(change),
                    source,
                })?;
            if let broker::Applied::Problem(text) = done {
                problems += 1;
                writeln!(out, "! {}", crate::core::text::escape(&text))?;
                continue;
            }
            writeln!(out, "{}", shown(change))?;
        }
        applied += 1;
    }
    writeln!(out, "{}", final_line(applied, problems, cfg.dry_run))?;
    out.flush()?;
    if problems > 0 {
        return Err(SetupError::Unresolved { problems });
    }
    Ok(Summary {
        vhost,
        changes: applied,
        dry_run: cfg.dry_run,
    })
}

/// A change's line. Names of objects found on the broker (queues a user declared) are
/// anybody's text: escaped, so a line stays one line and cannot drive the terminal.
fn shown(change: &Change) -> String {
    crate::core::text::escape(&change.to_string()).into_owned()
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn usage_errors_come_before_any_broker_access() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin.conf"), "declare source\n").unwrap();
        let common = Common::with_broker(FileConfig::default(), &BrokerUrl::default());
        let args = Args {
            from_sarracenia: Some(dir.path().to_owned()),
            ..Args::default()
        };
        let e = Config::from_args(args, &common).unwrap_err();
        assert!(e.to_string().contains("admin.conf:1:"), "{e}");
        let mut common = common;
        common.admin_url = "ftp://u:hunter22@h".into();
        let e = Config::from_args(Args::default(), &common).unwrap_err();
        assert!(!e.to_string().contains("hunter22"), "{e}");
        let e = Config::from_args(
            Args {
                vhost: Some(String::new()),
                ..Args::default()
            },
            &common,
        )
        .unwrap_err();
        assert!(e.to_string().contains("--vhost"), "{e}");
    }

    #[test]
    fn dotted_names_never_reach_the_broker() {
        // From admin.conf: a usage error naming the file and line.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("admin.conf"),
            "declare source sat\ndeclare source sat.x\n",
        )
        .unwrap();
        let common = Common::with_broker(FileConfig::default(), &BrokerUrl::default());
        let args = Args {
            from_sarracenia: Some(dir.path().to_owned()),
            ..Args::default()
        };
        let e = Config::from_args(args, &common).unwrap_err().to_string();
        assert!(
            e.contains("admin.conf:2:") && e.contains("\"sat.x\""),
            "{e}"
        );

        // From a configuration built in code (the file refuses it when read).
        let mut file = FileConfig::parse("[users.sat]\nrole = \"source\"\n", "t.toml").unwrap();
        let mut u = file.users["sat"].clone();
        u.name = "sat.x".into();
        file.users.insert("sat.x".into(), u);
        let common = Common::with_broker(file, &BrokerUrl::default());
        let e = Config::from_args(Args::default(), &common)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("users.\"sat.x\"") && e.contains("no dots"),
            "{e}"
        );

        // The broker user names the daemons' queues when no feeder is declared.
        let url = BrokerUrl::parse("amqp://pump.admin:pw@h/").unwrap();
        let common = Common::with_broker(FileConfig::default(), &url);
        let e = Config::from_args(Args::default(), &common)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"pump.admin\"") && e.contains("feeder"), "{e}");
        let file = FileConfig::parse("[users.feed]\nrole = \"feeder\"\n", "t.toml").unwrap();
        assert!(Config::from_args(Args::default(), &Common::with_broker(file, &url)).is_ok());
    }
}
