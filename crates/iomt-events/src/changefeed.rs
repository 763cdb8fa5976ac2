//! A change feed read from any FHIR server's history, without I/O: reading a `_history` Bundle
//! page (or the lines of a Bulk Data export) into changes, and the tailing algorithm that decides which of them to publish so that
//! none is missed and none published twice (`../shared/docs/change-feed.md` §3).
//!
//! A server stamps `lastUpdated` when a transaction begins, not when it commits, so a change
//! can become visible after changes with later stamps were read. The tail therefore reads from
//! its watermark minus an `overlap`, publishes only changes older than the server's clock minus
//! a `settle` interval, and remembers what it published in the overlap window, so a change read
//! twice is published once. Nothing is missed while the longest transaction plus the server's
//! clock skew stays under `settle + overlap`.

use std::collections::BTreeSet;
use std::time::Duration;

use iomt_core::{Action, Timestamp, Written};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ChangeKind;

/// One change read from a history Bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEntry {
    /// `Observation`, `Patient`, …
    pub resource_type: String,
    /// The logical id.
    pub id: String,
    /// The version the change produced.
    pub version_id: String,
    /// Its `meta.lastUpdated` (or the entry's `response.lastModified`).
    pub last_updated: Timestamp,
    /// What happened.
    pub kind: ChangeKind,
}

/// What identifies a change in the seen set, in publishing order.
type Key = (Timestamp, String, VersionOrder, String);

/// Orders version ids as numbers when they are numbers (`9` before `10`), else as text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum VersionOrder {
    Number(u64),
    Text(String),
}

impl FeedEntry {
    fn key(&self) -> Key {
        let version = match self.version_id.parse() {
            Ok(n) => VersionOrder::Number(n),
            Err(_) => VersionOrder::Text(self.version_id.clone()),
        };
        (
            self.last_updated,
            format!("{}/{}", self.resource_type, self.id),
            version,
            self.kind.name().to_owned(),
        )
    }

    /// The change as the outbox takes writes: events made from it carry the same id as those
    /// of iomt's own writes of the same version.
    pub fn to_written(&self) -> Written {
        Written {
            resource_type: self.resource_type.clone(),
            id: self.id.clone(),
            version_id: Some(self.version_id.clone()),
            last_updated: Some(self.last_updated.to_string()),
            action: match self.kind {
                ChangeKind::Created => Action::Created,
                ChangeKind::Updated => Action::Updated,
                ChangeKind::Deleted => Action::Deleted,
            },
            identity: false,
        }
    }
}

/// One page of a history Bundle.
#[derive(Debug, Default)]
pub struct Page {
    /// The changes it names.
    pub entries: Vec<FeedEntry>,
    /// The `next` link, exactly as given.
    pub next: Option<String>,
    /// Entries that name no resource, version or time, and why (they cannot be placed).
    pub skipped: Vec<String>,
}

/// Reads a `history` Bundle page.
///
/// Entry shapes vary among servers: a resource, a `request`, or both. The type and id come
/// from the resource, `fullUrl` or `request.url`; the version from `meta.versionId`, a
/// `_history/N` part or the ETag; the time from `meta.lastUpdated` or
/// `response.lastModified`. A `DELETE` request is a deletion, with or without a resource; a
/// `201` answer (or, without an answer, a POST or a version `1`) a creation; anything else an
/// update.
pub fn read_history_page(bundle: &Value) -> Result<Page, String> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err("the answer is not a Bundle".to_owned());
    }
    let mut page = Page {
        next: bundle
            .get("link")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|l| l.get("relation").and_then(Value::as_str) == Some("next"))
            .and_then(|l| l.get("url").and_then(Value::as_str))
            .map(str::to_owned),
        ..Page::default()
    };
    let entries = bundle.get("entry").and_then(Value::as_array);
    for (i, entry) in entries.into_iter().flatten().enumerate() {
        match read_entry(entry) {
            Ok(e) => page.entries.push(e),
            Err(why) => page.skipped.push(format!("entry {i}: {why}")),
        }
    }
    Ok(page)
}

