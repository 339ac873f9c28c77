//! A user holding an account on the pump attacks it (issue 8; SPEC §2 "Names", §4.6).
//! Every test plays one attack and its variants against the real broker, with real users
//! and passwords made by `setup` (each password holds `/ @ : % #`), in its own vhost, and
//! asserts that what the attacker wanted did not happen **and** that everybody else's
//! service went on. The figures each attack shows are printed as `FIGURE ...` lines
//! (`cargo test --test hostile -- --nocapture`).
//!
//! | attack | test |
//! |---|---|
//! | dotted and other-separator names, to let `sat`'s permissions reach `sat.x`'s queue | [`names_outside_the_rule_never_become_accounts`] |
//! | control, ESC, bidi and invisible characters in every field of a report, to forge lines or drive the reader's terminal | [`reports_cannot_forge_lines_or_drive_the_terminal`] |
//! | source and client names from reports (HTML, newline, 300 bytes, `#`, existing exchange names), to make speedo create exchanges or lose everybody's speedos | [`names_from_reports_create_nothing_and_break_nobody`] |
//! | 5 000 half-sent requests, drip-fed headers and idle keep-alive connections, to starve `/healthz` and the descriptors | [`slow_http_clients_never_starve_serve`] |
//! | a 300-byte multi-byte `--exchange`; passwords with `/ @ : % #` in every error path | [`long_names_and_passwords_in_errors`] |
//! | announcement index poisoning (a second source, or a subscriber, claiming another source's pubTime + name or identity), forged hop counts and stamps, `CC`/`BCC` headers and reserved `pumpwatch.` topics, to redirect or silence another source's reports | [`attribution_cannot_be_hijacked`] |

mod common;

use common::TestVhost;
use pumpwatch::broker::amqp::{Client, ConnectOptions, QueueDecl, Topology};
use pumpwatch::broker::names;
use pumpwatch::cmd::setup;
use pumpwatch::cmd::speedo::{self, Decoded, Subject};
use pumpwatch::cmd::{Common, Error};
use pumpwatch::config::Config;
use pumpwatch::core::Headers;
use pumpwatch::core::emit::Outgoing;
use pumpwatch::core::report::{H_CLIENT, H_SOURCE};
use pumpwatch::core::text;
use pumpwatch::shutdown::Shutdown;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(30);

use common::DropUsers;

/// A pump declared by `setup` on a fresh vhost: real users, real passwords.
struct Pump {
    vh: TestVhost,
    config: Config,
    env: HashMap<String, String>,
    prefix: String,
    /// The configuration as a file, for the binary.
    config_path: PathBuf,
    _dir: tempfile::TempDir,
    _users: DropUsers,
}

impl Pump {
    /// `users`: (short name, role); sources keep 10 reports in `q_<source>.reports`.
    async fn new(prefix: &str, users: &[(&str, &str)], extra_toml: &str) -> Option<Pump> {
        let vh = common::vhost(prefix).await?;
        let prefix = vh.user_prefix.clone();
        let mut toml = String::new();
        let mut env = HashMap::new();
        let mut names = Vec::new();
        for (short, role) in users {
            let var = format!("PW_{}", short.to_uppercase().replace('-', "_"));
            let full = format!("{prefix}{short}");
            let retain = if *role == "source" { 10 } else { 0 };
            toml.push_str(&format!(
                "[users.\"{full}\"]\nrole = \"{role}\"\npassword_env = \"{var}\"\nretain = {retain}\n"
            ));
            env.insert(var, password(short));
            names.push(full);
        }
        toml.push_str(extra_toml);
        let config = Config::parse(&toml, "hostile.toml").unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("pump.toml");
        std::fs::write(&config_path, &toml).unwrap();
        let pump = Pump {
            vh,
            config,
            env,
            prefix,
            config_path,
            _dir: dir,
            _users: DropUsers(names),
        };
        let (result, out) = pump.setup(setup::Args::default()).await;
        result.unwrap_or_else(|e| panic!("setup: {e}\n{out}"));
        Some(pump)
    }

    async fn setup(&self, args: setup::Args) -> (Result<setup::Summary, Error>, String) {
        let env = self.env.clone();
        let lookup = Arc::new(move |var: &str| env.get(var).cloned());
        let common = Common::new(
            self.config.clone(),
            Some(&self.vh.amqp_url),
            Some(&self.vh.admin_url),
        )
        .unwrap();
        let mut out = Vec::new();
        let result = match setup::Config::with_env(args, &common, lookup) {
            Err(e) => Err(Error::Usage(e)),
            Ok(cfg) => setup::apply(&cfg, &mut out)
                .await
                .map_err(|e| Error::Failed(e.to_string())),
        };
        (result, String::from_utf8(out).unwrap())
    }

    fn user(&self, short: &str) -> String {
        format!("{}{short}", self.prefix)
    }

    fn password(&self, short: &str) -> String {
        self.env[&format!("PW_{}", short.to_uppercase().replace('-', "_"))].clone()
    }

    /// `amqp://<user>:<password>@.../<vhost>` for a user of the pump.
    fn url(&self, short: &str) -> String {
        self.vh
            .amqp_url_as(&self.user(short), &self.password(short))
    }

    fn common(&self, short: &str) -> Common {
        common::common(self.config.clone(), &self.url(short))
    }

    async fn connect(&self, short: &str) -> Client {
        let opts = ConnectOptions {
            reconnect: false,
            ..ConnectOptions::new(format!("hostile-{short}"))
        };
        Client::connect(&common::broker(&self.url(short)), opts)
            .await
            .unwrap_or_else(|e| panic!("connecting as {short}: {e}"))
    }

    async fn exchanges(&self) -> BTreeSet<String> {
        let list = self.vh.mgmt.list_exchanges(&self.vh.name).await.unwrap();
        list.into_iter().map(|x| x.name).collect()
    }
}

/// Every password holds the characters that broke redaction before (`/ @ : % #`) and a
/// random tail that must never be seen in any output.
fn password(short: &str) -> String {
    format!("p/@:%#{short}-{}", tail())
}

fn tail() -> String {
    format!("Zx{:08x}", rand::random::<u32>())
}

// ---------------------------------------------------------------------------------------
// 2. Names outside [A-Za-z0-9_-]{1,64}
// ---------------------------------------------------------------------------------------

