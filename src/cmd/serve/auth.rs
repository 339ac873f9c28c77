//! Who is looking at `serve` (SPEC §4.6): people log in with their own pump account over
//! HTTP Basic, checked against the broker, and see what their role lets them see
//! ([`Access`]): a source its own view, a subscriber its own client row, an admin
//! everything. `/metrics` and `/api/check` also take the bearer token of
//! `serve.metrics_token_env`; `/healthz` and the page's static assets are open.
//!
//! **How a password is checked.** One `GET /api/whoami` of the management API with the
//! person's credentials. RabbitMQ answers 200 with the user's tags to a user with a
//! management tag (so the `administrator` tag is read in the same request), and 401
//! `Not management user` to any other user *after* its password was accepted (sources and
//! subscribers have no tag); a wrong password or an unknown user is 401 `Login failed`.
//! Why not an AMQP login: it opens and closes a connection (plus a channel) on the broker
//! for every check, a few round trips more, and still does not tell the tags. The cost
//! is relying on RabbitMQ's 401 text, which `setup` relies on as well and
//! `tests/auth.rs` checks against the real broker. On a refusal, serve's own account asks
//! whether the user exists, so the log tells a wrong password from an unknown user; the
//! response never does.
//!
//! **Remembered** for `serve.login_cache` (60 s): a salted SHA-256 of the accepted
//! password per user, never the password ([`LoginCache`]); a changed password or role
//! takes effect within that time (SIGHUP forgets them all). An open event stream ends
//! after [`STREAM_RELOGIN`] and the page's reconnect logs in again, so a removed account
//! loses the page too.
//!
//! **Failed logins** (wrong password, unknown user, a bad header or token) are counted per
//! client address ([`FailureLimiter`]: 10 at once, one more every 6 s); an address with
//! none left is answered 429 with `Retry-After` before anything is checked. The address
//! is the TCP peer, or the client a trusted reverse proxy names (`serve.trusted_proxies`).
//! A broker that cannot be asked counts against no one and is logged as such.

use super::board::Access;
use crate::broker::mgmt::{MgmtClient, Whoami};
use crate::config::{AuthMode, Config as PumpConfig, Role};
use crate::core::login::{
    FailureLimiter, LoginCache, Presented, client_address, parse_authorization, salted, same_digest,
};
use crate::core::text;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

/// Failed logins an address may make at once ...
pub const FAILURE_BURST: u32 = 10;
/// ... and how often it earns one back.
pub const FAILURE_REFILL: Duration = Duration::from_secs(6);
/// Addresses tracked at most.
const MAX_ADDRESSES: usize = 100_000;
/// Logins remembered at most.
const MAX_LOGINS: usize = 10_000;
/// Checks with the broker in flight at most (a flood must not swamp the management API).
const MAX_CHECKS: usize = 8;
/// How long an event stream opened with a login lasts before the page logs in again.
pub const STREAM_RELOGIN: Duration = Duration::from_secs(600);

/// What a route needs of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The page and the API: a login.
    Login,
    /// `/api/check`: a login, or the metrics token (seen as an admin).
    LoginOrToken,
    /// `/metrics`: an admin login, or the metrics token.
    Metrics,
}

/// Why a request is not let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 401: no login, or one that did not work (the reason is in the log only).
    Login { bearer: bool },
    /// 403: logged in, but the account has nothing to see here.
    Forbidden(&'static str),
    /// 429: too many failed logins from this address.
    Limited(Duration),
}

impl Refusal {
    pub fn response(&self, realm: &str) -> Response {
        match self {
            Refusal::Login { bearer } => {
                let mut r =
                    (StatusCode::UNAUTHORIZED, "log in with your pump account\n").into_response();
                let basic = format!("Basic realm=\"{realm}\", charset=\"UTF-8\"");
                if let Ok(v) = HeaderValue::from_str(&basic) {
                    r.headers_mut().append(header::WWW_AUTHENTICATE, v);
                }
                if *bearer
                    && let Ok(v) = HeaderValue::from_str(&format!("Bearer realm=\"{realm}\""))
                {
                    r.headers_mut().append(header::WWW_AUTHENTICATE, v);
                }
                r
            }
            Refusal::Forbidden(why) => (StatusCode::FORBIDDEN, format!("{why}\n")).into_response(),
            Refusal::Limited(wait) => {
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                let mut r = (
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("too many failed logins from your address; try again in {secs} s\n"),
                )
                    .into_response();
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                r
            }
        }
    }
}

/// How logins ended, for `/metrics` (`pumpwatch_serve_logins_total{outcome}`).
#[derive(Debug, Default)]
pub struct LoginCounts {
    pub accepted: AtomicU64,
    pub remembered: AtomicU64,
    pub token: AtomicU64,
    pub wrong_password: AtomicU64,
    pub unknown_user: AtomicU64,
    pub refused: AtomicU64,
    pub bad_header: AtomicU64,
    pub bad_token: AtomicU64,
    pub broker_unreachable: AtomicU64,
    pub forbidden: AtomicU64,
    pub rate_limited: AtomicU64,
}

