//! Dead-letter records: what could not be processed, with everything needed to fix and replay
//! it.
//!
//! MedTech blocks a partition on one bad message (or, configured otherwise, drops it with a
//! log line). Here every event or group that cannot be processed is written here, with its
//! original payload, and counted; the pipeline moves on. `iomt deadletter replay` re-submits
//! the records once the templates are fixed.
//!
//! In embedded mode the sink is a JSON Lines file. A record is durable (flushed and synced)
//! before [`DeadLetterWriter::write`] returns, because the caller then lets the checkpoint pass
//! the event.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use iomt_core::{DeviceEvent, Measurement, Timestamp};

use iomt_core::source::enqueued_time;
use iomt_core::{BadRecord, SourceEvent};
use serde_json::{Value, json};

/// Which stage gave up on the item, and so what its payload is and where a replay re-enters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The device event could not be read or normalized; the payload is the event body.
    Normalize,
    /// A normalized measurement could not be written to FHIR; the payload is the measurement
    /// in the internal hub's JSON form.
    Convert,
}

impl Stage {
    /// The name in the file.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Normalize => "normalize",
            Stage::Convert => "convert",
        }
    }
}

/// How the item entered the pipeline, and so how `iomt deadletter replay` re-submits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// An input record that is not a readable event (a JSON Lines line that is not an
    /// envelope, a line that is too long); the payload is the record as read, and a replay
    /// reads it again.
    Record,
    /// A device event; the payload is its body, and a replay normalizes it again.
    Event,
    /// A normalized measurement; the payload is the measurement, and a replay converts it
    /// again.
    Measurement,
}

impl Entry {
    /// The name in the file.
    pub fn name(self) -> &'static str {
        match self {
            Entry::Record => "record",
            Entry::Event => "event",
            Entry::Measurement => "measurement",
        }
    }
}

/// One dead-lettered item.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The stage that gave up.
    pub stage: Stage,
    /// What the payload is.
    pub entry: Entry,
    /// The hub partition the event came from.
    pub partition: String,
    /// Its position (sequence number) in the partition.
    pub sequence_number: i64,
    /// Where it was read (`file:line`), for replays.
    pub source: Option<String>,
    /// Error class (MedTech exception name, e.g. `IncompatibleDataException`).
    pub kind: String,
    /// What went wrong, naming the template, field and expression where known.
    pub message: String,
    /// The template involved, if any.
    pub template: Option<String>,
    /// The original event body (or, for a group that failed to convert, its measurements).
    pub payload: Vec<u8>,
    /// The event's application properties.
    pub properties: serde_json::Map<String, Value>,
    /// The event's system properties.
    pub system_properties: serde_json::Map<String, Value>,
    /// When it was dead-lettered.
    pub time: Timestamp,
}

impl DeadLetter {
    /// An input record that could not be read as an event.
    pub fn unreadable(bad: &BadRecord, time: Timestamp) -> Self {
        Self {
            stage: Stage::Normalize,
            entry: Entry::Record,
            partition: bad.partition.clone(),
            sequence_number: bad.sequence_number,
            source: Some(bad.source.clone()),
            kind: "InvalidDataFormatException".to_owned(),
            message: bad.reason.clone(),
            template: None,
            payload: bad.payload.clone(),
            properties: Default::default(),
            system_properties: Default::default(),
            time,
        }
    }

    /// A device event normalize gave up on: `kind` and `message` say why, `template` where.
    pub fn event(
        event: &SourceEvent,
        (kind, message, template): (&str, String, Option<String>),
        time: Timestamp,
    ) -> Self {
        Self {
            stage: Stage::Normalize,
            entry: Entry::Event,
            partition: event.partition.clone(),
            sequence_number: event.sequence_number,
            source: Some(event.source.clone()),
            kind: kind.to_owned(),
            message,
            template,
            payload: event.event.body.clone(),
            properties: event.event.properties.clone(),
            system_properties: event.event.system_properties.clone(),
            time,
        }
    }

    /// A measurement of the event at `sequence_number` of `partition` that `stage` gave up on.
    pub fn measurement(
        stage: Stage,
        measurement: &Measurement,
        (partition, sequence_number): (String, i64),
        (kind, message, template): (&str, &str, Option<&str>),
        time: Timestamp,
    ) -> Self {
        Self {
            stage,
            entry: Entry::Measurement,
            partition,
            sequence_number,
            source: None,
            kind: kind.to_owned(),
            message: message.to_owned(),
            template: template.map(str::to_owned),
            payload: serde_json::to_vec(measurement).unwrap_or_default(),
            properties: Default::default(),
            system_properties: Default::default(),
            time,
        }
    }

