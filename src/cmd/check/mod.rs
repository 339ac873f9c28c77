//! `pumpwatch check` (SPEC §4.7): a Nagios/Icinga/Naemon plugin. One request to `serve`'s
//! `/api/check` (narrowed with `?client=`/`?source=`), one line out, exit 0 OK,
//! 1 WARNING, 2 CRITICAL, 3 UNKNOWN, after the Monitoring Plugins Development Guidelines:
//!
//! ```text
//! PUMPWATCH <STATE> - <text> | <perfdata>
//! ```
//!
//! Anything that keeps it from knowing (serve unreachable, `-t` passed, an answer that is
//! not serve's, a refused login, a bad argument or range) is `PUMPWATCH UNKNOWN -
//! <reason>`, exit 3. The output itself is the pure [`output`].
//!
//! Logging in (serve's `--auth broker`): `--user NAME --password-env VAR` or
//! `--token-env VAR` (the metrics token, seen as an admin) are sent with the request;
//! without them, the broker URL's account is sent only if serve asks (401), so a serve
//! without logins never sees a password.

pub mod output;

use super::{Common, Error, UsageError, parse_duration};
use crate::cmd::serve::CheckAnswer;
use crate::core::nagios::{Limits, PluginOutput, Range};
use crate::shutdown::Shutdown;
use std::time::Duration;

/// `pumpwatch check` flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// serve's address.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Check one client (and its pairs); -w/-c apply to its good files/s.
    #[arg(long, value_name = "NAME", conflicts_with = "source")]
    pub client: Option<String>,
    /// Check one source (and its pairs); -w/-c apply to its good files/s.
    #[arg(long, value_name = "NAME")]
    pub source: Option<String>,
    /// Warning range for good files/s (Nagios syntax: 10, 10:, ~:10, 10:20, @10:20).
    #[arg(short, long, value_name = "RANGE", allow_hyphen_values = true)]
    pub warning: Option<String>,
    /// Critical range for good files/s.
    #[arg(short, long, value_name = "RANGE", allow_hyphen_values = true)]
    pub critical: Option<String>,
    /// Give up (UNKNOWN) after this many seconds.
    #[arg(short, long, value_name = "SECS", default_value = "10")]
    pub timeout: String,
    /// Log in to serve as this pump account [default: the broker URL's user, sent only
    /// when serve asks for a login].
    #[arg(
        long,
        value_name = "NAME",
        requires = "password_env",
        conflicts_with = "token_env"
    )]
    pub user: Option<String>,
    /// The environment variable holding --user's password.
    #[arg(long, value_name = "VAR", requires = "user")]
    pub password_env: Option<String>,
    /// The environment variable holding serve's metrics token (serve.metrics_token_env),
    /// sent as a bearer token.
    #[arg(long, value_name = "VAR")]
    pub token_env: Option<String>,
}

/// How `check` logs in to serve.
#[derive(Clone, PartialEq, Eq)]
pub enum Login {
    /// Told to: sent with the request.
    Basic {
        user: String,
        password: String,
    },
    Bearer(String),
    /// The broker URL's account, sent only after serve answered 401.
    IfAsked {
        user: String,
        password: String,
    },
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Login::Basic { user, .. } => write!(f, "Basic({user:?})"),
            Login::Bearer(_) => write!(f, "Bearer(****)"),
            Login::IfAsked { user, .. } => write!(f, "IfAsked({user:?})"),
        }
    }
}

/// Everything `check` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// `<url>/api/check[?client=..|?source=..]`.
    pub endpoint: url::Url,
    pub limits: Limits,
    pub timeout: Duration,
    /// `-v`: one offender per extra line.
    pub verbose: bool,
    pub login: Login,
}

