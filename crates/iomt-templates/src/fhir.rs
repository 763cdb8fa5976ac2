//! FHIR mapping templates: the `CollectionFhir` document and its `CodeValueFhir` templates.
//!
//! A FHIR template turns the measurements of one type into Observations: which codes and
//! categories they carry, how values are represented (SampledData, Quantity, String or
//! CodeableConcept, directly or as components), and how measurements are grouped in time
//! (`periodInterval`). Templates are looked up by `typeName` without regard to case.

use jsonc_parser::ast::{Object, Value as Node};

use crate::error::{TemplateError, TemplateErrorKind};
use crate::source::{Checker, Members, Source, start, type_name};

/// A validated FHIR mapping.
#[derive(Debug, Clone)]
pub struct FhirMapping {
    /// `CodeValueFhir` templates in declaration order.
    pub templates: Vec<CodeValueTemplate>,
    /// `HandlebarsFhir` templates (an iomt extension) in declaration order. Type names are
    /// unique across both lists, without regard to case.
    pub handlebars: Vec<HandlebarsTemplate>,
}

/// The template a measurement type converts with.
#[derive(Debug, Clone, Copy)]
pub enum FhirTemplate<'a> {
    /// MedTech's Observation template.
    CodeValue(&'a CodeValueTemplate),
    /// A handlebars template that renders any FHIR resource.
    Handlebars(&'a HandlebarsTemplate),
}

impl FhirTemplate<'_> {
    /// How the template groups measurements in time.
    pub fn period_interval(&self) -> PeriodInterval {
        match self {
            FhirTemplate::CodeValue(t) => t.period_interval,
            FhirTemplate::Handlebars(t) => t.period_interval,
        }
    }
}

#[derive(Clone, Copy)]
enum FhirKind {
    CodeValue,
    Handlebars,
}

impl FhirKind {
    fn from_type_name(name: &str) -> Option<Self> {
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is("CodeValueFhir") || is("CodeValueFhirTemplate") {
            Some(FhirKind::CodeValue)
        } else if is("HandlebarsFhir") {
            Some(FhirKind::Handlebars)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            FhirKind::CodeValue => "CodeValueFhir",
            FhirKind::Handlebars => "HandlebarsFhir",
        }
    }
}

