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
}
