//! Handlebars templates: any resource template loads or is refused, and one that loads renders
//! or fails with an error, on a window context like the pipeline's.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(resource) = std::str::from_utf8(data) else {
        return;
    };
    let mapping = serde_json::json!({
        "templateType": "CollectionFhir",
        "template": [{"templateType": "HandlebarsFhir", "template": {
            "typeName": "hr", "periodInterval": 0, "key": "{{ids.device}}", "resource": resource
        }}]
    });
    let Ok(fhir) = iomt_templates::fhir::FhirMapping::parse(&mapping.to_string()) else {
        return;
    };
    let context = serde_json::json!({
        "type": "hr",
        "ids": {"device": "d1", "patient": "p1"},
        "period": {"start": "2024-03-05T09:00:00Z", "end": "2024-03-05T09:00:00Z"},
        "latest": {"hr": "72"},
        "values": {"hr": [{"time": "2024-03-05T09:00:00Z", "value": "72"}]},
        "identifier": {"system": "s", "value": "v"}
    });
    for template in &fhir.handlebars {
        let _ = template.render_resource(&context);
        let _ = template.render_key(&context);
    }
});
