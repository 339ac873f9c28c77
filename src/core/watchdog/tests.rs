//! The watchdog's rules with simulated time: each rule on its own, the repost round trip
//! in every format, the store round trip, and a property test over arbitrary sequences.

use super::*;
use crate::core::attribution::Attributor;
use crate::core::emit::{Outgoing, emit};
use crate::core::report::{Announcement, Format, Identity, Incoming, Message, Report, parse};
use crate::core::{Headers, Stamp};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jiff::Timestamp;
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};

const T0: i64 = 1_700_000_000;

fn t(s: i64) -> Timestamp {
    Timestamp::from_second(T0 + s).unwrap()
}

fn settings() -> Settings {
    Settings {
        node_timeout: Duration::from_secs(100),
        stuck_after: Duration::from_secs(50),
        max_inflight: 1000,
        max_bytes: 1 << 30,
        reorder_window: Duration::from_secs(20),
        forget_after: Duration::from_secs(10_000),
        max_nodes: 100,
    }
}

fn sha512(n: u32) -> Identity {
    let mut b = [0x5au8; 64];
    b[..4].copy_from_slice(&n.to_le_bytes());
    Identity {
        method: "sha512".into(),
        value: STANDARD.encode(b),
    }
}

/// Product `n` as node1/cfs reports it: its own pubTime (with milliseconds), file name,
/// identity and size.
fn report(n: u32, code: u16) -> Report {
    Report {
        format: Format::V02,
        topic: String::new(),
        exchange: "xs_cfs".into(),
        pub_time: Stamp::from_unix(1_704_110_400 + i64::from(n), (n % 1000) as i32 * 1_000_000),
        base_url: "sftp://radar@data.example".into(),
        rel_path: format!("20240101/radar/h5/dir{}/radar_{n:06}.h5", n % 3),
        code,
        message: None,
        host: Some("node1".into()),
        user: Some("cfs".into()),
        duration_s: Some(0.5),
        source: Some("radar".into()),
        from_cluster: Some("ddsr.cmc".into()),
        to_clusters: vec!["ddsr.cmc".into(), "ddi.science".into()],
        flow: Some("f1".into()),
        size_bytes: Some(1000 + u64::from(n)),
        identity: Some(sha512(n)),
        time_completed: None,
        stamped_client: None,
        stamped_source: None,
        extra: Headers::new(),
    }
}

/// Records `r` with its client as the pump's attribution tells it.
fn rec(w: &mut Watchdog, r: &Report, now: Timestamp) -> Outcome {
    let client = Attributor::default().client(r, None);
    w.record(r, client.as_deref(), now)
}

fn on(host: &str, mut r: Report) -> Report {
    r.host = Some(host.into());
    r
}

fn failures(events: &[Event]) -> Vec<&Failure> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Failed(f) => Some(f),
            _ => None,
        })
        .collect()
}

fn ok(w: &Watchdog) {
    if let Err(e) = w.check() {
        panic!("{e}");
    }
}

#[test]
fn a_start_opens_and_its_final_closes() {
    let mut w = Watchdog::new(settings());
    assert_eq!(rec(&mut w, &report(1, 102), t(0)), Outcome::Opened);
    assert_eq!(w.len(), 1);
    ok(&w);
    assert_eq!(rec(&mut w, &report(1, 201), t(5)), Outcome::Closed);
    assert_eq!(w.len(), 0);
    let c = w.totals();
    assert_eq!((c.opened, c.closed, c.orphan_finals), (1, 1, 0));
    ok(&w);
    // A failure code is a final too.
    rec(&mut w, &report(2, 102), t(6));
    assert_eq!(rec(&mut w, &report(2, 499), t(7)), Outcome::Closed);
}

#[test]
fn the_product_key_survives_relpath_rewriting_and_renaming() {
    let mut w = Watchdog::new(settings());
    rec(&mut w, &report(1, 102), t(0));
    rec(&mut w, &report(2, 102), t(0));
    // sr3 reports its local path: same pubTime and file name.
    let mut fin = report(1, 201);
    fin.rel_path = "/local/data/incoming/radar_000001.h5".into();
    assert_eq!(rec(&mut w, &fin, t(1)), Outcome::Closed);
    // Renamed on arrival: same pubTime and identity.
    let mut fin = report(2, 201);
    fin.rel_path = "elsewhere/renamed.h5".into();
    assert_eq!(rec(&mut w, &fin, t(1)), Outcome::Closed);
    assert!(w.is_empty());
}

