//! `pumpwatch report`: publish one report from flags, for scripts and for consumers that
//! cannot report themselves. It publishes to the broker user's own `xs_<user>` unless told
//! otherwise, exactly as a consumer would, and waits for the broker's confirm.

use super::{Common, Error, UsageError};
use crate::broker::amqp::{Client, ConnectOptions};
use crate::broker::names;
use crate::broker::url::BrokerUrl;
use crate::core::Headers;
use crate::core::emit::emit;
use crate::core::report::{Format, Report};
use crate::core::stamp::Stamp;
use crate::shutdown::Shutdown;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ReportFormat {
    #[default]
    V02,
    V03,
}

/// `pumpwatch report` flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// The outcome code (201 downloaded, 499 failed, 102 started, …).
    #[arg(long, value_parser = clap::value_parser!(u16).range(100..=999))]
    pub code: u16,
    /// The product's relative path.
    #[arg(long)]
    pub relpath: String,
    /// The product's base URL [default: file:/].
    #[arg(long)]
    pub base_url: Option<String>,
    /// The product's source.
    #[arg(long)]
    pub source: Option<String>,
    /// The pump the product was announced on (its from_cluster); a report on another
    /// pump's product is forwarded there by route.
    #[arg(long, value_name = "CLUSTER")]
    pub from_cluster: Option<String>,
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

#[derive(Debug, Clone)]
pub struct Config {
    pub broker: BrokerUrl,
    /// Where to publish (`xs_<broker user>` unless `--exchange`).
    pub exchange: String,
    pub format: Format,
    pub report: Report,
}

impl Config {
    pub fn from_args(a: Args, common: &Common) -> Result<Config, UsageError> {
        let pub_time = match &a.pub_time {
            Some(s) => Stamp::parse(s).ok_or_else(|| {
                UsageError(format!("invalid --pub-time {s:?} (e.g. 20240101T130241.5)"))
            })?,
            None => Stamp(jiff::Timestamp::now()),
        };
        if a.duration.is_some_and(|d| !d.is_finite()) {
            return Err(UsageError::new(
                "invalid --duration: must be a finite number of seconds",
            ));
        }
        if let Some(c) = a
            .from_cluster
            .as_deref()
            .filter(|c| !crate::config::is_valid_cluster_name(c))
        {
            return Err(UsageError(format!(
                "invalid --from-cluster {}: {}",
                crate::core::text::quoted(c),
                crate::config::CLUSTER_RULE
            )));
        }
        let user = common.broker.user();
        let report = Report {
            format: Format::V02,
            topic: String::new(),
            exchange: String::new(),
            pub_time: Some(pub_time),
            base_url: a.base_url.unwrap_or_else(|| "file:/".to_owned()),
            rel_path: a.relpath,
            code: a.code,
            message: a.message,
            host: Some(a.host.unwrap_or_else(hostname)),
            user: Some(a.client.unwrap_or_else(|| user.to_owned())),
            duration_s: a.duration.or(Some(0.0)),
            source: a.source,
            from_cluster: a.from_cluster,
            to_clusters: vec![],
            flow: a.flow,
            size_bytes: a.size,
            identity: None,
            time_completed: None,
            stamped_client: None,
            stamped_source: None,
            extra: Headers::new(),
        };
        if let Some(x) = &a.exchange {
            super::check_object_name("--exchange", x)?;
        }
        Ok(Config {
            broker: common.broker.clone(),
            exchange: a.exchange.unwrap_or_else(|| names::user_exchange(user)),
            format: match a.format {
                ReportFormat::V02 => Format::V02,
                ReportFormat::V03 => Format::V03,
            },
            report,
        })
    }
}

/// This host's name, for the report's consumer host.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Where the report went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub exchange: String,
    pub routing_key: String,
}

/// `pumpwatch report`: publishes, waits for the confirm, prints where it went.
pub async fn run(cfg: Config, shutdown: Shutdown) -> Result<(), Error> {
    let code = cfg.report.code;
    let p = tokio::select! {
        p = publish(&cfg) => p?,
        _ = shutdown.cancelled() => return Err(Error::Failed("interrupted before the broker confirmed".into())),
    };
    // The routing key comes from the relPath a script gave: escaped like any report text.
    println!(
        "published {code} to {} ({})",
        crate::core::text::escape(&p.exchange),
        crate::core::text::escape(&p.routing_key)
    );
    Ok(())
}

/// Publishes the report and waits for the broker's confirm; an unroutable publish is an
/// error (nobody would ever see the report).
pub async fn publish(cfg: &Config) -> Result<Published, Error> {
    let out = emit(&cfg.report, cfg.format);
    let opts = ConnectOptions {
        name: "pumpwatch report".into(),
        reconnect: false,
        ..ConnectOptions::default()
    };
    let client = Client::connect(&cfg.broker, opts).await?;
    let result = match client.publish(&cfg.exchange, &out).await {
        Ok(p) => p.wait().await,
        Err(e) => Err(e),
    };
    client.close().await;
    result?;
    Ok(Published {
        exchange: cfg.exchange.clone(),
        routing_key: out.routing_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_cluster_is_a_cluster_name() {
        let common = Common::with_broker(crate::config::Config::default(), &BrokerUrl::default());
        let args = |c: &str| Args {
            code: 201,
            relpath: "a/b".into(),
            from_cluster: Some(c.into()),
            ..Args::default()
        };
        let cfg = Config::from_args(args("ddsr.cmc"), &common).unwrap();
        assert_eq!(cfg.report.from_cluster.as_deref(), Some("ddsr.cmc"));
        let e = Config::from_args(args("a b\u{1b}[2J"), &common).unwrap_err();
        assert!(e.to_string().contains("--from-cluster") && !e.to_string().contains('\u{1b}'));
    }
}
