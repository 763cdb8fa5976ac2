//! The change feed's own cost per change: reading a 1,000-entry `_history` page (the largest
//! page most servers serve) and running it through a tail cycle, against plain `serde_json`
//! parsing of the same page in the same run. The network and the server are not in it: this is
//! the ceiling the feed's CPU puts on its throughput.
//!
//! Run with `cargo bench -p iomt-events --bench changefeed`. After criterion's report the bench
//! prints changes/s for both and their ratio.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use iomt_core::Timestamp;
use iomt_events::changefeed::{Tail, TailSettings, TailState, read_history_page};
use serde_json::{Value, json};

const ENTRIES: usize = 1000;

/// A page as a FHIR server sends it: Observations with a resource (about 600 bytes each), a
/// few deletes without one, newest first.
fn page() -> Vec<u8> {
    let entries: Vec<Value> = (0..ENTRIES)
        .rev()
        .map(|i| {
            let at = format!("2026-01-01T00:{:02}:{:02}.{:03}Z", i / 60_000 % 60, i / 1000 % 60, i % 1000);
            if i % 50 == 0 {
                return json!({"request": {"method": "DELETE", "url": format!("Observation/o{i}")},
                    "response": {"status": "204", "etag": "W/\"2\"", "lastModified": at}});
            }
            json!({"fullUrl": format!("https://fhir.example.org/Observation/o{i}"),
                "resource": {"resourceType": "Observation", "id": format!("o{i}"),
                    "meta": {"versionId": "1", "lastUpdated": at},
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
                    "subject": {"reference": format!("Patient/p{}", i % 100)},
                    "device": {"reference": format!("Device/d{}", i % 100)},
                    "effectivePeriod": {"start": at, "end": at},
                    "valueQuantity": {"value": 60 + i % 40, "unit": "count/min", "system": "http://unitsofmeasure.org", "code": "/min"}},
                "request": {"method": "PUT", "url": format!("Observation/o{i}")},
                "response": {"status": "201", "etag": "W/\"1\"", "lastModified": at}})
        })
        .collect();
    serde_json::to_vec(&json!({"resourceType": "Bundle", "type": "history",
        "link": [{"relation": "next", "url": "https://fhir.example.org/_history?_count=1000&_offset=1000"}],
        "entry": entries}))
    .unwrap()
}

fn main() {
    let bytes = page();
    let settings = TailSettings {
        settle: Duration::from_secs(5),
        overlap: Duration::from_secs(60),
    };
    let now = Timestamp::parse("2026-01-01T01:00:00Z").unwrap();
    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("changefeed");
    group.throughput(Throughput::Elements(ENTRIES as u64));
    group.bench_function("serde_json_parse", |b| {
        b.iter(|| black_box(serde_json::from_slice::<Value>(black_box(&bytes)).unwrap()))
    });
    group.bench_function("read_and_cycle", |b| {
        b.iter(|| {
            let bundle: Value = serde_json::from_slice(black_box(&bytes)).unwrap();
            let page = read_history_page(&bundle).unwrap();
            let mut tail = Tail::new(settings, &TailState::default()).unwrap();
            let cycle = tail.cycle(now, page.entries);
            tail.commit(&cycle);
            black_box(cycle.entries.len())
        })
    });
    group.finish();
    c.final_summary();
    let estimate = |name: &str| -> Option<f64> {
        let path = format!("target/criterion/changefeed/{name}/new/estimates.json");
        let text = std::fs::read_to_string(path)
            .or_else(|_| {
                std::fs::read_to_string(format!(
                    "../../target/criterion/changefeed/{name}/new/estimates.json"
                ))
            })
            .ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        v["mean"]["point_estimate"].as_f64()
    };
    if let (Some(parse), Some(feed)) = (estimate("serde_json_parse"), estimate("read_and_cycle")) {
        let per_s = |ns: f64| ENTRIES as f64 / (ns / 1e9);
        println!(
            "serde_json parse: {:.0} entries/s; read + cycle: {:.0} changes/s ({:.2}x the parse time)",
            per_s(parse),
            per_s(feed),
            feed / parse
        );
    }
}
