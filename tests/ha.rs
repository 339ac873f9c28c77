//! High availability against the real broker, each test in its own vhost: a second
//! `archive`, `speedo` or `watchdog` is a hot standby (single active consumer) that takes
//! over when the active one is killed, with nothing lost; two `route` instances share
//! their queue and lose nothing when one is killed; `queue_type = "quorum"` gives every
//! durable queue (route's, forward, retained, archive, watchdog, speedo) as a quorum
//! queue that the daemons declare and read. Daemons run as real processes where a
//! SIGKILL matters.

mod common;

use common::proc::Proc;
use pumpwatch::broker::amqp::{
    Activity, BindingDecl, Client, ConnectOptions, ExchangeDecl, QueueDecl, Topology,
};
use pumpwatch::broker::names;
use pumpwatch::cmd::archive::{self, store};
use pumpwatch::cmd::simulate::{Generator, Plan, Sim};
use pumpwatch::cmd::{route, setup, speedo, watchdog};
use pumpwatch::config::Config;
use pumpwatch::core::Stamp;
use pumpwatch::core::archive::{ArchiveLine, split_lines};
use pumpwatch::shutdown::Shutdown;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);
/// How long a standby may take to notice it is the active one now.
const TAKEOVER: Duration = Duration::from_secs(10);

/// `n` products' reports stamped as route would, for `xreport` (or, without `exchange`,
/// for each client's `xs_<client>`).
fn traffic(n: usize, seed: u64, exchange: Option<&str>) -> Vec<Sim> {
    let mut plan = Plan::new(2, 3, 2);
    plan.seed = seed;
    plan.stamp = exchange.is_some();
    plan.exchange = exchange.map(str::to_owned);
    let mut g = Generator::new(plan);
    let now = Stamp(jiff::Timestamp::now());
    (0..n).flat_map(|_| g.next_product(now)).collect()
}

/// Publishes `sims` (each to its own exchange) at about `per_sec`, awaiting the confirms
/// of each chunk: steady load while a test kills something.
async fn publish_paced(url: String, sims: Vec<Sim>, per_sec: usize) {
    let client = Client::connect(&common::broker(&url), ConnectOptions::new("ha publisher"))
        .await
        .unwrap();
    let chunk = (per_sec / 20).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for part in sims.chunks(chunk) {
        tick.tick().await;
        let mut pending = Vec::with_capacity(part.len());
        for s in part {
            pending.push(client.publish(&s.exchange, &s.out).await.unwrap());
        }
        for p in pending {
            p.wait().await.unwrap();
        }
    }
    client.close().await;
}

/// The address a daemon logged it serves on (`... http://ADDR/...` or `on http://ADDR`).
async fn served_at(p: &Proc, marker: &str) -> String {
    p.wait_stderr(marker, T).await;
    let err = p.stderr_text();
    let line = err.lines().find(|l| l.contains(marker)).unwrap();
    let at = line.find("http://").unwrap() + "http://".len();
    line[at..].split(['/', ' ', '"']).next().unwrap().to_owned()
}

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Relative paths archived under `cluster_dir` (every hour, plain or compressed).
fn archived(cluster_dir: &Path) -> Vec<String> {
    if !cluster_dir.exists() {
        return vec![];
    }
    let mut out = Vec::new();
    for h in store::list_hours(cluster_dir).unwrap() {
        let base = store::hour_base(cluster_dir, &h.hour);
        let (path, zst) = if h.zst {
            (store::with_ext(&base, store::ZST), true)
        } else {
            (store::with_ext(&base, store::LOG), false)
        };
        let mut buf = Vec::new();
        // A file being compressed may vanish under us: read again next time.
        if store::for_each_chunk(&path, zst, &mut |c| {
            buf.extend_from_slice(c);
            true
        })
        .is_err()
        {
            continue;
        }
        out.extend(
            split_lines(&buf)
                .filter_map(|l| ArchiveLine::parse(l).ok())
                .map(|l| l.rel_path),
        );
    }
    out
}

