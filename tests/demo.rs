//! `pumpwatch demo` (SPEC §4.11), the real binary against the real broker: it makes its
//! own vhost, the dashboard fills with clients, every command it prints works as printed
//! (log, check, inflight, trace), every metric `contrib/` uses is one its daemons export,
//! and SIGINT stops it with exit 0 within 10 s, its vhost, users and directory gone.

mod common;

use common::proc;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const T: Duration = Duration::from_secs(60);

/// Removes the vhost if the test fails before the demo did (the demo's own cleanup is
/// what the test checks; this only keeps a failed run from leaving it behind).
struct Leftover(String);

impl Drop for Leftover {
    fn drop(&mut self) {
        let vhost = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _ = common::admin_client().delete_vhost(&vhost).await;
            });
        })
        .join();
    }
}

/// The text after `prefix` on the first stdout line that has it.
fn after(lines: &[String], prefix: &str) -> Option<String> {
    lines
        .iter()
        .find_map(|l| l.trim_start().strip_prefix(prefix).map(str::to_owned))
}

/// Every `http://ADDR/metrics` URL in the banner.
fn metrics_urls(lines: &[String]) -> Vec<String> {
    let re = regex::Regex::new(r"http://[0-9.:]+/metrics").unwrap();
    lines
        .iter()
        .flat_map(|l| re.find_iter(l).map(|m| m.as_str().to_owned()))
        .collect()
}

/// The banner's "Try" block: the `cd` and `export` lines, then each command (without its
/// comment).
fn commands(lines: &[String]) -> (String, Vec<String>) {
    let start = lines
        .iter()
        .position(|l| l.starts_with("Try, in another terminal:"))
        .expect("the commands to try");
    let mut prelude = Vec::new();
    let mut cmds = Vec::new();
    for l in &lines[start + 1..] {
        let l = l.trim();
        if l.is_empty() {
            break;
        }
        if l.starts_with("cd ") || l.starts_with("export ") {
            prelude.push(l.to_owned());
        } else {
            let cmd = l.split("  # ").next().unwrap().trim_end();
            cmds.push(cmd.to_owned());
        }
    }
    (prelude.join(" && "), cmds)
}

