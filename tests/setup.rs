//! `pumpwatch setup` against the real broker: what it creates, that a second run changes
//! nothing, what the permissions it sets really allow over AMQP, `--prune`, the retained
//! queue, the Sarracenia import, and problems reported without stopping half-way.
//!
//! Users are broker-wide: every test declares users named with its vhost's prefix and
//! deletes them at the end (a [`DropUsers`] guard), so tests run in parallel safely.
//! Passwords reach `setup` through [`pumpwatch::cmd::setup::Config::with_env`]'s environment lookup, never
//! through the process environment.

mod common;

use pumpwatch::broker::names;

use std::collections::HashMap;
use std::time::Duration;

use common::TestVhost;
use pumpwatch::broker::amqp::{
    AmqpError, BindingDecl, Client, ConnectOptions, MessageProps, QueueDecl, Topology,
};
use pumpwatch::broker::mgmt::{MgmtClient, QueueSpec};
use pumpwatch::cmd::setup::{self, Args, Summary};
use pumpwatch::cmd::{Common, Error};
use pumpwatch::config::Config;
use serde_json::{Map, json};

const DEADLINE: Duration = Duration::from_secs(20);

use common::DropUsers;

/// A pump declared for a test: the config (with the vhost's user prefix), the
/// "environment" holding the passwords, and the guard for the users.
struct Pump {
    config: Config,
    env: HashMap<String, String>,
    prefix: String,
    _users: DropUsers,
}

impl Pump {
    /// `users`: (short name, role, retain). Every user gets `password_env = PW_<SHORT>`
    /// and a password in the test's environment, unless `without_password` names it.
    fn new(vh: &TestVhost, users: &[(&str, &str, u32)], without_password: &[&str]) -> Pump {
        Self::with_extra(vh, users, without_password, "")
    }

    fn with_extra(
        vh: &TestVhost,
        users: &[(&str, &str, u32)],
        without_password: &[&str],
        extra_toml: &str,
    ) -> Pump {
        let prefix = vh.user_prefix.clone();
        let mut toml = String::new();
        let mut env = HashMap::new();
        let mut names = Vec::new();
        for (short, role, retain) in users {
            let var = format!("PW_{}", short.to_uppercase());
            let full = format!("{prefix}{short}");
            toml.push_str(&format!(
                "[users.\"{full}\"]\nrole = \"{role}\"\npassword_env = \"{var}\"\nretain = {retain}\n"
            ));
            if !without_password.contains(short) {
                env.insert(var, format!("pw-{short}-{:08x}", rand::random::<u32>()));
            }
            names.push(full);
        }
        toml.push_str(extra_toml);
        let config = Config::parse(&toml, "test").unwrap_or_else(|e| panic!("{e}\n{toml}"));
        Pump {
            config,
            env,
            prefix,
            _users: DropUsers(names),
        }
    }

    fn user(&self, short: &str) -> String {
        format!("{}{short}", self.prefix)
    }

    fn password(&self, short: &str) -> String {
        self.env[&format!("PW_{}", short.to_uppercase())].clone()
    }

    /// Runs setup on the test vhost as guest; returns the result and what it printed.
    async fn setup(&self, vh: &TestVhost, args: Args) -> (Result<Summary, Error>, String) {
        let env = self.env.clone();
        let lookup = std::sync::Arc::new(move |var: &str| env.get(var).cloned());
        let common =
            Common::new(self.config.clone(), Some(&vh.amqp_url), Some(&vh.admin_url)).unwrap();
        let mut out = Vec::new();
        let result = match setup::Config::with_env(args, &common, lookup) {
            Err(e) => Err(Error::Usage(e)),
            Ok(cfg) => setup::apply(&cfg, &mut out)
                .await
                .map_err(|e| Error::Failed(e.to_string())),
        };
        let out = String::from_utf8(out).expect("UTF-8 output");
        (result, out)
    }

