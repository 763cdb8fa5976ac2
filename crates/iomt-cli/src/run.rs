//! What every command that runs the pipeline shares: templates, the sink, the dead-letter
//! file, tuning, and the summary printed at the end.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use iomt_fhir::{
    Auth, FhirClient, FhirClientConfig, IdentityConfig, IdentityMode, IdentityResolver,
    NdjsonStore, ObservationWriter,
};
use iomt_group::GroupConfig;
use iomt_hub::deadletter::DeadLetterWriter;
use iomt_normalize::Normalizer;
use iomt_runtime::{
    CheckpointStore, FhirSink, Metrics, NdjsonSink, Pipeline, PipelineConfig, Report, Sink,
    SourceItem, Summary, in_process,
};
use tokio::sync::mpsc;

use crate::OutputFormat;
use crate::mapping::load_or_report;
use crate::style::Palette;

/// How devices and patients are resolved on a FHIR server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum IdentityModeArg {
    /// The Device must exist and name its Patient (MedTech's default).
    Lookup,
    /// As lookup, and every measurement must name an existing Encounter.
    LookupWithEncounter,
    /// Create missing Patients and Devices with deterministic ids.
    Create,
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The device mapping (a CollectionContent document).
    #[arg(long, value_name = "FILE")]
    pub(crate) device_mapping: PathBuf,
    /// The FHIR mapping (a CollectionFhir document).
    #[arg(long, value_name = "FILE")]
    pub(crate) fhir_mapping: PathBuf,
    /// FHIR server base URL. Without it the output goes to the --out directory.
    #[arg(long, env = "IOMT_FHIR_URL", value_name = "URL")]
    pub(crate) fhir_url: Option<String>,
    /// Bearer token for the FHIR server.
    #[arg(
        long,
        env = "IOMT_FHIR_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub(crate) fhir_token: Option<String>,
    /// How devices and patients are resolved on the FHIR server.
    #[arg(long, value_enum, default_value_t = IdentityModeArg::Lookup)]
    pub(crate) identity_mode: IdentityModeArg,
    /// System of Device identifiers.
    #[arg(long, value_name = "URI")]
    pub(crate) device_identifier_system: Option<String>,
    /// Output directory for FHIR NDJSON (Bulk Data layout) when no FHIR URL is given.
    #[arg(long, default_value = "iomt-out", value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// Where the dead-letter file and checkpoints are kept.
    #[arg(long, default_value = ".iomt", value_name = "DIR")]
    pub(crate) state_dir: PathBuf,
    /// Flush a group buffer when it holds this many measurements.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub(crate) max_events: usize,
    /// Flush a group buffer when it has been open this long (100ms at least).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub(crate) max_wait: Duration,
    /// On Ctrl-C or SIGTERM, how long in-flight work may take to finish.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub(crate) drain_deadline: Duration,
    /// How often the checkpoint is committed.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub(crate) checkpoint_interval: Duration,
    /// Serve /metrics (Prometheus), /healthz and /readyz on this address, e.g. 127.0.0.1:9090.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
}

/// The sink of a run, chosen by the arguments.
#[derive(Debug)]
pub(crate) enum AnySink {
    Fhir(Box<FhirSink>),
    Ndjson(NdjsonSink),
}

impl Sink for AnySink {
    async fn write(
        &self,
        group: &iomt_core::MeasurementGroup,
    ) -> Result<iomt_runtime::sink::Written, iomt_runtime::SinkError> {
        match self {
            AnySink::Fhir(s) => s.write(group).await,
            AnySink::Ndjson(s) => s.write(group).await,
        }
    }

    async fn persist(&self) -> Result<(), iomt_runtime::SinkError> {
        match self {
            AnySink::Fhir(s) => s.persist().await,
            AnySink::Ndjson(s) => s.persist().await,
        }
    }