/// `sat.x` cannot even be declared (configuration, Sarracenia import, in code, through the
/// binary), nor can names with other separators; and with real users `sat`, `satx`,
/// `sat-x`, `sat_x`, `sat`'s permissions reach none of the others' retained queues.
#[tokio::test]
async fn names_outside_the_rule_never_become_accounts() {
    // The configuration refuses them, naming the key and the file.
    let long = "a".repeat(65);
    for bad in [
        "sat.x", "sat*x", "sat#x", "sat/x", "sat x", "sat|x", "sat:x", "sat%x", "sät", "sat\n", "",
        &long,
    ] {
        let toml = format!("[users.{bad:?}]\nrole = \"source\"\n");
        let e = Config::parse(&toml, "pump.toml").unwrap_err().to_string();
        assert!(
            e.contains("pump.toml") && e.contains("users.") && e.contains("no dots"),
            "{bad:?}: {e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
    }

    let Some(pump) = Pump::new(
        "hostile-names",
        &[
            ("sat", "source"),
            ("satx", "source"),
            ("sat-x", "source"),
            ("sat_x", "source"),
        ],
        "",
    )
    .await
    else {
        return;
    };
    let sat = pump.user("sat");

    // Sarracenia's admin.conf: a usage error naming the file and line, nothing applied.
    for (line, why) in [
        (format!("declare source {sat}.x"), "invalid source name"),
        (
            format!("declare subscriber {sat}*x"),
            "invalid subscriber name",
        ),
        (
            format!("feeder amqp://{sat}.x@localhost/"),
            "feeder: invalid user name",
        ),
        (
            format!("admin amqp://{sat}%2Ex@localhost/"),
            "admin: invalid user name",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("admin.conf"),
            format!("declare source {sat}-new\n{line}\n"),
        )
        .unwrap();
        let args = setup::Args {
            from_sarracenia: Some(dir.path().to_owned()),
            ..setup::Args::default()
        };
        let (result, out) = pump.setup(args).await;
        let e = result.unwrap_err();
        assert_eq!(e.exit_code(), 2, "{line}: {e}");
        assert!(
            e.to_string().contains("admin.conf:2:") && e.to_string().contains(why),
            "{line}: {e}"
        );
        assert_eq!(out, "", "nothing applied");

        // The same through the binary: exit 2, one line.
        let (code, stdout, stderr) = common::proc::run(
            &[
                "--broker",
                &pump.url("sat"),
                "--admin-url",
                &pump.vh.admin_url,
                "setup",
                "--from-sarracenia",
                dir.path().to_str().unwrap(),
            ],
            T,
        )
        .await;
        assert_eq!(code, 2, "{stderr}");
        assert!(stdout.is_empty());
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("admin.conf:2:"), "{stderr}");
    }
    let users: Vec<String> = pump
        .vh
        .mgmt
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .filter(|n| n.starts_with(&sat))
        .collect();
    assert!(
        users
            .iter()
            .all(|u| !u.contains('.') && !u.contains('*') && !u.ends_with("-new")),
        "{users:?}"
    );

    // Real users: sat against satx, sat-x and sat_x's retained queues and exchanges.
    let conn = lapin::Connection::connect(&pump.url("sat"), Default::default())
        .await
        .unwrap();
    let mut refused = 0;
    for victim in ["satx", "sat-x", "sat_x"] {
        let o = pump.user(victim);
        let queue = format!("q_{o}.reports");
        let attempts: Vec<(&str, _)> = vec![
            ("consume", {
                let ch = conn.create_channel().await.unwrap();
                ch.basic_get(queue.as_str().into(), Default::default())
                    .await
                    .map(|_| ())
            }),
            ("purge", {
                let ch = conn.create_channel().await.unwrap();
                ch.queue_purge(queue.as_str().into(), Default::default())
                    .await
                    .map(|_| ())
            }),
            ("delete", {
                let ch = conn.create_channel().await.unwrap();
                ch.queue_delete(queue.as_str().into(), Default::default())
                    .await
                    .map(|_| ())
            }),
            ("bind to xs_sat", {
                let ch = conn.create_channel().await.unwrap();
                ch.queue_bind(
                    queue.as_str().into(),
                    format!("xs_{sat}").as_str().into(),
                    "#".into(),
                    Default::default(),
                    Default::default(),
                )
                .await
            }),
            ("bind own queue to xr_other", {
                let ch = conn.create_channel().await.unwrap();
                ch.queue_bind(
                    format!("q_{sat}.reports").as_str().into(),
                    format!("xr_{o}").as_str().into(),
                    "#".into(),
                    Default::default(),
                    Default::default(),
                )
                .await
            }),
            ("publish to xs_other", {
                let ch = conn.create_channel().await.unwrap();
                ch.confirm_select(Default::default()).await.unwrap();
                match ch
                    .basic_publish(
                        format!("xs_{o}").as_str().into(),
                        "v02.report.x".into(),
                        Default::default(),
                        b"forged",
                        Default::default(),
                    )
                    .await
                {
                    Ok(confirm) => confirm.await.map(|_| ()),
                    Err(e) => Err(e),
                }
            }),
        ];
        for (what, result) in attempts {
            match result {
                Err(e) if e.to_string().contains("ACCESS_REFUSED") => refused += 1,
                other => panic!("sat {what} on {victim}'s objects: {other:?}"),
            }
        }
        let q = pump.vh.mgmt.get_queue(&pump.vh.name, &queue).await.unwrap();
        assert!(q.is_some(), "{queue} still there");
    }
    // And sat's own retained queue works (the patterns are not simply broken).
    let ch = conn.create_channel().await.unwrap();
    ch.basic_get(
        format!("q_{sat}.reports").as_str().into(),
        Default::default(),
    )
    .await
    .expect("sat reads its own retained queue");
    let _ = conn.close(200, "bye".into()).await;
    eprintln!(
        "FIGURE names: 12 bad names refused by the config, 4 by admin.conf (exit 2); {refused}/18 operations of sat on satx/sat-x/sat_x refused (ACCESS_REFUSED)"
    );
    assert_eq!(refused, 18);
}

// ---------------------------------------------------------------------------------------
// 3. Terminal injection
// ---------------------------------------------------------------------------------------

/// What attackers put in report fields to forge lines or drive a terminal.
fn payloads() -> Vec<(&'static str, String)> {
    let forged = "2026-01-01 00:00:00.000 201 admin@pump radar f1 20260101/radar/ok \"Downloaded\" v02.report.ok";
    vec![
        ("newline", format!("a\n{forged}")),
        ("carriage return", format!("a\r{forged}")),
        ("clear screen", "\x1b[2J\x1b[H".into()),
        ("title (OSC)", "\x1b]0;pwned\x07".into()),
        ("DCS", "\x1bP+q\x1b\\".into()),
        ("NUL", "a\0b".into()),
        ("backspaces", "radar\x08\x08\x08\x08\x08sat".into()),
        ("DEL", "a\x7fb".into()),
        ("C1 CSI", "\u{9b}31mred".into()),
        ("C1 NEL", "a\u{85}b".into()),
        ("RLO", "gpj\u{202e}.exe".into()),
        ("isolates", "\u{2066}a\u{2069}\u{2067}b\u{2069}".into()),
        ("zero width", "ra\u{200b}dar\u{feff}".into()),
        ("line separator", "a\u{2028}b\u{2029}c".into()),
        ("tab", "a\tb".into()),
        ("tag chars", "a\u{e0041}\u{e007f}".into()),
        ("backslash escapes", "a\\nb\\x1b".into()),
    ]
}

