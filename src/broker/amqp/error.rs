//! The adapter's one error type, and the mapping from lapin's errors into it.
//!
//! Why a type of our own: callers decide on kinds (retry on `Closed`, reject on
//! `Unroutable`, exit 1 on `Connect`), never on lapin internals; and every text that
//! reaches a log or a terminal passes through here, so this is where "one line, never
//! the password" is enforced.

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

/// Everything that can go wrong talking to the broker. `Display` is always one line and
/// never contains a password (URLs appear as `amqp://user:****@host:port/vhost`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AmqpError {
    /// The broker could not be reached or the AMQP handshake failed.
    #[error("cannot connect to {url_redacted}: {reason}")]
    Connect {
        url_redacted: String,
        reason: String,
    },
    /// Bad credentials, or no permission for an exchange/queue (AMQP 403).
    #[error("access refused: {0}")]
    AccessRefused(String),
    /// An exchange or queue does not exist (AMQP 404).
    #[error("not found: {0}")]
    NotFound(String),
    /// The broker returned a `mandatory` publish: no queue is bound for it.
    #[error("unroutable: no queue bound to exchange '{exchange}' for routing key '{routing_key}'")]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    /// The broker negatively acknowledged a publish (it could not take responsibility).
    #[error("the broker refused (nacked) the publish")]
    Nacked,
    /// The connection (or channel) went away, or there was none within the wait bound.
    /// The operation may be retried; unacked inputs will be redelivered by the broker.
    #[error("broker connection closed: {0}")]
    Closed(String),
    /// Any other AMQP-level refusal (precondition failed, resource locked, ...).
    #[error("AMQP error: {0}")]
    Protocol(String),
    /// A name or value the protocol cannot carry (e.g. an exchange name over 255 bytes).
    #[error("invalid: {0}")]
    Invalid(String),
}

impl AmqpError {
    /// True when retrying on a (new) connection may succeed: the connection or channel
    /// went away underneath the operation.
    pub fn is_transient(&self) -> bool {
        matches!(self, AmqpError::Closed(_))
    }
}

/// Folds any text onto one line (newlines and other control characters become spaces).
pub(crate) fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last_space = false;
    for c in text.chars() {
        if c.is_control() || c.is_whitespace() {
            if !last_space && !out.is_empty() {
                out.push(' ');
            }
            last_space = true;
        } else {
            out.push(c);
            last_space = false;
        }
    }
    let trimmed = out.trim_end().len();
    out.truncate(trimmed);
    out
}

/// Removes `secret` from `text` (defence in depth: lapin's texts carry no password
/// today). Short or user-equal secrets are left alone, as scrubbing them would mangle
/// ordinary words without protecting anything the URL does not already show.
pub(crate) fn scrub(text: String, secret: Option<&str>) -> String {
    match secret {
        Some(s) if s.len() >= 4 && text.contains(s) => text.replace(s, "****"),
        _ => text,
    }
}

/// The broker's own words for a lapin error, one line: `NOT_FOUND - no exchange 'x' in
/// vhost 'v'` rather than lapin's `protocol error: NOT-FOUND: NOT_FOUND - ...`.
pub(crate) fn describe(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) if !amqp.get_message().as_str().is_empty() => {
            one_line(amqp.get_message().as_str())
        }
        lapin::ErrorKind::IOError(io) => one_line(&io.to_string()),
        _ => one_line(&e.to_string()),
    }
}

/// Maps an error of an operation on an established connection. `context` names the
/// operation (`queue.bind q → x`) and is put in front of the broker's text.
pub(crate) fn from_lapin(e: &lapin::Error, context: &str) -> AmqpError {
    let text = if context.is_empty() {
        describe(e)
    } else {
        format!("{context}: {}", describe(e))
    };
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => AmqpError::AccessRefused(text),
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => AmqpError::NotFound(text),
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED)
            | AMQPErrorKind::Hard(AMQPHardError::INTERNALERROR) => AmqpError::Closed(text),
            _ => AmqpError::Protocol(text),
        },
        lapin::ErrorKind::IOError(_)
        | lapin::ErrorKind::RuntimeShutdownError(_)
        | lapin::ErrorKind::MissingHeartbeatError
        | lapin::ErrorKind::InvalidConnectionState(_)
        | lapin::ErrorKind::InvalidChannelState(..)
        | lapin::ErrorKind::InvalidChannel(_) => AmqpError::Closed(text),
        _ => AmqpError::Protocol(text),
    }
}

/// Maps an error of the connection attempt itself: refusals stay `AccessRefused` (with
/// the redacted URL, so the operator sees which account), everything else is `Connect`.
pub(crate) fn connect_error(e: &lapin::Error, url_redacted: &str) -> AmqpError {
    match from_lapin(e, "") {
        AmqpError::AccessRefused(reason) => {
            AmqpError::AccessRefused(format!("{url_redacted}: {reason}"))
        }
        other => AmqpError::Connect {
            url_redacted: url_redacted.to_owned(),
            reason: match other {
                AmqpError::Closed(r)
                | AmqpError::Protocol(r)
                | AmqpError::NotFound(r)
                | AmqpError::Connect { reason: r, .. } => r,
                o => o.to_string(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_folds_newlines() {
        assert_eq!(one_line("a\nb\r\n  c\t"), "a b c");
        assert_eq!(one_line(""), "");
    }

    #[test]
    fn scrub_only_meaningful_secrets() {
        assert_eq!(scrub("x s3cret y".into(), Some("s3cret")), "x **** y");
        assert_eq!(scrub("user 'bob'".into(), Some("bo")), "user 'bob'");
        assert_eq!(scrub("abc".into(), None), "abc");
    }

    #[test]
    fn displays_are_one_line() {
        let errors = [
            AmqpError::Connect {
                url_redacted: "amqp://u:****@h:1/v".into(),
                reason: "refused".into(),
            },
            AmqpError::Unroutable {
                exchange: "x".into(),
                routing_key: "k".into(),
            },
            AmqpError::Nacked,
        ];
        for e in errors {
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }
}
