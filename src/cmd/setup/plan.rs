//! The pure core of `setup`: compare what the broker has ([`Actual`]) with what the pump
//! should have ([`Desired`]) and list the differences as [`Change`]s, in the order they
//! can be applied (users before their permissions, exchanges and queues before their
//! bindings, removals last). No I/O: the management adapter fills `Actual` and applies
//! the changes.
//!
//! What cannot be fixed by declaring (a queue with other arguments, an exchange of
//! another type, a missing password) is a [`Change::Problem`]: printed with `!`, nothing
//! applied for it, and `setup` exits non-zero once everything else is done.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::{Map, Value};

use super::desired::{
    Binding, Desired, DesiredQueue, DesiredShovel, ExchangeBinding, Perms, Secret,
};
use crate::broker::mgmt::{BindingInfo, ShovelDefinition, ShovelSpec};
use crate::broker::names::{self, Arg};
use crate::config::Role;

/// A user as the broker knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActualUser {
    pub tags: Vec<String>,
    /// Whether the desired password already works for this user; `None` when it was not
    /// checked (no password known). The API never shows passwords, so the adapter tries
    /// them (see `broker::password_matches`).
    pub password_matches: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActualExchange {
    pub kind: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ActualQueue {
    pub durable: bool,
    pub arguments: Map<String, Value>,
}

/// What the broker has, as far as `setup` cares.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Actual {
    pub vhost_exists: bool,
    /// Every user of the broker (users are not per vhost).
    pub users: BTreeMap<String, ActualUser>,
    /// Permissions on this vhost, by user.
    pub permissions: BTreeMap<String, Perms>,
    /// Users with permissions on some other vhost: they are not this pump's alone, so
    /// `--prune` leaves them. Only filled when pruning.
    pub users_elsewhere: BTreeSet<String>,
    pub exchanges: BTreeMap<String, ActualExchange>,
    pub queues: BTreeMap<String, ActualQueue>,
    /// Queue and exchange bindings (not those of the default exchange).
    pub bindings: Vec<BindingInfo>,
    /// Dynamic shovels of this vhost with their definitions (which hold passwords).
    pub shovels: BTreeMap<String, ShovelDefinition>,
}

/// One difference to apply, or a [`Problem`](Change::Problem) to report.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    CreateVhost(String),
    CreateUser {
        name: String,
        role: Role,
        tags: Vec<String>,
        password: Secret,
    },
    UpdateUser {
        name: String,
        tags: Vec<String>,
        password: Secret,
        password_changed: bool,
        tags_changed: bool,
    },
    SetPermissions {
        user: String,
        perms: Perms,
        /// `None`: the user had no permissions on the vhost; else which ones change.
        changed: Option<Vec<&'static str>>,
    },
    DeclareExchange(String),
    DeclareQueue {
        name: String,
        arguments: Vec<(String, Arg)>,
    },
    Bind(Binding),
    BindExchange(ExchangeBinding),
    Unbind(BindingInfo),
    /// Declares (or replaces) a neighbour's shovel; `changed` as for permissions.
    PutShovel {
        name: String,
        /// `queue -> amqp://account:****@host:port/vhost exchange`, for the line.
        shown: String,
        spec: ShovelSpec,
        changed: Option<Vec<&'static str>>,
    },
    DeleteShovel(String),
    DeleteQueue(String),
    /// A queue of an earlier version: deleted only if the broker finds it empty.
    DeleteQueueIfEmpty(String),
    DeleteExchange(String),
    DeleteUser(String),
    /// Something `setup` cannot or must not fix by itself; the text says what to do.
    Problem(String),
}

impl Change {
    pub fn is_problem(&self) -> bool {
        matches!(self, Change::Problem(_))
    }
}

/// One line per change, as `setup` prints it: `+` add, `~` modify, `-` remove, `!`
/// problem. Never shows a password.
impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::CreateVhost(name) => write!(f, "+ vhost {name}"),
            Change::CreateUser {
                name, role, tags, ..
            } => {
                write!(f, "+ user {name} ({}", role.name())?;
                if !tags.is_empty() {
                    write!(f, ", tags {}", tags.join(","))?;
                }
                f.write_str(")")
            }
            Change::UpdateUser {
                name,
                tags,
                password_changed,
                tags_changed,
                ..
            } => {
                let mut what = Vec::new();
                if *password_changed {
                    what.push("password".to_owned());
                }
                if *tags_changed {
                    what.push(format!("tags {}", tags_text(tags)));
                }
                write!(f, "~ user {name} ({})", what.join(", "))
            }
            Change::SetPermissions {
                user,
                changed: None,
                ..
            } => write!(f, "+ permissions {user}"),
            Change::SetPermissions {
                user,
                changed: Some(which),
                ..
            } => write!(f, "~ permissions {user} ({})", which.join(", ")),
            Change::DeclareExchange(name) => write!(f, "+ exchange {name}"),
            Change::DeclareQueue { name, arguments } => {
                write!(f, "+ queue {name}")?;
                let args = arguments_text(arguments);
                if !args.is_empty() {
                    write!(f, " ({args})")?;
                }
                Ok(())
            }
            Change::Bind(b) => write!(f, "+ binding {} -> {} ({})", b.exchange, b.queue, b.key),
            Change::BindExchange(b) => write!(
                f,
                "+ binding {} -> exchange {} ({})",
                b.source, b.destination, b.key
            ),
            Change::Unbind(b) => write!(
                f,
                "- binding {} -> {} ({})",
                b.source, b.destination, b.routing_key
            ),
            Change::PutShovel {
                name,
                shown,
                changed: None,
                ..
            } => write!(f, "+ shovel {name} ({shown})"),
            Change::PutShovel {
                name,
                changed: Some(which),
                ..
            } => write!(f, "~ shovel {name} ({})", which.join(", ")),
            Change::DeleteShovel(name) => write!(f, "- shovel {name}"),
            Change::DeleteQueue(name) => write!(f, "- queue {name}"),
            Change::DeleteQueueIfEmpty(name) => write!(f, "- queue {name} (no longer used)"),
            Change::DeleteExchange(name) => write!(f, "- exchange {name}"),
            Change::DeleteUser(name) => write!(f, "- user {name}"),
            Change::Problem(text) => write!(f, "! {text}"),
        }
    }
}

