//! JMESPath with MedTech's custom functions.
//!
//! MedTech registers `add`, `subtract`, `multiply`, `divide`, `pow`, `insertString`,
//! `fromUnixTimestamp` and `fromUnixTimestampMs` next to the standard library. Their typing
//! follows .NET: when both arguments are integers the arithmetic is 64-bit integer arithmetic
//! (so `divide(7, 2)` is `3`), otherwise it is double arithmetic.
//!
//! The jmespath crate evaluates over its own `Variable` tree. Converting a message into it costs
//! about as much as parsing the message again, so callers convert only when a JMESPath
//! expression actually runs, and share the converted event across the templates of one event.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use iomt_core::Timestamp;
use jmespath::functions::{ArgumentType, CustomFunction, Signature};
use jmespath::{Context, ErrorReason, JmespathError, Rcvar, Runtime, RuntimeError, Variable};
use serde_json::{Number, Value};

use super::jsonpath::{Scope, member};

/// The runtime every template expression is compiled against: the standard functions plus
/// MedTech's.
static RUNTIME: LazyLock<Runtime> = LazyLock::new(|| {
    let mut rt = Runtime::new();
    rt.register_builtin_functions();
    let number2 = || Signature::new(vec![ArgumentType::Number, ArgumentType::Number], None);
    rt.register_function(
        "add",
        arith(number2(), "add", i64::checked_add, |a, b| a + b),
    );
    rt.register_function(
        "subtract",
        arith(number2(), "subtract", i64::checked_sub, |a, b| a - b),
    );
    rt.register_function(
        "multiply",
        arith(number2(), "multiply", i64::checked_mul, |a, b| a * b),
    );
    rt.register_function(
        "divide",
        Box::new(CustomFunction::new(number2(), Box::new(divide))),
    );
    rt.register_function(
        "pow",
        Box::new(CustomFunction::new(number2(), Box::new(pow))),
    );
    rt.register_function(
        "insertString",
        Box::new(CustomFunction::new(
            Signature::new(
                vec![
                    ArgumentType::String,
                    ArgumentType::String,
                    ArgumentType::Number,
                ],
                None,
            ),
            Box::new(insert_string),
        )),
    );
    let number1 = || Signature::new(vec![ArgumentType::Number], None);
    rt.register_function(
        "fromUnixTimestamp",
        Box::new(CustomFunction::new(
            number1(),
            Box::new(|args, ctx| from_unix(args, ctx, 1000)),
        )),
    );
    rt.register_function(
        "fromUnixTimestampMs",
        Box::new(CustomFunction::new(
            number1(),
            Box::new(|args, ctx| from_unix(args, ctx, 1)),
        )),
    );
    rt
});

/// A compiled JMESPath expression.
///
/// Most template expressions start with a chain of member names (`Body.samples[?spo2]`,
/// `matchedToken.hr`). That chain is resolved directly on the JSON document and only the
/// subtree it reaches is converted for the jmespath interpreter, which saves converting the
/// whole event for every template that does not match it.
#[derive(Clone)]
pub struct JmesPath {
    expression: jmespath::Expression<'static>,
    /// Leading member names, resolved on the JSON document.
    prefix: Vec<String>,
    /// The rest of the expression, run on what `prefix` reached.
    rest: jmespath::ast::Ast,
    /// Without a prefix: the only member paths the expression reads, when it reads the
    /// document through named members alone (`fromUnixTimestamp(matchedToken.t)` reads
    /// `matchedToken.t`).
    root_paths: Option<Vec<Vec<String>>>,
    /// `members[?condition].members`, the usual shape of a JMESPath `typeMatchExpression`,
    /// answered without converting the array or the selected elements.
    filter: Option<FilterProjection>,
    projection: bool,
}

/// A filter projection over a member path: `prefix[?predicate].then`.
#[derive(Debug, Clone)]
struct FilterProjection {
    predicate: jmespath::ast::Ast,
    /// The member paths the predicate reads from an element.
    predicate_paths: Vec<Vec<String>>,
    /// Member chain applied to each selected element (empty: the element itself).
    then: Vec<String>,
}

impl std::fmt::Debug for JmesPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JmesPath")
            .field("expression", &self.expression.as_str())
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

