//! The pure core: wire formats, codes, filters and attribution. Nothing in here does I/O
//! or reads the clock, so every rule can be tested (and fuzzed) from bytes alone.

pub mod archive;
pub mod attribution;
pub mod baseline;
pub mod code;
pub mod emit;
pub mod filter;
pub mod headers;
pub mod health;
pub mod lag;
pub mod login;
pub mod nagios;
pub mod report;
pub mod stamp;
pub mod text;
pub mod topic;
pub mod watchdog;

pub use code::{CodeClass, CodeRange};
pub use headers::{HeaderValue, Headers};
pub use report::{Announcement, Format, Identity, Incoming, Message, ParseError, Report};
pub use stamp::Stamp;
