//! How requests to the Blob service are authorized: Microsoft Entra ID tokens, SAS tokens, or the
//! account's Shared Key, and the storage connection strings users copy from the portal.
//!
//! All three are needed: Entra ID (workload identity) is the production default, a SAS is what an
//! operator can hand out with narrow rights, and Shared Key is what a connection string carries
//! and what the Azurite emulator accepts.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::{AccessToken, TokenCredential};
use azure_core::time::OffsetDateTime;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Request, Url};
use sha2::Sha256;

use super::error::BlobError;

/// The OAuth scope of Azure Storage, for tokens from Microsoft Entra ID.
pub const STORAGE_SCOPE: &str = "https://storage.azure.com/.default";

/// How long before its expiry a cached token is replaced: a token that is valid when the request
/// is signed must still be valid when a retried request reaches the service.
pub const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// The account name of the storage emulator (Azurite), which every emulator uses.
pub const DEVELOPMENT_ACCOUNT_NAME: &str = "devstoreaccount1";

/// The account key of the storage emulator. Microsoft publishes it; it protects nothing.
pub const DEVELOPMENT_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// How the checkpoint store proves its right to the container.
///
/// Cheap to clone: a clone shares the token cache.
#[derive(Clone)]
pub struct BlobAuth(Mode);

#[derive(Clone)]
enum Mode {
    SharedKey { account: String, key: Arc<[u8]> },
    Sas(String),
    Token(Arc<TokenAuth>),
}

impl BlobAuth {
    /// Signs every request with the account key (the "Authorize with Shared Key" scheme).
    ///
    /// `key` is the base64 account key as the portal shows it.
    pub fn shared_key(account: impl Into<String>, key: &str) -> Result<Self, BlobError> {
        let account = account.into();
        if account.is_empty() {
            return Err(BlobError::Config(
                "the storage account name is empty".to_owned(),
            ));
        }
        let key = BASE64.decode(key.trim()).map_err(|error| {
            BlobError::Config(format!("the storage account key is not base64: {error}"))
        })?;
        if key.is_empty() {
            return Err(BlobError::Config(
                "the storage account key is empty".to_owned(),
            ));
        }
        Ok(Self(Mode::SharedKey {
            account,
            key: key.into(),
        }))
    }

    /// Appends a shared access signature to every request's query string.
    ///
    /// `token` is the SAS query string, with or without its leading `?`. It needs read, write,
    /// create and list rights on the container (and create on the account to create the
    /// container).
    pub fn sas(token: &str) -> Result<Self, BlobError> {
        let token = token.trim().trim_start_matches('?');
        if token.is_empty() {
            return Err(BlobError::Config("the SAS token is empty".to_owned()));
        }
        if !token.split('&').any(|pair| pair.starts_with("sig=")) {
            return Err(BlobError::Config(
                "the SAS token has no signature (sig=)".to_owned(),
            ));
        }
        Ok(Self(Mode::Sas(token.to_owned())))
    }

    /// Sends a Microsoft Entra ID bearer token for [`STORAGE_SCOPE`], cached until
    /// [`TOKEN_REFRESH_MARGIN`] before it expires.
    ///
    /// The identity needs "Storage Blob Data Contributor" on the container.
    pub fn token(credential: Arc<dyn TokenCredential>) -> Self {
        Self(Mode::Token(Arc::new(TokenAuth {
            credential,
            cached: tokio::sync::Mutex::new(None),
        })))
    }

    /// The emulator's well-known account and key, as in Azurite's connection string.
    pub fn development_storage() -> Self {
        Self(Mode::SharedKey {
            account: DEVELOPMENT_ACCOUNT_NAME.to_owned(),
            key: BASE64
                .decode(DEVELOPMENT_ACCOUNT_KEY)
                .unwrap_or_default()
                .into(),
        })
    }

    /// Whether this mode sends a bearer token, which must not travel over plain HTTP.
    pub(crate) fn is_token(&self) -> bool {
        matches!(self.0, Mode::Token(_))
    }

