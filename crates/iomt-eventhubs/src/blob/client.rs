//! The six Blob REST operations the checkpoint store and the dead-letter container need (Create
//! Container, Get Blob Properties, Get Blob, Put Blob, Set Blob Metadata, List Blobs), each
//! authorized and retried.
//!
//! Hand-written over `reqwest` because no `azure_storage_blob` release resolves next to
//! `azure_messaging_eventhubs` 0.16 (each needs a different `azure_core` 1.x), and because the
//! store needs Shared Key auth, which that crate lacks.

use std::time::{Duration, SystemTime};

use azure_core::time::OffsetDateTime;
use reqwest::header::{CONTENT_LENGTH, ETAG, HeaderMap, HeaderValue, IF_MATCH, IF_NONE_MATCH};
use reqwest::{Method, RequestBuilder, Url};
use tracing::debug;

use super::auth::BlobAuth;
use super::error::{BlobError, is_retryable_status};
use super::xml::{self, ListedBlob};

/// The Blob service version sent as `x-ms-version`: old enough for every Azure region and for
/// Azurite, new enough for everything used here.
pub(crate) const API_VERSION: &str = "2021-08-06";

const METADATA_PREFIX: &str = "x-ms-meta-";

/// Timeouts and retry limits of the store's requests.
#[derive(Clone, Debug)]
pub struct BlobStoreOptions {
    /// Deadline of one HTTP request, connection included.
    pub request_timeout: Duration,
    /// How many times a request that timed out, failed to connect, or got 408, 429 or 5xx is
    /// sent again.
    pub max_retries: u32,
    /// The first retry waits about this long; each next one twice as long (with jitter).
    pub retry_base_delay: Duration,
    /// The longest wait between two attempts, also the cap on a `Retry-After` the service asks
    /// for.
    pub retry_max_delay: Duration,
    /// How many read-then-write rounds a checkpoint update tries when concurrent writers keep
    /// changing the blob (412) before giving up with [`BlobError::Contention`].
    pub checkpoint_attempts: u32,
    /// How many blobs one List Blobs page holds (`maxresults`). `None` leaves it to the service
    /// (5000); a small value exercises paging in tests.
    pub list_page_size: Option<u32>,
}

impl Default for BlobStoreOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            max_retries: 3,
            retry_base_delay: Duration::from_millis(200),
            retry_max_delay: Duration::from_secs(5),
            checkpoint_attempts: 8,
            list_page_size: None,
        }
    }
}

/// A precondition on a write.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Condition<'a> {
    /// Only if the blob still has this ETag.
    IfMatch(&'a str),
    /// Only if the blob does not exist yet.
    IfNoneExists,
    /// Whatever is there.
    Always,
}

/// The properties of a blob that the store reads.
#[derive(Clone, Debug, Default)]
pub(crate) struct BlobProperties {
    pub(crate) etag: Option<String>,
    pub(crate) last_modified: Option<OffsetDateTime>,
    pub(crate) metadata: Vec<(String, String)>,
}

/// A response, read whole: the store's responses are small.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

#[derive(Clone, Debug)]
pub(crate) struct BlobClient {
    http: reqwest::Client,
    /// The container URL, without query and without a trailing slash.
    container: Url,
    /// The container name, for messages.
    container_name: String,
    auth: BlobAuth,
    pub(crate) options: BlobStoreOptions,
}

