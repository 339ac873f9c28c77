//! The learned baselines on disk (`serve --state-dir DIR`): one SQLite database,
//! `DIR/baselines.sqlite3`, one row per (kind, name, hour of the week), so a restart of
//! `serve` keeps weeks of learning.
//!
//! - **Batched writes.** `serve` drains what changed every [`super::Config::state_every`]
//!   and writes it in one transaction (WAL journal, `synchronous = NORMAL`): one fsync per
//!   batch, not per speedo. A crash loses at most one batch of learning.
//! - **One writer.** `DIR/serve.lock` is held (an OS file lock) while `serve` runs, so two
//!   `serve`s never learn into the same database; `baseline show` only reads (WAL lets it
//!   read while `serve` writes).
//! - **Reset while running.** `baseline reset NAME` deletes the rows and leaves a line in
//!   the `forget` table; `serve` reads it at its next batch, forgets the name in memory
//!   too (else it would write the old slots back) and removes the line.
//! - **Errors are clear, never panics**: a database that is not SQLite, corrupt
//!   (`PRAGMA quick_check` at open), of another schema, or locked past the busy timeout
//!   is a [`StateError`] naming the file and what to do.

use crate::core::baseline::Row;
use rusqlite::{Connection, OpenFlags, params};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The database's file name in the state directory.
pub const DB_FILE: &str = "baselines.sqlite3";
/// Held (locked) by the `serve` that writes the database.
pub const LOCK_FILE: &str = "serve.lock";
/// Bumped when the tables change shape.
const SCHEMA_VERSION: i64 = 1;
/// How long a statement waits for another connection's lock before it is an error.
const BUSY: Duration = Duration::from_secs(5);

/// What went wrong with the state directory, in one line.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {dir}: {reason}")]
    Dir { dir: String, reason: String },
    #[error("state directory {dir} is used by another pumpwatch serve (it holds {dir}/serve.lock)")]
    Busy { dir: String },
    #[error("state database {file}: {reason}")]
    Db { file: String, reason: String },
}

/// Which baselines a row belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    Client,
    Source,
}

impl Owner {
    pub fn as_str(self) -> &'static str {
        match self {
            Owner::Client => "client",
            Owner::Source => "source",
        }
    }

    fn parse(s: &str) -> Option<Owner> {
        match s {
            "client" => Some(Owner::Client),
            "source" => Some(Owner::Source),
            _ => None,
        }
    }
}

/// The database of one state directory.
pub struct Store {
    conn: Connection,
    file: String,
    /// The writer's lock; `None` for a reader (`baseline show`).
    _lock: Option<File>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("file", &self.file).finish()
    }
}

fn db_err(file: &str) -> impl Fn(rusqlite::Error) -> StateError + '_ {
    move |e| StateError::Db {
        file: file.to_owned(),
        reason: explain(&e),
    }
}

/// SQLite's own words, with what to do for the usual cases.
fn explain(e: &rusqlite::Error) -> String {
    use rusqlite::ErrorCode as C;
    let text = e.to_string().replace('\n', " ");
    match e.sqlite_error_code() {
        Some(C::DatabaseBusy | C::DatabaseLocked) => {
            format!("{text} (another process holds it longer than {BUSY:?})")
        }
        Some(C::NotADatabase | C::DatabaseCorrupt) => format!(
            "{text}: the file is damaged or not a pumpwatch database; move it away to \
             start learning afresh"
        ),
        Some(C::ReadOnly | C::CannotOpen | C::PermissionDenied) => {
            format!("{text} (check the directory's permissions)")
        }
        _ => text,
    }
}

