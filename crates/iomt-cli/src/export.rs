//! `iomt export`: the embedded store's resources as files.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use iomt_runtime::Config;

use crate::run::report_config_errors;

#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    /// Write `{Type}.ndjson` files (FHIR Bulk Data layout) into this directory.
    #[arg(long, value_name = "DIR")]
    ndjson: PathBuf,
    /// The store to export: an output directory of embedded runs [default: output.dir of the
    /// configuration, else iomt-out].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Configuration file (TOML).
    #[arg(long, env = "IOMT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

pub(crate) fn run(args: &ExportArgs) -> anyhow::Result<u8> {
    let store = match &args.out {
        Some(dir) => dir.clone(),
        None => match Config::load(args.config.as_deref(), std::env::vars()) {
            Ok(c) => c.output.dir,
            Err(errors) => return Ok(report_config_errors(&errors)),
        },
    };
    let counts = iomt_store::export_ndjson(&store, &args.ndjson)
        .with_context(|| format!("cannot export the store in {}", store.display()))?;
    for (resource_type, n) in counts {
        crate::outln!(
            "{resource_type:<20} {n:>10}  {}",
            args.ndjson
                .join(format!("{resource_type}.ndjson"))
                .display()
        );
    }
    Ok(0)
}
