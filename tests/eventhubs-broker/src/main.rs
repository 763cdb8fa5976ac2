//! `iomt-eventhubs-broker`: the test Event Hubs broker as a process, for tests that drive the
//! `iomt` binary (which cannot share a runtime with the broker library).
//!
//! Run with `cargo run -p iomt-eventhubs-broker -- --port 5672 --hub telemetry:4 --hub normalized:2`.
//! It prints `listening on 127.0.0.1:PORT` on stdout once clients can connect (port 0 picks a
//! free port, so a harness reads the port from that line), logs to stderr (`RUST_LOG`), and exits
//! 0 on SIGTERM or Ctrl-C.

use std::{io::Write, process::ExitCode, time::Duration};

use clap::Parser;
use iomt_eventhubs_broker::{
    BrokerConfig, BrokerHandle, DEFAULT_LATENCY, DEFAULT_MAX_MESSAGE_SIZE, HubConfig,
};
use tracing_subscriber::EnvFilter;

/// A test-only AMQP 1.0 broker compatible with the Azure Event Hubs SDK.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The port to listen on, on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 5672)]
    port: u16,

    /// An event hub to serve, as NAME:PARTITIONS; repeat for more hubs.
    #[arg(long = "hub", value_name = "NAME:PARTITIONS", required = true)]
    hubs: Vec<HubConfig>,

    /// The max-message-size advertised on links, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE_SIZE)]
    max_message_size: u64,

    /// Simulated network latency of everything the broker sends, in milliseconds; the SDK 0.16
    /// needs a little (see the library docs).
    #[arg(long, default_value_t = DEFAULT_LATENCY.as_millis() as u64)]
    latency_ms: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = BrokerConfig::new(args.hubs).with_port(args.port);
    config.max_message_size = args.max_message_size;
    config.latency = Duration::from_millis(args.latency_ms);
    let broker = match BrokerHandle::start(config).await {
        Ok(broker) => broker,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    // A harness waits for this line, so it must be flushed before anything can block.
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "listening on {}", broker.local_addr())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    drop(stdout);
    if let Err(error) = shutdown_signal().await {
        eprintln!("error: cannot wait for signals: {error}");
        return ExitCode::FAILURE;
    }
    broker.stop().await;
    ExitCode::SUCCESS
}

/// Resolves on SIGTERM (how test harnesses stop children) or Ctrl-C.
async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = terminate.recv() => Ok(()),
            result = tokio::signal::ctrl_c() => result,
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
