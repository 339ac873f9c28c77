//! What the broker should hold for this pump (SPEC §3): users with tags, passwords and
//! permissions, exchanges, and the daemons' queues with their bindings. Pure: computed
//! from the configuration, an optional Sarracenia import and an environment lookup.
//!
//! Every queue name, argument and binding comes from [`crate::broker::names`], the same
//! functions the daemons declare over AMQP with, so the two can never disagree.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::sarracenia::Import;
use crate::broker::mgmt::{AckMode, ShovelSpec};
use crate::broker::names::{self, Arg, QueueShape};
use crate::config::{Config, Neighbour, Role, User};

/// A password. `Debug` hides it; `Display` is not implemented on purpose.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(password: impl Into<String>) -> Self {
        Secret(password.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

/// A user's configure / write / read regexes on the vhost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Perms {
    pub configure: String,
    pub write: String,
    pub read: String,
}

impl Perms {
    fn all() -> Self {
        Perms {
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        }
    }

    /// Which of the three differ from `other`, in the order RabbitMQ shows them.
    pub fn differences(&self, other: &Perms) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.configure != other.configure {
            out.push("configure");
        }
        if self.write != other.write {
            out.push("write");
        }
        if self.read != other.read {
            out.push("read");
        }
        out
    }
}

/// Escapes the regex metacharacters of a name for RabbitMQ's (PCRE) permission patterns.
/// Only the characters that mean something there are escaped, so `q_radar.x` becomes
/// `q_radar\.x` and an operator reading the pattern still sees the name.
pub fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if "\\^$.|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The permissions of a role (SPEC §3), every pattern anchored so that user `sat` does
/// not match `xs_satx`. `public` is the public exchange (`xpublic`).
pub fn permissions(role: Role, user: &str, public: &str) -> Perms {
    let queues = format!("{}.*", escape(&names::user_queue_prefix(user)));
    let xs = escape(&names::user_exchange(user));
    let xr = escape(&names::source_exchange(user));
    let public = escape(public);
    let read = format!("^({queues}|{xs}|{xr}|{public})$");
    match role {
        Role::Source => Perms {
            configure: format!("^({queues}|{xs})$"),
            write: format!("^({queues}|{xs})$"),
            read,
        },
        Role::Subscriber => Perms {
            configure: format!("^{queues}$"),
            write: format!("^({queues}|{xs})$"),
            read,
        },
        Role::Feeder | Role::Admin => Perms::all(),
        // A neighbour pump's shovel: it writes forwarded reports to its own xs_ and can
        // neither read nor declare anything.
        Role::Cluster => Perms {
            configure: "^$".into(),
            write: format!("^{xs}$"),
            read: "^$".into(),
        },
    }
}

/// The management tags of a role. Sources and subscribers only speak AMQP: none. The
/// feeder runs the daemons, which read queue depths and connections for dashboards and
/// checks: `monitoring` (read-only view of the whole broker, can change nothing through
/// HTTP). Admins: `administrator` (SPEC §3).
pub fn tags(role: Role) -> Vec<String> {
    match role {
        Role::Source | Role::Subscriber | Role::Cluster => vec![],
        Role::Feeder => vec!["monitoring".into()],
        Role::Admin => vec!["administrator".into()],
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredUser {
    pub name: String,
    pub role: Role,
    /// Sorted.
    pub tags: Vec<String>,
    /// `None` when neither the environment nor `credentials.conf` gives one.
    pub password: Option<Secret>,
    /// How to give the password when it is missing (`set PW_RADAR`).
    pub password_hint: String,
    pub perms: Perms,
}

/// A queue-to-exchange binding.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Binding {
    pub exchange: String,
    pub queue: String,
    pub key: String,
}

/// An exchange-to-exchange binding (`xreport → xr_<source>` with `pumpwatch.source.<source>`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExchangeBinding {
    pub source: String,
    pub destination: String,
    pub key: String,
}

/// A durable queue with its `x-` arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredQueue {
    pub name: String,
    pub arguments: Vec<(String, Arg)>,
}

