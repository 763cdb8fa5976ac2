//! Device mapping templates: the `CollectionContent` document and its template types.
//!
//! | `templateType` (case-insensitive) | Expressions evaluated against |
//! |---|---|
//! | `JsonPathContent`, `JsonPathContentTemplate` | the matched token |
//! | `IotJsonPathContent`, `IotJsonPathContentTemplate` | the matched token; device id and time are fixed IoT Hub paths |
//! | `IotCentralJsonPathContent` | the matched token; device id `$.deviceId`, time `$.enqueuedTime` |
//! | `CalculatedContent` | the whole event plus `matchedToken`; JSONPath or JMESPath per expression |
//!
//! Like MedTech, the `Template` suffix is accepted only for the first two. Unlike MedTech, a
//! mapping with any error is rejected as a whole with every error listed, instead of loading the
//! valid part and failing at run time.

use std::sync::Arc;

use jsonc_parser::ast::{Object, Value as Node};

use crate::error::{TemplateError, TemplateErrorKind};
use crate::expr::{Expression, Language};
use crate::source::{Checker, Members, Source, start, type_name};

/// A validated, compiled device mapping.
#[derive(Debug, Clone)]
pub struct DeviceMapping {
    /// Templates in declaration order; every one is evaluated against every event.
    pub templates: Vec<ContentTemplate>,
}

/// The four device template types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentKind {
    /// `JsonPathContent`.
    JsonPath,
    /// `IotJsonPathContent`: IoT Hub messages routed to Event Hubs.
    IotJsonPath,
    /// `IotCentralJsonPathContent`: IoT Central data export.
    IotCentralJsonPath,
    /// `CalculatedContent`.
    Calculated,
}

impl ContentKind {
    /// The canonical `templateType` name.
    pub fn name(self) -> &'static str {
        match self {
            ContentKind::JsonPath => "JsonPathContent",
            ContentKind::IotJsonPath => "IotJsonPathContent",
            ContentKind::IotCentralJsonPath => "IotCentralJsonPathContent",
            ContentKind::Calculated => "CalculatedContent",
        }
    }

    /// Whether expressions see the whole event with `matchedToken` added (CalculatedContent)
    /// rather than the matched token as their root.
    pub fn uses_matched_token(self) -> bool {
        self == ContentKind::Calculated
    }

    fn from_type_name(name: &str) -> Option<Self> {
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        Some(if is("JsonPathContent") || is("JsonPathContentTemplate") {
            ContentKind::JsonPath
        } else if is("IotJsonPathContent") || is("IotJsonPathContentTemplate") {
            ContentKind::IotJsonPath
        } else if is("IotCentralJsonPathContent") {
            ContentKind::IotCentralJsonPath
        } else if is("CalculatedContent") {
            ContentKind::Calculated
        } else {
            return None;
        })
    }
}

/// One compiled device template.
#[derive(Debug, Clone)]
pub struct ContentTemplate {
    /// Position in the collection (0-based).
    pub index: usize,
    /// The template type.
    pub kind: ContentKind,
    /// The measurement type this template produces.
    pub type_name: Arc<str>,
    /// 1-based line of the template object in the file.
    pub line: usize,
    /// Selects the tokens that become measurements, one measurement per token.
    pub type_match: Expression,
    /// Device id; required.
    pub device_id: Field,
    /// Occurrence time; required.
    pub timestamp: Field,
    /// Patient id; optional.
    pub patient_id: Option<Field>,
    /// Encounter id; optional.
    pub encounter_id: Option<Field>,
    /// Correlation id; required when defined.
    pub correlation_id: Option<Field>,
    /// Values, in declaration order.
    pub values: Vec<ValueTemplate>,
}

impl ContentTemplate {
    /// A short label for messages: `template[1] IotJsonPathContent 'bootTime'`.
    pub fn label(&self) -> String {
        format!(
            "template[{}] {} '{}'",
            self.index,
            self.kind.name(),
            self.type_name
        )
    }
}

