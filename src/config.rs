//! Configuration (SPEC §5), in two stages: a strict serde shape where an unknown key is an
//! error naming the key and the file, then a validated [`Config`] with parsed durations and
//! compiled regexes. Every option has a default, so no file at all is a valid config.

use regex::Regex;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::broker::url::BrokerUrl;
pub use crate::broker::url::DEFAULT_BROKER;
pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:15672";
pub use crate::core::attribution::DEFAULT_RELPATH_PATTERN;
pub use crate::core::health::Thresholds;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {file}: {reason}")]
    Read { file: String, reason: String },
    #[error("config {file}:{line}: {reason}")]
    Syntax {
        file: String,
        line: usize,
        reason: String,
    },
    #[error("config {file}: {key}: {reason}")]
    Value {
        file: String,
        key: String,
        reason: String,
    },
}

/// A duration written as seconds (`300`, `0.5`) or as text (`"5m"`, `"1h 30m"`, `"PT5M"`).
#[derive(Debug, Clone, Copy)]
struct RawDuration(Duration);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RawDuration;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration: seconds (300) or text (\"5m\", \"1h 30m\")")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawDuration, E> {
                self.visit_f64(v as f64)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawDuration, E> {
                self.visit_f64(v as f64)
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<RawDuration, E> {
                secs_to_duration(v).map(RawDuration).map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawDuration, E> {
                parse_duration(v).map(RawDuration).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `"300"`, `"0.5"`, `"5m"`, `"1h 30m"` or ISO 8601 `"PT5M"`; used for flags too.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return secs_to_duration(secs);
    }
    let d: jiff::SignedDuration = s
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (e.g. 300, 5m, 1h 30m)"))?;
    Duration::try_from(d).map_err(|_| format!("negative duration {s:?}"))
}

fn secs_to_duration(secs: f64) -> Result<Duration, String> {
    if secs.is_finite() && (0.0..=1e10).contains(&secs) {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(format!("invalid duration {secs} (seconds, 0 to 1e10)"))
    }
}

impl RawDuration {
    fn get(self) -> Result<Duration, String> {
        Ok(self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Source,
    Subscriber,
    Feeder,
    Admin,
    /// A neighbour pump's account here (SPEC §3, §4.8): its shovel writes the reports it
    /// forwards to `xs_<account>`, and nothing else.
    Cluster,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Subscriber => "subscriber",
            Role::Feeder => "feeder",
            Role::Admin => "admin",
            Role::Cluster => "cluster",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    role: Role,
    password_env: Option<String>,
    retain: Option<u32>,
    interval: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThresholds {
    td: Option<RawDuration>,
    tminr: Option<f64>,
    window: Option<RawDuration>,
    max_error_ratio: Option<f64>,
    min_transfers: Option<i64>,
    k: Option<f64>,
    min_samples: Option<i64>,
    max_lag: Option<RawDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    via: Option<String>,
    broker: Option<String>,
    password_env: Option<String>,
    reconnect_delay: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExchanges {
    report: Option<String>,
    rejected: Option<String>,
    public: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    relpath_pattern: Option<String>,
    index_size: Option<usize>,
    max_body: Option<usize>,
    prefetch: Option<u16>,
    queue_type: Option<QueueType>,
    max_inflight_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpeedo {
    interval: Option<RawDuration>,
    all_interval: Option<RawDuration>,
    expire: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServe {
    listen: Option<String>,
    history: Option<RawDuration>,
    auth: Option<AuthMode>,
    login_cache: Option<RawDuration>,
    metrics_token_env: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    trusted_proxies: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArchive {
    dir: Option<PathBuf>,
    listen: Option<String>,
    fsync: Option<String>,
    fsync_interval: Option<RawDuration>,
    retention_days: Option<u32>,
    batch: Option<usize>,
    zstd_level: Option<i32>,
    code: Option<String>,
    source: Option<String>,
    client: Option<String>,
    host: Option<String>,
    flow: Option<String>,
    file: Option<String>,
    cluster: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatchdog {
    node_timeout: Option<RawDuration>,
    stuck_after: Option<RawDuration>,
    repost: Option<bool>,
    repost_exchange: Option<String>,
    max_inflight: Option<usize>,
    max_bytes: Option<usize>,
    reorder_window: Option<RawDuration>,
    forget_after: Option<RawDuration>,
    max_nodes: Option<usize>,
    listen: Option<String>,
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cluster: Option<String>,
    broker: Option<String>,
    admin_url: Option<String>,
    #[serde(default)]
    users: BTreeMap<String, RawUser>,
    #[serde(default)]
    thresholds: BTreeMap<String, RawThresholds>,
    #[serde(default)]
    clusters: BTreeMap<String, RawCluster>,
    #[serde(default)]
    exchanges: RawExchanges,
    #[serde(default)]
    route: RawRoute,
    #[serde(default)]
    speedo: RawSpeedo,
    #[serde(default)]
    serve: RawServe,
    archive: Option<RawArchive>,
    watchdog: Option<RawWatchdog>,
}

/// One declared account.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub name: String,
    pub role: Role,
    /// Name of the environment variable holding the password (never the password itself).
    pub password_env: Option<String>,
    /// Size of the retained `q_<source>.reports` queue; 0 = none.
    pub retain: u32,
    /// Speedo interval override for a source.
    pub interval: Option<Duration>,
}

/// Another pump (SPEC §4.8): a neighbour (`broker`: this pump's shovel delivers to it)
/// or a pump further away (`via`: reports for it are handed to another cluster).
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbour {
    pub name: String,
    pub via: Option<String>,
    /// Where reports for this pump leave this one: itself for a neighbour, else the
    /// neighbour at the end of the `via` chain (always a neighbour; validated).
    pub next_hop: String,
    /// A neighbour's broker, as the account this pump uses there; its `Display` hides
    /// the password.
    pub broker: Option<BrokerUrl>,
    /// The query of `broker` as written (`?cacertfile=...&verify=verify_peer`): the shovel
    /// gets it unchanged, since RabbitMQ's URI options (TLS ones above all) are more than
    /// [`BrokerUrl`] keeps.
    pub broker_options: Option<String>,
    /// The variable holding that account's password (else the URL's, else
    /// `credentials.conf`).
    pub password_env: Option<String>,
    /// How long the shovel waits before connecting again after a failure.
    pub reconnect_delay: Duration,
}

impl Neighbour {
    /// The account this pump uses on the neighbour: the shovel publishes to its
    /// `xs_<account>` there, where that pump declares it with role `cluster`.
    pub fn account(&self) -> Option<&str> {
        self.broker.as_ref().map(BrokerUrl::user)
    }

    /// The URL's own password, when it has one.
    pub fn url_password(&self) -> Option<&str> {
        self.broker
            .as_ref()
            .map(BrokerUrl::password)
            .filter(|p| !p.is_empty())
    }
}

/// Default seconds between a shovel's reconnection attempts.
pub const DEFAULT_RECONNECT_DELAY: Duration = Duration::from_secs(5);

/// Exchange names (SPEC §3), all configurable.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchanges {
    pub report: String,
    pub rejected: String,
    pub public: String,
}

#[derive(Debug, Clone)]
pub struct RouteSettings {
    pub relpath_pattern: Regex,
    pub index_size: usize,
    pub max_body: usize,
    pub prefetch: u16,
    pub queue_type: QueueType,
    /// Bytes of messages route holds at most while their publish is unconfirmed.
    pub max_inflight_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpeedoSettings {
    pub interval: Duration,
    pub all_interval: Duration,
    pub expire: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServeSettings {
    pub listen: String,
    pub history: Duration,
    /// Who may look (`serve --auth`).
    pub auth: AuthMode,
    /// How long a login the broker accepted is remembered (0: ask every time).
    pub login_cache: Duration,
    /// The environment variable holding the bearer token `/metrics` also accepts (never
    /// the token itself in the file).
    pub metrics_token_env: Option<String>,
    /// PEM certificate chain and private key: serve HTTPS itself.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Reverse proxies whose `X-Forwarded-For` names the client (for the login limits).
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

/// How `serve` tells who is looking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// HTTP Basic with the person's own pump account, checked against the broker.
    #[default]
    Broker,
    /// Nobody logs in and everyone sees everything: only for a loopback address, or a
    /// pump that declares no users.
    None,
}

impl AuthMode {
    pub fn name(self) -> &'static str {
        match self {
            AuthMode::Broker => "broker",
            AuthMode::None => "none",
        }
    }
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most 128 bytes.
pub fn is_valid_env_name(name: &str) -> bool {
    name.len() <= 128
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// When `archive` makes what it wrote durable before it acks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// `fsync` after every batch, before the acks: a power cut loses nothing acked.
    EveryBatch,
    /// Acks once written to the OS, `fsync` this often: a crash of the process loses
    /// nothing, a power cut at most this much.
    Interval(Duration),
}

/// `[archive]` (SPEC §4.10): present when the pump keeps an archive, so `setup` declares
/// its queue. Flags of `pumpwatch archive` override each key.
#[derive(Debug, Clone)]
pub struct ArchiveSettings {
    /// The archive root: files go to `<dir>/<cluster>/YYYY/MM/DD/HH.log`.
    pub dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub fsync: Fsync,
    /// Hours older than this many days are removed; `None` keeps everything.
    pub retention_days: Option<u32>,
    /// Reports written (and acked) together at most.
    pub batch: usize,
    pub zstd_level: i32,
    /// Only reports passing this are archived (`log`'s filters).
    pub filter: crate::core::filter::Filter,
}

/// `[watchdog]` (SPEC §7): the core's rules plus what the daemon does on a failure.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchdogSettings {
    /// node_timeout, stuck_after, max_inflight, max_bytes, reorder_window, forget_after,
    /// max_nodes.
    pub rules: crate::core::watchdog::Settings,
    /// Re-announce a failed node's products on `repost_exchange`.
    pub repost: bool,
    /// Default: the public exchange (`xpublic`).
    pub repost_exchange: String,
    /// Where the daemon serves `/api/inflight` (its `--listen` default).
    pub listen: String,
    /// Its `--state-dir` default (none: the flag is required).
    pub state_dir: Option<PathBuf>,
}

/// Where `watchdog` listens and `inflight` asks when neither is told.
pub const DEFAULT_WATCHDOG_LISTEN: &str = "127.0.0.1:8090";

/// Most open transfers the watchdog core can hold (its slot index is 24 bits).
pub const MAX_WATCHDOG_INFLIGHT: usize = 16_777_214;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from, for messages (`built-in defaults` when no file).
    pub origin: String,
    /// The file it was read from, to read again (`serve` on SIGHUP); `None` for defaults
    /// and text parsed in code.
    pub path: Option<PathBuf>,
    pub cluster: String,
    pub broker: Option<String>,
    pub admin_url: Option<String>,
    pub users: BTreeMap<String, User>,
    pub default_thresholds: Thresholds,
    pub thresholds: BTreeMap<String, Thresholds>,
    pub neighbours: BTreeMap<String, Neighbour>,
    pub exchanges: Exchanges,
    pub route: RouteSettings,
    pub speedo: SpeedoSettings,
    pub serve: ServeSettings,
    pub archive: Option<ArchiveSettings>,
    /// `Some` when the file has a `[watchdog]` table (then `setup` declares its queue).
    pub watchdog: Option<WatchdogSettings>,
}

impl Default for Config {
    fn default() -> Self {
        // The built-in defaults always validate.
        Config::from_raw(RawConfig::default(), "built-in defaults")
            .unwrap_or_else(|e| unreachable!("built-in defaults are valid: {e}"))
    }
}

impl Config {
    /// `--config FILE` if given, else `./pumpwatch.toml` if present, else defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => Config::from_file(p),
            None => {
                let p = PathBuf::from("pumpwatch.toml");
                if p.exists() {
                    Config::from_file(&p)
                } else {
                    Ok(Config::default())
                }
            }
        }
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        let mut c = Config::parse(&text, &file)?;
        c.path = Some(path.to_owned());
        Ok(c)
    }

    /// Parses TOML text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let start = e.span().map_or(0, |s| s.start.min(text.len()));
            let line = text[..start].matches('\n').count() + 1;
            let reason = e.message().replace('\n', " ");
            let reason = match key_at(text, line) {
                Some(key) => format!("{key}: {reason}"),
                None => reason,
            };
            ConfigError::Syntax {
                file: file.to_owned(),
                line,
                reason,
            }
        })?;
        Config::from_raw(raw, file)
    }

    fn from_raw(raw: RawConfig, file: &str) -> Result<Config, ConfigError> {
        let bad = |key: String, reason: String| ConfigError::Value {
            file: file.to_owned(),
            key,
            reason,
        };
        let dur =
            |key: &str, v: Option<RawDuration>, default: u64| -> Result<Duration, ConfigError> {
                match v {
                    Some(d) => d.get().map_err(|r| bad(key.to_owned(), r)),
                    None => Ok(Duration::from_secs(default)),
                }
            };
        let check_name = |key: String, name: &str| -> Result<(), ConfigError> {
            if is_valid_name(name) {
                Ok(())
            } else {
                Err(bad(key, NAME_RULE.into()))
            }
        };
        let mut users = BTreeMap::new();
        for (name, u) in raw.users {
            check_name(format!("users.{}", key_word(&name)), &name)?;
            let interval = match u.interval {
                Some(d) => Some(
                    d.get()
                        .map_err(|r| bad(format!("users.{name}.interval"), r))?,
                ),
                None => None,
            };
            users.insert(
                name.clone(),
                User {
                    name,
                    role: u.role,
                    password_env: u.password_env,
                    retain: u.retain.unwrap_or(0),
                    interval,
                },
            );
        }
        let mut default_thresholds = Thresholds::default();
        let mut thresholds = BTreeMap::new();
        // `default` first, so per-name tables inherit from it.
        let mut raw_thresholds = raw.thresholds;
        if let Some(d) = raw_thresholds.remove("default") {
            default_thresholds =
                thresholds_from(d, default_thresholds, "thresholds.default", &bad)?;
        }
        for (name, t) in raw_thresholds {
            let key = format!("thresholds.{}", key_word(&name));
            check_name(key.clone(), &name)?;
            thresholds.insert(name, thresholds_from(t, default_thresholds, &key, &bad)?);
        }
        let cluster = raw.cluster.unwrap_or_else(|| "localhost".into());
        if !is_valid_cluster_name(&cluster) {
            return Err(bad("cluster".into(), CLUSTER_RULE.into()));
        }
        let neighbours = neighbours_from(raw.clusters, &cluster, &bad)?;
        let pattern = raw
            .route
            .relpath_pattern
            .as_deref()
            .unwrap_or(DEFAULT_RELPATH_PATTERN);
        let relpath_pattern = Regex::new(pattern).map_err(|e| {
            bad(
                "route.relpath_pattern".into(),
                e.to_string().replace('\n', " "),
            )
        })?;
        if relpath_pattern.capture_names().all(|n| n != Some("source")) {
            return Err(bad(
                "route.relpath_pattern".into(),
                "needs a named group (?P<source>...)".into(),
            ));
        }
        let prefetch = raw.route.prefetch.unwrap_or(500);
        if prefetch == 0 {
            return Err(bad("route.prefetch".into(), "must be at least 1".into()));
        }
        let speedo = SpeedoSettings {
            interval: dur("speedo.interval", raw.speedo.interval, 60)?,
            all_interval: dur("speedo.all_interval", raw.speedo.all_interval, 1)?,
            expire: dur("speedo.expire", raw.speedo.expire, 24 * 3600)?,
        };
        for (k, d) in [
            ("speedo.interval", speedo.interval),
            ("speedo.all_interval", speedo.all_interval),
        ] {
            if d < Duration::from_millis(100) {
                return Err(bad(k.into(), "must be at least 0.1 s".into()));
            }
        }
        let archive = match raw.archive {
            Some(a) => Some(archive_from(a, &bad)?),
            None => None,
        };
        let exchanges = Exchanges {
            report: raw.exchanges.report.unwrap_or_else(|| "xreport".into()),
            rejected: raw.exchanges.rejected.unwrap_or_else(|| "xrejected".into()),
            public: raw.exchanges.public.unwrap_or_else(|| "xpublic".into()),
        };
        let watchdog = match raw.watchdog {
            Some(w) => Some(watchdog_from(w, &exchanges, &bad)?),
            None => None,
        };
        Ok(Config {
            origin: file.to_owned(),
            path: None,
            cluster,
            broker: raw.broker,
            admin_url: raw.admin_url,
            users,
            default_thresholds,
            thresholds,
            neighbours,
            exchanges,
            route: RouteSettings {
                relpath_pattern,
                index_size: raw.route.index_size.unwrap_or(100_000),
                max_body: raw
                    .route
                    .max_body
                    .unwrap_or(crate::core::report::DEFAULT_MAX_BODY),
                prefetch,
                queue_type: raw.route.queue_type.unwrap_or_default(),
                max_inflight_bytes: raw.route.max_inflight_bytes.unwrap_or(64 << 20),
            },
            speedo,
            serve: serve_from(raw.serve, file)?,
            archive,
            watchdog,
        })
    }

    /// The `[watchdog]` table, or its defaults when the file has none.
    pub fn watchdog_settings(&self) -> WatchdogSettings {
        self.watchdog.clone().unwrap_or_else(|| WatchdogSettings {
            rules: crate::core::watchdog::Settings::default(),
            repost: false,
            repost_exchange: self.exchanges.public.clone(),
            listen: DEFAULT_WATCHDOG_LISTEN.into(),
            state_dir: None,
        })
    }

    /// Thresholds for a client or source name.
    pub fn thresholds_for(&self, name: &str) -> Thresholds {
        self.thresholds
            .get(name)
            .copied()
            .unwrap_or(self.default_thresholds)
    }

    pub fn role_of(&self, user: &str) -> Option<Role> {
        self.users.get(user).map(|u| u.role)
    }

    /// The attribution rules of SPEC §2 for this pump (one for every component).
    pub fn attributor(&self) -> crate::core::attribution::Attributor {
        crate::core::attribution::Attributor::new(
            self.accounts(),
            self.route.relpath_pattern.clone(),
        )
    }

    /// The declared accounts, as attribution sees them.
    pub fn accounts(&self) -> crate::core::attribution::Accounts {
        let mut a = crate::core::attribution::Accounts::default();
        for u in self.users.values() {
            match u.role {
                Role::Source => {
                    a.sources.insert(u.name.clone());
                }
                Role::Cluster => {
                    a.clusters.insert(u.name.clone());
                }
                _ => {
                    a.others.insert(u.name.clone());
                }
            }
        }
        a
    }

    pub fn sources(&self) -> impl Iterator<Item = &User> {
        self.users.values().filter(|u| u.role == Role::Source)
    }
}

/// What a user, source, client or cluster name may be (SPEC §2 "Names").
pub const NAME_RULE: &str = "a name is 1 to 64 of A-Z a-z 0-9 _ - (no dots: they would let \
     one account's permissions match another's queues)";

/// `[A-Za-z0-9_-]{1,64}`: a name that can be put into queue names and anchored permission
/// patterns without one account's pattern matching another's objects.
pub fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// What a cluster (pump) name may be.
pub const CLUSTER_RULE: &str = "a cluster name is 1 to 64 of A-Z a-z 0-9 _ - . (a host-like name)";

/// Cluster names are host-like (`ddsr.cmc`, as Sarracenia's `from_cluster` carries them):
/// dots are allowed, since a cluster name never enters a permission pattern; `#`, `*`,
/// spaces and the rest are not, since it becomes part of exchange names and binding keys.
pub fn is_valid_cluster_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A table name as a key of an error message: as it is when it is a valid cluster name (so
/// a plain name), else quoted and escaped (`users."sat.x"`, `users."a\nb"`), so the
/// message stays one line and shows exactly what was refused.
fn key_word(name: &str) -> String {
    if is_valid_cluster_name(name) && !name.contains('.') {
        name.to_owned()
    } else {
        crate::core::text::quoted(name)
    }
}

/// The dotted key set on `line` (1-based), e.g. `speedo.interval`, for error messages.
fn key_at(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let here = lines.get(line.checked_sub(1)?)?.trim();
    let (key, _) = here.split_once('=')?;
    let key = key.trim().trim_matches('"');
    let table = lines[..line - 1]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').replace('"', ""));
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_owned(),
    })
}

fn serve_from(raw: RawServe, file: &str) -> Result<ServeSettings, ConfigError> {
    let bad = |key: &str, reason: String| ConfigError::Value {
        file: file.to_owned(),
        key: format!("serve.{key}"),
        reason,
    };
    let dur = |key: &str, v: Option<RawDuration>, default: u64| match v {
        Some(d) => d.get().map_err(|r| bad(key, r)),
        None => Ok(Duration::from_secs(default)),
    };
    let login_cache = dur("login_cache", raw.login_cache, 60)?;
    if login_cache > Duration::from_secs(3600) {
        return Err(bad(
            "login_cache",
            "at most 3600 s: a changed password must stop working soon".into(),
        ));
    }
    if let Some(v) = &raw.metrics_token_env
        && !is_valid_env_name(v)
    {
        return Err(bad(
            "metrics_token_env",
            format!(
                "{} is not an environment variable name (the token goes in the environment, not in this file)",
                crate::core::text::quoted(v)
            ),
        ));
    }
    match (&raw.tls_cert, &raw.tls_key) {
        (Some(_), None) => return Err(bad("tls_key", "tls_cert needs tls_key too".into())),
        (None, Some(_)) => return Err(bad("tls_cert", "tls_key needs tls_cert too".into())),
        _ => {}
    }
    let mut trusted_proxies = Vec::new();
    for p in raw.trusted_proxies.unwrap_or_default() {
        trusted_proxies.push(p.parse().map_err(|_| {
            bad(
                "trusted_proxies",
                format!("{} is not an IP address", crate::core::text::quoted(&p)),
            )
        })?);
    }
    Ok(ServeSettings {
        listen: raw.listen.unwrap_or_else(|| "127.0.0.1:8080".into()),
        history: dur("history", raw.history, 3600)?,
        auth: raw.auth.unwrap_or_default(),
        login_cache,
        metrics_token_env: raw.metrics_token_env,
        tls_cert: raw.tls_cert,
        tls_key: raw.tls_key,
        trusted_proxies,
    })
}

/// Default and bounds of `[archive]` keys (also used for the flags).
pub const ARCHIVE_BATCH: usize = 500;
pub const ARCHIVE_BATCH_MAX: usize = 10_000;
pub const ARCHIVE_ZSTD_LEVEL: i32 = 6;

fn archive_from(
    a: RawArchive,
    bad: &dyn Fn(String, String) -> ConfigError,
) -> Result<ArchiveSettings, ConfigError> {
    let key = |k: &str| format!("archive.{k}");
    let fsync = match (a.fsync.as_deref(), a.fsync_interval) {
        (None | Some("every-batch"), None) => Fsync::EveryBatch,
        (Some("every-batch") | None, Some(_)) => {
            return Err(bad(
                key("fsync_interval"),
                "only with fsync = \"interval\"".into(),
            ));
        }
        (Some("interval"), i) => Fsync::Interval(match i {
            Some(d) => d.get().map_err(|r| bad(key("fsync_interval"), r))?,
            None => Duration::from_secs(1),
        }),
        (Some(other), _) => {
            return Err(bad(
                key("fsync"),
                format!("{other:?}: expected \"every-batch\" or \"interval\""),
            ));
        }
    };
    if let Fsync::Interval(d) = fsync
        && (d.is_zero() || d > Duration::from_secs(3600))
    {
        return Err(bad(
            key("fsync_interval"),
            "must be between 0 and 1 h".into(),
        ));
    }
    if a.retention_days == Some(0) {
        return Err(bad(
            key("retention_days"),
            "must be at least 1 (leave it out to keep everything)".into(),
        ));
    }
    let batch = a.batch.unwrap_or(ARCHIVE_BATCH);
    if !(1..=ARCHIVE_BATCH_MAX).contains(&batch) {
        return Err(bad(
            key("batch"),
            format!("must be 1 to {ARCHIVE_BATCH_MAX}"),
        ));
    }
    let zstd_level = a.zstd_level.unwrap_or(ARCHIVE_ZSTD_LEVEL);
    if !(1..=19).contains(&zstd_level) {
        return Err(bad(key("zstd_level"), "must be 1 to 19".into()));
    }
    if let Some(l) = &a.listen {
        use std::net::ToSocketAddrs;
        if l.to_socket_addrs()
            .map(|mut i| i.next().is_none())
            .unwrap_or(true)
        {
            return Err(bad(
                key("listen"),
                format!("{l:?} is not a host:port address"),
            ));
        }
    }
    if a.dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
        return Err(bad(key("dir"), "must not be empty".into()));
    }
    let code = match &a.code {
        Some(c) => Some(
            c.parse()
                .map_err(|e: crate::core::code::CodeRangeError| bad(key("code"), e.to_string()))?,
        ),
        None => None,
    };
    let file = match &a.file {
        Some(f) => {
            Some(Regex::new(f).map_err(|e| bad(key("file"), e.to_string().replace('\n', " ")))?)
        }
        None => None,
    };
    Ok(ArchiveSettings {
        dir: a.dir,
        listen: a.listen,
        fsync,
        retention_days: a.retention_days,
        batch,
        zstd_level,
        filter: crate::core::filter::Filter {
            pattern: None,
            source: a.source,
            client: a.client,
            host: a.host,
            file,
            flow: a.flow,
            code,
            cluster: a.cluster,
        },
    })
}

fn watchdog_from(
    w: RawWatchdog,
    exchanges: &Exchanges,
    bad: &dyn Fn(String, String) -> ConfigError,
) -> Result<WatchdogSettings, ConfigError> {
    let base = crate::core::watchdog::Settings::default();
    let d = |name: &str, v: Option<RawDuration>, dflt: Duration| -> Result<Duration, ConfigError> {
        let v = match v {
            Some(v) => v.get().map_err(|r| bad(format!("watchdog.{name}"), r))?,
            None => dflt,
        };
        if v < Duration::from_millis(100) {
            return Err(bad(
                format!("watchdog.{name}"),
                "must be at least 0.1 s".into(),
            ));
        }
        Ok(v)
    };
    let count = |name: &str, v: Option<usize>, dflt: usize, max: usize| {
        let v = v.unwrap_or(dflt);
        if (1..=max).contains(&v) {
            Ok(v)
        } else {
            Err(bad(
                format!("watchdog.{name}"),
                format!("must be 1 to {max}"),
            ))
        }
    };
    let rules = crate::core::watchdog::Settings {
        node_timeout: d("node_timeout", w.node_timeout, base.node_timeout)?,
        stuck_after: d("stuck_after", w.stuck_after, base.stuck_after)?,
        max_inflight: count(
            "max_inflight",
            w.max_inflight,
            base.max_inflight,
            MAX_WATCHDOG_INFLIGHT,
        )?,
        max_bytes: count("max_bytes", w.max_bytes, base.max_bytes, usize::MAX)?,
        reorder_window: d("reorder_window", w.reorder_window, base.reorder_window)?,
        forget_after: d("forget_after", w.forget_after, base.forget_after)?,
        max_nodes: count("max_nodes", w.max_nodes, base.max_nodes, 1_000_000)?,
    };
    if rules.max_bytes < 1 << 20 {
        return Err(bad(
            "watchdog.max_bytes".into(),
            "must be at least 1048576 (1 MiB)".into(),
        ));
    }
    if rules.forget_after <= rules.node_timeout {
        return Err(bad(
            "watchdog.forget_after".into(),
            "must be longer than watchdog.node_timeout (a failure must be seen before its \
             transfers are forgotten)"
                .into(),
        ));
    }
    let repost_exchange = w
        .repost_exchange
        .unwrap_or_else(|| exchanges.public.clone());
    if repost_exchange.is_empty() || repost_exchange.len() > 255 {
        return Err(bad(
            "watchdog.repost_exchange".into(),
            "an exchange name is 1 to 255 bytes".into(),
        ));
    }
    if repost_exchange == exchanges.report {
        return Err(bad(
            "watchdog.repost_exchange".into(),
            format!(
                "{repost_exchange:?} is the report exchange; reposts are announcements \
                 (e.g. {:?})",
                exchanges.public
            ),
        ));
    }
    if w.state_dir
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        return Err(bad("watchdog.state_dir".into(), "is empty".into()));
    }
    Ok(WatchdogSettings {
        rules,
        repost: w.repost.unwrap_or(false),
        repost_exchange,
        listen: w.listen.unwrap_or_else(|| DEFAULT_WATCHDOG_LISTEN.into()),
        state_dir: w.state_dir,
    })
}

