//! The HTTP side: requests, retries and error classification.
//!
//! MedTech has no HTTP-level retry: a 429 or a 5xx fails the whole batch, which is replayed
//! minutes later. Here each request is retried on its own: 429 and 503 wait for `Retry-After`
//! (capped), other 5xx responses, timeouts and connection errors back off exponentially with
//! jitter. 409 and 412 are returned as [`FhirError::Conflict`] so that the caller re-reads and
//! re-merges; any other 4xx is a data error carrying the server's OperationOutcome.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use iomt_core::{Action, Secret, Written};
use reqwest::{Method, StatusCode, header};
use serde_json::Value;
use tokio::sync::Semaphore;

/// How the client authenticates.
#[derive(Debug, Clone)]
pub enum Auth {
    /// No `Authorization` header (test servers, a sidecar proxy that adds it).
    None,
    /// A fixed bearer token.
    Bearer(Secret),
    /// OAuth tokens from a source (Microsoft Entra ID), cached until shortly before they
    /// expire and fetched again after a 401.
    Token(Arc<dyn TokenSource>),
}

/// An OAuth access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerToken {
    /// The token.
    pub secret: Secret,
    /// When it stops being valid.
    pub expires_at: SystemTime,
}

/// Where OAuth access tokens come from.
pub trait TokenSource: Send + Sync + std::fmt::Debug {
    /// A fresh token for the FHIR service.
    fn token(&self) -> Pin<Box<dyn Future<Output = Result<BearerToken, String>> + Send + '_>>;
}

/// Microsoft Entra ID credentials for the FHIR service (scope `<FHIR URL>/.default`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntraCredential {
    /// AKS workload identity: `AZURE_CLIENT_ID`, `AZURE_TENANT_ID` and
    /// `AZURE_FEDERATED_TOKEN_FILE` injected by the webhook.
    WorkloadIdentity,
    /// A managed identity; `client_id` selects a user-assigned one.
    ManagedIdentity {
        /// Client id of a user-assigned identity, or `None` for the system-assigned one.
        client_id: Option<String>,
    },
    /// An app registration with a client secret.
    ClientSecret {
        /// Directory (tenant) id.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// The secret.
        secret: Secret,
    },
}

/// Tokens from azure_identity for one scope.
struct EntraTokens {
    credential: Arc<dyn azure_core::credentials::TokenCredential>,
    scope: String,
}

impl std::fmt::Debug for EntraTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntraTokens")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl TokenSource for EntraTokens {
    fn token(&self) -> Pin<Box<dyn Future<Output = Result<BearerToken, String>> + Send + '_>> {
        Box::pin(async move {
            let token = self
                .credential
                .get_token(&[self.scope.as_str()], None)
                .await
                .map_err(|e| e.to_string())?;
            let expires_at = SystemTime::UNIX_EPOCH
                + Duration::from_secs(
                    u64::try_from(token.expires_on.unix_timestamp()).unwrap_or_default(),
                );
            Ok(BearerToken {
                secret: Secret::new(token.token.secret()),
                expires_at,
            })
        })
    }
}

impl EntraCredential {
    /// The azure_identity credential; Event Hubs and Blob Storage clients take the same one.
    pub fn token_credential(
        self,
    ) -> Result<Arc<dyn azure_core::credentials::TokenCredential>, FhirError> {
        use azure_identity::{
            ClientSecretCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
            UserAssignedId, WorkloadIdentityCredential,
        };
        let failed = |e: azure_core::Error| FhirError::Credential(e.to_string());
        Ok(match self {
            EntraCredential::WorkloadIdentity => {
                WorkloadIdentityCredential::new(None).map_err(failed)?
            }
            EntraCredential::ManagedIdentity { client_id } => {
                let options = ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.map(UserAssignedId::ClientId),
                    ..Default::default()
                };
                ManagedIdentityCredential::new(Some(options)).map_err(failed)?
            }
            EntraCredential::ClientSecret {
                tenant_id,
                client_id,
                secret,
            } => ClientSecretCredential::new(
                &tenant_id,
                client_id,
                secret.expose().to_owned().into(),
                None,
            )
            .map_err(failed)?,
        })
    }
}

impl Auth {
    /// Entra ID authentication for the FHIR service at `fhir_url`.
    pub fn entra(credential: EntraCredential, fhir_url: &str) -> Result<Self, FhirError> {
        let credential = credential.token_credential()?;
        let scope = format!("{}/.default", fhir_url.trim_end_matches('/'));
        Ok(Auth::Token(Arc::new(EntraTokens { credential, scope })))
    }
}

