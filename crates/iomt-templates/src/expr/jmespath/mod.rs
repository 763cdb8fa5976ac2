//! JMESPath as MedTech runs it: JmesPath.Net 1.0.205 over Newtonsoft tokens, with MedTech's
//! custom functions.
//!
//! The jmespath crate parses; evaluation is ours, because JmesPath.Net's results differ from
//! the specification's (and the crate's) in ways templates depend on:
//!
//! * it evaluates Newtonsoft tokens, so date-shaped strings are dates: `join` and `length`
//!   read them as `MM/dd/yyyy HH:mm:ss`, `contains(date, 'T')` is false, a date never equals a
//!   string, and two dates are equal when they are the same instant;
//! * `<`, `<=`, `>` and `>=` also order strings (ordinally), and treat null as the smallest
//!   string; an integer never equals a double;
//! * projections drop the nulls evaluation makes (a missing member) but keep the document's
//!   own `null`s, and `[*]` leaves out null elements before projecting;
//! * `a.b` stops at a null `a` (even before a function), while `a | b` does not;
//! * functions keep their .NET behaviour: `merge` merges nested objects and concatenates
//!   arrays, `sum` of doubles that add up to a whole number is an integer, `max_by` reads
//!   numeric strings as numbers, `to_string` leaves dates as dates.
//!
//! MedTech's functions (`add`, `subtract`, `multiply`, `divide`, `pow`, `insertString`,
//! `fromUnixTimestamp`, `fromUnixTimestampMs`) type their results the .NET way: two integers
//! give integer arithmetic (`divide(7, 2)` is `3`), anything else double arithmetic.
//!
//! Documents are never converted: evaluation borrows the event's `serde_json` values.

mod eval;
mod functions;

use std::borrow::Cow;

use jmespath::ast::{Ast, Comparator};
use serde_json::Value;

use self::eval::{Arg, Evaluator};
use self::functions::Function;
use super::jsonpath::Scope;
use super::token::Token;

/// Refuses expressions too long or too deep to parse and evaluate on a thread's stack
/// ([`iomt_core::Limits`]: `expression_bytes`, `expression_nesting`, and
/// `expression_operators`, which with the nesting bounds the depth of the parsed tree that the
/// parser, the compiler and evaluation all walk recursively); literals (`'…'`, `"…"`,
/// `` `…` ``) count toward the length only. JSONPath is held to the length and nesting.
pub(crate) fn check_shape(source: &str, count_operators: bool) -> Result<(), String> {
    let limits = iomt_core::limits();
    if source.len() > limits.expression_bytes {
        return Err(format!(
            "is {} bytes long; the limit is {} (limits.expression_bytes)",
            source.len(),
            limits.expression_bytes
        ));
    }
    let (mut depth, mut deepest, mut operators) = (0usize, 0usize, 0usize);
    let mut quote: Option<u8> = None;
    let mut escaped = false;
    let bytes = source.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if let Some(q) = quote {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                _ if b == q => quote = None,
                _ => {}
            }
            continue;
        }
        match b {
            b'\'' | b'"' | b'`' => quote = Some(b),
            b'(' | b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'.' | b'|' | b',' | b'<' | b'>' | b'=' => operators += 1,
            b'&' if bytes.get(i + 1) == Some(&b'&') => operators += 1,
            _ => {}
        }
    }
    if deepest > limits.expression_nesting {
        return Err(format!(
            "nests {deepest} levels deep; the limit is {} (limits.expression_nesting)",
            limits.expression_nesting
        ));
    }
    if count_operators && operators > limits.expression_operators {
        return Err(format!(
            "has {operators} operators; the limit is {} (limits.expression_operators)",
            limits.expression_operators
        ));
    }
    Ok(())
}

/// An expression as error messages quote it: at most its first 200 characters.
fn excerpt(source: &str) -> String {
    match source.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &source[..at]),
        None => source.to_owned(),
    }
}

/// A compiled JMESPath expression.
#[derive(Clone)]
pub struct JmesPath {
    source: String,
    root: Node,
}

impl std::fmt::Debug for JmesPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JmesPath")
            .field("expression", &self.source)
            .finish()
    }
}

/// A JMESPath expression that could not be compiled or evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JMESPath expression '{expression}': {reason}")]
pub struct JmesPathError {
    /// The expression as written in the template.
    pub expression: String,
    /// What went wrong.
    pub reason: String,
}

/// Why a JMESPath value expression produced no single value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JmesPathSelectError {
    /// The expression failed at run time (a function got the wrong type, a division by zero…).
    #[error(transparent)]
    Eval(JmesPathError),
    /// A projection produced more than one element.
    #[error("path returned multiple tokens")]
    Multiple,
}