#[test]
fn a_final_closes_only_the_same_host_client_and_product() {
    let mut w = Watchdog::new(settings());
    rec(&mut w, &report(1, 102), t(0));
    // Another node, another client, another product (the same name published again
    // later: another pubTime and identity).
    assert_eq!(
        rec(&mut w, &on("node2", report(1, 201)), t(1)),
        Outcome::OrphanFinal
    );
    let mut other = report(1, 201);
    other.user = Some("other".into());
    assert_eq!(rec(&mut w, &other, t(1)), Outcome::OrphanFinal);
    let mut later = report(1, 201);
    later.pub_time = report(7, 201).pub_time;
    later.identity = Some(sha512(7));
    assert_eq!(rec(&mut w, &later, t(1)), Outcome::OrphanFinal);
    assert_eq!(w.len(), 1);
    assert_eq!(w.totals().orphan_finals, 3);
    ok(&w);
}

#[test]
fn a_final_without_start_is_harmless() {
    let mut w = Watchdog::new(settings());
    assert_eq!(rec(&mut w, &report(1, 201), t(0)), Outcome::OrphanFinal);
    assert!(w.is_empty());
    assert!(w.tick(t(1000)).is_empty());
    assert_eq!(w.totals().orphan_finals, 1);
    ok(&w);
}

#[test]
fn a_second_start_is_a_duplicate() {
    let mut w = Watchdog::new(settings());
    rec(&mut w, &report(1, 102), t(0));
    assert_eq!(rec(&mut w, &report(1, 102), t(1)), Outcome::Duplicate);
    assert_eq!(w.len(), 1);
    assert_eq!(w.totals().duplicates, 1);
    assert_eq!(rec(&mut w, &report(1, 201), t(2)), Outcome::Closed);
    assert!(w.is_empty());
    ok(&w);
}

#[test]
fn a_start_after_its_final_is_harmless_within_the_window() {
    let mut w = Watchdog::new(settings());
    rec(&mut w, &report(1, 201), t(0));
    assert_eq!(rec(&mut w, &report(1, 102), t(10)), Outcome::LateStart);
    assert!(w.is_empty());
    assert_eq!(w.totals().late_starts, 1);
    // Past the window, a start is a start (a retry, say).
    rec(&mut w, &report(2, 201), t(0));
    w.tick(t(30));
    assert_eq!(rec(&mut w, &report(2, 102), t(30)), Outcome::Opened);
    ok(&w);
}

#[test]
fn a_silent_node_holding_transfers_fails_once() {
    let mut w = Watchdog::new(settings());
    rec(&mut w, &report(1, 102), t(0));
    rec(&mut w, &report(2, 102), t(10));
    rec(&mut w, &on("node2", report(3, 102)), t(10));
    // node3 holds nothing: silence is not failure.
    rec(&mut w, &on("node3", report(4, 201)), t(0));
    assert!(failures(&w.tick(t(50))).is_empty());
    // node2 keeps talking (any code).
    rec(&mut w, &on("node2", report(9, 100)), t(90));
    let ev = w.tick(t(110));
    let f = failures(&ev);
    assert_eq!(f.len(), 1, "{ev:?}");
    assert_eq!(f[0].host, "node1");
    assert_eq!(f[0].last_seen, Stamp(t(10)));
    let names: Vec<&str> = f[0].transfers.iter().map(|r| r.rel_path.as_str()).collect();
    assert_eq!(
        names,
        [
            "20240101/radar/h5/dir1/radar_000001.h5",
            "20240101/radar/h5/dir2/radar_000002.h5"
        ]
    );
    assert!(f[0].transfers.iter().all(|r| r.failed_over));
    // Once.
    assert!(failures(&w.tick(t(111))).is_empty());
    assert!(
        failures(&w.tick(t(500))).len() == 1,
        "node2 fails in its turn"
    );
    assert!(failures(&w.tick(t(900))).is_empty());
    assert_eq!(w.totals().failed_over, 3);
    // Failed-over transfers stay listed until their finals.
    assert_eq!(w.len(), 3);
    ok(&w);
}

