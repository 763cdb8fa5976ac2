//! `iomt replay`: runs the whole pipeline over captured device traffic.
//!
//! The input is read on its own thread (file reads and Avro decoding block) and handed to the
//! pipeline in batches through a bounded channel, so a slow FHIR server slows the reader
//! instead of filling memory. Each record gets its ordinal in the whole input as its position;
//! the checkpoint file records how far the output is durable, and a killed replay of the same
//! input resumes after it.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use iomt_core::Timestamp;
use iomt_hub::capture::{CaptureError, JsonLines, Record, read_capture_avro, read_jsonl};
use iomt_runtime::{FileCheckpoint, Input, Origin, SourceItem};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::run::{
    RunArgs, finish_output, prepare, print_summary, run_pipeline, runtime, shutdown_signal,
};

/// Records per batch handed to the pipeline.
const BATCH: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Speed {
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

#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// Captured traffic: JSON Lines or Event Hubs Capture Avro files, folders (read
    /// recursively in name order), glob patterns, or `-` for standard input (JSON Lines).
    #[arg(required = true, value_name = "INPUT")]
    inputs: Vec<String>,
    #[command(flatten)]
    run: RunArgs,
    /// `max`, or a factor of real time from the events' enqueued times (1 = as recorded).
    #[arg(long, default_value = "max")]
    speed: Speed,
    /// Start from the beginning even when an unfinished replay of the same input left a
    /// checkpoint.
    #[arg(long)]
    restart: bool,
    /// Do not show the progress bar.
    #[arg(long)]
    no_progress: bool,
    /// JSON Lines records longer than this many bytes are dead-lettered (keeping their first
    /// 64 KiB) instead of read.
    #[arg(long, value_name = "BYTES", default_value_t = iomt_hub::capture::MAX_LINE_BYTES)]
    max_line_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Source {
    Stdin,
    File(PathBuf),
}

impl Source {
    fn name(&self) -> String {
        match self {
            Source::Stdin => "stdin".to_owned(),
            Source::File(p) => p.display().to_string(),
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

/// Expands the command line into sources, in order.
fn expand(inputs: &[String]) -> anyhow::Result<Vec<Source>> {
    let mut sources = Vec::new();
    for input in inputs {
        if input == "-" {
            sources.push(Source::Stdin);
            continue;
        }
        let path = Path::new(input);
        if path.is_dir() {
            let mut files = Vec::new();
            walk(path, &mut files).with_context(|| format!("cannot read the folder {input}"))?;
            if files.is_empty() {
                anyhow::bail!("the folder {input} holds no .jsonl, .json or .avro files");
            }
            sources.extend(files.into_iter().map(Source::File));
        } else if path.exists() {
            sources.push(Source::File(path.to_owned()));
        } else {
            let mut matched: Vec<PathBuf> = glob::glob(input)
                .with_context(|| format!("{input} is neither a file nor a valid glob pattern"))?
                .filter_map(Result::ok)
                .filter(|p| p.is_file())
                .collect();
            matched.sort();
            if matched.is_empty() {
                anyhow::bail!("no file matches {input}");
            }
            sources.extend(matched.into_iter().map(Source::File));
        }
    }
    Ok(sources)
}

/// Identifies the input and the destination: file names and sizes, and where output goes.
fn fingerprint(sources: &[Source], target: &str) -> anyhow::Result<String> {
    let mut hash = Sha256::new();
    for source in sources {
        if let Source::File(path) = source {
            let size = std::fs::metadata(path)?.len();
            hash.update(format!("{}\0{size}\0", path.display()));
        }
    }
    hash.update(target);
    Ok(format!("{:x}", hash.finalize()))
}

fn is_avro(reader: &mut BufReader<Box<dyn Read + Send>>) -> std::io::Result<bool> {
    Ok(reader.fill_buf()?.starts_with(b"Obj\x01"))
}

/// Counters the reader shares with the progress bar.
#[derive(Debug, Default)]
struct ReadProgress {
    records: AtomicU64,
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

/// Reads every source in order, skipping records at or below `resume_after`. Returns whether
/// the end of the input was reached (false when the pipeline stopped taking records).
fn read_all(
    sources: &[Source],
    resume_after: i64,
    (speed, max_line_bytes): (Speed, usize),
    tx: &mpsc::Sender<Vec<SourceItem>>,
    progress: &ReadProgress,
) -> anyhow::Result<bool> {
    let mut ordinal: i64 = 0;
    let mut batch = Vec::with_capacity(BATCH);
    let mut pacer = match speed {
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
    for source in sources {
        let name = source.name();
        let raw: Box<dyn Read + Send> = match source {
            Source::Stdin => Box::new(std::io::stdin()),
            Source::File(p) => {
                Box::new(File::open(p).with_context(|| format!("cannot open {name}"))?)
            }
        };
        let mut reader = BufReader::with_capacity(1 << 20, raw);
        let mut records = if is_avro(&mut reader)? {
            Records::Avro(Box::new(read_capture_avro(reader, &name, "0")?))
        } else {
            Records::Lines(read_jsonl(reader, &name, max_line_bytes))
        };
        while let Some(record) = records.next() {
            let record = record?;
            ordinal += 1;
            progress.records.fetch_add(1, Ordering::Relaxed);
            if ordinal <= resume_after {
                continue;
            }
            let input = match record {
                Record::Event(e) => {
                    if let Some(delay) = pacer.as_mut().and_then(|p| p.delay(e.event.enqueued_time))
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
            // A full batch goes at once; a partial one when the reader would have to wait for
            // more input (a slow producer on standard input), so records are not held back.
            if (batch.len() >= BATCH || !records.has_buffered()) && !send(&mut batch) {
                return Ok(false);
            }
        }
    }
    Ok(send(&mut batch))
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

fn progress_bar(hidden: bool) -> indicatif::ProgressBar {
    let bar = if hidden {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {elapsed_precise} {human_pos} events read, {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar
}

pub(crate) fn run(args: &ReplayArgs) -> anyhow::Result<u8> {
    let sources = expand(&args.inputs)?;
    let (config, prepared) = match prepare(&args.run, vec!["replay".to_owned()], None)? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let dead_letter_file = prepared.dead_letter_file.clone();
    let resumable = !sources.contains(&Source::Stdin);
    let checkpoint_file = config.output.state_dir.join("replay-checkpoint.json");
    let fingerprint = if resumable {
        fingerprint(&sources, &prepared.target)?
    } else {
        "stdin".to_owned()
    };
    let (checkpoint, resume) = FileCheckpoint::open(&checkpoint_file, &fingerprint)?;
    let resume_after = match resume.get(&0) {
        Some(p) if resumable && !args.restart => *p,
        _ => 0,
    };
    if resume_after > 0 {
        eprintln!(
            "resuming an unfinished replay after record {resume_after} (--restart starts over)"
        );
    }
    let metrics = prepared.metrics.clone();
    let sink = prepared.sink.clone();
    let started = Instant::now();
    let bar = progress_bar(args.no_progress);
    let progress = Arc::new(ReadProgress::default());
    let rt = runtime()?;
    let (reached_end, report) = rt.block_on(async {
        let (tx, rx) = mpsc::channel(8);
        let reader = {
            let (sources, progress) = (sources.clone(), progress.clone());
            let pace = (args.speed, args.max_line_bytes);
            tokio::task::spawn_blocking(move || {
                read_all(&sources, resume_after, pace, &tx, &progress)
            })
        };
        let ticker = {
            let (bar, metrics, progress) = (bar.clone(), metrics.clone(), progress.clone());
            tokio::spawn(async move {
                loop {
                    let s = metrics.summary();
                    bar.set_position(progress.records.load(Ordering::Relaxed));
                    let rate = s.events as f64 / started.elapsed().as_secs_f64().max(0.001);
                    bar.set_message(format!(
                        "{:.0} events/s, {} measurements written, {} dead-lettered",
                        rate,
                        s.written_measurements,
                        s.dead_letters.values().sum::<u64>()
                    ));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        };
        let report = run_pipeline(&config, prepared, rx, checkpoint, None, shutdown_signal()).await;
        ticker.abort();
        let report = match report {
            Ok(r) => r,
            Err(e) => return (Err(e), None),
        };
        let reached_end = match reader.await {
            Ok(Ok(end)) => Ok(end),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(anyhow::anyhow!("the reader failed: {e}")),
        };
        (reached_end, Some(report))
    });
    bar.finish_and_clear();
    let reached_end = reached_end?;
    let Some(report) = report else {
        anyhow::bail!("the pipeline did not start");
    };
    let mut checkpoint = report.checkpoints;
    let complete = reached_end && !report.interrupted && report.in_flight == 0;
    if complete && resumable {
        checkpoint.mark_complete()?;
    }
    let output = finish_output(&sink)?;
    print_summary(
        args.run.summary,
        &metrics.summary(),
        started,
        &output,
        &dead_letter_file,
    );
    if !complete {
        let after = report.positions.get(&0).copied().unwrap_or(resume_after);
        eprintln!(
            "stopped before the end: the output is complete up to record {after}; run the same command again to resume"
        );
        return Ok(130);
    }
    Ok(0)
}
