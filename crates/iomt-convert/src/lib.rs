//! The convert stage: measurement groups in, FHIR R4 Observations out.
//!
//! Everything here reproduces what MedTech writes, so that a deployment migrating from it keeps
//! updating the same resources:
//!
//! * measurements are split into observation windows by the template's `periodInterval`;
//! * the Observation identifier is `{patient id}.{device id}.{type}.{segment}` under MedTech's
//!   service system, and the resource id is the lowercase hex SHA-256 of
//!   `"{system}_{value}"`;
//! * SampledData values fill fixed-period slots across the window (`E` where empty, the latest
//!   value winning a slot);
//! * merging into an existing Observation widens its period, merges SampledData, replaces other
//!   values, appends missing components, and marks it `amended` only if something changed.
//!
//! The stage is pure: resolving the Patient and Device ids and talking to the FHIR server
//! happen elsewhere.
#![deny(missing_docs)]

use std::collections::BTreeMap;

use iomt_core::{Measurement, MeasurementGroup, Timestamp};
use iomt_templates::fhir::{
    CodeValueTemplate, Coding, FhirTemplate, HandlebarsTemplate, PeriodInterval, ValueKind,
    ValueTemplate,
};
use serde_json::{Map, Number, Value, json};

/// The identifier system of every Observation MedTech writes.
pub const SERVICE_SYSTEM: &str = "https://azure.microsoft.com/en-us/services/iomt-fhir-connector/";

const TICKS_PER_HOUR: i64 = 36_000_000_000;
const TICKS_PER_DAY: i64 = 24 * TICKS_PER_HOUR;
const TICKS_PER_MILLI: f64 = 10_000.0;

/// Why a group could not be converted. Each is a data problem of the group, not a fault of
/// the FHIR server; names follow MedTech's exceptions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// No FHIR template has the measurement's type name.
    #[error(
        "no FHIR template exists with the type name [{0}]; FHIR template type names must match device mapping type names (matched without regard to case)"
    )]
    TemplateNotFound(String),
    /// A `periodInterval: -1` template got measurements without a correlation id.
    #[error("the FHIR template for [{0}] groups by correlation id, but the measurements have none")]
    CorrelationIdNotDefined(String),
    /// A Quantity value is not a number, or a window holds more than one.
    #[error("invalid Quantity value for [{name}]: {reason}")]
    InvalidQuantityValue {
        /// The value name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A SampledData value is not a FHIR decimal: it would corrupt the `data` string (a value
    /// with spaces fills several slots).
    #[error("invalid SampledData value for [{name}]: {reason}")]
    InvalidSampledDataValue {
        /// The value name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A String value got more than one measurement in one window.
    #[error(
        "the String value [{name}] received {count} values in one observation window; use periodInterval 0"
    )]
    MultipleStringValues {
        /// The value name.
        name: String,
        /// How many values arrived.
        count: usize,
    },
    /// The existing Observation holds another kind of value than the template produces.
    #[error("the existing Observation's value is {actual}, but the template produces {expected}")]
    ExistingValueType {
        /// The element the template writes.
        expected: &'static str,
        /// What the Observation has.
        actual: String,
    },
    /// A handlebars template failed to render, or rendered something that is not a resource.
    #[error("the handlebars template for [{type_name}] {reason}")]
    Render {
        /// The measurement type.
        type_name: String,
        /// What went wrong.
        reason: String,
    },
    /// The existing Observation has no usable effective period.
    #[error("the existing Observation has no effectivePeriod or effectiveDateTime")]
    EffectiveNotSupported,
}

impl ConvertError {
    /// MedTech's exception name for this error, for metrics and dead-letter records.
    pub fn name(&self) -> &'static str {
        match self {
            ConvertError::TemplateNotFound(_) => "TemplateNotFoundException",
            ConvertError::CorrelationIdNotDefined(_) => "CorrelationIdNotDefinedException",
            ConvertError::InvalidQuantityValue { .. } => "InvalidQuantityFhirValueException",
            ConvertError::InvalidSampledDataValue { .. } => "InvalidSampledDataFhirValueException",
            ConvertError::MultipleStringValues { .. } => "InvalidOperationException",
            ConvertError::Render { .. } => "HandlebarsRenderException",
            ConvertError::ExistingValueType { .. } | ConvertError::EffectiveNotSupported => {
                "NotSupportedException"
            }
        }
    }
}

