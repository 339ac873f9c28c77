//! The `pumpwatch` binary: one match over the subcommands. Exit codes are decided here
//! and only here: 0 done, 1 broker/runtime error, 2 bad arguments or configuration.

use clap::Parser;
use pumpwatch::cli::{Cli, Command, LogArgs, ReportArgs, ReportFormat, RouteArgs, SimulateArgs};
use pumpwatch::config::{self, Config, Role};
use pumpwatch::core::Headers;
use pumpwatch::core::filter::Filter;
use pumpwatch::core::report::{Format, Report};
use pumpwatch::core::stamp::Stamp;
use pumpwatch::{log, report_cmd, route, serve, setup, shutdown, simulate, speedo};
use std::process::ExitCode;

/// A failure, with the exit code it maps to.
enum Failure {
    /// Bad arguments or configuration: exit 2.
    Usage(String),
    /// Broker or runtime error: exit 1.
    Runtime(String),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // One line: clap's first line names the argument and the problem.
            let text = e.render().to_string();
            eprintln!(
                "pumpwatch: {}",
                text.lines()
                    .next()
                    .unwrap_or("invalid arguments")
                    .trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    // Daemons say what they do at info; one-shot commands only warn.
    let daemon = matches!(
        cli.command,
        Command::Route(_) | Command::Speedo(_) | Command::Serve(_)
    );
    init_tracing(cli.verbose + u8::from(daemon));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pumpwatch: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("pumpwatch: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(m)) => {
            eprintln!("pumpwatch: {m}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // lapin logs every returned (unroutable) message with its whole body at WARN, and
        // its own teardown at ERROR; the adapter reports what matters in one line.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},lapin=off")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    let config = Config::load(cli.config.as_deref()).map_err(|e| Failure::Usage(e.to_string()))?;
    let broker = cli
        .broker
        .clone()
        .or_else(|| config.broker.clone())
        .unwrap_or_else(|| config::DEFAULT_BROKER.to_owned());
    let admin_arg = cli.admin_url.clone();
    match cli.command {
        Command::Log(args) => run_log(args, broker, &config).await,
        Command::Report(args) => run_report(args, broker).await,
        Command::Simulate(args) => run_simulate(args, broker).await,
        Command::Route(args) => run_route(args, broker, config).await,
        Command::Speedo(args) => {
            let r = speedo::main(args, &config, &broker, shutdown::on_signals()).await;
            r.map_err(daemon_failure)
        }
        Command::Serve(args) => {
            let r = serve::main(args, &config, &broker, shutdown::on_signals()).await;
            r.map_err(daemon_failure)
        }
        Command::Setup(args) => {
            let admin = admin_arg
                .or_else(|| config.admin_url.clone())
                .unwrap_or_else(|| config::DEFAULT_ADMIN_URL.into());
            match setup::main(args, &config, &broker, &admin, &mut std::io::stdout()).await {
                Ok(_) => Ok(()),
                Err(e) if e.is_usage() => Err(Failure::Usage(e.to_string())),
                Err(e) => Err(Failure::Runtime(e.to_string())),
            }
        }
    }
}

async fn run_log(a: LogArgs, broker: String, config: &Config) -> Result<(), Failure> {
    let user = log::broker_user(&broker);
    let cfg = log::Config {
        broker,
        exchange: a.exchange,
        report_exchange: config.exchanges.report.clone(),
        user_is_source: config.role_of(&user) == Some(Role::Source),
        filter: Filter {
            pattern: a.pattern,
            source: a.source,
            client: a.client,
            host: a.host,
            file: a.file,
            flow: a.flow,
            code: a.code,
            cluster: a.cluster,
        },
        output: if a.json {
            log::Output::Json
        } else if a.raw {
            log::Output::Raw
        } else {
            log::Output::Text
        },
        count: a.count,
        timeout: a.timeout,
        idle: a.idle,
        queue: a.queue,
        prefetch: a.prefetch.max(1),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let shutdown = shutdown::on_signals();
    match log::run(cfg, shutdown, &mut out).await {
        Ok(stats) => {
            if a.stats {
                eprintln!("pumpwatch log: {stats}");
            }
            Ok(())
        }
        // A closed pipe (`| head`) is the reader saying it has seen enough.
        Err(log::LogError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::Runtime(e.to_string())),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

async fn run_report(a: ReportArgs, broker: String) -> Result<(), Failure> {
    let pub_time = match &a.pub_time {
        Some(s) => Stamp::parse(s).ok_or_else(|| {
            Failure::Usage(format!("invalid --pub-time {s:?} (e.g. 20240101T130241.5)"))
        })?,
        None => Stamp(jiff::Timestamp::now()),
    };
    if a.duration.is_some_and(|d| !d.is_finite()) {
        return Err(Failure::Usage(
            "invalid --duration: must be a finite number of seconds".into(),
        ));
    }
    let user = log::broker_user(&broker);
    let report = Report {
        format: Format::V02,
        topic: String::new(),
        exchange: String::new(),
        pub_time: Some(pub_time),
        base_url: a.base_url,
        rel_path: a.relpath,
        code: a.code,
        message: a.message,
        host: Some(a.host.unwrap_or_else(hostname)),
        user: Some(a.client.unwrap_or(user)),
        duration_s: a.duration.or(Some(0.0)),
        source: a.source,
        from_cluster: None,
        to_clusters: vec![],
        flow: a.flow,
        size_bytes: a.size,
        identity: None,
        time_completed: None,
        stamped_client: None,
        stamped_source: None,
        extra: Headers::new(),
    };
    let format = match a.format {
        ReportFormat::V02 => Format::V02,
        ReportFormat::V03 => Format::V03,
    };
    let cfg = report_cmd::Config {
        broker,
        exchange: a.exchange,
        format,
        report,
    };
    let code = cfg.report.code;
    let p = report_cmd::run(cfg)
        .await
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    println!("published {code} to {} ({})", p.exchange, p.routing_key);
    Ok(())
}

async fn run_simulate(a: SimulateArgs, broker: String) -> Result<(), Failure> {
    if !(0.0..=1.0).contains(&a.error_ratio) {
        return Err(Failure::Usage(format!(
            "invalid --error-ratio {}: must be between 0 and 1",
            a.error_ratio
        )));
    }
    if !a.rate.is_finite() || a.rate < 0.0 {
        return Err(Failure::Usage(format!(
            "invalid --rate {}: must be >= 0",
            a.rate
        )));
    }
    if a.sources == 0 || a.clients == 0 || a.hosts == 0 {
        return Err(Failure::Usage(
            "--sources, --clients and --hosts must be at least 1".into(),
        ));
    }
    let mut plan = simulate::Plan::new(a.sources, a.clients, a.hosts);
    plan.error_ratio = a.error_ratio;
    plan.format = a.format;
    plan.starts = a.starts;
    plan.seed = a.seed;
    plan.stamp = a
        .stamp
        .unwrap_or_else(|| a.exchange.as_deref().is_some_and(|x| !x.starts_with("xs_")));
    plan.exchange = a.exchange;
    let cfg = simulate::Config {
        broker,
        plan,
        rate: a.rate,
        count: a.count,
        duration: a.duration,
    };
    let summary = simulate::run(cfg, shutdown::on_signals())
        .await
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    println!("{summary}");
    Ok(())
}

async fn run_route(a: RouteArgs, broker: String, config: Config) -> Result<(), Failure> {
    let mut cfg = route::Config::new(broker, config);
    cfg.stage = a.stage;
    if let Some(p) = a.prefetch {
        cfg.prefetch = p.max(1);
    }
    cfg.log_every = a.log_every.max(std::time::Duration::from_secs(1));
    cfg.listen = a.listen;
    let counters = std::sync::Arc::new(route::Counters::default());
    route::run(cfg, shutdown::on_signals(), counters)
        .await
        .map_err(|e| Failure::Runtime(e.to_string()))
}

fn daemon_failure(e: speedo::Error) -> Failure {
    match e {
        speedo::Error::Usage(m) => Failure::Usage(m),
        e => Failure::Runtime(e.to_string()),
    }
}