fn read_entry(entry: &Value) -> Result<FeedEntry, String> {
    let text = |v: &Value, pointer: &str| {
        v.pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let resource = entry.get("resource").filter(|r| r.is_object());
    let method = text(entry, "/request/method").map(|m| m.to_ascii_uppercase());
    // Type, id and version from every place that may hold them, in order of trust.
    let mut parts: Vec<Parts> = Vec::new();
    if let Some(r) = resource {
        parts.push((
            text(r, "/resourceType"),
            text(r, "/id"),
            text(r, "/meta/versionId"),
        ));
    }
    for url in [
        text(entry, "/fullUrl"),
        text(entry, "/request/url"),
        text(entry, "/response/location"),
    ]
    .into_iter()
    .flatten()
    {
        parts.push(reference_parts(&url));
    }
    let etag_version = text(entry, "/response/etag")
        .map(|e| e.trim_start_matches("W/").trim_matches('"').to_owned());
    let first = |pick: fn(&Parts) -> Option<String>| parts.iter().find_map(pick);
    let resource_type = first(|p| p.0.clone()).ok_or("names no resource type")?;
    let id = first(|p| p.1.clone()).ok_or("names no resource id")?;
    let version_id = first(|p| p.2.clone())
        .or(etag_version.filter(|v| !v.is_empty()))
        .ok_or("names no version")?;
    let time = resource
        .and_then(|r| text(r, "/meta/lastUpdated"))
        .or_else(|| text(entry, "/response/lastModified"))
        .ok_or("has no lastUpdated")?;
    let last_updated =
        Timestamp::parse(&time).map_err(|_| format!("lastUpdated {time:?} is not an instant"))?;
    // A creation answers 201 (a PUT that creates too); without an answer, a POST creates, and
    // with neither, version `1` is taken for a creation (servers with opaque versions, such as
    // UUIDs, send the status).
    let status = text(entry, "/response/status");
    let kind = match (method.as_deref(), status.as_deref()) {
        (Some("DELETE"), _) => ChangeKind::Deleted,
        (_, Some(s)) if s.starts_with("201") => ChangeKind::Created,
        (_, Some(_)) => ChangeKind::Updated,
        (Some("POST"), None) => ChangeKind::Created,
        _ if version_id == "1" => ChangeKind::Created,
        _ => ChangeKind::Updated,
    };
    Ok(FeedEntry {
        resource_type,
        id,
        version_id,
        last_updated,
        kind,
    })
}

/// What a place in an entry says of the change: type, id and version, where it says them.
type Parts = (Option<String>, Option<String>, Option<String>);

/// Type, id and version of a reference (`…/Type/id`, `…/Type/id/_history/N`); a search URL
/// (`Type?…`, a conditional create) names the type only.
fn reference_parts(url: &str) -> Parts {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let is_type = |s: &str| s.chars().next().is_some_and(|c| c.is_ascii_uppercase());
    let (at, version) = match segments.iter().rposition(|s| *s == "_history") {
        Some(h) => (h, segments.get(h + 1).map(|v| (*v).to_owned())),
        None => (segments.len(), None),
    };
    match &segments[..at] {
        [.., t, id] if is_type(t) => (Some((*t).to_owned()), Some((*id).to_owned()), version),
        [.., t] if is_type(t) && url.contains('?') => (Some((*t).to_owned()), None, None),
        _ => (None, None, None),
    }
}

/// The change a FHIR Bulk Data export line names: the resource's current version, created at
/// version `1`, else updated (an export says no more).
pub fn exported_resource(resource: &Value) -> Result<FeedEntry, String> {
    let text = |pointer: &str| resource.pointer(pointer).and_then(Value::as_str);
    let resource_type = text("/resourceType").ok_or("the line is not a resource")?;
    let id = text("/id").ok_or("the resource has no id")?;
    let version_id = text("/meta/versionId").unwrap_or("0");
    let time = text("/meta/lastUpdated").ok_or("the resource has no meta.lastUpdated")?;
    let last_updated =
        Timestamp::parse(time).map_err(|_| format!("lastUpdated {time:?} is not an instant"))?;
    Ok(FeedEntry {
        resource_type: resource_type.to_owned(),
        id: id.to_owned(),
        version_id: version_id.to_owned(),
        last_updated,
        kind: if version_id == "1" {
            ChangeKind::Created
        } else {
            ChangeKind::Updated
        },
    })
}

/// The deletions a line of a Bulk Data export's `deleted` files names: a Bundle whose entries
/// are `DELETE` requests (`Type/id`), at the export's `transactionTime` (the entries carry no
/// time of their own); a version from an ETag when one is given, else `0`.
pub fn exported_deletions(
    bundle: &Value,
    transaction_time: Timestamp,
) -> Result<Vec<FeedEntry>, String> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err("a line of a deleted file is not a Bundle".to_owned());
    }
    let mut out = Vec::new();
    for (i, entry) in bundle
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let method = entry.pointer("/request/method").and_then(Value::as_str);
        if !method.is_some_and(|m| m.eq_ignore_ascii_case("DELETE")) {
            return Err(format!("entry {i} is not a DELETE request"));
        }
        let url = entry
            .pointer("/request/url")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let (Some(resource_type), Some(id), version) = reference_parts(url) else {
            return Err(format!("entry {i}: {url:?} names no Type/id"));
        };
        let etag = entry
            .pointer("/response/etag")
            .and_then(Value::as_str)
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_owned());
        out.push(FeedEntry {
            resource_type,
            id,
            version_id: version.or(etag).unwrap_or_else(|| "0".to_owned()),
            last_updated: transaction_time,
            kind: ChangeKind::Deleted,
        });
    }
    Ok(out)
}

