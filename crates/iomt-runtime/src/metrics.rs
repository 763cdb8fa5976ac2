//! Metrics, under MedTech's names so that dashboards and alerts carry over.
//!
//! Exposed in the Prometheus text format (counters get the standard `_total` suffix, so
//! MedTech's `DeviceEvent` is `DeviceEvent_total`). Latencies are in real milliseconds (MedTech's
//! console host emitted seconds under the `…Ms` names). The same counters feed the summary a
//! replay prints, so the two never disagree.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram as Hdr;
use iomt_core::{Action, Written};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

mod partitions;

pub(crate) use partitions::PartitionStats;

/// Label of counters split by a name (`FhirResourceSaved{name="ObservationCreated"}`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabel {
    name: String,
}

/// Labels of error counters: MedTech's error name and the operation it happened in.
#[derive(Debug, Clone, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct ErrorLabels {
    name: String,
    operation: String,
}

/// Labels of `FhirResourceSaved`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SavedLabels {
    name: String,
    resource_type: String,
}

/// Labels of FHIR requests.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FhirRequestLabels {
    method: String,
    /// The HTTP status, or `none` when no answer came (timeout, connection error).
    status: String,
}

/// Label of the FHIR request latency.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

/// Label of `TemplateVersion`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HashLabel {
    hash: String,
}

/// Label of `TemplateReload`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

/// Labels of `iomt_build_info`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Labels of event delivery counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubscriptionLabel {
    subscription: String,
}

/// Labels of event delivery counters split by an outcome or reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubscriptionReason {
    subscription: String,
    reason: String,
}

/// `FhirResourceSaved`'s name for what a write did (`ObservationCreated`, …).
fn saved_name(action: Action, resource_type: &str) -> String {
    let what = match action {
        Action::Unchanged => "NoOperation",
        other => other.name(),
    };
    format!("{resource_type}{what}")
}

/// Index of an action in the summary's outcome counters.
fn outcome(action: Action) -> usize {
    match action {
        Action::Created => 0,
        Action::Updated => 1,
        Action::Unchanged => 2,
        Action::Deleted => 3,
    }
}

/// The pipeline's counters and histograms.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    device_event: Counter,
    normalized_event: Counter,
    measurement: Counter,
    measurement_group: Family<NameLabel, Counter>,
    dropped_event: Counter,
    saved: Family<SavedLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    total_errors: Counter,
    dead_lettered: Counter,
    retries: Counter,
    device_latency: Histogram,
    ingestion_latency: Histogram,
    pipeline_latency: Histogram,
    buffered: Gauge,
    /// Totals across labels, for the summary (a label family cannot be summed).
    groups_total: Counter,
    outcomes: [Counter; 4],
    /// Dead letters by (stage, kind), for the summary.
    dead_letter_kinds: Mutex<BTreeMap<(String, String), u64>>,
    /// Read-to-write latency with exact percentiles, for the summary and the benchmark.
    latency: Mutex<Hdr<u64>>,
    /// Change events, under Event Grid's metric names.
    events: EventMetrics,
    /// Every FHIR request, by method and status, and its latency by method.
    fhir_requests: Family<FhirRequestLabels, Counter>,
    fhir_latency: HistogramFamily<MethodLabel>,
    /// The templates in use (1 for the version in use) and their reloads by outcome.
    template_version: Family<HashLabel, Gauge>,
    template_reloads: Family<OutcomeLabel, Counter>,
    /// The source partitions owned, their lag and checkpoint age.
    partitions: PartitionStats,
}