    /// Adds what the mode needs to a finished request: the SAS query, a bearer token, or the
    /// Shared Key signature over the request as it will be sent.
    pub(crate) async fn authorize(&self, request: &mut Request) -> Result<(), BlobError> {
        match &self.0 {
            Mode::Sas(token) => {
                append_query(request.url_mut(), token);
                Ok(())
            }
            Mode::Token(auth) => {
                let token = auth.token().await?;
                let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                    BlobError::Credential(azure_core::Error::with_message(
                        azure_core::error::ErrorKind::Credential,
                        "the access token is not a valid header value",
                    ))
                })?;
                request.headers_mut().insert(AUTHORIZATION, value);
                Ok(())
            }
            Mode::SharedKey { account, key } => {
                let signature = sign(key, &string_to_sign(request, account));
                let value = HeaderValue::from_str(&format!("SharedKey {account}:{signature}"))
                    .map_err(|_| {
                        BlobError::Config(format!(
                            "the account name {account:?} is not a valid header value"
                        ))
                    })?;
                request.headers_mut().insert(AUTHORIZATION, value);
                Ok(())
            }
        }
    }
}

impl fmt::Debug for BlobAuth {
    /// Names the mode and the account, never the key, SAS signature or token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Mode::SharedKey { account, .. } => f
                .debug_struct("SharedKey")
                .field("account", account)
                .finish_non_exhaustive(),
            Mode::Sas(_) => f.write_str("Sas(..)"),
            Mode::Token(auth) => f
                .debug_struct("Token")
                .field("credential", &auth.credential)
                .finish_non_exhaustive(),
        }
    }
}

/// A token credential with the last token it produced.
struct TokenAuth {
    credential: Arc<dyn TokenCredential>,
    // A tokio mutex so that one refresh runs at a time and the others wait for its token.
    cached: tokio::sync::Mutex<Option<AccessToken>>,
}

impl TokenAuth {
    async fn token(&self) -> Result<String, BlobError> {
        let mut cached = self.cached.lock().await;
        let now = OffsetDateTime::now_utc();
        if let Some(token) = cached.as_ref()
            && token.expires_on - TOKEN_REFRESH_MARGIN > now
        {
            return Ok(token.token.secret().to_owned());
        }
        let token = self
            .credential
            .get_token(&[STORAGE_SCOPE], None)
            .await
            .map_err(BlobError::Credential)?;
        let secret = token.token.secret().to_owned();
        *cached = Some(token);
        Ok(secret)
    }
}

/// Appends `extra` (already encoded `k=v&k=v`) to the URL's query, keeping what is there.
fn append_query(url: &mut Url, extra: &str) {
    let query = match url.query() {
        Some(existing) if !existing.is_empty() => format!("{existing}&{extra}"),
        _ => extra.to_owned(),
    };
    url.set_query(Some(&query));
}

fn sign(key: &[u8], string_to_sign: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail; an empty MAC would only give a 403.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(string_to_sign.as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// The Shared Key string-to-sign of a request (service version 2015-02-21 and later), per
/// "Authorize with Shared Key" in the Azure Storage REST reference.
///
/// Headers are read from the request as built, so what is signed is what is sent. The
/// canonicalized `x-ms-*` headers are sorted by byte order; the service sorts with a collation
/// that differs only for names where a `-` meets a letter at the same position, which the
/// fixed header set of this store never has.
pub(crate) fn string_to_sign(request: &Request, account: &str) -> String {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
    };
    let mut out = String::with_capacity(256);
    out.push_str(request.method().as_str());
    out.push('\n');
    for name in ["content-encoding", "content-language"] {
        out.push_str(header(name));
        out.push('\n');
    }
    // Since 2015-02-21 a zero Content-Length is signed as the empty string.
    let content_length = header("content-length");
    if content_length != "0" {
        out.push_str(content_length);
    }
    out.push('\n');
    for name in [
        "content-md5",
        "content-type",
        "date",
        "if-modified-since",
        "if-match",
        "if-none-match",
        "if-unmodified-since",
        "range",
    ] {
        out.push_str(header(name));
        out.push('\n');
    }

    let mut ms_headers: Vec<(&str, &str)> = request
        .headers()
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("x-ms-"))
        .map(|(name, value)| (name.as_str(), value.to_str().unwrap_or("").trim()))
        .collect();
    ms_headers.sort_unstable();
    for (name, value) in ms_headers {
        out.push_str(name);
        out.push(':');
        out.push_str(value);
        out.push('\n');
    }

    out.push('/');
    out.push_str(account);
    out.push_str(request.url().path());
    let mut params: Vec<(String, String)> = request
        .url()
        .query_pairs()
        .map(|(name, value)| (name.to_lowercase(), value.into_owned()))
        .collect();
    params.sort();
    let mut index = 0;
    while index < params.len() {
        let name = &params[index].0;
        let mut values = vec![params[index].1.as_str()];
        let mut next = index + 1;
        while next < params.len() && params[next].0 == *name {
            values.push(params[next].1.as_str());
            next += 1;
        }
        out.push('\n');
        out.push_str(name);
        out.push(':');
        out.push_str(&values.join(","));
        index = next;
    }
    out
}

