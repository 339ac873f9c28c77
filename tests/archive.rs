//! `pumpwatch archive` and `pumpwatch trace` against the real broker, each test in its own
//! vhost: reports published while the archive is down are all archived exactly once when
//! it comes back; a SIGKILL mid-batch (and the partial line a crash leaves) loses nothing;
//! an unwritable directory stops the acks and says so, then recovers; `trace` finds a
//! product across two pumps' archives and skips malformed and partial lines with a warning.

mod common;

use pumpwatch::broker::amqp::{Client, ConnectOptions};
use pumpwatch::cmd::archive::{self, store};
use pumpwatch::cmd::simulate::{Generator, Plan, Sim};
use pumpwatch::cmd::trace;
use pumpwatch::config::Config;
use pumpwatch::core::Stamp;
use pumpwatch::core::archive::{ArchiveLine, FileMatch, Query};
use pumpwatch::shutdown::Shutdown;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn pump() -> Config {
    Config::parse(
        "cluster = \"ddsr.test\"\n[users.radar]\nrole = \"source\"\n[users.sat]\nrole = \"source\"\n\
         [users.cfs]\nrole = \"subscriber\"\n",
        "test",
    )
    .unwrap()
}

/// `n` simulated reports (every wire format, stamped as route would), one per product.
fn traffic(n: usize, seed: u64) -> Vec<Sim> {
    let mut plan = Plan::new(2, 3, 2);
    plan.seed = seed;
    plan.stamp = true;
    plan.exchange = Some("xreport".into());
    let mut g = Generator::new(plan);
    let now = Stamp(jiff::Timestamp::now());
    (0..n).flat_map(|_| g.next_product(now)).collect()
}

async fn publish(url: &str, sims: &[Sim]) {
    let client = Client::connect(&common::broker(url), ConnectOptions::new("test publisher"))
        .await
        .unwrap();
    let mut pending = Vec::new();
    for s in sims {
        pending.push(client.publish("xreport", &s.out).await.unwrap());
        if pending.len() >= 1000 {
            for p in pending.drain(..) {
                p.wait().await.unwrap();
            }
        }
    }
    for p in pending {
        p.wait().await.unwrap();
    }
    client.close().await;
}

/// Declares xreport and the archive's queue, as `setup` would with an `[archive]` table.
async fn declare(url: &str) {
    let cfg = archive_config(url, Path::new("/nonexistent"));
    let opts = ConnectOptions {
        topology: archive::topology(&cfg),
        ..ConnectOptions::new("test setup")
    };
    Client::connect(&common::broker(url), opts)
        .await
        .unwrap()
        .close()
        .await;
}

fn archive_config(url: &str, dir: &Path) -> archive::Config {
    let args = archive::Args {
        dir: Some(dir.to_owned()),
        batch: Some(100),
        ..Default::default()
    };
    archive::Config::from_args(args, &common::common(pump(), url)).unwrap()
}

/// Every line of every hour under `cluster_dir` (plain and compressed), raw.
fn raw_lines(cluster_dir: &Path) -> Vec<Vec<u8>> {
    common::archived_lines(cluster_dir)
}