/// A v03 report (v2 writing v03: host and user in the report object) by `client`, with
/// `evil` in its host, relPath, flow and message, stamped as route would.
fn hostile_report(client: &str, source: &str, i: usize, evil: &str) -> (String, Outgoing) {
    let rel_path = format!("20260101/{source}/{evil}/f{i}");
    let body = serde_json::json!({
        "pubTime": "20260101T000000.000",
        "baseUrl": "sftp://data.example",
        "relPath": rel_path,
        "flow": evil,
        "size": 1000,
        "from_cluster": evil,
        "report": {"resultCode": 201, "host": evil, "user": client, "elapsedTime": 0.1,
                   "message": evil},
    });
    let mut headers = Headers::new();
    headers.set(H_CLIENT, client);
    headers.set(H_SOURCE, source);
    let topic = format!("v03.report.20260101.{source}.{evil}");
    (
        rel_path,
        Outgoing {
            routing_key: topic,
            body: body.to_string().into_bytes(),
            content_type: "application/json",
            headers,
        },
    )
}

fn benign_report(client: &str, source: &str, i: usize) -> (String, Outgoing) {
    let (rel, mut o) = hostile_report(client, source, i, "ok");
    o.routing_key = format!("v03.report.20260101.{source}.ok");
    (rel, o)
}

async fn publish_all(c: &Client, exchange: &str, msgs: &[Outgoing]) {
    let mut pending = Vec::new();
    for m in msgs {
        pending.push(c.publish(exchange, m).await.unwrap());
    }
    for p in pending {
        p.wait().await.unwrap();
    }
}

/// `cfs` reports on radar's products with every payload in every field; `edu`'s reports on
/// sat's and radar's products go on beside them. The admin (`log` on `xreport`, text,
/// `--json`, `--raw`) and the source (`log` on `xr_radar`) read them through the real
/// binary: every report is exactly one line, no control or invisible character reaches
/// the terminal, each field is one word that unescapes to what was sent, and the other
/// users' reports are all there.
#[tokio::test]
async fn reports_cannot_forge_lines_or_drive_the_terminal() {
    let Some(pump) = Pump::new(
        "hostile-term",
        &[
            ("radar", "source"),
            ("sat", "source"),
            ("cfs", "subscriber"),
            ("edu", "subscriber"),
            ("feed", "feeder"),
        ],
        "",
    )
    .await
    else {
        return;
    };
    let (radar, sat, cfs, edu) = (
        pump.user("radar"),
        pump.user("sat"),
        pump.user("cfs"),
        pump.user("edu"),
    );
    let payloads = payloads();
    let mut to_radar = Vec::new(); // (relPath, message) on xr_radar
    let mut to_sat = Vec::new();
    for (i, (_, evil)) in payloads.iter().enumerate() {
        to_radar.push(hostile_report(&cfs, &radar, i, evil));
        to_radar.push(benign_report(&edu, &radar, 100 + i));
        to_sat.push(benign_report(&edu, &sat, 200 + i));
    }
    // A malformed message with a hostile topic: skipped, and logged (with -vv) escaped.
    let malformed = Outgoing {
        routing_key: "v02.report.\x1b[2J\n\u{202e}".into(),
        body: b"\x1b[2J not a report\n".to_vec(),
        content_type: "text/plain",
        headers: Headers::new(),
    };
    let all = to_radar.len() + to_sat.len();

    let cfg = pump.config_path.to_str().unwrap().to_owned();
    let (feed_url, radar_url) = (pump.url("feed"), pump.url("radar"));
    let timeout = "30";
    let count_all = all.to_string();
    let count_radar = to_radar.len().to_string();
    // --raw shows the malformed message too.
    let count_raw = (all + 1).to_string();
    let readers = [
        (
            "admin text",
            vec![
                "-vv",
                "--config",
                &cfg,
                "--broker",
                &feed_url,
                "log",
                "--count",
                &count_all,
                "--timeout",
                timeout,
            ],
        ),
        (
            "admin json",
            vec![
                "--config",
                &cfg,
                "--broker",
                &feed_url,
                "log",
                "--json",
                "--count",
                &count_all,
                "--timeout",
                timeout,
            ],
        ),
        (
            "admin raw",
            vec![
                "--config",
                &cfg,
                "--broker",
                &feed_url,
                "log",
                "--raw",
                "--count",
                &count_raw,
                "--timeout",
                timeout,
            ],
        ),
        (
            "source text",
            vec![
                "--config",
                &cfg,
                "--broker",
                &radar_url,
                "log",
                "--count",
                &count_radar,
                "--timeout",
                timeout,
            ],
        ),
    ];
    let mut procs = Vec::new();
    for (what, args) in &readers {
        let p = common::proc::spawn(args);
        p.wait_stderr("listening on", T).await;
        procs.push((*what, p));
    }

    // As route would have: every report to xreport, each source's to its xr_<source>.
    let feed = pump.connect("feed").await;
    // The malformed one first, so the readers meet it before their count is reached.
    let everything: Vec<Outgoing> = std::iter::once(malformed.clone())
        .chain(to_radar.iter().chain(&to_sat).map(|(_, o)| o.clone()))
        .collect();
    publish_all(&feed, "xreport", &everything).await;
    let radar_only: Vec<Outgoing> = to_radar.iter().map(|(_, o)| o.clone()).collect();
    publish_all(&feed, &format!("xr_{radar}"), &radar_only).await;
    let sat_only: Vec<Outgoing> = to_sat.iter().map(|(_, o)| o.clone()).collect();
    publish_all(&feed, &format!("xr_{sat}"), &sat_only).await;
    feed.close().await;

    let mut lines_checked = 0;
    for (what, p) in procs {
        let (code, lines, stderr) = p.finish(T).await;
        assert_eq!(code, 0, "{what}: {stderr}");
        let want = match what {
            "source text" => to_radar.len(),
            "admin raw" => all + 1,
            _ => all,
        };
        assert_eq!(
            lines.len(),
            want,
            "{what}: one line per report:\n{}",
            lines.join("\n")
        );
        for line in &lines {
            assert!(
                !line.chars().any(|c| text::is_unsafe(c) || c == '\r'),
                "{what}: unsafe character in {line:?}"
            );
        }
        for line in stderr.lines() {
            assert!(
                !line.chars().any(text::is_unsafe),
                "{what} stderr: {line:?}"
            );
        }
        let expected: Vec<&(String, Outgoing)> = if what.starts_with("source") {
            to_radar.iter().collect()
        } else {
            to_radar.iter().chain(&to_sat).collect()
        };
        let mut rel_paths: Vec<String> = Vec::new();
        for line in &lines {
            let rel = if what.ends_with("text") {
                // date time code client@host source flow relPath "message" topic
                let (head, rest) = line.split_once(" \"").expect("a quoted message");
                let (_, topic) = rest.rsplit_once("\" ").expect("a topic after it");
                let words: Vec<&str> = head.split(' ').collect();
                assert_eq!(words.len(), 7, "{what}: {line}");
                assert!(!topic.contains(' '), "{what}: {line}");
                text::unescape(words[6]).expect("relPath unescapes")
            } else if what.ends_with("json") {
                let j: serde_json::Value = serde_json::from_str(line).unwrap();
                j["rel_path"].as_str().unwrap().to_owned()
            } else {
                let j: serde_json::Value = serde_json::from_str(line).unwrap();
                let body = j["body"].as_str().unwrap();
                if j["topic"] == malformed.routing_key.as_str() {
                    assert_eq!(body.as_bytes(), malformed.body, "{line}");
                    lines_checked += 1;
                    continue;
                }
                let body: serde_json::Value = serde_json::from_str(body).unwrap();
                body["relPath"].as_str().unwrap().to_owned()
            };
            rel_paths.push(rel);
            lines_checked += 1;
        }
        rel_paths.sort();
        let mut want_paths: Vec<String> = expected.iter().map(|(r, _)| r.clone()).collect();
        want_paths.sort();
        assert_eq!(
            rel_paths, want_paths,
            "{what}: every report, each exactly as sent"
        );
        if what == "admin text" {
            assert!(stderr.contains("skipping malformed message"), "{stderr}");
        }
    }
    eprintln!(
        "FIGURE terminal: {} payloads x 6 fields; {lines_checked} lines read by 4 readers (admin text/json/raw, source), each exactly one line, 0 unsafe characters, every relPath unescaped back to what was sent",
        payloads.len()
    );
}