/// The FHIR logical ids an Observation refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceIds {
    /// `Patient/{id}`.
    pub patient: String,
    /// `Device/{id}`.
    pub device: String,
    /// `Encounter/{id}`, when the measurement named an encounter.
    pub encounter: Option<String>,
}

impl ResourceIds {
    /// Stand-in ids for converting without a FHIR server (the mapping debugger, sample tests):
    /// the business identifiers from the measurements. A server resolves the real ones, which
    /// changes the Observation identifier and id.
    pub fn placeholders(group: &MeasurementGroup) -> Self {
        Self {
            patient: group
                .patient_id
                .clone()
                .filter(|p| !p.trim().is_empty())
                .unwrap_or_else(|| "unknown-patient".to_owned()),
            device: group.device_id.clone(),
            encounter: group.encounter_id.clone().filter(|e| !e.trim().is_empty()),
        }
    }
}

/// The measurements of one observation window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservationGroup<'a> {
    /// The measurement type as received (the template may spell it in another case).
    pub type_name: &'a str,
    /// First instant of the window.
    pub start: Timestamp,
    /// Last instant of the window (inclusive, at tick precision).
    pub end: Timestamp,
    /// The identifier segment: `yyyyMMddHHmmssZ.yyyyMMddHHmmssZ`, or the correlation id.
    pub segment: String,
    /// Values by property name, each sorted by time with one value per instant.
    pub values: BTreeMap<&'a str, Vec<(Timestamp, &'a str)>>,
}

/// Splits a measurement group into observation windows, after MedTech's de-duplication: of
/// measurements with the same occurrence time, the one ingested last is kept.
pub fn observation_groups<'a>(
    period: PeriodInterval,
    group: &'a MeasurementGroup,
) -> Result<Vec<ObservationGroup<'a>>, ConvertError> {
    let mut latest: BTreeMap<Timestamp, &'a Measurement> = BTreeMap::new();
    for m in &group.measurements {
        let keep_new = latest
            .get(&m.occurrence_time_utc)
            .is_none_or(|old| m.ingestion_time_utc > old.ingestion_time_utc);
        if keep_new {
            latest.insert(m.occurrence_time_utc, m);
        }
    }
    let window = |t: Timestamp| -> (Timestamp, Timestamp) {
        match period {
            PeriodInterval::Single | PeriodInterval::CorrelationId => (t, t),
            PeriodInterval::Hourly => {
                (t.hour_start(), t.hour_start().add_ticks(TICKS_PER_HOUR - 1))
            }
            PeriodInterval::Daily => (t.day_start(), t.day_start().add_ticks(TICKS_PER_DAY - 1)),
        }
    };
    let segment = |start: &Timestamp, end: &Timestamp| {
        format!(
            "{}Z.{}Z",
            start.to_compact_string(),
            end.to_compact_string()
        )
    };
    let mut windows: BTreeMap<Timestamp, ObservationGroup<'a>> = BTreeMap::new();
    if period == PeriodInterval::CorrelationId {
        let correlation = group
            .correlation_id
            .as_deref()
            .filter(|c| !c.trim().is_empty());
        let Some(correlation) = correlation else {
            return Err(ConvertError::CorrelationIdNotDefined(
                group.type_name.to_string(),
            ));
        };
        let (Some(first), Some(last)) = (latest.keys().next(), latest.keys().next_back()) else {
            return Ok(Vec::new());
        };
        let mut og = ObservationGroup {
            type_name: &group.type_name,
            start: *first,
            end: *last,
            segment: correlation.to_owned(),
            values: BTreeMap::new(),
        };
        add_values(&mut og, latest.values().copied());
        return Ok(vec![og]);
    }
    for (t, m) in &latest {
        let (start, end) = window(*t);
        let og = windows.entry(start).or_insert_with(|| ObservationGroup {
            type_name: &group.type_name,
            start,
            end,
            segment: segment(&start, &end),
            values: BTreeMap::new(),
        });
        add_values(og, std::iter::once(*m));
    }
    Ok(windows.into_values().collect())
}

