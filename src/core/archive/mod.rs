//! The archive of every report (`pumpwatch archive`) and the search over it
//! (`pumpwatch trace`), SPEC §4.10, as pure code: the line format and its escaping
//! ([`line`](mod@line), [`escape`]), the per-hour sidecar index that lets `trace` skip an
//! hour without opening it ([`index`]), and the query and the grouping of lines into each
//! product's life across pumps ([`trace`]). Files, compression and the clock belong to the
//! daemon and the command, which only call these:
//!
//! - **archive**: per report, [`write_report`]`(&report, &attributor.who(&report,
//!   user_id), now, TimeSource::Completed, &mut batch)` into
//!   `DIR/<cluster>/`[`hour_path`]`(now)`.log; on restart, cut the open hour
//!   to [`complete_len`]; when an hour closes, [`split_lines`] + [`ArchiveLine::parse`]
//!   every line into an [`IndexBuilder`] and write [`IndexBuilder::finish`] beside it.
//! - **trace**: build a [`Query`]; pass 1 over every hour whose index
//!   [`Index::may_contain`] the query (or that has no readable index): [`Matcher::check`]
//!   each line, [`Lives::add`] the hits with the cluster; [`Lives::retain_first`] the
//!   limit; pass 2 over hours whose index [`Index::may_hold`] the [`Lives::follow`]:
//!   [`Follow::check`] each line, add those too; [`Lives::finish`], then [`render_text`] or
//!   [`render_json`]. Lines that fail to parse are [`LineError`]s to count and warn about.

pub mod escape;
pub mod index;
pub mod line;
pub mod trace;

pub use index::{Index, IndexBuilder, IndexError, SetKind};
pub use line::{
    ArchiveLine, LineError, TimeSource, complete_len, hour_path, split_lines, write_report,
};
pub use trace::{
    Event, FileMatch, Follow, Life, Lives, Matcher, ProductKey, Query, product_keys, render_json,
    render_text,
};
