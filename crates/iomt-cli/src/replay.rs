//! `iomt replay`: runs the whole pipeline over captured device traffic
//! ([`iomt_runtime::run::replay`]), with a progress bar and a summary.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use iomt_runtime::Purpose;
use iomt_runtime::run::Resume;
use iomt_runtime::source::files::{FileSource, Speed, expand};

use crate::run::{
    RunArgs, finish_output, prepare, print_summary, report_events, runtime, shutdown_signal,
};

#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// Captured traffic: JSON Lines or Event Hubs Capture Avro files, folders (read
    /// recursively in name order), glob patterns, or `-` for standard input (JSON Lines).
    #[arg(required = true, value_name = "INPUT")]
    inputs: Vec<String>,
    #[command(flatten)]
    pub(crate) run: RunArgs,
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
    /// 64 KiB) instead of read; default: `limits.message_bytes` (1 MiB).
    #[arg(long, value_name = "BYTES")]
    max_line_bytes: Option<usize>,
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
    let inputs = expand(&args.inputs)?;
    let (config, prepared) = match prepare(
        &args.run,
        Purpose::Replay,
        None,
        vec!["replay".to_owned()],
        None,
    )? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let dead_letters = prepared.dead_letters.describe();
    let (metrics, sink) = (prepared.metrics.clone(), prepared.sink.clone());
    let started = Instant::now();
    let bar = progress_bar(args.no_progress);
    let progress = Arc::new(AtomicU64::new(0));
    let resume = Resume::open(&config, &prepared.target, &inputs, args.restart)?;
    let resumed_after = resume.after;
    if resumed_after > 0 {
        eprintln!(
            "resuming an unfinished replay after record {resumed_after} (--restart starts over)"
        );
    }
    let source = FileSource {
        inputs,
        resume_after: 0,
        speed: args.speed,
        max_line_bytes: args
            .max_line_bytes
            .unwrap_or(iomt_core::limits().message_bytes),
        progress: progress.clone(),
    };
    let outcome = runtime()?.block_on(async {
        let ticker = {
            let (bar, metrics, progress) = (bar.clone(), metrics.clone(), progress.clone());
            tokio::spawn(async move {
                loop {
                    let s = metrics.summary();
                    bar.set_position(progress.load(Ordering::Relaxed));
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
        let outcome =
            iomt_runtime::run::replay(&config, prepared, source, resume, shutdown_signal()).await;
        ticker.abort();
        outcome
    });
    bar.finish_and_clear();
    let outcome = outcome?;
    let output = finish_output(&sink)?;
    print_summary(
        args.run.summary,
        &metrics.summary(),
        started,
        &output,
        &dead_letters,
    );
    report_events(outcome.report.events.as_ref());
    if !outcome.complete {
        let after = outcome
            .report
            .positions
            .get(&0)
            .copied()
            .unwrap_or(resumed_after);
        eprintln!(
            "stopped before the end: the output is complete up to record {after}; run the same command again to resume"
        );
        return Ok(130);
    }
    Ok(0)
}