/// Client settings.
#[derive(Clone)]
pub struct FhirClientConfig {
    /// The FHIR base URL, e.g. `https://example.fhir.azurehealthcareapis.com`. Its query (an
    /// API gateway's `code`, say) is sent with every request and never printed.
    pub base_url: String,
    /// Authentication.
    pub auth: Auth,
    /// Timeout of one HTTP request.
    pub request_timeout: Duration,
    /// Requests in flight at most; more wait for a slot.
    pub max_concurrency: usize,
    /// Retries after the first attempt, for retryable failures.
    pub max_retries: u32,
    /// First backoff delay; doubles per retry.
    pub backoff_base: Duration,
    /// Longest wait between attempts, also for `Retry-After`.
    pub backoff_cap: Duration,
}

impl std::fmt::Debug for FhirClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FhirClientConfig")
            .field("base_url", &iomt_core::redact_url(&self.base_url))
            .field("auth", &self.auth)
            .field("request_timeout", &self.request_timeout)
            .field("max_concurrency", &self.max_concurrency)
            .field("max_retries", &self.max_retries)
            .finish_non_exhaustive()
    }
}

impl FhirClientConfig {
    /// Defaults suited to a managed FHIR service.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            auth: Auth::None,
            request_timeout: Duration::from_secs(30),
            max_concurrency: 32,
            max_retries: 5,
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(30),
        }
    }
}

/// Why a FHIR request failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FhirError {
    /// 409 or 412: someone else changed the resource; re-read and re-merge.
    #[error("the FHIR server reported a conflict ({status})")]
    Conflict {
        /// 409 or 412.
        status: u16,
    },
    /// A 4xx the data caused: the resource is invalid for this server. Retrying cannot help.
    #[error("the FHIR server rejected the request with {status}: {message}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The OperationOutcome's diagnostics and details, or the start of the body.
        message: String,
        /// The OperationOutcome, when the server sent one.
        outcome: Option<Value>,
    },
    /// 401 or 403: credentials or permissions are wrong; an operator must act.
    #[error(
        "the FHIR server refused access ({status}): check the credentials and the role assignment"
    )]
    Unauthorized {
        /// 401 or 403.
        status: u16,
    },
    /// Retries are exhausted on 429, 5xx, timeouts or connection errors.
    #[error("the FHIR server is unavailable after {attempts} attempts: {last}")]
    Unavailable {
        /// Attempts made.
        attempts: u32,
        /// What the last attempt met.
        outage: Outage,
        /// The last failure, without URLs or response bodies.
        last: String,
    },
    /// No token could be obtained from Microsoft Entra ID.
    #[error("could not get an access token: {0}")]
    Credential(String),
    /// A 2xx whose body is not the JSON expected.
    #[error("the FHIR server sent an unreadable response: {0}")]
    InvalidResponse(String),
}

impl FhirError {
    /// The MedTech metric name for this failure (`FHIRServiceError…`).
    pub fn metric_name(&self) -> &'static str {
        match self {
            FhirError::Conflict { .. } => "FHIRResourceContention",
            FhirError::Rejected { .. } => "FHIRServiceErrorHttpRequestError",
            FhirError::Unauthorized { .. } => "FHIRServiceErrorAuthorizationError",
            FhirError::Unavailable { outage, .. } => outage.metric_name(),
            FhirError::InvalidResponse(_) => "FHIRServiceErrorInvalidResponse",
            FhirError::Credential(_) => "FHIRServiceErrorMsalServiceError",
        }
    }
}

/// What kept a request from an answer it could use, as counted and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// 429: the server throttles.
    Throttled,
    /// A 5xx: the server or a gateway before it failed.
    Unavailable(u16),
    /// No answer within the request timeout.
    Timeout,
    /// The connection could not be made or broke (refused, reset, DNS, TLS).
    Connection,
    /// No access token could be obtained.
    Token,
}

