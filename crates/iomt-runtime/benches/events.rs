//! Change event fan-out benchmark: the delivery service draining a local event log of N
//! resource versions into three subscriptions (CloudEvents, Event Grid and id-only JSON Lines
//! files), against the bare work measured in the same run: rendering each event in the three
//! formats with serde_json and appending it to three buffered files on one thread.
//!
//! ```sh
//! cargo bench -p iomt-runtime --bench events                # 300,000 versions
//! IOMT_BENCH_VERSIONS=1000000 cargo bench -p iomt-runtime --bench events
//! ```
//!
//! `cargo test --benches` runs it on 2,000 versions as a check.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iomt_core::{Action, Written};
use iomt_events::{ChangeEvent, ChangeKind, Format, Publisher};
use iomt_runtime::config::{Destination, Subscription};
use iomt_runtime::events::EventService;
use iomt_runtime::{Config, Metrics, Purpose};
use tokio::sync::watch;

const FORMATS: [Format; 3] = [Format::Cloudevents, Format::EventGrid, Format::IdOnly];

/// CPU time of this process so far (`/proc/self/stat`, ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

fn versions(n: usize) -> Vec<Written> {
    (0..n)
        .map(|i| Written {
            resource_type: "Observation".into(),
            id: format!("{:064x}", i / 3),
            version_id: Some((i % 3 + 1).to_string()),
            last_updated: Some("2026-12-02T10:00:00.0000000Z".into()),
            action: if i % 3 == 0 {
                Action::Created
            } else {
                Action::Updated
            },
            identity: false,
        })
        .collect()
}

fn config(dir: &Path) -> Config {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut config = Config::default();
    config.templates.device_mapping = Some(repo.join("mappings/heartrate/devicecontent.json"));
    config.templates.fhir_mapping = Some(repo.join("mappings/heartrate/fhirmapping.json"));
    // The local event log of a run into a FHIR server; the server itself is never called
    // (no subscription reads resources).
    config.fhir.url = Some("http://127.0.0.1:9/fhir".into());
    config.output.state_dir = dir.join("state");
    config.events.fhir_account = Some("bench.fhir.example.org".into());
    config.events.drain_deadline = Duration::from_secs(3600);
    config.subscriptions = FORMATS
        .iter()
        .enumerate()
        .map(|(i, format)| Subscription {
            name: format!("s{i}"),
            format: *format,
            filter: Default::default(),
            retry: Default::default(),
            destination: Destination::Ndjson {
                path: dir.join(format!("s{i}.ndjson")),
            },
            dead_letter: None,
            max_in_flight: 1000,
            consumer_group: None,
        })
        .collect();
    config
}

/// The bare work: every event rendered in the three formats and appended to three files.
fn reference(dir: &Path, versions: &[Written]) -> f64 {
    let publisher = Publisher {
        source: "iomt".into(),
        fhir_account: "bench.fhir.example.org".into(),
    };
    let started = Instant::now();
    let mut files: Vec<_> = (0..3)
        .map(|i| {
            std::io::BufWriter::new(
                std::fs::File::create(dir.join(format!("reference-{i}.ndjson"))).unwrap(),
            )
        })
        .collect();
    for (seq, w) in versions.iter().enumerate() {
        let kind = ChangeKind::of(w.action).unwrap();
        let mut event = ChangeEvent::of_version(&publisher.source, w, kind);
        event.sequence = Some(seq as u64 + 1);
        for (file, format) in files.iter_mut().zip(FORMATS) {
            let rendered = iomt_events::render(&event, &publisher, format, None);
            file.write_all(&rendered.body).unwrap();
            file.write_all(b"\n").unwrap();
        }
    }
    for file in files {
        file.into_inner().unwrap().sync_data().unwrap();
    }
    versions.len() as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("IOMT_BENCH_VERSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 2_000 } else { 300_000 });
    let dir = tempfile::tempdir().unwrap();
    let versions = versions(n);
    let log = iomt_store::EventLog::open(&dir.path().join("state")).unwrap();
    for chunk in versions.chunks(10_000) {
        log.append(chunk).unwrap();
    }
    drop(log);
    let reference_rate = reference(dir.path(), &versions);

    let compiled = config(dir.path()).compile(Purpose::Replay).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let metrics = Arc::new(Metrics::new());
    let (cpu_before, started) = (cpu_seconds(), Instant::now());
    let report = runtime.block_on(async {
        let (_, service) = EventService::build(&compiled, metrics.clone()).unwrap();
        // Stopped from the start: the service drains the log, then ends.
        let (_stop, stop) = watch::channel(true);
        service.unwrap().spawn(stop).await.unwrap()
    });
    let (wall, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu_before);
    for (name, position, unfinished, disabled) in &report.subscriptions {
        assert_eq!(
            (*position, *unfinished, disabled.as_deref()),
            (n as i64, 0, None),
            "{name}"
        );
    }
    let delivered = metrics.summary().events_delivered;
    assert_eq!(delivered, 3 * n as u64);
    let rate = n as f64 / wall;
    println!(
        "events: fan-out of {n} versions from the local event log to 3 JSON Lines subscriptions"
    );
    println!(
        "  reference        {reference_rate:>10.0} versions/s  (render 3 formats + append, one thread, same run)"
    );
    println!(
        "  delivery service {rate:>10.0} versions/s  ({:.0} deliveries/s, {wall:.2} s, {:.2} cores, {:.2}× the reference)",
        3.0 * rate,
        cpu / wall,
        rate / reference_rate
    );
    if !quick {
        let verdict = if rate >= 50_000.0 { "met" } else { "MISSED" };
        println!("  target           ≥50,000 versions/s to 3 subscriptions: {verdict}");
    }
}