#[test]
fn a_failed_node_that_reports_again_recovers_and_its_stale_transfers_close() {
    let mut w = Watchdog::new(settings());
    rec(&mut w, &report(1, 102), t(0));
    rec(&mut w, &report(2, 102), t(0));
    assert_eq!(failures(&w.tick(t(100))).len(), 1);
    let snap = w.snapshot(&Query::default(), t(100));
    assert_eq!(snap.nodes[0].state, NodeState::Failed);
    // Back: the final of one of its transfers (stale: what it held when heard from).
    assert_eq!(rec(&mut w, &report(1, 201), t(120)), Outcome::Closed);
    let ev = w.tick(t(121));
    assert_eq!(
        ev,
        [Event::Recovered(Recovery {
            host: "node1".into(),
            failed_at: Stamp(t(100)),
            at: Stamp(t(120)),
            stale: 2,
        })]
    );
    let snap = w.snapshot(&Query::default(), t(121));
    assert_eq!(snap.nodes[0].state, NodeState::Recovered);
    assert_eq!(snap.nodes[0].stale, 1);
    assert_eq!(snap.transfers[0].state, TransferState::FailedOver);
    // Stale transfers are neither stuck nor failed over again.
    let ev = w.tick(t(400));
    assert!(ev.is_empty(), "{ev:?}");
    assert_eq!(rec(&mut w, &report(2, 201), t(401)), Outcome::Closed);
    assert!(w.is_empty());
    let c = w.totals();
    assert_eq!((c.failed_over, c.closed), (2, 2));
    ok(&w);
}

#[test]
fn a_node_failing_again_lists_only_new_transfers() {
    let mut w = Watchdog::new(settings());
    rec(&mut w, &report(1, 102), t(0));
    w.tick(t(100));
    rec(&mut w, &report(2, 102), t(150));
    let ev = w.tick(t(150));
    assert!(matches!(ev[..], [Event::Recovered(_)]));
    let ev = w.tick(t(250));
    let f = failures(&ev);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].transfers.len(), 1);
    assert!(f[0].transfers[0].rel_path.ends_with("radar_000002.h5"));
    ok(&w);
}

#[test]
fn a_long_transfer_on_a_living_node_is_stuck_once() {
    let mut w = Watchdog::new(settings());
    rec(&mut w, &report(1, 102), t(0));
    rec(&mut w, &report(2, 102), t(30));
    assert!(w.tick(t(49)).is_empty());
    rec(&mut w, &report(9, 100), t(49));
    let ev = w.tick(t(50));
    let [Event::Stuck(s)] = &ev[..] else {
        panic!("{ev:?}")
    };
    assert_eq!((s.host.as_str(), s.count), ("node1", 1));
    assert!(s.sample[0].stuck);
    assert!(w.tick(t(51)).is_empty());
    let snap = w.snapshot(&Query::default(), t(51));
    assert_eq!(snap.nodes[0].state, NodeState::Stuck);
    assert_eq!(snap.nodes[0].stuck, 1);
    assert_eq!(snap.gauges.stuck, 1);
    assert_eq!(
        snap.transfers.iter().map(|t| t.state).collect::<Vec<_>>(),
        [TransferState::Stuck, TransferState::Open]
    );
    // Closing it clears the state; counted once.
    rec(&mut w, &report(1, 201), t(60));
    assert_eq!(
        w.snapshot(&Query::default(), t(60)).nodes[0].state,
        NodeState::Ok
    );
    assert_eq!(w.totals().stuck, 1);
    ok(&w);
}

#[test]
fn past_max_inflight_the_oldest_are_evicted() {
    let mut w = Watchdog::new(Settings {
        max_inflight: 3,
        ..settings()
    });
    for n in 0..5 {
        rec(&mut w, &report(n, 102), t(i64::from(n)));
    }
    assert_eq!(w.len(), 3);
    assert_eq!(w.totals().evicted, 2);
    // The two oldest went: their finals are orphans, the others close.
    assert_eq!(rec(&mut w, &report(0, 201), t(9)), Outcome::OrphanFinal);
    assert_eq!(rec(&mut w, &report(2, 201), t(9)), Outcome::Closed);
    ok(&w);
}

#[test]
fn past_max_bytes_the_oldest_are_evicted() {
    let mut w = Watchdog::new(Settings {
        max_bytes: 1000,
        ..settings()
    });
    for n in 0..20 {
        rec(&mut w, &report(n, 102), t(0));
        assert!(w.cost_for_tests() <= 1000, "{}", w.cost_for_tests());
    }
    assert!(w.len() >= 2 && w.len() < 20, "{}", w.len());
    assert_eq!(w.totals().evicted, 20 - w.len() as u64);
    ok(&w);
}

