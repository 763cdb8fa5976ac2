//! The normalize stage: one device event in, zero or more normalized measurements out.
//!
//! The stage is pure: it parses the body once, builds the `{Body, Properties,
//! SystemProperties}` envelope MedTech evaluates templates against, runs every template of the
//! device mapping in order, and returns the measurements together with every error it met. It
//! never stops at a bad event and never panics on input; deciding what to do with errors
//! (dead-letter, count, report) is the caller's job.
//!
//! Extraction follows MedTech's rules (`MeasurementExtractor.EvalExpression`):
//!
//! * each token selected by `typeMatchExpression` gives one measurement;
//! * device id and timestamp are required, patient and encounter ids optional, the correlation
//!   id is required when the template defines it;
//! * a required value that is missing, null, blank or not convertible is an error naming the
//!   field and the expression; an optional one is left out when it is missing, null or not
//!   convertible, and kept as written when it is an empty or blank string;
//! * a value expression that selects more than one token is an error.
#![deny(missing_docs)]

pub mod explain;

use std::borrow::Cow;
use std::cell::OnceCell;

use iomt_core::{DeviceEvent, Measurement, MeasurementProperty, Timestamp};
use iomt_templates::device::{ContentTemplate, DeviceMapping, Field};
use iomt_templates::expr::jsonpath::{KeyFilter, SelectError};
use iomt_templates::expr::token::ConversionError;
use iomt_templates::expr::{Expression, ExpressionKind, Scope, Token};
use serde::Serialize;
use serde_json::{Map, Value};

/// Largest event body accepted by default (`limits.message_bytes`): the Event Hubs
/// Standard/Premium event size limit.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The most measurements one event may produce by default (`limits.measurements_per_event`).
/// A 1 MiB body can hold a quarter of a million array elements, and a template matching each
/// would flood the group stage from one event; such an event is refused whole.
pub const MAX_MEASUREMENTS_PER_EVENT: usize = 10_000;

/// What the normalize stage made of one event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    /// Measurements, in template order, then in match order.
    pub measurements: Vec<Measurement>,
    /// Every problem found; an event with errors may still have produced measurements from
    /// other templates or other matches.
    pub errors: Vec<NormalizeError>,
}

/// Classes of normalization errors, named after MedTech's exceptions so that dashboards and
/// runbooks carry over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrorKind {
    /// The body is not JSON (`InvalidDataFormatException`).
    InvalidDataFormat,
    /// The body is larger than [`MAX_BODY_BYTES`].
    EventTooLarge,
    /// The data does not fit the template: a required value is missing, null or not
    /// convertible (`IncompatibleDataException`).
    IncompatibleData,
    /// An expression failed while running: several tokens where one was needed, or a JMESPath
    /// function error (`TemplateExpressionException`).
    TemplateExpression,
}

impl ErrorKind {
    /// The MedTech exception name.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::InvalidDataFormat => "InvalidDataFormatException",
            ErrorKind::EventTooLarge => "EventTooLargeException",
            ErrorKind::IncompatibleData => "IncompatibleDataException",
            ErrorKind::TemplateExpression => "TemplateExpressionException",
        }
    }
}

/// One normalization error, with everything needed to find its cause in the template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "camelCase")]
#[error("{message}")]
pub struct NormalizeError {
    /// The class of error.
    pub kind: ErrorKind,
    /// What went wrong, in MedTech's wording where MedTech has one.
    pub message: String,
    /// The template (`template[0] JsonPathContent 'heartrate'`), when one was running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// JSON path of the template member whose expression failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// 1-based line of that member in the template file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// The expression that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expression: Option<String>,
}

