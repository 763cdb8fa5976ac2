//! The interpreter, following JmesPath.Net's evaluation model: a result is one token or a
//! projection, and an expression applied to a projection applies to each of its elements.

use std::cmp::Ordering;
use std::rc::Rc;

use jmespath::ast::Comparator;

use super::{Node, Source};
use crate::expr::dotnet;
use crate::expr::token::{Kind, Token};

/// Why an evaluation failed: JmesPath.Net threw.
#[derive(Debug, Clone)]
pub(crate) struct EvalError(pub(crate) String);

pub(crate) type Eval<T> = Result<T, EvalError>;

/// A result: one token, or the elements of a projection (`JmesPathArgument`).
#[derive(Debug, Clone)]
pub(crate) enum Arg<'a> {
    Token(Token<'a>),
    Projection(Vec<Arg<'a>>),
}

impl<'a> Arg<'a> {
    /// `AsJToken`: a projection becomes an array of its elements.
    pub(crate) fn into_token(self) -> Token<'a> {
        match self {
            Arg::Token(t) => t,
            Arg::Projection(items) => {
                Token::Array(items.into_iter().map(Arg::into_token).collect::<Rc<[_]>>())
            }
        }
    }

    /// Falsiness of the result as one token: a projection is false when it is empty.
    fn is_false(&self) -> bool {
        match self {
            Arg::Token(t) => t.is_false(),
            Arg::Projection(items) => items.is_empty(),
        }
    }

    /// Whether a projection keeps this element: everything but the null evaluation makes.
    fn kept(&self) -> bool {
        !matches!(self, Arg::Token(Token::Null))
    }
}

/// One argument of a function call.
pub(crate) enum FnArg<'a> {
    Token(Token<'a>),
    Expref(&'a Node),
}

/// The evaluator; stateless, one per call.
pub(crate) struct Evaluator;

impl Evaluator {
    pub(crate) fn eval<'a>(&self, node: &'a Node, input: &Token<'a>) -> Eval<Arg<'a>> {
        Ok(match node {
            Node::Identity => Arg::Token(input.clone()),
            Node::Field(name) => Arg::Token(input.member(name).unwrap_or(Token::Null)),
            Node::Index(i) => Arg::Token(index(input, *i).unwrap_or(Token::Null)),
            Node::Literal(v) => Arg::Token(Token::Json(v)),
            Node::Raw(s) => Arg::Token(Token::Str(s)),
            Node::Sub(lhs, rhs) => {
                let left = self.eval(lhs, input)?;
                if matches!(&left, Arg::Token(t) if t.is_null()) {
                    return Ok(left);
                }
                self.apply(rhs, left)?
            }
            Node::Pipe(lhs, rhs) => {
                let left = self.eval(lhs, input)?.into_token();
                self.eval(rhs, &left)?
            }
            Node::Project(source, links) => {
                let mut items = match self.source(source, input)? {
                    Ok(items) => items,
                    Err(result) => return Ok(result),
                };
                for link in links {
                    let mut next = Vec::with_capacity(items.len());
                    for item in items {
                        let out = self.apply(link, item)?;
                        if out.kept() {
                            next.push(out);
                        }
                    }
                    items = next;
                }
                Arg::Projection(items)
            }
            Node::MultiList(elements) => Arg::Token(Token::Array(
                elements
                    .iter()
                    .map(|e| Ok(self.eval(e, input)?.into_token()))
                    .collect::<Eval<Rc<[_]>>>()?,
            )),
            Node::MultiHash(pairs) => {
                let mut members: Vec<(String, Token<'a>)> = Vec::with_capacity(pairs.len());
                for (key, value) in pairs {
                    if members.iter().any(|(k, _)| k == key) {
                        return Err(EvalError(format!(
                            "the multi-select hash names the key {key} twice"
                        )));
                    }
                    members.push((key.clone(), self.eval(value, input)?.into_token()));
                }
                Arg::Token(Token::Object(members.into()))
            }
            Node::Not(inner) => Arg::Token(Token::Bool(self.eval(inner, input)?.is_false())),
            Node::And(lhs, rhs) => {
                let left = self.eval(lhs, input)?;
                if left.is_false() {
                    left
                } else {
                    self.eval(rhs, input)?
                }
            }
            Node::Or(lhs, rhs) => {
                let left = self.eval(lhs, input)?;
                if left.is_false() {
                    self.eval(rhs, input)?
                } else {
                    left
                }
            }
            Node::Compare(op, lhs, rhs) => {
                let left = self.eval(lhs, input)?.into_token();
                let right = self.eval(rhs, input)?.into_token();
                Arg::Token(compare(op, &left, &right))
            }
            Node::Call(function, args) => {
                let mut values = Vec::with_capacity(args.len());
                for arg in args {
                    values.push(match arg {
                        Node::Expref(inner) => FnArg::Expref(inner),
                        other => FnArg::Token(self.eval(other, input)?.into_token()),
                    });
                }
                Arg::Token(function.call(self, values)?)
            }
            // An expression reference is only meaningful as a function argument.
            Node::Expref(_) => Arg::Token(Token::Null),
        })
    }

    /// Applies `node` to a result: to the token, or to each element of a projection, leaving
    /// out the elements that become evaluation nulls.
    pub(crate) fn apply<'a>(&self, node: &'a Node, arg: Arg<'a>) -> Eval<Arg<'a>> {
        match arg {
            Arg::Token(t) => self.eval(node, &t),
            Arg::Projection(items) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    let r = self.apply(node, item)?;
                    if r.kept() {
                        out.push(r);
                    }
                }
                Ok(Arg::Projection(out))
            }
        }
    }

    /// The elements a projection starts from, or (`Err`) the result when there are none: a
    /// null left side is the result itself, anything but an array (or object) gives null.
    fn source<'a>(
        &self,
        source: &'a Source,
        input: &Token<'a>,
    ) -> Eval<Result<Vec<Arg<'a>>, Arg<'a>>> {
        let base = match source {
            Source::List(lhs)
            | Source::Values(lhs)
            | Source::Flatten(lhs)
            | Source::Filter(lhs, _) => self.eval(lhs, input)?,
            Source::Slice(..) => Arg::Token(input.clone()),
        };
        if matches!(&base, Arg::Token(t) if t.is_null()) {
            return Ok(Err(base));
        }
        let null = || Ok(Err(Arg::Token(Token::Null)));
        Ok(Ok(match source {
            Source::List(_) => match base {
                Arg::Projection(items) => items,
                Arg::Token(t) => match t.elements() {
                    Some(elements) => elements
                        .into_iter()
                        .filter(|e| !e.is_null())
                        .map(Arg::Token)
                        .collect(),
                    None => return null(),
                },
            },
            Source::Values(_) => match base {
                Arg::Projection(items) => items,
                Arg::Token(t) => match t.members() {
                    Some(members) => members.into_iter().map(|(_, v)| Arg::Token(v)).collect(),
                    None => return null(),
                },
            },
            Source::Flatten(_) => {
                let Some(elements) = base.into_token().elements() else {
                    return null();
                };
                let mut items = Vec::with_capacity(elements.len());
                for e in elements {
                    match e.elements() {
                        Some(nested) => items
                            .extend(nested.into_iter().filter(|n| !n.is_null()).map(Arg::Token)),
                        None if e.is_null() => {}
                        None => items.push(Arg::Token(e)),
                    }
                }
                items
            }
            Source::Slice(start, stop, step) => {
                let Some(elements) = base.into_token().elements() else {
                    return null();
                };
                slice(&elements, *start, *stop, *step)
                    .into_iter()
                    .map(Arg::Token)
                    .collect()
            }
            Source::Filter(_, predicate) => {
                let Some(elements) = base.into_token().elements() else {
                    return null();
                };
                let mut items = Vec::new();
                for e in elements {
                    if !self.eval(predicate, &e)?.is_false() {
                        items.push(Arg::Token(e));
                    }
                }
                items
            }
        }))
    }
}

