use super::*;
use crate::core::archive::index::{Index, IndexBuilder};
use crate::core::archive::line::split_lines;
use proptest::prelude::*;

fn t(s: &str) -> Stamp {
    Stamp::parse(s).unwrap()
}

fn id(v: &str) -> Option<Identity> {
    Some(Identity {
        method: "md5".into(),
        value: v.into(),
    })
}

/// A report of `file` published at 12:00, completed at `time` by `client`.
fn ev(time: &str, code: u16, client: &str, rel_path: &str) -> ArchiveLine {
    ArchiveLine {
        time: t(time),
        code,
        source: "radar".into(),
        client: client.into(),
        host: format!("{client}-node"),
        flow: "f1".into(),
        from_cluster: "ddsr.cmc".into(),
        rel_path: rel_path.into(),
        base_url: "sftp://x".into(),
        message: "Downloaded".into(),
        topic: "v02.report.x".into(),
        pub_time: Some(t("20240101T120000")),
        identity: id("0f3c9a7e1b2d4c6f"),
        duration_s: Some(0.25),
        size: Some(1000),
        hops: None,
        to_clusters: vec![],
        other: vec![],
    }
}

const PATH: &str = "20240101/radar/a.h5";

#[test]
fn field_filters() {
    let l = ev("20240101T120001", 201, "cfs", PATH);
    let yes = |f: &dyn Fn(&mut Query)| {
        let mut q = Query::default();
        f(&mut q);
        q.matches(&l)
    };
    assert!(yes(&|_| {}));
    assert!(yes(&|q| q.source = Some("radar".into())));
    assert!(!yes(&|q| q.source = Some("rada".into())));
    assert!(yes(&|q| q.client = Some("cfs".into())));
    assert!(!yes(&|q| q.client = Some("edu".into())));
    assert!(yes(&|q| q.host = Some("cfs-node".into())));
    assert!(!yes(&|q| q.flow = Some("f2".into())));
    assert!(yes(&|q| q.file = Some(FileMatch::Name("a.h5".into()))));
    assert!(!yes(&|q| q.file = Some(FileMatch::Name(PATH.into()))));
    assert!(yes(&|q| q.file = Some(FileMatch::Regex(
        regex::Regex::new("^2024.*/a\\.h5$").unwrap()
    ))));
    assert!(yes(&|q| q.code = Some("2xx".parse().unwrap())));
    assert!(!yes(&|q| q.code = Some("4xx,5xx".parse().unwrap())));
    // since is inclusive, until exclusive.
    assert!(yes(&|q| q.since = Some(t("20240101T120001"))));
    assert!(!yes(&|q| q.since = Some(t("20240101T120001.001"))));
    assert!(!yes(&|q| q.until = Some(t("20240101T120001"))));
    assert!(yes(&|q| q.until = Some(t("20240101T120001.001"))));
    // The regex sees the line as written: escaped, pubTime and all.
    assert!(yes(&|q| q.regex = Some(
        regex::bytes::Regex::new(" cfs@cfs-node .* pub=20240101T120000").unwrap()
    )));
    assert!(!yes(
        &|q| q.regex = Some(regex::bytes::Regex::new("\\n").unwrap())
    ));
}

#[test]
fn matcher_agrees_with_the_query() {
    let mut hostile = ev("20240101T120001", 201, "a b@c", "dir/x y.h5");
    hostile.host = "h@st".into();
    let lines = [ev("20240101T120001", 201, "cfs", PATH), hostile];
    let queries = [
        Query {
            client: Some("a b@c".into()),
            ..Default::default()
        },
        Query {
            host: Some("h@st".into()),
            ..Default::default()
        },
        Query {
            file: Some(FileMatch::Name("x y.h5".into())),
            ..Default::default()
        },
        Query {
            file: Some(FileMatch::Name("a.h5".into())),
            source: Some("radar".into()),
            ..Default::default()
        },
        Query {
            client: Some("cfs".into()),
            code: Some("499".parse().unwrap()),
            ..Default::default()
        },
    ];
    for q in &queries {
        let m = q.matcher();
        for l in &lines {
            let raw = l.to_line();
            let got = m.check(raw.as_bytes()).unwrap();
            assert_eq!(got.is_some(), q.matches(l), "{q:?} on {raw}");
        }
    }
    // Malformed lines are reported once they have to be parsed.
    let m = Query::default().matcher();
    assert_eq!(m.check(b"garbage\n"), Err(LineError::Fields { found: 1 }));
    assert_eq!(
        m.check(lines[0].to_line().trim_end().as_bytes()),
        Err(LineError::Partial)
    );
}

