//! Date tokens: the strings Newtonsoft.Json turns into .NET `DateTime`s while it parses a message.
//!
//! MedTech parses every event body with Newtonsoft's default settings, so a string such as
//! `"2024-03-05T09:00:00Z"` is no longer a string when a template sees it: JSONPath filters
//! compare it as a date, JMESPath functions read it as `03/05/2024 09:00:00`, and a value
//! expression that selects it stores that text. Which strings become dates is decided by
//! Newtonsoft's own strict parser (`DateTimeUtils.TryParseDateTime` and `DateTimeParser`), not
//! by .NET's lenient `DateTime.Parse`, and this module follows it character for character:
//!
//! * ISO 8601 as `yyyy-MM-ddTHH:mm:ss`, 19 to 40 characters, an upper-case `T` at index 10, an
//!   optional fraction of 1 to 7 digits, then `Z`, an offset (`+hh`, `+hhmm`, `+hh:mm`, hours and
//!   minutes up to 99) or nothing; hour 24 is midnight of the next day;
//! * the Microsoft form `/Date(milliseconds[+-hhmm])/`.
//!
//! The `DateTimeKind` is kept because it shows when a date is written back as text: `Z` for a
//! UTC date, the host's offset for a date that had an offset (converted to local time), and
//! nothing for a date without one. iomt runs as if on the UTC hosts the service runs on, so the
//! local offset is `+00:00` and every kind names the same instant as [`Timestamp`].

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};

use crate::Timestamp;

/// A date token: the instant and the `DateTimeKind` Newtonsoft gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonDate {
    /// The instant (for an unspecified kind, the written wall time read as UTC).
    pub instant: Timestamp,
    /// How the text was zoned.
    pub kind: DateKind,
}

/// .NET's `DateTimeKind` of a parsed date token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateKind {
    /// Written with `Z`, or in the Microsoft form without an offset.
    Utc,
    /// Written with an offset: converted to the host's local time.
    Local,
    /// Written without a zone.
    Unspecified,
}

/// Ticks of .NET's `DateTime.MinValue` and `MaxValue`, relative to the Unix epoch.
const MIN_UNIX_TICKS: i64 = -621_355_968_000_000_000;
const MAX_UNIX_TICKS: i64 = 2_534_023_007_999_999_999;

impl JsonDate {
    /// The date Newtonsoft reads from a JSON string, or `None` when the string stays a string.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.first() == Some(&b'/') {
            return microsoft(bytes);
        }
        // `s.Length` counts UTF-16 units; a string with non-ASCII characters fails the
        // character checks below whatever its length, so bytes give the same answer.
        if !(19..=40).contains(&bytes.len()) || !bytes[0].is_ascii_digit() || bytes[10] != b'T' {
            return None;
        }
        iso(bytes)
    }

    /// The ISO text Newtonsoft writes for the date (`WriteDateTimeString`, ISO format): up to
    /// seven fraction digits without trailing zeros, then `Z`, `+00:00` or nothing by kind.
    /// JSONPath filters compare string literals with this text.
    pub fn to_iso_string(&self) -> String {
        let mut text = self.instant.to_string();
        match self.kind {
            DateKind::Utc => {}
            DateKind::Local => {
                text.pop();
                text.push_str("+00:00");
            }
            DateKind::Unspecified => {
                text.pop();
            }
        }
        text
    }

    /// The text .NET's invariant `DateTime.ToString()` gives (`MM/dd/yyyy HH:mm:ss`): what a date
    /// token becomes as a measurement value and inside JMESPath string functions.
    pub fn to_invariant_string(&self) -> String {
        self.instant.to_invariant_string()
    }
}

fn digit(b: Option<&u8>) -> Option<u32> {
    b.filter(|b| b.is_ascii_digit())
        .map(|b| u32::from(b - b'0'))
}

fn two_digits(bytes: &[u8], at: usize) -> Option<u32> {
    Some(digit(bytes.get(at))? * 10 + digit(bytes.get(at + 1))?)
}