/// One extracted field: its MedTech name (used in error messages, as MedTech names it) and the
/// expressions tried in order (IoT Hub templates fall back from the creation time to the
/// enqueued time).
#[derive(Debug, Clone)]
pub struct Field {
    /// `DeviceIdExpression`, `TimestampExpression`, ...
    pub name: &'static str,
    /// Expressions tried in order; the first usable value wins.
    pub expressions: Vec<Expression>,
}

/// One entry of `values`.
#[derive(Debug, Clone)]
pub struct ValueTemplate {
    /// The property name in the measurement.
    pub name: Arc<str>,
    /// Where the value comes from.
    pub expression: Expression,
    /// Whether a missing value is an error (otherwise the property is left out).
    pub required: bool,
}

/// Fixed expressions of `IotJsonPathContent`.
const IOT_DEVICE_ID: &str = "$.SystemProperties.iothub-connection-device-id";
const IOT_CREATION_TIME: &str = "$.Properties.iothub-creation-time-utc";
const IOT_ENQUEUED_TIME: &str = "$.SystemProperties.iothub-enqueuedtime";
/// Fixed expressions of `IotCentralJsonPathContent`.
const IOT_CENTRAL_DEVICE_ID: &str = "$.deviceId";
const IOT_CENTRAL_TIME: &str = "$.enqueuedTime";

impl DeviceMapping {
    /// Reads, validates and compiles a device mapping file; on failure returns every error.
    pub fn parse(text: &str) -> Result<Self, Vec<TemplateError>> {
        let source = Source::new(text);
        let root = source.parse().map_err(|e| vec![e])?;
        let mut checker = Checker::new(&source);
        let templates = collection(&mut checker, &root);
        if checker.errors.is_empty() {
            Ok(Self { templates })
        } else {
            Err(checker.errors)
        }
    }
}

fn collection(c: &mut Checker<'_, '_>, root: &Node<'_>) -> Vec<ContentTemplate> {
    let items = c.collection_items(root, "CollectionContent");
    let expected =
        "JsonPathContent, IotJsonPathContent, IotCentralJsonPathContent or CalculatedContent";
    items
        .iter()
        .enumerate()
        .filter_map(|(index, item)| {
            let (kind, body, path) = c.entry(
                index,
                item,
                ContentKind::from_type_name,
                ContentKind::name,
                expected,
            )?;
            content(c, index, kind, body, &path)
        })
        .collect()
}