#[tokio::test]
async fn archive_standby_takes_over_when_the_active_is_killed_and_nothing_is_lost() {
    let Some(vh) = common::vhost("ha-archive").await else {
        return;
    };
    let url = vh.amqp_url.clone();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let run = |dir: &Path| {
        common::proc::spawn(&[
            "--broker",
            &url,
            "archive",
            "--dir",
            dir.to_str().unwrap(),
            "--batch",
            "50",
            "--listen",
            "127.0.0.1:0",
        ])
    };
    let a = run(da.path());
    a.wait_stderr("active:", T).await;
    let b = run(db.path());
    b.wait_stderr("standby:", T).await;
    // The standby is visibly one, and healthy.
    let addr = served_at(&b, "archive metrics on").await;
    assert_eq!(
        get(&format!("http://{addr}/healthz")).await,
        (200, "ok standby\n".into())
    );
    let (_, metrics) = get(&format!("http://{addr}/metrics")).await;
    assert!(metrics.contains("pumpwatch_archive_standby 1"), "{metrics}");
    // A third on the active one's directory is refused before it connects.
    let (code, _, err) = common::proc::run(
        &[
            "--broker",
            &url,
            "archive",
            "--dir",
            da.path().to_str().unwrap(),
        ],
        T,
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("used by another pumpwatch archive"), "{err}");

    // Steady load; the active one is killed once it has archived some of it.
    let sims = traffic(4000, 21, Some("xreport"));
    let sent: BTreeSet<String> = sims.iter().map(|s| s.rel_path.clone()).collect();
    let load = tokio::spawn(publish_paced(url.clone(), sims, 2000));
    let (ca, cb) = (da.path().join("localhost"), db.path().join("localhost"));
    let c = ca.clone();
    common::wait_until("the active archive wrote 500 lines", T, || {
        let n = archived(&c).len();
        async move { n >= 500 }
    })
    .await;
    a.signal("KILL");
    let killed = Instant::now();
    let (code, _, _) = a.finish(T).await;
    assert_ne!(code, 0);
    b.wait_stderr("took over", TAKEOVER).await;
    let takeover = killed.elapsed();
    let c = cb.clone();
    common::wait_until("the standby archives", TAKEOVER, || {
        let n = archived(&c).len();
        async move { n > 0 }
    })
    .await;
    let first_line = killed.elapsed();
    eprintln!("archive takeover: active after {takeover:?}, first line after {first_line:?}");
    load.await.unwrap();
    let (x, y) = (ca.clone(), cb.clone());
    let want = sent.len();
    common::wait_until("every report archived by one or the other", T, || {
        let have: BTreeSet<String> = archived(&x).into_iter().chain(archived(&y)).collect();
        async move { have.len() >= want }
    })
    .await;
    // At least once (what the killed one held unacked is archived again), nothing else.
    let all: Vec<String> = archived(&ca).into_iter().chain(archived(&cb)).collect();
    let have: BTreeSet<String> = all.iter().cloned().collect();
    assert_eq!(have, sent);
    assert!(all.len() >= sent.len());
    assert_eq!(
        get(&format!("http://{addr}/healthz")).await,
        (200, "ok\n".into())
    );
    b.signal("TERM");
    let (code, _, err) = b.finish(T).await;
    assert_eq!(code, 0, "{err}");
}

/// The `v01.speedo.client.all` readings seen on `xreport`: (arrival, good + errors).
#[derive(Clone, Default)]
struct Totals(Arc<Mutex<Vec<(Instant, u64)>>>);

impl Totals {
    fn all(&self) -> Vec<(Instant, u64)> {
        self.0.lock().unwrap().clone()
    }
}

async fn watch_totals(url: &str) -> (Client, Totals) {
    let t = Topology {
        exchanges: vec![ExchangeDecl::topic("xreport")],
        queues: vec![QueueDecl::exclusive("obs.speedo")],
        bindings: vec![BindingDecl::new(
            "obs.speedo",
            "xreport",
            "v01.speedo.client.all",
        )],
        exchange_bindings: vec![],
    };
    let opts = ConnectOptions {
        topology: t,
        ..ConnectOptions::new("ha speedo observer")
    };
    let client = Client::connect(&common::broker(url), opts).await.unwrap();
    let mut consumer = client.consume("obs.speedo", 100).await.unwrap();
    let totals = Totals::default();
    let t = totals.clone();
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            if let Ok(s) = speedo::decode(&d.incoming()) {
                let n = s.reading.good + s.reading.errors;
                t.0.lock().unwrap().push((Instant::now(), n));
            }
            let _ = d.ack().await;
        }
    });
    (client, totals)
}

