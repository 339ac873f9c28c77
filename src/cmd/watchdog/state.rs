//! The watchdog's state on disk: one SQLite file, `watchdog.sqlite` under `--state-dir`,
//! so a restarted watchdog still knows what every node had in flight (SPEC §7).
//!
//! What is stored is the core's journal ([`Changes`]): open transfers as full rows, nodes
//! with their counts, and the totals; one transaction per flush (the daemon flushes every
//! few hundred reports or tenth of a second), deletes before upserts as the core asks.
//! WAL with `synchronous = FULL`: a flush that returned is on disk, so the reports it
//! covers may be acked. The file is opened in exclusive locking mode and written at once,
//! so a second watchdog on the same directory is refused with a clear error instead of
//! both writing. A file that is not a database, or a newer schema, is refused the same
//! way; a row that cannot be read back is skipped, counted and deleted, never a panic.

use crate::core::report::Identity;
use crate::core::stamp::Stamp;
use crate::core::watchdog::{
    Changes, Counts, NodeRow, RestoreReport, Settings, TransferRow, Watchdog, format_from_name,
};
use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file's name under the state directory.
pub const FILE: &str = "watchdog.sqlite";
const SCHEMA: i64 = 1;

/// Why the state cannot be opened, read or written. One line, naming the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("watchdog state {path}: {reason}")]
pub struct StoreError {
    pub path: String,
    pub reason: String,
}

/// The open state file (exclusively locked while this lives).
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