/// The dynamic shovel that drains a neighbour's forward queue to it (SPEC §4.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredShovel {
    /// `pumpwatch.forward.<cluster>`.
    pub name: String,
    pub cluster: String,
    /// The queue it drains, `q_<feeder>.forward.<cluster>`.
    pub queue: String,
    /// `None` when no password is known for the account there; `Debug` hides it.
    pub spec: Option<ShovelSpec>,
    /// `q_<feeder>.forward.<cluster> -> amqp://account:****@host:port/vhost xs_<account>`.
    pub shown: String,
    /// How to give the password when it is missing.
    pub password_hint: String,
}

/// The whole target state of one vhost.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub vhost: String,
    pub cluster: String,
    pub users: BTreeMap<String, DesiredUser>,
    /// Durable topic exchanges.
    pub exchanges: BTreeSet<String>,
    pub queues: BTreeMap<String, DesiredQueue>,
    pub bindings: BTreeSet<Binding>,
    /// The fan-out of `xreport` (SPEC §3): the broker delivers each routed report.
    pub exchange_bindings: BTreeSet<ExchangeBinding>,
    /// One shovel per neighbour, by name.
    pub shovels: BTreeMap<String, DesiredShovel>,
    /// `q_<feeder>.forward.`: forward queues of neighbours no longer declared are pruned.
    pub forward_queue_prefix: String,
    /// Queues of earlier versions, removed once they are empty (never with messages).
    pub legacy_queues: Vec<String>,
    /// Queues a daemon declares itself (not `setup`: nobody may read them), whose
    /// arguments are checked when they exist: `speedo`'s.
    pub checked_queues: BTreeMap<String, DesiredQueue>,
    /// Never deleted by `--prune`: `guest`, the user running setup, the broker URL's user.
    pub protected_users: BTreeSet<String>,
    pub prune: bool,
}

/// Everything [`Desired::build`] reads.
pub struct Inputs<'a> {
    pub config: &'a Config,
    pub import: Option<&'a Import>,
    /// Environment lookup (`std::env::var` in the binary, a map in tests).
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub vhost: String,
    /// The user of the broker URL: the daemons' account when no feeder is declared.
    pub broker_user: String,
    /// The broker's host, to pick the right `credentials.conf` line.
    pub broker_host: Option<String>,
    /// The management API user running setup.
    pub running_user: String,
    pub prune: bool,
}

impl Desired {
    pub fn build(inputs: &Inputs<'_>) -> Desired {
        let config = effective_config(inputs.config, inputs.import);
        let public = &config.exchanges.public;
        let mut users = BTreeMap::new();
        for u in config.users.values() {
            let (password, password_hint) = password_of(u, inputs);
            let mut tags = tags(u.role);
            tags.sort();
            users.insert(
                u.name.clone(),
                DesiredUser {
                    name: u.name.clone(),
                    role: u.role,
                    tags,
                    password,
                    password_hint,
                    perms: permissions(u.role, &u.name, public),
                },
            );
        }

        let mut exchanges: BTreeSet<String> = [
            &config.exchanges.public,
            &config.exchanges.report,
            &config.exchanges.rejected,
        ]
        .into_iter()
        .cloned()
        .collect();
        exchanges.extend(config.users.keys().map(|u| names::user_exchange(u)));
        exchanges.extend(config.sources().map(|u| names::source_exchange(&u.name)));
        exchanges.extend(names::next_hops(&config).map(names::forward_exchange));

        let feeder = names::feeder(&config, &inputs.broker_user);
        let mut shapes = vec![
            names::route_queue(&config, &feeder),
            names::rejected_queue(&config, &feeder),
        ];
        if config.archive.is_some() {
            shapes.push(names::archive_queue(&config, &feeder));
        }
        shapes.extend(
            names::next_hops(&config).map(|hop| names::forward_queue(&config, &feeder, hop)),
        );
        shapes.extend(
            config
                .sources()
                .filter(|u| u.retain > 0)
                .map(|u| names::retained_queue(&config, &u.name, u.retain)),
        );
        if config.watchdog.is_some() {
            shapes.push(names::watchdog_queue(&config, &feeder));
        }
        let mut queues = BTreeMap::new();
        let mut bindings = BTreeSet::new();
        for QueueShape {
            name,
            arguments,
            bindings: binds,
        } in shapes
        {
            for (exchange, key) in binds {
                bindings.insert(Binding {
                    exchange,
                    queue: name.clone(),
                    key,
                });
            }
            queues.insert(name.clone(), DesiredQueue { name, arguments });
        }

        let exchange_bindings = names::report_bindings(&config)
            .into_iter()
            .map(|(source, destination, key)| ExchangeBinding {
                source,
                destination,
                key,
            })
            .collect();

        let shovels = config
            .neighbours
            .values()
            .filter(|n| n.via.is_none())
            .map(|n| {
                let s = shovel(n, &config, &feeder, inputs);
                (s.name.clone(), s)
            })
            .collect();

        let protected_users = ["guest", &inputs.running_user, &inputs.broker_user]
            .into_iter()
            .map(str::to_owned)
            .collect();
        Desired {
            vhost: inputs.vhost.clone(),
            cluster: config.cluster.clone(),
            users,
            exchanges,
            queues,
            bindings,
            exchange_bindings,
            shovels,
            forward_queue_prefix: names::forward_queue_prefix(&feeder),
            legacy_queues: vec![names::legacy_dispatch_queue(&feeder)],
            checked_queues: [names::speedo_queue(&config, &feeder)]
                .into_iter()
                .map(|q| {
                    let d = DesiredQueue {
                        name: q.name,
                        arguments: q.arguments,
                    };
                    (d.name.clone(), d)
                })
                .collect(),
            protected_users,
            prune: inputs.prune,
        }
    }
}

