//! One `serve` for the whole pump, with logins (issue 15, SPEC §4.6), against the real
//! broker with users made by `setup`: sources alice and bob, subscribers cfs and dora, an
//! admin boss. cfs receives alice's and bob's products, dora bob's only; `speedo` runs
//! in-process, and `serve` (admin view, `--auth broker`) is asked as each of them.
//!
//! - alice sees alice's products only (API, events, history, check), bob likewise, cfs
//!   its own row only, the admins (boss; guest by its `administrator` tag) everything;
//! - a wrong password or an unknown user is 401, with the same body; `/metrics` needs an
//!   admin or the token (401 without a login, 403 for a source or a subscriber);
//! - hostile `Authorization` headers (12 KB, 64 KB, not base64, not UTF-8, NUL, 1000 of
//!   them) are answered 400/401/431, and serve goes on;
//! - `--auth none` with users declared and a non-loopback listen is refused (exit 2);
//! - 30 wrong tries from one address: 10 answered 401, the rest 429 with `Retry-After`,
//!   and a right password from another address still works; the log tells a wrong
//!   password, an unknown user and a broker that cannot be asked apart, and never shows
//!   a password;
//! - `pumpwatch check` logs in (the broker URL's account when asked, `--user`,
//!   `--token-env`);
//! - HTTPS with `--tls-cert/--tls-key`, and `check` over it (trusting `--ca-file`, UNKNOWN
//!   without);
//! - behind a trusted reverse proxy failed logins count per forwarded client; a peer that
//!   is no trusted proxy counts as itself whatever its `X-Forwarded-For` says;
//! - SIGHUP reads the roles again and forgets the remembered logins;
//! - the page, logged in as alice in headless Chromium, shows no other source's name (nor
//!   dora, who takes only bob's products); logged in as cfs, no source's name at all.

mod common;

use common::TestVhost;
use pumpwatch::broker::amqp::{Client, ConnectOptions};
use pumpwatch::cmd::serve::{self, View};
use pumpwatch::cmd::{Common, Error, check, setup, speedo};
use pumpwatch::config::Config;
use pumpwatch::core::emit::{Outgoing, emit};
use pumpwatch::core::report::{Format, H_CLIENT, H_SOURCE, Report};
use pumpwatch::core::{Headers, Stamp};
use pumpwatch::shutdown::Shutdown;
use serde_json::Value;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);
const TOKEN: &str = "metrics-token-0123456789abcdef";
/// The address of a trusted reverse proxy (`serve.trusted_proxies`).
const PROXY: &str = "127.0.0.9";

use common::DropUsers;

/// The pump of these tests, declared by `setup`; `speedo` and `serve` in-process.
struct Pump {
    vh: TestVhost,
    config: Config,
    env: HashMap<String, String>,
    config_path: PathBuf,
    shutdown: Shutdown,
    tasks: Vec<tokio::task::JoinHandle<Result<(), Error>>>,
    /// serve, `--auth broker`.
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    _users: DropUsers,
}

const USERS: [(&str, &str); 5] = [
    ("alice", "source"),
    ("bob", "source"),
    ("cfs", "subscriber"),
    ("dora", "subscriber"),
    ("boss", "admin"),
];

impl Pump {
    async fn start(prefix: &str, tls: bool) -> Option<Pump> {
        let vh = common::vhost(prefix).await?;
        let mut toml = String::new();
        let mut env = HashMap::new();
        let mut names = Vec::new();
        for (short, role) in USERS {
            let full = format!("{}{short}", vh.user_prefix);
            let var = format!("PW_{}", short.to_uppercase());
            toml.push_str(&format!(
                "[users.\"{full}\"]\nrole = \"{role}\"\npassword_env = \"{var}\"\n"
            ));
            env.insert(
                var,
                format!("p/@:%#{short}-Zx{:08x}", rand::random::<u32>()),
            );
            names.push(full);
        }
        toml.push_str("[speedo]\ninterval = 0.5\nall_interval = 0.5\n");
        // A reverse proxy at 127.0.0.9 (the other tests never connect from there).
        toml.push_str(&format!("[serve]\ntrusted_proxies = [\"{PROXY}\"]\n"));
        let config = Config::parse(&toml, "auth.toml").unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("pump.toml");
        std::fs::write(&config_path, &toml).unwrap();
        let users = DropUsers(names);
        // setup: users with passwords, permissions, xreport, xr_alice, xr_bob.
        let lookup = {
            let env = env.clone();
            Arc::new(move |var: &str| env.get(var).cloned())
        };
        let c = Common::new(config.clone(), Some(&vh.amqp_url), Some(&vh.admin_url)).unwrap();
        let mut out = Vec::new();
        let cfg = setup::Config::with_env(setup::Args::default(), &c, lookup).unwrap();
        setup::apply(&cfg, &mut out)
            .await
            .unwrap_or_else(|e| panic!("setup: {e}\n{}", String::from_utf8_lossy(&out)));

        let shutdown = Shutdown::new();
        let common = common::common(config.clone(), &vh.amqp_url);
        let speedo_cfg = speedo::Config::from_args(Default::default(), &common).unwrap();
        // speedo's queue exists before the first report is published.
        Client::connect(
            &common::broker(&vh.amqp_url),
            ConnectOptions {
                topology: speedo::topology(&speedo_cfg),
                ..ConnectOptions::new("test setup")
            },
        )
        .await
        .unwrap()
        .close()
        .await;
        let mut serve_cfg = serve::Config::from_args(Default::default(), &common).unwrap();
        serve_cfg.listen = "127.0.0.1:0".parse().unwrap();
        serve_cfg.push_every = Duration::from_millis(200);
        serve_cfg.gate.metrics_token = Some(TOKEN.into());
        if tls {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls");
            serve_cfg.tls = Some(
                pumpwatch::http::Tls::load(&dir.join("cert.pem"), &dir.join("key.pem")).unwrap(),
            );
        }
        assert_eq!(serve_cfg.view, View::Admin);
        let server = serve::Server::bind(serve_cfg).await.unwrap();
        let addr = server.local_addr();
        let tasks = vec![
            tokio::spawn(server.run(shutdown.clone())),
            tokio::spawn(speedo::run(speedo_cfg, shutdown.clone())),
        ];
        Some(Pump {
            vh,
            config,
            env,
            config_path,
            shutdown,
            tasks,
            addr,
            _dir: dir,
            _users: users,
        })
    }