#[test]
fn product_keys_rules() {
    let mut l = ev("20240101T120001", 201, "cfs", PATH);
    let pubt = t("20240101T120000");
    assert_eq!(
        product_keys(&l),
        vec![
            ProductKey::Identity {
                pub_time: Some(pubt),
                token: "md5,0f3c9a7e1b2d4c6f".into()
            },
            ProductKey::Published {
                pub_time: pubt,
                file: "a.h5".into()
            },
        ]
    );
    // `cod` names an algorithm, short values name nothing.
    l.identity = Some(Identity {
        method: "cod".into(),
        value: "sha512".into(),
    });
    assert_eq!(product_keys(&l).len(), 1);
    l.identity = id("1234567");
    assert_eq!(product_keys(&l).len(), 1);
    l.pub_time = None;
    assert_eq!(product_keys(&l), vec![ProductKey::Path(PATH.into())]);
    l.identity = id("0f3c9a7e1b2d4c6f");
    assert_eq!(
        product_keys(&l),
        vec![ProductKey::Identity {
            pub_time: None,
            token: "md5,0f3c9a7e1b2d4c6f".into()
        }]
    );
}

#[test]
fn one_product_across_pumps_in_time_order() {
    let mut lives = Lives::new();
    // Archived by the second pump first; sr3 there rewrote relPath to its local path.
    let mut far = ev("20240101T120005", 201, "edu", "/local/data/a.h5");
    far.identity = None;
    far.hops = Some(1);
    lives.add("ddi.science", far);
    lives.add("ddsr.cmc", ev("20240101T120001", 102, "cfs", PATH));
    lives.add("ddsr.cmc", ev("20240101T120002", 201, "cfs", PATH));
    // Another product: same content, published again later.
    let mut again = ev("20240101T130002", 201, "cfs", PATH);
    again.pub_time = Some(t("20240101T130000"));
    lives.add("ddsr.cmc", again);
    assert_eq!(lives.products(), 2);
    let out = lives.finish(None);
    assert_eq!(out.len(), 2);
    let l = &out[0];
    assert_eq!(l.events.len(), 3);
    assert_eq!(l.pumps, vec!["ddsr.cmc", "ddi.science"]);
    assert_eq!(l.clients, vec!["cfs", "edu"]);
    assert_eq!(l.hosts, vec!["cfs-node", "edu-node"]);
    assert_eq!(l.codes, vec![102, 201]);
    assert_eq!(
        (l.first, l.last),
        (t("20240101T120001"), t("20240101T120005"))
    );
    assert_eq!(l.span_s, 4.0);
    assert_eq!(l.events[0].lag_s, Some(1.0));
    assert_eq!(l.file, "a.h5");
    assert_eq!(l.identity, id("0f3c9a7e1b2d4c6f"));
    assert_eq!(out[1].first, t("20240101T130002"));
}

#[test]
fn a_renamed_copy_joins_through_its_identity() {
    let mut lives = Lives::new();
    lives.add("a", ev("20240101T120001", 201, "cfs", PATH));
    let mut renamed = ev("20240101T120003", 201, "edu", "x/a.h5.20240101");
    renamed.identity = id("0f3c9a7e1b2d4c6f");
    lives.add("b", renamed);
    // A report that shares only the (pubTime, file) key of the first joins too.
    let mut bare = ev("20240101T120002", 201, "ops", "y/a.h5");
    bare.identity = None;
    lives.add("c", bare);
    assert_eq!(lives.products(), 1);
    assert_eq!(lives.finish(None)[0].events.len(), 3);
}

#[test]
fn two_groups_merge_when_a_line_links_them() {
    let mut lives = Lives::new();
    let mut a = ev("20240101T120001", 201, "cfs", "a.h5");
    a.identity = None;
    let mut b = ev("20240101T120002", 201, "edu", "b.h5");
    b.identity = None;
    lives.add("p", a);
    lives.add("p", b);
    assert_eq!(lives.products(), 2);
    let mut link = ev("20240101T120003", 201, "ops", "b.h5");
    link.identity = id("0f3c9a7e1b2d4c6f");
    let mut link2 = ev("20240101T120004", 201, "ops", "a.h5");
    link2.identity = id("0f3c9a7e1b2d4c6f");
    lives.add("p", link);
    assert_eq!(lives.products(), 2);
    lives.add("p", link2);
    assert_eq!(lives.products(), 1);
    assert_eq!(lives.finish(None)[0].events.len(), 4);
}