fn content(
    c: &mut Checker<'_, '_>,
    index: usize,
    kind: ContentKind,
    obj: &Object<'_>,
    path: &str,
) -> Option<ContentTemplate> {
    const COMMON: &[&str] = &[
        "typeName",
        "typeMatchExpression",
        "deviceIdExpression",
        "timestampExpression",
        "patientIdExpression",
        "encounterIdExpression",
        "correlationIdExpression",
        "values",
    ];
    let mut known = COMMON.to_vec();
    if kind == ContentKind::Calculated {
        known.push("defaultExpressionLanguage");
    }
    // Name the template in every error, including those found before typeName is read.
    if let Some(name) = obj
        .properties
        .iter()
        .find(|p| p.name.as_str().eq_ignore_ascii_case("typeName"))
        .and_then(|p| match &p.value {
            Node::StringLit(s) => Some(s.value.to_string()),
            _ => None,
        })
    {
        c.template = Some(format!("template[{index}] {} '{name}'", kind.name()));
    }
    let errors_before = c.errors.len();
    // `lineNumber`/`linePosition` are public members of every MedTech template class.
    let m = c.members(obj, path, &known, &["lineNumber", "linePosition"]);
    let type_name = c.required_string(&m, "typeName").map(|(s, _)| s);
    let language = if kind == ContentKind::Calculated {
        default_language(c, &m)
    } else {
        Language::JsonPath
    };
    let expr = |c: &mut Checker<'_, '_>,
                name: &'static str,
                required: bool|
     -> Option<Expression> { expression(c, &m, name, kind, language, required) };
    let type_match = expr(c, "typeMatchExpression", true);
    let (device_id, timestamp) = match kind {
        ContentKind::JsonPath | ContentKind::Calculated => (
            expr(c, "deviceIdExpression", true).map(|e| vec![e]),
            expr(c, "timestampExpression", true).map(|e| vec![e]),
        ),
        // The IoT template classes ignore these members and use fixed paths.
        ContentKind::IotJsonPath => (
            Some(vec![fixed(IOT_DEVICE_ID)]),
            Some(vec![fixed(IOT_CREATION_TIME), fixed(IOT_ENQUEUED_TIME)]),
        ),
        ContentKind::IotCentralJsonPath => (
            Some(vec![fixed(IOT_CENTRAL_DEVICE_ID)]),
            Some(vec![fixed(IOT_CENTRAL_TIME)]),
        ),
    };
    let optional = |c: &mut Checker<'_, '_>, name: &'static str, field: &'static str| {
        expr(c, name, false).map(|e| Field {
            name: field,
            expressions: vec![e],
        })
    };
    let patient_id = optional(c, "patientIdExpression", "PatientIdExpression");
    let encounter_id = optional(c, "encounterIdExpression", "EncounterIdExpression");
    let correlation_id = optional(c, "correlationIdExpression", "CorrelationIdExpression");
    let values = values(c, &m, kind, language);
    let line = c.line(obj.range.start);
    if c.errors.len() != errors_before {
        return None;
    }
    Some(ContentTemplate {
        index,
        kind,
        type_name: type_name?.into(),
        line,
        type_match: type_match?,
        device_id: Field {
            name: "DeviceIdExpression",
            expressions: device_id?,
        },
        timestamp: Field {
            name: "TimestampExpression",
            expressions: timestamp?,
        },
        patient_id,
        encounter_id,
        correlation_id,
        values: values?,
    })
}

fn fixed(path: &str) -> Expression {
    Expression::compile(path, Language::JsonPath, String::new(), None)
        .unwrap_or_else(|e| unreachable!("fixed IoT expression {path} must compile: {e}"))
}

fn language_of(node: &Node<'_>) -> Option<Language> {
    match node {
        Node::StringLit(s) if s.value.eq_ignore_ascii_case("JsonPath") => Some(Language::JsonPath),
        Node::StringLit(s) if s.value.eq_ignore_ascii_case("JmesPath") => Some(Language::JmesPath),
        Node::NumberLit(n) if n.value == "0" => Some(Language::JsonPath),
        Node::NumberLit(n) if n.value == "1" => Some(Language::JmesPath),
        _ => None,
    }
}

fn default_language(c: &mut Checker<'_, '_>, m: &Members<'_, '_>) -> Language {
    match m.get("defaultExpressionLanguage") {
        None | Some(Node::NullKeyword(_)) => Language::JsonPath,
        Some(node) => language_of(node).unwrap_or_else(|| {
            c.error(
                TemplateErrorKind::InvalidValue,
                start(node),
                &m.child("defaultExpressionLanguage"),
                "defaultExpressionLanguage must be JsonPath or JmesPath".into(),
            );
            Language::JsonPath
        }),
    }
}