    /// What identifies the item across runs: the same input position and payload give the
    /// same key, so a rerun does not write the record again, and a reader of several batches
    /// can drop the copies a crash left.
    pub fn key(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        // SipHash with fixed keys: stable within and across runs of one build.
        let mut h = std::hash::DefaultHasher::new();
        (
            self.stage.name(),
            self.entry.name(),
            &self.partition,
            self.sequence_number,
            &self.source,
        )
            .hash(&mut h);
        // The file holds a JSON payload as JSON, which reads back compact: hash that form.
        match self.to_json()["payload"].get("json") {
            Some(v) => v.to_string().hash(&mut h),
            None => String::from_utf8_lossy(&self.payload).hash(&mut h),
        }
        h.finish()
    }

    /// The JSON form written to the file: the payload as JSON when it is JSON, else as text.
    /// An unreadable input record is always kept as text, exactly as read: re-read as JSON it
    /// could lose what made it unreadable (a duplicate member).
    pub fn to_json(&self) -> Value {
        let as_json = match self.entry {
            Entry::Record => None,
            Entry::Event | Entry::Measurement => {
                serde_json::from_slice::<Value>(&self.payload).ok()
            }
        };
        let payload: Value = match as_json {
            Some(v) => json!({"json": v}),
            None => json!({"text": String::from_utf8_lossy(&self.payload)}),
        };
        json!({
            "stage": self.stage.name(),
            "entry": self.entry.name(),
            "partition": self.partition,
            "sequenceNumber": self.sequence_number,
            "source": self.source,
            "kind": self.kind,
            "message": self.message,
            "template": self.template,
            "time": self.time.to_string(),
            "payload": payload,
            "properties": self.properties,
            "systemProperties": self.system_properties,
        })
    }

    /// Where an unreadable input record was read: its file and line, from `file:line`.
    pub fn record_position(&self) -> (String, i64) {
        match self.source.as_deref().and_then(|s| s.rsplit_once(':')) {
            Some((file, line)) if line.parse::<i64>().is_ok() => (
                file.to_owned(),
                line.parse().unwrap_or(self.sequence_number),
            ),
            _ => (
                self.source
                    .clone()
                    .unwrap_or_else(|| "dead letter".to_owned()),
                self.sequence_number,
            ),
        }
    }

    /// The device event of a normalize-stage record, as it was read, for a replay.
    pub fn to_event(&self) -> SourceEvent {
        SourceEvent {
            partition: self.partition.clone(),
            sequence_number: self.sequence_number,
            offset: None,
            source: self
                .source
                .clone()
                .unwrap_or_else(|| format!("{}/{}", self.partition, self.sequence_number)),
            event: DeviceEvent {
                body: self.payload.clone(),
                properties: self.properties.clone(),
                system_properties: self.system_properties.clone(),
                enqueued_time: enqueued_time(&self.system_properties),
            },
        }
    }

    /// Reads a record written by [`DeadLetter::to_json`].
    pub fn from_json(value: &Value) -> Option<Self> {
        let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_owned);
        let payload = match &value["payload"] {
            Value::Object(p) if p.contains_key("json") => p["json"].to_string().into_bytes(),
            Value::Object(p) => p
                .get("text")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .as_bytes()
                .to_vec(),
            _ => return None,
        };
        let object = |key: &str| {
            value
                .get(key)
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default()
        };
        let stage = match value.get("stage").and_then(Value::as_str) {
            None | Some("normalize") => Stage::Normalize,
            Some("convert") => Stage::Convert,
            Some(_) => return None,
        };
        // Records of earlier versions name no entry: by stage, it was an event or a
        // measurement.
        let entry = match (value.get("entry").and_then(Value::as_str), stage) {
            (Some("record"), _) => Entry::Record,
            (Some("event"), _) => Entry::Event,
            (Some("measurement"), _) => Entry::Measurement,
            (None, Stage::Normalize) => Entry::Event,
            (None, Stage::Convert) => Entry::Measurement,
            (Some(_), _) => return None,
        };
        Some(Self {
            stage,
            entry,
            partition: text("partition")?,
            sequence_number: value.get("sequenceNumber")?.as_i64()?,
            source: text("source"),
            kind: text("kind")?,
            message: text("message")?,
            template: text("template"),
            payload,
            properties: object("properties"),
            system_properties: object("systemProperties"),
            time: text("time").and_then(|t| Timestamp::parse(&t).ok())?,
        })
    }
}

/// Appends dead-letter records to a JSON Lines file, each item once: a record already in the
/// file (a rerun of the same input, a resume after a crash) is not written again.
#[derive(Debug)]
pub struct DeadLetterWriter {
    path: PathBuf,
    file: File,
    written: HashSet<u64>,
}