impl Config {
    pub fn from_args(args: Args, common: &Common) -> Result<Config, UsageError> {
        let range = |flag: &str, v: &Option<String>| -> Result<Option<Range>, UsageError> {
            v.as_deref()
                .map(|r| Range::parse(r).map_err(|e| UsageError(format!("bad {flag}: {e}"))))
                .transpose()
        };
        let limits = Limits {
            warn: range("-w", &args.warning)?,
            crit: range("-c", &args.critical)?,
        };
        let timeout = parse_duration(&args.timeout)
            .ok()
            .filter(|d| !d.is_zero() && *d <= Duration::from_secs(3600))
            .ok_or_else(|| {
                UsageError(format!(
                    "bad -t {:?}: seconds from 0.001 to 3600",
                    args.timeout.chars().take(20).collect::<String>()
                ))
            })?;
        let mut endpoint = url::Url::parse(&args.url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                UsageError(format!(
                    "bad --url {:?}: expected http://HOST:PORT",
                    args.url.chars().take(80).collect::<String>()
                ))
            })?;
        let path = format!("{}/api/check", endpoint.path().trim_end_matches('/'));
        endpoint.set_path(&path);
        endpoint.set_query(None);
        for (flag, key, v) in [
            ("--client", "client", &args.client),
            ("--source", "source", &args.source),
        ] {
            if let Some(n) = v {
                if n.is_empty() || n.len() > 255 {
                    return Err(UsageError(format!("bad {flag}: 1 to 255 bytes")));
                }
                endpoint.query_pairs_mut().append_pair(key, n);
            }
        }
        let env = |flag: &str, var: &str| -> Result<String, UsageError> {
            if !crate::config::is_valid_env_name(var) {
                return Err(UsageError(format!(
                    "bad {flag}: {} is not an environment variable name",
                    crate::core::text::quoted(var)
                )));
            }
            std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| UsageError(format!("bad {flag}: {var} is not set")))
        };
        let login = match (args.user, args.password_env, args.token_env) {
            (_, _, Some(var)) => Login::Bearer(env("--token-env", &var)?.trim().to_owned()),
            (Some(user), Some(var), None) => Login::Basic {
                password: env("--password-env", &var)?,
                user,
            },
            _ => Login::IfAsked {
                user: common.broker.user().to_owned(),
                password: common.broker.password().to_owned(),
            },
        };
        Ok(Config {
            endpoint,
            limits,
            timeout,
            verbose: common.verbose > 0,
            login,
        })
    }
}

/// The output for a problem that kept `check` from knowing.
pub fn unknown(reason: impl std::fmt::Display) -> PluginOutput {
    PluginOutput::unknown(reason)
}

/// Asks serve and builds the output; never fails (a failure is an UNKNOWN output).
pub async fn query(cfg: &Config) -> PluginOutput {
    let shown = {
        let mut u = cfg.endpoint.clone();
        u.set_query(None);
        u.set_path("");
        u.to_string().trim_end_matches('/').to_owned()
    };
    let ask = async {
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .build()
            .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
        let shown = &shown;
        let send = |login: Option<&Login>| {
            let mut req = client.get(cfg.endpoint.clone());
            match login {
                Some(Login::Basic { user, password } | Login::IfAsked { user, password }) => {
                    req = req.basic_auth(user, Some(password));
                }
                Some(Login::Bearer(t)) => req = req.bearer_auth(t),
                None => {}
            }
            async move {
                req.send()
                    .await
                    .map_err(|e| format!("serve at {shown} cannot be reached: {}", why(&e)))
            }
        };
        let first = match &cfg.login {
            Login::IfAsked { .. } => None,
            told => Some(told),
        };
        let mut r = send(first).await?;
        if r.status() == reqwest::StatusCode::UNAUTHORIZED && first.is_none() {
            r = send(Some(&cfg.login)).await?;
        }
        let status = r.status();
        let body = r
            .bytes()
            .await
            .map_err(|e| format!("serve at {shown}: answer cut short: {}", why(&e)))?;
        if !status.is_success() {
            let first = String::from_utf8_lossy(&body[..body.len().min(200)])
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            let hint = match status.as_u16() {
                401 => " (log in with --user/--password-env or --token-env)",
                _ => "",
            };
            return Err(format!("serve at {shown} answered {status}: {first}{hint}"));
        }
        serde_json::from_slice::<CheckAnswer>(&body).map_err(|e| {
            format!("{shown} did not answer as pumpwatch serve does ({e}); is it serve?")
        })
    };
    match tokio::time::timeout(cfg.timeout, ask).await {
        Ok(Ok(a)) => output::render(&a, &cfg.limits, cfg.verbose),
        Ok(Err(reason)) => unknown(reason),
        Err(_) => unknown(format!(
            "no answer from serve at {shown} within {}s",
            cfg.timeout.as_secs_f64()
        )),
    }
}

/// The innermost cause, which says what happened (refused, timed out, reset).
fn why(e: &reqwest::Error) -> String {
    let mut s: &dyn std::error::Error = e;
    while let Some(inner) = s.source() {
        s = inner;
    }
    if e.is_timeout() {
        "timed out".into()
    } else {
        s.to_string()
    }
}

/// `pumpwatch check`: prints the plugin output; its state is the exit status.
pub async fn run(cfg: Config, _shutdown: Shutdown) -> Result<(), Error> {
    print_exit(query(&cfg).await)
}

/// Prints `out` and turns its state into the exit status.
pub fn print_exit(out: PluginOutput) -> Result<(), Error> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.render().as_bytes())?;
    stdout.flush()?;
    match out.exit_code() {
        0 => Ok(()),
        code => Err(Error::Exit(code)),
    }
}