fn add_values<'a>(
    og: &mut ObservationGroup<'a>,
    measurements: impl Iterator<Item = &'a Measurement>,
) {
    for m in measurements {
        for p in &m.properties {
            let values = og.values.entry(&p.name).or_default();
            // Time-ordered, one value per instant: the first one stays (MedTech's SortedSet).
            if let Err(at) = values.binary_search_by_key(&m.occurrence_time_utc, |(t, _)| *t) {
                values.insert(at, (m.occurrence_time_utc, &p.value));
            }
        }
    }
}

/// The Observation identifier value: `{patient}.{device}.{type}.{segment}` with FHIR logical ids.
pub fn identifier_value(ids: &ResourceIds, group: &ObservationGroup<'_>) -> String {
    format!(
        "{}.{}.{}.{}",
        ids.patient, ids.device, group.type_name, group.segment
    )
}

/// MedTech's deterministic resource id: lowercase hex SHA-256 of `"{system}_{value}"`.
pub fn resource_id(system: &str, value: &str) -> String {
    iomt_templates::fhir::sha256_hex(&format!("{system}_{value}"))
}

/// The Patient that MedTech's Create mode makes for a patient identifier value, with its
/// deterministic id (SHA-256 of `"_{value}"`). The embedded store writes the same resources, so
/// it holds what a server in Create mode would hold.
pub fn created_patient(patient_value: &str) -> Value {
    serde_json::json!({
        "resourceType": "Patient",
        "id": resource_id("", patient_value),
        "identifier": [{"value": patient_value}],
    })
}

/// The Device that Create mode makes for a device identifier, linked to a Patient id; its id
/// is the SHA-256 of `"{system}_{value}"`.
pub fn created_device(system: Option<&str>, device_value: &str, patient_id: &str) -> Value {
    let system = system.unwrap_or("");
    let mut identifier = serde_json::json!({"value": device_value});
    if !system.is_empty() {
        identifier["system"] = serde_json::json!(system);
    }
    serde_json::json!({
        "resourceType": "Device",
        "id": resource_id(system, device_value),
        "identifier": [identifier],
        "patient": {"reference": format!("Patient/{patient_id}")},
    })
}

fn coding_json(c: &Coding) -> Value {
    let mut m = Map::new();
    for (key, value) in [
        ("system", &c.system),
        ("code", &c.code),
        ("display", &c.display),
    ] {
        if let Some(v) = value.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
            m.insert(key.to_owned(), Value::String(v.to_owned()));
        }
    }
    Value::Object(m)
}

/// `code`: the template codings, then the service coding, with `text` = the name.
fn code_json(name: &str, codes: &[Coding]) -> Value {
    let mut coding: Vec<Value> = codes.iter().map(coding_json).collect();
    coding.push(json!({"system": SERVICE_SYSTEM, "code": name, "display": name}));
    json!({"coding": coding, "text": name})
}

fn codeable_concept(text: Option<&str>, codes: &[Coding]) -> Value {
    let mut m = Map::new();
    if !codes.is_empty() {
        m.insert(
            "coding".to_owned(),
            Value::Array(codes.iter().map(coding_json).collect()),
        );
    }
    if let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) {
        m.insert("text".to_owned(), Value::String(text.to_owned()));
    }
    Value::Object(m)
}

fn period_json(start: Timestamp, end: Timestamp) -> Value {
    json!({"start": start.to_round_trip_string(), "end": end.to_round_trip_string()})
}

/// A decimal as FHIR JSON: integral values without a fraction, as the template wrote them.
fn decimal(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9e15 {
        Value::from(f as i64)
    } else {
        Number::from_f64(f).map_or(Value::Null, Value::Number)
    }
}

/// `decimal.Parse(text, InvariantCulture)`: optional sign, digits with `,` group separators,
/// optional fraction, surrounding white space; no exponent.
fn parse_dotnet_decimal(text: &str) -> Option<Value> {
    let t = text.trim();
    let unsigned = t.strip_prefix(['-', '+']).unwrap_or(t);
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let int_ok = !int.is_empty()
        && int.chars().all(|c| c.is_ascii_digit() || c == ',')
        && !int.starts_with(',');
    let frac_ok = frac.chars().all(|c| c.is_ascii_digit());
    if !(int_ok || int.is_empty() && !frac.is_empty()) || !frac_ok {
        return None;
    }
    let normalized: String = t.chars().filter(|c| *c != ',').collect();
    if !t.contains('.')
        && let Ok(i) = normalized.trim_start_matches('+').parse::<i64>()
    {
        return Some(Value::from(i));
    }
    normalized
        .trim_start_matches('+')
        .parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map(Value::Number)
}

