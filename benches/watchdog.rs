//! The watchdog core on one core (issue 11): memory for 1 000 000 open transfers (goal
//! <= 150 MB, at most 300 MB) and events/s for a mix of 102 and final reports across 50
//! nodes and 500 clients (goal >= 500 000 events/s).
//!
//! Before the benchmarks it prints the bytes live after opening 1 000 000 transfers with
//! realistic fields (relPaths of about 60 bytes, sha512 identities in base64), measured
//! with a counting allocator, and the growth of the resident set for comparison (which
//! adds the allocator's own overhead).
//!
//! The client is passed as the report states it (the daemon asks the pump's `Attributor`).
//!
//! `cargo bench --bench watchdog`

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use criterion::{Criterion, Throughput, black_box, criterion_group};
use jiff::Timestamp;
use pumpwatch::core::report::{Format, Identity, Report};
use pumpwatch::core::watchdog::{Settings, Watchdog};
use pumpwatch::core::{Headers, Stamp};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::fmt::Write;
use std::time::Duration;

#[path = "common/alloc.rs"]
mod alloc;

const HOSTS: usize = 50;
const CLIENTS: usize = 500;
const SOURCES: usize = 20;
const RADARS: usize = 10;
const OPEN: usize = 1_000_000;
/// Products cycled through by the throughput benchmark, and how many stay in flight.
const PRODUCTS: usize = 50_000;
const LAG: usize = 20_000;

fn settings() -> Settings {
    Settings {
        max_inflight: 2_000_000,
        max_bytes: 2 << 30,
        ..Settings::default()
    }
}

fn t0() -> Timestamp {
    Timestamp::from_second(1_718_452_800).unwrap()
}

struct Names {
    hosts: Vec<String>,
    clients: Vec<String>,
    sources: Vec<String>,
}

fn names() -> Names {
    Names {
        hosts: (0..HOSTS)
            .map(|i| format!("ddsr{i:02}.cmc.ec.gc.ca"))
            .collect(),
        clients: (0..CLIENTS).map(|i| format!("client{i:03}")).collect(),
        sources: (0..SOURCES).map(|i| format!("source{i:02}")).collect(),
    }
}

fn blank() -> Report {
    Report {
        format: Format::V02,
        topic: String::new(),
        exchange: String::new(),
        pub_time: None,
        base_url: String::new(),
        rel_path: String::new(),
        code: 102,
        message: None,
        host: None,
        user: None,
        duration_s: None,
        source: None,
        from_cluster: Some("ddsr.cmc".into()),
        to_clusters: vec!["ddsr.cmc".into()],
        flow: None,
        size_bytes: None,
        identity: None,
        time_completed: None,
        stamped_client: None,
        stamped_source: None,
        extra: Headers::new(),
    }
}

/// Product `i` as client `i % 500` on host `i % 50` reports it: relPath of 62 bytes
/// (`20240615/source07/radar/h5/CASBV3/20240615T1200Z_CASBV3_0000123.h5`-like), a
/// sha512 identity (88 base64 characters), its own pubTime.
fn fill(r: &mut Report, n: &Names, rng: &mut SmallRng, i: usize, pub_base: i64) {
    let source = &n.sources[i % SOURCES];
    let radar = (i / SOURCES) % RADARS;
    r.format = if i.is_multiple_of(3) {
        Format::V03
    } else {
        Format::V02
    };
    r.host = Some(n.hosts[i % HOSTS].clone());
    r.user = Some(n.clients[i % CLIENTS].clone());
    r.source = Some(source.clone());
    r.base_url.clear();
    let _ = write!(r.base_url, "sftp://{source}@data.{source}.example");
    r.rel_path.clear();
    let _ = write!(
        r.rel_path,
        "20240615/{source}/radar/h5/CASB{radar}/20240615T1200Z_CASB{radar}_{i:07}.h5"
    );
    r.pub_time = Stamp::from_unix(
        pub_base + (i / 1000) as i64,
        ((i % 1000) * 1_000_000) as i32,
    );
    let mut sum = [0u8; 64];
    rng.fill(&mut sum[..]);
    r.identity = Some(Identity {
        method: "sha512".into(),
        value: STANDARD.encode(sum),
    });
    r.size_bytes = Some(rng.random_range(1_000..50_000_000));
}