fn parsed(cluster_dir: &Path) -> Vec<ArchiveLine> {
    raw_lines(cluster_dir)
        .iter()
        .map(|l| ArchiveLine::parse(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

/// relPath → (code, client, source) of what was sent.
fn sent(sims: &[Sim]) -> BTreeMap<String, (u16, String, String)> {
    sims.iter()
        .map(|s| {
            (
                s.rel_path.clone(),
                (s.code, s.client.clone(), s.source.clone()),
            )
        })
        .collect()
}

fn archived(lines: &[ArchiveLine]) -> BTreeMap<String, (u16, String, String)> {
    lines
        .iter()
        .map(|l| {
            (
                l.rel_path.clone(),
                (l.code, l.client.clone(), l.source.clone()),
            )
        })
        .collect()
}

/// Compares what was sent with what was archived, naming a few differences only.
fn same(
    archived: BTreeMap<String, (u16, String, String)>,
    sent: BTreeMap<String, (u16, String, String)>,
) {
    let missing: Vec<_> = sent
        .iter()
        .filter(|(k, v)| archived.get(*k) != Some(v))
        .take(3)
        .collect();
    let extra: Vec<_> = archived
        .iter()
        .filter(|(k, v)| sent.get(*k) != Some(v))
        .take(3)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "sent but not archived (first 3): {missing:?}; archived but not sent: {extra:?}"
    );
}

async fn wait_lines(dir: &Path, n: usize) {
    let dir = dir.to_owned();
    common::wait_until(&format!("{n} archived lines"), T, || {
        let have = if dir.exists() {
            raw_lines(&dir).len()
        } else {
            0
        };
        async move { have >= n }
    })
    .await;
}

#[tokio::test]
async fn reports_published_while_it_is_down_are_archived_exactly_once() {
    let Some(vh) = common::vhost("archive-down").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    declare(&vh.amqp_url).await;
    // The archive is down: 3 000 reports (and an announcement) wait in its queue.
    let sims = traffic(3000, 7);
    publish(&vh.amqp_url, &sims).await;
    let cfg = archive_config(&vh.amqp_url, tmp.path());
    let dir = cfg.cluster_dir.clone();
    assert_eq!(dir, tmp.path().join("ddsr.test"));
    let stats = cfg.stats.clone();
    let stop = Shutdown::new();
    let task = tokio::spawn(archive::run(cfg, stop.clone()));
    wait_lines(&dir, 3000).await;
    stop.cancel();
    let stopped = std::time::Instant::now();
    task.await.unwrap().unwrap();
    assert!(stopped.elapsed() < Duration::from_secs(5));
    let lines = parsed(&dir);
    assert_eq!(lines.len(), 3000, "exactly once");
    same(archived(&lines), sent(&sims));
    assert_eq!(archive::Stats::get(&stats.lines), 3000);

    // Started again, it finds its hour, appends, and the queue held nothing more.
    let more = traffic(10, 8);
    publish(&vh.amqp_url, &more).await;
    let cfg = archive_config(&vh.amqp_url, tmp.path());
    let stop = Shutdown::new();
    let task = tokio::spawn(archive::run(cfg, stop.clone()));
    wait_lines(&dir, 3010).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(parsed(&dir).len(), 3010);
}

#[tokio::test]
async fn sigkill_mid_batch_loses_nothing_and_trace_collapses_duplicates() {
    let Some(vh) = common::vhost("archive-kill").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    declare(&vh.amqp_url).await;
    let sims = traffic(3000, 11);
    publish(&vh.amqp_url, &sims).await;
    let root = tmp.path().to_str().unwrap().to_owned();
    let dir = tmp.path().join("localhost");
    let args = [
        "--broker",
        &vh.amqp_url,
        "archive",
        "--dir",
        &root,
        "--batch",
        "50",
    ];
    let p = common::proc::spawn(&args);
    wait_lines(&dir, 200).await;
    p.signal("KILL");
    let (code, _, _) = p.finish(T).await;
    assert_ne!(code, 0);
    // What a crash in the middle of a write leaves: half a line.
    let hours = store::list_hours(&dir).unwrap();
    let open = store::with_ext(
        &store::hour_base(&dir, &hours.last().unwrap().hour),
        store::LOG,
    );
    let mut text = std::fs::read(&open).unwrap();
    text.extend_from_slice(b"20240101T000000.000 201 radar cfs@no");
    std::fs::write(&open, &text).unwrap();

    let p = common::proc::spawn(&args);
    let d = dir.clone();
    let want = sent(&sims).len();
    common::wait_until("every report archived", T, || {
        let have = raw_lines(&d)
            .iter()
            .filter_map(|l| ArchiveLine::parse(l).ok())
            .map(|l| l.rel_path)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        async move { have >= want }
    })
    .await;
    p.signal("TERM");
    let (code, _, err) = p.finish(T).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("cut a partial last line"), "{err}");
    // Every line whole; every report there (duplicates allowed), nothing else.
    let lines = parsed(&dir);
    assert!(lines.len() >= 3000);
    same(archived(&lines), sent(&sims));
    // trace shows each product once: duplicates collapse.
    let cfg = trace::Config {
        dirs: vec![tmp.path().to_owned()],
        query: Query::default(),
        follow: Duration::from_secs(3600),
        json: false,
        threads: 2,
        stats: false,
    };
    let found = trace::search(&cfg, &Shutdown::new()).unwrap();
    assert_eq!(found.lives.len(), 3000);
    assert!(found.lives.iter().all(|l| l.events.len() == 1));
    let dups: usize = found.lives.iter().map(|l| l.duplicates).sum();
    assert_eq!(dups, lines.len() - 3000);
    assert_eq!(found.stats.malformed, 0);
}

#[tokio::test]
async fn an_unwritable_directory_stops_the_acks_and_says_so_then_recovers() {
    let Some(vh) = common::vhost("archive-full").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    declare(&vh.amqp_url).await;
    // The cluster's directory cannot be made (a file is in the way): every write fails,
    // as on a full or read-only disk, also for root.
    let blocker = tmp.path().join("ddsr.test");
    std::fs::write(&blocker, b"in the way").unwrap();
    let sims = traffic(200, 21);
    publish(&vh.amqp_url, &sims).await;
    let cfg = archive_config(&vh.amqp_url, tmp.path());
    let stats = cfg.stats.clone();
    let stop = Shutdown::new();
    let task = tokio::spawn(archive::run(cfg, stop.clone()));
    let s = stats.clone();
    common::wait_until("the archive to say it is blocked", T, || {
        let blocked = s.is_blocked();
        async move { blocked }
    })
    .await;
    let why = stats.last_error().unwrap();
    assert!(
        why.contains("cannot write to") && why.contains("ddsr.test"),
        "{why}"
    );
    // Stopped while blocked: nothing was acked, so the broker gives it all back.
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(archive::Stats::get(&stats.lines), 0);

    let cfg = archive_config(&vh.amqp_url, tmp.path());
    let stats = cfg.stats.clone();
    let stop = Shutdown::new();
    let task = tokio::spawn(archive::run(cfg, stop.clone()));
    let s = stats.clone();
    common::wait_until("blocked again", T, || {
        let blocked = s.is_blocked();
        async move { blocked }
    })
    .await;
    // The operator makes room: it recovers by itself and archives everything once.
    std::fs::remove_file(&blocker).unwrap();
    wait_lines(&blocker, 200).await;
    assert!(!stats.is_blocked());
    stop.cancel();
    task.await.unwrap().unwrap();
    let lines = parsed(&blocker);
    assert_eq!(lines.len(), 200);
    same(archived(&lines), sent(&sims));
    // Backoff, not a busy loop: a handful of attempts in all.
    let errors = archive::Stats::get(&stats.write_errors);
    assert!((1..10).contains(&errors), "{errors} write attempts");
}

/// Writes `lines` into `<root>/<cluster>` as hour `hour`, compressed (with its index)
/// when `close`.
fn write_hour(
    root: &Path,
    cluster: &str,
    hour: &str,
    lines: &[ArchiveLine],
    close: bool,
) -> PathBuf {
    let dir = root.join(cluster);
    let mut w = store::Writer::new(&dir);
    w.prepare(store::hour_start(hour).unwrap()).unwrap();
    let mut buf = Vec::new();
    for l in lines {
        l.write(&mut buf);
    }
    w.append(hour, &buf, true).unwrap();
    if close {
        w.close().unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        store::compress_hour(&dir, hour, 3, &stop).unwrap();
    }
    dir
}

fn line(time: &str, code: u16, client: &str, host: &str, rel: &str, i: u64) -> ArchiveLine {
    let t = |s: &str| Stamp::parse(s).unwrap();
    ArchiveLine {
        time: t(time),
        code,
        source: "radar".into(),
        client: client.into(),
        host: host.into(),
        flow: "f1".into(),
        from_cluster: "ddsr.a".into(),
        rel_path: rel.into(),
        base_url: "sftp://x".into(),
        message: "Downloaded".into(),
        topic: "v02.report.x".into(),
        pub_time: Some(t("20240101T100000")),
        identity: Some(pumpwatch::core::Identity {
            method: "md5".into(),
            value: format!("{i:032x}"),
        }),
        duration_s: Some(0.5),
        size: Some(100),
        hops: None,
        to_clusters: vec!["ddsr.b".into()],
        other: vec![],
    }
}

#[tokio::test]
async fn trace_finds_a_product_across_two_pumps() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("pump-a"), tmp.path().join("pump-b"));
    // Pump a: delivered to cfs at 10:00 (a closed, compressed hour) among other products.
    let mut hour_a: Vec<ArchiveLine> = (0..500)
        .map(|i| {
            line(
                "20240101T100001",
                201,
                "cfs",
                "n1",
                &format!("20240101/radar/other_{i}.h5"),
                i,
            )
        })
        .collect();
    hour_a.push(line(
        "20240101T100002",
        201,
        "cfs",
        "n1",
        "20240101/radar/wanted.h5",
        9999,
    ));
    write_hour(&a, "ddsr.a", "2024/01/01/10", &hour_a, true);
    // Pump b: received through the shovel, failed once at 11:00 then delivered (live hour,
    // sr3 rewrote relPath: found through pubTime + file name).
    let hour_b = vec![
        line(
            "20240101T110000",
            499,
            "edu",
            "n7",
            "/local/wanted.h5",
            9999,
        ),
        line(
            "20240101T110005",
            201,
            "edu",
            "n7",
            "/local/wanted.h5",
            9999,
        ),
        line(
            "20240101T110006",
            201,
            "edu",
            "n7",
            "/local/unrelated.h5",
            1,
        ),
    ];
    let b_dir = write_hour(&b, "ddsr.b", "2024/01/01/11", &hour_b, false);

    let cfg = trace::Config {
        dirs: vec![a.clone(), b_dir.clone()],
        query: Query {
            file: Some(FileMatch::Name("wanted.h5".into())),
            code: Some("4xx".parse().unwrap()),
            ..Default::default()
        },
        follow: Duration::from_secs(86400),
        json: false,
        threads: 2,
        stats: false,
    };
    let found = trace::search(&cfg, &Shutdown::new()).unwrap();
    assert_eq!(found.lives.len(), 1, "{:?}", found.stats);
    let life = &found.lives[0];
    assert_eq!(life.pumps, ["ddsr.a", "ddsr.b"]);
    assert_eq!(life.codes, [201, 499]);
    assert_eq!(life.events.len(), 3);
    // The query matched only pump b's hour; the index let pass 1 skip pump a's.
    assert_eq!(found.stats.skipped_by_index, 1);
    assert_eq!(found.stats.read, 1);

    // The command: text to stdout, exit 0.
    let p = common::proc::spawn(&[
        "trace",
        "--dir",
        a.to_str().unwrap(),
        b_dir.to_str().unwrap(),
        "--file",
        "wanted.h5",
    ]);
    let (code, out, err) = p.finish(T).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out[0].starts_with("wanted.h5 source=radar pub=20240101T100000.000"),
        "{out:?}"
    );
    assert!(
        out[1].contains("pumps=ddsr.a,ddsr.b hosts=n1,n7 clients=cfs,edu codes=201,499"),
        "{out:?}"
    );
    assert_eq!(out.len(), 5, "{out:?}");
    // --json: one object per product.
    let p = common::proc::spawn(&[
        "trace",
        "--json",
        "--dir",
        tmp.path().join("pump-a").to_str().unwrap(),
        b_dir.to_str().unwrap(),
        "--file",
        "wanted.h5",
    ]);
    let (code, out, _) = p.finish(T).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out[0]).unwrap();
    assert_eq!(v["events"].as_array().unwrap().len(), 3);
    // Bad arguments: exit 2 with a reason.
    let p = common::proc::spawn(&["trace", "--dir", "/nonexistent/x", "--file", "a"]);
    let (code, _, err) = p.finish(T).await;
    assert_eq!(code, 2);
    assert!(err.contains("not a directory"), "{err}");
}

