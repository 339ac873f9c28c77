//! The routes of `serve`: the embedded page and its assets, the API and the event
//! stream (the listener, `/healthz` and `/metrics` are the shared [`crate::http`]).
//! Handlers only read the board (a short lock each); nothing here blocks on the broker,
//! so `/metrics` and `/healthz` keep answering while it is away.
//!
//! Every route but the assets and `/healthz` is behind the gate of [`super::auth`]: the
//! request carries the caller's [`Access`], and each handler asks the board for what that
//! access sees (`status_as`, `delta_as`, `check_as`, `series_as`). `/api/status`,
//! `/api/events` and `/api/check` also take `?client=NAME` or `?source=NAME` to narrow it
//! to one client (with its pairs) or one source (with its pairs): a [`Scope`], within
//! what the access sees.

use super::Shared;
use super::auth::{Need, Refusal};
use super::board::{Access, Board, Kind, Scope};
use axum::Router;
use axum::extract::{ConnectInfo, Extension, RawQuery, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use futures_util::Stream;
use jiff::Timestamp;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

const INDEX_HTML: &str = include_str!("../../../web/index.html");
const APP_JS: &str = include_str!("../../../web/app.js");
const APP_CSS: &str = include_str!("../../../web/app.css");
const UPLOT_JS: &str = include_str!("../../../web/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../../web/vendor/uPlot.min.css");

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    // Each group behind the gate it needs (auth.rs); the assets and /healthz are open.
    let page = Router::new()
        .route("/", get(index))
        .route("/api/status", get(status))
        .route("/api/history", get(history))
        .route("/api/events", get(events))
        .route_layer(middleware::from_fn_with_state(shared.clone(), login));
    let check =
        Router::new()
            .route("/api/check", get(check))
            .route_layer(middleware::from_fn_with_state(
                shared.clone(),
                login_or_token,
            ));
    let metrics = Router::new()
        .route("/metrics", crate::http::metrics(shared.registry.clone()))
        .route_layer(middleware::from_fn_with_state(shared.clone(), metrics_gate));
    Router::new()
        .merge(page)
        .merge(check)
        .merge(metrics)
        .route("/assets/{name}", get(asset))
        .route(
            "/healthz",
            crate::http::healthz(
                {
                    let client = shared.client.clone();
                    move || client.get().is_some_and(|c| c.is_connected())
                },
                "not connected: waiting for the broker or for the exchange to be declared",
            ),
        )
        .with_state(shared)
}

async fn login(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    gate(s, Need::Login, req, next).await
}

async fn login_or_token(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    gate(s, Need::LoginOrToken, req, next).await
}

async fn metrics_gate(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    gate(s, Need::Metrics, req, next).await
}

/// Lets the request in with its [`Access`] as an extension, or answers 401/403/429.
async fn gate(s: Arc<Shared>, need: Need, mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    let access = match s.gate.admit(req.headers(), peer, need).await {
        Ok(a) => a,
        Err(r) => return r.response(s.gate.realm()),
    };
    let sees = s
        .board
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .sees(&access);
    if !sees {
        return Refusal::Forbidden(
            "this serve shows one source's view: that source's and the admins'",
        )
        .response(s.gate.realm());
    }
    req.extensions_mut().insert(access);
    next.run(req).await
}

async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX_HTML,
    )
        .into_response()
}

async fn asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    let (body, ctype) = match name.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "uPlot.iife.min.js" => (UPLOT_JS, "text/javascript; charset=utf-8"),
        "uPlot.min.css" => (UPLOT_CSS, "text/css; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, ctype),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `?client=NAME` or `?source=NAME` (not both); none is everything.
pub(crate) fn scope_of(query: Option<&str>) -> Result<Scope, BadScope> {
    let mut scope = Scope::All;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let next = match &*k {
            "client" => Scope::Client(v.into_owned()),
            "source" => Scope::Source(v.into_owned()),
            _ => continue,
        };
        if scope != Scope::All || next_is_empty(&next) {
            return Err(BadScope);
        }
        scope = next;
    }
    Ok(scope)
}

/// A query that names more than one client or source, or an empty one.
pub(crate) struct BadScope;

