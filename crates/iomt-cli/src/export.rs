//! `iomt export`: the embedded store's resources as files (`--ndjson`), or a FHIR Bulk Data
//! export published as change events to the subscriptions (`--from`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::{ArgGroup, Args};
use iomt_runtime::source::bulk::{BulkInput, append_status, status_event};
use iomt_runtime::{Config, Purpose};

use crate::run::{report_config_errors, report_events, runtime};

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("mode").required(true).args(["ndjson", "from"])))]
pub(crate) struct ExportArgs {
    /// Write the embedded store as `{Type}.ndjson` files (FHIR Bulk Data layout) into this
    /// directory.
    #[arg(long, value_name = "DIR")]
    ndjson: Option<PathBuf>,
    /// The store to export with --ndjson: an output directory of embedded runs [default:
    /// output.dir of the configuration, else iomt-out].
    #[arg(long, value_name = "DIR", requires = "ndjson")]
    out: Option<PathBuf>,
    /// Publish a FHIR Bulk Data export as change events: its NDJSON files, or folders of them
    /// (with the export's manifest.json, whose `deleted` files become delete events). Each
    /// resource's current version becomes an event, appended to the event log and delivered to
    /// the configured subscriptions (full-resource payloads read `fhir.url`).
    #[arg(long, value_name = "PATH", num_args = 1..)]
    from: Vec<PathBuf>,
    /// Append the export's status events (CloudEvents `iomt.bulkexport.started`, `.completed`,
    /// `.failed`) to this JSON Lines file.
    #[arg(long, value_name = "FILE", requires = "from")]
    status: Option<PathBuf>,
    /// Configuration file (TOML).
    #[arg(long, env = "IOMT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

pub(crate) fn run(args: &ExportArgs) -> anyhow::Result<u8> {
    match &args.ndjson {
        Some(dir) => to_files(args, dir),
        None => publish(args),
    }
}

fn to_files(args: &ExportArgs, ndjson: &std::path::Path) -> anyhow::Result<u8> {
    let store = match &args.out {
        Some(dir) => dir.clone(),
        None => match Config::load(args.config.as_deref(), std::env::vars()) {
            Ok(c) => c.output.dir,
            Err(errors) => return Ok(report_config_errors(&errors)),
        },
    };
    let counts = iomt_store::export_ndjson(&store, ndjson)
        .with_context(|| format!("cannot export the store in {}", store.display()))?;
    for (resource_type, n) in counts {
        crate::outln!(
            "{resource_type:<20} {n:>10}  {}",
            ndjson.join(format!("{resource_type}.ndjson")).display()
        );
    }
    Ok(0)
}

fn publish(args: &ExportArgs) -> anyhow::Result<u8> {
    let loaded = Config::load(args.config.as_deref(), std::env::vars());
    let compiled = loaded.and_then(|c| {
        iomt_core::set_limits(c.limits);
        c.compile(Purpose::Export)
    });
    let config = match compiled {
        Ok(c) => c,
        Err(errors) => return Ok(report_config_errors(&errors)),
    };
    let source = config
        .events
        .as_ref()
        .map_or_else(|| "iomt".to_owned(), |e| e.publisher.source.clone());
    let export = args
        .from
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let status = |state: &str, data: serde_json::Value| -> anyhow::Result<()> {
        let Some(file) = &args.status else {
            return Ok(());
        };
        append_status(file, &status_event(&source, &export, state, data))
            .with_context(|| format!("cannot write {}", file.display()))
    };
    status("started", serde_json::json!({"inputs": args.from}))?;
    let started = Instant::now();
    let input = match BulkInput::read(&args.from) {
        Ok(input) => input,
        Err(e) => {
            status("failed", serde_json::json!({"error": e.to_string()}))?;
            return Err(e.into());
        }
    };
    let metrics = std::sync::Arc::new(iomt_runtime::Metrics::new());
    let outcome = runtime()?.block_on(iomt_runtime::run::export_bulk(
        &config,
        &input,
        metrics.clone(),
    ));
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            status("failed", serde_json::json!({"error": e.to_string()}))?;
            return match e {
                iomt_runtime::run::RunError::Config(e) => Ok(report_config_errors(&[e])),
                e => Err(e.into()),
            };
        }
    };
    let total: u64 = outcome.bulk.changes.values().sum();
    status(
        "completed",
        serde_json::json!({"changes": outcome.bulk.changes, "deletions": outcome.bulk.deletions,
            "skipped": outcome.bulk.skipped_total}),
    )?;
    for line in &outcome.bulk.skipped {
        eprintln!("skipped {line}");
    }
    let summary = metrics.summary();
    crate::outln!(
        "exported {total} changes ({} deletions, {} lines skipped) in {:.1} s; change events {} delivered, {} dead-lettered",
        outcome.bulk.deletions,
        outcome.bulk.skipped_total,
        started.elapsed().as_secs_f64(),
        summary.events_delivered,
        summary.events_dead_lettered
    );
    for (resource_type, n) in &outcome.bulk.changes {
        crate::outln!("  {resource_type:<20} {n:>10}");
    }
    report_events(outcome.events.as_ref());
    Ok(if outcome.bulk.skipped_total > 0 { 1 } else { 0 })
}