#[tokio::test]
async fn malformed_and_partial_lines_are_skipped_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let hour = vec![
        line(
            "20240101T100001",
            201,
            "cfs",
            "n1",
            "20240101/radar/a.h5",
            1,
        ),
        line(
            "20240101T100002",
            201,
            "cfs",
            "n1",
            "20240101/radar/b.h5",
            2,
        ),
    ];
    let dir = write_hour(tmp.path(), "ddsr.a", "2024/01/01/10", &hour, false);
    let log = store::with_ext(&store::hour_base(&dir, "2024/01/01/10"), store::LOG);
    let mut text = std::fs::read(&log).unwrap();
    let first = text.iter().position(|&c| c == b'\n').unwrap() + 1;
    text.splice(
        first..first,
        b"garbage \x1b[2J radar line\n".iter().copied(),
    );
    // The live hour: the daemon is half-way through writing a line.
    text.extend_from_slice(b"20240101T100003.000 201 radar cfs@n1 f1 ddsr.a 20240101/radar/c.h5");
    std::fs::write(&log, &text).unwrap();
    let p = common::proc::spawn(&["trace", "--dir", tmp.path().to_str().unwrap()]);
    let (code, out, err) = p.finish(T).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("skipped 2 malformed or partial lines"),
        "{err}"
    );
    let products: Vec<&String> = out
        .iter()
        .filter(|l| !l.starts_with(' ') && !l.is_empty())
        .collect();
    assert_eq!(products.len(), 2, "{out:?}");
    assert!(!out.iter().any(|l| l.contains('\x1b')));
}

