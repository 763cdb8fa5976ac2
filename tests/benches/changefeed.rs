//! End-to-end benchmark of the change feed (`iomt run --role changes`): throughput through a
//! backlog, and latency from commit to delivery at a steady rate.
//!
//! ```sh
//! cargo bench -p iomt-tests --bench changefeed                 # 200,000 changes
//! IOMT_BENCH_CHANGES=50000 cargo bench -p iomt-tests --bench changefeed
//! ```
//!
//! The FHIR server is a history endpoint in this process (axum): `/metadata` offering
//! `history-system`, and `/_history` with `_since`, `_count` (pages of 1,000) and newest-first
//! offset paging with `next` links, serving Observations of about 500 bytes from memory, so
//! that the feed, not the server, is measured (the FHIR test server takes milliseconds per
//! write). The feed appends to the local event log and one subscription delivers thin
//! CloudEvents to a file.
//!
//! * **Throughput**: `IOMT_BENCH_CHANGES` changes already committed; from the process start until
//!   the file holds all of them. The physical reference, measured in the same run: this process
//!   reading the same pages over HTTP and parsing them with `serde_json`, the floor of any
//!   reader of that history.
//! * **Latency**: then 500 changes/s for 20 s, each committed (its `lastUpdated`) when it is
//!   added; the file is read every 20 ms and each event's delivery time minus its `time` gives
//!   the latency, with a 1 s poll and a 1 s settle interval.
//! * **Latency with the doorbell**: then 250 changes/s for 20 s with a 10 s poll, no settle
//!   interval, and a `POST /notify` to the doorbell after every 10 changes.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::Uri;
use axum::routing::get;
use iomt_tests::eventhubs::toml_string;
use iomt_tests::{IomtProcess, Scratch};
use serde_json::{Value, json};

const PAGE: usize = 1000;

/// The history: changes in commit order, each `(lastUpdated in ms, JSON entry)`.
type History = Arc<Mutex<Vec<(i64, Value)>>>;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn instant(ms: i64) -> String {
    iomt_core::Timestamp::from_unix_millis(ms)
        .unwrap()
        .to_string()
}

fn entry(i: usize, at_ms: i64) -> (i64, Value) {
    let at = instant(at_ms);
    let id = format!("o{i}");
    (
        at_ms,
        json!({"fullUrl": format!("http://127.0.0.1/fhir/Observation/{id}"),
            "resource": {"resourceType": "Observation", "id": id,
                "meta": {"versionId": "1", "lastUpdated": at}, "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "subject": {"reference": format!("Patient/p{}", i % 1000)},
                "effectiveDateTime": at,
                "valueQuantity": {"value": 60 + i % 40, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}},
            "request": {"method": "PUT", "url": format!("Observation/{id}")},
            "response": {"status": "201", "etag": "W/\"1\"", "lastModified": at}}),
    )
}

/// A JSON answer.
type Answer = ([(&'static str, &'static str); 1], String);

fn answer(v: &Value) -> Answer {
    ([("content-type", "application/fhir+json")], v.to_string())
}

async fn metadata() -> Answer {
    answer(
        &json!({"resourceType": "CapabilityStatement", "status": "active",
        "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"],
        "rest": [{"mode": "server", "interaction": [{"code": "history-system"}]}]}),
    )
}

async fn serve_history(State((history, base)): State<(History, String)>, uri: Uri) -> Answer {
    let q: std::collections::HashMap<String, String> =
        reqwest::Url::parse(&format!("http://x{uri}"))
            .map(|u| u.query_pairs().into_owned().collect())
            .unwrap_or_default();
    let since = q
        .get("_since")
        .and_then(|s| iomt_core::Timestamp::parse(s).ok())
        .map_or(i64::MIN, |t| t.unix_millis());
    let count: usize = q.get("_count").and_then(|c| c.parse().ok()).unwrap_or(100);
    let offset: usize = q.get("_offset").and_then(|c| c.parse().ok()).unwrap_or(0);
    let h = history.lock().unwrap();
    // Commit order is time order here: the matching changes are a suffix, served newest first.
    let first = h.partition_point(|(t, _)| *t < since);
    let matching = h.len() - first;
    let entries: Vec<Value> = h[first..]
        .iter()
        .rev()
        .skip(offset)
        .take(count)
        .map(|(_, e)| e.clone())
        .collect();
    let mut link = vec![];
    if offset + count < matching {
        let mut next = format!("{base}/_history?_count={count}&_offset={}", offset + count);
        if let Some(s) = q.get("_since") {
            next.push_str(&format!("&_since={s}"));
        }
        link.push(json!({"relation": "next", "url": next}));
    }
    answer(&json!({"resourceType": "Bundle", "type": "history", "link": link, "entry": entries}))
}

