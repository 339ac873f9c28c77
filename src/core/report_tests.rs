use super::*;
use crate::core::emit::{Outgoing, emit};
use proptest::prelude::*;

fn inc<'a>(key: &'a str, body: &'a [u8], ct: Option<&'a str>, h: &'a Headers) -> Incoming<'a> {
    Incoming {
        exchange: "xs_cfs",
        routing_key: key,
        body,
        content_type: ct,
        user_id: None,
        headers: h,
    }
}

fn report(m: Result<Message, ParseError>) -> Report {
    match m {
        Ok(Message::Report(r)) => *r,
        other => panic!("expected a report, got {other:?}"),
    }
}

fn hdrs(pairs: &[(&str, &str)]) -> Headers {
    pairs.iter().map(|(k, v)| (*k, *v)).collect()
}

#[test]
fn v02_spec_example() {
    let h = hdrs(&[
        ("parts", "p,457,1,0,0"),
        ("sum", "d,0f3c9a"),
        ("flow", "exp13"),
        ("message", "Downloaded"),
        ("source", "ec_cmc"),
        ("from_cluster", "ddi.cmc.ec.gc.ca"),
        ("to_clusters", "ddi.science.gc.ca,bunny.nrcan.gc.ca"),
        ("rename", "/x/y"),
    ]);
    let body = b"20150601135701.345 sftp://afsiext@cmcdataserver/data/NRPDS/outputs/NRDPS_HiRes_000.gif NRDPS/GIF/ 201 castor anonymous 0.0006767";
    let r = report(parse(&inc(
        "v02.report.NRDPS.GIF.NRDPS_HiRes_000.gif",
        body,
        Some("text/plain"),
        &h,
    )));
    assert_eq!(r.format, Format::V02);
    assert_eq!(r.code, 201);
    assert_eq!(r.host.as_deref(), Some("castor"));
    assert_eq!(r.user.as_deref(), Some("anonymous"));
    assert_eq!(r.duration_s, Some(0.0006767));
    assert_eq!(r.source.as_deref(), Some("ec_cmc"));
    assert_eq!(r.flow.as_deref(), Some("exp13"));
    assert_eq!(r.message.as_deref(), Some("Downloaded"));
    assert_eq!(r.size_bytes, Some(457));
    assert_eq!(
        r.to_clusters,
        vec!["ddi.science.gc.ca", "bunny.nrcan.gc.ca"]
    );
    assert_eq!(
        r.identity,
        Some(Identity {
            method: "md5".into(),
            value: "0f3c9a".into()
        })
    );
    assert_eq!(r.extra.get_str("rename"), Some("/x/y"));
    assert_eq!(r.pub_time.unwrap().to_string(), "2015-06-01T13:57:01.345Z");
}

#[test]
fn v02_log_topic_and_negative_duration() {
    let h = Headers::new();
    let body = b"20240101130241.1 http://h/ a/b/c.txt 499 host1 cfs -0.25\nsecond line ignored";
    let r = report(parse(&inc("v02.log.a.b", body, None, &h)));
    assert_eq!((r.code, r.duration_s), (499, Some(-0.25)));
    assert_eq!(r.file_name(), "c.txt");
}

#[test]
fn v01_both_orders_and_early_topic() {
    let h = Headers::new();
    let body = b"20150601135701.345 457 1 0 0 d 0f3c sftp://afsiext@cmcdataserver/data/NRPDS/outputs/NRDPS_HiRes_000.gif YYYYMMDD/ec_cmc/NRDPS/GIF/ exp13 202 ddsr1.cmc.ec.gc.ca ssc_ddsr 0.1";
    let r = report(parse(&inc(
        "v01.log.ec_cmc.ssc_ddsr.NRDPS.GIF",
        body,
        None,
        &h,
    )));
    assert_eq!(r.format, Format::V01);
    assert_eq!(r.code, 202);
    assert_eq!(r.flow.as_deref(), Some("exp13"));
    assert_eq!(r.rel_path, "YYYYMMDD/ec_cmc/NRDPS/GIF/NRDPS_HiRes_000.gif");
    assert_eq!(r.source.as_deref(), Some("ec_cmc"));
    assert_eq!(r.user.as_deref(), Some("ssc_ddsr"));
    assert_eq!(r.size_bytes, Some(457));
    let body2 = b"20150601135701.345 457 1 0 0 d 0f3c exp13 sftp://h/data/f.gif 20150601/ec_cmc/f.gif 499 node1 cfs 1.5";
    let r2 = report(parse(&inc("v01.log.20150601.ec_cmc", body2, None, &h)));
    assert_eq!(
        (r2.code, r2.flow.as_deref(), r2.source.as_deref()),
        (499, Some("exp13"), None)
    );
    assert_eq!(r2.rel_path, "20150601/ec_cmc/f.gif");
}

