//! `iomt config check` and `iomt config print`.

use clap::{Args, Subcommand};
use iomt_runtime::config::Target;
use iomt_runtime::{Compiled, Purpose};

use crate::OutputFormat;
use crate::mapping::load_or_report;
use crate::run::{RoleArg, RunArgs, report_config_errors};
use crate::style::Palette;

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Check the configuration (file, IOMT__ environment, flags) and the templates it names,
    /// as the job would before starting; every problem is listed. Exit code 0 when valid, 2
    /// otherwise.
    Check(Box<CheckArgs>),
    /// Print the configuration in effect as TOML: every key, defaults included, secrets
    /// masked.
    Print(Box<RunArgs>),
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Check what `iomt run --role ROLE` needs (its hubs and checkpoint store too); without
    /// it, what `iomt replay` needs.
    #[arg(long, value_enum)]
    role: Option<RoleArg>,
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

fn check(args: &CheckArgs) -> anyhow::Result<u8> {
    let purpose = match args.role {
        Some(_) => Purpose::Run,
        None => Purpose::Replay,
    };
    let config = match args.run.compile(purpose, args.role) {
        Ok(c) => c,
        Err(errors) => return Ok(report_config_errors(&errors)),
    };
    let palette = Palette::new(crate::ColorChoice::Auto);
    // The events role uses no templates.
    let templates = match (&config.device_mapping, &config.fhir_mapping) {
        (Some(device), Some(fhir)) => {
            if let Err(code) = load_or_report(OutputFormat::Text, &palette, device, Some(fhir))? {
                return Ok(code);
            }
            format!("templates {} and {}; ", device.display(), fhir.display())
        }
        _ => String::new(),
    };
    crate::outln!("configuration is valid: {templates}{}", describe(&config));
    Ok(0)
}

/// What the checked job reads and writes.
fn describe(config: &Compiled) -> String {
    if let (iomt_runtime::config::Role::Changes, Target::Fhir { url, .. }) =
        (config.role, &config.target)
    {
        let log = match &config.event_log {
            Some(iomt_runtime::config::EventLog::Hub(hub)) => format!("event log hub {}", hub.hub),
            Some(iomt_runtime::config::EventLog::Kafka(kafka)) => {
                format!("event log topic {}", kafka.topic)
            }
            None => "the local event log".to_owned(),
        };
        return format!(
            "role Changes reads the history of FHIR server {} into {log}",
            iomt_core::redact_url(url)
        );
    }
    let output = match (&config.target, &config.live) {
        (Target::InternalHub, Some(live)) => match &live.internal_hub {
            Some(hub) => format!("internal hub {}", hub.hub),
            None => "internal hub".to_owned(),
        },
        (Target::InternalHub, None) => "internal hub".to_owned(),
        (Target::Fhir { url, identity, .. }, _) => {
            format!(
                "FHIR server {} ({:?} identity)",
                iomt_core::redact_url(url),
                identity.mode
            )
        }
        (Target::Embedded { dir, .. }, _) => format!("the embedded store in {}", dir.display()),
        (Target::Nothing, _) => {
            let n = config.events.as_ref().map_or(0, |e| e.subscriptions.len());
            format!("{n} subscriptions")
        }
    };
    match &config.live {
        Some(live) if config.role == iomt_runtime::config::Role::Events => format!(
            "role Events reads Event Hub {} once per subscription, each in its own consumer group, and delivers to {output}",
            live.source.hub
        ),
        Some(live) => format!(
            "role {:?} reads Event Hub {} (consumer group {}) and writes to {output}",
            config.role, live.source.hub, live.source.consumer_group
        ),
        None => format!("output to {output}"),
    }
}
