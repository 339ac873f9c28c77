//! `pumpwatch log` against the real broker: every filter, every output mode, exit codes,
//! bad URLs, and a broker that closes the connection mid-stream.

mod common;

use pumpwatch::broker::names;

use common::proc::{self, Proc};
use pumpwatch::cmd::simulate::{FormatChoice, Generator, Plan, Sim};
use pumpwatch::core::stamp::Stamp;
use regex::Regex;
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn plan(seed: u64) -> Plan {
    let mut p = Plan::new(3, 3, 3);
    p.format = FormatChoice::Mix;
    p.error_ratio = 0.3;
    p.seed = seed;
    p.exchange = Some("xreport".into());
    p.stamp = true;
    p
}

/// What `simulate` will send for this plan and count (the generator is deterministic).
fn expected(p: &Plan, n: usize) -> Vec<Sim> {
    let mut g = Generator::new(p.clone());
    let now = Stamp(jiff::Timestamp::now());
    (0..n).flat_map(|_| g.next_product(now)).collect()
}

async fn start_log(url: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["--broker", url, "log"];
    args.extend_from_slice(extra);
    let p = proc::spawn(&args);
    p.wait_stderr("listening on", T).await;
    p
}

async fn simulate(url: &str, seed: u64, count: u64) -> String {
    let (code, out, err) = proc::run(
        &[
            "--broker",
            url,
            "simulate",
            "--sources",
            "3",
            "--clients",
            "3",
            "--hosts",
            "3",
            "--format",
            "mix",
            "--error-ratio",
            "0.3",
            "--exchange",
            "xreport",
            "--count",
            &count.to_string(),
            "--seed",
            &seed.to_string(),
        ],
        T,
    )
    .await;
    assert_eq!(code, 0, "simulate failed: {err}");
    out.join("\n")
}

/// Publishes a raw message to `xreport` through the management API (no pumpwatch involved).
async fn publish(vh: &common::TestVhost, key: &str, body: &str) {
    vh.mgmt
        .publish(&vh.name, "xreport", key, body, &Default::default())
        .await
        .unwrap();
}

/// What the core reads from a simulated message.
fn parsed(s: &Sim) -> pumpwatch::core::Report {
    let inc = pumpwatch::core::Incoming {
        exchange: &s.exchange,
        routing_key: &s.out.routing_key,
        body: &s.out.body,
        content_type: Some(s.out.content_type),
        user_id: None,
        headers: &s.out.headers,
    };
    match pumpwatch::core::report::parse(&inc) {
        Ok(pumpwatch::core::report::Message::Report(r)) => *r,
        other => panic!("simulated message is not a report: {other:?}"),
    }
}

fn strip_day(p: &str) -> &str {
    p.split_once('/').map(|(_, rest)| rest).unwrap_or(p)
}

