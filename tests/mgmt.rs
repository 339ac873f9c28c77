//! The management API client against the real broker: everything `setup` and the tests
//! rely on, including the shapes RabbitMQ 3.10 answers with.

mod common;

use std::time::Duration;

use pumpwatch::broker::mgmt::{AckMode, MgmtClient, MgmtError, QueueSpec, ShovelSpec};
use serde_json::{Map, json};

use common::{wait_for, wait_until};

const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn users_tags_and_permissions() {
    let Some(vh) = common::vhost("mgmt-users").await else {
        return;
    };
    let password = "p@ss:w/rd #1";
    // add_user is put_user plus registering the name with the guard.
    let name = vh
        .add_user("src", password, &["management", "monitoring"])
        .await
        .name;

    let users = vh.mgmt.list_users().await.unwrap();
    let me = users.iter().find(|u| u.name == name).expect("user listed");
    let mut tags = me.tags.clone();
    tags.sort();
    assert_eq!(tags, ["management", "monitoring"]);
    let guest = users.iter().find(|u| u.name == "guest").unwrap();
    assert!(guest.tags.contains(&"administrator".to_owned()));

    // The password (with characters that need encoding in URLs) works for logging in.
    let as_user = MgmtClient::new(&vh.admin_url, &name, password).unwrap();
    as_user
        .overview()
        .await
        .expect("login with the new password");

    // Anchored Sarracenia-style patterns survive the round trip unchanged.
    let (configure, write, read) = (
        r"^(q_src\..*|xs_src)$",
        r"^(q_src\..*|xs_src)$",
        r"^(q_src\..*|xs_src|xr_src|xpublic)$",
    );
    vh.mgmt
        .put_permissions(&vh.name, &name, configure, write, read)
        .await
        .unwrap();
    let perms = vh.mgmt.list_permissions(&vh.name).await.unwrap();
    let p = perms
        .iter()
        .find(|p| p.user == name)
        .expect("permission listed");
    assert_eq!(
        (p.configure.as_str(), p.write.as_str(), p.read.as_str()),
        (configure, write, read)
    );
    assert_eq!(p.vhost, vh.name);

    // Updating tags replaces them; deleting twice is fine.
    vh.mgmt.put_user(&name, password, &[]).await.unwrap();
    let users = vh.mgmt.list_users().await.unwrap();
    assert!(
        users
            .iter()
            .find(|u| u.name == name)
            .unwrap()
            .tags
            .is_empty()
    );
    vh.mgmt.delete_user(&name).await.unwrap();
    vh.mgmt.delete_user(&name).await.unwrap();
    assert!(
        !vh.mgmt
            .list_users()
            .await
            .unwrap()
            .iter()
            .any(|u| u.name == name)
    );
}

