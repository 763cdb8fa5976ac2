//! The functions JmesPath.Net 1.0.205 registers, and MedTech's, with their .NET behaviour:
//! argument checks, result types, and what they do with date tokens.

use std::cmp::Ordering;
use std::rc::Rc;

use iomt_core::{JsonDate, Timestamp};

use super::eval::{Eval, EvalError, Evaluator, FnArg};
use crate::expr::dotnet;
use crate::expr::token::{Kind, Token, compare_kinds};

/// A function an expression can call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Function {
    Abs,
    Avg,
    Ceil,
    Contains,
    EndsWith,
    Floor,
    Join,
    Keys,
    Length,
    Map,
    Max,
    MaxBy,
    Merge,
    Min,
    MinBy,
    NotNull,
    Reverse,
    Sort,
    SortBy,
    StartsWith,
    Sum,
    ToArray,
    ToNumber,
    ToString,
    Type,
    Values,
    Add,
    Subtract,
    Multiply,
    Divide,
    Pow,
    InsertString,
    FromUnixTimestamp,
    FromUnixTimestampMs,
}

fn fail<T>(message: impl Into<String>) -> Eval<T> {
    Err(EvalError(message.into()))
}

impl Function {
    pub(crate) fn by_name(name: &str) -> Option<Self> {
        use Function::*;
        Some(match name {
            "abs" => Abs,
            "avg" => Avg,
            "ceil" => Ceil,
            "contains" => Contains,
            "ends_with" => EndsWith,
            "floor" => Floor,
            "join" => Join,
            "keys" => Keys,
            "length" => Length,
            "map" => Map,
            "max" => Max,
            "max_by" => MaxBy,
            "merge" => Merge,
            "min" => Min,
            "min_by" => MinBy,
            "not_null" => NotNull,
            "reverse" => Reverse,
            "sort" => Sort,
            "sort_by" => SortBy,
            "starts_with" => StartsWith,
            "sum" => Sum,
            "to_array" => ToArray,
            "to_number" => ToNumber,
            "to_string" => ToString,
            "type" => Type,
            "values" => Values,
            "add" => Add,
            "subtract" => Subtract,
            "multiply" => Multiply,
            "divide" => Divide,
            "pow" => Pow,
            "insertString" => InsertString,
            "fromUnixTimestamp" => FromUnixTimestamp,
            "fromUnixTimestampMs" => FromUnixTimestampMs,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        use Function::*;
        match self {
            Abs => "abs",
            Avg => "avg",
            Ceil => "ceil",
            Contains => "contains",
            EndsWith => "ends_with",
            Floor => "floor",
            Join => "join",
            Keys => "keys",
            Length => "length",
            Map => "map",
            Max => "max",
            MaxBy => "max_by",
            Merge => "merge",
            Min => "min",
            MinBy => "min_by",
            NotNull => "not_null",
            Reverse => "reverse",
            Sort => "sort",
            SortBy => "sort_by",
            StartsWith => "starts_with",
            Sum => "sum",
            ToArray => "to_array",
            ToNumber => "to_number",
            ToString => "to_string",
            Type => "type",
            Values => "values",
            Add => "add",
            Subtract => "subtract",
            Multiply => "multiply",
            Divide => "divide",
            Pow => "pow",
            InsertString => "insertString",
            FromUnixTimestamp => "fromUnixTimestamp",
            FromUnixTimestampMs => "fromUnixTimestampMs",
        }
    }

    /// The argument count, and whether more may follow.
    pub(crate) fn arity(self) -> (usize, bool) {
        use Function::*;
        match self {
            Merge | NotNull => (1, true),
            Contains | EndsWith | Join | Map | MaxBy | MinBy | SortBy | StartsWith | Add
            | Subtract | Multiply | Divide | Pow => (2, false),
            InsertString => (3, false),
            _ => (1, false),
        }
    }

    pub(crate) fn call<'a>(self, ev: &Evaluator, args: Vec<FnArg<'a>>) -> Eval<Token<'a>> {
        use Function::*;
        let name = self.name();
        // Functions that take expression references first.
        match self {
            Map | MaxBy | MinBy | SortBy => return self.call_with_expref(ev, args),
            _ => {}
        }
        let mut tokens = Vec::with_capacity(args.len());
        for arg in args {
            match arg {
                FnArg::Token(t) => tokens.push(t),
                FnArg::Expref(_) => {
                    return fail(format!(
                        "unexpected expression type as a parameter to the function {name}"
                    ));
                }
            }
        }
        let t = &tokens;
        Ok(match self {
            Abs => match t[0].kind() {
                Kind::Int(i) => {
                    let i = i32::try_from(i).ok().and_then(i32::checked_abs);
                    match i {
                        Some(i) => Token::Int(i64::from(i)),
                        None => return fail("abs: the value overflows a 32-bit integer"),
                    }
                }
                Kind::Float(f) => Token::Float(f.abs()),
                _ => return fail("function abs only accepts numbers"),
            },
            Avg => {
                let numbers = numbers(name, &t[0])?;
                if numbers.is_empty() {
                    Token::Null
                } else {
                    Token::Float(numbers.iter().sum::<f64>() / numbers.len() as f64)
                }
            }
            Ceil | Floor => {
                let Some(f) = number_arg(&t[0]) else {
                    return fail(format!("function {name} only accepts numbers"));
                };
                let r = if self == Ceil { f.ceil() } else { f.floor() };
                match dotnet::to_int64(r) {
                    Some(i) => Token::Int(i),
                    None => return fail(format!("{name}: the value overflows a 64-bit integer")),
                }
            }
            Contains => contains(&t[0], &t[1])?,
            StartsWith | EndsWith => {
                let (Some(text), pattern) = (string_text(&t[0]), &t[1]) else {
                    return fail(format!("both arguments to function {name} must be strings"));
                };
                let pattern = match pattern.kind() {
                    Kind::Null => {
                        return fail(format!("{name}: the value cannot be null"));
                    }
                    _ => match string_text(pattern) {
                        Some(p) => p,
                        None => {
                            return fail(format!(
                                "both arguments to function {name} must be strings"
                            ));
                        }
                    },
                };
                Token::Bool(if self == StartsWith {
                    text.starts_with(pattern.as_str())
                } else {
                    text.ends_with(pattern.as_str())
                })
            }
            Join => {
                let (Some(separator), Some(items)) = (string_text(&t[0]), t[1].elements()) else {
                    return fail(
                        "function join expects a string separator and an array of strings",
                    );
                };
                let mut parts = Vec::with_capacity(items.len());
                for item in &items {
                    match string_text(item) {
                        Some(s) => parts.push(s),
                        None => return fail("function join expects an array of string"),
                    }
                }
                text(parts.join(&separator))
            }
            Keys => match t[0].members() {
                Some(members) => Token::Array(members.into_iter().map(|(k, _)| text(k)).collect()),
                None => return fail("function keys expects an object"),
            },
            Values => match t[0].members() {
                Some(members) => Token::Array(members.into_iter().map(|(_, v)| v).collect()),
                None => return fail("function values expects an object"),
            },
            Length => match (string_text(&t[0]), t[0].size()) {
                (Some(s), _) => Token::Int(s.encode_utf16().count() as i64),
                (None, Some(n)) => Token::Int(n as i64),
                _ => {
                    return fail("function length expects either an object, an array or a string");
                }
            },
            Max | Min => min_or_max(self, &t[0])?,
            Merge => {
                let mut merged = Vec::new();
                for arg in t {
                    let Some(members) = arg.members() else {
                        return fail("function merge expects objects");
                    };
                    merge(&mut merged, members);
                }
                Token::Object(merged.into())
            }
            NotNull => t
                .iter()
                .find(|v| !v.is_null())
                .cloned()
                .unwrap_or(Token::Null),
            Reverse => match (string_text(&t[0]), t[0].elements()) {
                (Some(s), _) => text(s.chars().rev().collect::<String>()),
                (None, Some(mut items)) => {
                    items.reverse();
                    Token::Array(items.into())
                }
                _ => return fail("function reverse accepts either an array or a string"),
            },
            Sort => sort(&t[0])?,
            Sum => {
                let numbers = numbers(name, &t[0])?;
                if numbers.is_empty() {
                    Token::Int(0)
                } else {
                    let sum: f64 = numbers.iter().sum();
                    // JmesPath.Net's `IsInteger`: a whole sum is an integer token.
                    if (sum % 1.0).abs() <= f64::EPSILON * 100.0 {
                        match dotnet::to_int64(sum) {
                            Some(i) => Token::Int(i),
                            None => return fail("sum: the value overflows a 64-bit integer"),
                        }
                    } else {
                        Token::Float(sum)
                    }
                }
            }
            ToArray => match t[0].kind() {
                Kind::Array => t[0].clone(),
                _ => Token::Array(Rc::from([t[0].clone()])),
            },
            ToNumber => match t[0].kind() {
                Kind::Int(_) | Kind::Float(_) => t[0].clone(),
                Kind::Str(_) | Kind::Date(_) => {
                    let s = string_text(&t[0]).unwrap_or_default();
                    if let Some(i) = dotnet::parse_int64(&s) {
                        Token::Int(i)
                    } else if let Some(f) = dotnet::parse_double(&s, false) {
                        Token::Float(f)
                    } else {
                        Token::Null
                    }
                }
                _ => Token::Null,
            },
            ToString => match t[0].kind() {
                // A string stays the token it is: a date stays a date.
                Kind::Str(_) | Kind::Date(_) => t[0].clone(),
                _ => {
                    let mut out = String::new();
                    t[0].write_json(&mut out);
                    text(out)
                }
            },
            Type => Token::Str(t[0].type_name()),
            Add | Subtract | Multiply | Divide | Pow => arithmetic(self, &t[0], &t[1])?,
            InsertString => insert_string(&t[0], &t[1], &t[2])?,
            FromUnixTimestamp | FromUnixTimestampMs => {
                let Kind::Int(n) = t[0].kind() else {
                    return fail(format!(
                        "function {name} expects argument 0 to be one of the following: Integer"
                    ));
                };
                let millis = if self == FromUnixTimestamp {
                    n.checked_mul(1000)
                } else {
                    Some(n)
                };
                // DateTimeOffset's range: years 1 to 9999.
                match millis
                    .filter(|m| (-62_135_596_800_000..=253_402_300_799_999).contains(m))
                    .and_then(Timestamp::from_unix_millis)
                {
                    Some(ts) => Token::Date(JsonDate::from(ts.as_datetime())),
                    None => return fail(format!("{name}: the value is out of range")),
                }
            }
            Map | MaxBy | MinBy | SortBy => Token::Null,
        })
    }

