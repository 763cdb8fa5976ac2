//! What template expressions select: JSON values as Newtonsoft.Json's `JToken` model sees them.
//!
//! MedTech evaluates every expression over `JToken`s, and two things about that model change
//! results, so they are modelled here rather than in each expression language:
//!
//! * strings shaped like dates are **date tokens** ([`JsonDate`]): not equal to any string, and
//!   read as `MM/dd/yyyy HH:mm:ss` wherever .NET asks for their text;
//! * integers and doubles are different token types (`1` and `1.0` are not deep-equal), and
//!   .NET's conversions decide what a comparison of mixed types means.
//!
//! Event documents stay `serde_json::Value`s and are borrowed ([`Token::Json`]); a string in
//! them is classified as a date only when something looks at it. JMESPath results that are
//! computed (arrays, strings, numbers, dates from `fromUnixTimestamp`) are owned tokens.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::rc::Rc;

use iomt_core::{JsonDate, Timestamp};
use serde_json::{Map, Number, Value};

use super::dotnet;

/// One token selected or computed by an expression.
#[derive(Debug, Clone)]
pub enum Token<'a> {
    /// A null made by evaluation (a missing member, an index out of range, a function that
    /// returned nothing). JmesPath.Net shares one null token for these, and projections leave
    /// exactly that token out; a JSON `null` of the document is kept.
    Null,
    /// A node of the event or of a JSON literal; its strings may be date tokens.
    Json(&'a Value),
    /// The CalculatedContent scope: the event with `matchedToken` set to the matched token.
    Matched {
        /// The event envelope.
        envelope: &'a Value,
        /// What `typeMatchExpression` selected.
        token: &'a Value,
    },
    /// A computed boolean.
    Bool(bool),
    /// A computed integer (`JTokenType.Integer`).
    Int(i64),
    /// A computed double (`JTokenType.Float`).
    Float(f64),
    /// A string that is never a date: a raw string literal in an expression.
    Str(&'a str),
    /// A computed string; never a date.
    Text(Rc<str>),
    /// A computed date (`fromUnixTimestamp`).
    Date(JsonDate),
    /// A computed array.
    Array(Rc<[Token<'a>]>),
    /// A computed object, in member order.
    Object(Rc<[(String, Token<'a>)]>),
}

/// The type of a scalar token, with its value; arrays and objects are only named.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind<'t> {
    /// `null`, from the document or from evaluation.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A double (or an integer beyond the 64-bit range).
    Float(f64),
    /// A string that is not a date token.
    Str(&'t str),
    /// A date token.
    Date(JsonDate),
    /// An array.
    Array,
    /// An object.
    Object,
}

/// A token .NET cannot convert to what the template needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversionError(pub String);

/// A comparison that throws in .NET (`JValue.CompareTo` with types it cannot convert); the
/// message names the types, never the values, which may be patient data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CompareError(pub String);

fn json_kind(v: &Value) -> Kind<'_> {
    match v {
        Value::Null => Kind::Null,
        Value::Bool(b) => Kind::Bool(*b),
        Value::Number(n) => number_kind(n),
        Value::String(s) => JsonDate::parse(s).map_or(Kind::Str(s), Kind::Date),
        Value::Array(_) => Kind::Array,
        Value::Object(_) => Kind::Object,
    }
}

fn number_kind(n: &Number) -> Kind<'static> {
    match n.as_i64() {
        Some(i) => Kind::Int(i),
        None => Kind::Float(n.as_f64().unwrap_or(f64::NAN)),
    }
}

impl<'a> Token<'a> {
    /// The token's type and scalar value.
    pub fn kind(&self) -> Kind<'_> {
        match self {
            Token::Null => Kind::Null,
            Token::Json(v) => json_kind(v),
            Token::Matched { .. } | Token::Object(_) => Kind::Object,
            Token::Bool(b) => Kind::Bool(*b),
            Token::Int(i) => Kind::Int(*i),
            Token::Float(f) => Kind::Float(*f),
            Token::Str(s) => Kind::Str(s),
            Token::Text(s) => Kind::Str(s),
            Token::Date(d) => Kind::Date(*d),
            Token::Array(_) => Kind::Array,
        }
    }

    /// JmesPath.Net's type name (`GetTokenType`): dates are strings.
    pub fn type_name(&self) -> &'static str {
        match self.kind() {
            Kind::Null => "null",
            Kind::Bool(_) => "boolean",
            Kind::Int(_) | Kind::Float(_) => "number",
            Kind::Str(_) | Kind::Date(_) => "string",
            Kind::Array => "array",
            Kind::Object => "object",
        }
    }

    /// Whether the token is null, whoever made it.
    pub fn is_null(&self) -> bool {
        matches!(self, Token::Null | Token::Json(Value::Null))
    }

    /// JMESPath falsiness (`JTokens.IsFalse`): null, `false`, and empty strings, arrays and
    /// objects. A date is never empty.
    pub fn is_false(&self) -> bool {
        match self.kind() {
            Kind::Null => true,
            Kind::Bool(b) => !b,
            Kind::Str(s) => s.is_empty(),
            Kind::Array | Kind::Object => self.size() == Some(0),
            Kind::Int(_) | Kind::Float(_) | Kind::Date(_) => false,
        }
    }

    /// The number of elements or members of an array or object.
    pub fn size(&self) -> Option<usize> {
        match self {
            Token::Json(Value::Array(a)) => Some(a.len()),
            Token::Json(Value::Object(m)) => Some(m.len()),
            Token::Matched { envelope, .. } => Some(
                envelope
                    .as_object()
                    .map_or(0, |m| m.len() + usize::from(!m.contains_key(MATCHED))),
            ),
            Token::Array(a) => Some(a.len()),
            Token::Object(m) => Some(m.len()),
            _ => None,
        }
    }

    /// The elements of an array.
    pub fn elements(&self) -> Option<Vec<Token<'a>>> {
        match self {
            Token::Json(Value::Array(a)) => Some(a.iter().map(Token::Json).collect()),
            Token::Array(a) => Some(a.to_vec()),
            _ => None,
        }
    }

    /// The `i`-th element of an array.
    pub fn element(&self, i: usize) -> Option<Token<'a>> {
        match self {
            Token::Json(Value::Array(a)) => a.get(i).map(Token::Json),
            Token::Array(a) => a.get(i).cloned(),
            _ => None,
        }
    }

    /// The value of an object's member, if the token is an object that has it.
    pub fn member(&self, name: &str) -> Option<Token<'a>> {
        match self {
            Token::Json(Value::Object(m)) => super::jsonpath::member(m, name).map(Token::Json),
            Token::Matched { token, .. } if name == MATCHED => Some(Token::Json(token)),
            Token::Matched { envelope, .. } => envelope
                .as_object()
                .and_then(|m| super::jsonpath::member(m, name))
                .map(Token::Json),
            Token::Object(m) => m.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
            _ => None,
        }
    }

    /// The members of an object, in order.
    pub fn members(&self) -> Option<Vec<(String, Token<'a>)>> {
        match self {
            Token::Json(Value::Object(m)) => {
                Some(m.iter().map(|(k, v)| (k.clone(), Token::Json(v))).collect())
            }
            Token::Matched { envelope, token } => {
                // MedTech removes `matchedToken` and adds it again: it is always the last member.
                let mut out: Vec<(String, Token<'a>)> = envelope
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| *k != MATCHED)
                    .map(|(k, v)| (k.clone(), Token::Json(v)))
                    .collect();
                out.push((MATCHED.to_owned(), Token::Json(token)));
                Some(out)
            }
            Token::Object(m) => Some(m.to_vec()),
            _ => None,
        }
    }

    /// The token as JSON; a date becomes its ISO text, which reads back as the same date.
    pub fn to_json(&self) -> Cow<'a, Value> {
        match self {
            Token::Null => Cow::Owned(Value::Null),
            Token::Json(v) => Cow::Borrowed(*v),
            Token::Matched { .. } | Token::Object(_) => Cow::Owned(Value::Object(
                self.members()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.to_json().into_owned()))
                    .collect::<Map<_, _>>(),
            )),
            Token::Bool(b) => Cow::Owned(Value::Bool(*b)),
            Token::Int(i) => Cow::Owned(Value::from(*i)),
            Token::Float(f) => Cow::Owned(Number::from_f64(*f).map_or(Value::Null, Value::Number)),
            Token::Str(s) => Cow::Owned(Value::String((*s).to_owned())),
            Token::Text(s) => Cow::Owned(Value::String(s.to_string())),
            Token::Date(d) => Cow::Owned(Value::String(d.to_iso_string())),
            Token::Array(a) => Cow::Owned(Value::Array(
                a.iter().map(|t| t.to_json().into_owned()).collect(),
            )),
        }
    }

    /// `Value<string>()`: `Ok(None)` for null. Booleans print as `True`/`False`, numbers in
    /// invariant form, dates as `MM/dd/yyyy HH:mm:ss`; arrays and objects cannot be converted.
    pub fn value_string(&self) -> Result<Option<Cow<'_, str>>, ConversionError> {
        Ok(Some(match self.kind() {
            Kind::Null => return Ok(None),
            Kind::Bool(true) => Cow::Borrowed("True"),
            Kind::Bool(false) => Cow::Borrowed("False"),
            Kind::Int(i) => Cow::Owned(i.to_string()),
            Kind::Float(_) => Cow::Owned(match self {
                // An integer beyond 64 bits keeps its digits.
                Token::Json(Value::Number(n)) if n.is_u64() => n.to_string(),
                _ => dotnet::double(self.as_f64().unwrap_or(f64::NAN)),
            }),
            Kind::Str(_) => match self {
                Token::Json(Value::String(s)) => Cow::Borrowed(s.as_str()),
                Token::Str(s) => Cow::Borrowed(*s),
                Token::Text(s) => Cow::Borrowed(&**s),
                _ => Cow::Borrowed(""),
            },
            Kind::Date(d) => Cow::Owned(d.to_invariant_string()),
            Kind::Array => {
                return Err(ConversionError(
                    "the expression selected an array, not a single value".into(),
                ));
            }
            Kind::Object => {
                return Err(ConversionError(
                    "the expression selected an object, not a single value".into(),
                ));
            }
        }))
    }

    /// `Value<DateTime?>()`: `Ok(None)` for null. A date token is that date; a string is read
    /// the way `DateTime.Parse` reads it; numbers and booleans cannot be converted.
    pub fn value_timestamp(&self) -> Result<Option<Timestamp>, ConversionError> {
        match self.kind() {
            Kind::Null => Ok(None),
            Kind::Date(d) => Ok(Some(d.instant)),
            Kind::Str(s) => Timestamp::parse(s)
                .map(Some)
                .map_err(|e| ConversionError(e.to_string())),
            Kind::Int(_) | Kind::Float(_) => Err(ConversionError(format!(
                "the number {} is not a date and time (MedTech reads only date strings; convert epoch values with the JMESPath function fromUnixTimestamp or fromUnixTimestampMs)",
                self.value_string().ok().flatten().unwrap_or_default()
            ))),
            Kind::Bool(_) => Err(ConversionError("a boolean is not a date and time".into())),
            Kind::Array => Err(ConversionError(
                "the expression selected an array, not a date and time".into(),
            )),
            Kind::Object => Err(ConversionError(
                "the expression selected an object, not a date and time".into(),
            )),
        }
    }

    /// The number as a double, for numbers.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Token::Json(Value::Number(n)) => n.as_f64(),
            _ => match self.kind() {
                Kind::Int(i) => Some(i as f64),
                Kind::Float(f) => Some(f),
                _ => None,
            },
        }
    }

    /// `JToken.DeepEquals`: scalars of the same type with equal values (doubles within
    /// Newtonsoft's tolerance, dates as instants), arrays element by element, objects member
    /// by member in any order.
    pub fn deep_equals(&self, other: &Token<'_>) -> bool {
        match (self.kind(), other.kind()) {
            (Kind::Array, Kind::Array) => {
                let (a, b) = (self.elements(), other.elements());
                a.zip(b).is_some_and(|(a, b)| {
                    a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.deep_equals(y))
                })
            }
            (Kind::Object, Kind::Object) => {
                let (Some(a), Some(b)) = (self.members(), other.members()) else {
                    return false;
                };
                a.len() == b.len()
                    && a.iter().all(|(k, v)| {
                        b.iter()
                            .find(|(bk, _)| bk == k)
                            .is_some_and(|(_, bv)| v.deep_equals(bv))
                    })
            }
            (a, b) => values_equal(a, b),
        }
    }

    /// Compact JSON as Newtonsoft's `JsonTextWriter` writes it (JmesPath.Net's `to_string`):
    /// doubles keep a decimal point (`2.0`, `1E-05`), dates are ISO strings, and the escapes
    /// are Newtonsoft's.
    pub fn write_json(&self, out: &mut String) {
        match self.kind() {
            Kind::Null => out.push_str("null"),
            Kind::Bool(b) => out.push_str(if b { "true" } else { "false" }),
            Kind::Int(i) => out.push_str(&i.to_string()),
            Kind::Float(_) => match self {
                Token::Json(Value::Number(n)) if n.is_u64() => out.push_str(&n.to_string()),
                _ => {
                    let text = dotnet::double(self.as_f64().unwrap_or(f64::NAN));
                    let plain = !text.contains(['.', 'E', 'N', 'I']);
                    out.push_str(&text);
                    if plain {
                        out.push_str(".0");
                    }
                }
            },
            Kind::Str(s) => write_json_string(s, out),
            Kind::Date(d) => write_json_string(&d.to_iso_string(), out),
            Kind::Array => {
                out.push('[');
                for (i, e) in self.elements().unwrap_or_default().iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    e.write_json(out);
                }
                out.push(']');
            }
            Kind::Object => {
                out.push('{');
                for (i, (k, v)) in self.members().unwrap_or_default().iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_json_string(k, out);
                    out.push(':');
                    v.write_json(out);
                }
                out.push('}');
            }
        }
    }
}

