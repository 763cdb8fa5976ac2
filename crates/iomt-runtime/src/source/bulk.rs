//! A FHIR Bulk Data export as a source of change events (`iomt export --from`, or `--server`
//! for one iomt starts on the FHIR server and downloads): every resource of its NDJSON files
//! becomes the event of its current version, and the `deleted` files' DELETE entries become
//! deletions, appended to the event log in batches.
//!
//! A folder may hold the export's `manifest.json` (its `transactionTime` dates the deletions, and
//! its `deleted` list names the deleted files); without one, `*.ndjson` files are read, and a
//! file whose lines are Bundles is taken for a deleted file.

use std::collections::BTreeMap;
use std::io::{BufRead, Read as _};
use std::path::{Path, PathBuf};

use iomt_core::{Timestamp, Written};
use iomt_events::changefeed::{FeedEntry, exported_deletions, exported_resource};
use serde_json::Value;

use crate::events::Outbox;

/// Why an export cannot be read or published.
#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    /// A file or folder cannot be read.
    #[error("{path}: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The event log refused the changes.
    #[error("appending to the event log: {0}")]
    Outbox(String),
    /// The FHIR server's export failed, or could not be run or downloaded.
    #[error("the server's export: {0}")]
    Server(String),
}

/// An export for the FHIR server to run (`$export`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerExport {
    /// Export a group's patients (`Group/{id}/$export`).
    pub group: Option<String>,
    /// Export every patient's compartment (`Patient/$export`) rather than the whole system.
    pub patients: bool,
    /// `_type`: the resource types [default: the server's choice, usually all].
    pub types: Vec<String>,
    /// `_since`: only resources changed after this instant, and the ones deleted since (the
    /// manifest's `deleted` files, published as deletions).
    pub since: Option<String>,
    /// How long the export may run on the server before it is cancelled there; `None`: as
    /// long as the server says it is in progress.
    pub timeout: Option<std::time::Duration>,
}

impl ServerExport {
    /// The kick-off request: path and query under the FHIR base.
    pub fn kickoff(&self) -> String {
        use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
        let mut path = match (&self.group, self.patients) {
            (Some(group), _) => format!(
                "Group/{}/$export",
                utf8_percent_encode(group, NON_ALPHANUMERIC)
            ),
            (None, true) => "Patient/$export".to_owned(),
            (None, false) => "$export".to_owned(),
        };
        let mut query = vec!["_outputFormat=application%2Ffhir%2Bndjson".to_owned()];
        if !self.types.is_empty() {
            let types = self.types.join(",");
            query.push(format!(
                "_type={}",
                utf8_percent_encode(&types, NON_ALPHANUMERIC)
            ));
        }
        if let Some(since) = &self.since {
            query.push(format!(
                "_since={}",
                utf8_percent_encode(since, NON_ALPHANUMERIC)
            ));
        }
        path.push('?');
        path.push_str(&query.join("&"));
        path
    }
}

/// Runs an export on the FHIR server: kicks it off, polls its status as the server asks
/// (`Retry-After`, between 0.2 s and 2 min; 2 s without one), downloads its output and
/// deleted files into `dir` with a manifest naming them there, and asks the server to clean
/// up. `started` gets the status URL once the server accepted the export. The export is then
/// read like a folder given to `--from`. An export still in progress after `timeout` is
/// cancelled on the server (`DELETE` of its status URL, as the Bulk Data spec has it), so that
/// a job that never finishes neither hangs a scheduled run nor keeps the server busy.
pub async fn fetch(
    client: &iomt_fhir::FhirClient,
    export: &ServerExport,
    dir: &Path,
    started: impl FnOnce(&str),
) -> Result<BulkInput, BulkError> {
    let server = |e: iomt_fhir::FhirError| BulkError::Server(e.to_string());
    let status_url = client
        .export_kickoff(&export.kickoff())
        .await
        .map_err(server)?;
    started(&status_url);
    let deadline = export.timeout.map(|t| (tokio::time::Instant::now() + t, t));
    let manifest = loop {
        match client.export_status(&status_url).await.map_err(server)? {
            iomt_fhir::ExportStatus::Complete(manifest) => break manifest,
            iomt_fhir::ExportStatus::InProgress {
                retry_after,
                progress,
            } => {
                tracing::debug!(progress, "the server's export is running");
                let wait = retry_after
                    .unwrap_or(std::time::Duration::from_secs(2))
                    .clamp(
                        std::time::Duration::from_millis(200),
                        std::time::Duration::from_secs(120),
                    );
                let mut until = tokio::time::Instant::now() + wait;
                if let Some((deadline, timeout)) = deadline {
                    if tokio::time::Instant::now() >= deadline {
                        client.export_forget(&status_url).await;
                        return Err(BulkError::Server(format!(
                            "still in progress after {}; cancelled on the server (raise --timeout for a longer export)",
                            humantime::format_duration(timeout)
                        )));
                    }
                    until = until.min(deadline);
                }
                tokio::time::sleep_until(until).await;
            }
        }
    };
    std::fs::create_dir_all(dir).map_err(|e| read_error(dir, e))?;
    let with_token = manifest["requiresAccessToken"].as_bool().unwrap_or(false);
    let mut local = manifest.clone();
    for (key, prefix) in [("output", "output"), ("deleted", "deleted")] {
        let Some(files) = local[key].as_array_mut() else {
            continue;
        };
        for (i, entry) in files.iter_mut().enumerate() {
            let url = entry["url"].as_str().unwrap_or_default().to_owned();
            // Types are letters; anything else is left out of the file name.
            let kind: String = entry["type"]
                .as_str()
                .unwrap_or_default()
                .chars()
                .filter(char::is_ascii_alphabetic)
                .collect();
            let name = format!("{prefix}-{i:04}-{kind}.ndjson");
            client
                .export_download(&url, with_token, &dir.join(&name))
                .await
                .map_err(server)?;
            entry["url"] = Value::String(name);
        }
    }
    let errors = manifest["error"].as_array().map_or(0, Vec::len);
    if errors > 0 {
        tracing::warn!(
            files = errors,
            "the server's export lists error files (OperationOutcomes), which are not downloaded"
        );
    }
    let text = serde_json::to_vec_pretty(&local).unwrap_or_default();
    let path = dir.join("manifest.json");
    std::fs::write(&path, text).map_err(|e| read_error(&path, e))?;
    client.export_forget(&status_url).await;
    BulkInput::read(&[dir.to_owned()])
}