/// How many reports a shovel has in flight, unconfirmed (RabbitMQ's default is 1000).
pub const SHOVEL_PREFETCH: u32 = 1000;

/// The shovel of neighbour `n`: from this pump's forward queue (read over the broker's
/// own direct connection) to `xs_<account>` on the neighbour, as that account, each
/// message keeping its routing key and headers, acked here only once the neighbour
/// confirmed it.
fn shovel(n: &Neighbour, config: &Config, feeder: &str, inputs: &Inputs<'_>) -> DesiredShovel {
    let name = names::forward_shovel(&n.name);
    let queue = names::forward_queue(config, feeder, &n.name).name;
    let Some(url) = &n.broker else {
        // Validated: a neighbour without `via` has a broker.
        return DesiredShovel {
            shown: queue.clone(),
            queue,
            name,
            cluster: n.name.clone(),
            spec: None,
            password_hint: format!("give clusters.{}.broker", n.name),
        };
    };
    let account = url.user();
    let exchange = names::user_exchange(account);
    let shown = format!("{queue} -> {url} {exchange}");
    let from_env = n
        .password_env
        .as_deref()
        .and_then(|var| (inputs.env)(var))
        .filter(|p| !p.is_empty());
    let password = from_env
        .or_else(|| n.url_password().map(str::to_owned))
        .or_else(|| {
            inputs
                .import
                .and_then(|i| i.password_at(account, url.host()))
                .map(str::to_owned)
        });
    let password_hint = match (&n.password_env, inputs.import.is_some()) {
        (Some(var), false) => format!("set {var}"),
        (Some(var), true) => format!(
            "set {var} or add amqp://{account}:PASSWORD@{}/ to credentials.conf",
            url.host()
        ),
        (None, true) => format!(
            "add amqp://{account}:PASSWORD@{}/ to credentials.conf",
            url.host()
        ),
        (None, false) => format!("give clusters.{}.password_env", n.name),
    };
    let spec = password.map(|password| ShovelSpec {
        src_uri: names::local_shovel_uri(&inputs.vhost),
        src_queue: queue.clone(),
        dest_uri: with_options(
            &url.with_credentials(account, &password).expose_password(),
            n.broker_options.as_deref(),
        ),
        dest_exchange: exchange,
        dest_exchange_key: None,
        ack_mode: AckMode::OnConfirm,
        reconnect_delay_s: Some(u32::try_from(n.reconnect_delay.as_secs()).unwrap_or(u32::MAX)),
        prefetch_count: Some(SHOVEL_PREFETCH),
        dest_user_id: Some(account.to_owned()),
    });
    DesiredShovel {
        name,
        cluster: n.name.clone(),
        queue,
        spec,
        shown,
        password_hint,
    }
}