const MATCHED: &str = "matchedToken";

/// Newtonsoft's default string escaping: control characters, the quote, the backslash, and
/// U+0085, U+2028 and U+2029; hexadecimal in lower case.
fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || matches!(c, '\u{85}' | '\u{2028}' | '\u{2029}') => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `JValue.ValuesEquals`: the same token type and a comparison of zero.
pub(crate) fn values_equal(a: Kind<'_>, b: Kind<'_>) -> bool {
    let same_type = matches!(
        (a, b),
        (Kind::Null, Kind::Null)
            | (Kind::Bool(_), Kind::Bool(_))
            | (Kind::Int(_), Kind::Int(_))
            | (Kind::Float(_), Kind::Float(_))
            | (Kind::Str(_), Kind::Str(_))
            | (Kind::Date(_), Kind::Date(_))
    );
    same_type && compare_kinds(a, b) == Ok(Ordering::Equal)
}

/// Newtonsoft's `MathUtils.ApproxEquals`, which `JValue` uses for every double comparison.
fn approx_equals(a: f64, b: f64) -> bool {
    if a == b {
        return true;
    }
    let tolerance = (a.abs() + b.abs() + 10.0) * f64::EPSILON;
    let diff = a - b;
    -tolerance < diff && tolerance > diff
}