fn tags_text(tags: &[String]) -> String {
    if tags.is_empty() {
        "none".to_owned()
    } else {
        tags.join(",")
    }
}

/// `max 1000` for a bounded queue (dropping the oldest is implied), other arguments
/// as `key=value`.
fn arguments_text(arguments: &[(String, Arg)]) -> String {
    let mut parts = Vec::new();
    for (key, value) in arguments {
        match (key.as_str(), value) {
            ("x-max-length", Arg::Int(n)) => parts.push(format!("max {n}")),
            ("x-overflow", Arg::Str(s)) if s == "drop-head" => {}
            ("x-queue-type", Arg::Str(s)) => parts.push(s.clone()),
            (names::SINGLE_ACTIVE_CONSUMER, Arg::Bool(true)) => {
                parts.push("single active consumer".into())
            }
            (key, value) => parts.push(format!("{key}={}", arg_text(value))),
        }
    }
    parts.join(", ")
}

fn arg_text(arg: &Arg) -> String {
    match arg {
        Arg::Int(n) => n.to_string(),
        Arg::Str(s) => s.clone(),
        Arg::Bool(b) => b.to_string(),
    }
}

/// The JSON value the management API shows for an argument.
pub fn arg_json(arg: &Arg) -> Value {
    match arg {
        Arg::Int(n) => Value::from(*n),
        Arg::Str(s) => Value::from(s.as_str()),
        Arg::Bool(b) => Value::from(*b),
    }
}

fn json_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Why an existing queue cannot be redeclared as wanted, if it cannot. A missing
/// `x-queue-type` means `classic` on both sides.
fn queue_mismatch(want: &[(String, Arg)], have: &ActualQueue) -> Option<String> {
    let normalise = |mut m: Map<String, Value>| {
        if m.get("x-queue-type").and_then(Value::as_str) == Some("classic") {
            m.remove("x-queue-type");
        }
        m
    };
    let want = normalise(want.iter().map(|(k, v)| (k.clone(), arg_json(v))).collect());
    let have_args = normalise(have.arguments.clone());
    let keys: BTreeSet<&String> = want.keys().chain(have_args.keys()).collect();
    let mut diffs = Vec::new();
    if !have.durable {
        diffs.push("is not durable".to_owned());
    }
    for key in keys {
        match (have_args.get(key), want.get(key)) {
            (Some(h), Some(w)) if same_value(h, w) => {}
            (Some(h), Some(w)) => diffs.push(format!(
                "has {key} {}, wanted {}",
                json_text(h),
                json_text(w)
            )),
            (None, Some(w)) => diffs.push(format!("has no {key}, wanted {}", json_text(w))),
            (Some(h), None) => diffs.push(format!("has {key} {}, wanted none", json_text(h))),
            (None, None) => {}
        }
    }
    (!diffs.is_empty()).then(|| diffs.join("; "))
}

/// A queue that cannot be redeclared as wanted. One that lacks single-active-consumer was
/// declared by an earlier pumpwatch: the way to change it is spelled out, since the
/// daemons of this version refuse to start on it (the broker refuses their declaration).
fn queue_problem(vhost: &str, q: &DesiredQueue, have: &ActualQueue, why: &str) -> Change {
    let wants_sac = q
        .arguments
        .iter()
        .any(|(k, v)| k == names::SINGLE_ACTIVE_CONSUMER && *v == Arg::Bool(true));
    if wants_sac && !have.arguments.contains_key(names::SINGLE_ACTIVE_CONSUMER) {
        return Change::Problem(format!(
            "queue {} {why}: an earlier pumpwatch declared it; a standby instance needs \
             single active consumer, and this version's daemon will not start on it. \
             Stop the daemons reading it, delete it (rabbitmqctl delete_queue -p {} {}; \
             what waits in it is lost), then start them again: they declare it anew",
            q.name,
            shell_word(vhost),
            shell_word(&q.name)
        ));
    }
    Change::Problem(format!("queue {} {why}: delete it to change", q.name))
}

/// `s` quoted for a shell when it needs to be.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./%:@".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Numbers compare by value (`1000` and `1000.0` are the same length limit).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// A queue that `setup` made for a source's retained reports: `q_<user>.reports`,
/// bounded and dropping the oldest. A queue of that name without that shape belongs to
/// the user (they may configure `q_<user>.*`) and is never pruned.
fn is_retained_queue(name: &str, q: &ActualQueue) -> bool {
    let owner = name
        .strip_prefix("q_")
        .and_then(|rest| rest.strip_suffix(".reports"));
    owner.is_some_and(|o| !o.is_empty())
        && q.arguments.contains_key("x-max-length")
        && q.arguments.get("x-overflow").and_then(Value::as_str) == Some("drop-head")
}