// ---------------------------------------------------------------------------------------
// 4. Names from reports
// ---------------------------------------------------------------------------------------

/// Every speedo arriving on an exchange, decoded.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, Decoded)>>>);

impl Seen {
    fn good(&self, exchange: &str, subject: &Subject) -> u64 {
        self.0
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(x, d)| x == exchange && &d.subject == subject)
            .map_or(0, |(_, d)| d.reading.good)
    }

    /// Waits until every (exchange, subject, good count) is seen; names what is missing
    /// when the deadline passes.
    async fn wait(&self, what: &str, wants: &[(String, Subject, u64)]) {
        let t0 = Instant::now();
        loop {
            let missing: Vec<String> = wants
                .iter()
                .filter(|(x, subject, n)| self.good(x, subject) != *n)
                .map(|(x, subject, n)| {
                    format!("{x} {subject:?}: want {n}, last {}", self.good(x, subject))
                })
                .collect();
            if missing.is_empty() {
                return;
            }
            if t0.elapsed() > T {
                let seen: Vec<String> = self
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(x, d)| format!("{x} {:?} {}", d.subject, d.reading.good))
                    .collect();
                panic!(
                    "{what}: missing after {T:?}:\n{}\nseen {} speedos, last 40:\n{}",
                    missing.join("\n"),
                    seen.len(),
                    seen[seen.len().saturating_sub(40)..].join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn subjects(&self, exchange: &str) -> BTreeSet<Subject> {
        let seen = self.0.lock().unwrap();
        seen.iter()
            .filter(|(x, _)| x == exchange)
            .map(|(_, d)| d.subject.clone())
            .collect()
    }
}

/// Binds a queue of `who` to `exchange` and records its speedos.
async fn watch(pump: &Pump, who: &str, exchange: &str, seen: &Seen) -> Client {
    let queue = format!("q_{}.watch.{}", pump.user(who), rand::random::<u32>());
    let client = Client::connect(
        &common::broker(&pump.url(who)),
        ConnectOptions {
            topology: Topology::bound_queue(
                QueueDecl::exclusive(queue.clone()),
                exchange,
                "v01.speedo.#",
            ),
            ..ConnectOptions::new(format!("watch {exchange}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{who} watching {exchange}: {e}"));
    let mut consumer = client.consume(&queue, 1000).await.unwrap();
    let (seen, exchange) = (seen.clone(), exchange.to_owned());
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let decoded = speedo::decode(&d.incoming()).expect("speedo publishes valid speedos");
            seen.0.lock().unwrap().push((exchange.clone(), decoded));
            let _ = d.ack().await;
        }
    });
    client
}

/// A report straight into `xreport`, stamped as route would (`source` empty: unstamped,
/// so the relPath pattern names it). v03 JSON, so any name fits.
fn stamped(client: &str, source: &str, rel_path: &str, code: u16) -> Outgoing {
    let body = serde_json::json!({
        "pubTime": "20260101T000000.000",
        "baseUrl": "sftp://data.example",
        "relPath": rel_path,
        "size": 1000,
        "report": {"resultCode": code, "host": "node1", "user": client, "elapsedTime": 0.1},
    });
    let mut headers = Headers::new();
    headers.set(H_CLIENT, client);
    if !source.is_empty() {
        headers.set(H_SOURCE, source);
    }
    Outgoing {
        routing_key: "v03.report.20260101".into(),
        body: body.to_string().into_bytes(),
        content_type: "application/json",
        headers,
    }
}

/// Hostile source and client names in reports: speedo counts them on `xreport` under
/// their names but creates no exchange for them, and every declared client's and source's
/// speedos of the same intervals arrive, on `xreport` and on each `xr_<source>`. Then an
/// exchange deleted under speedo (a publish the broker refuses, closing the channel): the
/// other sources' speedos still arrive and nothing is lost.
#[tokio::test]
async fn names_from_reports_create_nothing_and_break_nobody() {
    let Some(pump) = Pump::new(
        "hostile-speedo",
        &[
            ("radar", "source"),
            ("sat", "source"),
            ("cfs", "subscriber"),
            ("edu", "subscriber"),
            ("mallory", "subscriber"),
            ("feed", "feeder"),
        ],
        "[speedo]\ninterval = 0.3\nall_interval = 0.3\n",
    )
    .await
    else {
        return;
    };
    let (radar, sat, cfs, edu, mallory) = (
        pump.user("radar"),
        pump.user("sat"),
        pump.user("cfs"),
        pump.user("edu"),
        pump.user("mallory"),
    );
    let (xr_radar, xr_sat) = (format!("xr_{radar}"), format!("xr_{sat}"));
    let before = pump.exchanges().await;

    let seen = Seen::default();
    let _w1 = watch(&pump, "feed", "xreport", &seen).await;
    let _w2 = watch(&pump, "radar", &xr_radar, &seen).await;
    let _w3 = watch(&pump, "sat", &xr_sat, &seen).await;
    let cfg = speedo::Config::from_args(Default::default(), &pump.common("feed")).unwrap();
    let shutdown = Shutdown::new();
    let speedo = tokio::spawn(speedo::run_counting(cfg, shutdown.clone()));
    // Its queue is declared (and bound) before it publishes anything.
    common::wait_until("speedo running", T, || {
        let s = seen.clone();
        async move { s.subjects("xreport").contains(&Subject::AllClients) }
    })
    .await;

    // As source names (stamped, as a report from elsewhere may arrive), by mallory.
    let hostile_sources: Vec<String> = vec![
        "<img src=x onerror=alert(1)>".into(),
        "evil\nname".into(),
        "x".repeat(300),
        "€".repeat(100),
        "a.b.c".into(),
        "#".into(),
        "*".into(),
        "xreport".into(),
        "amq.direct".into(),
        "xr_radar".into(),
        "\x1b[2J\u{202e}".into(),
        format!("{radar}.x"),
    ];
    // As client names, on radar's products.
    let hostile_clients: Vec<String> = vec![
        "evil\nclient".into(),
        "y".repeat(300),
        "#.*".into(),
        "\u{202e}cfs".into(),
    ];
    let mut msgs = Vec::new();
    for i in 0..10 {
        msgs.push(stamped(
            &cfs,
            &radar,
            &format!("20260101/{radar}/f{i}"),
            201,
        ));
        msgs.push(stamped(&edu, &sat, &format!("20260101/{sat}/f{i}"), 201));
    }
    for (i, name) in hostile_sources.iter().enumerate() {
        msgs.push(stamped(&mallory, name, &format!("20260101/x/h{i}"), 201));
        // Unstamped: the relPath pattern would name it, but only ever names a declared
        // source, so this one counts under `unknown`.
        msgs.push(stamped(&mallory, "", &format!("20260101/{name}/u{i}"), 201));
    }
    for (i, name) in hostile_clients.iter().enumerate() {
        msgs.push(stamped(
            name,
            &radar,
            &format!("20260101/{radar}/c{i}"),
            201,
        ));
    }
    let feed = pump.connect("feed").await;
    publish_all(&feed, "xreport", &msgs).await;

    let radar_total = 10 + hostile_clients.len() as u64;
    let x = |s: &str| s.to_owned();
    seen.wait(
        "every declared client's and source's speedos",
        &[
            (x("xreport"), Subject::Client(cfs.clone()), 10),
            (x("xreport"), Subject::Client(edu.clone()), 10),
            (x("xreport"), Subject::Source(radar.clone()), radar_total),
            (x("xreport"), Subject::Source(sat.clone()), 10),
            (xr_radar.clone(), Subject::Client(cfs.clone()), 10),
            (
                xr_radar.clone(),
                Subject::Source(radar.clone()),
                radar_total,
            ),
            (xr_radar.clone(), Subject::AllClients, radar_total),
            (xr_sat.clone(), Subject::Client(edu.clone()), 10),
            (xr_sat.clone(), Subject::Source(sat.clone()), 10),
        ],
    )
    .await;
    // The hostile names are counted under their names (cut to 255 bytes) for the admins.
    let cut = |s: &str| pumpwatch::core::topic::truncated(s, 255).to_owned();
    // Stamped names count under their names; unstamped ones (the relPath pattern only
    // ever names a declared source) under `unknown`.
    let mut wants: Vec<Subject> = hostile_sources
        .iter()
        .map(|n| Subject::Source(cut(n)))
        .collect();
    wants.push(Subject::Source(speedo::UNKNOWN.into()));
    wants.extend(hostile_clients.iter().map(|n| Subject::Client(cut(n))));
    let t0 = Instant::now();
    loop {
        let subjects = seen.subjects("xreport");
        let missing: Vec<&Subject> = wants.iter().filter(|w| !subjects.contains(w)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < T,
            "hostile names missing on xreport: {missing:?}\nseen: {subjects:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let after = pump.exchanges().await;
    assert_eq!(after, before, "speedo created no exchange");

    // An exchange deleted under speedo: its publishes are refused (the broker closes the
    // publish channel). radar's speedos, and sat's once its exchange is back, go on.
    pump.vh
        .mgmt
        .delete_exchange(&pump.vh.name, &xr_sat)
        .await
        .unwrap();
    let more: Vec<Outgoing> = (10..15)
        .flat_map(|i| {
            [
                stamped(&cfs, &radar, &format!("20260101/{radar}/f{i}"), 201),
                stamped(&edu, &sat, &format!("20260101/{sat}/f{i}"), 201),
            ]
        })
        .collect();
    publish_all(&feed, "xreport", &more).await;
    feed.close().await;
    seen.wait(
        "radar's and the admins' speedos after xr_sat was deleted",
        &[
            (x("xreport"), Subject::Client(cfs.clone()), 15),
            (x("xreport"), Subject::Client(edu.clone()), 15),
            (x("xreport"), Subject::Source(sat.clone()), 15),
            (xr_radar.clone(), Subject::Client(cfs.clone()), 15),
            (
                xr_radar.clone(),
                Subject::Source(radar.clone()),
                radar_total + 5,
            ),
        ],
    )
    .await;
    common::wait_until("xr_sat declared again by speedo", T, || async {
        pump.exchanges().await.contains(&xr_sat)
    })
    .await;

    shutdown.cancel();
    let summary = tokio::time::timeout(Duration::from_secs(5), speedo)
        .await
        .expect("speedo stops within 5 s")
        .unwrap()
        .unwrap();
    eprintln!(
        "FIGURE speedo: {} hostile source names + {} hostile client names counted on xreport, 0 exchanges created; xr_sat deleted under speedo: {summary}",
        hostile_sources.len(),
        hostile_clients.len()
    );
    assert_eq!(summary.failed, 0, "{summary}");
    assert_eq!(summary.malformed, 0, "{summary}");
}

// ---------------------------------------------------------------------------------------
// 6. Slow HTTP clients
// ---------------------------------------------------------------------------------------

/// Connections that never finish their headers, in the flood.
const FLOOD: usize = 5000;

/// Open descriptors of a process.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// One request on a fresh connection; the time to the full response, or why not.
async fn probe(addr: std::net::SocketAddr, path: &str) -> Result<Duration, String> {
    let t0 = Instant::now();
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
        let head = String::from_utf8_lossy(&out[..out.len().min(12)]).to_string();
        if head.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(format!("answered {head:?}"))
        }
    };
    match tokio::time::timeout(Duration::from_secs(1), attempt).await {
        Ok(Ok(())) => Ok(t0.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("no answer within 1 s".into()),
    }
}

/// A connection that had one request answered and then stays idle (keep-alive).
async fn keep_alive(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    s
}

/// True once the server closed `s` (EOF or reset).
async fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // a response (e.g. 408): read on
            Err(_) => return false,
        }
    }
}

