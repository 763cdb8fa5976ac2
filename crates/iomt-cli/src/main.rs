//! `iomt`: the IoMT-to-FHIR pipeline's command line.
//!
//! Exit codes follow the mapping-test contract: 0 when everything worked, 1 when the input
//! data did not fit the templates, 2 when a template (or the command line) is invalid.

mod mapping;
mod style;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

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
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check and debug MedTech mapping templates.
    #[command(subcommand)]
    Mapping(mapping::MappingCommand),
}

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Mapping(cmd) => mapping::run(cmd),
    };
    match code {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
