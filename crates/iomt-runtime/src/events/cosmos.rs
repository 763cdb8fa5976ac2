//! The Cosmos DB destination: a container holding the latest version of each resource.
//!
//! Written on reqwest because `azure_data_cosmos` needs a stable `azure_core`, which cannot
//! resolve next to the beta `azure_core` the Event Hubs SDK pins. Only the REST calls this
//! destination needs are here: read the container, read, query, create, replace and delete
//! documents, signed with the account key (the documented HMAC) or an Entra token.
//!
//! A document is written only over an older version: each change reads what is stored, then
//! creates it (which fails if another writer got there first) or replaces it under the
//! stored ETag (which fails if it changed meanwhile), and starts again on either failure.
//! Replays and retries therefore converge on the newest version whatever their order.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use futures::StreamExt as _;
use hmac::{Hmac, Mac as _};
use iomt_events::{Attempt, ChangeEvent, ChangeKind};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Map, Value, json};

use super::destination::{DestinationError, Outgoing};
use crate::config::{CosmosDelete, CosmosPartition};

/// The REST API version the requests speak.
const API_VERSION: &str = "2018-12-31";

/// What `encodeURIComponent` leaves alone: the authorization header and URL path segments.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// How many times one change re-reads and retries after losing a race to another writer
/// before the attempt counts as failed (and is retried by the subscription's policy).
const RACE_ROUNDS: usize = 8;

/// Keys of one batch written at once; changes of one resource stay in order.
const PARALLEL_RESOURCES: usize = 16;

/// An account key, decoded. Its `Debug` shows nothing of it.
pub(crate) struct MasterKey(Vec<u8>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(***)")
    }
}

impl MasterKey {
    /// Decodes a key as the portal shows it (base64). The error never quotes the key.
    pub(crate) fn new(text: &str) -> Result<Self, String> {
        match base64::engine::general_purpose::STANDARD.decode(text.trim()) {
            Ok(bytes) if !bytes.is_empty() => Ok(Self(bytes)),
            _ => Err("is not an account key (base64 text, as the portal shows it)".to_owned()),
        }
    }

    /// The `Authorization` header of a request: HMAC-SHA256 over the lower-cased verb and
    /// resource type, the resource link as it is, and the lower-cased `x-ms-date`.
    pub(crate) fn authorization(
        &self,
        verb: &str,
        resource_type: &str,
        resource_link: &str,
        date: &str,
    ) -> String {
        let text = format!(
            "{}\n{}\n{resource_link}\n{}\n\n",
            verb.to_ascii_lowercase(),
            resource_type.to_ascii_lowercase(),
            date.to_ascii_lowercase()
        );
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac = <Hmac<sha2::Sha256>>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(text.as_bytes());
        let signature =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        utf8_percent_encode(&format!("type=master&ver=1.0&sig={signature}"), COMPONENT).to_string()
    }
}

/// How requests are signed.
enum Auth {
    Key(MasterKey),
    Entra {
        credential: Arc<dyn azure_core::credentials::TokenCredential>,
        scope: String,
    },
}

/// The settings of a Cosmos DB destination.
pub(crate) struct Settings<'a> {
    pub(crate) endpoint: &'a str,
    pub(crate) database: &'a str,
    pub(crate) container: &'a str,
    pub(crate) key: Option<&'a str>,
    pub(crate) credential: Option<Arc<dyn azure_core::credentials::TokenCredential>>,
    pub(crate) partition: CosmosPartition,
    pub(crate) on_delete: CosmosDelete,
    pub(crate) client: reqwest::Client,
}

/// A container of the destination, and how its documents are keyed.
pub(crate) struct Cosmos {
    client: reqwest::Client,
    /// The endpoint without its trailing `/`.
    base: String,
    /// `dbs/{database}/colls/{container}`, as signed.
    link: String,
    auth: Auth,
    partition: CosmosPartition,
    on_delete: CosmosDelete,
    /// The top-level property the container is partitioned on, read from the container.
    key_property: tokio::sync::OnceCell<String>,
}

impl std::fmt::Debug for Cosmos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cosmos")
            .field("endpoint", &iomt_core::redact_url(&self.base))
            .field("container", &self.link)
            .finish_non_exhaustive()
    }
}