impl BlobClient {
    pub(crate) fn new(
        container_url: &str,
        auth: BlobAuth,
        options: BlobStoreOptions,
    ) -> Result<Self, BlobError> {
        let mut container = Url::parse(container_url.trim()).map_err(|error| {
            BlobError::Config(format!(
                "container URL {container_url:?} is not a URL: {error}"
            ))
        })?;
        if !matches!(container.scheme(), "http" | "https") || container.host().is_none() {
            return Err(BlobError::Config(format!(
                "container URL {container_url:?} is not an http(s) URL"
            )));
        }
        if container.query().is_some() {
            return Err(BlobError::Config(
                "the container URL has a query string; pass a SAS with BlobAuth::sas or \
                 BlobCheckpointStore::from_sas_url"
                    .to_owned(),
            ));
        }
        container.set_fragment(None);
        let trimmed = container.path().trim_end_matches('/').to_owned();
        container.set_path(&trimmed);
        let container_name = trimmed.rsplit('/').next().unwrap_or_default().to_owned();
        check_container_name(&container_name)?;
        // A bearer token sent in clear text is a token anyone on the path can reuse. Plain HTTP
        // is allowed only to a loopback address, which is where test servers live.
        if auth.is_token() && container.scheme() == "http" && !is_loopback(&container) {
            return Err(BlobError::Config(
                "Microsoft Entra ID tokens need an https container URL".to_owned(),
            ));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(options.request_timeout)
            .build()
            .map_err(|error| BlobError::Config(format!("building the HTTP client: {error}")))?;
        Ok(Self {
            http,
            container,
            container_name,
            auth,
            options,
        })
    }

    pub(crate) fn container_url(&self) -> &Url {
        &self.container
    }

    pub(crate) fn auth(&self) -> &BlobAuth {
        &self.auth
    }

    fn blob_url(&self, name: &str) -> Url {
        let mut url = self.container.clone();
        // Each `/`-separated part is its own path segment, so the `/`s reach the service
        // unescaped. Azurite has mishandled `%2F` in blob names (Azurite #2405); the real
        // service treats both forms alike.
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().extend(name.split('/'));
        }
        url
    }

    fn resource(&self, name: &str) -> String {
        format!("{}/{name}", self.container_name)
    }

    /// Creates the container. `Ok(false)` when it already exists.
    pub(crate) async fn create_container(&self) -> Result<bool, BlobError> {
        const OPERATION: &str = "Create Container";
        let answer = self
            .send(OPERATION, &self.container_name, || {
                let mut url = self.container.clone();
                url.query_pairs_mut().append_pair("restype", "container");
                self.http
                    .request(Method::PUT, url)
                    .header(CONTENT_LENGTH, "0")
                    .body(Vec::new())
            })
            .await?;
        match answer.status {
            201 => Ok(true),
            409 => Ok(false),
            _ => Err(status_error(
                OPERATION,
                self.container_name.clone(),
                &answer,
            )),
        }
    }

    /// Reads a blob's ETag, last-modified time and metadata. `Ok(None)` when it does not exist.
    pub(crate) async fn properties(&self, name: &str) -> Result<Option<BlobProperties>, BlobError> {
        const OPERATION: &str = "Get Blob Properties";
        let answer = self
            .send(OPERATION, &self.resource(name), || {
                self.http.request(Method::HEAD, self.blob_url(name))
            })
            .await?;
        match answer.status {
            200 => Ok(Some(BlobProperties {
                etag: header(&answer.headers, ETAG.as_str()).map(|etag| xml::quoted_etag(&etag)),
                last_modified: header(&answer.headers, "last-modified")
                    .and_then(|date| xml::parse_http_date(&date)),
                metadata: answer
                    .headers
                    .iter()
                    .filter_map(|(key, value)| {
                        let key = key.as_str().strip_prefix(METADATA_PREFIX)?;
                        Some((key.to_owned(), value.to_str().ok()?.to_owned()))
                    })
                    .collect(),
            })),
            // A HEAD has no body, so "blob" and "container" not found look alike, unless the
            // error code header tells them apart. A missing container is a setup error, not a
            // missing checkpoint.
            404 if header(&answer.headers, "x-ms-error-code").as_deref()
                == Some("ContainerNotFound") =>
            {
                Err(status_error(OPERATION, self.resource(name), &answer))
            }
            404 => Ok(None),
            _ => Err(status_error(OPERATION, self.resource(name), &answer)),
        }
    }