    fn user(&self, short: &str) -> String {
        format!("{}{short}", self.vh.user_prefix)
    }

    fn password(&self, short: &str) -> String {
        self.env[&format!("PW_{}", short.to_uppercase())].clone()
    }

    fn login(&self, short: &str) -> Option<(String, String)> {
        Some((self.user(short), self.password(short)))
    }

    /// Publishes reports of `client` on `source`'s products: `good` 201s, `bad` 499s.
    async fn traffic(&self, source: &str, client: &str, good: usize, bad: usize) {
        let (source, client) = (self.user(source), self.user(client));
        let msgs: Vec<Outgoing> = (0..good + bad)
            .map(|i| report(&source, &client, i, if i < good { 201 } else { 499 }))
            .collect();
        let c = Client::connect(
            &common::broker(&self.vh.amqp_url),
            ConnectOptions::new("test"),
        )
        .await
        .unwrap();
        let mut pending = Vec::new();
        for m in &msgs {
            pending.push(c.publish("xreport", m).await.unwrap());
        }
        for p in pending {
            p.wait().await.unwrap();
        }
        c.close().await;
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("stops within 5 s")
                .unwrap()
                .unwrap();
        }
    }
}

/// A report of `client` on `source`'s product `i`, stamped as route would.
fn report(source: &str, client: &str, i: usize, code: u16) -> Outgoing {
    let mut r = Report {
        format: Format::V02,
        topic: String::new(),
        exchange: String::new(),
        pub_time: Stamp::from_unix(1_700_000_000 + i as i64, 0),
        base_url: "sftp://data.example".into(),
        rel_path: format!("20240101/{source}/product_{i:06}.h5"),
        code,
        message: None,
        host: Some("node1".into()),
        user: Some(client.into()),
        duration_s: Some(0.5),
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
    r.extra.set(H_CLIENT, client);
    r.extra.set(H_SOURCE, source);
    emit(&r, Format::V02)
}

/// An HTTP client whose connections come from `from` (127.0.0.x: all of them loopback).
fn http(from: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(from)
        .timeout(T)
        .build()
        .unwrap()
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

async fn get(
    c: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
    login: Option<(String, String)>,
) -> Answer {
    let mut req = c.get(format!("http://{addr}{path}"));
    if let Some((u, p)) = login {
        req = req.basic_auth(u, Some(p));
    }
    let r = req.send().await.unwrap();
    Answer {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.text().await.unwrap(),
    }
}

fn names(s: &Value, list: &str) -> Vec<String> {
    let mut v: Vec<String> = s[list]
        .as_array()
        .unwrap_or_else(|| panic!("{list} in {s}"))
        .iter()
        .map(|e| e["label"].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

/// The first `status` event of `/api/events`.
async fn first_event(
    c: &reqwest::Client,
    addr: SocketAddr,
    login: Option<(String, String)>,
) -> String {
    let mut req = c.get(format!("http://{addr}/api/events"));
    if let Some((u, p)) = login {
        req = req.basic_auth(u, Some(p));
    }
    let mut r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut buf = String::new();
    tokio::time::timeout(T, async {
        loop {
            let chunk = r.chunk().await.unwrap().expect("stream open");
            buf.push_str(&String::from_utf8_lossy(&chunk));
            if let Some(i) = buf.find("\n\n") {
                let ev = buf[..i].to_owned();
                if ev.contains("event: status") {
                    return ev;
                }
                buf.drain(..i + 2);
            }
        }
    })
    .await
    .expect("a first event")
}

#[tokio::test]
async fn each_account_sees_only_its_own() {
    let Some(p) = Pump::start("auth-views", false).await else {
        return;
    };
    p.traffic("alice", "cfs", 30, 0).await;
    p.traffic("bob", "cfs", 10, 10).await;
    p.traffic("bob", "dora", 15, 0).await;
    let c = http("127.0.0.1".parse().unwrap());
    let (alice, bob, cfs, dora) = (
        p.user("alice"),
        p.user("bob"),
        p.user("cfs"),
        p.user("dora"),
    );
    // The admin's view is complete once the three pairs are counted.
    let boss = p.login("boss");
    common::wait_until("every pair counted", T, || {
        let (c, boss) = (c.clone(), boss.clone());
        let want = [
            format!("{cfs} on {alice}"),
            format!("{cfs} on {bob}"),
            format!("{dora} on {bob}"),
        ];
        async move {
            let a = get(&c, p.addr, "/api/status", boss).await;
            let s: Value = serde_json::from_str(&a.body).unwrap();
            let done = s["pairs"].as_array().is_some_and(|v| {
                v.iter()
                    .filter(|e| e["good_total"].as_u64() > Some(0))
                    .count()
                    == 3
            }) && s["sources"]
                .as_array()
                .is_some_and(|v| v.iter().all(|e| e["good_total"].as_u64() > Some(0)));
            done && names(&s, "pairs") == want
        }
    })
    .await;
    let status = |who: &'static str| {
        let (c, login) = (c.clone(), p.login(who));
        async move {
            let a = get(&c, p.addr, "/api/status", login).await;
            assert_eq!(a.status, 200, "{who}: {}", a.body);
            (serde_json::from_str::<Value>(&a.body).unwrap(), a.body)
        }
    };

    // The admin sees everything; so does guest, by the broker's administrator tag.
    let (s, _) = status("boss").await;
    assert_eq!(
        names(&s, "sources"),
        [format!("source {alice}"), format!("source {bob}")]
    );
    assert_eq!(names(&s, "clients"), [cfs.clone(), dora.clone()]);
    assert_eq!(s["total"]["good_total"], 55);
    let g = get(
        &c,
        p.addr,
        "/api/status",
        Some(("guest".into(), "guest".into())),
    )
    .await;
    assert_eq!(g.status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&g.body).unwrap()["pump"]["view"],
        "admin"
    );

    // alice: her row, her products' one client, her totals; nothing of bob or dora.
    let (s, text) = status("alice").await;
    assert_eq!(names(&s, "sources"), [format!("source {alice}")]);
    assert_eq!(names(&s, "clients"), std::slice::from_ref(&cfs));
    assert!(names(&s, "pairs").is_empty());
    assert_eq!(s["clients"][0]["good_total"], 30, "her pair, not cfs's row");
    assert_eq!(s["total"]["good_total"], 30);
    assert_eq!(s["pump"]["view"], format!("source {alice}"));
    assert!(!text.contains(&bob) && !text.contains(&dora), "{text}");
    let ev = first_event(&c, p.addr, p.login("alice")).await;
    assert!(
        ev.contains(&cfs) && !ev.contains(&bob) && !ev.contains(&dora),
        "{ev}"
    );

    // bob: his row, cfs and dora; nothing of alice.
    let (s, text) = status("bob").await;
    assert_eq!(names(&s, "sources"), [format!("source {bob}")]);
    assert_eq!(names(&s, "clients"), [cfs.clone(), dora.clone()]);
    assert_eq!(s["total"]["good_total"], 25);
    assert_eq!(s["total"]["errors_total"], 10);
    assert!(!text.contains(&alice), "{text}");
    let ev = first_event(&c, p.addr, p.login("bob")).await;
    assert!(ev.contains(&dora) && !ev.contains(&alice), "{ev}");

    // cfs: its own row (its deliveries across all sources) and nothing else.
    let (s, text) = status("cfs").await;
    assert_eq!(names(&s, "clients"), std::slice::from_ref(&cfs));
    assert!(names(&s, "sources").is_empty() && names(&s, "pairs").is_empty());
    assert_eq!(s["total"]["good_total"], 40);
    for other in [&alice, &bob, &dora] {
        assert!(!text.contains(other.as_str()), "{other} in {text}");
    }
    let ev = first_event(&c, p.addr, p.login("cfs")).await;
    assert!(
        !ev.contains(&alice) && !ev.contains(&bob) && !ev.contains(&dora),
        "{ev}"
    );

    // cfs asking for a source by name: nothing, not even that it exists.
    let h = get(
        &c,
        p.addr,
        &format!("/api/history?kind=source&name={alice}&name={bob}"),
        p.login("cfs"),
    )
    .await;
    assert_eq!((h.status, h.body.as_str()), (200, "{}"));
    for q in [format!("client={dora}"), format!("source={bob}")] {
        let chk = get(&c, p.addr, &format!("/api/check?{q}"), p.login("cfs")).await;
        let v: Value = serde_json::from_str(&chk.body).unwrap();
        assert_eq!(v["subject"]["known"], false, "{q}: {v}");
        assert!(!chk.body.contains(&alice), "{q}: {v}");
    }
    let chk = get(&c, p.addr, "/api/check", p.login("cfs")).await;
    let v: Value = serde_json::from_str(&chk.body).unwrap();
    let count = |k: &str| {
        ["ok", "warning", "critical", "unknown"]
            .iter()
            .map(|st| v[k][st].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(v["view"], format!("client {cfs}"), "{v}");
    assert_eq!(
        (count("clients"), count("sources"), count("pairs")),
        (1, 0, 0),
        "{v}"
    );

    // History and check by what each sees; other names are unknown.
    let h = get(
        &c,
        p.addr,
        &format!("/api/history?kind=client&name={cfs}&name={dora}"),
        p.login("alice"),
    )
    .await;
    let h: Value = serde_json::from_str(&h.body).unwrap();
    assert!(h.get(&cfs).is_some() && h.get(&dora).is_none(), "{h}");
    let h = get(
        &c,
        p.addr,
        &format!("/api/history?kind=pair&name={cfs}%20on%20{bob}"),
        p.login("alice"),
    )
    .await;
    assert_eq!(h.body, "{}");
    let chk = get(
        &c,
        p.addr,
        &format!("/api/check?source={bob}"),
        p.login("alice"),
    )
    .await;
    let chk: Value = serde_json::from_str(&chk.body).unwrap();
    assert_eq!(chk["subject"]["known"], false);
    assert_eq!(
        chk["sources"]["ok"].as_u64().unwrap() + chk["sources"]["unknown"].as_u64().unwrap(),
        0
    );

    // No login, a wrong password, an unknown user: 401 and a Basic challenge (from an
    // address of their own: these are 10 failed logins).
    let stranger = http("127.0.0.6".parse().unwrap());
    let mut bodies = std::collections::BTreeSet::new();
    for (what, login) in [
        ("no login", None),
        ("wrong password", Some((alice.clone(), "wrong".to_owned()))),
        (
            "unknown user",
            Some((format!("{alice}x"), p.password("alice"))),
        ),
    ] {
        for path in [
            "/",
            "/api/status",
            "/api/events",
            "/api/history?kind=total",
            "/api/check",
        ] {
            let a = get(&stranger, p.addr, path, login.clone()).await;
            assert_eq!(a.status, 401, "{what} {path}");
            let www = a.headers["www-authenticate"].to_str().unwrap();
            assert!(www.starts_with("Basic realm=\"pumpwatch "), "{www}");
            bodies.insert(a.body);
        }
    }
    // The answer never tells a wrong password from an unknown user (the log does).
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let page = get(&c, p.addr, "/", p.login("alice")).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("/assets/app.js"));
    assert_eq!(get(&c, p.addr, "/assets/app.js", None).await.status, 200);
    assert_eq!(get(&c, p.addr, "/healthz", None).await.status, 200);

    // /metrics: an admin or the token; a source is logged in but forbidden.
    let m = get(&c, p.addr, "/metrics", None).await;
    assert_eq!(m.status, 401);
    let challenges: Vec<_> = m.headers.get_all("www-authenticate").iter().collect();
    assert!(
        challenges
            .iter()
            .any(|h| h.to_str().unwrap().starts_with("Bearer"))
    );
    for who in ["alice", "cfs"] {
        let m = get(&c, p.addr, "/metrics", p.login(who)).await;
        assert_eq!(m.status, 403, "{who}: logged in, but not an admin");
        assert!(!m.body.contains(&dora), "{who}: {}", m.body);
    }
    let m = get(&c, p.addr, "/metrics", p.login("boss")).await;
    assert_eq!(m.status, 200);
    assert!(m.body.contains(&format!("client=\"{dora}\"")));
    let by_token = c
        .get(format!("http://{}/metrics", p.addr))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(by_token.status(), 200);
    let bad_token = c
        .get(format!("http://{}/metrics", p.addr))
        .bearer_auth("metrics-token-guessed-000000")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_token.status(), 401);
    let m = get(&c, p.addr, "/metrics", p.login("boss")).await;
    for outcome in [
        "accepted",
        "remembered",
        "token",
        "wrong_password",
        "unknown_user",
    ] {
        let line = m
            .body
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "pumpwatch_serve_logins_total{{outcome=\"{outcome}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("{outcome} in {}", m.body));
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= 1.0, "{line}");
    }

    // check: the broker URL's account when serve asks; as alice, alice's view.
    let url = format!("http://{}", p.addr);
    let as_alice = common::common(
        p.config.clone(),
        &p.vh.amqp_url_as(&alice, &p.password("alice")),
    );
    let args = check::Args {
        url: url.clone(),
        timeout: "10".into(),
        ..Default::default()
    };
    let out = check::query(&check::Config::from_args(args, &as_alice).unwrap()).await;
    let line = out.render();
    eprintln!("check as alice: {line}");
    assert_eq!(out.exit_code(), 0, "{line}");
    assert!(
        line.contains("PUMPWATCH OK") && !line.contains(&bob),
        "{line}"
    );
    // The real binary: no login given (guest, the default broker account, is asked for
    // and is an admin), --token-env, and a wrong --user password (UNKNOWN, exit 3).
    let run = |args: Vec<String>, env: Vec<(&'static str, String)>| async move {
        let out = tokio::process::Command::new(common::proc::bin())
            .args(&args)
            .envs(env)
            .env_remove("PUMPWATCH_BROKER")
            .current_dir(std::env::temp_dir())
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("pumpwatch {}: {text}", args.join(" "));
        (out.status.code().unwrap(), text)
    };
    let (code, text) = run(vec!["check".into(), "--url".into(), url.clone()], vec![]).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("2 clients, 2 sources OK"),
        "the admin's view: {text}"
    );
    let (code, text) = run(
        vec![
            "check".into(),
            "--url".into(),
            url.clone(),
            "--token-env".into(),
            "PW_T".into(),
        ],
        vec![("PW_T", TOKEN.into())],
    )
    .await;
    assert_eq!(code, 0, "{text}");
    let (code, text) = run(
        vec![
            "check".into(),
            "--url".into(),
            url.clone(),
            "--user".into(),
            cfs.clone(),
            "--password-env".into(),
            "PW_X".into(),
        ],
        vec![("PW_X", "wrong".into())],
    )
    .await;
    assert_eq!(code, 3, "{text}");
    assert!(
        text.starts_with("PUMPWATCH UNKNOWN - ") && text.contains("401"),
        "{text}"
    );
    p.stop().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_failed_logins_count_per_client() {
    let Some(p) = Pump::start("auth-proxy", false).await else {
        return;
    };
    let (serve, addr) = serve_binary(&p, &[]).await;
    let alice = p.user("alice");
    let proxy = http(PROXY.parse().unwrap());
    // As nginx does: the client's address in X-Forwarded-For (after whatever it claimed).
    let via = |client: &'static str, login: (String, String)| {
        let proxy = proxy.clone();
        async move {
            let r = proxy
                .get(format!("http://{addr}/api/status"))
                .basic_auth(login.0, Some(login.1))
                .header("x-forwarded-for", format!("10.9.9.9, {client}"))
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }
    };
    let mut got = Vec::new();
    for i in 0..12 {
        got.push(via("203.0.113.1", (alice.clone(), format!("guess{i}"))).await);
    }
    assert_eq!(&got[..10], [401; 10], "{got:?}");
    assert_eq!(&got[10..], [429; 2], "{got:?}");
    // Another client behind the same proxy still logs in; the guesser stays blocked.
    assert_eq!(via("203.0.113.2", p.login("alice").unwrap()).await, 200);
    assert_eq!(via("203.0.113.1", p.login("alice").unwrap()).await, 429);
    // A peer that is no trusted proxy is counted as itself, whatever it claims.
    let liar = http("127.0.0.10".parse().unwrap());
    for i in 0..10 {
        let a = liar
            .get(format!("http://{addr}/api/status"))
            .basic_auth(&alice, Some(format!("guess{i}")))
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(a.status(), 401);
    }
    assert_eq!(
        get(&liar, addr, "/api/status", p.login("alice"))
            .await
            .status,
        429
    );
    let log = serve.stderr_text();
    assert!(
        log.contains(&format!(
            "203.0.113.1: login of \"{alice}\" refused: wrong password"
        )) && log.contains("203.0.113.1: 10 failed logins; answering 429")
            && log.contains("127.0.0.10: 10 failed logins; answering 429")
            && !log.contains("10.9.9.9")
            && !log.contains("198.51.100."),
        "{log}"
    );
    p.stop().await;
}