#[test]
fn a_crowded_pubtime_is_capped() {
    let mut w = Watchdog::new(settings());
    for n in 0..(MAX_GROUP as u32 + 6) {
        let mut r = report(n, 102);
        r.pub_time = report(0, 102).pub_time;
        r.identity = None;
        rec(&mut w, &r, t(i64::from(n)));
    }
    assert_eq!(w.len(), MAX_GROUP);
    assert_eq!(w.totals().evicted, 6);
    ok(&w);
}

#[test]
fn overlong_fields_and_too_many_nodes_are_ignored() {
    let mut w = Watchdog::new(Settings {
        max_nodes: 3,
        ..settings()
    });
    let mut r = report(1, 102);
    r.rel_path = "x/".repeat(MAX_FIELD);
    assert_eq!(rec(&mut w, &r, t(0)), Outcome::Ignored(Ignored::TooLong));
    r.host = Some("h".repeat(MAX_NAME + 1));
    assert_eq!(rec(&mut w, &r, t(0)), Outcome::Ignored(Ignored::TooLong));
    rec(&mut w, &on("a", report(1, 102)), t(0));
    rec(&mut w, &on("b", report(1, 201)), t(0));
    assert_eq!(
        rec(&mut w, &on("c", report(1, 102)), t(0)),
        Outcome::Ignored(Ignored::NodeLimit)
    );
    // Room again once idle nodes are forgotten (after forget_after).
    w.tick(t(20_000));
    assert_eq!(
        rec(&mut w, &on("c", report(2, 102)), t(20_000)),
        Outcome::Opened
    );
    ok(&w);
}

#[test]
fn old_transfers_expire_and_idle_nodes_are_forgotten() {
    let mut w = Watchdog::new(settings());
    rec(&mut w, &report(1, 102), t(0));
    rec(&mut w, &on("node2", report(2, 201)), t(5000));
    w.tick(t(200));
    w.tick(t(10_000));
    assert!(w.is_empty());
    assert_eq!(w.totals().expired, 1);
    // node1, silent since 0, went with its transfer; node2 was seen at 5000.
    let hosts = |w: &Watchdog, at| -> Vec<String> {
        w.snapshot(&Query::default(), t(at))
            .nodes
            .into_iter()
            .map(|n| n.host)
            .collect()
    };
    assert_eq!(hosts(&w, 10_000), ["node2"]);
    w.tick(t(15_000));
    assert!(hosts(&w, 15_000).is_empty());
    ok(&w);
}

#[test]
fn sr3_reports_without_host_use_the_client_as_node() {
    let mut w = Watchdog::new(settings());
    let mut r = report(1, 102);
    r.host = None;
    r.user = None;
    r.stamped_client = Some("sr3user".into());
    rec(&mut w, &r, t(0));
    let snap = w.snapshot(&Query::default(), t(0));
    assert_eq!(snap.nodes[0].host, "sr3user");
    assert_eq!(snap.transfers[0].client, "sr3user");
    r.code = 201;
    assert_eq!(rec(&mut w, &r, t(1)), Outcome::Closed);
}

#[test]
fn snapshot_filters_by_node_and_age() {
    let mut w = Watchdog::new(settings());
    rec(&mut w, &report(1, 102), t(0));
    rec(&mut w, &report(2, 102), t(40));
    rec(&mut w, &on("node2", report(3, 102)), t(0));
    let q = Query {
        node: Some("node1".into()),
        older_than: Some(Duration::from_secs(30)),
        limit: 10,
    };
    let s = w.snapshot(&q, t(45));
    assert_eq!(s.nodes.len(), 1);
    assert_eq!(s.nodes[0].in_flight, 2);
    assert_eq!(s.nodes[0].oldest, Some(Stamp(t(0))));
    assert_eq!(s.nodes[0].oldest_age_s, Some(45));
    assert_eq!(s.transfers.len(), 1);
    assert_eq!(s.transfers[0].age_s, 45);
    assert_eq!(s.matched, 1);
    let s = w.snapshot(
        &Query {
            limit: 2,
            ..Query::default()
        },
        t(45),
    );
    assert_eq!((s.transfers.len(), s.matched, s.truncated), (2, 3, true));
    assert_eq!(s.gauges.in_flight, 3);
    let s = w.snapshot(
        &Query {
            node: Some("nobody".into()),
            ..Query::default()
        },
        t(45),
    );
    assert!(s.nodes.is_empty() && s.transfers.is_empty());
    // Serialises as the API returns it.
    let v: serde_json::Value =
        serde_json::from_slice(&serde_json::to_vec(&w.snapshot(&Query::default(), t(45))).unwrap())
            .unwrap();
    assert_eq!(v["nodes"][0]["state"], "ok");
    assert_eq!(
        v["transfers"][0]["relPath"],
        "20240101/radar/h5/dir1/radar_000001.h5"
    );
}

