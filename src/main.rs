//! The `pumpwatch` binary: parse the command line, then one call. Exit codes are decided
//! here and only here, from [`Error::exit_code`]: 0 done, 1 runtime, 2 bad arguments or
//! configuration; a panic anywhere (also in a spawned task) stops the command and exits 1.
#![forbid(unsafe_code)]

use clap::Parser;
use pumpwatch::cmd::{Cli, Common, Error, LogFormat};
use pumpwatch::shutdown;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if is_check() && !is_help(&e) => return plugin_unknown(&first_line(&e)),
        Err(e) => return clap_exit(e),
    };
    let check = matches!(cli.command, pumpwatch::cmd::Command::Check(_));
    init_tracing(
        cli.verbose + u8::from(cli.command.is_daemon()),
        cli.log_format,
    );
    let mut builder = if std::env::var("PUMPWATCH_RT").as_deref() == Ok("current") {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            return fail(&Error::Failed(format!(
                "cannot start the async runtime: {e}"
            )));
        }
    };
    let result = rt.block_on(async {
        let common = match Common::from_cli(&cli) {
            Ok(c) => c,
            Err(e) if check => {
                return pumpwatch::cmd::check::print_exit(pumpwatch::cmd::check::unknown(e));
            }
            Err(e) => return Err(e.into()),
        };
        let stop = shutdown::on_signals();
        shutdown::cancel_on_panic(&stop);
        cli.command.run(&common, stop).await
    });
    // Whatever the command made of it, a panicked task means it did not do its work.
    let result = match (result, shutdown::panicked()) {
        (Ok(()), Some(what)) => Err(Error::Task("a task", what)),
        (r, _) => r,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &Error) -> ExitCode {
    if !matches!(e, Error::Exit(_)) {
        eprintln!("pumpwatch: {e}");
    }
    ExitCode::from(e.exit_code())
}

/// Whether the command line runs `check` (global flags with values may come first):
/// a plugin answers bad arguments with its UNKNOWN line and exit 3, not clap's exit 2.
fn is_check() -> bool {
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" | "--broker" | "--admin-url" | "--log-format" => {
                args.next();
            }
            a if a.starts_with('-') => {}
            a => return a == "check",
        }
    }
    false
}

fn is_help(e: &clap::Error) -> bool {
    use clap::error::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    )
}

fn first_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    text.lines()
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .to_owned()
}

fn plugin_unknown(reason: &str) -> ExitCode {
    let out = pumpwatch::core::nagios::PluginOutput::unknown(reason);
    print!("{}", out.render());
    ExitCode::from(out.exit_code())
}

/// Help and version are not errors; anything else clap refuses is a usage error in one line.
fn clap_exit(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(2)
        }
        _ => fail(&Error::Usage(pumpwatch::cmd::UsageError::new(first_line(
            &e,
        )))),
    }
}

fn init_tracing(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // lapin logs every returned (unroutable) message with its whole body at WARN, and
        // its own teardown at ERROR; the adapter reports what matters in one line.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},lapin=off")));
    // Colours only on a terminal: escape sequences have no place in a log file, and
    // reading one must never be able to move a cursor.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // One object per line: `timestamp`, `level`, `target`, `fields` (with `message`).
        LogFormat::Json => builder.json().with_ansi(false).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
