use std::sync::Arc;

use iomt_core::MeasurementProperty;
use iomt_templates::fhir::FhirMapping;

use super::*;

fn ts(text: &str) -> Timestamp {
    Timestamp::parse(text).unwrap()
}

fn measurement(type_name: &str, time: &str, props: &[(&str, &str)]) -> Measurement {
    Measurement {
        type_name: Arc::from(type_name),
        occurrence_time_utc: ts(time),
        ingestion_time_utc: None,
        device_id: "dev".into(),
        patient_id: Some("pat".into()),
        encounter_id: None,
        correlation_id: Some("corr-1".into()),
        properties: props
            .iter()
            .map(|(n, v)| MeasurementProperty {
                name: Arc::from(*n),
                value: (*v).into(),
            })
            .collect(),
    }
}

fn mapping() -> FhirMapping {
    FhirMapping::parse(
        r#"{"templateType": "CollectionFhir", "template": [
      {"templateType": "CodeValueFhir", "template": {"typeName": "heartrate", "periodInterval": 60,
        "codes": [{"code": "8867-4", "system": "http://loinc.org", "display": "Heart rate"}],
        "value": {"valueName": "hr", "valueType": "SampledData", "defaultPeriod": 60000, "unit": "count/min"}}},
      {"templateType": "CodeValueFhir", "template": {"typeName": "bp", "periodInterval": 0,
        "codes": [{"code": "85354-9", "system": "http://loinc.org"}],
        "category": [{"text": "vital signs", "codes": [{"code": "vital-signs"}]}],
        "components": [
          {"codes": [{"code": "8480-6"}], "value": {"valueName": "systolic", "valueType": "Quantity", "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
          {"codes": [{"code": "8462-4"}], "value": {"valueName": "diastolic", "valueType": "Quantity", "unit": "mmHg"}}]}},
      {"templateType": "CodeValueFhir", "template": {"typeName": "session", "periodInterval": -1,
        "codes": [{"code": "steps"}], "value": {"valueName": "steps", "valueType": "SampledData", "defaultPeriod": 1000}}}
    ]}"#,
    )
    .unwrap()
}

fn ids() -> ResourceIds {
    ResourceIds {
        patient: "patientId".into(),
        device: "deviceId".into(),
        encounter: None,
    }
}

#[test]
fn sampled_data_slots_like_medtech() {
    // SampledDataProcessorTests: 11 values a minute apart over ten one-minute slots.
    let start = ts("2019-01-01T00:00:00Z");
    let texts: Vec<String> = (0..11).map(|i| i.to_string()).collect();
    let values: Vec<(Timestamp, &str)> = (0..11)
        .map(|i| (start.add_ticks(i * 600_000_000), texts[i as usize].as_str()))
        .collect();
    let end = start.add_ticks(10 * 600_000_000 - 10_000);
    assert_eq!(
        sampled_data(&values, start, end, 60_000.0),
        "0 1 2 3 4 5 6 7 8 9"
    );
    // The later of two values in one slot wins; missing slots are E.
    let values = [
        (start, "a"),
        (start.add_ticks(5_000_000), "b"),
        (start.add_ticks(30_000_000), "c"),
    ];
    assert_eq!(
        sampled_data(&values, start, start.add_ticks(39_999_999), 1000.0),
        "b E E c"
    );
}

#[test]
fn hourly_window_identifier_and_id() {
    let m = mapping();
    let t = m.template("HeartRate").unwrap();
    let group = MeasurementGroup::group(vec![
        measurement("heartrate", "2019-01-01T00:10:00Z", &[("hr", "70")]),
        measurement("heartrate", "2019-01-01T00:12:00Z", &[("hr", "72")]),
    ])
    .remove(0);
    let windows = observation_groups(t.period_interval, &group).unwrap();
    assert_eq!(windows.len(), 1);
    assert_eq!(windows[0].segment, "20190101000000Z.20190101005959Z");
    let o = build_observation(t, &windows[0], &ids(), ts("2026-11-22T05:00:00Z")).unwrap();
    assert_eq!(
        o["identifier"][0]["value"],
        "patientId.deviceId.heartrate.20190101000000Z.20190101005959Z"
    );
    assert_eq!(
        o["id"],
        "127aeff043da8c8e1f6d6f37bce384eb01aee4664f10f8ee565a2e7196bf889f"
    );
    assert_eq!(
        o["effectivePeriod"]["start"],
        "2019-01-01T00:00:00.0000000Z"
    );
    assert_eq!(o["effectivePeriod"]["end"], "2019-01-01T00:59:59.9999999Z");
    let data = o["valueSampledData"]["data"].as_str().unwrap();
    assert_eq!(data.split(' ').count(), 60);
    assert!(data.starts_with("E E E E E E E E E E 70 E 72 E"));
    assert_eq!(o["valueSampledData"]["period"], 60000);
    assert_eq!(o["code"]["coding"][1]["system"], SERVICE_SYSTEM);
    assert_eq!(o["code"]["text"], "heartrate");
    assert_eq!(o["subject"]["reference"], "Patient/patientId");
    assert_eq!(o["issued"], "2026-11-22T05:00:00+00:00");
}

