use std::sync::Arc;
use std::time::Duration;

use iomt_core::{MeasurementProperty, Timestamp};

use super::*;

fn m(device: &str, type_name: &str, time: &str) -> Measurement {
    Measurement {
        type_name: Arc::from(type_name),
        occurrence_time_utc: Timestamp::parse(time).unwrap(),
        ingestion_time_utc: None,
        device_id: device.into(),
        patient_id: None,
        encounter_id: None,
        correlation_id: None,
        properties: vec![MeasurementProperty {
            name: Arc::from("v"),
            value: "1".into(),
        }],
    }
}

fn hourly(type_name: &str) -> Option<PeriodInterval> {
    match type_name {
        "hr" => Some(PeriodInterval::Hourly),
        "bp" => Some(PeriodInterval::Single),
        _ => None,
    }
}

#[test]
fn limits_are_validated() {
    assert_eq!(
        GroupConfig::new(0, Duration::from_secs(1)),
        Err(GroupConfigError::MaxEvents)
    );
    assert!(GroupConfig::new(1, Duration::from_millis(99)).is_err());
    assert!(GroupConfig::new(1, Duration::from_millis(100)).is_ok());
    assert_eq!(GroupConfig::default().max_events(), 1000);
    assert_eq!(GroupConfig::default().max_wait(), Duration::from_secs(300));
}

#[test]
fn max_events_flushes_the_full_buffer_only() {
    let mut g = Grouper::new(
        GroupConfig::new(3, Duration::from_secs(60)).unwrap(),
        hourly,
    );
    assert!(
        g.push(m("d1", "hr", "2026-11-20T08:00:01Z"), 1, 0)
            .is_none()
    );
    assert!(
        g.push(m("d2", "hr", "2026-11-20T08:00:02Z"), 2, 0)
            .is_none()
    );
    assert!(
        g.push(m("d1", "hr", "2026-11-20T08:10:00Z"), 3, 5)
            .is_none()
    );
    let flush = g.push(m("d1", "hr", "2026-11-20T08:59:59Z"), 4, 9).unwrap();
    assert_eq!(flush.reason, FlushReason::MaxEvents);
    assert_eq!(flush.positions, vec![1, 3, 4]);
    assert_eq!(flush.group.device_id, "d1");
    assert_eq!(g.buffered(), 1);
}

#[test]
fn max_wait_flushes_on_the_injected_clock() {
    let mut g = Grouper::new(
        GroupConfig::new(1000, Duration::from_millis(500)).unwrap(),
        hourly,
    );
    g.push(m("d1", "hr", "2026-11-20T08:00:01Z"), 1, 1_000);
    g.push(m("d2", "hr", "2026-11-20T08:00:01Z"), 2, 1_200);
    assert_eq!(g.next_deadline_ms(), Some(1_500));
    assert!(g.expired(1_499).is_empty());
    let flushed = g.expired(1_500);
    assert_eq!(flushed.len(), 1);
    assert_eq!(
        (flushed[0].reason, flushed[0].group.device_id.as_str()),
        (FlushReason::MaxWait, "d1")
    );
    assert_eq!(g.next_deadline_ms(), Some(1_700));
    // A measurement joining an open buffer does not extend its deadline.
    g.push(m("d2", "hr", "2026-11-20T08:30:00Z"), 3, 1_650);
    let flushed = g.expired(1_700);
    assert_eq!(flushed[0].positions, vec![2, 3]);
    assert_eq!(g.buffered(), 0);
    assert_eq!(g.next_deadline_ms(), None);
}

#[test]
fn buffers_split_by_window_type_and_ids() {
    let mut g = Grouper::new(GroupConfig::default(), hourly);
    g.push(m("d1", "hr", "2026-11-20T08:00:00Z"), 1, 0);
    g.push(m("d1", "hr", "2026-11-20T08:59:00Z"), 2, 0); // same hour: same buffer
    g.push(m("d1", "hr", "2026-11-20T09:00:00Z"), 3, 0); // next hour
    g.push(m("d1", "bp", "2026-11-20T08:00:00Z"), 4, 0); // Single: one per instant
    g.push(m("d1", "bp", "2026-11-20T08:00:01Z"), 5, 0);
    let mut other_patient = m("d1", "hr", "2026-11-20T08:00:00Z");
    other_patient.patient_id = Some("p2".into());
    g.push(other_patient, 6, 0);
    g.push(m("d1", "unknown", "2026-11-20T08:00:00Z"), 7, 0);
    g.push(m("d1", "unknown", "2026-11-21T08:00:00Z"), 8, 0); // no template: one buffer
    let drained = g.drain();
    let positions: Vec<Vec<i64>> = drained.iter().map(|f| f.positions.clone()).collect();
    assert_eq!(
        positions,
        vec![vec![1, 2], vec![3], vec![4], vec![5], vec![6], vec![7, 8]]
    );
    assert!(drained.iter().all(|f| f.reason == FlushReason::Shutdown));
    assert_eq!(g.buffered(), 0);
}

#[test]
fn a_missing_id_and_an_empty_one_share_a_group() {
    let mut g = Grouper::new(
        GroupConfig::new(2, Duration::from_secs(60)).unwrap(),
        hourly,
    );
    let mut empty = m("d1", "hr", "2026-11-20T08:00:01Z");
    empty.patient_id = Some(String::new());
    empty.encounter_id = Some(String::new());
    assert!(g.push(empty, 1, 0).is_none());
    let full = g
        .push(m("d1", "hr", "2026-11-20T08:00:02Z"), 2, 0)
        .expect("the second measurement fills the same group");
    assert_eq!(full.positions, vec![1, 2]);
    // The group carries the ids of its first measurement.
    assert_eq!(full.group.patient_id.as_deref(), Some(""));
    let mut other = m("d1", "hr", "2026-11-20T08:00:03Z");
    other.patient_id = Some(" ".into());
    assert!(g.push(other, 3, 0).is_none());
    assert!(
        g.push(m("d1", "hr", "2026-11-20T08:00:04Z"), 4, 0)
            .is_none()
    );
}