impl IntoResponse for BadScope {
    fn into_response(self) -> Response {
        (
            StatusCode::BAD_REQUEST,
            "give one non-empty client=NAME or source=NAME\n",
        )
            .into_response()
    }
}

fn next_is_empty(s: &Scope) -> bool {
    matches!(s, Scope::Client(n) | Scope::Source(n) if n.is_empty() || n.len() > 255)
}

async fn status(
    State(s): State<Arc<Shared>>,
    Extension(access): Extension<Access>,
    RawQuery(q): RawQuery,
) -> Response {
    scoped(&s, &access, q.as_deref(), Board::status_as)
}

/// `/api/check`: everything `pumpwatch check` prints, in one small answer.
async fn check(
    State(s): State<Arc<Shared>>,
    Extension(access): Extension<Access>,
    RawQuery(q): RawQuery,
) -> Response {
    scoped(&s, &access, q.as_deref(), Board::check_as)
}

/// Answers with what `answer` makes of the board for `access`, narrowed to the query's
/// `client=`/`source=` scope (400 when the scope is not one).
fn scoped<T: serde::Serialize>(
    s: &Shared,
    access: &Access,
    query: Option<&str>,
    answer: fn(&Board, &Access, &Scope, Timestamp) -> T,
) -> Response {
    let scope = match scope_of(query) {
        Ok(scope) => scope,
        Err(r) => return r.into_response(),
    };
    let board = s.board.lock().unwrap_or_else(|p| p.into_inner());
    Json(answer(&board, access, &scope, Timestamp::now())).into_response()
}

/// `/api/history?kind=client&name=a&name=b`: chart data of the named entities.
async fn history(
    State(s): State<Arc<Shared>>,
    Extension(access): Extension<Access>,
    RawQuery(q): RawQuery,
) -> Response {
    let mut kind = None;
    let mut names = Vec::new();
    for (k, v) in url::form_urlencoded::parse(q.unwrap_or_default().as_bytes()) {
        match &*k {
            "kind" => kind = Kind::parse(&v),
            "name" => names.push(v.into_owned()),
            _ => {}
        }
    }
    let Some(kind) = kind else {
        return (
            StatusCode::BAD_REQUEST,
            "kind must be client, source, pair or total\n",
        )
            .into_response();
    };
    if names.len() > 1000 {
        return (StatusCode::BAD_REQUEST, "at most 1000 names\n").into_response();
    }
    let board = s.board.lock().unwrap_or_else(|p| p.into_inner());
    let out: BTreeMap<String, _> = names
        .into_iter()
        .filter_map(|n| board.series_as(&access, kind, &n).map(|series| (n, series)))
        .collect();
    Json(out).into_response()
}

/// Server-sent events: a full snapshot first, then every `push_every` what changed since
/// the last event (nothing when nothing did; comments keep the connection alive). Ends
/// when serve stops.
async fn events(
    State(s): State<Arc<Shared>>,
    Extension(access): Extension<Access>,
    RawQuery(q): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, BadScope> {
    struct St {
        shared: Arc<Shared>,
        since: u64,
        tick: tokio::time::Interval,
        scope: Scope,
        access: Access,
        /// A stream opened with a login ends then: the page reconnects and logs in again.
        until: Option<tokio::time::Instant>,
    }
    let scope = scope_of(q.as_deref())?;
    let mut tick = tokio::time::interval(s.push_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let until = (s.gate.mode() == crate::config::AuthMode::Broker)
        .then(|| tokio::time::Instant::now() + super::auth::STREAM_RELOGIN);
    let st = St {
        shared: s,
        since: 0,
        tick,
        scope,
        access,
        until,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            let relogin = async {
                match st.until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = st.shared.shutdown.cancelled() => return None,
                _ = relogin => return None,
                _ = st.tick.tick() => {}
            }
            let delta = {
                let b = st.shared.board.lock().unwrap_or_else(|p| p.into_inner());
                if st.since != 0 && b.version() <= st.since {
                    None
                } else {
                    Some(b.delta_as(&st.access, st.since, &st.scope, Timestamp::now()))
                }
            };
            if let Some(d) = delta {
                st.since = d.version;
                let data = serde_json::to_string(&d).unwrap_or_else(|_| "{}".into());
                let ev = Event::default().event("status").data(data);
                return Some((Ok(ev), st));
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
