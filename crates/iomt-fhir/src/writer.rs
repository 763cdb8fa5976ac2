//! Creating and merging Observations on the FHIR server with as few requests as possible.
//!
//! MedTech searches for every Observation by identifier and then PUTs it: two requests per
//! observation window, every time. Here the last written version of each Observation is kept
//! in a cache (keyed by its deterministic id), so a window that is written again costs one PUT,
//! or no request at all when the merge changes nothing. On a cache miss one identifier search
//! finds the Observation (including ones MedTech created), then one PUT writes it. A 409 or 412
//! means another writer got there first: the Observation is re-read and merged again.

use std::time::Duration;

use iomt_convert::{
    ConvertError, Merge, ObservationGroup, ResourceIds, SERVICE_SYSTEM, build_observation,
    identifier_value, merge_observation, resource_id,
};
use iomt_core::{Action, Timestamp, Written};
use iomt_templates::fhir::CodeValueTemplate;
use moka::future::Cache;
use serde_json::Value;

use crate::client::{FhirClient, FhirError, Versioned};

/// How many times a conflicting write is re-read and re-merged (MedTech: 2).
const CONFLICT_RETRIES: u32 = 2;

/// Why a window could not be written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WriteError {
    /// The data does not fit the template or the existing Observation.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// The FHIR server failed or rejected the write.
    #[error(transparent)]
    Fhir(#[from] FhirError),
    /// Several Observations carry the identifier (MedTech: MultipleObservationFoundException).
    #[error("MultipleObservationFound: {0} Observations have the identifier")]
    MultipleObservations(usize),
}

/// Writes observation windows.
#[derive(Debug, Clone)]
pub struct ObservationWriter {
    client: FhirClient,
    versions: Cache<String, Versioned>,
}