impl LoginCounts {
    pub fn snapshot(&self) -> [(&'static str, u64); 11] {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("accepted", g(&self.accepted)),
            ("remembered", g(&self.remembered)),
            ("token", g(&self.token)),
            ("wrong_password", g(&self.wrong_password)),
            ("unknown_user", g(&self.unknown_user)),
            ("refused", g(&self.refused)),
            ("bad_header", g(&self.bad_header)),
            ("bad_token", g(&self.bad_token)),
            ("broker_unreachable", g(&self.broker_unreachable)),
            ("forbidden", g(&self.forbidden)),
            ("rate_limited", g(&self.rate_limited)),
        ]
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// Who may see what: the roles the configuration declares, mapped to an [`Access`].
/// The broker's `administrator` tag makes an admin whatever the file says; role admin
/// and feeder (the pump's own accounts) are admins; a source sees its view; a
/// subscriber, or an account the file does not declare, its own client row (all it can
/// be is a client); a neighbour pump's account (`cluster`) sees nothing.
pub fn access_for(user: &str, administrator: bool, role: Option<Role>) -> Option<Access> {
    if administrator {
        return Some(Access::Admin);
    }
    match role {
        Some(Role::Admin | Role::Feeder) => Some(Access::Admin),
        Some(Role::Source) => Some(Access::Source(user.to_owned())),
        Some(Role::Subscriber) | None => Some(Access::Subscriber(user.to_owned())),
        Some(Role::Cluster) => None,
    }
}

/// The gate every protected request goes through.
pub struct Gate {
    mode: AuthMode,
    realm: String,
    roles: RwLock<BTreeMap<String, Role>>,
    /// serve's own management client (to look users up); `None` with `--auth none`.
    mgmt: Option<MgmtClient>,
    cache: Mutex<LoginCache<Access>>,
    limiter: Mutex<FailureLimiter>,
    /// Salted digest of the metrics token.
    token: Option<([u8; 16], [u8; 32])>,
    trusted: Vec<IpAddr>,
    checks: tokio::sync::Semaphore,
    pub counts: LoginCounts,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("mode", &self.mode)
            .field("realm", &self.realm)
            .field("token", &self.token.is_some())
            .finish()
    }
}

/// What [`Gate::new`] needs.
#[derive(Clone)]
pub struct GateConfig {
    pub mode: AuthMode,
    /// Shown by the browser's login prompt (`pumpwatch <cluster>`).
    pub realm: String,
    pub login_cache: Duration,
    pub mgmt: Option<MgmtClient>,
    /// The metrics token itself (read from the environment at start).
    pub metrics_token: Option<String>,
    pub trusted_proxies: Vec<IpAddr>,
}

impl std::fmt::Debug for GateConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateConfig")
            .field("mode", &self.mode)
            .field("realm", &self.realm)
            .field("login_cache", &self.login_cache)
            .field("mgmt", &self.mgmt)
            .field(
                "metrics_token",
                &self.metrics_token.as_ref().map(|_| "****"),
            )
            .field("trusted_proxies", &self.trusted_proxies)
            .finish()
    }
}

fn roles_of(pump: &PumpConfig) -> BTreeMap<String, Role> {
    pump.users
        .values()
        .map(|u| (u.name.clone(), u.role))
        .collect()
}

/// A user name as logged: escaped and cut (it is whatever the client sent).
fn shown(user: &str) -> String {
    let cut: String = user.chars().take(64).collect();
    let more = if cut.len() < user.len() { "…" } else { "" };
    format!("\"{}{more}\"", text::escape(&cut))
}

impl Gate {
    pub fn new(cfg: GateConfig, pump: &PumpConfig) -> Gate {
        Gate {
            mode: cfg.mode,
            realm: cfg.realm.replace(['"', '\\'], ""),
            roles: RwLock::new(roles_of(pump)),
            mgmt: cfg.mgmt,
            cache: Mutex::new(LoginCache::new(cfg.login_cache, MAX_LOGINS)),
            limiter: Mutex::new(FailureLimiter::new(
                FAILURE_BURST,
                FAILURE_REFILL,
                MAX_ADDRESSES,
            )),
            token: cfg.metrics_token.map(|t| {
                let salt: [u8; 16] = rand::random();
                (salt, salted(&salt, &t))
            }),
            trusted: cfg.trusted_proxies,
            checks: tokio::sync::Semaphore::new(MAX_CHECKS),
            counts: LoginCounts::default(),
        }
    }

