//! What `check` prints, pure: an `/api/check` answer and the `-w`/`-c` ranges in, one
//! Nagios plugin output out ([`PluginOutput`]: status line with perfdata, `-v` lines).
//!
//! ```text
//! PUMPWATCH CRITICAL - 2 of 41 clients, 0 of 3 sources in trouble: cfs stopped on radar (no delivery for 612s > td 300s), edu slow (0.003 files/s < tminr 0.01) | 'clients_ok'=39;;;0 ...
//! ```
//!
//! Offenders come worst first as `serve` sorted them; a client is named bare, a source as
//! `source NAME`, a pair as `CLIENT <rule> on SOURCE`. Every name and reason is pump data:
//! `core::nagios` keeps each on one line and out of the perfdata.

use crate::cmd::serve::board::{CheckAnswer, CheckSubject, Kind, Offender, StateCounts};
use crate::core::health::{State, num, secs};
use crate::core::nagios::{Limits, Perf, PluginOutput, Uom};

/// `cfs stopped on radar (no delivery for 612s > td 300s) and slow (…)`.
pub fn offender_text(o: &Offender) -> String {
    let mut out = match o.kind {
        Kind::Source => format!("source {}", o.name),
        _ => o.name.clone(),
    };
    for (i, r) in o.reasons.iter().enumerate() {
        out.push_str(if i == 0 { " " } else { " and " });
        out.push_str(r.rule.label());
        if i == 0
            && let (Kind::Pair, Some(s)) = (o.kind, &o.source)
        {
            out.push_str(" on ");
            out.push_str(s);
        }
        out.push_str(" (");
        out.push_str(&r.text);
        out.push(')');
    }
    if o.reasons.is_empty() {
        out.push(' ');
        out.push_str(&o.reason);
    }
    out
}

fn counts_perf(out: &mut PluginOutput, what: &str, c: &StateCounts) {
    for s in State::ALL {
        out.perfdata.push(
            Perf::new(
                format!("{what}_{}", s.metric_label()),
                c.get(s) as f64,
                Uom::None,
            )
            .min(0.0),
        );
    }
}

fn offenders_text(a: &CheckAnswer) -> String {
    let mut t = a
        .offenders
        .iter()
        .map(offender_text)
        .collect::<Vec<_>>()
        .join(", ");
    if a.more_offenders > 0 {
        t.push_str(&format!(", and {} more", a.more_offenders));
    }
    t
}

/// Where a value sits against `-w`/`-c`: the state and, when it alerts, why.
fn against(limits: &Limits, x: f64, what: &str) -> (State, Option<String>) {
    let s = limits.state(x);
    let range = match s {
        State::Critical => limits.crit.map(|r| ("critical", r)),
        State::Warning => limits.warn.map(|r| ("warning", r)),
        _ => None,
    };
    (
        s,
        range.map(|(name, r)| format!("{what} {} files/s outside the {name} range {r}", num(x))),
    )
}

/// The plugin output for `answer` (fetched from `url`, for messages).
pub fn render(a: &CheckAnswer, limits: &Limits, verbose: bool) -> PluginOutput {
    let worst = a.offenders.iter().fold(State::Ok, |s, o| s.worst(o.state));
    let mut out = match &a.subject {
        Some(s) => subject(a, s, limits, worst),
        None => pump(a, limits, worst),
    };
    if verbose {
        out.long = a
            .offenders
            .iter()
            .map(|o| format!("{} {}", o.state, offender_text(o)))
            .collect();
        if a.more_offenders > 0 {
            out.long
                .push(format!("and {} more (see /api/status)", a.more_offenders));
        }
    }
    out
}

