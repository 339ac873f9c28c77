use super::*;
use crate::core::Headers;
use crate::core::attribution::Attributor;
use crate::core::report::{Format, Incoming, Message, parse as parse_report};
use proptest::prelude::*;

fn t(s: &str) -> Stamp {
    Stamp::parse(s).unwrap()
}

fn sample() -> Report {
    Report {
        format: Format::V02,
        topic: "v02.report.NRDPS.GIF".into(),
        exchange: "xs_cfs".into(),
        pub_time: Some(t("20150601T135701.345")),
        base_url: "sftp://afsiext@cmcdataserver/data".into(),
        rel_path: "NRDPS/GIF/NRDPS_HiRes_000.gif".into(),
        code: 201,
        message: Some("Downloaded".into()),
        host: Some("castor".into()),
        user: Some("anonymous".into()),
        duration_s: Some(0.0006767),
        source: Some("ec_cmc".into()),
        from_cluster: Some("ddi.cmc".into()),
        to_clusters: vec!["ddi.science".into(), "bunny".into()],
        flow: Some("exp13".into()),
        size_bytes: Some(457),
        identity: Some(Identity {
            method: "md5".into(),
            value: "0f3c9a".into(),
        }),
        time_completed: None,
        stamped_client: None,
        stamped_source: None,
        extra: Headers::new(),
    }
}

const ARCHIVED: &str = "20150601T135702.001";

/// Who a report is about, as a pump with no declared accounts sees it.
fn who(r: &Report) -> Who {
    Attributor::default().who(r, None)
}

fn from(r: &Report, at: Stamp) -> ArchiveLine {
    ArchiveLine::from_report(r, &who(r), at)
}

#[test]
fn the_example_line() {
    let line = from(&sample(), t(ARCHIVED));
    assert_eq!(
        line.to_line(),
        "20150601T135702.001 201 ec_cmc anonymous@castor exp13 ddi.cmc \
         NRDPS/GIF/NRDPS_HiRes_000.gif sftp://afsiext@cmcdataserver/data Downloaded \
         v02.report.NRDPS.GIF pub=20150601T135701.345 id=md5,0f3c9a dur=0.0006767 \
         size=457 to=ddi.science,bunny\n"
    );
}

#[test]
fn from_a_parsed_v02_report() {
    let h: Headers = [
        ("parts", "p,457,1,0,0"),
        ("sum", "d,0f3c9a"),
        ("flow", "exp13"),
        ("message", "Downloaded"),
        ("source", "ec_cmc"),
        ("from_cluster", "ddi.cmc"),
        ("pumpwatch_client", "anon"),
        ("pumpwatch_hops", "2"),
    ]
    .into_iter()
    .collect();
    let body = b"20150601135701.345 sftp://a@b/x NRDPS/GIF/ 201 castor anonymous 0.5";
    let inc = Incoming {
        exchange: "xs_cfs",
        routing_key: "v02.report.NRDPS.GIF",
        body,
        content_type: None,
        user_id: None,
        headers: &h,
    };
    let Ok(Message::Report(r)) = parse_report(&inc) else {
        panic!("sample should parse")
    };
    let line = from(&r, t(ARCHIVED));
    assert_eq!(
        line.to_line(),
        "20150601T135702.001 201 ec_cmc anon@castor exp13 ddi.cmc NRDPS/GIF/ sftp://a@b/x \
         Downloaded v02.report.NRDPS.GIF pub=20150601T135701.345 id=md5,0f3c9a dur=0.5 \
         size=457 hops=2\n"
    );
}

#[test]
fn write_report_writes_what_from_report_writes() {
    let mut r = sample();
    r.time_completed = Some(t("20150601T135701.9"));
    for ts in [TimeSource::Completed, TimeSource::Archived] {
        let mut a = Vec::new();
        write_report(&r, &who(&r), t(ARCHIVED), ts, &mut a);
        let mut b = Vec::new();
        ArchiveLine::from_report_with(&r, &who(&r), t(ARCHIVED), ts).write(&mut b);
        assert_eq!(a, b);
    }
}