#[tokio::test]
async fn thousand_mix_reports_are_all_printed_and_every_filter_selects_exactly() {
    let Some(vh) = common::vhost("log").await else {
        return;
    };
    vh.mgmt
        .declare_exchange(&vh.name, "xreport", "topic", true)
        .await
        .unwrap();
    let url = vh.amqp_url.as_str();
    let p = plan(7);
    let sims = expected(&p, 1000);
    let re_pattern = Regex::new("node2").unwrap();
    let text_of = |s: &Sim| {
        let mut t = format!(
            "{}\n{}",
            s.out.routing_key,
            String::from_utf8_lossy(&s.out.body)
        );
        for (k, v) in s.out.headers.iter() {
            t.push_str(&format!("\n{k} {}", v.to_text()));
        }
        t
    };
    // Each filter with the predicate it must match exactly.
    type Pred = Box<dyn Fn(&Sim) -> bool>;
    let filters: Vec<(Vec<&str>, Pred)> = vec![
        (
            vec!["--code", "4xx"],
            Box::new(|s: &Sim| (400..500).contains(&s.code)),
        ),
        (
            vec!["--source", "sat"],
            Box::new(|s: &Sim| s.source == "sat"),
        ),
        (
            vec!["--client", "cfs"],
            Box::new(|s: &Sim| s.client == "cfs"),
        ),
        (
            vec!["--file", r"\.grib2$"],
            Box::new(|s: &Sim| s.rel_path.ends_with(".grib2")),
        ),
        (
            vec!["--flow", "radar-f2"],
            Box::new(|s: &Sim| s.flow == "radar-f2"),
        ),
        (
            vec!["node2"],
            Box::new(move |s: &Sim| re_pattern.is_match(&text_of(s))),
        ),
        (
            vec!["--code", "499", "--source", "radar"],
            Box::new(|s: &Sim| s.code == 499 && s.source == "radar"),
        ),
        // Host and cluster as the wire carries them (sr3 states no host).
        (
            vec!["--host", "node2"],
            Box::new(|s: &Sim| parsed(s).host.as_deref() == Some("node2")),
        ),
        (
            vec!["--cluster", "sim.pump"],
            Box::new(|s: &Sim| {
                let r = parsed(s);
                r.from_cluster.as_deref() == Some("sim.pump")
                    || r.to_clusters.iter().any(|c| c == "sim.pump")
            }),
        ),
    ];
    let mut logs = vec![start_log(url, &["--json", "--count", "1000", "--stats"]).await];
    let mut wants = vec![];
    for (args, pred) in &filters {
        let n = sims.iter().filter(|s| pred(s)).count();
        assert!(n > 0, "the sample must exercise {args:?}");
        let mut a: Vec<&str> = args.clone();
        let count = n.to_string();
        // --count stops it at the expected number; --idle catches a filter that selects too few.
        a.extend(["--json", "--idle", "5"]);
        let a: Vec<String> = a
            .iter()
            .map(|s| s.to_string())
            .chain(["--count".to_string(), count])
            .collect();
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        logs.push(start_log(url, &a).await);
        wants.push(n);
    }
    let summary = simulate(url, 7, 1000).await;
    assert!(summary.contains("sent 1000 reports"), "{summary}");

    let all = logs.remove(0);
    let (code, lines, err) = all.finish(T).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines.len(), 1000, "all 1000 printed");
    assert!(err.contains("printed 1000"), "stats on stderr: {err}");
    for (line, sim) in lines.iter().zip(&sims) {
        let j: Value = serde_json::from_str(line).unwrap();
        let want = (
            sim.code as u64,
            sim.client.as_str(),
            sim.source.as_str(),
            strip_day(&sim.rel_path),
        );
        let got = (
            j["code"].as_u64().unwrap(),
            j["client"].as_str().unwrap_or("?"),
            j["source"].as_str().unwrap_or("?"),
            strip_day(j["rel_path"].as_str().unwrap()),
        );
        assert_eq!(got, want, "line {line}");
        for key in [
            "format",
            "topic",
            "exchange",
            "message",
            "pub_time",
            "base_url",
            "host",
            "flow",
            "from_cluster",
            "to_clusters",
            "size",
            "duration",
            "identity",
        ] {
            assert!(j.get(key).is_some(), "key {key} in {line}");
        }
    }
    for ((log, (args, pred)), n) in logs.into_iter().zip(&filters).zip(wants) {
        let (code, lines, err) = log.finish(T).await;
        assert_eq!(code, 0, "{args:?}: {err}");
        let want: Vec<String> = sims
            .iter()
            .filter(|s| pred(s))
            .map(|s| strip_day(&s.rel_path).to_owned())
            .collect();
        let got: Vec<String> = lines
            .iter()
            .map(|l| {
                strip_day(
                    serde_json::from_str::<Value>(l).unwrap()["rel_path"]
                        .as_str()
                        .unwrap(),
                )
                .to_owned()
            })
            .collect();
        assert_eq!(got.len(), n, "{args:?} selects exactly {n}");
        assert_eq!(got, want, "{args:?} selects exactly the matching reports");
    }
}

