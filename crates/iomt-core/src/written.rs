//! What a write did to a FHIR resource.
//!
//! Every store (a FHIR server, the embedded store) reports each resource a write touched:
//! which one, which version it now has, and whether it was created, updated, left unchanged
//! or deleted. Change events are made from exactly this, so it carries no content and no
//! patient data, only the resource's address and version.

use serde::{Deserialize, Serialize};

/// How a write changed a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    /// A new resource.
    Created,
    /// A new version of an existing resource.
    Updated,
    /// The store already held this content: no new version.
    Unchanged,
    /// The resource was deleted.
    Deleted,
}

impl Action {
    /// The action's name, as in FHIR change events (`Created`, `Updated`, …).
    pub fn name(self) -> &'static str {
        match self {
            Action::Created => "Created",
            Action::Updated => "Updated",
            Action::Unchanged => "Unchanged",
            Action::Deleted => "Deleted",
        }
    }
}

/// One resource a write touched, once the write is durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Written {
    /// `Observation`, `Patient`, …
    pub resource_type: String,
    /// The logical id.
    pub id: String,
    /// `meta.versionId` of the version the resource now has (the current one when unchanged);
    /// `None` only when a server reports no version.
    pub version_id: Option<String>,
    /// `meta.lastUpdated` of that version.
    pub last_updated: Option<String>,
    /// What the write did.
    pub action: Action,
    /// Whether the resource is a Patient or Device written to resolve identities (Create
    /// mode), not something the FHIR mapping produced. Metrics count only the latter, as
    /// MedTech's `FhirResourceSaved` does.
    pub identity: bool,
}

impl Written {
    /// The resource's relative reference, `Type/id`.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.resource_type, self.id)
    }
}
