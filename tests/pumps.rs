//! Reports across pumps (SPEC §4.8, issue 13), on one broker with one vhost per pump:
//! `pumpA` ← `pumpB` ← `pumpC`, each with its own configuration, its users made by its
//! own `setup` (which also declares the dynamic shovels), and its own `route` running
//! in-process as its feeder. A client of pumpC reports on products of pumpA's source:
//! the reports travel C → (shovel) → B → (shovel) → A and reach `xr_<source>` on A.
//!
//! What is shown: each report arrives once, with the true client stamped, its hop count,
//! its routing key and its bytes unchanged (also one carrying a `user_id`, which the
//! destination broker would refuse from the shovel's account); nothing is lost while A's
//! route is stopped, nor while A's whole vhost is gone (the shovel to it says `starting`
//! and `setup --status` exits 1, until `setup` brings A back); a loop in the `via` routes
//! ends at the hop limit in `xrejected` with reason `loop`.

mod common;

use common::watch::{Got, Seen, consume};

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use common::TestVhost;
use pumpwatch::broker::amqp::{Client, ConnectOptions, MessageProps};
use pumpwatch::broker::names;
use pumpwatch::cmd::setup::{self, Args};
use pumpwatch::cmd::{Common, Error, route};
use pumpwatch::config::Config;
use pumpwatch::core::emit::{Outgoing, emit};
use pumpwatch::core::report::{Format, Identity, Report};
use pumpwatch::core::{Headers, Stamp};
use pumpwatch::shutdown::Shutdown;

const T: Duration = Duration::from_secs(60);

/// One pump: a vhost, its configuration (as TOML, built up), the passwords `setup`
/// reads, and its `route` while it runs.
struct Pump {
    vh: TestVhost,
    cluster: String,
    toml: String,
    env: HashMap<String, String>,
    route: Option<(Shutdown, tokio::task::JoinHandle<Result<(), Error>>)>,
}

impl Pump {
    /// A pump with its feeder `feed`.
    async fn new(prefix: &str, cluster: &str) -> Option<Pump> {
        let vh = common::vhost(prefix).await?;
        let mut p = Pump {
            vh,
            cluster: cluster.to_owned(),
            toml: format!("cluster = \"{cluster}\"\n[route]\nprefetch = 200\n"),
            env: HashMap::new(),
            route: None,
        };
        p.user("feed", "feeder", 0);
        Some(p)
    }

    /// Declares `<prefix><short>` with `role`; `setup` makes it, the guard deletes it.
    fn user(&mut self, short: &str, role: &str, retain: u32) -> String {
        let full = self.vh.adopt_user(short);
        let var = var_name("PW", short);
        self.toml.push_str(&format!(
            "[users.\"{full}\"]\nrole = \"{role}\"\npassword_env = \"{var}\"\nretain = {retain}\n"
        ));
        self.env
            .insert(var, format!("pw-{short}-{:08x}", rand::random::<u32>()));
        full
    }

    fn name(&self, short: &str) -> String {
        format!("{}{short}", self.vh.user_prefix)
    }

    fn password(&self, short: &str) -> String {
        self.env[&var_name("PW", short)].clone()
    }

    fn url_as(&self, short: &str) -> String {
        self.vh
            .amqp_url_as(&self.name(short), &self.password(short))
    }

    /// A neighbour: `there`, reached as `there`'s user `account` (role `cluster` there).
    fn neighbour(&mut self, there: &Pump, account: &str) {
        let var = var_name("PW_TO", &there.cluster);
        self.toml.push_str(&format!(
            "[clusters.\"{}\"]\nbroker = \"amqp://{}@127.0.0.1:5672/{}\"\npassword_env = \"{var}\"\nreconnect_delay = 1\n",
            there.cluster,
            there.name(account),
            there.vh.name
        ));
        self.env.insert(var, there.password(account));
    }