/// What an export holds.
#[derive(Debug, Clone, Default)]
pub struct BulkInput {
    /// Files of resources.
    pub files: Vec<PathBuf>,
    /// Files of deletions.
    pub deleted: Vec<PathBuf>,
    /// When the export was taken: the time of its deletions.
    pub transaction_time: Option<Timestamp>,
}

/// What publishing did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BulkReport {
    /// Changes appended, by resource type.
    pub changes: BTreeMap<String, u64>,
    /// Deletions among them.
    pub deletions: u64,
    /// Lines that name no change, with where and why (`file:line: why`), the first 20.
    pub skipped: Vec<String>,
    /// How many lines were skipped in all.
    pub skipped_total: u64,
}

fn read_error(path: &Path, message: impl ToString) -> BulkError {
    BulkError::Read {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

impl BulkInput {
    /// The files of `paths`: NDJSON files, or folders of them (with or without a manifest).
    pub fn read(paths: &[PathBuf]) -> Result<Self, BulkError> {
        let mut input = Self::default();
        // Files no manifest lists, which their content classifies.
        let mut unlisted = Vec::new();
        for path in paths {
            if !path.is_dir() {
                unlisted.push(path.clone());
                continue;
            }
            let manifest = path.join("manifest.json");
            if manifest.is_file() {
                input.read_manifest(path, &manifest)?;
                continue;
            }
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| read_error(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "ndjson"))
                .collect();
            files.sort();
            unlisted.extend(files);
        }
        // Without a manifest, a file of Bundles holds deletions.
        let (deleted, files): (Vec<PathBuf>, Vec<PathBuf>) =
            unlisted.into_iter().partition(|f| first_line_is_bundle(f));
        input.files.extend(files);
        input.deleted.extend(deleted);
        input.deleted.sort();
        input.deleted.dedup();
        Ok(input)
    }

    /// A manifest's `output` and `deleted` files, by their URLs' file names in `dir`.
    fn read_manifest(&mut self, dir: &Path, manifest: &Path) -> Result<(), BulkError> {
        let text = std::fs::read_to_string(manifest).map_err(|e| read_error(manifest, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| read_error(manifest, e))?;
        if let Some(t) = value["transactionTime"].as_str() {
            self.transaction_time = Some(
                Timestamp::parse(t)
                    .map_err(|_| read_error(manifest, format!("transactionTime {t:?}")))?,
            );
        }
        let files = |key: &str| -> Result<Vec<PathBuf>, BulkError> {
            value[key]
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| {
                    let url = o["url"].as_str().unwrap_or_default();
                    let name = url.rsplit('/').next().filter(|n| !n.is_empty());
                    let name = name.ok_or_else(|| {
                        read_error(manifest, format!("{key}: {url:?} names no file"))
                    })?;
                    Ok(dir.join(name))
                })
                .collect()
        };
        self.files.extend(files("output")?);
        self.deleted.extend(files("deleted")?);
        Ok(())
    }

    /// Appends every change the files name to `outbox`, `batch` at a time.
    pub async fn publish(&self, outbox: &Outbox, batch: usize) -> Result<BulkReport, BulkError> {
        let mut report = BulkReport::default();
        let deleted_at = self.transaction_time.unwrap_or_else(Timestamp::now);
        let files = self
            .files
            .iter()
            .map(|f| (f, false))
            .chain(self.deleted.iter().map(|f| (f, true)));
        let mut pending: Vec<Written> = Vec::with_capacity(batch);
        for (file, deletions) in files {
            let reader = std::fs::File::open(file).map_err(|e| read_error(file, e))?;
            let mut reader = std::io::BufReader::new(reader);
            let mut line = Vec::new();
            let mut n = 0usize;
            loop {
                line.clear();
                let read = read_line(&mut reader, &mut line).map_err(|e| read_error(file, e))?;
                let Some(too_long) = read else { break };
                n += 1;
                if line.iter().all(u8::is_ascii_whitespace) && !too_long {
                    continue;
                }
                let changes = if too_long {
                    Err(format!("the line is over {MAX_LINE_BYTES} bytes"))
                } else {
                    serde_json::from_slice::<Value>(&line).map_err(|e| e.to_string())
                };
                let changes = changes.and_then(|v| {
                    if deletions {
                        exported_deletions(&v, deleted_at)
                    } else {
                        exported_resource(&v).map(|e| vec![e])
                    }
                });
                match changes {
                    Ok(changes) => {
                        for c in changes {
                            *report.changes.entry(c.resource_type.clone()).or_default() += 1;
                            report.deletions += u64::from(deletions);
                            pending.push(FeedEntry::to_written(&c));
                        }
                    }
                    Err(why) => {
                        report.skipped_total += 1;
                        if report.skipped.len() < 20 {
                            report
                                .skipped
                                .push(format!("{}:{n}: {why}", file.display()));
                        }
                    }
                }
                if pending.len() >= batch {
                    append(outbox, &mut pending).await?;
                }
            }
        }
        append(outbox, &mut pending).await?;
        Ok(report)
    }
}

/// The longest export line read: a resource with large attachments, not a runaway file.
const MAX_LINE_BYTES: u64 = 64 << 20;

/// Reads one line into `line` (without its newline), at most [`MAX_LINE_BYTES`]; the rest of a
/// longer line is skipped. `None` at the end; `Some(true)` when the line was too long.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> std::io::Result<Option<bool>> {
    let read = reader
        .by_ref()
        .take(MAX_LINE_BYTES + 1)
        .read_until(b'\n', line)?;
    if read == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        return Ok(Some(false));
    }
    if (line.len() as u64) <= MAX_LINE_BYTES {
        return Ok(Some(false)); // the last line, without a newline
    }
    // Skip to the end of the long line.
    let mut rest = Vec::new();
    loop {
        rest.clear();
        let n = reader.by_ref().take(1 << 20).read_until(b'\n', &mut rest)?;
        if n == 0 || rest.last() == Some(&b'\n') {
            break;
        }
    }
    line.clear();
    Ok(Some(true))
}