#[tokio::test]
async fn sighup_reads_the_roles_again_and_forgets_the_logins() {
    let Some(p) = Pump::start("auth-hup", false).await else {
        return;
    };
    let (serve, addr) = serve_binary(&p, &[]).await;
    let c = http("127.0.0.1".parse().unwrap());
    let view = |login| {
        let c = c.clone();
        async move {
            let a = get(&c, addr, "/api/status", login).await;
            assert_eq!(a.status, 200, "{}", a.body);
            serde_json::from_str::<Value>(&a.body).unwrap()["pump"]["view"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let alice = p.user("alice");
    assert_eq!(view(p.login("alice")).await, format!("source {alice}"));
    // alice becomes an admin in the file; SIGHUP, and her next request sees everything
    // (her remembered login is forgotten, so the new role applies at once).
    let toml = std::fs::read_to_string(&p.config_path).unwrap();
    let was = format!("[users.\"{alice}\"]\nrole = \"source\"");
    assert!(toml.contains(&was));
    let now = format!("[users.\"{alice}\"]\nrole = \"admin\"");
    std::fs::write(&p.config_path, toml.replace(&was, &now)).unwrap();
    serve.signal("HUP");
    serve
        .wait_stderr("SIGHUP: thresholds and roles read again", T)
        .await;
    assert_eq!(view(p.login("alice")).await, "admin");
    p.stop().await;
}

/// Sends one raw HTTP/1.1 request (`head` lines without the request line) from `from`;
/// the status code, 0 when the connection closed without one.
async fn raw(addr: SocketAddr, from: IpAddr, path: &str, head: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from, 0)).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    let mut req =
        format!("GET {path} HTTP/1.1\r\nHost: pump\r\nConnection: close\r\n").into_bytes();
    req.extend_from_slice(head);
    req.extend_from_slice(b"\r\n");
    // A server that answers before reading it all may reset: what it said still counts.
    let _ = s.write_all(&req).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn hostile_authorization_headers_are_refused_and_serve_goes_on() {
    let Some(p) = Pump::start("auth-hostile", false).await else {
        return;
    };
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let alice = p.user("alice");
    let from: IpAddr = "127.0.0.7".parse().unwrap();
    let mut cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        (
            "a 12 KB Basic header",
            format!("Authorization: Basic {}\r\n", "QUFB".repeat(3000)).into_bytes(),
            &[401],
        ),
        (
            "a 64 KB header (over the head size bound)",
            format!("Authorization: Basic {}\r\n", "QUFB".repeat(16_000)).into_bytes(),
            &[431, 400],
        ),
        (
            "not base64",
            b"Authorization: Basic !!!not-base64%%%\r\n".to_vec(),
            &[401],
        ),
        (
            "base64 of bytes that are not UTF-8",
            format!("Authorization: Basic {}\r\n", b64(b"\xff\xfe:\xc3")).into_bytes(),
            &[401],
        ),
        (
            "raw non-UTF-8 bytes",
            b"Authorization: Basic \xff\xfe\xfd\r\n".to_vec(),
            &[400, 401],
        ),
        (
            "a NUL in the header",
            b"Authorization: Basic YQ\x00==\r\n".to_vec(),
            &[400, 401],
        ),
        (
            "no scheme",
            format!(
                "Authorization: {}\r\n",
                b64(format!("{alice}:x").as_bytes())
            )
            .into_bytes(),
            &[401],
        ),
        (
            "a wrong bearer token",
            b"Authorization: Bearer metrics-token-guessed-000000\r\n".to_vec(),
            &[401],
        ),
        (
            "the right bearer token on the page's API (it opens /metrics only)",
            format!("Authorization: Bearer {TOKEN}\r\n").into_bytes(),
            &[403],
        ),
        (
            "1000 Authorization headers",
            "Authorization: Basic eDp5\r\n".repeat(1000).into_bytes(),
            &[401, 431, 400],
        ),
    ];
    let mut figures = Vec::new();
    for (what, head, allowed) in cases.drain(..) {
        let status = raw(p.addr, from, "/api/status", &head).await;
        figures.push(format!("{what}: {status}"));
        assert!(allowed.contains(&status), "{what}: {status}");
    }
    eprintln!(
        "FIGURE hostile Authorization headers: {}",
        figures.join("; ")
    );
    // serve is still there, and a right login from elsewhere works; a forged
    // X-Forwarded-For from a peer that is no trusted proxy changes nothing.
    let c = http("127.0.0.8".parse().unwrap());
    assert_eq!(get(&c, p.addr, "/healthz", None).await.status, 200);
    let forged = c
        .get(format!("http://{}/api/status", p.addr))
        .basic_auth(&alice, Some(p.password("alice")))
        .header("x-forwarded-for", "127.0.0.7, garbage, [::1]:80")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 200);
    assert!(forged.text().await.unwrap().contains(&alice));
    p.stop().await;
}

