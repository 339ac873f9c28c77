//! The one HTTP listener every pumpwatch daemon serves on (SPEC §4.6): `route`, `serve`,
//! `watchdog` and `archive` all get the same defences and the same `/healthz` and
//! `/metrics`.
//!
//! Why not `axum::serve`: it has no header deadline and no connection cap, so 20 000
//! clients that never finish their headers filled the descriptor limit and starved
//! `/healthz`. Here every connection is served by hyper with
//! - a **header deadline** ([`Limits::header_timeout`]): a request's headers must arrive
//!   within it, and an idle keep-alive connection is closed after it too (hyper starts the
//!   timer whenever it waits for the next request head);
//! - a **connection cap** ([`Limits::max_connections`]): at the cap, a new connection
//!   pushes out the oldest one that is not serving a request (a slow or idle client), so a
//!   flood of half-open connections can never lock a real client out; only when every
//!   connection is busy is the new one refused. A pushed-out connection is closed at once,
//!   and the listener accepts no more while more than the cap + 64 sockets are still
//!   held, so the descriptors stay bounded however fast a flood connects; the accept
//!   queue is deep (4096, or the kernel's `somaxconn`) so a burst delays a real client
//!   rather than dropping its connection attempt;
//! - a header size bound and graceful shutdown (in-flight responses finish, streams end);
//! - optionally HTTPS ([`Tls`], rustls): the handshake is part of the header deadline, a
//!   connection in its handshake counts as idle for the cap, and `Tls::reload` takes a
//!   renewed certificate without a restart.
//!
//! Every request carries its TCP peer as `axum::extract::ConnectInfo<SocketAddr>` (for
//! per-address limits).

use crate::cmd::Error;
use crate::shutdown::Shutdown;
use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// The defences of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A request's headers (and an idle connection's next request) must arrive within this.
    pub header_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// Request head size at most.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(5),
            max_connections: 512,
            max_header_bytes: 16 * 1024,
        }
    }
}

/// A bound listener, not yet serving: [`local_addr`](Self::local_addr) says where
/// (port 0 picks a free one).
pub struct Listener {
    inner: TcpListener,
    limits: Limits,
    tls: Option<Tls>,
}

/// A certificate that cannot be served: which file, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("TLS {file}: {reason}")]
pub struct TlsError {
    pub file: String,
    pub reason: String,
}

/// What an HTTPS listener presents: a PEM certificate chain and its private key, read
/// again by [`Tls::reload`] (a renewed certificate, without a restart).
#[derive(Clone)]
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

impl Tls {
    /// Reads and checks both files (the key must match the certificate).
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, TlsError> {
        let config = Tls::read(cert, key)?;
        Ok(Tls {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: Arc::new(std::sync::RwLock::new(Arc::new(config))),
        })
    }