fn index<'a>(input: &Token<'a>, i: i32) -> Option<Token<'a>> {
    if input.kind() != Kind::Array {
        return None;
    }
    let len = input.size()? as i64;
    let i = if i < 0 {
        len + i64::from(i)
    } else {
        i64::from(i)
    };
    input.element(usize::try_from(i).ok()?)
}

/// JmesPath.Net's slice: negative bounds count from the end, out-of-range indices are skipped.
fn slice<'a>(
    elements: &[Token<'a>],
    start: Option<i32>,
    stop: Option<i32>,
    step: i32,
) -> Vec<Token<'a>> {
    let len = elements.len() as i64;
    let step = i64::from(step);
    let start = match start {
        Some(s) if s < 0 => len + i64::from(s),
        Some(s) => i64::from(s),
        None if step > 0 => 0,
        None => len - 1,
    };
    let stop = match stop {
        Some(s) if s < 0 => len + i64::from(s),
        Some(s) => i64::from(s),
        None if step > 0 => len,
        None => -1,
    };
    let mut out = Vec::new();
    let mut i = start;
    while if step > 0 { i < stop } else { i > stop } {
        if (0..len).contains(&i) {
            out.push(elements[i as usize].clone());
        }
        i += step;
    }
    out
}

/// `==` and `!=` are `JToken.DeepEquals`; the orderings compare numbers as doubles and
/// strings (dates by their invariant text, null as the smallest string) ordinally, and are
/// null for anything else.
fn compare<'a>(op: &Comparator, left: &Token<'_>, right: &Token<'_>) -> Token<'a> {
    let ordering = match op {
        Comparator::Equal => return Token::Bool(left.deep_equals(right)),
        Comparator::NotEqual => return Token::Bool(!left.deep_equals(right)),
        _ => op,
    };
    let number = |t: &Token<'_>| match t.kind() {
        Kind::Int(_) | Kind::Float(_) => t.as_f64(),
        _ => None,
    };
    if let (Some(a), Some(b)) = (number(left), number(right)) {
        return Token::Bool(match ordering {
            Comparator::LessThan => a < b,
            Comparator::LessThanEqual => a <= b,
            Comparator::GreaterThan => a > b,
            _ => a >= b,
        });
    }
    let string = |t: &Token<'_>| -> Option<Option<String>> {
        match t.kind() {
            Kind::Null => Some(None),
            Kind::Str(s) => Some(Some(s.to_owned())),
            Kind::Date(d) => Some(Some(d.to_invariant_string())),
            _ => None,
        }
    };
    let (Some(a), Some(b)) = (string(left), string(right)) else {
        return Token::Null;
    };
    let cmp = |a: &str, b: Option<&str>| b.map_or(Ordering::Greater, |b| dotnet::cmp_ordinal(a, b));
    Token::Bool(match (ordering, a.as_deref()) {
        (Comparator::LessThan, None) => b.is_some(),
        (Comparator::LessThanEqual, None) => true,
        (Comparator::GreaterThan, None) => false,
        (_, None) => b.is_none(),
        (Comparator::LessThan, Some(a)) => cmp(a, b.as_deref()) == Ordering::Less,
        (Comparator::LessThanEqual, Some(a)) => cmp(a, b.as_deref()) != Ordering::Greater,
        (Comparator::GreaterThan, Some(a)) => cmp(a, b.as_deref()) == Ordering::Greater,
        (_, Some(a)) => cmp(a, b.as_deref()) != Ordering::Less,
    })
}
