//! Captured device traffic: JSON Lines files and Event Hubs Capture Avro files.
//!
//! Both readers yield one [`Record`] per event. A record that cannot be read as an event (a
//! line that is not JSON, an Avro body that is missing) is a [`BadRecord`] carrying its raw
//! bytes, so that a replay dead-letters it and goes on; only I/O failures stop a reader.
//!
//! ## JSON Lines format
//!
//! One event per line, in the shape templates see it (and `iomt mapping test --event` takes):
//!
//! ```json
//! {"Body": {"heartRate": 72, "deviceId": "watch-0042"}, "Properties": {}, "SystemProperties": {"x-opt-sequence-number": 4711, "x-opt-enqueued-time": "2026-11-20T08:15:30.701Z"}}
//! ```
//!
//! * `Body` is the device payload as JSON. A payload that is not JSON goes in `BodyText` (the
//!   raw text) instead, so captured poison messages replay as they arrived.
//! * `Properties` and `SystemProperties` are optional.
//! * `Partition` (optional, default `"0"`) names the hub partition the event came from.
//! * The position is `SystemProperties.x-opt-sequence-number` when present, else the line
//!   number; the enqueued time is `SystemProperties.x-opt-enqueued-time`.
//! * Blank lines are skipped.
//!
//! Lines are read as bytes, so nothing in a line stops the file: a line that is not valid
//! UTF-8, not a JSON object, has neither `Body` nor `BodyText`, or is longer than the size cap
//! becomes a [`BadRecord`] naming its line, and reading goes on. A line over the cap is never
//! held in memory whole; its record keeps the first bytes.

use std::io::{BufRead, Read};

use apache_avro::types::Value as Avro;
use iomt_core::source::enqueued_time;
use iomt_core::{BadRecord, DeviceEvent, SourceEvent, Timestamp};
use serde_json::{Map, Value};

/// An event as a JSON Lines record that [`read_jsonl`] reads back as the same event: the body
/// as JSON when it is JSON (`Body`), else as text (`BodyText`).
pub fn to_jsonl(e: &SourceEvent) -> String {
    let mut line = Map::new();
    match serde_json::from_slice::<Value>(&e.event.body) {
        Ok(body) => line.insert("Body".to_owned(), body),
        Err(_) if e.event.body.is_empty() => line.insert("Body".to_owned(), Value::Null),
        Err(_) => line.insert(
            "BodyText".to_owned(),
            Value::String(String::from_utf8_lossy(&e.event.body).into_owned()),
        ),
    };
    line.insert(
        "Properties".to_owned(),
        Value::Object(e.event.properties.clone()),
    );
    line.insert(
        "SystemProperties".to_owned(),
        Value::Object(e.event.system_properties.clone()),
    );
    line.insert("Partition".to_owned(), Value::String(e.partition.clone()));
    Value::Object(line).to_string()
}

/// What a reader yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// An event to normalize.
    Event(SourceEvent),
    /// A record to dead-letter.
    Bad(BadRecord),
}

/// A failure that stops reading a file.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Reading the file failed.
    #[error("cannot read {source_name}: {error}")]
    Io {
        /// The file.
        source_name: String,
        /// The cause.
        error: std::io::Error,
    },
    /// The file is not an Avro container in the Event Hubs Capture schema.
    #[error("{source_name} is not an Event Hubs Capture Avro file: {message}")]
    Avro {
        /// The file.
        source_name: String,
        /// The cause.
        message: String,
    },
}

/// The longest JSON Lines record read by default.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// How much of an over-long line a dead-letter record keeps.
const KEPT_OF_LONG_LINE: usize = 64 * 1024;

/// Reads a JSON Lines capture, one [`Record`] per non-blank line; lines longer than
/// `max_line_bytes` are bad records.
pub fn read_jsonl<R: BufRead>(reader: R, name: &str, max_line_bytes: usize) -> JsonLines<R> {
    JsonLines {
        reader,
        name: name.to_owned(),
        line_number: 0,
        max_line_bytes,
        line: Vec::new(),
    }
}

