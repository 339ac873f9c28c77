//! Health end to end against the real broker: `route`, `speedo` and `serve` run
//! in-process on a fresh vhost, reports are posted to each client's `xs_<client>` as a
//! consumer would, and the real `pumpwatch check` binary reads serve's verdicts.
//!
//! One pump, several clients living different lives at once (speedo interval 0.5 s,
//! td 3 s, window 3 s), so the whole file stays well under a minute and a half:
//! - cfs stops: CRITICAL `stopped`, never before td;
//! - edu stops receiving radar's products but still receives sat's: CRITICAL for the pair;
//! - slowpoke slows down: WARNING `slow`;
//! - tardy's reports come 10 minutes after their pubTime: WARNING `late`, then recovered;
//! - flaky fails most transfers: WARNING `errors`, until SIGHUP raises its limit;
//! - steady has a learned baseline (seeded in serve's state database) and drops to half:
//!   WARNING `unusual`; after a restart of serve the baseline is still there, and what
//!   serve learned of the others was written.
//!
//! The traffic is paced by a feeder task (sleeps pace the traffic; every check waits on a
//! condition with `common::wait_until`).

mod common;

use pumpwatch::broker::amqp::{Client, ConnectOptions};
use pumpwatch::cmd::serve::state::{Owner, Store};
use pumpwatch::cmd::serve::{self, View};
use pumpwatch::cmd::{Error, route, speedo};
use pumpwatch::config::Config;
use pumpwatch::core::baseline::Row;
use pumpwatch::core::emit::{Outgoing, emit};
use pumpwatch::core::report::{Format, Report};
use pumpwatch::core::{Headers, Stamp};
use pumpwatch::shutdown::Shutdown;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);
const TD: f64 = 3.0;
const INTERVAL: f64 = 0.5;

fn toml(flaky_ratio: f64) -> String {
    format!(
        "[users.radar]\nrole = \"source\"\n[users.sat]\nrole = \"source\"\n\
         [users.cfs]\nrole = \"subscriber\"\n[users.edu]\nrole = \"subscriber\"\n\
         [users.slowpoke]\nrole = \"subscriber\"\n[users.tardy]\nrole = \"subscriber\"\n\
         [users.flaky]\nrole = \"subscriber\"\n[users.steady]\nrole = \"subscriber\"\n\
         [speedo]\ninterval = {INTERVAL}\nall_interval = {INTERVAL}\n\
         [thresholds.default]\ntd = {TD}\nwindow = 3\ntminr = 0.5\n\
         [thresholds.slowpoke]\ntd = 60\n\
         [thresholds.tardy]\nmax_lag = \"5m\"\n\
         [thresholds.flaky]\nmax_error_ratio = {flaky_ratio}\n"
    )
}

/// What one client receives from one source: files per second, the failed share, and
/// how long before the report its products were published.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stream {
    rate: f64,
    failed: f64,
    pub_lag_s: i64,
}

const fn s(rate: f64) -> Stream {
    Stream {
        rate,
        failed: 0.0,
        pub_lag_s: 1,
    }
}

type Streams = Arc<Mutex<BTreeMap<(&'static str, &'static str), Stream>>>;
/// When each client's last report was posted.
type LastSent = Arc<Mutex<BTreeMap<&'static str, Instant>>>;

fn report(client: &str, source: &str, i: u64, code: u16, pub_lag_s: i64) -> Outgoing {
    let now = jiff::Timestamp::now().as_second();
    let r = Report {
        format: Format::V02,
        topic: String::new(),
        exchange: String::new(),
        pub_time: Stamp::from_unix(now - pub_lag_s, 0),
        base_url: "sftp://data.example".into(),
        rel_path: format!("20240101/{source}/h5/{client}_{i:08}.h5"),
        code,
        message: Some("Downloaded".into()),
        host: Some("node1".into()),
        user: Some(client.into()),
        duration_s: Some(0.1),
        source: Some(source.into()),
        from_cluster: None,
        to_clusters: vec![],
        flow: None,
        size_bytes: Some(1000),
        identity: None,
        time_completed: None,
        stamped_client: None,
        stamped_source: None,
        extra: Headers::new(),
    };
    emit(&r, Format::V02)
}