/// The slot length of a SampledData template in ticks (.NET's `AddMilliseconds` truncates).
fn step_ticks(default_period: f64) -> i64 {
    ((default_period * TICKS_PER_MILLI) as i64).max(1)
}

/// MedTech's `SampledDataProcessor.BuildSampledData`: one token per slot from `start` while the
/// slot start is not after `end`; the latest value in a slot wins; empty slots are `E`.
pub fn sampled_data(
    values: &[(Timestamp, &str)],
    start: Timestamp,
    end: Timestamp,
    default_period: f64,
) -> String {
    let values: Vec<(i64, &str)> = values.iter().map(|(t, v)| (t.unix_ticks(), *v)).collect();
    render_slots(
        &values,
        start.unix_ticks(),
        end.unix_ticks(),
        step_ticks(default_period),
    )
}

/// [`sampled_data`] over instants in .NET ticks since the Unix epoch, sorted. A merge renders
/// thousands of slots, so the arithmetic stays on integers.
fn render_slots(values: &[(i64, &str)], start_ticks: i64, end_ticks: i64, step: i64) -> String {
    let slots = if end_ticks < start_ticks {
        0
    } else {
        (end_ticks - start_ticks) / step + 1
    };
    let mut out = String::with_capacity(slots as usize * 3);
    let mut i = 0;
    for k in 0..slots {
        let slot_start = start_ticks + k * step;
        let slot_end = slot_start + step;
        let mut last = None;
        while i < values.len() {
            let t = values[i].0;
            if t >= slot_end {
                break;
            }
            // Values before the slot (only possible for data outside the window) are skipped.
            if t >= slot_start {
                last = Some(values[i].1);
            }
            i += 1;
        }
        if k > 0 {
            out.push(' ');
        }
        out.push_str(last.unwrap_or("E"));
    }
    out
}

/// Decodes a SampledData `data` string whose first slot starts at `start_ticks` (MedTech's
/// `SampledDataToTimeValues`, skipping `E`), sorted by time.
fn decode_sampled_data(data: &str, start_ticks: i64, step: i64) -> Vec<(i64, &str)> {
    data.split(' ')
        .enumerate()
        .filter(|(_, token)| *token != "E" && !token.is_empty())
        .map(|(k, token)| {
            (
                start_ticks.saturating_add((k as i64).saturating_mul(step)),
                token,
            )
        })
        .collect()
}

/// Whether `text` is a FHIR decimal (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`), what
/// a slot of `SampledData.data` may hold besides the codes `E`, `U` and `L`.
fn is_fhir_decimal(text: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (unsigned, None),
    };
    let (whole, fraction) = match mantissa.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (mantissa, None),
    };
    digits(whole)
        && (whole == "0" || !whole.starts_with('0'))
        && fraction.is_none_or(digits)
        && exponent.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e)))
}

/// Refuses SampledData values that are not decimals.
fn check_sampled_values(name: &str, values: &[(Timestamp, &str)]) -> Result<(), ConvertError> {
    match values.iter().find(|(_, v)| !is_fhir_decimal(v)) {
        Some((_, v)) => Err(ConvertError::InvalidSampledDataValue {
            name: name.to_owned(),
            reason: format!(
                "a value of {} characters is not a decimal number",
                v.chars().count()
            ),
        }),
        None => Ok(()),
    }
}