/// The records of a JSON Lines capture; see [`read_jsonl`].
#[derive(Debug)]
pub struct JsonLines<R> {
    reader: R,
    name: String,
    line_number: i64,
    max_line_bytes: usize,
    line: Vec<u8>,
}

impl<R: Read> JsonLines<std::io::BufReader<R>> {
    /// Whether more input is already buffered, so the next record will not wait for the
    /// source. A reader of a pipe or standard input hands over what it has before it blocks.
    pub fn has_buffered(&self) -> bool {
        !self.reader.buffer().is_empty()
    }
}

impl<R: BufRead> JsonLines<R> {
    /// Reads the next line into `self.line`, at most `max_line_bytes + 1` bytes of it; returns
    /// the full length, or `None` at the end of the input.
    fn next_line(&mut self) -> std::io::Result<Option<usize>> {
        self.line.clear();
        let mut length = 0;
        loop {
            let available = self.reader.fill_buf()?;
            if available.is_empty() {
                return Ok((length > 0).then_some(length));
            }
            let (chunk, used, done) = match memchr::memchr(b'\n', available) {
                Some(i) => (&available[..i], i + 1, true),
                None => (available, available.len(), false),
            };
            let room = (self.max_line_bytes + 1).saturating_sub(self.line.len());
            self.line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            length += chunk.len();
            self.reader.consume(used);
            if done {
                if self.line.last() == Some(&b'\r') && length <= self.max_line_bytes + 1 {
                    self.line.pop();
                    length -= 1;
                }
                return Ok(Some(length));
            }
        }
    }
}

impl<R: BufRead> Iterator for JsonLines<R> {
    type Item = Result<Record, CaptureError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let length = match self.next_line() {
                Ok(Some(n)) => n,
                Ok(None) => return None,
                Err(error) => {
                    return Some(Err(CaptureError::Io {
                        source_name: self.name.clone(),
                        error,
                    }));
                }
            };
            self.line_number += 1;
            if length > self.max_line_bytes {
                let mut payload = std::mem::take(&mut self.line);
                payload.truncate(KEPT_OF_LONG_LINE);
                return Some(Ok(bad_line(
                    &self.name,
                    self.line_number,
                    payload,
                    format!(
                        "the line is {length} bytes, over the limit of {} bytes; the record keeps its first {KEPT_OF_LONG_LINE} bytes",
                        self.max_line_bytes
                    ),
                )));
            }
            if self.line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(Ok(jsonl_record(&self.line, &self.name, self.line_number)));
        }
    }
}

fn bad_line(name: &str, line_number: i64, payload: Vec<u8>, reason: String) -> Record {
    Record::Bad(BadRecord {
        source: format!("{name}:{line_number}"),
        partition: "0".into(),
        sequence_number: line_number,
        payload,
        reason,
    })
}

/// One line of a JSON Lines capture; other members are ignored.
#[derive(serde::Deserialize)]
struct Line<'a> {
    /// Present (`null` included) or absent.
    #[serde(rename = "Body", borrow, default, deserialize_with = "present")]
    body: Option<&'a serde_json::value::RawValue>,
    #[serde(rename = "BodyText", default)]
    body_text: Option<Value>,
    #[serde(rename = "Properties", default)]
    properties: Option<Value>,
    #[serde(rename = "SystemProperties", default)]
    system_properties: Option<Value>,
    #[serde(rename = "Partition", default)]
    partition: Option<Value>,
}

/// A member that is present, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<&'de serde_json::value::RawValue>, D::Error> {
    serde::Deserialize::deserialize(d).map(Some)
}