impl JmesPathError {
    fn new(expression: &str, e: &JmespathError) -> Self {
        let reason = match &e.reason {
            ErrorReason::Parse(p) => format!("could not be parsed: {p} (column {})", e.column),
            ErrorReason::Runtime(RuntimeError::InvalidType {
                expected,
                actual,
                position,
            }) => {
                format!("argument {} must be {expected}, got {actual}", position + 1)
            }
            ErrorReason::Runtime(r) => r.to_string(),
        };
        Self {
            expression: expression.to_owned(),
            reason,
        }
    }
}

impl JmesPath {
    /// Compiles an expression; parse errors and unknown functions are found here, not per
    /// message.
    pub fn compile(source: &str) -> Result<Self, JmesPathError> {
        let expression = RUNTIME
            .compile(source)
            .map_err(|e| JmesPathError::new(source, &e))?;
        check_functions(expression.as_ast()).map_err(|reason| JmesPathError {
            expression: source.to_owned(),
            reason,
        })?;
        let projection = is_projection(expression.as_ast());
        let (prefix, rest) = split_member_prefix(expression.as_ast())
            .unwrap_or_else(|| (Vec::new(), expression.as_ast().clone()));
        let mut paths = Vec::new();
        let root_paths = root_paths(expression.as_ast(), &mut paths).then(|| {
            // A path under another one is already covered by the whole subtree.
            let all = paths.clone();
            paths.retain(|p| !all.iter().any(|q| q.len() < p.len() && p.starts_with(q)));
            paths.dedup();
            paths
        });
        let filter = if prefix.is_empty() {
            None
        } else {
            filter_projection(&rest)
        };
        Ok(Self {
            expression,
            prefix,
            rest,
            root_paths,
            filter,
            projection,
        })
    }

    /// The expression as written in the template.
    pub fn as_str(&self) -> &str {
        self.expression.as_str()
    }

    /// Whether the expression's result is a projection, whose elements are separate tokens.
    pub fn is_projection(&self) -> bool {
        self.projection
    }

