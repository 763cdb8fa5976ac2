//! Change logs read by the event delivery service, and the local event log.
//!
//! Two SQLite files hold a `changes` table of the same shape: the embedded store's, written in
//! the same transaction as each resource version, and the **local event log**
//! ([`EventLog`]), which a run writing to a FHIR server appends to after each write and before
//! its checkpoint moves (the outbox). [`ChangeReader`] reads either.
//!
//! The local log keeps one row per resource version (and one per deletion, which on some
//! servers names the version it deleted): a write redone after a crash comes back unchanged
//! from the server, and appending its version again is a no-op unless the crash lost the first
//! append. So the delivery service sees every version once.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use iomt_core::{Action, Written};
use rusqlite::{Connection, OptionalExtension, params};

use crate::{Change, DATABASE, StoreError, connect, database_error};

/// The local event log's file, in the state directory.
pub const EVENT_LOG: &str = "events.sqlite";

const LOG_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        type TEXT NOT NULL,
        id TEXT NOT NULL,
        version TEXT NOT NULL,
        last_updated TEXT NOT NULL,
        action TEXT NOT NULL,
        identity INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX IF NOT EXISTS changes_version
        ON changes (type, id, version, action = 'Deleted');
";

/// Logs written before deletions had rows of their own kept one row per version in a table
/// constraint: the table is renamed, [`LOG_SCHEMA`] creates the new one, and the rows move over,
/// positions kept.
const LOG_MIGRATION_COPY: &str = "
    INSERT INTO changes SELECT seq, type, id, version, last_updated, action, identity
        FROM changes_before_deletions;
    DROP TABLE changes_before_deletions;
";
/// The outbox of runs that write to a FHIR server.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl EventLog {
    /// Opens (creating if needed) the log in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Database {
            path: dir.to_owned(),
            message: e.to_string(),
        })?;
        let path = dir.join(EVENT_LOG);
        let mut conn = connect(&path)?;
        let old: Option<String> = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'changes'",
                [],
                |row| row.get(0),
            )
            .optional()
            .map_err(database_error(&path))?;
        if old.is_some_and(|sql| sql.contains("UNIQUE (type, id, version)")) {
            let tx = conn.transaction().map_err(database_error(&path))?;
            tx.execute_batch("ALTER TABLE changes RENAME TO changes_before_deletions;")
                .and_then(|()| tx.execute_batch(LOG_SCHEMA))
                .and_then(|()| tx.execute_batch(LOG_MIGRATION_COPY))
                .map_err(database_error(&path))?;
            tx.commit().map_err(database_error(&path))?;
        }
        conn.execute_batch(LOG_SCHEMA)
            .map_err(database_error(&path))?;
        Ok(Self {
            path,
            conn: Mutex::new(conn),
        })
    }

    /// The log's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends the versions `written` names and returns once they are durable; blocks. A
    /// version already in the log is skipped. An unchanged write names the version in place:
    /// it is appended only if missing (its first append was lost), as created when it is
    /// version `1`, else as updated.
    pub fn append(&self, written: &[Written]) -> Result<usize, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = conn.transaction().map_err(database_error(&self.path))?;
        let mut appended = 0;
        {
            let mut insert = tx
                .prepare_cached(
                    // Not `INSERT OR IGNORE`: an ignored row would still take a position,
                    // and consumers read gaps in positions as lost events.
                    "INSERT INTO changes (type, id, version, last_updated, action, identity) \
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE NOT EXISTS \
                     (SELECT 1 FROM changes WHERE type = ?1 AND id = ?2 AND version = ?3 \
                     AND (action = 'Deleted') = (?5 = 'Deleted'))",
                )
                .map_err(database_error(&self.path))?;
            for w in written {
                let version = w.version_id.as_deref().unwrap_or("0");
                let action = match w.action {
                    Action::Unchanged if version == "1" => Action::Created,
                    Action::Unchanged => Action::Updated,
                    other => other,
                };
                appended += insert
                    .execute(params![
                        w.resource_type,
                        w.id,
                        version,
                        w.last_updated.as_deref().unwrap_or_default(),
                        action.name(),
                        w.identity
                    ])
                    .map_err(database_error(&self.path))?;
            }
        }
        tx.commit().map_err(database_error(&self.path))?;
        Ok(appended)
    }
}

/// Reads a change log: the embedded store's ([`ChangeReader::store`]) or the local event log
/// ([`ChangeReader::event_log`]). Holds its own connection; the writer is not disturbed.
#[derive(Debug)]
pub struct ChangeReader {
    path: PathBuf,
    conn: Connection,
}

impl ChangeReader {
    /// The change log of the embedded store in `dir`.
    pub fn store(dir: &Path) -> Result<Self, StoreError> {
        Self::open(dir.join(DATABASE))
    }

    /// The local event log in `dir`.
    pub fn event_log(dir: &Path) -> Result<Self, StoreError> {
        Self::open(dir.join(EVENT_LOG))
    }

    fn open(path: PathBuf) -> Result<Self, StoreError> {
        let conn = connect(&path)?;
        Ok(Self { path, conn })
    }