#[test]
fn report_time_rules() {
    let mut r = sample();
    let at = t(ARCHIVED);
    // No completion time (v01, v02): the archive time.
    assert_eq!(from(&r, at).time, at);
    r.time_completed = Some(t("20150601T135701.900"));
    assert_eq!(from(&r, at).time, r.time_completed.unwrap());
    assert_eq!(
        ArchiveLine::from_report_with(&r, &who(&r), at, TimeSource::Archived).time,
        at
    );
    // A completion time in the future of the archive is not believed.
    r.time_completed = Some(t("20150601T145702.001"));
    assert_eq!(from(&r, at).time, r.time_completed.unwrap());
    r.time_completed = Some(t("20150601T145702.002"));
    assert_eq!(from(&r, at).time, at);
    // A completion time a line cannot hold is ignored; so is such a pubTime.
    r.time_completed = Stamp::from_unix(-70_000_000_000, 0);
    r.pub_time = Some(Stamp(jiff::Timestamp::MIN));
    let line = from(&r, at);
    assert_eq!((line.time, line.pub_time), (at, None));
}

#[test]
fn client_and_source_follow_the_stamps() {
    let mut r = sample();
    r.stamped_client = Some("cfs".into());
    r.stamped_source = Some("radar".into());
    r.source = Some("sr3user".into());
    let line = from(&r, t(ARCHIVED));
    assert_eq!(
        (line.client.as_str(), line.source.as_str()),
        ("cfs", "radar")
    );
    r.stamped_client = None;
    r.user = None;
    r.host = None;
    let line = from(&r, t(ARCHIVED));
    assert!(line.to_line().contains(" -@- "), "{}", line.to_line());
}

#[test]
fn hops_only_from_a_sane_header() {
    let mut r = sample();
    for (v, want) in [
        ("3", Some(3)),
        ("-1", None),
        ("x", None),
        ("99999999999", None),
    ] {
        r.extra = [(HOPS_HEADER, v)].into_iter().collect();
        assert_eq!(from(&r, t(ARCHIVED)).hops, want, "{v}");
    }
}

#[test]
fn a_hostile_report_stays_on_one_line() {
    let mut r = sample();
    r.message = Some("ok\n20150601T135702.001 201 evil x@y - - a b c d".into());
    r.user = Some("a@b c".into());
    r.host = Some("h\r\u{1b}[2J".into());
    r.rel_path = "dir/\u{202e}fdp.exe".into();
    r.source = Some("-".into());
    r.flow = Some(String::new());
    let text = from(&r, t(ARCHIVED)).to_line();
    assert_eq!(text.matches('\n').count(), 1);
    assert!(!text.contains('\u{1b}') && !text.contains('\u{202e}') && !text.contains('\r'));
    let fields: Vec<&str> = text.trim_end().split(' ').collect();
    assert_eq!(fields[2], "%2D");
    assert_eq!(fields[3], "a%40b%20c@h%0D%1B[2J");
    assert_eq!(fields[4], "-");
    assert_eq!(fields[6], "dir/%E2%80%AEfdp.exe");
    let back = ArchiveLine::parse(text.as_bytes()).unwrap();
    assert_eq!(back, from(&r, t(ARCHIVED)));
}

#[test]
fn times_keep_their_precision() {
    for (s, want) in [
        ("20240101T000000", "20240101T000000.000"),
        ("20240101T000000.1", "20240101T000000.100"),
        ("20240101T000000.1234", "20240101T000000.123400"),
        ("20240101T000000.123456789", "20240101T000000.123456789"),
        ("19691231T235959.999", "19691231T235959.999"),
        ("00000101T000000", "00000101T000000.000"),
        ("99991230T220000.999999999", "99991230T220000.999999999"),
    ] {
        let mut out = Vec::new();
        write_time(t(s), &mut out);
        assert_eq!(std::str::from_utf8(&out).unwrap(), want);
        assert_eq!(parse_time(&out), Some(t(s)));
    }
}

#[test]
fn out_of_range_times_are_clamped_when_written() {
    let mut line = from(&sample(), t(ARCHIVED));
    line.time = Stamp::from_unix(-100_000_000_000, 0).unwrap();
    line.pub_time = Some(Stamp(jiff::Timestamp::MIN));
    let back = ArchiveLine::parse(line.to_line().as_bytes()).unwrap();
    assert_eq!(back.time, t("00000101T000000"));
    assert_eq!(back.pub_time, Some(t("00000101T000000")));
    // The last instant jiff knows is still exact.
    line.time = Stamp(jiff::Timestamp::MAX);
    let back = ArchiveLine::parse(line.to_line().as_bytes()).unwrap();
    assert_eq!(back.time, line.time);
}