/// A request that did not succeed: a race with another writer, or a failed attempt.
enum Failure {
    /// 404, 409 or 412: what the request assumed no longer holds; read again.
    Race,
    /// Anything else, as the subscription's retry policy sees it.
    Attempt(Attempt),
}

impl From<Attempt> for Failure {
    fn from(a: Attempt) -> Self {
        Failure::Attempt(a)
    }
}

/// A document as stored, with what is needed to write over it.
struct Stored {
    doc: Value,
    etag: String,
    /// Its partition key value.
    partition: Value,
}

impl Cosmos {
    pub(crate) fn new(s: Settings<'_>) -> Result<Self, DestinationError> {
        let auth = match (s.key, s.credential) {
            (Some(key), _) => Auth::Key(
                MasterKey::new(key)
                    .map_err(|e| DestinationError::Config(format!("the Cosmos DB key {e}")))?,
            ),
            (None, Some(credential)) => Auth::Entra {
                credential,
                scope: format!("{}/.default", origin(s.endpoint)),
            },
            (None, None) => {
                return Err(DestinationError::Config(
                    "a Cosmos DB destination needs a key or an Entra identity".to_owned(),
                ));
            }
        };
        Ok(Self {
            client: s.client,
            base: s.endpoint.trim_end_matches('/').to_owned(),
            link: format!("dbs/{}/colls/{}", s.database, s.container),
            auth,
            partition: s.partition,
            on_delete: s.on_delete,
            key_property: tokio::sync::OnceCell::new(),
        })
    }

    /// Reads the container: it exists, the credentials work, and its partition key is one
    /// top-level property this destination can fill.
    pub(crate) async fn handshake(&self) -> Result<(), DestinationError> {
        self.key_property().await.map(|_| ())
    }

    async fn key_property(&self) -> Result<&str, DestinationError> {
        self.key_property
            .get_or_try_init(|| async {
                let fail = |m: String| DestinationError::Handshake(format!("Cosmos DB: {m}"));
                let response = self
                    .send(reqwest::Method::GET, "colls", &self.link, None, &[], None)
                    .await
                    .map_err(|a| fail(format!("reading the container failed ({a:?})")))?;
                let status = response.status();
                if !status.is_success() {
                    return Err(fail(format!("reading the container answered {status}")));
                }
                let container = json(response)
                    .await
                    .ok_or_else(|| fail("the container is not JSON".to_owned()))?;
                let paths = container["partitionKey"]["paths"].as_array();
                let property = match paths.map(Vec::as_slice) {
                    Some([Value::String(path)]) => path
                        .strip_prefix('/')
                        .filter(|p| !p.is_empty() && !p.contains('/'))
                        .map(str::to_owned),
                    _ => None,
                };
                let Some(property) = property else {
                    return Err(fail(
                        "the container's partition key must be one top-level path, such as /partitionKey".to_owned(),
                    ));
                };
                let reserved = match self.partition {
                    CosmosPartition::ResourceType => ["id", "resourceId", "meta"].as_slice(),
                    CosmosPartition::Patient => {
                        ["id", "resourceId", "meta", "resourceType"].as_slice()
                    }
                };
                if reserved.contains(&property.as_str()) {
                    return Err(fail(format!(
                        "the container is partitioned on /{property}, which holds resource content: use a property such as /partitionKey"
                    )));
                }
                Ok(property)
            })
            .await
            .map(String::as_str)
    }

