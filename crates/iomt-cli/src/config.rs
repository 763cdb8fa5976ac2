//! `iomt config check` and `iomt config print`.

use clap::Subcommand;
use iomt_runtime::config::Role;

use crate::OutputFormat;
use crate::mapping::load_or_report;
use crate::run::{EXIT_INVALID, RunArgs, report_config_errors};
use crate::style::Palette;

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Check the configuration (file, IOMT__ environment, flags) and the templates it names;
    /// every problem is listed. Exit code 0 when valid, 2 otherwise.
    Check(Box<RunArgs>),
    /// Print the configuration in effect as TOML, defaults included, secrets masked.
    Print(Box<RunArgs>),
}

pub(crate) fn run(cmd: ConfigCommand) -> anyhow::Result<u8> {
    match cmd {
        ConfigCommand::Check(args) => check(&args),
        ConfigCommand::Print(args) => match args.load() {
            Ok(c) => {
                crate::print_out(&c.to_toml());
                Ok(0)
            }
            Err(errors) => Ok(report_config_errors(&errors)),
        },
    }
}

fn check(args: &RunArgs) -> anyhow::Result<u8> {
    let config = match args.load() {
        Ok(c) => c,
        Err(errors) => return Ok(report_config_errors(&errors)),
    };
    let (Some(device), Some(fhir)) = (
        &config.templates.device_mapping,
        &config.templates.fhir_mapping,
    ) else {
        return Ok(EXIT_INVALID);
    };
    let palette = Palette::new(crate::ColorChoice::Auto);
    if let Err(code) = load_or_report(OutputFormat::Text, &palette, device, Some(fhir))? {
        return Ok(code);
    }
    let output = match &config.fhir.url {
        _ if config.pipeline.role == Role::Normalize => format!(
            "internal hub {}",
            config.internal_hub.hub.as_deref().unwrap_or("(not set)")
        ),
        Some(url) => format!("FHIR server {url} ({:?} identity)", config.identity.mode),
        None => format!("the embedded store in {}", config.output.dir.display()),
    };
    crate::outln!(
        "configuration is valid: templates {} and {}; output to {output}",
        device.display(),
        fhir.display()
    );
    Ok(0)
}
