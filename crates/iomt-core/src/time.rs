//! UTC instants with .NET tick (100 ns) precision.
//!
//! MedTech stores times as .NET `DateTime` values: 100 ns resolution, always converted to UTC
//! before they are bucketed or written. Measurements written by iomt must name exactly the same
//! instants, so times are truncated to ticks on the way in, and printed the way Newtonsoft
//! prints a UTC `DateTime` (`2019-02-01T22:46:01.875Z`: up to seven fraction digits, trailing
//! zeros dropped).

use std::fmt;

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Nanoseconds in one .NET tick.
const NANOS_PER_TICK: u32 = 100;

/// A UTC instant, truncated to whole .NET ticks.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(DateTime<Utc>);

/// Why a text could not be read as a timestamp.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{text}' is not a date and time this engine can read (expected ISO 8601, for example 2019-02-01T22:46:01.875Z)"
)]
pub struct TimestampError {
    /// The offending text, cut to a readable length.
    pub text: String,
}

impl TimestampError {
    fn new(text: &str) -> Self {
        let mut text = text.to_owned();
        if text.len() > 64 {
            let mut end = 64;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push('…');
        }
        Self { text }
    }
}

impl Timestamp {
    /// Wraps a chrono instant, dropping precision below one tick.
    pub fn from_datetime(dt: DateTime<Utc>) -> Self {
        let nanos = dt.nanosecond();
        let truncated = nanos - nanos % NANOS_PER_TICK;
        Self(dt.with_nanosecond(truncated).unwrap_or(dt))
    }

    /// The instant `secs` seconds after the Unix epoch, if it is representable.
    pub fn from_unix_seconds(secs: i64) -> Option<Self> {
        DateTime::from_timestamp(secs, 0).map(Self)
    }

    /// The instant `millis` milliseconds after the Unix epoch, if it is representable.
    pub fn from_unix_millis(millis: i64) -> Option<Self> {
        DateTime::from_timestamp_millis(millis).map(Self)
    }

    /// The current time, truncated to ticks.
    pub fn now() -> Self {
        Self::from_datetime(Utc::now())
    }

    /// The underlying chrono value.
    pub fn as_datetime(&self) -> DateTime<Utc> {
        self.0
    }

    /// Milliseconds since the Unix epoch (used for SampledData slotting and latency metrics).
    pub fn unix_millis(&self) -> i64 {
        self.0.timestamp_millis()
    }

    /// Reads a date-time the way .NET's `DateTime.Parse` (invariant culture) reads the common
    /// formats devices send.
    ///
    /// Accepted: ISO 8601 with `T` or a space, optional seconds and fraction, `Z` or an offset
    /// (`+02:00`, `+0200`, `+02`), or a bare date; US invariant dates (`02/01/2019 22:46:01`,
    /// with optional `AM`/`PM`); and RFC 1123 (`Fri, 01 Feb 2019 22:46:01 GMT`). A time without
    /// an offset is taken as UTC, which is what the service does on its UTC hosts. Times with an
    /// offset are converted to UTC.
    pub fn parse(text: &str) -> Result<Self, TimestampError> {
        let trimmed = text.trim();
        parse_iso(trimmed)
            .or_else(|| parse_us(trimmed))
            .or_else(|| {
                DateTime::parse_from_rfc2822(trimmed)
                    .ok()
                    .map(|dt| Self::from_datetime(dt.with_timezone(&Utc)))
            })
            .ok_or_else(|| TimestampError::new(text))
    }

    /// The start of the UTC hour this instant falls in.
    pub fn hour_start(&self) -> Self {
        let d = self.0;
        Self(
            d - chrono::Duration::nanoseconds(
                i64::from(d.minute() * 60 + d.second()) * 1_000_000_000 + i64::from(d.nanosecond()),
            ),
        )
    }

    /// The start of the UTC day this instant falls in.
    pub fn day_start(&self) -> Self {
        Self(self.0.date_naive().and_time(NaiveTime::MIN).and_utc())
    }

    /// This instant moved by a number of .NET ticks (100 ns), saturating at the ends of time.
    pub fn add_ticks(&self, ticks: i64) -> Self {
        let nanos = ticks.saturating_mul(i64::from(NANOS_PER_TICK));
        Self(
            self.0
                .checked_add_signed(chrono::Duration::nanoseconds(nanos))
                .unwrap_or(self.0),
        )
    }

