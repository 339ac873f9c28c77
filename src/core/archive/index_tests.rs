use super::*;
use crate::core::report::Identity;
use proptest::prelude::*;

fn t(s: &str) -> Stamp {
    Stamp::parse(s).unwrap()
}

fn line(time: &str, code: u16, source: &str, client: &str, file: &str) -> ArchiveLine {
    ArchiveLine {
        time: t(time),
        code,
        source: source.into(),
        client: client.into(),
        host: format!("{client}-host"),
        flow: "f1".into(),
        from_cluster: "ddsr.cmc".into(),
        rel_path: format!("20240101/{source}/{file}"),
        base_url: "sftp://x".into(),
        message: "Downloaded".into(),
        topic: "v02.report".into(),
        pub_time: Some(t("20240101T120000")),
        identity: Some(Identity {
            method: "md5".into(),
            value: format!("sum-of-{file}"),
        }),
        duration_s: None,
        size: None,
        hops: None,
        to_clusters: vec![],
        other: vec![],
    }
}

fn hour() -> Vec<ArchiveLine> {
    vec![
        line("20240101T130000.5", 201, "radar", "cfs", "a.h5"),
        line("20240101T131500", 499, "radar", "edu", "b.h5"),
        line("20240101T135959.999", 201, "sat", "cfs", "c.nc"),
    ]
}

fn index_of(lines: &[ArchiveLine]) -> Vec<u8> {
    let mut b = IndexBuilder::new();
    for l in lines {
        b.add(l);
    }
    b.finish()
}

#[test]
fn summary_round_trips() {
    let ix = Index::decode(&index_of(&hour())).unwrap();
    assert_eq!(ix.lines(), 3);
    assert_eq!(
        ix.time_range(),
        Some((t("20240101T130000.5"), t("20240101T135959.999")))
    );
    assert_eq!(ix.codes(), &[(201, 2), (499, 1)]);
    assert_eq!(
        ix.values(SetKind::Source).unwrap(),
        &["radar".to_owned(), "sat".to_owned()]
    );
    assert_eq!(ix.values(SetKind::File).unwrap().len(), 3);
    assert_eq!(ix.values(SetKind::Identity).unwrap()[0], "md5,sum-of-a.h5");
}