fn rss_kb() -> Option<i64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Opens 1 000 000 transfers and prints what they hold. Returns the full watchdog.
fn memory_report(n: &Names) -> Watchdog {
    let mut rng = SmallRng::seed_from_u64(11);
    let mut r = blank();
    let before = alloc::live();
    let rss_before = rss_kb();
    let mut w = Watchdog::new(settings());
    for i in 0..OPEN {
        fill(&mut r, n, &mut rng, i, 1_718_400_000);
        w.record(&r, r.user.as_deref(), t0());
    }
    let live = alloc::live() - before;
    let rss = rss_kb()
        .zip(rss_before)
        .map(|(a, b)| format!("{:.1} MB", (a - b) as f64 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    assert_eq!(w.len(), OPEN);
    println!(
        "memory: {OPEN} open transfers ({HOSTS} hosts, {CLIENTS} clients, relPaths of {} bytes, \
         sha512 identities): {live} bytes live = {:.1} MB, {} bytes per transfer \
         (the core's own estimate {:.1} MB; resident set grew by {rss})",
        r.rel_path.len(),
        live as f64 / 1e6,
        live / OPEN as isize,
        w.gauges().bytes as f64 / 1e6,
    );
    w
}

/// `PRODUCTS` products; in steady state each event pair starts one and ends the one
/// started `LAG` pairs before, so `LAG` stay in flight.
fn batch(n: &Names) -> Vec<Report> {
    let mut rng = SmallRng::seed_from_u64(12);
    (0..PRODUCTS)
        .map(|i| {
            let mut r = blank();
            fill(&mut r, n, &mut rng, i, 1_718_440_000);
            r
        })
        .collect()
}

struct Clock {
    now: Timestamp,
    events: u64,
}

/// One pass over the products: 2 * PRODUCTS events, a tick every 10 000.
fn run(w: &mut Watchdog, b: &mut [Report], clock: &mut Clock) {
    for k in 0..PRODUCTS {
        let end = (k + PRODUCTS - LAG) % PRODUCTS;
        b[k].code = 102;
        black_box(w.record(&b[k], b[k].user.as_deref(), clock.now));
        b[end].code = if end.is_multiple_of(10) { 499 } else { 201 };
        black_box(w.record(&b[end], b[end].user.as_deref(), clock.now));
        clock.events += 2;
        // As if 500 000 events/s arrived.
        clock.now += Duration::from_micros(4);
        if clock.events.is_multiple_of(10_000) {
            black_box(w.tick(clock.now));
        }
    }
}

fn warm(w: &mut Watchdog, b: &mut [Report], clock: &mut Clock) {
    for r in &mut b[PRODUCTS - LAG..] {
        r.code = 102;
        w.record(r, r.user.as_deref(), clock.now);
    }
}

fn bench(c: &mut Criterion) {
    let n = names();
    let mut full = memory_report(&n);
    let mut b = batch(&n);
    let mut g = c.benchmark_group("watchdog");
    g.throughput(Throughput::Elements(2 * PRODUCTS as u64));
    g.sample_size(20);

    let mut w = Watchdog::new(settings());
    let mut clock = Clock {
        now: t0(),
        events: 0,
    };
    warm(&mut w, &mut b, &mut clock);
    g.bench_function("102 + final, 20k in flight, 50 nodes x 500 clients", |bn| {
        bn.iter(|| run(&mut w, &mut b, &mut clock))
    });
    assert_eq!(w.len(), LAG);
    drop(w);

    let mut clock = Clock {
        now: t0(),
        events: 0,
    };
    warm(&mut full, &mut b, &mut clock);
    g.bench_function("102 + final, 1M in flight, 50 nodes x 500 clients", |bn| {
        bn.iter(|| run(&mut full, &mut b, &mut clock))
    });
    assert_eq!(full.len(), OPEN + LAG);
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