#[test]
fn sr3_v03_report() {
    let h = Headers::new();
    let body = br#"{"pubTime":"20240101T130241.101","baseUrl":"https://dd.weather.gc.ca","relPath":"/home/cfs/data/f.grib2","identity":{"method":"sha512","value":"abc\n"},"size":1024,"source":"cfs","report":{"code":201,"timeCompleted":"20240101T130242.5","message":"Download successful"}}"#;
    let r = report(parse(&inc(
        "v03.home.cfs.data",
        body,
        Some("application/json"),
        &h,
    )));
    assert_eq!(r.format, Format::V03);
    assert_eq!(r.code, 201);
    assert_eq!(r.host, None);
    assert_eq!(r.message.as_deref(), Some("Download successful"));
    assert_eq!(r.size_bytes, Some(1024));
    assert_eq!(r.identity.unwrap().value, "abc");
    assert_eq!(
        r.time_completed.unwrap().to_string(),
        "2024-01-01T13:02:42.500Z"
    );
}

#[test]
fn v2_writing_v03_schema_under_v02_topic_without_content_type() {
    let h = hdrs(&[("message", "Downloaded")]);
    let body = br#"{"pubTime":"20240101130241","baseUrl":"http://x","relPath":"20240101/radar/a.h5","to_clusters":["a","b"],"report":{"resultCode":"499","host":"n1","user":"cfs","elapsedTime":0.12}}"#;
    let r = report(parse(&inc("v02.report.x", body, None, &h)));
    assert_eq!((r.format, r.code), (Format::V03, 499));
    assert_eq!(r.user.as_deref(), Some("cfs"));
    assert_eq!(r.message.as_deref(), Some("Downloaded"));
    assert_eq!(r.to_clusters, vec!["a", "b"]);
}

#[test]
fn sr3_writing_v02_nested_report_table() {
    let mut h = hdrs(&[("source", "cfs"), ("sum", "s,AbC=")]);
    let mut t = Headers::new();
    t.set("code", 201i64);
    t.set("timeCompleted", "20240101T130241.1");
    t.set("message", "Download successful");
    t.set("rate", 1234.5);
    h.set("report", t);
    let body = b"20240101T130241.101 https://dd.weather.gc.ca /home/cfs/f.txt";
    let r = report(parse(&inc(
        "v02.post.home.cfs",
        body,
        Some("text/plain"),
        &h,
    )));
    assert_eq!((r.format, r.code), (Format::V02Sr3, 201));
    assert_eq!(r.identity.as_ref().unwrap().method, "sha512");
    assert!(r.extra.get("report").is_none());
}

#[test]
fn sr2_v03_hybrid() {
    let mut h = hdrs(&[("source", "radar"), ("flow", "f1")]);
    let mut t = Headers::new();
    t.set("elapsedTime", 0.5);
    t.set("resultCode", 201i64);
    t.set("host", "n2");
    t.set("user", "cfs");
    h.set("report", t);
    let body = b"20240101130241.1 http://h/ a/b.txt 201 n2 cfs 0.5";
    let r = report(parse(&inc(
        "v03.report.a",
        body,
        Some("application/json"),
        &h,
    )));
    assert_eq!(r.format, Format::V03Sr2);
    assert_eq!(r.source.as_deref(), Some("radar"));
}