/// The changes that make `actual` match `desired`, in applying order.
pub fn plan(desired: &Desired, actual: &Actual) -> Vec<Change> {
    let mut out = Vec::new();
    if !actual.vhost_exists {
        out.push(Change::CreateVhost(desired.vhost.clone()));
    }

    let mut after_bindings = Vec::new();
    for u in desired.users.values() {
        match actual.users.get(&u.name) {
            None => match &u.password {
                Some(password) => out.push(Change::CreateUser {
                    name: u.name.clone(),
                    role: u.role,
                    tags: u.tags.clone(),
                    password: password.clone(),
                }),
                None => {
                    out.push(Change::Problem(format!(
                        "user {} ({}) does not exist and has no password: {}",
                        u.name,
                        u.role.name(),
                        u.password_hint
                    )));
                    continue; // no permissions for a user that is not there
                }
            },
            Some(have) => {
                let mut have_tags = have.tags.clone();
                have_tags.sort();
                have_tags.dedup();
                let tags_changed = have_tags != u.tags;
                let password_changed = u.password.is_some() && have.password_matches == Some(false);
                if tags_changed || password_changed {
                    match &u.password {
                        Some(password) => out.push(Change::UpdateUser {
                            name: u.name.clone(),
                            tags: u.tags.clone(),
                            password: password.clone(),
                            password_changed,
                            tags_changed,
                        }),
                        // The API sets tags and password together: without the password,
                        // changing the tags would lock the user out.
                        None => out.push(Change::Problem(format!(
                            "user {} has tags {}, wanted {}: its password is needed to change them: {}",
                            u.name,
                            tags_text(&have_tags),
                            tags_text(&u.tags),
                            u.password_hint
                        ))),
                    }
                }
            }
        }
        let change = match actual.permissions.get(&u.name) {
            None => Some(Change::SetPermissions {
                user: u.name.clone(),
                perms: u.perms.clone(),
                changed: None,
            }),
            Some(have) if *have != u.perms => Some(Change::SetPermissions {
                user: u.name.clone(),
                perms: u.perms.clone(),
                changed: Some(have.differences(&u.perms)),
            }),
            Some(_) => None,
        };
        // A neighbour's shovel connects as soon as its account may use the vhost, and
        // what it publishes to an exchange not yet bound to route's queue is dropped
        // (and confirmed): its permissions come once the queues and bindings are there.
        match change {
            Some(c) if u.role == Role::Cluster => after_bindings.push(c),
            Some(c) => out.push(c),
            None => {}
        }
    }

    for name in &desired.exchanges {
        match actual.exchanges.get(name) {
            None => out.push(Change::DeclareExchange(name.clone())),
            Some(x) if x.kind != "topic" || !x.durable || x.auto_delete || x.internal => {
                let mut what = vec![x.kind.clone()];
                what.push(if x.durable { "durable" } else { "transient" }.to_owned());
                if x.auto_delete {
                    what.push("auto-delete".to_owned());
                }
                if x.internal {
                    what.push("internal".to_owned());
                }
                out.push(Change::Problem(format!(
                    "exchange {name} is {}, wanted topic durable: delete it to change",
                    what.join(" ")
                )));
            }
            Some(_) => {}
        }
    }

    for q in desired.queues.values() {
        match actual.queues.get(&q.name) {
            None => out.push(Change::DeclareQueue {
                name: q.name.clone(),
                arguments: q.arguments.clone(),
            }),
            Some(have) => {
                if let Some(why) = queue_mismatch(&q.arguments, have) {
                    out.push(queue_problem(&desired.vhost, q, have, &why));
                }
            }
        }
    }
    for q in desired.checked_queues.values() {
        if let Some(have) = actual.queues.get(&q.name)
            && let Some(why) = queue_mismatch(&q.arguments, have)
        {
            out.push(queue_problem(&desired.vhost, q, have, &why));
        }
    }

    let have_bindings: BTreeSet<Binding> = actual
        .bindings
        .iter()
        .filter(|b| b.destination_type == "queue")
        .map(|b| Binding {
            exchange: b.source.clone(),
            queue: b.destination.clone(),
            key: b.routing_key.clone(),
        })
        .collect();
    for b in &desired.bindings {
        if !have_bindings.contains(b) {
            out.push(Change::Bind(b.clone()));
        }
    }
    let have_exchange_bindings: BTreeSet<ExchangeBinding> = actual
        .bindings
        .iter()
        .filter_map(exchange_binding)
        .collect();
    for b in &desired.exchange_bindings {
        if !have_exchange_bindings.contains(b) {
            out.push(Change::BindExchange(b.clone()));
        }
    }
    out.append(&mut after_bindings);
    for s in desired.shovels.values() {
        plan_shovel(s, actual.shovels.get(&s.name), &mut out);
    }
    for name in &desired.legacy_queues {
        if actual.queues.contains_key(name) {
            out.push(Change::DeleteQueueIfEmpty(name.clone()));
        }
    }

    if desired.prune {
        prune(desired, actual, &mut out);
    }
    out
}