/// `[clusters.<name>]` (SPEC §4.8), validated: names, exactly one of `broker` (a
/// neighbour, with the account this pump uses there) or `via` (a pump further away),
/// and every `via` chain ending at a neighbour, so `route` always has a next hop with a
/// shovel behind it.
fn neighbours_from(
    raw: BTreeMap<String, RawCluster>,
    this_pump: &str,
    bad: &dyn Fn(String, String) -> ConfigError,
) -> Result<BTreeMap<String, Neighbour>, ConfigError> {
    let mut out = BTreeMap::new();
    for (name, c) in raw {
        let key = format!("clusters.{}", key_word(&name));
        if !is_valid_cluster_name(&name) {
            return Err(bad(key, CLUSTER_RULE.into()));
        }
        if name == this_pump {
            return Err(bad(
                key,
                format!(
                    "is this pump's own name (cluster = {this_pump:?}); a pump does not forward to itself"
                ),
            ));
        }
        let broker = match (&c.broker, &c.via) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    key,
                    "has both broker and via: a neighbour has broker, a pump further away has \
                     via"
                    .into(),
                ));
            }
            (None, None) => {
                return Err(bad(
                    key,
                    "needs broker = \"amqp://ACCOUNT@host/vhost\" (a neighbour) or via = \
                     \"<cluster>\" (a pump further away)"
                        .into(),
                ));
            }
            (Some(text), None) => {
                Some(neighbour_url(text).map_err(|r| bad(format!("{key}.broker"), r))?)
            }
            (None, Some(_)) => None,
        };
        let broker_options = c
            .broker
            .as_deref()
            .and_then(|t| url::Url::parse(t.trim()).ok())
            .and_then(|u| u.query().map(str::to_owned))
            .filter(|q| !q.is_empty());
        if broker.is_none() {
            for (field, set) in [
                ("password_env", c.password_env.is_some()),
                ("reconnect_delay", c.reconnect_delay.is_some()),
            ] {
                if set {
                    return Err(bad(
                        format!("{key}.{field}"),
                        "only for a neighbour (with broker); this pump is reached via another"
                            .into(),
                    ));
                }
            }
        }
        if c.password_env.as_deref() == Some("") {
            return Err(bad(format!("{key}.password_env"), "is empty".into()));
        }
        let reconnect_delay = match c.reconnect_delay {
            Some(d) => d
                .get()
                .map_err(|r| bad(format!("{key}.reconnect_delay"), r))?,
            None => DEFAULT_RECONNECT_DELAY,
        };
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&reconnect_delay)
            || reconnect_delay.subsec_nanos() != 0
        {
            return Err(bad(
                format!("{key}.reconnect_delay"),
                "must be whole seconds from 1 to 3600".into(),
            ));
        }
        out.insert(
            name.clone(),
            Neighbour {
                next_hop: name.clone(),
                name,
                via: c.via,
                broker,
                broker_options,
                password_env: c.password_env,
                reconnect_delay,
            },
        );
    }
    // Follow each `via` chain to its neighbour; a chain that comes back on itself or
    // names nothing declared never reaches one.
    let mut hops = BTreeMap::new();
    for n in out.values() {
        let mut path = vec![n.name.as_str()];
        let mut at = n;
        while let Some(via) = &at.via {
            let key = format!("clusters.{}.via", key_word(&at.name));
            at = match out.get(via) {
                Some(next) => next,
                None if via == this_pump => {
                    return Err(bad(
                        key,
                        format!(
                            "names this pump ({via:?}); via names the neighbour reports go through"
                        ),
                    ));
                }
                None => return Err(bad(key, format!("names no declared cluster {via:?}"))),
            };
            if path.contains(&at.name.as_str()) {
                path.push(&at.name);
                return Err(bad(
                    format!("clusters.{}.via", key_word(&n.name)),
                    format!("never reaches a neighbour: {}", path.join(" -> ")),
                ));
            }
            path.push(&at.name);
        }
        hops.insert(n.name.clone(), at.name.clone());
    }
    for (name, hop) in hops {
        if let Some(n) = out.get_mut(&name) {
            n.next_hop = hop;
        }
    }
    Ok(out)
}