impl Store {
    /// Opens (creating if needed) the database of `dir` for `serve`, the one writer.
    pub fn open_writer(dir: &Path) -> Result<Store, StateError> {
        let shown = dir.display().to_string();
        std::fs::create_dir_all(dir).map_err(|e| StateError::Dir {
            dir: shown.clone(),
            reason: e.to_string(),
        })?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(|e| StateError::Dir {
                dir: shown.clone(),
                reason: format!("cannot open {LOCK_FILE}: {e}"),
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(StateError::Busy { dir: shown }),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StateError::Dir {
                    dir: shown,
                    reason: format!("cannot lock {LOCK_FILE}: {e}"),
                });
            }
        }
        let mut s = Store::open(&dir.join(DB_FILE), true)?;
        s._lock = Some(lock);
        Ok(s)
    }

    /// Opens the database of `dir` for `baseline show`/`reset`; it must exist.
    pub fn open_reader(dir: &Path) -> Result<Store, StateError> {
        let path = dir.join(DB_FILE);
        if !path.is_file() {
            return Err(StateError::Db {
                file: path.display().to_string(),
                reason: "no such file (serve --state-dir creates it)".into(),
            });
        }
        Store::open(&path, false)
    }

    fn open(path: &PathBuf, create: bool) -> Result<Store, StateError> {
        let file = path.display().to_string();
        let shown = file.clone();
        let e = db_err(&shown);
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let conn = Connection::open_with_flags(path, flags).map_err(&e)?;
        conn.busy_timeout(BUSY).map_err(&e)?;
        let ok: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(&e)?;
        if ok != "ok" {
            return Err(StateError::Db {
                file,
                reason: format!(
                    "damaged ({ok}); move it away to start learning afresh",
                    ok = crate::core::text::escape(&ok)
                ),
            });
        }
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(&e)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!("state database {file}: journal mode is {mode}, not WAL");
        }
        conn.execute_batch(
            "PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS baseline (
                 kind TEXT NOT NULL, name TEXT NOT NULL, hour INTEGER NOT NULL,
                 n INTEGER NOT NULL, weeks INTEGER NOT NULL, last_week INTEGER NOT NULL,
                 mean REAL NOT NULL, m2 REAL NOT NULL,
                 PRIMARY KEY (kind, name, hour)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS forget (
                 kind TEXT NOT NULL, name TEXT NOT NULL, PRIMARY KEY (kind, name));",
        )
        .map_err(&e)?;
        let version: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .map(Some)
            .or_else(|err| match err {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                other => Err(other),
            })
            .map_err(&e)?;
        match version {
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                    params![SCHEMA_VERSION],
                )
                .map_err(&e)?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(v) => {
                return Err(StateError::Db {
                    file,
                    reason: format!("schema version {v}, this pumpwatch reads {SCHEMA_VERSION}"),
                });
            }
        }
        Ok(Store {
            conn,
            file,
            _lock: None,
        })
    }

    pub fn file(&self) -> &str {
        &self.file
    }

    /// Every stored row (of `name` when given), sorted by kind, name and hour. Rows whose
    /// kind or numbers cannot be read are skipped and counted.
    pub fn rows(&self, name: Option<&str>) -> Result<(Vec<(Owner, Row)>, usize), StateError> {
        let e = db_err(&self.file);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT kind, name, hour, n, weeks, last_week, mean, m2 FROM baseline
                 WHERE ?1 IS NULL OR name = ?1 ORDER BY kind, name, hour",
            )
            .map_err(&e)?;
        let mut out = Vec::new();
        let mut bad = 0;
        let mut rows = stmt.query(params![name]).map_err(&e)?;
        while let Some(r) = rows.next().map_err(&e)? {
            let read = || -> rusqlite::Result<Option<(Owner, Row)>> {
                let kind: String = r.get(0)?;
                let Some(owner) = Owner::parse(&kind) else {
                    return Ok(None);
                };
                let int = |i: usize| -> rusqlite::Result<i64> { r.get(i) };
                let (Ok(hour), Ok(n), Ok(weeks), Ok(last_week)) = (
                    u8::try_from(int(2)?),
                    u64::try_from(int(3)?),
                    u32::try_from(int(4)?),
                    u32::try_from(int(5)?),
                ) else {
                    return Ok(None);
                };
                Ok(Some((
                    owner,
                    Row {
                        name: r.get(1)?,
                        hour_of_week: hour,
                        n,
                        weeks,
                        last_week,
                        mean: r.get(6)?,
                        m2: r.get(7)?,
                    },
                )))
            };
            match read() {
                Ok(Some(row)) => out.push(row),
                // A value of the wrong type (hand-edited): that row only.
                Ok(None) | Err(_) => bad += 1,
            }
        }
        Ok((out, bad))
    }

    /// Writes changed rows and takes the pending `forget`s, in one transaction; returns
    /// the names to forget in memory. A forgotten name's rows are not written back.
    pub fn write(&mut self, rows: &[(Owner, Row)]) -> Result<Vec<(Owner, String)>, StateError> {
        let e = db_err(&self.file);
        let tx = self.conn.transaction().map_err(&e)?;
        let forget: Vec<(Owner, String)> = {
            let mut stmt = tx.prepare("SELECT kind, name FROM forget").map_err(&e)?;
            let it = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(&e)?;
            let mut v = Vec::new();
            for x in it {
                let (k, n) = x.map_err(&e)?;
                if let Some(o) = Owner::parse(&k) {
                    v.push((o, n));
                }
            }
            v
        };
        {
            let mut put = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO baseline
                     (kind, name, hour, n, weeks, last_week, mean, m2)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(&e)?;
            for (owner, r) in rows {
                if forget.iter().any(|(o, n)| o == owner && *n == r.name) {
                    continue;
                }
                put.execute(params![
                    owner.as_str(),
                    r.name,
                    r.hour_of_week,
                    i64::try_from(r.n).unwrap_or(i64::MAX),
                    r.weeks,
                    r.last_week,
                    r.mean,
                    r.m2
                ])
                .map_err(&e)?;
            }
        }
        if !forget.is_empty() {
            tx.execute("DELETE FROM forget", []).map_err(&e)?;
            for (o, n) in &forget {
                tx.execute(
                    "DELETE FROM baseline WHERE kind = ?1 AND name = ?2",
                    params![o.as_str(), n],
                )
                .map_err(&e)?;
            }
        }
        tx.commit().map_err(&e)?;
        Ok(forget)
    }

    /// Forgets `name` (as a client and as a source): its rows go now, and a running
    /// `serve` forgets it in memory at its next batch. Returns the rows deleted.
    pub fn reset(&mut self, name: &str) -> Result<usize, StateError> {
        let e = db_err(&self.file);
        let tx = self.conn.transaction().map_err(&e)?;
        let n = tx
            .execute("DELETE FROM baseline WHERE name = ?1", params![name])
            .map_err(&e)?;
        for o in [Owner::Client, Owner::Source] {
            tx.execute(
                "INSERT OR IGNORE INTO forget (kind, name) VALUES (?1, ?2)",
                params![o.as_str(), name],
            )
            .map_err(&e)?;
        }
        tx.commit().map_err(&e)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, hour: u8, mean: f64) -> Row {
        Row {
            name: name.into(),
            hour_of_week: hour,
            n: 120,
            weeks: 2,
            last_week: 2800,
            mean,
            m2: 3.5,
        }
    }

    #[test]
    fn rows_round_trip_and_reset_reaches_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Store::open_writer(dir.path()).unwrap();
        let rows = vec![
            (Owner::Client, row("cfs", 3, 2.0)),
            (Owner::Client, row("cfs", 4, 2.5)),
            (Owner::Source, row("radar", 3, 9.0)),
        ];
        assert!(w.write(&rows).unwrap().is_empty());
        // Written again with new values: replaced, not added.
        w.write(&[(Owner::Client, row("cfs", 4, 3.0))]).unwrap();
        let r = Store::open_reader(dir.path()).unwrap();
        let (all, bad) = r.rows(None).unwrap();
        assert_eq!(bad, 0);
        assert_eq!(all.len(), 3);
        assert_eq!(all[1].1.mean, 3.0);
        assert_eq!(r.rows(Some("radar")).unwrap().0.len(), 1);
        // Reset from another connection while the writer runs.
        let mut r = Store::open_reader(dir.path()).unwrap();
        assert_eq!(r.reset("cfs").unwrap(), 2);
        let forgotten = w.write(&[(Owner::Client, row("cfs", 5, 1.0))]).unwrap();
        assert!(forgotten.contains(&(Owner::Client, "cfs".into())));
        assert_eq!(r.rows(Some("cfs")).unwrap().0.len(), 0, "not written back");
        assert!(w.write(&[]).unwrap().is_empty(), "forgotten once");
    }

    #[test]
    fn one_writer_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _w = Store::open_writer(dir.path()).unwrap();
        let e = Store::open_writer(dir.path()).unwrap_err().to_string();
        assert!(e.contains("used by another pumpwatch serve"), "{e}");
    }

    #[test]
    fn a_damaged_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(DB_FILE),
            b"this is not a database, at all. ".repeat(200),
        )
        .unwrap();
        let e = Store::open_writer(dir.path()).unwrap_err().to_string();
        assert!(e.contains(DB_FILE) && e.contains("move it away"), "{e}");
        assert!(!e.contains('\n'));
        let empty = tempfile::tempdir().unwrap();
        let e = Store::open_reader(empty.path()).unwrap_err().to_string();
        assert!(e.contains("no such file"), "{e}");
    }

    #[test]
    fn hand_edited_rows_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Store::open_writer(dir.path()).unwrap();
        w.write(&[(Owner::Client, row("cfs", 3, 2.0))]).unwrap();
        w.conn
            .execute_batch(
                "INSERT INTO baseline VALUES ('planet', 'x', 1, 1, 1, 1, 1.0, 0.0);
                 INSERT INTO baseline VALUES ('client', 'y', 999, 1, 1, 1, 1.0, 0.0);
                 INSERT INTO baseline VALUES ('client', 'z', 1, 'many', 1, 1, 1.0, 0.0);",
            )
            .unwrap();
        let (rows, bad) = w.rows(None).unwrap();
        assert_eq!((rows.len(), bad), (1, 3));
    }
}
