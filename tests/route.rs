//! `pumpwatch route` against the real broker, with real users: each report published once
//! to `xreport` and fanned out by the broker to its source only, admins seeing each report
//! exactly once, spoofing and garbage rejected with reasons, unknown sources reaching
//! `xreport` and `xrejected` only, the sender's own `CC`/`BCC` and reserved topics
//! refused, sr3 attribution through the announcement index, and nothing lost when route
//! is killed or its connection closed.

mod common;

use common::watch::Seen;

use pumpwatch::broker::names;

use common::TestVhost;
use pumpwatch::broker::amqp::{Client, ConnectOptions, QueueDecl};
use pumpwatch::cmd::route;
use pumpwatch::config::Config;
use pumpwatch::core::emit::{Outgoing, emit};
use pumpwatch::core::report::{Format, Identity, Report};
use pumpwatch::core::{Headers, Stamp};
use pumpwatch::shutdown::Shutdown;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

/// The SPEC §3 permissions, set by hand here (setup has its own tests).
async fn grant(vh: &TestVhost, user: &str, source: bool) {
    let u = regex::escape(user);
    let read = format!("^(q_{u}\\..*|xs_{u}|xr_{u}|xpublic)$");
    let write = format!("^(q_{u}\\..*|xs_{u})$");
    let configure = if source {
        write.clone()
    } else {
        format!("^q_{u}\\..*$")
    };
    vh.mgmt
        .put_permissions(&vh.name, user, &configure, &write, &read)
        .await
        .unwrap();
}

struct Pump {
    vh: TestVhost,
    radar: String,
    sat: String,
    cfs: common::TestUser,
    radar_user: common::TestUser,
    /// The pump's own account (sarra, sender): reports through `xs_<feeder>` too.
    feed: common::TestUser,
    config: Config,
}

async fn pump(prefix: &str) -> Option<Pump> {
    let vh = common::vhost(prefix).await?;
    let radar_user = vh.add_user("radar", "radar-pw", &[]).await;
    let sat = vh.add_user("sat", "sat-pw", &[]).await;
    let cfs = vh.add_user("cfs", "cfs-pw", &[]).await;
    let edu = vh.add_user("edu", "edu-pw", &[]).await;
    let feed = vh.add_user("feed", "feed-pw", &[]).await;
    vh.mgmt
        .put_permissions(&vh.name, &feed.name, ".*", ".*", ".*")
        .await
        .unwrap();
    grant(&vh, &radar_user.name, true).await;
    grant(&vh, &sat.name, true).await;
    grant(&vh, &cfs.name, false).await;
    grant(&vh, &edu.name, false).await;
    let toml = format!(
        "cluster = \"test.pump\"\n[users.\"{}\"]\nrole = \"source\"\n[users.\"{}\"]\nrole = \"source\"\n[users.\"{}\"]\nrole = \"subscriber\"\n[users.\"{}\"]\nrole = \"subscriber\"\n[users.\"{}\"]\nrole = \"feeder\"\n[route]\nprefetch = 200\n",
        radar_user.name, sat.name, cfs.name, edu.name, feed.name
    );
    let config = Config::parse(&toml, "test").unwrap();
    Some(Pump {
        radar: radar_user.name.clone(),
        sat: sat.name,
        cfs,
        radar_user,
        feed,
        config,
        vh,
    })
}