    /// An AMQP client logged in as `short` (no reconnecting: a test wants to see errors).
    async fn connect(&self, vh: &TestVhost, short: &str) -> Client {
        let url = vh.amqp_url_as(&self.user(short), &self.password(short));
        let opts = ConnectOptions {
            reconnect: false,
            ..ConnectOptions::new(format!("setup-test-{short}"))
        };
        Client::connect(&common::broker(&url), opts)
            .await
            .unwrap_or_else(|e| panic!("connecting as {short}: {e}"))
    }
}

fn dry() -> Args {
    Args {
        dry_run: true,
        ..Args::default()
    }
}

fn prune(dry_run: bool) -> Args {
    Args {
        dry_run,
        prune: true,
        ..Args::default()
    }
}

const NO_CHANGE: &str = "setup: no change (broker matches the topology)\n";

/// Publishes one message and waits for the broker's answer.
async fn publish(c: &Client, exchange: &str) -> Result<(), AmqpError> {
    c.publish_raw(exchange, "v02.report.x", b"hello", &MessageProps::default())
        .await?
        .wait()
        .await
}

fn assert_refused(what: &str, r: Result<(), AmqpError>) {
    match r {
        Err(AmqpError::AccessRefused(text)) => {
            assert!(text.contains("ACCESS_REFUSED"), "{what}: {text}")
        }
        other => panic!("{what}: expected ACCESS_REFUSED, got {other:?}"),
    }
}

fn bind(queue: &str, exchange: &str) -> Topology {
    Topology {
        exchanges: vec![],
        queues: vec![QueueDecl::durable(queue)],
        bindings: vec![BindingDecl::new(queue, exchange, "#")],
        ..Topology::default()
    }
}

async fn exchange_names(vh: &TestVhost) -> Vec<String> {
    let mut names: Vec<String> = vh
        .mgmt
        .list_exchanges(&vh.name)
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.name)
        .collect();
    names.sort();
    names
}

async fn user_tags(vh: &TestVhost, name: &str) -> Option<Vec<String>> {
    vh.mgmt
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .find(|u| u.name == name)
        .map(|u| u.tags)
}