    /// Evaluates in `scope`; `full` supplies the whole scope in jmespath form, and is called
    /// only when the expression reads the document other than through named members.
    fn evaluate<'v>(
        &self,
        scope: Scope<'v>,
        full: impl FnOnce() -> Rcvar,
    ) -> Result<Outcome<'v>, JmesPathError> {
        let mut ctx = Context::new(self.expression.as_str(), &RUNTIME);
        let result = if let Some(f) = &self.filter {
            // A projection over anything but an array is null.
            let Some(Value::Array(items)) = resolve(scope, &self.prefix) else {
                return Ok(Outcome::Json(None));
            };
            let mut selected = Vec::new();
            for item in items {
                let mut object = BTreeMap::new();
                for path in &f.predicate_paths {
                    if let Some(value) = resolve(Scope::Value(item), path) {
                        insert_path(&mut object, path, value);
                    }
                }
                let keep = jmespath::interpret(
                    &Arc::new(Variable::Object(object)),
                    &f.predicate,
                    &mut ctx,
                )
                .map_err(|e| JmesPathError::new(self.as_str(), &e))?;
                if keep.is_truthy()
                    && let Some(v) = resolve_chain(item, &f.then)
                    && !v.is_null()
                {
                    selected.push(v);
                }
            }
            return Ok(Outcome::Many(selected));
        } else if !self.prefix.is_empty() {
            let reached = resolve(scope, &self.prefix);
            if matches!(self.rest, jmespath::ast::Ast::Identity { .. }) {
                // A plain member chain: no interpreter, no conversion.
                return Ok(Outcome::Json(reached));
            }
            let data = reached.map_or_else(|| Arc::new(Variable::Null), to_var);
            jmespath::interpret(&data, &self.rest, &mut ctx)
        } else if let Some(paths) = &self.root_paths {
            // Only what the expression reads is converted; the rest of the event is not.
            let mut object = BTreeMap::new();
            for path in paths {
                if let Some(value) = resolve(scope, path) {
                    insert_path(&mut object, path, value);
                }
            }
            jmespath::interpret(
                &Arc::new(Variable::Object(object)),
                self.expression.as_ast(),
                &mut ctx,
            )
        } else {
            jmespath::interpret(&full(), self.expression.as_ast(), &mut ctx)
        };
        result
            .map(Outcome::Var)
            .map_err(|e| JmesPathError::new(self.as_str(), &e))
    }

    /// Evaluates in `scope`, in jmespath form; `full` supplies the whole scope when needed.
    pub fn search_in(
        &self,
        scope: Scope<'_>,
        full: impl FnOnce() -> Rcvar,
    ) -> Result<Rcvar, JmesPathError> {
        Ok(match self.evaluate(scope, full)? {
            Outcome::Json(v) => v.map_or_else(|| Arc::new(Variable::Null), to_var),
            Outcome::Many(items) => {
                Arc::new(Variable::Array(items.into_iter().map(to_var).collect()))
            }
            Outcome::Var(v) => v,
        })
    }

    /// The tokens `typeMatchExpression` selects: each element of a projection, or the one
    /// non-null result.
    pub fn select_in<'v>(
        &self,
        scope: Scope<'v>,
        full: impl FnOnce() -> Rcvar,
    ) -> Result<Vec<Cow<'v, Value>>, JmesPathError> {
        let result = match self.evaluate(scope, full)? {
            Outcome::Json(None | Some(Value::Null)) => return Ok(Vec::new()),
            Outcome::Json(Some(v)) => return Ok(vec![Cow::Borrowed(v)]),
            Outcome::Many(items) => return Ok(items.into_iter().map(Cow::Borrowed).collect()),
            Outcome::Var(v) => v,
        };
        Ok(match (&*result, self.projection) {
            (Variable::Null, _) => Vec::new(),
            (Variable::Array(items), true) => {
                items.iter().map(|v| Cow::Owned(from_var(v))).collect()
            }
            (_, _) => vec![Cow::Owned(from_var(&result))],
        })
    }

    /// The single token a value expression selects (`SelectToken`); a projection with more
    /// than one element is an error, as in MedTech.
    pub fn select_one_in(
        &self,
        scope: Scope<'_>,
        full: impl FnOnce() -> Rcvar,
    ) -> Result<Option<Value>, JmesPathSelectError> {
        let result = match self
            .evaluate(scope, full)
            .map_err(JmesPathSelectError::Eval)?
        {
            Outcome::Json(None | Some(Value::Null)) => return Ok(None),
            Outcome::Json(Some(v)) => return Ok(Some(v.clone())),
            Outcome::Many(items) => {
                return match items.as_slice() {
                    [] => Ok(None),
                    [one] => Ok(Some((*one).clone())),
                    _ => Err(JmesPathSelectError::Multiple),
                };
            }
            Outcome::Var(v) => v,
        };
        match (&*result, self.projection) {
            (Variable::Null, _) => Ok(None),
            (Variable::Array(items), true) => match items.len() {
                0 => Ok(None),
                1 => Ok(Some(from_var(&items[0]))),
                _ => Err(JmesPathSelectError::Multiple),
            },
            _ => Ok(Some(from_var(&result))),
        }
    }
}

/// What an evaluation produced: a JSON value reached directly, or an interpreter result.
enum Outcome<'v> {
    Json(Option<&'v Value>),
    /// The elements a filter projection selected.
    Many(Vec<&'v Value>),
    Var(Rcvar),
}

/// Recognises `[?predicate].chain` (after the member prefix) with a predicate that reads
/// only member paths of the element.
fn filter_projection(rest: &jmespath::ast::Ast) -> Option<FilterProjection> {
    use jmespath::ast::Ast;
    let Ast::Projection { lhs, rhs, .. } = rest else {
        return None;
    };
    let (
        Ast::Identity { .. },
        Ast::Condition {
            predicate, then, ..
        },
    ) = (&**lhs, &**rhs)
    else {
        return None;
    };
    let then = match &**then {
        Ast::Identity { .. } => Vec::new(),
        other => member_chain(other)?,
    };
    let mut predicate_paths = Vec::new();
    root_paths(predicate, &mut predicate_paths).then(|| FilterProjection {
        predicate: (**predicate).clone(),
        predicate_paths,
        then,
    })
}

fn resolve_chain<'v>(start: &'v Value, chain: &[String]) -> Option<&'v Value> {
    chain
        .iter()
        .try_fold(start, |cur, name| member(cur.as_object()?, name))
}

