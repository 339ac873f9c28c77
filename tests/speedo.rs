//! `pumpwatch speedo` against the real broker, in-process: 300 good and 100 failed reports
//! of client `cfs` on source `radar`'s products (every wire format, stamped by route or
//! not, plus 102s, an announcement and garbage) go straight into `xreport`; the speedos on
//! `xreport` and on `xr_radar` must add up exactly, keep coming as zeros, and a stop must
//! take well under 5 s.

mod common;

use pumpwatch::broker::amqp::{Client, ConnectOptions, QueueDecl};
use pumpwatch::cmd::speedo::{self, Decoded, Subject};
use pumpwatch::config::Config;
use pumpwatch::core::emit::{Outgoing, emit};
use pumpwatch::core::report::{Format, H_CLIENT, H_SOURCE, Identity, Report};
use pumpwatch::core::{Headers, Stamp};
use pumpwatch::shutdown::Shutdown;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn config() -> Config {
    Config::parse(
        "[users.radar]\nrole = \"source\"\n[users.sat]\nrole = \"source\"\n\
         [users.cfs]\nrole = \"subscriber\"\n\
         [speedo]\ninterval = 0.5\nall_interval = 0.5\n",
        "test",
    )
    .unwrap()
}

/// Report `i` of `cfs` on a radar product, in the i-th wire format; every other one is
/// stamped as route would, the rest rely on the fallbacks (user field, declared source).
fn report(i: usize, code: u16, size: u64) -> Outgoing {
    let formats = [
        Format::V01,
        Format::V02,
        Format::V03,
        Format::V02Sr3,
        Format::V03Sr2,
    ];
    let format = formats[i % formats.len()];
    let sr3 = matches!(format, Format::V02Sr3);
    let mut r = Report {
        format,
        topic: String::new(),
        exchange: String::new(),
        pub_time: Stamp::from_unix(1_700_000_000 + i as i64, 0),
        base_url: "sftp://data.example".into(),
        rel_path: format!("20240101/radar/h5/product_{i:06}.h5"),
        code,
        message: Some("Downloaded".into()),
        host: (!sr3).then(|| "node1".into()),
        user: (!sr3).then(|| "cfs".into()),
        duration_s: Some(0.5),
        source: Some(if sr3 { "cfs" } else { "radar" }.into()),
        from_cluster: None,
        to_clusters: vec![],
        flow: None,
        size_bytes: Some(size),
        identity: Some(Identity {
            method: "md5".into(),
            value: format!("{i:032x}"),
        }),
        time_completed: sr3.then(|| Stamp::from_unix(1_700_000_000, 0).unwrap()),
        stamped_client: None,
        stamped_source: None,
        extra: Headers::new(),
    };
    if sr3 || i.is_multiple_of(2) {
        r.extra.set(H_CLIENT, "cfs");
        r.extra.set(H_SOURCE, "radar");
    }
    emit(&r, format)
}

/// 300 good (1000 bytes each), 100 failed (10 bytes), 20 started, an announcement, garbage.
fn traffic() -> Vec<Outgoing> {
    let mut v = Vec::new();
    for i in 0..400 {
        v.push(if i % 4 == 3 {
            report(i, [499, 404, 503, 410][i % 4], 10)
        } else {
            report(i, [201, 304, 205][i % 3], 1000)
        });
    }
    for i in 0..20 {
        v.push(report(1000 + i, 102, 1000));
    }
    let mut garbage = report(2000, 201, 1);
    garbage.body = b"\xff\xfe not a report".to_vec();
    v.push(garbage);
    v.push(Outgoing {
        routing_key: "v02.post.20240101.radar".into(),
        body: b"20240101120000.5 sftp://data.example 20240101/radar/h5/x.h5".to_vec(),
        content_type: "text/plain",
        headers: Headers::new(),
    });
    v
}

async fn publish(url: &str, exchange: &str, msgs: &[Outgoing]) {
    let client = Client::connect(&common::broker(url), ConnectOptions::new("test publisher"))
        .await
        .unwrap();
    let mut pending = Vec::new();
    for m in msgs {
        pending.push(client.publish(exchange, m).await.unwrap());
    }
    for p in pending {
        p.wait().await.unwrap();
    }
    client.close().await;
}