    /// The instant `ticks` .NET ticks (100 ns) after the Unix epoch; transports report times
    /// this way.
    pub fn from_unix_ticks(ticks: i64) -> Self {
        Self(chrono::DateTime::UNIX_EPOCH).add_ticks(ticks)
    }

    /// .NET ticks since the Unix epoch (negative before it).
    pub fn unix_ticks(&self) -> i64 {
        self.0.timestamp() * 10_000_000 + i64::from(self.0.nanosecond() / NANOS_PER_TICK)
    }

    /// `yyyyMMddHHmmss`, the form MedTech uses in Observation identifier segments.
    pub fn to_compact_string(&self) -> String {
        let [y, mo, d, h, mi, se] = self.fields();
        format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{se:02}")
    }

    /// Year, month, day, hour, minute, second; formatted by hand because chrono's format
    /// machinery costs more than the rest of building a measurement.
    fn fields(&self) -> [u32; 6] {
        let (date, time) = (self.0.date_naive(), self.0.time());
        [
            date.year() as u32,
            date.month(),
            date.day(),
            time.hour(),
            time.minute(),
            time.second(),
        ]
    }

    /// A FHIR `instant` as Firely writes `DateTimeOffset`s: up to seven fraction digits, trailing
    /// zeros dropped, offset `+00:00`.
    pub fn to_fhir_instant(&self) -> String {
        let text = self.to_string();
        format!("{}+00:00", text.trim_end_matches('Z'))
    }

    /// Formats as .NET's invariant `DateTime.ToString()` does (`MM/dd/yyyy HH:mm:ss`), which is
    /// how a date token turns into a measurement value string.
    pub fn to_invariant_string(&self) -> String {
        self.0.format("%m/%d/%Y %H:%M:%S").to_string()
    }

    /// Formats with all seven fraction digits (`2019-02-01T22:59:59.9999999Z`), the .NET
    /// round-trip form FHIR resources written by MedTech use.
    pub fn to_round_trip_string(&self) -> String {
        let [y, mo, d, h, mi, se] = self.fields();
        let ticks = self.0.nanosecond() / NANOS_PER_TICK;
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{se:02}.{ticks:07}Z")
    }
}

impl fmt::Display for Timestamp {
    /// Newtonsoft's ISO form: up to seven fraction digits, trailing zeros dropped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [y, mo, d, h, mi, se] = self.fields();
        write!(f, "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{se:02}")?;
        let ticks = self.0.nanosecond() / NANOS_PER_TICK;
        if ticks != 0 {
            let digits = format!("{ticks:07}");
            write!(f, ".{}", digits.trim_end_matches('0'))?;
        }
        f.write_str("Z")
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Timestamp::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A small cursor over ASCII bytes, for the hand-written fast path (timestamp parsing runs once
/// per measurement, so it must not go through a general format engine).
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            bytes: text.as_bytes(),
            pos: 0,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn digits(&mut self, min: usize, max: usize) -> Option<(u32, usize)> {
        let start = self.pos;
        let mut value: u32 = 0;
        while self.pos - start < max {
            match self.peek() {
                Some(b @ b'0'..=b'9') => {
                    value = value * 10 + u32::from(b - b'0');
                    self.pos += 1;
                }
                _ => break,
            }
        }
        let count = self.pos - start;
        (count >= min).then_some((value, count))
    }

    fn done(&self) -> bool {
        self.pos == self.bytes.len()
    }
}

/// Reads `HH:mm[:ss[.f…]]`.
fn parse_time(c: &mut Cursor<'_>) -> Option<NaiveTime> {
    let (hour, _) = c.digits(1, 2)?;
    if !c.eat(b':') {
        return None;
    }
    let (minute, _) = c.digits(2, 2)?;
    let mut second = 0;
    let mut nanos = 0;
    if c.eat(b':') {
        second = c.digits(2, 2)?.0;
        if c.eat(b'.') || c.eat(b',') {
            let start = c.pos;
            let mut scale = 100_000_000u32;
            while let Some(b @ b'0'..=b'9') = c.peek() {
                nanos += u32::from(b - b'0') * scale;
                scale /= 10;
                c.pos += 1;
            }
            if c.pos == start {
                return None;
            }
        }
    }
    let nanos = nanos - nanos % NANOS_PER_TICK;
    NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)
}

