//! The archive of every report (`pumpwatch archive`) and the search over it
//! (`pumpwatch trace`), SPEC §4.10, as pure code: the line format and its escaping
//! ([`line`], [`escape`]), the per-hour sidecar index that lets `trace` skip an hour
//! without opening it ([`index`]), and the query and the grouping of lines into each
//! product's life across pumps ([`trace`]). Files, compression and the clock belong to the
//! daemon and the command, which only call these.

pub mod escape;
pub mod index;
pub mod line;
pub mod trace;

pub use index::{Index, IndexBuilder, IndexError, SetKind};
pub use line::{ArchiveLine, LineError, TimeSource, split_lines, write_report};
pub use trace::{FileMatch, Follow, Life, Lives, Matcher, Query, render_json, render_text};
