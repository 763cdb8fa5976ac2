//! MedTech mappings as Azure exports them: an ARM or Bicep-compiled resource
//! (`{"type": "Microsoft.HealthcareApis/workspaces/iotconnectors", "properties":
//! {"deviceMapping": {"content": …}}}` and its `fhirdestinations` child with `fhirMapping`), an
//! ARM template holding such resources, or the `az healthcareapis workspace iot-connector`
//! commands' output (the properties flattened to the top). `iomt mapping import` finds the two
//! templates in any of them, so that customers leaving MedTech start from what Azure holds.

use serde_json::Value;

/// One mapping found in an export.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundMapping {
    /// The resource's name, where the export names it (`workspace/connector`).
    pub name: Option<String>,
    /// Where it was found, as a JSON path (`$.resources[2].properties.deviceMapping.content`).
    pub path: String,
    /// The template document (`CollectionContent` or `CollectionFhirTemplate`).
    pub content: Value,
    /// The FHIR destination's `resourceIdentityResolutionType` (`Create` or `Lookup`), next to
    /// a FHIR mapping.
    pub identity_resolution: Option<String>,
}

/// The mappings an export holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FoundMappings {
    /// Device mappings (`deviceMapping.content`).
    pub device: Vec<FoundMapping>,
    /// FHIR mappings (`fhirMapping.content`).
    pub fhir: Vec<FoundMapping>,
}

/// Why an export yields no templates.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// The document is a template already.
    #[error("this is a {0} template already, not an export: use it as it is")]
    AlreadyTemplate(String),
    /// A mapping's content is an ARM expression, which only a deployment evaluates.
    #[error(
        "{path} is an ARM template expression, which only a deployment evaluates: export the deployed resource instead (az healthcareapis workspace iot-connector show)"
    )]
    Expression {
        /// Where.
        path: String,
    },
    /// A mapping's content is neither a JSON object nor JSON text holding one.
    #[error("{path} is not a template (a JSON object, or JSON text holding one)")]
    NotATemplate {
        /// Where.
        path: String,
    },
    /// Nothing in the document looks like a MedTech mapping.
    #[error(
        "no deviceMapping.content or fhirMapping.content found: expected an ARM resource, an ARM template or az healthcareapis output"
    )]
    NothingFound,
}

/// How deep the search goes: exports nest a few levels; anything deeper is not one.
const MAX_DEPTH: usize = 32;

