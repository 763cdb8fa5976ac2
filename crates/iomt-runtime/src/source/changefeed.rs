//! A FHIR server's history as a source of change events (`iomt run --role changes`): each
//! cycle reads the system history (or each type's) since the tail's watermark, publishes what
//! the tailing algorithm ([`iomt_events::changefeed`]) lets through to the event log, and only
//! then checkpoints the watermark and the seen set.
//!
//! The same change read twice (a page shifted by a write, a cycle re-run after a crash) is the
//! same event: its id is derived from the resource version and the kind, as for the events of
//! iomt's own writes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use iomt_core::{Backoff, Timestamp};
use iomt_events::changefeed::{Cycle, FeedEntry, Tail, TailSettings, TailState, read_history_page};
use iomt_fhir::{FhirClient, FhirError};
use serde_json::Value;
use tokio::sync::watch;

use crate::Metrics;
use crate::config::{ChangeFeed, FeedFallback, StartAtKind};
use crate::events::{Outbox, OutboxError};

/// Why the feed cannot run.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The server offers no history the feed can read.
    #[error("{0}")]
    NoHistory(String),
    /// The checkpoint file cannot be read or written.
    #[error("the change feed checkpoint {path}: {message}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The capability statement could not be read.
    #[error("reading the FHIR server's capabilities: {0}")]
    Metadata(#[source] FhirError),
}

/// How a feed ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedReport {
    /// Cycles completed.
    pub cycles: u64,
    /// Changes appended to the event log.
    pub changes: u64,
    /// Late arrivals among them.
    pub late_arrivals: u64,
    /// The watermark checkpointed last.
    pub watermark: Option<String>,
}

/// What the feed reads: the system history, these types' histories, or (the fallback) these
/// types' searches by `_lastUpdated`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `[base]/_history`.
    System,
    /// `[base]/Type/_history` for each.
    Types(Vec<String>),
    /// `[base]/Type?_lastUpdated=ge…&_sort=_lastUpdated` for each: current versions only.
    Search(Vec<String>),
}

