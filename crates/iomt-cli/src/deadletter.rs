//! `iomt deadletter replay`: re-submits dead-lettered items once the templates (or the FHIR
//! server's data) are fixed.
//!
//! Each record re-enters the way it first entered: an input record that could not be read is
//! read again, a device event is normalized again, a measurement is converted again (skipping
//! the device mapping). Items that fail again are written to a new file, so the input file
//! stays as it was and can be replayed again; a record that cannot be re-submitted at all is
//! reported, and the exit code says so.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use iomt_core::Measurement;
use iomt_hub::capture::{Record, jsonl_record};
use iomt_hub::deadletter::{Entry, read_dead_letters};
use iomt_runtime::checkpoint::CheckpointError;
use iomt_runtime::{CheckpointStore, Committed, Input, Origin, SourceItem};
use tokio::sync::mpsc;

use crate::run::{
    RunArgs, finish_output, prepare, print_summary, run_pipeline, runtime, shutdown_signal,
};

/// Exit code: some items failed again.
const EXIT_STILL_FAILING: u8 = 1;

#[derive(Debug, Subcommand)]
pub(crate) enum DeadLetterCommand {
    /// Re-submit the records of a dead-letter file through the pipeline.
    ///
    /// Exit code 0 when every record went through, 1 when some failed again (they are in the
    /// new dead-letter file), 2 on invalid templates or arguments.
    Replay(Box<ReplayArgs>),
}

#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// The dead-letter file (JSON Lines, as the pipeline writes it).
    file: PathBuf,
    #[command(flatten)]
    run: RunArgs,
    /// Where records that fail again go; default: next to FILE, with `.retry.jsonl`.
    #[arg(long, value_name = "FILE")]
    dead_letter_out: Option<PathBuf>,
}

/// A replay of a dead-letter file is short and starts over when interrupted: nothing to store.
#[derive(Debug)]
struct NoCheckpoint;

impl CheckpointStore for NoCheckpoint {
    async fn commit(&mut self, _: &[Committed]) -> Result<(), CheckpointError> {
        Ok(())
    }
}

pub(crate) fn run(cmd: DeadLetterCommand) -> anyhow::Result<u8> {
    let DeadLetterCommand::Replay(args) = cmd;
    let (records, unreadable) = read_dead_letters(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    if !unreadable.is_empty() {
        eprintln!(
            "warning: {} lines of {} are not dead-letter records (lines {:?}); skipped",
            unreadable.len(),
            args.file.display(),
            unreadable
        );
    }
    let out = args
        .dead_letter_out
        .clone()
        .unwrap_or_else(|| args.file.with_extension("retry.jsonl"));
    anyhow::ensure!(
        out != args.file,
        "the output file must differ from the file being replayed"
    );
    let mut items = Vec::with_capacity(records.len());
    let mut cannot = Vec::new();
    for (i, record) in records.iter().enumerate() {
        let input = match record.entry {
            // Read again the way it was read the first time: it may still be unreadable, and
            // is then dead-lettered again.
            Entry::Record => {
                let (file, line) = record.record_position();
                match jsonl_record(&record.payload, &file, line) {
                    Record::Event(e) => Input::Event(e),
                    Record::Bad(b) => Input::Bad(b),
                }
            }
            Entry::Event => Input::Event(record.to_event()),
            Entry::Measurement => match serde_json::from_slice::<Measurement>(&record.payload) {
                Ok(m) => Input::Measurement(Box::new(m)),
                Err(e) => {
                    cannot.push(format!(
                        "record {} ({}): its payload is not a measurement ({e})",
                        i + 1,
                        record.kind
                    ));
                    continue;
                }
            },
        };
        items.push(SourceItem {
            origin: Origin {
                partition: 0,
                position: i as i64 + 1,
            },
            input,
        });
    }
    for reason in &cannot {
        eprintln!("cannot re-submit {reason}");
    }
    let (config, prepared) =
        match prepare(&args.run, vec!["deadletter".to_owned()], Some(out.clone()))? {
            Ok(p) => p,
            Err(code) => return Ok(code),
        };
    let (metrics, sink) = (prepared.metrics.clone(), prepared.sink.clone());
    let started = Instant::now();
    let report = runtime()?.block_on(async {
        let (tx, rx) = mpsc::channel(8);
        let feeder = tokio::spawn(async move {
            for chunk in items.chunks(256) {
                if tx.send(chunk.to_vec()).await.is_err() {
                    return;
                }
            }
        });
        let report =
            run_pipeline(&config, prepared, rx, NoCheckpoint, None, shutdown_signal()).await;
        feeder.abort();
        report
    })?;
    let summary = metrics.summary();
    let heading = format!(
        "{} dead-letter records from {}{}\n",
        records.len(),
        args.file.display(),
        if cannot.is_empty() {
            String::new()
        } else {
            format!(", {} not re-submitted (see above)", cannot.len())
        }
    );
    match args.run.summary {
        crate::OutputFormat::Text => {
            std::io::Write::write_all(&mut std::io::stdout(), heading.as_bytes()).ok();
        }
        // Standard output holds the JSON summary alone.
        crate::OutputFormat::Json => eprint!("{heading}"),
    }
    print_summary(
        args.run.summary,
        &summary,
        started,
        &finish_output(&sink)?,
        &out,
    );
    if report.interrupted {
        return Ok(130);
    }
    Ok(if summary.dead_letters.is_empty() && cannot.is_empty() {
        0
    } else {
        EXIT_STILL_FAILING
    })
}
