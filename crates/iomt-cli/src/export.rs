//! `iomt export`: the embedded store's resources as files (`--ndjson`), or a FHIR Bulk Data
//! export published as change events to the subscriptions (`--from` files, or `--server` for
//! an export the FHIR server runs).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::{ArgGroup, Args};
use iomt_runtime::source::bulk::{BulkInput, ServerExport, append_status, status_event};
use iomt_runtime::{Config, Purpose};

use crate::run::{report_config_errors, report_events, runtime};

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("mode").required(true).args(["ndjson", "from", "server"])))]
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
    /// Start a Bulk Data export on the FHIR server (fhir.url), wait for it, download its
    /// files and publish them like --from: `$export` with `Prefer: respond-async`, its status
    /// polled as the server asks.
    #[arg(long)]
    server: bool,
    /// With --server: `_type`, the resource types to export (comma-separated).
    #[arg(
        long = "type",
        value_name = "TYPE",
        value_delimiter = ',',
        requires = "server"
    )]
    types: Vec<String>,
    /// With --server: `_since`, an instant; only what changed after it, and what was deleted
    /// since (published as deletions).
    #[arg(long, value_name = "INSTANT", requires = "server")]
    since: Option<String>,
    /// With --server: export this Group's patients (`Group/{id}/$export`).
    #[arg(
        long,
        value_name = "ID",
        requires = "server",
        conflicts_with = "patients"
    )]
    group: Option<String>,
    /// With --server: cancel the export on the server, and fail, if it is still in progress
    /// after this long (`0s`: wait as long as the server says it is running).
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = humantime::parse_duration,
        default_value = "24h",
        requires = "server"
    )]
    timeout: std::time::Duration,
    /// With --server: export every patient's compartment (`Patient/$export`).
    #[arg(long, requires = "server")]
    patients: bool,
    /// With --server: where the export's files are downloaded [default:
    /// {state_dir}/exports/{time}].
    #[arg(long, value_name = "DIR", requires = "server")]
    download: Option<PathBuf>,
    /// Append the export's status events (CloudEvents `iomt.bulkexport.started`, `.completed`,
    /// `.failed`) to this JSON Lines file.
    #[arg(long, value_name = "FILE", conflicts_with = "ndjson")]
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
    let state_dir = loaded.as_ref().ok().map(|c| c.output.state_dir.clone());
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
    // Names the export in its status events: the files, or the server's status URL.
    let export = std::cell::RefCell::new(
        args.from
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(","),
    );
    let status = |state: &str, data: serde_json::Value| -> anyhow::Result<()> {
        let Some(file) = &args.status else {
            return Ok(());
        };
        append_status(file, &status_event(&source, &export.borrow(), state, data))
            .with_context(|| format!("cannot write {}", file.display()))
    };
    let started = Instant::now();
    let rt = runtime()?;
    let input = if args.server {
        let iomt_runtime::config::Target::Fhir { client, .. } = &config.target else {
            return Ok(report_config_errors(&[iomt_runtime::config::ConfigError {
                origin: "fhir.url".into(),
                message: "export --server runs the export on this FHIR server, which is not set"
                    .into(),
            }]));
        };
        let request = ServerExport {
            group: args.group.clone(),
            patients: args.patients,
            types: args.types.clone(),
            since: args.since.clone(),
            timeout: Some(args.timeout).filter(|t| !t.is_zero()),
        };
        let dir = args.download.clone().unwrap_or_else(|| {
            let at = iomt_core::Timestamp::now().to_compact_string();
            state_dir.unwrap_or_default().join("exports").join(at)
        });
        let mut status_error = None;
        let fetched = rt.block_on(iomt_runtime::source::bulk::fetch(
            client,
            &request,
            &dir,
            |status_url| {
                *export.borrow_mut() = iomt_core::redact_url(status_url);
                let data = serde_json::json!({"request": request.kickoff(), "download": dir});
                status_error = status("started", data).err();
            },
        ));
        if let Some(e) = status_error {
            return Err(e);
        }
        fetched
    } else {
        status("started", serde_json::json!({"inputs": args.from}))?;
        BulkInput::read(&args.from)
    };
    let input = match input {
        Ok(input) => input,
        Err(e) => {
            status("failed", serde_json::json!({"error": e.to_string()}))?;
            return Err(e.into());
        }
    };
    let metrics = std::sync::Arc::new(iomt_runtime::Metrics::new());
    let outcome = rt.block_on(iomt_runtime::run::export_bulk(
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