fn incoming<'a>(o: &'a Outgoing, exchange: &'a str) -> Incoming<'a> {
    Incoming {
        exchange,
        routing_key: &o.routing_key,
        body: &o.body,
        content_type: Some(o.content_type),
        user_id: None,
        headers: &o.headers,
    }
}

fn parsed_report(o: &Outgoing) -> Report {
    match parse(&incoming(o, "xs_cfs")) {
        Ok(Message::Report(r)) => *r,
        other => panic!("not a report: {other:?}"),
    }
}

fn parsed_announcement(o: &Outgoing) -> Announcement {
    match parse(&incoming(o, "xpublic")) {
        Ok(Message::Announcement(a)) => *a,
        other => panic!("not an announcement: {other:?}\n{o:?}"),
    }
}

/// Every report format: the 102 as a producer emits it, parsed, tracked, failed; the
/// repost is an announcement of the same family carrying the same product.
#[test]
fn reposts_rebuild_the_announcement_in_the_format_of_the_start() {
    for (format, family, prefix) in [
        (Format::V01, Format::V02, "v02.post."),
        (Format::V02, Format::V02, "v02.post."),
        (Format::V02Sr3, Format::V02, "v02.post."),
        (Format::V03, Format::V03, "v03."),
        (Format::V03Sr2, Format::V03, "v03."),
    ] {
        let mut base = report(42, 102);
        if format == Format::V02Sr3 {
            // sr3 names no host or user; route stamps the client.
            base.host = None;
            base.user = None;
            base.extra.set("pumpwatch_client", "cfs");
        }
        let start = parsed_report(&emit(&base, format));
        assert_eq!(start.format, format);
        assert_eq!(start.code, 102);
        let mut w = Watchdog::new(settings());
        assert_eq!(rec(&mut w, &start, t(0)), Outcome::Opened, "{format}");
        let ev = w.tick(t(1000));
        let f = failures(&ev);
        assert_eq!(f.len(), 1, "{format}");
        let row = &f[0].transfers[0];
        assert_eq!(row.format, format);
        let out = announcement(row);
        assert!(out.routing_key.starts_with(prefix), "{}", out.routing_key);
        assert_eq!(out.routing_key, format!("{prefix}20240101.radar.h5.dir0"));
        let a = parsed_announcement(&out);
        assert_eq!(a.format, family, "{format}");
        assert_eq!(a.pub_time, start.pub_time, "{format}");
        assert_eq!(a.base_url, start.base_url);
        assert_eq!(a.rel_path, start.rel_path);
        assert_eq!(a.identity, start.identity, "{format}");
        assert_eq!(a.size_bytes, start.size_bytes);
        assert_eq!(a.source, start.source);
        // And the final of the original closes the stale transfer.
        let fin = parsed_report(&emit(
            &Report {
                code: 201,
                ..base.clone()
            },
            format,
        ));
        assert_eq!(rec(&mut w, &fin, t(1001)), Outcome::Closed, "{format}");
    }
}

#[test]
fn reposts_keep_hex_sums_and_odd_identities_as_received() {
    let mut w = Watchdog::new(settings());
    let mut r = report(1, 102);
    r.identity = Some(Identity {
        method: "md5".into(),
        value: "0f3c9a7e1b2d4c6f8a9b0c1d2e3f4a5b".into(),
    });
    rec(&mut w, &r, t(0));
    let mut r2 = report(2, 102);
    r2.identity = Some(Identity {
        method: "cod".into(),
        value: "sha512".into(),
    });
    r2.size_bytes = None;
    rec(&mut w, &r2, t(0));
    let ev = w.tick(t(1000));
    let rows = &failures(&ev)[0].transfers;
    for (row, want) in rows.iter().zip([&r, &r2]) {
        let a = parsed_announcement(&announcement(row));
        assert_eq!(a.identity, want.identity);
        assert_eq!(a.size_bytes, want.size_bytes);
    }
}

