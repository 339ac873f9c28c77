//! Shared integration-test harness: a throw-away vhost per test on the real broker, and
//! waiting on conditions with a deadline.
//!
//! Why: §8 wants every component tested against a real RabbitMQ, each test in its own
//! vhost that is removed afterwards, and no sleeps used as synchronisation. A test does
//!
//! ```ignore
//! mod common;
//! let Some(vh) = common::vhost("log").await else { return };
//! ```
//!
//! and gets `None` (after printing `SKIP: ...`) when no broker is running, unless
//! `PUMPWATCH_REQUIRE_BROKER=1` (set by `.ci/run`), which turns that into a failure.
//!
//! Names: vhosts are `pwtest-<unix secs>-<hex>-<prefix>` and users made with
//! [`TestVhost::add_user`] are `pwtest-<unix secs>-<hex>-<name>`, so parallel tests never
//! collide and `scripts/broker-up --clean` can tell a leftover (old) from one in use.
#![allow(dead_code)] // each test binary uses a different part of this file

pub mod proc;
pub mod watch;

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use pumpwatch::broker::mgmt::MgmtClient;

/// Where the tests expect the broker (`.ci/run` starts it there).
pub const AMQP_ADDR: &str = "127.0.0.1:5672";
pub const ADMIN_URL: &str = "http://127.0.0.1:15672";

/// The broker this harness uses: [`AMQP_ADDR`], or `PWTEST_AMQP_ADDR` (with
/// `PWTEST_ADMIN_URL`) to point the vhost-based tests at a scratch node, e.g. to run
/// `tests/reliability.rs`, which restarts its broker, without disturbing other work.
pub fn amqp_addr() -> String {
    std::env::var("PWTEST_AMQP_ADDR").unwrap_or_else(|_| AMQP_ADDR.to_owned())
}

/// The management API of [`amqp_addr`]'s broker: [`ADMIN_URL`] or `PWTEST_ADMIN_URL`.
pub fn admin_url() -> String {
    std::env::var("PWTEST_ADMIN_URL").unwrap_or_else(|_| ADMIN_URL.to_owned())
}
pub const ADMIN_USER: &str = "guest";
pub const ADMIN_PASSWORD: &str = "guest";

/// How often [`wait_until`] re-checks its condition.
const POLL: Duration = Duration::from_millis(25);
/// How long the reachability probe may take before the broker counts as absent.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A vhost that exists for the life of this value, with `guest` allowed everything in
/// it. Dropping it deletes the vhost (its queues, exchanges, shovels, connections) and
/// every user made with [`add_user`](Self::add_user), also when the test panicked.
pub struct TestVhost {
    pub name: String,
    /// `amqp://guest:guest@127.0.0.1:5672/<encoded vhost>`
    pub amqp_url: String,
    /// `http://127.0.0.1:15672`
    pub admin_url: String,
    /// A management client logged in as `guest`.
    pub mgmt: MgmtClient,
    /// `pwtest-<secs>-<hex>-`: what `add_user` puts before a user name.
    pub user_prefix: String,
    users: Mutex<Vec<String>>,
}

/// A real broker account made by [`TestVhost::add_user`].
#[derive(Debug, Clone)]
pub struct TestUser {
    /// The full (prefixed) user name, as the broker knows it.
    pub name: String,
    pub password: String,
    /// `amqp://<user>:<password>@127.0.0.1:5672/<vhost>`, percent-encoded.
    pub amqp_url: String,
}

/// Deletes the listed broker users when dropped (also when the test panicked).
pub struct DropUsers(pub Vec<String>);

impl Drop for DropUsers {
    fn drop(&mut self) {
        let users = std::mem::take(&mut self.0);
        // As in the vhost guard: no awaiting in drop, so a thread with its
        // own runtime and client.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mgmt = admin_client();
                for u in users {
                    if let Err(e) = mgmt.delete_user(&u).await {
                        eprintln!("WARNING: deleting test user {u}: {e}");
                    }
                }
            });
        })
        .join();
    }
}

