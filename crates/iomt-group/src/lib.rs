//! The group stage: normalized measurements in, measurement groups out.
//!
//! MedTech buffers measurements for minutes before converting them, so that an hourly
//! SampledData Observation is written once with many values rather than once per value. This
//! stage keeps one buffer per device, patient, encounter, correlation id, type and FHIR
//! observation window, and flushes a buffer when it holds `max_events` measurements or has been
//! open for `max_wait`, whichever comes first (defaults 1000 and 5 minutes; the wait can go down
//! to 100 ms for low-latency deployments).
//!
//! The stage is pure: time is passed in as milliseconds of a monotonic clock, so tests drive
//! the limits exactly, and the runtime owns the timer. Every measurement keeps the source
//! position of its event, so the runtime acknowledges each one when its group is written.

use std::time::Duration;

use indexmap::IndexMap;
use iomt_core::{Measurement, MeasurementGroup};
use iomt_templates::fhir::PeriodInterval;

/// Flush limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupConfig {
    max_events: usize,
    max_wait: Duration,
}

/// Limits outside the supported range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupConfigError {
    /// `max_events` must be at least 1.
    #[error("max events must be at least 1")]
    MaxEvents,
    /// `max_wait` must be at least 100 ms.
    #[error("max wait must be at least 100 ms, got {0:?}")]
    MaxWait(Duration),
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            max_events: 1000,
            max_wait: Duration::from_secs(300),
        }
    }
}

impl GroupConfig {
    /// Validated limits.
    pub fn new(max_events: usize, max_wait: Duration) -> Result<Self, GroupConfigError> {
        if max_events == 0 {
            return Err(GroupConfigError::MaxEvents);
        }
        if max_wait < Duration::from_millis(100) {
            return Err(GroupConfigError::MaxWait(max_wait));
        }
        Ok(Self {
            max_events,
            max_wait,
        })
    }

    /// Measurements per buffer before it is flushed.
    pub fn max_events(&self) -> usize {
        self.max_events
    }

    /// How long a buffer stays open at most.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }
}

/// Why a buffer was flushed (MedTech's `ThresholdCountReached` / `ThresholdTimeReached`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushReason {
    /// The buffer reached `max_events`.
    MaxEvents,
    /// The buffer was open for `max_wait`.
    MaxWait,
    /// The stage is shutting down.
    Shutdown,
    /// Too many measurements are buffered in all; the oldest buffer goes first.
    MemoryLimit,
}

/// A flushed buffer. `T` is the source position type: a sequence number for one partition, or
/// (partition, sequence number) when a buffer mixes partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flush<T = i64> {
    /// The measurements, in arrival order.
    pub group: MeasurementGroup,
    /// The source position of each measurement, in the same order.
    pub positions: Vec<T>,
    /// Why it was flushed.
    pub reason: FlushReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// [`Measurement::group_ids`].
    ids: [String; 5],
    /// Start of the FHIR observation window in ticks; `None` for correlation-id templates and
    /// types without a FHIR template (the convert stage reports those).
    window: Option<i64>,
}

/// A [`Key`] borrowed from a measurement, to find its buffer without copying five strings
/// per measurement; it hashes as the `Key` it names.
#[derive(Hash)]
struct KeyRef<'a> {
    ids: [&'a str; 5],
    window: Option<i64>,
}

impl indexmap::Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        self.window == key.window && self.ids.iter().zip(&key.ids).all(|(a, b)| *a == b)
    }
}

#[derive(Debug)]
struct Buffer<T> {
    group: MeasurementGroup,
    positions: Vec<T>,
    opened_at_ms: u64,
}

/// The buffers of one partition.
#[derive(Debug)]
pub struct Grouper<P, T = i64> {
    config: GroupConfig,
    period_of: P,
    /// In creation order, which is also deadline order because the clock never goes back.
    buffers: IndexMap<Key, Buffer<T>>,
    buffered: usize,
}

impl<P: Fn(&str) -> Option<PeriodInterval>, T> Grouper<P, T> {
    /// A grouper; `period_of` gives the FHIR template's period for a measurement type.
    pub fn new(config: GroupConfig, period_of: P) -> Self {
        Self {
            config,
            period_of,
            buffers: IndexMap::new(),
            buffered: 0,
        }
    }