/// Runs one printed command as a user would, in bash: (exit code, stdout + stderr).
async fn shell(prelude: &str, cmd: &str) -> (i32, String) {
    let out = tokio::time::timeout(
        T,
        tokio::process::Command::new("bash")
            .arg("-c")
            .arg(format!("{prelude} && {cmd}"))
            .env_remove("PUMPWATCH_BROKER")
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{cmd} took over {T:?}"))
    .expect("bash");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The metric names in a text exposition (counters under their `_total` name too).
fn exposed(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut w = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (w.next(), w.next()) {
                names.insert(name.to_owned());
                if kind == "counter" && !name.ends_with("_total") {
                    names.insert(format!("{name}_total"));
                }
            }
        } else if !l.starts_with('#') {
            let name: String = l
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

/// The metric names `contrib/` (rules and dashboard) uses.
fn contrib_metrics() -> BTreeSet<String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let re = regex::Regex::new(r"\bpumpwatch_[a-z0-9_]*[a-z0-9]").unwrap();
    [
        "contrib/prometheus/pumpwatch-rules.yml",
        "contrib/grafana/pumpwatch-dashboard.json",
    ]
    .iter()
    .flat_map(|f| {
        let text = std::fs::read_to_string(root.join(f)).unwrap();
        re.find_iter(&text)
            .map(|m| m.as_str().to_owned())
            .collect::<Vec<_>>()
    })
    .collect()
}

/// The metric names the README's table of every daemon's `/metrics` lists, its shorthand
/// expanded: `pumpwatch_{client,source}_x` is two names, and `_y` after `pumpwatch_w_x` in
/// the same cell is `pumpwatch_w_y`.
fn readme_metrics() -> BTreeSet<String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme
        .find("## Every daemon's `/metrics`")
        .expect("the metrics section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let span = regex::Regex::new(r"`([a-z0-9_{},]+)`").unwrap();
    let mut names = BTreeSet::new();
    for row in section.lines().filter(|l| l.starts_with('|')) {
        let Some(cell) = row.split('|').nth(2) else {
            continue;
        };
        let mut prefix = String::new();
        for m in span.captures_iter(cell) {
            let text = &m[1];
            let full = if let Some(rest) = text.strip_prefix('_') {
                format!("{prefix}_{rest}")
            } else if let Some(after) = text.strip_prefix("pumpwatch_") {
                // pumpwatch_ and the next word or brace group.
                let end = if after.starts_with('{') {
                    after.find('}').map_or(after.len(), |i| i + 1)
                } else {
                    after.find('_').unwrap_or(after.len())
                };
                prefix = format!("pumpwatch_{}", &after[..end]);
                text.to_owned()
            } else {
                continue;
            };
            names.extend(expand(&full));
        }
    }
    names
}

/// `a_{b,c}_d` is `a_b_d` and `a_c_d` (any number of groups).
fn expand(s: &str) -> Vec<String> {
    let Some(open) = s.find('{') else {
        return vec![s.to_owned()];
    };
    let close = open + s[open..].find('}').expect("closing brace");
    s[open + 1..close]
        .split(',')
        .flat_map(|alt| expand(&format!("{}{alt}{}", &s[..open], &s[close + 1..])))
        .collect()
}

#[test]
fn readme_shorthand_expands() {
    assert_eq!(
        expand("pumpwatch_{client,source}_x_{a,b}"),
        [
            "pumpwatch_client_x_a",
            "pumpwatch_client_x_b",
            "pumpwatch_source_x_a",
            "pumpwatch_source_x_b"
        ]
    );
    let names = readme_metrics();
    for n in [
        "pumpwatch_pump_error_bytes_total",
        "pumpwatch_archive_bytes_total",
        "pumpwatch_watchdog_transfers_failed_over_total",
        "pumpwatch_route_messages_total",
    ] {
        assert!(names.contains(n), "{n} in {names:?}");
    }
}

#[tokio::test]
async fn the_demo_runs_answers_and_cleans_up() {
    if let Err(reason) = common::broker_reachable().await {
        if std::env::var("PUMPWATCH_REQUIRE_BROKER").as_deref() == Ok("1") {
            panic!("no broker ({reason}) and PUMPWATCH_REQUIRE_BROKER=1");
        }
        eprintln!("SKIP: no broker ({reason})");
        return;
    }
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let vhost = format!("pwtest-{secs}-{:08x}-demo", rand::random::<u32>());
    let _leftover = Leftover(vhost.clone());
    let mgmt = common::admin_client();
    // The demo's users are broker-wide: it removes those it made, not those that were
    // there before it (another demo's, or a script's).
    let demo_users = ["radar", "sat", "ec_cmc", "cfs", "edu", "nrcan", "dfo"];
    let existed: BTreeSet<String> = mgmt
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .filter(|n| demo_users.contains(&n.as_str()))
        .collect();
    let any = "127.0.0.1:0";
    let demo = proc::spawn(&[
        "demo",
        "--vhost",
        &vhost,
        "--listen",
        any,
        "--watchdog-listen",
        any,
        "--route-listen",
        any,
        "--archive-listen",
        any,
        "--rate",
        "50",
        "--speedo-interval",
        "1",
    ]);
    demo.wait_stdout_lines(10, T).await;
    common::wait_until("the demo's banner", T, || {
        let done = demo.stdout_lines().iter().any(|l| l.starts_with("Ctrl-C"));
        async move { done }
    })
    .await;
    let lines = demo.stdout_lines();
    let banner = lines.join("\n");
    let serve = after(&lines, "dashboard  ").expect(&banner);
    let serve = serve.trim_end_matches('/').to_owned();
    let dir = PathBuf::from(
        lines[0]
            .split(", files in ")
            .nth(1)
            .unwrap_or_else(|| panic!("{banner}")),
    );
    assert!(dir.join("pumpwatch.toml").is_file(), "{banner}");
    assert!(mgmt.list_vhosts().await.unwrap().contains(&vhost));

    // The dashboard fills with every client (as guest, an admin).
    let http = reqwest::Client::new();
    let status = common::wait_for("the clients in /api/status", T, || {
        let (http, url) = (http.clone(), format!("{serve}/api/status"));
        async move {
            let r = http
                .get(url)
                .basic_auth("guest", Some("guest"))
                .send()
                .await
                .ok()?;
            let v: Value = r.json().await.ok()?;
            let clients = v["clients"].as_array()?;
            (clients.len() >= 4).then_some(v)
        }
    })
    .await;
    let names: BTreeSet<&str> = status["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for c in ["cfs", "edu", "nrcan", "dfo"] {
        assert!(names.contains(c), "{c} in {names:?}");
    }
    // Without a login, nothing.
    let r = http
        .get(format!("{serve}/api/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // Every printed command works as printed.
    let (prelude, cmds) = commands(&lines);
    assert!(cmds.len() >= 8, "{banner}");
    for kind in ["log", "check", "inflight", "trace"] {
        assert!(
            cmds.iter()
                .any(|c| c.starts_with(&format!("pumpwatch {kind}"))
                    || c.contains(&format!(" {kind} "))),
            "no {kind} command in\n{banner}"
        );
    }
    for cmd in &cmds {
        let started = Instant::now();
        let (code, out) = loop {
            let (code, out) = shell(&prelude, cmd).await;
            // The archive fills as the demo runs: trace may find nothing at first.
            let empty_trace = cmd.contains(" trace ") && out.trim().is_empty();
            if !empty_trace || started.elapsed() > T {
                break (code, out);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        if cmd.contains(" check ") {
            // OK, WARNING or CRITICAL: serve answered (UNKNOWN would be 3).
            assert!((0..=2).contains(&code), "{cmd}: exit {code}\n{out}");
            assert!(out.starts_with("PUMPWATCH "), "{cmd}:\n{out}");
        } else {
            assert_eq!(code, 0, "{cmd}:\n{out}");
        }
        if cmd.contains(" log ") {
            let n = out.lines().filter(|l| l.starts_with("20")).count();
            assert!(n >= 3, "{cmd}:\n{out}");
        }
        if cmd.contains(" trace ") && !cmd.contains("--json") {
            assert!(out.contains("source=radar"), "{cmd}:\n{out}");
        }
        if cmd.contains("--client edu") {
            assert!(
                out.lines()
                    .filter(|l| l.starts_with("20"))
                    .all(|l| l.contains(" edu@")),
                "{cmd}:\n{out}"
            );
        }
    }

    // Every metric the rules and the dashboard use, one of the daemons exports.
    let mut all = BTreeSet::new();
    for url in metrics_urls(&lines) {
        let r = http
            .get(&url)
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{url}");
        all.extend(exposed(&r.text().await.unwrap()));
    }
    let missing: Vec<String> = contrib_metrics().difference(&all).cloned().collect();
    assert!(
        missing.is_empty(),
        "not exported by the demo's daemons: {missing:?}"
    );
    // And the README's table lists exactly what they export.
    let listed = readme_metrics();
    // A counter's family name without `_total` is not a name anyone scrapes.
    let exported: BTreeSet<String> = all
        .iter()
        .filter(|n| !all.contains(&format!("{n}_total")))
        .cloned()
        .collect();
    let unlisted: Vec<&String> = exported.difference(&listed).collect();
    let unreal: Vec<&String> = listed.difference(&exported).collect();
    assert!(
        unlisted.is_empty() && unreal.is_empty(),
        "README's metrics table: missing {unlisted:?}, not exported {unreal:?}"
    );

    // Ctrl-C: exit 0 within 10 s, everything it made removed.
    let stop = Instant::now();
    demo.signal("INT");
    let (code, out, err) = demo.finish(Duration::from_secs(10)).await;
    let took = stop.elapsed();
    assert_eq!(code, 0, "{}\n{err}", out.join("\n"));
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        out.iter().any(|l| l.contains("removed vhost")),
        "{}",
        out.join("\n")
    );
    assert!(!mgmt.list_vhosts().await.unwrap().contains(&vhost));
    assert!(!dir.exists(), "{} left behind", dir.display());
    let users: Vec<String> = mgmt
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    for u in demo_users.iter().filter(|u| !existed.contains(**u)) {
        assert!(!users.iter().any(|n| n == u), "user {u} left behind");
    }
    println!("demo stopped in {took:?}");
}