impl Outage {
    /// The kind, for logs: `throttled`, `unavailable`, `timeout`, `connection`, `token`.
    pub fn label(self) -> &'static str {
        match self {
            Outage::Throttled => "throttled",
            Outage::Unavailable(_) => "unavailable",
            Outage::Timeout => "timeout",
            Outage::Connection => "connection",
            Outage::Token => "token",
        }
    }

    /// MedTech's name for it: `FHIRServiceError` and the response's reason phrase without
    /// spaces; for failures without a response, the .NET exception MedTech would see.
    pub fn metric_name(self) -> &'static str {
        match self {
            Outage::Throttled => "FHIRServiceErrorTooManyRequests",
            Outage::Unavailable(503) => "FHIRServiceErrorServiceUnavailable",
            Outage::Unavailable(502) => "FHIRServiceErrorBadGateway",
            Outage::Unavailable(504) => "FHIRServiceErrorGatewayTimeout",
            Outage::Unavailable(_) => "FHIRServiceErrorInternalServerError",
            Outage::Timeout => "FHIRServiceErrorTaskCanceledException",
            Outage::Connection => "FHIRServiceErrorHttpRequestError",
            Outage::Token => "FHIRServiceErrorMsalServiceError",
        }
    }
}

/// A resource with the version it was read or written at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    /// The resource JSON.
    pub resource: Value,
    /// The ETag (`W/"3"`), for `If-Match`.
    pub etag: Option<String>,
}

impl Versioned {
    /// A resource read from a search result, which carries no ETag.
    pub fn of(resource: Value) -> Self {
        Self {
            resource,
            etag: None,
        }
    }

    /// What a write that left the resource at this version did.
    pub fn written(&self, action: Action, identity: bool) -> Written {
        let text = |v: &Value| v.as_str().map(str::to_owned);
        let meta = &self.resource["meta"];
        Written {
            resource_type: text(&self.resource["resourceType"]).unwrap_or_default(),
            id: text(&self.resource["id"]).unwrap_or_default(),
            version_id: text(&meta["versionId"]).or_else(|| {
                // `W/"3"` carries the version when the body does not.
                self.etag
                    .as_deref()
                    .map(|e| e.trim_start_matches("W/").trim_matches('"').to_owned())
            }),
            last_updated: text(&meta["lastUpdated"]),
            action,
            identity,
        }
    }
}

/// Sees every HTTP request the client makes (each attempt of a retried one): metrics of
/// requests by status and their latency. `status` is `None` when no answer came.
pub trait RequestObserver: Send + Sync + std::fmt::Debug {
    /// One request's method, status and time to its answer.
    fn observe(&self, method: &Method, status: Option<u16>, elapsed: Duration);
}

/// A FHIR R4 REST client.
#[derive(Debug, Clone)]
pub struct FhirClient {
    pub(crate) http: reqwest::Client,
    pub(crate) config: Arc<FhirClientConfig>,
    slots: Arc<Semaphore>,
    token: Arc<tokio::sync::Mutex<Option<BearerToken>>>,
    observer: Option<Arc<dyn RequestObserver>>,
}

/// Tokens are renewed this long before they expire.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);

enum Attempt {
    Done(reqwest::StatusCode, header::HeaderMap, Vec<u8>),
    Retry {
        after: Option<Duration>,
        outage: Outage,
        reason: String,
    },
}