impl ObservationWriter {
    /// A writer that remembers up to `capacity` Observations for `ttl` (MedTech: 5000, 1 h).
    pub fn new(client: FhirClient, capacity: u64, ttl: Duration) -> Self {
        Self {
            client,
            versions: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// Creates or merges the Observation for one window.
    pub async fn write(
        &self,
        template: &CodeValueTemplate,
        window: &ObservationGroup<'_>,
        ids: &ResourceIds,
    ) -> Result<Written, WriteError> {
        let identifier = identifier_value(ids, window);
        let id = resource_id(SERVICE_SYSTEM, &identifier);
        let mut cached = self.versions.get(&id).await;
        for attempt in 0..=CONFLICT_RETRIES {
            let existing = match cached.take() {
                Some(v) => Some(v),
                None => self.find(&identifier).await?,
            };
            let (body, if_match, action) = match &existing {
                None => (
                    build_observation(template, window, ids, Timestamp::now())?,
                    None,
                    Action::Created,
                ),
                Some(v) => match merge_observation(&v.resource, template, window)? {
                    Merge::Unchanged => return Ok(v.written(Action::Unchanged, false)),
                    Merge::Updated(o) => (o, v.etag.clone(), Action::Updated),
                },
            };
            match self.client.put(&body, if_match.as_deref()).await {
                Ok((written, created)) => {
                    // Another writer created it between our search and our PUT, which
                    // replaced its version: merge that version back in.
                    if existing.is_none()
                        && !created
                        && let Some(restored) = self.restore(template, window, &written).await?
                    {
                        let result = restored.written(Action::Updated, false);
                        self.versions.insert(id, restored).await;
                        return Ok(result);
                    }
                    let result = written.written(action, false);
                    self.versions.insert(id, written).await;
                    return Ok(result);
                }
                Err(FhirError::Conflict { status }) if attempt < CONFLICT_RETRIES => {
                    tracing::info!(
                        status,
                        attempt,
                        "observation changed concurrently; re-reading"
                    );
                    self.versions.invalidate(&id).await;
                }
                Err(e) => {
                    self.versions.invalidate(&id).await;
                    return Err(e.into());
                }
            }
        }
        Err(FhirError::Conflict { status: 412 }.into())
    }

    /// Writes a resource rendered by a handlebars template: PUT by its deterministic id,
    /// skipped when the server already holds the same content. A concurrent change (412) is
    /// re-read and compared again.
    pub async fn write_resource(&self, resource: &Value) -> Result<Written, WriteError> {
        let (Some(resource_type), Some(id)) =
            (resource["resourceType"].as_str(), resource["id"].as_str())
        else {
            return Err(FhirError::InvalidResponse(
                "a rendered resource needs resourceType and id".into(),
            )
            .into());
        };
        let key = format!("{resource_type}/{id}");
        let mut cached = self.versions.get(&key).await;
        for attempt in 0..=CONFLICT_RETRIES {
            let existing = match cached.take() {
                Some(v) => Some(v),
                None => self.client.read(resource_type, id).await?,
            };
            if let Some(v) = &existing
                && same_content(&v.resource, resource)
            {
                return Ok(v.written(Action::Unchanged, false));
            }
            let action = if existing.is_some() {
                Action::Updated
            } else {
                Action::Created
            };
            let if_match = existing.as_ref().and_then(|v| v.etag.clone());
            match self.client.update(resource, if_match.as_deref()).await {
                Ok(written) => {
                    let result = written.written(action, false);
                    self.versions.insert(key, written).await;
                    return Ok(result);
                }
                Err(FhirError::Conflict { .. }) if attempt < CONFLICT_RETRIES => {
                    self.versions.invalidate(&key).await
                }
                Err(e) => {
                    self.versions.invalidate(&key).await;
                    return Err(e.into());
                }
            }
        }
        Err(FhirError::Conflict { status: 412 }.into())
    }

    /// After a create that replaced another writer's version (two processes creating one
    /// window at once, as when a partition changes hands), writes that version merged with
    /// this window on top of ours. `None` when no older version is found (a server that
    /// answers 200 to every PUT, or one without history): nothing was replaced.
    async fn restore(
        &self,
        template: &CodeValueTemplate,
        window: &ObservationGroup<'_>,
        ours: &Versioned,
    ) -> Result<Option<Versioned>, WriteError> {
        let (Some(id), Some(version)) = (
            ours.resource["id"].as_str(),
            ours.resource["meta"]["versionId"].as_str(),
        ) else {
            return Ok(None);
        };
        let history = match self.client.history("Observation", id, 5).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read an Observation's history to check for a concurrent create");
                return Ok(None);
            }
        };
        let replaced = history
            .iter()
            .skip_while(|v| v["meta"]["versionId"].as_str() != Some(version))
            .nth(1);
        let Some(replaced) = replaced.filter(|r| r["resourceType"] == "Observation") else {
            return Ok(None);
        };
        tracing::info!(
            "an Observation was created concurrently; merging the replaced version back"
        );
        let body = match merge_observation(replaced, template, window)? {
            Merge::Unchanged => replaced.clone(),
            Merge::Updated(o) => o,
        };
        Ok(Some(self.client.update(&body, ours.etag.as_deref()).await?))
    }

    /// The Observation with exactly this identifier, if any. Search by identifier rather than
    /// read by id, so that Observations an older writer created under other ids are found.
    async fn find(&self, identifier: &str) -> Result<Option<Versioned>, WriteError> {
        let token = format!("{SERVICE_SYSTEM}|{identifier}");
        let found = self
            .client
            .search("Observation", &[("identifier", &token)], 10)
            .await?;
        // Some servers index only a prefix of identifiers: keep exact matches only.
        let exact: Vec<Value> = found
            .into_iter()
            .filter(|o| {
                o["identifier"].as_array().is_some_and(|ids| {
                    ids.iter().any(|i| {
                        i["system"] == SERVICE_SYSTEM && i["value"].as_str() == Some(identifier)
                    })
                })
            })
            .collect();
        match exact.len() {
            0 => Ok(None),
            1 => {
                let resource = exact.into_iter().next().unwrap_or_default();
                let etag = resource["meta"]["versionId"]
                    .as_str()
                    .map(|v| format!("W/\"{v}\""));
                Ok(Some(Versioned { resource, etag }))
            }
            n => Err(WriteError::MultipleObservations(n)),
        }
    }
}

/// Whether the server's copy holds the rendered content (the server adds `meta`).
fn same_content(stored: &Value, rendered: &Value) -> bool {
    let mut stored = stored.clone();
    if let Some(m) = stored.as_object_mut() {
        m.shift_remove("meta");
    }
    let mut rendered = rendered.clone();
    if let Some(m) = rendered.as_object_mut() {
        m.shift_remove("meta");
    }
    stored == rendered
}
