//! Reading the XML the Blob service answers List Blobs and errors with.
//!
//! Only the few fields the checkpoint store needs are read; everything else in the document is
//! ignored, so newer service versions that add elements do not break it.
//!
//! It needs no Azure SDK type (`time`'s date is the one `azure_core::time` re-exports), so the
//! fuzz targets (`fuzz/fuzz_targets/blob_xml.rs`) include this file alone.

use time::OffsetDateTime;

/// One blob of a List Blobs page.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ListedBlob {
    pub(crate) name: String,
    /// Always in the quoted form the service uses in `ETag` headers (see [`quoted_etag`]).
    pub(crate) etag: Option<String>,
    pub(crate) last_modified: Option<OffsetDateTime>,
    /// Metadata in the case the service returned it; look keys up case-insensitively.
    pub(crate) metadata: Vec<(String, String)>,
}

/// One page of List Blobs.
#[derive(Debug, Default)]
pub(crate) struct ListPage {
    pub(crate) blobs: Vec<ListedBlob>,
    /// The marker of the next page; `None` on the last page.
    pub(crate) next_marker: Option<String>,
}

/// Parses a List Blobs (`restype=container&comp=list`) response body.
pub(crate) fn parse_list(body: &str) -> Result<ListPage, String> {
    // The service may start the document with a UTF-8 byte order mark.
    let body = body.trim_start_matches('\u{feff}');
    let document = roxmltree::Document::parse(body).map_err(|error| error.to_string())?;
    let root = document.root_element();
    if !root.has_tag_name("EnumerationResults") {
        return Err(format!(
            "expected <EnumerationResults>, found <{}>",
            root.tag_name().name()
        ));
    }
    let mut page = ListPage::default();
    for node in root.children().filter(roxmltree::Node::is_element) {
        match node.tag_name().name() {
            "NextMarker" => page.next_marker = Some(text(node)).filter(|marker| !marker.is_empty()),
            "Blobs" => {
                for blob in node.children().filter(|child| child.has_tag_name("Blob")) {
                    page.blobs.push(parse_blob(blob)?);
                }
            }
            _ => {}
        }
    }
    Ok(page)
}

fn parse_blob(blob: roxmltree::Node<'_, '_>) -> Result<ListedBlob, String> {
    let mut listed = ListedBlob::default();
    let mut name = None;
    for node in blob.children().filter(roxmltree::Node::is_element) {
        match node.tag_name().name() {
            "Name" => {
                // Names with characters XML cannot carry come percent-encoded; the store never
                // writes such names, so one is reported rather than guessed at.
                if node.attribute("Encoded") == Some("true") {
                    return Err(format!("blob name {:?} is encoded", text(node)));
                }
                name = Some(text(node));
            }
            "Properties" => {
                for property in node.children().filter(roxmltree::Node::is_element) {
                    match property.tag_name().name() {
                        "Etag" => {
                            listed.etag = Some(text(property))
                                .filter(|etag| !etag.trim().is_empty())
                                .map(|etag| quoted_etag(&etag))
                        }
                        "Last-Modified" => listed.last_modified = parse_http_date(&text(property)),
                        _ => {}
                    }
                }
            }
            "Metadata" => {
                for entry in node.children().filter(roxmltree::Node::is_element) {
                    listed
                        .metadata
                        .push((entry.tag_name().name().to_owned(), text(entry)));
                }
            }
            _ => {}
        }
    }
    listed.name = name.ok_or_else(|| "a <Blob> has no <Name>".to_owned())?;
    Ok(listed)
}

/// The `Code` and first line of `Message` of an error body, when it is the service's XML.
pub(crate) fn parse_error(body: &str) -> (Option<String>, Option<String>) {
    let body = body.trim_start_matches('\u{feff}');
    let Ok(document) = roxmltree::Document::parse(body) else {
        return (None, None);
    };
    let root = document.root_element();
    let field = |name: &str| {
        root.children()
            .find(|child| child.has_tag_name(name))
            .map(text)
    };
    let message = field("Message").and_then(|message| {
        message
            .lines()
            .next()
            .map(|line| line.trim().to_owned())
            .filter(|line| !line.is_empty())
    });
    (field("Code").filter(|code| !code.is_empty()), message)
}

fn text(node: roxmltree::Node<'_, '_>) -> String {
    // `Node::text` is only the first text child; entities or CDATA can split the text in several.
    node.children()
        .filter(|child| child.is_text())
        .filter_map(|child| child.text())
        .collect()
}