/// What [`Store::load`] found besides the core's own [`RestoreReport`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    pub core: RestoreReport,
    /// Rows that could not be read back (bad types, unknown format): deleted.
    pub unreadable: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating) `dir/watchdog.sqlite`. Refused when another process holds it, when
    /// it is not a database, or when a newer pumpwatch wrote it.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join(FILE);
        let fail = |reason: String| StoreError {
            path: path.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(format!("cannot create the directory: {e}")))?;
        let conn = Connection::open(&path).map_err(|e| fail(describe(&e)))?;
        let store = Store { conn, path };
        store.init().map_err(|e| store.error(&e))?;
        let version: i64 = store
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .map_err(|e| store.error(&e))?;
        if version != SCHEMA {
            return Err(store.fail(format!(
                "schema version {version}, this pumpwatch reads {SCHEMA} (written by another \
                 version: move the file away to start afresh)"
            )));
        }
        Ok(store)
    }

    fn init(&self) -> rusqlite::Result<()> {
        let c = &self.conn;
        c.busy_timeout(Duration::from_millis(200))?;
        // Exclusive: the lock taken by the first write below is kept until close, so a
        // second watchdog on this directory fails at once instead of interleaving writes.
        c.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        let mode: String = c.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::debug!("SQLite journal mode {mode} (WAL not available)");
        }
        c.pragma_update(None, "synchronous", "FULL")?;
        c.execute_batch(
            "BEGIN IMMEDIATE;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
             INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', 1);
             CREATE TABLE IF NOT EXISTS nodes (
                 host TEXT PRIMARY KEY,
                 last_seen INTEGER NOT NULL,
                 failed_at INTEGER,
                 recovered_at INTEGER,
                 counts TEXT NOT NULL
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS transfers (
                 id INTEGER PRIMARY KEY,
                 host TEXT NOT NULL,
                 client TEXT NOT NULL,
                 format TEXT NOT NULL,
                 started INTEGER NOT NULL,
                 pub_time INTEGER,
                 base_url TEXT NOT NULL,
                 rel_path TEXT NOT NULL,
                 identity_method TEXT,
                 identity_value TEXT,
                 size INTEGER,
                 source TEXT,
                 from_cluster TEXT,
                 to_clusters TEXT NOT NULL,
                 flow TEXT,
                 failed_over INTEGER NOT NULL,
                 stuck INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS transfers_by_start ON transfers (started, id);
             COMMIT;",
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fail(&self, reason: String) -> StoreError {
        StoreError {
            path: self.path.display().to_string(),
            reason,
        }
    }

    fn error(&self, e: &rusqlite::Error) -> StoreError {
        self.fail(describe(e))
    }

    /// Rebuilds the watchdog from the file (see [`Watchdog::restore`]). Rows that cannot
    /// be read are deleted here; those the core refuses are deleted by its first
    /// [`Changes`].
    pub fn load(
        &mut self,
        settings: Settings,
        now: Timestamp,
    ) -> Result<(Watchdog, Loaded), StoreError> {
        let totals = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'totals'", [], |r| {
                r.get::<_, String>(0)
            })
            .optional()
            .map_err(|e| self.error(&e))?
            .and_then(|s| serde_json::from_str::<Counts>(&s).ok())
            .unwrap_or_default();
        let mut unreadable_nodes = Vec::new();
        let mut nodes = Vec::new();
        {
            let mut stmt = self
                .conn
                .prepare("SELECT host, last_seen, failed_at, recovered_at, counts FROM nodes")
                .map_err(|e| self.error(&e))?;
            let mut rows = stmt.query([]).map_err(|e| self.error(&e))?;
            while let Some(row) = rows.next().map_err(|e| self.error(&e))? {
                match node_row(row) {
                    Some(n) => nodes.push(n),
                    None => unreadable_nodes.extend(row.get::<_, rusqlite::types::Value>(0).ok()),
                }
            }
        }
        let mut unreadable: Vec<i64> = Vec::new();
        let mut failed: Option<rusqlite::Error> = None;
        let (watchdog, report) = {
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT id, host, client, format, started, pub_time, base_url, rel_path, \
                     identity_method, identity_value, size, source, from_cluster, to_clusters, \
                     flow, failed_over, stuck FROM transfers ORDER BY started, id",
                )
                .map_err(|e| self.error(&e))?;
            let mut rows = stmt.query([]).map_err(|e| self.error(&e))?;
            // Streamed into the core: a million rows never sit in memory as rows.
            let iter = std::iter::from_fn(|| {
                loop {
                    match rows.next() {
                        Ok(Some(row)) => match transfer_row(row) {
                            Some(t) => return Some(t),
                            None => {
                                if let Ok(id) = row.get::<_, i64>(0) {
                                    unreadable.push(id);
                                }
                            }
                        },
                        Ok(None) => return None,
                        Err(e) => {
                            failed = Some(e);
                            return None;
                        }
                    }
                }
            });
            Watchdog::restore(settings, now, totals, nodes, iter)
        };
        if let Some(e) = failed {
            return Err(self.error(&e));
        }
        let bad = unreadable.len() + unreadable_nodes.len();
        if bad > 0 {
            self.forget(&unreadable, &unreadable_nodes)
                .map_err(|e| self.error(&e))?;
        }
        Ok((
            watchdog,
            Loaded {
                core: report,
                unreadable: bad as u64,
            },
        ))
    }

    /// Deletes rows that could not be read back.
    fn forget(&mut self, ids: &[i64], hosts: &[rusqlite::types::Value]) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        for id in ids {
            tx.execute("DELETE FROM transfers WHERE id = ?1", [id])?;
        }
        for host in hosts {
            tx.execute("DELETE FROM nodes WHERE host = ?1", [host])?;
        }
        tx.commit()
    }

    /// Writes `c` in one transaction: deletes first, then upserts, then the totals.
    pub fn apply(&mut self, c: &Changes) -> Result<(), StoreError> {
        let path = self.path.display().to_string();
        let err = |e: rusqlite::Error| StoreError {
            path: path.clone(),
            reason: describe(&e),
        };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut del = tx
                .prepare_cached("DELETE FROM transfers WHERE id = ?1")
                .map_err(err)?;
            for id in &c.removed {
                del.execute([*id as i64]).map_err(err)?;
            }
            let mut del = tx
                .prepare_cached("DELETE FROM nodes WHERE host = ?1")
                .map_err(err)?;
            for host in &c.removed_nodes {
                del.execute([host]).map_err(err)?;
            }
            let mut put = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO transfers (id, host, client, format, started, \
                     pub_time, base_url, rel_path, identity_method, identity_value, size, \
                     source, from_cluster, to_clusters, flow, failed_over, stuck) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
                )
                .map_err(err)?;
            for t in &c.transfers {
                let clusters = serde_json::to_string(&t.to_clusters).unwrap_or_default();
                put.execute(params![
                    t.id as i64,
                    t.host,
                    t.client,
                    t.format.name(),
                    ms(t.started),
                    t.pub_time.map(ms),
                    t.base_url,
                    t.rel_path,
                    t.identity.as_ref().map(|i| &i.method),
                    t.identity.as_ref().map(|i| &i.value),
                    t.size.map(|s| i64::try_from(s).unwrap_or(i64::MAX)),
                    t.source,
                    t.from_cluster,
                    clusters,
                    t.flow,
                    t.failed_over,
                    t.stuck,
                ])
                .map_err(err)?;
            }
            let mut put = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO nodes (host, last_seen, failed_at, recovered_at, \
                     counts) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(err)?;
            for n in &c.nodes {
                let counts = serde_json::to_string(&n.counts).unwrap_or_default();
                put.execute(params![
                    n.host,
                    ms(n.last_seen),
                    n.failed_at.map(ms),
                    n.recovered_at.map(ms),
                    counts
                ])
                .map_err(err)?;
            }
            let totals = serde_json::to_string(&c.totals).unwrap_or_default();
            tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('totals', ?1)")
                .map_err(err)?
                .execute([totals])
                .map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// Forgets every node and transfer (a standby taking over: see the daemon's notes).
    pub fn clear(&mut self) -> Result<(), StoreError> {
        self.conn
            .execute_batch(
                "BEGIN IMMEDIATE; DELETE FROM transfers; DELETE FROM nodes; \
                 DELETE FROM meta WHERE key = 'totals'; COMMIT;",
            )
            .map_err(|e| self.error(&e))
    }

    /// Rows stored (for tests and the start-up log).
    pub fn counts(&self) -> Result<(u64, u64), StoreError> {
        let n = |sql: &str| {
            self.conn
                .query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|v| v.max(0) as u64)
                .map_err(|e| self.error(&e))
        };
        Ok((
            n("SELECT count(*) FROM nodes")?,
            n("SELECT count(*) FROM transfers")?,
        ))
    }
}