/// Every speedo arriving on an exchange.
struct Seen(common::watch::Seen);

impl Seen {
    /// Each decoded, with its headers (`SHOW_SPEEDOS=1` prints them).
    fn all(&self) -> Vec<(Decoded, Headers)> {
        let show = std::env::var("SHOW_SPEEDOS").is_ok();
        self.0
            .all()
            .iter()
            .map(|g| {
                if show {
                    eprintln!("{} {} {:?}", g.exchange, g.routing_key, g.headers);
                }
                let d = speedo::decode(&g.incoming()).expect("speedo publishes valid speedos");
                (d, g.headers.clone())
            })
            .collect()
    }
    /// The latest reading of `subject`.
    fn last(&self, subject: &Subject) -> Option<(Decoded, Headers)> {
        self.all()
            .into_iter()
            .rev()
            .find(|(d, _)| &d.subject == subject)
    }
}

async fn watch(url: &str, exchange: &str) -> (Client, Seen) {
    let queue = QueueDecl::exclusive(format!("q_guest.test.{exchange}"));
    let (client, seen) = common::watch::watch(url, exchange, "v01.speedo.#", queue).await;
    (client, Seen(seen))
}

fn counts(d: &Decoded) -> (u64, u64, u64, u64) {
    let r = &d.reading;
    (r.good, r.errors, r.good_bytes, r.bad_bytes)
}

const WANT: (u64, u64, u64, u64) = (300, 100, 300_000, 1000);

#[tokio::test]
async fn speedos_on_xreport_and_xr_source_add_up_exactly() {
    let Some(vh) = common::vhost("speedo").await else {
        return;
    };
    let url = vh.amqp_url.clone();
    let cfg =
        speedo::Config::from_args(Default::default(), &common::common(config(), &url)).unwrap();
    // Declare speedo's queue first, so nothing published before it consumes is lost.
    let setup = Client::connect(
        &common::broker(&url),
        ConnectOptions {
            topology: speedo::topology(&cfg),
            ..ConnectOptions::new("test setup")
        },
    )
    .await
    .unwrap();
    let (_w1, on_report) = watch(&url, "xreport").await;
    let (_w2, on_radar) = watch(&url, "xr_radar").await;
    let shutdown = Shutdown::new();
    let run = tokio::spawn(speedo::run_counting(cfg, shutdown.clone()));
    publish(&url, "xreport", &traffic()).await;

    let cfs = Subject::Client("cfs".into());
    let radar = Subject::Source("radar".into());
    for (seen, subject, place) in [
        (&on_report, &cfs, "xreport client.cfs"),
        (&on_report, &radar, "xreport source.radar"),
        (&on_report, &Subject::AllClients, "xreport client.all"),
        (&on_report, &Subject::AllSources, "xreport source.all"),
        (&on_radar, &cfs, "xr_radar client.cfs"),
        (&on_radar, &radar, "xr_radar source.radar"),
        (&on_radar, &Subject::AllClients, "xr_radar client.all"),
    ] {
        common::wait_until(&format!("{place} reaches 300/100"), T, || {
            let got = seen.last(subject).map(|(d, _)| counts(&d));
            async move { got == Some(WANT) }
        })
        .await;
    }
    // The per-interval counts add up to the cumulative ones, interval by interval.
    for (seen, subject) in [
        (&on_report, &cfs),
        (&on_radar, &cfs),
        (&on_report, &Subject::AllClients),
    ] {
        let mut files = 0;
        let mut bytes = 0;
        for (d, _) in seen.all().iter().filter(|(d, _)| &d.subject == subject) {
            files += d.reading.interval_files;
            bytes += d.reading.interval_bytes;
            assert_eq!(d.reading.good, files, "{subject:?}: {:?}", d.reading);
            assert_eq!(d.reading.good_bytes, bytes);
            assert!(
                d.reading.interval_s > 0.0 && d.reading.interval_s < 10.0,
                "{:?}",
                d.reading
            );
        }
        assert_eq!(files, 300);
    }
    // Headers: what each speedo is about.
    let (_, h) = on_report.last(&cfs).unwrap();
    assert_eq!(h.get_str("client"), Some("cfs"));
    assert_eq!(h.get_str("source"), None);
    let (d, h) = on_radar.last(&cfs).unwrap();
    assert_eq!(
        (h.get_str("client"), h.get_str("source")),
        (Some("cfs"), Some("radar"))
    );
    assert_eq!(d.scope.as_deref(), Some("radar"));
    assert_eq!(
        on_report.last(&radar).unwrap().1.get_str("source"),
        Some("radar")
    );
    // Nothing else: no other client or source was invented (sat never reported).
    for (d, _) in on_report.all().iter().chain(on_radar.all().iter()) {
        match &d.subject {
            Subject::Client(c) => assert_eq!(c, "cfs"),
            Subject::Source(s) => assert_eq!(s, "radar"),
            _ => {}
        }
    }
    // Silence: zeros keep coming (the client has not expired).
    let n = on_report.all().len();
    common::wait_until("a zero speedo for cfs", T, || {
        let got =
            on_report.all().into_iter().skip(n).any(|(d, _)| {
                d.subject == cfs && d.reading.interval_files == 0 && counts(&d) == WANT
            });
        async move { got }
    })
    .await;
    // Stop: well under 5 s, with a last speedo.
    let before = on_report.all().len();
    let t0 = Instant::now();
    shutdown.cancel();
    let summary = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("speedo stops within 5 s")
        .unwrap()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(summary.recorded, 400, "{summary}");
    assert_eq!(summary.not_counted, 20, "{summary}");
    assert_eq!(summary.announcements, 1, "{summary}");
    assert_eq!(summary.malformed, 1, "{summary}");
    assert_eq!(summary.failed, 0, "{summary}");
    common::wait_until("the last speedo after the stop", T, || {
        let got = on_report
            .all()
            .into_iter()
            .skip(before)
            .any(|(d, _)| d.subject == cfs);
        async move { got }
    })
    .await;
    setup.close().await;
}