impl FhirMapping {
    /// Reads and validates a FHIR mapping file; on failure returns every error.
    pub fn parse(text: &str) -> Result<Self, Vec<TemplateError>> {
        let source = Source::new(text);
        let root = source.parse().map_err(|e| vec![e])?;
        let mut c = Checker::new(&source);
        let items = c.collection_items(&root, "CollectionFhir");
        let mut mapping = FhirMapping {
            templates: Vec::new(),
            handlebars: Vec::new(),
        };
        let mut names: Vec<(String, usize)> = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let Some((kind, body, path)) = c.entry(
                index,
                item,
                FhirKind::from_type_name,
                FhirKind::name,
                "CodeValueFhir or HandlebarsFhir",
            ) else {
                continue;
            };
            let (type_name, offset) = match kind {
                FhirKind::CodeValue => match code_value(&mut c, index, body, &path) {
                    Some(t) => {
                        let key = (t.type_name.clone(), t.type_name_offset);
                        mapping.templates.push(t);
                        key
                    }
                    None => continue,
                },
                FhirKind::Handlebars => match handlebars_template(&mut c, index, body, &path) {
                    Some((t, offset)) => {
                        let key = (t.type_name.clone(), offset);
                        mapping.handlebars.push(t);
                        key
                    }
                    None => continue,
                },
            };
            if let Some((_, first)) = names
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(&type_name))
            {
                let message = format!(
                    "duplicate template defined for type name '{type_name}' (also template[{first}]; type names are matched without regard to case)"
                );
                c.error(
                    TemplateErrorKind::InvalidValue,
                    offset,
                    &format!("{path}.typeName"),
                    message,
                );
                continue;
            }
            names.push((type_name, index));
        }
        if c.errors.is_empty() {
            Ok(mapping)
        } else {
            Err(c.errors)
        }
    }

    /// The `CodeValueFhir` template for a measurement type (case-insensitive, as in MedTech).
    pub fn template(&self, type_name: &str) -> Option<&CodeValueTemplate> {
        self.templates
            .iter()
            .find(|t| t.type_name.eq_ignore_ascii_case(type_name))
    }

    /// A `TemplateError` for each device template whose `typeName` no FHIR template takes (in
    /// the device mapping's file), with the closest FHIR type name as a suggestion: MedTech
    /// accepts such a pair and dead-letters every measurement of the type at run time.
    pub fn unmapped_types(&self, device: &crate::device::DeviceMapping) -> Vec<TemplateError> {
        let known: Vec<&str> = self
            .templates
            .iter()
            .map(|t| t.type_name.as_ref())
            .chain(self.handlebars.iter().map(|t| t.type_name.as_ref()))
            .collect();
        device
            .templates
            .iter()
            .filter(|t| self.lookup(&t.type_name).is_none())
            .map(|t| {
                let hint = match crate::source::closest(&t.type_name, &known) {
                    Some(k) => format!("; did you mean '{k}'?"),
                    None if known.is_empty() => String::new(),
                    None => format!("; the FHIR templates take: {}", known.join(", ")),
                };
                TemplateError {
                    message: format!(
                        "no FHIR template takes typeName '{}'{hint} (its measurements would all be dead-lettered)",
                        t.type_name
                    ),
                    path: format!("$.template[{}].template.typeName", t.index),
                    line: Some(t.line),
                    column: None,
                    template: Some(t.label()),
                    kind: TemplateErrorKind::UnmappedType,
                }
            })
            .collect()
    }

    /// The template of either kind for a measurement type (case-insensitive).
    pub fn lookup(&self, type_name: &str) -> Option<FhirTemplate<'_>> {
        self.template(type_name)
            .map(FhirTemplate::CodeValue)
            .or_else(|| {
                self.handlebars
                    .iter()
                    .find(|t| t.type_name.eq_ignore_ascii_case(type_name))
                    .map(FhirTemplate::Handlebars)
            })
    }
}

/// A `HandlebarsFhir` template: renders any FHIR resource (an Observation with the customer's
/// own profile, a DeviceMetric, ...) from one observation window.
///
/// ```json
/// {"templateType": "HandlebarsFhir", "template": {
///   "typeName": "heartrate", "periodInterval": 60,
///   "key": "{{ids.device}}.{{type}}.{{segment}}",
///   "resource": "{\"resourceType\": \"Observation\", \"status\": \"final\", ...}"}}
/// ```
///
/// The registry runs in strict mode (a missing field is an error, not an empty string), with
/// no partials and no access to files or the network; `{{x}}` escapes for JSON strings.
/// Rendering must give a JSON object with a `resourceType`. The resource's id is its own `id`
/// if it renders one, else the SHA-256 of `key`, so that a replay writes the same resource.
#[derive(Debug, Clone)]
pub struct HandlebarsTemplate {
    /// Position in the collection (0-based).
    pub index: usize,
    /// 1-based line of the template object in the file.
    pub line: usize,
    /// The measurement type this template converts.
    pub type_name: String,
    /// Grouping in time.
    pub period_interval: PeriodInterval,
    /// Whether a `key` template was declared.
    pub has_key: bool,
    registry: std::sync::Arc<handlebars::Handlebars<'static>>,
}

impl HandlebarsTemplate {
    /// Renders the resource text for a window context.
    pub fn render_resource(&self, context: &serde_json::Value) -> Result<String, String> {
        self.registry
            .render("resource", context)
            .map_err(|e| render_error(&e))
    }