/// Observes evaluation, for the mapping debugger. The default methods do nothing and
/// [`NoTrace`] compiles away, so the pipeline pays nothing for it.
pub trait Trace {
    /// Whether the hooks below are called at all.
    const ENABLED: bool = true;
    /// `typeMatchExpression` of `template` selected `matches` tokens.
    fn type_match(&mut self, _template: &ContentTemplate, _matches: &[Cow<'_, Value>]) {}
    /// Evaluation of the `index`-th selected token starts.
    fn token(&mut self, _template: &ContentTemplate, _index: usize) {}
    /// One expression of a match was evaluated; `token` is what it selected.
    fn expression(
        &mut self,
        _template: &ContentTemplate,
        _field: &str,
        _expression: &Expression,
        _token: Option<&Value>,
    ) {
    }
}

/// The tracer that records nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoTrace;

impl Trace for NoTrace {
    const ENABLED: bool = false;
}

/// Applies a compiled device mapping to events.
#[derive(Debug, Clone)]
pub struct Normalizer {
    mapping: DeviceMapping,
}

impl Normalizer {
    /// Wraps a compiled mapping.
    pub fn new(mapping: DeviceMapping) -> Self {
        Self { mapping }
    }

    /// The mapping in use.
    pub fn mapping(&self) -> &DeviceMapping {
        &self.mapping
    }

    /// Normalizes one hub event: parses its body and evaluates every template.
    pub fn normalize_event(&self, event: &DeviceEvent) -> Output {
        match envelope(event) {
            Ok(root) => self.normalize_value(&root, event.enqueued_time, &mut NoTrace),
            Err(error) => Output {
                measurements: Vec::new(),
                errors: vec![error],
            },
        }
    }

    /// [`Normalizer::normalize_event`] without copying the event's properties: they are moved
    /// into the envelope and back, which the pipeline's hot path is spared per event.
    pub fn normalize_owned(&self, event: &mut DeviceEvent) -> Output {
        let body = match parse_body(&event.body) {
            Ok(b) => b,
            Err(error) => {
                return Output {
                    measurements: Vec::new(),
                    errors: vec![error],
                };
            }
        };
        let mut root = wrap(
            body,
            std::mem::take(&mut event.properties),
            std::mem::take(&mut event.system_properties),
        );
        let output = self.normalize_value(&root, event.enqueued_time, &mut NoTrace);
        let mut take = |key: &str| match root.get_mut(key).map(Value::take) {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        event.properties = take("Properties");
        event.system_properties = take("SystemProperties");
        output
    }

    /// Evaluates every template against an already built document (an envelope, or a bare
    /// payload when debugging the way upstream unit tests do).
    pub fn normalize_value<T: Trace>(
        &self,
        root: &Value,
        ingestion_time: Option<Timestamp>,
        trace: &mut T,
    ) -> Output {
        let mut out = Output::default();
        let mut eval = Evaluation {
            root,
            keys: OnceCell::new(),
        };
        let most = iomt_core::limits().measurements_per_event;
        for template in &self.mapping.templates {
            eval.template(template, ingestion_time, trace, &mut out);
            if out.measurements.len() > most {
                let produced = out.measurements.len();
                out.measurements.clear();
                out.errors.push(NormalizeError {
                    kind: ErrorKind::EventTooLarge,
                    message: format!(
                        "the event produced {produced} measurements or more, over the limit of {most} per event (limits.measurements_per_event)"
                    ),
                    template: None,
                    path: None,
                    line: None,
                    expression: None,
                });
                break;
            }
        }
        out
    }
}

/// Parses an event body and wraps it the way MedTech does.
pub fn envelope(event: &DeviceEvent) -> Result<Value, NormalizeError> {
    Ok(wrap(
        parse_body(&event.body)?,
        event.properties.clone(),
        event.system_properties.clone(),
    ))
}

/// `{Body, Properties, SystemProperties}`.
fn wrap(body: Value, properties: Map<String, Value>, system: Map<String, Value>) -> Value {
    let mut map = Map::with_capacity(3);
    map.insert("Body".to_owned(), body);
    map.insert("Properties".to_owned(), Value::Object(properties));
    map.insert("SystemProperties".to_owned(), Value::Object(system));
    Value::Object(map)
}

/// The enqueued time recorded in a captured envelope (`SystemProperties.x-opt-enqueued-time`),
/// which becomes the measurements' ingestion time when such an envelope is replayed.
pub fn envelope_enqueued_time(root: &Value) -> Option<Timestamp> {
    root.pointer("/SystemProperties/x-opt-enqueued-time")
        .and_then(Value::as_str)
        .and_then(|s| Timestamp::parse(s).ok())
}

/// Parses a body: empty is `null`, more than `limits.message_bytes` or invalid JSON is an error
/// that says where the JSON broke. Nesting deeper than 128 levels is refused by the parser, so
/// hostile input cannot exhaust the stack.
pub fn parse_body(body: &[u8]) -> Result<Value, NormalizeError> {
    let data_error = |kind, message| NormalizeError {
        kind,
        message,
        template: None,
        path: None,
        line: None,
        expression: None,
    };
    let most = iomt_core::limits().message_bytes;
    if body.len() > most {
        return Err(data_error(
            ErrorKind::EventTooLarge,
            format!(
                "the event body is {} bytes, over the limit of {most} bytes (limits.message_bytes)",
                body.len()
            ),
        ));
    }
    if body.is_empty() {
        return Ok(Value::Null);
    }
    // Newtonsoft does not skip a byte order mark either; say what it is rather than where
    // parsing broke.
    if body.starts_with(b"\xEF\xBB\xBF") {
        return Err(data_error(
            ErrorKind::InvalidDataFormat,
            "invalid event message: the body starts with a UTF-8 byte order mark (EF BB BF), which is not JSON; send the body without it".to_owned(),
        ));
    }
    // serde_json's message carries the position ("at line 1 column 5"); the error's `line`
    // member is kept for template lines.
    serde_json::from_slice(body).map_err(|e| {
        data_error(
            ErrorKind::InvalidDataFormat,
            format!("invalid event message: the body is not JSON ({e})"),
        )
    })
}

/// Per-event state shared by the templates: the member names of the document, collected at
/// most once.
struct Evaluation<'a> {
    root: &'a Value,
    keys: OnceCell<KeyFilter>,
}

impl Evaluation<'_> {
    fn template<T: Trace>(
        &mut self,
        t: &ContentTemplate,
        ingestion: Option<Timestamp>,
        trace: &mut T,
        out: &mut Output,
    ) {
        let tokens: Vec<Cow<'_, Value>> = match &t.type_match.kind {
            ExpressionKind::JsonPath(p) => {
                let mut found = Vec::new();
                if p.may_select(self.keys.get_or_init(|| KeyFilter::of(self.root)))
                    && let Err(e) = p.select(self.root, &mut found)
                {
                    out.errors.push(error_at(
                        t,
                        &t.type_match,
                        ErrorKind::TemplateExpression,
                        format!("the expression {} failed: {e}", p.as_str()),
                    ));
                    return;
                }
                found.into_iter().map(Cow::Borrowed).collect()
            }
            ExpressionKind::JmesPath(p) => match p.select_in(Scope::Value(self.root)) {
                Ok(values) => values,
                Err(e) => {
                    out.errors.push(error_at(
                        t,
                        &t.type_match,
                        ErrorKind::TemplateExpression,
                        e.to_string(),
                    ));
                    return;
                }
            },
        };
        if T::ENABLED {
            trace.type_match(t, &tokens);
        }
        for (index, token) in tokens.iter().enumerate() {
            if T::ENABLED {
                trace.token(t, index);
            }
            let mut matched = Matched {
                eval: self,
                template: t,
                token,
            };
            match matched.measurement(ingestion, trace) {
                Ok(m) => out.measurements.push(m),
                Err(mut errors) => out.errors.append(&mut errors),
            }
        }
    }
}