    /// Writes a batch: the changes of each resource one after another, in order, and
    /// different resources in parallel.
    pub(crate) async fn deliver(&self, batch: &[Outgoing]) -> Vec<Attempt> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut group_of: std::collections::HashMap<&str, usize> = Default::default();
        for (i, o) in batch.iter().enumerate() {
            let g = *group_of.entry(o.key.as_str()).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
        }
        let results: Vec<Vec<(usize, Attempt)>> = futures::stream::iter(
            groups
                .into_iter()
                .map(|indices| self.apply_in_order(batch, indices)),
        )
        .buffer_unordered(PARALLEL_RESOURCES)
        .collect()
        .await;
        let mut attempts = vec![Attempt::SocketError; batch.len()];
        for (i, attempt) in results.into_iter().flatten() {
            attempts[i] = attempt;
        }
        attempts
    }

    async fn apply_in_order(
        &self,
        batch: &[Outgoing],
        indices: Vec<usize>,
    ) -> Vec<(usize, Attempt)> {
        let mut out = Vec::with_capacity(indices.len());
        for i in indices {
            out.push((i, self.apply(&batch[i]).await));
        }
        out
    }

    /// Applies one change: the document it leaves, unless a newer or equal one is stored.
    async fn apply(&self, o: &Outgoing) -> Attempt {
        let delivered = Attempt::Status {
            code: 200,
            retry_after: None,
        };
        let Ok(property) = self.key_property().await else {
            return Attempt::SocketError;
        };
        let event = &o.event;
        let id = document_id(event);
        let target = match (event.kind, self.on_delete) {
            (ChangeKind::Deleted, CosmosDelete::Remove) => None,
            (ChangeKind::Deleted, CosmosDelete::Mark) => {
                Some(self.tombstone(event, o.resource.as_ref(), property))
            }
            _ => match &o.resource {
                Some(resource) if resource.is_object() => {
                    Some(self.document(event, resource, property))
                }
                // A version that could not be read from the FHIR server (it may be deleted
                // since): delivered if something newer is stored, else retried; never
                // written as a stub over real content.
                _ => {
                    return match self.locate(&id, event).await {
                        Ok(stored) if stored.iter().any(|s| !supersedes(event, &s.doc)) => {
                            delivered
                        }
                        Err(Failure::Attempt(a)) => a,
                        _ => Attempt::Status {
                            code: 503,
                            retry_after: None,
                        },
                    };
                }
            },
        };
        for _ in 0..RACE_ROUNDS {
            match self.converge(&id, event, target.as_ref(), property).await {
                Ok(()) => return delivered,
                Err(Failure::Race) => continue,
                Err(Failure::Attempt(a)) => return a,
            }
        }
        // Contended beyond reason: let the retry policy come back later.
        Attempt::Status {
            code: 503,
            retry_after: None,
        }
    }

    /// One round: read what is stored, and write the change over it if it is newer.
    async fn converge(
        &self,
        id: &str,
        event: &ChangeEvent,
        target: Option<&Value>,
        property: &str,
    ) -> Result<(), Failure> {
        let stored = self.locate(id, event).await?;
        let newest = stored.iter().max_by(|a, b| order(&a.doc, &b.doc));
        let newer_stored = newest.is_some_and(|s| !supersedes(event, &s.doc));
        // A tombstone stays where the resource was: a deleted version may be unreadable, and
        // with it the patient.
        let moved;
        let target = match (target, newest) {
            (Some(doc), Some(s)) if event.kind == ChangeKind::Deleted => {
                let mut doc = doc.clone();
                doc[property] = s.partition.clone();
                moved = doc;
                Some(&moved)
            }
            _ => target,
        };
        let keep_partition = match (newer_stored, target) {
            (true, _) => newest.map(|s| s.partition.clone()),
            (false, Some(doc)) => {
                let partition = doc[property].clone();
                match stored.iter().find(|s| s.partition == partition) {
                    Some(s) => self.replace(id, doc, &partition, &s.etag).await?,
                    None => self.create(doc, &partition).await?,
                }
                Some(partition)
            }
            (false, None) => None,
        };
        // Copies in other partitions (the patient changed, or the change removes the
        // resource) go, each only if it is still the version that was read.
        for s in &stored {
            if Some(&s.partition) != keep_partition.as_ref() {
                self.delete(id, &s.partition, &s.etag).await?;
            }
        }
        Ok(())
    }

    /// The stored documents with this id: one read in the resource's partition when the
    /// partition follows from the event, else a query across partitions.
    async fn locate(&self, id: &str, event: &ChangeEvent) -> Result<Vec<Stored>, Failure> {
        if self.partition == CosmosPartition::ResourceType {
            let partition = Value::String(event.resource_type.clone());
            return Ok(self.read(id, &partition).await?.into_iter().collect());
        }
        self.query(id).await
    }

    async fn read(&self, id: &str, partition: &Value) -> Result<Option<Stored>, Failure> {
        let link = format!("{}/docs/{id}", self.link);
        let response = self
            .send(
                reqwest::Method::GET,
                "docs",
                &link,
                Some(partition),
                &[],
                None,
            )
            .await?;
        match response.status().as_u16() {
            404 => Ok(None),
            s if (200..300).contains(&s) => {
                let doc = json(response).await.ok_or(Attempt::SocketError)?;
                Ok(self.stored(doc))
            }
            _ => Err(failed(&response).into()),
        }
    }

    /// Every document with this id, in any partition (continuation pages followed).
    async fn query(&self, id: &str) -> Result<Vec<Stored>, Failure> {
        let body = serde_json::to_vec(&json!({
            "query": "SELECT * FROM c WHERE c.id = @id",
            "parameters": [{"name": "@id", "value": id}],
        }))
        .unwrap_or_default();
        let mut found = Vec::new();
        let mut continuation: Option<String> = None;
        for _ in 0..1000 {
            let mut headers = vec![
                ("x-ms-documentdb-isquery", "True".to_owned()),
                (
                    "x-ms-documentdb-query-enablecrosspartition",
                    "True".to_owned(),
                ),
                ("content-type", "application/query+json".to_owned()),
            ];
            if let Some(c) = continuation.take() {
                headers.push(("x-ms-continuation", c));
            }
            let response = self
                .send(
                    reqwest::Method::POST,
                    "docs",
                    &self.link,
                    None,
                    &headers,
                    Some(body.clone()),
                )
                .await?;
            if !response.status().is_success() {
                return Err(failed(&response).into());
            }
            continuation = response
                .headers()
                .get("x-ms-continuation")
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_owned);
            let page = json(response).await.ok_or(Attempt::SocketError)?;
            if let Some(docs) = page["Documents"].as_array() {
                found.extend(docs.iter().cloned().filter_map(|d| self.stored(d)));
            }
            if continuation.is_none() {
                return Ok(found);
            }
        }
        Err(Attempt::Status {
            code: 503,
            retry_after: None,
        }
        .into())
    }

    fn stored(&self, doc: Value) -> Option<Stored> {
        let property = self.key_property.get()?;
        let etag = doc["_etag"].as_str()?.to_owned();
        let partition = doc.get(property.as_str()).cloned().unwrap_or(Value::Null);
        Some(Stored {
            doc,
            etag,
            partition,
        })
    }

    async fn create(&self, doc: &Value, partition: &Value) -> Result<(), Failure> {
        let body = serde_json::to_vec(doc).unwrap_or_default();
        let headers = [("content-type", "application/json".to_owned())];
        let response = self
            .send(
                reqwest::Method::POST,
                "docs",
                &self.link,
                Some(partition),
                &headers,
                Some(body),
            )
            .await?;
        outcome(&response)
    }

    async fn replace(
        &self,
        id: &str,
        doc: &Value,
        partition: &Value,
        etag: &str,
    ) -> Result<(), Failure> {
        let body = serde_json::to_vec(doc).unwrap_or_default();
        let headers = [
            ("content-type", "application/json".to_owned()),
            ("if-match", etag.to_owned()),
        ];
        let link = format!("{}/docs/{id}", self.link);
        let response = self
            .send(
                reqwest::Method::PUT,
                "docs",
                &link,
                Some(partition),
                &headers,
                Some(body),
            )
            .await?;
        outcome(&response)
    }

    async fn delete(&self, id: &str, partition: &Value, etag: &str) -> Result<(), Failure> {
        let link = format!("{}/docs/{id}", self.link);
        let headers = [("if-match", etag.to_owned())];
        let response = self
            .send(
                reqwest::Method::DELETE,
                "docs",
                &link,
                Some(partition),
                &headers,
                None,
            )
            .await?;
        match response.status().as_u16() {
            // Already gone: what the delete wanted.
            404 => Ok(()),
            _ => outcome(&response),
        }
    }

    /// Sends a signed request for `resource_link` (as signed: names unescaped).
    async fn send(
        &self,
        method: reqwest::Method,
        resource_type: &str,
        resource_link: &str,
        partition: Option<&Value>,
        headers: &[(&'static str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response, Attempt> {
        let path: Vec<String> = resource_link
            .split('/')
            .map(|segment| utf8_percent_encode(segment, COMPONENT).to_string())
            .collect();
        let url = match (resource_type, method.as_str()) {
            // Creating and querying post to the feed of documents.
            ("docs", "POST") => format!("{}/{}/docs", self.base, path.join("/")),
            _ => format!("{}/{}", self.base, path.join("/")),
        };
        let date = httpdate::fmt_http_date(SystemTime::now());
        let authorization = match &self.auth {
            Auth::Key(key) => {
                key.authorization(method.as_str(), resource_type, resource_link, &date)
            }
            Auth::Entra { credential, scope } => {
                match credential.get_token(&[scope.as_str()], None).await {
                    Ok(token) => utf8_percent_encode(
                        &format!("type=aad&ver=1.0&sig={}", token.token.secret()),
                        COMPONENT,
                    )
                    .to_string(),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot get a token for Cosmos DB");
                        return Err(Attempt::SocketError);
                    }
                }
            }
        };
        let mut request = self
            .client
            .request(method, url)
            .header("authorization", authorization)
            .header("x-ms-date", date)
            .header("x-ms-version", API_VERSION);
        if let Some(partition) = partition {
            request = request.header("x-ms-documentdb-partitionkey", partition_header(partition));
        }
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        match request.send().await {
            Ok(response) => Ok(response),
            Err(e) if e.is_timeout() => Err(Attempt::TimedOut),
            Err(_) => Err(Attempt::SocketError),
        }
    }

    /// The document of a resource version: the resource with `id` set to `Type_id`, the
    /// FHIR id in `resourceId`, and the partition key property.
    fn document(&self, event: &ChangeEvent, resource: &Value, property: &str) -> Value {
        let mut doc: Map<String, Value> = resource.as_object().cloned().unwrap_or_default();
        doc.insert("id".to_owned(), Value::String(document_id(event)));
        doc.insert(
            "resourceId".to_owned(),
            Value::String(event.resource_id.clone()),
        );
        let partition = self.partition_value(event, Some(resource));
        doc.insert(property.to_owned(), partition);
        Value::Object(doc)
    }

    /// What a delete leaves in mark mode: the version and `deleted: true`, no content.
    fn tombstone(&self, event: &ChangeEvent, resource: Option<&Value>, property: &str) -> Value {
        let mut doc = Map::new();
        doc.insert("id".to_owned(), Value::String(document_id(event)));
        doc.insert(
            "resourceType".to_owned(),
            Value::String(event.resource_type.clone()),
        );
        doc.insert(
            "resourceId".to_owned(),
            Value::String(event.resource_id.clone()),
        );
        doc.insert(
            "meta".to_owned(),
            json!({"versionId": event.version_id, "lastUpdated": event.time}),
        );
        doc.insert("deleted".to_owned(), Value::Bool(true));
        doc.insert(property.to_owned(), self.partition_value(event, resource));
        Value::Object(doc)
    }

    fn partition_value(&self, event: &ChangeEvent, resource: Option<&Value>) -> Value {
        let value = match self.partition {
            CosmosPartition::ResourceType => event.resource_type.clone(),
            CosmosPartition::Patient => {
                patient_compartment(event, resource).unwrap_or_else(|| event.resource_type.clone())
            }
        };
        Value::String(value)
    }
}

