//! The normalize task: source batches in, measurements out to the internal hub by device,
//! every event registered for acknowledgement before its measurements move on.

use std::io::Write as _;
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use iomt_core::{Measurement, SourceEvent, Timestamp};
use iomt_files::deadletter::DeadLetter;
use tokio::sync::{mpsc, watch};

use super::deadletters::DeadLetters;
use super::{Shared, millis_between};
use crate::hub::{HubMessage, HubProducer, device_partition};
use crate::sink::Sink;
use crate::source::{Input, SourceItem};

fn normalize_dead_letter(
    event: &SourceEvent,
    errors: &[iomt_normalize::NormalizeError],
    time: Timestamp,
) -> DeadLetter {
    let first = &errors[0];
    let mut messages: Vec<String> = Vec::new();
    for e in errors {
        let m = match (&e.template, &e.path, e.line) {
            (Some(t), Some(p), Some(l)) => format!("{t}, {p} (line {l}): {}", e.message),
            (Some(t), _, _) => format!("{t}: {}", e.message),
            _ => e.message.clone(),
        };
        // A template failing the same way on every match of an event is said once.
        if !messages.contains(&m) {
            messages.push(m);
        }
    }
    DeadLetter::event(
        event,
        (
            first.kind.name(),
            messages.join("; "),
            first.template.clone(),
        ),
        time,
    )
}

pub(super) async fn normalize_task<S: Sink, P: HubProducer>(
    mut input: mpsc::Receiver<Vec<SourceItem>>,
    mut producer: P,
    dead_letters: mpsc::Sender<DeadLetters>,
    shared: Arc<Shared<S>>,
    mut stop: watch::Receiver<bool>,
) {
    let partitions = producer.partitions();
    loop {
        let batch = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            batch = input.recv() => match batch {
                Some(b) => b,
                None => break,
            },
        };
        let span = tracing::debug_span!("normalize_batch", events = batch.len()).entered();
        // One version of the templates for the whole batch, even if a reload lands meanwhile.
        let templates = shared.templates.current();
        let read_at = Instant::now();
        let now = Timestamp::now();
        let mut out: Vec<Vec<HubMessage>> = (0..partitions).map(|_| Vec::new()).collect();
        let mut registrations = Vec::with_capacity(batch.len());
        let mut dead = DeadLetters {
            records: Vec::new(),
            origins: Vec::new(),
        };
        let mut events = 0;
        let mut normalized = 0;
        let mut unmatched = Vec::new();
        for item in batch {
            let origin = item.origin;
            let mut route = |measurement: Measurement| {
                let p = device_partition(&measurement.device_id, partitions);
                out[p].push(HubMessage {
                    measurement,
                    origin,
                    read_at,
                });
            };
            match item.input {
                Input::Bad(bad) => {
                    events += 1;
                    shared
                        .metrics
                        .error("InvalidDataFormatException", "Normalization");
                    registrations.push((origin, 1));
                    dead.origins.push(origin);
                    dead.records.push(DeadLetter::unreadable(&bad, now));
                }
                Input::Measurement(m) => {
                    registrations.push((origin, 1));
                    route(*m);
                }
                Input::Event(mut event) => {
                    events += 1;
                    if let Some(enqueued) = event.event.enqueued_time {
                        shared
                            .metrics
                            .device_latency(millis_between(enqueued, now).max(0.0));
                    }
                    let output = templates.normalizer.normalize_owned(&mut event.event);
                    let failed = !output.errors.is_empty();
                    let n = output.measurements.len();
                    normalized += n as u64;
                    if failed {
                        for e in &output.errors {
                            shared.metrics.error(e.kind.name(), "Normalization");
                        }
                        dead.origins.push(origin);
                        dead.records
                            .push(normalize_dead_letter(&event, &output.errors, now));
                    } else if n == 0 {
                        shared.metrics.dropped();
                        unmatched.push(iomt_files::capture::to_jsonl(&event));
                    }
                    registrations.push((origin, n as u32 + u32::from(failed)));
                    for mut m in output.measurements {
                        if m.ingestion_time_utc.is_none() {
                            m.ingestion_time_utc = event.event.enqueued_time;
                        }
                        route(m);
                    }
                }
            }
        }
        drop(span);
        if let Some(file) = &shared.unmatched
            && !unmatched.is_empty()
        {
            let mut file = file.lock().unwrap_or_else(PoisonError::into_inner);
            let written = unmatched
                .iter()
                .try_for_each(|line| writeln!(file, "{line}"))
                .and_then(|()| file.flush());
            if let Err(e) = written {
                tracing::warn!(error = %e, "cannot write unmatched events");
            }
        }
        shared.metrics.events_read(events);
        shared.metrics.normalized(normalized);
        // Registered before anything can be acknowledged.
        shared.acks.register(&registrations);
        if !dead.records.is_empty() && dead_letters.send(dead).await.is_err() {
            break;
        }
        for (p, messages) in out.into_iter().enumerate() {
            if !messages.is_empty() && producer.send(p, messages).await.is_err() {
                tracing::error!(partition = p, "the internal hub closed; stopping normalize");
                return;
            }
        }
    }
    producer.close().await;
}