/// The value at a member path of the scope (`matchedToken` resolves to the matched token).
fn resolve<'v>(scope: Scope<'v>, path: &[String]) -> Option<&'v Value> {
    let (first, rest) = path.split_first()?;
    let start = match scope {
        Scope::Matched { token, .. } if first == "matchedToken" => token,
        Scope::Value(v) | Scope::Matched { envelope: v, .. } => member(v.as_object()?, first)?,
    };
    rest.iter()
        .try_fold(start, |cur, name| member(cur.as_object()?, name))
}

/// Places `value` at `path` in a tree of jmespath objects.
fn insert_path(map: &mut BTreeMap<String, Rcvar>, path: &[String], value: &Value) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        map.insert(first.clone(), to_var(value));
        return;
    }
    let entry = map
        .entry(first.clone())
        .or_insert_with(|| Arc::new(Variable::Object(BTreeMap::new())));
    if let Variable::Object(inner) = Arc::make_mut(entry) {
        insert_path(inner, rest, value);
    }
}

/// `a.b.c` as `["a", "b", "c"]`, if the expression is nothing but member names.
fn member_chain(ast: &jmespath::ast::Ast) -> Option<Vec<String>> {
    use jmespath::ast::Ast;
    match ast {
        Ast::Field { name, .. } => Some(vec![name.clone()]),
        Ast::Subexpr { lhs, rhs, .. } => {
            let mut chain = member_chain(lhs)?;
            chain.extend(member_chain(rhs)?);
            Some(chain)
        }
        _ => None,
    }
}

/// Collects the member paths `ast` reads from the document it is evaluated on; `false` when
/// it reads the document in any other way (`@`, `*`, an index on the root, ...).
fn root_paths(ast: &jmespath::ast::Ast, out: &mut Vec<Vec<String>>) -> bool {
    use jmespath::ast::Ast;
    if let Some(chain) = member_chain(ast) {
        out.push(chain);
        return true;
    }
    match ast {
        // The right side runs on what the left side produced, not on the document.
        Ast::Subexpr { lhs, .. } | Ast::Projection { lhs, .. } => root_paths(lhs, out),
        Ast::Function { args, .. } => args.iter().all(|a| root_paths(a, out)),
        Ast::Comparison { lhs, rhs, .. } | Ast::And { lhs, rhs, .. } | Ast::Or { lhs, rhs, .. } => {
            root_paths(lhs, out) && root_paths(rhs, out)
        }
        Ast::Condition {
            predicate, then, ..
        } => root_paths(predicate, out) && root_paths(then, out),
        Ast::Not { node, .. } | Ast::Flatten { node, .. } => root_paths(node, out),
        Ast::MultiList { elements, .. } => elements.iter().all(|e| root_paths(e, out)),
        Ast::MultiHash { elements, .. } => elements.iter().all(|kv| root_paths(&kv.value, out)),
        // An expression reference is applied to other values later.
        Ast::Literal { .. } | Ast::Expref { .. } => true,
        Ast::Field { .. }
        | Ast::Identity { .. }
        | Ast::ObjectValues { .. }
        | Ast::Index { .. }
        | Ast::Slice { .. } => false,
    }
}