#[test]
fn duplicates_collapse_within_a_cluster_only() {
    let mut lives = Lives::new();
    let l = ev("20240101T120001", 201, "cfs", PATH);
    lives.add("ddsr.cmc", l.clone());
    lives.add("ddsr.cmc", l.clone());
    lives.add("ddsr.cmc", l.clone());
    // Archived again later (a redelivery after a crash): same report, archive time later.
    let mut again = l.clone();
    again.time = t("20240101T130000");
    lives.add("ddsr.cmc", again);
    // The same report archived by another pump is another step of the life.
    lives.add("ddi.science", l);
    let out = lives.finish(None);
    assert_eq!(out[0].events.len(), 2);
    assert_eq!(out[0].duplicates, 3);
    assert_eq!(out[0].last, t("20240101T120001"));
}

#[test]
fn the_limit_keeps_the_earliest_products() {
    let mut lives = Lives::new();
    for (i, h) in ["15", "13", "14", "12"].iter().enumerate() {
        let mut l = ev(
            &format!("20240101T{h}0000"),
            201,
            "cfs",
            &format!("f{i}.h5"),
        );
        l.identity = None;
        lives.add("p", l);
    }
    let mut kept = Lives::new();
    std::mem::swap(&mut kept, &mut lives);
    let all = kept.finish(Some(2));
    assert_eq!(all.len(), 2);
    assert_eq!(
        (all[0].file.as_str(), all[1].file.as_str()),
        ("f3.h5", "f1.h5")
    );

    let mut lives = Lives::new();
    for (i, h) in ["15", "13"].iter().enumerate() {
        let mut l = ev(
            &format!("20240101T{h}0000"),
            201,
            "cfs",
            &format!("f{i}.h5"),
        );
        l.identity = None;
        lives.add("p", l);
    }
    lives.retain_first(1);
    assert_eq!(lives.products(), 1);
    assert_eq!(lives.finish(None)[0].file, "f1.h5");
}

#[test]
fn pass_two_follows_the_products_found() {
    // Two clusters' hours: the query asks for client edu's failures.
    let cmc = vec![
        ev("20240101T120001", 102, "cfs", PATH),
        ev("20240101T120002", 201, "cfs", PATH),
        ev("20240101T120002", 201, "cfs", "20240101/radar/other.h5"),
    ];
    let mut failed = ev("20240101T120009", 499, "edu", "/sr3/local/a.h5");
    failed.identity = None;
    let sci = vec![failed];
    let q = Query {
        client: Some("edu".into()),
        code: Some("4xx".parse().unwrap()),
        ..Default::default()
    };
    let m = q.matcher();
    let mut lives = Lives::new();
    for (cluster, hour) in [("ddsr.cmc", &cmc), ("ddi.science", &sci)] {
        for l in hour.iter() {
            if let Some(hit) = m.check(l.to_line().as_bytes()).unwrap() {
                lives.add(cluster, hit);
            }
        }
    }
    assert_eq!(lives.lines(), 1);
    let follow = lives.follow(&q);
    let index_of = |lines: &[ArchiveLine]| {
        let mut b = IndexBuilder::new();
        lines.iter().for_each(|l| b.add(l));
        Index::decode(&b.finish()).unwrap()
    };
    assert!(index_of(&cmc).may_hold(&follow));
    assert!(!index_of(&[ev("20240101T120002", 201, "cfs", "b.h5")]).may_hold(&follow));
    for (cluster, hour) in [("ddsr.cmc", &cmc), ("ddi.science", &sci)] {
        for l in hour.iter() {
            if let Some(more) = follow.check(l.to_line().as_bytes()).unwrap() {
                lives.add(cluster, more);
            }
        }
    }
    let out = lives.finish(q.limit);
    assert_eq!(out.len(), 1);
    let codes: Vec<u16> = out[0].events.iter().map(|e| e.line.code).collect();
    assert_eq!(codes, vec![102, 201, 499]);
    assert_eq!(out[0].pumps, vec!["ddsr.cmc", "ddi.science"]);
}

