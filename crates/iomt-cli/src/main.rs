//! `iomt`: the IoMT-to-FHIR pipeline's command line.
//!
//! Exit codes follow the mapping-test contract: 0 when everything worked, 1 when the input
//! data did not fit the templates, 2 when a template (or the command line) is invalid.

mod config;
mod deadletter;
mod export;
mod live;
mod mapping;
mod replay;
mod run;
mod style;

use std::io::Write as _;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use iomt_runtime::telemetry::Traces;

/// The pipeline allocates many small strings and maps per event; mimalloc handles that
/// pattern markedly faster than the system allocator (see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "iomt",
    version,
    about = "IoMT-to-FHIR streaming pipeline, compatible with Azure MedTech mapping templates"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How logs (stderr) are written: `text`, coloured only on a terminal, or `json`, one
    /// object a line for log collectors.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "IOMT_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Lets debug logs (`RUST_LOG=debug`) carry patient data, such as the start of a FHIR
    /// server's error page, for a diagnosis. Info and warn logs never do.
    #[arg(long, global = true, env = "IOMT_LOG_PHI")]
    log_phi: bool,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line: timestamp, level, target, fields and spans.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check and debug MedTech mapping templates.
    #[command(subcommand)]
    Mapping(mapping::MappingCommand),
    /// Run the whole pipeline over captured device traffic (JSON Lines or Event Hubs Capture
    /// Avro), into a FHIR server or the embedded store (exported as NDJSON at the end).
    ///
    /// Exit code 0 when the input was processed to the end (dead-lettered events included; see
    /// the summary), 130 when it was interrupted (run it again to resume), 2 on invalid
    /// templates or arguments.
    Replay(Box<replay::ReplayArgs>),
    /// Run the pipeline on the device Event Hub (`[source]`), with checkpoints and partition
    /// ownership in Blob storage (`[checkpoints]`), until Ctrl-C or SIGTERM.
    ///
    /// Exit code 0 after a clean stop, 1 when the Event Hub could not be read, 130 when the
    /// drain deadline passed (unfinished work is read again on the next start), 2 on invalid
    /// templates or configuration.
    Run(Box<live::LiveArgs>),
    /// Check or print the configuration.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Work with dead-lettered items.
    #[command(subcommand, name = "deadletter")]
    DeadLetter(deadletter::DeadLetterCommand),
    /// Export the embedded store's resources as NDJSON files (FHIR Bulk Data layout).
    Export(export::ExportArgs),
}

/// Writes to stdout. A closed stdout (`iomt mapping test … | head`) ends the program quietly,
/// with success: nobody reads what would follow, and a panic or an error there would only
/// obscure what the reader did see.
pub(crate) fn print_out(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush())
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// `println!` to stdout through [`print_out`].
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::print_out(&format!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    /// For people: what each template matched, what each expression returned, and why.
    Text,
    /// One JSON object `{"measurements", "observations", "errors"}` for tools.
    Json,
}

/// When text output uses colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ColorChoice {
    /// When stdout is a terminal and NO_COLOR is not set.
    Auto,
    Always,
    Never,
}

/// Logs go to stderr; `RUST_LOG` selects them (default `warn`, so the summary stands out).
/// Colour codes only go to a terminal (and not with `NO_COLOR`): a file or a pod log gets
/// plain text. With an OTLP endpoint in the environment, spans are also exported as traces
/// (see `iomt_runtime::telemetry`), until the returned guard is dropped.
fn init_tracing(format: LogFormat) -> anyhow::Result<Option<Traces>> {
    use std::io::IsTerminal as _;
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.with_ansi(ansi).boxed(),
        LogFormat::Json => fmt.json().with_ansi(false).boxed(),
    };
    let traces = Traces::from_env()?;
    let exported = traces.as_ref().map(Traces::layer);
    // Fails only when a subscriber is already set, which is then used instead.
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(exported)
        .try_init()
        .ok();
    Ok(traces)
}

/// Runs a command with logs (and traces, when configured) set up, and the traces sent before
/// it returns.
fn traced(format: LogFormat, command: impl FnOnce() -> anyhow::Result<u8>) -> anyhow::Result<u8> {
    let _traces = init_tracing(format)?;
    command()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    iomt_core::set_log_phi(cli.log_phi);
    let code = match cli.command {
        Command::Mapping(cmd) => mapping::run(cmd),
        Command::Replay(args) => traced(cli.log_format, || replay::run(&args)),
        Command::Run(args) => traced(cli.log_format, || live::run(&args)),
        Command::Config(cmd) => config::run(cmd),
        Command::DeadLetter(cmd) => traced(cli.log_format, || deadletter::run(cmd)),
        Command::Export(args) => export::run(&args),
    };
    match code {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
