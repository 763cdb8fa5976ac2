//! Event Grid filters: any JSON is a filter that validates or is refused, and one that
//! validates matches events without panicking.
#![no_main]

use iomt_events::{ChangeEvent, ChangeKind, Filter, Publisher};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(filter) = serde_json::from_slice::<Filter>(data) else {
        return;
    };
    if filter.validate().is_err() {
        return;
    }
    let publisher = Publisher {
        source: "iomt".into(),
        fhir_account: "fhir.example.org".into(),
    };
    for (kind, version) in [
        (ChangeKind::Created, "1"),
        (ChangeKind::Updated, "2"),
        (ChangeKind::Deleted, "x"),
    ] {
        let event = ChangeEvent::new(
            &publisher.source,
            kind,
            "Observation",
            "o1",
            version,
            "2024-03-05T09:00:00Z",
        );
        let _ = filter.matches(&event, &publisher);
    }
});