#[test]
fn the_failure_notice_lists_the_lost_transfers() {
    let mut w = Watchdog::new(settings());
    rec(&mut w, &on("ddsr1.cmc", report(1, 102)), t(0));
    rec(&mut w, &on("ddsr1.cmc", report(2, 102)), t(20));
    let ev = w.tick(t(120));
    let f = failures(&ev)[0];
    let msgs = f.messages();
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.routing_key, "v01.watchdog.node.ddsr1.cmc");
    assert_eq!(m.headers.get_str("host"), Some("ddsr1.cmc"));
    assert_eq!(m.headers.get("count").and_then(|v| v.as_i64()), Some(2));
    // The router, speedo and log skip it as pumpwatch's own.
    assert!(matches!(
        parse(&incoming(m, "xreport")),
        Ok(Message::Control(_))
    ));
    let v: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
    assert_eq!(v["host"], "ddsr1.cmc");
    assert_eq!(v["count"], 2);
    let lost = &v["transfers"][1];
    assert_eq!(lost["host"], "ddsr1.cmc");
    assert_eq!(lost["client"], "cfs");
    assert_eq!(lost["relPath"], "20240101/radar/h5/dir2/radar_000002.h5");
    assert_eq!(lost["baseUrl"], "sftp://radar@data.example");
    assert_eq!(lost["pubTime"], "2024-01-01T12:00:02.002Z");
    assert_eq!(lost["started"], Stamp(t(20)).to_string());
    assert_eq!(lost["age"], 100);
    // Recovery notice.
    rec(&mut w, &on("ddsr1.cmc", report(3, 100)), t(130));
    let ev = w.tick(t(130));
    let [Event::Recovered(r)] = &ev[..] else {
        panic!("{ev:?}")
    };
    let m = r.message();
    assert_eq!(m.routing_key, "v01.watchdog.recovered.ddsr1.cmc");
    assert_eq!(m.headers.get("stale").and_then(|v| v.as_i64()), Some(2));
}

#[test]
fn a_big_failure_is_split_in_parts() {
    let f = Failure {
        host: "n".into(),
        last_seen: Stamp(t(0)),
        at: Stamp(t(1)),
        transfers: vec![TransferRow::default(); messages::MAX_LISTED + 1],
    };
    let m = f.messages();
    assert_eq!(m.len(), 2);
    assert_eq!(m[1].headers.get("part").and_then(|v| v.as_i64()), Some(2));
    assert_eq!(
        m[1].headers.get("count").and_then(|v| v.as_i64()),
        Some(10_001)
    );
}

/// A store as the daemon keeps it: rows by id, nodes by host.
#[derive(Default)]
struct Store {
    transfers: BTreeMap<u64, TransferRow>,
    nodes: BTreeMap<String, NodeRow>,
    totals: Counts,
}

impl Store {
    fn apply(&mut self, c: Changes) {
        for id in c.removed {
            assert!(
                self.transfers.remove(&id).is_some(),
                "removed {id} not stored"
            );
        }
        for h in c.removed_nodes {
            self.nodes.remove(&h);
        }
        for r in c.transfers {
            self.transfers.insert(r.id, r);
        }
        for n in c.nodes {
            self.nodes.insert(n.host.clone(), n);
        }
        self.totals = c.totals;
    }

    fn restore(&self, s: Settings, now: Timestamp) -> (Watchdog, RestoreReport) {
        let mut rows: Vec<TransferRow> = self.transfers.values().cloned().collect();
        rows.sort_by_key(|r| (r.started, r.id));
        Watchdog::restore(s, now, self.totals, self.nodes.values().cloned(), rows)
    }
}

/// The state as the API shows it, in an order independent of slots.
fn view(w: &Watchdog, now: Timestamp) -> (Vec<NodeView>, Vec<TransferView>, Counts) {
    let mut s = w.snapshot(
        &Query {
            limit: usize::MAX,
            ..Query::default()
        },
        now,
    );
    s.transfers.sort_by_key(|t| t.id);
    (s.nodes, s.transfers, s.totals)
}