/// The usual entry point: `let Some(vh) = common::vhost("route").await else { return };`
pub async fn vhost(prefix: &str) -> Option<TestVhost> {
    TestVhost::new(prefix).await
}

impl TestVhost {
    /// Creates `pwtest-<secs>-<hex>-<prefix>` and gives `guest` full permissions on it.
    /// `None` when no broker is reachable (see the module doc); panics when the broker
    /// is there but refuses.
    pub async fn new(prefix: &str) -> Option<TestVhost> {
        if let Err(reason) = broker_reachable().await {
            if std::env::var("PUMPWATCH_REQUIRE_BROKER").as_deref() == Ok("1") {
                panic!(
                    "no broker at {} ({reason}) and PUMPWATCH_REQUIRE_BROKER=1; \
                     start it with scripts/broker-up",
                    amqp_addr()
                );
            }
            eprintln!("SKIP: no broker at {} ({reason})", amqp_addr());
            return None;
        }
        let stem = format!("pwtest-{}-{:08x}", unix_secs(), rand::random::<u32>());
        let name = format!("{stem}-{prefix}");
        let mgmt = admin_client();
        mgmt.create_vhost(&name)
            .await
            .unwrap_or_else(|e| panic!("creating test vhost {name}: {e}"));
        // From here on the guard exists, so a failure below still removes the vhost.
        let vhost = TestVhost {
            amqp_url: amqp_url(ADMIN_USER, ADMIN_PASSWORD, &name),
            admin_url: admin_url(),
            user_prefix: format!("{stem}-"),
            users: Mutex::new(Vec::new()),
            name,
            mgmt,
        };
        vhost
            .mgmt
            .put_permissions(&vhost.name, ADMIN_USER, ".*", ".*", ".*")
            .await
            .unwrap_or_else(|e| panic!("granting guest access to {}: {e}", vhost.name));
        Some(vhost)
    }

    /// Creates the broker user `<user_prefix><name>` with `password` and `tags`. It gets
    /// no permissions: set them (or let the code under test set them). Deleted on drop.
    pub async fn add_user(&self, name: &str, password: &str, tags: &[&str]) -> TestUser {
        let full = format!("{}{name}", self.user_prefix);
        // Registered before creating it, so a half-made user is still cleaned up.
        self.users.lock().unwrap().push(full.clone());
        self.mgmt
            .put_user(&full, password, tags)
            .await
            .unwrap_or_else(|e| panic!("creating test user {full}: {e}"));
        TestUser {
            amqp_url: amqp_url(&full, password, &self.name),
            name: full,
            password: password.to_owned(),
        }
    }

    /// `<user_prefix><name>`, deleted on drop like the users of
    /// [`add_user`](Self::add_user), but not created here: for users the code under test
    /// makes (`setup`).
    pub fn adopt_user(&self, name: &str) -> String {
        let full = format!("{}{name}", self.user_prefix);
        self.users.lock().unwrap().push(full.clone());
        full
    }

    /// An AMQP URL for this vhost with other credentials.
    pub fn amqp_url_as(&self, user: &str, password: &str) -> String {
        amqp_url(user, password, &self.name)
    }

    /// Names of the users made with [`add_user`](Self::add_user) so far.
    pub fn users(&self) -> Vec<String> {
        self.users.lock().unwrap().clone()
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let vhost = self.name.clone();
        let users = std::mem::take(&mut *self.users.lock().unwrap_or_else(|e| e.into_inner()));
        // Drop cannot await, and blocking on the test's own runtime would deadlock a
        // current-thread runtime. So: a plain thread with its own small runtime and its own
        // HTTP client (pooled connections of the test's client belong to the test runtime).
        let outcome = std::thread::spawn(move || cleanup(&vhost, &users)).join();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("WARNING: cleaning up test vhost {}: {e}", self.name),
            Err(_) => eprintln!(
                "WARNING: cleaning up test vhost {}: cleanup panicked",
                self.name
            ),
        }
    }
}