/// The FHIR element a value template writes, and its JSON.
fn create_value(
    value: &ValueTemplate,
    values: &[(Timestamp, &str)],
    start: Timestamp,
    end: Timestamp,
) -> Result<(&'static str, Value), ConvertError> {
    Ok(match &value.kind {
        ValueKind::SampledData {
            default_period,
            unit,
        } => {
            check_sampled_values(&value.value_name, values)?;
            let mut origin = Map::new();
            origin.insert("value".to_owned(), Value::from(0));
            if let Some(unit) = unit {
                origin.insert("unit".to_owned(), Value::String(unit.clone()));
            }
            (
                "valueSampledData",
                json!({
                    "origin": origin,
                    "period": decimal(*default_period),
                    "dimensions": 1,
                    "data": sampled_data(values, start, end, *default_period),
                }),
            )
        }
        ValueKind::Quantity { unit, code, system } => {
            let [(_, text)] = values else {
                return Err(ConvertError::InvalidQuantityValue {
                    name: value.value_name.clone(),
                    reason: format!("expected 1 value, received {}", values.len()),
                });
            };
            let number =
                parse_dotnet_decimal(text).ok_or_else(|| ConvertError::InvalidQuantityValue {
                    name: value.value_name.clone(),
                    reason: format!("'{text}' is not a decimal number"),
                })?;
            let mut q = Map::new();
            q.insert("value".to_owned(), number);
            for (key, v) in [("unit", unit), ("system", system), ("code", code)] {
                if let Some(v) = v {
                    q.insert(key.to_owned(), Value::String(v.clone()));
                }
            }
            ("valueQuantity", Value::Object(q))
        }
        ValueKind::String => {
            let [(_, text)] = values else {
                return Err(ConvertError::MultipleStringValues {
                    name: value.value_name.clone(),
                    count: values.len(),
                });
            };
            ("valueString", Value::String(text.trim().to_owned()))
        }
        ValueKind::CodeableConcept { text, codes } => (
            "valueCodeableConcept",
            codeable_concept(text.as_deref(), codes),
        ),
    })
}

const VALUE_KEYS: [&str; 4] = [
    "valueSampledData",
    "valueQuantity",
    "valueString",
    "valueCodeableConcept",
];

/// Builds a new Observation for one window. `issued` is the time of writing.
pub fn build_observation(
    template: &CodeValueTemplate,
    group: &ObservationGroup<'_>,
    ids: &ResourceIds,
    issued: Timestamp,
) -> Result<Value, ConvertError> {
    let identifier = identifier_value(ids, group);
    let mut o = Map::new();
    o.insert("resourceType".to_owned(), json!("Observation"));
    o.insert(
        "id".to_owned(),
        json!(resource_id(SERVICE_SYSTEM, &identifier)),
    );
    o.insert(
        "identifier".to_owned(),
        json!([{"system": SERVICE_SYSTEM, "value": identifier}]),
    );
    o.insert("status".to_owned(), json!("final"));
    if !template.category.is_empty() {
        o.insert("category".to_owned(), category_json(template));
    }
    o.insert(
        "code".to_owned(),
        code_json(group.type_name, &template.codes),
    );
    o.insert(
        "subject".to_owned(),
        json!({"reference": format!("Patient/{}", ids.patient)}),
    );
    if let Some(encounter) = &ids.encounter {
        o.insert(
            "encounter".to_owned(),
            json!({"reference": format!("Encounter/{encounter}")}),
        );
    }
    o.insert(
        "effectivePeriod".to_owned(),
        period_json(group.start, group.end),
    );
    o.insert("issued".to_owned(), json!(issued.to_fhir_instant()));
    if let Some(value) = &template.value
        && let Some(values) = group.values.get(value.value_name.as_str())
    {
        let (key, json) = create_value(value, values, group.start, group.end)?;
        o.insert(key.to_owned(), json);
    }
    o.insert(
        "device".to_owned(),
        json!({"reference": format!("Device/{}", ids.device)}),
    );
    let mut components = Vec::new();
    for c in &template.components {
        if let Some(values) = group.values.get(c.value.value_name.as_str()) {
            components.push(new_component(c, values, group)?);
        }
    }
    if !components.is_empty() {
        o.insert("component".to_owned(), Value::Array(components));
    }
    Ok(Value::Object(o))
}

fn category_json(template: &CodeValueTemplate) -> Value {
    Value::Array(
        template
            .category
            .iter()
            .map(|c| codeable_concept(c.text.as_deref(), &c.codes))
            .collect(),
    )
}

fn new_component(
    c: &iomt_templates::fhir::ComponentTemplate,
    values: &[(Timestamp, &str)],
    group: &ObservationGroup<'_>,
) -> Result<Value, ConvertError> {
    let (key, value) = create_value(&c.value, values, group.start, group.end)?;
    let mut m = Map::new();
    m.insert("code".to_owned(), code_json(&c.value.value_name, &c.codes));
    m.insert(key.to_owned(), value);
    Ok(Value::Object(m))
}

