//! Normalize throughput over the sample collection, against plain JSON parsing of the same
//! events in the same run.
//!
//! Run with `cargo bench -p iomt-normalize --bench normalize`. The collection is every
//! template under `mappings/*/devicecontent.json` in one CollectionContent (9 templates:
//! JSONPath, JMESPath, IoT Hub and IoT Central); the events are 1,000 variations of the example
//! messages under `examples/messages/` (200–500 bytes each), so every event is matched by one
//! or a few templates and missed by the rest, as in a real mixed fleet.
//!
//! After criterion's report the bench prints events/s for both benchmarks and their ratio
//! (normalize ÷ parse), read from criterion's own estimates.

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{Criterion, Throughput};
use iomt_core::DeviceEvent;
use iomt_normalize::Normalizer;
use iomt_templates::device::DeviceMapping;
use serde_json::{Map, Value};

/// The allocator the `iomt` binary uses, so the figures match production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EVENTS: usize = 1000;
const GROUP: &str = "normalize";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// All sample templates in one collection.
fn collection() -> Normalizer {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(repo().join("mappings"))
        .expect("mappings/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("devicecontent.json").is_file())
        .collect();
    dirs.sort();
    let mut templates = Vec::new();
    for dir in dirs {
        let text = std::fs::read_to_string(dir.join("devicecontent.json")).expect("readable");
        let doc: Value = serde_json::from_str(&text).expect("sample mappings are strict JSON");
        templates.extend(
            doc["template"]
                .as_array()
                .expect("template array")
                .iter()
                .cloned(),
        );
    }
    let doc = serde_json::json!({"templateType": "CollectionContent", "template": templates});
    let mapping = DeviceMapping::parse(&doc.to_string()).expect("sample collection is valid");
    assert!(
        mapping.templates.len() >= 5,
        "the benchmark needs at least five templates"
    );
    Normalizer::new(mapping)
}

fn example(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join("examples/messages").join(path))
        .expect("example message");
    serde_json::from_str(&text).expect("example is JSON")
}

/// Varies numbers and ids so that no two events are the same bytes.
fn vary(value: &mut Value, i: usize) {
    match value {
        Value::Number(n) => {
            if let Some(x) = n.as_i64() {
                *value = Value::from(x + (i % 7) as i64);
            } else if let Some(x) = n.as_f64() {
                *value = Value::from(x + (i % 5) as f64 * 0.1);
            }
        }
        Value::String(s) if s.contains('-') && !s.starts_with("20") => {
            s.push_str(&format!("-{}", i % 100))
        }
        Value::Array(a) => a.iter_mut().for_each(|v| vary(v, i)),
        Value::Object(m) => m.values_mut().for_each(|v| vary(v, i)),
        _ => {}
    }
}

fn events() -> Vec<DeviceEvent> {
    let bodies = [
        "heartrate/watch.json",
        "bloodpressure/cuff.json",
        "spo2/oximeter.json",
        "steps/band.json",
        "iotcentral/export.json",
    ];
    let iot = example("iothub/vitals-envelope.json");
    (0..EVENTS)
        .map(|i| {
            if i % 6 == 5 {
                let mut env = iot.clone();
                vary(&mut env["Body"], i);
                let object = |v: &Value| v.as_object().cloned().unwrap_or_else(Map::new);
                DeviceEvent {
                    body: serde_json::to_vec(&env["Body"]).expect("serializable"),
                    properties: object(&env["Properties"]),
                    system_properties: object(&env["SystemProperties"]),
                    enqueued_time: None,
                }
            } else {
                let mut body = example(bodies[i % 6]);
                vary(&mut body, i);
                DeviceEvent {
                    body: serde_json::to_vec(&body).expect("serializable"),
                    ..DeviceEvent::default()
                }
            }
        })
        .collect()
}

fn bench(c: &mut Criterion, normalizer: &Normalizer, events: &[DeviceEvent]) {
    let mut group = c.benchmark_group(GROUP);
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("serde_json_parse", |b| {
        b.iter(|| {
            for e in events {
                black_box(serde_json::from_slice::<Value>(black_box(&e.body)).expect("valid"));
            }
        })
    });
    group.bench_function("normalize", |b| {
        b.iter(|| {
            for e in events {
                black_box(normalizer.normalize_event(black_box(e)));
            }
        })
    });
    group.finish();
}

/// Mean time per iteration (one pass over all events), from criterion's estimates.
fn mean_ns(bench: &str) -> Option<f64> {
    let dir = std::env::var_os("CRITERION_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/criterion"));
    let text =
        std::fs::read_to_string(dir.join(GROUP).join(bench).join("new/estimates.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

/// Alternates one parse pass and one normalize pass `rounds` times and returns the per-pass
/// times in seconds; interference from other work on the machine hits both alike.
fn interleaved(
    normalizer: &Normalizer,
    events: &[DeviceEvent],
    rounds: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (mut parse, mut norm) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for _ in 0..rounds {
        let start = std::time::Instant::now();
        for e in events {
            black_box(serde_json::from_slice::<Value>(black_box(&e.body)).expect("valid"));
        }
        parse.push(start.elapsed().as_secs_f64());
        let start = std::time::Instant::now();
        for e in events {
            black_box(normalizer.normalize_event(black_box(e)));
        }
        norm.push(start.elapsed().as_secs_f64());
    }
    (parse, norm)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let normalizer = collection();
    let events = events();
    let bytes: usize = events.iter().map(|e| e.body.len()).sum();
    let measurements: usize = events
        .iter()
        .map(|e| normalizer.normalize_event(e).measurements.len())
        .sum();
    let errors: usize = events
        .iter()
        .map(|e| normalizer.normalize_event(e).errors.len())
        .sum();
    assert_eq!(errors, 0, "the benchmark events must normalize cleanly");
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &normalizer, &events);
    c.final_summary();
    if let (Some(parse), Some(norm)) = (mean_ns("serde_json_parse"), mean_ns("normalize")) {
        let per_s = |ns: f64| EVENTS as f64 / (ns * 1e-9);
        println!(
            "summary: {} templates, {EVENTS} events, {} bytes/event on average, {measurements} measurements per pass",
            normalizer.mapping().templates.len(),
            bytes / EVENTS
        );
        println!("summary: serde_json parse {:.0} events/s", per_s(parse));
        println!("summary: normalize        {:.0} events/s", per_s(norm));
        println!("summary: ratio normalize/parse {:.3}", parse / norm);
    }
    if std::env::args().any(|a| a == "--bench") {
        let (parse, norm) = interleaved(&normalizer, &events, 300);
        let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let per_s = |secs: f64| EVENTS as f64 / secs;
        println!(
            "summary: interleaved, 300 alternating passes: parse best {:.0} / median {:.0} events/s, normalize best {:.0} / median {:.0} events/s, ratio of medians {:.3}",
            per_s(best(&parse)),
            per_s(median(parse.clone())),
            per_s(best(&norm)),
            per_s(median(norm.clone())),
            median(parse) / median(norm)
        );
    }
}