#[tokio::test]
async fn fresh_vhost_then_no_change_and_dry_run_changes_nothing() {
    let Some(vh) = common::vhost("setup").await else {
        return;
    };
    let pump = Pump::new(
        &vh,
        &[
            ("radar", "source", 1000),
            ("cfs", "subscriber", 0),
            ("feed", "feeder", 0),
            ("boss", "admin", 0),
        ],
        &[],
    );
    let (radar, feed) = (pump.user("radar"), pump.user("feed"));

    // A dry run prints the plan and touches nothing.
    let (result, planned) = pump.setup(&vh, dry()).await;
    let summary = result.unwrap();
    assert!(summary.dry_run && summary.changes > 20, "{planned}");
    let lines: Vec<&str> = planned.lines().collect();
    assert!(
        lines[..lines.len() - 1]
            .iter()
            .all(|l| l.starts_with("would ")),
        "{planned}"
    );
    assert_eq!(
        lines.last().unwrap(),
        &format!("setup: would make {} changes", summary.changes)
    );
    assert!(
        planned.contains(&format!("would + user {radar} (source)\n")),
        "{planned}"
    );
    assert_eq!(user_tags(&vh, &radar).await, None);
    assert!(!exchange_names(&vh).await.iter().any(|x| x.starts_with('x')));
    assert!(vh.mgmt.list_queues(&vh.name).await.unwrap().is_empty());

    // The real run does exactly what the dry run said.
    let (result, applied) = pump.setup(&vh, Args::default()).await;
    println!("--- first run ---\n{applied}");
    assert_eq!(result.unwrap().changes, summary.changes);
    let applied_lines: Vec<&str> = applied.lines().collect();
    let planned_lines: Vec<String> = lines.iter().map(|l| l.replacen("would ", "", 1)).collect();
    assert_eq!(
        applied_lines[..applied_lines.len() - 1],
        planned_lines[..lines.len() - 1]
    );
    assert_eq!(
        applied_lines.last().unwrap(),
        &format!("setup: {} changes", summary.changes)
    );
    for want in [
        format!("+ user {radar} (source)"),
        format!("+ user {feed} (feeder, tags monitoring)"),
        format!("+ permissions {radar}"),
        format!("+ exchange xr_{radar}"),
        format!("+ queue q_{radar}.reports (max 1000)"),
        format!("+ binding xr_{radar} -> q_{radar}.reports (#)"),
        format!("+ queue q_{feed}.route.validate"),
        "+ exchange xreport".to_owned(),
    ] {
        assert!(applied.contains(&format!("{want}\n")), "{want}\n{applied}");
    }

    // Users and tags.
    assert_eq!(user_tags(&vh, &radar).await, Some(vec![]));
    assert_eq!(user_tags(&vh, &pump.user("cfs")).await, Some(vec![]));
    assert_eq!(user_tags(&vh, &feed).await, Some(vec!["monitoring".into()]));
    assert_eq!(
        user_tags(&vh, &pump.user("boss")).await,
        Some(vec!["administrator".into()])
    );
    // Permissions, as the spec writes them.
    let perms = vh.mgmt.list_permissions(&vh.name).await.unwrap();
    let p = perms.iter().find(|p| p.user == radar).unwrap();
    let q = format!(r"q_{radar}\..*");
    assert_eq!(p.configure, format!("^({q}|xs_{radar})$"));
    assert_eq!(p.write, format!("^({q}|xs_{radar})$"));
    assert_eq!(p.read, format!("^({q}|xs_{radar}|xr_{radar}|xpublic)$"));
    let p = perms.iter().find(|p| p.user == feed).unwrap();
    assert_eq!(
        (p.configure.as_str(), p.write.as_str(), p.read.as_str()),
        (".*", ".*", ".*")
    );
    // Exchanges: durable topics.
    let exchanges = vh.mgmt.list_exchanges(&vh.name).await.unwrap();
    for name in [
        "xpublic".to_owned(),
        "xreport".to_owned(),
        "xrejected".to_owned(),
        names::user_exchange(&radar),
        names::user_exchange(&pump.user("cfs")),
        names::user_exchange(&feed),
        names::user_exchange(&pump.user("boss")),
        names::source_exchange(&radar),
    ] {
        let x = exchanges
            .iter()
            .find(|x| x.name == name)
            .unwrap_or_else(|| panic!("{name}"));
        assert!(x.kind == "topic" && x.durable, "{x:?}");
    }
    assert!(
        !exchanges
            .iter()
            .any(|x| x.name == names::source_exchange(&pump.user("cfs")))
    );
    // Queues and bindings, the shapes the route daemon declares.
    let reports = vh
        .mgmt
        .get_queue(&vh.name, &format!("q_{radar}.reports"))
        .await
        .unwrap()
        .expect("retained queue");
    assert!(reports.durable);
    assert_eq!(reports.arguments["x-max-length"], json!(1000));
    assert_eq!(reports.arguments["x-overflow"], json!("drop-head"));
    let mut queues: Vec<String> = vh
        .mgmt
        .list_queues(&vh.name)
        .await
        .unwrap()
        .into_iter()
        .map(|q| q.name)
        .collect();
    queues.sort();
    assert_eq!(
        queues,
        [
            format!("q_{feed}.route.rejected"),
            format!("q_{feed}.route.validate"),
            format!("q_{radar}.reports"),
        ]
    );
    let bindings = vh.mgmt.list_bindings(&vh.name).await.unwrap();
    let validate = format!("q_{feed}.route.validate");
    let mut sources: Vec<&str> = bindings
        .iter()
        .filter(|b| b.destination == validate && !b.source.is_empty())
        .map(|b| b.source.as_str())
        .collect();
    sources.sort();
    assert_eq!(sources.len(), 5, "xpublic and 4 xs_: {sources:?}");
    // The broker fans routed reports out: xreport -> xr_<source>, -> xrejected.
    let mut fan_out: Vec<(&str, &str)> = bindings
        .iter()
        .filter(|b| b.source == "xreport" && b.destination_type == "exchange")
        .map(|b| (b.destination.as_str(), b.routing_key.as_str()))
        .collect();
    fan_out.sort();
    let radar_key = names::source_route_key(&radar);
    assert_eq!(
        fan_out,
        [
            (names::source_exchange(&radar).as_str(), radar_key.as_str()),
            ("xrejected", names::UNROUTED_KEY),
        ]
    );

    // Second run, and a dry run: nothing to do.
    let (result, out) = pump.setup(&vh, Args::default()).await;
    println!("--- second run ---\n{out}");
    assert_eq!(out, NO_CHANGE);
    assert_eq!(result.unwrap().changes, 0);
    let (result, out) = pump.setup(&vh, dry()).await;
    assert_eq!(out, NO_CHANGE);
    assert_eq!(result.unwrap().changes, 0);

    // The users can log in with the passwords given.
    pump.connect(&vh, "radar").await.close().await;
    MgmtClient::new(&vh.admin_url, &feed, &pump.password("feed"))
        .unwrap()
        .overview()
        .await
        .expect("the feeder logs in to the management API");

    // A new password is noticed and set, and nothing else changes.
    let mut pump = pump;
    pump.env.insert("PW_RADAR".into(), "a-new-password".into());
    let (result, out) = pump.setup(&vh, Args::default()).await;
    assert_eq!(out, format!("~ user {radar} (password)\nsetup: 1 change\n"));
    assert_eq!(result.unwrap().changes, 1);
    pump.connect(&vh, "radar").await.close().await;
    let (_, out) = pump.setup(&vh, Args::default()).await;
    assert_eq!(out, NO_CHANGE);
}