    /// Renders the declared key, if any.
    pub fn render_key(&self, context: &serde_json::Value) -> Option<Result<String, String>> {
        self.has_key.then(|| {
            self.registry
                .render("key", context)
                .map_err(|e| render_error(&e))
        })
    }
}

/// Refuses handlebars templates too long or too deeply nested to load quickly and render on a
/// thread's stack (`limits.handlebars_bytes`, `limits.handlebars_nesting`): the parser and the
/// renderer recurse into blocks (`{{#if}}…{{/if}}`), and their cost grows faster than the
/// nesting.
fn check_handlebars_shape(text: &str) -> Result<(), String> {
    let limits = iomt_core::limits();
    if text.len() > limits.handlebars_bytes {
        return Err(format!(
            "the handlebars template is {} bytes long; the limit is {} (limits.handlebars_bytes)",
            text.len(),
            limits.handlebars_bytes
        ));
    }
    let (mut depth, mut deepest) = (0usize, 0usize);
    for (at, _) in text.match_indices("{{") {
        match text[at + 2..].trim_start_matches('~').as_bytes().first() {
            Some(b'#') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            Some(b'/') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if deepest > limits.handlebars_nesting {
        return Err(format!(
            "the handlebars template nests blocks {deepest} deep; the limit is {} (limits.handlebars_nesting)",
            limits.handlebars_nesting
        ));
    }
    Ok(())
}

fn render_error(e: &handlebars::RenderError) -> String {
    match (e.line_no, e.column_no) {
        (Some(l), Some(c)) => format!("{e} (template line {l}, column {c})"),
        _ => e.to_string(),
    }
}

/// JSON string escaping for `{{x}}`: the value can sit inside a JSON string literal.
fn json_escape(text: &str) -> String {
    let quoted = serde_json::Value::String(text.to_owned()).to_string();
    quoted[1..quoted.len() - 1].to_owned()
}

/// Lowercase hex SHA-256 of a text: MedTech's resource ids, and the `sha256` template helper.
pub fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A helper that writes `f(first parameter)` unescaped (its output is already valid JSON text).
fn text_helper(
    f: fn(&serde_json::Value) -> String,
) -> Box<dyn handlebars::HelperDef + Send + Sync> {
    use handlebars::{Context, Handlebars, Helper, HelperResult, Output, RenderContext};
    Box::new(
        move |helper: &Helper<'_>,
              _: &Handlebars<'_>,
              _: &Context,
              _: &mut RenderContext<'_, '_>,
              out: &mut dyn Output|
              -> HelperResult {
            let value = helper
                .param(0)
                .map_or(serde_json::Value::Null, |p| p.value().clone());
            out.write(&f(&value))?;
            Ok(())
        },
    )
}

fn registry() -> handlebars::Handlebars<'static> {
    let mut h = handlebars::Handlebars::new();
    h.set_strict_mode(true);
    h.set_prevent_indent(true);
    h.register_escape_fn(json_escape);
    // `{{json x}}`: x as a JSON literal (quoted string, number, object...).
    h.register_helper("json", text_helper(|v| v.to_string()));
    // `{{sha256 x}}`: lowercase hex SHA-256 of the text, for derived ids.
    h.register_helper(
        "sha256",
        text_helper(|v| match v {
            serde_json::Value::String(s) => sha256_hex(s),
            other => sha256_hex(&other.to_string()),
        }),
    );
    h
}

fn handlebars_template(
    c: &mut Checker<'_, '_>,
    index: usize,
    obj: &Object<'_>,
    path: &str,
) -> Option<(HandlebarsTemplate, usize)> {
    let errors_before = c.errors.len();
    let m = c.members(
        obj,
        path,
        &["typeName", "periodInterval", "resource", "key"],
        &[],
    );
    let declared = type_name_member(c, &m, index, "HandlebarsFhir");
    let period_interval = period_interval(c, &m);
    let mut registry = registry();
    let resource = c.required_string(&m, "resource");
    if let Some((text, offset)) = &resource
        && let Err(e) = check_handlebars_shape(text).and_then(|()| {
            registry
                .register_template_string("resource", text)
                .map_err(|e| format!("invalid handlebars template: {e}"))
        })
    {
        c.error(
            TemplateErrorKind::Expression,
            *offset,
            &m.child("resource"),
            e,
        );
    }
    let key = match m.get("key") {
        None | Some(Node::NullKeyword(_)) => None,
        Some(Node::StringLit(s)) => Some((s.value.to_string(), s.range.start)),
        Some(other) => {
            c.error(
                TemplateErrorKind::InvalidValue,
                start(other),
                &m.child("key"),
                format!("'key' must be a string, found {}", type_name(other)),
            );
            None
        }
    };
    if let Some((text, offset)) = &key
        && let Err(e) = check_handlebars_shape(text).and_then(|()| {
            registry
                .register_template_string("key", text)
                .map_err(|e| format!("invalid handlebars template: {e}"))
        })
    {
        c.error(TemplateErrorKind::Expression, *offset, &m.child("key"), e);
    }
    if c.errors.len() != errors_before {
        return None;
    }
    let (type_name, offset) = declared?;
    Some((
        HandlebarsTemplate {
            index,
            line: c.line(obj.range.start),
            type_name,
            period_interval: period_interval?,
            has_key: key.is_some(),
            registry: std::sync::Arc::new(registry),
        },
        offset,
    ))
}

/// How measurements are grouped into one Observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeriodInterval {
    /// One Observation per distinct occurrence time (`0`, `Single`; the default).
    Single,
    /// One per UTC hour (`60`, `Hourly`).
    Hourly,
    /// One per UTC day (`1440`, `Daily`).
    Daily,
    /// One per correlation id (`-1`, `CorrelationId`).
    CorrelationId,
}

