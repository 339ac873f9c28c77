//! Writes a synthetic archive for `scripts/bench-trace`: `N` reports from `simulate`'s
//! generator (every wire format, each product a 102 then its outcome), parsed and
//! attributed as `archive` does, spread evenly over `DAYS` days, written straight to
//! `DIR/<cluster>/YYYY/MM/DD/HH.log` and each closed hour compressed with its index on a
//! second thread, as the daemon does.
//!
//! `cargo run --release --example gen_archive -- DIR N [DAYS] [ZSTD_LEVEL]`
//!
//! Prints the file name of a product in the middle (`sample <name>`), then sizes.

use pumpwatch::cmd::archive::store::{self, Writer};
use pumpwatch::cmd::simulate::{Generator, Plan};
use pumpwatch::config::Config;
use pumpwatch::core::Stamp;
use pumpwatch::core::archive::line::file_name;
use pumpwatch::core::archive::{TimeSource, write_report};
use pumpwatch::core::report::{Message, parse};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: gen_archive DIR N [DAYS] [ZSTD_LEVEL]");
        std::process::exit(2);
    }
    let root = PathBuf::from(&args[1]);
    let n: u64 = args[2].parse().expect("N");
    let days: f64 = args.get(3).map_or(3.0, |d| d.parse().expect("DAYS"));
    let level: i32 = args.get(4).map_or(6, |l| l.parse().expect("ZSTD_LEVEL"));
    let pump = Config::parse(
        "cluster = \"ddsr.bench\"\n\
         [users.radar]\nrole = \"source\"\n[users.sat]\nrole = \"source\"\n\
         [users.ec_cmc]\nrole = \"source\"\n[users.nws]\nrole = \"source\"\n",
        "bench",
    )
    .expect("config");
    let who = pump.attributor();
    let dir = root.join(&pump.cluster);
    let mut plan = Plan::new(8, 8, 30);
    plan.starts = true;
    plan.exchange = Some("xreport".into());
    plan.stamp = true;
    plan.seed = 2024;
    let mut g = Generator::new(plan);
    let start = Stamp::parse("20240301T000000").expect("start");
    let step_ns = (days * 86_400e9 / n as f64) as i128;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let compress_dir = dir.clone();
    let compressor = std::thread::spawn(move || {
        let stop = AtomicBool::new(false);
        let (mut raw, mut zst, mut idx) = (0u64, 0u64, 0u64);
        for hour in rx {
            let c = store::compress_hour(&compress_dir, &hour, level, &stop).expect("compress");
            raw += c.raw_bytes;
            zst += c.zst_bytes;
            idx += c.idx_bytes;
        }
        (raw, zst, idx)
    });
    let mut w = Writer::new(&dir);
    w.prepare(start).expect("prepare");
    let mut buf = Vec::with_capacity(8 << 20);
    let mut hour = String::new();
    let mut written = 0u64;
    let mut sample = None;
    while written < n {
        let t = Stamp(
            jiff::Timestamp::from_nanosecond(start.0.as_nanosecond() + step_ns * written as i128)
                .expect("time"),
        );
        for s in g.next_product(t) {
            let inc = s.incoming();
            let Ok(Message::Report(r)) = parse(&inc) else {
                panic!("the generator made something that is not a report")
            };
            // Archived a little after it was published.
            let at = Stamp(
                jiff::Timestamp::from_nanosecond(t.0.as_nanosecond() + 250_000_000).expect("time"),
            );
            let h = pumpwatch::core::archive::hour_path(at);
            if h != hour && !buf.is_empty() {
                w.append(&hour, &buf, false).expect("append");
                buf.clear();
            }
            hour = h;
            write_report(&r, &who.who(&r, None), at, TimeSource::Completed, &mut buf);
            written += 1;
            if sample.is_none() && written >= n / 2 {
                sample = Some(file_name(&r.rel_path).to_owned());
            }
            if buf.len() >= 4 << 20 {
                w.append(&hour, &buf, false).expect("append");
                buf.clear();
            }
        }
        for closed in w.take_closed() {
            tx.send(closed).expect("compressor");
        }
    }
    if !buf.is_empty() {
        w.append(&hour, &buf, false).expect("append");
    }
    w.close().expect("close");
    for closed in w.take_closed() {
        tx.send(closed).expect("compressor");
    }
    drop(tx);
    let (raw, zst, idx) = compressor.join().expect("compressor thread");
    println!("sample {}", sample.unwrap_or_default());
    println!("reports {written}");
    println!("raw_bytes {raw}");
    println!("zst_bytes {zst}");
    println!("idx_bytes {idx}");
}