/// One token selected by `typeMatchExpression`, being turned into a measurement.
struct Matched<'e, 'a> {
    eval: &'e Evaluation<'a>,
    template: &'e ContentTemplate,
    token: &'e Value,
}

impl Matched<'_, '_> {
    fn scope(&self) -> Scope<'_> {
        if self.template.kind.uses_matched_token() {
            Scope::Matched {
                envelope: self.eval.root,
                token: self.token,
            }
        } else {
            Scope::Value(self.token)
        }
    }

    /// Runs `f` on the single token `expression` selects.
    fn select_one<R>(
        &self,
        expression: &Expression,
        f: impl FnOnce(Option<&Token<'_>>) -> R,
    ) -> Result<R, (ErrorKind, String)> {
        match &expression.kind {
            ExpressionKind::JsonPath(p) => p
                .with_one_in(self.scope(), |r| r.map(|v| f(v.map(Token::Json).as_ref())))
                .map_err(|e| {
                    let message = match e {
                        SelectError::MultipleTokens => format!(
                            "the expression {} returned multiple tokens where one value is needed",
                            p.as_str()
                        ),
                        SelectError::Compare(e) => {
                            format!("the expression {} failed: {e}", p.as_str())
                        }
                    };
                    (ErrorKind::TemplateExpression, message)
                }),
            ExpressionKind::JmesPath(p) => match p.select_one_in(self.scope()) {
                Ok(v) => Ok(f(v.as_ref())),
                Err(e) => Err((ErrorKind::TemplateExpression, e.to_string())),
            },
        }
    }

    /// MedTech's `EvalExpression`: tries each expression in turn; a required field fails with
    /// every reason collected, an optional one is simply absent.
    fn extract<V: Blank, T: Trace>(
        &self,
        field: &str,
        name: &str,
        expressions: &[Expression],
        required: bool,
        convert: fn(&Token<'_>) -> Result<Option<V>, ConversionError>,
        trace: &mut T,
    ) -> Result<Option<V>, NormalizeError> {
        let mut reasons = Vec::new();
        for expression in expressions {
            let selected = self.select_one(expression, |token| {
                if T::ENABLED {
                    let json = token.map(Token::to_json);
                    trace.expression(self.template, field, expression, json.as_deref());
                }
                token.map(convert)
            });
            let converted = match selected {
                Err((kind, message)) => {
                    return Err(error_at(self.template, expression, kind, message));
                }
                Ok(None) => continue,
                Ok(Some(c)) => c,
            };
            match converted {
                Ok(Some(value)) if required && value.is_blank() => {
                    reasons.push(format!("a null or empty value was supplied for the required field [{name}] by {}", expression.as_str()));
                }
                Ok(Some(value)) => return Ok(Some(value)),
                Ok(None) if required => {
                    reasons.push(format!("a null or empty value was supplied for the required field [{name}] by {}", expression.as_str()));
                }
                Ok(None) => return Ok(None),
                Err(e) => reasons.push(format!(
                    "encountered an error while extracting value for [{name}] using expression {}: {}",
                    expression.as_str(),
                    e.0
                )),
            }
        }
        if !required {
            return Ok(None);
        }
        let first = expressions.first();
        let message = if reasons.is_empty() {
            let list: Vec<&str> = expressions.iter().map(Expression::as_str).collect();
            format!(
                "Unable to extract required value for [{name}] using {}",
                list.join(",")
            )
        } else {
            format!(
                "Unable to extract required value for [{name}]: {}",
                reasons.join("; ")
            )
        };
        Err(match first {
            Some(e) => error_at(self.template, e, ErrorKind::IncompatibleData, message),
            None => error_in(self.template, ErrorKind::IncompatibleData, message),
        })
    }

    fn field<V: Blank, T: Trace>(
        &self,
        field: &Field,
        required: bool,
        convert: fn(&Token<'_>) -> Result<Option<V>, ConversionError>,
        trace: &mut T,
        errors: &mut Vec<NormalizeError>,
    ) -> Option<V> {
        let member = member_name(field.name);
        self.extract(
            member,
            field.name,
            &field.expressions,
            required,
            convert,
            trace,
        )
        .unwrap_or_else(|e| {
            errors.push(e);
            None
        })
    }

    fn measurement<T: Trace>(
        &mut self,
        ingestion: Option<Timestamp>,
        trace: &mut T,
    ) -> Result<Measurement, Vec<NormalizeError>> {
        let t = self.template;
        let mut errors = Vec::new();
        let device_id = self.field(&t.device_id, true, to_string, trace, &mut errors);
        let timestamp = self.field(&t.timestamp, true, to_timestamp, trace, &mut errors);
        let correlation_id = t
            .correlation_id
            .as_ref()
            .and_then(|f| self.field(f, true, to_string, trace, &mut errors));
        let patient_id = t
            .patient_id
            .as_ref()
            .and_then(|f| self.field(f, false, to_string, trace, &mut errors));
        let encounter_id = t
            .encounter_id
            .as_ref()
            .and_then(|f| self.field(f, false, to_string, trace, &mut errors));
        let mut properties = Vec::with_capacity(t.values.len());
        for v in &t.values {
            let expressions = std::slice::from_ref(&v.expression);
            match self.extract(&v.name, &v.name, expressions, v.required, to_string, trace) {
                Ok(Some(value)) => properties.push(MeasurementProperty {
                    name: v.name.clone(),
                    value,
                }),
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        match (device_id, timestamp) {
            (Some(device_id), Some(occurrence_time_utc)) if errors.is_empty() => Ok(Measurement {
                type_name: t.type_name.clone(),
                occurrence_time_utc,
                ingestion_time_utc: ingestion,
                device_id,
                patient_id,
                encounter_id,
                correlation_id,
                properties,
            }),
            _ => Err(errors),
        }
    }
}

/// `Value<string>()`; an empty or blank string is a value.
fn to_string(token: &Token<'_>) -> Result<Option<String>, ConversionError> {
    Ok(token.value_string()?.map(Cow::into_owned))
}

/// `Value<DateTime?>()`.
fn to_timestamp(token: &Token<'_>) -> Result<Option<Timestamp>, ConversionError> {
    token.value_timestamp()
}

/// What MedTech's `string.IsNullOrWhiteSpace` rejects for a required field.
trait Blank {
    fn is_blank(&self) -> bool;
}

impl Blank for String {
    fn is_blank(&self) -> bool {
        self.trim().is_empty()
    }
}

impl Blank for Timestamp {
    fn is_blank(&self) -> bool {
        false
    }
}

/// The template member that holds a field's expression (`DeviceIdExpression` →
/// `deviceIdExpression`).
fn member_name(field: &'static str) -> &'static str {
    match field {
        "DeviceIdExpression" => "deviceIdExpression",
        "TimestampExpression" => "timestampExpression",
        "PatientIdExpression" => "patientIdExpression",
        "EncounterIdExpression" => "encounterIdExpression",
        "CorrelationIdExpression" => "correlationIdExpression",
        other => other,
    }
}

fn error_in(t: &ContentTemplate, kind: ErrorKind, message: String) -> NormalizeError {
    NormalizeError {
        kind,
        message,
        template: Some(t.label()),
        path: None,
        line: Some(t.line),
        expression: None,
    }
}

fn error_at(
    t: &ContentTemplate,
    e: &Expression,
    kind: ErrorKind,
    message: String,
) -> NormalizeError {
    NormalizeError {
        kind,
        message,
        template: Some(t.label()),
        path: (!e.path.is_empty()).then(|| e.path.clone()),
        line: e.line.or(Some(t.line)),
        expression: Some(e.as_str().to_owned()),
    }
}

#[cfg(test)]
mod tests;
