//! `iomt deadletter replay`: re-submits dead-lettered items once the templates (or the FHIR
//! server's data) are fixed ([`iomt_runtime::source::deadletters`]), from a file or, in
//! cluster mode, from the configured Blob container. Items that fail again are written to a
//! new file, so the input stays as it was and can be replayed again; a record that cannot be
//! re-submitted at all is reported, and the exit code says so. `iomt deadletter export` copies
//! a container's records into one file.

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
    /// Copy the records of the configured dead-letter container (`[dead_letters]`, cluster
    /// mode) into one JSON Lines file, each item once, oldest first.
    Export(ExportArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// The dead-letter file (JSON Lines, as the pipeline writes it).
    #[arg(required_unless_present = "blob", conflicts_with = "blob")]
    file: Option<PathBuf>,
    /// Replay the records of the configured dead-letter container (`[dead_letters]`) instead
    /// of a file.
    #[arg(long)]
    blob: bool,
    #[command(flatten)]
    run: RunArgs,
    /// Where records that fail again go; default: next to FILE, with `.retry.jsonl` (with
    /// `--blob`: `deadletter.retry.jsonl` in the state directory).
    #[arg(long, value_name = "FILE")]
    dead_letter_out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    /// The file to write.
    #[arg(long, short, value_name = "FILE")]
    out: PathBuf,
    /// A configuration file naming the container (`[dead_letters]`, `[checkpoints]`).
    #[arg(long, short, value_name = "FILE", env = "IOMT_CONFIG")]
    config: Option<PathBuf>,
}

/// The configured dead-letter container.
fn container(
    config: Option<&std::path::Path>,
) -> anyhow::Result<Result<iomt_runtime::pipeline::BlobContainer, u8>> {
    let loaded = iomt_runtime::Config::load(config, std::env::vars())
        .and_then(|c| c.dead_letter_container().map_err(|e| vec![e]));
    Ok(loaded.map_err(|errors| crate::run::report_config_errors(&errors)))
}

pub(crate) fn run(cmd: DeadLetterCommand) -> anyhow::Result<u8> {
    match cmd {
        DeadLetterCommand::Replay(args) => replay(*args),
        DeadLetterCommand::Export(args) => export(&args),
    }
}

fn export(args: &ExportArgs) -> anyhow::Result<u8> {
    let container = match container(args.config.as_deref())? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let (records, unreadable) = runtime()?
        .block_on(iomt_runtime::pipeline::read_blob_dead_letters(&container))
        .with_context(|| format!("cannot read the container {}", container.url()))?;
    let mut text = String::new();
    for r in &records {
        text.push_str(&r.to_json().to_string());
        text.push('\n');
    }
    std::fs::write(&args.out, text)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    if !unreadable.is_empty() {
        eprintln!(
            "warning: {} lines are not dead-letter records ({}); skipped",
            unreadable.len(),
            unreadable.join(", ")
        );
    }
    crate::outln!(
        "{} dead-letter records from {} -> {}",
        records.len(),
        container.url(),
        args.out.display()
    );
    Ok(0)
}

fn replay(args: ReplayArgs) -> anyhow::Result<u8> {
    let (source, records, unusable, from, out) = match &args.file {
        Some(file) => {
            let (source, records, unusable) = DeadLetterSource::read(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let out = args
                .dead_letter_out
                .clone()
                .unwrap_or_else(|| file.with_extension("retry.jsonl"));
            anyhow::ensure!(
                &out != file,
                "the output file must differ from the file being replayed"
            );
            (source, records, unusable, file.display().to_string(), out)
        }
        None => {
            let config = match args.run.load() {
                Ok(c) => c,
                Err(errors) => return Ok(crate::run::report_config_errors(&errors)),
            };
            let container = match container(args.run.config.as_deref())? {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let (source, records, unusable) = runtime()?
                .block_on(DeadLetterSource::read_blob(&container))
                .with_context(|| format!("cannot read the container {}", container.url()))?;
            let out = args
                .dead_letter_out
                .clone()
                .unwrap_or_else(|| config.output.state_dir.join("deadletter.retry.jsonl"));
            (source, records, unusable, container.url().to_string(), out)
        }
    };
    if !unusable.unreadable.is_empty() {
        eprintln!(
            "warning: {} lines of {from} are not dead-letter records ({}); skipped",
            unusable.unreadable.len(),
            unusable.unreadable.join(", ")
        );
    }
    for reason in &unusable.cannot_resubmit {
        eprintln!("cannot re-submit {reason}");
    }
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
        "{records} dead-letter records from {from}{}\n",
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
        &out.display().to_string(),
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
