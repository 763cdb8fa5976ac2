//! The embedded FHIR store: what a FHIR server would hold, in one SQLite file.
//!
//! Embedded mode (no FHIR server configured) writes here. Like a server, the store keeps each
//! resource's current version with `meta.versionId` and `meta.lastUpdated`, and every earlier
//! version. Unlike a server, it also keeps a **change log**: one row per version written, in the
//! same transaction as the resource, so that change events can be read from it without ever
//! missing or inventing one. NDJSON files in the Bulk Data layout are exported from the store
//! ([`export_ndjson`]); they are no longer the store itself, so memory does not grow with what
//! was written.
//!
//! All database work is done by one thread. Writes commit in groups: every write waiting when
//! a transaction starts goes into it, and each caller is answered once the commit is durable.
//! A read returns the stored text, which the caller parses on its own thread. (Reads on
//! blocking threads, one mimalloc heap each, cost more memory than they saved time.) One
//! process at a time may write a store: [`EmbeddedStore::open`] takes an exclusive lock on
//! `store.lock` and refuses a second process with an error naming the directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;

use iomt_core::{Action, Timestamp, Written};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// The database file inside the store directory.
pub const DATABASE: &str = "store.sqlite";
/// The lock file inside the store directory.
const LOCK: &str = "store.lock";
/// Writes committed together at most.
const MAX_BATCH: usize = 512;

/// Why the store failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Another process has the store open for writing.
    #[error(
        "the store in {dir} is in use by another iomt process; wait for it to end or choose another output directory"
    )]
    Locked {
        /// The store directory.
        dir: PathBuf,
    },
    /// The database could not be opened, read or written.
    #[error("store {path}: {message}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// What SQLite or the file system said.
        message: String,
    },
    /// The resource changed since it was read: read it again and redo the change.
    #[error("{reference} changed since it was read")]
    Conflict {
        /// `Type/id`.
        reference: String,
    },
    /// A resource without `resourceType` or `id`.
    #[error("a resource to store needs resourceType and id")]
    Invalid,
    /// The writer thread is gone (the store was closed, or a write panicked).
    #[error("the store's writer has stopped")]
    Closed,
}

/// A stored resource and its version.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The resource, with `meta.versionId` and `meta.lastUpdated`.
    pub resource: Value,
    /// Its version number.
    pub version: i64,
}

/// One change-log row: a version written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Position in the log (1, 2, …, in commit order).
    pub seq: i64,
    /// What was written.
    pub written: Written,
}

/// What a put expects the resource's current version to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The resource must not exist yet.
    Absent,
    /// The resource must be at this version.
    Version(i64),
}

enum Job {
    Put {
        resource: Value,
        expect: Option<Expect>,
        identity: bool,
        reply: oneshot::Sender<Result<Written, StoreError>>,
    },
    /// The stored text of a resource and its version; parsed by the caller, off this thread.
    Read {
        resource_type: String,
        id: String,
        reply: oneshot::Sender<Result<Option<(i64, String)>, StoreError>>,
    },
}