impl FhirClient {
    /// Builds a client with a connection pool shared by every request.
    pub fn new(config: FhirClientConfig) -> Result<Self, FhirError> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .pool_max_idle_per_host(config.max_concurrency)
            .build()
            .map_err(|e| {
                FhirError::InvalidResponse(format!("cannot build the HTTP client: {e}"))
            })?;
        let slots = Arc::new(Semaphore::new(config.max_concurrency.max(1)));
        Ok(Self {
            http,
            config: Arc::new(config),
            slots,
            token: Arc::default(),
            observer: None,
        })
    }

    /// This client (sharing its connections, slots and token) reporting every request to
    /// `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn RequestObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The URL of `path` (`Type/id`, `Type?query`) under the base URL, with the base URL's
    /// own query (an API gateway's `code`, say) kept and the path's added to it.
    fn url(&self, path: &str) -> String {
        request_url(&self.config.base_url, path)
    }

    /// The `Authorization` value, from the token cache when it is still fresh.
    pub(crate) async fn authorization(&self) -> Result<Option<String>, String> {
        match &self.config.auth {
            Auth::None => Ok(None),
            Auth::Bearer(token) => Ok(Some(format!("Bearer {}", token.expose()))),
            Auth::Token(source) => {
                let mut cached = self.token.lock().await;
                let fresh = cached
                    .as_ref()
                    .is_some_and(|t| t.expires_at > SystemTime::now() + TOKEN_MARGIN);
                if !fresh {
                    *cached = Some(source.token().await?);
                }
                Ok(cached
                    .as_ref()
                    .map(|t| format!("Bearer {}", t.secret.expose())))
            }
        }
    }

    async fn attempt(
        &self,
        method: &Method,
        url: &str,
        body: Option<&[u8]>,
        headers: &[(header::HeaderName, &str)],
    ) -> Attempt {
        let Ok(_slot) = self.slots.acquire().await else {
            return Attempt::Retry {
                after: None,
                outage: Outage::Connection,
                reason: "client is shutting down".into(),
            };
        };
        let mut req = self
            .http
            .request(method.clone(), url)
            .header(header::ACCEPT, "application/fhir+json");
        match self.authorization().await {
            Ok(Some(value)) => req = req.header(header::AUTHORIZATION, value),
            Ok(None) => {}
            Err(e) => {
                return Attempt::Retry {
                    after: None,
                    outage: Outage::Token,
                    reason: format!("no access token: {e}"),
                };
            }
        }
        if let Some(body) = body {
            req = req
                .header(header::CONTENT_TYPE, "application/fhir+json")
                .body(body.to_vec());
        }
        for (name, value) in headers {
            req = req.header(name, *value);
        }
        let sent = std::time::Instant::now();
        let observe = |status: Option<u16>| {
            if let Some(observer) = &self.observer {
                observer.observe(method, status, sent.elapsed());
            }
        };
        let response = match req.send().await {
            Ok(r) => r,
            // The error names the URL, whose query may hold a secret and whose search
            // values are patient data: it goes without.
            Err(e) => {
                observe(None);
                return failed_request(e.without_url());
            }
        };
        let status = response.status();
        observe(Some(status.as_u16()));
        let headers = response.headers().clone();
        let bytes = match response.bytes().await {
            Ok(b) => b.to_vec(),
            Err(e) => return failed_request(e.without_url()),
        };
        if status == StatusCode::UNAUTHORIZED && matches!(self.config.auth, Auth::Token(_)) {
            // The token may have been revoked or rotated early: fetch a new one and retry.
            let mut cached = self.token.lock().await;
            if cached.take().is_some() {
                return Attempt::Retry {
                    after: Some(Duration::ZERO),
                    outage: Outage::Token,
                    reason: "401 with a cached token".into(),
                };
            }
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            return Attempt::Retry {
                after: retry_after(&headers),
                outage: match status {
                    StatusCode::TOO_MANY_REQUESTS => Outage::Throttled,
                    _ => Outage::Unavailable(status.as_u16()),
                },
                reason: format!("{status}"),
            };
        }
        if status.is_server_error() {
            // An error page may echo the request: its start is logged only when asked for.
            if iomt_core::log_phi() {
                tracing::debug!(%status, body = %body_excerpt(&bytes), "fhir server error");
            }
            return Attempt::Retry {
                after: None,
                outage: Outage::Unavailable(status.as_u16()),
                reason: format!("{status}"),
            };
        }
        Attempt::Done(status, headers, bytes)
    }

    /// Sends one request, retrying what is retryable. Returns the final status, headers and
    /// body for any non-retryable response.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> Result<(StatusCode, header::HeaderMap, Vec<u8>), FhirError> {
        let if_match: Vec<(header::HeaderName, &str)> = if_match
            .map(|e| (header::IF_MATCH, e))
            .into_iter()
            .collect();
        self.send_to(method, self.url(path), path, body, &if_match)
            .await
    }

    /// [`Self::send`] to a whole URL, with more headers; `path` names the request in logs.
    /// Each request is a span (`fhir_request`) with its method, resource type, final status
    /// and attempts, for traces; the path's ids and search values stay out of it.
    pub(crate) async fn send_to(
        &self,
        method: Method,
        url: String,
        path: &str,
        body: Option<&Value>,
        headers: &[(header::HeaderName, &str)],
    ) -> Result<(StatusCode, header::HeaderMap, Vec<u8>), FhirError> {
        use tracing::Instrument as _;
        let resource = path.split(['/', '?']).next().unwrap_or_default();
        let span = tracing::info_span!(
            "fhir_request",
            %method,
            resource,
            status = tracing::field::Empty,
            attempts = tracing::field::Empty,
        );
        let result = self
            .retrying(&method, &url, path, body, headers)
            .instrument(span.clone())
            .await;
        match &result {
            Ok((status, _, _)) => span.record("status", i64::from(status.as_u16())),
            Err(FhirError::Unavailable { attempts, .. }) => {
                span.record("attempts", i64::from(*attempts))
            }
            Err(_) => &span,
        };
        result
    }

    async fn retrying(
        &self,
        method: &Method,
        url: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(header::HeaderName, &str)],
    ) -> Result<(StatusCode, header::HeaderMap, Vec<u8>), FhirError> {
        let body = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.attempt(method, url, body.as_deref(), headers).await {
                Attempt::Done(status, headers, bytes) => {
                    tracing::Span::current().record("attempts", i64::from(attempt));
                    return Ok((status, headers, bytes));
                }
                Attempt::Retry {
                    after,
                    outage,
                    reason,
                } => {
                    if attempt > self.config.max_retries {
                        return Err(FhirError::Unavailable {
                            attempts: attempt,
                            outage,
                            last: reason,
                        });
                    }
                    let wait = after
                        .unwrap_or_else(|| self.backoff(attempt))
                        .min(self.config.backoff_cap);
                    // The resource type only: the rest of a path holds ids and search values.
                    let resource = path.split(['/', '?']).next().unwrap_or_default();
                    tracing::warn!(%method, resource, attempt, wait_ms = wait.as_millis() as u64, kind = outage.label(), reason, "fhir request will be retried");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// The wait before retry number `attempt`.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        iomt_core::Backoff::new(self.config.backoff_base, self.config.backoff_cap).delay(attempt)
    }

    /// `GET {type}/{id}`; `None` when the resource does not exist.
    pub async fn read(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<Versioned>, FhirError> {
        let (status, headers, body) = self
            .send(Method::GET, &format!("{resource_type}/{id}"), None, None)
            .await?;
        if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            return Ok(None);
        }
        versioned(status, &headers, &body).map(Some)
    }

    /// `GET {type}/{id}/_history/{version}`; `None` when the server has no such version.
    pub async fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version: &str,
    ) -> Result<Option<Value>, FhirError> {
        let path = format!("{resource_type}/{id}/_history/{version}");
        let (status, headers, body) = self.send(Method::GET, &path, None, None).await?;
        if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            return Ok(None);
        }
        versioned(status, &headers, &body).map(|v| Some(v.resource))
    }

    /// `GET {type}?{params}`, following `next` links, returning at most `limit` resources.
    pub async fn search(
        &self,
        resource_type: &str,
        params: &[(&str, &str)],
        limit: usize,
    ) -> Result<Vec<Value>, FhirError> {
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        let mut path = format!("{resource_type}?{}", query.join("&"));
        let mut found = Vec::new();
        loop {
            let (status, headers, body) = self.send(Method::GET, &path, None, None).await?;
            let bundle = versioned(status, &headers, &body)?.resource;
            for entry in bundle["entry"].as_array().into_iter().flatten() {
                if entry["search"]["mode"]
                    .as_str()
                    .is_none_or(|m| m == "match")
                {
                    found.push(entry["resource"].clone());
                }
            }
            let next = bundle["link"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str());
            match next {
                Some(url) if found.len() < limit => {
                    // Only links under the base URL are followed: a token goes nowhere else.
                    let base = self.config.base_url.split('?').next().unwrap_or_default();
                    match url.strip_prefix(base.trim_end_matches('/')) {
                        Some(rest) => path = rest.to_owned(),
                        None => {
                            tracing::debug!(
                                "a search's next link leaves the base URL; paging stops"
                            );
                            break;
                        }
                    }
                }
                _ => break,
            }
        }
        found.truncate(limit);
        Ok(found)
    }

    /// `PUT {type}/{id}` (update, or create with a client-chosen id), conditional on
    /// `if_match` when given.
    pub async fn update(
        &self,
        resource: &Value,
        if_match: Option<&str>,
    ) -> Result<Versioned, FhirError> {
        self.put(resource, if_match)
            .await
            .map(|(written, _)| written)
    }

    /// [`FhirClient::update`], also telling whether the PUT created the resource (201) or
    /// replaced one (200).
    pub async fn put(
        &self,
        resource: &Value,
        if_match: Option<&str>,
    ) -> Result<(Versioned, bool), FhirError> {
        let (Some(resource_type), Some(id)) =
            (resource["resourceType"].as_str(), resource["id"].as_str())
        else {
            return Err(FhirError::InvalidResponse(
                "a resource to update needs resourceType and id".into(),
            ));
        };
        let (status, headers, body) = self
            .send(
                Method::PUT,
                &format!("{resource_type}/{id}"),
                Some(resource),
                if_match,
            )
            .await?;
        let created = status == StatusCode::CREATED;
        versioned(status, &headers, &body).map(|written| (written, created))
    }

    /// `GET` of a path under the base (`metadata`, `_history?_since=…`) or of a whole URL the
    /// server handed out (a `next` link, followed exactly as given): the JSON answer and the
    /// server's clock (its `Date` header), which the change feed reckons with instead of the
    /// local one. A whole URL must be on the base URL's origin: the request carries the
    /// credentials.
    pub async fn get_json(&self, target: &str) -> Result<(Value, Option<SystemTime>), FhirError> {
        let (url, path) = self.target(target)?;
        let (status, headers, body) = self.send_to(Method::GET, url, path, None, &[]).await?;
        let date = headers
            .get(header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|d| httpdate::parse_http_date(d).ok());
        Ok((versioned(status, &headers, &body)?.resource, date))
    }

    /// The URL of a path under the base, or a whole URL the server handed out, which must be
    /// on the base URL's origin (the request carries the credentials); and its name in logs.
    pub(crate) fn target<'a>(&self, target: &'a str) -> Result<(String, &'a str), FhirError> {
        if !(target.starts_with("http://") || target.starts_with("https://")) {
            return Ok((self.url(target), target));
        }
        if !self.same_origin(target) {
            return Err(FhirError::InvalidResponse(
                "a link leads away from the FHIR server's origin; not followed".into(),
            ));
        }
        Ok((target.to_owned(), "link"))
    }

    /// Whether a whole URL is on the base URL's origin.
    pub(crate) fn same_origin(&self, url: &str) -> bool {
        let origin = |u: &str| {
            reqwest::Url::parse(u)
                .ok()
                .map(|u| u.origin().ascii_serialization())
        };
        origin(url).is_some() && origin(url) == origin(&self.config.base_url)
    }

    /// `GET {type}/{id}/_history`: the latest `count` versions, newest first.
    pub async fn history(
        &self,
        resource_type: &str,
        id: &str,
        count: usize,
    ) -> Result<Vec<Value>, FhirError> {
        let path = format!("{resource_type}/{id}/_history?_count={count}");
        let (status, headers, body) = self.send(Method::GET, &path, None, None).await?;
        let bundle = versioned(status, &headers, &body)?.resource;
        Ok(bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.get("resource").cloned())
            .collect())
    }
}

