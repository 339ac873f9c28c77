//! `pumpwatch demo` (SPEC §4.11): the whole system in one process, nothing else to set up.
//! It makes its own vhost on the broker (the management API of `--broker`'s host), runs
//! `setup` into it, then `route`, `speedo`, `serve`, `watchdog` and `archive` in-process
//! (each one's own `run(config, shutdown)`, as `main` would run it) with `simulate`
//! feeding a realistic pump: three sources, four clients on four nodes, a tenth of the
//! transfers failing, one client that stops reporting after a minute and one node that
//! fails with transfers in flight. It prints the dashboard's URL and the exact commands to
//! try against it. SIGINT (or SIGTERM) stops everything within [`STOP_BUDGET`], then
//! removes the vhost, the users it made and its temporary directory, unless `--keep`.
//!
//! What the demo sets up is pure ([`plan`]); this file only runs it.

pub mod plan;

use super::{Common, Error, Tasks, UsageError, parse_duration, parse_listen};
use crate::broker::mgmt::MgmtClient;
use crate::broker::url::BrokerUrl;
use crate::cmd::{archive, route, serve, setup, simulate, speedo, watchdog};
use crate::config::{self, Config as FileConfig};
use crate::shutdown::Shutdown;
use plan::{Banner, Layout};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `pumpwatch demo` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The vhost the demo makes for itself (and removes at the end).
    #[arg(long, default_value = "pwdemo", value_name = "NAME")]
    pub vhost: String,
    /// The dashboard's address (serve); port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: String,
    /// The watchdog's address (/api/inflight, /metrics); port 0 picks a free one.
    #[arg(long, default_value = config::DEFAULT_WATCHDOG_LISTEN, value_name = "ADDR")]
    pub watchdog_listen: String,
    /// route's /metrics; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:9101", value_name = "ADDR")]
    pub route_listen: String,
    /// archive's /metrics; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:9102", value_name = "ADDR")]
    pub archive_listen: String,
    /// Where the configuration, the archive and the watchdog's state go [default: a new
    /// temporary directory, removed at the end unless --keep].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Products per second the simulated pump moves.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// How long the simulation runs; the daemons run on until Ctrl-C.
    #[arg(long, default_value = "1h", value_parser = parse_duration, value_name = "SECS")]
    pub duration: Duration,
    /// When the client dfo stops reporting.
    #[arg(long, default_value = "60", value_parser = parse_duration, value_name = "SECS")]
    pub stop_after: Duration,
    /// When the node node4 fails, holding transfers.
    #[arg(long, default_value = "90", value_parser = parse_duration, value_name = "SECS")]
    pub fail_after: Duration,
    /// speedo's interval (the page moves at this pace).
    #[arg(long, default_value = "5", value_parser = parse_duration, value_name = "SECS")]
    pub speedo_interval: Duration,
    /// Leave the vhost, its users and the directory in place at the end.
    #[arg(long)]
    pub keep: bool,
}

/// Everything the demo needs, validated; nothing is touched yet.
#[derive(Debug, Clone)]
pub struct Config {
    /// The broker as given (`--broker`), whose vhost the demo replaces with its own.
    pub broker: BrokerUrl,
    pub admin_url: String,
    pub vhost: String,
    pub listen: SocketAddr,
    pub watchdog_listen: SocketAddr,
    pub route_listen: SocketAddr,
    pub archive_listen: SocketAddr,
    pub dir: Option<PathBuf>,
    pub rate: f64,
    pub duration: Duration,
    pub stop_after: Duration,
    pub fail_after: Duration,
    pub speedo_interval: Duration,
    pub keep: bool,
}

/// How long a stop may take before what is left is abandoned (the vhost is removed
/// anyway); the whole stop, cleanup included, stays under 10 s.
pub const STOP_BUDGET: Duration = Duration::from_secs(7);

