//! Where the pipeline records how far it got, per source partition.
//!
//! A checkpoint is the highest position at or below which every event was written to FHIR or
//! dead-lettered (see [`iomt_core::ack`]). After a crash the source restarts after it, so work
//! is repeated but never skipped; the FHIR writes are idempotent, so repeating them converges
//! on the same state.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::Committed;

/// Why a checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be read or written.
    #[error("checkpoint file {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        error: std::io::Error,
    },
    /// A remote store (Blob storage) refused or failed the write of some partitions'
    /// checkpoints; the others were written.
    #[error("checkpoint store: {}", DisplayFailures(.0))]
    Remote(Vec<PartitionFailure>),
    /// The file is not a checkpoint written by iomt.
    #[error("checkpoint file {path} is not a checkpoint: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl CheckpointError {
    /// Logs a failed commit; the next commit tries again. A partition another process took
    /// over is not an error: it checkpoints that partition now, and the reader here is about
    /// to be disconnected.
    pub(crate) fn log(self) {
        match self {
            CheckpointError::Remote(failures) => {
                for failure in failures {
                    if failure.ownership_lost {
                        tracing::info!(partition = %failure.partition, "partition owned by another process; its checkpoint is left to it");
                    } else {
                        tracing::error!(error = %failure, "cannot commit the checkpoint; retried at the next one");
                    }
                }
            }
            e => {
                tracing::error!(error = %e, "cannot commit the checkpoint; retried at the next one")
            }
        }
    }
}

/// A partition whose checkpoint a remote store did not write.
#[derive(Debug, thiserror::Error)]
#[error("partition {partition}: {error}")]
pub struct PartitionFailure {
    /// The partition.
    pub partition: String,
    /// Whether the store refused it because another process owns the partition now; retrying
    /// cannot help, and the partition's reader is about to be disconnected.
    pub ownership_lost: bool,
    /// The store's error.
    #[source]
    pub error: azure_core::Error,
}

struct DisplayFailures<'a>(&'a [PartitionFailure]);

impl std::fmt::Display for DisplayFailures<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, failure) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{failure}")?;
        }
        Ok(())
    }
}

/// Durable storage of checkpoints.
pub trait CheckpointStore: Send + 'static {
    /// Records the last position done of each partition. Returns once they are durable.
    fn commit(
        &mut self,
        positions: &[Committed],
    ) -> impl Future<Output = Result<(), CheckpointError>> + Send;
}

/// A checkpoint in a local JSON file, for replays and single-machine runs.
///
/// The file names the input it belongs to (a fingerprint), so a checkpoint is never applied to
/// different input, and whether that input was read to the end, so that replaying a finished
/// capture again starts from the beginning rather than doing nothing.
#[derive(Debug)]
pub struct FileCheckpoint {
    path: PathBuf,
    fingerprint: String,
    positions: BTreeMap<u32, i64>,
}

impl FileCheckpoint {
    /// Opens the checkpoint at `path` for the input identified by `fingerprint`, and returns
    /// the positions to resume after: those of an unfinished run over the same input, or none.
    pub fn open(
        path: &Path,
        fingerprint: &str,
    ) -> Result<(Self, BTreeMap<u32, i64>), CheckpointError> {
        let io = |error| CheckpointError::Io {
            path: path.to_owned(),
            error,
        };
        let resume = match std::fs::read(path) {
            Ok(bytes) => {
                let invalid = |message: String| CheckpointError::Invalid {
                    path: path.to_owned(),
                    message,
                };
                let value: Value =
                    serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
                let same_input = value["fingerprint"].as_str() == Some(fingerprint);
                let complete = value["complete"].as_bool().unwrap_or(false);
                let mut positions = BTreeMap::new();
                if same_input && !complete {
                    let Some(map) = value["partitions"].as_object() else {
                        return Err(invalid("no partitions object".into()));
                    };
                    for (k, v) in map {
                        let (Ok(p), Some(pos)) = (k.parse::<u32>(), v.as_i64()) else {
                            return Err(invalid(format!("bad entry {k}: {v}")));
                        };
                        positions.insert(p, pos);
                    }
                }
                positions
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(e)),
        };
        Ok((
            Self {
                path: path.to_owned(),
                fingerprint: fingerprint.to_owned(),
                positions: resume.clone(),
            },
            resume,
        ))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records that the whole input was processed.
    pub fn mark_complete(&mut self) -> Result<(), CheckpointError> {
        self.write(true)
    }

    fn write(&self, complete: bool) -> Result<(), CheckpointError> {
        let partitions: serde_json::Map<String, Value> = self
            .positions
            .iter()
            .map(|(p, pos)| (p.to_string(), json!(pos)))
            .collect();
        let body = json!({
            "fingerprint": self.fingerprint,
            "complete": complete,
            "partitions": partitions,
        });
        write_atomically(&self.path, body.to_string().as_bytes()).map_err(|error| {
            CheckpointError::Io {
                path: self.path.clone(),
                error,
            }
        })
    }
}

impl CheckpointStore for FileCheckpoint {
    async fn commit(&mut self, positions: &[Committed]) -> Result<(), CheckpointError> {
        let mut changed = false;
        for c in positions {
            let entry = self.positions.entry(c.index).or_insert(i64::MIN);
            // A checkpoint never moves back.
            if c.position > *entry {
                *entry = c.position;
                changed = true;
            }
        }
        if changed { self.write(false) } else { Ok(()) }
    }
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content:
/// write a sibling, sync it, rename it over, sync the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    let tmp = dir.join(name);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resumes_only_unfinished_runs_of_the_same_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp/replay.json");
        let (mut cp, resume) = FileCheckpoint::open(&path, "abc").unwrap();
        assert!(resume.is_empty());
        let at = |position| Committed {
            index: 0,
            partition: "replay".into(),
            position,
        };
        cp.commit(&[at(41)]).await.unwrap();
        // Never backwards.
        cp.commit(&[at(7)]).await.unwrap();
        let (_, resume) = FileCheckpoint::open(&path, "abc").unwrap();
        assert_eq!(resume, [(0, 41)].into());
        let (_, other) = FileCheckpoint::open(&path, "other input").unwrap();
        assert!(other.is_empty());
        cp.mark_complete().unwrap();
        let (_, finished) = FileCheckpoint::open(&path, "abc").unwrap();
        assert!(finished.is_empty());
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(
            FileCheckpoint::open(&path, "abc"),
            Err(CheckpointError::Invalid { .. })
        ));
    }
}