/// What a handlebars template sees for one window.
///
/// | Field | Content |
/// |---|---|
/// | `type`, `deviceId`, `patientId`, `encounterId`, `correlationId` | from the measurements |
/// | `ids.patient`, `ids.device`, `ids.encounter` | the resolved FHIR ids |
/// | `period.start`, `period.end` | the window, in .NET round-trip form |
/// | `segment` | MedTech's identifier segment |
/// | `identifier.system`, `identifier.value` | the MedTech Observation identifier |
/// | `values.<name>` | `[{"time", "value"}]`, time-ordered |
/// | `latest.<name>` | the last value of each name |
pub fn template_context(
    group: &ObservationGroup<'_>,
    ids: &ResourceIds,
    measurement: &MeasurementGroup,
) -> Value {
    let mut values = Map::new();
    let mut latest = Map::new();
    for (name, list) in &group.values {
        values.insert(
            (*name).to_owned(),
            Value::Array(
                list.iter()
                    .map(|(t, v)| json!({"time": t.to_string(), "value": v}))
                    .collect(),
            ),
        );
        if let Some((_, v)) = list.last() {
            latest.insert((*name).to_owned(), json!(v));
        }
    }
    json!({
        "type": group.type_name,
        "deviceId": measurement.device_id,
        "patientId": measurement.patient_id,
        "encounterId": measurement.encounter_id,
        "correlationId": measurement.correlation_id,
        "ids": {"patient": ids.patient, "device": ids.device, "encounter": ids.encounter},
        "period": {"start": group.start.to_round_trip_string(), "end": group.end.to_round_trip_string()},
        "segment": group.segment,
        "identifier": {"system": SERVICE_SYSTEM, "value": identifier_value(ids, group)},
        "values": values,
        "latest": latest,
    })
}

/// Renders a handlebars template into a resource with a deterministic id: the rendered `id`,
/// else the SHA-256 of `"{resourceType}|{key}"`.
pub fn render_resource(
    template: &HandlebarsTemplate,
    group: &ObservationGroup<'_>,
    ids: &ResourceIds,
    measurement: &MeasurementGroup,
) -> Result<Value, ConvertError> {
    let fail = |reason: String| ConvertError::Render {
        type_name: group.type_name.to_owned(),
        reason,
    };
    let context = template_context(group, ids, measurement);
    let text = template
        .render_resource(&context)
        .map_err(|e| fail(format!("failed to render: {e}")))?;
    let mut resource: Value = serde_json::from_str(&text)
        .map_err(|e| fail(format!("rendered text that is not JSON ({e})")))?;
    let Some(resource_type) = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return Err(fail("rendered JSON without a resourceType".into()));
    };
    if resource.get("id").and_then(Value::as_str).is_none() {
        let key = template
            .render_key(&context)
            .ok_or_else(|| {
                fail(
                    "renders no id and declares no key; add \"key\" so that writes stay idempotent"
                        .into(),
                )
            })?
            .map_err(|e| fail(format!("failed to render its key: {e}")))?;
        resource["id"] = json!(resource_id(&resource_type, &key));
    }
    Ok(resource)
}

/// Converts one window with a template of either kind: a new Observation from `CodeValueFhir`,
/// or the rendered resource from `HandlebarsFhir`.
pub fn convert_window(
    template: FhirTemplate<'_>,
    window: &ObservationGroup<'_>,
    ids: &ResourceIds,
    group: &MeasurementGroup,
    issued: Timestamp,
) -> Result<Value, ConvertError> {
    match template {
        FhirTemplate::CodeValue(t) => build_observation(t, window, ids, issued),
        FhirTemplate::Handlebars(t) => render_resource(t, window, ids, group),
    }
}

/// The outcome of merging a window into an existing Observation.
#[derive(Debug, Clone, PartialEq)]
pub enum Merge {
    /// Nothing changed: no write is needed.
    Unchanged,
    /// The merged Observation, status `amended`, to be written with the existing version's
    /// ETag.
    Updated(Value),
}

fn effective_period(o: &Value) -> Result<(Timestamp, Timestamp), ConvertError> {
    let parse = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .and_then(|s| Timestamp::parse(s).ok())
    };
    if let Some(p) = o.get("effectivePeriod") {
        if let (Some(s), Some(e)) = (parse(p.get("start")), parse(p.get("end"))) {
            return Ok((s, e));
        }
    } else if let Some(t) = parse(o.get("effectiveDateTime")) {
        return Ok((t, t));
    }
    Err(ConvertError::EffectiveNotSupported)
}