#[tokio::test]
async fn text_and_raw_output() {
    let Some(vh) = common::vhost("logfmt").await else {
        return;
    };
    vh.mgmt
        .declare_exchange(&vh.name, "xreport", "topic", true)
        .await
        .unwrap();
    let url = vh.amqp_url.as_str();
    let text = start_log(url, &["--count", "3"]).await;
    let raw = start_log(url, &["--raw", "--count", "3"]).await;
    let (code, _, err) = proc::run(
        &[
            "--broker",
            url,
            "report",
            "--exchange",
            "xreport",
            "--code",
            "499",
            "--relpath",
            "20260101/radar/a b.h5",
            "--source",
            "radar",
            "--client",
            "cfs",
            "--host",
            "node9",
            "--message",
            "Failed hard",
            "--flow",
            "f1",
        ],
        T,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    // An announcement and garbage are skipped by the text mode, shown by raw.
    publish(&vh, "v02.post.x", "20260101T000000 http://h/ x/y.h5").await;
    publish(&vh, "v02.report.x", "garbage").await;
    let (code, _, err) = proc::run(
        &[
            "--broker",
            url,
            "report",
            "--exchange",
            "xreport",
            "--code",
            "201",
            "--relpath",
            "20260101/radar/b.h5",
            "--source",
            "radar",
            "--client",
            "cfs",
            "--format",
            "v03",
        ],
        T,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    publish(
        &vh,
        "v02.report.x",
        "20260101T000000 http://h/ x/z.h5 304 n1 edu 0.1",
    )
    .await;
    let (code, lines, err) = text.finish(T).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines.len(), 3, "{lines:?}");
    let re = Regex::new(r#"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} 499 cfs@node9 radar f1 20260101/radar/a%20b\.h5 "Failed hard" v02\.report\.20260101\.radar$"#).unwrap();
    assert!(re.is_match(&lines[0]), "{}", lines[0]);
    assert!(
        lines[1].contains(" 201 cfs@") && lines[1].contains("v03.report.20260101.radar"),
        "{}",
        lines[1]
    );
    assert!(lines[2].contains(" 304 edu@n1 - - x/z.h5"), "{}", lines[2]);
    let (code, lines, _) = raw.finish(T).await;
    assert_eq!(code, 0);
    let j: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(j[0]["exchange"], "xreport");
    assert_eq!(j[0]["headers"]["message"], "Failed hard");
    assert_eq!(j[1]["topic"], "v02.post.x");
    assert_eq!(j[2]["body"], "garbage");
}

#[tokio::test]
async fn bad_arguments_exit_2_with_one_line() {
    for args in [
        vec!["log", "--code", "banana"],
        vec!["log", "--file", "("],
        vec!["log", "--json", "--raw"],
        vec!["log", "--timeout", "soon"],
        vec!["simulate", "--error-ratio", "2"],
        vec!["report", "--code", "42", "--relpath", "x"],
        vec!["--config", "/nonexistent/pumpwatch.toml", "log"],
        // A broker URL that does not parse is a bad argument, in every command.
        vec!["--broker", "not a url", "log"],
        vec!["--broker", "amqp://u:s3cr3tpw@h:port/", "speedo"],
        vec!["--broker", "http://u:s3cr3tpw@h/", "setup"],
        vec!["route", "--listen", "nowhere"],
    ] {
        let (code, out, err) = proc::run(&args, T).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty());
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err:?}");
        assert!(err.starts_with("pumpwatch: "), "{err}");
        assert!(!err.contains("s3cr3tpw"), "password leaked: {err}");
    }
}

#[tokio::test]
async fn broker_errors_exit_1_with_one_line_and_no_password() {
    let Some(vh) = common::vhost("logerr").await else {
        return;
    };
    let bad_password = format!("amqp://guest:s3cr3tpw@127.0.0.1:5672/{}", vh.name);
    for (url, want) in [
        ("amqp://guest:guest@127.0.0.1:1/", "cannot connect"),
        (bad_password.as_str(), "access refused"),
        ("amqp://guest:guest@127.0.0.1:5672/no-such-vhost-pw", ""),
        // amqps really speaks TLS: against the plain port the handshake fails.
        ("amqps://guest:guest@127.0.0.1:5672/", "cannot connect"),
    ] {
        let (code, out, err) = proc::run(&["--broker", url, "log", "--timeout", "5"], T).await;
        assert_eq!(code, 1, "{url}: {err}");
        assert!(out.is_empty());
        assert_eq!(err.lines().count(), 1, "{url}: one line: {err:?}");
        assert!(err.contains(want), "{url}: {err}");
        assert!(!err.contains("s3cr3tpw"), "password leaked: {err}");
    }
    // The exchange does not exist in this vhost: a clear error, exit 1.
    let (code, _, err) = proc::run(
        &[
            "--broker",
            &vh.amqp_url,
            "log",
            "--exchange",
            "xnothere",
            "--timeout",
            "5",
        ],
        T,
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("xnothere"), "{err}");
}

