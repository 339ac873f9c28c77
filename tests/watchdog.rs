//! `pumpwatch watchdog` against the real broker, each test in its own vhost, with a
//! `node_timeout` of 2 s:
//! - three nodes, one goes silent: exactly its open transfers are listed in
//!   `v01.watchdog.node.<host>` and reposted in their own format family (v02 from v01/v02,
//!   v03 from v03/sr2's v03), the living nodes' are not; it reports again and is
//!   recovered; duplicates and finals without a start are harmless; `inflight` prints it;
//! - the watchdog is SIGKILLed mid-run and restarted: it still knows what was in flight
//!   (and a second watchdog on the same state is refused);
//! - `simulate --fail-node`: the watchdog lists exactly what the simulated node left open.

mod common;

use common::watch::Seen;

use pumpwatch::broker::amqp::{Client, ConnectOptions, QueueDecl};
use pumpwatch::cmd::simulate;
use pumpwatch::cmd::watchdog::{self, Daemon};
use pumpwatch::config::Config;
use pumpwatch::core::emit::{Outgoing, emit};
use pumpwatch::core::report::{self, Format, Identity, Incoming, Message, Report};
use pumpwatch::core::{Headers, Stamp};
use pumpwatch::shutdown::Shutdown;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

const TOML: &str = "[watchdog]\nnode_timeout = 2\nstuck_after = 600\nrepost = true\n";

/// A report of `client` on `host` about product `i` of that host.
fn report(host: &str, client: &str, i: usize, code: u16, format: Format) -> Outgoing {
    let r = Report {
        format,
        topic: String::new(),
        exchange: String::new(),
        pub_time: Stamp::from_unix(1_800_000_000 + i as i64, 250_000_000),
        base_url: "sftp://data.example".into(),
        rel_path: rel(host, i),
        code,
        message: Some(if code == 102 { "Started" } else { "Downloaded" }.into()),
        host: Some(host.into()),
        user: Some(client.into()),
        duration_s: Some(0.1),
        source: Some("radar".into()),
        from_cluster: Some("ddsr.test".into()),
        to_clusters: vec!["ddsr.test".into()],
        flow: Some("flow1".into()),
        size_bytes: Some(1000 + i as u64),
        identity: Some(Identity {
            method: "md5".into(),
            value: format!("{i:032x}"),
        }),
        time_completed: None,
        stamped_client: None,
        stamped_source: None,
        extra: Headers::new(),
    };
    emit(&r, format)
}

fn rel(host: &str, i: usize) -> String {
    format!("20270115/radar/h5/{host}_{i:04}.h5")
}

/// The format of product `i`'s reports: every one that names its host.
fn format_of(i: usize) -> Format {
    [Format::V02, Format::V03, Format::V01, Format::V03Sr2][i % 4]
}

async fn publish(client: &Client, msgs: &[Outgoing]) {
    let mut pending = Vec::new();
    for m in msgs {
        pending.push(client.publish("xreport", m).await.unwrap());
    }
    for p in pending {
        p.wait().await.unwrap();
    }
}

async fn publisher(url: &str) -> Client {
    Client::connect(&common::broker(url), ConnectOptions::new("test publisher"))
        .await
        .unwrap()
}

/// Everything arriving on `exchange` under `key`, through an exclusive queue.
async fn watch(url: &str, exchange: &str, key: &str) -> (Client, Seen) {
    let queue = QueueDecl::exclusive(format!("q_guest.test.{exchange}"));
    common::watch::watch(url, exchange, key, queue).await
}