#[test]
fn queries_skip_what_is_absent() {
    let ix = Index::decode(&index_of(&hour())).unwrap();
    let q = |f: &dyn Fn(&mut Query)| {
        let mut q = Query::default();
        f(&mut q);
        ix.may_contain(&q)
    };
    let name = |n: &str| Some(FileMatch::Name(n.into()));
    type Case = (&'static str, bool, Box<dyn Fn(&mut Query)>);
    let table: Vec<Case> = vec![
        ("nothing set", true, Box::new(|_| {})),
        (
            "file present",
            true,
            Box::new(move |q| q.file = name("b.h5")),
        ),
        (
            "file absent",
            false,
            Box::new(move |q| q.file = name("zzz.h5")),
        ),
        (
            "path is not a name",
            false,
            Box::new(move |q| q.file = name("20240101/radar/a.h5")),
        ),
        (
            "file regex",
            true,
            Box::new(|q| q.file = Some(FileMatch::Regex(regex::Regex::new("zzz").unwrap()))),
        ),
        ("source", true, Box::new(|q| q.source = Some("sat".into()))),
        (
            "source absent",
            false,
            Box::new(|q| q.source = Some("sa".into())),
        ),
        (
            "client absent",
            false,
            Box::new(|q| q.client = Some("nobody".into())),
        ),
        ("host", true, Box::new(|q| q.host = Some("edu-host".into()))),
        (
            "host absent",
            false,
            Box::new(|q| q.host = Some("edu".into())),
        ),
        (
            "flow absent",
            false,
            Box::new(|q| q.flow = Some("f2".into())),
        ),
        (
            "code",
            true,
            Box::new(|q| q.code = Some("4xx".parse().unwrap())),
        ),
        (
            "code absent",
            false,
            Box::new(|q| q.code = Some("5xx".parse().unwrap())),
        ),
        (
            "since inside",
            true,
            Box::new(|q| q.since = Some(t("20240101T135959.999"))),
        ),
        (
            "since after",
            false,
            Box::new(|q| q.since = Some(t("20240101T140000"))),
        ),
        (
            "until at first",
            false,
            Box::new(|q| q.until = Some(t("20240101T130000.5"))),
        ),
        (
            "until after first",
            true,
            Box::new(|q| q.until = Some(t("20240101T130000.501"))),
        ),
        (
            "all together",
            true,
            Box::new(move |q| {
                q.source = Some("radar".into());
                q.client = Some("edu".into());
                q.file = name("b.h5");
            }),
        ),
        (
            "regex",
            true,
            Box::new(|q| q.regex = Some(regex::bytes::Regex::new("nowhere").unwrap())),
        ),
    ];
    for (what, want, f) in table {
        assert_eq!(q(&*f), want, "{what}");
    }
}

#[test]
fn an_empty_hour_holds_nothing() {
    let ix = Index::decode(&IndexBuilder::new().finish()).unwrap();
    assert_eq!((ix.lines(), ix.time_range()), (0, None));
    assert!(!ix.may_contain(&Query::default()));
}

#[test]
fn large_sets_become_bloom_filters() {
    let mut b = IndexBuilder::new();
    let n = 20_000;
    for i in 0..n {
        b.add(&line(
            "20240101T130000",
            201,
            "radar",
            "cfs",
            &format!("file_{i:06}.h5"),
        ));
    }
    let bytes = b.finish();
    let ix = Index::decode(&bytes).unwrap();
    assert!(ix.values(SetKind::File).is_none());
    assert!(ix.values(SetKind::Source).is_some());
    for i in 0..n {
        assert!(ix.may_contain_value(SetKind::File, &format!("file_{i:06}.h5")));
    }
    // Names never added: the false-positive rate stays near the 0.05 % designed.
    let probes = 100_000;
    let fp = (0..probes)
        .filter(|i| ix.may_contain_value(SetKind::File, &format!("other_{i}.h5")))
        .count();
    let rate = fp as f64 / probes as f64;
    assert!(rate < 0.002, "false positive rate {rate}");
    // Two sets of 20 000 distinct values at 16 bits each, and little else.
    assert!(
        bytes.len() < 2 * n * BITS_PER_ITEM / 8 + 2_000,
        "{} bytes",
        bytes.len()
    );
}

#[test]
fn every_truncation_and_every_flipped_byte_is_an_error() {
    let bytes = index_of(&hour());
    for len in 0..bytes.len() {
        assert!(Index::decode(&bytes[..len]).is_err(), "truncated to {len}");
    }
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            assert!(Index::decode(&b).is_err(), "byte {i} bit {bit}");
        }
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(Index::decode(&longer).is_err());
}

#[test]
fn magic_and_version() {
    assert_eq!(
        Index::decode(b"hello world, not an index"),
        Err(IndexError::Magic)
    );
    let mut b = index_of(&hour());
    b[4] = 2;
    assert_eq!(Index::decode(&b), Err(IndexError::Version(2)));
}

/// Re-signs a hand-edited index.
fn resign(mut payload: Vec<u8>) -> Vec<u8> {
    let sum = stable_hash(&payload);
    payload.extend_from_slice(&sum.to_le_bytes());
    payload
}