/// Splits `a.b.rest` into `(["a", "b"], rest)`, where `rest` evaluated on the value of `a.b`
/// gives the same result as the whole expression on the document.
fn split_member_prefix(ast: &jmespath::ast::Ast) -> Option<(Vec<String>, jmespath::ast::Ast)> {
    use jmespath::ast::Ast;
    let identity = || Ast::Identity { offset: 0 };
    match ast {
        Ast::Field { name, .. } => Some((vec![name.clone()], identity())),
        Ast::Subexpr { offset, lhs, rhs } => {
            let (mut prefix, left_rest) = split_member_prefix(lhs)?;
            if !matches!(left_rest, Ast::Identity { .. }) {
                let rest = Ast::Subexpr {
                    offset: *offset,
                    lhs: Box::new(left_rest),
                    rhs: rhs.clone(),
                };
                return Some((prefix, rest));
            }
            match split_member_prefix(rhs) {
                Some((more, rest)) => {
                    prefix.extend(more);
                    Some((prefix, rest))
                }
                None => Some((prefix, (**rhs).clone())),
            }
        }
        Ast::Projection { offset, lhs, rhs } => {
            let (prefix, left_rest) = split_member_prefix(lhs)?;
            Some((
                prefix,
                Ast::Projection {
                    offset: *offset,
                    lhs: Box::new(left_rest),
                    rhs: rhs.clone(),
                },
            ))
        }
        Ast::Flatten { offset, node } => {
            let (prefix, rest) = split_member_prefix(node)?;
            Some((
                prefix,
                Ast::Flatten {
                    offset: *offset,
                    node: Box::new(rest),
                },
            ))
        }
        _ => None,
    }
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

/// Arity of every function the runtime knows: `(min, max)`, `max == None` for variadic.
fn arity(name: &str) -> Option<(usize, Option<usize>)> {
    Some(match name {
        "abs"
        | "avg"
        | "ceil"
        | "floor"
        | "keys"
        | "length"
        | "max"
        | "min"
        | "reverse"
        | "sort"
        | "sum"
        | "to_array"
        | "to_number"
        | "to_string"
        | "type"
        | "values"
        | "fromUnixTimestamp"
        | "fromUnixTimestampMs" => (1, Some(1)),
        "contains" | "ends_with" | "join" | "map" | "max_by" | "min_by" | "sort_by"
        | "starts_with" | "add" | "subtract" | "multiply" | "divide" | "pow" => (2, Some(2)),
        "insertString" => (3, Some(3)),
        "merge" | "not_null" => (1, None),
        _ => return None,
    })
}

/// MedTech's JMESPath engine rejects unknown functions and wrong argument counts when the
/// template loads; the jmespath crate would only notice while evaluating a message.
fn check_functions(ast: &jmespath::ast::Ast) -> Result<(), String> {
    use jmespath::ast::Ast;
    match ast {
        Ast::Function { name, args, .. } => {
            let Some((min, max)) = arity(name) else {
                return Err(format!("no function named {name} is available"));
            };
            let n = args.len();
            if n < min || max.is_some_and(|max| n > max) {
                let expected = match max {
                    Some(max) if max == min => format!("{min}"),
                    _ => format!("at least {min}"),
                };
                return Err(format!(
                    "the function {name} expects {expected} argument(s) but {n} were supplied"
                ));
            }
            args.iter().try_for_each(check_functions)
        }
        Ast::Comparison { lhs, rhs, .. }
        | Ast::Projection { lhs, rhs, .. }
        | Ast::And { lhs, rhs, .. }
        | Ast::Or { lhs, rhs, .. }
        | Ast::Subexpr { lhs, rhs, .. } => {
            check_functions(lhs)?;
            check_functions(rhs)
        }
        Ast::Condition {
            predicate, then, ..
        } => {
            check_functions(predicate)?;
            check_functions(then)
        }
        Ast::Expref { ast, .. } => check_functions(ast),
        Ast::Flatten { node, .. } | Ast::Not { node, .. } | Ast::ObjectValues { node, .. } => {
            check_functions(node)
        }
        Ast::MultiList { elements, .. } => elements.iter().try_for_each(check_functions),
        Ast::MultiHash { elements, .. } => elements
            .iter()
            .try_for_each(|kv| check_functions(&kv.value)),
        Ast::Identity { .. }
        | Ast::Field { .. }
        | Ast::Index { .. }
        | Ast::Literal { .. }
        | Ast::Slice { .. } => Ok(()),
    }
}

fn is_projection(ast: &jmespath::ast::Ast) -> bool {
    use jmespath::ast::Ast;
    match ast {
        Ast::Projection { .. } | Ast::Flatten { .. } | Ast::ObjectValues { .. } => true,
        Ast::Subexpr { rhs, .. } => is_projection(rhs),
        _ => false,
    }
}

/// Converts a JSON value into the jmespath tree.
pub fn to_var(value: &Value) -> Rcvar {
    Arc::new(match value {
        Value::Null => Variable::Null,
        Value::Bool(b) => Variable::Bool(*b),
        Value::Number(n) => Variable::Number(n.clone()),
        Value::String(s) => Variable::String(s.clone()),
        Value::Array(a) => Variable::Array(a.iter().map(to_var).collect()),
        Value::Object(m) => {
            Variable::Object(m.iter().map(|(k, v)| (k.clone(), to_var(v))).collect())
        }
    })
}

/// Builds the CalculatedContent scope: the converted event with `matchedToken` set.
pub fn with_matched_token(envelope: &Rcvar, token: Rcvar) -> Rcvar {
    let mut map = match &**envelope {
        Variable::Object(m) => m.clone(),
        _ => Default::default(),
    };
    map.insert("matchedToken".to_owned(), token);
    Arc::new(Variable::Object(map))
}

/// Converts a jmespath result back into JSON.
pub fn from_var(var: &Variable) -> Value {
    match var {
        Variable::Null => Value::Null,
        Variable::Bool(b) => Value::Bool(*b),
        Variable::Number(n) => Value::Number(n.clone()),
        Variable::String(s) => Value::String(s.clone()),
        Variable::Array(a) => Value::Array(a.iter().map(|v| from_var(v)).collect()),
        Variable::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), from_var(v))).collect())
        }
        Variable::Expref(_) => Value::Null,
    }
}

