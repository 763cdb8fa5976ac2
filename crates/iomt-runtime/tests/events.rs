//! Event delivery against a real HTTP endpoint on loopback, with the delivery loop on a
//! controllable clock: Event Grid's retry schedule, `Retry-After`, the codes that are never
//! retried, dead letters and a 410 that disables the subscription, without waiting hours.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use iomt_runtime::config::{Destination, Subscription};
use iomt_runtime::events::EventService;
use iomt_runtime::events::delivery::Clock;
use iomt_runtime::{Config, Metrics, Purpose};
use iomt_store::{EmbeddedStore, Expect};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

/// Virtual time: a sleep moves the clock to its end at once.
#[derive(Debug)]
struct ManualClock {
    base: Instant,
    offset: Mutex<Duration>,
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + *self.offset.lock().unwrap()
    }

    fn sleep_until(&self, at: Instant) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let now = self.now();
        if at > now {
            *self.offset.lock().unwrap() += at - now;
        }
        Box::pin(tokio::task::yield_now())
    }
}

/// What the endpoint answers, per resource id, attempt after attempt (then 200), and when
/// (on the virtual clock) each attempt came.
#[derive(Debug)]
struct Endpoint {
    script: HashMap<String, Vec<(u16, Option<u64>)>>,
    attempts: Mutex<HashMap<String, Vec<Duration>>>,
    clock: Arc<ManualClock>,
}

async fn receive(
    State(endpoint): State<Arc<Endpoint>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let event: Value = serde_json::from_slice(&body).unwrap();
    let id = event["data"]["resourceFhirId"].as_str().unwrap().to_owned();
    assert_eq!(headers["aeg-event-type"], "Notification");
    let at = endpoint.clock.now() - endpoint.clock.base;
    let n = {
        let mut attempts = endpoint.attempts.lock().unwrap();
        let seen = attempts.entry(id.clone()).or_default();
        seen.push(at);
        seen.len()
    };
    assert_eq!(headers["aeg-delivery-count"], (n - 1).to_string().as_str());
    let (code, retry_after) = endpoint
        .script
        .get(&id)
        .and_then(|s| s.get(n - 1))
        .copied()
        .unwrap_or((200, None));
    let mut response = HeaderMap::new();
    if let Some(seconds) = retry_after {
        response.insert("retry-after", seconds.to_string().parse().unwrap());
    }
    (StatusCode::from_u16(code).unwrap(), response)
}

async fn serve(endpoint: Arc<Endpoint>) -> String {
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(endpoint);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/hook")
}

fn config(dir: &Path, url: &str) -> Config {
    let capture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/capture");
    let mut config = Config::default();
    config.templates.device_mapping = Some(capture.join("devicecontent.json"));
    config.templates.fhir_mapping = Some(capture.join("fhirmapping.json"));
    config.output.dir = dir.join("store");
    config.output.state_dir = dir.join("state");
    config.events.poll_interval = Duration::from_secs(1);
    config.subscriptions = vec![Subscription {
        name: "hook".into(),
        format: iomt_events::Format::Cloudevents,
        filter: Default::default(),
        retry: Default::default(),
        destination: Destination::Webhook {
            url: url.to_owned(),
            secret: None,
            authorization: None,
            handshake: false,
            timeout: Duration::from_secs(5),
            allow_insecure_http: false,
        },
        consumer_group: None,
        dead_letter: None,
        max_in_flight: 8,
    }];
    config
}

fn patient(id: &str) -> Value {
    json!({"resourceType": "Patient", "id": id})
}

