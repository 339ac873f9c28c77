//! `pumpwatch serve` against the real broker, with `speedo` running in-process: reports go
//! straight into `xreport`, and `/api/status`, `/metrics` (checked line by line against
//! the exposition format), `/api/events` and a source's own view must agree with what was
//! sent. Then the page in a real headless Chromium (tests/browser/page.mjs): it shows the
//! client and the source, a number changes when more reports arrive (pushed, no reload),
//! and it stays usable with 5 000 clients. Screenshots go to test-artifacts/.

mod common;

use pumpwatch::broker::amqp::{Client, ConnectOptions};
use pumpwatch::cmd::Error;
use pumpwatch::cmd::serve::{self, View};
use pumpwatch::cmd::speedo::{self, Reading, Subject};
use pumpwatch::config::Config;
use pumpwatch::core::emit::{Outgoing, emit};
use pumpwatch::core::report::{Format, H_CLIENT, H_SOURCE, Report};
use pumpwatch::core::{Headers, Stamp};
use pumpwatch::shutdown::Shutdown;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn config() -> Config {
    Config::parse(
        "[users.radar]\nrole = \"source\"\n[users.sat]\nrole = \"source\"\n\
         [users.cfs]\nrole = \"subscriber\"\n\
         [speedo]\ninterval = 0.5\nall_interval = 0.5\n",
        "test",
    )
    .unwrap()
}

/// A report of `cfs` on radar product `i`, stamped as route would; v02 and v03 alternate.
fn report(i: usize, code: u16, size: u64) -> Outgoing {
    let format = if i.is_multiple_of(2) {
        Format::V02
    } else {
        Format::V03
    };
    let mut r = Report {
        format,
        topic: String::new(),
        exchange: String::new(),
        pub_time: Stamp::from_unix(1_700_000_000 + i as i64, 0),
        base_url: "sftp://data.example".into(),
        rel_path: format!("20240101/radar/h5/product_{i:06}.h5"),
        code,
        message: None,
        host: Some("node1".into()),
        user: Some("cfs".into()),
        duration_s: Some(0.5),
        source: Some("radar".into()),
        from_cluster: None,
        to_clusters: vec![],
        flow: None,
        size_bytes: Some(size),
        identity: None,
        time_completed: None,
        stamped_client: None,
        stamped_source: None,
        extra: Headers::new(),
    };
    r.extra.set(H_CLIENT, "cfs");
    r.extra.set(H_SOURCE, "radar");
    emit(&r, format)
}

/// `good` reports of 1000 bytes and `bad` of 10, numbered from `from`.
fn traffic(from: usize, good: usize, bad: usize) -> Vec<Outgoing> {
    (from..from + good)
        .map(|i| report(i, 201, 1000))
        .chain((from + good..from + good + bad).map(|i| report(i, 499, 10)))
        .collect()
}

async fn publish(url: &str, msgs: &[Outgoing]) {
    let client = Client::connect(&common::broker(url), ConnectOptions::new("test publisher"))
        .await
        .unwrap();
    let mut pending = Vec::new();
    for m in msgs {
        pending.push(client.publish("xreport", m).await.unwrap());
    }
    for p in pending {
        // Speedos for which nobody (yet) listens are fine.
        match p.wait().await {
            Ok(()) | Err(pumpwatch::broker::amqp::AmqpError::Unroutable { .. }) => {}
            Err(e) => panic!("publish: {e}"),
        }
    }
    client.close().await;
}

/// speedo and serve (admin view) running in-process on a fresh vhost.
struct Pump {
    vh: common::TestVhost,
    shutdown: Shutdown,
    speedo: tokio::task::JoinHandle<Result<(), Error>>,
    servers: Vec<tokio::task::JoinHandle<Result<(), Error>>>,
    admin: SocketAddr,
    _setup: Client,
}

async fn start_serve(
    vh: &common::TestVhost,
    view: View,
    shutdown: &Shutdown,
) -> (SocketAddr, tokio::task::JoinHandle<Result<(), Error>>) {
    let args = serve::Args {
        auth: Some(pumpwatch::config::AuthMode::None),
        ..Default::default()
    };
    let mut cfg = serve::Config::from_args(args, &common::common(config(), &vh.amqp_url)).unwrap();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.view = view;
    cfg.push_every = Duration::from_millis(250);
    let server = serve::Server::bind(cfg).await.unwrap();
    let addr = server.local_addr();
    (addr, tokio::spawn(server.run(shutdown.clone())))
}

