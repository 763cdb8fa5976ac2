//! `iomt run`: the pipeline on a live Event Hub, until Ctrl-C or SIGTERM.
//!
//! Partitions of the hub a process reads are claimed through the checkpoint container, so
//! several processes (pods) share them. With `--role all` a process normalizes, groups and
//! converts what it owns, and commits checkpoints only for what its sink has durably written.
//! Scaled out, the stages run as two roles joined by the internal hub, as in MedTech:
//! `normalize` reads the device hub and checkpoints once the internal hub stored the
//! measurements; `convert` reads the internal hub, where all of a device's measurements are on
//! one partition, and checkpoints once they are written to FHIR.

use std::time::Instant;

use clap::Args;
use iomt_runtime::Purpose;
use iomt_runtime::run::RunError;

use crate::run::{
    RoleArg, RunArgs, finish_output, prepare_compiled, print_summary, report_config_errors,
    report_events, runtime, shutdown_signal,
};
use iomt_runtime::config::Role;

#[derive(Debug, Args)]
pub(crate) struct LiveArgs {
    #[command(flatten)]
    run: RunArgs,
    /// This process's name in partition ownership records [default: host name and a random
    /// suffix]; must be unique among the processes sharing the hub.
    #[arg(long, value_name = "ID")]
    owner_id: Option<String>,
    /// Which stages to run [default: pipeline.role, else all].
    #[arg(long, value_enum)]
    role: Option<RoleArg>,
}

fn default_owner_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "iomt".to_owned());
    format!("{host}-{:08x}", fastrand::u32(..))
}

pub(crate) fn run(args: &LiveArgs) -> anyhow::Result<u8> {
    let config = match args.run.compile(Purpose::Run, args.role) {
        Ok(config) => config,
        Err(errors) => return Ok(report_config_errors(&errors)),
    };
    let owner_id = args.owner_id.clone().unwrap_or_else(default_owner_id);
    match config.role {
        Role::Events => return run_events(&config, owner_id),
        Role::Changes => return run_changes(&config),
        Role::All | Role::Normalize | Role::Convert => {}
    }
    let (config, assembled) = match prepare_compiled(config, &args.run, Vec::new(), None)? {
        Ok(prepared) => prepared,
        Err(code) => return Ok(code),
    };
    let (metrics, sink) = (assembled.metrics.clone(), assembled.sink.clone());
    let dead_letters = assembled.dead_letters.describe();
    let started = Instant::now();
    let outcome = runtime()?.block_on(iomt_runtime::run::live(
        &config,
        assembled,
        owner_id,
        shutdown_signal(),
    ));
    let outcome = match ended(outcome)? {
        Ok(o) => o,
        Err(code) => return Ok(code),
    };
    if let Some(reason) = &outcome.source_failed {
        eprintln!("error: the Event Hub source failed: {reason}");
    }
    let output = match config.live.as_ref().and_then(|l| l.internal_hub.as_ref()) {
        Some(hub) => format!("internal hub {}", hub.hub),
        None => finish_output(&sink)?,
    };
    print_summary(
        args.run.summary,
        &metrics.summary(),
        started,
        &output,
        &dead_letters,
    );
    report_events(outcome.report.events.as_ref());
    Ok(if outcome.source_failed.is_some() {
        1
    } else if outcome.report.abandoned {
        130
    } else {
        0
    })
}

/// `iomt run --role events`: delivers change events from the event log hub until Ctrl-C or
/// SIGTERM.
fn run_events(config: &iomt_runtime::Compiled, owner_id: String) -> anyhow::Result<u8> {
    let metrics = std::sync::Arc::new(iomt_runtime::Metrics::new());
    let started = Instant::now();
    let outcome = runtime()?.block_on(iomt_runtime::run::events_role(
        config,
        owner_id,
        metrics.clone(),
        shutdown_signal(),
    ));
    let outcome = match ended(outcome)? {
        Ok(o) => o,
        Err(code) => return Ok(code),
    };
    if let Some(reason) = &outcome.source_failed {
        eprintln!("error: reading the event log failed: {reason}");
    }
    let summary = metrics.summary();
    crate::outln!(
        "change events {} delivered, {} dead-lettered in {:.1} s",
        summary.events_delivered,
        summary.events_dead_lettered,
        started.elapsed().as_secs_f64()
    );
    report_events(Some(&outcome.report));
    Ok(if outcome.source_failed.is_some() {
        1
    } else {
        0
    })
}

/// `iomt run --role changes`: reads the FHIR server's history into the event log until Ctrl-C
/// or SIGTERM.
fn run_changes(config: &iomt_runtime::Compiled) -> anyhow::Result<u8> {
    let metrics = std::sync::Arc::new(iomt_runtime::Metrics::new());
    let started = Instant::now();
    let outcome = runtime()?.block_on(iomt_runtime::run::changes_role(
        config,
        metrics.clone(),
        shutdown_signal(),
    ));
    let outcome = match ended(outcome)? {
        Ok(o) => o,
        Err(code) => return Ok(code),
    };
    let summary = metrics.summary();
    crate::outln!(
        "changes {} read in {} cycles ({} late arrivals), watermark {}; change events {} delivered, {} dead-lettered in {:.1} s",
        outcome.feed.changes,
        outcome.feed.cycles,
        outcome.feed.late_arrivals,
        outcome.feed.watermark.as_deref().unwrap_or("none"),
        summary.events_delivered,
        summary.events_dead_lettered,
        started.elapsed().as_secs_f64()
    );
    report_events(outcome.events.as_ref());
    Ok(0)
}

/// A run's outcome; `Err(code)` after printing a configuration problem it found (2), or a
/// dependency it was stopped waiting for (1).
fn ended<T>(outcome: Result<T, RunError>) -> anyhow::Result<Result<T, u8>> {
    match outcome {
        Ok(o) => Ok(Ok(o)),
        Err(RunError::Config(e)) => Ok(Err(report_config_errors(&[e]))),
        // Stopped while a dependency was out of reach: not a configuration problem.
        Err(e @ RunError::Stopped { .. }) => {
            eprintln!("error: {e}");
            Ok(Err(1))
        }
        Err(e) => Err(e.into()),
    }
}