/// Puts an ETag in the quoted form of the `ETag` header.
///
/// List Blobs returns `0x8D…` while `ETag` headers carry `"0x8D…"`. The service accepts both in
/// `If-Match`, but one form everywhere lets callers compare the ETags they got from
/// `list_ownerships` with those from `claim_ownership`.
pub(crate) fn quoted_etag(etag: &str) -> String {
    let etag = etag.trim();
    if etag.starts_with('"') || etag.starts_with("W/\"") {
        etag.to_owned()
    } else {
        format!("\"{etag}\"")
    }
}

/// Parses an RFC 7231 date (`Sun, 22 Nov 2026 07:12:24 GMT`) as the service sends in
/// `Last-Modified`.
pub(crate) fn parse_http_date(date: &str) -> Option<OffsetDateTime> {
    let time = httpdate::parse_http_date(date.trim()).ok()?;
    Some(OffsetDateTime::from(time))
}

#[cfg(test)]
mod tests {
    use super::*;

    const AZURITE_PAGE: &str = r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?><EnumerationResults ServiceEndpoint="http://127.0.0.1:18400/devstoreaccount1" ContainerName="probe"><Prefix/><Marker/><MaxResults>5000</MaxResults><Blobs><Blob><Name>ns/hub/$Default/checkpoint/0</Name><Properties><Creation-Time>Sun, 22 Nov 2026 07:12:24 GMT</Creation-Time><Last-Modified>Sun, 22 Nov 2026 07:12:24 GMT</Last-Modified><Etag>0x25AB11CBC919120</Etag><Content-Length>0</Content-Length><BlobType>BlockBlob</BlobType></Properties><Metadata><SequenceNumber>5</SequenceNumber><offset>77</offset></Metadata></Blob><Blob><Name>ns/hub/$Default/checkpoint/1</Name><Properties><Etag>"0x1"</Etag></Properties><Metadata/></Blob></Blobs><NextMarker/></EnumerationResults>"#;

    #[test]
    fn parses_an_azurite_page() {
        let page = parse_list(AZURITE_PAGE).unwrap();
        assert_eq!(page.next_marker, None);
        assert_eq!(page.blobs.len(), 2);
        let first = &page.blobs[0];
        assert_eq!(first.name, "ns/hub/$Default/checkpoint/0");
        assert_eq!(first.etag.as_deref(), Some("\"0x25AB11CBC919120\""));
        assert_eq!(
            first.last_modified,
            Some(azure_core::time::parse_rfc7231("Sun, 22 Nov 2026 07:12:24 GMT").unwrap())
        );
        assert_eq!(
            first.metadata,
            vec![
                ("SequenceNumber".to_owned(), "5".to_owned()),
                ("offset".to_owned(), "77".to_owned())
            ]
        );
        assert_eq!(page.blobs[1].etag.as_deref(), Some("\"0x1\""));
        assert!(page.blobs[1].metadata.is_empty());
        assert_eq!(page.blobs[1].last_modified, None);
    }

    #[test]
    fn reads_the_next_marker_and_a_byte_order_mark() {
        let body = "\u{feff}<?xml version=\"1.0\" encoding=\"utf-8\"?><EnumerationResults><Blobs/><NextMarker>2!96!MDAw</NextMarker></EnumerationResults>";
        let page = parse_list(body).unwrap();
        assert!(page.blobs.is_empty());
        assert_eq!(page.next_marker.as_deref(), Some("2!96!MDAw"));
    }

    #[test]
    fn rejects_what_is_not_a_listing() {
        assert!(parse_list("").is_err());
        assert!(parse_list("<html>oops</html>").is_err());
        assert!(
            parse_list("<EnumerationResults><Blobs><Blob/></Blobs></EnumerationResults>").is_err()
        );
        assert!(parse_list("<EnumerationResults><Blobs><Blob><Name").is_err());
    }

    #[test]
    fn error_bodies() {
        let body = "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>ConditionNotMet</Code><Message>The condition specified using HTTP conditional header(s) is not met.\nRequestId:87c\nTime:2026</Message></Error>";
        assert_eq!(
            parse_error(body),
            (
                Some("ConditionNotMet".to_owned()),
                Some(
                    "The condition specified using HTTP conditional header(s) is not met."
                        .to_owned()
                )
            )
        );
        assert_eq!(parse_error("not xml"), (None, None));
    }

    #[test]
    fn etags_are_quoted_once() {
        assert_eq!(quoted_etag("0x1"), "\"0x1\"");
        assert_eq!(quoted_etag("\"0x1\""), "\"0x1\"");
        assert_eq!(quoted_etag("W/\"0x1\""), "W/\"0x1\"");
    }
}
