//! Parsing speed per format, single thread. Targets (issue 2): >= 1 000 000 v02 reports/s
//! and >= 300 000 v03 reports/s on one core. Run: `cargo bench --bench parse`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pumpwatch::core::emit::{Outgoing, emit};
use pumpwatch::core::report::{Format, Identity, Incoming, Report, parse};
use pumpwatch::core::{Headers, Stamp};
use std::hint::black_box;

fn sample(host: bool) -> Report {
    Report {
        format: Format::V02,
        topic: String::new(),
        exchange: "xs_cfs".into(),
        pub_time: Stamp::parse("20240101T130241.101"),
        base_url: "sftp://radar@data.radar.example".into(),
        rel_path: "20240101/radar/h5/radar_000123.h5".into(),
        code: 201,
        message: Some("Downloaded".into()),
        host: host.then(|| "node1".into()),
        user: host.then(|| "cfs".into()),
        duration_s: Some(0.125),
        source: Some("radar".into()),
        from_cluster: Some("ddsr.cmc".into()),
        to_clusters: vec!["ddsr.cmc".into(), "ddi.science".into()],
        flow: Some("radar-f1".into()),
        size_bytes: Some(1_234_567),
        identity: Some(Identity {
            method: "md5".into(),
            value: "0f3c9a7e1b2d4c6f8a9b0c1d2e3f4a5b".into(),
        }),
        time_completed: None,
        stamped_client: None,
        stamped_source: None,
        extra: Headers::new(),
    }
}

fn bench(c: &mut Criterion) {
    let cases: Vec<(&str, Outgoing)> = vec![
        ("v01", emit(&sample(true), Format::V01)),
        ("v02", emit(&sample(true), Format::V02)),
        ("v02-sr3", emit(&sample(false), Format::V02Sr3)),
        ("v03-v2schema", emit(&sample(true), Format::V03)),
        ("v03-sr3schema", emit(&sample(false), Format::V03)),
        ("v03-sr2", emit(&sample(true), Format::V03Sr2)),
    ];
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    for (name, out) in &cases {
        let inc = Incoming {
            exchange: "xs_cfs",
            routing_key: &out.routing_key,
            body: &out.body,
            content_type: Some(out.content_type),
            user_id: None,
            headers: &out.headers,
        };
        assert!(parse(&inc).is_ok(), "{name} sample parses");
        g.bench_function(*name, |b| b.iter(|| parse(black_box(&inc))));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
