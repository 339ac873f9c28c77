//! Shutdown is a value passed into every `run`, so a daemon runs the same in `main`, in
//! `demo` and in a test (which cancels it in the middle of traffic).

use std::sync::OnceLock;
pub use tokio_util::sync::CancellationToken as Shutdown;

/// A token cancelled on the first SIGINT or SIGTERM.
pub fn on_signals() -> Shutdown {
    let token = Shutdown::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received, shutting down");
        t.cancel();
    });
    token
}

static PANICKED: OnceLock<String> = OnceLock::new();

/// From now on a panic in any thread or task also cancels `token`, so a daemon whose
/// task died stops instead of limping on, and [`panicked`] says so to `main`. The default
/// hook still prints the panic.
pub fn cancel_on_panic(token: &Shutdown) {
    let token = token.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        let _ = PANICKED.set(
            info.to_string()
                .lines()
                .next()
                .unwrap_or("panic")
                .to_owned(),
        );
        token.cancel();
    }));
}

/// The first panic seen since [`cancel_on_panic`], if any.
pub fn panicked() -> Option<String> {
    PANICKED.get().cloned()
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