#[test]
fn the_store_round_trip_gives_the_same_state() {
    let mut w = Watchdog::new(settings());
    let mut store = Store::default();
    for n in 0..10 {
        rec(
            &mut w,
            &on(["a", "b"][n as usize % 2], report(n, 102)),
            t(0),
        );
    }
    store.apply(w.take_changes(usize::MAX));
    rec(&mut w, &on("a", report(0, 201)), t(10));
    rec(&mut w, &on("b", report(1, 201)), t(10));
    // Opened and closed between flushes: never stored.
    rec(&mut w, &on("a", report(20, 102)), t(10));
    rec(&mut w, &on("a", report(20, 201)), t(10));
    rec(&mut w, &on("a", report(21, 102)), t(60));
    w.tick(t(60));
    w.tick(t(111));
    let c = w.take_changes(3);
    assert!(c.more);
    assert_eq!(c.removed.len(), 2);
    store.apply(c);
    store.apply(w.take_changes(usize::MAX));
    assert!(w.take_changes(usize::MAX).is_empty());
    assert_eq!(store.transfers.len(), w.len());
    let (r, rep) = store.restore(settings(), t(111));
    assert_eq!(rep.transfers, w.len() as u64);
    assert_eq!((rep.rejected, rep.renumbered, rep.reconciled), (0, 0, 0));
    ok(&r);
    assert_eq!(view(&r, t(111)), view(&w, t(111)));
    // Nothing to write after a restore.
    let mut r = r;
    assert!(r.take_changes(usize::MAX).is_empty());
}

#[test]
fn a_restored_watchdog_gives_nodes_a_fresh_timeout() {
    let mut w = Watchdog::new(settings());
    let mut store = Store::default();
    rec(&mut w, &report(1, 102), t(0));
    store.apply(w.take_changes(usize::MAX));
    // Down for an hour: the backlog is read before anyone is declared failed.
    let (mut r, _) = store.restore(settings(), t(3600));
    assert!(failures(&r.tick(t(3650))).is_empty());
    assert_eq!(failures(&r.tick(t(3700))).len(), 1);
}

#[test]
fn restore_refuses_bad_rows_and_renumbers_taken_ids() {
    let mut w = Watchdog::new(settings());
    rec(&mut w, &report(1, 102), t(0));
    rec(&mut w, &report(2, 102), t(0));
    let c = w.take_changes(usize::MAX);
    let mut rows = c.transfers.clone();
    let mut dup = rows[0].clone();
    dup.rel_path = "other/file".into();
    rows.push(dup);
    let mut bad = rows[1].clone();
    bad.id = 77;
    bad.host = String::new();
    rows.push(bad);
    let mut far = rows[1].clone();
    far.id = u64::from(u32::MAX);
    far.rel_path = "far/away".into();
    rows.push(far);
    let (mut r, rep) = Watchdog::restore(settings(), t(0), c.totals, c.nodes, rows);
    assert_eq!(
        (rep.transfers, rep.rejected, rep.renumbered),
        (4, 1, 2),
        "{rep:?}"
    );
    assert_eq!(rep.reconciled, 2);
    ok(&r);
    let c2 = r.take_changes(usize::MAX);
    assert_eq!(c2.transfers.len(), 2);
    // The bad row and the far one are deleted; the duplicate's id stays (kept by the first).
    assert_eq!(c2.removed, [77, u64::from(u32::MAX)]);
}

// ---- property test ----

#[derive(Debug, Clone)]
enum Op {
    Report {
        host: u8,
        client: u8,
        code: u16,
        product: u32,
        /// 0: as announced, 1: relPath rewritten, 2: renamed (same identity), 3: no
        /// identity, no pubTime.
        variant: u8,
    },
    Advance(u16),
    Tick,
    Flush(u8),
    Restore,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..4, 0u8..3, prop::sample::select(vec![100u16, 102, 102, 102, 201, 499, 304]), 0u32..12, 0u8..4)
            .prop_map(|(host, client, code, product, variant)| Op::Report { host, client, code, product, variant }),
        2 => (0u16..120).prop_map(Op::Advance),
        2 => Just(Op::Tick),
        1 => (0u8..4).prop_map(Op::Flush),
        1 => Just(Op::Restore),
    ]
}

fn prop_report(host: u8, client: u8, code: u16, product: u32, variant: u8) -> Report {
    // Products n and n+6 share a pubTime: groups of two.
    let mut r = report(product % 6, code);
    r.rel_path = format!("d/{}/p{product}.dat", product % 2);
    r.identity = Some(sha512(product));
    r.host = (host > 0).then(|| format!("h{host}"));
    r.user = Some(format!("c{client}"));
    match variant {
        1 => r.rel_path = format!("/local/p{product}.dat"),
        2 => r.rel_path = "d/renamed.dat".into(),
        3 => {
            r.identity = None;
            r.pub_time = None;
        }
        _ => {}
    }
    r
}