#[tokio::test]
async fn a_life_spanning_hours_is_whole_when_both_hours_matched() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pump");
    // Hour 10: wanted.h5 fails; hour 11: it is delivered, and another product fails.
    let h10 = vec![
        line(
            "20240101T105959",
            499,
            "cfs",
            "n1",
            "20240101/radar/wanted.h5",
            1,
        ),
        line(
            "20240101T105959",
            201,
            "cfs",
            "n1",
            "20240101/radar/noise.h5",
            2,
        ),
    ];
    let h11 = vec![
        line(
            "20240101T110001",
            201,
            "cfs",
            "n1",
            "20240101/radar/wanted.h5",
            1,
        ),
        line(
            "20240101T110002",
            404,
            "edu",
            "n2",
            "20240101/radar/other.h5",
            3,
        ),
    ];
    write_hour(&root, "ddsr.a", "2024/01/01/10", &h10, true);
    write_hour(&root, "ddsr.a", "2024/01/01/11", &h11, true);
    let cfg = trace::Config {
        dirs: vec![root],
        query: Query {
            code: Some("4xx".parse().unwrap()),
            ..Default::default()
        },
        follow: Duration::from_secs(86400),
        json: false,
        threads: 2,
        stats: false,
    };
    let found = trace::search(&cfg, &Shutdown::new()).unwrap();
    let lives: Vec<(&str, Vec<u16>)> = found
        .lives
        .iter()
        .map(|l| {
            (
                l.file.as_str(),
                l.events.iter().map(|e| e.line.code).collect(),
            )
        })
        .collect();
    assert_eq!(
        lives,
        [("wanted.h5", vec![499, 201]), ("other.h5", vec![404])],
        "{:?}",
        found.stats
    );
}