/// The settle and overlap intervals of a tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailSettings {
    /// Changes younger than this (by the server's clock) wait for the next cycle: their
    /// transaction may still be committing around them.
    pub settle: Duration,
    /// Each cycle reads again this far below the watermark, to catch changes that became
    /// visible late with an older `lastUpdated`.
    pub overlap: Duration,
}

/// The tail's state, checkpointed once the event log took what a cycle published.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TailState {
    /// Everything before it is published (an instant); none before the first cycle.
    pub watermark: Option<String>,
    /// What was published at or after `watermark - overlap`:
    /// `[lastUpdated, "Type/id", versionId, kind]`.
    pub seen: Vec<[String; 4]>,
}

/// What one cycle publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cycle {
    /// The changes to publish, in `(lastUpdated, type, id, versionId)` order.
    pub entries: Vec<FeedEntry>,
    /// The watermark once they are published.
    pub upper: Timestamp,
    /// How many of them are older than the previous watermark: caught only thanks to the
    /// overlap. A steady count means the overlap (or the settle interval) is thin.
    pub late_arrivals: usize,
    /// The oldest change read but held back as younger than the settle interval: it is
    /// published by a cycle whose server time is past it plus the settle interval.
    pub held_back: Option<Timestamp>,
}

/// The tailing algorithm's state.
#[derive(Debug, Clone)]
pub struct Tail {
    settings: TailSettings,
    watermark: Option<Timestamp>,
    seen: BTreeSet<Key>,
}

/// The server's clock at a read. Its `Date` is dated to the second, and servers that cache it
/// (hyper does) send one up to a second old; a change the server stamped proves its clock had
/// passed that instant, so the newest stamp read counts too, but only up to two seconds past
/// the `Date`: a stamp from a skewed node or an import with future times must not carry the
/// watermark (and with it `_since`) past changes still to come.
fn server_clock(date: Timestamp, entries: &[FeedEntry]) -> Timestamp {
    let limit = date.unix_millis().saturating_add(2_000);
    entries
        .iter()
        .map(|e| e.last_updated)
        .filter(|t| t.unix_millis() <= limit)
        .max()
        .map_or(date, |newest| newest.max(date))
}

/// `time - duration`, at whole milliseconds (rounded down, so the window only widens):
/// servers compare `_since` at millisecond precision or coarser.
fn before(time: Timestamp, duration: Duration) -> Timestamp {
    let millis = time.unix_millis() - duration.as_millis().min(i64::MAX as u128) as i64;
    Timestamp::from_unix_millis(millis).unwrap_or(time)
}