#[tokio::test]
async fn permissions_hold_over_amqp() {
    let Some(vh) = common::vhost("setup-perms").await else {
        return;
    };
    let pump = Pump::new(
        &vh,
        &[
            ("radar", "source", 0),
            ("sat", "source", 0),
            ("satx", "source", 0),
            ("cfs", "subscriber", 0),
        ],
        &[],
    );
    let (result, out) = pump.setup(&vh, Args::default()).await;
    result.unwrap_or_else(|e| panic!("{e}\n{out}"));
    let (radar, sat, satx, cfs) = (
        pump.user("radar"),
        pump.user("sat"),
        pump.user("satx"),
        pump.user("cfs"),
    );

    // A source reads its own report exchange: bind a queue of its own and consume.
    let c = pump.connect(&vh, "radar").await;
    let mine = format!("q_{radar}.x");
    c.declare(&bind(&mine, &names::source_exchange(&radar)))
        .await
        .expect("radar binds q_radar.x to xr_radar");
    let mut consumer = c
        .consume(&mine, 10)
        .await
        .expect("radar consumes its queue");
    let routed = vh
        .mgmt
        .publish(
            &vh.name,
            &names::source_exchange(&radar),
            "v02.report.a",
            "for radar",
            &Map::new(),
        )
        .await
        .unwrap();
    assert!(routed);
    let delivery = tokio::time::timeout(DEADLINE, consumer.next())
        .await
        .expect("a delivery in time")
        .expect("consumer open")
        .expect("delivery");
    assert_eq!(delivery.body, b"for radar");
    delivery.ack().await.unwrap();

    // ...but not another source's, nor the pump's report exchange.
    let other = format!("q_{radar}.y");
    let r = c
        .declare(&bind(&other, &names::source_exchange(&sat)))
        .await;
    assert_refused("radar binds to xr_sat", r);
    let r = c.declare(&bind(&mine, "xreport")).await;
    assert_refused("radar binds to xreport", r);
    // It cannot declare queues outside q_radar.*.
    let r = c
        .declare(&bind(&format!("q_{sat}.z"), &names::user_exchange(&radar)))
        .await;
    assert_refused("radar declares q_sat.z", r);
    // It writes only to xs_radar.
    assert_refused("radar publishes to xreport", publish(&c, "xreport").await);
    assert_refused(
        "radar publishes to xr_radar",
        publish(&c, &names::source_exchange(&radar)).await,
    );
    publish(&c, &names::user_exchange(&radar))
        .await
        .expect("radar publishes to xs_radar");
    c.close().await;

    // A subscriber publishes only to its xs_ exchange; reads xpublic, not xr_ of others.
    let c = pump.connect(&vh, "cfs").await;
    publish(&c, &names::user_exchange(&cfs))
        .await
        .expect("cfs publishes to xs_cfs");
    for x in [
        names::user_exchange(&radar),
        "xpublic".to_owned(),
        "xreport".to_owned(),
        names::source_exchange(&cfs),
    ] {
        assert_refused(&format!("cfs publishes to {x}"), publish(&c, &x).await);
    }
    c.declare(&bind(&format!("q_{cfs}.sub"), "xpublic"))
        .await
        .expect("cfs binds its queue to xpublic");
    let r = c
        .declare(&bind(
            &format!("q_{cfs}.sub"),
            &names::source_exchange(&radar),
        ))
        .await;
    assert_refused("cfs binds to xr_radar", r);
    c.close().await;

    // Anchored: sat's patterns do not match satx's names.
    let c = pump.connect(&vh, "sat").await;
    publish(&c, &names::user_exchange(&sat))
        .await
        .expect("sat publishes to xs_sat");
    assert_refused(
        "sat publishes to xs_satx",
        publish(&c, &names::user_exchange(&satx)).await,
    );
    let r = c
        .declare(&bind(&format!("q_{satx}.a"), &names::user_exchange(&sat)))
        .await;
    assert_refused("sat declares q_satx.a", r);
    let r = c
        .declare(&bind(&format!("q_{sat}.a"), &names::source_exchange(&satx)))
        .await;
    assert_refused("sat binds to xr_satx", r);
    c.close().await;
    let c = pump.connect(&vh, "satx").await;
    publish(&c, &names::user_exchange(&satx))
        .await
        .expect("satx publishes to xs_satx");
    c.close().await;
}

