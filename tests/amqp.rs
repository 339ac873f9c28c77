//! The AMQP adapter against the real broker, each test in its own throw-away vhost:
//! round trip with headers, unroutable and missing-exchange publishes, refused and
//! unreachable brokers (one-line errors, no password), reconnect after the management
//! API kills the connection, and 10 000 publishes with confirms awaited in batches.

mod common;

use pumpwatch::broker::names;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use pumpwatch::broker::amqp::{
    AmqpError, BindingDecl, Client, ConnectOptions, Delivery, ExchangeDecl, MessageProps,
    QueueDecl, Topology,
};
use pumpwatch::core::emit::Outgoing;
use pumpwatch::core::{HeaderValue, Headers};

const WAIT: Duration = Duration::from_secs(30);

// ---- log capture: everything logged while CAPTURE is on, to look for passwords ----

static CAPTURE: AtomicBool = AtomicBool::new(false);
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// Tests that switch capture on, or that measure speed, run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct CaptureWriter;

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_capture() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use tracing_subscriber::prelude::*;
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(|| CaptureWriter)
            .with_filter(tracing_subscriber::filter::filter_fn(|_| {
                CAPTURE.load(Ordering::Relaxed)
            }));
        let _ = tracing_subscriber::registry().with(layer).try_init();
    });
}

fn captured() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

// ---- helpers ----

fn topology(exchange: &str, queue: &str, key: &str) -> Topology {
    Topology {
        exchanges: vec![ExchangeDecl::topic(exchange)],
        queues: vec![QueueDecl::durable(queue)],
        bindings: vec![BindingDecl::new(queue, exchange, key)],
        ..Topology::default()
    }
}

fn opts(name: &str, topology: Topology) -> ConnectOptions {
    ConnectOptions {
        name: name.to_owned(),
        topology,
        reconnect: true,
        min_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(2),
    }
}

fn outgoing(key: &str, body: &str, headers: Headers) -> Outgoing {
    Outgoing {
        routing_key: key.to_owned(),
        body: body.as_bytes().to_vec(),
        content_type: "text/plain",
        headers,
    }
}

async fn next_delivery(consumer: &mut pumpwatch::broker::amqp::Consumer) -> Delivery {
    match tokio::time::timeout(WAIT, consumer.next()).await {
        Ok(Some(Ok(d))) => d,
        Ok(Some(Err(e))) => panic!("consumer error: {e}"),
        Ok(None) => panic!("consumer ended"),
        Err(_) => panic!("no delivery within {WAIT:?}"),
    }
}

/// Publishes and waits for the confirm, publishing again when the connection died
/// under it (what a daemon does with an unconfirmed output).
async fn publish_confirmed(client: &Client, exchange: &str, msg: &Outgoing) {
    let start = Instant::now();
    loop {
        let result = match client.publish(exchange, msg).await {
            Ok(pending) => pending.wait().await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => return,
            Err(AmqpError::Closed(_)) if start.elapsed() < WAIT => continue,
            Err(e) => panic!("publishing {}: {e}", msg.routing_key),
        }
    }
}

/// Keys sorted at every level (AMQP tables are maps: the order is not kept).
fn sorted(mut h: Headers) -> Headers {
    h.0.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, v) in &mut h.0 {
        if let HeaderValue::Table(t) = v {
            *t = sorted(std::mem::take(t));
        }
    }
    h
}