/// A neighbour's `broker`: an AMQP URL naming the account this pump uses there (no
/// default `guest`: that account is what the neighbour declares with role `cluster`).
fn neighbour_url(text: &str) -> Result<BrokerUrl, String> {
    let url = BrokerUrl::parse(text).map_err(|e| e.to_string())?;
    let has_user = url::Url::parse(text.trim()).is_ok_and(|u| !u.username().is_empty());
    if !has_user {
        return Err(format!(
            "{}: needs the account this pump uses there (amqp://ACCOUNT@host/vhost)",
            crate::broker::url::redact(text.trim())
        ));
    }
    if !is_valid_name(url.user()) {
        return Err(format!("account {:?}: {NAME_RULE}", url.user()));
    }
    Ok(url)
}

fn thresholds_from(
    t: RawThresholds,
    base: Thresholds,
    key: &str,
    bad: &dyn Fn(String, String) -> ConfigError,
) -> Result<Thresholds, ConfigError> {
    let d = |name: &str, v: Option<RawDuration>, dflt: Duration| match v {
        Some(v) => v.get().map_err(|r| bad(format!("{key}.{name}"), r)),
        None => Ok(dflt),
    };
    let max_lag = match t.max_lag {
        // 0 turns the rule off (e.g. for one client when the default sets it).
        Some(v) => {
            Some(v.get().map_err(|r| bad(format!("{key}.max_lag"), r))?).filter(|d| !d.is_zero())
        }
        None => base.max_lag,
    };
    let min_transfers = match t.min_transfers {
        Some(n) => u64::try_from(n)
            .map_err(|_| bad(format!("{key}.min_transfers"), "must be 0 or more".into()))?,
        None => base.min_transfers,
    };
    let min_samples = match t.min_samples {
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| (1..=520).contains(n))
            .ok_or_else(|| {
                bad(
                    format!("{key}.min_samples"),
                    "must be a number of weeks from 1 to 520".into(),
                )
            })?,
        None => base.min_samples,
    };
    let out = Thresholds {
        td: d("td", t.td, base.td)?,
        tminr: t.tminr.unwrap_or(base.tminr),
        window: d("window", t.window, base.window)?,
        max_error_ratio: t.max_error_ratio.unwrap_or(base.max_error_ratio),
        min_transfers,
        k: t.k.unwrap_or(base.k),
        min_samples,
        max_lag,
    };
    if !(out.k.is_finite() && out.k >= 0.0 && out.k <= 100.0) {
        return Err(bad(
            format!("{key}.k"),
            "must be a number of standard deviations from 0 to 100".into(),
        ));
    }
    if !(out.tminr.is_finite() && out.tminr >= 0.0) {
        return Err(bad(format!("{key}.tminr"), "must be a rate >= 0".into()));
    }
    if !(0.0..=1.0).contains(&out.max_error_ratio) {
        return Err(bad(
            format!("{key}.max_error_ratio"),
            "must be between 0 and 1".into(),
        ));
    }
    if out.window.is_zero() {
        return Err(bad(format!("{key}.window"), "must be positive".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
cluster = "ddsr.cmc"
[users.radar]
role = "source"
password_env = "PW_RADAR"
retain = 1000
[users.cfs]
role = "subscriber"
[thresholds.default]
td = 300
tminr = 0.01
window = "10m"
[thresholds.cfs]
td = 60
[speedo]
interval = "1m"
"#;

    #[test]
    fn spec_sample() {
        let c = Config::parse(SAMPLE, "t.toml").unwrap();
        assert_eq!(c.cluster, "ddsr.cmc");
        assert_eq!(c.role_of("radar"), Some(Role::Source));
        assert_eq!(c.users["radar"].retain, 1000);
        assert_eq!(c.thresholds_for("cfs").td, Duration::from_secs(60));
        assert_eq!(c.thresholds_for("cfs").window, Duration::from_secs(600));
        assert_eq!(c.thresholds_for("other").td, Duration::from_secs(300));
        assert_eq!(c.speedo.interval, Duration::from_secs(60));
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let table = [
            ("colour = 1", "t.toml:1", "colour"),
            ("[users.x]\nrole = \"king\"", "t.toml:2", "king"),
            (
                "[users.x]\nrole = \"source\"\npasword_env = \"A\"",
                "t.toml:3",
                "pasword_env",
            ),
            ("[thresholds.cfs]\ntd = \"soon\"", "t.toml", "soon"),
            (
                "[thresholds.cfs]\nmax_error_ratio = 2.0",
                "thresholds.cfs.max_error_ratio",
                "between 0 and 1",
            ),
            (
                "[route]\nrelpath_pattern = \"(\"",
                "route.relpath_pattern",
                "regex",
            ),
            (
                "[route]\nrelpath_pattern = \"^x\"",
                "route.relpath_pattern",
                "(?P<source>",
            ),
            ("[clusters.a]\nvia = \"b\"", "clusters.a.via", "\"b\""),
            (
                "[users.\"sat.x\"]\nrole = \"source\"",
                "users.\"sat.x\"",
                "no dots",
            ),
            (
                "[users.\"a\\nb\"]\nrole = \"source\"",
                "users.\"a\\nb\"",
                "no dots",
            ),
            (
                "[thresholds.\"x y\"]\ntd = 1",
                "thresholds.\"x y\"",
                "no dots",
            ),
            (
                "[speedo]\ninterval = -5",
                "speedo.interval",
                "invalid duration",
            ),
            ("[archive]\nfsync = \"never\"", "archive.fsync", "never"),
            (
                "[archive]\nfsync_interval = 5",
                "archive.fsync_interval",
                "interval",
            ),
            (
                "[archive]\nretention_days = 0",
                "archive.retention_days",
                "at least 1",
            ),
            ("[archive]\ncode = \"6xy\"", "archive.code", "6xy"),
            ("[archive]\nfile = \"(\"", "archive.file", "regex"),
            (
                "[archive]\nlisten = \"nowhere\"",
                "archive.listen",
                "host:port",
            ),
            ("[archive]\nbatch = 0", "archive.batch", "1 to"),
            ("[archive]\ndirr = \"x\"", "t.toml:2", "dirr"),
            ("[thresholds.cfs]\nk = -1.0", "thresholds.cfs.k", "0 to 100"),
            ("[thresholds.cfs]\nk = nan", "thresholds.cfs.k", "0 to 100"),
            (
                "[thresholds.default]\nmin_samples = 0",
                "thresholds.default.min_samples",
                "1 to 520",
            ),
            (
                "[thresholds.cfs]\nmin_transfers = -3",
                "thresholds.cfs.min_transfers",
                "0 or more",
            ),
            (
                "[thresholds.cfs]\nmax_lag = \"soon\"",
                "thresholds.cfs.max_lag",
                "soon",
            ),
            (
                "[thresholds.cfs]\nmin_samples = 1.5",
                "t.toml:2",
                "min_samples",
            ),
            ("[watchdog]\nnode_timout = 5", "t.toml:2", "node_timout"),
            (
                "[watchdog]\nnode_timeout = 0",
                "watchdog.node_timeout",
                "at least 0.1 s",
            ),
            (
                "[watchdog]\nmax_inflight = 0",
                "watchdog.max_inflight",
                "must be 1 to",
            ),
            (
                "[watchdog]\nmax_inflight = 20000000",
                "watchdog.max_inflight",
                "16777214",
            ),
            (
                "[watchdog]\nrepost_exchange = \"xreport\"",
                "watchdog.repost_exchange",
                "report exchange",
            ),
            (
                "[watchdog]\nnode_timeout = \"2h\"\nforget_after = \"1h\"",
                "watchdog.forget_after",
                "longer than",
            ),
            (
                "[watchdog]\nmax_bytes = 1000",
                "watchdog.max_bytes",
                "1 MiB",
            ),
            ("[watchdog]\nrepost = \"yes\"", "t.toml:2", "repost"),
        ];
        for (text, want_where, want_what) in table {
            let e = Config::parse(text, "t.toml").unwrap_err().to_string();
            assert!(
                e.contains(want_where) && e.contains(want_what),
                "{text:?}: {e}"
            );
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn clusters_resolve_their_next_hop() {
        let c = Config::parse(
            "cluster = \"ddsr.c\"\n\
             [clusters.\"ddsr.b\"]\nbroker = \"amqp://from-c:s3cret@pump-b:5672/b\"\n\
             reconnect_delay = 2\n\
             [clusters.\"ddsr.a\"]\nvia = \"ddsr.b\"\n\
             [clusters.far]\nvia = \"ddsr.a\"\n\
             [clusters.east]\nbroker = \"amqps://c@east/\"\npassword_env = \"PW_EAST\"\n",
            "t.toml",
        )
        .unwrap();
        let hop = |n: &str| c.neighbours[n].next_hop.as_str();
        assert_eq!(
            (hop("ddsr.b"), hop("ddsr.a"), hop("far"), hop("east")),
            ("ddsr.b", "ddsr.b", "ddsr.b", "east")
        );
        let b = &c.neighbours["ddsr.b"];
        assert_eq!(b.account(), Some("from-c"));
        assert_eq!(b.url_password(), Some("s3cret"));
        assert_eq!(b.reconnect_delay, Duration::from_secs(2));
        assert!(!format!("{c:?}").contains("s3cret"), "Debug hides it");
        let east = &c.neighbours["east"];
        assert_eq!((east.account(), east.url_password()), (Some("c"), None));
        assert_eq!(east.password_env.as_deref(), Some("PW_EAST"));
        assert_eq!(east.reconnect_delay, DEFAULT_RECONNECT_DELAY);
        assert_eq!(c.neighbours["far"].account(), None);
    }

    #[test]
    fn cluster_errors_name_the_key_and_never_the_password() {
        let table = [
            (
                "cluster = \"a\"\n[clusters.a]\nbroker = \"amqp://x@h/\"",
                "clusters.a",
                "own name",
            ),
            (
                "[clusters.a]\nbroker = \"amqp://x@h/\"\nvia = \"b\"",
                "clusters.a",
                "both broker and via",
            ),
            ("[clusters.a]", "clusters.a", "needs broker"),
            (
                "[clusters.a]\nbroker = \"amqp://h/\"",
                "clusters.a.broker",
                "needs the account",
            ),
            (
                "[clusters.a]\nbroker = \"http://u:hunter22@h/\"",
                "clusters.a.broker",
                "scheme",
            ),
            (
                "[clusters.a]\nbroker = \"amqp://u:hunter22@h:port/\"",
                "clusters.a.broker",
                "invalid",
            ),
            (
                "[clusters.a]\nbroker = \"amqp://a.b:hunter22@h/\"",
                "clusters.a.broker",
                "no dots",
            ),
            (
                "[clusters.a]\nvia = \"b\"\n[clusters.b]\nvia = \"a\"",
                "clusters.a.via",
                "never reaches a neighbour: a -> b -> a",
            ),
            (
                "[clusters.a]\nvia = \"a\"",
                "clusters.a.via",
                "never reaches a neighbour: a -> a",
            ),
            (
                "[clusters.a]\nvia = \"b\"\n[clusters.b]\nvia = \"c\"",
                "clusters.b.via",
                "no declared cluster \"c\"",
            ),
            (
                "cluster = \"me\"\n[clusters.a]\nvia = \"me\"",
                "clusters.a.via",
                "names this pump",
            ),
            (
                "[clusters.a]\nvia = \"b\"\npassword_env = \"P\"\n[clusters.b]\nbroker = \"amqp://u@h/\"",
                "clusters.a.password_env",
                "only for a neighbour",
            ),
            (
                "[clusters.b]\nbroker = \"amqp://u@h/\"\nreconnect_delay = 0.5",
                "clusters.b.reconnect_delay",
                "whole seconds",
            ),
            (
                "[clusters.b]\nbroker = \"amqp://u@h/\"\nreconect_delay = 5",
                "t.toml:3",
                "reconect_delay",
            ),
            (
                "[clusters.\"a b\"]\nbroker = \"amqp://u@h/\"",
                "clusters.\"a b\"",
                "cluster name",
            ),
        ];
        for (text, want_where, want_what) in table {
            let e = Config::parse(text, "t.toml").unwrap_err().to_string();
            assert!(
                e.contains(want_where) && e.contains(want_what),
                "{text:?}: {e}"
            );
            assert!(!e.contains("hunter22"), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn archive_table() {
        assert!(Config::default().archive.is_none());
        let c = Config::parse(
            "[archive]\ndir = \"/a\"\nfsync = \"interval\"\nretention_days = 30\ncode = \"4xx\"",
            "t.toml",
        )
        .unwrap();
        let a = c.archive.unwrap();
        assert_eq!(a.dir.as_deref(), Some(Path::new("/a")));
        assert_eq!(a.fsync, Fsync::Interval(Duration::from_secs(1)));
        assert_eq!(a.retention_days, Some(30));
        assert!(a.filter.code.unwrap().contains(499));
        let a = Config::parse("[archive]", "t.toml")
            .unwrap()
            .archive
            .unwrap();
        assert_eq!((a.fsync, a.batch), (Fsync::EveryBatch, ARCHIVE_BATCH));
    }

    #[test]
    fn serve_table() {
        let c = Config::parse(
            "[serve]\nauth = \"none\"\nlogin_cache = 30\nmetrics_token_env = \"PW_METRICS\"\n\
             tls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\ntrusted_proxies = [\"127.0.0.1\", \"::1\"]\n",
            "t.toml",
        )
        .unwrap()
        .serve;
        assert_eq!(c.auth, AuthMode::None);
        assert_eq!(c.login_cache, Duration::from_secs(30));
        assert_eq!(c.metrics_token_env.as_deref(), Some("PW_METRICS"));
        assert_eq!(c.trusted_proxies.len(), 2);
        let d = Config::default().serve;
        assert_eq!(
            (d.auth, d.login_cache),
            (AuthMode::Broker, Duration::from_secs(60))
        );
        for (text, key) in [
            ("[serve]\nauth = \"maybe\"", "serve.auth"),
            (
                "[serve]\nmetrics_token_env = \"s3cret token\"",
                "serve.metrics_token_env",
            ),
            ("[serve]\ntls_cert = \"/c.pem\"", "serve.tls_key"),
            (
                "[serve]\ntrusted_proxies = [\"proxy\"]",
                "serve.trusted_proxies",
            ),
            ("[serve]\nlogin_cache = 7200", "serve.login_cache"),
        ] {
            let e = Config::parse(text, "t.toml").unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("t.toml"), "{text}: {e}");
        }
    }

    #[test]
    fn health_keys_inherit_from_default() {
        let c = Config::parse(
            "[thresholds.default]\nmax_lag = \"10m\"\nk = 2.5\nmin_transfers = 20\n\
             [thresholds.cfs]\nmin_samples = 4\n[thresholds.edu]\nmax_lag = 0\n",
            "t.toml",
        )
        .unwrap();
        let cfs = c.thresholds_for("cfs");
        assert_eq!(cfs.max_lag, Some(Duration::from_secs(600)));
        assert_eq!((cfs.k, cfs.min_samples, cfs.min_transfers), (2.5, 4, 20));
        assert_eq!(c.thresholds_for("edu").max_lag, None, "0 turns it off");
        let d = Config::default().default_thresholds;
        assert_eq!(
            (d.k, d.min_samples, d.min_transfers, d.max_lag),
            (3.0, 3, 10, None)
        );
    }

    #[test]
    fn watchdog_table() {
        let c = Config::parse(
            "[exchanges]\npublic = \"xpub\"\n[watchdog]\nnode_timeout = \"2m\"\nrepost = true\n\
             max_inflight = 5000\nstate_dir = \"/var/lib/pw\"\n",
            "t.toml",
        )
        .unwrap();
        let w = c.watchdog.clone().unwrap();
        assert_eq!(w.rules.node_timeout, Duration::from_secs(120));
        assert_eq!(w.rules.max_inflight, 5000);
        assert_eq!(w.rules.stuck_after, Duration::from_secs(3600));
        assert!(w.repost);
        assert_eq!(w.repost_exchange, "xpub");
        assert_eq!(w.state_dir.as_deref(), Some(Path::new("/var/lib/pw")));
        assert_eq!(c.watchdog_settings(), w);
        let none = Config::default();
        assert!(none.watchdog.is_none());
        let d = none.watchdog_settings();
        assert!(!d.repost);
        assert_eq!(d.repost_exchange, "xpublic");
        assert_eq!(d.listen, DEFAULT_WATCHDOG_LISTEN);
    }

    #[test]
    fn defaults_without_a_file() {
        let c = Config::default();
        assert_eq!(c.exchanges.report, "xreport");
        assert!(c.route.relpath_pattern.is_match("20240101/radar/x.h5"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("-3").is_err());
        assert!(parse_duration("NaN").is_err());
    }
}