fn prop_settings() -> Settings {
    Settings {
        node_timeout: Duration::from_secs(100),
        stuck_after: Duration::from_secs(60),
        max_inflight: 6,
        max_bytes: 1 << 20,
        reorder_window: Duration::from_secs(30),
        forget_after: Duration::from_secs(600),
        max_nodes: 3,
    }
}

proptest! {
    // Each case checks every invariant after each of up to 120 steps: 32 cases keep the
    // unoptimised test run near 10 s (400 took over a minute of CI); raise it locally to
    // search harder.
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn arbitrary_sequences_keep_the_books(ops in proptest::collection::vec(op(), 0..120)) {
        let mut w = Watchdog::new(prop_settings());
        let mut store = Store::default();
        let mut now = 0i64;
        // Per host: failed and not yet recovered.
        let mut down: HashMap<String, bool> = HashMap::new();
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Report { host, client, code, product, variant } => {
                    rec(&mut w, &prop_report(host, client, code, product, variant), t(now));
                }
                Op::Advance(s) => now += i64::from(s),
                Op::Tick => events.extend(w.tick(t(now))),
                Op::Flush(n) => store.apply(w.take_changes(usize::from(n))),
                Op::Restore => {
                    events.extend(w.tick(t(now)));
                    store.apply(w.take_changes(usize::MAX));
                    let before = view(&w, t(now));
                    let (r, rep) = store.restore(prop_settings(), t(now));
                    prop_assert_eq!((rep.rejected, rep.renumbered, rep.reconciled), (0, 0, 0));
                    prop_assert_eq!(view(&r, t(now)), before);
                    w = r;
                }
            }
            if let Err(e) = w.check() {
                return Err(TestCaseError::fail(e));
            }
            for e in events.drain(..) {
                match e {
                    Event::Failed(f) => {
                        prop_assert!(!f.transfers.is_empty());
                        prop_assert!(!down.insert(f.host.clone(), true).unwrap_or(false), "{} failed twice", f.host);
                    }
                    Event::Recovered(r) => {
                        prop_assert!(down.insert(r.host.clone(), false).unwrap_or(false), "{} recovered without failing", r.host);
                    }
                    Event::Stuck(s) => prop_assert!(s.count > 0 && !s.sample.is_empty()),
                }
            }
            // A forgotten node comes back as a new one.
            let known: Vec<String> = w.snapshot(&Query::default(), t(now)).nodes.into_iter().map(|n| n.host).collect();
            down.retain(|h, _| known.contains(h));
            let c = w.totals();
            prop_assert_eq!(c.opened, w.len() as u64 + c.closed + c.evicted + c.expired);
            prop_assert!(w.len() <= 6);
        }
    }

    /// Hostile reports: any strings, any code, any time; never a panic.
    #[test]
    fn hostile_reports_never_panic(
        host in proptest::option::of(".{0,300}"),
        user in proptest::option::of(".{0,20}"),
        rel in ".{0,80}",
        base in ".{0,40}",
        code in 0u16..1000,
        method in ".{0,10}",
        value in ".{0,120}",
        secs in any::<i32>(),
        pub_secs in -100_000_000_000i64..200_000_000_000i64,
    ) {
        let mut w = Watchdog::new(prop_settings());
        let mut r = report(1, code);
        r.host = host;
        r.user = user;
        r.rel_path = rel;
        r.base_url = base;
        r.identity = Some(Identity { method, value });
        r.pub_time = Stamp::from_unix(pub_secs, 0);
        let now = Timestamp::from_second(i64::from(secs)).unwrap_or(Timestamp::UNIX_EPOCH);
        rec(&mut w, &r, now);
        r.code = 201;
        rec(&mut w, &r, now);
        r.code = 102;
        rec(&mut w, &r, now);
        for e in w.tick(Timestamp::MAX) {
            if let Event::Failed(f) = e {
                for row in &f.transfers {
                    let _ = announcement(row);
                }
                let _ = f.messages();
            }
        }
        let _ = w.snapshot(&Query::default(), Timestamp::MIN);
        if let Err(e) = w.check() {
            return Err(TestCaseError::fail(e));
        }
    }
}

#[test]
fn a_slot_stays_small() {
    // The memory figures of the benchmark depend on it.
    assert_eq!(std::mem::size_of::<machine::Slot>(), 40);
}