/// A coding as written in a template.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coding {
    /// `code`.
    pub code: Option<String>,
    /// `system`.
    pub system: Option<String>,
    /// `display`.
    pub display: Option<String>,
}

/// A category: a text and codings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Category {
    /// `text`.
    pub text: Option<String>,
    /// `codes`.
    pub codes: Vec<Coding>,
}

/// How a measurement property becomes an Observation value.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueTemplate {
    /// The measurement property that supplies the value.
    pub value_name: String,
    /// The FHIR representation.
    pub kind: ValueKind,
}

/// The four FHIR value representations.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueKind {
    /// `valueSampledData`: values in fixed-period slots across the Observation's period.
    SampledData {
        /// Slot length in milliseconds.
        default_period: f64,
        /// `origin.unit`.
        unit: Option<String>,
    },
    /// `valueQuantity`.
    Quantity {
        /// `unit`.
        unit: Option<String>,
        /// `code`.
        code: Option<String>,
        /// `system`.
        system: Option<String>,
    },
    /// `valueString`.
    String,
    /// `valueCodeableConcept`; only the presence of the measurement value matters.
    CodeableConcept {
        /// `text`.
        text: Option<String>,
        /// `coding`.
        codes: Vec<Coding>,
    },
}

/// One Observation component.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentTemplate {
    /// `component.code.coding`.
    pub codes: Vec<Coding>,
    /// The component's value.
    pub value: ValueTemplate,
}

/// One compiled `CodeValueFhir` template.
#[derive(Debug, Clone)]
pub struct CodeValueTemplate {
    /// Position in the collection (0-based).
    pub index: usize,
    /// 1-based line of the template object in the file.
    pub line: usize,
    /// The measurement type this template converts.
    pub type_name: String,
    type_name_offset: usize,
    /// Grouping in time.
    pub period_interval: PeriodInterval,
    /// `Observation.code.coding`, before the service coding MedTech appends.
    pub codes: Vec<Coding>,
    /// `Observation.category`.
    pub category: Vec<Category>,
    /// `Observation.value[x]`.
    pub value: Option<ValueTemplate>,
    /// `Observation.component`.
    pub components: Vec<ComponentTemplate>,
}