/// Classifies a final response and reads its resource.
pub(crate) fn versioned(
    status: StatusCode,
    headers: &header::HeaderMap,
    body: &[u8],
) -> Result<Versioned, FhirError> {
    match status.as_u16() {
        200..=299 => {
            let resource: Value = serde_json::from_slice(body)
                .map_err(|e| FhirError::InvalidResponse(format!("{e}: {}", body_excerpt(body))))?;
            let etag = headers
                .get(header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .or_else(|| {
                    resource["meta"]["versionId"]
                        .as_str()
                        .map(|v| format!("W/\"{v}\""))
                });
            Ok(Versioned { resource, etag })
        }
        409 | 412 => Err(FhirError::Conflict {
            status: status.as_u16(),
        }),
        401 | 403 => Err(FhirError::Unauthorized {
            status: status.as_u16(),
        }),
        code => {
            let outcome: Option<Value> = serde_json::from_slice(body)
                .ok()
                .filter(|v: &Value| v["resourceType"] == "OperationOutcome");
            let message = outcome
                .as_ref()
                .map_or_else(|| body_excerpt(body), outcome_message);
            Err(FhirError::Rejected {
                status: code,
                message,
                outcome,
            })
        }
    }
}

/// The human part of an OperationOutcome: each issue's severity, code, diagnostics or details
/// text, and the FHIRPath expression it points at.
fn outcome_message(outcome: &Value) -> String {
    let issues: Vec<String> = outcome["issue"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            let text = i["diagnostics"]
                .as_str()
                .or_else(|| i["details"]["text"].as_str())
                .unwrap_or("");
            let at: Vec<&str> = i["expression"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let mut s = format!(
                "{} {}",
                i["severity"].as_str().unwrap_or("error"),
                i["code"].as_str().unwrap_or("unknown")
            );
            if !text.is_empty() {
                s.push_str(": ");
                s.push_str(text);
            }
            if !at.is_empty() {
                s.push_str(&format!(" (at {})", at.join(", ")));
            }
            s
        })
        .collect();
    if issues.is_empty() {
        "OperationOutcome without issues".into()
    } else {
        issues.join("; ")
    }
}

/// What kept a request from an answer: the clock, or the connection.
pub(crate) fn outage_of(e: &reqwest::Error) -> Outage {
    if e.is_timeout() {
        Outage::Timeout
    } else {
        Outage::Connection
    }
}

/// A request that got no usable answer, as a retryable attempt.
fn failed_request(e: reqwest::Error) -> Attempt {
    let outage = outage_of(&e);
    Attempt::Retry {
        after: None,
        outage,
        reason: format!("request failed ({}): {e}", outage.label()),
    }
}

/// `path` under `base`: the path joins the base's path, and the queries of both are kept.
fn request_url(base: &str, path: &str) -> String {
    let (base, base_query) = base.split_once('?').unwrap_or((base, ""));
    let (path, path_query) = path.split_once('?').unwrap_or((path, ""));
    let mut url = format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    );
    let queries: Vec<&str> = [path_query, base_query]
        .into_iter()
        .filter(|q| !q.is_empty())
        .collect();
    if !queries.is_empty() {
        url.push('?');
        url.push_str(&queries.join("&"));
    }
    url
}