impl DeadLetterWriter {
    /// Opens (or creates) the file for appending, reading which items it holds.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        // A crash during a write can leave a partial last line. Its records were never
        // acknowledged (the write had not synced), so they are written again; cut the partial
        // line so that they start on a line of their own.
        let bytes = std::fs::read(path)?;
        if bytes.last().is_some_and(|&b| b != b'\n') {
            let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            file.set_len(complete as u64)?;
            file.sync_data()?;
        }
        let (records, _) = read_dead_letters(path)?;
        Ok(Self {
            path: path.to_owned(),
            file,
            written: records.iter().map(DeadLetter::key).collect(),
        })
    }

    /// Appends the records not yet in the file and makes them durable before returning.
    /// Returns how many were new.
    pub fn write(&mut self, records: &[DeadLetter]) -> std::io::Result<usize> {
        let (text, keys) = encode_new(records, &self.written);
        if keys.is_empty() {
            return Ok(0);
        }
        self.file.write_all(text.as_bytes())?;
        self.file.sync_data()?;
        self.written.extend(&keys);
        Ok(keys.len())
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The JSON Lines of the records whose keys are neither in `written` nor repeated, and
/// their keys: what a writer appends.
pub fn encode_new(records: &[DeadLetter], written: &HashSet<u64>) -> (String, Vec<u64>) {
    let mut text = String::new();
    let mut keys = Vec::new();
    for r in records {
        let key = r.key();
        if written.contains(&key) || keys.contains(&key) {
            continue;
        }
        keys.push(key);
        text.push_str(&r.to_json().to_string());
        text.push('\n');
    }
    (text, keys)
}

/// Reads every record of a dead-letter file; lines that are not records are reported by line
/// number.
pub fn read_dead_letters(path: &Path) -> std::io::Result<(Vec<DeadLetter>, Vec<usize>)> {
    let reader = BufReader::new(File::open(path)?);
    let (mut records, mut unreadable) = (Vec::new(), Vec::new());
    for (i, line) in reader.lines().enumerate() {
        match parse_line(&line?) {
            Some(Some(r)) => records.push(r),
            Some(None) => unreadable.push(i + 1),
            None => {}
        }
    }
    Ok((records, unreadable))
}

/// [`read_dead_letters`] for text already read (a blob).
pub fn parse_dead_letters(text: &str) -> (Vec<DeadLetter>, Vec<usize>) {
    let (mut records, mut unreadable) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        match parse_line(line) {
            Some(Some(r)) => records.push(r),
            Some(None) => unreadable.push(i + 1),
            None => {}
        }
    }
    (records, unreadable)
}

/// A line's record: `None` for a blank line, `Some(None)` for a line that is not a record.
fn parse_line(line: &str) -> Option<Option<DeadLetter>> {
    if line.trim().is_empty() {
        return None;
    }
    Some(
        serde_json::from_str::<Value>(line)
            .ok()
            .as_ref()
            .and_then(DeadLetter::from_json),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: &[u8]) -> DeadLetter {
        DeadLetter {
            stage: Stage::Normalize,
            entry: Entry::Event,
            partition: "2".into(),
            sequence_number: 41,
            source: Some("cap.jsonl:3".into()),
            kind: "IncompatibleDataException".into(),
            message: "Unable to extract required value for [TimestampExpression] using $.date"
                .into(),
            template: Some("template[0] JsonPathContent 'heartrate'".into()),
            payload: payload.to_vec(),
            properties: Default::default(),
            system_properties: [("iothub-connection-device-id".to_owned(), json!("dev"))]
                .into_iter()
                .collect(),
            time: Timestamp::parse("2026-11-22T06:00:00Z").unwrap(),
        }
    }

    #[test]
    fn records_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dl/deadletter.jsonl");
        let mut w = DeadLetterWriter::open(&path).unwrap();
        let json_payload = record(br#"{"hr": 70}"#);
        let text_payload = record(b"not json {");
        w.write(&[json_payload, text_payload.clone()]).unwrap();
        drop(w);
        // Appending after a restart keeps earlier records, and writes none of them again.
        let mut again = DeadLetterWriter::open(&path).unwrap();
        assert_eq!(again.write(std::slice::from_ref(&text_payload)).unwrap(), 0);
        assert_eq!(again.write(&[record(br#"{"hr": 70}"#)]).unwrap(), 0);
        let mut other = text_payload.clone();
        other.sequence_number = 42;
        assert_eq!(again.write(&[other.clone(), other.clone()]).unwrap(), 1);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"garbage\n{\"partial")
            .unwrap();
        // A partial last line (a crash mid-write) is cut when the file is opened again.
        drop(DeadLetterWriter::open(&path).unwrap());
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .ends_with("garbage\n")
        );
        let (records, unreadable) = read_dead_letters(&path).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].payload, br#"{"hr":70}"#.to_vec());
        assert_eq!(records[1], text_payload);
        assert_eq!(records[2], other);
        assert_eq!(unreadable, vec![4]);
    }
}
