use proptest::prelude::*;
use serde_json::json;

use super::*;

fn mapping(templates: Value) -> Normalizer {
    let doc = json!({"templateType": "CollectionContent", "template": templates});
    let mapping = DeviceMapping::parse(&doc.to_string()).unwrap_or_else(|e| panic!("{e:?}"));
    Normalizer::new(mapping)
}

fn event(body: &str) -> DeviceEvent {
    DeviceEvent {
        body: body.as_bytes().to_vec(),
        ..DeviceEvent::default()
    }
}

fn hr_template() -> Value {
    json!([{"templateType": "CalculatedContent", "template": {
        "typeName": "heartrate",
        "typeMatchExpression": "$..[?(@heartRate)]",
        "deviceIdExpression": "$.matchedToken.deviceId",
        "timestampExpression": "$.matchedToken.endDate",
        "values": [{"required": "true", "valueExpression": "$.matchedToken.heartRate", "valueName": "hr"}]
    }}])
}

#[test]
fn calculated_content_reads_matched_token() {
    let n = mapping(hr_template());
    let out = n.normalize_event(&event(
        r#"{"heartRate":"78","endDate":"2023-03-13T22:46:01.8750000","deviceId":"device01"}"#,
    ));
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let m = &out.measurements[0];
    assert_eq!(m.device_id, "device01");
    assert_eq!(
        m.occurrence_time_utc.to_string(),
        "2023-03-13T22:46:01.875Z"
    );
    assert_eq!(m.properties[0].value, "78");
}

