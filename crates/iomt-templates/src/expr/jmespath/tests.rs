use serde_json::{Value, json};

use super::*;

fn eval(expr: &str, data: &Value) -> Result<Value, JmesPathError> {
    let e = JmesPath::compile(expr)?;
    e.search_in(Scope::Value(data)).map(Cow::into_owned)
}

fn ok(expr: &str, data: &Value) -> Value {
    eval(expr, data).unwrap_or_else(|e| panic!("{expr}: {e}"))
}

/// The measurement value text a value expression yields (`Value<string>()`).
fn value(expr: &str, data: &Value) -> Option<String> {
    let e = JmesPath::compile(expr).unwrap();
    e.select_one_in(Scope::Value(data))
        .unwrap()
        .map(|t| t.value_string().unwrap().unwrap().into_owned())
}

#[test]
fn custom_arithmetic_follows_dotnet_typing() {
    assert_eq!(ok("add(`1`, `2`)", &json!(null)), json!(3));
    assert_eq!(ok("divide(`7`, `2`)", &json!(null)), json!(3));
    assert_eq!(ok("divide(`7.0`, `2`)", &json!(null)), json!(3.5));
    assert_eq!(
        ok("multiply(to_number('72'), `0.0254`)", &json!(null)),
        json!(72.0 * 0.0254)
    );
    assert_eq!(ok("subtract(`5`, `7`)", &json!(null)), json!(-2));
    assert_eq!(ok("pow(`2`, `10`)", &json!(null)), json!(1024));
    assert_eq!(ok("pow(`2.0`, `0.5`)", &json!(null)), json!(2f64.sqrt()));
    assert_eq!(
        ok("add(`9223372036854775807`, `1`)", &json!(null)),
        json!(i64::MIN)
    );
    assert!(eval("divide(`1`, `0`)", &json!(null)).is_err());
    assert!(eval("pow(`10`, `30`)", &json!(null)).is_err());
    assert!(eval("add('a', `1`)", &json!(null)).is_err());
}

#[test]
fn strings_and_times() {
    assert_eq!(
        ok("insertString('abcd', '-', `2`)", &json!(null)),
        json!("ab-cd")
    );
    assert!(eval("insertString('ab', '-', `3`)", &json!(null)).is_err());
    assert!(eval("insertString('ab', '-', `1.0`)", &json!(null)).is_err());
    assert_eq!(
        ok("fromUnixTimestamp(`1549061161`)", &json!(null)),
        json!("2019-02-01T22:46:01Z")
    );
    assert_eq!(
        ok("fromUnixTimestampMs(`1549061161875`)", &json!(null)),
        json!("2019-02-01T22:46:01.875Z")
    );
    // A computed date is a date token: joined as its invariant text.
    assert_eq!(
        ok(
            "join(' ', ['at', fromUnixTimestamp(`1549061161`)])",
            &json!(null)
        ),
        json!("at 02/01/2019 22:46:01")
    );
}

#[test]
fn body_dates_are_date_tokens() {
    let doc = json!({"drug": "heparin", "at": "2024-03-05T09:00:00Z",
        "same": "2024-03-05T09:00:00.000Z", "later": "2024-03-05T10:00:00+01:00",
        "plain": "2024-03-05 09:00:00"});
    assert_eq!(
        value("join(' @ ', [drug, at])", &doc).as_deref(),
        Some("heparin @ 03/05/2024 09:00:00")
    );
    assert_eq!(ok("length(at)", &doc), json!(19));
    assert_eq!(ok("length(plain)", &doc), json!(19));
    assert_eq!(ok("contains(at, 'T')", &doc), json!(false));
    assert_eq!(ok("contains(plain, ' ')", &doc), json!(true));
    assert_eq!(ok("at == '2024-03-05T09:00:00Z'", &doc), json!(false));
    assert_eq!(ok("at == same", &doc), json!(true));
    assert_eq!(ok("at == later", &doc), json!(true));
    assert_eq!(ok("at == `\"2024-03-05T09:00:00Z\"`", &doc), json!(true));
    assert_eq!(ok("type(at)", &doc), json!("string"));
    assert_eq!(ok("starts_with(at, '03/05')", &doc), json!(true));
    assert_eq!(ok("to_number(at)", &doc), Value::Null);
    // to_string keeps the date; the value is still printed as a date.
    assert_eq!(
        value("to_string(at)", &doc).as_deref(),
        Some("03/05/2024 09:00:00")
    );
    assert_eq!(
        ok("to_string([at])", &doc),
        json!("[\"2024-03-05T09:00:00Z\"]")
    );
    // Ordering reads dates as their invariant text.
    assert_eq!(ok("at < '1'", &doc), json!(true));
    // A raw string literal that looks like a date stays a string.
    assert_eq!(
        value("'2024-03-05T09:00:00Z'", &doc).as_deref(),
        Some("2024-03-05T09:00:00Z")
    );
    assert_eq!(value("at", &doc).as_deref(), Some("03/05/2024 09:00:00"));
}

