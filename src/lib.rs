//! pumpwatch: monitoring and report propagation for Sarracenia-style data pumps.
//!
//! `core` is pure (bytes in, values out, no I/O, no clock); everything else is a thin
//! adapter around it: `amqp` (the one broker adapter every daemon shares), `mgmt` (the
//! RabbitMQ management API), and one folder per subcommand, each with a `Config` and a
//! `run(config, shutdown)`.

pub mod amqp;
pub mod cli;
pub mod config;
pub mod core;
pub mod health;
pub mod log;
pub mod mgmt;
pub mod names;
pub mod report_cmd;
pub mod route;
pub mod serve;
pub mod setup;
pub mod shutdown;
pub mod simulate;
pub mod speedo;
