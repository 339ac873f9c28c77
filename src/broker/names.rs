//! Names and shapes of the broker objects pumpwatch uses (SPEC §3), in one place so that
//! `setup` (through the management API) and the daemons (through AMQP) declare exactly the
//! same queues with exactly the same arguments (a mismatch would be refused by the broker),
//! and so that no component builds a name of its own. The header names pumpwatch stamps
//! are defined in the core (the parser reads them) and re-exported here.

use crate::config::{Config, QueueType, Role};

pub use crate::core::report::{H_CLIENT, H_HOPS, H_SOURCE};

/// Why a message was rejected (on `xrejected`).
pub const H_REASON: &str = "pumpwatch_reason";
/// Which `route` stage rejected it.
pub const H_STAGE: &str = "pumpwatch_stage";
/// The exchange a rejected message had been posted to.
pub const H_EXCHANGE: &str = "pumpwatch_exchange";

const USER_EXCHANGE_PREFIX: &str = "xs_";

/// `xs_<user>`: where a user posts its announcements and reports.
pub fn user_exchange(user: &str) -> String {
    format!("{USER_EXCHANGE_PREFIX}{user}")
}

/// The owner of a per-user exchange `xs_<user>`.
pub fn exchange_owner(exchange: &str) -> Option<&str> {
    exchange
        .strip_prefix(USER_EXCHANGE_PREFIX)
        .filter(|u| !u.is_empty())
}

/// `xr_<source>`: the reports about a source's products.
pub fn source_exchange(source: &str) -> String {
    format!("xr_{source}")
}

/// `xforward_<cluster>`: reports to send to another pump.
pub fn forward_exchange(cluster: &str) -> String {
    format!("xforward_{cluster}")
}

/// A private queue name `q_<user>.<component>.<random>` (an exclusive queue of one
/// reader, such as `log` or `serve`).
pub fn private_queue(user: &str, component: &str) -> String {
    format!(
        "{}{component}.{:08x}",
        user_queue_prefix(user),
        rand::random::<u32>()
    )
}

/// `q_<user>.`: every queue of `user` starts with it (its permissions are anchored on it).
pub fn user_queue_prefix(user: &str) -> String {
    format!("q_{user}.")
}

/// A durable queue of `user` for `component` that survives restarts:
/// `q_<user>.<component>.<name>` (`log --queue NAME`).
pub fn named_queue(user: &str, component: &str, name: &str) -> String {
    format!("{}{component}.{name}", user_queue_prefix(user))
}

/// The account the daemons run as: the first declared feeder, else the broker user.
pub fn feeder(config: &Config, broker_user: &str) -> String {
    config
        .users
        .values()
        .find(|u| u.role == Role::Feeder)
        .map(|u| u.name.clone())
        .unwrap_or_else(|| broker_user.to_owned())
}

/// A queue argument value.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Int(i64),
    Str(String),
    Bool(bool),
}

/// The queue argument that makes a queue deliver to one consumer at a time (RabbitMQ's
/// single active consumer): the others wait as hot standbys, and the broker hands the
/// queue, unacked messages included, to one of them when the active one goes.
pub const SINGLE_ACTIVE_CONSUMER: &str = "x-single-active-consumer";

/// A durable queue and what it is bound to.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueShape {
    pub name: String,
    pub arguments: Vec<(String, Arg)>,
    /// (exchange, routing key)
    pub bindings: Vec<(String, String)>,
}

fn base_args(qt: QueueType) -> Vec<(String, Arg)> {
    match qt {
        QueueType::Classic => vec![],
        QueueType::Quorum => vec![("x-queue-type".into(), Arg::Str("quorum".into()))],
    }
}

/// A queue read by one daemon instance at a time, the others standing by (speedo,
/// watchdog, archive: each keeps state of its own, so two reading at once would split
/// it).
fn single_active(qt: QueueType) -> Vec<(String, Arg)> {
    let mut a = base_args(qt);
    a.push((SINGLE_ACTIVE_CONSUMER.into(), Arg::Bool(true)));
    a
}

/// Bounded: the oldest messages are dropped first once `max` are queued.
fn bounded(qt: QueueType, max: u32) -> Vec<(String, Arg)> {
    let mut a = base_args(qt);
    a.push(("x-max-length".into(), Arg::Int(i64::from(max))));
    a.push(("x-overflow".into(), Arg::Str("drop-head".into())));
    a
}

/// How many rejected messages are kept for admins to inspect.
pub const REJECTED_KEEP: u32 = 100_000;

