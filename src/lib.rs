//! pumpwatch: monitoring and report propagation for Sarracenia-style data pumps.
//!
//! Three floors, each importing only from the floors below it:
//! - [`core`]: pure (bytes in, values out, no I/O, no clock): formats, attribution, health;
//! - [`broker`]: what talks to RabbitMQ (AMQP adapter, management API, names of objects);
//! - [`cmd`]: one folder per subcommand, each with `Args`, `Config::from_args` and
//!   `run(config, shutdown)`.
//!
//! Beside them: [`config`] (the TOML file), [`http`] (the listener every daemon shares) and
//! [`shutdown`].
#![forbid(unsafe_code)]
// The clap help texts are doc comments and name broker objects as users read them
// (`xs_<user>`, `xr_<source>`); rustdoc would take those for HTML tags.
#![allow(rustdoc::invalid_html_tags)]

pub mod broker;
pub mod cmd;
pub mod config;
pub mod core;
pub mod http;
pub mod shutdown;

/// The package version (also sent to the broker as the client's `version`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit this binary was built from (`build.rs`), "unknown" outside git.
pub const GIT_COMMIT: &str = env!("PUMPWATCH_GIT_COMMIT");

/// What `pumpwatch --version` prints after the name: the version and the build's commit.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("PUMPWATCH_GIT_COMMIT"),
    ")"
);