    /// Everyone is an admin (`--auth none`).
    pub fn open() -> Gate {
        Gate::new(
            GateConfig {
                mode: AuthMode::None,
                realm: "pumpwatch".into(),
                login_cache: Duration::ZERO,
                mgmt: None,
                metrics_token: None,
                trusted_proxies: vec![],
            },
            &PumpConfig::default(),
        )
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The configuration was read again (SIGHUP): new roles, and every remembered login
    /// is checked again.
    pub fn reload(&self, pump: &PumpConfig) {
        *self.roles.write().unwrap_or_else(|p| p.into_inner()) = roles_of(pump);
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn fail(&self, addr: IpAddr, counter: &AtomicU64) {
        bump(counter);
        let blocked = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed(addr, Instant::now());
        if let Some(wait) = blocked {
            tracing::warn!(
                "{addr}: {FAILURE_BURST} failed logins; answering 429 for {:.0} s",
                wait.as_secs_f64().ceil()
            );
        }
    }

    /// Lets a request in as an [`Access`], or says why not. `peer` is the TCP peer.
    pub async fn admit(
        &self,
        headers: &HeaderMap,
        peer: IpAddr,
        need: Need,
    ) -> Result<Access, Refusal> {
        if self.mode == AuthMode::None {
            return Ok(Access::Admin);
        }
        let forwarded: Vec<&[u8]> = headers
            .get_all("x-forwarded-for")
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        let addr = client_address(peer, &forwarded, &self.trusted);
        let bearer = need != Need::Login && self.token.is_some();
        let login = Refusal::Login { bearer };
        if let Some(wait) = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .blocked(addr, Instant::now())
        {
            bump(&self.counts.rate_limited);
            return Err(Refusal::Limited(wait));
        }
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(login); // the browser's first request: ask it to log in
        };
        let presented = match parse_authorization(value.as_bytes()) {
            Ok(p) => p,
            Err(why) => {
                tracing::info!("{addr}: unreadable Authorization header ({why})");
                self.fail(addr, &self.counts.bad_header);
                return Err(login);
            }
        };
        let (user, password) = match presented {
            Presented::Bearer(t) => {
                let right = matches!(&self.token,
                    Some((salt, digest)) if same_digest(digest, &salted(salt, &t)));
                return match (right, bearer) {
                    (true, true) => {
                        bump(&self.counts.token);
                        Ok(Access::Admin)
                    }
                    // The right token where it does not open anything: no failed login (a
                    // scraper polling the page's API must not lock its own /metrics out).
                    (true, false) => {
                        bump(&self.counts.forbidden);
                        Err(Refusal::Forbidden(
                            "the metrics token opens /metrics and /api/check only; log in with your pump account",
                        ))
                    }
                    (false, _) => {
                        tracing::info!("{addr}: login refused: wrong bearer token");
                        self.fail(addr, &self.counts.bad_token);
                        Err(login)
                    }
                };
            }
            Presented::Basic { user, password } => (user, password),
        };
        let remembered = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(
            &user,
            &password,
            Instant::now(),
        );
        let access = match remembered {
            Some(a) => {
                bump(&self.counts.remembered);
                a
            }
            None => {
                let a = self.ask_broker(&user, &password, addr).await.ok_or(login)?;
                let Some(a) = a else {
                    bump(&self.counts.forbidden);
                    return Err(Refusal::Forbidden(
                        "your account (a neighbour pump's) has nothing to see here",
                    ));
                };
                self.cache.lock().unwrap_or_else(|p| p.into_inner()).put(
                    &user,
                    &password,
                    a.clone(),
                    rand::random(),
                    Instant::now(),
                );
                a
            }
        };
        if need == Need::Metrics && access != Access::Admin {
            bump(&self.counts.forbidden);
            return Err(Refusal::Forbidden(
                "/metrics shows every account: an admin login or the metrics token is needed",
            ));
        }
        Ok(access)
    }

    /// Checks a login with the broker: `None` refused (logged, counted), `Some(None)` a
    /// good login with nothing to see, `Some(Some(access))` in.
    async fn ask_broker(&self, user: &str, password: &str, addr: IpAddr) -> Option<Option<Access>> {
        let mgmt = self.mgmt.as_ref()?;
        let who = shown(user);
        let answer = {
            let _permit = self.checks.acquire().await.ok()?;
            mgmt.with_credentials(user, password).whoami().await
        };
        let administrator = match answer {
            Ok(Whoami::Management(info)) => info.tags.iter().any(|t| t == "administrator"),
            Ok(Whoami::NotManagement) => false,
            Ok(Whoami::Refused) => {
                // Which it was, for the log only: serve's own account looks the user up.
                let (why, counter) = match mgmt.user_exists(user).await {
                    Ok(true) => ("wrong password".to_owned(), &self.counts.wrong_password),
                    Ok(false) => ("unknown user".to_owned(), &self.counts.unknown_user),
                    Err(e) => (
                        format!(
                            "wrong password or unknown user (serve's account cannot look users up: {})",
                            text::escape(&e.to_string())
                        ),
                        &self.counts.refused,
                    ),
                };
                tracing::info!("{addr}: login of {who} refused: {why}");
                self.fail(addr, counter);
                return None;
            }
            Err(e) => {
                bump(&self.counts.broker_unreachable);
                tracing::warn!(
                    "{addr}: cannot check the login of {who}: the broker cannot be asked ({})",
                    text::escape(&e.to_string())
                );
                return None;
            }
        };
        let role = self
            .roles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(user)
            .copied();
        let access = access_for(user, administrator, role);
        bump(&self.counts.accepted);
        match &access {
            Some(a) => tracing::debug!("{addr}: {who} logged in ({})", a.label()),
            None => tracing::info!("{addr}: {who} logged in, but a cluster account sees nothing"),
        }
        Some(access)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_map_to_what_one_sees() {
        let s = |n: &str| Some(Access::Source(n.into()));
        let c = |n: &str| Some(Access::Subscriber(n.into()));
        assert_eq!(access_for("radar", false, Some(Role::Source)), s("radar"));
        assert_eq!(
            access_for("radar", true, Some(Role::Source)),
            Some(Access::Admin)
        );
        assert_eq!(access_for("cfs", false, Some(Role::Subscriber)), c("cfs"));
        assert_eq!(access_for("stranger", false, None), c("stranger"));
        assert_eq!(
            access_for("feeder", false, Some(Role::Feeder)),
            Some(Access::Admin)
        );
        assert_eq!(
            access_for("boss", false, Some(Role::Admin)),
            Some(Access::Admin)
        );
        assert_eq!(access_for("ddsr2", false, Some(Role::Cluster)), None);
    }

    #[test]
    fn refusals_say_how_to_get_in_and_nothing_more() {
        let r = Refusal::Login { bearer: true }.response("pumpwatch ddsr.cmc");
        assert_eq!(r.status(), 401);
        let h: Vec<_> = r
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .collect();
        assert_eq!(h.len(), 2);
        assert_eq!(
            h[0],
            "Basic realm=\"pumpwatch ddsr.cmc\", charset=\"UTF-8\""
        );
        let r = Refusal::Limited(Duration::from_millis(5200)).response("x");
        assert_eq!(
            (r.status().as_u16(), &r.headers()[header::RETRY_AFTER]),
            (429, &HeaderValue::from(6u64))
        );
        assert!(
            format!(
                "{:?}",
                GateConfig {
                    mode: AuthMode::Broker,
                    realm: "r".into(),
                    login_cache: Duration::ZERO,
                    mgmt: None,
                    metrics_token: Some("s3cret-token".into()),
                    trusted_proxies: vec![],
                }
            )
            .contains("****")
        );
    }

    #[tokio::test]
    async fn the_token_opens_metrics_only_where_allowed() {
        let pump = PumpConfig::default();
        let gate = Gate::new(
            GateConfig {
                mode: AuthMode::Broker,
                realm: "r".into(),
                login_cache: Duration::from_secs(60),
                mgmt: None,
                metrics_token: Some("s3cret-token".into()),
                trusted_proxies: vec![],
            },
            &pump,
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret-token"),
        );
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(gate.admit(&h, peer, Need::Metrics).await, Ok(Access::Admin));
        assert_eq!(
            gate.admit(&h, peer, Need::LoginOrToken).await,
            Ok(Access::Admin)
        );
        // The right token on the page's routes: forbidden, and no failed login.
        assert!(matches!(
            gate.admit(&h, peer, Need::Login).await,
            Err(Refusal::Forbidden(_))
        ));
        assert_eq!(
            gate.admit(&HeaderMap::new(), peer, Need::Metrics).await,
            Err(Refusal::Login { bearer: true })
        );
        // Wrong tokens run the address out of tries; another address is still let in.
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer guess"),
        );
        for _ in 0..FAILURE_BURST {
            assert!(matches!(
                gate.admit(&h, peer, Need::Metrics).await,
                Err(Refusal::Login { .. })
            ));
        }
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret-token"),
        );
        assert!(matches!(
            gate.admit(&h, peer, Need::Metrics).await,
            Err(Refusal::Limited(_))
        ));
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(
            gate.admit(&h, other, Need::Metrics).await,
            Ok(Access::Admin)
        );
        assert_eq!(gate.counts.rate_limited.load(Ordering::Relaxed), 1);
        // --auth none: everyone is an admin.
        assert_eq!(
            Gate::open()
                .admit(&HeaderMap::new(), peer, Need::Metrics)
                .await,
            Ok(Access::Admin)
        );
    }
}
