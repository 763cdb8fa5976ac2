//! A FHIR Bulk Data export the server runs (`$export`): the kick-off, the status polls and the
//! download of its files (Bulk Data Access IG 2.0, asynchronous request pattern).

use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode, header};
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;

use crate::client::{FhirClient, FhirError, Outage, outage_of, retry_after, versioned};

/// Where an export stands.
#[derive(Debug, Clone, PartialEq)]
pub enum ExportStatus {
    /// Still running; poll again after the wait the server asked for.
    InProgress {
        /// The server's `Retry-After`.
        retry_after: Option<Duration>,
        /// Its `X-Progress`, for people.
        progress: Option<String>,
    },
    /// Done: the manifest (`transactionTime`, `requiresAccessToken`, `output`, `deleted`,
    /// `error`).
    Complete(Value),
}

/// One download attempt's failure.
enum Failed {
    Retry(Outage, String),
    Fatal(FhirError),
}

impl FhirClient {
    /// Starts an export: `GET {path}` (`$export`, `Patient/$export` or `Group/{id}/$export`,
    /// with its `_type`, `_since`, … query) with `Prefer: respond-async`. Returns the status
    /// URL the server named in `Content-Location`.
    pub async fn export_kickoff(&self, path: &str) -> Result<String, FhirError> {
        let (url, name) = self.target(path)?;
        let (status, headers, body) = self
            .send_to(
                Method::GET,
                url.clone(),
                name,
                None,
                &[(header::HeaderName::from_static("prefer"), "respond-async")],
            )
            .await?;
        if status != StatusCode::ACCEPTED {
            versioned(status, &headers, &body)?;
            return Err(FhirError::InvalidResponse(format!(
                "the export kick-off answered {status}, not 202 Accepted: the server does not run it asynchronously"
            )));
        }
        let location = headers
            .get(header::CONTENT_LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                FhirError::InvalidResponse(
                    "the export kick-off answered 202 without a Content-Location".into(),
                )
            })?;
        // A relative location is relative to the kick-off request.
        reqwest::Url::parse(&url)
            .and_then(|base| base.join(location))
            .map(String::from)
            .map_err(|_| {
                FhirError::InvalidResponse("the export's Content-Location is not a URL".into())
            })
    }

    /// Polls an export's status URL (on the server's origin: the request carries the
    /// credentials).
    pub async fn export_status(&self, status_url: &str) -> Result<ExportStatus, FhirError> {
        let (url, name) = self.target(status_url)?;
        let (status, headers, body) = self.send_to(Method::GET, url, name, None, &[]).await?;
        if status == StatusCode::ACCEPTED {
            return Ok(ExportStatus::InProgress {
                retry_after: retry_after(&headers),
                progress: headers
                    .get("x-progress")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            });
        }
        let manifest = versioned(status, &headers, &body)?.resource;
        if !manifest["output"].is_array() {
            return Err(FhirError::InvalidResponse(
                "the export's manifest has no output list".into(),
            ));
        }
        Ok(ExportStatus::Complete(manifest))
    }

    /// Tells the server it may delete the export's files (`DELETE` of the status URL); its
    /// answer does not matter.
    pub async fn export_forget(&self, status_url: &str) {
        if let Ok((url, name)) = self.target(status_url)
            && let Err(e) = self.send_to(Method::DELETE, url, name, None, &[]).await
        {
            tracing::debug!(error = %e, "the export's clean-up request failed");
        }
    }

    /// Downloads an export file to `file`, streaming; returns its size. With `with_token` (the
    /// manifest's `requiresAccessToken`) the request carries the access token, so the file
    /// must be on the server's origin; without, it must not carry it (a pre-signed URL).
    /// Retried from the start like any request.
    pub async fn export_download(
        &self,
        file_url: &str,
        with_token: bool,
        file: &Path,
    ) -> Result<u64, FhirError> {
        if with_token && !self.same_origin(file_url) {
            return Err(FhirError::InvalidResponse(
                "an export file that needs the access token is on another origin; the token is not sent there: download the files yourself and publish them with --from".into(),
            ));
        }
        // No limit on the whole download (files can be gigabytes), only on each read.
        let http = reqwest::Client::builder()
            .connect_timeout(self.config.request_timeout)
            .read_timeout(self.config.request_timeout)
            .build()
            .map_err(|e| {
                FhirError::InvalidResponse(format!("cannot build the HTTP client: {e}"))
            })?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.download_once(&http, file_url, with_token, file).await {
                Ok(size) => return Ok(size),
                Err(Failed::Fatal(e)) => return Err(e),
                Err(Failed::Retry(outage, last)) if attempt > self.config.max_retries => {
                    return Err(FhirError::Unavailable {
                        attempts: attempt,
                        outage,
                        last,
                    });
                }
                Err(Failed::Retry(outage, reason)) => {
                    let wait = self.backoff(attempt);
                    tracing::warn!(
                        attempt,
                        wait_ms = wait.as_millis() as u64,
                        kind = outage.label(),
                        reason,
                        "export file download will be retried"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn download_once(
        &self,
        http: &reqwest::Client,
        url: &str,
        with_token: bool,
        file: &Path,
    ) -> Result<u64, Failed> {
        let mut request = http
            .get(url)
            .header(header::ACCEPT, "application/fhir+ndjson");
        if with_token {
            match self.authorization().await {
                Ok(Some(value)) => request = request.header(header::AUTHORIZATION, value),
                Ok(None) => {}
                Err(e) => {
                    return Err(Failed::Retry(
                        Outage::Token,
                        format!("no access token: {e}"),
                    ));
                }
            }
        }
        // Errors name the URL, which may hold a signature: they go without.
        let broke = |e: reqwest::Error| Failed::Retry(outage_of(&e), e.without_url().to_string());
        let mut response = request.send().await.map_err(broke)?;
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            let outage = match status {
                StatusCode::TOO_MANY_REQUESTS => Outage::Throttled,
                s => Outage::Unavailable(s.as_u16()),
            };
            return Err(Failed::Retry(outage, status.to_string()));
        }
        if !status.is_success() {
            let headers = response.headers().clone();
            let body = response.bytes().await.unwrap_or_default();
            return Err(Failed::Fatal(match versioned(status, &headers, &body) {
                Err(e) => e,
                Ok(_) => FhirError::InvalidResponse(format!("an export file answered {status}")),
            }));
        }
        let io = |e: std::io::Error| {
            Failed::Fatal(FhirError::InvalidResponse(format!(
                "cannot write {}: {e}",
                file.display()
            )))
        };
        let mut out = tokio::fs::File::create(file).await.map_err(io)?;
        let mut size = 0u64;
        while let Some(chunk) = response.chunk().await.map_err(broke)? {
            out.write_all(&chunk).await.map_err(io)?;
            size += chunk.len() as u64;
        }
        out.sync_all().await.map_err(io)?;
        Ok(size)
    }
}