/// `serve` (the real binary, as an admin made by setup) under 5 000 connections that never
/// finish their headers, 50 that drip a header byte every 300 ms, and 300 idle keep-alive
/// connections, while a normal client asks `/healthz` and `/api/status` on fresh
/// connections all along: every answer comes within 1 s, the descriptors of `serve` stay
/// bounded by the connection cap, and the half-requests left are closed after the header
/// deadline.
#[tokio::test]
async fn slow_http_clients_never_starve_serve() {
    let Some(pump) = Pump::new("hostile-http", &[("boss", "admin")], "").await else {
        return;
    };
    let cfg = pump.config_path.to_str().unwrap().to_owned();
    let url = pump.url("boss");
    let serve = common::proc::spawn(&[
        "--config",
        &cfg,
        "--broker",
        &url,
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--auth",
        "none",
    ]);
    serve.wait_stderr("pumpwatch serve: http://", T).await;
    let line = serve.stderr_text();
    let addr: std::net::SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let pid = serve.pid().unwrap();
    common::wait_until("serve connected", T, || async move {
        probe(addr, "/healthz").await.is_ok()
    })
    .await;
    let baseline = descriptors(pid);

    // The normal client, all along.
    let stop = Shutdown::new();
    let prober = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut worst, mut answered, mut failures) = (Duration::ZERO, 0u32, Vec::new());
            while !stop.is_cancelled() {
                for path in ["/healthz", "/api/status"] {
                    match probe(addr, path).await {
                        Ok(d) => {
                            worst = worst.max(d);
                            answered += 1;
                        }
                        Err(e) => failures.push(format!("{path}: {e}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (worst, answered, failures)
        })
    };
    let fd_max = Arc::new(Mutex::new(baseline));
    let sampler = {
        let (stop, fd_max) = (stop.clone(), fd_max.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let n = descriptors(pid);
                {
                    let mut m = fd_max.lock().unwrap();
                    *m = (*m).max(n);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // 300 idle keep-alive connections (one request answered, then silence).
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(keep_alive(addr).await);
    }
    // Half-sent requests, as fast as they connect.
    let flood_start = Instant::now();
    let mut half = Vec::new();
    for i in 0..FLOOD {
        if let Ok(mut s) = TcpStream::connect(addr).await {
            let _ = s
                .write_all(
                    format!("GET /api/status HTTP/1.1\r\nHost: x\r\nX-Slow-{i}: ").as_bytes(),
                )
                .await;
            half.push(s);
        }
    }
    let flood_secs = flood_start.elapsed().as_secs_f64();
    // 50 drip-fed ones: a header byte every 300 ms, forever.
    let mut drips = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        drips.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\n").await;
            loop {
                if s.write_all(b"X").await.is_err() || closed(&mut s).await {
                    return t0.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
    }
    common::wait_until("every drip-fed connection closed", T, || {
        let done = drips.iter().all(|d| d.is_finished());
        async move { done }
    })
    .await;
    let mut drip_worst = Duration::ZERO;
    for d in drips {
        drip_worst = drip_worst.max(d.await.unwrap());
    }
    let mut idle_closed = 0;
    for s in idle.iter_mut() {
        idle_closed += usize::from(closed(s).await);
    }
    common::wait_until(
        "serve's descriptors back to the baseline",
        T,
        || async move { descriptors(pid) <= baseline + 4 },
    )
    .await;
    let flood_fd_max = *fd_max.lock().unwrap();
    drop(half);

    // Below the cap, nothing pushes them out: 100 half-requests and 20 idle keep-alive
    // connections are closed by the deadline alone.
    let late_start = Instant::now();
    let mut late = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        late.push(s);
    }
    for _ in 0..20 {
        late.push(keep_alive(addr).await);
    }
    let late = Arc::new(tokio::sync::Mutex::new(late));
    let open_at = |late: Arc<tokio::sync::Mutex<Vec<TcpStream>>>| async move {
        let mut late = late.lock().await;
        let mut open = 0;
        for s in late.iter_mut() {
            open += usize::from(!closed(s).await);
        }
        open
    };
    let still_open_at_4s = {
        tokio::time::sleep_until((late_start + Duration::from_secs(4)).into()).await;
        open_at(late.clone()).await
    };
    common::wait_until(
        "the late half-requests and idle connections closed",
        T,
        || {
            let late = late.clone();
            async move { open_at(late).await == 0 }
        },
    )
    .await;
    let late_closed = late_start.elapsed();
    stop.cancel();
    let (worst, answered, failures) = prober.await.unwrap();
    sampler.await.unwrap();
    eprintln!(
        "FIGURE http: {FLOOD} half-requests in {flood_secs:.2} s + 300 idle keep-alive + 50 drip-fed (a byte every 300 ms); \
         {answered} normal requests (/healthz, /api/status) on fresh connections meanwhile, worst {:.0} ms, {} failed; \
         serve's descriptors: {baseline} at rest, at most {flood_fd_max} under the flood (cap 512 connections), back to rest after; \
         drip-fed closed within {:.2} s; {idle_closed}/300 idle keep-alive closed; \
         below the cap, 100 half-requests + 20 idle: {still_open_at_4s}/120 still open at 4 s, all closed {:.2} s after they were sent (deadline 5 s)",
        worst.as_secs_f64() * 1000.0,
        failures.len(),
        drip_worst.as_secs_f64(),
        late_closed.as_secs_f64()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert!(worst < Duration::from_secs(1));
    assert!(
        answered > 20,
        "the normal client kept being answered: {answered}"
    );
    assert!(
        flood_fd_max <= baseline + 512 + 64 + 4,
        "descriptors bounded by the cap: {flood_fd_max}"
    );
    assert_eq!(idle_closed, 300);
    let (code, _, stderr) = {
        serve.signal("TERM");
        serve.finish(T).await
    };
    assert_eq!(code, 0, "{stderr}");
}

// ---------------------------------------------------------------------------------------
// 7a, 7b. Long names, passwords in errors
// ---------------------------------------------------------------------------------------

/// A 100 × "€" `--exchange` (300 bytes) and other names AMQP cannot carry are a usage
/// error (exit 2), never a panic (exit 101); and a password holding `/ @ : % #` never
/// appears in anything `setup`, `log` or `speedo` print when they fail, whatever the way
/// it was given (percent-encoded, raw) or the failure (refused login, no permission,
/// unreachable broker, management API refusing).
#[tokio::test]
async fn long_names_and_passwords_in_errors() {
    let Some(pump) = Pump::new(
        "hostile-cli",
        &[("cfs", "subscriber"), ("radar", "source")],
        "",
    )
    .await
    else {
        return;
    };
    let euro = "€".repeat(100);
    let long = "é".repeat(128); // 256 bytes
    let fits = format!("{}x", "é".repeat(127)); // 255 bytes: a valid name, no such exchange
    for args in [
        vec!["log", "--exchange", &euro, "--count", "1"],
        vec!["log", "--exchange", &long, "--count", "1"],
        vec![
            "report",
            "--exchange",
            &euro,
            "--code",
            "201",
            "--relpath",
            "a/b",
        ],
        vec!["simulate", "--exchange", &euro, "--count", "1"],
    ] {
        let mut full = vec!["--broker", &pump.vh.amqp_url];
        full.extend(args.iter().copied());
        let (code, _, stderr) = common::proc::run(&full, T).await;
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("--exchange"), "{stderr}");
    }
    // A name that fits but does not exist: a runtime error in one line (exit 1), even
    // though the broker's answer naming it is cut inside a character.
    let (code, _, stderr) = common::proc::run(
        &[
            "--broker",
            &pump.vh.amqp_url,
            "log",
            "--exchange",
            &fits,
            "--count",
            "1",
        ],
        T,
    )
    .await;
    assert_eq!(code, 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let user = pump.user("cfs");
    let secret = pump.password("cfs");
    let host = "127.0.0.1:5672";
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let vhost = enc(&pump.vh.name);
    let wrong = password("wrong");
    let urls = [
        (
            "right password, no permission",
            format!("amqp://{}:{}@{host}/{vhost}", enc(&user), enc(&secret)),
        ),
        (
            "wrong password",
            format!("amqp://{}:{}@{host}/{vhost}", enc(&user), enc(&wrong)),
        ),
        (
            "unreachable",
            format!("amqp://{}:{}@127.0.0.1:1/{vhost}", enc(&user), enc(&secret)),
        ),
        (
            "raw password",
            format!("amqp://{user}:{secret}@{host}/{vhost}"),
        ),
    ];
    let admin_url = format!("http://{}:{}@127.0.0.1:15672", enc(&user), enc(&secret));
    let admin_raw = format!("http://{user}:{secret}@127.0.0.1:15672");
    let cfg = pump.config_path.to_str().unwrap().to_owned();
    let mut runs = 0;
    for (what, url) in &urls {
        for args in [
            vec![
                "--config",
                &cfg,
                "--broker",
                url,
                "log",
                "--count",
                "1",
                "--timeout",
                "1",
            ],
            vec!["--config", &cfg, "--broker", url, "speedo"],
            vec!["--config", &cfg, "--broker", url, "setup"],
            vec![
                "--config",
                &cfg,
                "--broker",
                url,
                "--admin-url",
                &admin_url,
                "setup",
            ],
            vec![
                "--config",
                &cfg,
                "--broker",
                url,
                "--admin-url",
                &admin_raw,
                "setup",
            ],
        ] {
            let (code, stdout, stderr) = common::proc::run(&args, T).await;
            runs += 1;
            let all = format!("{}\n{stderr}", stdout.join("\n"));
            assert!(
                code == 1 || code == 2,
                "{what} {args:?}: exit {code}\n{all}"
            );
            for s in [&secret, &wrong] {
                let tail = &s[s.len() - 10..];
                assert!(
                    !all.contains(tail) && !all.contains(&enc(s)),
                    "{what} {args:?} shows the password:\n{all}"
                );
            }
        }
    }
    eprintln!(
        "FIGURE cli: 4 over-long --exchange names -> exit 2, a 255-byte one -> exit 1, no panic; {runs} failing runs of setup/log/speedo with passwords holding / @ : % # -> password never shown"
    );
}

// ---------------------------------------------------------------------------------------
// 1, 5 (and issue 9). Redirecting another source's reports through route
// ---------------------------------------------------------------------------------------

/// An sr3-style announcement (v03 JSON) as a source (or an attacker) posts it.
fn announcement(pub_time: &str, rel_path: &str, identity: &str, source: &str) -> Outgoing {
    let body = serde_json::json!({
        "pubTime": pub_time,
        "baseUrl": "sftp://data.example",
        "relPath": rel_path,
        "identity": {"method": "sha512", "value": identity},
        "size": 1000,
        "source": source,
    });
    Outgoing {
        routing_key: format!("v03.{}", rel_path.replace('/', ".")),
        body: body.to_string().into_bytes(),
        content_type: "application/json",
        headers: Headers::new(),
    }
}

/// An sr3 report: `source` overwritten with the consumer's own user, relPath its local
/// path; only pubTime, the file name and the identity survive.
fn sr3_report(client: &str, pub_time: &str, name: &str, identity: &str) -> Outgoing {
    let body = serde_json::json!({
        "pubTime": pub_time,
        "baseUrl": "file:/",
        "relPath": format!("/home/{client}/data/{name}"),
        "identity": {"method": "sha512", "value": identity},
        "source": client,
        "report": {"code": 201, "timeCompleted": "20260101T000010.000", "message": "ok"},
    });
    Outgoing {
        routing_key: "v03.home.data".into(),
        body: body.to_string().into_bytes(),
        content_type: "application/json",
        headers: Headers::new(),
    }
}

/// Collects what arrives on an exchange (topic, headers, body), as the admin.
#[derive(Clone, Default)]
struct Got(Arc<Mutex<Vec<Msg>>>);

/// (topic, headers, body) of one message seen.
type Msg = (String, Headers, Vec<u8>);

impl Got {
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn names(&self) -> BTreeSet<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, _, b)| {
                let v: serde_json::Value = serde_json::from_slice(b).ok()?;
                let rel = v["relPath"].as_str()?.to_owned();
                Some(rel.rsplit('/').next().unwrap_or("").to_owned())
            })
            .collect()
    }
}

async fn collect(pump: &Pump, exchange: &str, got: &Got) -> Client {
    let queue = format!("q_guest.got.{}", rand::random::<u32>());
    let client = Client::connect(
        &common::broker(&pump.vh.amqp_url),
        ConnectOptions {
            topology: Topology::bound_queue(QueueDecl::exclusive(queue.clone()), exchange, "#"),
            ..ConnectOptions::new(format!("collect {exchange}"))
        },
    )
    .await
    .unwrap();
    let mut consumer = client.consume(&queue, 1000).await.unwrap();
    let got = got.clone();
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            got.0.lock().unwrap().push((
                d.routing_key.clone(),
                d.props.headers.clone(),
                d.body.clone(),
            ));
            let _ = d.ack().await;
        }
    });
    client
}