fn code_value(
    c: &mut Checker<'_, '_>,
    index: usize,
    obj: &Object<'_>,
    path: &str,
) -> Option<CodeValueTemplate> {
    let errors_before = c.errors.len();
    let m = c.members(
        obj,
        path,
        &[
            "typeName",
            "periodInterval",
            "codes",
            "category",
            "value",
            "components",
        ],
        &["lineNumber", "linePosition"],
    );
    let type_name_found = type_name_member(c, &m, index, "CodeValueFhir");
    let period_interval = period_interval(c, &m);
    let codes = match m.get("codes") {
        None => {
            c.missing(&m, "codes");
            Vec::new()
        }
        Some(node) => codings(c, node, &m.child("codes")),
    };
    let category = objects(c, &m, "category", category);
    let value = match m.get("value") {
        None | Some(Node::NullKeyword(_)) => None,
        Some(node) => value(c, node, &m.child("value")),
    };
    let components = objects(c, &m, "components", component);
    if c.errors.len() != errors_before {
        return None;
    }
    let (type_name, type_name_offset) = type_name_found?;
    Some(CodeValueTemplate {
        index,
        line: c.line(obj.range.start),
        type_name,
        type_name_offset,
        period_interval: period_interval?,
        codes,
        category,
        value,
        components,
    })
}

/// An optional array member whose items `read` turns into values (items it rejects are
/// reported by it and left out).
fn objects<T>(
    c: &mut Checker<'_, '_>,
    m: &Members<'_, '_>,
    name: &'static str,
    read: fn(&mut Checker<'_, '_>, &Node<'_>, &str) -> Option<T>,
) -> Vec<T> {
    match m.get(name) {
        None | Some(Node::NullKeyword(_)) => Vec::new(),
        Some(Node::Array(a)) => a
            .elements
            .iter()
            .enumerate()
            .filter_map(|(i, item)| read(c, item, &format!("{}[{i}]", m.child(name))))
            .collect(),
        Some(other) => {
            c.error(
                TemplateErrorKind::InvalidValue,
                start(other),
                &m.child(name),
                format!("'{name}' must be an array, found {}", type_name(other)),
            );
            Vec::new()
        }
    }
}

/// The required, non-blank `typeName`; names the template in later errors.
fn type_name_member(
    c: &mut Checker<'_, '_>,
    m: &Members<'_, '_>,
    index: usize,
    kind: &str,
) -> Option<(String, usize)> {
    let found = c.required_string(m, "typeName")?;
    if found.0.trim().is_empty() {
        c.error(
            TemplateErrorKind::InvalidValue,
            found.1,
            &m.child("typeName"),
            "empty type name is not allowed".into(),
        );
        // Still returned, so the error is the only one and the template is dropped.
    } else {
        c.template = Some(format!("template[{index}] {kind} '{}'", found.0));
    }
    Some(found)
}

fn period_interval(c: &mut Checker<'_, '_>, m: &Members<'_, '_>) -> Option<PeriodInterval> {
    let node = match m.get("periodInterval") {
        None | Some(Node::NullKeyword(_)) => return Some(PeriodInterval::Single),
        Some(node) => node,
    };
    let parsed = match node {
        Node::NumberLit(n) => match n.value {
            "0" => Some(PeriodInterval::Single),
            "60" => Some(PeriodInterval::Hourly),
            "1440" => Some(PeriodInterval::Daily),
            "-1" => Some(PeriodInterval::CorrelationId),
            _ => None,
        },
        Node::StringLit(s) => match s.value.trim().to_ascii_lowercase().as_str() {
            "single" | "0" => Some(PeriodInterval::Single),
            "hourly" | "60" => Some(PeriodInterval::Hourly),
            "daily" | "1440" => Some(PeriodInterval::Daily),
            "correlationid" | "-1" => Some(PeriodInterval::CorrelationId),
            _ => None,
        },
        _ => None,
    };
    if parsed.is_none() {
        c.error(
            TemplateErrorKind::InvalidValue,
            start(node),
            &m.child("periodInterval"),
            "periodInterval must be 0 (Single), 60 (Hourly), 1440 (Daily) or -1 (CorrelationId)"
                .into(),
        );
    }
    parsed
}

fn optional_text(
    c: &mut Checker<'_, '_>,
    m: &Members<'_, '_>,
    name: &'static str,
) -> Option<String> {
    match m.get(name) {
        None | Some(Node::NullKeyword(_)) => None,
        Some(Node::StringLit(s)) => Some(s.value.to_string()),
        // Newtonsoft reads numbers and booleans into string members as their text.
        Some(Node::NumberLit(n)) => Some(n.value.to_owned()),
        Some(Node::BooleanLit(b)) => Some(b.value.to_string()),
        Some(other) => {
            c.error(
                TemplateErrorKind::InvalidValue,
                start(other),
                &m.child(name),
                format!("'{name}' must be a string, found {}", type_name(other)),
            );
            None
        }
    }
}

fn codings(c: &mut Checker<'_, '_>, node: &Node<'_>, path: &str) -> Vec<Coding> {
    let Node::Array(a) = node else {
        c.error(
            TemplateErrorKind::InvalidValue,
            start(node),
            path,
            format!("expected an array of codes, found {}", type_name(node)),
        );
        return Vec::new();
    };
    let mut out = Vec::with_capacity(a.elements.len());
    for (i, item) in a.elements.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        let Some(m) = c.object(item, &item_path, "a code", &["code", "system", "display"]) else {
            continue;
        };
        out.push(Coding {
            code: optional_text(c, &m, "code"),
            system: optional_text(c, &m, "system"),
            display: optional_text(c, &m, "display"),
        });
    }
    out
}