    /// A pump further away, reached through `via`.
    fn via(&mut self, cluster: &str, via: &str) {
        self.toml
            .push_str(&format!("[clusters.\"{cluster}\"]\nvia = \"{via}\"\n"));
    }

    fn config(&self) -> Config {
        Config::parse(&self.toml, "test").unwrap_or_else(|e| panic!("{e}\n{}", self.toml))
    }

    fn setup_config(&self, args: Args) -> setup::Config {
        let env = self.env.clone();
        let lookup = Arc::new(move |var: &str| env.get(var).cloned());
        let common = Common::new(
            self.config(),
            Some(&self.vh.amqp_url),
            Some(&self.vh.admin_url),
        )
        .unwrap();
        setup::Config::with_env(args, &common, lookup).unwrap()
    }

    /// Runs `setup`; panics with its output when it fails.
    async fn setup(&self) -> String {
        let mut out = Vec::new();
        let result = setup::apply(&self.setup_config(Args::default()), &mut out).await;
        let text = String::from_utf8(out).unwrap();
        result.unwrap_or_else(|e| panic!("setup of {}: {e}\n{text}", self.cluster));
        text
    }

    /// `setup --status` in-process: (shovels not running, the lines).
    async fn status(&self) -> (usize, String) {
        let cfg = self.setup_config(Args {
            status: true,
            ..Args::default()
        });
        let mut out = Vec::new();
        let status = setup::status::status(&cfg, &mut out).await.unwrap();
        (status.not_running(), String::from_utf8(out).unwrap())
    }

    fn start_route(&mut self) {
        assert!(self.route.is_none());
        let common = common::common(self.config(), &self.url_as("feed"));
        let cfg = route::Config::from_args(Default::default(), &common).unwrap();
        let shutdown = Shutdown::new();
        let handle = tokio::spawn(route::run(cfg, shutdown.clone()));
        self.route = Some((shutdown, handle));
    }

    async fn stop_route(&mut self) {
        let (shutdown, handle) = self.route.take().expect("route runs");
        shutdown.cancel();
        handle.await.unwrap().unwrap();
    }

    fn route_queue(&self) -> String {
        names::route_queue(&self.config(), &self.name("feed")).name
    }

    async fn queue_depth(&self, queue: &str) -> u64 {
        match self.vh.mgmt.get_queue(&self.vh.name, queue).await {
            Ok(Some(q)) => q.messages,
            _ => 0,
        }
    }

    async fn shovel_state(&self, to: &str) -> Option<String> {
        let name = names::forward_shovel(to);
        let all = self
            .vh
            .mgmt
            .list_shovel_status(Some(&self.vh.name))
            .await
            .ok()?;
        all.into_iter().find(|s| s.name == name).map(|s| s.state)
    }

    /// Writes the configuration to `dir` for the binary.
    fn config_file(&self, dir: &std::path::Path) -> String {
        let path = dir.join(format!("{}.toml", self.cluster));
        std::fs::write(&path, &self.toml).unwrap();
        path.display().to_string()
    }
}

fn var_name(prefix: &str, what: &str) -> String {
    let word: String = what
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}_{word}")
}

/// A report by `client` on product `i` of `source` on pump `from_cluster`.
fn report(source: &str, client: &str, from_cluster: &str, i: usize) -> Report {
    Report {
        format: Format::V02,
        topic: String::new(),
        exchange: String::new(),
        pub_time: Stamp::from_unix(1_700_000_000 + i as i64, 0),
        base_url: "sftp://data.example".into(),
        rel_path: format!("20240101/{source}/h5/product_{i:06}.h5"),
        code: if i.is_multiple_of(7) { 499 } else { 201 },
        message: Some("Downloaded".into()),
        host: Some("node1".into()),
        user: Some(client.into()),
        duration_s: Some(0.5),
        source: Some(source.into()),
        from_cluster: Some(from_cluster.into()),
        to_clusters: vec![],
        flow: None,
        size_bytes: Some(1000),
        identity: Some(Identity {
            method: "md5".into(),
            value: format!("{i:032x}"),
        }),
        time_completed: None,
        stamped_client: None,
        stamped_source: None,
        extra: Headers::new(),
    }
}