impl Config {
    pub fn from_args(a: Args, common: &Common) -> Result<Config, UsageError> {
        if a.vhost.is_empty() || a.vhost.len() > 255 {
            return Err(UsageError::new("invalid --vhost: 1 to 255 bytes"));
        }
        if a.vhost == "/" {
            return Err(UsageError::new(
                "invalid --vhost /: the demo removes its vhost at the end; give it one of its own",
            ));
        }
        let addr = |flag: &str, v: &str| {
            parse_listen(v).map_err(|e| UsageError(format!("invalid --{flag}: {e}")))
        };
        if !a.rate.is_finite() || a.rate <= 0.0 {
            return Err(UsageError(format!(
                "invalid --rate {}: must be > 0",
                a.rate
            )));
        }
        if a.speedo_interval < Duration::from_secs(1) {
            return Err(UsageError::new("invalid --speedo-interval: at least 1 s"));
        }
        // The management API of the broker the demo was pointed at, unless told.
        let admin_url = if common.admin_url == config::DEFAULT_ADMIN_URL
            && !is_loopback(common.broker.host())
        {
            let host = common.broker.host();
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.to_owned()
            };
            format!("http://{host}:15672")
        } else {
            common.admin_url.clone()
        };
        Ok(Config {
            broker: common.broker.clone(),
            admin_url,
            vhost: a.vhost,
            listen: addr("listen", &a.listen)?,
            watchdog_listen: addr("watchdog-listen", &a.watchdog_listen)?,
            route_listen: addr("route-listen", &a.route_listen)?,
            archive_listen: addr("archive-listen", &a.archive_listen)?,
            dir: a.dir,
            rate: a.rate,
            duration: a.duration,
            stop_after: a.stop_after,
            fail_after: a.fail_after,
            speedo_interval: a.speedo_interval,
            keep: a.keep,
        })
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Port 0 becomes a free port now, so that the configuration, the banner and the daemon
/// agree on it. (Another process could take it before the daemon binds; the daemon then
/// fails to listen and the demo stops with that error.)
fn resolve(addr: SocketAddr) -> Result<SocketAddr, Error> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let l = std::net::TcpListener::bind(addr).map_err(|e| Error::Listen {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    l.local_addr().map_err(|e| Error::Listen {
        addr: addr.to_string(),
        reason: e.to_string(),
    })
}

/// What has to be undone at the end.
struct Made {
    mgmt: MgmtClient,
    vhost: String,
    /// Users setup created (those that existed before are left alone).
    users: Vec<String>,
    /// The directory, when the demo made it.
    temp: Option<PathBuf>,
}

impl Made {
    /// Removes the vhost (its queues, exchanges and connections with it), the users and
    /// the temporary directory; says what failed, goes on.
    async fn undo(self) {
        if let Err(e) = self.mgmt.delete_vhost(&self.vhost).await
            && !e.is_not_found()
        {
            eprintln!("pumpwatch demo: could not remove vhost {}: {e}", self.vhost);
        }
        for u in &self.users {
            if let Err(e) = self.mgmt.delete_user(u).await
                && !e.is_not_found()
            {
                eprintln!("pumpwatch demo: could not remove user {u}: {e}");
            }
        }
        if let Some(d) = &self.temp
            && let Err(e) = std::fs::remove_dir_all(d)
        {
            eprintln!("pumpwatch demo: could not remove {}: {e}", d.display());
        }
    }
}

/// `pumpwatch demo`: sets up, runs everything until `shutdown`, cleans up.
pub async fn run(cfg: Config, shutdown: Shutdown) -> Result<(), Error> {
    let broker = cfg.broker.with_vhost(&cfg.vhost);
    let mgmt = MgmtClient::from_urls(&cfg.admin_url, &cfg.broker)
        .map_err(|e| Error::Failed(format!("demo: {e}")))?;
    let layout = Layout {
        dir: match &cfg.dir {
            Some(d) => d.clone(),
            None => temp_dir()?,
        },
        serve: resolve(cfg.listen)?,
        route: resolve(cfg.route_listen)?,
        watchdog: resolve(cfg.watchdog_listen)?,
        archive: resolve(cfg.archive_listen)?,
        speedo_interval: cfg.speedo_interval,
    };
    let temp = cfg.dir.is_none().then(|| layout.dir.clone());
    std::fs::create_dir_all(&layout.dir)
        .map_err(|e| Error::Failed(format!("demo: cannot create {}: {e}", layout.dir.display())))?;
    std::fs::write(layout.config_file(), plan::config_toml(&layout)).map_err(|e| {
        Error::Failed(format!(
            "demo: cannot write {}: {e}",
            layout.config_file().display()
        ))
    })?;
    let file = FileConfig::from_file(&layout.config_file())
        .map_err(|e| Error::Failed(format!("demo: {e}")))?;
    let common = Common {
        verbose: 0,
        file,
        broker: broker.clone(),
        admin_url: cfg.admin_url.clone(),
    };

    // The vhost, then the users and topology (setup), remembering what to undo.
    let before: BTreeSet<String> = mgmt
        .list_users()
        .await
        .map_err(|e| {
            Error::Failed(format!(
                "demo: the management API at {}: {e}",
                cfg.admin_url
            ))
        })?
        .into_iter()
        .map(|u| u.name)
        .collect();
    mgmt.create_vhost(&cfg.vhost).await?;
    let made = Made {
        mgmt: mgmt.clone(),
        vhost: cfg.vhost.clone(),
        users: plan::users()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| !before.contains(n))
            .collect(),
        temp,
    };
    let result = run_in(&cfg, &layout, &common, &mgmt, shutdown).await;
    if cfg.keep {
        println!(
            "pumpwatch demo: kept vhost {}, its users and {}",
            cfg.vhost,
            layout.dir.display()
        );
    } else {
        made.undo().await;
        println!("pumpwatch demo: removed vhost {} and its users", cfg.vhost);
    }
    result
}

/// Setup, the daemons and the simulation, until `shutdown` or a failure.
async fn run_in(
    cfg: &Config,
    layout: &Layout,
    common: &Common,
    mgmt: &MgmtClient,
    shutdown: Shutdown,
) -> Result<(), Error> {
    let broker = &common.broker;
    // The vhost is new: the broker user running the demo needs rights in it.
    mgmt.put_permissions(&cfg.vhost, broker.user(), ".*", ".*", ".*")
        .await?;
    let env: setup::EnvLookup = Arc::new(|var: &str| {
        plan::users()
            .into_iter()
            .find(|(n, _)| plan::password_env(n) == var)
            .map(|(n, _)| plan::password(&n))
    });
    let setup_cfg = setup::Config::with_env(setup::Args::default(), common, env)?;
    let mut out = Vec::new();
    let summary = setup::apply(&setup_cfg, &mut out)
        .await
        .map_err(|e| Error::Failed(format!("demo: setup: {e}")))?;

    // Every component validated before any starts, as `main` does for one.
    let route_cfg = route::Config::from_args(
        route::Args {
            listen: Some(layout.route.to_string()),
            ..route::Args::default()
        },
        common,
    )?;
    let speedo_cfg = speedo::Config::from_args(speedo::Args::default(), common)?;
    let serve_cfg = serve::Config::from_args(serve::Args::default(), common)?;
    let watchdog_cfg = watchdog::Config::from_args(watchdog::Args::default(), common)?;
    let archive_cfg = archive::Config::from_args(archive::Args::default(), common)?;
    let mut sim_cfg = simulate::Config::from_args(
        simulate::Args {
            sources: plan::SOURCES,
            clients: plan::CLIENTS,
            hosts: plan::HOSTS,
            rate: cfg.rate,
            count: None,
            duration: Some(cfg.duration),
            error_ratio: 0.1,
            client_error_ratio: vec![(plan::FLAKY_CLIENT.into(), plan::FLAKY_RATIO)],
            format: simulate::FormatChoice::Mix,
            exchange: None,
            starts: true,
            seed: rand::random(),
            stamp: None,
            fail_node: Some(plan::FAILING_NODE.into()),
            fail_after: Some(cfg.fail_after),
            stop_client: Some(plan::STOPPING_CLIENT.into()),
            stop_after: Some(cfg.stop_after),
        },
        common,
    )?;
    // The products are this pump's own.
    sim_cfg.plan.cluster = plan::CLUSTER.to_owned();

    // A failed component cancels `inner` (the others stop); Ctrl-C cancels `shutdown`,
    // its parent.
    let inner = shutdown.child_token();
    let server = serve::Server::bind(serve_cfg).await?;
    let mut tasks = Tasks::new("demo", &inner);
    let s = inner.clone();
    tasks.spawn(async move { route::run(route_cfg, s).await });
    let s = inner.clone();
    tasks.spawn(async move { speedo::run(speedo_cfg, s).await });
    let s = inner.clone();
    tasks.spawn(async move { server.run(s).await });
    let s = inner.clone();
    tasks.spawn(async move { watchdog::run(watchdog_cfg, s).await });
    let s = inner.clone();
    tasks.spawn(async move { archive::run(archive_cfg, s).await });
    let s = inner.clone();
    tasks.spawn(async move {
        let summary = simulate::send(sim_cfg, s).await?;
        println!("pumpwatch demo: the simulation ended\n{summary}");
        Ok(())
    });

    let banner = Banner {
        layout,
        vhost: &cfg.vhost,
        broker_for_commands: for_commands(broker),
        source_url: for_commands(&broker.with_credentials("radar", &plan::password("radar"))),
        path_dir: path_dir(),
        setup_changes: summary.changes,
        stop_after: cfg.stop_after,
        fail_after: cfg.fail_after,
        keep: cfg.keep,
        temp_dir: cfg.dir.is_none(),
    };
    print!("{}", plan::banner(&banner));
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let joined = tasks.join();
    tokio::pin!(joined);
    tokio::select! {
        r = &mut joined => r,
        _ = shutdown.cancelled() => {
            println!("pumpwatch demo: stopping");
            match tokio::time::timeout(STOP_BUDGET, &mut joined).await {
                Ok(r) => r,
                Err(_) => {
                    // Dropping the join aborts what is left; the vhost goes anyway.
                    eprintln!(
                        "pumpwatch demo: not everything stopped within {} s; abandoning it",
                        STOP_BUDGET.as_secs()
                    );
                    Ok(())
                }
            }
        }
    }
}

/// The broker URL for the commands the demo prints: with the password when it is the
/// well-known `guest` (or a demo user's), redacted otherwise (the user knows it).
fn for_commands(b: &BrokerUrl) -> String {
    let demo_user = plan::users()
        .iter()
        .any(|(n, _)| n == b.user() && b.password() == plan::password(n));
    if (b.user() == "guest" && b.password() == "guest") || demo_user {
        b.expose_password()
    } else {
        b.to_string()
    }
}

/// The directory to put first on PATH so that `pumpwatch` in another terminal is this
/// binary; `None` when it already is.
fn path_dir() -> Option<String> {
    let me = std::env::current_exe().ok()?;
    let me = me.canonicalize().unwrap_or(me);
    let on_path = std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            d.join("pumpwatch")
                .canonicalize()
                .is_ok_and(|found| found == me)
        })
    });
    if on_path {
        None
    } else {
        me.parent().map(|d| d.to_string_lossy().into_owned())
    }
}

/// A new private directory under the system's temporary directory.
fn temp_dir() -> Result<PathBuf, Error> {
    let base = std::env::temp_dir();
    for _ in 0..16 {
        let d = base.join(format!("pumpwatch-demo-{:08x}", rand::random::<u32>()));
        match std::fs::create_dir(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Error::Failed(format!(
                    "demo: cannot create a directory in {}: {e}",
                    base.display()
                )));
            }
        }
    }
    Err(Error::Failed(format!(
        "demo: cannot create a directory in {}",
        base.display()
    )))
}