async fn pump(prefix: &str) -> Option<Pump> {
    let vh = common::vhost(prefix).await?;
    let cfg =
        speedo::Config::from_args(Default::default(), &common::common(config(), &vh.amqp_url))
            .unwrap();
    let setup = Client::connect(
        &common::broker(&vh.amqp_url),
        ConnectOptions {
            topology: speedo::topology(&cfg),
            ..ConnectOptions::new("test setup")
        },
    )
    .await
    .unwrap();
    let shutdown = Shutdown::new();
    let (admin, server) = start_serve(&vh, View::Admin, &shutdown).await;
    let speedo = tokio::spawn(speedo::run(cfg, shutdown.clone()));
    Some(Pump {
        vh,
        shutdown,
        speedo,
        servers: vec![server],
        admin,
        _setup: setup,
    })
}

impl Pump {
    async fn stop(self) {
        let t0 = Instant::now();
        self.shutdown.cancel();
        for s in self.servers {
            tokio::time::timeout(Duration::from_secs(5), s)
                .await
                .expect("serve stops within 5 s")
                .unwrap()
                .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(5), self.speedo)
            .await
            .expect("speedo stops within 5 s")
            .unwrap()
            .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
        drop(self.vh);
    }
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (status, ctype, r.text().await.unwrap())
}

async fn status(addr: SocketAddr) -> Value {
    serde_json::from_str(&get(addr, "/api/status").await.2).unwrap()
}

fn find<'a>(s: &'a Value, list: &str, name: &str) -> Option<&'a Value> {
    s[list].as_array()?.iter().find(|e| e["name"] == name)
}

fn totals(e: &Value) -> (u64, u64, u64, u64) {
    let n = |k: &str| e[k].as_u64().unwrap_or(u64::MAX);
    (
        n("good_total"),
        n("errors_total"),
        n("good_bytes_total"),
        n("bad_bytes_total"),
    )
}

async fn wait_status(
    addr: SocketAddr,
    list: &'static str,
    name: &'static str,
    want: (u64, u64, u64, u64),
) {
    common::wait_until(
        &format!("{list} {name} at {want:?} in /api/status"),
        T,
        || async move {
            let s = status(addr).await;
            let e = if list == "total" {
                Some(&s["total"])
            } else {
                find(&s, list, name)
            };
            e.map(totals) == Some(want)
        },
    )
    .await;
}

/// A strict reader of the Prometheus text format 0.0.4: every line must be a `# HELP`,
/// a `# TYPE` before its samples, or a sample `name{label="value",...} value`; no series
/// twice. Returns the samples (`name{labels}` exactly as written → value), or what is wrong.
fn parse_exposition(text: &str) -> Result<BTreeMap<String, f64>, String> {
    macro_rules! ensure {
        ($cond:expr, $($msg:tt)+) => {
            if !$cond {
                return Err(format!($($msg)+));
            }
        };
    }
    let name_re = regex::Regex::new(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$").unwrap();
    let sample_re = regex::Regex::new(
        r#"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*,?\})? (\S+)( -?\d+)?$"#,
    )
    .unwrap();
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    ensure!(
        text.ends_with('\n'),
        "the exposition must end with a newline"
    );
    for (n, line) in text.lines().enumerate() {
        let at = format!("line {}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), _) => ensure!(name_re.is_match(name), "bad name: {at}"),
                (Some("TYPE"), Some(name), Some(kind)) => {
                    ensure!(name_re.is_match(name), "bad name: {at}");
                    ensure!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "bad type: {at}"
                    );
                    ensure!(
                        typed.insert(name.to_owned(), kind.to_owned()).is_none(),
                        "TYPE twice: {at}"
                    );
                }
                _ => {}
            }
            continue;
        }
        ensure!(!line.starts_with('#'), "bad comment: {at}");
        let Some(c) = sample_re.captures(line) else {
            return Err(format!("not a sample: {at}"));
        };
        let name = &c[1];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s).filter(|b| {
                    typed
                        .get(*b)
                        .is_some_and(|k| k == "histogram" || k == "summary")
                })
            })
            .unwrap_or(name);
        ensure!(typed.contains_key(base), "sample before its TYPE: {at}");
        let v: f64 = match &c[3] {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().map_err(|_| format!("bad value: {at}"))?,
        };
        let series = format!("{}{}", name, c.get(2).map_or("", |m| m.as_str()));
        ensure!(samples.insert(series, v).is_none(), "series twice: {at}");
    }
    Ok(samples)
}