    /// Creates (or, without a condition, replaces) an empty block blob with this metadata.
    /// Returns the new ETag and last-modified time.
    pub(crate) async fn put_empty_blob(
        &self,
        name: &str,
        metadata: &[(&str, &str)],
        condition: Condition<'_>,
    ) -> Result<BlobProperties, BlobError> {
        self.put_blob(name, Vec::new(), metadata, condition).await
    }

    /// Creates (or, without a condition, replaces) a block blob holding `body`, in one
    /// request. Returns the new ETag and last-modified time.
    pub(crate) async fn put_blob(
        &self,
        name: &str,
        body: Vec<u8>,
        metadata: &[(&str, &str)],
        condition: Condition<'_>,
    ) -> Result<BlobProperties, BlobError> {
        const OPERATION: &str = "Put Blob";
        let metadata = metadata_headers(metadata)?;
        let answer = self
            .send(OPERATION, &self.resource(name), || {
                let request = self
                    .http
                    .request(Method::PUT, self.blob_url(name))
                    .header("x-ms-blob-type", "BlockBlob")
                    .header(CONTENT_LENGTH, body.len().to_string())
                    .headers(metadata.clone())
                    .body(body.clone());
                with_condition(request, condition)
            })
            .await?;
        match answer.status {
            201 => Ok(written(&answer)),
            _ => Err(status_error(OPERATION, self.resource(name), &answer)),
        }
    }

    /// Reads a blob's content as text. `Ok(None)` when it does not exist.
    pub(crate) async fn get_text(&self, name: &str) -> Result<Option<String>, BlobError> {
        const OPERATION: &str = "Get Blob";
        let answer = self
            .send(OPERATION, &self.resource(name), || {
                self.http.request(Method::GET, self.blob_url(name))
            })
            .await?;
        match answer.status {
            200 => Ok(Some(answer.body)),
            404 if header(&answer.headers, "x-ms-error-code").as_deref()
                == Some("BlobNotFound") =>
            {
                Ok(None)
            }
            _ => Err(status_error(OPERATION, self.resource(name), &answer)),
        }
    }

    /// Replaces the whole metadata of an existing blob. Returns the new ETag and last-modified
    /// time.
    pub(crate) async fn set_metadata(
        &self,
        name: &str,
        metadata: &[(&str, &str)],
        condition: Condition<'_>,
    ) -> Result<BlobProperties, BlobError> {
        const OPERATION: &str = "Set Blob Metadata";
        let metadata = metadata_headers(metadata)?;
        let answer = self
            .send(OPERATION, &self.resource(name), || {
                let mut url = self.blob_url(name);
                url.query_pairs_mut().append_pair("comp", "metadata");
                let request = self
                    .http
                    .request(Method::PUT, url)
                    .header(CONTENT_LENGTH, "0")
                    .headers(metadata.clone())
                    .body(Vec::new());
                with_condition(request, condition)
            })
            .await?;
        match answer.status {
            200 => Ok(written(&answer)),
            _ => Err(status_error(OPERATION, self.resource(name), &answer)),
        }
    }