/// `DateTimeParser.Parse` followed by `TryParseDateTimeIso`'s zone handling.
fn iso(b: &[u8]) -> Option<JsonDate> {
    let end = b.len();
    let year = two_digits(b, 0)? * 100 + two_digits(b, 2)?;
    let month = two_digits(b, 5)?;
    let day = two_digits(b, 8)?;
    if year < 1 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(year as i32, month, day)?;
    let (hour, minute, second) = (two_digits(b, 11)?, two_digits(b, 14)?, two_digits(b, 17)?);
    if b[13] != b':' || b[16] != b':' || hour > 24 || minute > 59 || second > 59 {
        return None;
    }
    if hour == 24 && (minute != 0 || second != 0) {
        return None;
    }
    let mut pos = 19;
    let mut fraction = 0u32;
    if b.get(pos) == Some(&b'.') {
        let mut digits = 0;
        pos += 1;
        while pos < end && digits < 7 {
            let Some(d) = digit(b.get(pos)) else { break };
            fraction = fraction * 10 + d;
            digits += 1;
            pos += 1;
        }
        if digits == 0 {
            return None;
        }
        fraction *= 10u32.pow(7 - digits);
        if hour == 24 && fraction != 0 {
            return None;
        }
    }
    // The zone. Newtonsoft's parser is lax here: after seven fraction digits two more digits
    // are read as "zone minutes" of no zone, and hours and minutes go up to 99.
    let mut zone = DateKind::Unspecified;
    let mut offset_minutes: i64 = 0;
    if pos < end {
        let c = b[pos];
        if c == b'Z' || c == b'z' {
            zone = DateKind::Utc;
            pos += 1;
        } else {
            let mut sign = 0;
            if pos + 2 < end
                && let Some(hours) = two_digits(b, pos + 1)
            {
                sign = match c {
                    b'-' => -1,
                    b'+' => 1,
                    _ => 0,
                };
                if sign != 0 {
                    offset_minutes = i64::from(hours) * 60;
                    pos += 3;
                }
            }
            if pos < end {
                if b[pos] == b':' {
                    pos += 1;
                }
                if pos + 1 < end
                    && let Some(minutes) = two_digits(b, pos)
                {
                    offset_minutes += i64::from(minutes);
                    pos += 2;
                }
            }
            if sign != 0 {
                zone = DateKind::Local;
                offset_minutes *= sign;
            } else {
                offset_minutes = 0;
            }
        }
    }
    if pos != end {
        return None;
    }
    let wall = NaiveDateTime::new(date, NaiveTime::from_hms_opt(hour % 24, minute, second)?)
        .and_utc()
        .timestamp()
        .checked_mul(10_000_000)?
        + i64::from(fraction)
        + if hour == 24 { 864_000_000_000 } else { 0 };
    if wall > MAX_UNIX_TICKS {
        // `new DateTime(...).AddDays(1)` past year 9999 throws while the message is parsed.
        return None;
    }
    // An offset converts to UTC, then to local time; out of range it is clamped as .NET does.
    let ticks = (wall - offset_minutes * 600_000_000).clamp(MIN_UNIX_TICKS, MAX_UNIX_TICKS);
    Some(JsonDate {
        instant: Timestamp::from_unix_ticks(ticks),
        kind: zone,
    })
}

/// `/Date(1549061161000)/` and `/Date(1549061161000+0100)/` (`TryParseMicrosoftDate`).
fn microsoft(b: &[u8]) -> Option<JsonDate> {
    let len = b.len();
    if len < 9 || !b.starts_with(b"/Date(") || !b.ends_with(b")/") {
        return None;
    }
    // The offset sign is searched from index 7 to the `)`; it only changes the kind.
    let sign_at = (7..len - 1)
        .find(|&i| b[i] == b'+')
        .or_else(|| (7..len - 1).find(|&i| b[i] == b'-'));
    let (millis_end, kind) = match sign_at {
        Some(at) => {
            two_digits(b, at + 1)?;
            if len - at > 5 {
                two_digits(b, at + 3)?;
            }
            (at, DateKind::Local)
        }
        None => (len - 2, DateKind::Utc),
    };
    let millis: i64 = std::str::from_utf8(&b[6..millis_end]).ok()?.parse().ok()?;
    if b[6] == b'+' {
        return None;
    }
    let ticks = millis.checked_mul(10_000)?;
    if !(MIN_UNIX_TICKS..=MAX_UNIX_TICKS).contains(&ticks) {
        return None;
    }
    Some(JsonDate {
        instant: Timestamp::from_unix_ticks(ticks),
        kind,
    })
}

