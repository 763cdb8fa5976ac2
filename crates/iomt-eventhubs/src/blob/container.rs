//! A Blob container of write-once blobs: where cluster-mode dead letters go, so that a pod
//! removed by KEDA does not take them with it.

use reqwest::Url;
use tracing::info;

use super::auth::{BlobAuth, StorageConnectionString};
use super::client::{BlobClient, BlobStoreOptions, Condition};
use super::error::BlobError;

/// A container, with its authorization. Cheap to clone; clones share the HTTP connection pool
/// and the token cache.
#[derive(Clone, Debug)]
pub struct BlobContainer {
    pub(super) client: BlobClient,
}

impl BlobContainer {
    /// The container at `container_url`, e.g. `https://acct.blob.core.windows.net/dead-letters`
    /// or, for Azurite, `http://127.0.0.1:10000/devstoreaccount1/dead-letters`.
    pub fn new(container_url: &str, auth: BlobAuth) -> Result<Self, BlobError> {
        Ok(Self {
            client: BlobClient::new(container_url, auth, BlobStoreOptions::default())?,
        })
    }

    /// `container` of the account a storage connection string names.
    pub fn from_connection_string(
        connection_string: &str,
        container: &str,
    ) -> Result<Self, BlobError> {
        let parsed = StorageConnectionString::parse(connection_string)?;
        let endpoint = parsed.blob_endpoint.as_str().trim_end_matches('/');
        Self::new(&format!("{endpoint}/{container}"), parsed.auth)
    }

    /// A container URL that carries its SAS, as the portal's "Generate SAS" shows it
    /// (`https://acct.blob.core.windows.net/checkpoints?sv=…&sig=…`).
    pub fn from_sas_url(container_sas_url: &str) -> Result<Self, BlobError> {
        let (url, sas) = container_sas_url.split_once('?').ok_or_else(|| {
            BlobError::Config("the container SAS URL has no query string".to_owned())
        })?;
        Self::new(url, BlobAuth::sas(sas)?)
    }

    /// Another container of the same account, with the same authorization (a key or an Entra
    /// identity; a SAS usually grants one container only).
    pub fn sibling(&self, container: &str) -> Result<Self, BlobError> {
        let mut url = self.client.container_url().clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop().push(container);
        }
        let client = BlobClient::new(
            url.as_str(),
            self.client.auth().clone(),
            self.client.options.clone(),
        )?;
        Ok(Self { client })
    }

    /// Replaces the timeouts and retry limits.
    #[must_use]
    pub fn with_options(mut self, options: BlobStoreOptions) -> Self {
        self.client.options = options;
        self
    }

    /// The container URL, without credentials.
    pub fn url(&self) -> &Url {
        self.client.container_url()
    }

    /// Creates the container if it does not exist; `Ok(true)` when it was created.
    pub async fn ensure(&self) -> Result<bool, BlobError> {
        let created = self.client.create_container().await?;
        if created {
            info!(container = %self.url(), "created the container");
        }
        Ok(created)
    }

    /// Writes `body` as the blob `name` unless a blob of that name exists. `Ok(false)` when it
    /// existed: writers name blobs after their content, so a blob already there holds what a
    /// retry, or a run before a crash, wrote.
    pub async fn put_once(&self, name: &str, body: Vec<u8>) -> Result<bool, BlobError> {
        match self
            .client
            .put_blob(name, body, &[], Condition::IfNoneExists)
            .await
        {
            Ok(_) => Ok(true),
            Err(BlobError::Status {
                status: 409 | 412, ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Writes `body` as the blob `name`, replacing what is there: a state blob (a change
    /// feed's checkpoint) that one writer owns.
    pub async fn replace(&self, name: &str, body: Vec<u8>) -> Result<(), BlobError> {
        self.client
            .put_blob(name, body, &[], Condition::Always)
            .await
            .map(drop)
    }

    /// The names of the blobs whose names start with `prefix`, in name order.
    pub async fn names(&self, prefix: &str) -> Result<Vec<String>, BlobError> {
        let mut names: Vec<String> = self
            .client
            .list(prefix)
            .await?
            .into_iter()
            .map(|b| b.name)
            .collect();
        names.sort();
        Ok(names)
    }

    /// A blob's content as text; `Ok(None)` when it does not exist.
    pub async fn read_text(&self, name: &str) -> Result<Option<String>, BlobError> {
        self.client.get_text(name).await
    }
}