#[test]
fn the_exposition_checker_refuses_what_prometheus_would() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{l=\"v \\\"q\\\"\"} 3\n";
    assert_eq!(
        parse_exposition(ok).unwrap()["a_total{l=\"v \\\"q\\\"\"}"],
        3.0
    );
    for bad in [
        "a 1\n",                      // no TYPE
        "# TYPE a gauge\na{l=v} 1\n", // unquoted label value
        "# TYPE a gauge\na 1\na 2\n", // series twice
        "# TYPE a gauge\na one\n",    // bad value
        "# TYPE a gauge\n a 1\n",     // leading space
        "# TYPE a gauge\na 1",        // no final newline
        "# TYPE 1a gauge\n",          // bad name
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
    }
}

#[tokio::test]
async fn status_metrics_and_events_agree_with_the_speedos() {
    let Some(mut p) = pump("serve").await else {
        return;
    };
    let (radar_addr, radar_server) =
        start_serve(&p.vh, View::Source("radar".into()), &p.shutdown).await;
    p.servers.push(radar_server);
    publish(&p.vh.amqp_url, &traffic(0, 300, 100)).await;
    let want = (300, 100, 300_000, 1000);
    wait_status(p.admin, "clients", "cfs", want).await;
    wait_status(p.admin, "sources", "radar", want).await;
    wait_status(p.admin, "total", "all", want).await;
    wait_status(radar_addr, "total", "all", want).await;
    wait_status(radar_addr, "clients", "cfs", want).await;

    let s = status(p.admin).await;
    if std::env::var("SHOW_STATUS").is_ok() {
        eprintln!("{}", serde_json::to_string_pretty(&s).unwrap());
    }
    let cfs = find(&s, "clients", "cfs").unwrap();
    assert_eq!(cfs["state"], "OK", "{cfs}");
    assert!(cfs["last_good"].is_string());
    assert_eq!(find(&s, "sources", "sat").unwrap()["state"], "UNKNOWN");
    assert_eq!(s["pump"]["state"], "OK", "{}", s["pump"]);
    assert_eq!(s["pump"]["view"], "admin");
    // A source sees its own products only.
    let r = status(radar_addr).await;
    let names = |list: &str| -> Vec<String> {
        r[list]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names("clients"), ["cfs"]);
    assert_eq!(names("sources"), ["radar"]);
    assert_eq!(r["pump"]["view"], "source radar");

    // /metrics: valid exposition, and the same numbers.
    let (code, ctype, text) = get(p.admin, "/metrics").await;
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let m = parse_exposition(&text).unwrap_or_else(|e| panic!("{e} in\n{text}"));
    let cfs = find(&status(p.admin).await, "clients", "cfs")
        .unwrap()
        .clone();
    for (series, want) in [
        ("pumpwatch_client_good_files_total{client=\"cfs\"}", 300.0),
        ("pumpwatch_client_error_files_total{client=\"cfs\"}", 100.0),
        (
            "pumpwatch_client_good_bytes_total{client=\"cfs\"}",
            300_000.0,
        ),
        ("pumpwatch_client_error_bytes_total{client=\"cfs\"}", 1000.0),
        ("pumpwatch_source_good_files_total{source=\"radar\"}", 300.0),
        (
            "pumpwatch_source_error_files_total{source=\"radar\"}",
            100.0,
        ),
        ("pumpwatch_pump_good_files_total", 300.0),
        ("pumpwatch_pump_error_files_total", 100.0),
        ("pumpwatch_client_state{client=\"cfs\",state=\"ok\"}", 1.0),
        (
            "pumpwatch_client_state{client=\"cfs\",state=\"critical\"}",
            0.0,
        ),
        (
            "pumpwatch_source_state{source=\"sat\",state=\"unknown\"}",
            1.0,
        ),
        ("pumpwatch_pump_state{state=\"ok\"}", 1.0),
    ] {
        assert_eq!(m.get(series), Some(&want), "{series} in\n{text}");
    }
    assert_eq!(
        m["pumpwatch_client_good_files_total{client=\"cfs\"}"],
        cfs["good_total"].as_f64().unwrap()
    );
    let last_good = m["pumpwatch_client_last_good_timestamp_seconds{client=\"cfs\"}"];
    assert!((last_good - cfs["last_good_unix"].as_f64().unwrap()).abs() < 0.01);
    assert!(m["pumpwatch_serve_speedos_total{outcome=\"applied\"}"] > 0.0);
    let (code, _, _) = get(radar_addr, "/metrics").await;
    assert_eq!(code, 200);

    // /api/events: a full snapshot first.
    let mut r = reqwest::get(format!("http://{}/api/events", p.admin))
        .await
        .unwrap();
    assert_eq!(
        r.headers().get("content-type").unwrap().to_str().unwrap(),
        "text/event-stream"
    );
    let mut buf = String::new();
    let first = tokio::time::timeout(T, async {
        loop {
            let chunk = r.chunk().await.unwrap().expect("stream open");
            buf.push_str(&String::from_utf8_lossy(&chunk));
            if let Some(i) = buf.find("\n\n") {
                let ev = &buf[..i];
                if ev.contains("event: status") {
                    let data = ev.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                    return serde_json::from_str::<Value>(data).unwrap();
                }
                buf.drain(..i + 2);
            }
        }
    })
    .await
    .expect("a first event");
    assert_eq!(first["full"], true);
    assert!(
        first["entities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "cfs")
    );
    drop(r);

    // History for charts, and the small endpoints.
    let h: Value = serde_json::from_str(
        &get(p.admin, "/api/history?kind=client&name=cfs&name=nobody")
            .await
            .2,
    )
    .unwrap();
    let files: f64 = h["cfs"]["files_per_s"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!(files > 0.0);
    assert!(h.get("nobody").is_none());
    assert_eq!(get(p.admin, "/api/history?kind=nope").await.0, 400);
    assert_eq!(get(p.admin, "/healthz").await.0, 200);
    let (code, ctype, html) = get(p.admin, "/").await;
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/html"));
    assert!(html.contains("/assets/uPlot.iife.min.js"));
    let (code, _, js) = get(p.admin, "/assets/uPlot.iife.min.js").await;
    assert_eq!(code, 200);
    assert!(js.contains("uPlot"));
    assert_eq!(get(p.admin, "/assets/nope.js").await.0, 404);
    p.stop().await;
}

/// The browser test needs Debian's chromium and tests/browser/node_modules
/// (scripts/browser-deps installs both).
fn browser_ready() -> Result<(PathBuf, String), String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !std::path::Path::new(&chromium).exists() {
        return Err(format!("no chromium at {chromium}"));
    }
    if !root
        .join("tests/browser/node_modules/playwright-core/package.json")
        .exists()
    {
        return Err("tests/browser/node_modules/playwright-core is missing".into());
    }
    match std::process::Command::new("node").arg("--version").output() {
        Ok(o) if o.status.success() => Ok((root, chromium)),
        _ => Err("node is not installed".into()),
    }
}

/// 5 000 clients' speedos, as speedo would publish them.
fn load_speedos(n: usize) -> Vec<Outgoing> {
    let now = Stamp(jiff::Timestamp::now());
    (0..n)
        .map(|i| {
            let r = Reading {
                end: now,
                good: 10 + i as u64,
                errors: (i % 7) as u64,
                good_bytes: 10_000,
                bad_bytes: 0,
                interval_bytes: 10_000,
                interval_files: 10,
                interval_s: 60.0,
            };
            speedo::encode(&Subject::Client(format!("load{i:04}")), None, &r)
        })
        .collect()
}

#[tokio::test]
async fn the_page_in_headless_chromium() {
    let (root, chromium) = match browser_ready() {
        Ok(x) => x,
        Err(why) => {
            if std::env::var("PUMPWATCH_REQUIRE_BROKER").as_deref() == Ok("1") {
                panic!("{why}: run scripts/browser-deps");
            }
            eprintln!("SKIP: {why} (scripts/browser-deps installs it)");
            return;
        }
    };
    let Some(p) = pump("serve-page").await else {
        return;
    };
    publish(&p.vh.amqp_url, &traffic(0, 20, 10)).await;
    wait_status(p.admin, "total", "all", (20, 10, 20_000, 100)).await;

    let artifacts = root.join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let (shot, shot_big) = (
        artifacts.join("serve.png"),
        artifacts.join("serve-5000.png"),
    );
    let mut child = tokio::process::Command::new("node")
        .arg(root.join("tests/browser/page.mjs"))
        .arg(format!("http://{}/", p.admin))
        .arg(&shot)
        .arg(&shot_big)
        .env("CHROMIUM", &chromium)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let stderr = child.stderr.take().unwrap();
    let err_lines = tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut out = Vec::new();
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            out.push(l);
        }
        out
    });
    let mut lines = {
        use tokio::io::AsyncBufReadExt;
        tokio::io::BufReader::new(child.stdout.take().unwrap()).lines()
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut big = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match tokio::time::timeout(left, lines.next_line()).await {
            Ok(Ok(Some(l))) => l,
            Ok(_) => break,
            Err(_) => panic!("page.mjs said nothing in time"),
        };
        eprintln!("page.mjs: {line}");
        if line.starts_with("READY ") {
            publish(&p.vh.amqp_url, &traffic(100, 15, 0)).await;
        } else if line.starts_with("CHANGED ") {
            publish(&p.vh.amqp_url, &load_speedos(5000)).await;
        } else if let Some(rest) = line.strip_prefix("BIG ") {
            big = Some(rest.to_owned());
        } else if line == "DONE" {
            break;
        }
    }
    let status = tokio::time::timeout(T, child.wait())
        .await
        .unwrap()
        .unwrap();
    let errors = err_lines.await.unwrap();
    assert!(status.success(), "page.mjs failed:\n{}", errors.join("\n"));
    let big = big.expect("a BIG line");
    let field = |k: &str| -> f64 {
        big.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {big}"))
    };
    // Virtual list: only the rows on screen exist, whatever the number of clients.
    assert!(field("rows=") < 100.0, "{big}");
    // One update of 5 000 clients, and one frame, stay well under a quarter second.
    assert!(field("maxApplyMs=") < 250.0, "{big}");
    assert!(field("maxRenderMs=") < 250.0, "{big}");
    assert!(shot.exists() && shot_big.exists());
    p.stop().await;
}