/// A neighbour's shovel: declared when missing, replaced when its definition differs
/// (a changed password included: the broker shows it, and a shovel with a stale one
/// would never connect), a problem when no password is known.
fn plan_shovel(s: &DesiredShovel, have: Option<&ShovelDefinition>, out: &mut Vec<Change>) {
    let Some(spec) = &s.spec else {
        let state = if have.is_some() {
            "cannot be checked"
        } else {
            "cannot be declared"
        };
        out.push(Change::Problem(format!(
            "shovel {} to {} {state}: no password for the account there: {}",
            s.name, s.cluster, s.password_hint
        )));
        return;
    };
    let changed = match have {
        None => None,
        Some(have) => {
            let which = shovel_differences(&have.spec, spec, &have.other_keys);
            if which.is_empty() {
                return;
            }
            Some(which)
        }
    };
    out.push(Change::PutShovel {
        name: s.name.clone(),
        shown: s.shown.clone(),
        spec: spec.clone(),
        changed,
    });
}

/// What differs between two shovel definitions, in words; never a password.
fn shovel_differences(
    have: &ShovelSpec,
    want: &ShovelSpec,
    other_keys: &[String],
) -> Vec<&'static str> {
    use crate::broker::url::redact;
    let mut out = Vec::new();
    if have.src_uri != want.src_uri || have.src_queue != want.src_queue {
        out.push("source");
    }
    if redact(&have.dest_uri) != redact(&want.dest_uri) {
        out.push("destination");
    } else if have.dest_uri != want.dest_uri {
        out.push("password");
    }
    if have.dest_exchange != want.dest_exchange || have.dest_exchange_key != want.dest_exchange_key
    {
        out.push("exchange");
    }
    if have.ack_mode != want.ack_mode {
        out.push("ack mode");
    }
    if have.reconnect_delay_s != want.reconnect_delay_s {
        out.push("reconnect delay");
    }
    if have.prefetch_count != want.prefetch_count {
        out.push("prefetch");
    }
    if have.dest_user_id != want.dest_user_id {
        out.push("user_id");
    }
    if !other_keys.is_empty() {
        out.push("other settings");
    }
    out
}

fn exchange_binding(b: &BindingInfo) -> Option<ExchangeBinding> {
    (b.destination_type == "exchange").then(|| ExchangeBinding {
        source: b.source.clone(),
        destination: b.destination.clone(),
        key: b.routing_key.clone(),
    })
}