#[test]
fn unknown_keys_are_kept_and_bad_ones_dropped_when_written() {
    let base = from(&sample(), t(ARCHIVED)).to_line();
    let text = format!("{} x_new=a%20b lag2=-\n", base.trim_end());
    let line = ArchiveLine::parse(text.as_bytes()).unwrap();
    assert_eq!(
        line.other,
        vec![
            ("x_new".to_owned(), "a b".to_owned()),
            ("lag2".to_owned(), String::new())
        ]
    );
    assert_eq!(line.to_line(), text);
    let mut odd = line.clone();
    odd.other.push(("Bad Key".into(), "v".into()));
    odd.other.push(("pub".into(), "v".into()));
    odd.other.push(("x_new".into(), "again".into()));
    assert_eq!(odd.to_line(), text);
}

#[test]
fn malformed_lines_are_refused() {
    let good = from(&sample(), t(ARCHIVED)).to_line();
    let g = good.trim_end();
    let cases: Vec<(String, LineError)> = vec![
        (g.to_owned(), LineError::Partial),
        (String::new(), LineError::Partial),
        ("\n".into(), LineError::EmptyField { at: 1 }),
        (format!("{g}\nx\n"), LineError::Break),
        (
            "20150601T135702.001 201 a\n".into(),
            LineError::Fields { found: 3 },
        ),
        (format!("{g} \n"), LineError::EmptyField { at: 16 }),
        (
            g.replacen(" 201 ", "  201 ", 1) + "\n",
            LineError::EmptyField { at: 2 },
        ),
        (
            g.replacen("20150601T135702.001", "2015-06-01", 1) + "\n",
            LineError::Invalid("time"),
        ),
        (
            g.replacen(" 201 ", " 70000 ", 1) + "\n",
            LineError::Invalid("code"),
        ),
        (
            g.replacen(" 201 ", " 2x1 ", 1) + "\n",
            LineError::Invalid("code"),
        ),
        (
            g.replacen("anonymous@castor", "anonymous", 1) + "\n",
            LineError::Invalid("client@host"),
        ),
        (
            g.replacen("anonymous@castor", "a@n@castor", 1) + "\n",
            LineError::Invalid("client@host"),
        ),
        (
            g.replacen(" exp13 ", " exp%1 ", 1) + "\n",
            LineError::Escape {
                field: "flow",
                error: EscapeError::Percent,
            },
        ),
        (
            g.replacen(" exp13 ", " exp\t13 ", 1) + "\n",
            LineError::Escape {
                field: "flow",
                error: EscapeError::Control(9),
            },
        ),
        (format!("{g} banana\n"), LineError::NotPair { at: 16 }),
        (format!("{g} BIG=1\n"), LineError::NotPair { at: 16 }),
        (format!("{g} =1\n"), LineError::NotPair { at: 16 }),
        (format!("{g} size=1\n"), LineError::Duplicate("size".into())),
        (format!("{g} x=1 x=2\n"), LineError::Duplicate("x".into())),
        (
            g.replacen("size=457", "size=-4", 1) + "\n",
            LineError::Invalid("size"),
        ),
        (
            g.replacen("dur=0.0006767", "dur=NaN", 1) + "\n",
            LineError::Invalid("dur"),
        ),
        (
            g.replacen("id=md5,0f3c9a", "id=md5", 1) + "\n",
            LineError::Invalid("id"),
        ),
        (
            g.replacen("id=md5,0f3c9a", "id=a,b,c", 1) + "\n",
            LineError::Invalid("id"),
        ),
        (
            g.replacen("pub=20150601T135701.345", "pub=x", 1) + "\n",
            LineError::Invalid("pub"),
        ),
        (
            g.replacen("to=ddi.science,bunny", "to=a,,b", 1) + "\n",
            LineError::Invalid("to"),
        ),
    ];
    for (text, want) in cases {
        assert_eq!(ArchiveLine::parse(text.as_bytes()), Err(want), "{text:?}");
    }
    // CRLF is accepted: an editor may have touched the file.
    assert!(ArchiveLine::parse(format!("{g}\r\n").as_bytes()).is_ok());
}