async fn wait_len(seen: &Seen, n: usize, what: &str) {
    seen.wait_len(n, what, T).await;
}

/// Publishes each message with confirms, as `url`'s user, to its own `xs_<user>`;
/// `user_id` is set on every message when asked (the broker checks it is that user).
async fn publish(url: &str, user: &str, msgs: &[Outgoing], with_user_id: bool) {
    let client = Client::connect(
        &common::broker(url),
        ConnectOptions {
            name: format!("test publisher {user}"),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let exchange = names::user_exchange(user);
    let mut pending = Vec::new();
    for m in msgs {
        let props = MessageProps {
            content_type: Some(m.content_type.to_owned()),
            headers: m.headers.clone(),
            user_id: with_user_id.then(|| user.to_owned()),
            ..MessageProps::default()
        };
        pending.push(
            client
                .publish_raw(&exchange, &m.routing_key, &m.body, &props)
                .await
                .unwrap(),
        );
    }
    for c in pending {
        c.wait().await.unwrap();
    }
    client.close().await;
}

/// Body → routing key of every message, for comparing what arrived with what was sent.
fn by_body(msgs: &[Outgoing]) -> HashMap<Vec<u8>, String> {
    msgs.iter()
        .map(|m| (m.body.clone(), m.routing_key.clone()))
        .collect()
}

/// pumpA (source `src`, cluster account `from-b`) ← pumpB (cluster account `from-c`) ←
/// pumpC (client `cli`; pumpA via pumpB). Set up, routes started.
async fn three_pumps(tag: &str) -> Option<(Pump, Pump, Pump)> {
    let mut a = Pump::new(&format!("{tag}-a"), "pumpA").await?;
    let mut b = Pump::new(&format!("{tag}-b"), "pumpB").await?;
    let mut c = Pump::new(&format!("{tag}-c"), "pumpC").await?;
    a.user("src", "source", 100_000);
    a.user("from-b", "cluster", 0);
    b.user("from-c", "cluster", 0);
    b.neighbour(&a, "from-b");
    c.user("cli", "subscriber", 0);
    c.neighbour(&b, "from-c");
    c.via("pumpA", "pumpB");
    for p in [&a, &b, &c] {
        p.setup().await;
    }
    for p in [&mut a, &mut b, &mut c] {
        p.start_route();
    }
    Some((a, b, c))
}

/// Waits until both shovels run (they start as soon as `setup` declared them).
async fn shovels_running(b: &Pump, c: &Pump) {
    for (p, to) in [(b, "pumpA"), (c, "pumpB")] {
        common::wait_until(
            &format!("{}'s shovel to {to} runs", p.cluster),
            T,
            || async { p.shovel_state(to).await.as_deref() == Some("running") },
        )
        .await;
    }
}

fn reports(a: &Pump, c: &Pump, range: std::ops::Range<usize>) -> Vec<Outgoing> {
    let (src, cli) = (a.name("src"), c.name("cli"));
    range
        .map(|i| {
            let format = match i % 3 {
                0 => Format::V02,
                1 => Format::V03,
                _ => Format::V01,
            };
            emit(&report(&src, &cli, "pumpA", i), format)
        })
        .collect()
}

/// Checks every delivery on pumpA against what was sent: stamps, hops, routing key and
/// bytes; returns how many of each body arrived.
fn check_arrivals(
    seen: &[Got],
    sent: &HashMap<Vec<u8>, String>,
    client_of: &dyn Fn(&[u8]) -> String,
    source: &str,
) -> HashMap<Vec<u8>, usize> {
    let mut count = HashMap::new();
    for Got {
        routing_key: key,
        headers: h,
        body,
        ..
    } in seen
    {
        let Some(sent_key) = sent.get(body) else {
            panic!(
                "bytes changed or unknown: {:?}",
                String::from_utf8_lossy(body)
            );
        };
        assert_eq!(key, sent_key, "routing key kept");
        assert_eq!(
            h.get_str(names::H_CLIENT),
            Some(client_of(body).as_str()),
            "the true client"
        );
        assert_eq!(h.get_str(names::H_SOURCE), Some(source));
        assert_eq!(h.get(names::H_HOPS).and_then(|v| v.as_i64()), Some(2));
        *count.entry(body.clone()).or_insert(0) += 1;
    }
    count
}

#[tokio::test]
async fn reports_cross_two_pumps_once_each_and_wait_for_a_stopped_route() {
    let Some((mut a, mut b, mut c)) = three_pumps("pumps").await else {
        return;
    };
    shovels_running(&b, &c).await;
    let src = a.name("src");
    let retained = names::retained_queue(&a.config(), &src, 1).name;
    let arrived = Seen::default();
    let _reader = consume(&a.vh.amqp_url, &retained, &arrived).await;
    let rejected: Vec<Seen> = vec![Seen::default(); 3];
    let mut readers = Vec::new();
    for (p, seen) in [&a, &b, &c].into_iter().zip(&rejected) {
        let q = names::rejected_queue(&p.config(), &p.name("feed")).name;
        readers.push(consume(&p.vh.amqp_url, &q, seen).await);
    }

    // 300 reports of the client, and 10 of pumpC's own processes (through its feeder's
    // exchange) carrying a user_id, which route keeps for the feeder's own reports.
    let cli_msgs = reports(&a, &c, 0..300);
    publish(&c.url_as("cli"), &c.name("cli"), &cli_msgs, false).await;
    let feed_msgs: Vec<Outgoing> = (300..310)
        .map(|i| emit(&report(&src, &c.name("feed"), "pumpA", i), Format::V02))
        .collect();
    publish(&c.url_as("feed"), &c.name("feed"), &feed_msgs, true).await;
    wait_len(&arrived, 310, "310 reports on pumpA's xr_<source>").await;

    // pumpA's route stops; pumpC goes on reporting: the reports wait on pumpA.
    a.stop_route().await;
    let later = reports(&a, &c, 310..510);
    publish(&c.url_as("cli"), &c.name("cli"), &later, false).await;
    let queue = a.route_queue();
    common::wait_until("200 reports waiting in pumpA's route queue", T, || async {
        a.queue_depth(&queue).await >= 200
    })
    .await;
    assert_eq!(
        arrived.len(),
        310,
        "nothing routed on pumpA while route is stopped"
    );
    a.start_route();
    wait_len(&arrived, 510, "all 510 reports on pumpA's xr_<source>").await;

    // Exactly once each, as sent. (Any duplicate of the first 310 would be here by now:
    // they were all delivered before the second batch was sent.)
    let mut sent = by_body(&cli_msgs);
    sent.extend(by_body(&later));
    sent.extend(by_body(&feed_msgs));
    let feed_bodies: BTreeSet<Vec<u8>> = feed_msgs.iter().map(|m| m.body.clone()).collect();
    let (cli, feed) = (c.name("cli"), c.name("feed"));
    let client_of = |body: &[u8]| {
        if feed_bodies.contains(body) {
            feed.clone()
        } else {
            cli.clone()
        }
    };
    let count = check_arrivals(&arrived.all(), &sent, &client_of, &src);
    assert_eq!(count.len(), 510, "every report arrived");
    assert!(count.values().all(|n| *n == 1), "exactly once each");
    for (p, seen) in [&a, &b, &c].into_iter().zip(&rejected) {
        assert_eq!(seen.len(), 0, "nothing rejected on {}", p.cluster);
    }

    // setup --status shows the shovels running; pumpA has none.
    for (p, to) in [(&b, "pumpA"), (&c, "pumpB")] {
        let (not_running, text) = p.status().await;
        assert_eq!(not_running, 0, "{text}");
        let line = format!("shovel pumpwatch.forward.{to} to {to} (");
        assert!(
            text.contains(&line) && text.contains("): running"),
            "{text}"
        );
        assert!(text.ends_with("setup --status: 1 of 1 running\n"), "{text}");
        assert!(!text.contains(&p.env[&var_name("PW_TO", to)]), "{text}");
    }
    let (_, text) = a.status().await;
    assert_eq!(text, "setup --status: no neighbour declared, no shovel\n");
    // A second setup changes nothing, shovels included.
    for p in [&a, &b, &c] {
        let out = p.setup().await;
        assert_eq!(out, "setup: no change (broker matches the topology)\n");
    }
    tokio::join!(a.stop_route(), b.stop_route(), c.stop_route());
}

#[tokio::test]
async fn a_pump_that_vanishes_gets_its_reports_when_it_is_back() {
    let Some((mut a, mut b, mut c)) = three_pumps("gone").await else {
        return;
    };
    shovels_running(&b, &c).await;
    let src = a.name("src");
    let retained = names::retained_queue(&a.config(), &src, 1).name;
    let first = Seen::default();
    let reader = consume(&a.vh.amqp_url, &retained, &first).await;
    let before = reports(&a, &c, 0..100);
    publish(&c.url_as("cli"), &c.name("cli"), &before, false).await;
    wait_len(&first, 100, "100 reports on pumpA before it goes").await;

    // pumpA goes away whole: its route stops and its vhost is deleted, with everything
    // in it (permissions included). pumpC goes on reporting; pumpB holds the reports.
    reader.close().await;
    a.stop_route().await;
    a.vh.mgmt.delete_vhost(&a.vh.name).await.unwrap();
    let during = reports(&a, &c, 100..300);
    publish(&c.url_as("cli"), &c.name("cli"), &during, false).await;
    let held = names::forward_queue(&b.config(), &b.name("feed"), "pumpA").name;
    common::wait_until("200 reports held on pumpB for pumpA", T, || async {
        b.queue_depth(&held).await >= 200
    })
    .await;
    // What RabbitMQ 3.10 shows for a destination that refuses the connection: the
    // shovel tries again every reconnect_delay and says `starting` meanwhile.
    common::wait_until("pumpB's shovel to pumpA stops running", T, || async {
        matches!(
            b.shovel_state("pumpA").await.as_deref(),
            Some("starting" | "terminated")
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = b.config_file(dir.path());
    let status_args = [
        "--config",
        &file,
        "--broker",
        &b.vh.amqp_url,
        "--admin-url",
        &b.vh.admin_url,
        "setup",
        "--status",
    ];
    let (code, out, err) = common::proc::run(&status_args, T).await;
    let text = out.join("\n");
    assert_eq!(code, 1, "{text}\n{err}");
    assert!(
        text.contains("shovel pumpwatch.forward.pumpA to pumpA (")
            && (text.contains("): starting") || text.contains("): terminated")),
        "{text}"
    );
    assert!(
        text.ends_with("setup --status: 1 of 1 not running"),
        "{text}"
    );
    assert!(!text.contains(&a.password("from-b")) && !err.contains(&a.password("from-b")));

    // pumpA comes back: setup declares it again (its account for pumpB gets its
    // permissions only once route's queue is bound), then its route starts.
    a.setup().await;
    a.vh.mgmt
        .put_permissions(&a.vh.name, "guest", ".*", ".*", ".*")
        .await
        .unwrap();
    a.start_route();
    let second = Seen::default();
    let _reader = consume(&a.vh.amqp_url, &retained, &second).await;
    wait_len(
        &second,
        200,
        "the 200 held reports on pumpA once it is back",
    )
    .await;
    common::wait_until("pumpB's shovel to pumpA runs again", T, || async {
        b.shovel_state("pumpA").await.as_deref() == Some("running")
    })
    .await;
    let (code, out, err) = common::proc::run(&status_args, T).await;
    assert_eq!(code, 0, "{out:?}\n{err}");
    assert!(out.join("\n").contains("): running"), "{out:?}");

    let mut sent = by_body(&before);
    sent.extend(by_body(&during));
    let cli = c.name("cli");
    let mut all = first.all();
    all.extend(second.all());
    let count = check_arrivals(&all, &sent, &|_| cli.clone(), &src);
    assert_eq!(count.len(), 300, "nothing lost");
    assert!(count.values().all(|n| *n == 1), "no duplicate either");
    tokio::join!(a.stop_route(), b.stop_route(), c.stop_route());
}

/// A queue of the test's own on `exchange` of pump `p`, as guest.
async fn watch(p: &Pump, exchange: &str, seen: &Seen) -> Client {
    use pumpwatch::broker::amqp::{QueueDecl, Topology};
    let queue = format!("test.watch.{exchange}");
    let topology = Topology::bound_queue(QueueDecl::durable(queue.clone()), exchange, "#");
    let client = Client::connect(
        &common::broker(&p.vh.amqp_url),
        ConnectOptions {
            name: format!("test watch {exchange}"),
            topology,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    client.close().await;
    consume(&p.vh.amqp_url, &queue, seen).await
}

#[tokio::test]
async fn a_loop_in_the_via_routes_ends_at_the_hop_limit() {
    let Some(mut x) = Pump::new("loop-x", "pumpX").await else {
        return;
    };
    let Some(mut y) = Pump::new("loop-y", "pumpY").await else {
        return;
    };
    x.user("cli", "subscriber", 0);
    x.user("from-y", "cluster", 0);
    y.user("from-x", "cluster", 0);
    // Each thinks pumpZ is behind the other.
    x.neighbour(&y, "from-x");
    x.via("pumpZ", "pumpY");
    y.neighbour(&x, "from-y");
    y.via("pumpZ", "pumpX");
    x.setup().await;
    y.setup().await;
    x.start_route();
    y.start_route();
    let (x_seen, y_seen, x_rej, y_rej) = (
        Seen::default(),
        Seen::default(),
        Seen::default(),
        Seen::default(),
    );
    let _w = [
        watch(&x, "xreport", &x_seen).await,
        watch(&y, "xreport", &y_seen).await,
        watch(&x, "xrejected", &x_rej).await,
        watch(&y, "xrejected", &y_rej).await,
    ];

    let cli = x.name("cli");
    let msgs: Vec<Outgoing> = (0..3)
        .map(|i| emit(&report("src", &cli, "pumpZ", i), Format::V02))
        .collect();
    publish(&x.url_as("cli"), &cli, &msgs, false).await;
    // Posted on X (hops 0), then X ↔ Y: Y sees hops 1, 3, 5, 7, X sees 2, 4, 6, 8, and Y
    // refuses the 9th.
    wait_len(&y_rej, 3, "3 loops refused on pumpY").await;
    wait_len(&x_seen, 15, "each report 5 times on pumpX's xreport").await;
    wait_len(&y_seen, 12, "each report 4 times on pumpY's xreport").await;
    let sent = by_body(&msgs);
    for g in y_rej.all() {
        assert!(sent.contains_key(&g.body), "original bytes");
        let reason = g.headers.get_str(names::H_REASON).unwrap_or_default();
        assert_eq!(reason, "loop: 9 hops");
    }
    let hops = |seen: &Seen| -> BTreeSet<i64> {
        seen.all()
            .iter()
            .map(|g| {
                g.headers
                    .get(names::H_HOPS)
                    .and_then(|v| v.as_i64())
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(hops(&x_seen), BTreeSet::from([0, 2, 4, 6, 8]));
    assert_eq!(hops(&y_seen), BTreeSet::from([1, 3, 5, 7]));
    for g in x_seen.all().iter().chain(y_seen.all().iter()) {
        assert_eq!(
            g.headers.get_str(names::H_CLIENT),
            Some(cli.as_str()),
            "stamped once, kept"
        );
    }
    assert_eq!(x_rej.len(), 0);
    tokio::join!(x.stop_route(), y.stop_route());
}
