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

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use iomt_core::{DeviceEvent, Timestamp};

use crate::capture::{CapturedEvent, enqueued_time};
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

/// One dead-lettered item.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The stage that gave up.
    pub stage: Stage,
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
    /// The JSON form written to the file: the payload as JSON when it is JSON, else as text.
    pub fn to_json(&self) -> Value {
        let payload: Value = match serde_json::from_slice::<Value>(&self.payload) {
            Ok(v) => json!({"json": v}),
            Err(_) => json!({"text": String::from_utf8_lossy(&self.payload)}),
        };
        json!({
            "stage": self.stage.name(),
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

    /// The device event of a normalize-stage record, as it was read, for a replay.
    pub fn to_event(&self) -> CapturedEvent {
        CapturedEvent {
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
        Some(Self {
            stage,
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

/// Appends dead-letter records to a JSON Lines file.
#[derive(Debug)]
pub struct DeadLetterWriter {
    path: PathBuf,
    file: File,
}

impl DeadLetterWriter {
    /// Opens (or creates) the file for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    /// Appends records and makes them durable before returning.
    pub fn write(&mut self, records: &[DeadLetter]) -> std::io::Result<()> {
        let mut text = String::new();
        for r in records {
            text.push_str(&r.to_json().to_string());
            text.push('\n');
        }
        self.file.write_all(text.as_bytes())?;
        self.file.sync_data()
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads every record of a dead-letter file; lines that are not records are reported by line
/// number.
pub fn read_dead_letters(path: &Path) -> std::io::Result<(Vec<DeadLetter>, Vec<usize>)> {
    let reader = BufReader::new(File::open(path)?);
    let (mut records, mut unreadable) = (Vec::new(), Vec::new());
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line)
            .ok()
            .as_ref()
            .and_then(DeadLetter::from_json)
        {
            Some(r) => records.push(r),
            None => unreadable.push(i + 1),
        }
    }
    Ok((records, unreadable))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: &[u8]) -> DeadLetter {
        DeadLetter {
            stage: Stage::Normalize,
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
        // Appending after a restart keeps earlier records.
        DeadLetterWriter::open(&path)
            .unwrap()
            .write(std::slice::from_ref(&text_payload))
            .unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"garbage\n")
            .unwrap();
        let (records, unreadable) = read_dead_letters(&path).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].payload, br#"{"hr":70}"#.to_vec());
        assert_eq!(records[1], text_payload);
        assert_eq!(unreadable, vec![4]);
    }
}
