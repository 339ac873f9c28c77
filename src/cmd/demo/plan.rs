//! What the demo sets up, as pure values: who is on the simulated pump, the configuration
//! file the daemons run with, and the text the demo prints (the URLs and the commands to
//! try). No I/O here, so the tests see exactly what a user will.

use crate::cmd::simulate::generate::names;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Sources, clients and nodes of the simulated pump (simulate's first names, so the
/// configuration declares exactly who simulate makes report).
pub const SOURCES: u32 = 3;
pub const CLIENTS: u32 = 4;
pub const HOSTS: u32 = 4;
/// The client that stops reporting (simulate `--stop-client`).
pub const STOPPING_CLIENT: &str = "dfo";
/// The client most of whose transfers fail (WARNING `errors`), and how many.
pub const FLAKY_CLIENT: &str = "nrcan";
pub const FLAKY_RATIO: f64 = 0.6;
/// The node that fails with transfers in flight (simulate `--fail-node`).
pub const FAILING_NODE: &str = "node4";
/// The cluster name of the demo pump (the archive's `<dir>/<cluster>`).
pub const CLUSTER: &str = "demo.pump";
/// Health thresholds short enough to see every state within minutes.
pub const TD: Duration = Duration::from_secs(30);
pub const WINDOW: Duration = Duration::from_secs(120);
/// A node silent this long while holding transfers is failed by the watchdog.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(30);

/// The demo's users, as (name, role) in the order they are declared.
pub fn users() -> Vec<(String, &'static str)> {
    let sources = names(&SOURCE_NAMES, SOURCES)
        .into_iter()
        .map(|s| (s, "source"));
    let clients = names(&CLIENT_NAMES, CLIENTS)
        .into_iter()
        .map(|c| (c, "subscriber"));
    sources.chain(clients).collect()
}

// simulate's name lists, first entries (kept in step by `the_cast_is_simulates`).
const SOURCE_NAMES: [&str; 3] = ["radar", "sat", "ec_cmc"];
const CLIENT_NAMES: [&str; 4] = ["cfs", "edu", "nrcan", "dfo"];

/// A demo user's password: not a secret (the demo's users live as long as the demo).
pub fn password(user: &str) -> String {
    format!("demo-{user}")
}

/// The environment variable the configuration names for `user`'s password.
pub fn password_env(user: &str) -> String {
    format!("PW_{}", user.to_ascii_uppercase().replace('-', "_"))
}

/// Where everything listens and lives.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
    pub serve: SocketAddr,
    pub route: SocketAddr,
    pub watchdog: SocketAddr,
    pub archive: SocketAddr,
    /// speedo's interval (short, so the page moves).
    pub speedo_interval: Duration,
}

impl Layout {
    pub fn config_file(&self) -> PathBuf {
        self.dir.join("pumpwatch.toml")
    }
    pub fn archive_dir(&self) -> PathBuf {
        self.dir.join("archive")
    }
    pub fn watchdog_dir(&self) -> PathBuf {
        self.dir.join("watchdog")
    }
}

/// A TOML string: quoted and escaped (a directory may hold any character).
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn path(p: &Path) -> String {
    quoted(&p.to_string_lossy())
}

/// The configuration file every component of the demo runs with (and the commands the
/// demo suggests read): the users, short thresholds, the watchdog and the archive.
pub fn config_toml(l: &Layout) -> String {
    let mut t = format!(
        "# Written by `pumpwatch demo`: the configuration its daemons run with.\n\
         cluster = \"{CLUSTER}\"\n\n"
    );
    for (name, role) in users() {
        t += &format!(
            "[users.{name}]\nrole = \"{role}\"\npassword_env = \"{}\"\n",
            password_env(&name)
        );
        if role == "source" {
            t += "retain = 1000\n";
        }
    }
    t += &format!(
        "\n[thresholds.default]\ntd = {}\nwindow = {}\n\n\
         [speedo]\ninterval = {}\nall_interval = 1\n\n\
         [serve]\nlisten = {}\n\n\
         [watchdog]\nlisten = {}\nstate_dir = {}\nnode_timeout = {}\nrepost = true\n\n\
         [archive]\ndir = {}\nlisten = {}\n",
        TD.as_secs(),
        WINDOW.as_secs(),
        l.speedo_interval.as_secs_f64(),
        quoted(&l.serve.to_string()),
        quoted(&l.watchdog.to_string()),
        path(&l.watchdog_dir()),
        NODE_TIMEOUT.as_secs(),
        path(&l.archive_dir()),
        quoted(&l.archive.to_string()),
    );
    t
}

