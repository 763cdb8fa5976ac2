//! Device mapping templates: any text either loads or lists its errors; nothing panics, and a
//! template that loads can be run.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mapping) = iomt_templates::device::DeviceMapping::parse(text) {
        let normalizer = iomt_normalize::Normalizer::new(mapping);
        let event = iomt_core::DeviceEvent {
            body: br#"{"heartRate": 72, "deviceId": "d", "measuredAt": "2024-03-05T09:00:00Z", "a": [1, {"b": null}]}"#.to_vec(),
            ..Default::default()
        };
        let _ = normalizer.normalize_event(&event);
    }
});