#[test]
fn text_rendering() {
    let mut lives = Lives::new();
    lives.add("ddsr.cmc", ev("20240101T120001", 102, "cfs", PATH));
    let mut done = ev("20240101T120002.5", 201, "cfs", PATH);
    done.hops = Some(1);
    lives.add("ddsr.cmc", done.clone());
    lives.add("ddsr.cmc", done);
    let text = render_text(&lives.finish(None));
    assert_eq!(
        text,
        "a.h5 source=radar pub=20240101T120000.000 id=md5,0f3c9a7e1b2d4c6f size=1000\n\
         \x20 pumps=ddsr.cmc hosts=cfs-node clients=cfs codes=102,201 events=2 span=1.500s duplicates=1\n\
         \x20 2024-01-01T12:00:01.000Z ddsr.cmc 102 cfs@cfs-node 20240101/radar/a.h5 flow=f1 dur=0.250s lag=1.000s \"Downloaded\"\n\
         \x20 2024-01-01T12:00:02.500Z ddsr.cmc 201 cfs@cfs-node 20240101/radar/a.h5 flow=f1 dur=0.250s lag=2.500s hops=1 \"Downloaded\"\n"
    );
}

#[test]
fn a_hostile_life_cannot_forge_lines() {
    let mut l = ev(
        "20240101T120001",
        201,
        "cfs\n  2024-01-01T00:00:00.000Z fake 201",
        PATH,
    );
    l.message = "ok\"\n\u{1b}[1A\u{202e}".into();
    l.rel_path = "x/\r\nevil.h5".into();
    l.source = "s\nfake header".into();
    let mut lives = Lives::new();
    lives.add("clu\nster", l);
    let text = render_text(&lives.finish(None));
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(!text.chars().any(|c| c.is_control() && c != '\n'));
    assert!(text.ends_with(" \"ok%22%0A%1B[1A%E2%80%AE\"\n"), "{text}");
}

#[test]
fn json_rendering() {
    let mut lives = Lives::new();
    lives.add("ddsr.cmc", ev("20240101T120001", 201, "cfs", PATH));
    lives.add("ddsr.cmc", ev("20240101T120003", 201, "edu", PATH));
    let json = render_json(&lives.finish(None));
    assert_eq!(json.lines().count(), 1);
    let v: serde_json::Value = serde_json::from_str(json.trim_end()).unwrap();
    assert_eq!(v["file"], "a.h5");
    assert_eq!(v["pub_time"], "2024-01-01T12:00:00.000Z");
    assert_eq!(v["identity"]["method"], "md5");
    assert_eq!(v["clients"], serde_json::json!(["cfs", "edu"]));
    assert_eq!(v["span_s"], 2.0);
    assert_eq!(v["events"][1]["cluster"], "ddsr.cmc");
    assert_eq!(v["events"][1]["client"], "edu");
    assert_eq!(v["events"][1]["code"], 201);
    assert_eq!(v["events"][1]["lag_s"], 3.0);
    assert_eq!(v["events"][1]["time"], "2024-01-01T12:00:03.000Z");
}

// ---- properties ----

fn any_line() -> impl Strategy<Value = ArchiveLine> {
    let text = || "[ab@ ,%\n\u{202e}-]{0,3}";
    (
        0i64..100,
        prop_oneof![Just(102u16), Just(201), Just(499)],
        text(),
        text(),
        text(),
        "[ab/ \n-]{0,5}",
        proptest::option::of(0i64..3),
        proptest::option::of("[ab]{6,9}"),
        text(),
    )
        .prop_map(|(secs, code, source, client, host, rel, pubt, idv, msg)| {
            let mut l = ev("20240101T120000", code, "x", "x");
            l.time = Stamp::from_unix(1_704_110_400 + secs, 0).unwrap();
            l.source = source;
            l.client = client.clone();
            l.host = host;
            l.flow = client;
            l.rel_path = rel;
            l.pub_time = pubt.map(|p| Stamp::from_unix(1_704_110_400 + p, 0).unwrap());
            l.identity = idv.and_then(|v| id(&v));
            l.message = msg;
            l
        })
}

