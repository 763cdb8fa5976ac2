//! What every command that runs the pipeline shares: its arguments, loading the configuration
//! and templates, and the summary printed at the end.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use iomt_runtime::config::{DeadLetterTarget, IdentityModeKind, Role};
use iomt_runtime::templates::Templates;
use iomt_runtime::{
    Assembled, Compiled, Config, ConfigError, ConfiguredSink, Purpose, Sink as _, Summary, assemble,
};

use crate::OutputFormat;
use crate::mapping::load_or_report;
use crate::style::Palette;

/// Exit code: invalid templates, configuration or arguments.
pub(crate) const EXIT_INVALID: u8 = 2;

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

/// `--role`: which stages `iomt run` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum RoleArg {
    /// Read [source], write FHIR, over the in-process hub.
    All,
    /// Read [source], write [internal_hub].
    Normalize,
    /// Read [internal_hub], write FHIR.
    Convert,
    /// Read [event_log], deliver change events to the subscriptions.
    Events,
    /// Read the FHIR server's history ([change_feed]), append its changes to the event log.
    Changes,
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::All => Role::All,
            RoleArg::Normalize => Role::Normalize,
            RoleArg::Convert => Role::Convert,
            RoleArg::Events => Role::Events,
            RoleArg::Changes => Role::Changes,
        }
    }
}

/// Settings of a pipeline run. Each flag overrides the configuration file and the `IOMT__…`
/// environment.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Configuration file (TOML); see `iomt config print` for every key and its default.
    #[arg(long, env = "IOMT_CONFIG", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// The device mapping (a CollectionContent document).
    #[arg(long, value_name = "FILE")]
    pub(crate) device_mapping: Option<PathBuf>,
    /// The FHIR mapping (a CollectionFhir document).
    #[arg(long, value_name = "FILE")]
    pub(crate) fhir_mapping: Option<PathBuf>,
    /// FHIR server base URL. Without one the output goes to the --out directory.
    #[arg(long, value_name = "URL")]
    pub(crate) fhir_url: Option<String>,
    /// How devices and patients are resolved on the FHIR server.
    #[arg(long, value_enum)]
    pub(crate) identity_mode: Option<IdentityModeArg>,
    /// Without a FHIR URL: the embedded store's directory, where its NDJSON export (Bulk Data
    /// layout) is also written [default: iomt-out].
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
    /// Where the dead-letter file and checkpoints are kept [default: .iomt].
    #[arg(long, value_name = "DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// Flush a group buffer when it holds this many measurements [default: 1000].
    #[arg(long, value_name = "N")]
    pub(crate) max_events: Option<usize>,
    /// Flush a group buffer when it has been open this long, 100ms at least [default: 5m].
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub(crate) max_wait: Option<Duration>,
    /// On Ctrl-C or SIGTERM, how long in-flight work may take to finish [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub(crate) drain_deadline: Option<Duration>,
    /// Serve /metrics (Prometheus), /healthz and /readyz on this address, e.g. 127.0.0.1:9090.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    /// Append events that match no template to this file (JSON Lines, replayable); otherwise
    /// they are only counted.
    #[arg(long, value_name = "FILE")]
    pub(crate) keep_unmatched: Option<PathBuf>,
    /// How the summary at the end is printed.
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) summary: OutputFormat,
}

impl RunArgs {
    /// The configuration in effect: file, environment, then these flags; not yet validated.
    pub(crate) fn load(&self) -> Result<Config, Vec<ConfigError>> {
        let mut config = Config::load(self.config.as_deref(), std::env::vars())?;
        let t = &mut config.templates;
        t.device_mapping = self.device_mapping.clone().or(t.device_mapping.take());
        t.fhir_mapping = self.fhir_mapping.clone().or(t.fhir_mapping.take());
        if let Some(url) = &self.fhir_url {
            config.fhir.url = Some(url.clone());
        }
        if let Some(mode) = self.identity_mode {
            config.identity.mode = match mode {
                IdentityModeArg::Lookup => IdentityModeKind::Lookup,
                IdentityModeArg::LookupWithEncounter => IdentityModeKind::LookupWithEncounter,
                IdentityModeArg::Create => IdentityModeKind::Create,
            };
        }
        let o = &mut config.output;
        o.dir = self.out.clone().unwrap_or(o.dir.clone());
        o.state_dir = self.state_dir.clone().unwrap_or(o.state_dir.clone());
        o.metrics_addr = self.metrics_addr.or(o.metrics_addr);
        let g = &mut config.group;
        g.max_events = self.max_events.unwrap_or(g.max_events);
        g.max_wait = self.max_wait.unwrap_or(g.max_wait);
        let p = &mut config.pipeline;
        p.drain_deadline = self.drain_deadline.unwrap_or(p.drain_deadline);
        // Before any template is loaded: the limits bound what loading accepts.
        iomt_core::set_limits(config.limits);
        Ok(config)
    }

