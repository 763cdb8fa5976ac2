//! Captured traffic as a source: JSON Lines and Event Hubs Capture Avro files, folders, glob
//! patterns, and standard input.
//!
//! The input is read on a blocking thread (file reads and Avro decoding block) and handed to
//! the pipeline in batches through a bounded channel, so a slow output slows the reader instead
//! of filling memory. Every record gets its ordinal in the whole input as its position, in one
//! partition (`replay`); a checkpoint file records how far the output is durable, and a run of
//! the same input resumes after it.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use iomt_core::Timestamp;
use iomt_files::capture::{CaptureError, JsonLines, Record, read_capture_avro, read_jsonl};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use super::{Input, Origin, Source, SourceItem};

/// Records per batch handed to the pipeline.
const BATCH: usize = 256;

/// Why captured traffic could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// A file or folder could not be read.
    #[error("cannot read {path}: {error}")]
    Io {
        /// What was being read.
        path: String,
        /// The cause.
        error: std::io::Error,
    },
    /// An argument names nothing to read.
    #[error("{0}")]
    Nothing(String),
    /// A file is not a capture in a format this reads.
    #[error(transparent)]
    Capture(#[from] CaptureError),
}

/// One input of a replay.
#[derive(Debug, Clone, PartialEq)]
pub enum CaptureInput {
    /// Standard input (JSON Lines).
    Stdin,
    /// A JSON Lines or Capture Avro file, told apart by content.
    File(PathBuf),
}

impl CaptureInput {
    fn name(&self) -> String {
        match self {
            CaptureInput::Stdin => "stdin".to_owned(),
            CaptureInput::File(p) => p.display().to_string(),
        }
    }
}

/// How fast records are handed over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// As fast as the pipeline goes.
    Max,
    /// Real time from the enqueued times, multiplied by this factor.
    Factor(f64),
}

impl FromStr for Speed {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("max") {
            return Ok(Speed::Max);
        }
        match s.trim_end_matches(['x', 'X']).parse::<f64>() {
            Ok(f) if f > 0.0 && f.is_finite() => Ok(Speed::Factor(f)),
            _ => Err(format!(
                "expected `max` or a positive factor of real time such as 1 or 10, got `{s}`"
            )),
        }
    }
}

fn is_capture_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| {
        ["jsonl", "ndjson", "json", "avro"]
            .iter()
            .any(|x| e.eq_ignore_ascii_case(x))
    })
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, out)?;
        } else if is_capture_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Expands command-line arguments into inputs, in order: `-` is standard input, a folder is
/// read recursively in name order, anything else is a file or a glob pattern.
pub fn expand(arguments: &[String]) -> Result<Vec<CaptureInput>, FilesError> {
    let mut inputs = Vec::new();
    for argument in arguments {
        if argument == "-" {
            inputs.push(CaptureInput::Stdin);
            continue;
        }
        let path = Path::new(argument);
        if path.is_dir() {
            let mut files = Vec::new();
            walk(path, &mut files).map_err(|error| FilesError::Io {
                path: argument.clone(),
                error,
            })?;
            if files.is_empty() {
                return Err(FilesError::Nothing(format!(
                    "the folder {argument} holds no .jsonl, .json or .avro files"
                )));
            }
            inputs.extend(files.into_iter().map(CaptureInput::File));
        } else if path.exists() {
            inputs.push(CaptureInput::File(path.to_owned()));
        } else {
            let pattern = glob::glob(argument).map_err(|_| {
                FilesError::Nothing(format!(
                    "{argument} is neither a file nor a valid glob pattern"
                ))
            })?;
            let mut matched: Vec<PathBuf> = pattern
                .filter_map(Result::ok)
                .filter(|p| p.is_file())
                .collect();
            matched.sort();
            if matched.is_empty() {
                return Err(FilesError::Nothing(format!("no file matches {argument}")));
            }
            inputs.extend(matched.into_iter().map(CaptureInput::File));
        }
    }
    Ok(inputs)
}

/// Identifies the input and the destination (file names and sizes, and where output goes), so
/// that a checkpoint is resumed only by a run of the same input into the same output.
pub fn fingerprint(inputs: &[CaptureInput], target: &str) -> Result<String, FilesError> {
    let mut hash = Sha256::new();
    for input in inputs {
        if let CaptureInput::File(path) = input {
            let size = std::fs::metadata(path)
                .map_err(|error| FilesError::Io {
                    path: path.display().to_string(),
                    error,
                })?
                .len();
            hash.update(format!("{}\0{size}\0", path.display()));
        }
    }
    hash.update(target);
    Ok(format!("{:x}", hash.finalize()))
}

/// Paces events to their enqueued times, scaled.
struct Pacer {
    factor: f64,
    first: Option<(Timestamp, Instant)>,
}