impl Tail {
    /// A tail from its checkpointed state (a fresh one reads the whole history).
    pub fn new(settings: TailSettings, state: &TailState) -> Result<Self, String> {
        let time = |t: &str| Timestamp::parse(t).map_err(|_| format!("{t:?} is not an instant"));
        let watermark = state.watermark.as_deref().map(time).transpose()?;
        let mut seen = BTreeSet::new();
        for [at, reference, version, kind] in &state.seen {
            let (resource_type, id) = reference
                .split_once('/')
                .ok_or_else(|| format!("{reference:?} is not Type/id"))?;
            let kind = match kind.as_str() {
                "Created" => ChangeKind::Created,
                "Updated" => ChangeKind::Updated,
                "Deleted" => ChangeKind::Deleted,
                other => return Err(format!("{other:?} is not a change kind")),
            };
            let entry = FeedEntry {
                resource_type: resource_type.to_owned(),
                id: id.to_owned(),
                version_id: version.clone(),
                last_updated: time(at)?,
                kind,
            };
            seen.insert(entry.key());
        }
        Ok(Self {
            settings,
            watermark,
            seen,
        })
    }

    /// Starts at `server_time - settle` without reading what came before (`start_at =
    /// "latest"`).
    pub fn start_at(&mut self, server_time: Timestamp) {
        if self.watermark.is_none() {
            self.watermark = Some(before(server_time, self.settings.settle));
        }
    }

    /// The `_since` of the next read: the watermark minus the overlap; `None` reads the whole
    /// history.
    pub fn since(&self) -> Option<Timestamp> {
        self.watermark.map(|w| before(w, self.settings.overlap))
    }

    /// What to publish of `entries`, read (every page) after [`Tail::since`], given the server's
    /// time when the read began: the changes older than `server_time - settle` not yet
    /// published, in order.
    pub fn cycle(&self, server_time: Timestamp, entries: Vec<FeedEntry>) -> Cycle {
        let upper = before(server_clock(server_time, &entries), self.settings.settle);
        // The watermark never moves back, even if the server's clock does.
        let upper = self.watermark.map_or(upper, |w| upper.max(w));
        // Below `since` lies what earlier cycles published and no longer remember: a server
        // that ignores `_since` must not make it published again.
        let since = self.since();
        let held_back = entries
            .iter()
            .filter(|e| e.last_updated >= upper)
            .map(|e| e.last_updated)
            .min();
        let mut keep: Vec<(Key, FeedEntry)> = entries
            .into_iter()
            .filter(|e| e.last_updated < upper && since.is_none_or(|s| e.last_updated >= s))
            .map(|e| (e.key(), e))
            .filter(|(k, _)| !self.seen.contains(k))
            .collect();
        keep.sort_by(|a, b| a.0.cmp(&b.0));
        keep.dedup_by(|a, b| a.0 == b.0);
        let late_arrivals = match self.watermark {
            Some(w) => keep.iter().filter(|(_, e)| e.last_updated < w).count(),
            None => 0,
        };
        Cycle {
            entries: keep.into_iter().map(|(_, e)| e).collect(),
            upper,
            late_arrivals,
            held_back,
        }
    }

    /// Records a cycle as published (once the event log took its changes): the watermark
    /// moves to its upper bound, and the seen set keeps only what the next reads can return
    /// again.
    pub fn commit(&mut self, cycle: &Cycle) {
        self.seen.extend(cycle.entries.iter().map(FeedEntry::key));
        self.watermark = Some(self.watermark.map_or(cycle.upper, |w| w.max(cycle.upper)));
        if let Some(floor) = self.since() {
            self.seen = self.seen.split_off(&(
                floor,
                String::new(),
                VersionOrder::Number(0),
                String::new(),
            ));
        }
    }

