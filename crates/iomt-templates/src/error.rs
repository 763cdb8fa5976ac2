//! Template errors that point at the offending field.

use serde::Serialize;

/// What kind of mistake a template error describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum TemplateErrorKind {
    /// The file is not JSON.
    Syntax,
    /// A required member is absent or null.
    MissingMember,
    /// A member the template type does not define.
    UnknownMember,
    /// A member has the wrong JSON type or an invalid value.
    InvalidValue,
    /// `templateType` names no known template type, or the root has the wrong type.
    TemplateType,
    /// A JSONPath or JMESPath expression does not compile.
    Expression,
    /// A device template's `typeName` that no FHIR template takes: every measurement of it
    /// would be dead-lettered.
    UnmappedType,
}

/// One problem in a mapping template file.
///
/// Errors keep everything a template author needs to find the problem without rereading the
/// file: the JSON path of the field, its line and column, and which template it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "camelCase")]
pub struct TemplateError {
    /// What is wrong.
    pub message: String,
    /// JSON path of the offending member (`$.template[1].template.typeMatchExpression`).
    pub path: String,
    /// 1-based line in the template file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// 1-based column in the template file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    /// The template the error belongs to (`template[1] IotJsonPathContent 'bootTime'`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The class of error.
    pub kind: TemplateErrorKind,
}

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}")?;
            if let Some(column) = self.column {
                write!(f, ", column {column}")?;
            }
            f.write_str(": ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(template) = &self.template {
            write!(f, " (in {template})")?;
        }
        Ok(())
    }
}