/// The expression tree, lowered from the jmespath crate's AST into the shapes JmesPath.Net
/// evaluates (which the crate's AST does not distinguish: a pipe from a dot, a raw string
/// from a JSON literal, `[*]` from a slice).
#[derive(Debug, Clone)]
pub(crate) enum Node {
    Identity,
    Field(String),
    Index(i32),
    /// A JSON literal: parsed like a message, so its date-shaped strings are dates.
    Literal(Value),
    /// A raw string literal (`'text'`): always a string.
    Raw(String),
    /// `lhs.rhs` and `lhs[n]`: a null `lhs` is the result.
    Sub(Box<Node>, Box<Node>),
    /// `lhs | rhs`: `rhs` runs on `lhs` as one token, even null.
    Pipe(Box<Node>, Box<Node>),
    /// A projection: the tokens of `source`, each taken through `links` in turn.
    Project(Box<Source>, Vec<Node>),
    MultiList(Vec<Node>),
    MultiHash(Vec<(String, Node)>),
    Not(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Compare(Comparator, Box<Node>, Box<Node>),
    Call(Function, Vec<Node>),
    /// `&expr`, an argument of `map`, `sort_by`, `max_by` and `min_by`.
    Expref(Box<Node>),
}

/// Where a projection's tokens come from.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// `lhs[*]`: the array's elements, nulls left out.
    List(Node),
    /// `lhs.*`: the object's member values.
    Values(Node),
    /// `lhs[]`: the array's elements with nested arrays flattened one level, nulls left out.
    Flatten(Node),
    /// `[start:stop:step]` of the current token.
    Slice(Option<i32>, Option<i32>, i32),
    /// `lhs[?predicate]`: the elements for which the predicate is truthy.
    Filter(Node, Node),
}

impl JmesPath {
    /// Compiles an expression; parse errors, unknown functions and wrong argument counts are
    /// found here, not per message, as JmesPath.Net finds them when MedTech loads a template.
    pub fn compile(source: &str) -> Result<Self, JmesPathError> {
        let error = |reason: String| JmesPathError {
            expression: excerpt(source),
            reason,
        };
        check_shape(source, true).map_err(error)?;
        let parsed = jmespath::parse(source).map_err(|e| {
            error(match &e.reason {
                jmespath::ErrorReason::Parse(p) => {
                    format!("could not be parsed: {p} (column {})", e.column)
                }
                other => other.to_string(),
            })
        })?;
        let root = lower(&parsed, source).map_err(error)?;
        Ok(Self {
            source: source.to_owned(),
            root,
        })
    }

    /// The expression as written in the template.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    fn evaluate<'a>(&'a self, scope: Scope<'a>) -> Result<Arg<'a>, JmesPathError> {
        let input = match scope {
            Scope::Value(v) => Token::Json(v),
            Scope::Matched { envelope, token } => Token::Matched { envelope, token },
        };
        Evaluator
            .eval(&self.root, &input)
            .map_err(|reason| JmesPathError {
                expression: self.source.clone(),
                reason: reason.0,
            })
    }

    /// The result as one token (a projection becomes an array), as JSON.
    pub fn search_in<'a>(&'a self, scope: Scope<'a>) -> Result<Cow<'a, Value>, JmesPathError> {
        Ok(self.evaluate(scope)?.into_token().to_json())
    }

    /// The tokens `typeMatchExpression` selects (`SelectTokens`): each element of a projection,
    /// the document's `null`s included, or the one non-null result.
    pub fn select_in<'a>(&'a self, scope: Scope<'a>) -> Result<Vec<Cow<'a, Value>>, JmesPathError> {
        Ok(match self.evaluate(scope)? {
            Arg::Projection(items) => items
                .into_iter()
                .map(|item| item.into_token().to_json())
                .collect(),
            Arg::Token(t) if t.is_null() => Vec::new(),
            Arg::Token(t) => vec![t.to_json()],
        })
    }

    /// The single token a value expression selects (`SelectToken`); a projection with more
    /// than one element is an error, as in MedTech. A projection of one element gives that
    /// element (MedTech gives a one-element array, which no conversion accepts).
    pub fn select_one_in<'a>(
        &'a self,
        scope: Scope<'a>,
    ) -> Result<Option<Token<'a>>, JmesPathSelectError> {
        match self.evaluate(scope).map_err(JmesPathSelectError::Eval)? {
            Arg::Projection(mut items) => match items.len() {
                0 => Ok(None),
                1 => Ok(items.pop().map(Arg::into_token)),
                _ => Err(JmesPathSelectError::Multiple),
            },
            Arg::Token(t) if t.is_null() => Ok(None),
            Arg::Token(t) => Ok(Some(t)),
        }
    }
}

