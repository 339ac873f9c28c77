//! `pumpwatch baseline show [NAME] --state-dir DIR` prints what `serve` learned (per
//! client and source, per hour of the week: mean good files/s, σ, samples, weeks);
//! `pumpwatch baseline reset NAME --state-dir DIR` forgets a name, also in a running
//! `serve` (at its next write). Reads the database `serve --state-dir` keeps
//! (`serve::state`); what `serve` learned since its last batch is not there yet.

use super::{Common, Error, UsageError};
use crate::cmd::serve::state::{Owner, Store};
use crate::core::baseline::{HourOfWeek, Row};
use crate::core::text;
use crate::shutdown::Shutdown;
use std::io::Write;
use std::path::PathBuf;

/// `pumpwatch baseline` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Action {
    /// Print the learned expectations (all names, or NAME's).
    Show {
        /// A client or source name.
        name: Option<String>,
        /// serve's --state-dir.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// One JSON object per line instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Forget what was learned for NAME (as a client and as a source).
    Reset {
        name: String,
        /// serve's --state-dir.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
    },
}

/// Validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub action: Action,
}

impl Config {
    pub fn from_args(args: Args, _common: &Common) -> Result<Config, UsageError> {
        let name = match &args.action {
            Action::Show { name, .. } => name.as_deref(),
            Action::Reset { name, .. } => Some(name.as_str()),
        };
        if let Some(n) = name
            && (n.is_empty() || n.len() > crate::core::baseline::MAX_NAME_BYTES)
        {
            return Err(UsageError::new("invalid NAME: 1 to 255 bytes"));
        }
        Ok(Config {
            action: args.action,
        })
    }
}

/// One line of `show`.
fn line(owner: Owner, r: &Row) -> String {
    let hour = HourOfWeek::new(r.hour_of_week).map_or_else(|| "?".into(), |h| h.label());
    let sd = if r.n >= 2 {
        (r.m2 / (r.n - 1) as f64).max(0.0).sqrt()
    } else {
        0.0
    };
    format!(
        "{:<7} {:<24} {:<8} {:>12.4} {:>10.4} {:>8} {:>6}",
        owner.as_str(),
        text::escape(&r.name),
        hour,
        r.mean,
        sd,
        r.n,
        r.weeks
    )
}

pub async fn run(cfg: Config, _shutdown: Shutdown) -> Result<(), Error> {
    let fail = |e: crate::cmd::serve::state::StateError| Error::Failed(e.to_string());
    match cfg.action {
        Action::Show {
            name,
            state_dir,
            json,
        } => {
            let store = Store::open_reader(&state_dir).map_err(fail)?;
            let (rows, bad) = store.rows(name.as_deref()).map_err(fail)?;
            let mut out = std::io::stdout().lock();
            if json {
                for (owner, r) in &rows {
                    let v = serde_json::json!({
                        "kind": owner.as_str(), "name": r.name, "hour_of_week": r.hour_of_week,
                        "hour": HourOfWeek::new(r.hour_of_week).map(|h| h.label()),
                        "mean": r.mean,
                        "std_dev": if r.n >= 2 { (r.m2 / (r.n - 1) as f64).max(0.0).sqrt() } else { 0.0 },
                        "samples": r.n, "weeks": r.weeks,
                    });
                    writeln!(out, "{v}")?;
                }
            } else {
                writeln!(
                    out,
                    "{:<7} {:<24} {:<8} {:>12} {:>10} {:>8} {:>6}",
                    "KIND", "NAME", "HOUR", "MEAN files/s", "SIGMA", "SAMPLES", "WEEKS"
                )?;
                for (owner, r) in &rows {
                    writeln!(out, "{}", line(*owner, r))?;
                }
            }
            out.flush()?;
            if bad > 0 {
                eprintln!("pumpwatch: {bad} stored rows could not be read and were skipped");
            }
            if rows.is_empty() {
                eprintln!(
                    "pumpwatch: nothing learned{} in {}",
                    name.map(|n| format!(" for {}", text::escape(&n)))
                        .unwrap_or_default(),
                    store.file()
                );
            }
            Ok(())
        }
        Action::Reset { name, state_dir } => {
            let mut store = Store::open_reader(&state_dir).map_err(fail)?;
            let n = store.reset(&name).map_err(fail)?;
            println!(
                "forgot {n} learned hours of {} (a running serve forgets it at its next write)",
                text::escape(&name)
            );
            Ok(())
        }
    }
}
