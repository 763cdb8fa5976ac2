//! The checkpoint task: on a timer and at the end, commits the positions every partition is
//! done up to, after the sink made its writes durable.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::Shared;
use crate::sink::Sink;
use crate::source::{CheckpointError, CheckpointStore};

pub(super) async fn checkpoint_task<S: Sink, K: CheckpointStore>(
    shared: Arc<Shared<S>>,
    mut store: K,
    mut finish: oneshot::Receiver<()>,
) -> K {
    let mut tick = tokio::time::interval(shared.config.checkpoint_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => commit(&shared, &mut store).await,
            _ = &mut finish => break,
        }
    }
    commit(&shared, &mut store).await;
    store
}

/// Commits what is safe: positions are read before the sink persists, so every write they
/// cover is durable when they are stored.
async fn commit<S: Sink, K: CheckpointStore>(shared: &Shared<S>, store: &mut K) {
    let positions = shared.acks.committable();
    if let Err(e) = shared.sink.persist().await {
        tracing::error!(error = %e, "cannot persist the output; the checkpoint waits");
        return;
    }
    if positions.is_empty() {
        return;
    }
    match store.commit(&positions).await {
        Ok(()) => {}
        // Another process took these partitions over: it checkpoints them now, and their
        // readers here are about to be disconnected.
        Err(CheckpointError::Remote(failures)) => {
            for failure in failures {
                if failure.ownership_lost {
                    tracing::info!(partition = %failure.partition, "partition owned by another process; its checkpoint is left to it");
                } else {
                    tracing::error!(error = %failure, "cannot commit the checkpoint; retried at the next one");
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot commit the checkpoint; retried at the next one")
        }
    }
}
