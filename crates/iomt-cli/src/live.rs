//! `iomt run`: the pipeline on a live Event Hub, until Ctrl-C or SIGTERM.
//!
//! Partitions of the device hub are claimed through the checkpoint container, so several
//! processes (pods) share them; each process normalizes, groups and converts what it owns, and
//! commits checkpoints only for what its sink has durably written.

use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use iomt_runtime::eventhubs::{EventHubsCheckpoints, spawn_source};
use iomt_runtime::live_source;
use tokio::sync::{mpsc, watch};

use crate::run::{RunArgs, prepare, print_summary, report_config_errors, run_pipeline, runtime};

#[derive(Debug, Args)]
pub(crate) struct LiveArgs {
    #[command(flatten)]
    run: RunArgs,
    /// This process's name in partition ownership records [default: host name and a random
    /// suffix]; must be unique among the processes sharing the hub.
    #[arg(long, value_name = "ID")]
    owner_id: Option<String>,
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
    let (config, assembled) = match prepare(&args.run, Vec::new(), None)? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let errors = config.validate_for_run();
    if !errors.is_empty() {
        return Ok(report_config_errors(&errors));
    }
    let owner_id = args.owner_id.clone().unwrap_or_else(default_owner_id);
    let (metrics, sink) = (assembled.metrics.clone(), assembled.sink.clone());
    let dead_letter_file = assembled.dead_letter_file.clone();
    let started = Instant::now();
    let report = runtime()?.block_on(async {
        let source = match live_source(&config, owner_id).await {
            Ok(s) => s,
            Err(e) => return Ok(Err(report_config_errors(&[e]))),
        };
        tracing::info!(owner = %source.owner_id, hub = %source.settings.hub, "starting");
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
        let report = run_pipeline(&config, assembled, rx, checkpoints, async move {
            tokio::select! {
                () = crate::run::shutdown_signal() => {}
                _ = ended_rx => {}
            }
            stop_tx.send_replace(true);
        })
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
    print_summary(&metrics.summary(), started, &sink, &dead_letter_file);
    Ok(if source_failed {
        1
    } else if report.abandoned {
        130
    } else {
        0
    })
}