/// Reads `Z`, `±HH`, `±HHmm` or `±HH:mm`; `None` inside means no offset was written.
fn parse_offset(c: &mut Cursor<'_>) -> Option<Option<i32>> {
    if c.eat(b'Z') || c.eat(b'z') {
        return Some(Some(0));
    }
    let sign = match c.peek() {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return Some(None),
    };
    c.pos += 1;
    let (hours, _) = c.digits(2, 2)?;
    let minutes = if c.eat(b':') {
        c.digits(2, 2)?.0
    } else {
        c.digits(2, 2).map_or(0, |(m, _)| m)
    };
    if hours > 23 || minutes > 59 {
        return None;
    }
    Some(Some(sign * (hours as i32 * 3600 + minutes as i32 * 60)))
}

fn to_utc(naive: NaiveDateTime, offset_seconds: Option<i32>) -> Option<Timestamp> {
    if offset_seconds.unwrap_or(0) == 0 {
        return Some(Timestamp::from_datetime(naive.and_utc()));
    }
    let offset = chrono::FixedOffset::east_opt(offset_seconds.unwrap_or(0))?;
    let dt = offset.from_local_datetime(&naive).single()?;
    Some(Timestamp::from_datetime(dt.with_timezone(&Utc)))
}

fn parse_iso(text: &str) -> Option<Timestamp> {
    let mut c = Cursor::new(text);
    let (year, _) = c.digits(4, 4)?;
    if !c.eat(b'-') {
        return None;
    }
    let (month, _) = c.digits(2, 2)?;
    if !c.eat(b'-') {
        return None;
    }
    let (day, _) = c.digits(2, 2)?;
    let date = NaiveDate::from_ymd_opt(year as i32, month, day)?;
    if c.done() {
        let naive = date.and_hms_opt(0, 0, 0)?;
        return to_utc(naive, None);
    }
    let t_separator = c.eat(b'T') || c.eat(b't');
    if !t_separator && !c.eat(b' ') {
        return None;
    }
    let time = parse_time(&mut c)?;
    let offset = parse_offset(&mut c)?;
    if !c.done() {
        return None;
    }
    to_utc(date.and_time(time), offset)
}

/// Reads `M/d/yyyy[ H:mm[:ss[.f]]][ AM|PM][ offset]` (the invariant culture's order) and
/// `yyyy/MM/dd [time]`.
fn parse_us(text: &str) -> Option<Timestamp> {
    let mut c = Cursor::new(text);
    let (first, first_len) = c.digits(1, 4)?;
    if !c.eat(b'/') {
        return None;
    }
    let (second, _) = c.digits(1, 2)?;
    if !c.eat(b'/') {
        return None;
    }
    let (third, third_len) = c.digits(1, 4)?;
    let date = if first_len == 4 {
        NaiveDate::from_ymd_opt(first as i32, second, third)?
    } else if third_len == 4 {
        NaiveDate::from_ymd_opt(third as i32, first, second)?
    } else {
        return None;
    };
    let mut time = NaiveTime::MIN;
    let mut offset = None;
    if c.eat(b' ') || c.eat(b'T') {
        time = parse_time(&mut c)?;
        let rest = std::str::from_utf8(&c.bytes[c.pos..]).ok()?.trim_start();
        let upper = rest.get(..2).map(str::to_ascii_uppercase);
        let meridiem = match upper.as_deref() {
            Some("AM") => Some(false),
            Some("PM") => Some(true),
            _ => None,
        };
        let mut rest = rest;
        if let Some(pm) = meridiem {
            let hour = time.hour();
            if hour == 0 || hour > 12 {
                return None;
            }
            let hour24 = match (pm, hour) {
                (false, 12) => 0,
                (true, 12) => 12,
                (true, h) => h + 12,
                (false, h) => h,
            };
            time = time.with_hour(hour24)?;
            rest = rest[2..].trim_start();
        }
        let mut oc = Cursor::new(rest);
        offset = parse_offset(&mut oc)?;
        if !oc.done() {
            return None;
        }
    } else if !c.done() {
        return None;
    }
    to_utc(date.and_time(time), offset)
}