fn runtime_error(ctx: &Context<'_>, message: String) -> JmespathError {
    JmespathError::from_ctx(ctx, ErrorReason::Parse(message))
}

enum Num {
    Int(i64),
    Float(f64),
}

fn num(var: &Rcvar) -> Num {
    match &**var {
        Variable::Number(n) => match n.as_i64() {
            Some(i) => Num::Int(i),
            None => Num::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        _ => Num::Float(f64::NAN),
    }
}

fn float_var(ctx: &Context<'_>, name: &str, f: f64) -> jmespath::SearchResult {
    Number::from_f64(f)
        .map(|n| Arc::new(Variable::Number(n)))
        .ok_or_else(|| runtime_error(ctx, format!("{name}: the result is not a finite number")))
}

fn as_f64(n: &Num) -> f64 {
    match *n {
        Num::Int(i) => i as f64,
        Num::Float(f) => f,
    }
}

fn arith(
    sig: Signature,
    name: &'static str,
    int_op: fn(i64, i64) -> Option<i64>,
    float_op: fn(f64, f64) -> f64,
) -> Box<CustomFunction> {
    Box::new(CustomFunction::new(
        sig,
        Box::new(move |args: &[Rcvar], ctx: &mut Context<'_>| {
            match (num(&args[0]), num(&args[1])) {
                (Num::Int(a), Num::Int(b)) => {
                    // .NET integer arithmetic is unchecked: overflow wraps.
                    let wrapped = int_op(a, b).unwrap_or_else(|| match name {
                        "add" => a.wrapping_add(b),
                        "subtract" => a.wrapping_sub(b),
                        _ => a.wrapping_mul(b),
                    });
                    Ok(Arc::new(Variable::Number(wrapped.into())))
                }
                (a, b) => float_var(ctx, name, float_op(as_f64(&a), as_f64(&b))),
            }
        }),
    ))
}

fn divide(args: &[Rcvar], ctx: &mut Context<'_>) -> jmespath::SearchResult {
    match (num(&args[0]), num(&args[1])) {
        (Num::Int(_), Num::Int(0)) => Err(runtime_error(ctx, "divide: division by zero".into())),
        (Num::Int(a), Num::Int(b)) => a
            .checked_div(b)
            .map(|q| Arc::new(Variable::Number(q.into())))
            .ok_or_else(|| {
                runtime_error(ctx, "divide: the result overflows a 64-bit integer".into())
            }),
        (a, b) => float_var(ctx, "divide", as_f64(&a) / as_f64(&b)),
    }
}

fn pow(args: &[Rcvar], ctx: &mut Context<'_>) -> jmespath::SearchResult {
    let (a, b) = (num(&args[0]), num(&args[1]));
    let both_int = matches!((&a, &b), (Num::Int(_), Num::Int(_)));
    let result = as_f64(&a).powf(as_f64(&b));
    if both_int {
        // .NET converts the double back to a 64-bit integer with rounding and overflow checks.
        let rounded = result.round_ties_even();
        if !rounded.is_finite() || rounded < i64::MIN as f64 || rounded >= i64::MAX as f64 {
            return Err(runtime_error(
                ctx,
                "pow: the result overflows a 64-bit integer".into(),
            ));
        }
        return Ok(Arc::new(Variable::Number((rounded as i64).into())));
    }
    float_var(ctx, "pow", result)
}

