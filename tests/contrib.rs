//! Packaging (issue #14 point 4): `--version` names the build's commit, `--log-format
//! json` logs JSON lines, and `contrib/` (the systemd unit, the Prometheus rules, the
//! Grafana dashboard) passes the tools that read it and names only metrics a daemon
//! exports. No broker needed; the external tools (`systemd-analyze`, `promtool`) are used
//! when installed, else that check prints SKIP.

mod common;

use common::proc;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `name` on PATH, else under target/tools (where scripts/contrib-deps puts promtool).
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .chain([root().join("target/tools").join(name)])
        .find(|p| p.is_file())
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn version_names_the_commit() {
    let (ok, out) = run(Command::new(proc::bin()).arg("--version"));
    assert!(ok, "{out}");
    let line = out.trim();
    let want_prefix = format!("pumpwatch {} (commit ", env!("CARGO_PKG_VERSION"));
    let commit = line
        .strip_prefix(&want_prefix)
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{line:?}"));
    // What build.rs read: the checkout's HEAD (cargo rebuilt when it moved), or unknown.
    let head = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match head {
        Some(h) => assert_eq!(commit, h, "{line}"),
        None => assert_eq!(commit, "unknown", "{line}"),
    }
}

#[tokio::test]
async fn log_format_json_writes_one_object_per_line() {
    // A bad value is a usage error, broker or not.
    let (code, _, stderr) =
        proc::run(&["--log-format", "xml", "trace"], Duration::from_secs(20)).await;
    assert_eq!(code, 2, "{stderr}");
    // A daemon's log lines, from its start to its stop.
    let Some(vh) = common::vhost("logjson").await else {
        return;
    };
    let p = proc::spawn(&["--log-format", "json", "--broker", &vh.amqp_url, "route"]);
    p.wait_stderr("route started", Duration::from_secs(20))
        .await;
    p.signal("TERM");
    let (code, _, stderr) = p.finish(Duration::from_secs(10)).await;
    assert_eq!(code, 0, "{stderr}");
    let json: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert!(json.len() >= 2, "{stderr}");
    for v in &json {
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{v}");
        assert!(v["fields"]["message"].is_string(), "{v}");
    }
    let started = json
        .iter()
        .find(|v| v["fields"]["message"] == "route started")
        .expect("route started");
    assert_eq!(started["level"], "INFO");
    // Fields stay fields; the password stays out as in text logs.
    let b = started["fields"]["broker"].as_str().expect("broker field");
    assert!(b.starts_with("amqp://guest:****@"), "{b}");
    assert!(!stderr.contains("guest:guest"), "{stderr}");
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = read("contrib/systemd/pumpwatch@.service");
    for must in [
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "StateDirectory=pumpwatch/%i",
        "EnvironmentFile=-/etc/pumpwatch/pumpwatch.env",
        "--log-format json %i",
    ] {
        assert!(unit.contains(must), "the unit lacks {must}");
    }
    let Some(analyze) = tool("systemd-analyze") else {
        eprintln!("SKIP: systemd-analyze is not installed; the unit was not verified");
        return;
    };
    // An instance of the template, running the binary under test (verify checks that
    // ExecStart's program exists).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pumpwatch@route.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/pumpwatch", proc::bin())).unwrap();
    let (ok, out) = run(Command::new(analyze).arg("verify").arg(&path));
    // verify exits 0 on unknown keys and bad values too: any word from it is a failure.
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify:\n{out}"
    );
}

#[test]
fn the_alerting_rules_pass_promtool() {
    let Some(promtool) = tool("promtool") else {
        eprintln!(
            "SKIP: promtool is not installed (scripts/contrib-deps fetches it); the rules were \
             not checked"
        );
        return;
    };
    let dir = root().join("contrib/prometheus");
    let (ok, out) = run(Command::new(&promtool)
        .args(["check", "rules", "pumpwatch-rules.yml"])
        .current_dir(&dir));
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = run(Command::new(&promtool)
        .args(["test", "rules", "pumpwatch-rules.test.yml"])
        .current_dir(&dir));
    assert!(ok, "promtool test rules:\n{out}");
}

/// The metric names an expression text uses.
fn metrics_in(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\bpumpwatch_[a-z0-9_]*[a-z0-9]").unwrap();
    re.find_iter(text).map(|m| m.as_str().to_owned()).collect()
}

/// Every expression of the dashboard's panels.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().expect("expr").to_owned());
        }
    }
    out
}

/// What the daemons' collectors export, read from their source: the descriptor names
/// (string literals) with the `pumpwatch_` prefix, `_total` for counters, and serve's
/// per-kind families (`client_`, `source_`, `pump_` + a literal).
fn exported(name: &str, literals: &BTreeSet<String>) -> bool {
    let Some(rest) = name.strip_prefix("pumpwatch_") else {
        return false;
    };
    let base = rest.strip_suffix("_total").unwrap_or(rest);
    literals.contains(base)
        || ["client_", "source_", "pump_"]
            .iter()
            .any(|k| base.strip_prefix(k).is_some_and(|w| literals.contains(w)))
}

fn literals() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    for d in ["serve", "route", "archive", "watchdog"] {
        walk(&root().join("src/cmd").join(d), &mut files);
    }
    // Plain names ("archive_lines") and serve's per-kind ones ("{prefix}_lag_seconds").
    let re = regex::Regex::new(r#""(?:\{prefix\}_)?([a-z][a-z0-9_]*)""#).unwrap();
    let mut set = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        set.extend(re.captures_iter(&text).map(|c| c[1].to_owned()));
    }
    set
}

#[test]
fn the_dashboard_and_the_rules_name_exported_metrics() {
    let dash: serde_json::Value =
        serde_json::from_str(&read("contrib/grafana/pumpwatch-dashboard.json"))
            .expect("the dashboard is valid JSON");
    assert_eq!(dash["uid"], "pumpwatch");
    let panels = dash["panels"].as_array().expect("panels");
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    let exprs = dashboard_exprs(&dash);
    assert!(exprs.len() > 20, "{} expressions", exprs.len());
    let mut used: BTreeSet<String> = exprs.iter().flat_map(|e| metrics_in(e)).collect();
    // Every daemon with /metrics has a panel.
    for prefix in [
        "pumpwatch_client_",
        "pumpwatch_source_",
        "pumpwatch_pump_",
        "pumpwatch_route_",
        "pumpwatch_archive_",
        "pumpwatch_watchdog_",
    ] {
        assert!(
            used.iter().any(|m| m.starts_with(prefix)),
            "no panel shows {prefix}*"
        );
    }
    used.extend(metrics_in(&read("contrib/prometheus/pumpwatch-rules.yml")));
    let lits = literals();
    let unknown: Vec<&String> = used.iter().filter(|m| !exported(m, &lits)).collect();
    assert!(unknown.is_empty(), "metrics no daemon exports: {unknown:?}");
    // The check itself tells a made-up name from a real one.
    assert!(!exported("pumpwatch_client_good_file_total", &lits));
    assert!(exported("pumpwatch_client_good_files_total", &lits));
}