/// Posts every stream's reports to `xs_<client>` every 100 ms until `stop`.
async fn feed(url: String, streams: Streams, last_sent: LastSent, stop: Shutdown) {
    let client = Client::connect(&common::broker(&url), ConnectOptions::new("test feeder"))
        .await
        .unwrap();
    // Per stream: files owed, and files sent (which decides each one's code).
    let mut owed: BTreeMap<(&str, &str), (f64, u64)> = BTreeMap::new();
    let mut n = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now: Vec<_> = streams
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        let mut pending = Vec::new();
        for ((c, src), st) in now {
            let (due, sent) = owed.entry((c, src)).or_default();
            *due += st.rate * 0.1;
            while *due >= 1.0 {
                *due -= 1.0;
                n += 1;
                *sent += 1;
                let code = if ((*sent * 37) % 100) as f64 / 100.0 < st.failed {
                    499
                } else {
                    201
                };
                let msg = report(c, src, n, code, st.pub_lag_s);
                last_sent.lock().unwrap().insert(c, Instant::now());
                pending.push(client.publish(&format!("xs_{c}"), &msg).await.unwrap());
            }
        }
        for p in pending {
            p.wait().await.unwrap();
        }
    }
    client.close().await;
}

async fn start_serve(
    vh: &common::TestVhost,
    config: Config,
    state: &Path,
    shutdown: &Shutdown,
) -> (SocketAddr, tokio::task::JoinHandle<Result<(), Error>>) {
    let args = serve::Args {
        state_dir: Some(state.to_owned()),
        auth: Some(pumpwatch::config::AuthMode::None),
        ..Default::default()
    };
    let mut cfg = serve::Config::from_args(args, &common::common(config, &vh.amqp_url)).unwrap();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.view = View::Admin;
    cfg.push_every = Duration::from_millis(100);
    cfg.state_every = Duration::from_millis(500);
    let server = serve::Server::bind(cfg).await.unwrap();
    let addr = server.local_addr();
    (addr, tokio::spawn(server.run(shutdown.clone())))
}

async fn api(addr: SocketAddr, path: &str) -> Value {
    let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    serde_json::from_str(&r.text().await.unwrap()).unwrap()
}