fn pump(a: &CheckAnswer, limits: &Limits, worst: State) -> PluginOutput {
    let (ranged, why) = against(limits, a.files_per_s, "total");
    let known = a.clients.total() + a.sources.total() + a.pairs.total();
    let seen = known - a.clients.unknown - a.sources.unknown - a.pairs.unknown;
    let mut out = if known == 0 {
        PluginOutput::new(State::Unknown, "serve knows no client or source yet")
    } else if a.offenders.is_empty() && a.more_offenders == 0 && seen == 0 {
        PluginOutput::new(
            State::Unknown,
            format!(
                "nothing seen yet from {} clients and {} sources",
                a.clients.total(),
                a.sources.total()
            ),
        )
    } else {
        let trouble = !a.offenders.is_empty();
        let mut text = if trouble {
            format!(
                "{} of {} clients, {} of {} sources in trouble: {}",
                a.clients_in_trouble,
                a.clients.total(),
                a.sources_in_trouble,
                a.sources.total(),
                offenders_text(a)
            )
        } else {
            let mut t = format!(
                "{} clients, {} sources OK",
                a.clients.total(),
                a.sources.total()
            );
            let unknown = a.clients.unknown + a.sources.unknown;
            if unknown > 0 {
                t.push_str(&format!(" ({unknown} not seen yet)"));
            }
            t
        };
        if let Some(w) = why {
            text = format!("{w}; {text}");
        }
        PluginOutput::new(worst.worst(ranged), text)
    };
    counts_perf(&mut out, "clients", &a.clients);
    counts_perf(&mut out, "sources", &a.sources);
    counts_perf(&mut out, "pairs", &a.pairs);
    out.perfdata.push(
        Perf::new("files_per_s", a.files_per_s, Uom::None)
            .limits(*limits)
            .min(0.0),
    );
    out.perfdata
        .push(Perf::new("errors_per_s", a.errors_per_s, Uom::None).min(0.0));
    out
}