/// `Type_id`: Cosmos ids cannot hold `/`, and FHIR ids never hold `_`, so the first `_`
/// splits it back.
pub(crate) fn document_id(event: &ChangeEvent) -> String {
    format!("{}_{}", event.resource_type, event.resource_id)
}

/// `Patient/{id}` of the patient whose compartment holds the resource, if any.
fn patient_compartment(event: &ChangeEvent, resource: Option<&Value>) -> Option<String> {
    if event.resource_type == "Patient" {
        return Some(format!("Patient/{}", event.resource_id));
    }
    let resource = resource?;
    ["subject", "patient", "beneficiary"]
        .iter()
        .find_map(|field| {
            let reference = resource[*field]["reference"].as_str()?;
            // Relative (`Patient/1`) or absolute (`https://…/Patient/1`, `…/_history/2`).
            let reference = reference.split("/_history/").next()?;
            let mut parts = reference.rsplit('/');
            let id = parts.next()?;
            (parts.next()? == "Patient" && !id.is_empty()).then(|| format!("Patient/{id}"))
        })
}

/// Whether the change leaves a newer state than the stored document: a higher version, or
/// the same version deleted. Numeric versions compare as numbers; others by `lastUpdated`.
fn supersedes(event: &ChangeEvent, stored: &Value) -> bool {
    let ours = Version {
        version: &event.version_id,
        last_updated: &event.time,
        deleted: event.kind == ChangeKind::Deleted,
    };
    ours.cmp_to(&Version::of(stored)) == std::cmp::Ordering::Greater
}