/// Lowers the crate's AST. Byte offsets into `source` tell apart what the crate parses into
/// the same node.
fn lower(ast: &Ast, source: &str) -> Result<Node, String> {
    let at = |offset: usize| source.as_bytes().get(offset).copied();
    let node = |a: &Ast| lower(a, source).map(Box::new);
    Ok(match ast {
        Ast::Identity { .. } => Node::Identity,
        Ast::Field { name, .. } => Node::Field(name.clone()),
        Ast::Index { idx, .. } => Node::Index(*idx),
        Ast::Literal { value, offset } => match (at(*offset), &**value) {
            (Some(b'\''), jmespath::Variable::String(s)) => Node::Raw(s.clone()),
            (_, v) => Node::Literal(serde_json::to_value(v).map_err(|e| e.to_string())?),
        },
        Ast::Subexpr { lhs, rhs, offset } => {
            if at(*offset) == Some(b'|') {
                Node::Pipe(node(lhs)?, node(rhs)?)
            } else {
                Node::Sub(node(lhs)?, node(rhs)?)
            }
        }
        Ast::Projection { lhs, rhs, .. } => {
            let (source_node, rest) = match (&**lhs, &**rhs) {
                (
                    _,
                    Ast::Condition {
                        predicate, then, ..
                    },
                ) => (
                    Source::Filter(lower(lhs, source)?, lower(predicate, source)?),
                    then,
                ),
                (Ast::ObjectValues { node: inner, .. }, _) => {
                    (Source::Values(lower(inner, source)?), rhs)
                }
                (Ast::Flatten { node: inner, .. }, _) => {
                    (Source::Flatten(lower(inner, source)?), rhs)
                }
                (
                    Ast::Slice {
                        start, stop, step, ..
                    },
                    _,
                ) => {
                    if *step == 0 {
                        return Err("a slice step cannot be 0".into());
                    }
                    (Source::Slice(*start, *stop, *step), rhs)
                }
                _ => (Source::List(lower(lhs, source)?), rhs),
            };
            let mut chain = Vec::new();
            links(lower(rest, source)?, &mut chain);
            Node::Project(Box::new(source_node), chain)
        }
        // The parser only makes these inside a projection, handled above.
        Ast::ObjectValues { node: inner, .. } => {
            Node::Project(Box::new(Source::Values(lower(inner, source)?)), Vec::new())
        }
        Ast::Flatten { node: inner, .. } => {
            Node::Project(Box::new(Source::Flatten(lower(inner, source)?)), Vec::new())
        }
        Ast::Slice {
            start, stop, step, ..
        } => Node::Project(Box::new(Source::Slice(*start, *stop, *step)), Vec::new()),
        Ast::Condition {
            predicate, then, ..
        } => Node::Project(
            Box::new(Source::Filter(Node::Identity, lower(predicate, source)?)),
            vec![lower(then, source)?],
        ),
        Ast::MultiList { elements, .. } => Node::MultiList(
            elements
                .iter()
                .map(|e| lower(e, source))
                .collect::<Result<_, _>>()?,
        ),
        Ast::MultiHash { elements, .. } => Node::MultiHash(
            elements
                .iter()
                .map(|kv| Ok((kv.key.clone(), lower(&kv.value, source)?)))
                .collect::<Result<_, String>>()?,
        ),
        Ast::Not { node: inner, .. } => Node::Not(node(inner)?),
        Ast::And { lhs, rhs, .. } => Node::And(node(lhs)?, node(rhs)?),
        Ast::Or { lhs, rhs, .. } => Node::Or(node(lhs)?, node(rhs)?),
        Ast::Comparison {
            comparator,
            lhs,
            rhs,
            ..
        } => Node::Compare(comparator.clone(), node(lhs)?, node(rhs)?),
        Ast::Function { name, args, .. } => {
            let function = Function::by_name(name)
                .ok_or_else(|| format!("no function named {name} is available"))?;
            let (min, variadic) = function.arity();
            let n = args.len();
            if n < min || (!variadic && n > min) {
                let expected = if variadic {
                    format!("at least {min}")
                } else {
                    min.to_string()
                };
                return Err(format!(
                    "the function {name} expects {expected} argument(s) but {n} were supplied"
                ));
            }
            Node::Call(
                function,
                args.iter()
                    .map(|a| lower(a, source))
                    .collect::<Result<_, _>>()?,
            )
        }
        Ast::Expref { ast: inner, .. } => Node::Expref(node(inner)?),
    })
}

/// A projection's right-hand side as the steps JmesPath.Net applies to each element one after
/// the other (each step may drop the element): `.b.c[0]` is `b`, `c`, `[0]`.
fn links(node: Node, out: &mut Vec<Node>) {
    match node {
        Node::Identity => {}
        Node::Sub(lhs, rhs) => {
            links(*lhs, out);
            links(*rhs, out);
        }
        other => out.push(other),
    }
}

#[cfg(test)]
mod tests;