/// An Azure Storage connection string, reduced to what the checkpoint store needs: where the
/// Blob service is and how to authorize.
///
/// Accepts what the portal and Azurite print: `DefaultEndpointsProtocol`, `AccountName`,
/// `AccountKey`, `BlobEndpoint`, `EndpointSuffix`, `SharedAccessSignature`, and
/// `UseDevelopmentStorage=true`. Keys are case-insensitive; other keys (such as `QueueEndpoint`)
/// are ignored.
#[derive(Clone, Debug)]
pub struct StorageConnectionString {
    /// The Blob service endpoint, e.g. `https://acct.blob.core.windows.net` or
    /// `http://127.0.0.1:10000/devstoreaccount1`.
    pub blob_endpoint: Url,
    /// The Shared Key (from `AccountKey`) or the SAS (from `SharedAccessSignature`).
    pub auth: BlobAuth,
}

impl StorageConnectionString {
    /// Parses a connection string.
    pub fn parse(connection_string: &str) -> Result<Self, BlobError> {
        let mut protocol = None;
        let mut account = None;
        let mut key = None;
        let mut endpoint = None;
        let mut suffix = None;
        let mut sas = None;
        let mut development = false;
        for part in connection_string.split(';') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let Some((name, value)) = part.split_once('=') else {
                return Err(BlobError::Config(format!(
                    "connection string part {:?} is not Key=Value",
                    redact(part)
                )));
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "defaultendpointsprotocol" => protocol = Some(value.to_ascii_lowercase()),
                "accountname" => account = Some(value.to_owned()),
                "accountkey" => key = Some(value.to_owned()),
                "blobendpoint" => endpoint = Some(value.to_owned()),
                "endpointsuffix" => suffix = Some(value.to_owned()),
                "sharedaccesssignature" => sas = Some(value.to_owned()),
                "usedevelopmentstorage" => development = value.eq_ignore_ascii_case("true"),
                _ => {}
            }
        }

        if development {
            let endpoint = endpoint
                .unwrap_or_else(|| format!("http://127.0.0.1:10000/{DEVELOPMENT_ACCOUNT_NAME}"));
            return Ok(Self {
                blob_endpoint: parse_endpoint(&endpoint)?,
                auth: BlobAuth::development_storage(),
            });
        }

        let endpoint = match (endpoint, &account) {
            (Some(endpoint), _) => endpoint,
            (None, Some(account)) => {
                let protocol = protocol.as_deref().unwrap_or("https");
                let suffix = suffix.as_deref().unwrap_or("core.windows.net");
                format!("{protocol}://{account}.blob.{suffix}")
            }
            (None, None) => {
                return Err(BlobError::Config(
                    "the connection string has neither BlobEndpoint nor AccountName".to_owned(),
                ));
            }
        };
        let blob_endpoint = parse_endpoint(&endpoint)?;
        let auth = match (key, sas) {
            (Some(key), _) => {
                let Some(account) = account else {
                    return Err(BlobError::Config(
                        "the connection string has an AccountKey but no AccountName".to_owned(),
                    ));
                };
                BlobAuth::shared_key(account, &key)?
            }
            (None, Some(sas)) => BlobAuth::sas(&sas)?,
            (None, None) => {
                return Err(BlobError::Config(
                    "the connection string has neither AccountKey nor SharedAccessSignature"
                        .to_owned(),
                ));
            }
        };
        Ok(Self {
            blob_endpoint,
            auth,
        })
    }
}