/// `--prune`: what is no longer declared, and only what is clearly this pump's.
fn prune(desired: &Desired, actual: &Actual, out: &mut Vec<Change>) {
    // Fan-out bindings of sources or neighbours that are gone (the `pumpwatch.` keys
    // are ours alone: route refuses reports under them).
    for b in &actual.bindings {
        if let Some(eb) = exchange_binding(b)
            && desired.exchanges.contains(&eb.source)
            && crate::broker::names::is_reserved_topic(&eb.key)
            && !desired.exchange_bindings.contains(&eb)
        {
            out.push(Change::Unbind(b.clone()));
        }
    }
    // Bindings of our own queues to what they should no longer read.
    for b in &actual.bindings {
        let binding = Binding {
            exchange: b.source.clone(),
            queue: b.destination.clone(),
            key: b.routing_key.clone(),
        };
        if b.destination_type == "queue"
            && !b.source.is_empty()
            && desired.queues.contains_key(&b.destination)
            && !desired.bindings.contains(&binding)
        {
            out.push(Change::Unbind(b.clone()));
        }
    }
    // Shovels of neighbours that are gone, then what they drained.
    for name in actual.shovels.keys() {
        if crate::broker::names::forward_shovel_cluster(name).is_some()
            && !desired.shovels.contains_key(name)
        {
            out.push(Change::DeleteShovel(name.clone()));
        }
    }
    for (name, q) in &actual.queues {
        let forward = name
            .strip_prefix(&desired.forward_queue_prefix)
            .is_some_and(|c| !c.is_empty());
        if !desired.queues.contains_key(name) && (forward || is_retained_queue(name, q)) {
            out.push(Change::DeleteQueue(name.clone()));
        }
    }
    for name in actual.exchanges.keys() {
        if name.starts_with('x') && !desired.exchanges.contains(name) {
            out.push(Change::DeleteExchange(name.clone()));
        }
    }
    for name in actual.users.keys() {
        if !desired.users.contains_key(name)
            && !desired.protected_users.contains(name)
            && actual.permissions.contains_key(name)
            && !actual.users_elsewhere.contains(name)
        {
            out.push(Change::DeleteUser(name.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::desired::{Inputs, permissions};
    use super::*;
    use crate::config::Config;
    use serde_json::json;

    const CONFIG: &str = r#"
        [users.radar]
        role = "source"
        password_env = "PW_RADAR"
        retain = 1000
        [users.cfs]
        role = "subscriber"
        [users.feed]
        role = "feeder"
        password_env = "PW_FEED"
    "#;

    fn desired(prune: bool) -> Desired {
        let config = Config::parse(CONFIG, "t.toml").unwrap();
        let env = |v: &str| match v {
            "PW_RADAR" => Some("sekrit-radar".to_owned()),
            "PW_FEED" => Some("sekrit-feed".to_owned()),
            _ => None,
        };
        Desired::build(&Inputs {
            config: &config,
            import: None,
            env: &env,
            vhost: "pump".into(),
            broker_user: "feed".into(),
            broker_host: None,
            running_user: "root".into(),
            prune,
        })
    }

    fn topic() -> ActualExchange {
        ActualExchange {
            kind: "topic".into(),
            durable: true,
            auto_delete: false,
            internal: false,
        }
    }

    fn binding(exchange: &str, queue: &str, key: &str) -> BindingInfo {
        BindingInfo {
            source: exchange.into(),
            destination: queue.into(),
            destination_type: "queue".into(),
            routing_key: key.into(),
            properties_key: key.into(),
        }
    }

    fn args(pairs: &[(&str, Value)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    /// The broker after a successful setup of `desired`.
    fn matching(d: &Desired) -> Actual {
        let mut a = Actual {
            vhost_exists: true,
            ..Actual::default()
        };
        for u in d.users.values() {
            a.users.insert(
                u.name.clone(),
                ActualUser {
                    tags: u.tags.clone(),
                    password_matches: u.password.as_ref().map(|_| true),
                },
            );
            a.permissions.insert(u.name.clone(), u.perms.clone());
        }
        for x in &d.exchanges {
            a.exchanges.insert(x.clone(), topic());
        }
        a.exchanges.insert(
            String::new(),
            ActualExchange {
                kind: "direct".into(),
                ..topic()
            },
        );
        a.exchanges.insert("amq.topic".into(), topic());
        for q in d.queues.values() {
            let arguments = q
                .arguments
                .iter()
                .map(|(k, v)| (k.clone(), arg_json(v)))
                .collect();
            a.queues.insert(
                q.name.clone(),
                ActualQueue {
                    durable: true,
                    arguments,
                },
            );
            // The default exchange's implicit binding is listed too.
            a.bindings.push(binding("", &q.name, &q.name));
        }
        for b in &d.bindings {
            a.bindings.push(binding(&b.exchange, &b.queue, &b.key));
        }
        for b in &d.exchange_bindings {
            a.bindings.push(BindingInfo {
                destination_type: "exchange".into(),
                ..binding(&b.source, &b.destination, &b.key)
            });
        }
        for s in d.shovels.values() {
            if let Some(spec) = &s.spec {
                a.shovels.insert(
                    s.name.clone(),
                    ShovelDefinition {
                        spec: spec.clone(),
                        other_keys: vec![],
                    },
                );
            }
        }
        a
    }

    fn lines(changes: &[Change]) -> Vec<String> {
        changes.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn fresh_broker_gets_everything_in_order() {
        let d = desired(false);
        let empty = Actual {
            vhost_exists: false,
            ..Actual::default()
        };
        let got = lines(&plan(&d, &empty));
        let want = [
            "+ vhost pump",
            "! user cfs (subscriber) does not exist and has no password: give users.cfs.password_env",
            "+ user feed (feeder, tags monitoring)",
            "+ permissions feed",
            "+ user radar (source)",
            "+ permissions radar",
            "+ exchange xpublic",
            "+ exchange xr_radar",
            "+ exchange xrejected",
            "+ exchange xreport",
            "+ exchange xs_cfs",
            "+ exchange xs_feed",
            "+ exchange xs_radar",
            "+ queue q_feed.route.rejected (max 100000)",
            "+ queue q_feed.route.validate",
            "+ queue q_radar.reports (max 1000)",
            "+ binding xpublic -> q_feed.route.validate (#)",
            "+ binding xr_radar -> q_radar.reports (#)",
            "+ binding xrejected -> q_feed.route.rejected (#)",
            "+ binding xs_cfs -> q_feed.route.validate (#)",
            "+ binding xs_feed -> q_feed.route.validate (#)",
            "+ binding xs_radar -> q_feed.route.validate (#)",
            "+ binding xreport -> exchange xr_radar (pumpwatch.source.radar)",
            "+ binding xreport -> exchange xrejected (pumpwatch.unrouted)",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn a_matching_broker_needs_nothing() {
        for prune in [false, true] {
            let d = desired(prune);
            let mut a = matching(&d);
            // cfs has no password but exists already: kept as it is.
            a.users.get_mut("cfs").unwrap().password_matches = None;
            // Tags in another order are the same tags.
            a.users.get_mut("feed").unwrap().tags = vec!["monitoring".into(), "monitoring".into()];
            // guest and the running user are never pruned; nor is a user of another vhost.
            for u in ["guest", "root", "shared"] {
                a.users.insert(u.into(), ActualUser::default());
                a.permissions
                    .insert(u.into(), permissions(Role::Admin, u, "xpublic"));
            }
            a.users_elsewhere.insert("shared".into());
            // A user without permissions here is another pump's.
            a.users
                .insert("other-pump-user".into(), ActualUser::default());
            // A subscriber's own q_<user>.reports (not our shape) is left alone.
            a.queues.insert(
                "q_cfs.reports".into(),
                ActualQueue {
                    durable: true,
                    arguments: Map::new(),
                },
            );
            a.queues.insert(
                "q_zzz.reports".into(),
                ActualQueue {
                    durable: true,
                    arguments: args(&[("x-max-length", json!(5))]),
                },
            );
            // An explicit x-queue-type classic is what no x-queue-type means.
            a.queues
                .get_mut("q_feed.route.validate")
                .unwrap()
                .arguments
                .insert("x-queue-type".into(), json!("classic"));
            assert_eq!(lines(&plan(&d, &a)), Vec::<String>::new(), "prune {prune}");
        }
    }

    #[test]
    fn users_passwords_tags_and_permissions() {
        let d = desired(false);
        type Tweak = fn(&mut Actual);
        let table: &[(Tweak, &[&str])] = &[
            (
                |a| a.users.get_mut("radar").unwrap().password_matches = Some(false),
                &["~ user radar (password)"],
            ),
            (
                |a| a.users.get_mut("feed").unwrap().tags = vec!["administrator".into()],
                &["~ user feed (tags monitoring)"],
            ),
            (
                |a| {
                    let u = a.users.get_mut("radar").unwrap();
                    u.tags = vec!["management".into()];
                    u.password_matches = Some(false);
                },
                &["~ user radar (password, tags none)"],
            ),
            (
                |a| a.users.get_mut("cfs").unwrap().tags = vec!["management".into()],
                &[
                    "! user cfs has tags management, wanted none: its password is needed to change them: give users.cfs.password_env",
                ],
            ),
            (
                |a| {
                    a.permissions.remove("radar");
                },
                &["+ permissions radar"],
            ),
            (
                |a| {
                    let p = a.permissions.get_mut("radar").unwrap();
                    p.write = ".*".into();
                    p.read = "^xs_radar".into();
                },
                &["~ permissions radar (write, read)"],
            ),
            (
                |a| {
                    a.users.remove("radar");
                    a.permissions.remove("radar");
                },
                &["+ user radar (source)", "+ permissions radar"],
            ),
        ];
        for (tweak, want) in table {
            let mut a = matching(&d);
            tweak(&mut a);
            assert_eq!(lines(&plan(&d, &a)), *want);
        }
    }

    #[test]
    fn standby_queues_of_an_earlier_version_say_how_to_change_them() {
        let config = Config::parse(
            &format!("{CONFIG}\n[archive]\ndir = \"/a\"\n[watchdog]\nstate_dir = \"/w\"\n"),
            "t.toml",
        )
        .unwrap();
        let env = |_: &str| Some("pw".to_owned());
        let d = Desired::build(&Inputs {
            config: &config,
            import: None,
            env: &env,
            vhost: "pump a".into(),
            broker_user: "feed".into(),
            broker_host: None,
            running_user: "root".into(),
            prune: false,
        });
        let sac = |a: &Actual, q: &str| {
            a.queues[q]
                .arguments
                .get("x-single-active-consumer")
                .cloned()
        };
        let mut a = matching(&d);
        assert_eq!(sac(&a, "q_feed.archive"), Some(json!(true)));
        assert_eq!(sac(&a, "q_feed.watchdog"), Some(json!(true)));
        assert!(plan(&d, &a).is_empty(), "{:?}", lines(&plan(&d, &a)));
        // speedo's queue is only checked: absent, nothing; present and right, nothing.
        a.queues.insert(
            "q_feed.speedo".into(),
            ActualQueue {
                durable: true,
                arguments: args(&[("x-single-active-consumer", json!(true))]),
            },
        );
        assert!(plan(&d, &a).is_empty());
        for q in ["q_feed.archive", "q_feed.speedo"] {
            a.queues.get_mut(q).unwrap().arguments.clear();
        }
        assert_eq!(
            lines(&plan(&d, &a)),
            [
                "! queue q_feed.archive has no x-single-active-consumer, wanted true: an earlier \
                 pumpwatch declared it; a standby instance needs single active consumer, and \
                 this version's daemon will not start on it. Stop the daemons reading it, \
                 delete it (rabbitmqctl delete_queue -p 'pump a' q_feed.archive; what waits in \
                 it is lost), then start them again: they declare it anew",
                "! queue q_feed.speedo has no x-single-active-consumer, wanted true: an earlier \
                 pumpwatch declared it; a standby instance needs single active consumer, and \
                 this version's daemon will not start on it. Stop the daemons reading it, \
                 delete it (rabbitmqctl delete_queue -p 'pump a' q_feed.speedo; what waits in \
                 it is lost), then start them again: they declare it anew",
            ]
        );
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }

    #[test]
    fn conflicting_queues_and_exchanges_are_problems() {
        let d = desired(false);
        type Tweak = fn(&mut Actual);
        let table: &[(Tweak, &str)] = &[
            (
                |a| {
                    a.queues
                        .get_mut("q_radar.reports")
                        .unwrap()
                        .arguments
                        .insert("x-max-length".into(), json!(500));
                },
                "! queue q_radar.reports has x-max-length 500, wanted 1000: delete it to change",
            ),
            (
                |a| {
                    let q = a.queues.get_mut("q_radar.reports").unwrap();
                    q.arguments.remove("x-overflow");
                    q.arguments.insert("x-message-ttl".into(), json!(60000));
                },
                "! queue q_radar.reports has x-message-ttl 60000, wanted none; has no x-overflow, wanted drop-head: delete it to change",
            ),
            (
                |a| {
                    a.queues
                        .get_mut("q_feed.route.validate")
                        .unwrap()
                        .arguments
                        .insert("x-queue-type".into(), json!("quorum"));
                },
                "! queue q_feed.route.validate has x-queue-type quorum, wanted none: delete it to change",
            ),
            (
                |a| a.queues.get_mut("q_feed.route.validate").unwrap().durable = false,
                "! queue q_feed.route.validate is not durable: delete it to change",
            ),
            (
                |a| a.exchanges.get_mut("xreport").unwrap().kind = "fanout".into(),
                "! exchange xreport is fanout durable, wanted topic durable: delete it to change",
            ),
            (
                |a| {
                    let x = a.exchanges.get_mut("xs_radar").unwrap();
                    x.durable = false;
                    x.auto_delete = true;
                },
                "! exchange xs_radar is topic transient auto-delete, wanted topic durable: delete it to change",
            ),
        ];
        for (tweak, want) in table {
            let mut a = matching(&d);
            tweak(&mut a);
            assert_eq!(lines(&plan(&d, &a)), [*want]);
        }
        // A number the API shows as a float is the same limit.
        let mut a = matching(&d);
        a.queues
            .get_mut("q_radar.reports")
            .unwrap()
            .arguments
            .insert("x-max-length".into(), json!(1000.0));
        assert!(plan(&d, &a).is_empty());
        // The second queue of the two-stage route goes, once the broker finds it empty.
        let mut a = matching(&d);
        a.queues.insert(
            "q_feed.route.dispatch".into(),
            ActualQueue {
                durable: true,
                arguments: Map::new(),
            },
        );
        assert_eq!(
            lines(&plan(&d, &a)),
            ["- queue q_feed.route.dispatch (no longer used)"]
        );
    }

    #[test]
    fn missing_bindings_are_added_but_extra_ones_only_pruned() {
        let mut a = matching(&desired(false));
        a.bindings.retain(|b| b.source != "xr_radar");
        a.bindings
            .push(binding("xs_gone", "q_feed.route.validate", "#"));
        a.bindings
            .push(binding("xs_radar", "q_feed.route.validate", "v02.#"));
        a.bindings.push(binding("xs_radar", "q_radar.mine", "#")); // not our queue
        assert_eq!(
            lines(&plan(&desired(false), &a)),
            ["+ binding xr_radar -> q_radar.reports (#)"]
        );
        assert_eq!(
            lines(&plan(&desired(true), &a)),
            [
                "+ binding xr_radar -> q_radar.reports (#)",
                "- binding xs_gone -> q_feed.route.validate (#)",
                "- binding xs_radar -> q_feed.route.validate (v02.#)",
            ]
        );
    }

    #[test]
    fn prune_removes_only_what_is_ours_and_undeclared() {
        let d = desired(true);
        let mut a = matching(&d);
        a.users.insert("old".into(), ActualUser::default());
        a.permissions
            .insert("old".into(), permissions(Role::Source, "old", "xpublic"));
        a.exchanges.insert("xs_old".into(), topic());
        a.exchanges.insert("xr_old".into(), topic());
        a.exchanges.insert("amq.direct".into(), topic());
        a.exchanges.insert("other".into(), topic());
        a.queues.insert(
            "q_old.reports".into(),
            ActualQueue {
                durable: true,
                arguments: args(&[
                    ("x-max-length", json!(10)),
                    ("x-overflow", json!("drop-head")),
                ]),
            },
        );
        assert_eq!(
            lines(&plan(&d, &a)),
            [
                "- queue q_old.reports",
                "- exchange xr_old",
                "- exchange xs_old",
                "- user old"
            ]
        );
        // Without --prune, nothing goes.
        assert!(plan(&desired(false), &a).is_empty());
        // A source whose retain went to 0 loses its retained queue.
        let config = Config::parse(&CONFIG.replace("retain = 1000", ""), "t").unwrap();
        let env = |_: &str| Some("pw".to_owned());
        let d0 = Desired::build(&Inputs {
            config: &config,
            import: None,
            env: &env,
            vhost: "pump".into(),
            broker_user: "feed".into(),
            broker_host: None,
            running_user: "root".into(),
            prune: true,
        });
        let got = lines(&plan(&d0, &matching(&d)));
        assert_eq!(got, ["- queue q_radar.reports"]);
    }

    #[test]
    fn lines_never_show_passwords() {
        let d = desired(false);
        let mut a = matching(&d);
        a.users.remove("feed");
        a.users.get_mut("radar").unwrap().password_matches = Some(false);
        let changes = plan(&d, &a);
        assert_eq!(changes.len(), 2);
        let text = format!("{} {} {changes:?}", changes[0], changes[1]);
        assert!(!text.contains("sekrit"), "{text}");
    }

    const NEIGHBOURS: &str = r#"
        cluster = "pump-a"
        [users.feed]
        role = "feeder"
        password_env = "PW_FEED"
        [clusters.pump-b]
        broker = "amqp://from-a@pump-b:5672/b"
        password_env = "PW_B"
        [clusters.pump-c]
        via = "pump-b"
    "#;

    fn with_neighbours(env: &dyn Fn(&str) -> Option<String>, prune: bool) -> Desired {
        let config = Config::parse(NEIGHBOURS, "t.toml").unwrap();
        Desired::build(&Inputs {
            config: &config,
            import: None,
            env,
            vhost: "pump".into(),
            broker_user: "feed".into(),
            broker_host: None,
            running_user: "root".into(),
            prune,
        })
    }

    fn env_b(v: &str) -> Option<String> {
        match v {
            "PW_FEED" => Some("sekrit-feed".to_owned()),
            "PW_B" => Some("sekrit-b".to_owned()),
            _ => None,
        }
    }

    #[test]
    fn shovels_are_declared_after_their_queue_and_updated_when_they_differ() {
        let d = with_neighbours(&env_b, false);
        let empty = Actual {
            vhost_exists: true,
            ..Actual::default()
        };
        let got = lines(&plan(&d, &empty));
        let shovel = "+ shovel pumpwatch.forward.pump-b (q_feed.forward.pump-b -> \
                      amqp://from-a:****@pump-b:5672/b xs_from-a)";
        let at = got
            .iter()
            .position(|l| l == shovel)
            .unwrap_or_else(|| panic!("{got:#?}"));
        let queue = got
            .iter()
            .position(|l| l == "+ queue q_feed.forward.pump-b")
            .unwrap();
        let binding = got
            .iter()
            .position(|l| l == "+ binding xforward_pump-b -> q_feed.forward.pump-b (#)")
            .unwrap();
        assert!(at > queue && at > binding, "{got:#?}");
        assert_eq!(
            got.iter().filter(|l| l.contains("shovel")).count(),
            1,
            "none via"
        );
        assert!(!format!("{got:?} {:?}", plan(&d, &empty)).contains("sekrit"));

        assert!(plan(&d, &matching(&d)).is_empty());
        type Tweak = fn(&mut ShovelDefinition);
        let table: &[(Tweak, &str)] = &[
            (
                |s| s.spec.dest_uri = s.spec.dest_uri.replace("sekrit-b", "old"),
                "~ shovel pumpwatch.forward.pump-b (password)",
            ),
            (
                |s| s.spec.dest_uri = s.spec.dest_uri.replace("pump-b:5672", "old:5672"),
                "~ shovel pumpwatch.forward.pump-b (destination)",
            ),
            (
                |s| {
                    s.spec.reconnect_delay_s = Some(1);
                    s.other_keys.push("add-forward-headers".into());
                },
                "~ shovel pumpwatch.forward.pump-b (reconnect delay, other settings)",
            ),
            (
                |s| {
                    s.spec.ack_mode = crate::broker::mgmt::AckMode::NoAck;
                    s.spec.dest_user_id = None;
                    s.spec.src_queue = "q".into();
                },
                "~ shovel pumpwatch.forward.pump-b (source, ack mode, user_id)",
            ),
        ];
        for (tweak, want) in table {
            let mut a = matching(&d);
            tweak(a.shovels.get_mut("pumpwatch.forward.pump-b").unwrap());
            let changes = plan(&d, &a);
            assert_eq!(lines(&changes), [*want]);
            let Change::PutShovel { spec, .. } = &changes[0] else {
                panic!("{changes:?}")
            };
            assert_eq!(
                Some(spec),
                d.shovels["pumpwatch.forward.pump-b"].spec.as_ref()
            );
        }
    }

    #[test]
    fn a_neighbours_account_may_use_the_vhost_only_once_it_is_bound() {
        let config = Config::parse(
            "[users.feed]\nrole = \"feeder\"\npassword_env = \"P\"\n\
             [users.from-b]\nrole = \"cluster\"\npassword_env = \"P\"\n",
            "t.toml",
        )
        .unwrap();
        let env = |_: &str| Some("pw".to_owned());
        let d = Desired::build(&Inputs {
            config: &config,
            import: None,
            env: &env,
            vhost: "pump".into(),
            broker_user: "feed".into(),
            broker_host: None,
            running_user: "root".into(),
            prune: false,
        });
        let got = lines(&plan(&d, &Actual::default()));
        let at = |l: &str| {
            got.iter()
                .position(|g| g == l)
                .unwrap_or_else(|| panic!("{l}: {got:#?}"))
        };
        assert!(at("+ user from-b (cluster)") < at("+ exchange xs_from-b"));
        assert!(at("+ permissions feed") < at("+ exchange xs_from-b"));
        assert!(
            at("+ binding xs_from-b -> q_feed.route.validate (#)") < at("+ permissions from-b")
        );
        assert_eq!(got.last().unwrap(), "+ permissions from-b");
    }

    #[test]
    fn a_shovel_without_a_password_is_a_problem() {
        let d = with_neighbours(&|v| (v == "PW_FEED").then(|| "f".to_owned()), false);
        let a = matching(&d);
        assert_eq!(
            lines(&plan(&d, &a)),
            [
                "! shovel pumpwatch.forward.pump-b to pump-b cannot be declared: no password for \
              the account there: set PW_B"
            ]
        );
        // Declared earlier, with a password this run does not know.
        let a = matching(&with_neighbours(&env_b, false));
        assert!(lines(&plan(&d, &a))[0].contains("cannot be checked"));
    }

    #[test]
    fn prune_removes_shovels_and_queues_of_neighbours_that_are_gone() {
        let d = with_neighbours(&env_b, true);
        let mut a = matching(&d);
        let old = a.shovels["pumpwatch.forward.pump-b"].clone();
        a.shovels
            .insert("pumpwatch.forward.gone".into(), old.clone());
        a.shovels.insert("theirs".into(), old);
        let q = ActualQueue {
            durable: true,
            arguments: Map::new(),
        };
        a.queues.insert("q_feed.forward.gone".into(), q.clone());
        a.queues.insert("q_other.forward.gone".into(), q);
        assert_eq!(
            lines(&plan(&d, &a)),
            [
                "- shovel pumpwatch.forward.gone",
                "- queue q_feed.forward.gone"
            ]
        );
        assert!(plan(&with_neighbours(&env_b, false), &a).is_empty());
    }
}
