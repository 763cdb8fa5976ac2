//! What can go wrong in the blob checkpoint store, and how it crosses the SDK's trait boundary.
//!
//! Inside the crate every failure is a typed [`BlobError`]. The Event Hubs SDK's
//! `CheckpointStore` trait speaks `azure_core::Error`, so [`From<BlobError>`] maps each variant to
//! the closest `azure_core` kind (an HTTP status where there is one) and keeps the `BlobError` as
//! the source. The runtime then tells "this pod lost the partition" apart from a transient failure
//! with [`is_ownership_lost`], whatever wrapping the SDK added on the way.

use azure_core::error::ErrorKind;
use azure_core::http::StatusCode;

/// The error code put on a refused stale-owner checkpoint when it becomes an `azure_core::Error`
/// (status 412), for logs and for callers that only see the code.
pub const OWNERSHIP_LOST_CODE: &str = "OwnershipLost";

/// A failure of the blob checkpoint store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// The store was given something unusable: a malformed URL, key or connection string.
    #[error("invalid blob checkpoint store configuration: {0}")]
    Config(String),

    /// A checkpoint or ownership handed to the store lacks a field the blob layout needs.
    #[error("invalid {what}: {detail}")]
    InvalidInput {
        /// What was being written ("checkpoint", "ownership").
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },

    /// The storage service answered with a status the operation does not expect.
    #[error("{operation} {resource}: http {status}{}{}", code_suffix(.code), message_suffix(.message))]
    Status {
        /// The Blob REST operation ("Put Blob", "List Blobs", ...).
        operation: &'static str,
        /// The blob, container or prefix it was about.
        resource: String,
        /// The HTTP status.
        status: u16,
        /// The service's `x-ms-error-code` (e.g. `AuthorizationFailure`, `ContainerNotFound`).
        code: Option<String>,
        /// The first line of the service's error message, when it sent one.
        message: Option<String>,
    },

    /// No answer came back: the connection failed, broke, or timed out.
    #[error("{operation} {resource}: {source}")]
    Transport {
        /// The Blob REST operation.
        operation: &'static str,
        /// The blob, container or prefix it was about.
        resource: String,
        /// What reqwest reported.
        #[source]
        source: reqwest::Error,
    },

    /// The Microsoft Entra ID credential could not produce a storage token.
    #[error("getting a storage access token: {0}")]
    Credential(#[source] azure_core::Error),

    /// The service answered, but not in a shape the store can read.
    #[error("{operation} {resource}: unreadable response: {detail}")]
    InvalidResponse {
        /// The Blob REST operation.
        operation: &'static str,
        /// The blob, container or prefix it was about.
        resource: String,
        /// What was wrong.
        detail: String,
    },

    /// A checkpoint write was refused because another owner (or no one) holds the partition.
    ///
    /// This is the fence against a stale owner: a pod that lost the partition must stop and not
    /// write, or it would move the checkpoint over events that the new owner is processing.
    #[error(
        "ownership lost: partition {partition_id} is owned by {}, not by {expected}; checkpoint refused",
        .actual.as_deref().unwrap_or("no one")
    )]
    OwnershipLost {
        /// The partition whose checkpoint was refused.
        partition_id: String,
        /// The owner id this store writes for.
        expected: String,
        /// The owner id the ownership blob names, if any.
        actual: Option<String>,
    },

    /// Concurrent writers kept moving the checkpoint blob between our read and our write.
    #[error("{resource}: still conflicting with concurrent writers after {attempts} attempts")]
    Contention {
        /// The checkpoint blob.
        resource: String,
        /// How many read-then-write rounds were tried.
        attempts: u32,
    },
}

fn code_suffix(code: &Option<String>) -> String {
    code.as_deref()
        .map(|code| format!(" {code}"))
        .unwrap_or_default()
}

fn message_suffix(message: &Option<String>) -> String {
    message
        .as_deref()
        .map(|message| format!(": {message}"))
        .unwrap_or_default()
}

impl BlobError {
    /// True when a checkpoint was refused because this store's owner no longer holds the
    /// partition.
    pub fn is_ownership_lost(&self) -> bool {
        matches!(self, Self::OwnershipLost { .. })
    }

    /// True for failures worth retrying later with the same input: throttling, server errors,
    /// timeouts, broken connections and checkpoint contention. Configuration, authorization and
    /// fencing failures are not.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Status { status, .. } => is_retryable_status(*status),
            Self::Transport { .. } | Self::Contention { .. } => true,
            Self::Config(_)
            | Self::InvalidInput { .. }
            | Self::Credential(_)
            | Self::InvalidResponse { .. }
            | Self::OwnershipLost { .. } => false,
        }
    }

    /// The HTTP status of a `Status` error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Statuses the Blob service uses for "try again": timeout, throttling and server errors.