#[tokio::test]
async fn speedo_standby_takes_over_when_the_active_is_killed() {
    let Some(vh) = common::vhost("ha-speedo").await else {
        return;
    };
    let url = vh.amqp_url.clone();
    let args = [
        "--broker",
        url.as_str(),
        "speedo",
        "--interval",
        "1",
        "--all-interval",
        "0.2",
    ];
    let a = common::proc::spawn(&args);
    a.wait_stderr("active:", T).await;
    let b = common::proc::spawn(&args);
    b.wait_stderr("standby:", T).await;
    let (_obs, totals) = watch_totals(&url).await;

    let n = 4000;
    let sims = traffic(n, 5, Some("xreport"));
    assert_eq!(sims.len(), n);
    let load = tokio::spawn(publish_paced(url.clone(), sims, 2000));
    let t = totals.clone();
    common::wait_until("the active speedo counted 800 reports", T, || {
        let top = t.all().last().map_or(0, |r| r.1);
        async move { top >= 800 }
    })
    .await;
    a.signal("KILL");
    let killed = Instant::now();
    let (code, _, _) = a.finish(T).await;
    assert_ne!(code, 0);
    let before = totals.all();
    // One speedo published: its cumulative counts never went down (a standby publishing
    // its zeros in between would show as decreases).
    assert!(
        before.windows(2).all(|w| w[0].1 <= w[1].1),
        "{:?}",
        before.iter().map(|r| r.1).collect::<Vec<_>>()
    );
    let a_last = before.last().unwrap().1;
    b.wait_stderr("took over", TAKEOVER).await;
    let takeover = killed.elapsed();
    // Speedos keep flowing, from the new one: counting from zero, a decrease.
    let t = totals.clone();
    let first = common::wait_for("a speedo of the new active one", TAKEOVER, || {
        let after: Vec<(Instant, u64)> = t.all().into_iter().filter(|r| r.0 > killed).collect();
        async move { after.iter().find(|r| r.1 < a_last).map(|r| r.0) }
    })
    .await;
    eprintln!(
        "speedo takeover: active after {takeover:?}, first speedo after {:?}",
        first - killed
    );
    load.await.unwrap();
    // The new one counts what the killed one had not acked and everything after; what
    // the killed one acked after its last speedo is lost to the counts (SPEC §4.5: a
    // crash loses at most an interval's counts).
    let t = totals.clone();
    let b_final = common::wait_for("the new speedo's counts settle", T, || {
        let all = t.all();
        let done = all.len() >= 2 && {
            let (l, p) = (all[all.len() - 1], all[all.len() - 2]);
            l.1 == p.1 && l.1 + a_last >= n as u64 - 1000 && l.0 > first
        };
        async move { done.then(|| all.last().unwrap().1) }
    })
    .await;
    let counted = a_last + b_final;
    eprintln!("speedo counts: {a_last} before the kill + {b_final} after = {counted} of {n}");
    assert!(
        counted + 1000 >= n as u64 && counted <= n as u64 + 1000,
        "{counted} of {n}"
    );
    b.signal("TERM");
    let (code, _, err) = b.finish(T).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("took over 1 times"), "{err}");
}

fn watchdog_config(url: &str, dir: &Path) -> watchdog::Config {
    let args = watchdog::Args {
        listen: Some("127.0.0.1:0".into()),
        state_dir: Some(dir.to_owned()),
        prefetch: None,
    };
    watchdog::Config::from_args(args, &common::common(Config::default(), url)).unwrap()
}