fn compare_doubles(a: f64, b: f64) -> Ordering {
    if approx_equals(a, b) {
        return Ordering::Equal;
    }
    // `double.CompareTo`: NaN sorts first and equals itself.
    a.partial_cmp(&b)
        .unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()).reverse())
}

fn to_double(k: Kind<'_>) -> Result<f64, CompareError> {
    match k {
        Kind::Int(i) => Ok(i as f64),
        Kind::Float(f) => Ok(f),
        Kind::Bool(b) => Ok(f64::from(u8::from(b))),
        Kind::Str(s) => dotnet::parse_double(s, true).ok_or_else(|| {
            CompareError("a string that is not a number was compared with a number".into())
        }),
        _ => Err(CompareError("a date was compared with a number".into())),
    }
}

fn to_int64(k: Kind<'_>) -> Result<i64, CompareError> {
    match k {
        Kind::Int(i) => Ok(i),
        Kind::Bool(b) => Ok(i64::from(b)),
        Kind::Str(s) => dotnet::parse_int64(s).ok_or_else(|| {
            CompareError("a string that is not an integer was compared with an integer".into())
        }),
        _ => Err(CompareError("a date was compared with a number".into())),
    }
}

fn to_bool(k: Kind<'_>) -> Result<bool, CompareError> {
    match k {
        Kind::Bool(b) => Ok(b),
        Kind::Int(i) => Ok(i != 0),
        Kind::Float(f) => Ok(f != 0.0),
        Kind::Str(s) if s.trim().eq_ignore_ascii_case("true") => Ok(true),
        Kind::Str(s) if s.trim().eq_ignore_ascii_case("false") => Ok(false),
        _ => Err(CompareError(
            "a value that is not a boolean was compared with a boolean".into(),
        )),
    }
}