/// Merges one value into the object holding it (the Observation or a component).
fn merge_value(
    holder: &mut Map<String, Value>,
    template: &ValueTemplate,
    values: &[(Timestamp, &str)],
    group: &ObservationGroup<'_>,
    observed: (Timestamp, Timestamp),
) -> Result<(), ConvertError> {
    // A SampledData value keeps its object and only gets new data: building it afresh (a
    // slot per period of the window) would be thrown away.
    let (key, fresh) = match &template.kind {
        ValueKind::SampledData { .. } => {
            check_sampled_values(&template.value_name, values)?;
            ("valueSampledData", None)
        }
        _ => {
            let (key, fresh) = create_value(template, values, group.start, group.end)?;
            (key, Some(fresh))
        }
    };
    let actual = VALUE_KEYS
        .iter()
        .find(|k| holder.contains_key(**k))
        .copied();
    if actual != Some(key) {
        return Err(ConvertError::ExistingValueType {
            expected: key,
            actual: actual.unwrap_or("absent").to_owned(),
        });
    }
    let default_period = match (&template.kind, fresh) {
        (ValueKind::SampledData { default_period, .. }, None) => default_period,
        (_, fresh) => {
            if let Some(fresh) = fresh {
                holder.insert(key.to_owned(), fresh);
            }
            return Ok(());
        }
    };
    let existing_data = holder[key]
        .get("data")
        .and_then(Value::as_str)
        .unwrap_or("");
    let step = step_ticks(*default_period);
    let existing = decode_sampled_data(existing_data, observed.0.unix_ticks(), step);
    // Both are sorted by time; at the same instant the new value replaces the old one.
    let mut all = Vec::with_capacity(existing.len() + values.len());
    let mut old = existing.into_iter().peekable();
    for &(t, v) in values {
        let t = t.unix_ticks();
        while let Some(o) = old.next_if(|o| o.0 <= t) {
            if o.0 < t {
                all.push(o);
            }
        }
        all.push((t, v));
    }
    all.extend(old);
    let data = render_slots(
        &all,
        group.start.min(observed.0).unix_ticks(),
        group.end.max(observed.1).unix_ticks(),
        step,
    );
    if let Some(sd) = holder.get_mut(key).and_then(Value::as_object_mut) {
        sd.insert("data".to_owned(), Value::String(data));
    }
    Ok(())
}

fn has_service_coding(component: &Value, value_name: &str) -> bool {
    component["code"]["coding"]
        .as_array()
        .is_some_and(|codings| {
            codings
                .iter()
                .any(|c| c["system"] == SERVICE_SYSTEM && c["code"].as_str() == Some(value_name))
        })
}

/// Merges a window into an existing Observation, as MedTech does.
pub fn merge_observation(
    existing: &Value,
    template: &CodeValueTemplate,
    group: &ObservationGroup<'_>,
) -> Result<Merge, ConvertError> {
    let observed = effective_period(existing)?;
    let mut merged = existing.as_object().cloned().unwrap_or_default();
    if template.category.is_empty() {
        merged.shift_remove("category");
    } else {
        merged.insert("category".to_owned(), category_json(template));
    }
    if let Some(value) = &template.value
        && let Some(values) = group.values.get(value.value_name.as_str())
    {
        merge_value(&mut merged, value, values, group, observed)?;
    }
    for c in &template.components {
        let Some(values) = group.values.get(c.value.value_name.as_str()) else {
            continue;
        };
        let components = merged
            .entry("component")
            .or_insert_with(|| Value::Array(Vec::new()));
        let Value::Array(components) = components else {
            continue;
        };
        match components
            .iter_mut()
            .find(|existing| has_service_coding(existing, &c.value.value_name))
        {
            Some(Value::Object(holder)) => merge_value(holder, &c.value, values, group, observed)?,
            _ => components.push(new_component(c, values, group)?),
        }
    }
    merged.shift_remove("effectiveDateTime");
    merged.insert(
        "effectivePeriod".to_owned(),
        period_json(group.start.min(observed.0), group.end.max(observed.1)),
    );
    let merged = Value::Object(merged);
    if &merged == existing {
        return Ok(Merge::Unchanged);
    }
    let mut merged = merged;
    merged["status"] = json!("amended");
    Ok(Merge::Updated(merged))
}

#[cfg(test)]
mod tests;