#[tokio::test]
async fn exchanges_queues_bindings_and_messages() {
    let Some(vh) = common::vhost("mgmt-topology").await else {
        return;
    };
    let m = &vh.mgmt;
    m.declare_exchange(&vh.name, "xreport", "topic", true)
        .await
        .unwrap();
    m.declare_exchange(&vh.name, "xreport", "topic", true)
        .await
        .expect("redeclare is a no-op");
    let exchanges = m.list_exchanges(&vh.name).await.unwrap();
    let x = exchanges
        .iter()
        .find(|x| x.name == "xreport")
        .expect("exchange listed");
    assert_eq!((x.kind.as_str(), x.durable), ("topic", true));
    assert!(
        exchanges.iter().any(|x| x.name.is_empty()),
        "default exchange listed as \"\""
    );

    let spec = QueueSpec::durable()
        .arg("x-queue-type", "classic")
        .arg("x-max-length", 1000)
        .arg("x-overflow", "reject-publish");
    m.declare_queue(&vh.name, "q_feeder.route.validate", &spec)
        .await
        .unwrap();
    m.declare_queue(
        &vh.name,
        "q_feeder.quorum",
        &QueueSpec::durable().arg("x-queue-type", "quorum"),
    )
    .await
    .unwrap();
    let queues = m.list_queues(&vh.name).await.unwrap();
    assert_eq!(queues.len(), 2, "{queues:?}");
    let q = m
        .get_queue(&vh.name, "q_feeder.route.validate")
        .await
        .unwrap()
        .expect("queue exists");
    assert!(q.durable);
    assert_eq!(q.arguments.get("x-max-length"), Some(&json!(1000)));
    assert_eq!(
        q.arguments.get("x-overflow"),
        Some(&json!("reject-publish"))
    );
    assert_eq!(m.get_queue(&vh.name, "no-such-queue").await.unwrap(), None);

    // A second declare with other arguments is refused, and says why.
    let err = m
        .declare_queue(
            &vh.name,
            "q_feeder.route.validate",
            &QueueSpec::durable().arg("x-max-length", 5),
        )
        .await
        .unwrap_err();
    assert!(matches!(err.status(), Some(400 | 406)), "{err}");
    assert!(err.to_string().contains("inequivalent"), "{err}");

    m.bind_queue(
        &vh.name,
        "xreport",
        "q_feeder.route.validate",
        "v02.report.#",
    )
    .await
    .unwrap();
    m.bind_queue(
        &vh.name,
        "xreport",
        "q_feeder.route.validate",
        "v02.report.#",
    )
    .await
    .unwrap();
    let bindings = m.list_bindings(&vh.name).await.unwrap();
    let b = bindings
        .iter()
        .find(|b| b.source == "xreport")
        .expect("binding listed");
    assert_eq!(
        (
            b.destination.as_str(),
            b.destination_type.as_str(),
            b.routing_key.as_str()
        ),
        ("q_feeder.route.validate", "queue", "v02.report.#")
    );

    let mut headers = Map::new();
    headers.insert("source".into(), json!("ec_cmc"));
    let routed = m
        .publish(
            &vh.name,
            "xreport",
            "v02.report.a.b",
            "hello report",
            &headers,
        )
        .await
        .unwrap();
    assert!(routed);
    assert!(
        !m.publish(&vh.name, "xreport", "v03.nothing", "x", &Map::new())
            .await
            .unwrap()
    );
    let got = m
        .get_messages(&vh.name, "q_feeder.route.validate", 10)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, "hello report");
    assert_eq!(got[0].routing_key, "v02.report.a.b");
    assert_eq!(got[0].properties["headers"]["source"], "ec_cmc");

    m.delete_binding(&vh.name, b).await.unwrap();
    assert!(
        !m.list_bindings(&vh.name)
            .await
            .unwrap()
            .iter()
            .any(|b| b.source == "xreport")
    );
    m.delete_queue(&vh.name, "q_feeder.route.validate")
        .await
        .unwrap();
    m.delete_queue(&vh.name, "q_feeder.route.validate")
        .await
        .unwrap();
    m.delete_exchange(&vh.name, "xreport").await.unwrap();
    m.delete_exchange(&vh.name, "xreport").await.unwrap();
    assert!(
        !m.list_exchanges(&vh.name)
            .await
            .unwrap()
            .iter()
            .any(|x| x.name == "xreport")
    );
}