#[test]
fn required_value_missing_names_field_and_expression() {
    let n = mapping(hr_template());
    let out = n.normalize_event(&event(r#"{"heartRate":"78","deviceId":"device01"}"#));
    assert!(out.measurements.is_empty());
    let e = &out.errors[0];
    assert_eq!(e.kind, ErrorKind::IncompatibleData);
    assert!(
        e.message.contains("[TimestampExpression]") && e.message.contains("$.matchedToken.endDate"),
        "{}",
        e.message
    );
    assert_eq!(
        e.path.as_deref(),
        Some("$.template[0].template.timestampExpression")
    );
    assert!(e.line.is_some());
}

#[test]
fn wrong_timestamp_format_names_expression_and_value() {
    let n = mapping(hr_template());
    let out = n.normalize_event(&event(
        r#"{"heartRate":"78","endDate":"yesterday at noon","deviceId":"d"}"#,
    ));
    let e = &out.errors[0];
    assert!(
        e.message.contains("$.matchedToken.endDate") && e.message.contains("yesterday at noon"),
        "{}",
        e.message
    );
    let out = n.normalize_event(&event(
        r#"{"heartRate":"78","endDate":1549061161,"deviceId":"d"}"#,
    ));
    assert!(
        out.errors[0].message.contains("1549061161"),
        "{}",
        out.errors[0].message
    );
}

#[test]
fn bad_bodies_are_errors_not_panics() {
    let n = mapping(hr_template());
    let out = n.normalize_event(&event("{\"heartRate\": 78,\n  oops}"));
    assert_eq!(out.errors[0].kind, ErrorKind::InvalidDataFormat);
    assert!(
        out.errors[0].message.contains("line 2 column 3"),
        "{}",
        out.errors[0].message
    );

    let big = format!("{{\"a\":\"{}\"}}", "x".repeat(MAX_BODY_BYTES));
    assert_eq!(
        n.normalize_event(&event(&big)).errors[0].kind,
        ErrorKind::EventTooLarge
    );

    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    let out = n.normalize_event(&event(&deep));
    assert_eq!(out.errors[0].kind, ErrorKind::InvalidDataFormat);
    assert!(
        out.errors[0].message.contains("recursion limit"),
        "{}",
        out.errors[0].message
    );

    // An empty body is a null Body, not an error.
    assert_eq!(n.normalize_event(&event("")), Output::default());
}

#[test]
fn multiple_tokens_for_a_value_is_an_error() {
    let n = mapping(json!([{"templateType": "JsonPathContent", "template": {
        "typeName": "t", "typeMatchExpression": "$..[?(@d)]",
        "deviceIdExpression": "$.d", "timestampExpression": "$.t",
        "values": [{"valueName": "v", "valueExpression": "$.v[*]", "required": false}]
    }}]));
    let out = n.normalize_event(&event(r#"{"d":"x","t":"2020-01-01T00:00:00Z","v":[1,2]}"#));
    assert_eq!(out.errors[0].kind, ErrorKind::TemplateExpression);
    assert!(out.errors[0].message.contains("multiple tokens"));
}

#[test]
fn iot_hub_falls_back_to_enqueued_time() {
    let n = mapping(json!([{"templateType": "IotJsonPathContent", "template": {
        "typeName": "hr", "typeMatchExpression": "$..[?(@Body.hr)]",
        "values": [{"valueName": "hr", "valueExpression": "$.Body.hr", "required": true}]
    }}]));
    let mut e = event(r#"{"hr": 72}"#);
    e.system_properties
        .insert("iothub-connection-device-id".into(), json!("dev-1"));
    e.system_properties.insert(
        "iothub-enqueuedtime".into(),
        json!("2019-02-01T22:46:01.875Z"),
    );
    let out = n.normalize_event(&e);
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.measurements[0].device_id, "dev-1");
    assert_eq!(
        out.measurements[0].occurrence_time_utc.to_string(),
        "2019-02-01T22:46:01.875Z"
    );
    e.properties.insert(
        "iothub-creation-time-utc".into(),
        json!("2019-01-30T22:45:02.6073744Z"),
    );
    let out = n.normalize_event(&e);
    assert_eq!(
        out.measurements[0].occurrence_time_utc.to_string(),
        "2019-01-30T22:45:02.6073744Z"
    );
}

#[test]
fn jmespath_type_match_with_jsonpath_values() {
    let n = mapping(json!([{"templateType": "CalculatedContent", "template": {
        "typeName": "dist", "defaultExpressionLanguage": "JmesPath",
        "typeMatchExpression": "to_array(@.Body) | [? deviceId].data[]",
        "deviceIdExpression": "Body.deviceId",
        "timestampExpression": {"value": "$.matchedToken.t", "language": "JsonPath"},
        "values": [{"valueName": "m", "valueExpression": "divide(matchedToken.yards, `1.0936`)", "required": true},
                   {"valueName": "n", "valueExpression": "add(matchedToken.n, `1`)", "required": true}]
    }}]));
    let out = n.normalize_event(&event(r#"{"deviceId":"b","data":[{"t":"2023-05-23T23:01:00Z","yards":30.6,"n":1},{"t":"2023-05-23T23:02:00Z","yards":1,"n":2}]}"#));
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.measurements.len(), 2);
    assert_eq!(
        out.measurements[0].properties[0].value,
        "27.980980248719828"
    );
    assert_eq!(out.measurements[1].properties[1].value, "3");
}

#[test]
fn values_convert_like_dotnet() {
    let n = mapping(json!([{"templateType": "JsonPathContent", "template": {
        "typeName": "t", "typeMatchExpression": "$..[?(@d)]",
        "deviceIdExpression": "$.d", "timestampExpression": "$.t",
        "values": [{"valueName": "b", "valueExpression": "$.b"}, {"valueName": "f", "valueExpression": "$.f"},
                   {"valueName": "dt", "valueExpression": "$.t"}, {"valueName": "o", "valueExpression": "$.o"},
                   {"valueName": "n", "valueExpression": "$.n"}]
    }}]));
    let out = n.normalize_event(&event(
        r#"{"d":7,"t":"2019-02-01T22:46:01.875Z","b":true,"f":98.60,"o":{"x":1},"n":null}"#,
    ));
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let m = &out.measurements[0];
    assert_eq!(m.device_id, "7");
    let values: Vec<(&str, &str)> = m
        .properties
        .iter()
        .map(|p| (&*p.name, p.value.as_str()))
        .collect();
    assert_eq!(
        values,
        vec![("b", "True"), ("f", "98.6"), ("dt", "02/01/2019 22:46:01")]
    );
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-zA-Z0-9 :.\\-TZ]{0,24}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(("[a-zA-Z]{1,6}", inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn arb_jsonpath() -> impl Strategy<Value = String> {
    let name = "[a-zA-Z]{1,6}";
    prop_oneof![
        name.prop_map(|n| format!("$..[?(@{n})]")),
        (name, name).prop_map(|(a, b)| format!("$..[?(@{a} && @{b} || @.{a} == 'x')]")),
        (name, name).prop_map(|(a, b)| format!("$.{a}.{b}")),
        (name, 0..4i64).prop_map(|(a, i)| format!("$..{a}[{i}]")),
        (name, -3..3i64).prop_map(|(a, i)| format!("$.{a}[{i}:]")),
        name.prop_map(|n| format!("$..[?(@.{n} > 3)]")),
        name.prop_map(|n| format!("$.matchedToken.{n}")),
        Just("$..*".to_owned()),
        "[ -~]{0,12}",
    ]
}

fn arb_jmespath() -> impl Strategy<Value = String> {
    let name = "[a-zA-Z]{1,6}";
    prop_oneof![
        name.prop_map(|n| format!("Body.{n}")),
        (name, name).prop_map(|(a, b)| format!("to_array(@.Body)[?{a}].{b}")),
        (name, name).prop_map(|(a, b)| format!("add(matchedToken.{a}, matchedToken.{b})")),
        (name, name).prop_map(|(a, b)| format!("divide(Body.{a}, Body.{b})")),
        name.prop_map(|n| format!("fromUnixTimestamp(Body.{n})")),
        name.prop_map(|n| format!("pow(Body.{n}, `40`)")),
        name.prop_map(|n| format!("insertString(Body.{n}, 'x', `2`)")),
        "[ -~]{0,12}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn random_templates_and_messages_never_panic(
        body in arb_json(),
        type_match in arb_jsonpath(),
        value_path in arb_jsonpath(),
        jmes in arb_jmespath(),
    ) {
        let templates = json!([
            {"templateType": "JsonPathContent", "template": {
                "typeName": "a", "typeMatchExpression": type_match, "deviceIdExpression": value_path,
                "timestampExpression": value_path, "values": [{"valueName": "v", "valueExpression": value_path, "required": true}]}},
            {"templateType": "CalculatedContent", "template": {
                "typeName": "b", "typeMatchExpression": type_match, "deviceIdExpression": value_path,
                "timestampExpression": {"value": jmes, "language": "JmesPath"},
                "values": [{"valueName": "v", "valueExpression": {"value": jmes, "language": "JmesPath"}}]}},
        ]);
        let doc = json!({"templateType": "CollectionContent", "template": templates}).to_string();
        // Either the mapping is rejected with errors, or it runs; neither may panic.
        if let Ok(mapping) = DeviceMapping::parse(&doc) {
            let n = Normalizer::new(mapping);
            let _ = n.normalize_event(&DeviceEvent { body: body.to_string().into_bytes(), ..DeviceEvent::default() });
            let _ = n.normalize_value(&body, None, &mut NoTrace);
        }
    }
}

#[test]
fn owned_normalization_matches_and_gives_the_properties_back() {
    let n = mapping(hr_template());
    let mut e = event(r#"{"heartRate":"78","endDate":"2019-02-01T22:46:01.875Z","deviceId":"d"}"#);
    e.properties.insert("p".into(), serde_json::json!(1));
    e.system_properties.insert("s".into(), serde_json::json!(2));
    let expected = n.normalize_event(&e);
    let before = e.clone();
    assert_eq!(n.normalize_owned(&mut e), expected);
    assert_eq!(e, before);
}

#[test]
fn an_event_producing_too_many_measurements_is_refused_whole() {
    let n = mapping(hr_template());
    let reading = r#"{"heartRate":"78","endDate":"2023-03-13T22:46:01Z","deviceId":"d"}"#;
    let many = |count: usize| format!("[{}]", vec![reading; count].join(","));
    let out = n.normalize_event(&event(&many(MAX_MEASUREMENTS_PER_EVENT)));
    assert!(out.errors.is_empty());
    assert_eq!(out.measurements.len(), MAX_MEASUREMENTS_PER_EVENT);
    let out = n.normalize_event(&event(&many(MAX_MEASUREMENTS_PER_EVENT + 1)));
    assert!(out.measurements.is_empty());
    assert_eq!(out.errors.len(), 1);
    assert_eq!(out.errors[0].kind, ErrorKind::EventTooLarge);
    assert!(
        out.errors[0].message.contains("limit of 10000"),
        "{:?}",
        out.errors
    );
}