/// `route`'s one queue: every declared account's `xs_<account>` (users, the feeder,
/// neighbour pumps' accounts) and `xpublic` (announcements, for the index).
///
/// The name predates the one-stage `route` (it was the first of two stages); it is kept
/// so that upgrading loses nothing waiting in it.
pub fn route_queue(config: &Config, feeder: &str) -> QueueShape {
    let mut bindings: Vec<(String, String)> = config
        .users
        .keys()
        .map(|u| (user_exchange(u), "#".to_owned()))
        .collect();
    bindings.push((config.exchanges.public.clone(), "#".into()));
    QueueShape {
        name: format!("{}route.validate", user_queue_prefix(feeder)),
        arguments: base_args(config.route.queue_type),
        bindings,
    }
}

/// The second queue of the two-stage `route` of earlier versions, bound to everything in
/// `xreport`: `setup` removes it once it is empty.
pub fn legacy_dispatch_queue(feeder: &str) -> String {
    format!("{}route.dispatch", user_queue_prefix(feeder))
}

/// The topic space `route` routes in with `BCC` keys; a report arriving under it is
/// refused, or it could steer itself through our own bindings.
pub const RESERVED_TOPIC_PREFIX: &str = "pumpwatch.";

/// The `BCC` key of reports for this pump's source `source`.
pub fn source_route_key(source: &str) -> String {
    format!("{RESERVED_TOPIC_PREFIX}source.{source}")
}

/// The `BCC` key of reports forwarded to neighbour `cluster`.
pub fn forward_route_key(cluster: &str) -> String {
    format!("{RESERVED_TOPIC_PREFIX}forward.{cluster}")
}

/// The `BCC` key of reports nobody's source can be found for.
pub const UNROUTED_KEY: &str = "pumpwatch.unrouted";

/// True for a routing key in the reserved `pumpwatch.` space (compared without case:
/// topic matching in RabbitMQ is exact, but an operator reading a topic is not).
pub fn is_reserved_topic(routing_key: &str) -> bool {
    routing_key
        .get(..RESERVED_TOPIC_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_TOPIC_PREFIX))
}

/// The headers the broker routes on besides the topic (sender-selected distribution):
/// never passed on from a user's message.
pub const ROUTING_HEADERS: [&str; 2] = ["CC", "BCC"];

/// The exchange-to-exchange bindings through which the broker fans a routed report out
/// of `xreport` (SPEC §3): to each source's `xr_<source>`, each next hop's
/// `xforward_<cluster>`, and `xrejected` for the unrouted. (source, destination, key).
pub fn report_bindings(config: &Config) -> Vec<(String, String, String)> {
    let report = &config.exchanges.report;
    let mut out: Vec<(String, String, String)> = config
        .sources()
        .map(|u| {
            (
                report.clone(),
                source_exchange(&u.name),
                source_route_key(&u.name),
            )
        })
        .collect();
    out.extend(next_hops(config).map(|hop| {
        (
            report.clone(),
            forward_exchange(hop),
            forward_route_key(hop),
        )
    }));
    out.push((
        report.clone(),
        config.exchanges.rejected.clone(),
        UNROUTED_KEY.to_owned(),
    ));
    out
}

/// Keeps what validation refused, bounded, so admins can look at it later.
pub fn rejected_queue(config: &Config, feeder: &str) -> QueueShape {
    QueueShape {
        name: format!("q_{feeder}.route.rejected"),
        arguments: bounded(config.route.queue_type, REJECTED_KEEP),
        bindings: vec![(config.exchanges.rejected.clone(), "#".into())],
    }
}

/// A source's retained reports `q_<source>.reports`, when `retain > 0`.
pub fn retained_queue(config: &Config, source: &str, retain: u32) -> QueueShape {
    QueueShape {
        name: format!("q_{source}.reports"),
        arguments: bounded(config.route.queue_type, retain),
        bindings: vec![(source_exchange(source), "#".into())],
    }
}

/// `speedo`'s queue: everything in `xreport` (its own speedos are recognised and skipped).
/// Single active consumer: a second `speedo` is a standby. Declared by the daemon only
/// (`setup` checks it when it exists), since a speedo queue nobody reads would grow.
pub fn speedo_queue(config: &Config, feeder: &str) -> QueueShape {
    QueueShape {
        name: format!("q_{feeder}.speedo"),
        arguments: single_active(config.route.queue_type),
        bindings: vec![(config.exchanges.report.clone(), "#".into())],
    }
}