/// §4.8: a dynamic shovel from `xforward_<cluster>`'s queue on one pump to the
/// neighbour's `xreport`, here two vhosts of the same broker.
#[tokio::test]
async fn shovel_moves_messages_between_vhosts_and_connections_can_be_closed() {
    let Some(here) = common::vhost("mgmt-shovel-a").await else {
        return;
    };
    let Some(there) = common::vhost("mgmt-shovel-b").await else {
        return;
    };
    let m = &here.mgmt;
    m.declare_exchange(&here.name, "xforward_b", "topic", true)
        .await
        .unwrap();
    m.declare_queue(&here.name, "q_feeder.forward.b", &QueueSpec::durable())
        .await
        .unwrap();
    m.bind_queue(&here.name, "xforward_b", "q_feeder.forward.b", "#")
        .await
        .unwrap();
    m.declare_exchange(&there.name, "xreport", "topic", true)
        .await
        .unwrap();
    m.declare_queue(&there.name, "q_admin.log", &QueueSpec::durable())
        .await
        .unwrap();
    m.bind_queue(&there.name, "xreport", "q_admin.log", "#")
        .await
        .unwrap();

    let spec = ShovelSpec {
        src_uri: here.amqp_url.clone(),
        src_queue: "q_feeder.forward.b".into(),
        dest_uri: there.amqp_url.clone(),
        dest_exchange: "xreport".into(),
        ack_mode: AckMode::OnConfirm,
        reconnect_delay_s: Some(1),
        ..ShovelSpec::default()
    };
    m.put_shovel(&here.name, "forward-b", &spec).await.unwrap();
    m.put_shovel(&here.name, "forward-b", &spec)
        .await
        .expect("re-put is fine");
    assert_eq!(
        m.list_shovel_names(&here.name).await.unwrap(),
        ["forward-b"]
    );
    wait_until("the shovel to run", DEADLINE, || async {
        let status = m.list_shovel_status(Some(&here.name)).await.unwrap();
        status
            .iter()
            .any(|s| s.name == "forward-b" && s.is_running())
    })
    .await;
    let all = m.list_shovel_status(None).await.unwrap();
    let mine = all
        .iter()
        .find(|s| s.vhost == here.name)
        .expect("listed among all shovels");
    assert_eq!(mine.kind, "dynamic");

    assert!(
        m.publish(
            &here.name,
            "xforward_b",
            "v02.report.x",
            "travelling",
            &Map::new()
        )
        .await
        .unwrap()
    );
    let got = wait_for("the report to cross the shovel", DEADLINE, || async {
        let got = m
            .get_messages(&there.name, "q_admin.log", 10)
            .await
            .unwrap();
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(got[0].payload, "travelling");
    assert_eq!(got[0].routing_key, "v02.report.x", "routing key kept");

    // The shovel's AMQP connections are listed with their vhost and user; closing one
    // works and the shovel reconnects by itself.
    let conn = wait_for("the shovel's connection to be listed", DEADLINE, || async {
        let conns = m.list_connections().await.unwrap();
        conns.into_iter().find(|c| c.vhost == here.name)
    })
    .await;
    assert_eq!(conn.user, "guest");
    m.close_connection(&conn.name).await.unwrap();
    wait_until("the closed connection to go away", DEADLINE, || async {
        !m.list_connections()
            .await
            .unwrap()
            .iter()
            .any(|c| c.name == conn.name)
    })
    .await;
    m.close_connection(&conn.name)
        .await
        .expect("closing an absent connection is fine");

    m.delete_shovel(&here.name, "forward-b").await.unwrap();
    m.delete_shovel(&here.name, "forward-b").await.unwrap();
    assert!(m.list_shovel_names(&here.name).await.unwrap().is_empty());
    wait_until("the shovel to stop", DEADLINE, || async {
        m.list_shovel_status(Some(&here.name))
            .await
            .unwrap()
            .is_empty()
    })
    .await;
}

#[tokio::test]
async fn refused_shovel_error_does_not_leak_uri_passwords() {
    let Some(vh) = common::vhost("mgmt-badshovel").await else {
        return;
    };
    let spec = ShovelSpec {
        src_uri: "amqp://feeder:Sup3rSecretPw@127.0.0.1:notaport/x".into(),
        src_queue: "q".into(),
        dest_uri: "amqp://feeder:Sup3rSecretPw@127.0.0.1:5672/x".into(),
        dest_exchange: "xreport".into(),
        ..ShovelSpec::default()
    };
    let err = vh
        .mgmt
        .put_shovel(&vh.name, "bad", &spec)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert_eq!(err.status(), Some(400), "{text}");
    assert!(!text.contains("Sup3rSecretPw"), "{text}");
    assert!(!format!("{err:?}").contains("Sup3rSecretPw"), "{err:?}");
}

#[tokio::test]
async fn errors_are_typed_and_never_show_the_password() {
    let Some(vh) = common::vhost("mgmt-errors").await else {
        return;
    };
    let wrong = MgmtClient::new(&vh.admin_url, "guest", "not-the-password").unwrap();
    let err = wrong.list_vhosts().await.unwrap_err();
    assert!(err.is_unauthorized(), "{err}");
    assert!(!err.to_string().contains("not-the-password"), "{err}");

    // Nothing listens on port 9: a transport error, quickly, with no credentials in it.
    let nowhere = MgmtClient::from_urls(
        "http://127.0.0.1:9",
        &common::broker("amqp://feeder:s3cr3tpw@127.0.0.1/"),
    )
    .unwrap();
    let err = nowhere.overview().await.unwrap_err();
    assert!(matches!(err, MgmtError::Transport { .. }), "{err}");
    assert!(!format!("{err} {err:?}").contains("s3cr3tpw"), "{err}");

    assert!(matches!(
        vh.mgmt.create_vhost("").await.unwrap_err(),
        MgmtError::InvalidName { .. }
    ));
    assert!(vh.mgmt.delete_vhost("pwtest-never-existed").await.is_ok());
    assert!(
        vh.mgmt
            .list_queues("pwtest-never-existed")
            .await
            .unwrap_err()
            .is_not_found()
    );
}

#[tokio::test]
async fn default_vhost_name_is_encoded() {
    let Some(_vh) = common::vhost("mgmt-default").await else {
        return;
    };
    let m = common::admin_client();
    // `/` must travel as %2F; listing it proves the path is right (it always exists).
    m.list_exchanges("/")
        .await
        .expect("exchanges of the default vhost");
    assert!(m.list_vhosts().await.unwrap().contains(&"/".to_owned()));
}