#[tokio::test]
async fn survives_the_broker_closing_the_connection_mid_stream() {
    let Some(vh) = common::vhost("logdrop").await else {
        return;
    };
    vh.mgmt
        .declare_exchange(&vh.name, "xreport", "topic", true)
        .await
        .unwrap();
    let url = vh.amqp_url.as_str();
    let log = start_log(url, &["--json", "--count", "20", "--queue", "resume"]).await;
    let (code, _, err) = proc::run(
        &[
            "--broker",
            url,
            "simulate",
            "--exchange",
            "xreport",
            "--count",
            "10",
            "--seed",
            "1",
        ],
        T,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    log.wait_stdout_lines(10, T).await;
    // Close every connection of this vhost, as `rabbitmqctl close_all_connections` would.
    // The management API lists a connection a moment after it opens.
    let mine = common::wait_for("log's connection is listed", T, || {
        let (mgmt, vhost) = (vh.mgmt.clone(), vh.name.clone());
        async move {
            let cs: Vec<_> = mgmt
                .list_connections()
                .await
                .ok()?
                .into_iter()
                .filter(|c| c.vhost == vhost)
                .collect();
            (!cs.is_empty()).then_some(cs)
        }
    })
    .await;
    for c in &mine {
        vh.mgmt.close_connection(&c.name).await.unwrap();
    }
    // Wait for log to come back (a new connection in this vhost), then send more.
    let old: Vec<String> = mine.iter().map(|c| c.name.clone()).collect();
    common::wait_until("log reconnects", T, || {
        let mgmt = vh.mgmt.clone();
        let (vhost, old) = (vh.name.clone(), old.clone());
        async move {
            mgmt.list_connections()
                .await
                .map(|cs| {
                    cs.iter()
                        .any(|c| c.vhost == vhost && !old.contains(&c.name))
                })
                .unwrap_or(false)
        }
    })
    .await;
    let (code, _, err) = proc::run(
        &[
            "--broker",
            url,
            "simulate",
            "--exchange",
            "xreport",
            "--count",
            "10",
            "--seed",
            "2",
        ],
        T,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, lines, err) = log.finish(T).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines.len(), 20, "{err}");
}

#[tokio::test]
async fn a_source_reads_its_own_reports_without_being_told() {
    let Some(vh) = common::vhost("logsrc").await else {
        return;
    };
    let radar = vh.add_user("radar", "radar-pw", &[]).await;
    let u = regex::escape(&radar.name);
    let rw = format!("^(q_{u}\\..*|xs_{u})$");
    let read = format!("^(q_{u}\\..*|xs_{u}|xr_{u}|xpublic)$");
    vh.mgmt
        .put_permissions(&vh.name, &radar.name, &rw, &rw, &read)
        .await
        .unwrap();
    let own = names::source_exchange(&radar.name);
    for x in ["xreport", own.as_str()] {
        vh.mgmt
            .declare_exchange(&vh.name, x, "topic", true)
            .await
            .unwrap();
    }
    // No configuration says radar is a source: xreport is refused, so log falls back to
    // radar's own exchange.
    let log = proc::spawn(&[
        "--broker",
        &radar.amqp_url,
        "log",
        "--count",
        "1",
        "--timeout",
        "30",
    ]);
    log.wait_stderr(&format!("listening on {own}"), T).await;
    let body = "20260101T000000 http://h/ 20260101/radar/a.h5 201 n1 cfs 0.1";
    vh.mgmt
        .publish(&vh.name, &own, "v02.report.x", body, &Default::default())
        .await
        .unwrap();
    let (code, lines, err) = log.finish(T).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].contains(" 201 cfs@n1 ") && lines[0].contains("20260101/radar/a.h5"),
        "{}",
        lines[0]
    );
}