#[test]
fn announcements_are_not_reports() {
    let h = hdrs(&[("source", "radar")]);
    let m = parse(&inc(
        "v02.post.a",
        b"20240101130241.1 http://h/ a/b.txt",
        None,
        &h,
    ))
    .unwrap();
    assert!(matches!(m, Message::Announcement(a) if a.source.as_deref() == Some("radar")));
    let m = parse(&inc(
        "v03.a",
        br#"{"pubTime":"20240101T130241.1","baseUrl":"http://h/","relPath":"a/b.txt"}"#,
        None,
        &h,
    ))
    .unwrap();
    assert!(matches!(m, Message::Announcement(_)));
    let m = parse(&inc("v01.speedo.client.all", b"whatever", None, &h)).unwrap();
    assert_eq!(m, Message::Control(Control::Speedo));
    // A watchdog failure notice listing thousands of transfers is still pumpwatch's own
    // message, not a report too large.
    let big = vec![b'x'; 2 * DEFAULT_MAX_BODY];
    let m = parse(&inc("v01.watchdog.node.n1", &big, None, &h)).unwrap();
    assert_eq!(m, Message::Control(Control::Watchdog));
    assert!(matches!(
        parse(&inc("v02.report.a", &big, None, &h)),
        Err(ParseError::TooLarge { .. })
    ));
}