/// `archive`'s queue: everything in `xreport`, durable, so reports wait here while the
/// archive is down (SPEC §4.10). Declared by `setup` when the configuration has an
/// `[archive]` table, and by the daemon itself. Single active consumer: a second
/// `archive` is a standby.
pub fn archive_queue(config: &Config, feeder: &str) -> QueueShape {
    QueueShape {
        name: format!("q_{feeder}.archive"),
        arguments: single_active(config.route.queue_type),
        bindings: vec![(config.exchanges.report.clone(), "#".into())],
    }
}

/// `watchdog`'s queue: everything in `xreport`, durable, so the reports that arrive while
/// it restarts are read when it is back (its own notices are recognised and skipped).
/// `setup` declares it when the configuration has a `[watchdog]` table. Single active
/// consumer: a second `watchdog` is a standby.
pub fn watchdog_queue(config: &Config, feeder: &str) -> QueueShape {
    QueueShape {
        name: format!("q_{feeder}.watchdog"),
        arguments: single_active(config.route.queue_type),
        bindings: vec![(config.exchanges.report.clone(), "#".into())],
    }
}

/// Reports waiting to go to neighbour `cluster`: bound to `xforward_<cluster>`; the dynamic
/// shovel of SPEC §4.8 drains it to the neighbour's `xs_<account>`, so a neighbour that is
/// down gets its reports when it comes back.
pub fn forward_queue(config: &Config, feeder: &str, cluster: &str) -> QueueShape {
    QueueShape {
        name: format!("{}{cluster}", forward_queue_prefix(feeder)),
        arguments: base_args(config.route.queue_type),
        bindings: vec![(forward_exchange(cluster), "#".into())],
    }
}

/// What every shovel `setup` declares is named with: `pumpwatch.forward.<cluster>` (the
/// reserved `pumpwatch.` space; `--prune` removes only shovels named so).
pub const FORWARD_SHOVEL_PREFIX: &str = "pumpwatch.forward.";

/// The dynamic shovel that drains [`forward_queue`] to neighbour `cluster` (SPEC §4.8).
pub fn forward_shovel(cluster: &str) -> String {
    format!("{FORWARD_SHOVEL_PREFIX}{cluster}")
}

/// The neighbour a shovel named by [`forward_shovel`] delivers to.
pub fn forward_shovel_cluster(shovel: &str) -> Option<&str> {
    shovel
        .strip_prefix(FORWARD_SHOVEL_PREFIX)
        .filter(|c| !c.is_empty())
}

/// `q_<feeder>.forward.`: every forward queue of this pump starts with it.
pub fn forward_queue_prefix(feeder: &str) -> String {
    format!("{}forward.", user_queue_prefix(feeder))
}

/// A shovel's source URI on this broker: `amqp:///<vhost>`, the node's own direct
/// connection, which needs no account or password (the shovel runs inside the broker).
pub fn local_shovel_uri(vhost: &str) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    format!("amqp:///{}", utf8_percent_encode(vhost, UNRESERVED))
}

/// The neighbours reports are sent to directly (those without `via`).
pub fn next_hops(config: &Config) -> impl Iterator<Item = &str> {
    config
        .neighbours
        .values()
        .filter(|n| n.via.is_none())
        .map(|n| n.name.as_str())
}

impl QueueShape {
    /// The queue and its bindings as AMQP declarations, so a daemon declares exactly what
    /// `setup` does.
    pub fn topology(&self) -> crate::broker::amqp::Topology {
        use crate::broker::amqp::{BindingDecl, QueueDecl, Topology};
        use crate::core::{HeaderValue, Headers};
        let mut arguments = Headers::new();
        for (k, v) in &self.arguments {
            let v = match v {
                Arg::Int(i) => HeaderValue::Int(*i),
                Arg::Str(s) => HeaderValue::Str(s.clone()),
                Arg::Bool(b) => HeaderValue::Bool(*b),
            };
            arguments.set(k, v);
        }
        let queue = QueueDecl {
            name: self.name.clone(),
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments,
        };
        let bindings = self
            .bindings
            .iter()
            .map(|(x, key)| BindingDecl {
                queue: self.name.clone(),
                exchange: x.clone(),
                routing_key: key.clone(),
            })
            .collect();
        Topology {
            exchanges: vec![],
            queues: vec![queue],
            bindings,
            exchange_bindings: vec![],
        }
    }
}