    /// Lists every blob whose name starts with `prefix`, with metadata, following `NextMarker`.
    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<ListedBlob>, BlobError> {
        const OPERATION: &str = "List Blobs";
        let resource = self.resource(prefix);
        let mut blobs = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let answer = self
                .send(OPERATION, &resource, || {
                    let mut url = self.container.clone();
                    {
                        let mut query = url.query_pairs_mut();
                        query
                            .append_pair("restype", "container")
                            .append_pair("comp", "list")
                            .append_pair("include", "metadata")
                            .append_pair("prefix", prefix);
                        if let Some(size) = self.options.list_page_size {
                            query.append_pair("maxresults", &size.to_string());
                        }
                        if let Some(marker) = &marker {
                            query.append_pair("marker", marker);
                        }
                    }
                    self.http.request(Method::GET, url)
                })
                .await?;
            if answer.status != 200 {
                return Err(status_error(OPERATION, resource, &answer));
            }
            let page =
                xml::parse_list(&answer.body).map_err(|detail| BlobError::InvalidResponse {
                    operation: OPERATION,
                    resource: resource.clone(),
                    detail,
                })?;
            blobs.extend(page.blobs);
            match page.next_marker {
                None => return Ok(blobs),
                // A service that hands back the marker it was given would page forever.
                Some(next) if marker.as_deref() == Some(next.as_str()) => {
                    return Err(BlobError::InvalidResponse {
                        operation: OPERATION,
                        resource,
                        detail: format!("the next marker {next:?} repeats the current one"),
                    });
                }
                Some(next) => marker = Some(next),
            }
        }
    }

    /// Sends a request built by `build` (called again for each attempt, so each has a fresh
    /// date and signature), retrying timeouts, connection failures, 408, 429 and 5xx with
    /// exponential backoff. Returns the last answer whatever its status; callers decide what a
    /// status means for their operation.
    async fn send(
        &self,
        operation: &'static str,
        resource: &str,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Answer, BlobError> {
        let mut attempt: u32 = 0;
        loop {
            let request = build()
                .header("x-ms-version", API_VERSION)
                .header("x-ms-date", httpdate::fmt_http_date(SystemTime::now()))
                .timeout(self.options.request_timeout)
                .build();
            let mut request = request.map_err(|source| BlobError::Transport {
                operation,
                resource: resource.to_owned(),
                source,
            })?;
            self.auth.authorize(&mut request).await?;
            let outcome = match self.http.execute(request).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let headers = response.headers().clone();
                    response.text().await.map(|body| Answer {
                        status,
                        headers,
                        body,
                    })
                }
                Err(error) => Err(error),
            }
            // The URL may carry the SAS: no message names it (the resource does).
            .map_err(reqwest::Error::without_url);
            let retry_after = match &outcome {
                Ok(answer) if is_retryable_status(answer.status) => {
                    Some(retry_after(&answer.headers))
                }
                Ok(_) => None,
                Err(error) if !error.is_builder() => Some(None),
                Err(_) => None,
            };
            match (outcome, retry_after) {
                (outcome, Some(hint)) if attempt < self.options.max_retries => {
                    let delay = self.backoff(attempt, hint);
                    match &outcome {
                        Ok(answer) => debug!(
                            operation,
                            resource,
                            status = answer.status,
                            attempt,
                            delay_ms = delay.as_millis() as u64,
                            "blob request failed, retrying"
                        ),
                        Err(error) => debug!(
                            operation,
                            resource,
                            %error,
                            attempt,
                            delay_ms = delay.as_millis() as u64,
                            "blob request failed, retrying"
                        ),
                    }
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                (Ok(answer), _) => return Ok(answer),
                (Err(source), _) => {
                    return Err(BlobError::Transport {
                        operation,
                        resource: resource.to_owned(),
                        source,
                    });
                }
            }
        }
    }

    /// The wait before retry number `attempt + 1`: the service's `Retry-After` if it sent one,
    /// else `base × 2^attempt` with jitter (so pods retrying together spread out), both capped
    /// at `retry_max_delay`.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let cap = self.options.retry_max_delay;
        if let Some(wait) = retry_after {
            return wait.min(cap);
        }
        iomt_core::Backoff::new(self.options.retry_base_delay, cap).delay(attempt + 1)
    }
}

fn with_condition(request: RequestBuilder, condition: Condition<'_>) -> RequestBuilder {
    match condition {
        Condition::IfMatch(etag) => request.header(IF_MATCH, etag),
        Condition::IfNoneExists => request.header(IF_NONE_MATCH, "*"),
        Condition::Always => request,
    }
}

/// The `x-ms-meta-*` headers of a metadata set, refusing values a header cannot carry (metadata
/// is ASCII) instead of failing later inside the request builder.
fn metadata_headers(metadata: &[(&str, &str)]) -> Result<HeaderMap, BlobError> {
    let mut headers = HeaderMap::new();
    for (key, value) in metadata {
        let name =
            reqwest::header::HeaderName::from_bytes(format!("{METADATA_PREFIX}{key}").as_bytes())
                .map_err(|_| BlobError::InvalidInput {
                what: "metadata",
                detail: format!("{key:?} is not a valid metadata name"),
            })?;
        let value = HeaderValue::from_str(value)
            .ok()
            .filter(|_| value.is_ascii())
            .ok_or_else(|| BlobError::InvalidInput {
                what: "metadata",
                detail: format!("the value of {key} ({value:?}) is not printable ASCII"),
            })?;
        headers.insert(name, value);
    }
    Ok(headers)
}