impl Scope {
    /// What the server's capability statement offers for the configured types: the system
    /// history when no types are named and the server has it; else each type's history, which
    /// the server must offer for every type named.
    pub fn from_capabilities(
        statement: &Value,
        wanted: &[String],
        fallback: FeedFallback,
    ) -> Result<Self, FeedError> {
        let rest = statement
            .pointer("/rest")
            .and_then(Value::as_array)
            .and_then(|r| r.iter().find(|r| r["mode"] == "server"));
        let has = |interactions: Option<&Value>, code: &str| {
            interactions
                .and_then(Value::as_array)
                .is_some_and(|list| list.iter().any(|i| i["code"] == code))
        };
        let system = rest.is_some_and(|r| has(r.get("interaction"), "history-system"));
        let typed: Vec<String> = rest
            .and_then(|r| r.get("resource"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|r| has(r.get("interaction"), "history-type"))
            .filter_map(|r| r["type"].as_str().map(str::to_owned))
            .collect();
        if !system && typed.is_empty() && fallback == FeedFallback::LastUpdatedSearch {
            let searchable: Vec<String> = rest
                .and_then(|r| r.get("resource"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|r| has(r.get("interaction"), "search-type"))
                .filter_map(|r| r["type"].as_str().map(str::to_owned))
                .filter(|t| wanted.is_empty() || wanted.contains(t))
                .collect();
            if searchable.is_empty() {
                return Err(FeedError::NoHistory(
                    "the FHIR server offers no history and no type search (search-type) to fall back on".to_owned(),
                ));
            }
            tracing::warn!(
                "no history on this FHIR server: searching by _lastUpdated, which misses deletions and versions overwritten between polls"
            );
            return Ok(Scope::Search(searchable));
        }
        if wanted.is_empty() {
            if system {
                return Ok(Scope::System);
            }
            if typed.is_empty() {
                return Err(FeedError::NoHistory(
                    "the FHIR server's capability statement offers neither the system history \
                     (history-system) nor any type history (history-type): it has no change \
                     feed to read (change_feed.fallback = \"last-updated-search\" searches by \
                     _lastUpdated instead, without deletions)"
                        .to_owned(),
                ));
            }
            return Ok(Scope::Types(typed));
        }
        let missing: Vec<&String> = wanted.iter().filter(|t| !typed.contains(t)).collect();
        if !missing.is_empty() {
            return Err(FeedError::NoHistory(format!(
                "the FHIR server offers no type history (history-type) for {missing:?} \
                 (change_feed.resource_types)"
            )));
        }
        Ok(Scope::Types(wanted.to_vec()))
    }

    /// The first page of each history to read after `since`.
    fn first_pages(&self, since: Option<Timestamp>, count: usize) -> Vec<String> {
        let query = match since {
            // At millisecond precision, which every server reads.
            Some(t) => format!("_since={}&_count={count}", millis(t)),
            None => format!("_count={count}"),
        };
        match self {
            Scope::System => vec![format!("_history?{query}")],
            Scope::Types(types) => types
                .iter()
                .map(|t| format!("{t}/_history?{query}"))
                .collect(),
            Scope::Search(types) => {
                let since = since.map(|t| format!("_lastUpdated=ge{}&", millis(t)));
                types
                    .iter()
                    .map(|t| {
                        format!(
                            "{t}?{}_sort=_lastUpdated&_count={count}",
                            since.as_deref().unwrap_or_default()
                        )
                    })
                    .collect()
            }
        }
    }
}

/// An instant as `2026-01-01T00:00:00.000Z`.
fn millis(t: Timestamp) -> String {
    t.as_datetime().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// The feed's checkpoint: a JSON file replaced atomically, or, in cluster mode, a blob of the
/// checkpoint container (a pod's disk goes with the pod).
#[derive(Debug, Clone)]
pub enum FeedCheckpoint {
    /// `{state_dir}/changefeed.json`.
    File(PathBuf),
    /// A blob named after the FHIR server.
    Blob {
        /// The `[checkpoints]` container.
        container: Box<crate::pipeline::BlobContainer>,
        /// `changefeed/<host>-<hash of the URL>.json`.
        name: String,
    },
}

impl FeedCheckpoint {
    /// The checkpoint in `state_dir`.
    pub fn in_dir(state_dir: &Path) -> Self {
        Self::File(state_dir.join("changefeed.json"))
    }

    /// The checkpoint of the feed of `fhir_url` in `container`.
    pub fn in_container(container: crate::pipeline::BlobContainer, fhir_url: &str) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        fhir_url.hash(&mut h);
        let host = reqwest::Url::parse(fhir_url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_else(|| "fhir".to_owned());
        Self::Blob {
            container: Box::new(container),
            name: format!("changefeed/{host}-{:016x}.json", h.finish()),
        }
    }

    fn fail(&self, message: impl ToString) -> FeedError {
        FeedError::Checkpoint {
            path: match self {
                Self::File(path) => path.clone(),
                Self::Blob { container, name } => {
                    PathBuf::from(format!("{}/{name}", container.url()))
                }
            },
            message: message.to_string(),
        }
    }

    /// The state saved last; a fresh one when there is none.
    pub async fn load(&self) -> Result<TailState, FeedError> {
        let bytes = match self {
            Self::File(path) => match std::fs::read(path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(TailState::default());
                }
                Err(e) => return Err(self.fail(e)),
            },
            Self::Blob { container, name } => {
                container.ensure().await.map_err(|e| self.fail(e))?;
                match container.read_text(name).await.map_err(|e| self.fail(e))? {
                    Some(text) => text.into_bytes(),
                    None => return Ok(TailState::default()),
                }
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| self.fail(e))
    }

    async fn save(&self, state: &TailState) -> Result<(), FeedError> {
        let text = serde_json::to_vec(state).map_err(|e| self.fail(e))?;
        match self {
            Self::File(path) => {
                let tmp = path.with_extension("json.tmp");
                let write = || -> std::io::Result<()> {
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    let mut file = std::fs::File::create(&tmp)?;
                    std::io::Write::write_all(&mut file, &text)?;
                    file.sync_all()?;
                    std::fs::rename(&tmp, path)
                };
                write().map_err(|e| self.fail(e))
            }
            Self::Blob { container, name } => container
                .replace(name, text)
                .await
                .map_err(|e| self.fail(e)),
        }
    }
}

/// Reads every page of one cycle; the server's time when the cycle began, and the changes.
async fn read_cycle(
    client: &FhirClient,
    scope: &Scope,
    since: Option<Timestamp>,
    page_size: usize,
) -> Result<(Option<Timestamp>, Vec<FeedEntry>, usize), String> {
    let mut server_time = None;
    let mut entries = Vec::new();
    let mut skipped = 0;
    for first in scope.first_pages(since, page_size) {
        let mut next = Some(first);
        let mut pages = 0usize;
        while let Some(target) = next.take() {
            let (bundle, date) = client.get_json(&target).await.map_err(|e| {
                // An error may quote the server's answer, which can hold patient data: the
                // warning names the kind, the details go to debug logs when allowed.
                if iomt_core::log_phi() {
                    tracing::debug!(error = %e, "history read failed");
                }
                format!("reading the history failed ({})", e.metric_name())
            })?;
            if server_time.is_none() {
                server_time = date.map(system_time);
            }
            let page = read_history_page(&bundle).map_err(|e| format!("a history page: {e}"))?;
            if !page.skipped.is_empty() {
                tracing::warn!(
                    entries = page.skipped.len(),
                    first = %page.skipped[0],
                    "history entries that cannot be placed were skipped"
                );
            }
            skipped += page.skipped.len();
            entries.extend(page.entries);
            pages += 1;
            // A server whose `next` links loop would page forever.
            if pages > 1_000_000 {
                return Err("the history has over a million pages in one cycle".into());
            }
            next = page.next;
        }
    }
    Ok((server_time, entries, skipped))
}

fn system_time(t: SystemTime) -> Timestamp {
    let millis = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    Timestamp::from_unix_millis(millis).unwrap_or_else(Timestamp::now)
}

/// Serves the doorbell: `POST /notify` (a Subscriptions Backport `id-only` rest-hook
/// notification, or any POST) rings `bell`, which starts a cycle at once. The notification's
/// content is not read: the history is the source of truth.
pub async fn serve_doorbell(
    addr: std::net::SocketAddr,
    bell: Arc<tokio::sync::Notify>,
) -> std::io::Result<std::net::SocketAddr> {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/notify",
        post(move || {
            let bell = bell.clone();
            async move {
                bell.notify_one();
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the change feed doorbell stopped");
        }
    });
    Ok(bound)
}

/// Runs the feed until `stop` turns true: cycle, append, checkpoint, wait for the poll
/// interval or the doorbell.
pub async fn run_feed(
    client: FhirClient,
    settings: &ChangeFeed,
    checkpoint: FeedCheckpoint,
    outbox: Outbox,
    metrics: Arc<Metrics>,
    bell: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
) -> Result<FeedReport, FeedError> {
    // A server or checkpoint container that cannot be reached yet is waited for (with the
    // client's own retries in each attempt); what it answers, it answers for good.
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let statement = loop {
        match client.get_json("metadata").await {
            Ok((statement, _)) => break statement,
            Err(e @ FhirError::Unavailable { .. }) => {
                tracing::warn!(error = %e, "cannot reach the FHIR server; trying again");
            }
            Err(e) => return Err(FeedError::Metadata(e)),
        }
        if !pause(backoff.next_delay(), &mut stop).await {
            return Ok(FeedReport::default());
        }
    };
    let scope = Scope::from_capabilities(&statement, &settings.resource_types, settings.fallback)?;
    tracing::info!(scope = ?scope, "reading the FHIR server's history");
    let tail_settings = TailSettings {
        settle: settings.settle,
        overlap: settings.overlap,
    };
    let state = loop {
        match checkpoint.load().await {
            Ok(state) => break state,
            Err(e) if matches!(checkpoint, FeedCheckpoint::Blob { .. }) => {
                tracing::warn!(error = %e, "cannot read the change feed checkpoint; trying again");
            }
            Err(e) => return Err(e),
        }
        if !pause(backoff.next_delay(), &mut stop).await {
            return Ok(FeedReport::default());
        }
    };
    let mut tail = Tail::new(tail_settings, &state).map_err(|e| checkpoint.fail(e))?;
    let mut report = FeedReport {
        watermark: state.watermark.clone(),
        ..FeedReport::default()
    };
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut fresh = state.watermark.is_none();
    while !*stop.borrow() {
        let wait = match cycle(
            &client, &scope, settings, &mut tail, fresh, &outbox, &metrics,
        )
        .await
        {
            Ok(c) => {
                fresh = false;
                backoff.reset();
                // A checkpoint that cannot be written is retried with the next cycle: the
                // changes are in the event log, and re-reading them is harmless.
                if let Err(e) = checkpoint.save(&tail.state()).await {
                    tracing::warn!(error = %e, "cannot write the change feed checkpoint");
                }
                report.cycles += 1;
                report.changes += c.entries.len() as u64;
                report.late_arrivals += c.late_arrivals as u64;
                report.watermark = tail.state().watermark;
                next_cycle(&c, settings)
            }
            Err(e) => {
                tracing::warn!(error = %e, "change feed cycle failed; trying again");
                backoff.next_delay()
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = bell.notified() => {}
            _ = stop.changed() => {}
        }
    }
    Ok(report)
}

/// Waits `wait`; `false` when the feed is stopped meanwhile.
async fn pause(wait: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        _ = stop.wait_for(|stopped| *stopped) => false,
    }
}

/// When the next cycle runs: after the poll interval, or sooner when a change was held back
/// as too young, at the moment the server's clock (dated to the second) lets it pass. The
/// local clock only schedules that read; whether a change passes is decided by the server's.
/// At least 200 ms apart, so a local clock ahead of the server's cannot make cycles spin.
fn next_cycle(cycle: &Cycle, settings: &ChangeFeed) -> Duration {
    let Some(young) = cycle.held_back else {
        return settings.poll_interval;
    };
    let settle_ms = settings.settle.as_millis().min(i64::MAX as u128) as i64;
    // The first whole second of server time after `young + settle`.
    let due_ms = (young.unix_millis().saturating_add(settle_ms) / 1000 + 1) * 1000;
    let wait_ms = due_ms.saturating_sub(Timestamp::now().unix_millis());
    Duration::from_millis(wait_ms.max(0) as u64).clamp(
        Duration::from_millis(200),
        settings.poll_interval.max(Duration::from_millis(200)),
    )
}

/// One cycle: read, select, append; the tail commits once the event log took the changes.
async fn cycle(
    client: &FhirClient,
    scope: &Scope,
    settings: &ChangeFeed,
    tail: &mut Tail,
    fresh: bool,
    outbox: &Outbox,
    metrics: &Metrics,
) -> Result<Cycle, String> {
    let (server_time, entries, skipped) =
        read_cycle(client, scope, tail.since(), settings.page_size).await?;
    let Some(server_time) = server_time else {
        return Err("the FHIR server sends no Date header: the feed reckons with its clock".into());
    };
    if fresh && settings.start_at == StartAtKind::Latest {
        tail.start_at(server_time);
        let cycle = tail.cycle(server_time, Vec::new());
        tail.commit(&cycle);
        return Ok(cycle);
    }
    let cycle = tail.cycle(server_time, entries);
    let written: Vec<_> = cycle.entries.iter().map(FeedEntry::to_written).collect();
    outbox
        .append(&written)
        .await
        .map_err(|e: OutboxError| format!("appending to the event log: {e}"))?;
    tail.commit(&cycle);
    let lag = (server_time.unix_millis() - cycle.upper.unix_millis()) / 1000;
    metrics.feed_cycle(cycle.entries.len(), cycle.late_arrivals, skipped, lag);
    if cycle.late_arrivals > 0 {
        tracing::info!(
            late = cycle.late_arrivals,
            "changes older than the watermark were caught by the overlap"
        );
    }
    Ok(cycle)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_scope_follows_the_capability_statement() {
        let statement = |system: bool, types: &[&str]| {
            json!({"resourceType": "CapabilityStatement", "rest": [{"mode": "server",
                "interaction": if system { json!([{"code": "history-system"}]) } else { json!([]) },
                "resource": types.iter().map(|t| json!({"type": t,
                    "interaction": [{"code": "read"}, {"code": "history-type"}]})).collect::<Vec<_>>()}]})
        };
        assert_eq!(
            Scope::from_capabilities(&statement(true, &["Patient"]), &[], FeedFallback::None)
                .unwrap(),
            Scope::System
        );
        assert_eq!(
            Scope::from_capabilities(
                &statement(false, &["Patient", "Device"]),
                &[],
                FeedFallback::None
            )
            .unwrap(),
            Scope::Types(vec!["Patient".into(), "Device".into()])
        );
        let wanted = vec!["Consent".to_owned()];
        let err =
            Scope::from_capabilities(&statement(true, &["Patient"]), &wanted, FeedFallback::None)
                .unwrap_err();
        assert!(err.to_string().contains("Consent"), "{err}");
        let err =
            Scope::from_capabilities(&statement(false, &[]), &[], FeedFallback::None).unwrap_err();
        assert!(err.to_string().contains("history-system"), "{err}");
        // Without history, the fallback searches the types that can be searched.
        let searchable = json!({"resourceType": "CapabilityStatement", "rest": [{"mode": "server",
            "resource": [{"type": "Consent", "interaction": [{"code": "search-type"}]},
                         {"type": "Binary", "interaction": [{"code": "read"}]}]}]});
        let scope =
            Scope::from_capabilities(&searchable, &[], FeedFallback::LastUpdatedSearch).unwrap();
        assert_eq!(scope, Scope::Search(vec!["Consent".into()]));
        assert_eq!(
            scope.first_pages(Some(Timestamp::parse("2026-01-01T00:00:00Z").unwrap()), 10),
            ["Consent?_lastUpdated=ge2026-01-01T00:00:00.000Z&_sort=_lastUpdated&_count=10"]
        );
        assert_eq!(
            Scope::Types(vec!["Patient".into()]).first_pages(
                Some(Timestamp::parse("2026-01-01T00:00:00.1234567Z").unwrap()),
                50
            ),
            ["Patient/_history?_since=2026-01-01T00:00:00.123Z&_count=50"]
        );
    }
}