/// `sat` (a source) and `edu` (a subscriber) try to get `radar`'s reports sent to `sat`,
/// or to get them lost: by announcing radar's products under their own names (same
/// pubTime and file name; same identity), by posting an "announcement" naming sat, by
/// forging stamps and hop counts, by adding `CC`/`BCC` headers, by publishing under
/// `pumpwatch.` topics. Nothing reaches `xr_sat`; a contested product attributes nothing
/// (it goes to admins and `xrejected`, counted ambiguous); every uncontested report of
/// radar's reaches `xr_radar` stamped with its true client and hop count 0.
#[tokio::test]
async fn attribution_cannot_be_hijacked() {
    let Some(pump) = Pump::new(
        "hostile-route",
        &[
            ("radar", "source"),
            ("sat", "source"),
            ("cfs", "subscriber"),
            ("edu", "subscriber"),
            ("feed", "feeder"),
        ],
        "",
    )
    .await
    else {
        return;
    };
    let (radar, sat, cfs, edu) = (
        pump.user("radar"),
        pump.user("sat"),
        pump.user("cfs"),
        pump.user("edu"),
    );
    let cfg =
        pumpwatch::cmd::route::Config::from_args(Default::default(), &pump.common("feed")).unwrap();
    let counters = cfg.counters.clone();
    let stop = Shutdown::new();
    let route = tokio::spawn(pumpwatch::cmd::route::run(cfg, stop.clone()));
    let (on_radar, on_sat, rejected, admin) = (
        Got::default(),
        Got::default(),
        Got::default(),
        Got::default(),
    );
    let _w = [
        collect(&pump, &names::source_exchange(&radar), &on_radar).await,
        collect(&pump, &names::source_exchange(&sat), &on_sat).await,
        collect(&pump, "xrejected", &rejected).await,
        collect(&pump, "xreport", &admin).await,
    ];
    let (c_radar, c_sat, c_cfs, c_edu) = (
        pump.connect("radar").await,
        pump.connect("sat").await,
        pump.connect("cfs").await,
        pump.connect("edu").await,
    );
    let id = |n: u32| format!("{n:0>64x}");
    // radar announces four products.
    let products = [
        ("20260101T000001.000", "a.h5", id(1)),
        ("20260101T000002.000", "b.h5", id(2)),
        ("20260101T000003.000", "c.h5", id(3)),
        ("20260101T000004.000", "d.h5", id(4)),
    ];
    let radar_ann: Vec<Outgoing> = products
        .iter()
        .map(|(t, n, i)| announcement(t, &format!("20260101/{radar}/{n}"), i, &radar))
        .collect();
    // The attackers' claims, posted after radar's.
    // sat: the same pubTime and file name as a.h5; the same identity as b.h5.
    let sat_claims = vec![
        announcement(
            products[0].0,
            &format!("20260101/{sat}/a.h5"),
            &id(91),
            &sat,
        ),
        announcement(
            "20260202T000000.000",
            &format!("20260101/{sat}/zz.h5"),
            &products[1].2,
            &sat,
        ),
    ];
    // edu, a subscriber, "announces" c.h5 as sat's, on its own exchange.
    let edu_claim = vec![announcement(
        products[2].0,
        &format!("20260101/{sat}/c.h5"),
        &products[2].2,
        &sat,
    )];
    // The announcements must be indexed before the reports arrive: one route consumer
    // reads one queue in order, and each poster waits for its confirms.
    publish_all(&c_radar, &names::user_exchange(&radar), &radar_ann).await;
    publish_all(&c_sat, &names::user_exchange(&sat), &sat_claims).await;
    publish_all(&c_edu, &names::user_exchange(&edu), &edu_claim).await;

    let mut reports: Vec<Outgoing> = products
        .iter()
        .map(|(t, n, i)| sr3_report(&cfs, t, n, i))
        .collect();
    // d.h5 again, with forged stamps and hop counts of every kind.
    for (k, hops) in [
        ("int", pumpwatch::core::HeaderValue::Int(-1_000_000)),
        ("max", pumpwatch::core::HeaderValue::Int(i64::MAX)),
        ("text", pumpwatch::core::HeaderValue::Str("999".into())),
    ] {
        let mut r = sr3_report(&cfs, products[3].0, "d.h5", &products[3].2);
        r.headers.set(names::H_HOPS, hops);
        r.headers.set(H_SOURCE, sat.as_str());
        r.headers.set(H_CLIENT, edu.as_str());
        r.headers.set("forged", k);
        reports.push(r);
    }
    // d.h5 again, with its own routing instructions towards sat.
    let to_sat = names::source_route_key(&sat);
    let steer = |name: &str, value: pumpwatch::core::HeaderValue| {
        let mut r = sr3_report(&cfs, products[3].0, "d.h5", &products[3].2);
        r.headers.set(name, value);
        r
    };
    use pumpwatch::core::HeaderValue::{Array, Str};
    reports.push(steer("BCC", Array(vec![Str(to_sat.clone())])));
    reports.push(steer(
        "CC",
        Array(vec![Str(to_sat.clone()), Str(names::UNROUTED_KEY.into())]),
    ));
    // (A `BCC` that is not an array never gets this far: the broker refuses the publish.)
    // And under the reserved topic space.
    let mut reserved = Vec::new();
    for topic in [
        to_sat.clone(),
        to_sat.to_uppercase(),
        "pumpwatch.forward.x".into(),
        names::UNROUTED_KEY.into(),
    ] {
        let mut r = sr3_report(&cfs, products[3].0, "d.h5", &products[3].2);
        r.routing_key = topic;
        reserved.push(r);
    }
    reports.extend(reserved);
    publish_all(&c_cfs, &names::user_exchange(&cfs), &reports).await;

    // 4 + 3 forged + 2 steered = 9 reports were published to xreport (a.h5 and b.h5 as
    // unrouted), 4 reserved topics were rejected.
    let n_admin = 9;
    let (a, r) = (admin.clone(), rejected.clone());
    common::wait_until(
        "every report reached xreport and the rejects xrejected",
        T,
        || {
            let done = a.len() >= n_admin && r.len() >= 2 + 4;
            async move { done }
        },
    )
    .await;
    let o = on_radar.clone();
    common::wait_until("radar's reports on xr_radar", T, || {
        let done = o.len() >= 7;
        async move { done }
    })
    .await;
    stop.cancel();
    route.await.unwrap().unwrap();

    // Nothing for the attacker's source, ever.
    assert_eq!(on_sat.len(), 0, "something reached xr_sat");
    // radar got c.h5 (edu's claim was ignored) and d.h5 (6 times: plain, forged, steered),
    // never the contested a.h5 and b.h5.
    assert_eq!(on_radar.len(), 7);
    assert_eq!(
        on_radar.names(),
        ["c.h5", "d.h5"].iter().map(|s| s.to_string()).collect()
    );
    for (_, h, _) in on_radar.0.lock().unwrap().iter() {
        assert_eq!(h.get_str(H_CLIENT), Some(cfs.as_str()), "{h:?}");
        assert_eq!(h.get_str(H_SOURCE), Some(radar.as_str()), "{h:?}");
        assert_eq!(
            h.get(names::H_HOPS).and_then(|v| v.as_i64()),
            Some(0),
            "{h:?}"
        );
        assert!(h.get("CC").is_none() && h.get("BCC").is_none(), "{h:?}");
    }
    // The contested products went to admins and xrejected as nobody's.
    let reasons: Vec<String> = rejected
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(_, h, _)| h.get_str(names::H_REASON).unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| *r == "unknown source").count(),
        2,
        "{reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.starts_with("reserved topic"))
            .count(),
        4,
        "{reasons:?}"
    );
    assert_eq!(counters.get("announcement_ambiguous"), 2);
    assert_eq!(counters.get("announcement_ignored"), 1);
    assert_eq!(counters.get("announcement_indexed"), 4);
    println!(
        "FIGURE route: {} on xr_radar, 0 on xr_sat, contested 2 unrouted, 4 reserved topics rejected; {}",
        on_radar.len(),
        counters.summary()
    );
}