/// Reads one expression member. Legacy templates take a JSONPath string; CalculatedContent
/// also takes `{"value": …, "language": …}`.
fn expression(
    c: &mut Checker<'_, '_>,
    m: &Members<'_, '_>,
    name: &'static str,
    kind: ContentKind,
    default: Language,
    required: bool,
) -> Option<Expression> {
    let path = m.child(name);
    let node = m.get(name);
    let (text, language, offset) = match node {
        None | Some(Node::NullKeyword(_)) => {
            if required {
                if let Some(Node::NullKeyword(n)) = node {
                    c.error(
                        TemplateErrorKind::MissingMember,
                        n.range.start,
                        &path,
                        format!("required member '{name}' must not be null"),
                    );
                } else {
                    c.missing(m, name);
                }
            }
            return None;
        }
        Some(Node::StringLit(s)) => (s.value.to_string(), default, s.range.start),
        Some(Node::Object(obj)) if kind == ContentKind::Calculated => {
            // MedTech reads expression objects without rejecting unknown members.
            let known = ["value", "language"];
            let em = {
                let mut found = Members::empty(obj.range.start, path.clone());
                for prop in &obj.properties {
                    if let Some(k) = known
                        .iter()
                        .find(|k| k.eq_ignore_ascii_case(prop.name.as_str()))
                    {
                        found.push(k, prop);
                    }
                }
                found
            };
            let language = match em.get("language") {
                None | Some(Node::NullKeyword(_)) => default,
                Some(node) => match language_of(node) {
                    Some(l) => l,
                    None => {
                        c.error(
                            TemplateErrorKind::InvalidValue,
                            start(node),
                            &em.child("language"),
                            "language must be JsonPath or JmesPath".into(),
                        );
                        return None;
                    }
                },
            };
            let (text, offset) = c.required_string(&em, "value")?;
            (text, language, offset)
        }
        Some(other) => {
            let expected = if kind == ContentKind::Calculated {
                "a string or an object {value, language}"
            } else {
                "a string"
            };
            c.error(
                TemplateErrorKind::InvalidValue,
                start(other),
                &path,
                format!("'{name}' must be {expected}, found {}", type_name(other)),
            );
            return None;
        }
    };
    if text.trim().is_empty() {
        if required {
            c.error(
                TemplateErrorKind::MissingMember,
                offset,
                &path,
                format!("an expression must be set for '{name}'"),
            );
        }
        return None;
    }
    let line = c.line(offset);
    match Expression::compile(&text, language, path.clone(), Some(line)) {
        Ok(e) => Some(e),
        Err(reason) => {
            c.error(TemplateErrorKind::Expression, offset, &path, reason);
            None
        }
    }
}

fn values(
    c: &mut Checker<'_, '_>,
    m: &Members<'_, '_>,
    kind: ContentKind,
    language: Language,
) -> Option<Vec<ValueTemplate>> {
    let items = match m.get("values") {
        None | Some(Node::NullKeyword(_)) => return Some(Vec::new()),
        Some(Node::Array(a)) => &a.elements,
        Some(other) => {
            c.error(
                TemplateErrorKind::InvalidValue,
                start(other),
                &m.child("values"),
                format!("'values' must be an array, found {}", type_name(other)),
            );
            return None;
        }
    };
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let path = format!("{}[{i}]", m.child("values"));
        let Some(vm) = c.object(
            item,
            &path,
            "a value",
            &["valueName", "valueExpression", "required"],
        ) else {
            ok = false;
            continue;
        };
        let name = c.required_string(&vm, "valueName").map(|(s, _)| s);
        let expression = expression(c, &vm, "valueExpression", kind, language, true);
        let required = required_flag(c, &vm);
        match (name, expression, required) {
            (Some(name), Some(expression), Some(required)) => out.push(ValueTemplate {
                name: name.into(),
                expression,
                required,
            }),
            _ => ok = false,
        }
    }
    ok.then_some(out)
}

/// `required` as Newtonsoft reads a boolean: `true`/`false`, the strings `"true"`/`"false"`
/// (any case), or a number (non-zero is true).
fn required_flag(c: &mut Checker<'_, '_>, m: &Members<'_, '_>) -> Option<bool> {
    match m.get("required") {
        None | Some(Node::NullKeyword(_)) => Some(false),
        Some(Node::BooleanLit(b)) => Some(b.value),
        Some(Node::StringLit(s)) if s.value.trim().eq_ignore_ascii_case("true") => Some(true),
        Some(Node::StringLit(s)) if s.value.trim().eq_ignore_ascii_case("false") => Some(false),
        Some(Node::NumberLit(n)) if n.value.parse::<f64>().is_ok() => {
            Some(n.value.parse::<f64>().is_ok_and(|v| v != 0.0))
        }
        Some(other) => {
            c.error(
                TemplateErrorKind::InvalidValue,
                start(other),
                &m.child("required"),
                format!(
                    "'required' must be true or false, found {}",
                    type_name(other)
                ),
            );
            None
        }
    }
}