    fn call_with_expref<'a>(self, ev: &Evaluator, mut args: Vec<FnArg<'a>>) -> Eval<Token<'a>> {
        let name = self.name();
        let (array, expression) = match (self, args.remove(0), args.remove(0)) {
            (Function::Map, FnArg::Expref(e), FnArg::Token(a)) => (a, e),
            (Function::Map, _, _) => {
                return fail("function map expects an expression type and then an array");
            }
            (_, FnArg::Token(a), FnArg::Expref(e)) => (a, e),
            _ => {
                return fail(format!(
                    "function {name} expects an array and then an expression type"
                ));
            }
        };
        let Some(items) = array.elements() else {
            return fail(format!("function {name} expects an array"));
        };
        let key = |item: &Token<'a>| ev.eval(expression, item).map(|r| r.into_token());
        match self {
            Function::Map => Ok(Token::Array(
                items.iter().map(key).collect::<Eval<Rc<[_]>>>()?,
            )),
            Function::SortBy => {
                let mut keyed = Vec::with_capacity(items.len());
                let mut expected = None;
                for item in items {
                    let k = key(&item)?;
                    let t = k.type_name();
                    if t != "number" && t != "string" {
                        return fail(format!(
                            "the expression argument of function {name} should return a number or a string"
                        ));
                    }
                    if *expected.get_or_insert(t) != t {
                        return fail(format!(
                            "all items resulting from the evaluation of the expression argument of function {name} should have the same type"
                        ));
                    }
                    keyed.push((k, item));
                }
                let mut error = None;
                keyed.sort_by(|(a, _), (b, _)| {
                    compare_kinds(a.kind(), b.kind()).unwrap_or_else(|e| {
                        error.get_or_insert(e);
                        Ordering::Equal
                    })
                });
                if let Some(e) = error {
                    return fail(format!("{name}: {e}"));
                }
                Ok(Token::Array(keyed.into_iter().map(|(_, v)| v).collect()))
            }
            _ => {
                // `Aggregate`: the first element when alone, otherwise pairwise, keys read as
                // doubles (numeric strings included).
                let mut items = items.into_iter();
                let Some(mut best) = items.next() else {
                    return fail(format!("{name}: the array is empty"));
                };
                let number_key = |item: &Token<'a>| -> Eval<f64> {
                    let k = key(item)?;
                    match k.kind() {
                        Kind::Int(_) | Kind::Float(_) => Ok(k.as_f64().unwrap_or(f64::NAN)),
                        Kind::Str(_) | Kind::Date(_) => string_text(&k)
                            .and_then(|s| dotnet::parse_double(&s, true))
                            .ok_or_else(|| {
                                EvalError(format!(
                                    "when evaluating the expression argument of function {name}, some items could not be cast to a number"
                                ))
                            }),
                        _ => fail(format!(
                            "the expression argument of function {name} should return a number or a string"
                        )),
                    }
                };
                for item in items {
                    let (left, right) = (number_key(&best)?, number_key(&item)?);
                    let left_wins = if self == Function::MaxBy {
                        left > right
                    } else {
                        left < right
                    };
                    if !left_wins {
                        best = item;
                    }
                }
                Ok(best)
            }
        }
    }
}