impl From<DateTime<Utc>> for JsonDate {
    /// A UTC date computed at run time (JMESPath's `fromUnixTimestamp`).
    fn from(dt: DateTime<Utc>) -> Self {
        Self {
            instant: Timestamp::from_datetime(dt),
            kind: DateKind::Utc,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iso_of(text: &str) -> Option<String> {
        JsonDate::parse(text).map(|d| d.to_iso_string())
    }

    #[test]
    fn which_strings_become_dates() {
        assert_eq!(
            iso_of("2024-03-05T09:00:00Z").as_deref(),
            Some("2024-03-05T09:00:00Z")
        );
        assert_eq!(
            iso_of("2024-03-05T09:00:00.000Z").as_deref(),
            Some("2024-03-05T09:00:00Z")
        );
        assert_eq!(
            iso_of("2024-03-05T09:00:00.1230000z").as_deref(),
            Some("2024-03-05T09:00:00.123Z")
        );
        assert_eq!(
            iso_of("2024-03-05T09:00:00").as_deref(),
            Some("2024-03-05T09:00:00")
        );
        assert_eq!(
            iso_of("2024-03-05T10:30:00+01:30").as_deref(),
            Some("2024-03-05T09:00:00+00:00")
        );
        assert_eq!(
            iso_of("2024-03-05T08:00:00-0100").as_deref(),
            Some("2024-03-05T09:00:00+00:00")
        );
        assert_eq!(
            iso_of("2024-03-05T10:00:00+01").as_deref(),
            Some("2024-03-05T09:00:00+00:00")
        );
        assert_eq!(
            iso_of("2024-03-04T24:00:00Z").as_deref(),
            Some("2024-03-05T00:00:00Z")
        );
        // Two digits after seven fraction digits are swallowed as "zone minutes".
        assert_eq!(
            iso_of("2024-03-05T09:00:00.123456789").as_deref(),
            Some("2024-03-05T09:00:00.1234567")
        );
        assert_eq!(
            iso_of("/Date(1549061161875)/").as_deref(),
            Some("2019-02-01T22:46:01.875Z")
        );
        assert_eq!(
            iso_of("/Date(1549061161875+0100)/").as_deref(),
            Some("2019-02-01T22:46:01.875+00:00")
        );
        for not_a_date in [
            "2024-03-05",
            "2024-03-05 09:00:00",
            "2024-03-05t09:00:00Z",
            "2024-03-05T9:00:00Z",
            "2024-03-05T09:00Z",
            "2024-03-05T09:00:00.Z",
            "2024-03-05T09:00:00.12345678Z",
            "2024-03-05T24:00:01Z",
            "2024-02-30T09:00:00Z",
            "0000-03-05T09:00:00Z",
            "2024-03-05T09:00:00Zjunk",
            "2024-03-05T09:00:00 Z",
            "heart rate at 2024-03-05T09:00:00Z",
            "/Date(abc)/",
            "/Date()/",
            "2024-03-05T09:00:00+01:00:00",
        ] {
            assert_eq!(iso_of(not_a_date), None, "{not_a_date}");
        }
    }

    #[test]
    fn invariant_text() {
        let d = JsonDate::parse("2024-03-05T09:00:00.500Z").unwrap();
        assert_eq!(d.to_invariant_string(), "03/05/2024 09:00:00");
        assert_eq!(d.kind, DateKind::Utc);
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(text in "\\PC{0,44}") {
            let _ = JsonDate::parse(&text);
        }

        #[test]
        fn iso_shapes_never_panic(text in "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}[.0-9]{0,10}[-+:Zz0-9]{0,8}") {
            let _ = JsonDate::parse(&text);
        }
    }
}
