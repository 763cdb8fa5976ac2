//! Against the real FHIR test server (`tests/fhir-server`, started by `tests/run.sh`, which sets
//! `IOMT_TEST_FHIR_URL`). Tests share one server, so each uses its own device and patient ids,
//! and they run one at a time because fault injection is server-wide.

use std::sync::Arc;
use std::time::{Duration, Instant};

use iomt_convert::{ResourceIds, SERVICE_SYSTEM, observation_groups, resource_id};
use iomt_core::{Action, Measurement, MeasurementGroup, MeasurementProperty, Timestamp, Written};
use iomt_fhir::{
    FhirClient, FhirClientConfig, FhirError, IdentityConfig, IdentityError, IdentityMode,
    IdentityResolver, ObservationWriter,
};
use iomt_templates::fhir::FhirMapping;
use serde_json::{Value, json};
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());

fn base_url() -> String {
    std::env::var("IOMT_TEST_FHIR_URL").expect(
        "IOMT_TEST_FHIR_URL is not set: run tests/run.sh, which starts the FHIR test server",
    )
}

fn control_url(path: &str) -> String {
    let base = base_url();
    let root = base.split("/fhir/").next().unwrap_or(&base).to_owned();
    format!("{root}{path}")
}

fn client_with(timeout: Duration) -> FhirClient {
    let mut config = FhirClientConfig::new(base_url());
    config.request_timeout = timeout;
    config.backoff_base = Duration::from_millis(50);
    config.max_retries = 3;
    FhirClient::new(config).unwrap()
}

fn client() -> FhirClient {
    client_with(Duration::from_secs(10))
}

async fn inject(faults: Value) {
    let status = reqwest::Client::new()
        .post(control_url("/__faults"))
        .body(faults.to_string())
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success());
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), fastrand::u64(..))
}

const FHIR: &str = r#"{"templateType": "CollectionFhir", "template": [
  {"templateType": "CodeValueFhir", "template": {"typeName": "heartrate", "periodInterval": 60,
    "codes": [{"code": "8867-4", "system": "http://loinc.org", "display": "Heart rate"}],
    "value": {"valueName": "hr", "valueType": "SampledData", "defaultPeriod": 1000, "unit": "/min"}}}
]}"#;

fn group(device: &str, patient: &str, readings: &[(&str, &str)]) -> MeasurementGroup {
    let measurements = readings.iter().map(|(time, hr)| Measurement {
        type_name: Arc::from("heartrate"),
        occurrence_time_utc: Timestamp::parse(time).unwrap(),
        ingestion_time_utc: None,
        device_id: device.to_owned(),
        patient_id: Some(patient.to_owned()),
        encounter_id: None,
        correlation_id: None,
        properties: vec![MeasurementProperty {
            name: Arc::from("hr"),
            value: (*hr).to_owned(),
        }],
    });
    MeasurementGroup::group(measurements).remove(0)
}

/// What a write that left `resource` as the server holds it reports.
fn written_as(resource: &Value, action: Action, identity: bool) -> Written {
    let text = |v: &Value| v.as_str().map(str::to_owned);
    Written {
        resource_type: text(&resource["resourceType"]).unwrap(),
        id: text(&resource["id"]).unwrap(),
        version_id: text(&resource["meta"]["versionId"]),
        last_updated: text(&resource["meta"]["lastUpdated"]),
        action,
        identity,
    }
}

async fn seed_device(client: &FhirClient, device: &str, patient: &str) -> (String, String) {
    let patient_id = unique("pat");
    client.update(&json!({"resourceType": "Patient", "id": patient_id, "identifier": [{"value": patient}]}), None).await.unwrap();
    let device_id = unique("dev");
    client
        .update(
            &json!({"resourceType": "Device", "id": device_id, "identifier": [{"value": device}],
                    "patient": {"reference": format!("Patient/{patient_id}")}}),
            None,
        )
        .await
        .unwrap();
    (device_id, patient_id)
}