#[tokio::test]
async fn a_source_interval_override_applies_to_its_own_speedos_only() {
    let Some(vh) = common::vhost("speedo-iv").await else {
        return;
    };
    let url = vh.amqp_url.clone();
    let pump = Config::parse(
        "[users.radar]\nrole = \"source\"\ninterval = 0.2\n[users.cfs]\nrole = \"subscriber\"\n\
         [speedo]\ninterval = 3600\nall_interval = 3600\n",
        "test",
    )
    .unwrap();
    let cfg = speedo::Config::from_args(Default::default(), &common::common(pump, &url)).unwrap();
    let setup = Client::connect(
        &common::broker(&url),
        ConnectOptions {
            topology: speedo::topology(&cfg),
            ..ConnectOptions::new("test setup")
        },
    )
    .await
    .unwrap();
    let (_w1, on_report) = watch(&url, "xreport").await;
    let (_w2, on_radar) = watch(&url, "xr_radar").await;
    let shutdown = Shutdown::new();
    let run = tokio::spawn(speedo::run_counting(cfg, shutdown.clone()));
    publish(&url, "xreport", &[report(0, 201, 5), report(1, 201, 5)]).await;
    let radar = Subject::Source("radar".into());
    common::wait_until("three radar speedos on xr_radar", T, || {
        let n = on_radar
            .all()
            .iter()
            .filter(|(d, _)| d.subject == radar)
            .count();
        async move { n >= 3 }
    })
    .await;
    let on_xreport = on_report.all();
    assert!(on_xreport.iter().any(|(d, _)| d.subject == radar));
    assert!(
        on_xreport.iter().all(|(d, _)| d.subject == radar),
        "only radar's speedos are due every 0.2 s: {:?}",
        on_xreport
            .iter()
            .map(|(d, _)| &d.subject)
            .collect::<Vec<_>>()
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("stops within 5 s")
        .unwrap()
        .unwrap();
    setup.close().await;
}
