//! The routes of `serve`: the embedded page and its assets, the API and the event
//! stream (the listener, `/healthz` and `/metrics` are the shared [`crate::http`]).
//! Handlers only read the board (a short lock each); nothing here blocks on the broker,
//! so `/metrics` and `/healthz` keep answering while it is away.
//!
//! `/api/status`, `/api/events` and `/api/check` take `?client=NAME` or `?source=NAME`
//! to narrow what they report to one client (with its pairs) or one source (with its
//! pairs): a [`Scope`], which is also where a per-account filter plugs in.

use super::Shared;
use super::board::{Kind, Scope};
use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use futures_util::Stream;
use jiff::Timestamp;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

const INDEX_HTML: &str = include_str!("../../../web/index.html");
const APP_JS: &str = include_str!("../../../web/app.js");
const APP_CSS: &str = include_str!("../../../web/app.css");
const UPLOT_JS: &str = include_str!("../../../web/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../../web/vendor/uPlot.min.css");

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/{name}", get(asset))
        .route("/api/status", get(status))
        .route("/api/history", get(history))
        .route("/api/events", get(events))
        .route("/api/check", get(check))
        .route("/metrics", crate::http::metrics(shared.registry.clone()))
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

async fn status(State(s): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    let scope = match scope_of(q.as_deref()) {
        Ok(scope) => scope,
        Err(r) => return r.into_response(),
    };
    let status = s
        .board
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .status(&scope, Timestamp::now());
    Json(status).into_response()
}

/// `/api/check`: everything `pumpwatch check` prints, in one small answer.
async fn check(State(s): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    let scope = match scope_of(q.as_deref()) {
        Ok(scope) => scope,
        Err(r) => return r.into_response(),
    };
    let answer = s
        .board
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .check(&scope, Timestamp::now());
    Json(answer).into_response()
}

/// `/api/history?kind=client&name=a&name=b`: chart data of the named entities.
async fn history(State(s): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
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
        .filter_map(|n| board.series(kind, &n).map(|series| (n, series)))
        .collect();
    Json(out).into_response()
}

/// Server-sent events: a full snapshot first, then every `push_every` what changed since
/// the last event (nothing when nothing did; comments keep the connection alive). Ends
/// when serve stops.
async fn events(
    State(s): State<Arc<Shared>>,
    RawQuery(q): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, BadScope> {
    struct St {
        shared: Arc<Shared>,
        since: u64,
        tick: tokio::time::Interval,
        scope: Scope,
    }
    let scope = scope_of(q.as_deref())?;
    let mut tick = tokio::time::interval(s.push_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let st = St {
        shared: s,
        since: 0,
        tick,
        scope,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            tokio::select! {
                _ = st.shared.shutdown.cancelled() => return None,
                _ = st.tick.tick() => {}
            }
            let delta = {
                let b = st.shared.board.lock().unwrap_or_else(|p| p.into_inner());
                if st.since != 0 && b.version() <= st.since {
                    None
                } else {
                    Some(b.delta(st.since, &st.scope, Timestamp::now()))
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