#[tokio::test]
async fn watchdog_standby_is_healthy_and_takes_over_and_one_state_dir_has_one_watchdog() {
    let Some(vh) = common::vhost("ha-watchdog").await else {
        return;
    };
    let url = vh.amqp_url.clone();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let stop_a = Shutdown::new();
    let a = watchdog::Daemon::start(watchdog_config(&url, da.path()), stop_a.clone())
        .await
        .unwrap();
    let mut roles = a.shared.role.clone();
    common::wait_until("the first watchdog is active", T, || {
        let r = *roles.borrow_and_update();
        async move { r == Activity::Active }
    })
    .await;
    // The same state directory: refused at once.
    let same = watchdog::Daemon::start(watchdog_config(&url, da.path()), Shutdown::new()).await;
    let err = same
        .err()
        .expect("a second watchdog on one state dir")
        .to_string();
    assert!(err.contains("another watchdog"), "{err}");

    let stop_b = Shutdown::new();
    let b = watchdog::Daemon::start(watchdog_config(&url, db.path()), stop_b.clone())
        .await
        .unwrap();
    let shared = b.shared.clone();
    common::wait_until("the second watchdog stands by", T, || {
        let s = shared.is_standby();
        async move { s }
    })
    .await;
    let addr = b.addr;
    assert_eq!(
        get(&format!("http://{addr}/healthz")).await,
        (200, "ok standby\n".into())
    );
    let (_, metrics) = get(&format!("http://{addr}/metrics")).await;
    assert!(
        metrics.contains("pumpwatch_watchdog_standby 1"),
        "{metrics}"
    );
    // The active one goes (here cleanly; the archive and speedo tests SIGKILL): the
    // standby is active within a probe period or two, on an idle queue too.
    stop_a.cancel();
    a.join().await.unwrap();
    let gone = Instant::now();
    let mut roles = b.shared.role.clone();
    common::wait_until("the standby took over", TAKEOVER, || {
        let r = *roles.borrow_and_update();
        async move { r == Activity::Active }
    })
    .await;
    eprintln!("watchdog takeover (idle queue): {:?}", gone.elapsed());
    assert_eq!(
        get(&format!("http://{addr}/healthz")).await,
        (200, "ok\n".into())
    );
    stop_b.cancel();
    let summary = b.join().await.unwrap();
    assert_eq!(summary.failures, 0);
}

