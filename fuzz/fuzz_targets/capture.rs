//! Capture readers: any bytes are a JSON Lines file or an Event Hubs Capture Avro file whose
//! records are events or bad records; reading never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for record in iomt_files::capture::read_jsonl(data, "fuzz.jsonl", 64 * 1024) {
        let _ = record;
    }
    if let Ok(records) = iomt_files::capture::read_capture_avro(data, "fuzz.avro", "0") {
        for record in records.take(10_000) {
            let _ = record;
        }
    }
    let _ = iomt_files::deadletter::DeadLetter::from_json(
        &serde_json::from_slice(data).unwrap_or_default(),
    );
});