#[tokio::test]
async fn prune_removes_what_is_no_longer_declared() {
    let Some(vh) = common::vhost("setup-prune").await else {
        return;
    };
    let pump = Pump::new(&vh, &[("radar", "source", 10)], &[]);
    let (result, out) = pump.setup(&vh, Args::default()).await;
    result.unwrap_or_else(|e| panic!("{e}\n{out}"));

    // Left-overs of an earlier topology: a user with permissions here only, its
    // exchanges and retained queue. And a bystander: a user without permissions here.
    let old = vh.add_user("old", "old-password", &[]).await.name;
    vh.mgmt
        .put_permissions(&vh.name, &old, ".*", ".*", ".*")
        .await
        .unwrap();
    let bystander = vh.add_user("bystander", "pw-bystander", &[]).await.name;
    for x in ["xs_old", "xr_old"] {
        vh.mgmt
            .declare_exchange(&vh.name, x, "topic", true)
            .await
            .unwrap();
    }
    vh.mgmt
        .declare_exchange(&vh.name, "other", "topic", true)
        .await
        .unwrap();
    let spec = QueueSpec::durable()
        .arg("x-max-length", 10)
        .arg("x-overflow", "drop-head");
    vh.mgmt
        .declare_queue(&vh.name, "q_old.reports", &spec)
        .await
        .unwrap();
    let amq_before: Vec<String> = exchange_names(&vh)
        .await
        .into_iter()
        .filter(|x| x.starts_with("amq.") || x.is_empty())
        .collect();
    assert!(amq_before.len() > 5, "{amq_before:?}");

    // Without --prune they stay.
    let (_, out) = pump.setup(&vh, Args::default()).await;
    assert_eq!(out, NO_CHANGE);

    let want = [
        "- queue q_old.reports".to_owned(),
        "- exchange xr_old".to_owned(),
        "- exchange xs_old".to_owned(),
        format!("- user {old}"),
    ];
    let (result, out) = pump.setup(&vh, prune(true)).await;
    result.unwrap();
    let lines: Vec<String> = want.iter().map(|l| format!("would {l}")).collect();
    assert_eq!(
        out,
        format!("{}\nsetup: would make 4 changes\n", lines.join("\n"))
    );
    assert!(
        user_tags(&vh, &old).await.is_some(),
        "dry run deleted nothing"
    );

    let (result, out) = pump.setup(&vh, prune(false)).await;
    println!("--- prune ---\n{out}");
    assert_eq!(result.unwrap().changes, 4);
    assert_eq!(out, format!("{}\nsetup: 4 changes\n", want.join("\n")));
    assert_eq!(user_tags(&vh, &old).await, None);
    assert!(user_tags(&vh, &bystander).await.is_some());
    assert!(user_tags(&vh, "guest").await.is_some());
    let exchanges = exchange_names(&vh).await;
    assert!(!exchanges.contains(&"xs_old".to_owned()) && !exchanges.contains(&"xr_old".to_owned()));
    assert!(
        exchanges.contains(&"other".to_owned()),
        "not an x* exchange"
    );
    assert!(exchanges.contains(&names::user_exchange(&pump.user("radar"))));
    for amq in &amq_before {
        assert!(exchanges.contains(amq), "{amq:?} kept");
    }
    assert!(
        vh.mgmt
            .get_queue(&vh.name, "q_old.reports")
            .await
            .unwrap()
            .is_none()
    );
    let radar_reports = format!("q_{}.reports", pump.user("radar"));
    assert!(
        vh.mgmt
            .get_queue(&vh.name, &radar_reports)
            .await
            .unwrap()
            .is_some()
    );

    let (_, out) = pump.setup(&vh, prune(false)).await;
    assert_eq!(out, NO_CHANGE);
}

