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
//!
//! HTTPS (`--url https://...`, serve's `--tls-cert`): the system's CA certificates, plus
//! `--ca-file`'s. Why not reqwest's TLS: its rustls feature needs a process-wide crypto
//! provider, or every other reqwest client in the process panics; here the one request
//! goes over `tokio-rustls` (ring, as everywhere else) and hyper's HTTP/1.1 client.

pub mod output;

use super::{Common, Error, UsageError, parse_duration};
use crate::cmd::serve::CheckAnswer;
use crate::core::nagios::{Limits, PluginOutput, Range};
use crate::shutdown::Shutdown;
use std::sync::Arc;
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
    /// PEM CA certificates to trust for an https --url, besides the system's (a pump's
    /// own CA).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,
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
    /// For an https `endpoint`: the roots to trust.
    pub tls: Option<Arc<rustls::ClientConfig>>,
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
                    "bad --url {:?}: expected http://HOST:PORT or https://HOST:PORT",
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
        let tls = match endpoint.scheme() {
            "https" => Some(tls_config(args.ca_file.as_deref())?),
            _ => None,
        };
        Ok(Config {
            endpoint,
            limits,
            timeout,
            verbose: common.verbose > 0,
            login,
            tls,
        })
    }
}

/// The roots an https `--url` is checked against: the system's, and `ca_file`'s.
fn tls_config(ca_file: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, UsageError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(file) = ca_file {
        let bad = |why: String| UsageError(format!("bad --ca-file {}: {why}", file.display()));
        let pem = std::fs::read(file).map_err(|e| bad(e.to_string()))?;
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| bad(format!("not PEM ({e})")))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("not a CA certificate ({e})")))?;
            n += 1;
        }
        if n == 0 {
            return Err(bad("holds no CERTIFICATE".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UsageError(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// serve's answer: status and body.
struct Answer {
    status: u16,
    reason: String,
    body: bytes::Bytes,
}

/// The most of an answer read (serve's are a few KB).
const MAX_ANSWER: usize = 4 << 20;

/// One GET of `cfg.endpoint` with `login`'s `Authorization`; `Err` says why not (for
/// UNKNOWN).
async fn fetch(cfg: &Config, login: Option<&Login>, shown: &str) -> Result<Answer, String> {
    let authorization = login.map(|l| match l {
        Login::Basic { user, password } | Login::IfAsked { user, password } => {
            use base64::Engine;
            let pair =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("Basic {pair}")
        }
        Login::Bearer(t) => format!("Bearer {t}"),
    });
    match &cfg.tls {
        None => {
            let client = reqwest::Client::builder()
                .timeout(cfg.timeout)
                .connect_timeout(cfg.timeout)
                .build()
                .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
            let mut req = client.get(cfg.endpoint.clone());
            if let Some(a) = authorization {
                req = req.header(reqwest::header::AUTHORIZATION, a);
            }
            let r = req
                .send()
                .await
                .map_err(|e| format!("serve at {shown} cannot be reached: {}", why(&e)))?;
            let status = r.status();
            let body = r
                .bytes()
                .await
                .map_err(|e| format!("serve at {shown}: answer cut short: {}", why(&e)))?;
            Ok(Answer {
                status: status.as_u16(),
                reason: status.canonical_reason().unwrap_or("").to_owned(),
                body,
            })
        }
        Some(tls) => fetch_https(cfg, tls.clone(), authorization, shown).await,
    }
}

async fn fetch_https(
    cfg: &Config,
    tls: Arc<rustls::ClientConfig>,
    authorization: Option<String>,
    shown: &str,
) -> Result<Answer, String> {
    use http_body_util::BodyExt;
    let url = &cfg.endpoint;
    let host = url.host_str().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let port = url.port_or_known_default().unwrap_or(443);
    let unreachable =
        |e: &dyn std::fmt::Display| format!("serve at {shown} cannot be reached: {e}");
    let tcp = tokio::net::TcpStream::connect((bare, port))
        .await
        .map_err(|e| unreachable(&e))?;
    let name = rustls::pki_types::ServerName::try_from(bare.to_owned())
        .map_err(|e| format!("serve at {shown}: {host} is no TLS name ({e})"))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("serve at {shown}: TLS: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
    // The connection is driven beside the request; it ends when the sender is dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    let mut req = hyper::Request::get(target).header(hyper::header::HOST, authority);
    if let Some(a) = authorization {
        req = req.header(hyper::header::AUTHORIZATION, a);
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("serve at {shown}: {e}"))?;
    let r = sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(&e))?;
    let status = r.status();
    let body = http_body_util::Limited::new(r.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("serve at {shown}: answer cut short: {e}"))?
        .to_bytes();
    Ok(Answer {
        status: status.as_u16(),
        reason: status.canonical_reason().unwrap_or("").to_owned(),
        body,
    })
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
        let shown = &shown;
        let first = match &cfg.login {
            Login::IfAsked { .. } => None,
            told => Some(told),
        };
        let mut r = fetch(cfg, first, shown).await?;
        if r.status == 401 && first.is_none() {
            r = fetch(cfg, Some(&cfg.login), shown).await?;
        }
        let (status, body) = (format!("{} {}", r.status, r.reason), r.body);
        if !(200..300).contains(&r.status) {
            let first = String::from_utf8_lossy(&body[..body.len().min(200)])
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            let hint = match r.status {
                401 => " (log in with --user/--password-env or --token-env)",
                _ => "",
            };
            return Err(format!(
                "serve at {shown} answered {}: {first}{hint}",
                status.trim_end()
            ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::url::BrokerUrl;
    use crate::config::Config as PumpConfig;

    fn config(url: &str, ca: Option<&std::path::Path>) -> Result<Config, UsageError> {
        let common = Common::with_broker(
            PumpConfig::default(),
            &BrokerUrl::parse("amqp://localhost").unwrap(),
        );
        let args = Args {
            url: url.into(),
            timeout: "10".into(),
            ca_file: ca.map(Into::into),
            ..Args::default()
        };
        Config::from_args(args, &common)
    }

    #[test]
    fn https_trusts_the_system_and_the_ca_file() {
        assert!(config("http://127.0.0.1:8080", None).unwrap().tls.is_none());
        assert!(config("https://pump:8443", None).unwrap().tls.is_some());
        let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls/ca.pem");
        assert!(
            config("https://pump:8443", Some(&ca))
                .unwrap()
                .tls
                .is_some()
        );
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "no certificate here").unwrap();
        for (file, why) in [
            (junk, "holds no CERTIFICATE"),
            (dir.path().join("missing.pem"), "No such file"),
        ] {
            let e = config("https://pump:8443", Some(&file))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("bad --ca-file ") && e.contains(why), "{e}");
        }
        let e = config("ftp://pump", None).unwrap_err().to_string();
        assert!(e.contains("https://HOST:PORT"), "{e}");
    }
}