fn text<'a>(s: impl Into<Rc<str>>) -> Token<'a> {
    Token::Text(s.into())
}

/// The text of a string-typed token (`Value<string>()`): strings, and dates as
/// `MM/dd/yyyy HH:mm:ss`.
fn string_text(t: &Token<'_>) -> Option<String> {
    match t.kind() {
        Kind::Str(s) => Some(s.to_owned()),
        Kind::Date(d) => Some(d.to_invariant_string()),
        _ => None,
    }
}

fn number_arg(t: &Token<'_>) -> Option<f64> {
    matches!(t.kind(), Kind::Int(_) | Kind::Float(_))
        .then(|| t.as_f64())
        .flatten()
}

/// `EnsureArrayOf(argument, "number")`, as doubles.
fn numbers(name: &str, t: &Token<'_>) -> Eval<Vec<f64>> {
    let Some(items) = t.elements() else {
        return fail(format!("function {name} expects an array"));
    };
    items
        .iter()
        .map(|i| {
            number_arg(i)
                .ok_or_else(|| EvalError(format!("function {name} expects an array of number")))
        })
        .collect()
}

/// `contains`: a string subject (not a date) searched ordinally for the other argument's text,
/// or an array searched for a deep-equal element.
fn contains<'a>(subject: &Token<'_>, search: &Token<'_>) -> Eval<Token<'a>> {
    match subject.kind() {
        Kind::Array => {
            let found = subject
                .elements()
                .unwrap_or_default()
                .iter()
                .any(|e| e.deep_equals(search));
            Ok(Token::Bool(found))
        }
        Kind::Str(s) => match search.value_string() {
            Ok(Some(needle)) => Ok(Token::Bool(s.contains(&*needle))),
            Ok(None) => fail("contains: the value cannot be null"),
            Err(_) => fail("contains: an array or object cannot be searched for in a string"),
        },
        // A date passes the type check as a string, but is not a string token.
        Kind::Date(_) => Ok(Token::Bool(false)),
        _ => fail("function contains expects either an array or a string"),
    }
}