#[tokio::test]
async fn auth_none_is_refused_where_others_could_look() {
    // No broker needed: serve refuses before it connects.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pump.toml");
    std::fs::write(
        &file,
        "[users.radar]\nrole = \"source\"\n[users.cfs]\nrole = \"subscriber\"\n",
    )
    .unwrap();
    let cfg = file.to_str().unwrap();
    let (code, _, err) = common::proc::run(
        &[
            "--config",
            cfg,
            "serve",
            "--auth",
            "none",
            "--listen",
            "0.0.0.0:0",
        ],
        T,
    )
    .await;
    eprintln!("serve --auth none --listen 0.0.0.0:0: exit {code}: {err}");
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--auth none on 0.0.0.0:0 would show every source's products to anyone")
            && err.contains("--auth broker"),
        "{err}"
    );
    // The same from the file's serve.auth.
    std::fs::write(
        &file,
        "[users.radar]\nrole = \"source\"\n[serve]\nauth = \"none\"\nlisten = \"[::]:8080\"\n",
    )
    .unwrap();
    let (code, _, err) = common::proc::run(&["--config", cfg, "serve"], T).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--auth none on [::]:8080"), "{err}");
}

/// Runs `pumpwatch serve` (the binary, -v) on the pump's file, `global` options before
/// the subcommand; returns it and its address.
async fn serve_binary(p: &Pump, global: &[&str]) -> (common::proc::Proc, SocketAddr) {
    let cfg = p.config_path.to_str().unwrap().to_owned();
    let mut args = vec!["-v", "--config", &cfg, "--broker", &p.vh.amqp_url];
    args.extend_from_slice(global);
    args.extend_from_slice(&["serve", "--listen", "127.0.0.1:0"]);
    let serve = common::proc::spawn(&args);
    serve.wait_stderr("pumpwatch serve: http://", T).await;
    let addr = serve
        .stderr_text()
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    (serve, addr)
}