#[test]
fn split_lines_yields_the_partial_tail() {
    let buf = b"a\nb\npart";
    let v: Vec<&[u8]> = split_lines(buf).collect();
    assert_eq!(v, vec![&b"a\n"[..], b"b\n", b"part"]);
    assert_eq!(ArchiveLine::parse(v[2]), Err(LineError::Partial));
}

#[test]
fn complete_len_drops_the_partial_tail() {
    assert_eq!(complete_len(b""), 0);
    assert_eq!(complete_len(b"partial"), 0);
    assert_eq!(complete_len(b"a\nb\n"), 4);
    assert_eq!(complete_len(b"a\nb\npart"), 4);
}

#[test]
fn hour_paths() {
    assert_eq!(hour_path(t("20240229T235959.999")), "2024/02/29/23");
    assert_eq!(hour_path(t("19700101T000000")), "1970/01/01/00");
}

// ---- properties ----

fn any_stamp() -> impl Strategy<Value = Stamp> {
    (
        -62_167_219_200i64..253_402_207_201,
        prop_oneof![
            (0i32..1000).prop_map(|ms| ms * 1_000_000),
            (0i32..1_000_000).prop_map(|us| us * 1000),
            0i32..1_000_000_000
        ],
    )
        .prop_map(|(s, n)| Stamp::from_unix(s, n).unwrap())
}

/// Any text, weighted towards the characters that matter to the line format.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,12}",
        "[-@%, =\t\r\n\u{0}-\u{1f}\u{7f}-\u{a0}\u{202a}-\u{202e}\u{2066}-\u{2069}é漢]{0,12}",
        Just(String::new()),
        Just("-".to_owned()),
    ]
}

fn any_identity() -> impl Strategy<Value = Option<Identity>> {
    proptest::option::of(
        (any_text(), any_text()).prop_map(|(method, value)| Identity { method, value }),
    )
}

prop_compose! {
    fn any_line()(
        time in any_stamp(),
        code in any::<u16>(),
        text in proptest::collection::vec(any_text(), 9),
        pub_time in proptest::option::of(any_stamp()),
        identity in any_identity(),
        duration_s in proptest::option::of(prop_oneof![any::<f64>(), -1e3..1e3f64]
            .prop_filter("finite", |d| d.is_finite())),
        size in proptest::option::of(any::<u64>()),
        hops in proptest::option::of(any::<u32>()),
        to_clusters in proptest::collection::vec(any_text(), 0..3),
        other in proptest::collection::btree_map("x[a-z0-9_]{0,5}", any_text(), 0..3),
    ) -> ArchiveLine {
        let [source, client, host, flow, from_cluster, rel_path, base_url, message, topic]: [String; 9] =
            text.try_into().unwrap();
        ArchiveLine {
            time, code, source, client, host, flow, from_cluster, rel_path, base_url, message,
            topic, pub_time, identity, duration_s, size, hops, to_clusters,
            other: other.into_iter().collect(),
        }
    }
}

proptest! {
    #[test]
    fn round_trip(line in any_line()) {
        let mut out = Vec::new();
        line.write(&mut out);
        prop_assert_eq!(ArchiveLine::parse(&out), Ok(line.clone()));
        // One line, no raw control character, single spaces.
        prop_assert_eq!(memchr::memchr_iter(b'\n', &out).count(), 1);
        prop_assert_eq!(out.last(), Some(&b'\n'));
        prop_assert!(out[..out.len() - 1].iter().all(|&c| c >= 0x20 && c != 0x7f));
        let text = std::str::from_utf8(&out).unwrap();
        prop_assert!(!text.chars().any(crate::core::archive::escape::is_hidden));
        prop_assert!(!text.contains("  "));
        prop_assert!(text.split(' ').count() >= 10);
    }

    #[test]
    fn any_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = ArchiveLine::parse(&b);
    }

    #[test]
    fn damaged_lines_never_panic(line in any_line(), cut in any::<usize>(), at in any::<usize>(), byte in any::<u8>()) {
        let mut out = Vec::new();
        line.write(&mut out);
        let mut damaged = out.clone();
        let i = at % damaged.len();
        damaged[i] = byte;
        let _ = ArchiveLine::parse(&damaged);
        // Any strict prefix is partial.
        let prefix = &out[..cut % out.len()];
        prop_assert_eq!(ArchiveLine::parse(prefix), Err(LineError::Partial));
    }
}