/// `max` and `min`: numbers (integers stay integers when all are), or strings, which come back
/// as their text.
fn min_or_max<'a>(function: Function, t: &Token<'_>) -> Eval<Token<'a>> {
    let name = function.name();
    let Some(items) = t.elements() else {
        return fail(format!("function {name} expects an array"));
    };
    let Some(first) = items.first() else {
        return Ok(Token::Null);
    };
    let kind = first.type_name();
    if items.iter().any(|i| i.type_name() != kind) {
        return fail(format!(
            "all items in the array to the function {name} must have the same type"
        ));
    }
    let pick = |ord: Ordering| {
        if function == Function::Max {
            ord == Ordering::Greater
        } else {
            ord == Ordering::Less
        }
    };
    match kind {
        "number" if items.iter().all(|i| matches!(i.kind(), Kind::Int(_))) => {
            let ints = items.iter().filter_map(|i| match i.kind() {
                Kind::Int(n) => Some(n),
                _ => None,
            });
            let best = if function == Function::Max {
                ints.max()
            } else {
                ints.min()
            };
            Ok(best.map_or(Token::Null, Token::Int))
        }
        "number" => {
            let mut best = f64::NAN;
            for (i, f) in items.iter().filter_map(Token::as_f64).enumerate() {
                if i == 0 || pick(f.total_cmp(&best)) {
                    best = f;
                }
            }
            Ok(Token::Float(best))
        }
        "string" => {
            let mut best: Option<String> = None;
            for s in items.iter().filter_map(string_text) {
                if best
                    .as_deref()
                    .is_none_or(|b| pick(dotnet::cmp_ordinal(&s, b)))
                {
                    best = Some(s);
                }
            }
            Ok(best.map_or(Token::Null, text))
        }
        _ => fail(format!(
            "function {name} expects an array of number or string"
        )),
    }
}

