//! What an operator asks of each source partition a process owns: how many it owns, how far
//! the hub is ahead of its checkpoint (lag, as KEDA computes it), and how long its checkpoint
//! has been standing still with work pending (age).
//!
//! The age is computed at scrape time from when the checkpoint was last fresh, not stored by
//! the checkpoint task: a task stuck on a hung checkpoint store must show a growing age, not
//! the last value it managed to set.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug, Default)]
struct Partition {
    /// The last position the checkpoint store took.
    committed: Option<i64>,
    /// When the checkpoint last covered everything read, or last moved.
    fresh_at: Option<Instant>,
    /// The hub's newest sequence number (-1: the partition is empty), when asked.
    newest: Option<i64>,
}

/// The partitions a process owns, shared by the checkpoint task, the source and the scrape.
#[derive(Debug, Clone, Default)]
pub(crate) struct PartitionStats(Arc<Mutex<BTreeMap<String, Partition>>>);

impl PartitionStats {
    /// After a checkpoint round: `owned` lists the partitions owned now with the events read
    /// and not yet done in each, `committed` the positions the store took, by partition.
    pub(crate) fn checkpoint_round(&self, owned: &[(String, usize)], committed: &[(&str, i64)]) {
        let now = Instant::now();
        let mut partitions = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        partitions.retain(|name, _| owned.iter().any(|(o, _)| o == name));
        for (name, in_flight) in owned {
            let p = partitions.entry(name.clone()).or_default();
            let position = committed
                .iter()
                .find(|(partition, _)| partition == name)
                .map(|(_, position)| *position);
            let moved = position.is_some() && position != p.committed;
            if moved || *in_flight == 0 || p.fresh_at.is_none() {
                p.fresh_at = Some(now);
            }
            if position.is_some() {
                p.committed = position;
            }
        }
    }

    /// The hub's newest sequence number of a partition (`None`: it is empty).
    pub(crate) fn newest(&self, partition: &str, newest: Option<i64>) {
        let mut partitions = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = partitions.get_mut(partition) {
            p.newest = Some(newest.unwrap_or(-1));
        }
    }

    /// Every partition owned, as of now.
    fn sample(&self) -> Vec<Row> {
        let now = Instant::now();
        let partitions = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        partitions
            .iter()
            .map(|(name, p)| {
                let age = p.fresh_at.map(|t| now.duration_since(t).as_secs_f64());
                let lag = match (p.newest, p.committed) {
                    (Some(newest), Some(done)) => Some((newest - done).max(0)),
                    // An empty partition has nothing to read, checkpoint or not.
                    (Some(-1), None) => Some(0),
                    _ => None,
                };
                Row {
                    partition: name.clone(),
                    age,
                    lag,
                }
            })
            .collect()
    }
}

/// A partition's figures at a scrape.
#[derive(Debug)]
struct Row {
    partition: String,
    /// Checkpoint age in seconds.
    age: Option<f64>,
    lag: Option<i64>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PartitionLabel {
    partition: String,
}

/// A gauge family labelled by partition, with a sample for each row that has a value.
fn per_partition<N: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[Row],
    value: impl Fn(&Row) -> Option<N>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for row in rows {
        if let Some(value) = value(row) {
            let label = PartitionLabel {
                partition: row.partition.clone(),
            };
            ConstGauge::new(value).encode(family.encode_family(&label)?)?;
        }
    }
    Ok(())
}

impl Collector for PartitionStats {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let rows = self.sample();
        let metric = ConstGauge::new(rows.len() as i64);
        metric.encode(encoder.encode_descriptor(
            "PartitionsOwned",
            "Source partitions this process owns and reads",
            None,
            MetricType::Gauge,
        )?)?;
        per_partition(
            &mut encoder,
            "CheckpointAgeSeconds",
            "Per owned partition, seconds since its checkpoint last moved or covered everything read",
            &rows,
            |row| row.age,
        )?;
        per_partition(
            &mut encoder,
            "PartitionLag",
            "Per owned partition, events enqueued after its checkpoint (KEDA's lag); known once the hub was asked",
            &rows,
            |row| row.lag,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_grows_only_while_work_waits_behind_a_still_checkpoint() {
        let stats = PartitionStats::default();
        stats.checkpoint_round(&[("0".into(), 5), ("1".into(), 0)], &[("0", 10)]);
        let first = stats.0.lock().unwrap()["0"].fresh_at;
        std::thread::sleep(std::time::Duration::from_millis(5));
        // The same position with events pending: stale.
        stats.checkpoint_round(&[("0".into(), 5), ("1".into(), 0)], &[("0", 10)]);
        assert_eq!(stats.0.lock().unwrap()["0"].fresh_at, first);
        // Moved: fresh.
        stats.checkpoint_round(&[("0".into(), 5)], &[("0", 12)]);
        assert!(stats.0.lock().unwrap()["0"].fresh_at > first);
        // Partition 1 was lost: gone from the table.
        let rows = stats.sample();
        assert_eq!(rows.len(), 1);
    }

    #[test]
    fn lag_is_the_newest_sequence_number_after_the_checkpoint() {
        let stats = PartitionStats::default();
        stats.checkpoint_round(
            &[("0".into(), 0), ("1".into(), 0), ("2".into(), 1)],
            &[("0", 10)],
        );
        stats.newest("0", Some(15));
        stats.newest("1", None);
        stats.newest("2", Some(3));
        stats.newest("9", Some(3));
        let rows = stats.sample();
        let lags: Vec<_> = rows.iter().map(|r| (r.partition.as_str(), r.lag)).collect();
        assert_eq!(lags, [("0", Some(5)), ("1", Some(0)), ("2", None)]);

        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(stats));
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("PartitionsOwned 3"), "{text}");
        assert!(text.contains("PartitionLag{partition=\"0\"} 5"), "{text}");
        assert!(
            text.contains("CheckpointAgeSeconds{partition=\"2\"} "),
            "{text}"
        );
    }
}