#[test]
fn jmespath_net_semantics() {
    // Strings order ordinally, null first; an integer never equals a double.
    assert_eq!(ok("'a' < 'b'", &json!(null)), json!(true));
    assert_eq!(ok("missing < 'b'", &json!({})), json!(true));
    assert_eq!(ok("`1` == `1.0`", &json!(null)), json!(false));
    assert_eq!(ok("`1` < `1.5`", &json!(null)), json!(true));
    assert_eq!(ok("`true` < `false`", &json!(null)), Value::Null);
    // Projections drop evaluation nulls, keep the document's nulls; [*] drops null elements.
    let doc = json!({"a": [{"x": null}, {"x": 1}, {}, null]});
    assert_eq!(ok("a[*].x", &doc), json!([null, 1]));
    assert_eq!(ok("a[*]", &doc), json!([{"x": null}, {"x": 1}, {}]));
    assert_eq!(ok("a[*].x.y", &doc), json!([]));
    assert_eq!(ok("a[0:4]", &doc), json!([{"x": null}, {"x": 1}, {}, null]));
    // A dot stops at null; a pipe does not.
    assert_eq!(ok("missing.to_string(@)", &json!({})), Value::Null);
    assert_eq!(ok("missing | to_string(@)", &json!({})), json!("null"));
    // merge is deep, sum of whole doubles is an integer, max_by reads numeric strings.
    assert_eq!(
        ok(
            "merge(`{\"a\": {\"x\": 1}, \"l\": [1]}`, `{\"a\": {\"y\": 2}, \"l\": [2], \"n\": null}`)",
            &json!(null)
        ),
        json!({"a": {"x": 1, "y": 2}, "l": [1, 2], "n": null})
    );
    assert_eq!(ok("sum(`[1.5, 1.5]`)", &json!(null)), json!(3));
    assert_eq!(
        ok(
            "max_by(@, &v).k",
            &json!([{"k": 1, "v": "2"}, {"k": 2, "v": "10"}])
        ),
        json!(2)
    );
    assert_eq!(ok("max(`[1, 2.5]`)", &json!(null)), json!(2.5));
    assert_eq!(ok("max(`[1, 3]`)", &json!(null)), json!(3));
    assert_eq!(
        ok("sort(`[\"b\", \"a\", \"B\"]`)", &json!(null)),
        json!(["B", "a", "b"])
    );
    assert_eq!(
        ok(
            "sort_by(@, &n)[*].n",
            &json!([{"n": 2}, {"n": 1.5}, {"n": 3}])
        ),
        json!([1.5, 2, 3])
    );
    assert_eq!(ok("length('\u{1f600}')", &json!(null)), json!(2));
    assert!(eval("{a: `1`, a: `2`}", &json!(null)).is_err());
    assert!(eval("contains('abc', `null`)", &json!(null)).is_err());
    assert!(eval("min_by(`[]`, &a)", &json!(null)).is_err());
}

