//! Health at pump scale, with the numbers the issue asks for:
//! - the health evaluation of 10 000 clients in the core (`core::health::evaluate` with
//!   the `unusual` verdict of a learned baseline, a 10-interval window each), and the
//!   same through `serve`'s board (`Board::sweep`: every client re-evaluated, as serve
//!   does every second);
//! - `check` end to end against a `serve` that knows 5 000 clients (500 of them in
//!   trouble): the HTTP request to `/api/check`, its JSON both ways and the plugin output
//!   (`check::query`), and the real binary (process start included).
//!
//! `cargo bench --bench health`

use criterion::{Criterion, Throughput, black_box, criterion_group};
use jiff::Timestamp;
use pumpwatch::cmd::Common;
use pumpwatch::cmd::check;
use pumpwatch::cmd::serve::{self, Board, View};
use pumpwatch::cmd::speedo::{Decoded, Reading, Subject};
use pumpwatch::config::Config;
use pumpwatch::core::Stamp;
use pumpwatch::core::baseline::{
    Baselines, Expectation, UnusualRule, WindowInterval, hour_of_week,
};
use pumpwatch::core::health::{self, Interval, Observed, Thresholds};
use pumpwatch::shutdown::Shutdown;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Monday 2024-01-01 00:00:00 UTC.
const MONDAY: i64 = 1_704_067_200;
const WINDOW: i64 = 10;

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(secs).unwrap()
}

/// Now: a Monday of week 5, 12:00.
fn now() -> Timestamp {
    at(MONDAY + 4 * 7 * 86_400 + 12 * 3600)
}

/// `n` clients, each with 10 one-minute intervals ending at `now()`; every 10th slow.
fn intervals(n: usize) -> Vec<Vec<Interval>> {
    (0..n)
        .map(|i| {
            (0..WINDOW)
                .rev()
                .map(|k| Interval {
                    end: at(now().as_second() - k * 60),
                    secs: 60.0,
                    good: if i % 10 == 0 { 0 } else { 60 + (i % 7) as u64 },
                    errors: (i % 3) as u64,
                    lag: None,
                })
                .collect()
        })
        .collect()
}

/// Three weeks learned in the hour of `now()` for every client.
fn learned(names: &[String]) -> Baselines {
    let mut b = Baselines::new();
    let h = now().as_second() - 4 * 7 * 86_400;
    for n in names {
        for w in 0..4 {
            for m in 0..5 {
                b.observe(n, at(h + w * 7 * 86_400 + m * 60), 1.0 + m as f64 * 0.01);
            }
        }
    }
    b
}

fn reading(end: Timestamp, total: u64, files: u64) -> Reading {
    Reading {
        end: Stamp(end),
        good: total,
        errors: 0,
        good_bytes: total * 1000,
        bad_bytes: 0,
        interval_bytes: files * 1000,
        interval_files: files,
        interval_s: 60.0,
    }
}

/// A board with `n` clients, ten intervals each (every 10th client stopped).
fn board(n: usize) -> Board {
    let pump = Config::default();
    let mut b = Board::new(&pump, View::Admin, Duration::from_secs(3600));
    let start = now().as_second() - 600;
    for k in 1..=WINDOW {
        let end = at(start + k * 60);
        for i in 0..n {
            let stopped = i % 10 == 0 && k > 2;
            let files = if stopped { 0 } else { 60 };
            let total = if i % 10 == 0 { 120 } else { k as u64 * 60 };
            let d = Decoded {
                subject: Subject::Client(format!("client{i:05}")),
                scope: None,
                reading: reading(end, total, files),
                lag: Default::default(),
            };
            b.apply(&d, end);
        }
    }
    b.sweep(now());
    b
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("health");
    g.sample_size(20);

    // Core: 10 000 clients.
    let n = 10_000;
    let names: Vec<String> = (0..n).map(|i| format!("client{i:05}")).collect();
    let ivs = intervals(n);
    let base = learned(&names);
    let t = Thresholds::default();
    let rule = UnusualRule::default();
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("core evaluate 10k clients (rules + unusual)", |b| {
        b.iter(|| {
            let mut bad = 0;
            for (name, iv) in names.iter().zip(&ivs) {
                let win = iv.iter().map(|i| WindowInterval {
                    hour: hour_of_week(i.end),
                    secs: i.secs,
                    value: i.good as f64 / i.secs,
                });
                let e: Expectation = base.expectation(name, &rule, win);
                let o = Observed {
                    first_seen: Some(at(MONDAY)),
                    last_good: iv.iter().rev().find(|i| i.good > 0).map(|i| i.end),
                    intervals: iv,
                };
                let h = health::evaluate(&t, &o, &e, now());
                bad += usize::from(h.state != health::State::Ok);
            }
            black_box(bad)
        })
    });
    let mut b10k = board(n);
    g.bench_function("board sweep 10k clients (serve, every second)", |b| {
        b.iter(|| black_box(b10k.sweep(now())))
    });

    // check end to end against a serve knowing 5 000 clients.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Shutdown::new();
    let shared = Arc::new(Mutex::new(board(5_000)));
    let addr = rt
        .block_on(serve::serve_board(
            shared,
            "127.0.0.1:0".parse().unwrap(),
            stop.clone(),
        ))
        .unwrap();
    let url = format!("http://{addr}");
    let common = Common::with_broker(
        Config::default(),
        &pumpwatch::broker::url::BrokerUrl::parse("amqp://localhost").unwrap(),
    );
    let cfg = check::Config::from_args(
        check::Args {
            url: url.clone(),
            timeout: "10".into(),
            ..Default::default()
        },
        &common,
    )
    .unwrap();
    let out = rt.block_on(check::query(&cfg));
    let line = out.status_line();
    println!(
        "check against 5 000 clients: {}",
        &line[..line.len().min(160)]
    );
    g.throughput(Throughput::Elements(1));
    g.bench_function(
        "check query, serve with 5k clients (HTTP + JSON + output)",
        |b| b.iter(|| black_box(rt.block_on(check::query(&cfg)).exit_code())),
    );
    let bin = env!("CARGO_BIN_EXE_pumpwatch");
    g.bench_function(
        "check binary, serve with 5k clients (process included)",
        |b| {
            b.iter(|| {
                let o = std::process::Command::new(bin)
                    .args(["check", "--url", &url])
                    .env_remove("RUST_LOG")
                    .output()
                    .unwrap();
                black_box(o.status.code())
            })
        },
    );
    g.finish();
    stop.cancel();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
