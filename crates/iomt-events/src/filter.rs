//! Subscription filters with Event Grid's semantics, so that filters written for Azure Health
//! Data Services subscriptions carry over: event types, subject prefix and suffix, and the
//! advanced operators. Values within one filter are OR-ed, filters are AND-ed, strings compare
//! without case, and a missing key fails every operator but `NumberNotIn` and `StringNotIn`.
//!
//! Keys name fields of the Event Grid schema (`id`, `topic`, `subject`, `eventType`,
//! `dataVersion`) or of CloudEvents (`source`, `type`, `specversion`, `time`, `sequence`,
//! `partitionkey`), and `data.<field>` (`data.resourceType`, `data.resourceFhirAccount`,
//! `data.resourceFhirId`, `data.resourceVersionId`), whatever the subscription's format.

use serde::Deserialize;
use serde_json::Value;

use crate::event::{ChangeEvent, Publisher};

/// Event Grid's limits: advanced filters and values per subscription, characters per string.
const MAX_FILTERS: usize = 25;
const MAX_VALUES: usize = 25;
const MAX_STRING: usize = 512;

/// What a subscription receives.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Filter {
    /// Event types to receive (`Microsoft.HealthcareApis.FhirResourceCreated`, …); all when
    /// empty.
    pub included_event_types: Vec<String>,
    /// Resource types to receive; all when empty.
    pub resource_types: Vec<String>,
    /// The subject must start with this.
    pub subject_begins_with: Option<String>,
    /// The subject must end with this.
    pub subject_ends_with: Option<String>,
    /// Compare the subject with case.
    pub is_subject_case_sensitive: bool,
    /// Further conditions, all of which must hold.
    pub advanced_filters: Vec<AdvancedFilter>,
}

/// One advanced filter: `{operator_type, key, value | values}`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdvancedFilter {
    /// The operator, as Event Grid names it (`StringIn`, `NumberGreaterThan`, …).
    pub operator_type: Operator,
    /// The field tested.
    pub key: String,
    /// The value, for operators that take one.
    #[serde(default)]
    pub value: Option<Value>,
    /// The values, for operators that take several (any may match).
    #[serde(default)]
    pub values: Vec<Value>,
}

/// Event Grid's advanced filter operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[allow(missing_docs)]
pub enum Operator {
    NumberIn,
    NumberNotIn,
    NumberLessThan,
    NumberGreaterThan,
    NumberLessThanOrEquals,
    NumberGreaterThanOrEquals,
    NumberInRange,
    NumberNotInRange,
    BoolEquals,
    StringContains,
    StringNotContains,
    StringBeginsWith,
    StringNotBeginsWith,
    StringEndsWith,
    StringNotEndsWith,
    StringIn,
    StringNotIn,
    IsNullOrUndefined,
    IsNotNull,
}

/// Why a filter cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(String);

impl Filter {
    /// Checks the filter against Event Grid's rules and limits.
    pub fn validate(&self) -> Result<(), FilterError> {
        let fail = |m: String| Err(FilterError(m));
        if self.advanced_filters.len() > MAX_FILTERS {
            return fail(format!(
                "at most {MAX_FILTERS} advanced filters, found {}",
                self.advanced_filters.len()
            ));
        }
        let mut values = 0;
        for (i, f) in self.advanced_filters.iter().enumerate() {
            let at = format!("advanced_filters[{i}] ({:?} on {})", f.operator_type, f.key);
            let given = f.values.len() + usize::from(f.value.is_some());
            values += given;
            let single = matches!(
                f.operator_type,
                Operator::NumberLessThan
                    | Operator::NumberGreaterThan
                    | Operator::NumberLessThanOrEquals
                    | Operator::NumberGreaterThanOrEquals
                    | Operator::BoolEquals
            );
            let none = matches!(
                f.operator_type,
                Operator::IsNullOrUndefined | Operator::IsNotNull
            );
            if none && given > 0 {
                return fail(format!("{at}: takes no value"));
            }
            if single && (f.value.is_none() || !f.values.is_empty()) {
                return fail(format!("{at}: takes one `value`"));
            }
            if !single && !none && (f.values.is_empty() || f.value.is_some()) {
                return fail(format!("{at}: takes `values`"));
            }
            let all: Vec<&Value> = f.value.iter().chain(&f.values).collect();
            for v in all {
                let ok = match f.operator_type {
                    Operator::BoolEquals => v.is_boolean(),
                    Operator::NumberInRange | Operator::NumberNotInRange => v
                        .as_array()
                        .is_some_and(|r| r.len() == 2 && r.iter().all(Value::is_number)),
                    o if number_operator(o) => v.is_number(),
                    _ => v.as_str().is_some_and(|s| s.chars().count() <= MAX_STRING),
                };
                if !ok {
                    return fail(format!(
                        "{at}: {v} is not a value this operator takes (strings up to {MAX_STRING} characters, numbers, [low, high] ranges, booleans)"
                    ));
                }
            }
        }
        if values > MAX_VALUES {
            return fail(format!(
                "at most {MAX_VALUES} values across advanced filters, found {values}"
            ));
        }
        Ok(())
    }