#[tokio::test]
async fn failed_logins_are_limited_per_address_and_told_apart_in_the_log() {
    let Some(p) = Pump::start("auth-limit", false).await else {
        return;
    };
    let (serve, addr) = serve_binary(&p, &[]).await;
    let alice = p.user("alice");
    let attacker = http("127.0.0.3".parse().unwrap());
    let t0 = Instant::now();
    let mut answers = Vec::new();
    for i in 0..30 {
        let a = get(
            &attacker,
            addr,
            "/api/status",
            Some((alice.clone(), format!("guess{i}"))),
        )
        .await;
        answers.push((a.status, a.headers.get("retry-after").cloned()));
    }
    let took = t0.elapsed();
    let n401 = answers.iter().filter(|a| a.0 == 401).count();
    let n429 = answers.iter().filter(|a| a.0 == 429).count();
    eprintln!("FIGURE 30 wrong tries from one address in {took:?}: {n401} x 401, {n429} x 429");
    assert_eq!((n401, n429), (10, 20), "{answers:?}");
    assert!(answers[..10].iter().all(|a| a.0 == 401));
    let retry: u64 = answers[10]
        .1
        .as_ref()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=6).contains(&retry), "Retry-After {retry}");
    // The right password from the blocked address is not even checked ...
    let a = get(&attacker, addr, "/api/status", p.login("alice")).await;
    assert_eq!(a.status, 429);
    // ... and from another address it works.
    let alice_home = http("127.0.0.4".parse().unwrap());
    let a = get(&alice_home, addr, "/api/status", p.login("alice")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // An unknown user, from a third address.
    let a = get(
        &http("127.0.0.5".parse().unwrap()),
        addr,
        "/api/status",
        Some(("pwtest-nobody-at-all".into(), "x".into())),
    )
    .await;
    assert_eq!(a.status, 401);

    // A serve whose management API cannot be reached: 401 too, but nobody is blocked.
    let (cut_off, addr2) = serve_binary(&p, &["--admin-url", "http://127.0.0.1:9"]).await;
    for _ in 0..15 {
        let a = get(&attacker, addr2, "/api/status", p.login("alice")).await;
        assert_eq!(a.status, 401);
    }

    // The log: each told apart, the addresses named, no password anywhere.
    let log = serve.stderr_text();
    let log2 = cut_off.stderr_text();
    eprintln!("serve's log:\n{log}\n{log2}");
    assert!(
        log.contains(&format!(
            "127.0.0.3: login of \"{alice}\" refused: wrong password"
        )),
        "{log}"
    );
    assert!(
        log.contains("login of \"pwtest-nobody-at-all\" refused: unknown user"),
        "{log}"
    );
    assert!(
        log.contains("127.0.0.3: 10 failed logins; answering 429"),
        "{log}"
    );
    assert!(log2.contains("the broker cannot be asked"), "{log2}");
    for (short, _) in USERS {
        let pw = p.password(short);
        assert!(
            !log.contains(&pw) && !log2.contains(&pw),
            "{short}'s password in the log"
        );
    }
    assert!(!log.contains("guess1"));
    p.stop().await;
}