fn ms(s: Stamp) -> i64 {
    s.0.as_millisecond()
}

fn stamp(ms: i64) -> Option<Stamp> {
    Timestamp::from_millisecond(ms).ok().map(Stamp)
}

fn node_row(row: &rusqlite::Row<'_>) -> Option<NodeRow> {
    let counts: String = row.get(4).ok()?;
    Some(NodeRow {
        host: row.get(0).ok()?,
        last_seen: stamp(row.get(1).ok()?)?,
        failed_at: row.get::<_, Option<i64>>(2).ok()?.and_then(stamp),
        recovered_at: row.get::<_, Option<i64>>(3).ok()?.and_then(stamp),
        counts: serde_json::from_str(&counts).unwrap_or_default(),
    })
}

fn transfer_row(row: &rusqlite::Row<'_>) -> Option<TransferRow> {
    let text = |i: usize| row.get::<_, String>(i).ok();
    let opt = |i: usize| row.get::<_, Option<String>>(i).ok();
    let identity = match (opt(8)?, opt(9)?) {
        (Some(method), Some(value)) => Some(Identity { method, value }),
        _ => None,
    };
    let clusters: Vec<String> = serde_json::from_str(&text(13)?).ok()?;
    Some(TransferRow {
        id: row.get::<_, i64>(0).ok()? as u64,
        host: text(1)?,
        client: text(2)?,
        format: format_from_name(&text(3)?)?,
        started: stamp(row.get(4).ok()?)?,
        pub_time: match row.get::<_, Option<i64>>(5).ok()? {
            Some(ms) => Some(stamp(ms)?),
            None => None,
        },
        base_url: text(6)?,
        rel_path: text(7)?,
        identity,
        size: row
            .get::<_, Option<i64>>(10)
            .ok()?
            .and_then(|s| u64::try_from(s).ok()),
        source: opt(11)?,
        from_cluster: opt(12)?,
        to_clusters: clusters,
        flow: opt(14)?,
        failed_over: row.get(15).ok()?,
        stuck: row.get(16).ok()?,
    })
}

