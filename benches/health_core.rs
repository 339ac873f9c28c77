//! The health core on one core: the `unusual` rule over 10 000 names (a 10-interval
//! window each), learning one interval for 10 000 names, lag accounting (the per-report
//! `accept`, then `add` to a meter, and `take` at the interval's end; one meter, and
//! 10 000 meters), and Nagios range parsing.
//!
//! Before the benchmarks it prints what a learned name and a lag meter hold in memory,
//! measured with a counting allocator.
//!
//! `cargo bench --bench health_core`

use criterion::{Criterion, Throughput, black_box, criterion_group};
use jiff::Timestamp;
use pumpwatch::core::baseline::{Baselines, HourOfWeek, UnusualRule, WindowInterval};
use pumpwatch::core::lag::{Lag, LagMeter, LagRules};
use pumpwatch::core::nagios::Range;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[path = "common/alloc.rs"]
mod alloc;

const NAMES: usize = 10_000;
const WINDOW: usize = 10;
const LAGS: usize = 1_000_000;

/// Monday 2024-01-01 00:00:00 UTC.
const MONDAY: i64 = 1_704_067_200;

fn hour(h: usize) -> HourOfWeek {
    HourOfWeek::new((h % 168) as u8).unwrap()
}

/// The end of minute `k` of hour-of-week `h` in week `w`.
fn at(w: usize, h: usize, k: usize) -> Timestamp {
    Timestamp::from_second(MONDAY + (w * 7 * 86_400 + (h % 168) * 3600 + k * 60) as i64).unwrap()
}

/// Every name learned in every slot (3 weeks of 5 samples around 1 + name % 10 files/s).
fn learned(names: &[String]) -> Baselines {
    let mut b = Baselines::new();
    for (i, n) in names.iter().enumerate() {
        let mean = 1.0 + (i % 10) as f64;
        for w in 0..3 {
            for h in 0..168 {
                for k in 0..5 {
                    b.observe(n, at(w, h, k), mean * (0.95 + 0.025 * k as f64));
                }
            }
        }
    }
    b.drain_changed();
    b
}

/// Per name, a window of 10 intervals in hour 37; every 10th name dropped to half (the
/// rule walks the whole window for those), the rest usual (cleared at the first one).
fn windows(names: &[String]) -> Vec<Vec<WindowInterval>> {
    (0..names.len())
        .map(|i| {
            let mean = 1.0 + (i % 10) as f64;
            let value = if i % 10 == 0 { mean / 2.0 } else { mean };
            (0..WINDOW)
                .map(|_| WindowInterval {
                    hour: hour(37),
                    secs: 60.0,
                    value,
                })
                .collect()
        })
        .collect()
}

fn lags() -> Vec<f64> {
    let mut rng = SmallRng::seed_from_u64(7);
    // Log-uniform from 10 ms to about 3 h: a wide span, the costly case for the buckets.
    (0..LAGS)
        .map(|_| 10f64.powf(rng.random_range(-2.0..4.0)))
        .collect()
}

fn memory_report(names: &[String]) {
    let before = alloc::live();
    let b = learned(names);
    let used = alloc::live() - before;
    println!(
        "memory: {} names learned in all 168 hours: {used} bytes ({} per name)",
        b.len(),
        used / names.len() as isize
    );
    let before = alloc::live();
    let mut m = LagMeter::default();
    for x in lags().iter().take(100_000) {
        let _ = m.record(*x);
    }
    let after_lags = alloc::live();
    // The input vector is freed again; what stays is the meter's buckets.
    println!(
        "memory: one lag meter after 100 000 lags over 10 ms .. 3 h: {} bytes of buckets",
        after_lags - before
    );
    drop(m);
}

fn bench(c: &mut Criterion) {
    let names: Vec<String> = (0..NAMES).map(|i| format!("client{i:05}")).collect();
    memory_report(&names);
    let b = learned(&names);
    let w = windows(&names);
    let rule = UnusualRule::default();
    let unusual = names
        .iter()
        .zip(&w)
        .filter(|(n, w)| b.expectation(n, &rule, w.iter().copied()).is_unusual())
        .count();
    println!("unusual: {unusual} of {NAMES} names");

    let mut g = c.benchmark_group("health_core");
    g.sample_size(20);
    g.throughput(Throughput::Elements(NAMES as u64));
    g.bench_function("unusual rule, 10k names x 10 intervals", |bch| {
        bch.iter(|| {
            let mut n = 0;
            for (name, win) in names.iter().zip(&w) {
                n += usize::from(b.expectation(name, &rule, win.iter().copied()).is_unusual());
            }
            black_box(n)
        })
    });
    let mut learning = b.clone();
    let mut tick = 0usize;
    g.bench_function("learn one interval for 10k names", |bch| {
        bch.iter(|| {
            tick += 1;
            for (i, name) in names.iter().enumerate() {
                learning.observe(name, at(3, tick / 60, tick % 60), 1.0 + (i % 10) as f64);
            }
            black_box(learning.drain_changed().len())
        })
    });

    let input = lags();
    let rules = LagRules::DEFAULT;
    let accepted: Vec<Lag> = input.iter().filter_map(|&x| rules.accept(x).ok()).collect();
    g.throughput(Throughput::Elements(LAGS as u64));
    g.bench_function("lag accept 1M (rules + bucket, once per report)", |bch| {
        bch.iter(|| {
            let mut n = 0u64;
            for &x in &input {
                n += u64::from(rules.accept(black_box(x)).is_ok());
            }
            black_box(n)
        })
    });
    let mut m = LagMeter::default();
    g.bench_function("lag add 1M to one meter + take", |bch| {
        bch.iter(|| {
            for &l in &accepted {
                m.add(black_box(l));
            }
            black_box(m.take())
        })
    });
    g.bench_function("lag record 1M (accept + add) + take", |bch| {
        bch.iter(|| {
            for &x in &input {
                let _ = m.record(black_box(x));
            }
            black_box(m.take())
        })
    });
    let mut meters: Vec<LagMeter> = (0..NAMES).map(|_| LagMeter::default()).collect();
    g.bench_function("lag add 1M over 10k meters + take all", |bch| {
        bch.iter(|| {
            for (i, &l) in accepted.iter().enumerate() {
                meters[(i * 7919) % NAMES].add(black_box(l));
            }
            meters.iter_mut().filter_map(|m| m.take()).count()
        })
    });

    let ranges = [
        "10",
        "10:",
        "~:10",
        "10:20",
        "@10:20",
        "-1.5:2.25",
        "@~:0.001",
        "0.5",
    ];
    g.throughput(Throughput::Elements(ranges.len() as u64));
    g.bench_function("range parse (8 ranges)", |bch| {
        bch.iter(|| {
            for r in ranges {
                black_box(Range::parse(black_box(r)).ok());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
