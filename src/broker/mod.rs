//! Everything that talks to RabbitMQ: the AMQP adapter every daemon shares, the management
//! API client, and the names and shapes of the broker objects pumpwatch uses.

pub mod amqp;
pub mod mgmt;
pub mod names;
pub mod url;
pub mod wire;