async fn append(outbox: &Outbox, pending: &mut Vec<Written>) -> Result<(), BulkError> {
    if pending.is_empty() {
        return Ok(());
    }
    outbox
        .append(pending)
        .await
        .map_err(|e| BulkError::Outbox(e.to_string()))?;
    pending.clear();
    Ok(())
}

/// Whether a file's first non-empty line is a Bundle (a deleted file).
fn first_line_is_bundle(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str::<Value>(&l).ok())
        .is_some_and(|v| v["resourceType"] == "Bundle")
}

/// A bulk-export status event in CloudEvents form (`iomt.bulkexport.started`, `.completed`,
/// `.failed`): what an export run is doing, for whoever watches its progress. Its id is a
/// UUIDv5 of the export and the state, so a rerun's events match.
pub fn status_event(source: &str, export: &str, state: &str, data: Value) -> Value {
    let name = format!("{source}\n{export}\n{state}");
    serde_json::json!({
        "specversion": "1.0",
        "id": uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, name.as_bytes()).to_string(),
        "source": source,
        "type": format!("iomt.bulkexport.{state}"),
        "subject": export,
        "time": Timestamp::now().to_string(),
        "datacontenttype": "application/json",
        "data": data,
    })
}

/// Appends a status event to a JSON Lines file (`iomt export --status`).
pub fn append_status(file: &Path, event: &Value) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut line = event.to_string();
    line.push('\n');
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)?
        .write_all(line.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kickoff_names_the_level_types_and_since_encoded() {
        assert_eq!(
            ServerExport::default().kickoff(),
            "$export?_outputFormat=application%2Ffhir%2Bndjson"
        );
        let export = ServerExport {
            group: Some("g 1".into()),
            patients: false,
            types: vec!["Patient".into(), "Observation".into()],
            since: Some("2026-11-01T00:00:00+01:00".into()),
            timeout: None,
        };
        assert_eq!(
            export.kickoff(),
            "Group/g%201/$export?_outputFormat=application%2Ffhir%2Bndjson\
             &_type=Patient%2CObservation&_since=2026%2D11%2D01T00%3A00%3A00%2B01%3A00"
        );
        let patients = ServerExport {
            patients: true,
            ..Default::default()
        };
        assert!(patients.kickoff().starts_with("Patient/$export?"));
    }
}