#[test]
fn projections_yield_each_element() {
    let doc = json!({"Body": [{"hr": 1}, {"hr": 2}, {"x": 3}]});
    let scope = Scope::Value(&doc);
    let e = JmesPath::compile("Body[?hr]").unwrap();
    assert_eq!(e.select_in(scope).unwrap().len(), 2);
    let e = JmesPath::compile("to_array(@.Body) | [? hr].hr").unwrap();
    let got: Vec<Value> = e
        .select_in(scope)
        .unwrap()
        .into_iter()
        .map(Cow::into_owned)
        .collect();
    assert_eq!(got, vec![json!(1), json!(2)]);
    let e = JmesPath::compile("Body").unwrap();
    assert_eq!(e.select_in(scope).unwrap().len(), 1);
    let e = JmesPath::compile("Body[*].hr").unwrap();
    assert!(matches!(
        e.select_one_in(scope),
        Err(JmesPathSelectError::Multiple)
    ));
    let e = JmesPath::compile("missing").unwrap();
    assert!(e.select_in(scope).unwrap().is_empty());
    // A projection's document nulls are tokens too (MedTech yields them as matches).
    let doc = json!({"r": [{"v": null}, {"v": 2}]});
    let e = JmesPath::compile("r[*].v").unwrap();
    assert_eq!(e.select_in(Scope::Value(&doc)).unwrap().len(), 2);
}

#[test]
fn matched_scope() {
    let env = json!({"Body": {"deviceId": "d1"}, "matchedToken": "old", "z": 1});
    let token = json!({"date": "x"});
    let scope = Scope::Matched {
        envelope: &env,
        token: &token,
    };
    let get = |p: &str| {
        JmesPath::compile(p)
            .unwrap()
            .search_in(scope)
            .unwrap()
            .into_owned()
    };
    assert_eq!(get("matchedToken.date"), json!("x"));
    assert_eq!(get("Body.deviceId"), json!("d1"));
    assert_eq!(get("keys(@)"), json!(["Body", "z", "matchedToken"]));
}

#[test]
fn member_order_is_document_order() {
    assert_eq!(ok("values(@)", &json!({"b": 1, "a": 2})), json!([1, 2]));
    assert_eq!(ok("*", &json!({"b": 1, "a": 2})), json!([1, 2]));
}

#[test]
fn compile_errors() {
    assert!(JmesPath::compile("Body[?").is_err());
    assert!(JmesPath::compile("nosuchfunction(@)").is_err());
    assert!(JmesPath::compile("add(`1`)").is_err());
    assert!(JmesPath::compile("Body[?starts_with(a)]").is_err());
    assert!(JmesPath::compile("not_null(a, b, c)").is_ok());
    assert!(JmesPath::compile("[::0]").is_err());
}

#[test]
fn expressions_too_long_or_deep_are_refused_before_parsing() {
    let refused = |expr: &str, why: &str| {
        let e = JmesPath::compile(expr).expect_err(why);
        assert!(e.reason.contains(why), "{}", e.reason);
        assert!(
            e.expression.chars().count() <= 201,
            "the error quotes an excerpt"
        );
    };
    refused(
        &format!("{}a{}", "not_null(".repeat(1_000), ")".repeat(1_000)),
        "levels deep",
    );
    refused(
        &format!("{}a{}", "(".repeat(5_000), ")".repeat(5_000)),
        "levels deep",
    );
    refused(&format!("a{}", ".a".repeat(2_000)), "operators");
    refused(&format!("'{}'", "x".repeat(1 << 20)), "bytes long");
    refused(
        &format!("{}a{}", "not_null(".repeat(5_000), ")".repeat(5_000)),
        "bytes long",
    );
    // Brackets inside literals do not nest.
    assert!(JmesPath::compile(&format!("'{}'", "(".repeat(200))).is_ok());
}

#[test]
fn expressions_at_the_limits_compile_and_run_on_a_small_stack() {
    let deep = format!(
        "{}a{}",
        "not_null(".repeat(iomt_core::Limits::default().expression_nesting),
        ")".repeat(iomt_core::Limits::default().expression_nesting)
    );
    let long = format!(
        "a{}",
        ".a".repeat(iomt_core::Limits::default().expression_operators)
    );
    let both = format!(
        "{}a{}{}",
        "not_null(".repeat(iomt_core::Limits::default().expression_nesting),
        ".a".repeat(iomt_core::Limits::default().expression_operators - 1),
        ")".repeat(iomt_core::Limits::default().expression_nesting)
    );
    // Tokio's worker threads have 2 MiB stacks.
    let on_small_stack = |expr: String, data: Value, expected: Value| {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || assert_eq!(ok(&expr, &data), expected))
            .unwrap()
            .join()
            .unwrap();
    };
    on_small_stack(deep, json!({"a": 1}), json!(1));
    on_small_stack(long, json!({"a": {"a": 1}}), json!(null));
    on_small_stack(both, json!({"a": {"a": 1}}), json!(null));
}