/// Change-event metrics, named after Event Grid's subscription metrics.
#[derive(Debug)]
struct EventMetrics {
    delivered: Family<SubscriptionLabel, Counter>,
    failed_attempts: Family<SubscriptionReason, Counter>,
    dead_lettered: Family<SubscriptionReason, Counter>,
    dropped: Family<SubscriptionReason, Counter>,
    matched: Family<SubscriptionLabel, Counter>,
    backlog: Family<SubscriptionLabel, Gauge>,
    latency: Histogram,
    outbox_lag: Gauge,
    /// Totals for the summary.
    delivered_total: Counter,
    dead_lettered_total: Counter,
    /// The change feed (`--role changes`).
    feed_changes: Counter,
    feed_late_arrivals: Counter,
    feed_skipped: Counter,
    feed_lag_seconds: Gauge,
    /// Commit-to-acknowledgement latency with exact percentiles.
    latency_hdr: Mutex<Option<Hdr<u64>>>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 1500.0, 2000.0, 3000.0, 5000.0,
        10_000.0, 30_000.0, 60_000.0, 300_000.0, 900_000.0,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set, registered for export.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            device_event: Counter::default(),
            normalized_event: Counter::default(),
            measurement: Counter::default(),
            measurement_group: Family::default(),
            dropped_event: Counter::default(),
            saved: Family::default(),
            errors: Family::default(),
            total_errors: Counter::default(),
            dead_lettered: Counter::default(),
            retries: Counter::default(),
            device_latency: Histogram::new(latency_buckets()),
            ingestion_latency: Histogram::new(latency_buckets()),
            pipeline_latency: Histogram::new(latency_buckets()),
            buffered: Gauge::default(),
            groups_total: Counter::default(),
            outcomes: Default::default(),
            dead_letter_kinds: Mutex::default(),
            latency: Mutex::new(
                Hdr::new_with_bounds(1, 3_600_000, 3).unwrap_or_else(|_| Hdr::new(3).unwrap()),
            ),
            registry: Registry::default(),
            fhir_requests: Family::default(),
            fhir_latency: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            template_version: Family::default(),
            template_reloads: Family::default(),
            partitions: PartitionStats::default(),
            events: EventMetrics {
                delivered: Family::default(),
                failed_attempts: Family::default(),
                dead_lettered: Family::default(),
                dropped: Family::default(),
                matched: Family::default(),
                backlog: Family::default(),
                latency: Histogram::new(latency_buckets()),
                outbox_lag: Gauge::default(),
                delivered_total: Counter::default(),
                dead_lettered_total: Counter::default(),
                latency_hdr: Mutex::default(),
                feed_changes: Counter::default(),
                feed_late_arrivals: Counter::default(),
                feed_skipped: Counter::default(),
                feed_lag_seconds: Gauge::default(),
            },
        };
        registry.register("DeviceEvent", "Device events read", m.device_event.clone());
        registry.register(
            "NormalizedEvent",
            "Measurements produced by the device mapping",
            m.normalized_event.clone(),
        );
        registry.register(
            "Measurement",
            "Measurements written to FHIR",
            m.measurement.clone(),
        );
        registry.register(
            "MeasurementGroup",
            "Measurement groups written, by flush reason",
            m.measurement_group.clone(),
        );
        registry.register(
            "DroppedEvent",
            "Device events no template matched",
            m.dropped_event.clone(),
        );
        registry.register(
            "FhirResourceSaved",
            "FHIR resources saved, by outcome",
            m.saved.clone(),
        );
        registry.register(
            "Errors",
            "Errors by MedTech exception name and operation",
            m.errors.clone(),
        );
        registry.register("TotalErrors", "All errors", m.total_errors.clone());
        registry.register(
            "DeadLetter",
            "Items written to the dead-letter sink",
            m.dead_lettered.clone(),
        );
        registry.register(
            "FhirWriteRetry",
            "Group writes retried because the FHIR server was unavailable",
            m.retries.clone(),
        );
        registry.register(
            "DeviceEventProcessingLatencyMs",
            "From the event's enqueued time to its normalization, in milliseconds",
            m.device_latency.clone(),
        );
        registry.register(
            "MeasurementIngestionLatencyMs",
            "From the event's enqueued time to the FHIR write, in milliseconds",
            m.ingestion_latency.clone(),
        );
        registry.register(
            "PipelineLatencyMs",
            "From reading the event to the FHIR write, in milliseconds",
            m.pipeline_latency.clone(),
        );
        registry.register(
            "BufferedMeasurements",
            "Measurements waiting in group buffers",
            m.buffered.clone(),
        );
        let e = &m.events;
        registry.register(
            "FhirChanges",
            "Changes the change feed read from the FHIR server's history and appended to the event log",
            e.feed_changes.clone(),
        );
        registry.register(
            "ChangeFeedLateArrivals",
            "Changes caught only thanks to the overlap: older than the watermark when read. A steady rise means settle + overlap is thin for the server's longest transactions",
            e.feed_late_arrivals.clone(),
        );
        registry.register(
            "ChangeFeedSkippedEntries",
            "History entries that name no resource, version or time, and cannot be placed",
            e.feed_skipped.clone(),
        );
        registry.register(
            "ChangeFeedLagSeconds",
            "How far the change feed's watermark is behind the server's clock",
            e.feed_lag_seconds.clone(),
        );
        registry.register(
            "DeliverySuccessCount",
            "Change events delivered, per subscription",
            e.delivered.clone(),
        );
        registry.register(
            "DeliveryAttemptFailCount",
            "Failed delivery attempts, per subscription and outcome",
            e.failed_attempts.clone(),
        );
        registry.register(
            "DeadLetteredCount",
            "Change events dead-lettered, per subscription and reason",
            e.dead_lettered.clone(),
        );
        registry.register(
            "DroppedEventCount",
            "Change events given up without a dead letter, per subscription and reason",
            e.dropped.clone(),
        );
        registry.register(
            "MatchedEventCount",
            "Change events a subscription's filter matched",
            e.matched.clone(),
        );
        registry.register(
            "EventBacklog",
            "Change events in the log a subscription has not finished, per subscription",
            e.backlog.clone(),
        );
        registry.register(
            "EventDeliveryLatencyMs",
            "From the FHIR write (the version's lastUpdated) to the destination's acknowledgement, in milliseconds",
            e.latency.clone(),
        );
        registry.register(
            "OutboxLagMs",
            "Age of the oldest write whose events are not yet in the event log, in milliseconds",
            e.outbox_lag.clone(),
        );
        registry.register(
            "FhirRequest",
            "FHIR requests (each attempt), by method and HTTP status (none: no answer)",
            m.fhir_requests.clone(),
        );
        registry.register(
            "FhirRequestLatencyMs",
            "Time from a FHIR request to its answer, by method, in milliseconds",
            m.fhir_latency.clone(),
        );
        registry.register(
            "TemplateVersion",
            "The mapping templates in use: 1, labelled with their content hash",
            m.template_version.clone(),
        );
        registry.register(
            "TemplateReload",
            "Template reloads, by outcome (applied, or rejected: the version in use stays)",
            m.template_reloads.clone(),
        );
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        registry.register(
            "iomt_build_info",
            "The running build: 1, labelled with its version",
            build,
        );
        registry.register_collector(Box::new(crate::process::ProcessCollector));
        registry.register_collector(Box::new(m.partitions.clone()));
        Self { registry, ..m }
    }

    /// The source partitions' lag and checkpoint age.
    pub(crate) fn partitions(&self) -> &PartitionStats {
        &self.partitions
    }

    /// The templates in use are now `to` (after `from`, whose series goes away).
    pub(crate) fn template_version(&self, from: Option<&str>, to: &str) {
        if let Some(from) = from {
            self.template_version.remove(&HashLabel {
                hash: from.to_owned(),
            });
        }
        self.template_version
            .get_or_create(&HashLabel {
                hash: to.to_owned(),
            })
            .set(1);
    }

    pub(crate) fn template_reload(&self, outcome: &str) {
        self.template_reloads
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub(crate) fn event_matched(&self, subscription: &str) {
        self.events
            .matched
            .get_or_create(&SubscriptionLabel {
                subscription: subscription.to_owned(),
            })
            .inc();
    }

    /// One event delivered, `latency_ms` after its write.
    /// A change feed cycle: changes appended, late arrivals among them, entries skipped, and
    /// the watermark's lag behind the server's clock.
    pub(crate) fn feed_cycle(&self, changes: usize, late: usize, skipped: usize, lag_seconds: i64) {
        let e = &self.events;
        e.feed_changes.inc_by(changes as u64);
        e.feed_late_arrivals.inc_by(late as u64);
        e.feed_skipped.inc_by(skipped as u64);
        e.feed_lag_seconds.set(lag_seconds);
    }

    pub(crate) fn event_delivered(&self, subscription: &str, latency_ms: Option<u64>) {
        self.events
            .delivered
            .get_or_create(&SubscriptionLabel {
                subscription: subscription.to_owned(),
            })
            .inc();
        self.events.delivered_total.inc();
        if let Some(ms) = latency_ms {
            self.events.latency.observe(ms as f64);
            if let Ok(mut hdr) = self.events.latency_hdr.lock() {
                hdr.get_or_insert_with(|| {
                    Hdr::new_with_bounds(1, 3_600_000, 3).unwrap_or_else(|_| Hdr::new(3).unwrap())
                })
                .saturating_record(ms.max(1));
            }
        }
    }

    pub(crate) fn event_attempt_failed(&self, subscription: &str, outcome: &str) {
        self.events
            .failed_attempts
            .get_or_create(&SubscriptionReason {
                subscription: subscription.to_owned(),
                reason: outcome.to_owned(),
            })
            .inc();
    }

    pub(crate) fn event_dead_lettered(&self, subscription: &str, reason: &str) {
        self.events
            .dead_lettered
            .get_or_create(&SubscriptionReason {
                subscription: subscription.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
        self.events.dead_lettered_total.inc();
    }

    pub(crate) fn event_dropped(&self, subscription: &str, reason: &str) {
        self.events
            .dropped
            .get_or_create(&SubscriptionReason {
                subscription: subscription.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub(crate) fn event_backlog(&self, subscription: &str, events: i64) {
        self.events
            .backlog
            .get_or_create(&SubscriptionLabel {
                subscription: subscription.to_owned(),
            })
            .set(events);
    }

    pub(crate) fn outbox_lag(&self, ms: i64) {
        self.events.outbox_lag.set(ms);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry).ok();
        out
    }

    pub(crate) fn events_read(&self, n: u64) {
        self.device_event.inc_by(n);
    }

    pub(crate) fn normalized(&self, n: u64) {
        self.normalized_event.inc_by(n);
    }

    pub(crate) fn dropped(&self) {
        self.dropped_event.inc();
    }

    pub(crate) fn device_latency(&self, ms: f64) {
        self.device_latency.observe(ms);
    }

    pub(crate) fn group_written(&self, reason: &str, measurements: u64, latencies: &[Duration]) {
        self.measurement_group
            .get_or_create(&NameLabel {
                name: reason.to_owned(),
            })
            .inc();
        self.groups_total.inc();
        self.measurement.inc_by(measurements);
        if let Ok(mut hdr) = self.latency.lock() {
            for l in latencies {
                let ms = l.as_millis() as u64;
                // Latencies above an hour are counted as an hour.
                hdr.saturating_record(ms.max(1));
                self.pipeline_latency.observe(ms as f64);
            }
        }
    }

    pub(crate) fn ingestion_latency(&self, ms: f64) {
        self.ingestion_latency.observe(ms);
    }

    /// Counts one resource write.
    pub(crate) fn written(&self, w: &Written) {
        self.saved
            .get_or_create(&SavedLabels {
                name: saved_name(w.action, &w.resource_type),
                resource_type: w.resource_type.clone(),
            })
            .inc();
        self.outcomes[outcome(w.action)].inc();
    }

    pub(crate) fn error(&self, name: &str, operation: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                name: name.to_owned(),
                operation: operation.to_owned(),
            })
            .inc();
        self.total_errors.inc();
    }

    pub(crate) fn dead_letter(&self, stage: &str, kind: &str, n: u64) {
        self.dead_lettered.inc_by(n);
        if let Ok(mut kinds) = self.dead_letter_kinds.lock() {
            *kinds
                .entry((stage.to_owned(), kind.to_owned()))
                .or_default() += n;
        }
    }

    pub(crate) fn retry(&self) {
        self.retries.inc();
    }

    pub(crate) fn buffered(&self, delta: i64) {
        self.buffered.inc_by(delta);
    }

    /// The numbers a replay reports at the end.
    pub fn summary(&self) -> Summary {
        let (p50, p99, max) = self
            .latency
            .lock()
            .map(|h| (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max()))
            .unwrap_or_default();
        Summary {
            events: self.device_event.get(),
            measurements: self.normalized_event.get(),
            written_measurements: self.measurement.get(),
            groups: self.groups_total.get(),
            dropped: self.dropped_event.get(),
            created: self.outcomes[outcome(Action::Created)].get(),
            updated: self.outcomes[outcome(Action::Updated)].get(),
            unchanged: self.outcomes[outcome(Action::Unchanged)].get(),
            dead_letters: self
                .dead_letter_kinds
                .lock()
                .map(|k| k.clone())
                .unwrap_or_default(),
            retries: self.retries.get(),
            latency_ms: (p50, p99, max),
            events_delivered: self.events.delivered_total.get(),
            feed_changes: self.events.feed_changes.get(),
            feed_late_arrivals: self.events.feed_late_arrivals.get(),
            events_dead_lettered: self.events.dead_lettered_total.get(),
            event_latency_ms: self.events.latency_hdr.lock().ok().and_then(|h| {
                h.as_ref()
                    .map(|h| (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max()))
            }),
        }
    }
}

/// What a run did, for the summary a replay prints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Device events read.
    pub events: u64,
    /// Measurements the device mapping produced.
    pub measurements: u64,
    /// Measurements written to FHIR.
    pub written_measurements: u64,
    /// Measurement groups written.
    pub groups: u64,
    /// Events no template matched.
    pub dropped: u64,
    /// Resources created.
    pub created: u64,
    /// Resources updated.
    pub updated: u64,
    /// Resources that already held the data.
    pub unchanged: u64,
    /// Dead-lettered items by (stage, error kind).
    pub dead_letters: BTreeMap<(String, String), u64>,
    /// Group writes retried because the server was unavailable.
    pub retries: u64,
    /// Read-to-write latency in milliseconds: p50, p99, max.
    pub latency_ms: (u64, u64, u64),
    /// Change events delivered, all subscriptions together.
    pub events_delivered: u64,
    /// Changes the change feed appended, and late arrivals among them.
    pub feed_changes: u64,
    /// See [`Metrics::feed_cycle`].
    pub feed_late_arrivals: u64,
    /// Change events dead-lettered.
    pub events_dead_lettered: u64,
    /// Write-to-delivery latency of change events in milliseconds (p50, p99, max), when any
    /// was delivered.
    pub event_latency_ms: Option<(u64, u64, u64)>,
}

impl iomt_fhir::RequestObserver for Metrics {
    fn observe(&self, method: &reqwest::Method, status: Option<u16>, elapsed: Duration) {
        let method = method.as_str().to_owned();
        self.fhir_requests
            .get_or_create(&FhirRequestLabels {
                method: method.clone(),
                status: status.map_or_else(|| "none".to_owned(), |s| s.to_string()),
            })
            .inc();
        self.fhir_latency
            .get_or_create(&MethodLabel { method })
            .observe(elapsed.as_secs_f64() * 1000.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iomt_fhir::RequestObserver as _;

    #[test]
    fn fhir_requests_build_and_process_are_exported() {
        let m = Metrics::new();
        m.observe(&reqwest::Method::GET, Some(200), Duration::from_millis(12));
        m.observe(&reqwest::Method::GET, Some(200), Duration::from_millis(40));
        m.observe(&reqwest::Method::PUT, None, Duration::from_secs(30));
        let text = m.encode();
        for expected in [
            r#"FhirRequest_total{method="GET",status="200"} 2"#,
            r#"FhirRequest_total{method="PUT",status="none"} 1"#,
            r#"FhirRequestLatencyMs_count{method="GET"} 2"#,
            r#"FhirRequestLatencyMs_bucket{le="25.0",method="GET"} 1"#,
            concat!(
                r#"iomt_build_info{version=""#,
                env!("CARGO_PKG_VERSION"),
                r#""} 1"#
            ),
        ] {
            assert!(text.contains(expected), "{expected} not in\n{text}");
        }
        #[cfg(target_os = "linux")]
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "{name} not in\n{text}");
        }
    }
}
