//! `iomt deadletter replay`: re-submits dead-lettered items once the templates (or the FHIR
//! server's data) are fixed ([`iomt_runtime::source::deadletters`]). Items that fail again are
//! written to a new file, so the input file stays as it was and can be replayed again; a
//! record that cannot be re-submitted at all is reported, and the exit code says so.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use iomt_runtime::Purpose;
use iomt_runtime::source::deadletters::DeadLetterSource;

use crate::OutputFormat;
use crate::run::{
    RunArgs, finish_output, prepare, print_summary, report_events, runtime, shutdown_signal,
};

/// Exit code: some items failed again.
const EXIT_STILL_FAILING: u8 = 1;

#[derive(Debug, Subcommand)]
pub(crate) enum DeadLetterCommand {
    /// Re-submit the records of a dead-letter file through the pipeline, each the way it
    /// entered: an input record is read again, an event normalized, a measurement converted.
    ///
    /// Exit code 0 when every record went through, 1 when some failed again (they are in the
    /// new dead-letter file) or could not be re-submitted, 2 on invalid templates or arguments.
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

pub(crate) fn run(cmd: DeadLetterCommand) -> anyhow::Result<u8> {
    let DeadLetterCommand::Replay(args) = cmd;
    let (source, records, unusable) = DeadLetterSource::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    if !unusable.unreadable_lines.is_empty() {
        eprintln!(
            "warning: {} lines of {} are not dead-letter records (lines {:?}); skipped",
            unusable.unreadable_lines.len(),
            args.file.display(),
            unusable.unreadable_lines
        );
    }
    for reason in &unusable.cannot_resubmit {
        eprintln!("cannot re-submit {reason}");
    }
    let out = args
        .dead_letter_out
        .clone()
        .unwrap_or_else(|| args.file.with_extension("retry.jsonl"));
    anyhow::ensure!(
        out != args.file,
        "the output file must differ from the file being replayed"
    );
    let (config, prepared) = match prepare(
        &args.run,
        Purpose::Replay,
        None,
        vec!["deadletter".to_owned()],
        Some(out.clone()),
    )? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let (metrics, sink) = (prepared.metrics.clone(), prepared.sink.clone());
    let started = Instant::now();
    let report = runtime()?.block_on(iomt_runtime::run::replay_dead_letters(
        &config,
        prepared,
        source,
        shutdown_signal(),
    ))?;
    let summary = metrics.summary();
    let cannot = unusable.cannot_resubmit.len();
    let heading = format!(
        "{records} dead-letter records from {}{}\n",
        args.file.display(),
        if cannot == 0 {
            String::new()
        } else {
            format!(", {cannot} not re-submitted (see above)")
        }
    );
    match args.run.summary {
        OutputFormat::Text => crate::print_out(&heading),
        // Standard output holds the JSON summary alone.
        OutputFormat::Json => eprint!("{heading}"),
    }
    print_summary(
        args.run.summary,
        &summary,
        started,
        &finish_output(&sink)?,
        &out,
    );
    report_events(report.events.as_ref());
    if report.interrupted {
        return Ok(130);
    }
    Ok(if summary.dead_letters.is_empty() && cannot == 0 {
        0
    } else {
        EXIT_STILL_FAILING
    })
}