    /// Rows after `after`, at most `limit`, in order.
    pub fn changes(&self, after: i64, limit: usize) -> Result<Vec<Change>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, type, id, CAST(version AS TEXT), last_updated, action, identity \
                 FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(database_error(&self.path))?;
        let rows = stmt
            .query_map(params![after, limit as i64], |r| {
                let action: String = r.get(5)?;
                Ok(Change {
                    seq: r.get(0)?,
                    written: Written {
                        resource_type: r.get(1)?,
                        id: r.get(2)?,
                        version_id: Some(r.get(3)?),
                        last_updated: Some(r.get(4)?),
                        action: match action.as_str() {
                            "Created" => Action::Created,
                            "Deleted" => Action::Deleted,
                            _ => Action::Updated,
                        },
                        identity: r.get(6)?,
                    },
                })
            })
            .map_err(database_error(&self.path))?;
        rows.collect::<Result<_, _>>()
            .map_err(database_error(&self.path))
    }

    /// The position of the last row (0 when empty).
    pub fn last(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM changes", [], |r| {
                r.get(0)
            })
            .map_err(database_error(&self.path))
    }

    /// The text of one version of a resource, from the embedded store's history; `None` in
    /// the local event log, which holds no resources.
    pub fn version(
        &self,
        resource_type: &str,
        id: &str,
        version: &str,
    ) -> Result<Option<String>, StoreError> {
        let Ok(version) = version.parse::<i64>() else {
            return Ok(None);
        };
        let has_history: bool = self
            .conn
            .query_row(
                "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'history'",
                [],
                |r| r.get(0),
            )
            .map_err(database_error(&self.path))?;
        if !has_history {
            return Ok(None);
        }
        self.conn
            .prepare_cached("SELECT body FROM history WHERE type = ?1 AND id = ?2 AND version = ?3")
            .map_err(database_error(&self.path))?
            .query_row(params![resource_type, id, version], |r| r.get(0))
            .optional()
            .map_err(database_error(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(id: &str, version: &str, action: Action) -> Written {
        Written {
            resource_type: "Observation".into(),
            id: id.into(),
            version_id: Some(version.into()),
            last_updated: Some("2024-01-01T00:00:00Z".into()),
            action,
            identity: false,
        }
    }

    #[test]
    fn each_version_is_logged_once_and_lost_appends_are_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        let first = [
            written("a", "1", Action::Created),
            written("b", "7f3c-uuid", Action::Updated),
        ];
        assert_eq!(log.append(&first).unwrap(), 2);
        // The same write redone comes back unchanged: nothing new.
        let redone = [
            written("a", "1", Action::Unchanged),
            written("b", "7f3c-uuid", Action::Unchanged),
        ];
        assert_eq!(log.append(&redone).unwrap(), 0);
        // A version whose append a crash lost is appended by its unchanged rewrite.
        assert_eq!(
            log.append(&[written("a", "2", Action::Unchanged)]).unwrap(),
            1
        );
        let reader = ChangeReader::event_log(dir.path()).unwrap();
        let changes = reader.changes(0, 10).unwrap();
        let seen: Vec<(i64, &str, &str, Action)> = changes
            .iter()
            .map(|c| {
                (
                    c.seq,
                    c.written.id.as_str(),
                    c.written.version_id.as_deref().unwrap(),
                    c.written.action,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (1, "a", "1", Action::Created),
                (2, "b", "7f3c-uuid", Action::Updated),
                (3, "a", "2", Action::Updated)
            ]
        );
        assert_eq!(reader.changes(2, 10).unwrap().len(), 1);
        assert_eq!(reader.last().unwrap(), 3);
        assert_eq!(reader.version("Observation", "a", "1").unwrap(), None);
    }

    /// A deletion that names the version it deleted is a change of its own, logged once; a log
    /// of an earlier release, which kept one row per version, is rebuilt with its positions.
    #[test]
    fn a_deletion_of_a_logged_version_is_logged_and_old_logs_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(EVENT_LOG)).unwrap();
            conn.execute_batch(
                "CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT NOT NULL, \
                 id TEXT NOT NULL, version TEXT NOT NULL, last_updated TEXT NOT NULL, \
                 action TEXT NOT NULL, identity INTEGER NOT NULL, UNIQUE (type, id, version));
                 INSERT INTO changes VALUES (5, 'Observation', 'a', '1', '2024-01-01T00:00:00Z', 'Created', 0);",
            )
            .unwrap();
        }
        let log = EventLog::open(dir.path()).unwrap();
        assert_eq!(
            log.append(&[written("a", "1", Action::Deleted)]).unwrap(),
            1
        );
        assert_eq!(
            log.append(&[written("a", "1", Action::Deleted)]).unwrap(),
            0
        );
        assert_eq!(
            log.append(&[written("a", "1", Action::Unchanged)]).unwrap(),
            0
        );
        let reader = ChangeReader::event_log(dir.path()).unwrap();
        let seen: Vec<(i64, Action)> = reader
            .changes(0, 10)
            .unwrap()
            .iter()
            .map(|c| (c.seq, c.written.action))
            .collect();
        assert_eq!(seen, [(5, Action::Created), (6, Action::Deleted)]);
    }
}