/// An open store.
#[derive(Debug)]
pub struct EmbeddedStore {
    dir: PathBuf,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    _lock: File,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS resources (
        type TEXT NOT NULL,
        id TEXT NOT NULL,
        version INTEGER NOT NULL,
        last_updated TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (type, id)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS history (
        type TEXT NOT NULL,
        id TEXT NOT NULL,
        version INTEGER NOT NULL,
        last_updated TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (type, id, version)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        type TEXT NOT NULL,
        id TEXT NOT NULL,
        version INTEGER NOT NULL,
        last_updated TEXT NOT NULL,
        action TEXT NOT NULL,
        identity INTEGER NOT NULL
    );
";

fn database_error(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |e| StoreError::Database {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(database_error(path))?;
    // WAL: readers beside the writer, and a commit is one append to the log. A commit is
    // durable once `COMMIT` returns (synchronous FULL), which the checkpoint relies on.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;",
    )
    .map_err(database_error(path))?;
    Ok(conn)
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir` for writing.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let io = |e: std::io::Error| StoreError::Database {
            path: dir.to_owned(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    dir: dir.to_owned(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let path = dir.join(DATABASE);
        let conn = connect(&path)?;
        conn.execute_batch(SCHEMA).map_err(database_error(&path))?;
        let (jobs, rx) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("iomt-store".into())
            .spawn(move || write_loop(conn, path, rx))
            .map_err(io)?;
        Ok(Self {
            dir: dir.to_owned(),
            jobs: Mutex::new(Some(jobs)),
            writer: Mutex::new(Some(writer)),
            _lock: lock,
        })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        jobs.as_ref()
            .ok_or(StoreError::Closed)?
            .send(job)
            .map_err(|_| StoreError::Closed)
    }

    /// The current version of a resource.
    pub async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Stored>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Read {
            resource_type: resource_type.to_owned(),
            id: id.to_owned(),
            reply,
        })?;
        let Some((version, body)) = answer.await.map_err(|_| StoreError::Closed)?? else {
            return Ok(None);
        };
        let resource = serde_json::from_str(&body).map_err(|e| StoreError::Database {
            path: self.dir.join(DATABASE),
            message: format!("{resource_type}/{id} is not JSON: {e}"),
        })?;
        Ok(Some(Stored { resource, version }))
    }

    /// Writes a new version of `resource` and answers once it is durable. With `expect`, the
    /// write is refused ([`StoreError::Conflict`]) unless the resource is as expected; without,
    /// it replaces whatever is there. A resource whose content equals the current version's is
    /// not written again ([`Action::Unchanged`]). `identity` marks Create-mode Patients and
    /// Devices.
    pub async fn put(
        &self,
        resource: Value,
        expect: Option<Expect>,
        identity: bool,
    ) -> Result<Written, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Put {
            resource,
            expect,
            identity,
            reply,
        })?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Resources stored, per type.
    pub fn counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let path = self.dir.join(DATABASE);
        counts(&connect(&path)?, &path)
    }

    /// Finishes the writes queued and stops the writer thread.
    pub fn close(&self) {
        drop(
            self.jobs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        if let Some(writer) = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            && writer.join().is_err()
        {
            tracing::error!("the store's writer thread panicked");
        }
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.close();
    }
}

fn read(conn: &Connection, path: &Path, t: &str, id: &str) -> Result<Option<Stored>, StoreError> {
    let row: Option<(i64, String)> = conn
        .prepare_cached("SELECT version, body FROM resources WHERE type = ?1 AND id = ?2")
        .and_then(|mut s| {
            s.query_row(params![t, id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(database_error(path))?;
    row.map(|(version, body)| {
        let resource = serde_json::from_str(&body).map_err(|e| StoreError::Database {
            path: path.to_owned(),
            message: format!("{t}/{id} is not JSON: {e}"),
        })?;
        Ok(Stored { resource, version })
    })
    .transpose()
}

fn read_text(
    conn: &Connection,
    path: &Path,
    t: &str,
    id: &str,
) -> Result<Option<(i64, String)>, StoreError> {
    conn.prepare_cached("SELECT version, body FROM resources WHERE type = ?1 AND id = ?2")
        .and_then(|mut s| {
            s.query_row(params![t, id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(database_error(path))
}

fn counts(conn: &Connection, path: &Path) -> Result<Vec<(String, u64)>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT type, COUNT(*) FROM resources GROUP BY type ORDER BY type")
        .map_err(database_error(path))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })
        .map_err(database_error(path))?;
    rows.collect::<Result<_, _>>().map_err(database_error(path))
}

/// The resource without what the store stamps, for "same content" comparisons.
fn content(resource: &Value) -> Value {
    let mut r = resource.clone();
    if let Some(m) = r.as_object_mut() {
        m.shift_remove("meta");
    }
    r
}

/// The writer thread: takes every job waiting, applies them in one transaction, commits, and
/// only then answers each.
fn write_loop(mut conn: Connection, path: PathBuf, jobs: mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut answers = Vec::with_capacity(batch.len());
        let result = (|| -> Result<(), rusqlite::Error> {
            let tx = conn.transaction()?;
            for job in batch {
                match job {
                    Job::Put {
                        resource,
                        expect,
                        identity,
                        reply,
                    } => answers.push((reply, put(&tx, &path, resource, expect, identity)?)),
                    // A read in the batch sees the batch's writes before they commit; if the
                    // commit fails, a write based on it is refused as a conflict.
                    Job::Read {
                        resource_type,
                        id,
                        reply,
                    } => {
                        reply.send(read_text(&tx, &path, &resource_type, &id)).ok();
                    }
                }
            }
            tx.commit()
        })();
        match result {
            Ok(()) => {
                for (reply, answer) in answers {
                    reply.send(answer).ok();
                }
            }
            Err(e) => {
                // Nothing of the batch is stored; every caller learns it.
                let error = database_error(&path)(e);
                tracing::error!(%error, "cannot commit to the store");
                for (reply, _) in answers {
                    reply.send(Err(error.clone())).ok();
                }
            }
        }
    }
}

/// One put inside the writer's transaction. Refusals (conflict, invalid) are answers; only
/// database failures abort the transaction.
fn put(
    tx: &rusqlite::Transaction<'_>,
    path: &Path,
    mut resource: Value,
    expect: Option<Expect>,
    identity: bool,
) -> Result<Result<Written, StoreError>, rusqlite::Error> {
    let (Some(t), Some(id)) = (
        resource["resourceType"].as_str().map(str::to_owned),
        resource["id"].as_str().map(str::to_owned),
    ) else {
        return Ok(Err(StoreError::Invalid));
    };
    let written = |version: i64, last_updated: String, action| Written {
        resource_type: t.clone(),
        id: id.clone(),
        version_id: Some(version.to_string()),
        last_updated: Some(last_updated),
        action,
        identity,
    };
    let current_version = match expect {
        // The caller read the resource and changed it: only its version needs checking,
        // which spares parsing and comparing the stored body.
        Some(expect) => {
            let version: Option<i64> = tx
                .prepare_cached("SELECT version FROM resources WHERE type = ?1 AND id = ?2")?
                .query_row(params![t, id], |r| r.get(0))
                .optional()?;
            let expected = match (expect, version) {
                (Expect::Absent, v) => v.is_none(),
                (Expect::Version(e), Some(v)) => e == v,
                (Expect::Version(_), None) => false,
            };
            if !expected {
                return Ok(Err(StoreError::Conflict {
                    reference: format!("{t}/{id}"),
                }));
            }
            version
        }
        None => match read(tx, path, &t, &id) {
            Ok(Some(c)) if content(&c.resource) == content(&resource) => {
                let last = c.resource["meta"]["lastUpdated"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                return Ok(Ok(written(c.version, last, Action::Unchanged)));
            }
            Ok(c) => c.map(|c| c.version),
            Err(e) => return Ok(Err(e)),
        },
    };
    let version = current_version.map_or(1, |v| v + 1);
    let action = if current_version.is_some() {
        Action::Updated
    } else {
        Action::Created
    };
    let last_updated = Timestamp::now().to_string();
    if let Some(m) = resource.as_object_mut() {
        m.insert(
            "meta".to_owned(),
            json!({"versionId": version.to_string(), "lastUpdated": last_updated}),
        );
    }
    let body = resource.to_string();
    tx.prepare_cached(
        "INSERT INTO resources (type, id, version, last_updated, body) VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT (type, id) DO UPDATE SET version = excluded.version, \
         last_updated = excluded.last_updated, body = excluded.body",
    )?
    .execute(params![t, id, version, last_updated, body])?;
    tx.prepare_cached(
        "INSERT INTO history (type, id, version, last_updated, body) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![t, id, version, last_updated, body])?;
    tx.prepare_cached(
        "INSERT INTO changes (type, id, version, last_updated, action, identity) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        t,
        id,
        version,
        last_updated,
        action.name(),
        identity
    ])?;
    Ok(Ok(written(version, last_updated, action)))
}

/// Writes every current resource of the store in `dir` as `{out}/{Type}.ndjson` (the Bulk Data
/// layout), one file per type, each replaced atomically. Returns the number of resources per
/// type. Reads a snapshot, so it may run while another process writes the store.
pub fn export_ndjson(dir: &Path, out: &Path) -> Result<Vec<(String, u64)>, StoreError> {
    let path = dir.join(DATABASE);
    if !path.exists() {
        return Err(StoreError::Database {
            path,
            message: "no store here: nothing was written in embedded mode".into(),
        });
    }
    let io = |e: std::io::Error| StoreError::Database {
        path: out.to_owned(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(out).map_err(io)?;
    let mut conn = connect(&path)?;
    // One read transaction: every file is of the same moment.
    let tx = conn.transaction().map_err(database_error(&path))?;
    let types = counts(&tx, &path)?;
    for (t, _) in &types {
        let file = out.join(format!("{t}.ndjson"));
        let tmp = out.join(format!(".{t}.ndjson.tmp"));
        let mut w = std::io::BufWriter::new(File::create(&tmp).map_err(io)?);
        let mut stmt = tx
            .prepare("SELECT body FROM resources WHERE type = ?1 ORDER BY id")
            .map_err(database_error(&path))?;
        let mut rows = stmt.query([t]).map_err(database_error(&path))?;
        while let Some(row) = rows.next().map_err(database_error(&path))? {
            let body: String = row.get(0).map_err(database_error(&path))?;
            std::io::Write::write_all(&mut w, body.as_bytes()).map_err(io)?;
            std::io::Write::write_all(&mut w, b"\n").map_err(io)?;
        }
        let file_handle = w.into_inner().map_err(|e| io(e.into_error()))?;
        file_handle.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &file).map_err(io)?;
    }
    Ok(types)
}

mod log;

pub use log::{ChangeReader, EVENT_LOG, EventLog};

#[cfg(test)]
mod tests;
