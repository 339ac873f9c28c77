//! The archive core on one core: writing a report's line (from the `Report` and from an
//! `ArchiveLine`), parsing it back, refusing lines with `trace`'s matcher, and adding
//! lines to an hour's index. Before the benchmarks it prints the line size and the sidecar
//! index size per million lines for two shapes of traffic (unless `ARCHIVE_BENCH_NO_SIZES`
//! is set).
//!
//! `cargo bench --bench archive`

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use pumpwatch::core::archive::{
    ArchiveLine, FileMatch, IndexBuilder, Query, TimeSource, write_report,
};
use pumpwatch::core::attribution::Who;
use pumpwatch::core::report::{Format, Identity, Report};
use pumpwatch::core::{Headers, Stamp};

const PUB: i64 = 1_704_110_400;

/// Report `i` of a pump: `per_product` reports per product (one per client).
fn report(i: u64, per_product: u64) -> Report {
    let product = i / per_product;
    let client = i % per_product;
    Report {
        format: Format::V03,
        topic: format!("v03.20240101.radar{}.h5", product % 50),
        exchange: "xs_cfs".into(),
        pub_time: Stamp::from_unix(
            PUB + (product / 10) as i64,
            (product % 1000) as i32 * 1_000_000,
        ),
        base_url: "sftp://radar@data.radar.example".into(),
        rel_path: format!("20240101/radar{}/h5/radar_{product:08}.h5", product % 50),
        code: if i.is_multiple_of(97) { 499 } else { 201 },
        message: Some("Download successful".into()),
        host: Some(format!("node{}", client % 30)),
        user: Some(format!("client{client}")),
        duration_s: Some(0.125 + (i % 100) as f64 / 1000.0),
        source: Some(format!("radar{}", product % 50)),
        from_cluster: Some("ddsr.cmc".into()),
        to_clusters: vec!["ddsr.cmc".into()],
        flow: Some(format!("flow{}", product % 10)),
        size_bytes: Some(1_234_567 + product),
        identity: Some(Identity {
            method: "sha512".into(),
            value: format!(
                "{:016x}{:016x}",
                product.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                product
            ),
        }),
        time_completed: Stamp::from_unix(PUB + (product / 10) as i64 + 1, 500_000_000),
        stamped_client: None,
        stamped_source: None,
        extra: Headers::new(),
    }
}

fn who(r: &Report) -> Who {
    Who {
        client: r.user.clone(),
        source: r.source.clone(),
    }
}

fn archived_at() -> Stamp {
    Stamp::from_unix(PUB + 3600, 0).unwrap()
}

fn sizes() {
    for per_product in [1, 4] {
        let n = 1_000_000u64;
        let mut b = IndexBuilder::new();
        let mut bytes = 0usize;
        let mut buf = Vec::with_capacity(512);
        for i in 0..n {
            let r = report(i, per_product);
            buf.clear();
            write_report(&r, &who(&r), archived_at(), TimeSource::Completed, &mut buf);
            bytes += buf.len();
            b.add(&ArchiveLine::from_report(&r, &who(&r), archived_at()));
        }
        let index = b.finish();
        eprintln!(
            "{per_product} report(s) per product: {:.0} bytes per line, index {:.2} MB per million lines",
            bytes as f64 / n as f64,
            index.len() as f64 / 1e6
        );
    }
}

fn bench(c: &mut Criterion) {
    // Building two million-line indexes takes seconds; skip it when profiling one case.
    if std::env::var_os("ARCHIVE_BENCH_NO_SIZES").is_none() {
        sizes();
    }
    let reports: Vec<Report> = (0..1024).map(|i| report(i, 4)).collect();
    let whos: Vec<Who> = reports.iter().map(who).collect();
    let lines: Vec<ArchiveLine> = reports
        .iter()
        .map(|r| ArchiveLine::from_report(r, &who(r), archived_at()))
        .collect();
    let raw: Vec<Vec<u8>> = lines
        .iter()
        .map(|l| {
            let mut v = Vec::new();
            l.write(&mut v);
            v
        })
        .collect();
    eprintln!("sample line: {}", String::from_utf8_lossy(&raw[1]));

    let mut g = c.benchmark_group("archive");
    g.throughput(Throughput::Elements(1));
    let mut buf = Vec::with_capacity(512);
    let mut i = 0usize;
    g.bench_function("write_report", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            buf.clear();
            write_report(
                black_box(&reports[i]),
                &whos[i],
                archived_at(),
                TimeSource::Completed,
                &mut buf,
            );
            black_box(buf.len())
        })
    });
    g.bench_function("write_line", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            buf.clear();
            black_box(&lines[i]).write(&mut buf);
            black_box(buf.len())
        })
    });
    g.bench_function("parse", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            ArchiveLine::parse(black_box(&raw[i]))
        })
    });
    let by_file = Query {
        file: Some(FileMatch::Name("radar_99999999.h5".into())),
        ..Default::default()
    }
    .matcher();
    g.bench_function("matcher_file_miss", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            by_file.check(black_box(&raw[i]))
        })
    });
    let by_client = Query {
        client: Some("client1".into()),
        code: Some("4xx".parse().unwrap()),
        ..Default::default()
    }
    .matcher();
    g.bench_function("matcher_client_then_parse", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            by_client.check(black_box(&raw[i]))
        })
    });
    let mut ix = IndexBuilder::new();
    g.bench_function("index_add", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            ix.add(black_box(&lines[i]))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
