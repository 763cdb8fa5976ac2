//! Normalize: random messages against every sample device mapping, and against a random
//! template when the input's first line is one that loads.
#![no_main]

use std::sync::OnceLock;

use iomt_normalize::Normalizer;
use iomt_templates::device::DeviceMapping;
use libfuzzer_sys::fuzz_target;

const SAMPLES: [&str; 4] = [
    include_str!("../../mappings/heartrate/devicecontent.json"),
    include_str!("../../mappings/spo2/devicecontent.json"),
    include_str!("../../mappings/iothub/devicecontent.json"),
    include_str!("../../examples/capture/devicecontent.json"),
];

fn samples() -> &'static [Normalizer] {
    static LOADED: OnceLock<Vec<Normalizer>> = OnceLock::new();
    LOADED.get_or_init(|| {
        SAMPLES
            .iter()
            .map(|t| Normalizer::new(DeviceMapping::parse(t).expect("a sample mapping loads")))
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let event = |body: &[u8]| iomt_core::DeviceEvent {
        body: body.to_vec(),
        ..Default::default()
    };
    for normalizer in samples() {
        let _ = normalizer.normalize_event(&event(data));
    }
    // "template\nmessage": a random template on a random message.
    if let Some(at) = data.iter().position(|b| *b == b'\n')
        && let Ok(text) = std::str::from_utf8(&data[..at])
        && let Ok(mapping) = DeviceMapping::parse(text)
    {
        let _ = Normalizer::new(mapping).normalize_event(&event(&data[at + 1..]));
    }
});