/// Reads one JSON Lines record; `iomt deadletter replay` reads a dead-lettered line with it
/// again.
pub fn jsonl_record(line: &[u8], name: &str, line_number: i64) -> Record {
    let bad = |reason: String| bad_line(name, line_number, line.to_vec(), reason);
    let text = match std::str::from_utf8(line) {
        Ok(t) => t,
        Err(e) => {
            return bad(format!(
                "the line is not valid UTF-8 (invalid bytes at byte {})",
                e.valid_up_to() + 1
            ));
        }
    };
    // serde would read a JSON array into the envelope's fields one by one.
    if !text.trim_start().starts_with('{') {
        return bad("the line is not a JSON object (an event envelope)".into());
    }
    let envelope: Line<'_> = match serde_json::from_str(text) {
        Ok(l) => l,
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            return bad(format!("the line is not an event envelope: {e}"));
        }
        Err(e) => return bad(format!("the line is not JSON: {e}")),
    };
    let body = match (envelope.body, envelope.body_text) {
        (_, Some(Value::String(text))) => text.into_bytes(),
        (None, None) => return bad("the line has neither Body nor BodyText".into()),
        (Some(raw), None) if raw.get() == "null" => Vec::new(),
        // The body exactly as captured, without parsing it twice.
        (Some(raw), None) => raw.get().as_bytes().to_vec(),
        (_, Some(_)) => return bad("BodyText must be a string".into()),
    };
    let source = format!("{name}:{line_number}");
    let object = |v: Option<Value>| match v {
        Some(Value::Object(m)) => Ok(m),
        None | Some(Value::Null) => Ok(Map::new()),
        Some(_) => Err(()),
    };
    let (Ok(properties), Ok(system_properties)) = (
        object(envelope.properties),
        object(envelope.system_properties),
    ) else {
        return bad("Properties and SystemProperties must be objects".into());
    };
    let partition = match envelope.partition {
        Some(Value::String(p)) => p,
        Some(Value::Number(n)) => n.to_string(),
        _ => "0".into(),
    };
    let sequence_number = system_properties
        .get("x-opt-sequence-number")
        .and_then(Value::as_i64)
        .unwrap_or(line_number);
    let enqueued_time = enqueued_time(&system_properties);
    let offset = system_properties
        .get("x-opt-offset")
        .map(|o| o.as_str().map_or_else(|| o.to_string(), str::to_owned));
    Record::Event(SourceEvent {
        partition,
        sequence_number,
        offset,
        source,
        event: DeviceEvent {
            body,
            properties,
            system_properties,
            enqueued_time,
        },
    })
}

/// The schema Event Hubs Capture writes.
pub const CAPTURE_SCHEMA: &str = r#"{
  "type": "record", "name": "EventData", "namespace": "Microsoft.ServiceBus.Messaging",
  "fields": [
    {"name": "SequenceNumber", "type": "long"},
    {"name": "Offset", "type": "string"},
    {"name": "EnqueuedTimeUtc", "type": "string"},
    {"name": "SystemProperties", "type": {"type": "map", "values": ["long", "double", "string", "bytes"]}},
    {"name": "Properties", "type": {"type": "map", "values": ["long", "double", "string", "bytes", "null"]}},
    {"name": "Body", "type": ["null", "bytes"]}
  ]
}"#;

/// Reads an Event Hubs Capture Avro file of partition `partition`.
pub fn read_capture_avro<R: Read>(
    reader: R,
    name: &str,
    partition: &str,
) -> Result<impl Iterator<Item = Result<Record, CaptureError>>, CaptureError> {
    let avro_error = |e: apache_avro::Error| CaptureError::Avro {
        source_name: name.to_owned(),
        message: e.to_string(),
    };
    // The header is checked before apache-avro reads it: it sizes its metadata map from the
    // header's first count, so a few hostile bytes made it ask for gigabytes.
    let mut reader = reader;
    let header = read_avro_header(&mut reader).map_err(|message| CaptureError::Avro {
        source_name: name.to_owned(),
        message,
    })?;
    let records =
        apache_avro::Reader::new(std::io::Cursor::new(header).chain(reader)).map_err(avro_error)?;
    let (name, partition) = (name.to_owned(), partition.to_owned());
    Ok(records.enumerate().map(move |(index, value)| {
        let value = value.map_err(|e| CaptureError::Avro {
            source_name: name.clone(),
            message: e.to_string(),
        })?;
        Ok(capture_record(value, &name, &partition, index as i64 + 1))
    }))
}