#[test]
fn bad_input_gets_a_named_error() {
    let h = Headers::new();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"".to_vec(), "empty body"),
        (b"\xff\xfe garbage".to_vec(), "not valid UTF-8"),
        (b"{\"pubTime\": \"2024".to_vec(), "invalid JSON"),
        (b"banana".to_vec(), "unrecognised body"),
        (b"20240101130241 http://h a/b banana host user 0.1".to_vec(), "invalid code"),
        (b"20240101130241 http://h a/b 99999999999 host user 0.1".to_vec(), "invalid code"),
        (b"20240101130241 http://h a/b 201 host user NaN".to_vec(), "invalid duration"),
        (b"notastamp http://h a/b 201 host user 0.1".to_vec(), "invalid pubTime"),
        (br#"{"baseUrl":"x","relPath":"y","report":{"code":201}}"#.to_vec(), "missing field pubTime"),
        (br#"{"pubTime":"20240101T000000","baseUrl":"x","relPath":"y","report":{}}"#.to_vec(), "missing field report.code"),
        (br#"{"pubTime":"20240101T000000","baseUrl":"x","relPath":"y","report":{"code":1e300}}"#.to_vec(), "invalid report.code"),
        (br#"{"pubTime":"20240101T000000","baseUrl":"x","relPath":"y","size":-5,"report":{"code":201}}"#.to_vec(), "invalid size"),
        (br#"{"pubTime":"20240101T000000","baseUrl":"x","relPath":"y","report":7}"#.to_vec(), "invalid report"),
        // Deep nesting under an ignored key is skipped without recursion; under a read key
        // serde_json's depth limit answers. Either way: an error, no stack overflow.
        ([b"{\"a\":".repeat(10_000), b"1".to_vec(), b"}".repeat(10_000)].concat(), "missing field pubTime"),
        ([b"{\"pubTime\":\"20240101T000000\",\"baseUrl\":\"x\",\"relPath\":\"y\",\"report\":{\"code\":".to_vec(), b"[".repeat(10_000), b"]".repeat(10_000), b"}}".to_vec()].concat(), "invalid JSON"),
        ([b"[".repeat(10_000), b"]".repeat(10_000)].concat(), "unrecognised body"),
        (vec![b'x'; 10 << 20], "exceeds the limit"),
    ];
    for (body, want) in cases {
        let err = parse(&inc("v02.report.x", &body, None, &h)).expect_err("should fail");
        let text = err.to_string();
        assert!(
            text.contains(want),
            "body {:?}…: got {text:?}, want {want:?}",
            String::from_utf8_lossy(&body[..body.len().min(40)])
        );
        assert!(!text.contains('\n'), "one line: {text:?}");
    }
}

#[test]
fn bad_parts_header() {
    let h = hdrs(&[("parts", "p,abc")]);
    let err = parse(&inc(
        "v02.report.x",
        b"20240101130241 http://h a/b 201 h u 0.1",
        None,
        &h,
    ))
    .unwrap_err();
    assert!(err.to_string().contains("invalid parts"), "{err}");
}

#[test]
fn sizes_from_parts() {
    assert_eq!(size_from_parts("1,1234,1,0,0").unwrap(), 1234);
    assert_eq!(size_from_parts("p,100,3,17,2").unwrap(), 17);
    assert_eq!(size_from_parts("p,100,3,17,1").unwrap(), 100);
    assert_eq!(size_from_parts("i,100,3,0,2").unwrap(), 100);
    assert!(size_from_parts("q,1").is_err());
    assert!(size_from_parts("1,-4").is_err());
}

/// SPEC §2 "Size": one rule for v01 bodies and v02 `parts`; the table runs through both.
#[test]
fn one_size_rule_for_v01_and_v02() {
    let max = u64::MAX;
    // (blocksize, count, remainder, blockno) -> bytes of this part
    let table = [
        ((100, 3, 17, 2), 17),  // last block, remainder: the remainder
        ((100, 3, 17, 1), 100), // not the last block
        ((100, 3, 0, 2), 100),  // last block, no remainder: a whole block
        ((100, 1, 17, 0), 17),  // a file smaller than one block
        ((457, 1, 0, 0), 457),  // one whole block
        ((100, 0, 17, 0), 100), // no blocks stated: nothing says which is last
        ((100, 2, 5, 7), 100),  // block number past the count
        ((100, max, 9, max - 1), 9),
        ((100, 1, 9, max), 100), // no overflow on blockno + 1
        ((0, 0, 0, 0), 0),
    ];
    for ((bs, count, rem, no), want) in table {
        assert_eq!(
            part_size(bs, count, rem, no),
            want,
            "{bs},{count},{rem},{no}"
        );
        for m in ["p", "i"] {
            let parts = format!("{m},{bs},{count},{rem},{no}");
            assert_eq!(size_from_parts(&parts).unwrap(), want, "{parts}");
            let h = hdrs(&[("parts", &parts)]);
            let body = b"20240101130241.5 http://h 20240101/radar/f 201 host user 0.1";
            let r = report(parse(&inc("v02.report.x", body, None, &h)));
            assert_eq!(r.size_bytes, Some(want), "v02 {parts}");
        }
        let v01 = format!(
            "20150601135701.345 {bs} {count} {rem} {no} d 0f3c exp13 sftp://u@h/d/f.gif 20150601/ec_cmc/f.gif 201 host user 0.1"
        );
        let r = report(parse(&inc(
            "v01.log.x",
            v01.as_bytes(),
            None,
            &Headers::new(),
        )));
        assert_eq!(r.size_bytes, Some(want), "v01 {v01}");
    }
}

// ---- properties ----

fn opt_word() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("[a-z][a-z0-9_.-]{0,12}")
}

prop_compose! {
    fn any_report()(
        secs in 0i64..4_000_000_000,
        ms in 0i32..1000,
        base in "(http|sftp)://[a-z]{1,10}(\\.[a-z]{2,5})?/",
        dirs in proptest::collection::vec("[A-Za-z0-9_#* é-]{1,10}", 0..4),
        file in "[A-Za-z0-9_.-]{1,20}",
        code in 100u16..=999,
        host in opt_word(),
        user in opt_word(),
        duration in proptest::option::of(-10.0f64..1e6),
        source in opt_word(),
        from_cluster in opt_word(),
        to_clusters in proptest::collection::vec("[a-z][a-z.]{0,10}", 0..3),
        flow in opt_word(),
        size in proptest::option::of(0u64..u64::MAX / 2),
        identity in proptest::option::of(("md5|sha512", "[A-Za-z0-9+/=]{4,30}")),
        message in proptest::option::of("[A-Za-z][A-Za-z ]{0,30}[a-z]"),
    ) -> Report {
        let mut rel: Vec<String> = dirs.into_iter().map(|d| d.trim().replace(' ', "_")).filter(|d| !d.is_empty()).collect();
        rel.push(file);
        Report {
            format: Format::V02,
            topic: String::new(),
            exchange: "xs_cfs".into(),
            pub_time: Stamp::from_unix(secs, ms * 1_000_000),
            base_url: base,
            rel_path: rel.join("/"),
            code,
            message,
            host,
            user,
            duration_s: duration,
            source,
            from_cluster,
            to_clusters: to_clusters.into_iter().map(|s| s.trim_matches('.').to_owned()).filter(|s| !s.is_empty()).collect(),
            flow,
            size_bytes: size,
            identity: identity.map(|(m, v)| Identity { method: m, value: v }),
            time_completed: None,
            stamped_client: None,
            stamped_source: None,
            extra: Headers::new(),
        }
    }
}

fn reparse(o: &Outgoing) -> Report {
    let h = o.headers.clone();
    report(parse(&inc(
        &o.routing_key,
        &o.body,
        Some(o.content_type),
        &h,
    )))
}

/// What survives each format: the fields it carries.
fn carried(r: &Report, f: Format) -> Report {
    let mut r = r.clone();
    r.format = f;
    r.topic = String::new();
    match f {
        Format::V01 => {
            r.size_bytes = Some(r.size_bytes.unwrap_or(0));
            r.duration_s = Some(r.duration_s.unwrap_or(0.0));
        }
        Format::V02 | Format::V03Sr2 => r.duration_s = Some(r.duration_s.unwrap_or(0.0)),
        Format::V02Sr3 => {
            r.host = None;
            r.user = None;
            r.duration_s = None;
        }
        // sr3's schema (chosen when there is no host or user) has no elapsed time.
        Format::V03 if r.host.is_none() && r.user.is_none() => r.duration_s = None,
        Format::V03 => {}
    }
    r
}

fn normalise(mut r: Report) -> Report {
    r.topic = String::new();
    r.duration_s = r.duration_s.map(|d| (d * 1e6).round() / 1e6);
    r
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn emit_parse_round_trip(r in any_report()) {
        for f in [Format::V01, Format::V02, Format::V02Sr3, Format::V03, Format::V03Sr2] {
            let mut want = carried(&r, f);
            if f == Format::V02Sr3 {
                want.message = r.message.clone();
            }
            let out = emit(&want, f);
            prop_assert!(out.routing_key.len() <= 255);
            let got = reparse(&out);
            // Millisecond precision on the wire.
            prop_assert_eq!(normalise(got), normalise(want), "format {}", f);
        }
    }

    #[test]
    fn announcement_parse_round_trip(r in any_report()) {
        for f in [Format::V01, Format::V02, Format::V02Sr3, Format::V03, Format::V03Sr2] {
            let out = crate::core::emit::announcement(&r, f);
            let h = out.headers.clone();
            let got = parse(&inc(&out.routing_key, &out.body, Some(out.content_type), &h));
            let Ok(Message::Announcement(a)) = got else {
                return Err(TestCaseError::fail(format!("{f}: not an announcement: {got:?}")));
            };
            prop_assert_eq!(&a.rel_path, &r.rel_path);
            prop_assert_eq!(&a.base_url, &r.base_url);
            prop_assert_eq!(a.pub_time, r.pub_time);
            prop_assert_eq!(&a.source, &r.source);
            prop_assert_eq!(&a.identity, &r.identity);
            prop_assert_eq!(a.size_bytes, r.size_bytes);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..400), key in ".{0,40}") {
        let h = Headers::new();
        let _ = parse(&inc(&key, &body, None, &h));
    }

    #[test]
    fn arbitrary_text_lines_never_panic(words in proptest::collection::vec("[ -~]{0,12}", 0..18)) {
        let body = words.join(" ");
        let h = Headers::new();
        let _ = parse(&inc("v02.report.x", body.as_bytes(), None, &h));
        let _ = parse(&inc("v01.log.a.b", body.as_bytes(), None, &h));
    }

    #[test]
    fn arbitrary_json_never_panics(j in arb_json()) {
        let body = serde_json::to_vec(&j).unwrap();
        let h = Headers::new();
        let _ = parse(&inc("v03.x", &body, None, &h));
    }
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[0-9T.]{0,20}".prop_map(Value::String),
        ".{0,10}".prop_map(Value::String),
    ];
    let keys = prop_oneof![
        Just("pubTime".to_owned()),
        Just("baseUrl".to_owned()),
        Just("relPath".to_owned()),
        Just("report".to_owned()),
        Just("code".to_owned()),
        Just("resultCode".to_owned()),
        Just("size".to_owned()),
        Just("identity".to_owned()),
        Just("to_clusters".to_owned()),
        Just("timeCompleted".to_owned()),
        Just("elapsedTime".to_owned()),
        "[a-z]{1,5}",
    ];
    leaf.prop_recursive(4, 40, 8, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(keys.clone(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