/// `sort`: ordered by the first element's type (doubles, 32-bit integers, or text), stable.
fn sort<'a>(t: &Token<'a>) -> Eval<Token<'a>> {
    let Some(items) = t.elements() else {
        return fail("function sort expects an array");
    };
    let Some(first) = items.first() else {
        return Ok(Token::Array(Rc::from([])));
    };
    if items.iter().any(|i| i.type_name() != first.type_name()) {
        return fail("all items in the array to the function sort must have the same type");
    }
    #[derive(PartialEq, PartialOrd)]
    enum Key {
        Number(f64),
        Text(Option<String>),
    }
    let key = |i: &Token<'a>| -> Eval<Key> {
        Ok(match first.kind() {
            Kind::Float(_) => Key::Number(i.as_f64().unwrap_or(f64::NAN)),
            Kind::Int(_) => {
                // `Value<int>()`: doubles round to even, and anything beyond 32 bits throws.
                let f = i.as_f64().unwrap_or(f64::NAN).round_ties_even();
                if !(f64::from(i32::MIN)..=f64::from(i32::MAX)).contains(&f) {
                    return fail("sort: a value overflows a 32-bit integer");
                }
                Key::Number(f)
            }
            _ => Key::Text(
                i.value_string()
                    .map_err(|e| EvalError(format!("sort: {}", e.0)))?
                    .map(|s| s.into_owned()),
            ),
        })
    };
    let mut keyed = items
        .iter()
        .map(|i| Ok((key(i)?, i.clone())))
        .collect::<Eval<Vec<_>>>()?;
    keyed.sort_by(|(a, _), (b, _)| match (a, b) {
        (Key::Number(x), Key::Number(y)) => x.total_cmp(y),
        (Key::Text(x), Key::Text(y)) => match (x, y) {
            (Some(x), Some(y)) => dotnet::cmp_ordinal(x, y),
            (x, y) => x.is_some().cmp(&y.is_some()),
        },
        _ => Ordering::Equal,
    });
    Ok(Token::Array(keyed.into_iter().map(|(_, v)| v).collect()))
}