async fn inflight(addr: &str, query: &str) -> Value {
    let text = reqwest::get(format!("http://{addr}/api/inflight{query}"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn node<'a>(snap: &'a Value, host: &str) -> Option<&'a Value> {
    snap["nodes"].as_array()?.iter().find(|n| n["host"] == host)
}

/// (state, in flight) of `host`.
async fn node_state(addr: &str, host: &str) -> Option<(String, u64)> {
    let snap = inflight(addr, "").await;
    let n = node(&snap, host)?;
    Some((n["state"].as_str()?.to_owned(), n["in_flight"].as_u64()?))
}

async fn start(url: &str, toml: &str, dir: &std::path::Path) -> (Daemon, Shutdown) {
    let file = Config::parse(toml, "test").unwrap();
    let args = watchdog::Args {
        listen: Some("127.0.0.1:0".into()),
        state_dir: Some(dir.to_owned()),
        prefetch: None,
    };
    let cfg = watchdog::Config::from_args(args, &common::common(file, url)).unwrap();
    let stop = Shutdown::new();
    (Daemon::start(cfg, stop.clone()).await.unwrap(), stop)
}

/// Sends a sign of life (a 1xx progress report) from each of `hosts` every 300 ms, so they
/// never reach node_timeout, until stopped.
fn keep_alive(url: &str, hosts: &[&str]) -> (Shutdown, tokio::task::JoinHandle<()>) {
    let stop = Shutdown::new();
    let (s, url) = (stop.clone(), url.to_owned());
    let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    let task = tokio::spawn(async move {
        let client = publisher(&url).await;
        let mut beat = 0;
        while !s.is_cancelled() {
            beat += 1;
            let msgs: Vec<Outgoing> = hosts
                .iter()
                .map(|h| report(h, "cfs", 9000 + beat, 100, Format::V02))
                .collect();
            publish(&client, &msgs).await;
            tokio::select! {
                _ = s.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
        }
        client.close().await;
    });
    (stop, task)
}

#[tokio::test]
async fn a_silent_node_has_exactly_its_transfers_listed_and_reposted_in_their_format() {
    let Some(vh) = common::vhost("watchdog").await else {
        return;
    };
    let url = vh.amqp_url.clone();
    let (_n, notices) = watch(&url, "xreport", "v01.watchdog.#").await;
    let (_r, reposts) = watch(&url, "xpublic", "#").await;
    let dir = tempfile::tempdir().unwrap();
    let (daemon, stop) = start(&url, TOML, dir.path()).await;
    let addr = daemon.addr.to_string();
    let shared = daemon.shared.clone();
    let run = tokio::spawn(daemon.join());

    let client = publisher(&url).await;
    let mut msgs = Vec::new();
    for host in ["n1", "n2", "n3"] {
        for i in 0..4 {
            msgs.push(report(host, "cfs", i, 102, format_of(i)));
        }
        msgs.push(report(host, "cfs", 0, 201, format_of(0)));
    }
    // A duplicated start and a final without a start: harmless.
    msgs.push(report("n1", "cfs", 1, 102, format_of(1)));
    msgs.push(report("n3", "cfs", 77, 201, Format::V02));
    // Garbage on the queue does not stop it.
    msgs.push(Outgoing {
        routing_key: "v02.report.x".into(),
        body: b"\xff\xfe garbage".to_vec(),
        content_type: "text/plain",
        headers: Headers::new(),
    });
    publish(&client, &msgs).await;
    let (alive, beats) = keep_alive(&url, &["n1", "n3"]);
    for host in ["n1", "n2", "n3"] {
        let a = addr.clone();
        common::wait_until(&format!("{host} holds 3 transfers"), T, || {
            let a = a.clone();
            async move { node_state(&a, host).await.is_some_and(|(_, n)| n == 3) }
        })
        .await;
    }

    // n2 says nothing more: after node_timeout it is failed.
    let n = notices.clone();
    common::wait_until("the failure of n2", T, || {
        let got = !n.with_prefix("v01.watchdog.node.").is_empty();
        async move { got }
    })
    .await;
    let r = reposts.clone();
    common::wait_until("3 reposts", T, || {
        let got = r.all().len();
        async move { got >= 3 }
    })
    .await;
    let failed = notices.with_prefix("v01.watchdog.node.");
    assert_eq!(failed.len(), 1, "{failed:?}");
    let f = &failed[0];
    assert_eq!(f.routing_key, "v01.watchdog.node.n2");
    assert_eq!(f.headers.get_str("host"), Some("n2"));
    assert_eq!(f.int("count"), Some(3));
    assert_eq!(f.content_type.as_deref(), Some("application/json"));
    let body = f.json();
    assert_eq!(body["host"], "n2");
    let listed: BTreeSet<String> = body["transfers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["relPath"].as_str().unwrap().to_owned())
        .collect();
    let want: BTreeSet<String> = (1..4).map(|i| rel("n2", i)).collect();
    assert_eq!(listed, want, "exactly n2's open transfers");
    for t in body["transfers"].as_array().unwrap() {
        assert_eq!(t["client"], "cfs");
        assert_eq!(t["host"], "n2");
    }

    // Each lost product is re-announced as its 102 came: v01/v02 as a v02 post, v03 (and
    // sr2's v03) as a v03 post; and it reads back as an announcement of that product.
    let got = reposts.all();
    assert_eq!(got.len(), 3, "{got:?}");
    let mut reposted = BTreeSet::new();
    for g in &got {
        let inc = Incoming {
            exchange: "xpublic",
            routing_key: &g.routing_key,
            body: &g.body,
            content_type: g.content_type.as_deref(),
            user_id: None,
            headers: &g.headers,
        };
        let Ok(Message::Announcement(a)) = report::parse(&inc) else {
            panic!("a repost is an announcement: {g:?}")
        };
        let i: usize = a.rel_path[a.rel_path.len() - 7..a.rel_path.len() - 3]
            .parse()
            .unwrap();
        let want = match format_of(i) {
            Format::V01 | Format::V02 | Format::V02Sr3 => Format::V02,
            Format::V03 | Format::V03Sr2 => Format::V03,
        };
        assert_eq!(a.format, want, "{g:?}");
        let prefix = if want == Format::V02 {
            "v02.post."
        } else {
            "v03."
        };
        assert!(g.routing_key.starts_with(prefix), "{g:?}");
        assert_eq!(
            a.pub_time,
            Stamp::from_unix(1_800_000_000 + i as i64, 250_000_000)
        );
        assert_eq!(a.source.as_deref(), Some("radar"));
        assert_eq!(a.size_bytes, Some(1000 + i as u64));
        assert_eq!(
            a.identity.as_ref().map(|i| i.value.clone()),
            Some(format!("{i:032x}"))
        );
        reposted.insert(a.rel_path.clone());
    }
    assert_eq!(reposted, want, "exactly n2's products are reposted");

    // The living nodes were not touched.
    for host in ["n1", "n3"] {
        assert_eq!(
            node_state(&addr, host).await,
            Some(("ok".to_owned(), 3)),
            "{host}"
        );
    }
    assert_eq!(
        node_state(&addr, "n2").await,
        Some(("failed".to_owned(), 3))
    );

    // `inflight` through the real binary: the table, then n2's transfers.
    let url_arg = format!("http://{addr}");
    let (code, out, err) =
        common::proc::run(&["inflight", "--url", &url_arg, "--node", "n2"], T).await;
    assert_eq!(code, 0, "{err}");
    eprintln!("{}", out.join("\n"));
    assert!(out[0].starts_with("NODE"), "{out:?}");
    assert!(
        out[1].starts_with("n2") && out[1].contains("failed"),
        "{out:?}"
    );
    assert!(out[3].starts_with("STARTED"), "{out:?}");
    assert_eq!(out.len(), 7, "{out:?}");
    assert!(
        out[4..].iter().all(|l| l.contains("failed-over")),
        "{out:?}"
    );
    let (code, out, _) = common::proc::run(&["inflight", "--url", &url_arg], T).await;
    assert_eq!(code, 0);
    assert_eq!(out.len(), 4, "{out:?}");

    // n2 reports again: recovered, its stale transfers close when their finals come.
    publish(&client, &[report("n2", "cfs", 1, 201, format_of(1))]).await;
    let n = notices.clone();
    common::wait_until("the recovery of n2", T, || {
        let got = !n.with_prefix("v01.watchdog.recovered.").is_empty();
        async move { got }
    })
    .await;
    let rec = &notices.with_prefix("v01.watchdog.recovered.")[0];
    assert_eq!(rec.routing_key, "v01.watchdog.recovered.n2");
    assert_eq!(rec.int("stale"), Some(3));
    let a = addr.clone();
    common::wait_until("n2 recovered with 2 stale transfers", T, || {
        let a = a.clone();
        async move { node_state(&a, "n2").await == Some(("recovered".into(), 2)) }
    })
    .await;

    let totals = inflight(&addr, "").await["totals"].clone();
    assert_eq!(totals["duplicates"], 1, "{totals}");
    assert!(totals["orphan_finals"].as_u64().unwrap() >= 1, "{totals}");
    assert_eq!(totals["failed_over"], 3, "{totals}");
    assert_eq!(totals["opened"], 12, "{totals}");
    assert_eq!(totals["closed"], 4, "{totals}");
    // Still exactly one failure and three reposts.
    assert_eq!(notices.with_prefix("v01.watchdog.node.").len(), 1);
    assert_eq!(reposts.all().len(), 3);
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pumpwatch_watchdog_in_flight 8"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pumpwatch_watchdog_node_state{node=\"n2\",state=\"recovered\"} 1"),
        "{metrics}"
    );
    assert!(
        shared
            .stats
            .malformed
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    alive.cancel();
    beats.await.unwrap();
    stop.cancel();
    let summary = run.await.unwrap().unwrap();
    assert_eq!(summary.failures, 1, "{summary}");
    assert_eq!(summary.reposts, 3, "{summary}");
    client.close().await;
}

/// The bound address from the daemon's "watchdog listening on http://ADDR" line.
async fn listening(p: &common::proc::Proc) -> String {
    p.wait_stderr("watchdog listening on http://", T).await;
    let err = p.stderr_text();
    let at =
        err.find("watchdog listening on http://").unwrap() + "watchdog listening on http://".len();
    err[at..]
        .split(|c: char| c.is_whitespace())
        .next()
        .unwrap()
        .to_owned()
}

async fn acked(addr: &str) -> u64 {
    let Ok(r) = reqwest::get(format!("http://{addr}/metrics")).await else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("pumpwatch_watchdog_reports_acked_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn killed_and_restarted_it_still_knows_what_was_in_flight() {
    let Some(vh) = common::vhost("watchdogkill").await else {
        return;
    };
    let url = vh.amqp_url.clone();
    let (_n, notices) = watch(&url, "xreport", "v01.watchdog.#").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("pumpwatch.toml");
    std::fs::write(
        &cfg_path,
        "[watchdog]\nnode_timeout = 2\nstuck_after = 600\n",
    )
    .unwrap();
    let state = dir.path().join("state");
    let (cfg_arg, state_arg) = (
        cfg_path.to_str().unwrap().to_owned(),
        state.to_str().unwrap().to_owned(),
    );
    let args = [
        "--config",
        &cfg_arg,
        "--broker",
        &url,
        "watchdog",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        &state_arg,
    ];
    let first = common::proc::spawn(&args);
    let addr = listening(&first).await;

    let client = publisher(&url).await;
    let mut msgs: Vec<Outgoing> = (0..5)
        .map(|i| report("k1", "cfs", i, 102, format_of(i)))
        .collect();
    msgs.push(report("k1", "cfs", 0, 201, format_of(0)));
    publish(&client, &msgs).await;
    // Acked means stored: then a SIGKILL loses nothing.
    let a = addr.clone();
    common::wait_until("6 reports stored and acked", T, || {
        let a = a.clone();
        async move { acked(&a).await >= 6 }
    })
    .await;
    assert_eq!(node_state(&addr, "k1").await, Some(("ok".into(), 4)));
    first.signal("KILL");
    let (code, _, _) = first.finish(T).await;
    assert_ne!(code, 0);

    // While it is down: product 1 ends, product 5 starts (they wait in its queue).
    publish(
        &client,
        &[
            report("k1", "cfs", 1, 201, format_of(1)),
            report("k1", "cfs", 5, 102, format_of(5)),
        ],
    )
    .await;
    let second = common::proc::spawn(&args);
    let addr = listening(&second).await;
    // A second watchdog on the same state is refused, clearly.
    let (code, _, err) = common::proc::run(&args, T).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("another watchdog"), "{err}");

    let a = addr.clone();
    common::wait_until("k1 holds products 2 to 5", T, || {
        let a = a.clone();
        async move {
            let snap = inflight(&a, "?node=k1").await;
            let rels: BTreeSet<String> = snap["transfers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["relPath"].as_str().map(str::to_owned))
                .collect();
            rels == (2..6).map(|i| rel("k1", i)).collect()
        }
    })
    .await;
    let totals = inflight(&addr, "").await["totals"].clone();
    assert_eq!(
        (totals["opened"].as_u64(), totals["closed"].as_u64()),
        (Some(6), Some(2)),
        "{totals}"
    );

    // k1 stays silent: the restarted watchdog announces what it held, from before the kill.
    let n = notices.clone();
    common::wait_until("the failure of k1", T, || {
        let got = !n.with_prefix("v01.watchdog.node.k1").is_empty();
        async move { got }
    })
    .await;
    let body = notices.with_prefix("v01.watchdog.node.k1")[0].json();
    let listed: BTreeSet<String> = body["transfers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["relPath"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, (2..6).map(|i| rel("k1", i)).collect());

    second.signal("TERM");
    let (code, _, err) = second.finish(Duration::from_secs(10)).await;
    assert_eq!(code, 0, "exits 0 on SIGTERM: {err}");
    client.close().await;
}

#[tokio::test]
async fn simulate_fail_node_leaves_exactly_what_the_watchdog_finds() {
    let Some(vh) = common::vhost("watchdogsim").await else {
        return;
    };
    let url = vh.amqp_url.clone();
    let (_n, notices) = watch(&url, "xreport", "v01.watchdog.#").await;
    let dir = tempfile::tempdir().unwrap();
    let (daemon, stop) = start(&url, "[watchdog]\nnode_timeout = 2\n", dir.path()).await;
    let addr = daemon.addr.to_string();
    let run = tokio::spawn(daemon.join());
    let args = simulate::Args {
        sources: 2,
        clients: 3,
        hosts: 3,
        rate: 300.0,
        count: None,
        duration: Some(Duration::from_millis(2500)),
        error_ratio: 0.1,
        client_error_ratio: vec![],
        format: simulate::FormatChoice::Mix,
        exchange: Some("xreport".into()),
        starts: false,
        seed: 7,
        stamp: None,
        fail_node: Some("node2".into()),
        fail_after: Some(Duration::from_secs(1)),
        stop_client: None,
        stop_after: None,
    };
    let cfg = simulate::Config::from_args(args, &common::common(Config::default(), &url)).unwrap();
    let summary = simulate::send(cfg, Shutdown::new()).await.unwrap();
    let (host, _, lost) = summary.failed.clone().expect("node2 failed");
    assert_eq!(host, "node2");
    assert_eq!(lost.len(), simulate::FailingNode::HOLD);
    let n = notices.clone();
    common::wait_until("the failure of node2", T, || {
        let got = !n.with_prefix("v01.watchdog.node.node2").is_empty();
        async move { got }
    })
    .await;
    let body = notices.with_prefix("v01.watchdog.node.node2")[0].json();
    let listed: BTreeSet<String> = body["transfers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["relPath"].as_str().unwrap().to_owned())
        .collect();
    let want: BTreeSet<String> = lost.iter().map(|s| s.rel_path.clone()).collect();
    assert_eq!(listed, want);
    // The other hosts finished everything they started.
    let snap = inflight(&addr, "").await;
    for h in ["node1", "node3"] {
        assert_eq!(node(&snap, h).unwrap()["in_flight"], 0, "{snap}");
    }
    stop.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn inflight_with_nothing_listening_is_one_line_and_exit_1() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let (code, out, err) = common::proc::run(&["inflight", "--url", &url], T).await;
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("nothing listening"), "{err}");
}