// ---- tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_keeps_body_properties_and_headers() {
    let Some(vh) = common::vhost("amqp-rt").await else {
        return;
    };
    let client = Client::connect(
        &common::broker(&vh.amqp_url),
        opts("pwtest-rt", topology("xs_t", "q_t.rt", "#")),
    )
    .await
    .expect("connect");
    let mut consumer = client.consume("q_t.rt", 10).await.expect("consume");

    let report: Headers = [
        ("code", HeaderValue::Int(201)),
        ("timeCompleted", "20240101T130241.101".into()),
        ("message", "Download successful".into()),
        ("rate", HeaderValue::Float(1234.5)),
    ]
    .into_iter()
    .collect();
    let headers = Headers(vec![
        ("report".into(), HeaderValue::Table(report)),
        ("sum".into(), "d,0f3c".into()),
        ("long".into(), HeaderValue::Str("é".repeat(300))), // 600 bytes: a long string, not cut
        ("raw".into(), HeaderValue::Bytes(vec![0xff, 0xfe, 0])),
        (
            "list".into(),
            HeaderValue::Array(vec![HeaderValue::Int(1), "two".into()]),
        ),
        ("flag".into(), HeaderValue::Bool(true)),
        ("nothing".into(), HeaderValue::Void),
        ("negative".into(), HeaderValue::Int(-42)),
    ]);
    let msg = outgoing(
        "v02.report.a.b",
        "20240101 sftp://h/ a/b 201 host user 0.1",
        headers.clone(),
    );
    client
        .publish("xs_t", &msg)
        .await
        .expect("publish")
        .wait()
        .await
        .expect("confirm");

    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.exchange, "xs_t");
    assert_eq!(d.routing_key, "v02.report.a.b");
    assert_eq!(d.body, msg.body);
    assert!(!d.redelivered);
    assert_eq!(d.props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(d.props.delivery_mode, Some(2));
    assert_eq!(sorted(d.props.headers.clone()), sorted(headers.clone()));
    let inc = d.incoming();
    assert_eq!(inc.routing_key, "v02.report.a.b");
    assert_eq!(inc.content_type, Some("text/plain"));
    assert_eq!(
        inc.headers
            .get("report")
            .and_then(|r| r.as_table())
            .and_then(|t| t.get("code")),
        Some(&HeaderValue::Int(201))
    );
    d.ack().await.expect("ack");
    d.ack().await.expect("a second ack is a harmless no-op");

    // Raw publish: every property survives; another user's user_id is left out (the
    // broker would refuse it), our own is kept.
    let props = MessageProps {
        content_type: Some("application/json".into()),
        content_encoding: Some("utf-8".into()),
        headers: [("source", "ec_cmc")].into_iter().collect(),
        delivery_mode: Some(2),
        priority: Some(3),
        correlation_id: Some("corr".into()),
        reply_to: Some("reply".into()),
        expiration: Some("600000".into()),
        message_id: Some("mid-1".into()),
        timestamp: Some(1_700_000_000),
        message_type: Some("report".into()),
        user_id: Some("someone-else".into()),
        app_id: Some("sr3".into()),
        cluster_id: Some("ddsr.cmc".into()),
    };
    client
        .publish_raw("xs_t", "v03.a", b"{}", &props)
        .await
        .expect("publish_raw")
        .wait()
        .await
        .expect("confirm raw");
    let d = next_delivery(&mut consumer).await;
    assert_eq!(
        d.props,
        MessageProps {
            user_id: None,
            ..props.clone()
        }
    );
    d.ack().await.unwrap();

    let own = MessageProps {
        user_id: Some("guest".into()),
        ..props.clone()
    };
    client
        .publish_raw("xs_t", "v03.b", b"{}", &own)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.props.user_id.as_deref(), Some("guest"));

    // Forward: the original body and properties plus one header.
    let extra: Headers = [(names::H_SOURCE, "ec_cmc")].into_iter().collect();
    client
        .forward("xs_t", "v03.fwd", &d, &extra)
        .await
        .unwrap()
        .await
        .expect("forward confirm");
    d.ack().await.unwrap();
    let f = next_delivery(&mut consumer).await;
    assert_eq!(f.routing_key, "v03.fwd");
    assert_eq!(f.body, b"{}");
    assert_eq!(f.props.message_id.as_deref(), Some("mid-1"));
    assert_eq!(f.props.headers.get_str("source"), Some("ec_cmc"));
    assert_eq!(f.props.headers.get_str(names::H_SOURCE), Some("ec_cmc"));
    f.ack().await.unwrap();

    client.close().await;
    let end = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("consumer ends");
    assert!(end.is_none(), "after close the consumer ends, got {end:?}");
    assert!(matches!(
        client.publish("xs_t", &msg).await,
        Err(AmqpError::Closed(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_and_missing_exchange_are_reported() {
    let Some(vh) = common::vhost("amqp-unroutable").await else {
        return;
    };
    let mut t = topology("xs_u", "q_u.a", "bound.#");
    t.exchanges.push(ExchangeDecl::topic("x_empty"));
    let client = Client::connect(&common::broker(&vh.amqp_url), opts("pwtest-unroutable", t))
        .await
        .unwrap();

    let msg = outgoing("nobody.listens", "x", Headers::new());
    let err = client
        .publish("x_empty", &msg)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap_err();
    assert_eq!(
        err,
        AmqpError::Unroutable {
            exchange: "x_empty".into(),
            routing_key: "nobody.listens".into()
        }
    );
    assert!(!err.to_string().contains('\n'));

    // A key the binding does not match on an exchange that has a queue.
    let err = client
        .publish("xs_u", &msg)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap_err();
    assert!(matches!(err, AmqpError::Unroutable { .. }), "{err}");

    // A missing exchange closes the publish channel: NotFound, then publishing goes on.
    let err = match client.publish("x_missing", &msg).await {
        Ok(pending) => pending.wait().await.unwrap_err(),
        Err(e) => e,
    };
    assert!(matches!(err, AmqpError::NotFound(_)), "{err}");
    assert!(err.to_string().contains("x_missing"), "{err}");
    let ok = outgoing("bound.x", "x", Headers::new());
    client
        .publish("xs_u", &ok)
        .await
        .expect("publish after a channel error")
        .wait()
        .await
        .unwrap();

    // A full queue that rejects publishes: the broker nacks.
    let full = Topology {
        queues: vec![QueueDecl {
            arguments: [
                ("x-max-length", HeaderValue::Int(0)),
                ("x-overflow", "reject-publish".into()),
            ]
            .into_iter()
            .collect(),
            ..QueueDecl::durable("q_u.full")
        }],
        bindings: vec![BindingDecl::new("q_u.full", "xs_u", "full.#")],
        ..Default::default()
    };
    client.declare(&full).await.expect("declare full queue");
    let err = client
        .publish("xs_u", &outgoing("full.1", "x", Headers::new()))
        .await
        .unwrap()
        .wait()
        .await
        .unwrap_err();
    assert_eq!(err, AmqpError::Nacked);

    // A consumer on a missing queue: a NotFound error, not a hang.
    let err = client.consume("q_missing", 1).await.unwrap_err();
    assert!(matches!(err, AmqpError::NotFound(_)), "{err}");

    // Declaring later: remembered, and usable at once.
    client
        .declare(&topology("x_empty", "q_u.late", "nobody.#"))
        .await
        .expect("declare");
    client
        .publish("x_empty", &msg)
        .await
        .unwrap()
        .wait()
        .await
        .expect("now routable");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_password_is_one_line_without_the_password() {
    let Some(vh) = common::vhost("amqp-badpw").await else {
        return;
    };
    let password = "Wr0ng-Passw0rd-7731";
    let url = vh.amqp_url_as("guest", password);
    let err = Client::connect(
        &common::broker(&url),
        opts("pwtest-badpw", Topology::default()),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    println!("bad password: {text}");
    assert!(matches!(err, AmqpError::AccessRefused(_)), "{text}");
    assert!(!text.contains(password), "{text}");
    assert!(!format!("{err:?}").contains(password), "{err:?}");
    assert!(!text.contains('\n'), "{text}");
    assert!(text.contains("guest:****@"), "{text}");

    // A vhost that does not exist is a connect error too, also one line.
    let url = common::amqp_url("guest", "guest", &format!("{}-absent", vh.name));
    let err = Client::connect(
        &common::broker(&url),
        opts("pwtest-novhost", Topology::default()),
    )
    .await
    .unwrap_err();
    println!("missing vhost: {err}");
    assert!(!err.to_string().contains('\n'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_fails_fast_in_one_line() {
    // No broker needed: nothing listens on port 1.
    let password = "S3cret-port-0001";
    let start = Instant::now();
    let err = Client::connect(
        &common::broker(&format!("amqp://bob:{password}@127.0.0.1:1/%2f")),
        opts("pwtest-badport", Topology::default()),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    println!("bad port: {text} (after {:?})", start.elapsed());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(matches!(err, AmqpError::Connect { .. }), "{text}");
    assert!(text.contains("amqp://bob:****@127.0.0.1:1/%2F"), "{text}");
    assert!(!text.contains(password) && !text.contains('\n'), "{text}");

    let err =
        pumpwatch::broker::url::BrokerUrl::parse(&format!("http://bob:{password}@h/")).unwrap_err();
    assert!(!err.to_string().contains(password), "{err}");
}

/// Finds our connection in the management API (it lists new connections after a few
/// seconds) and closes it, as an operator or a broker restart would.
async fn kill_connection(vh: &common::TestVhost, name: &str) {
    let conn = common::wait_for("our connection in the management API", WAIT, || async {
        let conns = vh.mgmt.list_connections().await.ok()?;
        conns
            .into_iter()
            .find(|c| c.client_name.as_deref() == Some(name))
    })
    .await;
    vh.mgmt
        .close_connection(&conn.name)
        .await
        .expect("close connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_connection_is_killed() {
    let _serial = SERIAL.lock().await;
    let Some(vh) = common::vhost("amqp-reconnect").await else {
        return;
    };
    init_capture();
    let password = format!("Pw-{:08x}-secret", rand::random::<u32>());
    let user = vh.add_user("rc", &password, &[]).await;
    vh.mgmt
        .put_permissions(&vh.name, &user.name, ".*", ".*", ".*")
        .await
        .unwrap();
    let name = format!("{}-conn", vh.name);
    CAPTURE.store(true, Ordering::Relaxed);

    let client = Client::connect(
        &common::broker(&user.amqp_url),
        opts(&name, topology("xs_r", "q_r.main", "main.#")),
    )
    .await
    .expect("connect");
    // Declared after connect: an exclusive queue, gone with the connection; it must be
    // redeclared (and bound) on the new one.
    let excl = Topology {
        queues: vec![QueueDecl {
            name: "q_r.excl".into(),
            durable: false,
            exclusive: true,
            auto_delete: true,
            arguments: Headers::new(),
        }],
        bindings: vec![BindingDecl::new("q_r.excl", "xs_r", "excl.#")],
        ..Default::default()
    };
    client.declare(&excl).await.expect("declare exclusive");
    let mut consumer = client.consume("q_r.main", 5).await.expect("consume");

    for i in 0..3 {
        publish_confirmed(
            &client,
            "xs_r",
            &outgoing(&format!("main.before.{i}"), "b", Headers::new()),
        )
        .await;
    }
    for _ in 0..2 {
        next_delivery(&mut consumer).await.ack().await.unwrap();
    }
    let held = next_delivery(&mut consumer).await; // not acked before the outage
    assert_eq!(held.routing_key, "main.before.2");

    kill_connection(&vh, &name).await;

    // Published while down or reconnecting: publish waits for the new connection.
    for i in 0..3 {
        publish_confirmed(
            &client,
            "xs_r",
            &outgoing(&format!("main.after.{i}"), "a", Headers::new()),
        )
        .await;
    }
    // The exclusive queue and its binding are back, or this would be Unroutable.
    publish_confirmed(&client, "xs_r", &outgoing("excl.1", "e", Headers::new())).await;

    // The same consumer handle gets the redelivered unacked message and the new ones.
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let d = next_delivery(&mut consumer).await;
        if d.routing_key == "main.before.2" {
            assert!(
                d.redelivered,
                "the unacked message comes back marked redelivered"
            );
        }
        seen.push(d.routing_key.clone());
        d.ack().await.unwrap();
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "main.after.0",
            "main.after.1",
            "main.after.2",
            "main.before.2"
        ]
    );
    // The delivery of the dead connection: acking it is an Ok no-op.
    held.ack()
        .await
        .expect("ack of an old generation is a no-op");
    held.nack(true)
        .await
        .expect("nack of an old generation is a no-op");
    assert!(client.is_connected());

    client.close().await;
    CAPTURE.store(false, Ordering::Relaxed);
    let logs = captured();
    assert!(!logs.contains(&password), "password in the logs");
    let warnings = logs
        .lines()
        .filter(|l| {
            l.contains("WARN") && l.contains("broker connection lost") && l.contains(&user.name)
        })
        .count();
    assert_eq!(warnings, 1, "one warning per outage; logs:\n{logs}");
    assert!(logs.contains("broker connection restored"), "logs:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_reconnect_the_loss_is_reported_once() {
    let Some(vh) = common::vhost("amqp-noreconnect").await else {
        return;
    };
    let name = format!("{}-conn", vh.name);
    let mut o = opts(&name, topology("xs_n", "q_n.main", "#"));
    o.reconnect = false;
    let client = Client::connect(&common::broker(&vh.amqp_url), o)
        .await
        .unwrap();
    let mut consumer = client.consume("q_n.main", 1).await.unwrap();
    kill_connection(&vh, &name).await;
    match tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("consumer wakes up")
    {
        Some(Err(AmqpError::Closed(reason))) => println!("lost: {reason}"),
        other => panic!("expected one Closed error, got {other:?}"),
    }
    assert!(consumer.next().await.is_none());
    let msg = outgoing("k", "x", Headers::new());
    assert!(matches!(
        client.publish("xs_n", &msg).await,
        Err(AmqpError::Closed(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_publishes_with_batched_confirms() {
    let _serial = SERIAL.lock().await;
    let Some(vh) = common::vhost("amqp-perf").await else {
        return;
    };
    const N: usize = 10_000;
    const BATCH: usize = 1_000;
    let client = Client::connect(
        &common::broker(&vh.amqp_url),
        opts("pwtest-perf", topology("xs_p", "q_p.all", "#")),
    )
    .await
    .unwrap();
    let headers: Headers = [
        ("source", "ec_cmc"),
        ("flow", "exp13"),
        ("message", "Downloaded"),
    ]
    .into_iter()
    .collect();
    let msgs: Vec<Outgoing> = (0..N)
        .map(|i| {
            outgoing(
                &format!("v02.report.NRDPS.GIF.f{i}.gif"),
                "20150601135701.345 sftp://afsiext@cmcdataserver/data/NRPDS/outputs/NRDPS_HiRes_000.gif NRDPS/GIF/ 201 castor anonymous 0.0006767",
                headers.clone(),
            )
        })
        .collect();

    let start = Instant::now();
    for batch in msgs.chunks(BATCH) {
        let mut pending = Vec::with_capacity(BATCH);
        for m in batch {
            pending.push(client.publish("xs_p", m).await.expect("publish"));
        }
        for p in pending {
            p.wait().await.expect("confirm");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "published {N} one after the other, confirms awaited per {BATCH}: {secs:.2} s, {:.0} msg/s",
        N as f64 / secs
    );

    // The same with each batch's publishes driven together: their frames go out in
    // order, without one write waiting for the previous.
    let start = Instant::now();
    for batch in msgs.chunks(BATCH) {
        let sent =
            futures_util::future::join_all(batch.iter().map(|m| client.publish("xs_p", m))).await;
        for p in sent {
            p.expect("publish").wait().await.expect("confirm");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "published {N} driven together per batch of {BATCH}: {secs:.2} s, {:.0} msg/s",
        N as f64 / secs
    );

    let mut consumer = client.consume("q_p.all", 1000).await.unwrap();
    let start = Instant::now();
    for _ in 0..2 * N {
        next_delivery(&mut consumer).await.ack().await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "consumed and acked {} in {secs:.2} s: {:.0} msg/s",
        2 * N,
        (2 * N) as f64 / secs
    );
    // Confirms still pending when the connection goes resolve (Ok or Closed), never hang.
    let mut pending = Vec::new();
    for m in &msgs[..2_000] {
        pending.push(client.publish("xs_p", m).await.expect("publish"));
    }
    client.close().await;
    let (mut ok, mut closed) = (0, 0);
    for p in pending {
        match tokio::time::timeout(WAIT, p.wait())
            .await
            .expect("confirm resolves")
        {
            Ok(()) => ok += 1,
            Err(AmqpError::Closed(_)) => closed += 1,
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    println!("pending at close: {ok} confirmed, {closed} closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_drains_what_was_received_and_keeps_it_ackable() {
    let Some(vh) = common::vhost("amqp-cancel").await else {
        return;
    };
    let client = Client::connect(
        &common::broker(&vh.amqp_url),
        opts("pwtest-cancel", topology("xs_c", "q_c.main", "#")),
    )
    .await
    .unwrap();
    for i in 0..3 {
        publish_confirmed(
            &client,
            "xs_c",
            &outgoing(&format!("k.{i}"), "c", Headers::new()),
        )
        .await;
    }
    let mut consumer = client.consume("q_c.main", 10).await.unwrap();
    let mut held = vec![next_delivery(&mut consumer).await];
    consumer.cancel().await.expect("cancel");
    // Shutdown: stop consuming, take what already arrived, then settle everything.
    while let Some(d) = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("drains")
    {
        held.push(d.expect("delivery"));
    }
    assert_eq!(held.len(), 3, "all three were prefetched before the cancel");
    drop(consumer); // the deliveries keep their channel open
    for d in &held {
        d.ack().await.expect("ack after cancel");
    }
    client.close().await;
    // Had an ack been lost, closing would have requeued the message.
    let left = vh
        .mgmt
        .get_messages(&vh.name, "q_c.main", 10)
        .await
        .unwrap();
    assert!(left.is_empty(), "left in the queue: {left:?}");
}