    fn key<'m>(&self, m: &'m Measurement) -> KeyRef<'m> {
        let t = m.occurrence_time_utc;
        let window = match (self.period_of)(&m.type_name) {
            Some(PeriodInterval::Single) => Some(t.unix_ticks()),
            Some(PeriodInterval::Hourly) => Some(t.hour_start().unix_ticks()),
            Some(PeriodInterval::Daily) => Some(t.day_start().unix_ticks()),
            Some(PeriodInterval::CorrelationId) | None => None,
        };
        KeyRef {
            ids: m.group_ids(),
            window,
        }
    }

    /// Adds a measurement read at `position`; returns its buffer if that is now full.
    /// `now_ms` must not decrease between calls.
    pub fn push(&mut self, measurement: Measurement, position: T, now_ms: u64) -> Option<Flush<T>> {
        let key = self.key(&measurement);
        let index = match self.buffers.get_index_of(&key) {
            Some(i) => i,
            None => {
                let key = Key {
                    ids: key.ids.map(str::to_owned),
                    window: key.window,
                };
                let buffer = Buffer {
                    group: MeasurementGroup {
                        type_name: measurement.type_name.clone(),
                        device_id: measurement.device_id.clone(),
                        patient_id: measurement.patient_id.clone(),
                        encounter_id: measurement.encounter_id.clone(),
                        correlation_id: measurement.correlation_id.clone(),
                        measurements: Vec::new(),
                    },
                    positions: Vec::new(),
                    opened_at_ms: now_ms,
                };
                self.buffers.insert_full(key, buffer).0
            }
        };
        let (_, buffer) = self.buffers.get_index_mut(index)?;
        buffer.group.measurements.push(measurement);
        buffer.positions.push(position);
        self.buffered += 1;
        if buffer.positions.len() < self.config.max_events {
            return None;
        }
        let (_, buffer) = self.buffers.shift_remove_index(index)?;
        Some(self.flushed(buffer, FlushReason::MaxEvents))
    }

    fn flushed(&mut self, buffer: Buffer<T>, reason: FlushReason) -> Flush<T> {
        self.buffered -= buffer.positions.len();
        Flush {
            group: buffer.group,
            positions: buffer.positions,
            reason,
        }
    }

    fn max_wait_ms(&self) -> u64 {
        u64::try_from(self.config.max_wait.as_millis()).unwrap_or(u64::MAX)
    }

    /// Flushes every buffer open for `max_wait` or longer, oldest first.
    pub fn expired(&mut self, now_ms: u64) -> Vec<Flush<T>> {
        let mut out = Vec::new();
        while let Some((_, first)) = self.buffers.first() {
            if first.opened_at_ms.saturating_add(self.max_wait_ms()) > now_ms {
                break;
            }
            if let Some((_, buffer)) = self.buffers.shift_remove_index(0) {
                out.push(self.flushed(buffer, FlushReason::MaxWait));
            }
        }
        out
    }

    /// When the oldest buffer must be flushed, for the runtime's timer.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.buffers
            .first()
            .map(|(_, b)| b.opened_at_ms.saturating_add(self.max_wait_ms()))
    }

    /// Flushes everything, oldest first (shutdown).
    pub fn drain(&mut self) -> Vec<Flush<T>> {
        let buffers: Vec<Buffer<T>> = self.buffers.drain(..).map(|(_, b)| b).collect();
        buffers
            .into_iter()
            .map(|b| self.flushed(b, FlushReason::Shutdown))
            .collect()
    }

    /// Flushes the oldest buffer, when the runtime must bound memory across all buffers.
    pub fn flush_oldest(&mut self) -> Option<Flush<T>> {
        let (_, buffer) = self.buffers.shift_remove_index(0)?;
        Some(self.flushed(buffer, FlushReason::MemoryLimit))
    }

    /// Measurements currently buffered (bounds memory: the runtime flushes the oldest buffers
    /// above a limit).
    pub fn buffered(&self) -> usize {
        self.buffered
    }
}

#[cfg(test)]
mod tests;