    /// Whether the subscription receives `event`.
    pub fn matches(&self, event: &ChangeEvent, publisher: &Publisher) -> bool {
        let event_type = event.kind.event_type();
        if !self.included_event_types.is_empty()
            && !self
                .included_event_types
                .iter()
                .any(|t| t.eq_ignore_ascii_case(event_type))
        {
            return false;
        }
        if !self.resource_types.is_empty()
            && !self
                .resource_types
                .iter()
                .any(|t| t.eq_ignore_ascii_case(&event.resource_type))
        {
            return false;
        }
        if self.subject_begins_with.is_some() || self.subject_ends_with.is_some() {
            let subject = event.subject(publisher);
            let (subject, fold) = if self.is_subject_case_sensitive {
                (subject, false)
            } else {
                (subject.to_lowercase(), true)
            };
            let prepared = |s: &str| if fold { s.to_lowercase() } else { s.to_owned() };
            if let Some(prefix) = &self.subject_begins_with
                && !subject.starts_with(&prepared(prefix))
            {
                return false;
            }
            if let Some(suffix) = &self.subject_ends_with
                && !subject.ends_with(&prepared(suffix))
            {
                return false;
            }
        }
        self.advanced_filters
            .iter()
            .all(|f| f.matches(field(event, publisher, &f.key).as_ref()))
    }
}

fn number_operator(o: Operator) -> bool {
    matches!(
        o,
        Operator::NumberIn
            | Operator::NumberNotIn
            | Operator::NumberLessThan
            | Operator::NumberGreaterThan
            | Operator::NumberLessThanOrEquals
            | Operator::NumberGreaterThanOrEquals
            | Operator::NumberInRange
            | Operator::NumberNotInRange
    )
}

/// The value of `key` in the event, as Event Grid would read it; `None` when absent.
fn field(event: &ChangeEvent, publisher: &Publisher, key: &str) -> Option<Value> {
    let lower = key.to_ascii_lowercase();
    Some(match lower.as_str() {
        "id" => Value::from(event.id.to_string()),
        "topic" | "source" => Value::from(publisher.source.clone()),
        "subject" => Value::from(event.subject(publisher)),
        "eventtype" | "type" => Value::from(event.kind.event_type()),
        "eventtime" | "time" => Value::from(event.time.clone()),
        "dataversion" => Value::from(event.version_id.clone()),
        "metadataversion" => Value::from("1"),
        "specversion" => Value::from("1.0"),
        "dataschema" => Value::from(format!("#{}", event.version_id)),
        "partitionkey" => Value::from(event.partition_key()),
        "sequence" => Value::from(event.sequence_text()?),
        "traceparent" => Value::from(event.traceparent()),
        "data.resourcetype" => Value::from(event.resource_type.clone()),
        "data.resourcefhiraccount" => Value::from(publisher.fhir_account.clone()),
        "data.resourcefhirid" => Value::from(event.resource_id.clone()),
        "data.resourceversionid" => event.version_value(),
        _ => return None,
    })
}

impl AdvancedFilter {
    fn values(&self) -> impl Iterator<Item = &Value> {
        self.value.iter().chain(&self.values)
    }