/// `serve` started before `setup`: it binds and answers `/healthz` with 503 (and
/// `/api/status`) while `xreport` does not exist, then picks the exchange up once it is
/// declared, without a restart; a stop while waiting is a clean exit.
#[tokio::test]
async fn serve_waits_for_xreport() {
    let Some(vh) = common::vhost("serve-wait").await else {
        return;
    };
    let shutdown = Shutdown::new();
    let (addr, server) = start_serve(&vh, View::Admin, &shutdown).await;
    let (code, _, body) = get(addr, "/healthz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("waiting"), "{body}");
    assert_eq!(get(addr, "/api/status").await.0, 200);
    assert!(!server.is_finished(), "serve waits instead of exiting");

    vh.mgmt
        .declare_exchange(&vh.name, "xreport", "topic", true)
        .await
        .unwrap();
    common::wait_until(
        "/healthz answers 200 once xreport exists",
        T,
        || async move { get(addr, "/healthz").await.0 == 200 },
    )
    .await;
    // And it reads the speedos published there.
    let reading = Reading {
        end: Stamp::from_unix(1_700_000_000, 0).unwrap(),
        good: 7,
        errors: 0,
        good_bytes: 70,
        bad_bytes: 0,
        interval_bytes: 70,
        interval_files: 7,
        interval_s: 1.0,
    };
    publish(
        &vh.amqp_url,
        &[speedo::encode(
            &Subject::Client("cfs".into()),
            None,
            &reading,
        )],
    )
    .await;
    common::wait_until("the speedo on /api/status", T, || async move {
        find(&status(addr).await, "clients", "cfs").is_some_and(|c| totals(c).0 == 7)
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve stops within 5 s")
        .unwrap()
        .unwrap();

    // Stopped while still waiting: exit 0 within the deadline.
    let Some(vh) = common::vhost("serve-wait-stop").await else {
        return;
    };
    let shutdown = Shutdown::new();
    let (addr, server) = start_serve(&vh, View::Admin, &shutdown).await;
    assert_eq!(get(addr, "/healthz").await.0, 503);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve stops within 5 s while waiting")
        .unwrap()
        .unwrap();
}