    /// The configuration in effect, validated and compiled for `purpose`; `role` overrides
    /// `pipeline.role`.
    pub(crate) fn compile(
        &self,
        purpose: Purpose,
        role: Option<RoleArg>,
    ) -> Result<Compiled, Vec<ConfigError>> {
        let mut config = self.load()?;
        if let Some(role) = role {
            config.pipeline.role = role.into();
        }
        config.compile(purpose)
    }
}

/// Prints configuration errors; returns the exit code.
pub(crate) fn report_config_errors(errors: &[ConfigError]) -> u8 {
    eprintln!("error: the configuration is invalid:");
    for e in errors {
        eprintln!("  {e}");
    }
    EXIT_INVALID
}

/// Compiles the configuration for `purpose`, loads the templates and assembles the pipeline;
/// `Err(code)` after printing every problem. `dead_letter_file` overrides the configured one.
pub(crate) fn prepare(
    args: &RunArgs,
    purpose: Purpose,
    role: Option<RoleArg>,
    partitions: Vec<String>,
    dead_letter_file: Option<PathBuf>,
) -> anyhow::Result<Result<(Compiled, Assembled), u8>> {
    let config = match args.compile(purpose, role) {
        Ok(config) => config,
        Err(errors) => return Ok(Err(report_config_errors(&errors))),
    };
    prepare_compiled(config, args, partitions, dead_letter_file)
}

