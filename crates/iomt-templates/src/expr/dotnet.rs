//! The .NET primitives MedTech's template engines lean on: invariant number text, the number
//! parsers behind `Convert.ToInt64`/`ToDouble` and `TryParse`, and ordinal string order.
//!
//! Measurement values, JMESPath function results and filter comparisons all pass through
//! these, so matching .NET here is what makes the stored strings and the matches identical.

use std::cmp::Ordering;

/// `double.ToString(CultureInfo.InvariantCulture)` on .NET Core 3.0 and later: the shortest
/// text that round-trips, in fixed notation for decimal exponents from -4 to 14 and in
/// scientific notation (`1E+15`, `1E-05`) outside that range.
pub fn double(f: f64) -> String {
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

/// `Int64.Parse`/`TryParse` with `NumberStyles.Integer`: surrounding white space and one
/// leading sign are allowed, nothing else.
pub fn parse_int64(text: &str) -> Option<i64> {
    let t = text.trim_matches(is_dotnet_space);
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.strip_prefix('+').unwrap_or(t).parse().ok()
}

/// `Double.Parse`/`TryParse` with the invariant culture and `NumberStyles.Float` (plus
/// `AllowThousands` when `thousands` is set, as `Convert.ToDouble` uses): white space, a sign,
/// a decimal point, an exponent, and the symbols `Infinity`, `-Infinity` and `NaN`.
pub fn parse_double(text: &str, thousands: bool) -> Option<f64> {
    let t = text.trim_matches(is_dotnet_space);
    match t {
        "Infinity" | "+Infinity" | "∞" => return Some(f64::INFINITY),
        "-Infinity" | "-∞" => return Some(f64::NEG_INFINITY),
        "NaN" => return Some(f64::NAN),
        _ => {}
    }
    let owned;
    let t = if thousands && t.contains(',') {
        // Group separators are accepted anywhere in the integer part.
        let int_end = t.find(['.', 'e', 'E']).unwrap_or(t.len());
        if t[int_end..].contains(',') {
            return None;
        }
        owned = t.replace(',', "");
        owned.as_str()
    } else {
        t
    };
    let body = t.strip_prefix(['+', '-']).unwrap_or(t);
    let valid = !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
        && body.bytes().any(|b| b.is_ascii_digit())
        && !body.starts_with(['e', 'E']);
    if !valid {
        return None;
    }
    t.parse().ok()
}

/// The white space .NET's number parsing trims (`NumberStyles.AllowLeadingWhite`).
fn is_dotnet_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\u{b}' | '\u{c}' | '\r')
}

/// `string.CompareOrdinal`: order of UTF-16 code units, which differs from Rust's byte order
/// for characters above U+FFFF.
pub fn cmp_ordinal(a: &str, b: &str) -> Ordering {
    a.encode_utf16().cmp(b.encode_utf16())
}

/// `Math.Round` to even, then `Convert.ToInt64`'s range check.
pub fn to_int64(f: f64) -> Option<i64> {
    let r = f.round_ties_even();
    (r.is_finite() && r >= i64::MIN as f64 && r < i64::MAX as f64).then_some(r as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn number_parsing() {
        assert_eq!(parse_int64(" +42 "), Some(42));
        assert_eq!(parse_int64("-7"), Some(-7));
        assert_eq!(parse_int64("4.0"), None);
        assert_eq!(parse_int64(""), None);
        assert_eq!(parse_int64("9223372036854775808"), None);
        assert_eq!(parse_double(" 2.5e3 ", false), Some(2500.0));
        assert_eq!(parse_double("1,000.5", true), Some(1000.5));
        assert_eq!(parse_double("1,000.5", false), None);
        assert_eq!(parse_double(".5", false), Some(0.5));
        assert_eq!(parse_double("abc", false), None);
        assert_eq!(parse_double("e5", false), None);
        assert!(parse_double("NaN", false).is_some_and(f64::is_nan));
    }

    #[test]
    fn ordinal_is_utf16_order() {
        assert_eq!(cmp_ordinal("B", "a"), Ordering::Less);
        // U+FF5E sorts after U+1F600's lead surrogate (0xD83D) in UTF-16, before it in UTF-8.
        assert_eq!(cmp_ordinal("\u{ff5e}", "\u{1f600}"), Ordering::Greater);
    }
}