/// `JValue.CompareTo`: the comparison type is the left token's, unless the left token is a
/// string and the right one is not, and the other side is converted to it the way .NET's
/// `Convert` does. Null sorts first. Conversions .NET refuses are errors, as they are thrown
/// in MedTech.
pub fn compare_kinds(a: Kind<'_>, b: Kind<'_>) -> Result<Ordering, CompareError> {
    match (a, b) {
        (Kind::Null, Kind::Null) => return Ok(Ordering::Equal),
        (_, Kind::Null) => return Ok(Ordering::Greater),
        (Kind::Null, _) => return Ok(Ordering::Less),
        (Kind::Array | Kind::Object, _) | (_, Kind::Array | Kind::Object) => {
            return Err(CompareError("an array or object cannot be ordered".into()));
        }
        _ => {}
    }
    let comparison = match (a, b) {
        (Kind::Str(_), Kind::Str(_)) | (Kind::Str(_), _) => b,
        _ => a,
    };
    match comparison {
        Kind::Int(_) => {
            if matches!(a, Kind::Float(_)) || matches!(b, Kind::Float(_)) {
                Ok(compare_doubles(to_double(a)?, to_double(b)?))
            } else {
                Ok(to_int64(a)?.cmp(&to_int64(b)?))
            }
        }
        Kind::Float(_) => Ok(compare_doubles(to_double(a)?, to_double(b)?)),
        Kind::Str(_) => match (a, b) {
            (Kind::Str(x), Kind::Str(y)) => Ok(dotnet::cmp_ordinal(x, y)),
            _ => Err(CompareError("incomparable strings".into())),
        },
        Kind::Bool(_) => Ok(to_bool(a)?.cmp(&to_bool(b)?)),
        Kind::Date(_) => {
            let Kind::Date(left) = a else {
                return Err(CompareError(
                    "a value that is not a date was compared with a date".into(),
                ));
            };
            let right = match b {
                Kind::Date(d) => d.instant,
                Kind::Str(s) => Timestamp::parse(s).map_err(|_| {
                    CompareError("a date was compared with a string that is not a date".into())
                })?,
                _ => {
                    return Err(CompareError(
                        "a date was compared with a value that is not a date".into(),
                    ));
                }
            };
            Ok(left.instant.cmp(&right))
        }
        Kind::Null | Kind::Array | Kind::Object => Ok(Ordering::Equal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn k(v: &Value) -> Kind<'_> {
        json_kind(v)
    }

    #[test]
    fn date_strings_are_date_tokens() {
        let v = json!("2024-03-05T09:00:00Z");
        let t = Token::Json(&v);
        assert!(matches!(t.kind(), Kind::Date(_)));
        assert_eq!(t.type_name(), "string");
        assert_eq!(t.value_string().unwrap().unwrap(), "03/05/2024 09:00:00");
        assert!(!Token::Str("2024-03-05T09:00:00Z").deep_equals(&t));
        let other = json!("2024-03-05T09:00:00.000Z");
        assert!(t.deep_equals(&Token::Json(&other)));
    }

    #[test]
    fn newtonsoft_comparisons() {
        let (one, one_f, two_s, abc) = (json!(1), json!(1.0), json!("2"), json!("abc"));
        assert!(!values_equal(k(&one), k(&one_f)));
        assert_eq!(compare_kinds(k(&one), k(&one_f)), Ok(Ordering::Equal));
        assert_eq!(compare_kinds(k(&two_s), k(&one)), Ok(Ordering::Greater));
        assert!(compare_kinds(k(&one), k(&abc)).is_err());
        let date = json!("2024-03-05T09:00:00Z");
        assert_eq!(
            compare_kinds(k(&date), Kind::Str("2024-03-05 09:20")),
            Ok(Ordering::Less)
        );
        assert!(compare_kinds(Kind::Str("2024-03-05 09:20"), k(&date)).is_err());
        assert!(compare_kinds(k(&date), Kind::Str("soon")).is_err());
        assert_eq!(compare_kinds(Kind::Null, k(&date)), Ok(Ordering::Less));
    }

    #[test]
    fn json_text_like_newtonsoft() {
        let v = json!({"a": [1, 2.0, 1e-5, "x\u{2028}\"", null, true], "t": "2024-03-05T09:00:00.500Z"});
        let mut out = String::new();
        Token::Json(&v).write_json(&mut out);
        assert_eq!(
            out,
            r#"{"a":[1,2.0,1E-05,"x\u2028\"",null,true],"t":"2024-03-05T09:00:00.5Z"}"#
        );
    }
}