/// SQLite's error in words an operator can act on.
fn describe(e: &rusqlite::Error) -> String {
    use rusqlite::ErrorCode;
    let code = e.sqlite_error_code();
    let what = match code {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            "in use by another process (is another watchdog running on this state directory?)"
        }
        Some(ErrorCode::NotADatabase) => {
            "not a database (corrupt or another file: move it away to start afresh)"
        }
        Some(ErrorCode::DatabaseCorrupt) => {
            "the database is corrupt (move it away to start afresh; the queue keeps the \
             reports)"
        }
        Some(ErrorCode::ReadOnly | ErrorCode::PermissionDenied | ErrorCode::CannotOpen) => {
            "cannot open or write it (permissions?)"
        }
        Some(ErrorCode::DiskFull) => "the disk is full",
        _ => "",
    };
    let detail = crate::core::text::escape(&e.to_string()).replace('\n', " ");
    if what.is_empty() {
        detail
    } else {
        format!("{what}: {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::report::Format;
    use crate::core::watchdog::TransferRow;

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn row(id: u64, host: &str, rel: &str, format: Format) -> TransferRow {
        TransferRow {
            id,
            host: host.into(),
            client: "cfs".into(),
            format,
            started: Stamp(now()),
            pub_time: Stamp::from_unix(1_799_999_000, 123_000_000),
            base_url: "sftp://x".into(),
            rel_path: rel.into(),
            identity: Some(Identity {
                method: "md5".into(),
                value: "abc".into(),
            }),
            size: Some(42),
            source: Some("radar".into()),
            from_cluster: None,
            to_clusters: vec!["a".into(), "b,c".into()],
            flow: Some("f\n1".into()),
            failed_over: false,
            stuck: true,
        }
    }

    #[test]
    fn rows_round_trip_and_deletes_come_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let a = row(1, "n1", "d/a.h5", Format::V03);
        let b = row((7 << 32) | 2, "n1", "d/b.h5", Format::V02Sr3);
        s.apply(&Changes {
            transfers: vec![a.clone(), b.clone()],
            nodes: vec![NodeRow {
                host: "n1".into(),
                last_seen: Stamp(now()),
                failed_at: None,
                recovered_at: None,
                counts: Counts {
                    opened: 2,
                    ..Counts::default()
                },
            }],
            totals: Counts {
                opened: 2,
                ..Counts::default()
            },
            ..Changes::default()
        })
        .unwrap();
        // The same id removed and written again in one flush stays written.
        s.apply(&Changes {
            removed: vec![1],
            transfers: vec![a.clone()],
            totals: Counts {
                opened: 2,
                ..Counts::default()
            },
            ..Changes::default()
        })
        .unwrap();
        assert_eq!(s.counts().unwrap(), (1, 2));
        drop(s);
        let mut s = Store::open(dir.path()).unwrap();
        let (w, loaded) = s.load(Settings::default(), now()).unwrap();
        assert_eq!(loaded.core.transfers, 2, "{loaded:?}");
        assert_eq!(loaded.unreadable, 0);
        assert_eq!(w.len(), 2);
        assert_eq!(w.totals().opened, 2);
        let snap = w.snapshot(&Default::default(), now());
        let rels: Vec<&str> = snap.transfers.iter().map(|t| t.rel_path.as_str()).collect();
        assert_eq!(rels, ["d/a.h5", "d/b.h5"]);
        assert_eq!(snap.transfers[1].format, Format::V02Sr3);
    }

    #[test]
    fn a_second_watchdog_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let e = Store::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("another watchdog"), "{e}");
        assert!(e.contains(FILE), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn garbage_is_a_clear_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), vec![0x42u8; 8192]).unwrap();
        let e = Store::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a database"), "{e}");
    }

    #[test]
    fn unreadable_rows_are_skipped_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        s.apply(&Changes {
            transfers: vec![
                row(1, "n1", "d/a", Format::V02),
                row(2, "n1", "d/b", Format::V02),
            ],
            ..Changes::default()
        })
        .unwrap();
        s.conn
            .execute_batch(
                "UPDATE transfers SET format = 'v99' WHERE id = 1;
                 UPDATE transfers SET started = 'soon' WHERE id = 2;
                 INSERT INTO nodes VALUES ('n2', 'x', NULL, NULL, '{}');
                 INSERT INTO transfers VALUES (3, 'n1', 'c', 'v02', 9e18, NULL, '', '', NULL, \
                  NULL, -5, NULL, NULL, 'not json', NULL, 0, 0);",
            )
            .unwrap();
        let (w, loaded) = s.load(Settings::default(), now()).unwrap();
        assert_eq!(w.len(), 0);
        assert_eq!(loaded.unreadable, 4);
        assert_eq!(s.counts().unwrap(), (0, 0));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.conn
            .execute("UPDATE meta SET value = 9 WHERE key = 'schema'", [])
            .unwrap();
        drop(s);
        let e = Store::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("schema version 9"), "{e}");
    }
}
