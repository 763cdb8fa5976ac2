//! Convert throughput without network: measurement groups in, Observation JSON out, with and
//! without merging into an existing Observation.
//!
//! Run with `cargo bench -p iomt-convert --bench convert`. The workload is MedTech's commonest
//! shape: hourly SampledData at 1 s resolution (3,600 slots per Observation), one group of 60
//! heart-rate readings per device, for 200 devices, plus blood-pressure Quantity components
//! (one Observation per reading). The merge benchmark folds each group into an Observation
//! that already holds the previous half hour. The reference is serializing the produced
//! Observations with `serde_json::to_vec`, which every write to a FHIR server has to do anyway.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput};
use std::collections::HashMap;

use iomt_convert::{
    Merge, ResourceIds, SERVICE_SYSTEM, build_observation, identifier_value, merge_observation,
    observation_groups, resource_id,
};
use iomt_core::{Measurement, MeasurementGroup, MeasurementProperty, Timestamp};
use iomt_templates::fhir::FhirMapping;
use serde_json::Value;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEVICES: usize = 200;
const READINGS: usize = 60;

const FHIR: &str = r#"{"templateType": "CollectionFhir", "template": [
  {"templateType": "CodeValueFhir", "template": {"typeName": "heartrate", "periodInterval": 60,
    "codes": [{"code": "8867-4", "system": "http://loinc.org", "display": "Heart rate"}],
    "value": {"valueName": "hr", "valueType": "SampledData", "defaultPeriod": 1000, "unit": "/min"}}},
  {"templateType": "CodeValueFhir", "template": {"typeName": "bloodpressure", "periodInterval": 0,
    "codes": [{"code": "85354-9", "system": "http://loinc.org"}],
    "components": [
      {"codes": [{"code": "8480-6", "system": "http://loinc.org"}], "value": {"valueName": "systolic", "valueType": "Quantity", "unit": "mmHg"}},
      {"codes": [{"code": "8462-4", "system": "http://loinc.org"}], "value": {"valueName": "diastolic", "valueType": "Quantity", "unit": "mmHg"}}]}}
]}"#;

fn groups(start: &str) -> Vec<MeasurementGroup> {
    let start = Timestamp::parse(start).expect("valid time");
    let mut measurements = Vec::new();
    for d in 0..DEVICES {
        for r in 0..READINGS {
            let at = start.add_ticks(r as i64 * 30 * 10_000_000 + d as i64 * 10_000_000);
            let make = |type_name: &str, props: Vec<(&str, String)>| Measurement {
                type_name: Arc::from(type_name),
                occurrence_time_utc: at,
                ingestion_time_utc: Some(at),
                device_id: format!("device-{d}"),
                patient_id: Some(format!("patient-{d}")),
                encounter_id: None,
                correlation_id: None,
                properties: props
                    .into_iter()
                    .map(|(n, v)| MeasurementProperty {
                        name: Arc::from(n),
                        value: v,
                    })
                    .collect(),
            };
            measurements.push(make(
                "heartrate",
                vec![("hr", (60 + (r + d) % 40).to_string())],
            ));
            if r % 10 == 0 {
                measurements.push(make(
                    "bloodpressure",
                    vec![
                        ("systolic", (110 + r % 20).to_string()),
                        ("diastolic", (70 + d % 15).to_string()),
                    ],
                ));
            }
        }
    }
    MeasurementGroup::group(measurements)
}

fn convert_all(fhir: &FhirMapping, groups: &[MeasurementGroup]) -> Vec<Value> {
    let issued = Timestamp::parse("2026-11-22T00:00:00Z").expect("valid time");
    let mut out = Vec::new();
    for g in groups {
        let template = fhir.template(&g.type_name).expect("template");
        let ids = ResourceIds::placeholders(g);
        for w in observation_groups(template.period_interval, g).expect("groups") {
            out.push(build_observation(template, &w, &ids, issued).expect("observation"));
        }
    }
    out
}

fn main() {
    let fhir = FhirMapping::parse(FHIR).expect("valid mapping");
    let earlier = groups("2026-11-22T08:00:00Z");
    let later = groups("2026-11-22T08:30:00Z");
    let existing: Vec<Value> = convert_all(&fhir, &earlier);
    let measurements: usize = later.iter().map(|g| g.measurements.len()).sum();
    let built = convert_all(&fhir, &later);

    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("convert");
    group.throughput(Throughput::Elements(measurements as u64));
    group.bench_function("build", |b| {
        b.iter(|| black_box(convert_all(&fhir, black_box(&later))))
    });
    let existing: HashMap<String, Value> = existing
        .into_iter()
        .map(|o| (o["id"].as_str().unwrap_or_default().to_owned(), o))
        .collect();
    group.bench_function("merge", |b| {
        b.iter(|| {
            // Every heart-rate window already exists (the same hours), so each is a SampledData
            // merge; blood-pressure readings are new instants and are created.
            let mut written = 0usize;
            for g in &later {
                let template = fhir.template(&g.type_name).expect("template");
                let ids = ResourceIds::placeholders(g);
                for w in observation_groups(template.period_interval, g).expect("groups") {
                    let id = resource_id(SERVICE_SYSTEM, &identifier_value(&ids, &w));
                    let o = match existing.get(&id) {
                        Some(old) => match merge_observation(old, template, &w).expect("merge") {
                            Merge::Updated(o) => o,
                            Merge::Unchanged => continue,
                        },
                        None => build_observation(template, &w, &ids, Timestamp::now())
                            .expect("observation"),
                    };
                    written += black_box(o).as_object().map_or(0, |m| m.len());
                }
            }
            written
        })
    });
    group.bench_function("serde_json_to_vec_reference", |b| {
        b.iter(|| {
            built
                .iter()
                .map(|o| {
                    serde_json::to_vec(black_box(o))
                        .expect("serializable")
                        .len()
                })
                .sum::<usize>()
        })
    });
    group.finish();
    c.final_summary();
    println!(
        "summary: {measurements} measurements per pass, {} Observations built",
        built.len()
    );
}
