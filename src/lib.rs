//! pumpwatch: monitoring and report propagation for Sarracenia-style data pumps.
//!
//! `core` is pure (bytes in, values out, no I/O, no clock); everything else is a thin
//! adapter around it: `amqp` (the one broker adapter every daemon shares), `mgmt` (the
//! RabbitMQ management API), and one folder per subcommand, each with a `Config` and a
//! `run(config, shutdown)`.

pub mod core;
pub mod mgmt;
