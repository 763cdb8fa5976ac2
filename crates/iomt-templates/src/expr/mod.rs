//! Template expressions: JSONPath (Newtonsoft dialect) and JMESPath, compiled once.

pub mod dotnet;
pub mod jmespath;
pub mod jsonpath;
mod newtonsoft;
pub mod token;

pub use self::jmespath::JmesPath;
pub use self::jsonpath::{JsonPath, Scope};
pub use self::token::Token;

/// The language of one template expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    /// Newtonsoft.Json JSONPath, the default.
    JsonPath,
    /// JMESPath with MedTech's custom functions (CalculatedContent templates only).
    JmesPath,
}

/// One compiled expression of a template, with where it came from.
#[derive(Debug, Clone)]
pub struct Expression {
    /// The compiled expression.
    pub kind: ExpressionKind,
    /// JSON path of the template member that holds it (`$.template[0].template.deviceIdExpression`);
    /// empty for the fixed expressions of IoT templates.
    pub path: String,
    /// 1-based line of the expression in the template file, when it was written there.
    pub line: Option<usize>,
}

/// A compiled expression in one of the two languages.
#[derive(Debug, Clone)]
pub enum ExpressionKind {
    /// JSONPath.
    JsonPath(JsonPath),
    /// JMESPath (boxed: its compiled form is several times larger than a JSONPath's).
    JmesPath(Box<JmesPath>),
}

impl Expression {
    /// The expression text as written.
    pub fn as_str(&self) -> &str {
        match &self.kind {
            ExpressionKind::JsonPath(p) => p.as_str(),
            ExpressionKind::JmesPath(p) => p.as_str(),
        }
    }

    /// Which language the expression is written in.
    pub fn language(&self) -> Language {
        match self.kind {
            ExpressionKind::JsonPath(_) => Language::JsonPath,
            ExpressionKind::JmesPath(_) => Language::JmesPath,
        }
    }

    /// Compiles `text` in `language`; the error text names the expression and the cause.
    pub fn compile(
        text: &str,
        language: Language,
        path: String,
        line: Option<usize>,
    ) -> Result<Self, String> {
        let kind = match language {
            Language::JsonPath => {
                ExpressionKind::JsonPath(JsonPath::compile(text).map_err(|e| e.to_string())?)
            }
            Language::JmesPath => ExpressionKind::JmesPath(Box::new(
                JmesPath::compile(text).map_err(|e| e.to_string())?,
            )),
        };
        Ok(Self { kind, path, line })
    }
}
