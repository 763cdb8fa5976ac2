//! End-to-end pipeline benchmark: `iomt replay` of a generated capture into a local blackhole
//! FHIR server, against normalize-only throughput of the same events in the same run.
//!
//! ```sh
//! cargo bench -p iomt-cli --bench pipeline            # 1,000,000 events, 1,000 devices
//! IOMT_BENCH_EVENTS=200000 cargo bench -p iomt-cli --bench pipeline
//! ```
//!
//! The blackhole is a test-only FHIR endpoint in this process: it answers Device searches with
//! a Device linked to a Patient (Lookup mode), Observation searches with an empty Bundle, and
//! PUTs with the body and an ETag, and counts every request. The pipeline runs in its own
//! process (the release `iomt` binary), so its peak RSS is its own. Templates are the heart
//! rate sample (hourly SampledData, periodInterval 60); `--max-wait 1s`.

use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use iomt_hub::capture::{Record, read_jsonl};
use iomt_normalize::Normalizer;
use iomt_templates::device::DeviceMapping;
use serde_json::json;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes `events` heart rate events from `devices` watches, one reading per device per
/// second, interleaved as a hub delivers them.
fn generate(path: &Path, events: usize, devices: usize) {
    if path.exists() {
        return;
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = path.with_extension("tmp");
    let mut out = BufWriter::new(std::fs::File::create(&tmp).unwrap());
    let start = 1_795_154_400i64; // 2026-11-20T06:00:00Z
    for i in 0..events {
        let (second, device) = ((i / devices) as i64, i % devices);
        let t = start + second;
        let time = chrono_like(t, (device % 1000) as u32);
        let line = json!({
            "Body": {
                "deviceId": format!("watch-{device:05}"),
                "patientId": format!("patient-{device:05}"),
                "heartRate": 55 + (i * 7919) % 70,
                "measuredAt": time,
            },
            "SystemProperties": {"x-opt-enqueued-time": time, "x-opt-sequence-number": i + 1},
        });
        writeln!(out, "{line}").unwrap();
    }
    out.flush().unwrap();
    drop(out);
    std::fs::rename(tmp, path).unwrap();
}

/// `yyyy-MM-ddTHH:mm:ss.fffZ` for a Unix time and milliseconds.
fn chrono_like(unix: i64, millis: u32) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[derive(Debug, Default)]
struct Counts {
    device_searches: AtomicU64,
    observation_searches: AtomicU64,
    puts: AtomicU64,
    put_bytes: AtomicU64,
}

async fn search(
    State(counts): State<Arc<Counts>>,
    axum::extract::Path(resource_type): axum::extract::Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> impl IntoResponse {
    let identifier = params
        .iter()
        .find(|(k, _)| k == "identifier")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let entries = if resource_type == "Device" {
        counts.device_searches.fetch_add(1, Ordering::Relaxed);
        let id: String = identifier
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        json!([{"resource": {"resourceType": "Device", "id": format!("d{id}"),
            "identifier": [{"value": identifier}],
            "patient": {"reference": format!("Patient/p{id}")}}}])
    } else {
        counts.observation_searches.fetch_add(1, Ordering::Relaxed);
        json!([])
    };
    (
        [(header::CONTENT_TYPE, "application/fhir+json")],
        json!({"resourceType": "Bundle", "type": "searchset", "entry": entries}).to_string(),
    )
}

async fn update(State(counts): State<Arc<Counts>>, body: Bytes) -> impl IntoResponse {
    counts.puts.fetch_add(1, Ordering::Relaxed);
    counts
        .put_bytes
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    let mut headers = HeaderMap::new();
    headers.insert(header::ETAG, "W/\"1\"".parse().unwrap());
    headers.insert(
        header::CONTENT_TYPE,
        "application/fhir+json".parse().unwrap(),
    );
    (StatusCode::OK, headers, body)
}

/// Starts the blackhole on its own thread; returns its base URL.
fn blackhole(counts: Arc<Counts>) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = Router::new()
                .route("/fhir/{resource_type}", get(search))
                .route("/fhir/{resource_type}/{id}", put(update))
                .with_state(counts);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    format!("http://{}/fhir", rx.recv().unwrap())
}

/// Events/s of normalization alone, single-threaded, over the same file (reading and JSON
/// parsing included, as in the pipeline).
fn normalize_only(path: &Path, mapping: &Path) -> (usize, f64) {
    let normalizer =
        Normalizer::new(DeviceMapping::parse(&std::fs::read_to_string(mapping).unwrap()).unwrap());
    let started = Instant::now();
    let reader = BufReader::with_capacity(1 << 20, std::fs::File::open(path).unwrap());
    let mut n = 0;
    let mut measurements = 0;
    for record in read_jsonl(reader, "bench") {
        if let Ok(Record::Event(e)) = record {
            measurements += normalizer.normalize_event(&e.event).measurements.len();
            n += 1;
        }
    }
    assert_eq!(measurements, n, "every event yields one measurement");
    (n, n as f64 / started.elapsed().as_secs_f64())
}

fn field<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(prefix))
        .map(str::trim)
}