/// Finds every device and FHIR mapping in an export.
pub fn find_mappings(doc: &Value) -> Result<FoundMappings, ExportError> {
    if let Some(kind) = doc.get("templateType").and_then(Value::as_str) {
        return Err(ExportError::AlreadyTemplate(kind.to_owned()));
    }
    let mut found = FoundMappings::default();
    // (value, its path, the nearest enclosing resource name, depth)
    let mut stack: Vec<(&Value, String, Option<String>, usize)> =
        vec![(doc, "$".to_owned(), None, 0)];
    while let Some((value, path, name, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            continue;
        }
        match value {
            Value::Object(object) => {
                let name = object
                    .get("name")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or(name);
                for (key, list) in [
                    ("deviceMapping", &mut found.device),
                    ("fhirMapping", &mut found.fhir),
                ] {
                    let Some(content) = object.get(key).and_then(|m| m.get("content")) else {
                        continue;
                    };
                    let at = format!("{path}.{key}.content");
                    list.push(FoundMapping {
                        name: name.clone(),
                        content: template(content, &at)?,
                        path: at,
                        identity_resolution: object
                            .get("resourceIdentityResolutionType")
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                    });
                }
                // Keep the document's order: the stack pops the last pushed first.
                for (key, child) in object.iter().rev() {
                    if key != "deviceMapping" && key != "fhirMapping" {
                        stack.push((child, format!("{path}.{key}"), name.clone(), depth + 1));
                    }
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate().rev() {
                    stack.push((child, format!("{path}[{i}]"), name.clone(), depth + 1));
                }
            }
            _ => {}
        }
    }
    if found.device.is_empty() && found.fhir.is_empty() {
        return Err(ExportError::NothingFound);
    }
    Ok(found)
}

/// A mapping's content: an object, or (in some templates and CLI output) JSON text.
fn template(content: &Value, path: &str) -> Result<Value, ExportError> {
    match content {
        Value::Object(_) => Ok(content.clone()),
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ if text.trim_start().starts_with('[') && text.trim_end().ends_with(']') => {
                Err(ExportError::Expression {
                    path: path.to_owned(),
                })
            }
            _ => Err(ExportError::NotATemplate {
                path: path.to_owned(),
            }),
        },
        _ => Err(ExportError::NotATemplate {
            path: path.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn device() -> Value {
        json!({"templateType": "CollectionContent", "template": []})
    }

    fn fhir() -> Value {
        json!({"templateType": "CollectionFhirTemplate", "template": []})
    }

    #[test]
    fn arm_resources_templates_and_cli_output() {
        // One ARM resource, as the portal's "Export template" or `az resource show` gives it.
        let resource = json!({"type": "Microsoft.HealthcareApis/workspaces/iotconnectors",
            "name": "ws/medtech", "properties": {"deviceMapping": {"content": device()}}});
        let found = find_mappings(&resource).unwrap();
        assert_eq!(found.device.len(), 1);
        assert_eq!(found.device[0].name.as_deref(), Some("ws/medtech"));
        assert_eq!(found.device[0].path, "$.properties.deviceMapping.content");
        assert!(found.fhir.is_empty());

        // An ARM template with the connector and its FHIR destination.
        let arm = json!({"$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
            "resources": [
                {"type": "Microsoft.HealthcareApis/workspaces/iotconnectors", "name": "ws/medtech",
                 "properties": {"deviceMapping": {"content": device()}}},
                {"type": "Microsoft.HealthcareApis/workspaces/iotconnectors/fhirdestinations",
                 "name": "ws/medtech/fhir",
                 "properties": {"resourceIdentityResolutionType": "Create",
                                "fhirMapping": {"content": fhir().to_string()}}}]});
        let found = find_mappings(&arm).unwrap();
        assert_eq!(
            found.device[0].path,
            "$.resources[0].properties.deviceMapping.content"
        );
        assert_eq!(found.fhir[0].name.as_deref(), Some("ws/medtech/fhir"));
        assert_eq!(found.fhir[0].content, fhir(), "JSON text is read");
        assert_eq!(found.fhir[0].identity_resolution.as_deref(), Some("Create"));

        // `az healthcareapis workspace iot-connector show`: properties at the top.
        let cli = json!({"name": "medtech", "deviceMapping": {"content": device()}, "etag": "x"});
        assert_eq!(
            find_mappings(&cli).unwrap().device[0].path,
            "$.deviceMapping.content"
        );
    }

    #[test]
    fn what_is_not_an_export_is_named() {
        assert_eq!(
            find_mappings(&device()),
            Err(ExportError::AlreadyTemplate("CollectionContent".into()))
        );
        assert_eq!(
            find_mappings(&json!({"a": 1})),
            Err(ExportError::NothingFound)
        );
        let expression =
            json!({"properties": {"deviceMapping": {"content": "[variables('deviceMapping')]"}}});
        assert!(matches!(
            find_mappings(&expression),
            Err(ExportError::Expression { .. })
        ));
        let number = json!({"properties": {"deviceMapping": {"content": 5}}});
        assert!(matches!(
            find_mappings(&number),
            Err(ExportError::NotATemplate { .. })
        ));
        // Deeper than any export: not searched, and no stack overflow.
        let mut deep = json!({"deviceMapping": {"content": device()}});
        for _ in 0..1_000 {
            deep = json!([deep]);
        }
        assert_eq!(find_mappings(&deep), Err(ExportError::NothingFound));
    }
}
