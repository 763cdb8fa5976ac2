//! `iomt run`: the pipeline on a live Event Hub, until Ctrl-C or SIGTERM.
//!
//! Partitions of the hub a process reads are claimed through the checkpoint container, so
//! several processes (pods) share them. With `--role all` a process normalizes, groups and
//! converts what it owns, and commits checkpoints only for what its sink has durably written.
//! Scaled out, the stages run as two roles joined by the internal hub, as in MedTech:
//! `normalize` reads the device hub and checkpoints once the internal hub stored the
//! measurements; `convert` reads the internal hub, where all of a device's measurements are on
//! one partition, and checkpoints once they are written to FHIR.

use std::sync::Arc;
use std::time::Instant;

use clap::{Args, ValueEnum};
use iomt_runtime::config::Role;
use iomt_runtime::eventhubs::{EventHubsCheckpoints, spawn_source};
use iomt_runtime::{internal_hub_producer, live_source};
use tokio::sync::{mpsc, watch};

use crate::run::{
    RunArgs, finish_output, keep_unmatched, prepare_config, print_summary, report_config_errors,
    run_pipeline, runtime,
};

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

/// `--role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RoleArg {
    /// Read [source], write FHIR, over the in-process hub.
    All,
    /// Read [source], write [internal_hub].
    Normalize,
    /// Read [internal_hub], write FHIR.
    Convert,
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
    let mut config = match args.run.load() {
        Ok(c) => c,
        Err(errors) => return Ok(report_config_errors(&errors)),
    };
    if let Some(role) = args.role {
        config.pipeline.role = match role {
            RoleArg::All => Role::All,
            RoleArg::Normalize => Role::Normalize,
            RoleArg::Convert => Role::Convert,
        };
    }
    let errors = config.validate_for_run();
    if !errors.is_empty() {
        return Ok(report_config_errors(&errors));
    }
    let (config, assembled) = match prepare_config(config, Vec::new(), None)? {
        Ok((config, assembled)) => (config, keep_unmatched(&args.run, assembled)?),
        Err(code) => return Ok(code),
    };
    let owner_id = args.owner_id.clone().unwrap_or_else(default_owner_id);
    let (metrics, sink) = (assembled.metrics.clone(), assembled.sink.clone());
    let dead_letter_file = assembled.dead_letter_file.clone();
    let started = Instant::now();
    let report = runtime()?.block_on(async {
        let source = match live_source(&config, owner_id).await {
            Ok(s) => s,
            Err(e) => return Ok(Err(report_config_errors(&[e]))),
        };
        let internal_hub = match config.pipeline.role {
            Role::Normalize => match internal_hub_producer(&config, &source.owner_id).await {
                Ok(p) => Some(p),
                Err(e) => return Ok(Err(report_config_errors(&[e]))),
            },
            Role::All | Role::Convert => None,
        };
        tracing::info!(
            owner = %source.owner_id,
            role = ?config.pipeline.role,
            hub = %source.settings.hub,
            "starting"
        );
        let (tx, rx) = mpsc::channel(16);
        let (stop_tx, stop_rx) = watch::channel(false);
        let checkpoints = EventHubsCheckpoints::new(source.store.clone(), &source.settings);
        let reader = spawn_source(
            source.settings,
            source.processor,
            source.store as Arc<dyn azure_messaging_eventhubs::CheckpointStore + Send + Sync>,
            assembled.pipeline.partitions(),
            tx,
            stop_rx,
        );
        // The pipeline stops on a signal, or when the source gives up (a hub that cannot be
        // opened): a pod without input must not look healthy.
        let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
        let joined = tokio::task::spawn_blocking(move || {
            let result = reader.join();
            ended_tx.send(()).ok();
            result
        });
        let report = run_pipeline(
            &config,
            assembled,
            rx,
            checkpoints,
            internal_hub,
            async move {
                tokio::select! {
                    () = crate::run::shutdown_signal() => {}
                    _ = ended_rx => {}
                }
                stop_tx.send_replace(true);
            },
        )
        .await?;
        let source_failed = match joined.await {
            Ok(Ok(Err(e))) => {
                eprintln!("error: the Event Hub source failed: {e}");
                true
            }
            Ok(Err(_)) | Err(_) => {
                eprintln!("error: the Event Hub source panicked");
                true
            }
            Ok(Ok(Ok(()))) => false,
        };
        anyhow::Ok(Ok((report, source_failed)))
    })?;
    let (report, source_failed) = match report {
        Ok(r) => r,
        Err(code) => return Ok(code),
    };
    let output = match config.pipeline.role {
        Role::Normalize => format!(
            "internal hub {}",
            config.internal_hub.hub.as_deref().unwrap_or_default()
        ),
        Role::All | Role::Convert => finish_output(&sink)?,
    };
    print_summary(
        args.run.summary,
        &metrics.summary(),
        started,
        &output,
        &dead_letter_file,
    );
    Ok(if source_failed {
        1
    } else if report.abandoned {
        130
    } else {
        0
    })
}