/// [`prepare`] for a configuration already compiled.
pub(crate) fn prepare_compiled(
    config: Compiled,
    args: &RunArgs,
    partitions: Vec<String>,
    dead_letter_file: Option<PathBuf>,
) -> anyhow::Result<Result<(Compiled, Assembled), u8>> {
    let palette = Palette::new(crate::ColorChoice::Auto);
    let (Some(device_mapping), Some(fhir_mapping)) = (&config.device_mapping, &config.fhir_mapping)
    else {
        anyhow::bail!("the configuration names no templates");
    };
    let mappings = match load_or_report(
        OutputFormat::Text,
        &palette,
        device_mapping,
        Some(fhir_mapping),
    )? {
        Ok(m) => m,
        Err(code) => return Ok(Err(code)),
    };
    let Some(fhir) = mappings.fhir else {
        anyhow::bail!("the FHIR mapping did not load");
    };
    let dead_letters = match dead_letter_file {
        Some(file) => DeadLetterTarget::File(file),
        None => config.dead_letters.clone(),
    };
    let templates = Templates::new(mappings.device, fhir, mappings.version);
    for error in &templates.unmapped_types {
        eprintln!("warning: {}: {error}", device_mapping.display());
    }
    let mut assembled = match assemble(&config, templates, partitions, &dead_letters) {
        Ok(a) => a,
        Err(e) => return Ok(Err(report_config_errors(&[e]))),
    };
    if let Some(file) = &args.keep_unmatched {
        assembled.pipeline = assembled
            .pipeline
            .keep_unmatched(file)
            .with_context(|| format!("cannot open {}", file.display()))?;
    }
    Ok(Ok((config, assembled)))
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

/// Where a run's output went, for the summary. After a run into the embedded store, the store
/// is also exported as NDJSON files (Bulk Data layout) into its directory, so the files hold
/// everything the store holds.
pub(crate) fn finish_output(sink: &ConfiguredSink) -> anyhow::Result<String> {
    let described = sink.describe();
    let Some(store) = sink.embedded() else {
        return Ok(described);
    };
    let dir = store.dir();
    iomt_store::export_ndjson(dir, dir)
        .with_context(|| format!("cannot export NDJSON into {}", dir.display()))?;
    Ok(format!("{described}; NDJSON files in {}", dir.display()))
}

/// Says which subscriptions did not deliver everything: a replay waits for deliveries only
/// up to `events.drain_deadline`, and the next run goes on from each subscription's
/// checkpoint.
pub(crate) fn report_events(events: Option<&iomt_runtime::events::EventsReport>) {
    for (name, _, unfinished, disabled) in events.map_or(&[][..], |e| &e.subscriptions) {
        if let Some(reason) = disabled {
            eprintln!(
                "warning: subscription {name} is disabled ({reason}); clear `disabled` in its state file to resume it"
            );
        } else if *unfinished > 0 {
            eprintln!(
                "warning: subscription {name} has {unfinished} events still to deliver; the next run delivers them"
            );
        }
    }
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

/// The process's peak resident memory, where the platform reports it (Linux).
fn peak_rss_mb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

/// CPU time this process used so far, user and system (Linux: `/proc/self/stat`, in clock
/// ticks of 1/100 s, the kernel's `USER_HZ` on every mainstream architecture).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name, in parentheses, may hold spaces: fields are counted after it.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// Prints what a run did; `output` names where it wrote.
pub(crate) fn print_summary(
    format: OutputFormat,
    summary: &Summary,
    started: Instant,
    output: &str,
    dead_letters: &str,
) {
    let text = match format {
        OutputFormat::Text => summary_text(summary, started, output, dead_letters),
        OutputFormat::Json => format!("{}\n", summary_json(summary, started, output, dead_letters)),
    };
    // A closed stdout (`iomt replay … | head`) is not an error of the run.
    std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes()).ok();
}

/// The summary for tools and benchmarks (`--summary json`).
fn summary_json(
    summary: &Summary,
    started: Instant,
    output: &str,
    dead_letters: &str,
) -> serde_json::Value {
    let seconds = started.elapsed().as_secs_f64();
    let dead: u64 = summary.dead_letters.values().sum();
    let (p50, p99, max) = summary.latency_ms;
    serde_json::json!({
        "seconds": seconds,
        "events": summary.events,
        "eventsPerSecond": if seconds > 0.0 { summary.events as f64 / seconds } else { 0.0 },
        "measurements": summary.measurements,
        "writtenMeasurements": summary.written_measurements,
        "groups": summary.groups,
        "resources": {
            "created": summary.created,
            "updated": summary.updated,
            "unchanged": summary.unchanged,
        },
        "dropped": summary.dropped,
        "deadLetters": {
            "total": dead,
            "file": dead_letters,
            "byKind": summary.dead_letters.iter().map(|((stage, kind), n)| {
                serde_json::json!({"stage": stage, "kind": kind, "count": n})
            }).collect::<Vec<_>>(),
        },
        "retries": summary.retries,
        "latencyMs": {"p50": p50, "p99": p99, "max": max},
        "changeEvents": {
            "delivered": summary.events_delivered,
            "deadLettered": summary.events_dead_lettered,
            "latencyMs": summary.event_latency_ms.map(|(p50, p99, max)| {
                serde_json::json!({"p50": p50, "p99": p99, "max": max})
            }),
        },
        "peakRssMb": peak_rss_mb(),
        "cpuSeconds": cpu_seconds(),
        "output": output,
    })
}

fn summary_text(summary: &Summary, started: Instant, output: &str, dead_letters: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let secs = started.elapsed().as_secs_f64();
    // A run that reads measurements (the convert role, a dead-letter replay of convert
    // failures) reads no device events.
    let (count, unit) = if summary.events == 0 && summary.written_measurements > 0 {
        let failed: u64 = summary
            .dead_letters
            .iter()
            .filter(|((stage, _), _)| stage == "convert")
            .map(|(_, n)| n)
            .sum();
        (summary.written_measurements + failed, "measurements")
    } else {
        (summary.events, "events")
    };
    let rate = if secs > 0.0 { count as f64 / secs } else { 0.0 };
    writeln!(
        out,
        "{} {unit} in {secs:.1} s ({} {unit}/s)",
        thousands(count),
        thousands(rate as u64)
    )
    .ok();
    let converted = summary.groups > 0;
    write!(
        out,
        "  measurements   {} normalized",
        thousands(summary.measurements)
    )
    .ok();
    if converted {
        write!(
            out,
            ", {} written in {} groups",
            thousands(summary.written_measurements),
            thousands(summary.groups)
        )
        .ok();
        writeln!(
            out,
            "\n  resources      {} created, {} updated, {} unchanged",
            thousands(summary.created),
            thousands(summary.updated),
            thousands(summary.unchanged)
        )
        .ok();
    } else {
        writeln!(out).ok();
    }
    if summary.dropped > 0 {
        writeln!(
            out,
            "  dropped        {} events matched no template",
            thousands(summary.dropped)
        )
        .ok();
    }
    let dead: u64 = summary.dead_letters.values().sum();
    if dead > 0 {
        writeln!(
            out,
            "  dead-lettered  {} -> {}",
            thousands(dead),
            dead_letters
        )
        .ok();
        for ((stage, kind), n) in &summary.dead_letters {
            writeln!(out, "    {stage:<10} {kind:<40} {}", thousands(*n)).ok();
        }
    } else {
        writeln!(out, "  dead-lettered  0").ok();
    }
    if summary.retries > 0 {
        writeln!(
            out,
            "  retries        {} group writes waited for the FHIR server",
            thousands(summary.retries)
        )
        .ok();
    }
    if converted {
        let (p50, p99, max) = summary.latency_ms;
        writeln!(
            out,
            "  latency        read to write: p50 {p50} ms, p99 {p99} ms, max {max} ms"
        )
        .ok();
    }
    if summary.events_delivered + summary.events_dead_lettered > 0 {
        write!(
            out,
            "  change events  {} delivered, {} dead-lettered",
            thousands(summary.events_delivered),
            thousands(summary.events_dead_lettered)
        )
        .ok();
        if let Some((p50, p99, _)) = summary.event_latency_ms {
            write!(out, "; write to delivery: p50 {p50} ms, p99 {p99} ms").ok();
        }
        writeln!(out).ok();
    }
    if let Some(mb) = peak_rss_mb() {
        writeln!(out, "  memory         peak RSS {mb} MB").ok();
    }
    writeln!(out, "  output         {output}").ok();
    out
}