    fn matches(&self, actual: Option<&Value>) -> bool {
        use Operator::*;
        let actual = actual.filter(|v| !v.is_null());
        match self.operator_type {
            IsNullOrUndefined => return actual.is_none(),
            IsNotNull => return actual.is_some(),
            _ => {}
        }
        let Some(actual) = actual else {
            return matches!(self.operator_type, NumberNotIn | StringNotIn);
        };
        match self.operator_type {
            BoolEquals => actual
                .as_bool()
                .is_some_and(|b| self.value.as_ref().and_then(Value::as_bool) == Some(b)),
            o if number_operator(o) => {
                // A field that is not a number matches no number operator (`NumberNotIn`
                // and `NumberNotInRange` included): Event Grid skips values of the wrong type.
                let Some(n) = number(actual) else {
                    return false;
                };
                let numbers = || self.values().filter_map(Value::as_f64);
                let in_range = |r: &Value| {
                    let r = r.as_array();
                    let low = r.and_then(|r| r.first()).and_then(Value::as_f64);
                    let high = r.and_then(|r| r.get(1)).and_then(Value::as_f64);
                    matches!((low, high), (Some(l), Some(h)) if l <= n && n <= h)
                };
                match o {
                    NumberIn => numbers().any(|v| v == n),
                    NumberNotIn => !numbers().any(|v| v == n),
                    NumberLessThan => numbers().any(|v| n < v),
                    NumberGreaterThan => numbers().any(|v| n > v),
                    NumberLessThanOrEquals => numbers().any(|v| n <= v),
                    NumberGreaterThanOrEquals => numbers().any(|v| n >= v),
                    NumberInRange => self.values().any(in_range),
                    _ => !self.values().any(in_range),
                }
            }
            o => {
                let text = match actual {
                    Value::String(s) => s.to_lowercase(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return false,
                };
                let strings = || {
                    self.values()
                        .filter_map(Value::as_str)
                        .map(str::to_lowercase)
                };
                match o {
                    StringContains => strings().any(|v| text.contains(&v)),
                    StringNotContains => !strings().any(|v| text.contains(&v)),
                    StringBeginsWith => strings().any(|v| text.starts_with(&v)),
                    StringNotBeginsWith => !strings().any(|v| text.starts_with(&v)),
                    StringEndsWith => strings().any(|v| text.ends_with(&v)),
                    StringNotEndsWith => !strings().any(|v| text.ends_with(&v)),
                    StringIn => strings().any(|v| text == v),
                    _ => !strings().any(|v| text == v),
                }
            }
        }
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ChangeKind;
    use serde_json::json;

    fn publisher() -> Publisher {
        Publisher {
            source: "iomt".into(),
            fhir_account: "fhir.example.org".into(),
        }
    }

    fn event(kind: ChangeKind, resource_type: &str, version: &str) -> ChangeEvent {
        ChangeEvent::new(
            "iomt",
            kind,
            resource_type,
            "x1",
            version,
            "2024-01-01T00:00:00Z",
        )
    }

    fn filter(toml_like: Value) -> Filter {
        let f: Filter = serde_json::from_value(toml_like).unwrap();
        f.validate().unwrap();
        f
    }

    #[test]
    fn types_resource_types_and_subject() {
        let p = publisher();
        let f = filter(json!({
            "included_event_types": ["microsoft.healthcareapis.fhirresourcecreated"],
            "resource_types": ["observation"],
            "subject_begins_with": "FHIR.example.org/Observation/",
        }));
        assert!(f.matches(&event(ChangeKind::Created, "Observation", "1"), &p));
        assert!(!f.matches(&event(ChangeKind::Updated, "Observation", "2"), &p));
        assert!(!f.matches(&event(ChangeKind::Created, "Patient", "1"), &p));
        let sensitive = filter(json!({
            "subject_ends_with": "/X1",
            "is_subject_case_sensitive": true,
        }));
        assert!(!sensitive.matches(&event(ChangeKind::Created, "Patient", "1"), &p));
        assert!(Filter::default().matches(&event(ChangeKind::Deleted, "Device", "4"), &p));
    }

    #[test]
    fn advanced_operators_or_within_and_across() {
        let p = publisher();
        let e = event(ChangeKind::Updated, "Observation", "3");
        let cases = [
            (
                json!({"operator_type": "StringIn", "key": "data.resourceType", "values": ["patient", "OBSERVATION"]}),
                true,
            ),
            (
                json!({"operator_type": "StringNotIn", "key": "data.resourceType", "values": ["Observation"]}),
                false,
            ),
            (
                json!({"operator_type": "StringBeginsWith", "key": "subject", "values": ["nope", "fhir.EXAMPLE"]}),
                true,
            ),
            (
                json!({"operator_type": "StringContains", "key": "eventType", "values": ["Updated"]}),
                true,
            ),
            (
                json!({"operator_type": "StringNotEndsWith", "key": "subject", "values": ["/x1"]}),
                false,
            ),
            (
                json!({"operator_type": "NumberGreaterThan", "key": "data.resourceVersionId", "value": 2}),
                true,
            ),
            (
                json!({"operator_type": "NumberLessThanOrEquals", "key": "data.resourceVersionId", "value": 2}),
                false,
            ),
            (
                json!({"operator_type": "NumberInRange", "key": "data.resourceVersionId", "values": [[0, 1], [3, 9]]}),
                true,
            ),
            (
                json!({"operator_type": "NumberNotInRange", "key": "data.resourceVersionId", "values": [[3, 3]]}),
                false,
            ),
            (
                json!({"operator_type": "NumberIn", "key": "data.resourceVersionId", "values": [1, 3]}),
                true,
            ),
            (
                json!({"operator_type": "IsNotNull", "key": "data.resourceFhirId"}),
                true,
            ),
            (
                json!({"operator_type": "IsNullOrUndefined", "key": "data.nothing"}),
                true,
            ),
            // A missing key fails everything but the two NotIn operators.
            (
                json!({"operator_type": "StringNotContains", "key": "data.nothing", "values": ["a"]}),
                false,
            ),
            (
                json!({"operator_type": "StringNotIn", "key": "data.nothing", "values": ["a"]}),
                true,
            ),
            (
                json!({"operator_type": "NumberNotIn", "key": "data.nothing", "values": [1]}),
                true,
            ),
            (
                json!({"operator_type": "BoolEquals", "key": "data.resourceType", "value": true}),
                false,
            ),
            // A string field matches no number operator.
            (
                json!({"operator_type": "NumberNotIn", "key": "subject", "values": [1]}),
                false,
            ),
        ];
        for (advanced, expected) in cases {
            let f = filter(json!({"advanced_filters": [advanced.clone()]}));
            assert_eq!(f.matches(&e, &p), expected, "{advanced}");
        }
        // AND across filters.
        let both = filter(json!({"advanced_filters": [
            {"operator_type": "StringIn", "key": "data.resourceType", "values": ["Observation"]},
            {"operator_type": "NumberLessThan", "key": "data.resourceVersionId", "value": 3},
        ]}));
        assert!(!both.matches(&e, &p));
    }

    #[test]
    fn limits_and_shapes_are_checked() {
        let too_many: Vec<Value> = (0..26)
            .map(|_| json!({"operator_type": "IsNotNull", "key": "id"}))
            .collect();
        let f: Filter = serde_json::from_value(json!({"advanced_filters": too_many})).unwrap();
        assert!(f.validate().unwrap_err().to_string().contains("at most 25"));
        for bad in [
            json!({"operator_type": "StringIn", "key": "id", "value": "a"}),
            json!({"operator_type": "NumberLessThan", "key": "id", "values": [1]}),
            json!({"operator_type": "NumberIn", "key": "id", "values": ["1"]}),
            json!({"operator_type": "StringIn", "key": "id", "values": ["x".repeat(513)]}),
            json!({"operator_type": "IsNotNull", "key": "id", "values": ["a"]}),
        ] {
            let f: Filter =
                serde_json::from_value(json!({"advanced_filters": [bad.clone()]})).unwrap();
            assert!(f.validate().is_err(), "{bad}");
        }
    }
}
