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
    let mut taken = positions;
    if !taken.is_empty()
        && let Err(e) = store.commit(&taken).await
    {
        if let CheckpointError::Remote(failed) = &e {
            taken.retain(|c| !failed.iter().any(|f| f.partition == c.partition));
        } else {
            taken.clear();
        }
        e.log();
    }
    let taken: Vec<(&str, i64)> = taken
        .iter()
        .map(|c| (c.partition.as_str(), c.position))
        .collect();
    shared
        .metrics
        .partitions()
        .checkpoint_round(&shared.acks.owned(), &taken);
}
