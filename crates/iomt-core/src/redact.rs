//! URLs as logs and errors may show them: endpoints are configured with secrets in them (user
//! info, a SAS or a function key in the query), and none may reach a log.

/// `url` without user info, and with its query and fragment replaced by `?***`.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    let (location, secret_part) = rest.split_at(end);
    let (authority, path) = location
        .find('/')
        .map_or((location, ""), |at| location.split_at(at));
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let mut out = String::with_capacity(url.len());
    if let Some(scheme) = scheme {
        out.push_str(scheme);
        out.push_str("://");
    }
    out.push_str(host);
    out.push_str(path);
    if !secret_part.is_empty() {
        out.push_str("?***");
    }
    out
}

static LOG_PHI: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Allows debug logs to carry patient data (response bodies, search values) for a diagnosis;
/// off unless the operator asks (`iomt --log-phi`). Info and warn logs never carry it.
pub fn set_log_phi(allowed: bool) {
    LOG_PHI.store(allowed, std::sync::atomic::Ordering::Relaxed);
}

/// Whether debug logs may carry patient data (see [`set_log_phi`]).
pub fn log_phi() -> bool {
    LOG_PHI.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether `url` is plain `http://` to a host other than a loopback address (`localhost`,
/// `127.0.0.0/8`, `::1`): anything sent there, credentials and patient data included, can be
/// read on the way.
pub fn is_insecure_remote(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host_port.split(':').next().unwrap_or_default(),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

/// A secret (a token, a password, a client secret): printed as `***` by `Debug` and
/// `Display`, so that a struct holding one can derive `Debug` and be logged without leaking
/// it. [`Secret::expose`] is the one way to the value, at the place that sends it.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, to send where it is needed.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_queries_are_hidden() {
        assert_eq!(
            redact_url("https://user:pw@hooks.example.org/a/b?code=SECRET#x"),
            "https://hooks.example.org/a/b?***"
        );
        assert_eq!(
            redact_url("http://127.0.0.1:8080/x"),
            "http://127.0.0.1:8080/x"
        );
        assert_eq!(redact_url("host/path?sig=1"), "host/path?***");
    }

    #[test]
    fn plain_http_is_insecure_unless_loopback() {
        for url in [
            "http://10.255.255.1/fhir",
            "http://fhir.example.org",
            "http://u:p@h:80/x",
        ] {
            assert!(is_insecure_remote(url), "{url}");
        }
        for url in [
            "https://fhir.example.org",
            "http://127.0.0.1:8080/fhir",
            "http://localhost/fhir",
            "http://[::1]:9/x",
            "http://127.8.9.1",
        ] {
            assert!(!is_insecure_remote(url), "{url}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("hunter2");
        assert_eq!(
            format!("{secret} {secret:?} {:?}", Some(&secret)),
            "*** *** Some(***)"
        );
        assert_eq!(secret.expose(), "hunter2");
    }
}