/// What the banner needs besides the layout.
#[derive(Debug, Clone)]
pub struct Banner<'a> {
    pub layout: &'a Layout,
    pub vhost: &'a str,
    /// The broker URL of the demo's vhost, as the commands should use it (the password
    /// shown only when it is the well-known `guest`).
    pub broker_for_commands: String,
    /// A source's URL (its own account), for its view.
    pub source_url: String,
    /// The directory of this binary when `pumpwatch` on PATH is not it: the commands
    /// put it first on PATH.
    pub path_dir: Option<String>,
    pub setup_changes: usize,
    pub stop_after: Duration,
    pub fail_after: Duration,
    pub keep: bool,
    /// Whether the directory was made by the demo (and goes with it).
    pub temp_dir: bool,
}

/// Shell-quotes `s` when it needs it.
pub fn sh(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+%".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The text printed once everything runs: where to look and what to type.
pub fn banner(b: &Banner<'_>) -> String {
    let l = b.layout;
    let serve = format!("http://{}", l.serve);
    let (first_source, first_client) = ("radar", "cfs");
    let mut t = String::new();
    t += &format!(
        "pumpwatch demo: a simulated pump in vhost {} ({} setup changes), files in {}\n\n",
        b.vhost,
        b.setup_changes,
        l.dir.display()
    );
    t += &format!("  dashboard  {serve}/\n");
    t += &format!(
        "             log in as guest / guest (admin: everything), {first_source} / {} \
         (a source: its products), {first_client} / {} (a subscriber: its row)\n",
        password(first_source),
        password(first_client)
    );
    t += &format!(
        "  metrics    {serve}/metrics (serve, admin login), http://{}/metrics (route),\n             \
         http://{}/metrics (watchdog), http://{}/metrics (archive)\n",
        l.route, l.watchdog, l.archive
    );
    t += &format!(
        "  the pump   sources radar, sat, ec_cmc; clients cfs, edu, nrcan, dfo on node1..node4; \
         10 % of transfers fail, {} % of {FLAKY_CLIENT}'s;\n             {STOPPING_CLIENT} stops reporting after {} s \
         (CRITICAL {} s later), {FAILING_NODE} fails after {} s (failed by the watchdog {} s later)\n\n",
        FLAKY_RATIO * 100.0,
        b.stop_after.as_secs(),
        TD.as_secs(),
        b.fail_after.as_secs(),
        NODE_TIMEOUT.as_secs()
    );
    t += "Try, in another terminal:\n";
    // In the directory, ./pumpwatch.toml is the configuration every command reads.
    t += &format!("  cd {}\n", sh(&l.dir.to_string_lossy()));
    let mut env = String::new();
    if let Some(dir) = &b.path_dir {
        env += &format!("PATH={}:\"$PATH\" ", sh(dir));
    }
    env += &format!("PUMPWATCH_BROKER={}", sh(&b.broker_for_commands));
    t += &format!("  export {env}\n");
    let cmds: Vec<(String, &str)> = vec![
        (
            "pumpwatch log --count 5".into(),
            "the live reports, as an admin sees them",
        ),
        (
            "pumpwatch log --code 4xx --client edu --count 3".into(),
            "only edu's failures",
        ),
        (
            format!("pumpwatch --broker {} log --count 3", sh(&b.source_url)),
            "what the source radar sees (xr_radar)",
        ),
        (
            format!("pumpwatch check --url {serve} -v"),
            "the Nagios plugin (logs in as PUMPWATCH_BROKER's user)",
        ),
        (
            format!("pumpwatch check --url {serve} --client {STOPPING_CLIENT}"),
            "CRITICAL once dfo stopped",
        ),
        (
            format!("pumpwatch check --url {serve} --client {FLAKY_CLIENT}"),
            "WARNING: most of nrcan's transfers fail",
        ),
        (
            format!("pumpwatch inflight --url http://{}", l.watchdog),
            "transfers in flight per node",
        ),
        (
            format!(
                "pumpwatch inflight --url http://{} --node {FAILING_NODE}",
                l.watchdog
            ),
            "what the failed node held",
        ),
        (
            "pumpwatch trace --dir archive --source radar --limit 2".into(),
            "the life of radar's products, from the archive",
        ),
        (
            "pumpwatch trace --dir archive --code 4xx --client nrcan --limit 1 --json".into(),
            "one of nrcan's failures, as JSON",
        ),
    ];
    let width = cmds.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
    for (c, why) in cmds {
        t += &format!("  {c:width$}  # {why}\n");
    }
    t += "\n";
    let gone = if b.keep {
        format!("leaves vhost {} and its users in place (--keep)", b.vhost)
    } else if b.temp_dir {
        format!(
            "removes vhost {}, its users and {}",
            b.vhost,
            l.dir.display()
        )
    } else {
        format!("removes vhost {} and its users", b.vhost)
    };
    t += &format!("Ctrl-C stops everything and {gone}.\n");
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::simulate::Plan;

    fn layout() -> Layout {
        Layout {
            dir: PathBuf::from("/tmp/pw demo"),
            serve: "127.0.0.1:8080".parse().unwrap(),
            route: "127.0.0.1:9101".parse().unwrap(),
            watchdog: "127.0.0.1:8090".parse().unwrap(),
            archive: "127.0.0.1:9102".parse().unwrap(),
            speedo_interval: Duration::from_secs(5),
        }
    }

    #[test]
    fn the_cast_is_simulates() {
        let plan = Plan::new(SOURCES, CLIENTS, HOSTS);
        let declared: Vec<String> = users().into_iter().map(|(n, _)| n).collect();
        let simulated: Vec<String> = plan.sources.iter().chain(&plan.clients).cloned().collect();
        assert_eq!(declared, simulated);
        assert!(plan.clients.iter().any(|c| c == STOPPING_CLIENT));
        assert!(plan.clients.iter().any(|c| c == FLAKY_CLIENT));
        assert!(plan.hosts.iter().any(|h| h == FAILING_NODE));
    }

    #[test]
    fn the_configuration_parses_and_declares_everyone() {
        let l = layout();
        let text = config_toml(&l);
        let c = crate::config::Config::parse(&text, "demo.toml").expect(&text);
        assert_eq!(c.cluster, CLUSTER);
        assert_eq!(c.users.len(), (SOURCES + CLIENTS) as usize);
        assert_eq!(c.sources().count(), SOURCES as usize);
        assert_eq!(c.thresholds_for("cfs").td, TD);
        assert_eq!(c.serve.listen, "127.0.0.1:8080");
        let w = c.watchdog_settings();
        assert_eq!(w.rules.node_timeout, NODE_TIMEOUT);
        assert!(w.repost);
        // The directory with its space survives the quoting.
        assert!(text.contains(r#"dir = "/tmp/pw demo/archive""#), "{text}");
    }

    #[test]
    fn the_banner_names_every_command_with_its_flags() {
        let l = layout();
        let b = Banner {
            layout: &l,
            vhost: "pwdemo",
            broker_for_commands: "amqp://guest:guest@127.0.0.1:5672/pwdemo".into(),
            source_url: "amqp://radar:demo-radar@127.0.0.1:5672/pwdemo".into(),
            path_dir: Some("/src/pw/target/release".into()),
            setup_changes: 40,
            stop_after: Duration::from_secs(60),
            fail_after: Duration::from_secs(90),
            keep: false,
            temp_dir: true,
        };
        let t = banner(&b);
        for want in [
            "dashboard  http://127.0.0.1:8080/",
            "  cd '/tmp/pw demo'\n",
            "export PATH=/src/pw/target/release:\"$PATH\" \
             PUMPWATCH_BROKER=amqp://guest:guest@127.0.0.1:5672/pwdemo\n",
            "  pumpwatch log --count 5 ",
            "pumpwatch check --url http://127.0.0.1:8080 -v ",
            "pumpwatch inflight --url http://127.0.0.1:8090 ",
            "pumpwatch trace --dir archive --source radar --limit 2 ",
            "--broker amqp://radar:demo-radar@127.0.0.1:5672/pwdemo log",
            "removes vhost pwdemo, its users and /tmp/pw demo",
        ] {
            assert!(t.contains(want), "{want:?} in\n{t}");
        }
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(sh("a/b-c.d"), "a/b-c.d");
        assert_eq!(sh("a b"), "'a b'");
        assert_eq!(sh("it's"), r"'it'\''s'");
        assert_eq!(sh(""), "''");
    }
}