pub(crate) fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

impl From<BlobError> for azure_core::Error {
    fn from(error: BlobError) -> Self {
        let kind = match &error {
            BlobError::Status { status, code, .. } => ErrorKind::HttpResponse {
                status: StatusCode::from(*status),
                error_code: code.clone(),
                raw_response: None,
            },
            BlobError::OwnershipLost { .. } => ErrorKind::HttpResponse {
                status: StatusCode::PreconditionFailed,
                error_code: Some(OWNERSHIP_LOST_CODE.to_owned()),
                raw_response: None,
            },
            BlobError::Contention { .. } => ErrorKind::HttpResponse {
                status: StatusCode::PreconditionFailed,
                error_code: Some("ConditionNotMet".to_owned()),
                raw_response: None,
            },
            BlobError::Transport { source, .. } if source.is_connect() => ErrorKind::Connection,
            BlobError::Transport { .. } => ErrorKind::Io,
            BlobError::Credential(_) => ErrorKind::Credential,
            BlobError::InvalidResponse { .. } => ErrorKind::DataConversion,
            BlobError::Config(_) | BlobError::InvalidInput { .. } => ErrorKind::Other,
        };
        azure_core::Error::new(kind, error)
    }
}

/// Tells whether `error`, or anything in its source chain, is a checkpoint refused because the
/// partition is owned by someone else ([`BlobError::OwnershipLost`]).
///
/// Works on the `azure_core::Error` the `CheckpointStore` trait returns, and on the SDK's
/// `EventHubsError` after `PartitionClient::update_checkpoint` wrapped it, so the runtime can stop
/// the partition instead of retrying.
pub fn is_ownership_lost(error: &(dyn std::error::Error + 'static)) -> bool {
    // `azure_core::Error` and the SDK's `EventHubsError` both expose what they wrap as their
    // source. The bound only guards against a cyclic chain.
    let mut current = Some(error);
    for _ in 0..32 {
        let Some(error) = current else {
            return false;
        };
        if let Some(blob) = error.downcast_ref::<BlobError>() {
            return blob.is_ownership_lost();
        }
        current = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost() -> BlobError {
        BlobError::OwnershipLost {
            partition_id: "0".to_owned(),
            expected: "a".to_owned(),
            actual: Some("b".to_owned()),
        }
    }

    #[test]
    fn ownership_lost_becomes_a_412_that_can_be_recognized_through_wrapping() {
        let error: azure_core::Error = lost().into();
        assert_eq!(error.http_status(), Some(StatusCode::PreconditionFailed));
        assert!(matches!(
            error.kind(),
            ErrorKind::HttpResponse { error_code: Some(code), .. } if code == OWNERSHIP_LOST_CODE
        ));
        assert!(is_ownership_lost(&error));

        let wrapped = error.with_context("failed to update checkpoint for partition 0");
        assert!(is_ownership_lost(&wrapped));
        let sdk: azure_messaging_eventhubs::EventHubsError = wrapped.into();
        assert!(is_ownership_lost(&sdk));
    }

    #[test]
    fn other_errors_are_not_ownership_lost() {
        let status = BlobError::Status {
            operation: "Set Blob Metadata",
            resource: "c/b".to_owned(),
            status: 412,
            code: Some("ConditionNotMet".to_owned()),
            message: None,
        };
        assert!(!status.is_ownership_lost());
        let error: azure_core::Error = status.into();
        assert_eq!(error.http_status(), Some(StatusCode::PreconditionFailed));
        assert!(!is_ownership_lost(&error));
        assert!(!is_ownership_lost(&std::io::Error::other("x")));
    }

    #[test]
    fn transient_classification() {
        let status = |status| BlobError::Status {
            operation: "Get Blob Properties",
            resource: "c/b".to_owned(),
            status,
            code: None,
            message: None,
        };
        assert!(status(503).is_transient());
        assert!(status(429).is_transient());
        assert!(!status(403).is_transient());
        assert!(!lost().is_transient());
    }

    #[test]
    fn status_message_names_operation_code_and_message() {
        let error = BlobError::Status {
            operation: "Put Blob",
            resource: "checkpoints/ns/hub/cg/ownership/0".to_owned(),
            status: 403,
            code: Some("AuthorizationFailure".to_owned()),
            message: Some("This request is not authorized".to_owned()),
        };
        assert_eq!(
            error.to_string(),
            "Put Blob checkpoints/ns/hub/cg/ownership/0: http 403 AuthorizationFailure: \
             This request is not authorized"
        );
    }
}
