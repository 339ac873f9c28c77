//! `setup --status`: the state of each neighbour's shovel (SPEC §4.8), in words, so an
//! operator (or a cron job: the exit status is 1 when one is not running) sees at once
//! whether reports leave this pump. Reads only; changes nothing.
//!
//! RabbitMQ says `running`, `starting` (connecting, or waiting to connect again after a
//! failure: a neighbour that is down or refuses the account shows so), or `terminated`
//! with a reason (a failure while running, before the next attempt). The reason is the
//! broker's text, often an Erlang term: it is redacted (URLs, and the passwords this
//! setup knows, wherever they appear), kept to one line and cut to a readable length.

use std::io::Write;

use super::desired::{Desired, DesiredShovel};
use super::{Config, SetupError};
use crate::broker::mgmt::ShovelStatus;
use crate::broker::names;

/// Longest reason shown, in characters.
const REASON_MAX: usize = 300;

/// What `setup --status` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// One per declared neighbour, in name order.
    pub shovels: Vec<ShovelState>,
    /// Shovels named like ours on the broker that no neighbour declares any more.
    pub undeclared: Vec<String>,
}

impl Status {
    pub fn not_running(&self) -> usize {
        self.shovels.iter().filter(|s| !s.running).count()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShovelState {
    pub name: String,
    pub cluster: String,
    pub running: bool,
    /// `running`, `starting`, `terminated: <reason>`, `absent (run setup)`...
    pub words: String,
    /// Reports waiting in its queue (the management API's count, a few seconds old).
    pub waiting: Option<u64>,
}

/// Reads the shovels' states, prints one line each and a summary line.
pub async fn status(cfg: &Config, out: &mut dyn Write) -> Result<Status, SetupError> {
    let desired = super::desired_of(cfg);
    let mgmt = &cfg.mgmt;
    let read = SetupError::Read;
    let vhost_exists = mgmt
        .list_vhosts()
        .await
        .map_err(read)?
        .contains(&desired.vhost);
    let (declared, states) = if vhost_exists {
        let declared = mgmt.list_shovel_names(&desired.vhost).await.map_err(read)?;
        let states = mgmt
            .list_shovel_status(Some(&desired.vhost))
            .await
            .map_err(read)?;
        (declared, states)
    } else {
        (Vec::new(), Vec::new())
    };
    let mut shovels = Vec::new();
    for s in desired.shovels.values() {
        let waiting = if vhost_exists {
            mgmt.get_queue(&desired.vhost, &s.queue)
                .await
                .map_err(read)?
                .map(|q| q.messages)
        } else {
            None
        };
        let state = states.iter().find(|st| st.name == s.name);
        shovels.push(describe(
            s,
            declared.contains(&s.name),
            state,
            waiting,
            &secrets(&desired),
        ));
    }
    let undeclared = declared
        .into_iter()
        .filter(|n| names::forward_shovel_cluster(n).is_some() && !desired.shovels.contains_key(n))
        .collect();
    let status = Status {
        shovels,
        undeclared,
    };
    for line in lines(&desired, &status) {
        writeln!(out, "{}", crate::core::text::escape(&line))?;
    }
    out.flush()?;
    Ok(status)
}

/// Every password this setup would hand to a shovel: scrubbed from reasons too.
fn secrets(desired: &Desired) -> Vec<String> {
    desired
        .shovels
        .values()
        .filter_map(|s| s.spec.as_ref())
        .filter_map(|spec| crate::broker::url::BrokerUrl::parse(&spec.dest_uri).ok())
        .map(|u| u.password().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// One shovel's state in words. Pure.
pub fn describe(
    s: &DesiredShovel,
    declared: bool,
    state: Option<&ShovelStatus>,
    waiting: Option<u64>,
    secrets: &[String],
) -> ShovelState {
    let (running, words) = match (declared, state) {
        (false, _) => (false, "absent (run setup)".to_owned()),
        (true, None) => (false, "not started by the broker".to_owned()),
        (true, Some(st)) if st.is_running() => (true, "running".to_owned()),
        (true, Some(st)) => {
            let state = if st.state.is_empty() {
                "unknown"
            } else {
                st.state.as_str()
            };
            match st.reason.as_deref().filter(|r| !r.is_empty()) {
                Some(reason) => (false, format!("{state}: {}", scrub(reason, secrets))),
                None => (false, state.to_owned()),
            }
        }
    };
    ShovelState {
        name: s.name.clone(),
        cluster: s.cluster.clone(),
        running,
        words,
        waiting,
    }
}

/// A broker's reason made safe to print: URLs redacted, known passwords replaced
/// wherever they appear (an Erlang term may carry one outside a URL), one line, cut.
fn scrub(reason: &str, secrets: &[String]) -> String {
    let mut text = crate::broker::url::redact(reason);
    for secret in secrets {
        text = text.replace(secret.as_str(), "****");
    }
    let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(REASON_MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// The lines `setup --status` prints.
pub fn lines(desired: &Desired, status: &Status) -> Vec<String> {
    let mut out = Vec::new();
    for s in &status.shovels {
        let shown = desired
            .shovels
            .get(&s.name)
            .map(|d| d.shown.as_str())
            .unwrap_or_default();
        let waiting = match s.waiting {
            Some(n) => format!(", {n} waiting"),
            None => String::new(),
        };
        out.push(format!(
            "shovel {} to {} ({shown}): {}{waiting}",
            s.name, s.cluster, s.words
        ));
    }
    for name in &status.undeclared {
        out.push(format!(
            "shovel {name}: no neighbour declares it (setup --prune removes it)"
        ));
    }
    let total = status.shovels.len();
    out.push(match (total, status.not_running()) {
        (0, _) => "setup --status: no neighbour declared, no shovel".to_owned(),
        (n, 0) => format!("setup --status: {n} of {n} running"),
        (n, bad) => format!("setup --status: {bad} of {n} not running"),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shovel() -> DesiredShovel {
        DesiredShovel {
            name: "pumpwatch.forward.b".into(),
            cluster: "b".into(),
            queue: "q_feed.forward.b".into(),
            spec: None,
            shown: "q_feed.forward.b -> amqp://a:****@h:5672/b xs_a".into(),
            password_hint: String::new(),
        }
    }

    fn st(state: &str, reason: Option<&str>) -> ShovelStatus {
        ShovelStatus {
            name: "pumpwatch.forward.b".into(),
            vhost: "v".into(),
            kind: "dynamic".into(),
            state: state.into(),
            reason: reason.map(str::to_owned),
        }
    }

    #[test]
    fn states_in_words() {
        let secrets = ["s3cret".to_owned()];
        let table = [
            (true, Some(st("running", None)), true, "running"),
            (true, Some(st("starting", None)), false, "starting"),
            (
                true,
                Some(st(
                    "terminated",
                    Some("{error,{auth_failure,\"amqp://a:s3cret@h\"}},\n <<\"s3cret\">>"),
                )),
                false,
                "terminated: {error,{auth_failure,\"amqp://a:****@h\"}}, <<\"****\">>",
            ),
            (true, Some(st("", None)), false, "unknown"),
            (true, None, false, "not started by the broker"),
            (false, None, false, "absent (run setup)"),
        ];
        for (declared, state, running, words) in table {
            let got = describe(&shovel(), declared, state.as_ref(), Some(3), &secrets);
            assert_eq!((got.running, got.words.as_str()), (running, words));
        }
        let long = "x".repeat(1000);
        let got = describe(
            &shovel(),
            true,
            Some(&st("terminated", Some(&long))),
            None,
            &[],
        );
        assert!(got.words.len() < 400 && got.words.ends_with("..."));
    }

    #[test]
    fn lines_and_summary() {
        let config =
            crate::config::Config::parse("[clusters.b]\nbroker = \"amqp://a@h/b\"\n", "t.toml")
                .unwrap();
        let env = |_: &str| None;
        let desired = Desired::build(&super::super::Inputs {
            config: &config,
            import: None,
            env: &env,
            vhost: "v".into(),
            broker_user: "feed".into(),
            broker_host: None,
            running_user: "root".into(),
            prune: false,
        });
        let mut status = Status {
            shovels: vec![describe(
                &desired.shovels["pumpwatch.forward.b"],
                true,
                Some(&st("starting", None)),
                Some(7),
                &[],
            )],
            undeclared: vec!["pumpwatch.forward.old".into()],
        };
        assert_eq!(
            lines(&desired, &status),
            [
                "shovel pumpwatch.forward.b to b (q_feed.forward.b -> amqp://a:****@h:5672/b xs_a): starting, 7 waiting",
                "shovel pumpwatch.forward.old: no neighbour declares it (setup --prune removes it)",
                "setup --status: 1 of 1 not running",
            ]
        );
        status.shovels[0].running = true;
        status.undeclared.clear();
        assert_eq!(
            lines(&desired, &status).last().unwrap(),
            "setup --status: 1 of 1 running"
        );
        status.shovels.clear();
        assert_eq!(
            lines(&desired, &status),
            ["setup --status: no neighbour declared, no shovel"]
        );
    }
}
