//! Proves the test harness itself: the vhost guard creates and removes what it says, on
//! either tokio runtime flavour and when a test panics; `wait_until` gives up on time.

mod common;

use std::time::Duration;

use common::{TestVhost, admin_client, wait_for, wait_until};

async fn vhost_exists(name: &str) -> bool {
    let vhosts = admin_client().list_vhosts().await.expect("list_vhosts");
    vhosts.iter().any(|v| v == name)
}

async fn user_exists(name: &str) -> bool {
    let users = admin_client().list_users().await.expect("list_users");
    users.iter().any(|u| u.name == name)
}

async fn check_vhost_lifecycle(prefix: &str) {
    let Some(vh) = common::vhost(prefix).await else {
        return;
    };
    let name = vh.name.clone();
    assert!(
        name.starts_with("pwtest-") && name.ends_with(prefix),
        "{name}"
    );
    assert!(
        vhost_exists(&name).await,
        "{name} should exist during the test"
    );
    let perms = vh.mgmt.list_permissions(&name).await.unwrap();
    assert!(
        perms
            .iter()
            .any(|p| p.user == "guest" && p.configure == ".*" && p.write == ".*" && p.read == ".*"),
        "guest should have full permissions: {perms:?}"
    );
    assert!(
        vh.amqp_url
            .starts_with("amqp://guest:guest@127.0.0.1:5672/pwtest-")
    );
    drop(vh);
    // The guard deletes synchronously: no waiting needed.
    assert!(
        !vhost_exists(&name).await,
        "{name} should be gone after drop"
    );
}

#[tokio::test]
async fn guard_removes_vhost_on_current_thread_runtime() {
    check_vhost_lifecycle("harness-ct").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_removes_vhost_on_multi_thread_runtime() {
    check_vhost_lifecycle("harness-mt").await;
}

#[tokio::test]
async fn guard_removes_users_on_drop() {
    let Some(vh) = common::vhost("harness-users").await else {
        return;
    };
    let sat = vh.add_user("sat", "sat-pw-1", &["management"]).await;
    let satx = vh.add_user("satx", "", &[]).await;
    assert_eq!(sat.name, format!("{}sat", vh.user_prefix));
    assert_eq!(vh.users(), [sat.name.clone(), satx.name.clone()]);
    assert!(user_exists(&sat.name).await && user_exists(&satx.name).await);
    assert!(
        sat.amqp_url
            .contains(&format!(":sat-pw-1@127.0.0.1:5672/{}", vh.name))
    );
    // The password is real: the user can log into the management API with it.
    let as_sat =
        pumpwatch::broker::mgmt::MgmtClient::new(&vh.admin_url, &sat.name, &sat.password).unwrap();
    as_sat
        .overview()
        .await
        .expect("sat logs in with its password");
    drop(vh);
    assert!(!user_exists(&sat.name).await, "{} should be gone", sat.name);
    assert!(
        !user_exists(&satx.name).await,
        "{} should be gone",
        satx.name
    );
}

#[tokio::test]
async fn guard_cleans_up_when_the_test_panics() {
    if common::broker_reachable().await.is_err() {
        // Nothing to prove without a broker (common::vhost reports the skip or failure).
        let _ = common::vhost("harness-panic").await;
        return;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let vh = common::vhost("harness-panic").await.unwrap();
        let user = vh.add_user("doomed", "pw-doomed", &[]).await;
        tx.send((vh.name.clone(), user.name)).unwrap();
        panic!("deliberate test panic");
    });
    let (vhost, user) = rx.await.expect("task reported its vhost");
    assert!(task.await.unwrap_err().is_panic());
    assert!(
        !vhost_exists(&vhost).await,
        "{vhost} should be gone after the panic"
    );
    assert!(
        !user_exists(&user).await,
        "{user} should be gone after the panic"
    );
}

#[tokio::test]
async fn new_vhosts_have_distinct_names() {
    let Some(a) = TestVhost::new("harness-a").await else {
        return;
    };
    let Some(b) = TestVhost::new("harness-a").await else {
        return;
    };
    assert_ne!(a.name, b.name);
    assert_ne!(a.user_prefix, b.user_prefix);
}

#[tokio::test]
#[should_panic(expected = "waiting for the impossible")]
async fn wait_until_panics_with_its_description() {
    wait_until("the impossible", Duration::from_millis(100), || async {
        false
    })
    .await;
}

#[tokio::test]
#[should_panic(expected = "waiting for a hanging check")]
async fn wait_until_gives_up_on_a_check_that_hangs() {
    wait_until("a hanging check", Duration::from_millis(100), || {
        std::future::pending::<bool>()
    })
    .await;
}

#[tokio::test]
async fn wait_for_returns_the_value_once_ready() {
    let mut calls = 0;
    let got = wait_for("the third call", Duration::from_secs(5), || {
        calls += 1;
        let ready = calls >= 3;
        async move { ready.then_some(calls) }
    })
    .await;
    assert_eq!(got, 3);
}