fn subject(a: &CheckAnswer, s: &CheckSubject, limits: &Limits, worst: State) -> PluginOutput {
    let kind = if s.kind == Kind::Source {
        "source"
    } else {
        "client"
    };
    let mut out = if !s.known {
        PluginOutput::new(
            State::Unknown,
            format!(
                "{kind} {} is not known to serve (no speedo seen for it)",
                s.name
            ),
        )
    } else {
        let (ranged, why) = against(limits, s.files_per_s, &format!("{kind} {}", s.name));
        let mut parts = Vec::new();
        if let Some(w) = why {
            parts.push(w);
        }
        if !a.offenders.is_empty() {
            parts.push(offenders_text(a));
        }
        let state = if s.state == State::Unknown && a.offenders.is_empty() {
            State::Unknown
        } else {
            worst.worst(s.state).worst(ranged)
        };
        if parts.is_empty() {
            let mut t = format!(
                "{kind} {} {}: {} files/s",
                s.name,
                if state == State::Unknown {
                    "not seen yet"
                } else {
                    "OK"
                },
                num(s.files_per_s)
            );
            if let Some(r) = s.error_ratio {
                t.push_str(&format!(", {:.0}% errors", r * 100.0));
            }
            if let Some(since) = s.since_last_good_s {
                t.push_str(&format!(", last delivery {} ago", secs(since)));
            }
            if let Some(l) = s.lag_p95_s {
                t.push_str(&format!(", p95 lag {}", secs(l)));
            }
            PluginOutput::new(state, t)
        } else {
            PluginOutput::new(state, parts.join("; "))
        }
    };
    let label = |what: &str| format!("{}_{what}", s.name);
    out.perfdata.push(
        Perf::new(label("files_per_s"), s.files_per_s, Uom::None)
            .limits(*limits)
            .min(0.0),
    );
    out.perfdata.push(
        Perf::new(
            label("error_ratio"),
            s.error_ratio.unwrap_or(f64::NAN),
            Uom::None,
        )
        .min(0.0)
        .max(1.0),
    );
    out.perfdata.push(
        Perf::new(
            label("since_last_good"),
            s.since_last_good_s.unwrap_or(f64::NAN),
            Uom::Seconds,
        )
        .min(0.0),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::health::{Reason, Rule};
    use crate::core::nagios::Range;

    fn reason(rule: Rule, state: State, text: &str) -> Reason {
        Reason {
            rule,
            state,
            text: text.into(),
        }
    }

    fn offender(kind: Kind, name: &str, source: Option<&str>, reasons: Vec<Reason>) -> Offender {
        Offender {
            kind,
            name: name.into(),
            source: source.map(Into::into),
            state: reasons.iter().fold(State::Ok, |s, r| s.worst(r.state)),
            reason: String::new(),
            reasons,
        }
    }

    fn answer(offenders: Vec<Offender>) -> CheckAnswer {
        CheckAnswer {
            view: "admin".into(),
            generated: "2024-01-01T00:00:00Z".into(),
            clients: StateCounts {
                ok: 39,
                warning: 1,
                critical: 1,
                unknown: 0,
            },
            sources: StateCounts {
                ok: 3,
                ..Default::default()
            },
            pairs: StateCounts::default(),
            clients_in_trouble: 2,
            sources_in_trouble: 0,
            offenders,
            more_offenders: 0,
            files_per_s: 12.5,
            errors_per_s: 0.25,
            subject: None,
        }
    }

    #[test]
    fn the_issue_example() {
        let a = answer(vec![
            offender(
                Kind::Pair,
                "cfs",
                Some("radar"),
                vec![reason(
                    Rule::Stopped,
                    State::Critical,
                    "no delivery for 612s > td 300s",
                )],
            ),
            offender(
                Kind::Client,
                "edu",
                None,
                vec![reason(
                    Rule::Slow,
                    State::Warning,
                    "0.003 files/s < tminr 0.01",
                )],
            ),
        ]);
        let out = render(&a, &Limits::default(), false);
        assert_eq!(out.exit_code(), 2);
        let line = out.status_line();
        assert!(
            line.starts_with(
                "PUMPWATCH CRITICAL - 2 of 41 clients, 0 of 3 sources in trouble: \
                 cfs stopped on radar (no delivery for 612s > td 300s), \
                 edu slow (0.003 files/s < tminr 0.01) | 'clients_ok'=39;;;0 "
            ),
            "{line}"
        );
        assert!(
            line.ends_with("'files_per_s'=12.5;;;0 'errors_per_s'=0.25;;;0"),
            "{line}"
        );
        let v = render(&a, &Limits::default(), true);
        assert_eq!(
            v.long,
            [
                "CRITICAL cfs stopped on radar (no delivery for 612s > td 300s)",
                "WARNING edu slow (0.003 files/s < tminr 0.01)"
            ]
        );
    }

    #[test]
    fn ok_ranges_and_unknowns() {
        let mut a = answer(vec![]);
        a.clients = StateCounts {
            ok: 40,
            unknown: 1,
            ..Default::default()
        };
        let out = render(&a, &Limits::default(), false);
        assert_eq!(out.state, State::Ok);
        assert!(
            out.status_line()
                .starts_with("PUMPWATCH OK - 41 clients, 3 sources OK (1 not seen yet) |"),
            "{}",
            out.status_line()
        );
        let limits = Limits {
            warn: Some(Range::parse("20:").unwrap()),
            crit: Some(Range::parse("10:").unwrap()),
        };
        let out = render(&a, &limits, false);
        assert_eq!(out.state, State::Warning);
        assert!(
            out.status_line()
                .contains("total 12.5 files/s outside the warning range 20:"),
            "{}",
            out.status_line()
        );
        assert!(out.status_line().contains("'files_per_s'=12.5;20:;10:;0"));
        let empty = CheckAnswer {
            clients: StateCounts::default(),
            sources: StateCounts::default(),
            ..answer(vec![])
        };
        assert_eq!(render(&empty, &limits, false).state, State::Unknown);
    }

    #[test]
    fn one_client() {
        let mut a = answer(vec![]);
        a.subject = Some(CheckSubject {
            kind: Kind::Client,
            name: "cfs".into(),
            known: true,
            state: State::Ok,
            reasons: vec![],
            files_per_s: 2.5,
            error_ratio: Some(0.02),
            since_last_good_s: Some(3.0),
            lag_p95_s: Some(12.0),
        });
        let limits = Limits {
            warn: Some(Range::parse("1:").unwrap()),
            crit: Some(Range::parse("0.5:").unwrap()),
        };
        let out = render(&a, &limits, false);
        assert_eq!(
            out.status_line(),
            "PUMPWATCH OK - client cfs OK: 2.5 files/s, 2% errors, last delivery 3.0s ago, \
             p95 lag 12s | 'cfs_files_per_s'=2.5;1:;0.5:;0 'cfs_error_ratio'=0.02;;;0;1 \
             'cfs_since_last_good'=3s;;;0"
        );
        if let Some(s) = a.subject.as_mut() {
            s.files_per_s = 0.2;
        }
        let out = render(&a, &limits, false);
        assert_eq!(out.state, State::Critical);
        assert!(
            out.text.contains("outside the critical range 0.5:"),
            "{}",
            out.text
        );
        if let Some(s) = a.subject.as_mut() {
            s.known = false;
        }
        let out = render(&a, &limits, false);
        assert_eq!(out.state, State::Unknown);
        assert!(out.text.contains("not known to serve"));
    }

    #[test]
    fn hostile_names_stay_on_one_line() {
        let a = answer(vec![offender(
            Kind::Client,
            "evil\nPUMPWATCH OK - | 'x'=1",
            None,
            vec![reason(Rule::Errors, State::Warning, "a|b")],
        )]);
        let text = render(&a, &Limits::default(), true).render();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert_eq!(text.matches('|').count(), 1, "{text}");
    }
}