fn insert_string(args: &[Rcvar], ctx: &mut Context<'_>) -> jmespath::SearchResult {
    let (Variable::String(s), Variable::String(ins)) = (&*args[0], &*args[1]) else {
        return Err(runtime_error(
            ctx,
            "insertString expects two strings and a position".into(),
        ));
    };
    let pos = match num(&args[2]) {
        Num::Int(i) => i,
        Num::Float(f) if f.fract() == 0.0 => f as i64,
        Num::Float(_) => {
            return Err(runtime_error(
                ctx,
                "insertString: the position must be an integer".into(),
            ));
        }
    };
    let len = s.chars().count();
    let Some(pos) = usize::try_from(pos).ok().filter(|p| *p <= len) else {
        return Err(runtime_error(
            ctx,
            format!("insertString: position {pos} is outside the string (length {len})"),
        ));
    };
    let byte = s.char_indices().nth(pos).map_or(s.len(), |(b, _)| b);
    let mut out = String::with_capacity(s.len() + ins.len());
    out.push_str(&s[..byte]);
    out.push_str(ins);
    out.push_str(&s[byte..]);
    Ok(Arc::new(Variable::String(out)))
}

fn from_unix(
    args: &[Rcvar],
    ctx: &mut Context<'_>,
    millis_per_unit: i64,
) -> jmespath::SearchResult {
    // MedTech accepts only integer arguments here.
    let Num::Int(units) = num(&args[0]) else {
        return Err(runtime_error(
            ctx,
            "fromUnixTimestamp expects an integer".into(),
        ));
    };
    let ts = units
        .checked_mul(millis_per_unit)
        .and_then(Timestamp::from_unix_millis)
        .ok_or_else(|| runtime_error(ctx, "fromUnixTimestamp: the value is out of range".into()))?;
    // A date token in .NET; an ISO string here, which the timestamp and value conversions
    // treat exactly like a date token.
    Ok(Arc::new(Variable::String(ts.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(expr: &str, data: Value) -> Result<Value, JmesPathError> {
        let e = JmesPath::compile(expr)?;
        e.search_in(Scope::Value(&data), || to_var(&data))
            .map(|r| from_var(&r))
    }

    #[test]
    fn custom_arithmetic_follows_dotnet_typing() {
        assert_eq!(eval("add(`1`, `2`)", json!(null)).unwrap(), json!(3));
        assert_eq!(eval("divide(`7`, `2`)", json!(null)).unwrap(), json!(3));
        assert_eq!(eval("divide(`7.0`, `2`)", json!(null)).unwrap(), json!(3.5));
        assert_eq!(
            eval("multiply(to_number('72'), `0.0254`)", json!(null)).unwrap(),
            json!(72.0 * 0.0254)
        );
        assert_eq!(eval("subtract(`5`, `7`)", json!(null)).unwrap(), json!(-2));
        assert_eq!(eval("pow(`2`, `10`)", json!(null)).unwrap(), json!(1024));
        assert_eq!(
            eval("pow(`2.0`, `0.5`)", json!(null)).unwrap(),
            json!(2f64.sqrt())
        );
        assert_eq!(
            eval("add(`9223372036854775807`, `1`)", json!(null)).unwrap(),
            json!(i64::MIN)
        );
        assert!(eval("divide(`1`, `0`)", json!(null)).is_err());
        assert!(eval("pow(`10`, `30`)", json!(null)).is_err());
        assert!(eval("add('a', `1`)", json!(null)).is_err());
    }

    #[test]
    fn strings_and_times() {
        assert_eq!(
            eval("insertString('abcd', '-', `2`)", json!(null)).unwrap(),
            json!("ab-cd")
        );
        assert!(eval("insertString('ab', '-', `3`)", json!(null)).is_err());
        assert_eq!(
            eval("fromUnixTimestamp(`1549061161`)", json!(null)).unwrap(),
            json!("2019-02-01T22:46:01Z")
        );
        assert_eq!(
            eval("fromUnixTimestampMs(`1549061161875`)", json!(null)).unwrap(),
            json!("2019-02-01T22:46:01.875Z")
        );
    }

    #[test]
    fn projections_yield_each_element() {
        let doc = json!({"Body": [{"hr": 1}, {"hr": 2}, {"x": 3}]});
        let scope = Scope::Value(&doc);
        let full = || to_var(&doc);
        let e = JmesPath::compile("Body[?hr]").unwrap();
        assert!(e.is_projection());
        assert_eq!(e.select_in(scope, full).unwrap().len(), 2);
        let e = JmesPath::compile("to_array(@.Body) | [? hr].hr").unwrap();
        assert!(e.is_projection());
        let got: Vec<Value> = e
            .select_in(scope, full)
            .unwrap()
            .into_iter()
            .map(Cow::into_owned)
            .collect();
        assert_eq!(got, vec![json!(1), json!(2)]);
        let e = JmesPath::compile("Body").unwrap();
        assert!(!e.is_projection());
        assert_eq!(e.select_in(scope, full).unwrap().len(), 1);
        let e = JmesPath::compile("Body[*].hr").unwrap();
        assert!(matches!(
            e.select_one_in(scope, full),
            Err(JmesPathSelectError::Multiple)
        ));
        let e = JmesPath::compile("missing").unwrap();
        assert!(e.select_in(scope, full).unwrap().is_empty());
    }

    #[test]
    fn member_prefix_split_gives_the_same_results() {
        let doc = json!({
            "Body": {"a": {"b": [{"c": 1, "d": [1, 2]}, {"c": 2, "d": [3]}, {"e": 0}]}, "n": null, "s": "x"},
            "matchedToken": {"v": 5}
        });
        let exprs = [
            "Body.a.b[*].c",
            "Body.a.b[?c].d[]",
            "Body.a.b[0].c",
            "Body.a.b | [1]",
            "Body.a.b[*].c | [0]",
            "Body.missing.x",
            "Body.n.x",
            "Body.s.x",
            "Body.a.b[].d",
            "Body.a.*",
            "Body",
            "Body.a.b[-1]",
            "Body.a.b[?c > `1`].c",
            "matchedToken.v",
            "length(Body.a.b)",
            "Body.a.b[0].d[1]",
            "add(matchedToken.v, `1`)",
            "[Body.s, matchedToken.v]",
            "{x: Body.s}",
            "Body.s == 'x' && matchedToken.v",
            "not_null(Body.missing, matchedToken.v)",
            "sort_by(Body.a.b[?c], &c)[0].c",
            "keys(@)",
            "to_array(@)[0].Body.s",
            "length(Body.a.b[0].d)",
            "[Body.a.b[0].c, Body.a]",
            "type(Body.n)",
            "Body.a.b[0].c.x",
            "Body.a.b[?c]",
            "Body.a.b[?c].d",
            "Body.a.b[?c == `2`]",
            "Body.a.b[?!c]",
            "Body.a.b[?e || c > `1`].c",
            "Body.a[?c]",
            "Body.missing[?c]",
            "Body.a.b[?d[0]]",
            "Body.a.b[?length(d) > `1`]",
            "Body.a.b[?c].missing",
        ];
        for text in exprs {
            let e = JmesPath::compile(text).unwrap();
            let fast = e
                .search_in(Scope::Value(&doc), || to_var(&doc))
                .map(|r| from_var(&r));
            let mut ctx = Context::new(text, &RUNTIME);
            let slow = jmespath::interpret(&to_var(&doc), e.expression.as_ast(), &mut ctx)
                .map(|r| from_var(&r));
            assert_eq!(fast.ok(), slow.ok(), "{text}");
        }
    }

    #[test]
    fn compile_errors() {
        assert!(JmesPath::compile("Body[?").is_err());
        assert!(JmesPath::compile("nosuchfunction(@)").is_err());
        assert!(JmesPath::compile("add(`1`)").is_err());
        assert!(JmesPath::compile("Body[?starts_with(a)]").is_err());
        assert!(JmesPath::compile("not_null(a, b, c)").is_ok());
    }
}