#[tokio::test]
async fn retained_queue_keeps_the_newest() {
    let Some(vh) = common::vhost("setup-retain").await else {
        return;
    };
    let pump = Pump::new(&vh, &[("radar", "source", 5)], &[]);
    let (result, out) = pump.setup(&vh, Args::default()).await;
    result.unwrap_or_else(|e| panic!("{e}\n{out}"));
    let radar = pump.user("radar");

    // Published as guest with confirms: once confirmed, each is in the queue.
    let c = Client::connect(
        &common::broker(&vh.amqp_url),
        ConnectOptions::new("setup-test-retain"),
    )
    .await
    .unwrap();
    let exchange = names::source_exchange(&radar);
    for i in 0..8 {
        c.publish_raw(
            &exchange,
            "v02.report.x",
            i.to_string().as_bytes(),
            &MessageProps::default(),
        )
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    }
    c.close().await;
    let got = vh
        .mgmt
        .get_messages(&vh.name, &format!("q_{radar}.reports"), 20)
        .await
        .unwrap();
    let bodies: Vec<&str> = got.iter().map(|m| m.payload.as_str()).collect();
    assert_eq!(bodies, ["3", "4", "5", "6", "7"]);
}

#[tokio::test]
async fn import_from_a_sarracenia_directory() {
    let Some(vh) = common::vhost("setup-import").await else {
        return;
    };
    // `both` is declared a subscriber by Sarracenia and a source by the config: the
    // config wins. Its password comes from credentials.conf, as no variable is set.
    let pump = Pump::new(&vh, &[("both", "source", 0)], &["both"]);
    let user = |s: &str| pump.user(s);
    let (src, sub, feed, adm, both) = (
        user("isrc"),
        user("isub"),
        user("ifeed"),
        user("iadm"),
        user("both"),
    );
    let _imported = DropUsers(vec![src.clone(), sub.clone(), feed.clone(), adm.clone()]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("default.conf"),
        format!("# defaults\ndeclare env SR_X=1\ndeclare subscriber {both}\n"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("admin.conf"),
        format!(
            "cluster test.pump\n\n\
             declare source {src}\n\
             declare subscriber {sub}\n\
             feeder amqp://{feed}@localhost/\n\
             admin amqp://{adm}@localhost/\n\
             logLevel info\n"
        ),
    )
    .unwrap();
    // "s@cret:1/#" percent-encoded; the entry for another host is not used.
    let mut creds = String::from("# broker accounts\n");
    for u in [&src, &sub, &feed, &adm, &both] {
        creds.push_str(&format!("amqp://{u}:wrong@elsewhere.example/\n"));
        creds.push_str(&format!(
            "amqp://{u}:s%40cret%3A1%2F%23@127.0.0.1:5672/ opt=1\n"
        ));
    }
    creds.push_str("sftp://someone:pw@files.example/\n");
    std::fs::write(dir.path().join("credentials.conf"), creds).unwrap();

    let args = Args {
        from_sarracenia: Some(dir.path().to_owned()),
        ..Args::default()
    };
    let (result, out) = pump.setup(&vh, args.clone()).await;
    println!("--- import ---\n{out}");
    result.unwrap_or_else(|e| panic!("{e}\n{out}"));
    for want in [
        format!("+ user {src} (source)"),
        format!("+ user {sub} (subscriber)"),
        format!("+ user {feed} (feeder, tags monitoring)"),
        format!("+ user {adm} (admin, tags administrator)"),
        format!("+ user {both} (source)"),
        format!("+ exchange xr_{both}"),
        format!("+ exchange xr_{src}"),
        format!("+ queue q_{feed}.route.validate"),
    ] {
        assert!(out.contains(&format!("{want}\n")), "{want}\n{out}");
    }
    assert!(!out.contains(&names::source_exchange(&sub)), "{out}");

    // The decoded password works, over HTTP and over AMQP.
    let password = "s@cret:1/#";
    MgmtClient::new(&vh.admin_url, &adm, password)
        .unwrap()
        .overview()
        .await
        .expect("the imported admin logs in");
    let c = Client::connect(
        &common::broker(&vh.amqp_url_as(&src, password)),
        ConnectOptions {
            reconnect: false,
            ..ConnectOptions::new("setup-test-import")
        },
    )
    .await
    .expect("the imported source connects");
    publish(&c, &names::user_exchange(&src)).await.unwrap();
    c.close().await;

    let (result, out) = pump.setup(&vh, args).await;
    assert_eq!(out, NO_CHANGE);
    result.unwrap();

    // A malformed file is a usage error naming the file and line; nothing is touched.
    std::fs::write(dir.path().join("admin.conf"), "cluster a\nfeeder\n").unwrap();
    let bad = Args {
        from_sarracenia: Some(dir.path().to_owned()),
        ..Args::default()
    };
    let (result, out) = pump.setup(&vh, bad).await;
    let e = result.unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
    assert!(e.to_string().contains("admin.conf:2:"), "{e}");
    assert_eq!(out, "");
}

#[tokio::test]
async fn problems_are_reported_and_everything_else_applied() {
    let Some(vh) = common::vhost("setup-problems").await else {
        return;
    };
    let pump = Pump::new(
        &vh,
        &[("radar", "source", 1000), ("nopw", "subscriber", 0)],
        &["nopw"],
    );
    let radar = pump.user("radar");
    let nopw = pump.user("nopw");
    // The retained queue exists with another limit.
    let spec = QueueSpec::durable()
        .arg("x-max-length", 500)
        .arg("x-overflow", "drop-head");
    vh.mgmt
        .declare_queue(&vh.name, &format!("q_{radar}.reports"), &spec)
        .await
        .unwrap();

    let (result, out) = pump.setup(&vh, Args::default()).await;
    println!("--- problems ---\n{out}");
    let e = result.unwrap_err();
    assert_eq!(e.exit_code(), 1, "{e}");
    assert_eq!(
        e.to_string(),
        "setup: 2 problems left (the lines starting with '!')"
    );
    assert!(
        out.contains(&format!(
            "! user {nopw} (subscriber) does not exist and has no password: set PW_NOPW\n"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "! queue q_{radar}.reports has x-max-length 500, wanted 1000: delete it to change\n"
        )),
        "{out}"
    );
    assert!(out.ends_with(", 2 problems (see '!')\n"), "{out}");
    // The rest was applied: the radar user, its binding to the existing queue.
    assert_eq!(user_tags(&vh, &radar).await, Some(vec![]));
    assert_eq!(user_tags(&vh, &nopw).await, None);
    let bindings = vh.mgmt.list_bindings(&vh.name).await.unwrap();
    assert!(
        bindings
            .iter()
            .any(|b| b.source == names::source_exchange(&radar)
                && b.destination == format!("q_{radar}.reports"))
    );

    // Once the operator deletes the queue (and gives the password), setup completes.
    vh.mgmt
        .delete_queue(&vh.name, &format!("q_{radar}.reports"))
        .await
        .unwrap();
    let mut pump = pump;
    pump.env.insert("PW_NOPW".into(), "now-there-is-one".into());
    let (result, out) = pump.setup(&vh, Args::default()).await;
    result.unwrap_or_else(|e| panic!("{e}\n{out}"));
    assert!(
        out.contains(&format!("+ queue q_{radar}.reports (max 1000)\n")),
        "{out}"
    );
    assert!(
        out.contains(&format!("+ user {nopw} (subscriber)\n")),
        "{out}"
    );
    let (_, out) = pump.setup(&vh, Args::default()).await;
    assert_eq!(out, NO_CHANGE);
}

/// The broker's fan-out follows the declared sources: a new source gets its
/// `xreport → xr_<source>` binding on the next run, a removed one loses it with `--prune`.
/// The queue the two-stage route of earlier versions read from `xreport` is removed once
/// empty, never while it holds reports.
#[tokio::test]
async fn fan_out_follows_the_sources_and_the_old_dispatch_queue_goes_when_empty() {
    let Some(vh) = common::vhost("setup-fanout").await else {
        return;
    };
    let fan_out = |vh: &TestVhost| {
        let (m, v) = (vh.mgmt.clone(), vh.name.clone());
        async move {
            let mut keys: Vec<String> = m
                .list_bindings(&v)
                .await
                .unwrap()
                .into_iter()
                .filter(|b| b.source == "xreport" && b.destination_type == "exchange")
                .map(|b| b.routing_key)
                .collect();
            keys.sort();
            keys
        }
    };
    let one = Pump::new(&vh, &[("radar", "source", 0), ("feed", "feeder", 0)], &[]);
    let (radar, feed) = (one.user("radar"), one.user("feed"));
    one.setup(&vh, Args::default()).await.0.unwrap();
    assert_eq!(
        fan_out(&vh).await,
        [
            names::source_route_key(&radar),
            names::UNROUTED_KEY.to_owned()
        ]
    );
    // The queue of the old dispatch stage, still holding a report.
    let old = names::legacy_dispatch_queue(&feed);
    vh.mgmt
        .declare_queue(&vh.name, &old, &QueueSpec::durable())
        .await
        .unwrap();
    assert!(
        vh.mgmt
            .publish(&vh.name, "", &old, "a report", &Map::new())
            .await
            .unwrap()
    );

    let two = Pump::new(
        &vh,
        &[
            ("radar", "source", 0),
            ("sat", "source", 0),
            ("feed", "feeder", 0),
        ],
        &[],
    );
    let sat = two.user("sat");
    let (result, out) = two.setup(&vh, Args::default()).await;
    println!("--- a new source ---\n{out}");
    assert!(
        out.contains(&format!(
            "+ binding xreport -> exchange {} ({})\n",
            names::source_exchange(&sat),
            names::source_route_key(&sat)
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("! queue {old} of the two-stage route")),
        "{out}"
    );
    assert_eq!(result.unwrap_err().exit_code(), 1);
    let mut want = vec![
        names::UNROUTED_KEY.to_owned(),
        names::source_route_key(&radar),
        names::source_route_key(&sat),
    ];
    want.sort();
    assert_eq!(fan_out(&vh).await, want);
    assert!(vh.mgmt.get_queue(&vh.name, &old).await.unwrap().is_some());

    // Emptied, it goes.
    vh.mgmt.get_messages(&vh.name, &old, 10).await.unwrap();
    let (result, out) = two.setup(&vh, Args::default()).await;
    result.unwrap_or_else(|e| panic!("{e}\n{out}"));
    assert!(
        out.contains(&format!("- queue {old} (no longer used)\n")),
        "{out}"
    );
    assert!(vh.mgmt.get_queue(&vh.name, &old).await.unwrap().is_none());

    // sat is gone from the configuration: --prune removes its binding (and exchange).
    let (result, out) = one.setup(&vh, prune(false)).await;
    result.unwrap_or_else(|e| panic!("{e}\n{out}"));
    println!("--- prune ---\n{out}");
    assert_eq!(
        fan_out(&vh).await,
        [
            names::source_route_key(&radar),
            names::UNROUTED_KEY.to_owned()
        ]
    );
}
