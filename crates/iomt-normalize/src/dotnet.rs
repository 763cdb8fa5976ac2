//! How .NET turns JSON tokens into the strings MedTech stores.
//!
//! Measurement values are strings, produced by Newtonsoft's `Value<string>()`, which is
//! `Convert.ChangeType(value, string, InvariantCulture)`. Matching its output exactly matters
//! because these strings end up in FHIR resources and identifiers.

use iomt_core::Timestamp;
use serde_json::{Number, Value};

/// Why a token could not become a string or a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConversionError(pub(crate) String);

/// `Value<string>()`: `Ok(None)` for null and blank strings.
///
/// * booleans print as `True` / `False`;
/// * numbers print in invariant culture, doubles as the shortest round-trip text;
/// * strings that Newtonsoft would have parsed as dates (`2019-02-01T22:46:01Z`) print as the
///   invariant `DateTime` text `02/01/2019 22:46:01`;
/// * objects and arrays cannot be converted.
pub(crate) fn to_string(value: &Value) -> Result<Option<String>, ConversionError> {
    match value {
        Value::Null => Ok(None),
        Value::Bool(true) => Ok(Some("True".to_owned())),
        Value::Bool(false) => Ok(Some("False".to_owned())),
        Value::Number(n) => Ok(Some(number(n))),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => Ok(Some(match Timestamp::parse_json_date(s) {
            Some(ts) => ts.to_invariant_string(),
            None => s.clone(),
        })),
        Value::Object(_) => Err(ConversionError(
            "the expression selected an object, not a single value".into(),
        )),
        Value::Array(_) => Err(ConversionError(
            "the expression selected an array, not a single value".into(),
        )),
    }
}

/// `Value<DateTime?>()`: `Ok(None)` for null and blank strings.
pub(crate) fn to_timestamp(value: &Value) -> Result<Option<Timestamp>, ConversionError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => Timestamp::parse(s)
            .map(Some)
            .map_err(|e| ConversionError(e.to_string())),
        Value::Number(n) => Err(ConversionError(format!(
            "the number {n} is not a date and time (MedTech reads only date strings; convert epoch values with the JMESPath function fromUnixTimestamp or fromUnixTimestampMs)"
        ))),
        Value::Bool(b) => Err(ConversionError(format!(
            "the boolean {b} is not a date and time"
        ))),
        Value::Object(_) => Err(ConversionError(
            "the expression selected an object, not a date and time".into(),
        )),
        Value::Array(_) => Err(ConversionError(
            "the expression selected an array, not a date and time".into(),
        )),
    }
}

fn number(n: &Number) -> String {
    if let Some(i) = n.as_i64() {
        i.to_string()
    } else if let Some(u) = n.as_u64() {
        u.to_string()
    } else {
        double(n.as_f64().unwrap_or(f64::NAN))
    }
}

/// `double.ToString(CultureInfo.InvariantCulture)` on .NET Core 3.0 and later: the shortest
/// text that round-trips, in fixed notation for decimal exponents from -4 to 14 and in
/// scientific notation (`1E+15`, `1E-05`) outside that range.
pub(crate) fn double(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0" } else { "0" }.to_owned();
    }
    // Rust's `{:e}` prints the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if !(-4..15).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{first}{frac}E{exp_sign}{:02}", exp.abs());
    }
    let point = exp + 1;
    if point <= 0 {
        format!(
            "{sign}0.{}{digits}",
            "0".repeat(point.unsigned_abs() as usize)
        )
    } else if point as usize >= digits.len() {
        format!(
            "{sign}{digits}{}",
            "0".repeat(point as usize - digits.len())
        )
    } else {
        let (int, frac) = digits.split_at(point as usize);
        format!("{sign}{int}.{frac}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn doubles_print_like_dotnet() {
        let cases = [
            (98.6, "98.6"),
            (1.0, "1"),
            (72.0 * 0.0254, "1.8288"),
            (78.0 * 0.0254, "1.9811999999999999"),
            (30.6 / 1.0936, "27.980980248719828"),
            (1e-5, "1E-05"),
            (0.0001, "0.0001"),
            (1e15, "1E+15"),
            (123_456_789_012_345.0, "123456789012345"),
            (1.2345678901234568e17, "1.2345678901234568E+17"),
            (-2.5e-7, "-2.5E-07"),
            (1e21, "1E+21"),
            (-0.5, "-0.5"),
            (1e308, "1E+308"),
        ];
        for (f, expected) in cases {
            assert_eq!(double(f), expected, "{f}");
        }
    }

    #[test]
    fn tokens_to_strings() {
        assert_eq!(to_string(&json!(true)).unwrap().as_deref(), Some("True"));
        assert_eq!(to_string(&json!(75)).unwrap().as_deref(), Some("75"));
        assert_eq!(
            to_string(&json!("2019-02-01T22:46:01.875Z"))
                .unwrap()
                .as_deref(),
            Some("02/01/2019 22:46:01")
        );
        assert_eq!(
            to_string(&json!("2019-02-01")).unwrap().as_deref(),
            Some("2019-02-01")
        );
        assert_eq!(to_string(&json!("  ")).unwrap(), None);
        assert_eq!(to_string(&json!(null)).unwrap(), None);
        assert!(to_string(&json!({"a": 1})).is_err());
        assert!(to_timestamp(&json!(1_549_061_161)).is_err());
        assert!(to_timestamp(&json!("not a time")).is_err());
    }
}