/// `uri` with its query replaced by the operator's own `options` (TLS settings and the
/// like, which RabbitMQ's shovel understands and [`crate::broker::url::BrokerUrl`] does
/// not keep).
fn with_options(uri: &str, options: Option<&str>) -> String {
    let Some(options) = options else {
        return uri.to_owned();
    };
    match url::Url::parse(uri) {
        Ok(mut u) => {
            u.set_query(Some(options));
            u.to_string()
        }
        Err(_) => uri.to_owned(),
    }
}

/// The configuration with the imported users added (the configuration wins on a user
/// declared in both) and the imported cluster name unless the configuration sets one.
fn effective_config(config: &Config, import: Option<&Import>) -> Config {
    let mut config = config.clone();
    let Some(import) = import else {
        return config;
    };
    for (name, role) in &import.users {
        config.users.entry(name.clone()).or_insert_with(|| User {
            name: name.clone(),
            role: *role,
            password_env: None,
            retain: 0,
            interval: None,
        });
    }
    // `localhost` is the configuration's built-in default: an imported name is better.
    if config.cluster == "localhost"
        && let Some(cluster) = &import.cluster
    {
        config.cluster = cluster.clone();
    }
    config
}

/// The password from `password_env`, else from `credentials.conf`; or how to give one.
fn password_of(user: &User, inputs: &Inputs<'_>) -> (Option<Secret>, String) {
    if let Some(var) = &user.password_env
        && let Some(password) = (inputs.env)(var).filter(|p| !p.is_empty())
    {
        return (Some(Secret(password)), String::new());
    }
    if let Some(password) = inputs
        .import
        .and_then(|i| i.password_for(&user.name, inputs.broker_host.as_deref()))
    {
        return (Some(Secret(password.to_owned())), String::new());
    }
    let hint = match (&user.password_env, inputs.import.is_some()) {
        (Some(var), false) => format!("set {var}"),
        (Some(var), true) => format!("set {var} or add it to credentials.conf"),
        (None, true) => "add it to credentials.conf".to_owned(),
        (None, false) => format!("give users.{}.password_env", user.name),
    };
    (None, hint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn permission_patterns_are_anchored_and_escaped() {
        let p = permissions(Role::Source, "radar", "xpublic");
        assert_eq!(p.configure, r"^(q_radar\..*|xs_radar)$");
        assert_eq!(p.write, r"^(q_radar\..*|xs_radar)$");
        assert_eq!(p.read, r"^(q_radar\..*|xs_radar|xr_radar|xpublic)$");
        let p = permissions(Role::Subscriber, "cfs", "xpublic");
        assert_eq!(p.configure, r"^q_cfs\..*$");
        assert_eq!(p.write, r"^(q_cfs\..*|xs_cfs)$");
        assert_eq!(p.read, r"^(q_cfs\..*|xs_cfs|xr_cfs|xpublic)$");
        for role in [Role::Feeder, Role::Admin] {
            assert_eq!(permissions(role, "x", "xpublic"), Perms::all());
        }
        // Dots in names are literal; the exchange name is configurable.
        let p = permissions(Role::Source, "a.b", "x.pub");
        assert_eq!(p.read, r"^(q_a\.b\..*|xs_a\.b|xr_a\.b|x\.pub)$");
    }

    #[test]
    fn patterns_do_not_match_longer_names() {
        // RabbitMQ uses PCRE; for these patterns the regex crate agrees.
        let p = permissions(Role::Source, "sat", "xpublic");
        let write = regex::Regex::new(&p.write).unwrap();
        let read = regex::Regex::new(&p.read).unwrap();
        let configure = regex::Regex::new(&p.configure).unwrap();
        for yes in ["xs_sat", "q_sat.a", "q_sat.route.x"] {
            assert!(write.is_match(yes), "{yes}");
        }
        for no in [
            "xs_satx", "q_satx.a", "q_sat", "xs_sat2", "xr_sat", "xreport", "q_satxa",
        ] {
            assert!(!write.is_match(no), "{no}");
            assert!(!configure.is_match(no), "{no}");
        }
        assert!(read.is_match("xr_sat") && read.is_match("xpublic"));
        assert!(!read.is_match("xr_satx") && !read.is_match("xreport"));
    }

    proptest::proptest! {
        /// The name rule is what makes anchored patterns safe: for any two different
        /// valid names, one's permissions reach none of the other's objects.
        #[test]
        fn one_valid_name_never_reaches_another(
            a in "[A-Za-z0-9_-]{1,12}",
            b in "[A-Za-z0-9_.-]{1,12}",
            rest in "[A-Za-z0-9_.-]{0,12}",
        ) {
            proptest::prop_assume!(a != b);
            proptest::prop_assert!(crate::config::is_valid_name(&a));
            proptest::prop_assert_eq!(crate::config::is_valid_name(&b), !b.contains('.'));
            if crate::config::is_valid_name(&b) {
                for role in [Role::Source, Role::Subscriber] {
                    let p = permissions(role, &a, "xpublic");
                    for pattern in [&p.configure, &p.write, &p.read] {
                        let re = regex::Regex::new(pattern).unwrap();
                        for object in [
                            format!("q_{b}.{rest}"),
                            format!("xs_{b}"),
                            format!("xr_{b}"),
                        ] {
                            proptest::prop_assert!(!re.is_match(&object), "{} matches {}", pattern, object);
                        }
                    }
                }
            }
        }

        #[test]
        fn the_name_rule(name in "\\PC{0,70}") {
            let re = regex::Regex::new("^[A-Za-z0-9_-]{1,64}$").unwrap();
            proptest::prop_assert_eq!(crate::config::is_valid_name(&name), re.is_match(&name));
        }
    }

    #[test]
    fn escape_only_metacharacters() {
        assert_eq!(escape("pw-1_a.b"), r"pw-1_a\.b");
        assert_eq!(escape(r"a+b(c)|\"), r"a\+b\(c\)\|\\");
    }

    const CONFIG: &str = r#"
        [users.radar]
        role = "source"
        password_env = "PW_RADAR"
        retain = 1000
        [users.sat]
        role = "source"
        [users.cfs]
        role = "subscriber"
        password_env = "PW_CFS"
        [users.feed]
        role = "feeder"
        password_env = "PW_FEED"
        [users.boss]
        role = "admin"
        password_env = "PW_BOSS"
        [clusters.west]
        broker = "amqp://east@west.example/"
    "#;

    fn inputs<'a>(
        config: &'a Config,
        import: Option<&'a Import>,
        env: &'a dyn Fn(&str) -> Option<String>,
    ) -> Inputs<'a> {
        Inputs {
            config,
            import,
            env,
            vhost: "/".into(),
            broker_user: "guest".into(),
            broker_host: Some("pump".into()),
            running_user: "root".into(),
            prune: false,
        }
    }

    #[test]
    fn desired_state_from_the_config() {
        let config = Config::parse(CONFIG, "t.toml").unwrap();
        let vars: HashMap<&str, &str> =
            [("PW_RADAR", "r"), ("PW_CFS", ""), ("PW_FEED", "f")].into();
        let env = |v: &str| vars.get(v).map(|s| s.to_string());
        let d = Desired::build(&inputs(&config, None, &env));

        let exchanges: Vec<&str> = d.exchanges.iter().map(String::as_str).collect();
        assert_eq!(
            exchanges,
            [
                "xforward_west",
                "xpublic",
                "xr_radar",
                "xr_sat",
                "xrejected",
                "xreport",
                "xs_boss",
                "xs_cfs",
                "xs_feed",
                "xs_radar",
                "xs_sat"
            ]
        );
        let queues: Vec<&str> = d.queues.keys().map(String::as_str).collect();
        assert_eq!(
            queues,
            [
                "q_feed.forward.west",
                "q_feed.route.rejected",
                "q_feed.route.validate",
                "q_radar.reports"
            ]
        );
        assert_eq!(
            d.queues["q_radar.reports"].arguments,
            names::retained_queue(&config, "radar", 1000).arguments
        );
        assert!(d.bindings.contains(&Binding {
            exchange: "xr_radar".into(),
            queue: "q_radar.reports".into(),
            key: "#".into()
        }));
        assert!(d.bindings.contains(&Binding {
            exchange: "xs_sat".into(),
            queue: "q_feed.route.validate".into(),
            key: "#".into()
        }));

        // The broker fans routed reports out of xreport.
        let fan_out: Vec<(&str, &str, &str)> = d
            .exchange_bindings
            .iter()
            .map(|b| (b.source.as_str(), b.destination.as_str(), b.key.as_str()))
            .collect();
        assert_eq!(
            fan_out,
            [
                ("xreport", "xforward_west", "pumpwatch.forward.west"),
                ("xreport", "xr_radar", "pumpwatch.source.radar"),
                ("xreport", "xr_sat", "pumpwatch.source.sat"),
                ("xreport", "xrejected", "pumpwatch.unrouted"),
            ]
        );
        assert_eq!(d.legacy_queues, ["q_feed.route.dispatch"]);

        assert_eq!(d.users["radar"].password, Some(Secret::new("r")));
        assert_eq!(d.users["boss"].tags, ["administrator"]);
        assert_eq!(d.users["feed"].tags, ["monitoring"]);
        assert!(d.users["radar"].tags.is_empty());
        // An empty variable counts as unset; the hint names the variable.
        assert_eq!(d.users["cfs"].password, None);
        assert_eq!(d.users["cfs"].password_hint, "set PW_CFS");
        assert_eq!(d.users["sat"].password_hint, "give users.sat.password_env");
        assert!(
            !format!("{d:?}").contains("\"r\""),
            "passwords hidden in Debug"
        );
        let protected: Vec<&str> = d.protected_users.iter().map(String::as_str).collect();
        assert_eq!(protected, ["guest", "root"]);

        // An [archive] table adds the archive's queue on xreport.
        let config = Config::parse(&format!("{CONFIG}\n[archive]\n"), "t.toml").unwrap();
        let d = Desired::build(&inputs(&config, None, &env));
        assert!(d.queues.contains_key("q_feed.archive"));
        assert!(d.bindings.contains(&Binding {
            exchange: "xreport".into(),
            queue: "q_feed.archive".into(),
            key: "#".into()
        }));
    }

    #[test]
    fn the_watchdog_queue_only_with_a_watchdog_table() {
        let env = |_: &str| None;
        let config = Config::parse(CONFIG, "t.toml").unwrap();
        let d = Desired::build(&inputs(&config, None, &env));
        assert!(!d.queues.contains_key("q_feed.watchdog"));
        let config = Config::parse(&format!("{CONFIG}\n[watchdog]\n"), "t.toml").unwrap();
        let d = Desired::build(&inputs(&config, None, &env));
        assert_eq!(
            d.queues["q_feed.watchdog"].arguments,
            names::watchdog_queue(&config, "feed").arguments
        );
        assert!(d.bindings.contains(&Binding {
            exchange: "xreport".into(),
            queue: "q_feed.watchdog".into(),
            key: "#".into()
        }));
    }

    #[test]
    fn imported_users_merge_with_the_config_and_lose_conflicts() {
        let config = Config::parse(CONFIG, "t.toml").unwrap();
        let mut import = Import::default();
        import.users.insert("radar".into(), Role::Subscriber); // config says source
        import.users.insert("newsub".into(), Role::Subscriber);
        import.users.insert("tfeed".into(), Role::Feeder);
        import.cluster = Some("ddsr.cmc".into());
        let mut text = String::new();
        text.push_str("amqp://newsub:ns@pump/\namqp://sat:other@elsewhere/\n");
        text.push_str("amqp://sat:s@pump/\namqp://radar:ignored@pump/\n");
        super::super::sarracenia::parse_credentials(&text, "c", &mut import).unwrap();
        let env = |v: &str| (v == "PW_RADAR").then(|| "from-env".to_owned());
        let d = Desired::build(&inputs(&config, Some(&import), &env));
        assert_eq!(d.users["radar"].role, Role::Source);
        assert_eq!(d.users["radar"].password, Some(Secret::new("from-env")));
        assert_eq!(d.users["newsub"].role, Role::Subscriber);
        assert_eq!(d.users["newsub"].password, Some(Secret::new("ns")));
        assert_eq!(
            d.users["sat"].password,
            Some(Secret::new("s")),
            "host match"
        );
        assert_eq!(d.users["tfeed"].password_hint, "add it to credentials.conf");
        assert_eq!(
            d.users["cfs"].password_hint,
            "set PW_CFS or add it to credentials.conf"
        );
        assert!(d.exchanges.contains("xs_newsub"));
        assert_eq!(d.cluster, "ddsr.cmc");
        // The first declared feeder (in name order) names the daemons' queues.
        assert!(d.queues.contains_key("q_feed.route.validate"));
    }

    #[test]
    fn a_neighbour_gets_a_shovel_with_its_password_and_options() {
        let config = Config::parse(
            "[users.feed]\nrole = \"feeder\"\n\
             [clusters.b]\nbroker = \"amqps://from-a@pump-b/b%2Fv?cacertfile=/etc/ca.pem&verify=verify_peer\"\n\
             password_env = \"PW_B\"\nreconnect_delay = \"1m\"\n\
             [clusters.c]\nbroker = \"amqp://from-a:in-url@pump-c/\"\n\
             [clusters.d]\nbroker = \"amqp://from-a@pump-d/\"\n\
             [clusters.far]\nvia = \"c\"\n",
            "t.toml",
        )
        .unwrap();
        let mut import = Import::default();
        super::super::sarracenia::parse_credentials(
            "amqp://from-a:d-pw@pump-d/\namqp://from-a:wrong-host@pump-x/\n",
            "credentials.conf",
            &mut import,
        )
        .unwrap();
        let env = |v: &str| (v == "PW_B").then(|| "p@ss/b".to_owned());
        let mut i = inputs(&config, Some(&import), &env);
        i.vhost = "pump/a".into();
        let d = Desired::build(&i);
        let names: Vec<&str> = d.shovels.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "pumpwatch.forward.b",
                "pumpwatch.forward.c",
                "pumpwatch.forward.d"
            ]
        );
        let b = d.shovels["pumpwatch.forward.b"].spec.clone().unwrap();
        assert_eq!(b.src_uri, "amqp:///pump%2Fa");
        assert_eq!(b.src_queue, "q_feed.forward.b");
        assert_eq!(
            b.dest_uri,
            "amqps://from-a:p%40ss%2Fb@pump-b:5671/b%2Fv?cacertfile=/etc/ca.pem&verify=verify_peer"
        );
        assert_eq!(b.dest_exchange, "xs_from-a");
        assert_eq!(
            b.dest_exchange_key, None,
            "each message keeps its routing key"
        );
        assert_eq!(b.dest_user_id.as_deref(), Some("from-a"));
        assert_eq!(b.ack_mode, AckMode::OnConfirm);
        assert_eq!(b.reconnect_delay_s, Some(60));
        let c = d.shovels["pumpwatch.forward.c"].spec.clone().unwrap();
        assert_eq!(c.dest_uri, "amqp://from-a:in-url@pump-c:5672/%2F");
        let dd = d.shovels["pumpwatch.forward.d"].spec.clone().unwrap();
        assert!(
            dd.dest_uri.contains(":d-pw@pump-d"),
            "credentials.conf, same host only"
        );
        assert_eq!(
            d.shovels["pumpwatch.forward.b"].shown,
            "q_feed.forward.b -> amqps://from-a:****@pump-b:5671/b%2Fv xs_from-a"
        );
        assert!(!format!("{d:?}").contains("p%40ss"), "Debug hides them");

        // Without any password: no spec, and how to give one.
        let none = |_: &str| None;
        let d = Desired::build(&inputs(&config, None, &none));
        let b = &d.shovels["pumpwatch.forward.b"];
        assert_eq!(
            (b.spec.is_none(), b.password_hint.as_str()),
            (true, "set PW_B")
        );
        assert_eq!(
            d.shovels["pumpwatch.forward.d"].password_hint,
            "give clusters.d.password_env"
        );
    }
}