impl Pacer {
    /// How long to wait before handing over an event enqueued at `t`.
    fn delay(&mut self, t: Option<Timestamp>) -> Option<Duration> {
        let t = t?;
        let (t0, start) = *self.first.get_or_insert((t, Instant::now()));
        let ticks = (t.unix_ticks() - t0.unix_ticks()).max(0) as f64 / self.factor;
        let due = start + Duration::from_nanos((ticks * 100.0) as u64);
        due.checked_duration_since(Instant::now())
    }
}

/// The records of one input.
enum Records<'a> {
    Lines(JsonLines<BufReader<Box<dyn Read + Send>>>),
    Avro(Box<dyn Iterator<Item = Result<Record, CaptureError>> + 'a>),
}

impl Records<'_> {
    fn next(&mut self) -> Option<Result<Record, CaptureError>> {
        match self {
            Records::Lines(l) => l.next(),
            Records::Avro(a) => a.next(),
        }
    }

    /// Whether the next record is already read from the source (a file's records are read
    /// ahead in large blocks; Avro blocks decode whole).
    fn has_buffered(&self) -> bool {
        match self {
            Records::Lines(l) => l.has_buffered(),
            Records::Avro(_) => true,
        }
    }
}

/// Captured traffic to read.
#[derive(Debug, Clone)]
pub struct FileSource {
    /// What to read, in order.
    pub inputs: Vec<CaptureInput>,
    /// Records at or below this ordinal were done by an earlier run and are skipped.
    pub resume_after: i64,
    /// How fast.
    pub speed: Speed,
    /// JSON Lines records longer than this are dead-lettered instead of read.
    pub max_line_bytes: usize,
    /// Records read so far, for a progress display.
    pub progress: Arc<AtomicU64>,
}

impl Source for FileSource {
    type Error = FilesError;

    async fn run(
        self,
        tx: mpsc::Sender<Vec<SourceItem>>,
        _stop: watch::Receiver<bool>,
    ) -> Result<bool, FilesError> {
        // The pipeline stops taking records when it stops: the send fails, and reading ends.
        tokio::task::spawn_blocking(move || self.read_all(&tx))
            .await
            .unwrap_or_else(|e| {
                Err(FilesError::Io {
                    path: "the input".to_owned(),
                    error: std::io::Error::other(e.to_string()),
                })
            })
    }
}

impl FileSource {
    /// Reads every input in order. Returns whether the end was reached (false when the
    /// pipeline stopped taking records).
    fn read_all(&self, tx: &mpsc::Sender<Vec<SourceItem>>) -> Result<bool, FilesError> {
        let mut ordinal: i64 = 0;
        let mut batch = Vec::with_capacity(BATCH);
        let mut pacer = match self.speed {
            Speed::Max => None,
            Speed::Factor(factor) => Some(Pacer {
                factor,
                first: None,
            }),
        };
        let send = |batch: &mut Vec<SourceItem>| -> bool {
            if batch.is_empty() {
                return true;
            }
            tx.blocking_send(std::mem::replace(batch, Vec::with_capacity(BATCH)))
                .is_ok()
        };
        for input in &self.inputs {
            let name = input.name();
            let io = |error| FilesError::Io {
                path: name.clone(),
                error,
            };
            let raw: Box<dyn Read + Send> = match input {
                CaptureInput::Stdin => Box::new(std::io::stdin()),
                CaptureInput::File(p) => Box::new(File::open(p).map_err(io)?),
            };
            let mut reader = BufReader::with_capacity(1 << 20, raw);
            let is_avro = reader.fill_buf().map_err(io)?.starts_with(b"Obj\x01");
            let mut records = if is_avro {
                Records::Avro(Box::new(read_capture_avro(reader, &name, "0")?))
            } else {
                Records::Lines(read_jsonl(reader, &name, self.max_line_bytes))
            };
            while let Some(record) = records.next() {
                let record = record?;
                ordinal += 1;
                self.progress.fetch_add(1, Ordering::Relaxed);
                if ordinal <= self.resume_after {
                    continue;
                }
                let input = match record {
                    Record::Event(e) => {
                        if let Some(delay) =
                            pacer.as_mut().and_then(|p| p.delay(e.event.enqueued_time))
                        {
                            if !send(&mut batch) {
                                return Ok(false);
                            }
                            std::thread::sleep(delay);
                        }
                        Input::Event(e)
                    }
                    Record::Bad(b) => Input::Bad(b),
                };
                batch.push(SourceItem {
                    origin: Origin {
                        partition: 0,
                        position: ordinal,
                    },
                    input,
                });
                // A full batch goes at once; a partial one when the reader would have to wait
                // for more input (a slow producer on standard input), so records are not held
                // back.
                if (batch.len() >= BATCH || !records.has_buffered()) && !send(&mut batch) {
                    return Ok(false);
                }
            }
        }
        Ok(send(&mut batch))
    }
}