async fn observations(client: &FhirClient, ids: &ResourceIds, segment: &str) -> Vec<Value> {
    let value = format!("{}.{}.heartrate.{segment}", ids.patient, ids.device);
    client
        .search(
            "Observation",
            &[("identifier", &format!("{SERVICE_SYSTEM}|{value}"))],
            10,
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn lookup_mode_writes_once_then_merges_in_the_same_hour() {
    let _serial = SERIAL.lock().await;
    let client = client();
    let (device, patient) = (unique("watch"), unique("mrn"));
    let (device_id, patient_id) = seed_device(&client, &device, &patient).await;
    let fhir = FhirMapping::parse(FHIR).unwrap();
    let template = fhir.template("heartrate").unwrap();
    let resolver = IdentityResolver::new(client.clone(), IdentityConfig::default());
    let writer = ObservationWriter::new(client.clone(), 100, Duration::from_secs(60));

    let first = group(
        &device,
        &patient,
        &[
            ("2026-11-20T08:15:30Z", "72"),
            ("2026-11-20T08:15:31Z", "73"),
        ],
    );
    let ids = resolver.resolve(&first).await.unwrap().ids;
    assert_eq!(
        ids,
        ResourceIds {
            patient: patient_id.clone(),
            device: device_id.clone(),
            encounter: None
        }
    );
    let window = &observation_groups(template.period_interval, &first).unwrap()[0];
    let created = writer.write(template, window, &ids).await.unwrap();
    assert_eq!(created.action, Action::Created);

    let found = observations(&client, &ids, "20261120080000Z.20261120085959Z").await;
    assert_eq!(found.len(), 1);
    let o = &found[0];
    // The write says what it wrote: the server's id, version and time.
    assert_eq!(created, written_as(o, Action::Created, false));
    assert_eq!(
        o["id"],
        resource_id(
            SERVICE_SYSTEM,
            o["identifier"][0]["value"].as_str().unwrap()
        )
    );
    assert_eq!(o["subject"]["reference"], format!("Patient/{patient_id}"));
    assert_eq!(o["device"]["reference"], format!("Device/{device_id}"));
    assert_eq!(o["status"], "final");
    let data: Vec<&str> = o["valueSampledData"]["data"]
        .as_str()
        .unwrap()
        .split(' ')
        .collect();
    assert_eq!((data.len(), data[930], data[931]), (3600, "72", "73"));
    let version = o["meta"]["versionId"].clone();

    // The same group again: nothing is written, with or without the version cache, and the
    // result names the version that stays.
    assert_eq!(
        writer.write(template, window, &ids).await.unwrap(),
        written_as(o, Action::Unchanged, false)
    );
    let fresh = ObservationWriter::new(client.clone(), 100, Duration::from_secs(60));
    assert_eq!(
        fresh.write(template, window, &ids).await.unwrap().action,
        Action::Unchanged
    );
    let again = observations(&client, &ids, "20261120080000Z.20261120085959Z").await;
    assert_eq!(again[0]["meta"]["versionId"], version);

    // New data in the same hour updates the same Observation, merging the SampledData.
    let later = group(&device, &patient, &[("2026-11-20T08:45:00Z", "80")]);
    let window = &observation_groups(template.period_interval, &later).unwrap()[0];
    assert_eq!(
        writer.write(template, window, &ids).await.unwrap().action,
        Action::Updated
    );
    // A writer that never saw the Observation merges through the search path.
    let late = group(&device, &patient, &[("2026-11-20T08:50:00Z", "81")]);
    let window = &observation_groups(template.period_interval, &late).unwrap()[0];
    assert_eq!(
        fresh.write(template, window, &ids).await.unwrap().action,
        Action::Updated
    );
    let merged = observations(&client, &ids, "20261120080000Z.20261120085959Z").await;
    assert_eq!(merged.len(), 1);
    assert_eq!(merged[0]["status"], "amended");
    let data: Vec<&str> = merged[0]["valueSampledData"]["data"]
        .as_str()
        .unwrap()
        .split(' ')
        .collect();
    assert_eq!(
        (data[930], data[931], data[2700], data[3000]),
        ("72", "73", "80", "81")
    );
}

#[tokio::test]
async fn create_mode_is_deterministic_and_lookup_reports_unknown_devices() {
    let _serial = SERIAL.lock().await;
    let client = client();
    let (device, patient) = (unique("band"), unique("mrn"));
    let g = group(&device, &patient, &[("2026-11-20T08:00:00Z", "70")]);

    let lookup = IdentityResolver::new(client.clone(), IdentityConfig::default());
    assert_eq!(lookup.resolve(&g).await, Err(IdentityError::DeviceNotFound));

    let config = IdentityConfig {
        mode: IdentityMode::Create,
        device_identifier_system: Some("urn:iomt:devices".into()),
        ..IdentityConfig::default()
    };
    let resolver = IdentityResolver::new(client.clone(), config.clone());
    let resolved = resolver.resolve(&g).await.unwrap();
    let ids = resolved.ids.clone();
    assert_eq!(ids.patient, resource_id("", &patient));
    assert_eq!(ids.device, resource_id("urn:iomt:devices", &device));
    // The Patient and the Device written are reported as identity writes.
    let (stored_patient, stored_device) = (
        client.read("Patient", &ids.patient).await.unwrap().unwrap(),
        client.read("Device", &ids.device).await.unwrap().unwrap(),
    );
    assert_eq!(
        resolved.written,
        vec![
            written_as(&stored_patient.resource, Action::Created, true),
            written_as(&stored_device.resource, Action::Created, true)
        ]
    );
    // Once resolved, the ids come from the cache and nothing is reported again.
    assert!(resolver.resolve(&g).await.unwrap().written.is_empty());
    // A second process resolves to the same resources and creates nothing new. It reports
    // them as unchanged writes, so that their change events, should a crash have lost them,
    // are appended again.
    let again = IdentityResolver::new(client.clone(), config)
        .resolve(&g)
        .await
        .unwrap();
    assert_eq!(again.ids, ids);
    let mut reported: Vec<_> = again
        .written
        .iter()
        .map(|w| (w.resource_type.as_str(), w.id.as_str(), w.action.name()))
        .collect();
    reported.sort();
    assert_eq!(
        reported,
        [
            ("Device", ids.device.as_str(), "Unchanged"),
            ("Patient", ids.patient.as_str(), "Unchanged")
        ]
    );
    assert_eq!(
        client
            .search("Patient", &[("identifier", &patient)], 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        client
            .search(
                "Device",
                &[("identifier", &format!("urn:iomt:devices|{device}"))],
                10
            )
            .await
            .unwrap()
            .len(),
        1
    );
    let created = client.read("Device", &ids.device).await.unwrap().unwrap();
    assert_eq!(
        created.resource["patient"]["reference"],
        format!("Patient/{}", ids.patient)
    );

    // Lookup mode now finds the created Device and its Patient.
    let lookup = IdentityResolver::new(
        client.clone(),
        IdentityConfig {
            device_identifier_system: Some("urn:iomt:devices".into()),
            ..IdentityConfig::default()
        },
    );
    let looked_up = lookup.resolve(&g).await.unwrap();
    assert_eq!(looked_up.ids, ids);
    // Lookup mode writes nothing and reports nothing.
    assert!(looked_up.written.is_empty());
}

#[tokio::test]
async fn faults_are_retried_or_classified() {
    let _serial = SERIAL.lock().await;
    let client = client();
    let id = unique("fault");
    client
        .update(&json!({"resourceType": "Patient", "id": id}), None)
        .await
        .unwrap();

    // 429 with Retry-After: the client waits as told, then succeeds.
    inject(json!([{"status": 429, "headers": {"Retry-After": "1"}, "body": "{}"}])).await;
    let started = Instant::now();
    assert!(client.read("Patient", &id).await.unwrap().is_some());
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // An HTML 502 page from a proxy: retried with backoff.
    inject(json!([{"status": 502, "headers": {"Content-Type": "text/html"}, "body": "<html><body><h1>502 Bad Gateway</h1></body></html>"}])).await;
    assert!(client.read("Patient", &id).await.unwrap().is_some());

    // A server slower than the request timeout: the attempt times out and is retried.
    let impatient = client_with(Duration::from_millis(300));
    inject(json!([{"delayMs": 1200}])).await;
    assert!(impatient.read("Patient", &id).await.unwrap().is_some());

    // A 400 OperationOutcome is a data error that carries the server's explanation.
    inject(json!([{"status": 400, "body": {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "details": {"text": "Missing required property"}, "expression": ["Observation.code"]}]}}]))
    .await;
    match client.read("Patient", &id).await {
        Err(FhirError::Rejected {
            status: 400,
            message,
            outcome,
        }) => {
            assert!(
                message.contains("Missing required property")
                    && message.contains("Observation.code"),
                "{message}"
            );
            assert!(outcome.is_some());
        }
        other => panic!("expected a rejected request, got {other:?}"),
    }

    // A server that keeps failing: retries are bounded and the error says so.
    inject(json!([{"status": 500}, {"status": 500}, {"status": 500}, {"status": 500}])).await;
    assert!(matches!(
        client.read("Patient", &id).await,
        Err(FhirError::Unavailable { attempts: 4, .. })
    ));

    // Real validation errors from the server are classified the same way.
    let invalid = json!({"resourceType": "Observation", "id": unique("obs"), "status": "final"});
    assert!(matches!(
        client.update(&invalid, None).await,
        Err(FhirError::Rejected { status: 400, .. })
    ));
}

#[tokio::test]
async fn a_stale_version_is_reread_and_merged_again() {
    let _serial = SERIAL.lock().await;
    let client = client();
    let (device, patient) = (unique("monitor"), unique("mrn"));
    seed_device(&client, &device, &patient).await;
    let fhir = FhirMapping::parse(FHIR).unwrap();
    let template = fhir.template("heartrate").unwrap();
    let resolver = IdentityResolver::new(client.clone(), IdentityConfig::default());
    let a = ObservationWriter::new(client.clone(), 100, Duration::from_secs(60));
    let b = ObservationWriter::new(client.clone(), 100, Duration::from_secs(60));

    let first = group(&device, &patient, &[("2026-11-20T09:00:10Z", "60")]);
    let ids = resolver.resolve(&first).await.unwrap().ids;
    let window = &observation_groups(template.period_interval, &first).unwrap()[0];
    assert_eq!(
        a.write(template, window, &ids).await.unwrap().action,
        Action::Created
    );
    // Another writer (another pod) updates the Observation; `a` still caches the old version.
    let other = group(&device, &patient, &[("2026-11-20T09:00:20Z", "61")]);
    let window = &observation_groups(template.period_interval, &other).unwrap()[0];
    assert_eq!(
        b.write(template, window, &ids).await.unwrap().action,
        Action::Updated
    );
    // `a` writes with a stale If-Match, gets 412, re-reads and merges on top of `b`'s data.
    let third = group(&device, &patient, &[("2026-11-20T09:00:30Z", "62")]);
    let window = &observation_groups(template.period_interval, &third).unwrap()[0];
    assert_eq!(
        a.write(template, window, &ids).await.unwrap().action,
        Action::Updated
    );
    let found = observations(&client, &ids, "20261120090000Z.20261120095959Z").await;
    let data: Vec<&str> = found[0]["valueSampledData"]["data"]
        .as_str()
        .unwrap()
        .split(' ')
        .collect();
    assert_eq!((data[10], data[20], data[30]), ("60", "61", "62"));
}

#[tokio::test]
async fn a_create_that_replaced_a_concurrent_create_merges_it_back() {
    let _serial = SERIAL.lock().await;
    let client = client();
    let (device, patient) = (unique("monitor"), unique("mrn"));
    seed_device(&client, &device, &patient).await;
    let fhir = FhirMapping::parse(FHIR).unwrap();
    let template = fhir.template("heartrate").unwrap();
    let resolver = IdentityResolver::new(client.clone(), IdentityConfig::default());
    let a = ObservationWriter::new(client.clone(), 100, Duration::from_secs(60));
    let b = ObservationWriter::new(client.clone(), 100, Duration::from_secs(60));

    let first = group(&device, &patient, &[("2026-11-20T09:00:10Z", "60")]);
    let ids = resolver.resolve(&first).await.unwrap().ids;
    let window = &observation_groups(template.period_interval, &first).unwrap()[0];
    assert_eq!(
        b.write(template, window, &ids).await.unwrap().action,
        Action::Created
    );
    // `a` searched before `b` created the Observation (two owners of one partition during a
    // handover): its search finds nothing, and its create replaces `b`'s version.
    inject(json!([{
        "status": 200,
        "body": "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"total\":0}",
    }]))
    .await;
    let other = group(&device, &patient, &[("2026-11-20T09:00:20Z", "61")]);
    let window = &observation_groups(template.period_interval, &other).unwrap()[0];
    assert_eq!(
        a.write(template, window, &ids).await.unwrap().action,
        Action::Updated
    );
    let found = observations(&client, &ids, "20261120090000Z.20261120095959Z").await;
    assert_eq!(found.len(), 1);
    let data: Vec<&str> = found[0]["valueSampledData"]["data"]
        .as_str()
        .unwrap()
        .split(' ')
        .collect();
    assert_eq!((data[10], data[20]), ("60", "61"));
}

#[tokio::test]
async fn handlebars_resources_are_written_idempotently() {
    let _serial = SERIAL.lock().await;
    let client = client();
    let (device, patient) = (unique("pump"), unique("mrn"));
    seed_device(&client, &device, &patient).await;
    let fhir = FhirMapping::parse(
        r#"{"templateType": "CollectionFhir", "template": [{"templateType": "HandlebarsFhir", "template": {
          "typeName": "heartrate", "periodInterval": 0,
          "key": "{{ids.device}}.{{type}}.{{segment}}",
          "resource": "{\"resourceType\": \"Observation\", \"meta\": {\"profile\": [\"https://example.org/fhir/StructureDefinition/my-heart-rate\"]}, \"status\": \"final\", \"code\": {\"coding\": [{\"system\": \"http://loinc.org\", \"code\": \"8867-4\"}]}, \"subject\": {\"reference\": \"Patient/{{ids.patient}}\"}, \"effectiveDateTime\": \"{{period.start}}\", \"valueQuantity\": {\"value\": {{latest.hr}}, \"unit\": \"/min\"}, \"identifier\": [{\"system\": \"{{identifier.system}}\", \"value\": \"{{identifier.value}}\"}]}"
        }}]}"#,
    )
    .unwrap();
    let template = fhir.lookup("heartrate").unwrap();
    let resolver = IdentityResolver::new(client.clone(), IdentityConfig::default());
    let writer = ObservationWriter::new(client.clone(), 100, Duration::from_secs(60));
    let g = group(&device, &patient, &[("2026-11-20T10:00:00Z", "66")]);
    let ids = resolver.resolve(&g).await.unwrap().ids;
    let window = &observation_groups(template.period_interval(), &g).unwrap()[0];
    let resource =
        iomt_convert::convert_window(template, window, &ids, &g, Timestamp::now()).unwrap();
    let id = resource["id"].as_str().unwrap().to_owned();
    assert_eq!(
        id,
        resource_id(
            "Observation",
            &format!("{}.heartrate.{}", ids.device, window.segment)
        )
    );
    let created = writer.write_resource(&resource).await.unwrap();
    let stored = client.read("Observation", &id).await.unwrap().unwrap();
    assert_eq!(
        created,
        written_as(&stored.resource, Action::Created, false)
    );
    // A replay writes nothing, also from a process that never saw the resource.
    assert_eq!(
        writer.write_resource(&resource).await.unwrap().action,
        Action::Unchanged
    );
    let fresh = ObservationWriter::new(client.clone(), 100, Duration::from_secs(60));
    assert_eq!(
        fresh.write_resource(&resource).await.unwrap().action,
        Action::Unchanged
    );
    let stored = client
        .read("Observation", &id)
        .await
        .unwrap()
        .unwrap()
        .resource;
    assert_eq!(stored["valueQuantity"]["value"], 66);
    assert_eq!(
        stored["subject"]["reference"],
        format!("Patient/{}", ids.patient)
    );

    let mut changed = resource.clone();
    changed["valueQuantity"]["value"] = json!(67);
    assert_eq!(
        writer.write_resource(&changed).await.unwrap().action,
        Action::Updated
    );
}

