//! What the throughput benchmarks share (`crates/iomt-cli/benches/pipeline.rs`,
//! `tests/benches/eventhubs.rs`): one workload, so that their figures compare, and a FHIR
//! endpoint that costs next to nothing, so that they measure iomt rather than a server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use serde_json::json;

/// One generated device event.
#[derive(Debug, Clone)]
pub struct Event {
    /// The watch's number.
    pub device: usize,
    /// When it was measured (`yyyy-MM-ddTHH:mm:ss.fffZ`), also its enqueued time.
    pub time: String,
    /// The JSON body, as the heart rate sample templates (`mappings/heartrate`) read it.
    pub body: String,
}

/// A watch's device id.
pub fn device_id(device: usize) -> String {
    format!("watch-{device:05}")
}

/// `events` heart rate events from `devices` watches, one reading per watch per second,
/// interleaved as a hub delivers them.
pub fn generate(events: usize, devices: usize) -> Vec<Event> {
    let start = 1_795_154_400i64; // 2026-11-20T06:00:00Z
    (0..events)
        .map(|i| {
            let (second, device) = ((i / devices) as i64, i % devices);
            let time = chrono_like(start + second, (device % 1000) as u32);
            let body = json!({
                "deviceId": device_id(device),
                "patientId": format!("patient-{device:05}"),
                "heartRate": 55 + (i * 7919) % 70,
                "measuredAt": time,
            })
            .to_string();
            Event { device, time, body }
        })
        .collect()
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

/// The requests the blackhole answered.
#[derive(Debug, Default)]
pub struct Counts {
    /// Device searches (identity lookups).
    pub device_searches: AtomicU64,
    /// Observation searches (cache misses of the writer).
    pub observation_searches: AtomicU64,
    /// PUTs.
    pub puts: AtomicU64,
    /// Bytes PUT.
    pub put_bytes: AtomicU64,
}

impl Counts {
    /// PUTs, Observation searches and Device searches so far.
    pub fn snapshot(&self) -> [u64; 3] {
        [
            self.puts.load(Ordering::Relaxed),
            self.observation_searches.load(Ordering::Relaxed),
            self.device_searches.load(Ordering::Relaxed),
        ]
    }
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

/// Answers a PUT with its body: 201 without `If-Match` (a create, since searches find nothing),
/// 200 with it, as a FHIR server does.
async fn update(
    State(counts): State<Arc<Counts>>,
    request_headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
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
    let status = if request_headers.contains_key(header::IF_MATCH) {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    (status, headers, body)
}

/// Starts a blackhole FHIR endpoint on its own thread and returns its base URL. It answers
/// Device searches with a Device linked to a Patient (Lookup mode), Observation searches with
/// an empty Bundle, and PUTs with the body and an ETag, and counts every request in `counts`.
pub fn blackhole(counts: Arc<Counts>) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("blackhole".to_owned())
        .spawn(move || {
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
        })
        .unwrap();
    format!("http://{}/fhir", rx.recv().unwrap())
}