#[tokio::test]
async fn retries_follow_event_grid_and_undeliverable_events_are_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock {
        base: Instant::now(),
        offset: Mutex::default(),
    });
    let script = HashMap::from([
        // 500 twice, then 503 (30 s floor under the 60 s step), then 429 asking for 7 s.
        (
            "retried".to_owned(),
            vec![(500, None), (500, None), (503, None), (429, Some(7))],
        ),
        ("refused".to_owned(), vec![(400, None)]),
        ("ok".to_owned(), vec![]),
    ]);
    let endpoint = Arc::new(Endpoint {
        script,
        attempts: Mutex::default(),
        clock: clock.clone(),
    });
    let url = serve(endpoint.clone()).await;
    let compiled = config(dir.path(), &url).compile(Purpose::Replay).unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store")).unwrap();
    for id in ["retried", "refused", "ok"] {
        store
            .put(patient(id), Some(Expect::Absent), false)
            .await
            .unwrap();
    }
    let metrics = Arc::new(Metrics::new());
    let service = EventService::build_with_clock(&compiled, metrics.clone(), clock.clone())
        .unwrap()
        .1
        .unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let running = service.spawn(stop);
    // The log holds three events; wait until the retried one got through.
    for _ in 0..2000 {
        if endpoint
            .attempts
            .lock()
            .unwrap()
            .get("retried")
            .is_some_and(|a| a.len() == 5)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop_tx.send_replace(true);
    let report = running.await.unwrap();
    assert_eq!(report.subscriptions.len(), 1);
    let (_, position, unfinished, disabled) = &report.subscriptions[0];
    assert_eq!((*position, *unfinished, disabled.clone()), (3, 0, None));

    let attempts = endpoint.attempts.lock().unwrap().clone();
    let retried = &attempts["retried"];
    let gaps: Vec<u64> = retried
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs())
        .collect();
    assert_eq!(
        gaps,
        [10, 30, 60, 7],
        "Event Grid's steps, the 503 floor and Retry-After"
    );
    assert_eq!(attempts["refused"].len(), 1, "400 is never retried");
    assert_eq!(attempts["ok"].len(), 1);

    let dead =
        std::fs::read_to_string(dir.path().join("state/events/hook.deadletter.jsonl")).unwrap();
    let dead: Vec<Value> = dead
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["data"]["resourceFhirId"], "refused");
    assert_eq!(
        dead[0]["deadletterreason"],
        "UndeliverableDueToHttpBadRequest"
    );
    assert_eq!(dead[0]["deliveryattempts"], 1);
    assert_eq!(dead[0]["lastdeliveryoutcome"], "BadRequest");
    assert_eq!(dead[0]["lasthttpstatuscode"], 400);

    let text = metrics.encode();
    assert!(
        text.contains(r#"DeliverySuccessCount_total{subscription="hook"} 2"#),
        "{text}"
    );
    assert!(text.contains(r#"DeadLetteredCount_total{subscription="hook",reason="UndeliverableDueToHttpBadRequest"} 1"#));
    assert!(
        text.contains(r#"DeliveryAttemptFailCount_total{subscription="hook",reason="Busy"} 2"#)
    );
}

#[tokio::test]
async fn a_gone_endpoint_disables_only_its_subscription_and_keeps_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock {
        base: Instant::now(),
        offset: Mutex::default(),
    });
    let endpoint = Arc::new(Endpoint {
        script: HashMap::from([("second".to_owned(), vec![(410, None)])]),
        attempts: Mutex::default(),
        clock: clock.clone(),
    });
    let url = serve(endpoint.clone()).await;
    let mut config = config(dir.path(), &url);
    // One at a time, so the checkpoint stops exactly before the refused event.
    config.subscriptions[0].max_in_flight = 1;
    let mut other = config.subscriptions[0].clone();
    other.name = "file".into();
    other.destination = Destination::Ndjson {
        path: dir.path().join("all.ndjson"),
    };
    config.subscriptions.push(other);
    let compiled = config.compile(Purpose::Replay).unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store")).unwrap();
    for id in ["first", "second", "third"] {
        store
            .put(patient(id), Some(Expect::Absent), false)
            .await
            .unwrap();
    }
    let service =
        EventService::build_with_clock(&compiled, Arc::new(Metrics::new()), clock.clone())
            .unwrap()
            .1
            .unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let running = service.spawn(stop);
    stop_tx.send_replace(true);
    let report = running.await.unwrap();
    let by_name: HashMap<&str, _> = report
        .subscriptions
        .iter()
        .map(|(n, p, u, d)| (n.as_str(), (*p, *u, d.clone())))
        .collect();
    assert_eq!(
        by_name["hook"],
        (1, 1, Some("UndeliverableDueToHttpGone".to_owned()))
    );
    assert_eq!(
        by_name["file"],
        (3, 0, None),
        "the other subscription goes on"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("all.ndjson"))
            .unwrap()
            .lines()
            .count(),
        3
    );
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("state/events/hook.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["disabled"], "UndeliverableDueToHttpGone");
    assert!(!endpoint.attempts.lock().unwrap().contains_key("third"));
}

/// In cluster mode a subscription's dead letters go to the dead-letter container (Azurite
/// here, started by `tests/run.sh`), under `events/<subscription>/`, as a pod's disk goes with
/// the pod.
#[tokio::test]
async fn dead_letters_of_a_subscription_go_to_the_container_in_cluster_mode() {
    let azurite = std::env::var("IOMT_TEST_AZURITE_URL")
        .expect("IOMT_TEST_AZURITE_URL is not set: run tests/run.sh, which starts Azurite");
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock {
        base: Instant::now(),
        offset: Mutex::default(),
    });
    let endpoint = Arc::new(Endpoint {
        script: HashMap::from([("refused".to_owned(), vec![(400, None)])]),
        attempts: Mutex::default(),
        clock: clock.clone(),
    });
    let url = serve(endpoint.clone()).await;
    let mut config = config(dir.path(), &url);
    config.checkpoints.connection_string = Some(format!(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={};BlobEndpoint={azurite};",
        iomt_eventhubs::blob::DEVELOPMENT_ACCOUNT_KEY
    ));
    config.dead_letters.store = iomt_runtime::config::DeadLetterStoreKind::Blob;
    config.dead_letters.container = format!("events-dl-{:08x}", fastrand::u32(..));
    let compiled = config.compile(Purpose::Replay).unwrap();
    let iomt_runtime::config::DeadLetterTarget::Blob(container) = compiled.dead_letters.clone()
    else {
        panic!("{:?}", compiled.dead_letters);
    };
    let store = EmbeddedStore::open(&dir.path().join("store")).unwrap();
    store
        .put(patient("refused"), Some(Expect::Absent), false)
        .await
        .unwrap();
    let service = EventService::build_with_clock(&compiled, Arc::new(Metrics::new()), clock)
        .unwrap()
        .1
        .unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let running = service.spawn(stop);
    let mut names = Vec::new();
    for _ in 0..1000 {
        names = container.names("events/hook/").await.unwrap_or_default();
        if !names.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_tx.send_replace(true);
    let report = running.await.unwrap();
    assert_eq!(report.subscriptions[0].1, 1, "the event is finished");
    assert_eq!(names.len(), 1, "{names:?}");
    let text = container.read_text(&names[0]).await.unwrap().unwrap();
    let dead: Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(dead["data"]["resourceFhirId"], "refused");
    assert_eq!(dead["deadletterreason"], "UndeliverableDueToHttpBadRequest");
    assert!(
        !dir.path()
            .join("state/events/hook.deadletter.jsonl")
            .exists()
    );
}