#[test]
fn resource_id_is_sha256_of_system_and_value() {
    assert_eq!(
        resource_id(
            SERVICE_SYSTEM,
            "patientId.deviceId.heartrate.20190101000000Z.20190101005959Z"
        ),
        "127aeff043da8c8e1f6d6f37bce384eb01aee4664f10f8ee565a2e7196bf889f"
    );
    assert_eq!(resource_id("", "patient-17").len(), 64);
}

#[test]
fn components_quantities_and_categories() {
    let m = mapping();
    let t = m.template("bp").unwrap();
    let group = MeasurementGroup::group(vec![measurement(
        "bp",
        "2019-01-01T00:10:00.5Z",
        &[("systolic", "120"), ("diastolic", "80.50")],
    )])
    .remove(0);
    let windows = observation_groups(t.period_interval, &group).unwrap();
    assert_eq!(windows[0].segment, "20190101001000Z.20190101001000Z");
    let o = build_observation(t, &windows[0], &ids(), Timestamp::now()).unwrap();
    assert_eq!(
        o["category"][0],
        json!({"coding": [{"code": "vital-signs"}], "text": "vital signs"})
    );
    assert_eq!(
        o["component"][0]["valueQuantity"],
        json!({"value": 120, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"})
    );
    assert_eq!(o["component"][1]["valueQuantity"]["value"], json!(80.5));
    assert_eq!(o["component"][1]["code"]["text"], "diastolic");
    assert!(o.get("valueQuantity").is_none());

    let bad = MeasurementGroup::group(vec![measurement(
        "bp",
        "2019-01-01T00:10:00Z",
        &[("systolic", "high")],
    )])
    .remove(0);
    let windows = observation_groups(t.period_interval, &bad).unwrap();
    assert!(matches!(
        build_observation(t, &windows[0], &ids(), Timestamp::now()),
        Err(ConvertError::InvalidQuantityValue { .. })
    ));
}

#[test]
fn correlation_windows_need_a_correlation_id() {
    let m = mapping();
    let t = m.template("session").unwrap();
    let group = MeasurementGroup::group(vec![
        measurement("session", "2019-01-01T00:00:00Z", &[("steps", "1")]),
        measurement("session", "2019-01-01T00:00:03Z", &[("steps", "4")]),
    ])
    .remove(0);
    let windows = observation_groups(t.period_interval, &group).unwrap();
    assert_eq!(windows[0].segment, "corr-1");
    let o = build_observation(t, &windows[0], &ids(), Timestamp::now()).unwrap();
    assert_eq!(o["valueSampledData"]["data"], "1 E E 4");
    let mut no_corr = group.clone();
    no_corr.correlation_id = None;
    assert!(matches!(
        observation_groups(t.period_interval, &no_corr),
        Err(ConvertError::CorrelationIdNotDefined(_))
    ));
}

#[test]
fn duplicates_keep_the_latest_ingestion() {
    let m = mapping();
    let t = m.template("heartrate").unwrap();
    let mut a = measurement("heartrate", "2019-01-01T00:10:00Z", &[("hr", "70")]);
    let mut b = measurement("heartrate", "2019-01-01T00:10:00Z", &[("hr", "99")]);
    a.ingestion_time_utc = Some(ts("2019-01-01T00:10:05Z"));
    b.ingestion_time_utc = Some(ts("2019-01-01T00:10:01Z"));
    let group = MeasurementGroup::group(vec![a, b]).remove(0);
    let windows = observation_groups(t.period_interval, &group).unwrap();
    assert_eq!(
        windows[0].values["hr"],
        vec![(ts("2019-01-01T00:10:00Z"), "70")]
    );
}

#[test]
fn merge_is_idempotent_and_widens_sampled_data() {
    let m = mapping();
    let t = m.template("heartrate").unwrap();
    let first = MeasurementGroup::group(vec![measurement(
        "heartrate",
        "2019-01-01T00:10:00Z",
        &[("hr", "70")],
    )])
    .remove(0);
    let w = observation_groups(t.period_interval, &first).unwrap();
    let created = build_observation(t, &w[0], &ids(), Timestamp::now()).unwrap();
    // The same data again changes nothing: no write.
    assert_eq!(
        merge_observation(&created, t, &w[0]).unwrap(),
        Merge::Unchanged
    );
    // New data in the same hour lands in the same Observation.
    let second = MeasurementGroup::group(vec![measurement(
        "heartrate",
        "2019-01-01T00:30:00Z",
        &[("hr", "75")],
    )])
    .remove(0);
    let w2 = observation_groups(t.period_interval, &second).unwrap();
    let Merge::Updated(updated) = merge_observation(&created, t, &w2[0]).unwrap() else {
        panic!("expected an update")
    };
    assert_eq!(updated["status"], "amended");
    assert_eq!(updated["id"], created["id"]);
    let data: Vec<&str> = updated["valueSampledData"]["data"]
        .as_str()
        .unwrap()
        .split(' ')
        .collect();
    assert_eq!((data[10], data[30], data.len()), ("70", "75", 60));
    // And merging it again is a no-op.
    assert_eq!(
        merge_observation(&updated, t, &w2[0]).unwrap(),
        Merge::Unchanged
    );
    // A new value at an instant already stored replaces it; the others stay.
    let third = MeasurementGroup::group(vec![measurement(
        "heartrate",
        "2019-01-01T00:30:00Z",
        &[("hr", "80")],
    )])
    .remove(0);
    let w3 = observation_groups(t.period_interval, &third).unwrap();
    let Merge::Updated(replaced) = merge_observation(&updated, t, &w3[0]).unwrap() else {
        panic!("expected an update")
    };
    let data: Vec<&str> = replaced["valueSampledData"]["data"]
        .as_str()
        .unwrap()
        .split(' ')
        .collect();
    assert_eq!((data[10], data[30], data.len()), ("70", "80", 60));
}

#[test]
fn merge_appends_missing_components_and_checks_value_types() {
    let m = mapping();
    let t = m.template("bp").unwrap();
    let only_sys = MeasurementGroup::group(vec![measurement(
        "bp",
        "2019-01-01T00:10:00Z",
        &[("systolic", "120")],
    )])
    .remove(0);
    let w = observation_groups(t.period_interval, &only_sys).unwrap();
    let created = build_observation(t, &w[0], &ids(), Timestamp::now()).unwrap();
    assert_eq!(created["component"].as_array().unwrap().len(), 1);
    let both = MeasurementGroup::group(vec![measurement(
        "bp",
        "2019-01-01T00:10:00Z",
        &[("systolic", "121"), ("diastolic", "80")],
    )])
    .remove(0);
    let w = observation_groups(t.period_interval, &both).unwrap();
    let Merge::Updated(updated) = merge_observation(&created, t, &w[0]).unwrap() else {
        panic!("expected an update")
    };
    assert_eq!(updated["component"][0]["valueQuantity"]["value"], 121);
    assert_eq!(updated["component"][1]["code"]["text"], "diastolic");

    let mut wrong = created;
    let component = wrong["component"][0].as_object_mut().unwrap();
    let quantity = component.shift_remove("valueQuantity").unwrap();
    component.insert("valueString".into(), quantity);
    assert!(matches!(
        merge_observation(&wrong, t, &w[0]),
        Err(ConvertError::ExistingValueType { .. })
    ));
}

#[test]
fn sampled_data_takes_only_decimal_values() {
    for ok in ["72", "-3", "0", "97.5", "0.25", "1.5E-05", "2e3", "-0.5e+2"] {
        assert!(super::is_fhir_decimal(ok), "{ok}");
    }
    for bad in [
        "seventy", "70 80 90", "", "NaN", "Infinity", "1.", ".5", "072", "+1", "1e", "0x10", " 72",
    ] {
        assert!(!super::is_fhir_decimal(bad), "{bad:?}");
    }
    let t = Timestamp::parse("2024-03-05T09:00:00Z").unwrap();
    let error = super::check_sampled_values("hr", &[(t, "72"), (t, "70 80 90")]).unwrap_err();
    assert_eq!(error.name(), "InvalidSampledDataFhirValueException");
    // The message says what is wrong without repeating the value.
    assert!(!error.to_string().contains("70 80"), "{error}");
}