/// `JObject.Merge` with default settings: nested objects merge, arrays concatenate, a null
/// never replaces a value.
fn merge<'a>(into: &mut Vec<(String, Token<'a>)>, members: Vec<(String, Token<'a>)>) {
    for (key, value) in members {
        let Some(slot) = into.iter_mut().find(|(k, _)| *k == key) else {
            into.push((key, value));
            continue;
        };
        let existing = &mut slot.1;
        match (existing.kind(), value.kind()) {
            (Kind::Object, Kind::Object) => {
                let mut inner = existing.members().unwrap_or_default();
                merge(&mut inner, value.members().unwrap_or_default());
                *existing = Token::Object(inner.into());
            }
            (Kind::Array, Kind::Array) => {
                let mut inner = existing.elements().unwrap_or_default();
                inner.extend(value.elements().unwrap_or_default());
                *existing = Token::Array(inner.into());
            }
            (_, Kind::Null) => {}
            _ => *existing = value,
        }
    }
}

/// MedTech's arithmetic: two integers give 64-bit integer arithmetic (wrapping, as C# does
/// unchecked; `divide` truncates), anything else double arithmetic.
fn arithmetic<'a>(f: Function, a: &Token<'_>, b: &Token<'_>) -> Eval<Token<'a>> {
    let name = f.name();
    let operand = |t: &Token<'_>, pos: usize| match t.kind() {
        Kind::Int(i) => Ok(Some(i)),
        Kind::Float(_) => Ok(None),
        _ => fail(format!(
            "function {name} expects argument {pos} to be one of the following: Integer|Float"
        )),
    };
    match (operand(a, 0)?, operand(b, 1)?) {
        (Some(x), Some(y)) => Ok(Token::Int(match f {
            Function::Add => x.wrapping_add(y),
            Function::Subtract => x.wrapping_sub(y),
            Function::Multiply => x.wrapping_mul(y),
            Function::Divide if y == 0 => return fail("divide: division by zero"),
            Function::Divide => match x.checked_div(y) {
                Some(q) => q,
                None => return fail("divide: the result overflows a 64-bit integer"),
            },
            _ => match dotnet::to_int64((x as f64).powf(y as f64)) {
                Some(p) => p,
                None => return fail("pow: the result overflows a 64-bit integer"),
            },
        })),
        _ => {
            let (x, y) = (
                a.as_f64().unwrap_or(f64::NAN),
                b.as_f64().unwrap_or(f64::NAN),
            );
            Ok(Token::Float(match f {
                Function::Add => x + y,
                Function::Subtract => x - y,
                Function::Multiply => x * y,
                Function::Divide => x / y,
                _ => x.powf(y),
            }))
        }
    }
}

/// `insertString(text, insert, position)`: both strings must be string tokens (a date is
/// refused), the position an integer within the text, counted in UTF-16 units.
fn insert_string<'a>(s: &Token<'_>, ins: &Token<'_>, pos: &Token<'_>) -> Eval<Token<'a>> {
    let expects = |pos: usize, ty: &str| {
        fail(format!(
            "function insertString expects argument {pos} to be one of the following: {ty}"
        ))
    };
    let Kind::Str(s) = s.kind() else {
        return expects(0, "String");
    };
    let Kind::Str(ins) = ins.kind() else {
        return expects(1, "String");
    };
    let Kind::Int(pos) = pos.kind() else {
        return expects(2, "Integer");
    };
    let units: Vec<u16> = s.encode_utf16().collect();
    let Some(at) = usize::try_from(pos).ok().filter(|p| *p <= units.len()) else {
        return fail(format!(
            "insertString: position {pos} is outside the string (length {})",
            units.len()
        ));
    };
    let mut out = units[..at].to_vec();
    out.extend(ins.encode_utf16());
    out.extend_from_slice(&units[at..]);
    Ok(text(String::from_utf16_lossy(&out)))
}
