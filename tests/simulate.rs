//! `pumpwatch simulate` against the real broker: bounded by count or duration, `--starts`
//! adds a 102 before each outcome, each client publishes on its own `xs_<client>`, and the
//! summary tells what was sent.

mod common;

use pumpwatch::broker::names;

use common::proc;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[tokio::test]
async fn sends_what_it_says_to_each_clients_exchange() {
    let Some(vh) = common::vhost("sim").await else {
        return;
    };
    let url = vh.amqp_url.as_str();
    // Listen on both clients' exchanges before simulating (simulate declares them too).
    for x in ["xs_cfs", "xs_edu"] {
        vh.mgmt
            .declare_exchange(&vh.name, x, "topic", true)
            .await
            .unwrap();
    }
    let cfs = proc::spawn(&[
        "--broker",
        url,
        "log",
        "--exchange",
        "xs_cfs",
        "--json",
        "--idle",
        "5",
    ]);
    cfs.wait_stderr("listening on", T).await;
    let edu = proc::spawn(&[
        "--broker",
        url,
        "log",
        "--exchange",
        "xs_edu",
        "--json",
        "--idle",
        "5",
    ]);
    edu.wait_stderr("listening on", T).await;
    let (code, out, err) = proc::run(
        &[
            "--broker",
            url,
            "simulate",
            "--sources",
            "2",
            "--clients",
            "2",
            "--count",
            "150",
            "--starts",
            "--error-ratio",
            "0.2",
            "--seed",
            "3",
        ],
        T,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let summary = out.join("\n");
    assert!(
        summary.contains("sent 150 reports (+150 started)"),
        "{summary}"
    );
    assert!(
        summary.contains("unroutable (no queue bound): 0"),
        "{summary}"
    );
    let mut total = 0;
    let mut started = 0;
    for (log, client) in [(cfs, "cfs"), (edu, "edu")] {
        let (code, lines, err) = log.finish(T).await;
        assert_eq!(code, 0, "{err}");
        let by_client = summary.lines().find(|l| l.contains("by client:")).unwrap();
        for line in &lines {
            let j: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(j["exchange"], names::user_exchange(client));
            if j["code"] == 102 {
                started += 1;
            }
        }
        let finals =
            lines.len() as u64 - lines.iter().filter(|l| l.contains("\"code\":102")).count() as u64;
        assert!(
            by_client.contains(&format!("{client} {finals}")),
            "{by_client} vs {finals} for {client}"
        );
        total += lines.len();
    }
    assert_eq!((total, started), (300, 150));
}

#[tokio::test]
async fn duration_bounds_a_paced_run() {
    let Some(vh) = common::vhost("simdur").await else {
        return;
    };
    let start = std::time::Instant::now();
    let (code, out, err) = proc::run(
        &[
            "--broker",
            &vh.amqp_url,
            "simulate",
            "--rate",
            "50",
            "--duration",
            "2",
        ],
        T,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(20), "bounded: {took:?}");
    let sent: u64 = out[0].split_whitespace().nth(2).unwrap().parse().unwrap();
    // 2 s at 50/s: at most about 100 (fewer on a loaded machine), never unbounded.
    assert!((1..=110).contains(&sent), "{}", out[0]);
}

#[tokio::test]
async fn a_stopped_client_reports_nothing_after_its_time() {
    let Some(vh) = common::vhost("simstop").await else {
        return;
    };
    // Stopped from the start: none of the products it would have handled is reported.
    let (code, out, err) = proc::run(
        &[
            "--broker",
            &vh.amqp_url,
            "simulate",
            "--clients",
            "3",
            "--count",
            "200",
            "--stop-client",
            "edu",
            "--stop-after",
            "0",
        ],
        T,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let summary = out.join("\n");
    let by_client = summary.lines().find(|l| l.contains("by client:")).unwrap();
    assert!(
        by_client.contains("cfs ") && by_client.contains("nrcan "),
        "{summary}"
    );
    assert!(!by_client.contains("edu"), "{summary}");
    assert!(
        summary.contains("edu stopped reporting after 0.0 s"),
        "{summary}"
    );
    // Its products were still made: fewer reports than products.
    let sent: u64 = out[0].split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!((1..200).contains(&sent), "{}", out[0]);
    // Only a simulated client can stop.
    let (code, _, err) =
        proc::run(&["simulate", "--stop-client", "nobody", "--count", "1"], T).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("the simulated clients are cfs, edu"), "{err}");
}