fn body_excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.chars().count() > 200 {
        format!("{}…", text.chars().take(200).collect::<String>())
    } else {
        text.to_owned()
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub(crate) fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// Percent-encodes a search parameter value (RFC 3986 unreserved characters pass through;
/// `|` and `,` keep their FHIR meaning only when encoded as themselves, so they stay too).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z'
            | b'a'..=b'z'
            | b'0'..=b'9'
            | b'-'
            | b'.'
            | b'_'
            | b'~'
            | b'|'
            | b':'
            | b'/' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_urls_keep_the_base_query_after_the_path() {
        assert_eq!(
            request_url("https://fhir.example/r4/", "Patient/p1"),
            "https://fhir.example/r4/Patient/p1"
        );
        assert_eq!(
            request_url(
                "https://gw.example/fhir?code=SECRET",
                "Patient?identifier=x"
            ),
            "https://gw.example/fhir/Patient?identifier=x&code=SECRET"
        );
        assert_eq!(
            request_url("https://gw.example/fhir/?code=SECRET", "/Observation/o1"),
            "https://gw.example/fhir/Observation/o1?code=SECRET"
        );
    }

    #[test]
    fn configuration_and_credentials_print_without_secrets() {
        let mut config = FhirClientConfig::new("https://user:pw@gw.example/fhir?code=SECRET");
        config.auth = Auth::Bearer(Secret::new("token-value"));
        let credential = EntraCredential::ClientSecret {
            tenant_id: "t".into(),
            client_id: "c".into(),
            secret: Secret::new("client-secret-value"),
        };
        let printed = format!("{config:?} {credential:?}");
        for secret in ["pw@", "SECRET", "token-value", "client-secret-value"] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
    }

    #[test]
    fn outages_are_labelled_by_kind() {
        let names: Vec<_> = [
            Outage::Throttled,
            Outage::Unavailable(503),
            Outage::Unavailable(500),
            Outage::Timeout,
            Outage::Connection,
        ]
        .into_iter()
        .map(|o| (o.label(), o.metric_name()))
        .collect();
        assert_eq!(
            names,
            [
                ("throttled", "FHIRServiceErrorTooManyRequests"),
                ("unavailable", "FHIRServiceErrorServiceUnavailable"),
                ("unavailable", "FHIRServiceErrorInternalServerError"),
                ("timeout", "FHIRServiceErrorTaskCanceledException"),
                ("connection", "FHIRServiceErrorHttpRequestError"),
            ]
        );
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = header::HeaderMap::new();
        h.insert(header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(
            header::RETRY_AFTER,
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn operation_outcomes_are_summarized() {
        let oo = serde_json::json!({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "invalid", "details": {"text": "Missing required property"}, "expression": ["Observation.code"]}]});
        assert_eq!(
            outcome_message(&oo),
            "error invalid: Missing required property (at Observation.code)"
        );
        assert_eq!(encode("https://a.b/|x y"), "https://a.b/|x%20y");
    }
}