/// Metadata entries an Avro container header may have (Capture writes two).
const MAX_AVRO_METADATA_ENTRIES: i64 = 64;
/// Bytes a key or value of the header's metadata may have (the schema is the largest).
const MAX_AVRO_METADATA_BYTES: i64 = 1024 * 1024;

/// Reads and checks an Avro object container header (magic, metadata map, sync marker), and
/// returns its bytes for the Avro reader.
fn read_avro_header<R: Read>(reader: &mut R) -> Result<Vec<u8>, String> {
    let mut header = Vec::new();
    let take = |reader: &mut R, n: usize, header: &mut Vec<u8>| -> Result<(), String> {
        let start = header.len();
        header.resize(start + n, 0);
        reader
            .read_exact(&mut header[start..])
            .map_err(|e| format!("the file ends inside its Avro header ({e})"))
    };
    take(reader, 4, &mut header)?;
    if header != b"Obj\x01" {
        return Err("not an Avro object container file (no Obj 1 magic)".to_owned());
    }
    let long = |reader: &mut R, header: &mut Vec<u8>| -> Result<i64, String> {
        let mut value: u64 = 0;
        for shift in (0..70).step_by(7) {
            take(reader, 1, header)?;
            let byte = header[header.len() - 1];
            value |= u64::from(byte & 0x7f) << shift.min(63);
            if byte & 0x80 == 0 {
                return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        Err("an Avro header number is longer than 10 bytes".to_owned())
    };
    let mut entries = 0;
    loop {
        let mut count = long(reader, &mut header)?;
        if count == 0 {
            break;
        }
        if count < 0 {
            count = count.checked_neg().ok_or("a negative Avro block count")?;
            long(reader, &mut header)?; // the block's size in bytes
        }
        entries += count;
        if entries > MAX_AVRO_METADATA_ENTRIES {
            return Err(format!(
                "the Avro header declares {entries} metadata entries or more; at most {MAX_AVRO_METADATA_ENTRIES} are read"
            ));
        }
        for _ in 0..count * 2 {
            let len = long(reader, &mut header)?;
            if !(0..=MAX_AVRO_METADATA_BYTES).contains(&len) {
                return Err(format!(
                    "an Avro header metadata item of {len} bytes (at most {MAX_AVRO_METADATA_BYTES})"
                ));
            }
            take(reader, len as usize, &mut header)?;
        }
    }
    take(reader, 16, &mut header)?; // the sync marker
    Ok(header)
}

fn capture_record(value: Avro, name: &str, partition: &str, record_number: i64) -> Record {
    let source = format!("{name}#{record_number}");
    let Avro::Record(fields) = value else {
        return Record::Bad(BadRecord {
            source,
            partition: partition.to_owned(),
            sequence_number: record_number,
            payload: Vec::new(),
            reason: "not a Capture EventData record".into(),
        });
    };
    let mut sequence_number = record_number;
    let mut offset = None;
    let mut enqueued_time = None;
    let mut event = DeviceEvent::default();
    for (field, value) in fields {
        match (field.as_str(), value) {
            ("SequenceNumber", Avro::Long(n)) => sequence_number = n,
            ("Offset", Avro::String(o)) => offset = Some(o),
            // Capture writes .NET's invariant text, "11/20/2026 8:15:30 AM".
            ("EnqueuedTimeUtc", Avro::String(t)) => enqueued_time = Timestamp::parse(&t).ok(),
            ("SystemProperties", Avro::Map(m)) => event.system_properties = avro_map(m),
            ("Properties", Avro::Map(m)) => event.properties = avro_map(m),
            ("Body", Avro::Union(_, body)) => {
                if let Avro::Bytes(b) = *body {
                    event.body = b;
                }
            }
            _ => {}
        }
    }
    event.enqueued_time = enqueued_time;
    Record::Event(SourceEvent {
        partition: partition.to_owned(),
        sequence_number,
        offset,
        source,
        event,
    })
}

fn avro_map(map: std::collections::HashMap<String, Avro>) -> Map<String, Value> {
    let mut entries: Vec<(String, Avro)> = map.into_iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries
        .into_iter()
        .map(|(k, v)| (k, avro_value(v)))
        .collect()
}

fn avro_value(value: Avro) -> Value {
    match value {
        Avro::Union(_, inner) => avro_value(*inner),
        Avro::Long(n) => Value::from(n),
        Avro::Int(n) => Value::from(n),
        Avro::Double(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        Avro::String(s) => Value::String(s),
        Avro::Bytes(b) => Value::String(String::from_utf8_lossy(&b).into_owned()),
        Avro::Boolean(b) => Value::Bool(b),
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use apache_avro::{Codec, DeflateSettings, Schema, Writer};

    use super::*;

    #[test]
    fn jsonl_good_bad_and_raw_lines() {
        let text = concat!(
            r#"{"Body": {"hr": 72}, "SystemProperties": {"x-opt-sequence-number": 41, "x-opt-enqueued-time": "2026-11-20T08:15:30.701Z"}, "Partition": "3"}"#,
            "\n\n",
            "not json at all\n",
            r#"{"BodyText": "{\"hr\": 7", "Properties": {"source": "pump"}}"#,
            "\n"
        );
        let records: Vec<Record> = read_jsonl(text.as_bytes(), "cap.jsonl", MAX_LINE_BYTES)
            .map(Result::unwrap)
            .collect();
        assert_eq!(records.len(), 3);
        let Record::Event(first) = &records[0] else {
            panic!("expected an event")
        };
        assert_eq!(
            (
                first.partition.as_str(),
                first.sequence_number,
                first.source.as_str()
            ),
            ("3", 41, "cap.jsonl:1")
        );
        assert_eq!(first.event.body, br#"{"hr": 72}"#.to_vec());
        assert_eq!(
            first.event.enqueued_time.unwrap().to_string(),
            "2026-11-20T08:15:30.701Z"
        );
        let Record::Bad(bad) = &records[1] else {
            panic!("expected a bad record")
        };
        assert_eq!(
            (bad.source.as_str(), bad.payload.as_slice()),
            ("cap.jsonl:3", b"not json at all".as_slice())
        );
        let Record::Event(raw) = &records[2] else {
            panic!("expected an event")
        };
        assert_eq!(raw.event.body, br#"{"hr": 7"#.to_vec());
        assert_eq!(raw.sequence_number, 4);
        assert_eq!(raw.event.properties["source"], "pump");
    }

    fn reasons(input: &[u8], cap: usize) -> Vec<(String, String)> {
        read_jsonl(input, "in.jsonl", cap)
            .map(|r| match r.unwrap() {
                Record::Bad(b) => (b.source, b.reason),
                Record::Event(e) => (e.source, "event".to_owned()),
            })
            .collect()
    }

    #[test]
    fn no_line_stops_the_file() {
        let mut input = Vec::new();
        input.extend_from_slice(b"{\"Body\": {\"hr\": 1}}\n");
        input.extend_from_slice(b"{\"Body\": \"caf\xe9\"}\n");
        input.extend_from_slice(b"[{\"Body\": 1}, 2]\n");
        input.extend_from_slice(b"{}\n");
        input.extend_from_slice(b"42\n");
        input.extend_from_slice(b"{\"Body\": null}\r\n");
        input.extend_from_slice(format!("{{\"Body\": \"{}\"}}\n", "x".repeat(300)).as_bytes());
        input.extend_from_slice(b"{\"Body\": {}, \"Body\": {}}\n");
        input.extend_from_slice(b"{\"BodyText\": \"last\"}");
        let got = reasons(&input, 200);
        let reason = |i: usize| got[i].1.as_str();
        assert_eq!(got.len(), 9, "{got:?}");
        assert_eq!(reason(0), "event");
        assert!(reason(1).contains("not valid UTF-8"), "{}", reason(1));
        assert_eq!(got[1].0, "in.jsonl:2");
        assert!(reason(2).contains("not a JSON object"), "{}", reason(2));
        assert!(
            reason(3).contains("neither Body nor BodyText"),
            "{}",
            reason(3)
        );
        assert!(reason(4).contains("not a JSON object"), "{}", reason(4));
        // An explicit null body is an event with an empty body.
        assert_eq!(reason(5), "event");
        assert!(
            reason(6).contains("over the limit of 200 bytes"),
            "{}",
            reason(6)
        );
        assert!(reason(7).contains("duplicate field"), "{}", reason(7));
        assert_eq!((got[8].0.as_str(), reason(8)), ("in.jsonl:9", "event"));
    }

    #[test]
    fn a_huge_line_is_not_held_whole() {
        let mut input = b"{\"Body\": \"".to_vec();
        input.resize(5 * 1024 * 1024, b'x');
        input.extend_from_slice(b"\"}\n{\"Body\": 1}\n");
        let records: Vec<Record> = read_jsonl(input.as_slice(), "big.jsonl", 1024)
            .map(Result::unwrap)
            .collect();
        let Record::Bad(bad) = &records[0] else {
            panic!("expected a bad record")
        };
        assert!(bad.payload.len() <= KEPT_OF_LONG_LINE);
        assert!(matches!(records[1], Record::Event(_)));
    }

    #[test]
    fn hostile_avro_headers_are_refused_before_any_allocation() {
        // Found by the capture fuzz target: a metadata count of hundreds of millions made the
        // Avro reader allocate 21 GB.
        let evil = b"Obj\x01\xff\xff\xff\x78-oection-device-id\xff\xff\xff\x008ion\">\"1\"}";
        let Err(error) = read_capture_avro(&evil[..], "evil.avro", "0") else {
            panic!("a hostile header was read");
        };
        assert!(error.to_string().contains("metadata entries"), "{error}");
        for bad in [&b"Obj"[..], b"Obj\x02", b"Obj\x01\x02\x7f\x7f\x7f"] {
            assert!(read_capture_avro(bad, "bad.avro", "0").is_err());
        }
    }

    #[test]
    fn capture_avro_round_trip() {
        let schema = Schema::parse_str(CAPTURE_SCHEMA).unwrap();
        let mut writer = Writer::with_codec(
            &schema,
            Vec::new(),
            Codec::Deflate(DeflateSettings::default()),
        );
        for (seq, body) in [(7i64, Some(br#"{"hr": 70}"#.to_vec())), (8, None)] {
            let mut record = apache_avro::types::Record::new(&schema).unwrap();
            record.put("SequenceNumber", seq);
            record.put("Offset", format!("{}", seq * 100));
            record.put("EnqueuedTimeUtc", "11/20/2026 8:15:30 AM");
            let system: std::collections::HashMap<String, Avro> = [(
                "iothub-connection-device-id".to_owned(),
                Avro::Union(2, Box::new(Avro::String("dev-1".into()))),
            )]
            .into();
            record.put("SystemProperties", Avro::Map(system));
            record.put("Properties", Avro::Map(Default::default()));
            record.put(
                "Body",
                match body {
                    Some(b) => Avro::Union(1, Box::new(Avro::Bytes(b))),
                    None => Avro::Union(0, Box::new(Avro::Null)),
                },
            );
            writer.append(record).unwrap();
        }
        let bytes = writer.into_inner().unwrap();
        let records: Vec<Record> = read_capture_avro(bytes.as_slice(), "part-0.avro", "0")
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let Record::Event(e) = &records[0] else {
            panic!("expected an event")
        };
        assert_eq!((e.sequence_number, e.offset.as_deref()), (7, Some("700")));
        assert_eq!(e.event.body, br#"{"hr": 70}"#.to_vec());
        assert_eq!(
            e.event.system_properties["iothub-connection-device-id"],
            "dev-1"
        );
        assert_eq!(
            e.event.enqueued_time.unwrap().to_string(),
            "2026-11-20T08:15:30Z"
        );
        let Record::Event(empty) = &records[1] else {
            panic!("expected an event")
        };
        assert!(empty.event.body.is_empty());
        assert!(read_capture_avro(b"not avro".as_slice(), "x.avro", "0").is_err());
    }
}