/// Hands out numbered tokens that live for `lifetime`, counting how often it is asked.
#[derive(Debug)]
struct CountingTokens {
    issued: std::sync::atomic::AtomicUsize,
    lifetime: Duration,
}

impl iomt_fhir::TokenSource for CountingTokens {
    fn token(
        &self,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<iomt_fhir::BearerToken, String>> + Send + '_>,
    > {
        let n = self
            .issued
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        Box::pin(async move {
            Ok(iomt_fhir::BearerToken {
                secret: format!("token-{n}").into(),
                expires_at: std::time::SystemTime::now() + self.lifetime,
            })
        })
    }
}

async fn last_authorization() -> Value {
    let body = reqwest::get(control_url("/__stats"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let stats: Value = serde_json::from_slice(&body).unwrap();
    stats["lastAuthorization"].clone()
}

#[tokio::test]
async fn tokens_are_cached_renewed_and_refetched_after_a_401() {
    let _serial = SERIAL.lock().await;
    let long = Arc::new(CountingTokens {
        issued: 0.into(),
        lifetime: Duration::from_secs(3600),
    });
    let mut config = FhirClientConfig::new(base_url());
    config.auth = iomt_fhir::Auth::Token(long.clone());
    config.backoff_base = Duration::from_millis(50);
    let client = FhirClient::new(config).unwrap();
    let id = unique("auth");
    client
        .update(&json!({"resourceType": "Patient", "id": id}), None)
        .await
        .unwrap();
    assert!(client.read("Patient", &id).await.unwrap().is_some());
    assert_eq!(last_authorization().await, "Bearer token-1");
    assert_eq!(
        long.issued.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a valid token is reused"
    );

    // A 401 (a revoked token): the client drops its token, fetches another and retries.
    inject(json!([{"status": 401, "body": "{}"}])).await;
    assert!(client.read("Patient", &id).await.unwrap().is_some());
    assert_eq!(last_authorization().await, "Bearer token-2");

    // Tokens about to expire are renewed before use.
    let short = Arc::new(CountingTokens {
        issued: 0.into(),
        lifetime: Duration::from_secs(60),
    });
    let mut config = FhirClientConfig::new(base_url());
    config.auth = iomt_fhir::Auth::Token(short.clone());
    let client = FhirClient::new(config).unwrap();
    client.read("Patient", &id).await.unwrap();
    client.read("Patient", &id).await.unwrap();
    assert_eq!(short.issued.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(last_authorization().await, "Bearer token-2");
}

#[test]
fn entra_credentials_build_with_the_fhir_scope() {
    // Building the credential does not contact Entra ID; a client secret needs nothing else.
    let auth = iomt_fhir::Auth::entra(
        iomt_fhir::EntraCredential::ClientSecret {
            tenant_id: "00000000-0000-0000-0000-000000000000".into(),
            client_id: "11111111-1111-1111-1111-111111111111".into(),
            secret: "not-a-real-secret".into(),
        },
        "https://example.fhir.azurehealthcareapis.com/",
    )
    .unwrap();
    let text = format!("{auth:?}");
    assert!(
        text.contains("scope: \"https://example.fhir.azurehealthcareapis.com/.default\""),
        "{text}"
    );
}

#[tokio::test]
async fn encounters_are_resolved_and_required_in_lookup_with_encounter() {
    let _serial = SERIAL.lock().await;
    let client = client();
    let (device, patient) = (unique("vent"), unique("mrn"));
    let (device_id, patient_id) = seed_device(&client, &device, &patient).await;
    let encounter = unique("visit");
    let encounter_id = unique("enc");
    client
        .update(
            &json!({"resourceType": "Encounter", "id": encounter_id, "status": "in-progress",
                    "class": {"code": "IMP"}, "identifier": [{"value": encounter}]}),
            None,
        )
        .await
        .unwrap();
    let config = IdentityConfig {
        mode: IdentityMode::LookupWithEncounter,
        ..IdentityConfig::default()
    };
    let resolver = IdentityResolver::new(client.clone(), config);

    let mut g = group(&device, &patient, &[("2026-11-20T11:00:00Z", "70")]);
    assert_eq!(
        resolver.resolve(&g).await,
        Err(IdentityError::EncounterIdentityNotDefined)
    );
    g.encounter_id = Some(encounter.clone());
    let ids = resolver.resolve(&g).await.unwrap().ids;
    assert_eq!(
        ids,
        ResourceIds {
            patient: patient_id,
            device: device_id,
            encounter: Some(encounter_id.clone())
        }
    );
    g.encounter_id = Some(unique("no-such-visit"));
    assert_eq!(
        resolver.resolve(&g).await,
        Err(IdentityError::EncounterNotFound)
    );
    // MedTech tests ids with IsNullOrWhiteSpace: a blank encounter id is no encounter.
    g.encounter_id = Some("  ".into());
    assert_eq!(
        resolver.resolve(&g).await,
        Err(IdentityError::EncounterIdentityNotDefined)
    );
    for mode in [IdentityMode::Lookup, IdentityMode::Create] {
        let resolver = IdentityResolver::new(
            client.clone(),
            IdentityConfig {
                mode,
                ..IdentityConfig::default()
            },
        );
        g.encounter_id = Some(String::new());
        assert_eq!(
            resolver.resolve(&g).await.unwrap().ids.encounter,
            None,
            "{mode:?}"
        );
        // Create mode looks an existing device up like Lookup mode, encounter included.
        g.encounter_id = Some(encounter.clone());
        assert_eq!(
            resolver.resolve(&g).await.unwrap().ids.encounter.as_deref(),
            Some(encounter_id.as_str()),
            "{mode:?}"
        );
    }
}

#[tokio::test]
async fn create_mode_refuses_a_blank_patient_id() {
    let _serial = SERIAL.lock().await;
    let client = client();
    let resolver = IdentityResolver::new(
        client,
        IdentityConfig {
            mode: IdentityMode::Create,
            ..IdentityConfig::default()
        },
    );
    for blank in ["", "   "] {
        let g = group(
            &unique("new-watch"),
            blank,
            &[("2026-11-20T11:00:00Z", "70")],
        );
        assert_eq!(
            resolver.resolve(&g).await,
            Err(IdentityError::PatientIdentityNotDefined)
        );
    }
}