fn delivered(path: &Path, seen: &mut HashSet<String>, on_new: &mut impl FnMut(&Value)) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<Value>(line) else {
            continue; // a line being written
        };
        if seen.insert(event["id"].as_str().unwrap_or_default().to_owned()) {
            on_new(&event);
        }
    }
}

/// Reads the delivered file every 20 ms until `n` more events arrived (or `seconds` passed),
/// adding each one's delivery latency (now minus its `time`) to `latencies`.
fn measure_latencies(
    out: &Path,
    seen: &mut HashSet<String>,
    feed: &mut IomtProcess,
    latencies: &mut Vec<i64>,
    n: usize,
    seconds: u64,
) {
    let until = Instant::now() + Duration::from_secs(seconds);
    while latencies.len() < n && Instant::now() < until {
        feed.assert_running();
        std::thread::sleep(Duration::from_millis(20));
        let now = now_ms();
        delivered(out, seen, &mut |e| {
            if let Some(t) = e["time"]
                .as_str()
                .and_then(|t| iomt_core::Timestamp::parse(t).ok())
            {
                latencies.push(now - t.unix_millis());
            }
        });
    }
}

fn main() {
    let changes: usize = std::env::var("IOMT_BENCH_CHANGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let start_ms = now_ms() - 3_600_000;
    let history: History = Arc::new(Mutex::new(
        (0..changes)
            .map(|i| entry(i, start_ms + (i as i64 * 3_000_000 / changes as i64)))
            .collect(),
    ));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let base = format!("http://{}/fhir", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/fhir/metadata", get(metadata))
        .route("/fhir/_history", get(serve_history))
        .with_state((history.clone(), base.clone()));
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });

    // The physical reference: every page fetched and parsed, by this process.
    let reference = rt.block_on(async {
        let http = reqwest::Client::new();
        let started = Instant::now();
        let mut next = Some(format!("{base}/_history?_count={PAGE}"));
        let mut read = 0usize;
        while let Some(url) = next.take() {
            let bytes = http.get(&url).send().await.unwrap().bytes().await.unwrap();
            let page: Value = serde_json::from_slice(&bytes).unwrap();
            read += page["entry"].as_array().map_or(0, Vec::len);
            next = page["link"]
                .as_array()
                .and_then(|l| l.iter().find(|l| l["relation"] == "next"))
                .and_then(|l| l["url"].as_str())
                .map(str::to_owned);
        }
        assert_eq!(read, changes);
        started.elapsed()
    });

    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "bench-changefeed");
    let dir = scratch.path();
    let out = dir.join("events.ndjson");
    let config = dir.join("iomt.toml");
    std::fs::write(
        &config,
        format!(
            "[fhir]\nurl = {}\n\n[pipeline]\nrole = \"changes\"\n\n\
             [change_feed]\nsettle = \"1s\"\noverlap = \"5s\"\npoll_interval = \"1s\"\npage_size = {PAGE}\n\n\
             [output]\nstate_dir = {}\n\n[events]\npoll_interval = \"100ms\"\n\n\
             [[subscriptions]]\nname = \"all\"\ndestination = {{ kind = \"ndjson\", path = {} }}\n",
            toml_string(&base),
            toml_string(dir.join("state").to_str().unwrap()),
            toml_string(out.to_str().unwrap()),
        ),
    )
    .unwrap();
    // Built before the clock starts: a stale binary would otherwise be compiled on the clock.
    iomt_tests::iomt();
    let started = Instant::now();
    let mut feed = IomtProcess::start(
        dir,
        "feed",
        ["run", "--config", config.to_str().unwrap()],
        "warn",
    );
    let mut seen = HashSet::new();
    while seen.len() < changes {
        feed.assert_running();
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "only {} of {changes} delivered",
            seen.len()
        );
        std::thread::sleep(Duration::from_millis(100));
        delivered(&out, &mut seen, &mut |_| {});
    }
    let backlog = started.elapsed();

    // Steady rate: 500 changes/s for 20 s, each committed as it is added.
    let mut latencies = Vec::new();
    let history_for_bell = history.clone();
    let adding = {
        std::thread::spawn(move || {
            let begin = Instant::now();
            for i in 0..10_000usize {
                let due = begin + Duration::from_millis(i as u64 * 2);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                history.lock().unwrap().push(entry(changes + i, now_ms()));
            }
        })
    };
    measure_latencies(&out, &mut seen, &mut feed, &mut latencies, 10_000, 40);
    adding.join().unwrap();
    feed.terminate(Duration::from_secs(30));

    // With the doorbell: a 10 s poll, no settle interval, and a notification (as an R4
    // Subscriptions Backport server sends one per change, id-only) after every 10 changes.
    let port = iomt_tests::replay::free_port();
    let bell_config = dir.join("doorbell.toml");
    std::fs::write(
        &bell_config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("settle = \"1s\"", "settle = \"0s\"")
            .replace("poll_interval = \"1s\"", "poll_interval = \"10s\"")
            .replace(
                "page_size = ",
                &format!("doorbell_addr = \"127.0.0.1:{port}\"\npage_size = "),
            ),
    )
    .unwrap();
    let mut feed = IomtProcess::start(
        dir,
        "doorbell",
        ["run", "--config", bell_config.to_str().unwrap()],
        "warn",
    );
    let bell = format!("http://127.0.0.1:{port}/notify");
    let (client, handle) = (reqwest::Client::new(), rt.handle().clone());
    let mut bell_latencies = Vec::new();
    let adding = std::thread::spawn({
        let history = history_for_bell;
        move || {
            let begin = Instant::now();
            for i in 0..5_000usize {
                let due = begin + Duration::from_millis(i as u64 * 4);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                history
                    .lock()
                    .unwrap()
                    .push(entry(changes + 10_000 + i, now_ms()));
                if i % 10 == 9 {
                    // A lost notification only delays a change to the next poll.
                    if let Err(e) = handle.block_on(client.post(&bell).send()) {
                        eprintln!("doorbell: {e}");
                    }
                }
            }
        }
    });
    measure_latencies(&out, &mut seen, &mut feed, &mut bell_latencies, 5_000, 60);
    adding.join().unwrap();
    feed.terminate(Duration::from_secs(30));

    latencies.sort_unstable();
    bell_latencies.sort_unstable();
    let pct = |l: &[i64], p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)];
    println!(
        "change feed: {changes} changes in {:.2} s ({:.0} changes/s, pages of {PAGE}); reference: \
         fetching and parsing the same pages in this process {:.2} s ({:.0} changes/s)",
        backlog.as_secs_f64(),
        changes as f64 / backlog.as_secs_f64(),
        reference.as_secs_f64(),
        changes as f64 / reference.as_secs_f64(),
    );
    println!(
        "latency at 500 changes/s, poll 1 s, settle 1 s: {} delivered, p50 {} ms, p99 {} ms, max {} ms",
        latencies.len(),
        pct(&latencies, 0.5),
        pct(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    println!(
        "latency at 250 changes/s with the doorbell, poll 10 s, settle 0 s: {} delivered, p50 {} ms, p99 {} ms, max {} ms",
        bell_latencies.len(),
        pct(&bell_latencies, 0.5),
        pct(&bell_latencies, 0.99),
        bell_latencies.last().copied().unwrap_or_default()
    );
}