/// Orders stored documents, oldest first.
fn order(a: &Value, b: &Value) -> std::cmp::Ordering {
    Version::of(a).cmp_to(&Version::of(b))
}

struct Version<'a> {
    version: &'a str,
    last_updated: &'a str,
    deleted: bool,
}

impl<'a> Version<'a> {
    fn of(doc: &'a Value) -> Self {
        Self {
            version: doc["meta"]["versionId"].as_str().unwrap_or(""),
            last_updated: doc["meta"]["lastUpdated"].as_str().unwrap_or(""),
            deleted: doc["deleted"].as_bool().unwrap_or(false),
        }
    }

    fn cmp_to(&self, other: &Version<'_>) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        let at = |t: &str| iomt_core::Timestamp::parse(t).ok().map(|t| t.as_datetime());
        let by_version = match (self.version.parse::<u64>(), other.version.parse::<u64>()) {
            (Ok(a), Ok(b)) => a.cmp(&b),
            _ if self.version == other.version => Ordering::Equal,
            // A document without a version (written by something else) is the oldest.
            _ if other.version.is_empty() => Ordering::Greater,
            _ if self.version.is_empty() => Ordering::Less,
            // Opaque versions: by time; one whose time cannot be read is the older.
            _ => match (at(self.last_updated), at(other.last_updated)) {
                (Some(a), Some(b)) => a.cmp(&b),
                (a, b) => a.is_some().cmp(&b.is_some()),
            },
        };
        by_version.then(self.deleted.cmp(&other.deleted))
    }
}