fn written(answer: &Answer) -> BlobProperties {
    BlobProperties {
        etag: header(&answer.headers, ETAG.as_str()).map(|etag| xml::quoted_etag(&etag)),
        last_modified: header(&answer.headers, "last-modified")
            .and_then(|date| xml::parse_http_date(&date)),
        metadata: Vec::new(),
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    header(headers, "retry-after")?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

fn status_error(operation: &'static str, resource: String, answer: &Answer) -> BlobError {
    let (body_code, message) = xml::parse_error(&answer.body);
    BlobError::Status {
        operation,
        resource,
        status: answer.status,
        code: header(&answer.headers, "x-ms-error-code").or(body_code),
        message,
    }
}

/// Container names are 3–63 lowercase letters, digits and single hyphens, starting and ending
/// with a letter or digit. Checked up front because the service's answer to a bad name is an
/// unhelpful 400 on the first request.
fn check_container_name(name: &str) -> Result<(), BlobError> {
    let valid = (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if valid {
        Ok(())
    } else {
        Err(BlobError::Config(format!(
            "{name:?} is not a container name (3-63 lowercase letters, digits and single \
             hyphens); the container URL must end with the container"
        )))
    }
}

fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(url: &str) -> Result<BlobClient, BlobError> {
        BlobClient::new(
            url,
            BlobAuth::development_storage(),
            BlobStoreOptions::default(),
        )
    }

    #[test]
    fn blob_names_keep_their_slashes() {
        let client = client("http://127.0.0.1:10000/devstoreaccount1/checkpoints/").unwrap();
        assert_eq!(
            client.container_url().as_str(),
            "http://127.0.0.1:10000/devstoreaccount1/checkpoints"
        );
        assert_eq!(
            client
                .blob_url("ns.servicebus.windows.net/hub/$Default/checkpoint/0")
                .as_str(),
            "http://127.0.0.1:10000/devstoreaccount1/checkpoints/ns.servicebus.windows.net/hub/$Default/checkpoint/0"
        );
        // Characters that are not allowed in a path are escaped, within their segment.
        assert_eq!(
            client.blob_url("a b/c#d/e?f").path(),
            "/devstoreaccount1/checkpoints/a%20b/c%23d/e%3Ff"
        );
    }

    #[test]
    fn container_urls_are_checked() {
        assert!(client("https://acct.blob.core.windows.net/checkpoints").is_ok());
        for bad in [
            "https://acct.blob.core.windows.net/",
            "https://acct.blob.core.windows.net/Checkpoints",
            "https://acct.blob.core.windows.net/a",
            "https://acct.blob.core.windows.net/c?sv=1&sig=2",
            "ftp://acct/checkpoints",
            "not a url",
        ] {
            assert!(
                matches!(client(bad), Err(BlobError::Config(_))),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn metadata_values_must_be_ascii() {
        assert!(metadata_headers(&[("ownerid", "pod-1")]).is_ok());
        assert!(matches!(
            metadata_headers(&[("ownerid", "pöd")]),
            Err(BlobError::InvalidInput { .. })
        ));
        assert!(matches!(
            metadata_headers(&[("ownerid", "a\nb")]),
            Err(BlobError::InvalidInput { .. })
        ));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let client = client("https://acct.blob.core.windows.net/checkpoints").unwrap();
        let first = client.backoff(0, None);
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
        let late = client.backoff(30, None);
        assert!(late <= Duration::from_secs(5));
        assert_eq!(
            client.backoff(0, Some(Duration::from_secs(60))),
            Duration::from_secs(5)
        );
    }
}