proptest! {
    #[test]
    fn the_matcher_never_loses_a_line(
        lines in proptest::collection::vec(any_line(), 1..8),
        which in any::<prop::sample::Index>(),
        pick in any::<u8>(),
    ) {
        let l = which.get(&lines);
        let mut q = Query::default();
        if pick & 1 != 0 { q.source = Some(l.source.clone()); }
        if pick & 2 != 0 { q.client = Some(l.client.clone()); }
        if pick & 4 != 0 { q.host = Some(l.host.clone()); }
        if pick & 8 != 0 { q.flow = Some(l.flow.clone()); }
        if pick & 16 != 0 { q.file = Some(FileMatch::Name(l.file_name().to_owned())); }
        let m = q.matcher();
        for other in &lines {
            let got = m.check(other.to_line().as_bytes()).unwrap();
            prop_assert_eq!(got.is_some(), q.matches(other));
        }
    }

    #[test]
    fn lives_keep_every_line_and_render_one_line_per_event(
        lines in proptest::collection::vec((any_line(), 0u8..3), 0..12),
    ) {
        let mut lives = Lives::new();
        let mut distinct = std::collections::HashSet::new();
        for (l, c) in &lines {
            let line = l.to_line();
            distinct.insert((*c, line.split_once(' ').map(|(_, rest)| rest.to_owned())));
            lives.add(&format!("c{c}"), l.clone());
        }
        let out = lives.finish(None);
        let events: usize = out.iter().map(|l| l.events.len()).sum();
        let dups: usize = out.iter().map(|l| l.duplicates).sum();
        prop_assert_eq!(events, distinct.len());
        prop_assert_eq!(events + dups, lines.len());
        for life in &out {
            prop_assert!(life.events.windows(2).all(|w| w[0].line.time <= w[1].line.time));
        }
        let text = render_text(&out);
        let blank = out.len().saturating_sub(1);
        prop_assert_eq!(text.lines().count(), events + 2 * out.len() + blank);
        prop_assert!(!text.chars().any(|c| (c.is_control() && c != '\n') || crate::core::archive::escape::is_hidden(c)));
    }
}

/// Regexes with anchors, classes that match `\n`, and empty matches: the buffer search
/// must still find every line the per-line regex matches.
const PATTERNS: [&str; 8] = [
    "^2024",
    "h5$",
    "[ab]+ ",
    "\\s[ab]{2}",
    "x*",
    "(?i)A",
    "pub=\\d+T",
    "^$",
];

proptest! {
    #[test]
    fn candidates_hold_every_line_that_matches(
        lines in proptest::collection::vec(any_line(), 1..10),
        which in any::<prop::sample::Index>(),
        pick in any::<u8>(),
        pattern in 0..PATTERNS.len(),
        garbage in proptest::option::of("[ a-z\\n]{0,12}"),
        cut in any::<prop::sample::Index>(),
    ) {
        let l = which.get(&lines);
        let mut q = Query::default();
        if pick & 1 != 0 { q.source = Some(l.source.clone()); }
        if pick & 2 != 0 { q.client = Some(l.client.clone()); }
        if pick & 4 != 0 { q.file = Some(FileMatch::Name(l.file_name().to_owned())); }
        if pick & 8 != 0 { q.regex = Some(regex::bytes::Regex::new(PATTERNS[pattern]).unwrap()); }
        let m = q.matcher();
        let mut buf = Vec::new();
        for other in &lines {
            other.write(&mut buf);
            if let Some(g) = &garbage { buf.extend_from_slice(g.as_bytes()); buf.push(b'\n'); }
        }
        // Sometimes a partial last line, as in a live hour.
        if pick & 16 != 0 {
            let extra = lines[0].to_line();
            buf.extend_from_slice(&extra.as_bytes()[..cut.index(extra.len())]);
        }
        let cands: Vec<&[u8]> = m.candidates(&buf).collect();
        let mut at = 0;
        for c in &cands {
            // Candidates are whole lines, in order, never overlapping.
            let i = c.as_ptr() as usize - buf.as_ptr() as usize;
            prop_assert!(i >= at && (i == 0 || buf[i - 1] == b'\n'));
            at = i + c.len();
        }
        for raw in split_lines(&buf) {
            if let Ok(Some(_)) = m.check(raw) {
                prop_assert!(cands.iter().any(|c| std::ptr::eq(c.as_ptr(), raw.as_ptr())));
            }
        }
        let f = {
            let mut lives = Lives::new();
            lives.add("c", l.clone());
            lives.follow(&q)
        };
        let fc: Vec<&[u8]> = f.candidates(&buf).collect();
        for raw in split_lines(&buf) {
            if let Ok(Some(_)) = f.check_any(raw) {
                prop_assert!(fc.iter().any(|c| std::ptr::eq(c.as_ptr(), raw.as_ptr())));
            }
        }
    }
}