fn parse_endpoint(endpoint: &str) -> Result<Url, BlobError> {
    let url = Url::parse(endpoint).map_err(|error| {
        BlobError::Config(format!("blob endpoint {endpoint:?} is not a URL: {error}"))
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(BlobError::Config(format!(
            "blob endpoint {endpoint:?} is not an http(s) URL"
        )));
    }
    Ok(url)
}

/// Keeps secrets out of error messages: shows only the key of a `Key=Value` part.
fn redact(part: &str) -> String {
    match part.split_once('=') {
        Some((name, _)) => format!("{name}=…"),
        None if part.chars().count() > 12 => {
            format!("{}…", part.chars().take(8).collect::<String>())
        }
        None => part.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::Method;

    fn request(method: Method, url: &str, headers: &[(&str, &str)]) -> Request {
        let mut request = Request::new(method, Url::parse(url).unwrap());
        for (name, value) in headers {
            request.headers_mut().insert(
                reqwest::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        request
    }

    async fn authorization(auth: &BlobAuth, mut request: Request) -> String {
        auth.authorize(&mut request).await.unwrap();
        request.headers()[AUTHORIZATION]
            .to_str()
            .unwrap()
            .to_owned()
    }

    // The expected values below were computed by the Python Azure SDK (azure-storage-blob
    // 12.31.1, `SharedKeyCredentialPolicy`) for the same requests, so they check this signer
    // against an independent implementation of the scheme.
    #[tokio::test]
    async fn shared_key_signature_matches_the_python_sdk() {
        let auth = BlobAuth::shared_key("myaccount", DEVELOPMENT_ACCOUNT_KEY).unwrap();
        let set_metadata = request(
            Method::PUT,
            "https://myaccount.blob.core.windows.net/checkpoints/ns.servicebus.windows.net/hub/$Default/checkpoint/0?comp=metadata",
            &[
                ("x-ms-date", "Sun, 22 Nov 2026 07:00:00 GMT"),
                ("x-ms-version", "2021-08-06"),
                ("x-ms-meta-sequencenumber", "42"),
                ("x-ms-meta-offset", "1024"),
                ("if-match", "\"0x8DC0FFEE\""),
                ("content-length", "0"),
            ],
        );
        assert_eq!(
            authorization(&auth, set_metadata).await,
            "SharedKey myaccount:KWoQe/otquns0Cq1pyS/S9V3ncOIUQaJgFUEtKgZzMM="
        );

        let put_blob = request(
            Method::PUT,
            "https://myaccount.blob.core.windows.net/checkpoints/ns/hub/cg/ownership/3",
            &[
                ("x-ms-date", "Sun, 22 Nov 2026 07:00:00 GMT"),
                ("x-ms-version", "2021-08-06"),
                ("x-ms-blob-type", "BlockBlob"),
                ("x-ms-meta-ownerid", "owner-a"),
                ("if-none-match", "*"),
                ("content-length", "0"),
            ],
        );
        assert_eq!(
            authorization(&auth, put_blob).await,
            "SharedKey myaccount:OCnl2UXPQKsJoVIr80rcrrkUHzMfgbCTTpWJwka0qbQ="
        );

        // Path-style emulator URL: the account appears twice in the canonicalized resource, and
        // the query values are signed decoded.
        let emulator = BlobAuth::development_storage();
        let list = request(
            Method::GET,
            "http://127.0.0.1:10000/devstoreaccount1/checkpoints?restype=container&comp=list&prefix=ns.servicebus.windows.net%2Fhub%2F%24Default%2Fownership%2F&include=metadata",
            &[
                ("x-ms-date", "Sun, 22 Nov 2026 07:00:00 GMT"),
                ("x-ms-version", "2021-08-06"),
            ],
        );
        assert_eq!(
            authorization(&emulator, list).await,
            "SharedKey devstoreaccount1:wb3HpLWoMF5soaDyliXAUkvqJ1mP1bjpxFDE7u2aNTs="
        );
    }

    #[test]
    fn string_to_sign_layout() {
        let list = request(
            Method::GET,
            "http://127.0.0.1:10000/devstoreaccount1/checkpoints?restype=container&comp=list&prefix=a%2Fb%2F&include=metadata",
            &[("x-ms-version", "2021-08-06"), ("x-ms-date", "D")],
        );
        assert_eq!(
            string_to_sign(&list, "devstoreaccount1"),
            "GET\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:D\nx-ms-version:2021-08-06\n\
             /devstoreaccount1/devstoreaccount1/checkpoints\ncomp:list\ninclude:metadata\n\
             prefix:a/b/\nrestype:container"
        );
    }

    #[tokio::test]
    async fn sas_is_appended_to_the_query() {
        let auth = BlobAuth::sas("?sv=2021-08-06&sig=abc%2B%3D").unwrap();
        let mut with_query = request(Method::GET, "http://h/acct/c?restype=container", &[]);
        auth.authorize(&mut with_query).await.unwrap();
        assert_eq!(
            with_query.url().as_str(),
            "http://h/acct/c?restype=container&sv=2021-08-06&sig=abc%2B%3D"
        );
        let mut without = request(Method::HEAD, "http://h/acct/c/a/b", &[]);
        auth.authorize(&mut without).await.unwrap();
        assert_eq!(
            without.url().as_str(),
            "http://h/acct/c/a/b?sv=2021-08-06&sig=abc%2B%3D"
        );
        assert!(BlobAuth::sas("sv=2021-08-06").is_err());
        assert!(BlobAuth::sas("").is_err());
    }

    #[derive(Debug)]
    struct CountingCredential {
        calls: std::sync::atomic::AtomicUsize,
        lifetime: azure_core::time::Duration,
    }

    #[async_trait::async_trait]
    impl TokenCredential for CountingCredential {
        async fn get_token(
            &self,
            scopes: &[&str],
            _options: Option<azure_core::credentials::TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            assert_eq!(scopes, [STORAGE_SCOPE]);
            let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(AccessToken::new(
                format!("token-{call}"),
                OffsetDateTime::now_utc() + self.lifetime,
            ))
        }
    }

    #[tokio::test]
    async fn bearer_token_is_cached_until_five_minutes_before_expiry() {
        let long = Arc::new(CountingCredential {
            calls: 0.into(),
            lifetime: azure_core::time::Duration::hours(1),
        });
        let auth = BlobAuth::token(long.clone());
        for _ in 0..3 {
            let header = authorization(&auth, request(Method::GET, "https://a/c", &[])).await;
            assert_eq!(header, "Bearer token-0");
        }
        assert_eq!(long.calls.load(std::sync::atomic::Ordering::SeqCst), 1);

        // A token that expires within the margin is replaced on every use.
        let short = Arc::new(CountingCredential {
            calls: 0.into(),
            lifetime: azure_core::time::Duration::minutes(4),
        });
        let auth = BlobAuth::token(short.clone());
        assert_eq!(
            authorization(&auth, request(Method::GET, "https://a/c", &[])).await,
            "Bearer token-0"
        );
        assert_eq!(
            authorization(&auth, request(Method::GET, "https://a/c", &[])).await,
            "Bearer token-1"
        );
    }

    #[test]
    fn connection_strings() {
        let azurite = StorageConnectionString::parse(&format!(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={DEVELOPMENT_ACCOUNT_KEY};BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
        ))
        .unwrap();
        assert_eq!(
            azurite.blob_endpoint.as_str(),
            "http://127.0.0.1:10000/devstoreaccount1"
        );
        assert!(format!("{:?}", azurite.auth).contains("devstoreaccount1"));
        assert!(!format!("{:?}", azurite.auth).contains("Eby8"));

        let portal = StorageConnectionString::parse(&format!(
            "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={DEVELOPMENT_ACCOUNT_KEY};EndpointSuffix=core.windows.net"
        ))
        .unwrap();
        assert_eq!(
            portal.blob_endpoint.as_str(),
            "https://acct.blob.core.windows.net/"
        );

        let sas = StorageConnectionString::parse(
            "BlobEndpoint=https://acct.blob.core.windows.net/;SharedAccessSignature=sv=2021-08-06&sig=x",
        )
        .unwrap();
        assert!(format!("{:?}", sas.auth).starts_with("Sas"));

        let dev = StorageConnectionString::parse("UseDevelopmentStorage=true").unwrap();
        assert_eq!(
            dev.blob_endpoint.as_str(),
            "http://127.0.0.1:10000/devstoreaccount1"
        );

        for bad in [
            "AccountName=acct",
            "AccountKey=abc=;BlobEndpoint=https://x",
            "BlobEndpoint=ftp://x;SharedAccessSignature=sig=1",
            "garbage",
            "AccountName=a;AccountKey=!!notbase64!!",
        ] {
            let error = StorageConnectionString::parse(bad).unwrap_err();
            assert!(matches!(error, BlobError::Config(_)), "{bad}: {error}");
        }
        let error = StorageConnectionString::parse("AccountName=a;AccountKey=!!notbase64!!")
            .unwrap_err()
            .to_string();
        assert!(!error.contains("notbase64"), "{error}");
    }
}