#[tokio::test]
async fn https_with_a_certificate() {
    let Some(p) = Pump::start("auth-tls", true).await else {
        return;
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls");
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let ask = |path: &'static str, login: Option<(String, String)>| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut s = connector.connect(name, tcp).await.unwrap();
            let auth = login.map_or(String::new(), |(u, pw)| {
                use base64::Engine;
                let b = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{pw}"));
                format!("Authorization: Basic {b}\r\n")
            });
            s.write_all(
                format!(
                    "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let a = ask("/healthz", None).await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    let a = ask("/api/status", None).await;
    assert!(a.starts_with("HTTP/1.1 401"), "{a}");
    let a = ask("/api/status", p.login("alice")).await;
    assert!(
        a.starts_with("HTTP/1.1 200") && a.contains(&p.user("alice")),
        "{a}"
    );
    // check over HTTPS: trusting the pump's CA, as alice (the broker URL's account) and
    // with the token (the real binary); without the CA it is UNKNOWN, saying why.
    let url = format!("https://localhost:{}", p.addr.port());
    let ca = dir.join("ca.pem");
    let as_alice = common::common(
        p.config.clone(),
        &p.vh.amqp_url_as(&p.user("alice"), &p.password("alice")),
    );
    let args = check::Args {
        url: url.clone(),
        timeout: "10".into(),
        ca_file: Some(ca.clone()),
        ..Default::default()
    };
    let cfg = check::Config::from_args(args, &as_alice).unwrap();
    p.traffic("alice", "cfs", 10, 0).await;
    p.traffic("bob", "dora", 10, 0).await;
    let line = common::wait_for("check over https as alice says OK", T, || {
        let cfg = cfg.clone();
        async move {
            let out = check::query(&cfg).await;
            (out.exit_code() == 0).then(|| out.render())
        }
    })
    .await;
    eprintln!("check over https as alice: {line}");
    assert!(
        line.starts_with("PUMPWATCH OK") && !line.contains(&p.user("bob")),
        "{line}"
    );
    let ca_arg = ca.to_str().unwrap();
    let (code, out) = pumpwatch(
        &[
            "check",
            "--url",
            &url,
            "--ca-file",
            ca_arg,
            "--token-env",
            "PW_T",
        ],
        &[("PW_T", TOKEN)],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 clients, 2 sources OK"), "{out}");
    let (code, out) = pumpwatch(
        &["check", "--url", &url, "--token-env", "PW_T"],
        &[("PW_T", TOKEN)],
    )
    .await;
    eprintln!("check over https without the CA: {out}");
    assert_eq!(code, 3, "{out}");
    assert!(
        out.starts_with("PUMPWATCH UNKNOWN - serve at https://localhost:") && out.contains("TLS"),
        "{out}"
    );

    // Plain HTTP to the HTTPS port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", p.addr))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    p.stop().await;
}

/// Runs the real binary to completion with `env` added: its exit code and stdout.
async fn pumpwatch(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = tokio::process::Command::new(common::proc::bin())
        .args(args)
        .envs(env.iter().copied())
        .env_remove("PUMPWATCH_BROKER")
        .current_dir(std::env::temp_dir())
        .output();
    let out = tokio::time::timeout(T, out)
        .await
        .expect("pumpwatch finishes")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
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

#[tokio::test]
async fn in_chromium_a_source_and_a_subscriber_see_nothing_of_others() {
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
    let Some(p) = Pump::start("auth-page", false).await else {
        return;
    };
    p.traffic("alice", "cfs", 30, 3).await;
    p.traffic("bob", "cfs", 10, 10).await;
    p.traffic("bob", "dora", 15, 0).await;
    let c = http("127.0.0.1".parse().unwrap());
    let login = p.login("alice");
    common::wait_until("alice's pair counted", T, || {
        let (c, login) = (c.clone(), login.clone());
        async move {
            let s: Value =
                serde_json::from_str(&get(&c, p.addr, "/api/status", login).await.body).unwrap();
            s["clients"][0]["good_total"] == 30
        }
    })
    .await;
    // alice (a source) sees her row and her products' client; cfs (a subscriber) its own
    // row; neither finds another account's name anywhere the browser got.
    for (who, expect, forbidden, png) in [
        (
            "alice",
            &["alice", "cfs"][..],
            &["bob", "dora"][..],
            "serve-source.png",
        ),
        (
            "cfs",
            &["cfs"][..],
            &["alice", "bob", "dora"][..],
            "serve-subscriber.png",
        ),
    ] {
        let shot = root.join("test-artifacts").join(png);
        std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
        let names = |v: &[&str]| v.iter().map(|n| p.user(n)).collect::<Vec<_>>().join(",");
        let out = tokio::process::Command::new("node")
            .arg(root.join("tests/browser/login.mjs"))
            .arg(format!("http://{}/", p.addr))
            .arg(&shot)
            .env("CHROMIUM", &chromium)
            .env("PW_USER", p.user(who))
            .env("PW_PASSWORD", p.password(who))
            .env("PW_EXPECT", names(expect))
            .env(
                "PW_FORBIDDEN",
                format!("{},{}", names(forbidden), p.user("dora")),
            )
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(120), out)
            .await
            .expect("login.mjs finishes")
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("login.mjs as {who}: {stdout}");
        assert!(
            out.status.success(),
            "login.mjs as {who} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("CLEAN"), "{stdout}");
        assert!(shot.exists());
    }
    p.stop().await;
}