/// Years .NET's `DateTime` can hold; the round-trip property is stated only for those.
#[cfg(test)]
fn is_dotnet_year(ts: &Timestamp) -> bool {
    (1..=9999).contains(&ts.0.year())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> String {
        Timestamp::parse(text).unwrap().to_string()
    }

    #[test]
    fn iso_forms() {
        assert_eq!(p("2019-02-01T22:46:01.875Z"), "2019-02-01T22:46:01.875Z");
        assert_eq!(p("2019-02-01T22:46:01Z"), "2019-02-01T22:46:01Z");
        assert_eq!(p("2023-03-13T22:46:01.8750000"), "2023-03-13T22:46:01.875Z");
        assert_eq!(
            p("2019-01-30T22:45:02.6073744Z"),
            "2019-01-30T22:45:02.6073744Z"
        );
        assert_eq!(
            p("2019-01-30T22:45:02.60737449Z"),
            "2019-01-30T22:45:02.6073744Z"
        );
        assert_eq!(p("2019-02-01T23:46:01+01:00"), "2019-02-01T22:46:01Z");
        assert_eq!(p("2019-02-01T21:46:01-0100"), "2019-02-01T22:46:01Z");
        assert_eq!(p("2019-02-01 22:46:01"), "2019-02-01T22:46:01Z");
        assert_eq!(p("2019-02-01T22:46"), "2019-02-01T22:46:00Z");
        assert_eq!(p("2019-02-01"), "2019-02-01T00:00:00Z");
    }

    #[test]
    fn us_and_rfc_forms() {
        assert_eq!(p("02/01/2019 22:46:01"), "2019-02-01T22:46:01Z");
        assert_eq!(p("2/1/2019 10:46:01 PM"), "2019-02-01T22:46:01Z");
        assert_eq!(p("02/01/2019"), "2019-02-01T00:00:00Z");
        assert_eq!(p("2019/02/01 22:46:01"), "2019-02-01T22:46:01Z");
        assert_eq!(p("Fri, 01 Feb 2019 22:46:01 GMT"), "2019-02-01T22:46:01Z");
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "yesterday",
            "2019-13-01T00:00:00Z",
            "2019-02-01T24:46:01Z",
            "1549061161",
            "2019-02-01T22:46:01Zjunk",
        ] {
            assert!(Timestamp::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn windows_and_ticks() {
        let ts = Timestamp::parse("2019-01-01T00:37:12.1234567Z").unwrap();
        assert_eq!(ts.hour_start().to_string(), "2019-01-01T00:00:00Z");
        assert_eq!(ts.day_start().to_string(), "2019-01-01T00:00:00Z");
        assert_eq!(
            ts.hour_start()
                .add_ticks(36_000_000_000 - 1)
                .to_round_trip_string(),
            "2019-01-01T00:59:59.9999999Z"
        );
        assert_eq!(ts.to_compact_string(), "20190101003712");
        assert_eq!(ts.to_fhir_instant(), "2019-01-01T00:37:12.1234567+00:00");
        assert_eq!(ts.add_ticks(1).unix_ticks() - ts.unix_ticks(), 1);
    }

    #[test]
    fn formats() {
        let ts = Timestamp::parse("2019-02-01T22:46:01.5Z").unwrap();
        assert_eq!(ts.to_round_trip_string(), "2019-02-01T22:46:01.5000000Z");
        assert_eq!(ts.to_invariant_string(), "02/01/2019 22:46:01");
        let json = serde_json::to_string(&ts).unwrap();
        assert_eq!(json, "\"2019-02-01T22:46:01.5Z\"");
        let back: Timestamp = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ts);
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(text in "\\PC{0,40}") {
            drop(Timestamp::parse(&text));
        }

        #[test]
        fn display_round_trips(secs in -62_000_000_000i64..253_000_000_000i64, ticks in 0u32..10_000_000) {
            let dt = DateTime::from_timestamp(secs, ticks * 100).unwrap();
            let ts = Timestamp::from_datetime(dt);
            proptest::prop_assume!(is_dotnet_year(&ts));
            proptest::prop_assert_eq!(Timestamp::parse(&ts.to_string()).unwrap(), ts);
        }
    }
}