    /// Reads the files again; on an error the certificate served so far stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Tls::read(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        Ok(())
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    fn read(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let err = |file: &Path, reason: String| TlsError {
            file: file.display().to_string(),
            reason,
        };
        let cert_pem = std::fs::read(cert).map_err(|e| err(cert, e.to_string()))?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(cert, format!("not a PEM certificate chain ({e})")))?;
        if chain.is_empty() {
            return Err(err(cert, "holds no CERTIFICATE".into()));
        }
        let key_pem = std::fs::read(key).map_err(|e| err(key, e.to_string()))?;
        let private = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| err(key, format!("no PEM private key ({e})")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| err(cert, e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|e| err(key, format!("does not go with the certificate: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl Listener {
    /// Binds `addr`; failing to is a runtime error naming the address.
    pub async fn bind(addr: SocketAddr, limits: Limits) -> Result<Listener, Error> {
        let listen = || -> std::io::Result<TcpListener> {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            // A deep accept queue (the kernel caps it at somaxconn): during a burst of
            // connections a real client's waits there instead of having its SYN dropped
            // and retried a second later.
            socket.listen(ACCEPT_BACKLOG)
        };
        let inner = listen().map_err(|e| Error::Listen {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Listener {
            inner,
            limits,
            tls: None,
        })
    }

    /// Serves HTTPS with `tls` instead of plain HTTP.
    pub fn with_tls(mut self, tls: Tls) -> Listener {
        self.tls = Some(tls);
        self
    }

    /// Whether it serves HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Serves `app` until `shutdown`, then lets in-flight requests finish (at most
    /// `grace`) and returns.
    pub async fn serve(self, app: Router, shutdown: Shutdown, grace: Duration) {
        let conns = Arc::new(Connections::default());
        let mut tasks = tokio::task::JoinSet::new();
        // Descriptors held by connection tasks, counted until each task has closed its
        // socket: a connection pushed out at the cap is closed by its own task a moment
        // later, and a flood must not outrun that.
        let live = Arc::new(Live::default());
        let limit = self.limits.max_connections.max(1) + EVICTION_SLACK;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = live.below(limit) => {}
            }
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.inner.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors or a connection reset before accept: wait a
                        // little rather than spin, keep serving.
                        tracing::debug!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            while tasks.try_join_next().is_some() {}
            let Some(conn) = conns.admit(self.limits.max_connections) else {
                drop(stream); // every connection is busy: refuse this one
                continue;
            };
            let _ = stream.set_nodelay(true);
            let held = Held::new(&live);
            let (app, conns, limits, shutdown) =
                (app.clone(), conns.clone(), self.limits, shutdown.clone());
            let tls = self.tls.as_ref().map(Tls::acceptor);
            tasks.spawn(async move {
                match tls {
                    None => {
                        serve_connection(stream, peer, app, conn, conns, limits, shutdown).await
                    }
                    Some(acceptor) => {
                        // The handshake is bounded by the header deadline, and a connection
                        // still in it is idle for the cap (pushed out first).
                        let shake =
                            tokio::time::timeout(limits.header_timeout, acceptor.accept(stream));
                        let tls_stream = tokio::select! {
                            r = shake => match r {
                                Ok(Ok(s)) => Some(s),
                                Ok(Err(e)) => {
                                    tracing::debug!("TLS handshake with {peer} failed: {e}");
                                    None
                                }
                                Err(_) => None,
                            },
                            _ = conn.evict.cancelled() => None,
                            _ = shutdown.cancelled() => None,
                        };
                        match tls_stream {
                            Some(s) => {
                                serve_connection(s, peer, app, conn, conns, limits, shutdown).await
                            }
                            None => conns.close(conn.id),
                        }
                    }
                }
                drop(held);
            });
        }
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, drain).await.is_err() {
            tasks.abort_all();
        }
    }
}

/// Connections over the cap that may still be closing (pushed out, their task not yet
/// run): the most descriptors a listener holds is the cap plus this.
const EVICTION_SLACK: usize = 64;

/// The listen backlog asked of the kernel.
const ACCEPT_BACKLOG: u32 = 4096;

/// How many connection tasks hold a socket, and a wake-up when one lets go.
#[derive(Default)]
struct Live {
    n: AtomicUsize,
    released: tokio::sync::Notify,
}

impl Live {
    /// Returns once fewer than `limit` sockets are held.
    async fn below(&self, limit: usize) {
        loop {
            let released = self.released.notified();
            if self.n.load(Ordering::Acquire) < limit {
                return;
            }
            released.await;
        }
    }
}

/// One held socket, counted in [`Live`] until dropped.
struct Held(Arc<Live>);

impl Held {
    fn new(live: &Arc<Live>) -> Held {
        live.n.fetch_add(1, Ordering::AcqRel);
        Held(live.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.n.fetch_sub(1, Ordering::AcqRel);
        self.0.released.notify_waiters();
    }
}

/// One accepted connection as the cap sees it.
struct Conn {
    id: u64,
    /// Requests being served on it (headers read, response body not yet finished).
    busy: Arc<AtomicUsize>,
    /// Cancelled to push it out.
    evict: Shutdown,
}

#[derive(Default)]
struct Connections {
    /// In accept order, so the first idle one is the oldest.
    open: Mutex<BTreeMap<u64, (Arc<AtomicUsize>, Shutdown)>>,
    next: AtomicUsize,
}

impl Connections {
    /// Registers a new connection, pushing out the oldest idle one at the cap; `None` when
    /// every open connection is busy.
    fn admit(&self, max: usize) -> Option<Conn> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.len() >= max.max(1) {
            let oldest_idle = open
                .iter()
                .find(|(_, (busy, _))| busy.load(Ordering::Acquire) == 0)
                .map(|(id, _)| *id)?;
            if let Some((_, evict)) = open.remove(&oldest_idle) {
                evict.cancel();
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) as u64;
        let busy = Arc::new(AtomicUsize::new(0));
        let evict = Shutdown::new();
        open.insert(id, (busy.clone(), evict.clone()));
        Some(Conn { id, busy, evict })
    }

    fn close(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
}

async fn serve_connection<I>(
    stream: I,
    peer: SocketAddr,
    app: Router,
    conn: Conn,
    conns: Arc<Connections>,
    limits: Limits,
    shutdown: Shutdown,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let busy = conn.busy.clone();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let guard = Busy::enter(&busy);
        let app = app.clone();
        let mut req = req.map(Body::new);
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        async move {
            let resp = app.oneshot(req).await;
            // The guard lives until the body is finished (or dropped): a stream being
            // written is not idle.
            resp.map(|r| {
                r.map(|b| {
                    Body::new(Guarded {
                        inner: b,
                        _guard: guard,
                    })
                })
            })
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let served = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(served);
    tokio::select! {
        _ = served.as_mut() => {}
        _ = conn.evict.cancelled() => {
            // Pushed out because it was serving no request: close it now. Waiting for a
            // graceful end would keep a half-sent request's descriptor open up to the
            // header deadline, and a flood would pile those up past the cap.
            if conn.busy.load(Ordering::Acquire) > 0 {
                // A request started just after it was picked: let that one finish.
                served.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(limits.header_timeout, served.as_mut()).await;
            }
        }
        _ = shutdown.cancelled() => {
            served.as_mut().graceful_shutdown();
            let _ = served.as_mut().await;
        }
    }
    conns.close(conn.id);
}

/// Counts a request as being served while alive.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn enter(n: &Arc<AtomicUsize>) -> Busy {
        n.fetch_add(1, Ordering::AcqRel);
        Busy(n.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its connection marked busy until it is done.
struct Guarded {
    inner: Body,
    _guard: Busy,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// `/healthz` whose answer says more than up or down: `Ok(text)` is 200 with `text`
/// (e.g. `ok standby`), `Err(why)` 503 with `why`.
pub fn healthz_with<F, S>(state: F) -> axum::routing::MethodRouter<S>
where
    F: Fn() -> Result<&'static str, &'static str> + Clone + Send + Sync + 'static,
    S: Clone + Send + Sync + 'static,
{
    axum::routing::get(move || {
        let r = state();
        async move {
            match r {
                Ok(text) => (StatusCode::OK, format!("{text}\n")).into_response(),
                Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
            }
        }
    })
}

/// `/healthz`: 200 `ok` while `up()` says so, else 503 with `why_not`.
pub fn healthz<F, S>(up: F, why_not: &'static str) -> axum::routing::MethodRouter<S>
where
    F: Fn() -> bool + Clone + Send + Sync + 'static,
    S: Clone + Send + Sync + 'static,
{
    axum::routing::get(move || {
        let ok = up();
        async move {
            if ok {
                (StatusCode::OK, "ok\n").into_response()
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, format!("{why_not}\n")).into_response()
            }
        }
    })
}

/// The Prometheus text exposition of `registry`.
pub fn exposition(registry: &Registry) -> Response<Body> {
    let mut out = String::with_capacity(16 * 1024);
    use prometheus_client::encoding::prometheus_text;
    match prometheus_text::encode(&mut out, registry) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)], out).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response(),
    }
}

/// `/metrics` serving `registry`.
pub fn metrics<S>(registry: Arc<Registry>) -> axum::routing::MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    axum::routing::get(move || {
        let r = registry.clone();
        async move { exposition(&r) }
    })
}
