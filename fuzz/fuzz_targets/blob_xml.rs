//! The Blob service's answers as the checkpoint store reads them: List Blobs pages (names,
//! ETags, dates, metadata, the next marker), error documents, and `Last-Modified` dates. Any
//! text is read or refused with a message, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The reader alone, without the rest of iomt-eventhubs and its Azure SDK (see the file).
#[allow(dead_code)]
#[path = "../../crates/iomt-eventhubs/src/blob/xml.rs"]
mod xml;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(page) = xml::parse_list(text) {
        for blob in &page.blobs {
            if let Some(etag) = &blob.etag {
                assert!(etag.starts_with('"') || etag.starts_with("W/\""), "{etag}");
            }
        }
        assert!(page.next_marker.as_deref() != Some(""));
    }
    let _ = xml::parse_error(text);
    let _ = xml::parse_http_date(text);
    let quoted = xml::quoted_etag(text);
    assert_eq!(xml::quoted_etag(&quoted), quoted);
});
