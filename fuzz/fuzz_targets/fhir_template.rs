//! FHIR mapping templates (CodeValueFhir and HandlebarsFhir): any text loads or lists errors.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = iomt_templates::fhir::FhirMapping::parse(text);
    }
});