    fn describe(&self) -> String {
        match self {
            AnySink::Fhir(s) => s.describe(),
            AnySink::Ndjson(s) => {
                let counts = s
                    .counts()
                    .into_iter()
                    .map(|(t, n)| format!("{t} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("{} ({counts})", s.describe())
            }
        }
    }
}

/// Everything a run needs besides its source.
pub(crate) struct Prepared {
    pub(crate) pipeline: Pipeline<AnySink>,
    pub(crate) sink: Arc<AnySink>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) dead_letters: DeadLetterWriter,
    pub(crate) config: PipelineConfig,
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    /// Identifies the output, so a checkpoint is only reused for the same destination.
    pub(crate) target: String,
}

/// Loads the templates and opens the sink; `Err(code)` when the templates are invalid (their
/// errors are printed).
pub(crate) fn prepare(
    args: &RunArgs,
    dead_letter_file: &Path,
    partitions: Vec<String>,
) -> anyhow::Result<Result<Prepared, u8>> {
    let palette = Palette::new(crate::ColorChoice::Auto);
    let mappings = match load_or_report(
        OutputFormat::Text,
        &palette,
        &args.device_mapping,
        Some(&args.fhir_mapping),
    )? {
        Ok(m) => m,
        Err(code) => return Ok(Err(code)),
    };
    let Some(fhir) = mappings.fhir else {
        anyhow::bail!("the FHIR mapping did not load");
    };
    let group = GroupConfig::new(args.max_events, args.max_wait)?;
    let config = PipelineConfig {
        group,
        drain_deadline: args.drain_deadline,
        checkpoint_interval: args.checkpoint_interval,
        ..PipelineConfig::default()
    };
    let mapping = Arc::new(fhir);
    let (sink, target) = match &args.fhir_url {
        Some(url) => {
            let mut client_config = FhirClientConfig::new(url.clone());
            if let Some(token) = &args.fhir_token {
                client_config.auth = Auth::Bearer(token.clone());
            }
            let client = FhirClient::new(client_config)?;
            let identity = IdentityResolver::new(
                client.clone(),
                IdentityConfig {
                    mode: match args.identity_mode {
                        IdentityModeArg::Lookup => IdentityMode::Lookup,
                        IdentityModeArg::LookupWithEncounter => IdentityMode::LookupWithEncounter,
                        IdentityModeArg::Create => IdentityMode::Create,
                    },
                    device_identifier_system: args.device_identifier_system.clone(),
                    ..IdentityConfig::default()
                },
            );
            let writer = ObservationWriter::new(client, 100_000, Duration::from_secs(3600));
            (
                AnySink::Fhir(Box::new(FhirSink::new(
                    mapping.clone(),
                    identity,
                    writer,
                    url.clone(),
                ))),
                url.clone(),
            )
        }
        None => {
            let store = NdjsonStore::open(&args.out).with_context(|| {
                format!("cannot open the output directory {}", args.out.display())
            })?;
            let dir = args.out.display().to_string();
            (
                AnySink::Ndjson(NdjsonSink::new(
                    mapping.clone(),
                    store,
                    args.device_identifier_system.clone(),
                    dir.clone(),
                )),
                std::fs::canonicalize(&args.out)
                    .map(|p| p.display().to_string())
                    .unwrap_or(dir),
            )
        }
    };
    let sink = Arc::new(sink);
    let metrics = Arc::new(Metrics::new());
    let dead_letters = DeadLetterWriter::open(dead_letter_file).with_context(|| {
        format!(
            "cannot open the dead-letter file {}",
            dead_letter_file.display()
        )
    })?;
    let pipeline = Pipeline::new(
        config.clone(),
        Arc::new(Normalizer::new(mappings.device)),
        mapping,
        sink.clone(),
        metrics.clone(),
        partitions,
    );
    Ok(Ok(Prepared {
        pipeline,
        sink,
        metrics,
        dead_letters,
        config,
        metrics_addr: args.metrics_addr,
        target,
    }))
}

/// Completes on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            ctrl_c.await.ok();
            return;
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        ctrl_c.await.ok();
    }
}

/// Runs a prepared pipeline over a source channel on the in-process hub.
pub(crate) async fn run_pipeline<K: CheckpointStore>(
    prepared: Prepared,
    input: mpsc::Receiver<Vec<SourceItem>>,
    checkpoints: K,
) -> anyhow::Result<Report<K>> {
    if let Some(addr) = prepared.metrics_addr {
        let health = prepared.pipeline.health();
        let bound = iomt_runtime::serve(addr, prepared.metrics.clone(), health)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(%bound, "serving /metrics, /healthz and /readyz");
    }
    let (producer, consumers) =
        in_process(prepared.config.hub_partitions, prepared.config.hub_capacity);
    Ok(prepared
        .pipeline
        .run(
            input,
            producer,
            consumers,
            prepared.dead_letters,
            checkpoints,
            shutdown_signal(),
        )
        .await)
}

/// A tokio runtime with one worker per core.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prints what a run did.
pub(crate) fn print_summary(
    summary: &Summary,
    started: Instant,
    sink: &AnySink,
    dead_letter_file: &Path,
) {
    let secs = started.elapsed().as_secs_f64();
    let rate = if secs > 0.0 {
        summary.events as f64 / secs
    } else {
        0.0
    };
    println!(
        "{} events in {secs:.1} s ({} events/s)",
        thousands(summary.events),
        thousands(rate as u64)
    );
    println!(
        "  measurements   {} normalized, {} written in {} groups",
        thousands(summary.measurements),
        thousands(summary.written_measurements),
        thousands(summary.groups)
    );
    println!(
        "  resources      {} created, {} updated, {} unchanged",
        thousands(summary.created),
        thousands(summary.updated),
        thousands(summary.unchanged)
    );
    if summary.dropped > 0 {
        println!(
            "  dropped        {} events matched no template",
            thousands(summary.dropped)
        );
    }
    let dead: u64 = summary.dead_letters.values().sum();
    if dead > 0 {
        println!(
            "  dead-lettered  {} -> {}",
            thousands(dead),
            dead_letter_file.display()
        );
        for ((stage, kind), n) in &summary.dead_letters {
            println!("    {stage:<10} {kind:<40} {}", thousands(*n));
        }
    } else {
        println!("  dead-lettered  0");
    }
    if summary.retries > 0 {
        println!(
            "  retries        {} group writes waited for the FHIR server",
            thousands(summary.retries)
        );
    }
    let (p50, p99, max) = summary.latency_ms;
    println!("  latency        read to write: p50 {p50} ms, p99 {p99} ms, max {max} ms");
    println!("  output         {}", sink.describe());
}
