//! The speedo core on one core: `record` of pre-parsed reports with 10 000 clients and
//! 1 000 sources (each client takes 5 sources' products: 50 000 pairs), and a full tick
//! (every meter due). The target is at least 2 000 000 reports/s.
//!
//! Before the benchmarks it prints the memory a tracked client and a (source, client)
//! pair cost, measured with a counting allocator.
//!
//! `cargo bench --bench speedo`

use criterion::{BatchSize, Criterion, Throughput, black_box, criterion_group};
use jiff::Timestamp;
use pumpwatch::cmd::speedo::{Sample, Settings, Speedometers};
use pumpwatch::core::lag::LagRules;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::time::Duration;

#[path = "common/alloc.rs"]
mod alloc;

const CLIENTS: usize = 10_000;
const SOURCES: usize = 1_000;
const PER_CLIENT: usize = 5;
const BATCH: usize = 200_000;

fn settings() -> Settings {
    Settings {
        interval: Duration::from_secs(60),
        all_interval: Duration::from_secs(1),
        expire: Duration::from_secs(86_400),
        overrides: BTreeMap::new(),
        // Every source declared, so the (source, client) pairs are kept and measured.
        views: (0..SOURCES).map(|i| format!("source{i:04}")).collect(),
    }
}

fn t0() -> Timestamp {
    Timestamp::from_second(1_700_000_000).unwrap()
}

struct Names {
    clients: Vec<String>,
    sources: Vec<String>,
}

fn names() -> Names {
    Names {
        clients: (0..CLIENTS).map(|i| format!("client{i:05}")).collect(),
        sources: (0..SOURCES).map(|i| format!("source{i:04}")).collect(),
    }
}

/// Pre-parsed reports: a random client, one of its 5 sources, 90 % good.
fn samples(n: &Names, count: usize) -> Vec<Sample<'_>> {
    let mut rng = SmallRng::seed_from_u64(7);
    (0..count)
        .map(|_| {
            let c = rng.random_range(0..CLIENTS);
            let s = (c * 7 + rng.random_range(0..PER_CLIENT) * 131) % SOURCES;
            Sample {
                client: &n.clients[c],
                source: &n.sources[s],
                code: if rng.random_bool(0.9) { 201 } else { 499 },
                bytes: rng.random_range(1_000..10_000_000),
                // As speedo measures it: a lag of a few seconds, bucket worked out once.
                lag: Some(LagRules::DEFAULT.accept(rng.random_range(0.5..30.0))),
            }
        })
        .collect()
}

/// Every client once with every one of its sources.
fn warm(m: &mut Speedometers, n: &Names) {
    for c in 0..CLIENTS {
        for k in 0..PER_CLIENT {
            m.record(&Sample {
                client: &n.clients[c],
                source: &n.sources[(c * 7 + k * 131) % SOURCES],
                code: 201,
                bytes: 1,
                lag: None,
            });
        }
    }
}

fn memory_report(n: &Names) {
    let before = alloc::live();
    let mut m = Speedometers::new(settings(), t0());
    for c in &n.clients {
        m.record(&Sample {
            client: c,
            source: "unknown",
            code: 201,
            bytes: 1,
            lag: None,
        });
    }
    let clients_only = alloc::live() - before;
    drop(m);
    let before = alloc::live();
    let mut m = Speedometers::new(settings(), t0());
    warm(&mut m, n);
    let full = alloc::live() - before;
    let (c, s, p) = m.sizes();
    println!(
        "memory: {CLIENTS} clients alone: {clients_only} bytes ({} per client); \
         {c} clients + {s} sources + {p} pairs: {full} bytes ({} per client with its {PER_CLIENT} pairs, \
         about {} per pair)",
        clients_only / CLIENTS as isize,
        full / CLIENTS as isize,
        (full - clients_only) / p as isize,
    );
}

fn bench(c: &mut Criterion) {
    let n = names();
    memory_report(&n);
    let input = samples(&n, BATCH);
    let mut m = Speedometers::new(settings(), t0());
    warm(&mut m, &n);
    let mut g = c.benchmark_group("speedo");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);
    g.bench_function("record 10k clients x 1k sources", |b| {
        b.iter(|| {
            for s in &input {
                black_box(m.record(black_box(s)));
            }
        })
    });
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    let mut now = t0();
    g.bench_function("tick with every meter due (10k clients, 50k pairs)", |b| {
        b.iter_batched(
            || {
                now += Duration::from_secs(60);
                now
            },
            |t| black_box(m.tick(t).len()),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