#[tokio::test]
async fn two_routes_share_the_queue_and_lose_nothing_when_one_is_killed() {
    let Some(vh) = common::vhost("ha-route").await else {
        return;
    };
    let url = vh.amqp_url.clone();
    let sims = traffic(6000, 9, None);
    let plan = Plan::new(2, 3, 2);
    let mut toml = String::new();
    for s in &plan.sources {
        toml.push_str(&format!("[users.\"{s}\"]\nrole = \"source\"\n"));
    }
    for c in &plan.clients {
        toml.push_str(&format!("[users.\"{c}\"]\nrole = \"subscriber\"\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("pumpwatch.toml");
    std::fs::write(&cfg_path, &toml).unwrap();
    let args = [
        "--config",
        cfg_path.to_str().unwrap(),
        "--broker",
        url.as_str(),
        "route",
        "--prefetch",
        "100",
    ];
    let a = common::proc::spawn(&args);
    let b = common::proc::spawn(&args);
    let queue = names::route_queue(&Config::parse(&toml, "t").unwrap(), "guest").name;
    common::wait_until("two routes consume the queue", T, || {
        let (m, v, q) = (vh.mgmt.clone(), vh.name.clone(), queue.clone());
        async move {
            m.get_queue(&v, &q)
                .await
                .ok()
                .flatten()
                .is_some_and(|q| q.consumers == 2)
        }
    })
    .await;
    // An admin's view: every report reaches xreport (at least once).
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let t = Topology::bound_queue(QueueDecl::exclusive("obs.xreport"), "xreport", "#");
    let opts = ConnectOptions {
        topology: t,
        ..ConnectOptions::new("ha route observer")
    };
    let obs = Client::connect(&common::broker(&url), opts).await.unwrap();
    let mut consumer = obs.consume("obs.xreport", 1000).await.unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            if let Ok(pumpwatch::core::report::Message::Report(r)) =
                pumpwatch::core::report::parse(&d.incoming())
            {
                s.lock().unwrap().push(r.rel_path);
            }
            let _ = d.ack().await;
        }
    });
    let sent: BTreeSet<String> = sims.iter().map(|s| s.rel_path.clone()).collect();
    let load = tokio::spawn(publish_paced(url.clone(), sims, 3000));
    let s = seen.clone();
    common::wait_until("a third routed", T, || {
        let n = s.lock().unwrap().len();
        async move { n >= 2000 }
    })
    .await;
    a.signal("KILL");
    let (code, _, _) = a.finish(T).await;
    assert_ne!(code, 0);
    load.await.unwrap();
    let (s, want) = (seen.clone(), sent.len());
    common::wait_until("every report routed", T, || {
        let n = s.lock().unwrap().iter().collect::<BTreeSet<_>>().len();
        async move { n >= want }
    })
    .await;
    let got: BTreeSet<String> = seen.lock().unwrap().iter().cloned().collect();
    assert_eq!(got, sent);
    b.signal("TERM");
    let (code, _, err) = b.finish(T).await;
    assert_eq!(code, 0, "{err}");
    // Both shared the work before the kill: the survivor did not route everything.
    let routed = |text: &str| -> Option<u64> {
        let summary = text.lines().rev().find(|l| l.contains("route stopped"))?;
        let at = summary.find("routed ")? + "routed ".len();
        summary[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    if let Some(n) = routed(&err) {
        assert!(n < want as u64, "the survivor routed {n} of {want}");
    }
    obs.close().await;
}

#[tokio::test]
async fn quorum_queues_for_every_durable_queue_declared_by_setup_and_the_daemons() {
    let Some(vh) = common::vhost("ha-quorum").await else {
        return;
    };
    let url = vh.amqp_url.clone();
    let radar = vh.add_user("radar", "radar-pw", &[]).await;
    let cfs = vh.add_user("cfs", "cfs-pw", &[]).await;
    let tmp = tempfile::tempdir().unwrap();
    let toml = format!(
        "cluster = \"q.pump\"\n\
         [users.\"{r}\"]\nrole = \"source\"\nretain = 100\n\
         [users.\"{c}\"]\nrole = \"subscriber\"\n\
         [clusters.\"next.pump\"]\nbroker = \"amqp://acct:pw@127.0.0.1:5672/nowhere\"\n\
         [route]\nqueue_type = \"quorum\"\n\
         [archive]\ndir = \"{dir}\"\n\
         [watchdog]\nstate_dir = \"{dir}/w\"\nlisten = \"127.0.0.1:0\"\n",
        r = radar.name,
        c = cfs.name,
        dir = tmp.path().display()
    );
    let config = Config::parse(&toml, "quorum.toml").unwrap();
    let common =
        pumpwatch::cmd::Common::new(config.clone(), Some(&url), Some(&vh.admin_url)).unwrap();
    let cfg = setup::Config::with_env(
        setup::Args::default(),
        &common,
        Arc::new(|_: &str| None::<String>),
    )
    .unwrap();
    let mut out = Vec::new();
    let summary = setup::apply(&cfg, &mut out).await;
    let out = String::from_utf8(out).unwrap();
    summary.unwrap_or_else(|e| panic!("{e}\n{out}"));

    // Every daemon declares what it reads, equal to setup's (the broker refuses a
    // declaration that differs): route, speedo, watchdog, archive.
    let route_cfg = route::Config::from_args(route::Args::default(), &common).unwrap();
    let speedo_cfg = speedo::Config::from_args(speedo::Args::default(), &common).unwrap();
    let watchdog_cfg = watchdog::Config::from_args(watchdog::Args::default(), &common).unwrap();
    let archive_cfg = archive::Config::from_args(archive::Args::default(), &common).unwrap();
    for (what, topology) in [
        ("route", route::topology(&route_cfg)),
        ("speedo", speedo::topology(&speedo_cfg)),
        ("watchdog", watchdog::topology(&watchdog_cfg)),
        ("archive", archive::topology(&archive_cfg)),
    ] {
        let opts = ConnectOptions {
            topology,
            reconnect: false,
            ..ConnectOptions::new(format!("ha quorum {what}"))
        };
        let c = Client::connect(&common::broker(&url), opts)
            .await
            .unwrap_or_else(|e| panic!("{what} declares on quorum queues: {e}\n{out}"));
        c.close().await;
    }
    let queues = vh.mgmt.list_queues(&vh.name).await.unwrap();
    let names_of: BTreeSet<String> = queues.iter().map(|q| q.name.clone()).collect();
    let feeder = "guest";
    for q in [
        names::route_queue(&config, feeder).name,
        names::rejected_queue(&config, feeder).name,
        names::forward_queue(&config, feeder, "next.pump").name,
        names::retained_queue(&config, &radar.name, 100).name,
        names::archive_queue(&config, feeder).name,
        names::watchdog_queue(&config, feeder).name,
        names::speedo_queue(&config, feeder).name,
    ] {
        assert!(names_of.contains(&q), "{q} missing: {names_of:?}\n{out}");
    }
    for q in &queues {
        assert_eq!(q.kind, "quorum", "{} is {}", q.name, q.kind);
        assert!(q.durable, "{}", q.name);
        let sac = q.arguments.get("x-single-active-consumer") == Some(&serde_json::json!(true));
        let wants = q.name.ends_with(".archive")
            || q.name.ends_with(".watchdog")
            || q.name.ends_with(".speedo");
        assert_eq!(sac, wants, "{}: {:?}", q.name, q.arguments);
    }

    // Traffic through quorum queues: route (the wire client) and archive (a standby
    // probe on a quorum queue) do their work.
    let stop = Shutdown::new();
    let route_task = tokio::spawn(route::run(route_cfg, stop.clone()));
    let dir = archive_cfg.cluster_dir.clone();
    let archive_task = tokio::spawn(archive::run(archive_cfg, stop.clone()));
    let mut plan = Plan::new(1, 1, 1);
    plan.sources = vec![radar.name.clone()];
    plan.clients = vec![cfs.name.clone()];
    let mut g = Generator::new(plan);
    let now = Stamp(jiff::Timestamp::now());
    let sims: Vec<Sim> = (0..300).flat_map(|_| g.next_product(now)).collect();
    let want: BTreeSet<String> = sims.iter().map(|s| s.rel_path.clone()).collect();
    publish_paced(url.clone(), sims, 100_000).await;
    let d = dir.clone();
    let n = want.len();
    common::wait_until("every report archived through quorum queues", T, || {
        let have = archived(&d).into_iter().collect::<BTreeSet<_>>().len();
        async move { have >= n }
    })
    .await;
    assert_eq!(archived(&dir).into_iter().collect::<BTreeSet<_>>(), want);
    // Retained for the source, in its quorum queue (bounded, dropping the oldest).
    let retained = names::retained_queue(&config, &radar.name, 100).name;
    common::wait_until("the source's retained queue holds its last 100", T, || {
        let (m, v, q) = (vh.mgmt.clone(), vh.name.clone(), retained.clone());
        async move {
            m.get_queue(&v, &q)
                .await
                .ok()
                .flatten()
                .is_some_and(|q| q.messages == 100)
        }
    })
    .await;
    stop.cancel();
    route_task.await.unwrap().unwrap();
    archive_task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_queue_declared_without_single_active_consumer_is_refused_with_a_way_out() {
    let Some(vh) = common::vhost("ha-upgrade").await else {
        return;
    };
    let url = vh.amqp_url.clone();
    let tmp = tempfile::tempdir().unwrap();
    let toml = format!("[archive]\ndir = \"{}\"\n", tmp.path().display());
    let config = Config::parse(&toml, "t.toml").unwrap();
    let common =
        pumpwatch::cmd::Common::new(config.clone(), Some(&url), Some(&vh.admin_url)).unwrap();
    // What an earlier pumpwatch declared: the same queue, without the argument.
    let queue = names::archive_queue(&config, "guest").name;
    let opts = ConnectOptions {
        topology: Topology::bound_queue(QueueDecl::durable(&queue), "amq.topic", "#"),
        ..ConnectOptions::new("ha earlier version")
    };
    Client::connect(&common::broker(&url), opts)
        .await
        .unwrap()
        .close()
        .await;
    let cfg = archive::Config::from_args(archive::Args::default(), &common).unwrap();
    let err = archive::run(cfg, Shutdown::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("inequivalent arg 'x-single-active-consumer'")
            && err.contains("pumpwatch setup --dry-run"),
        "{err}"
    );
    let args = setup::Args {
        dry_run: true,
        ..Default::default()
    };
    let cfg = setup::Config::with_env(args, &common, Arc::new(|_: &str| None::<String>)).unwrap();
    let mut out = Vec::new();
    let _ = setup::apply(&cfg, &mut out).await;
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains(&format!(
            "! queue {queue} has no x-single-active-consumer, wanted true: an earlier pumpwatch"
        )) && out.contains(&format!("rabbitmqctl delete_queue -p {} {queue}", vh.name)),
        "{out}"
    );
}

#[tokio::test]
async fn a_nacked_publish_is_retried_until_the_queue_takes_it_not_rejected() {
    let Some(vh) = common::vhost("ha-nack").await else {
        return;
    };
    let url = vh.amqp_url.clone();
    let toml = "[users.radar]\nrole = \"source\"\n[users.cfs]\nrole = \"subscriber\"\n";
    let config = Config::parse(toml, "t.toml").unwrap();
    let common = common::common(config, &url);
    // What a quorum queue without its majority does to every publish routed to it: nack.
    // Here a full queue that rejects what comes (x-overflow reject-publish) stands in.
    let mut full = QueueDecl::durable("obs.full");
    full.arguments
        .set("x-max-length", pumpwatch::core::HeaderValue::Int(0));
    full.arguments.set(
        "x-overflow",
        pumpwatch::core::HeaderValue::Str("reject-publish".into()),
    );
    let mut t = Topology::bound_queue(full, "xreport", "#");
    t.exchanges.push(ExchangeDecl::topic("xreport"));
    let observer = Topology::bound_queue(QueueDecl::exclusive("obs.seen"), "xreport", "#");
    t.merge(&observer);
    let opts = ConnectOptions {
        topology: t,
        ..ConnectOptions::new("ha nack observer")
    };
    let obs = Client::connect(&common::broker(&url), opts).await.unwrap();
    let mut consumer = obs.consume("obs.seen", 10).await.unwrap();

    let cfg = route::Config::from_args(route::Args::default(), &common).unwrap();
    let counters = cfg.counters.clone();
    let stop = Shutdown::new();
    let task = tokio::spawn(route::run(cfg, stop.clone()));
    let queue = names::route_queue(&Config::parse(toml, "t").unwrap(), "guest").name;
    common::wait_until("route consumes", T, || {
        let (m, v, q) = (vh.mgmt.clone(), vh.name.clone(), queue.clone());
        async move { m.get_queue(&v, &q).await.ok().flatten().is_some() }
    })
    .await;
    let mut plan = Plan::new(1, 1, 1);
    plan.sources = vec!["radar".into()];
    plan.clients = vec!["cfs".into()];
    plan.error_ratio = 0.0;
    let sims: Vec<Sim> = Generator::new(plan).next_product(Stamp(jiff::Timestamp::now()));
    publish_paced(url.clone(), sims, 1000).await;
    let c = counters.clone();
    common::wait_until("route retried the nacked publish", T, || {
        let n = c.get("retried");
        async move { n >= 2 }
    })
    .await;
    // The queue takes messages again: the report goes through, not to xrejected.
    vh.mgmt.delete_queue(&vh.name, "obs.full").await.unwrap();
    let d = tokio::time::timeout(T, async {
        loop {
            let d = consumer.next().await.unwrap().unwrap();
            if d.exchange == "xreport" && d.props.headers.get(names::H_REASON).is_none() {
                return d;
            }
        }
    })
    .await
    .expect("the report routed once the queue takes it");
    d.ack().await.unwrap();
    // Counted once its confirm is in (it may reach the observer first).
    let c = counters.clone();
    common::wait_until("route counted it routed", T, || {
        let n = c.get("routed");
        async move { n == 1 }
    })
    .await;
    assert_eq!(counters.get("refused"), 0);
    stop.cancel();
    task.await.unwrap().unwrap();
    obs.close().await;
}