fn report(source: &str, user: &str, i: usize, code: u16) -> Report {
    Report {
        format: Format::V02,
        topic: String::new(),
        exchange: String::new(),
        pub_time: Stamp::from_unix(1_700_000_000 + i as i64, 0),
        base_url: "sftp://data.example".into(),
        rel_path: format!("20240101/{source}/h5/product_{i:06}.h5"),
        code,
        message: Some("Downloaded".into()),
        host: Some("node1".into()),
        user: Some(user.into()),
        duration_s: Some(0.5),
        source: Some(source.into()),
        from_cluster: Some("test.pump".into()),
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

/// Everything arriving on `exchange`, through a durable queue of the test's own.
async fn watch(url: &str, exchange: &str, queue: &str) -> (Client, Seen) {
    common::watch::watch(url, exchange, "#", QueueDecl::durable(queue)).await
}

async fn wait_count(seen: &Seen, n: usize, what: &str) {
    seen.wait_len(n, what, T).await;
}

/// Publishes every message with confirms, republishing those whose confirm was lost to a
/// closed connection, as a careful producer does (duplicates are possible, losses not).
async fn publish_all(url: &str, exchange: &str, msgs: &[Outgoing]) {
    let client = Client::connect(
        &common::broker(url),
        ConnectOptions {
            name: "test publisher".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut todo: Vec<usize> = (0..msgs.len()).collect();
    for _round in 0..10 {
        let mut retry = Vec::new();
        for chunk in todo.chunks(2000) {
            let mut pending = Vec::new();
            for &i in chunk {
                match client.publish(exchange, &msgs[i]).await {
                    Ok(c) => pending.push((i, c)),
                    Err(e) if e.is_transient() => retry.push(i),
                    Err(e) => panic!("publish: {e}"),
                }
            }
            for (i, c) in pending {
                match c.wait().await {
                    Ok(()) => {}
                    Err(e) if e.is_transient() => retry.push(i),
                    Err(e) => panic!("confirm: {e}"),
                }
            }
        }
        if retry.is_empty() {
            client.close().await;
            return;
        }
        todo = retry;
    }
    panic!("could not publish everything in 10 rounds");
}

fn start_route(
    p: &Pump,
) -> (
    Shutdown,
    tokio::task::JoinHandle<Result<(), pumpwatch::cmd::Error>>,
    Arc<route::Counters>,
) {
    let cfg = route::Config::from_args(
        Default::default(),
        &common::common(p.config.clone(), &p.vh.amqp_url),
    )
    .unwrap();
    let shutdown = Shutdown::new();
    let counters = cfg.counters.clone();
    let h = tokio::spawn(route::run(cfg, shutdown.clone()));
    (shutdown, h, counters)
}

/// Waits for route's queue to exist (it declares it on connect).
async fn route_ready(p: &Pump) {
    let queue = names::route_queue(&p.config, &p.feed.name).name;
    common::wait_until("route's queue is declared", T, || {
        let (m, v, q) = (p.vh.mgmt.clone(), p.vh.name.clone(), queue.clone());
        async move { m.get_queue(&v, &q).await.ok().flatten().is_some() }
    })
    .await;
}

#[tokio::test]
async fn reports_reach_their_source_and_only_theirs() {
    let Some(p) = pump("route").await else { return };
    let (shutdown, handle, counters) = start_route(&p);
    route_ready(&p).await;
    let url = p.vh.amqp_url.as_str();
    let (_c1, radar) = watch(url, &names::source_exchange(&p.radar), "obs.radar").await;
    let (_c2, sat) = watch(url, &names::source_exchange(&p.sat), "obs.sat").await;
    let (_c3, rejected) = watch(url, "xrejected", "obs.rejected").await;
    // An admin's queue on xreport: every report exactly once.
    let (_c4, admin) = watch(url, "xreport", "obs.admin").await;

    let cfs = p.cfs.name.as_str();
    let mut msgs = Vec::new();
    for i in 0..500 {
        msgs.push(emit(
            &report(&p.radar, cfs, i, if i % 5 == 0 { 499 } else { 201 }),
            Format::V02,
        ));
        msgs.push(emit(
            &report(&p.sat, cfs, 1000 + i, 201),
            if i % 2 == 0 { Format::V03 } else { Format::V01 },
        ));
    }
    for i in 0..50 {
        msgs.push(emit(&report(&p.radar, "edu", 2000 + i, 201), Format::V02));
    }
    for i in 0..20 {
        let body = match i % 4 {
            0 => b"garbage".to_vec(),
            1 => vec![0xff, 0xfe, 0x00],
            2 => b"{\"pubTime\": ".to_vec(),
            _ => b"20240101T000000 http://h x 999999 n u 1".to_vec(),
        };
        msgs.push(Outgoing {
            routing_key: "v02.report.x".into(),
            body,
            content_type: "text/plain",
            headers: Headers::new(),
        });
    }
    // cfs publishes with its own account, on its own exchange, as a consumer would.
    publish_all(&p.cfs.amqp_url, &names::user_exchange(cfs), &msgs).await;
    // The pump's own processes report through the feeder's exchange like everybody.
    let feed = p.feed.name.as_str();
    let own: Vec<Outgoing> = (0..10)
        .map(|i| emit(&report(&p.radar, feed, 3000 + i, 201), Format::V02))
        .collect();
    publish_all(&p.feed.amqp_url, &names::user_exchange(feed), &own).await;

    wait_count(&radar, 510, "510 reports on xr_radar").await;
    wait_count(&sat, 500, "500 reports on xr_sat").await;
    wait_count(&rejected, 70, "70 rejects").await;
    wait_count(&admin, 1010, "1010 reports on xreport").await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();

    for (seen, source, n) in [(&radar, &p.radar, 510), (&sat, &p.sat, 500)] {
        let all = seen.all();
        assert_eq!(all.len(), n, "exactly {n} on xr_{source}");
        for g in &all {
            let (key, h) = (&g.routing_key, &g.headers);
            let client = h.get_str(names::H_CLIENT);
            assert!(client == Some(cfs) || client == Some(feed), "{client:?}");
            assert_eq!(h.get_str(names::H_SOURCE), Some(source.as_str()));
            // Published with its own topic; the broker strips the BCC before delivery.
            assert!(key.starts_with("v0"), "{key}");
            assert!(h.get("BCC").is_none(), "BCC delivered: {h:?}");
        }
    }
    // Admins see every routed report exactly once (the BCC copy is not a second one).
    let on_xreport = admin.all();
    assert_eq!(on_xreport.len(), 1010);
    let distinct: HashSet<&Vec<u8>> = on_xreport.iter().map(|g| &g.body).collect();
    assert_eq!(distinct.len(), 1010, "each report once on xreport");
    let rej = rejected.all();
    assert_eq!(rej.len(), 70);
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for g in &rej {
        let r = g.headers.get_str(names::H_REASON).expect("a reason");
        *reasons
            .entry(r.split(':').next().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(reasons.get("spoofed"), Some(&50), "{reasons:?}");
    assert_eq!(reasons.get("malformed"), Some(&20), "{reasons:?}");
    // The original bytes are kept.
    assert!(rej.iter().any(|g| g.body == b"garbage"));
    assert_eq!(counters.get("rejected"), 70);
    assert_eq!(counters.get("routed"), 1010);
    // The same counters as Prometheus metrics (what `route --listen` serves).
    let stop = Shutdown::new();
    let addr = route::serve_metrics(
        "127.0.0.1:0".parse().unwrap(),
        counters.clone(),
        Default::default(),
        stop.clone(),
    )
    .await
    .unwrap();
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for want in [
        r#"pumpwatch_route_messages_total{outcome="routed",reason=""} 1010"#,
        r#"pumpwatch_route_messages_total{outcome="rejected",reason="spoofed"} 50"#,
        r#"pumpwatch_route_messages_total{outcome="rejected",reason="malformed"} 20"#,
    ] {
        assert!(text.contains(want), "{want} in\n{text}");
    }
    stop.cancel();
}

#[tokio::test]
async fn unknown_sources_reach_admins_and_xrejected_and_nobody_else() {
    let Some(p) = pump("routeunknown").await else {
        return;
    };
    let (shutdown, handle, counters) = start_route(&p);
    route_ready(&p).await;
    let url = p.vh.amqp_url.as_str();
    let (_c1, radar) = watch(url, &names::source_exchange(&p.radar), "obs.radar").await;
    let (_c2, sat) = watch(url, &names::source_exchange(&p.sat), "obs.sat").await;
    let (_c3, rejected) = watch(url, "xrejected", "obs.rejected").await;
    let (_c4, admin) = watch(url, "xreport", "obs.admin").await;
    let cfs = p.cfs.name.as_str();
    let mut msgs: Vec<Outgoing> = (0..5)
        .map(|i| emit(&report("nobody", cfs, i, 201), Format::V02))
        .collect();
    // A report that brings its own routing: CC/BCC to sat and a reserved topic.
    let mut steered = emit(&report(&p.radar, cfs, 10, 201), Format::V02);
    let to_sat = pumpwatch::core::HeaderValue::Array(vec![pumpwatch::core::HeaderValue::Str(
        names::source_route_key(&p.sat),
    )]);
    steered.headers.set("CC", to_sat.clone());
    steered.headers.set("BCC", to_sat);
    msgs.push(steered);
    let mut reserved = emit(&report(&p.radar, cfs, 11, 201), Format::V02);
    reserved.routing_key = names::source_route_key(&p.sat);
    msgs.push(reserved);
    publish_all(&p.cfs.amqp_url, &names::user_exchange(cfs), &msgs).await;
    wait_count(&rejected, 6, "5 unrouted and 1 reserved topic on xrejected").await;
    wait_count(&admin, 6, "5 unrouted and 1 steered on xreport").await;
    wait_count(&radar, 1, "the steered report on xr_radar").await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    // The unknown source's reports: on xreport for admins and on xrejected, with the
    // reason; the steered one went where it belongs and nowhere else.
    let rej = rejected.all();
    let reasons: Vec<&str> = rej
        .iter()
        .map(|g| g.headers.get_str(names::H_REASON).unwrap_or(""))
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| **r == "unknown source").count(),
        5,
        "{reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.starts_with("reserved topic"))
            .count(),
        1,
        "{reasons:?}"
    );
    assert_eq!(admin.len(), 6);
    assert_eq!(radar.len(), 1);
    assert_eq!(sat.len(), 0, "nothing steered into xr_sat");
    assert_eq!(counters.get("unrouted"), 5);
}

#[tokio::test]
async fn sr3_report_is_attributed_through_the_announcement_it_answers() {
    let Some(p) = pump("routesr3").await else {
        return;
    };
    let (shutdown, handle, _) = start_route(&p);
    route_ready(&p).await;
    let url = p.vh.amqp_url.as_str();
    let (_c, radar) = watch(url, &names::source_exchange(&p.radar), "obs.radar").await;
    // radar announces a product on its own exchange...
    let ann = Outgoing {
        routing_key: "v03.20240101.radar.h5".into(),
        body: format!(
            r#"{{"pubTime":"20240101T130241.101","baseUrl":"https://pump","relPath":"20240101/radar/h5/scan.h5","identity":{{"method":"sha512","value":"q1w2e3r4t5y6"}},"source":"{}"}}"#,
            p.radar
        )
        .into_bytes(),
        content_type: "application/json",
        headers: Headers::new(),
    };
    publish_all(
        &p.radar_user.amqp_url,
        &names::user_exchange(&p.radar),
        &[ann],
    )
    .await;
    // ...and cfs, running sr3, reports with source overwritten by its own user and the
    // local path it wrote to.
    let cfs = p.cfs.name.as_str();
    let rep = Outgoing {
        routing_key: "v03.home.cfs.data".into(),
        body: format!(
            r#"{{"pubTime":"20240101T130241.101","baseUrl":"file:/","relPath":"/home/cfs/data/scan.h5","source":"{cfs}","report":{{"code":201,"timeCompleted":"20240101T130245.5","message":"Download successful"}}}}"#
        )
        .into_bytes(),
        content_type: "application/json",
        headers: Headers::new(),
    };
    publish_all(&p.cfs.amqp_url, &names::user_exchange(cfs), &[rep]).await;
    wait_count(&radar, 1, "the sr3 report on xr_radar").await;
    // With nothing held, a stop is immediate (no drain to wait for).
    let t0 = std::time::Instant::now();
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        t0.elapsed()
    );
    let all = radar.all();
    assert_eq!(all[0].headers.get_str(names::H_CLIENT), Some(cfs));
    assert_eq!(
        all[0].headers.get_str(names::H_SOURCE),
        Some(p.radar.as_str())
    );
}

/// 20 000 reports; `route` loses its connection (or its life) in the middle; every report
/// still reaches its source (duplicates allowed, losses not).
async fn nothing_lost(prefix: &str, kill: bool) {
    let Some(p) = pump(prefix).await else { return };
    let url = p.vh.amqp_url.clone();
    let cfs = p.cfs.name.clone();
    // Route as a real process, so SIGKILL is real.
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("pumpwatch.toml");
    let mut toml = String::new();
    for u in p.config.users.values() {
        toml.push_str(&format!(
            "[users.\"{}\"]\nrole = \"{}\"\n",
            u.name,
            u.role.name()
        ));
    }
    std::fs::write(&cfg_path, toml).unwrap();
    let cfg_arg = cfg_path.to_str().unwrap().to_owned();
    let args = [
        "--config",
        cfg_arg.as_str(),
        "--broker",
        url.as_str(),
        "route",
    ];
    let mut routed = common::proc::spawn(&args);
    route_ready(&p).await;
    let (_c1, radar) = watch(&url, &names::source_exchange(&p.radar), "obs.radar").await;
    let (_c2, sat) = watch(&url, &names::source_exchange(&p.sat), "obs.sat").await;
    let n = 20_000;
    let msgs: Vec<Outgoing> = (0..n)
        .map(|i| {
            emit(
                &report(if i % 2 == 0 { &p.radar } else { &p.sat }, &cfs, i, 201),
                Format::V02,
            )
        })
        .collect();
    let publisher = {
        let (u, x) = (p.cfs.amqp_url.clone(), names::user_exchange(&cfs));
        tokio::spawn(async move { publish_all(&u, &x, &msgs).await })
    };
    // Strike in the middle of the stream.
    let (r, s) = (radar.clone(), sat.clone());
    common::wait_until("route is half way", T, || {
        let n = r.len() + s.len();
        async move { n >= 5_000 }
    })
    .await;
    if kill {
        routed.signal("KILL");
        let _ = routed.finish(T).await;
        routed = common::proc::spawn(&args);
    } else {
        let conns = p.vh.mgmt.list_connections().await.unwrap();
        for c in conns.iter().filter(|c| c.vhost == p.vh.name) {
            let _ = p.vh.mgmt.close_connection(&c.name).await;
        }
    }
    publisher.await.unwrap();
    let (r, s) = (radar.clone(), sat.clone());
    common::wait_until(
        "every report reached its source",
        Duration::from_secs(180),
        || {
            let got = r.rel_paths().len() + s.rel_paths().len();
            async move { got >= n }
        },
    )
    .await;
    let got: HashSet<String> = radar.rel_paths().union(&sat.rel_paths()).cloned().collect();
    assert_eq!(got.len(), n, "no report lost");
    routed.signal("TERM");
    let (code, _, err) = routed.finish(Duration::from_secs(10)).await;
    assert_eq!(code, 0, "route exits 0 on SIGTERM: {err}");
}

#[tokio::test]
async fn nothing_lost_when_route_is_killed() {
    nothing_lost("routekill", true).await;
}

#[tokio::test]
async fn nothing_lost_when_connections_are_closed() {
    nothing_lost("routeclose", false).await;
}

/// The configuration of `p` as a file, for route as a real process.
fn config_file(p: &Pump, dir: &std::path::Path) -> String {
    let mut toml = String::new();
    for u in p.config.users.values() {
        toml.push_str(&format!(
            "[users.\"{}\"]\nrole = \"{}\"\n",
            u.name,
            u.role.name()
        ));
    }
    let path = dir.join("pumpwatch.toml");
    std::fs::write(&path, toml).unwrap();
    path.to_str().unwrap().to_owned()
}

fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// 40 messages of 5 MB each amid normal traffic: route never holds them (it reads them off
/// the socket and keeps 64 KiB of each as evidence), rejects each as too large with its
/// size, routes everything else, and its peak memory stays far below 40 × 5 MB.
#[tokio::test]
async fn huge_messages_are_rejected_without_being_held() {
    let Some(p) = pump("routehuge").await else {
        return;
    };
    let url = p.vh.amqp_url.clone();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(&p, dir.path());
    let args = ["--config", cfg.as_str(), "--broker", url.as_str(), "route"];
    let routed = common::proc::spawn(&args);
    route_ready(&p).await;
    let (_c1, radar) = watch(&url, &names::source_exchange(&p.radar), "obs.radar").await;
    let (_c2, rejected) = watch(&url, "xrejected", "obs.rejected").await;
    let cfs = p.cfs.name.clone();
    let mut msgs = Vec::new();
    for i in 0..40 {
        let mut m = emit(&report(&p.radar, &cfs, i, 201), Format::V02);
        m.body.resize(5 << 20, b' ');
        msgs.push(m);
        msgs.push(emit(&report(&p.radar, &cfs, 1000 + i, 201), Format::V02));
    }
    publish_all(&p.cfs.amqp_url, &names::user_exchange(&cfs), &msgs).await;
    wait_count(&radar, 40, "the 40 normal reports on xr_radar").await;
    wait_count(&rejected, 40, "the 40 huge ones on xrejected").await;
    let rss_mb = peak_rss_kb(routed.pid().unwrap()) / 1024;
    routed.signal("TERM");
    let (code, _, err) = routed.finish(Duration::from_secs(10)).await;
    assert_eq!(code, 0, "{err}");
    for g in rejected.all() {
        let (h, body) = (&g.headers, &g.body);
        assert!(
            h.get_str(names::H_REASON)
                .unwrap_or("")
                .starts_with("too large"),
            "{h:?}"
        );
        assert_eq!(
            h.get("pumpwatch_size").and_then(|v| v.as_i64()),
            Some(5 << 20)
        );
        assert_eq!(body.len(), 64 * 1024);
    }
    println!("route peak RSS with 40 x 5 MB messages: {rss_mb} MB");
    assert!(rss_mb < 100, "route held the bodies: peak RSS {rss_mb} MB");
}

/// Publishing to xreport refused for good (route's write permission taken away): each
/// report goes to xrejected with the broker's reason, the queue never sticks. Then the
/// permission back and xreport deleted under route: route declares it again and routes on.
// Ignored for now: since the nack retry (HA), after the refusal phase the second half
// often never reaches xr_radar (route keeps retrying what the broker nacks, with no log
// line after the first). Under investigation; run with `--ignored`.
#[tokio::test]
#[ignore = "open bug: retries after a recreated xreport (see the comment above)"]
async fn refused_outputs_go_to_xrejected_and_a_deleted_exchange_comes_back() {
    let Some(p) = pump("routerefused").await else {
        return;
    };
    let (shutdown, handle, counters) = start_route(&p);
    route_ready(&p).await;
    let url = p.vh.amqp_url.as_str();
    let (_c1, radar) = watch(url, &names::source_exchange(&p.radar), "obs.radar").await;
    let (_c2, rejected) = watch(url, "xrejected", "obs.rejected").await;
    let cfs = p.cfs.name.clone();
    // Route runs as guest here: take its right to write anything but xrejected.
    let (m, v) = (&p.vh.mgmt, &p.vh.name);
    m.put_permissions(v, "guest", ".*", "^xrejected$", ".*")
        .await
        .unwrap();
    let first: Vec<Outgoing> = (0..20)
        .map(|i| emit(&report(&p.radar, &cfs, i, 201), Format::V02))
        .collect();
    publish_all(&p.cfs.amqp_url, &names::user_exchange(&cfs), &first).await;
    wait_count(&rejected, 20, "20 refused reports on xrejected").await;
    for g in rejected.all() {
        let reason = g.headers.get_str(names::H_REASON).unwrap_or("");
        assert!(reason.starts_with("refused: 403"), "{reason}");
    }
    assert_eq!(radar.len(), 0);
    m.put_permissions(v, "guest", ".*", ".*", ".*")
        .await
        .unwrap();
    m.delete_exchange(v, "xreport").await.unwrap();
    let second: Vec<Outgoing> = (100..120)
        .map(|i| emit(&report(&p.radar, &cfs, i, 201), Format::V02))
        .collect();
    publish_all(&p.cfs.amqp_url, &names::user_exchange(&cfs), &second).await;
    wait_count(&radar, 20, "20 reports on xr_radar after xreport came back").await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    assert_eq!(counters.get("refused"), 20);
    assert_eq!(counters.get("routed"), 20);
}