/// The partition key header: a JSON array, non-ASCII escaped (header values are ASCII).
fn partition_header(value: &Value) -> String {
    let text = Value::Array(vec![value.clone()]).to_string();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() && !c.is_ascii_control() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// The origin of an endpoint URL, for the Entra scope.
fn origin(endpoint: &str) -> String {
    match reqwest::Url::parse(endpoint) {
        Ok(url) => url.origin().ascii_serialization(),
        Err(_) => endpoint.trim_end_matches('/').to_owned(),
    }
}

/// A JSON answer; `None` when the body cannot be read or parsed.
async fn json(response: reqwest::Response) -> Option<Value> {
    serde_json::from_slice(&response.bytes().await.ok()?).ok()
}

/// A write's answer: success, a lost race, or a failed attempt.
fn outcome(response: &reqwest::Response) -> Result<(), Failure> {
    match response.status().as_u16() {
        200..=299 => Ok(()),
        404 | 409 | 412 => Err(Failure::Race),
        _ => Err(failed(response).into()),
    }
}

/// An answer that failed, with the wait Cosmos asks for (`x-ms-retry-after-ms` on 429).
fn failed(response: &reqwest::Response) -> Attempt {
    let retry_after = response
        .headers()
        .get("x-ms-retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis);
    Attempt::Status {
        code: response.status().as_u16(),
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Microsoft's example in "Access control in the Azure Cosmos DB SQL API"
    /// (learn.microsoft.com/rest/api/cosmos-db/access-control-on-cosmosdb-resources).
    #[test]
    fn the_master_key_signature_matches_the_documented_example() {
        let key = MasterKey::new(
            "dsZQi3KtZmCv1ljt3VNWNm7sQUF1y5rJfC6kv5JiwvW0EndXdDku/dkKBp8/ufDToSxLzR4y+O/0H/t4bQtVNw==",
        )
        .unwrap();
        let header = key.authorization(
            "GET",
            "dbs",
            "dbs/ToDoList",
            "Thu, 27 Apr 2017 00:51:12 GMT",
        );
        // The page prints the encoding in lower case; percent-encoding is case-insensitive.
        assert_eq!(
            header.to_ascii_lowercase(),
            "type%3dmaster%26ver%3d1.0%26sig%3dc09pevjrgp2uqrkr934kfbtqhbyc7tvr3ohyqlu%2bc%2bc%3d"
        );
        assert!(header.ends_with("sig%3Dc09PEVJrgp2uQRkr934kFbTqhByc7TVr3OHyqlu%2Bc%2Bc%3D"));
        assert_eq!(format!("{key:?}"), "MasterKey(***)");
        assert!(MasterKey::new("not a key!").unwrap_err().contains("base64"));
        assert!(
            !MasterKey::new("not a key!")
                .unwrap_err()
                .contains("not a key")
        );
    }

    fn event(kind: ChangeKind, version: &str, time: &str) -> ChangeEvent {
        ChangeEvent::new("iomt", kind, "Observation", "o1", version, time)
    }

    #[test]
    fn only_newer_versions_and_deletions_of_the_same_version_supersede() {
        let stored = json!({"meta": {"versionId": "3", "lastUpdated": "2026-01-01T00:00:03Z"}});
        let at = "2026-01-01T00:00:00Z";
        assert!(supersedes(&event(ChangeKind::Updated, "4", at), &stored));
        assert!(!supersedes(&event(ChangeKind::Updated, "3", at), &stored));
        assert!(!supersedes(&event(ChangeKind::Updated, "2", at), &stored));
        assert!(supersedes(&event(ChangeKind::Deleted, "3", at), &stored));
        // Numbers, not text: 10 is after 9.
        let nine = json!({"meta": {"versionId": "9"}});
        assert!(supersedes(&event(ChangeKind::Updated, "10", at), &nine));
        // A tombstone of version 3 is newer than version 3 itself.
        let tomb = json!({"meta": {"versionId": "3"}, "deleted": true});
        assert!(!supersedes(&event(ChangeKind::Updated, "3", at), &tomb));
        assert!(supersedes(&event(ChangeKind::Created, "4", at), &tomb));
        // Opaque versions compare by lastUpdated.
        let opaque = json!({"meta": {"versionId": "b7f", "lastUpdated": "2026-01-01T00:00:05Z"}});
        assert!(supersedes(
            &event(ChangeKind::Updated, "c01", "2026-01-01T00:00:06Z"),
            &opaque
        ));
        assert!(!supersedes(
            &event(ChangeKind::Updated, "a00", "2026-01-01T00:00:04Z"),
            &opaque
        ));
        assert!(!supersedes(
            &event(ChangeKind::Updated, "b7f", "2026-01-01T00:00:09Z"),
            &opaque
        ));
        // A document without a version (written by something else) is replaced.
        assert!(supersedes(
            &event(ChangeKind::Updated, "1", at),
            &json!({"id": "x"})
        ));
    }

    #[test]
    fn the_patient_compartment_comes_from_the_patient_reference() {
        let obs = |reference: &str| json!({"resourceType": "Observation", "subject": {"reference": reference}});
        let e = event(ChangeKind::Updated, "1", "2026-01-01T00:00:00Z");
        assert_eq!(
            patient_compartment(&e, Some(&obs("Patient/p1"))).as_deref(),
            Some("Patient/p1")
        );
        assert_eq!(
            patient_compartment(
                &e,
                Some(&obs("https://fhir.example/R4/Patient/p2/_history/3"))
            )
            .as_deref(),
            Some("Patient/p2")
        );
        assert_eq!(patient_compartment(&e, Some(&obs("Device/d1"))), None);
        assert_eq!(patient_compartment(&e, None), None);
        let patient = ChangeEvent::new(
            "iomt",
            ChangeKind::Created,
            "Patient",
            "p9",
            "1",
            "2026-01-01T00:00:00Z",
        );
        assert_eq!(
            patient_compartment(&patient, None).as_deref(),
            Some("Patient/p9")
        );
        assert_eq!(document_id(&e), "Observation_o1");
    }

    #[test]
    fn the_partition_key_header_is_a_json_array_in_ascii() {
        assert_eq!(partition_header(&json!("Patient/p1")), r#"["Patient/p1"]"#);
        assert_eq!(partition_header(&json!("é")), r#"["\u00e9"]"#);
    }
}