#[test]
fn unknown_sets_are_skipped_and_unknown_forms_answer_maybe() {
    // One line, then only two sets: an unknown kind and a source set of an unknown form.
    let mut p = MAGIC.to_vec();
    p.push(VERSION);
    put_varint(&mut p, 1);
    p.push(1);
    for _ in 0..2 {
        put_varint(&mut p, zigzag(1_700_000_000));
        put_varint(&mut p, 0);
    }
    put_varint(&mut p, 1);
    put_varint(&mut p, 201);
    put_varint(&mut p, 1);
    put_varint(&mut p, 2);
    p.extend_from_slice(&[99, 0, 3, 1, 2, 3]);
    p.extend_from_slice(&[SetKind::Source.tag(), 7, 1, 0]);
    let ix = Index::decode(&resign(p.clone())).unwrap();
    assert!(ix.may_contain_value(SetKind::Source, "anything"));
    assert!(ix.may_contain_value(SetKind::File, "anything"));
    // Code counts must add up to the line count.
    let mut bad = p.clone();
    bad[5] = 2;
    assert_eq!(
        Index::decode(&resign(bad)),
        Err(IndexError::Invalid("code counts"))
    );
    // The same kind twice.
    let mut twice = p;
    let n_sets_at = twice.len() - 11;
    twice[n_sets_at] = 3;
    twice.extend_from_slice(&[SetKind::Source.tag(), 7, 1, 0]);
    assert_eq!(
        Index::decode(&resign(twice)),
        Err(IndexError::Invalid("set given twice"))
    );
}

#[test]
fn the_hash_is_stable() {
    // Indexes on disk depend on these values: changing them needs a new VERSION.
    assert_eq!(stable_hash(b""), 0xdc70_4c0e_b8f3_ab4f);
    assert_eq!(stable_hash(b"radar_000123.h5"), 0x3198_a9b8_0d15_b47d);
}

// ---- properties ----

fn small_line() -> impl Strategy<Value = ArchiveLine> {
    (
        0i64..7200,
        prop_oneof![Just(201u16), Just(499), Just(102), Just(304)],
        "[ab]{0,2}",
        "[ab@ ]{0,2}",
        "[ab,-]{0,2}",
        "[a-c/]{0,4}",
        proptest::option::of("[ab,]{0,3}"),
    )
        .prop_map(|(secs, code, source, client, host, rel, id)| {
            let mut l = line("20240101T130000", code, "x", "x", "x");
            l.time = Stamp::from_unix(1_704_114_000 + secs, 0).unwrap();
            l.source = source;
            l.client = client.clone();
            l.host = host;
            l.flow = client;
            l.rel_path = rel;
            l.identity = id.map(|v| Identity {
                method: "md5".into(),
                value: v,
            });
            l
        })
}

fn query_for(l: &ArchiveLine, pick: u8) -> Query {
    let mut q = Query::default();
    if pick & 1 != 0 {
        q.source = Some(l.source.clone());
    }
    if pick & 2 != 0 {
        q.client = Some(l.client.clone());
    }
    if pick & 4 != 0 {
        q.host = Some(l.host.clone());
    }
    if pick & 8 != 0 {
        q.flow = Some(l.flow.clone());
    }
    if pick & 16 != 0 {
        q.file = Some(FileMatch::Name(l.file_name().to_owned()));
    }
    if pick & 32 != 0 {
        q.code = Some(l.code.to_string().parse().unwrap());
    }
    if pick & 64 != 0 {
        q.since = Some(l.time);
        q.until = Some(Stamp::from_unix(l.time.0.as_second() + 1, 0).unwrap());
    }
    q
}

proptest! {
    #[test]
    fn never_a_false_negative(
        lines in proptest::collection::vec(small_line(), 1..40),
        which in any::<prop::sample::Index>(),
        pick in any::<u8>(),
        exact in any::<bool>(),
    ) {
        let mut b = if exact { IndexBuilder::new() } else { IndexBuilder::with_exact_limit(0) };
        for l in &lines {
            b.add(l);
        }
        let ix = Index::decode(&b.finish()).unwrap();
        let l = which.get(&lines);
        let q = query_for(l, pick);
        prop_assert!(q.matches(l));
        prop_assert!(ix.may_contain(&q));
        if let Some(id) = &l.identity {
            prop_assert!(ix.may_contain_value(SetKind::Identity, &identity_token(id)));
        }
    }

    #[test]
    fn any_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Index::decode(&b);
        // With a valid header and checksum, the body parser itself is exercised.
        let mut p = MAGIC.to_vec();
        p.push(VERSION);
        p.extend_from_slice(&b);
        let _ = Index::decode(&resign(p));
    }
}