fn category(c: &mut Checker<'_, '_>, node: &Node<'_>, path: &str) -> Option<Category> {
    let m = c.object(node, path, "a category", &["text", "codes"])?;
    let text = optional_text(c, &m, "text");
    let codes = match m.get("codes") {
        None | Some(Node::NullKeyword(_)) => Vec::new(),
        Some(node) => codings(c, node, &m.child("codes")),
    };
    Some(Category { text, codes })
}

fn component(c: &mut Checker<'_, '_>, node: &Node<'_>, path: &str) -> Option<ComponentTemplate> {
    let m = c.object(node, path, "a component", &["codes", "value"])?;
    let codes = match m.get("codes") {
        None => {
            c.missing(&m, "codes");
            Vec::new()
        }
        Some(node) => codings(c, node, &m.child("codes")),
    };
    let value = match m.get("value") {
        None | Some(Node::NullKeyword(_)) => {
            c.missing(&m, "value");
            None
        }
        Some(node) => value(c, node, &m.child("value")),
    };
    Some(ComponentTemplate {
        codes,
        value: value?,
    })
}

/// A value type object. MedTech reads these with a deserializer that ignores unknown members,
/// so they are accepted here too.
fn value(c: &mut Checker<'_, '_>, node: &Node<'_>, path: &str) -> Option<ValueTemplate> {
    let Node::Object(obj) = node else {
        c.error(
            TemplateErrorKind::InvalidValue,
            start(node),
            path,
            format!("expected a value object, found {}", type_name(node)),
        );
        return None;
    };
    let known = [
        "valueType",
        "valueName",
        "defaultPeriod",
        "unit",
        "code",
        "system",
        "text",
        "codes",
    ];
    let mut m = Members::empty(obj.range.start, path.to_owned());
    for prop in &obj.properties {
        if let Some(k) = known
            .iter()
            .find(|k| k.eq_ignore_ascii_case(prop.name.as_str()))
        {
            m.push(k, prop);
        }
    }
    let value_name = c.required_string(&m, "valueName").map(|(s, _)| s);
    let value_type = c.required_string(&m, "valueType");
    let kind = match value_type {
        None => None,
        Some((t, offset)) => match t.to_ascii_lowercase().as_str() {
            "sampleddata" => {
                let default_period = match m.get("defaultPeriod") {
                    Some(Node::NumberLit(n)) => n.value.parse::<f64>().ok().filter(|p| *p > 0.0),
                    Some(Node::StringLit(s)) => {
                        s.value.trim().parse::<f64>().ok().filter(|p| *p > 0.0)
                    }
                    _ => None,
                };
                if default_period.is_none() {
                    let at = m.get("defaultPeriod").map_or(obj.range.start, start);
                    c.error(
                        TemplateErrorKind::InvalidValue,
                        at,
                        &m.child("defaultPeriod"),
                        "SampledData needs a positive defaultPeriod (milliseconds between samples)"
                            .into(),
                    );
                }
                default_period.map(|default_period| ValueKind::SampledData {
                    default_period,
                    unit: optional_text(c, &m, "unit"),
                })
            }
            "quantity" => Some(ValueKind::Quantity {
                unit: optional_text(c, &m, "unit"),
                code: optional_text(c, &m, "code"),
                system: optional_text(c, &m, "system"),
            }),
            "string" => Some(ValueKind::String),
            "codeableconcept" => Some(ValueKind::CodeableConcept {
                text: optional_text(c, &m, "text"),
                codes: match m.get("codes") {
                    None | Some(Node::NullKeyword(_)) => Vec::new(),
                    Some(node) => codings(c, node, &m.child("codes")),
                },
            }),
            _ => {
                c.error(
                    TemplateErrorKind::InvalidValue,
                    offset,
                    &m.child("valueType"),
                    format!("unknown valueType '{t}'; expected SampledData, Quantity, String or CodeableConcept"),
                );
                None
            }
        },
    };
    Some(ValueTemplate {
        value_name: value_name?,
        kind: kind?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_basic_sample() {
        let text = r#"{"templateType": "CollectionFhir", "template": [
          {"templateType": "CodeValueFhir", "template": {
            "codes": [{"code": "8867-4", "system": "http://loinc.org", "display": "Heart rate"}],
            "periodInterval": 60, "typeName": "heartrate",
            "value": {"defaultPeriod": 1000, "unit": "count/min", "valueName": "hr", "valueType": "SampledData"}}},
          {"templateType": "CodeValueFhirTemplate", "template": {
            "codes": [{"code": "85354-9"}], "typeName": "bloodpressure", "periodInterval": "Daily",
            "category": [{"text": "vital-signs", "codes": [{"code": "vital-signs", "system": "http://terminology.hl7.org/CodeSystem/observation-category"}]}],
            "components": [{"codes": [{"code": "8480-6"}], "value": {"valueName": "systolic", "valueType": "Quantity", "unit": "mmHg"}}]}}
        ]}"#;
        let m = FhirMapping::parse(text).unwrap();
        assert_eq!(m.templates.len(), 2);
        assert_eq!(
            m.template("HeartRate").unwrap().period_interval,
            PeriodInterval::Hourly
        );
        let bp = m.template("bloodpressure").unwrap();
        assert_eq!(bp.period_interval, PeriodInterval::Daily);
        assert_eq!(
            bp.components[0].value.kind,
            ValueKind::Quantity {
                unit: Some("mmHg".into()),
                code: None,
                system: None
            }
        );
    }

    #[test]
    fn handlebars_templates_too_deep_or_long_are_refused_quickly() {
        let template = |resource: &str| {
            format!(
                r#"{{"templateType": "CollectionFhir", "template": [{{"templateType": "HandlebarsFhir", "template": {{"typeName": "hr", "resource": "{resource}"}}}}]}}"#
            )
        };
        let started = std::time::Instant::now();
        let deep = format!("{}x{}", "{{#if a}}".repeat(2_000), "{{/if}}".repeat(2_000));
        let errors = FhirMapping::parse(&template(&deep)).unwrap_err();
        assert!(
            errors[0].message.contains("nests blocks 2000 deep"),
            "{errors:#?}"
        );
        let deeper = format!(
            "{}x{}",
            "{{#if a}}".repeat(20_000),
            "{{/if}}".repeat(20_000)
        );
        assert!(FhirMapping::parse(&template(&deeper)).is_err());
        let long = "x".repeat(iomt_core::Limits::default().handlebars_bytes + 1);
        let errors = FhirMapping::parse(&template(&long)).unwrap_err();
        assert!(errors[0].message.contains("bytes long"), "{errors:#?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let nested = format!(
            "{}x{}",
            "{{#if a}}".repeat(iomt_core::Limits::default().handlebars_nesting),
            "{{/if}}".repeat(iomt_core::Limits::default().handlebars_nesting)
        );
        let parsed = FhirMapping::parse(&template(&nested));
        assert!(parsed.is_ok(), "{parsed:#?}");
    }

    #[test]
    fn handlebars_templates_compile_and_render_json_safely() {
        let text = r#"{"templateType": "CollectionFhir", "template": [
          {"templateType": "HandlebarsFhir", "template": {"typeName": "hr", "key": "{{device}}",
            "resource": "{\"resourceType\": \"DeviceMetric\", \"source\": \"{{device}}\", \"n\": {{json n}}}"}},
          {"templateType": "HandlebarsFhir", "template": {"typeName": "HR", "resource": "{}"}},
          {"templateType": "HandlebarsFhir", "template": {"typeName": "bad", "resource": "{{#if}}"}}
        ]}"#;
        let errors = FhirMapping::parse(text).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(errors[0].message.contains("duplicate"));
        assert!(errors[1].message.contains("invalid handlebars template"));

        let text = r#"{"templateType": "CollectionFhir", "template": [
          {"templateType": "HandlebarsFhir", "template": {"typeName": "hr", "key": "{{device}}",
            "resource": "{\"resourceType\": \"DeviceMetric\", \"source\": \"{{device}}\", \"n\": {{json n}}}"}}]}"#;
        let m = FhirMapping::parse(text).unwrap();
        let Some(FhirTemplate::Handlebars(t)) = m.lookup("HR") else {
            panic!("expected a handlebars template")
        };
        let out = t
            .render_resource(&serde_json::json!({"device": "a\"b", "n": 3}))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["source"], "a\"b");
        assert_eq!(v["n"], 3);
        // Strict mode: a missing field is an error, not an empty string.
        assert!(t.render_resource(&serde_json::json!({"n": 3})).is_err());
    }

    #[test]
    fn reports_every_error() {
        let text = r#"{"templateType": "CollectionFhir", "template": [
          {"templateType": "CodeValueFhir", "template": {"codes": [], "value": {"valueName": "a", "valueType": "Sampled"}}},
          {"templateType": "CodeValueFhir", "template": {"typeName": "x", "codes": [], "periodInterval": 30, "extra": 1}},
          {"templateType": "CodeValueFhir", "template": {"typeName": " ", "codes": []}},
          {"templateType": "CodeValueFhir", "template": {"typeName": "y", "codes": []}},
          {"templateType": "CodeValueFhir", "template": {"typeName": "Y", "codes": []}}
        ]}"#;
        let errors = FhirMapping::parse(text).unwrap_err();
        let messages: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(errors.len(), 6, "{messages:#?}");
        assert!(messages.iter().any(|m| m.contains("'typeName' not found")));
        assert!(
            messages
                .iter()
                .any(|m| m.contains("unknown valueType 'Sampled'"))
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("periodInterval must be"))
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("unknown member 'extra'"))
        );
        assert!(messages.iter().any(|m| m.contains("empty type name")));
        assert!(
            messages
                .iter()
                .any(|m| m.contains("duplicate template defined for type name 'Y'"))
        );
    }
}