fn number_after(text: &str, marker: &str) -> Option<f64> {
    let at = text.find(marker)? + marker.len();
    let digits: String = text[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == '.')
        .filter(|c| *c != ',')
        .collect();
    digits.parse().ok()
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing and wants a quick
    // check.
    let quick = !std::env::args().any(|a| a == "--bench");
    let events = env_usize("IOMT_BENCH_EVENTS", if quick { 20_000 } else { 1_000_000 });
    let devices = env_usize("IOMT_BENCH_DEVICES", 1000);
    let root = repo();
    let data = root.join(format!(
        "target/bench-data/heartrate-{events}-{devices}.jsonl"
    ));
    generate(&data, events, devices);
    let device_mapping = root.join("mappings/heartrate/devicecontent.json");
    let fhir_mapping = root.join("mappings/heartrate/fhirmapping.json");

    let (n, normalize_rate) = normalize_only(&data, &device_mapping);
    assert_eq!(n, events);

    let counts = Arc::new(Counts::default());
    let url = blackhole(counts.clone());
    let state = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_iomt"))
        .args([
            "replay",
            "--no-progress",
            "--restart",
            "--identity-mode",
            "lookup",
        ])
        .arg(&data)
        .arg("--device-mapping")
        .arg(&device_mapping)
        .arg("--fhir-mapping")
        .arg(&fhir_mapping)
        .args(["--fhir-url", &url, "--max-wait", "1s", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    let wall = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "replay failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rate = number_after(&stdout, "s (").unwrap_or(0.0);
    let p99 = number_after(&stdout, "p99").unwrap_or(f64::NAN);
    let rss = number_after(&stdout, "peak RSS").unwrap_or(f64::NAN);
    let written = field(&stdout, "measurements").unwrap_or("?");
    println!(
        "pipeline: iomt replay, {events} events, {devices} devices, heartrate periodInterval 60, --max-wait 1s, blackhole FHIR sink"
    );
    println!("  replay          {rate:>12.0} events/s  (process wall time {wall:.2} s)");
    println!(
        "  normalize only  {normalize_rate:>12.0} events/s  (one thread, same events, same run)"
    );
    println!("  ratio           {:>12.2}", rate / normalize_rate);
    println!("  p99 read→write  {p99:>12.0} ms");
    println!("  peak RSS        {rss:>12.0} MB");
    println!("  measurements    {written}");
    println!(
        "  blackhole       {} PUTs ({} MB), {} Observation searches, {} Device searches",
        counts.puts.load(Ordering::Relaxed),
        counts.put_bytes.load(Ordering::Relaxed) / 1_000_000,
        counts.observation_searches.load(Ordering::Relaxed),
        counts.device_searches.load(Ordering::Relaxed)
    );
    if !quick {
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        println!(
            "  targets         ≥100,000 events/s: {}; RSS ≤300 MB: {}; p99 ≤2 s: {}",
            verdict(rate >= 100_000.0),
            verdict(rss <= 300.0),
            verdict(p99 <= 2000.0)
        );
    }
}
