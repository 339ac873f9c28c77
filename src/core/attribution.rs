//! Who is the client and whose product is it (SPEC §2). `route` decides once and stamps
//! `pumpwatch_client`/`pumpwatch_source`; everything later reads the stamps first.

use super::report::Report;

/// The client as later components see it: the stamp, else the report's own user field.
pub fn client_of(r: &Report) -> Option<&str> {
    r.stamped_client.as_deref().or(r.user.as_deref())
}

/// The source as later components see it: the stamp, else the report's `source` value.
pub fn source_of(r: &Report) -> Option<&str> {
    r.stamped_source.as_deref().or(r.source.as_deref())
}

/// The owner of a per-user exchange `xs_<user>`.
pub fn exchange_owner(exchange: &str) -> Option<&str> {
    exchange.strip_prefix("xs_").filter(|u| !u.is_empty())
}