/// The state of a client (`kind` client) or of a pair (`source` given).
async fn state_of(addr: SocketAddr, client: &str, source: Option<&str>) -> String {
    let s = api(addr, &format!("/api/status?client={client}")).await;
    let list = if source.is_some() { "pairs" } else { "clients" };
    s[list]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == client && source.is_none_or(|src| e["source"] == src))
        .map(|e| e["state"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

async fn wait_state(
    addr: SocketAddr,
    client: &'static str,
    source: Option<&'static str>,
    want: &str,
) {
    let what = format!("{client} {source:?} {want}");
    common::wait_until(&what, T, || async move {
        state_of(addr, client, source).await == want
    })
    .await;
}

/// Runs the real `pumpwatch check`; prints its output so the run shows real lines.
async fn check(args: &[&str]) -> (i32, Vec<String>) {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    let (code, out, err) = common::proc::run(&all, Duration::from_secs(20)).await;
    eprintln!("$ pumpwatch {}  (exit {code})", all.join(" "));
    for l in &out {
        eprintln!("{l}");
    }
    assert!(err.is_empty(), "check wrote to stderr: {err}");
    assert!(!out.is_empty());
    (code, out)
}

/// A learned baseline for `steady`: three weeks of 10 files/s (σ 0.5) in every hour.
fn seed(dir: &Path) {
    let mut store = Store::open_writer(dir).unwrap();
    let now_week = (jiff::Timestamp::now().as_second() + 3 * 86_400) / (7 * 86_400);
    let rows: Vec<(Owner, Row)> = (0..168u8)
        .map(|h| {
            (
                Owner::Client,
                Row {
                    name: "steady".into(),
                    hour_of_week: h,
                    n: 180,
                    weeks: 3,
                    last_week: (now_week - 1) as u32,
                    mean: 10.0,
                    m2: 0.25 * 179.0,
                },
            )
        })
        .collect();
    store.write(&rows).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_end_to_end() {
    let Some(vh) = common::vhost("health").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pumpwatch.toml");
    std::fs::write(&file, toml(0.5)).unwrap();
    let config = Config::from_file(&file).unwrap();
    let state = dir.path().join("state");
    seed(&state);

    // route and speedo for the whole test; serve on its own token (it restarts).
    let pump = Shutdown::new();
    let c = common::common(config.clone(), &vh.amqp_url);
    let route = tokio::spawn(route::run(
        route::Config::from_args(Default::default(), &c).unwrap(),
        pump.clone(),
    ));
    // speedo's topology declares xreport and every xr_<source>; route declares the rest.
    let speedo_cfg = speedo::Config::from_args(Default::default(), &c).unwrap();
    let setup = Client::connect(
        &common::broker(&vh.amqp_url),
        ConnectOptions {
            topology: speedo::topology(&speedo_cfg),
            ..ConnectOptions::new("test setup")
        },
    )
    .await
    .unwrap();
    let speedo = tokio::spawn(speedo::run(speedo_cfg, pump.clone()));
    let serve_stop = Shutdown::new();
    let (addr, server) = start_serve(&vh, config.clone(), &state, &serve_stop).await;
    let url = format!("http://{addr}");

    let streams: Streams = Arc::new(Mutex::new(BTreeMap::from([
        (("cfs", "radar"), s(4.0)),
        (("cfs", "sat"), s(4.0)),
        (("edu", "radar"), s(4.0)),
        (("edu", "sat"), s(4.0)),
        (("slowpoke", "radar"), s(4.0)),
        (
            ("tardy", "radar"),
            Stream {
                pub_lag_s: 600,
                ..s(4.0)
            },
        ),
        (
            ("flaky", "radar"),
            Stream {
                failed: 0.7,
                ..s(12.0)
            },
        ),
        (("steady", "radar"), s(10.0)),
    ])));
    let last_sent = LastSent::default();
    let feeder = tokio::spawn(feed(
        vh.amqp_url.clone(),
        streams.clone(),
        last_sent.clone(),
        pump.clone(),
    ));

    // Everyone flowing: cfs OK (a real OK line), tardy late, flaky errors.
    for c in ["cfs", "edu", "slowpoke", "steady"] {
        wait_state(addr, c, None, "OK").await;
    }
    wait_state(addr, "edu", Some("radar"), "OK").await;
    let (code, out) = check(&["--url", &url, "--client", "cfs", "-w", "1:", "-c", "0.5:"]).await;
    assert_eq!(code, 0);
    assert!(
        out[0].starts_with("PUMPWATCH OK - client cfs OK: "),
        "{out:?}"
    );
    assert!(out[0].contains("'cfs_files_per_s'="), "{out:?}");
    wait_state(addr, "tardy", None, "WARNING").await;
    let (code, out) = check(&["--url", &url, "--client", "tardy"]).await;
    assert_eq!(code, 1);
    assert!(out[0].contains("tardy late (p95 lag 60"), "{out:?}");
    wait_state(addr, "flaky", None, "WARNING").await;
    let (code, out) = check(&["--url", &url, "--client", "flaky"]).await;
    assert_eq!(code, 1);
    assert!(out[0].contains("flaky errors ("), "{out:?}");
    let steady = api(addr, "/api/status?client=steady").await;
    assert_eq!(steady["clients"][0]["expected"], "usual", "{steady}");

    // The changes, all at once.
    {
        let mut st = streams.lock().unwrap();
        st.remove(&("cfs", "radar"));
        st.remove(&("cfs", "sat"));
        st.remove(&("edu", "radar"));
        st.insert(("slowpoke", "radar"), s(0.2));
        st.insert(("steady", "radar"), s(5.0));
        st.insert(("tardy", "radar"), s(4.0));
    }

    // cfs: CRITICAL by time alone, not before td, within td + one interval (+ slack for
    // this shared machine).
    wait_state(addr, "cfs", None, "CRITICAL").await;
    let took = last_sent.lock().unwrap()["cfs"].elapsed().as_secs_f64();
    let status = api(addr, "/api/status?client=cfs").await;
    let since = status["clients"][0]["since_last_good_s"].as_f64().unwrap();
    assert!(since > TD, "CRITICAL only after td: {status}");
    assert!(took >= TD, "not before td after the last report: {took} s");
    assert!(
        took < TD + INTERVAL + 5.0,
        "within td + one interval: {took} s"
    );
    let (code, out) = check(&["--url", &url, "--client", "cfs"]).await;
    assert_eq!(code, 2);
    assert!(out[0].contains("cfs stopped (no delivery for"), "{out:?}");

    // edu: the radar pair stopped, the client itself still receives sat's products.
    wait_state(addr, "edu", Some("radar"), "CRITICAL").await;
    assert_eq!(state_of(addr, "edu", None).await, "OK");
    let (code, out) = check(&["--url", &url, "--client", "edu"]).await;
    assert_eq!(code, 2);
    assert!(
        out[0].contains("edu stopped on radar (no delivery for"),
        "{out:?}"
    );

    wait_state(addr, "slowpoke", None, "WARNING").await;
    let (code, out) = check(&["--url", &url, "--client", "slowpoke"]).await;
    assert_eq!(code, 1);
    assert!(out[0].contains("slowpoke slow ("), "{out:?}");

    wait_state(addr, "steady", None, "WARNING").await;
    let (code, out) = check(&["--url", &url, "--client", "steady"]).await;
    assert_eq!(code, 1);
    assert!(out[0].contains("steady unusual ("), "{out:?}");

    wait_state(addr, "tardy", None, "OK").await;

    // The pump as a whole, worst first, and -v.
    let (code, out) = check(&["--url", &url, "-v"]).await;
    assert_eq!(code, 2);
    assert!(
        out[0].starts_with("PUMPWATCH CRITICAL - ") && out[0].contains(" clients, "),
        "{out:?}"
    );
    assert!(out.len() >= 5, "one line per offender: {out:?}");
    assert!(out[1].starts_with("CRITICAL "), "{out:?}");

    // SIGHUP applies the file's new thresholds (a broken file: `serve`'s unit tests).
    std::fs::write(&file, toml(0.95)).unwrap();
    hangup();
    wait_state(addr, "flaky", None, "OK").await;

    // Restart serve on the same state: what it learned was written, and steady's
    // baseline is still there (unusual again without relearning).
    serve_stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve stops within 5 s")
        .unwrap()
        .unwrap();
    let (code, out) = check(&["--url", &url, "-t", "2"]).await;
    assert_eq!(code, 3, "serve gone: {out:?}");
    assert!(
        out[0].starts_with("PUMPWATCH UNKNOWN - serve at "),
        "{out:?}"
    );
    {
        let r = Store::open_reader(&state).unwrap();
        let (rows, bad) = r.rows(Some("cfs")).unwrap();
        assert_eq!(bad, 0);
        assert!(!rows.is_empty(), "serve wrote what it learned of cfs");
    }
    let (code, out, _) = common::proc::run(
        &[
            "baseline",
            "show",
            "steady",
            "--state-dir",
            state.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(out.len(), 169, "a header and 168 hours: {out:?}");
    eprintln!("{}\n{}", out[0], out[1]);
    let serve_stop = Shutdown::new();
    let (addr, server) = start_serve(&vh, config.clone(), &state, &serve_stop).await;
    // A fresh baseline would say "learning" (fewer than 3 weeks): this one was loaded.
    // (The stop merged this hour's half-rate samples in, so it may now be usual.)
    let what = "steady judged against its stored baseline after the restart";
    common::wait_until(what, T, || async move {
        let s = api(addr, "/api/status?client=steady").await;
        matches!(
            s["clients"][0]["expected"].as_str(),
            Some("usual" | "unusual")
        )
    })
    .await;

    serve_stop.cancel();
    pump.cancel();
    for (what, h) in [("serve", server), ("route", route), ("speedo", speedo)] {
        tokio::time::timeout(Duration::from_secs(6), h)
            .await
            .unwrap_or_else(|_| panic!("{what} stops"))
            .unwrap()
            .unwrap();
    }
    feeder.await.unwrap();
    drop(setup);
}

/// SIGHUP to this test process: serve (in-process) installed its handler when it started.
fn hangup() {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test]
async fn check_against_nothing_or_with_bad_arguments_is_unknown() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let (code, out) = check(&["--url", &url]).await;
    assert_eq!(code, 3);
    assert!(
        out[0].starts_with("PUMPWATCH UNKNOWN - serve at "),
        "{out:?}"
    );
    for (args, want) in [
        (vec!["-w", "10:5"], "bad -w: start 10 is greater than end 5"),
        (vec!["-c", "~"], "bad -c:"),
        (vec!["-t", "soon"], "bad -t"),
        (vec!["--url", "ftp://x"], "bad --url"),
        (vec!["--bogus"], "unexpected argument"),
        (
            vec!["--client", "a", "--source", "b"],
            "cannot be used with",
        ),
    ] {
        let (code, out) = check(&args).await;
        assert_eq!(code, 3, "{args:?}: {out:?}");
        assert!(
            out[0].starts_with("PUMPWATCH UNKNOWN - ") && out[0].contains(want),
            "{args:?}: {out:?}"
        );
    }
}