    /// The state to checkpoint.
    pub fn state(&self) -> TailState {
        TailState {
            watermark: self.watermark.map(|w| w.to_string()),
            seen: self
                .seen
                .iter()
                .map(|(at, reference, version, kind)| {
                    let version = match version {
                        VersionOrder::Number(n) => n.to_string(),
                        VersionOrder::Text(t) => t.clone(),
                    };
                    [at.to_string(), reference.clone(), version, kind.clone()]
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn t(s: &str) -> Timestamp {
        Timestamp::parse(s).unwrap()
    }

    fn entry(id: &str, version: &str, at: &str) -> FeedEntry {
        FeedEntry {
            resource_type: "Patient".into(),
            id: id.into(),
            version_id: version.into(),
            last_updated: t(at),
            kind: if version == "1" {
                ChangeKind::Created
            } else {
                ChangeKind::Updated
            },
        }
    }

    const SETTINGS: TailSettings = TailSettings {
        settle: Duration::from_secs(2),
        overlap: Duration::from_secs(10),
    };

    #[test]
    fn entry_shapes_servers_send() {
        let bundle = json!({"resourceType": "Bundle", "type": "history",
        "link": [{"relation": "self", "url": "a"}, {"relation": "next", "url": "http://s/fhir/_history?_since=x&_page=2"}],
        "entry": [
            // Resource and request.
            {"fullUrl": "http://s/fhir/Patient/p1", "resource": {"resourceType": "Patient", "id": "p1",
                "meta": {"versionId": "1", "lastUpdated": "2026-01-01T00:00:00.000Z"}},
             "request": {"method": "POST", "url": "Patient"}},
            // A delete without a resource: the id and version from the URL and ETag.
            {"request": {"method": "DELETE", "url": "Patient/p1"},
             "response": {"status": "204", "etag": "W/\"2\"", "lastModified": "2026-01-01T00:00:01Z"}},
            // No request: an update through other channels.
            {"resource": {"resourceType": "Observation", "id": "o1",
                "meta": {"versionId": "3", "lastUpdated": "2026-01-01T00:00:02Z"}}},
            // Version from the history URL.
            {"fullUrl": "Device/d1/_history/7", "resource": {"resourceType": "Device", "id": "d1",
                "meta": {"lastUpdated": "2026-01-01T00:00:03Z"}}, "request": {"method": "PUT", "url": "Device/d1"}},
            // Cannot be placed.
            {"request": {"method": "POST", "url": "Patient?identifier=x"}},
        ]});
        let page = read_history_page(&bundle).unwrap();
        assert_eq!(
            page.next.as_deref(),
            Some("http://s/fhir/_history?_since=x&_page=2")
        );
        let seen: Vec<(String, String, String, ChangeKind)> = page
            .entries
            .iter()
            .map(|e| {
                (
                    e.resource_type.clone(),
                    e.id.clone(),
                    e.version_id.clone(),
                    e.kind,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (
                    "Patient".into(),
                    "p1".into(),
                    "1".into(),
                    ChangeKind::Created
                ),
                (
                    "Patient".into(),
                    "p1".into(),
                    "2".into(),
                    ChangeKind::Deleted
                ),
                (
                    "Observation".into(),
                    "o1".into(),
                    "3".into(),
                    ChangeKind::Updated
                ),
                (
                    "Device".into(),
                    "d1".into(),
                    "7".into(),
                    ChangeKind::Updated
                ),
            ]
        );
        assert_eq!(page.skipped.len(), 1, "{:?}", page.skipped);
        assert!(read_history_page(&json!({"resourceType": "Patient"})).is_err());
    }

    #[test]
    fn settle_overlap_and_the_seen_set_publish_each_change_once() {
        let mut tail = Tail::new(SETTINGS, &TailState::default()).unwrap();
        assert_eq!(tail.since(), None);
        // Two changes share an instant; one is too young to publish.
        let read = vec![
            entry("b", "1", "2026-01-01T00:00:05Z"),
            entry("a", "1", "2026-01-01T00:00:05Z"),
            entry("c", "1", "2026-01-01T00:00:09Z"),
        ];
        let cycle = tail.cycle(t("2026-01-01T00:00:10Z"), read.clone());
        let ids: Vec<&str> = cycle.entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"], "ordered by time, then Type/id");
        assert_eq!(cycle.upper, t("2026-01-01T00:00:08Z"));
        assert_eq!(cycle.held_back, Some(t("2026-01-01T00:00:09Z")));
        tail.commit(&cycle);
        assert_eq!(tail.since(), Some(t("2025-12-31T23:59:58Z")));

        // The next read returns them again (overlap), plus a late arrival older than the
        // watermark and the change that was too young.
        let mut again = read;
        again.push(entry("late", "1", "2026-01-01T00:00:06Z"));
        let cycle = tail.cycle(t("2026-01-01T00:00:12Z"), again);
        let ids: Vec<&str> = cycle.entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["late", "c"]);
        assert_eq!(cycle.late_arrivals, 1);
        assert_eq!(cycle.held_back, None);
        tail.commit(&cycle);

        // The state round-trips, and the seen set forgets what the reads can no longer return.
        let state = tail.state();
        let restored = Tail::new(SETTINGS, &state).unwrap();
        assert_eq!(restored.state(), state);
        let cycle = restored.cycle(
            t("2026-01-01T00:00:30Z"),
            vec![entry("a", "1", "2026-01-01T00:00:05Z")],
        );
        assert!(cycle.entries.is_empty());
        let mut later = restored;
        later.commit(&cycle);
        later.commit(&later.cycle(t("2026-01-01T00:01:00Z"), vec![]));
        assert!(later.state().seen.is_empty());
        // A server that ignores `_since` sends what is below it again: it is not republished.
        let old = later.cycle(
            t("2026-01-01T00:01:01Z"),
            vec![entry("a", "1", "2026-01-01T00:00:05Z")],
        );
        assert!(old.entries.is_empty());
    }

    #[test]
    fn a_stamp_read_moves_the_server_clock_past_a_coarse_date_but_not_far() {
        let tail = Tail::new(SETTINGS, &TailState::default()).unwrap();
        // The Date says 10 s; a change stamped 11.5 s proves the clock is past it.
        let read = vec![
            entry("a", "1", "2026-01-01T00:00:09.000Z"),
            entry("b", "1", "2026-01-01T00:00:11.500Z"),
        ];
        let cycle = tail.cycle(t("2026-01-01T00:00:10Z"), read);
        assert_eq!(cycle.upper, t("2026-01-01T00:00:09.500Z"));
        // A stamp far in the future (a skewed node, an import) does not move it.
        let read = vec![entry("c", "1", "2026-01-01T01:00:00Z")];
        let cycle = tail.cycle(t("2026-01-01T00:00:10Z"), read);
        assert_eq!(cycle.upper, t("2026-01-01T00:00:08Z"));
        assert!(cycle.entries.is_empty());
        assert_eq!(cycle.held_back, Some(t("2026-01-01T01:00:00Z")));
    }

    #[test]
    fn bulk_data_lines() {
        let p = exported_resource(&json!({"resourceType": "Patient", "id": "p1",
            "meta": {"versionId": "4", "lastUpdated": "2026-01-01T00:00:00Z"}}))
        .unwrap();
        assert_eq!((p.kind, p.version_id.as_str()), (ChangeKind::Updated, "4"));
        assert!(exported_resource(&json!({"resourceType": "Patient", "id": "p1"})).is_err());
        let at = t("2026-02-01T00:00:00Z");
        let gone = exported_deletions(
            &json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"request": {"method": "DELETE", "url": "Patient/p2"}},
                {"request": {"method": "DELETE", "url": "Observation/o9"}, "response": {"etag": "W/\"3\""}}]}),
            at,
        )
        .unwrap();
        let seen: Vec<(&str, &str, &str)> = gone
            .iter()
            .map(|e| {
                (
                    e.resource_type.as_str(),
                    e.id.as_str(),
                    e.version_id.as_str(),
                )
            })
            .collect();
        assert_eq!(seen, [("Patient", "p2", "0"), ("Observation", "o9", "3")]);
        assert!(
            gone.iter()
                .all(|e| e.kind == ChangeKind::Deleted && e.last_updated == at)
        );
        let put = json!({"resourceType": "Bundle", "entry": [{"request": {"method": "PUT", "url": "Patient/p"}}]});
        assert!(exported_deletions(&put, at).is_err());
    }

    #[test]
    fn versions_order_as_numbers_and_the_watermark_never_moves_back() {
        let mut tail = Tail::new(SETTINGS, &TailState::default()).unwrap();
        let at = "2026-01-01T00:00:05Z";
        let cycle = tail.cycle(
            t("2026-01-01T00:00:10Z"),
            vec![
                entry("a", "10", at),
                entry("a", "9", at),
                entry("a", "9", at),
            ],
        );
        let versions: Vec<&str> = cycle
            .entries
            .iter()
            .map(|e| e.version_id.as_str())
            .collect();
        assert_eq!(versions, ["9", "10"]);
        tail.commit(&cycle);
        let back = tail.cycle(t("2026-01-01T00:00:01Z"), vec![]);
        assert_eq!(back.upper, t("2026-01-01T00:00:08Z"));
        let mut fresh = Tail::new(SETTINGS, &TailState::default()).unwrap();
        fresh.start_at(t("2026-01-01T00:00:10Z"));
        assert_eq!(fresh.since(), Some(t("2025-12-31T23:59:58Z")));
    }
}