fn cleanup(vhost: &str, users: &[String]) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    runtime.block_on(async {
        let mgmt = admin_client();
        let mut errors = Vec::new();
        if let Err(e) = mgmt.delete_vhost(vhost).await {
            errors.push(e.to_string());
        }
        for user in users {
            if let Err(e) = mgmt.delete_user(user).await {
                errors.push(e.to_string());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    })
}

/// A management client as `guest` on [`admin_url`].
pub fn admin_client() -> MgmtClient {
    MgmtClient::new(&admin_url(), ADMIN_USER, ADMIN_PASSWORD).expect("the admin URL is valid")
}

/// `Ok` when AMQP accepts TCP connections and the management API answers as guest.
pub async fn broker_reachable() -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(amqp_addr())).await {
        Err(_) => return Err("TCP connect timed out".to_owned()),
        Ok(Err(e)) => return Err(format!("TCP connect: {e}")),
        Ok(Ok(_)) => {}
    }
    match tokio::time::timeout(PROBE_TIMEOUT, admin_client().overview()).await {
        Err(_) => Err(format!("management API at {} timed out", admin_url())),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(_)) => Ok(()),
    }
}

/// `amqp://user:password@127.0.0.1:5672/vhost`, each part percent-encoded.
pub fn amqp_url(user: &str, password: &str, vhost: &str) -> String {
    format!(
        "amqp://{}:{}@{}/{}",
        utf8_percent_encode(user, SEGMENT),
        utf8_percent_encode(password, SEGMENT),
        amqp_addr(),
        utf8_percent_encode(vhost, SEGMENT)
    )
}

/// Polls `condition` every ~25 ms until it is true; panics naming `what` once `deadline`
/// has passed (also when one check itself hangs past it).
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, deadline, || {
        let check = condition();
        async move { check.await.then_some(()) }
    })
    .await
}

/// Like [`wait_until`], for a check that produces a value once ready (`Some`).
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    // Wall-clock deadline (std, not tokio, time): stays right under a paused tokio clock.
    let start = Instant::now();
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, check()).await {
            Ok(Some(value)) => return value,
            Ok(None) => {}
            Err(_) => break,
        }
        if start.elapsed() >= deadline {
            break;
        }
        tokio::time::sleep(POLL.min(deadline.saturating_sub(start.elapsed()))).await;
    }
    panic!("timed out after {deadline:?} waiting for {what}");
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Every line of every hour an archive wrote under `cluster_dir` (`<dir>/<cluster>`),
/// plain and compressed, raw; none when nothing was written yet.
pub fn archived_lines(cluster_dir: &std::path::Path) -> Vec<Vec<u8>> {
    use pumpwatch::cmd::archive::store;
    let mut out = Vec::new();
    if !cluster_dir.exists() {
        return out;
    }
    for h in store::list_hours(cluster_dir).unwrap() {
        let base = store::hour_base(cluster_dir, &h.hour);
        let ext = if h.zst { store::ZST } else { store::LOG };
        let mut buf = Vec::new();
        store::for_each_chunk(&store::with_ext(&base, ext), h.zst, &mut |c| {
            buf.extend_from_slice(c);
            true
        })
        .unwrap();
        out.extend(pumpwatch::core::archive::split_lines(&buf).map(<[u8]>::to_vec));
    }
    out
}

/// A broker URL the adapter takes; panics on a malformed one (a test bug).
pub fn broker(url: &str) -> pumpwatch::broker::url::BrokerUrl {
    pumpwatch::broker::url::BrokerUrl::parse(url).unwrap_or_else(|e| panic!("{e}"))
}

/// What every command gets besides its flags: `file` with the broker at `url`.
pub fn common(file: pumpwatch::config::Config, url: &str) -> pumpwatch::cmd::Common {
    pumpwatch::cmd::Common::with_broker(file, &broker(url))
}
