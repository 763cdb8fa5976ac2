//! Explanations for the commonest template-author question: "why did my template produce
//! nothing for this message?".
//!
//! Used by `iomt mapping test` when a template's `typeMatchExpression` selects no token. The
//! hints look for the members the expression tests, anywhere in the message, including
//! spellings that differ only in case, and point out envelope mistakes (testing `Body.x` on a
//! bare payload, or the reverse).

use iomt_templates::device::ContentTemplate;
use iomt_templates::expr::ExpressionKind;
use serde_json::Value;

/// Reasons, most useful first, why `template`'s `typeMatchExpression` selected nothing in
/// `root`.
pub fn why_no_match(template: &ContentTemplate, root: &Value) -> Vec<String> {
    let mut hints = Vec::new();
    let has_body = root.get("Body").is_some();
    match &template.type_match.kind {
        ExpressionKind::JsonPath(p) => {
            let mut chains = p.filter_member_paths();
            if chains.is_empty()
                && let Some(chain) = p.member_chain()
            {
                chains.push(chain.into_iter().map(str::to_owned).collect());
            }
            if chains.is_empty() {
                hints.push(format!(
                    "the expression {} selected no token in this message",
                    p.as_str()
                ));
            }
            for chain in &chains {
                hints.extend(explain_chain(chain, root, has_body));
            }
            if hints.is_empty() && chains.len() > 1 {
                hints.push(format!(
                    "each of {} exists somewhere, but no single object satisfies the whole filter of {}",
                    chains.iter().map(|c| format!("'{}'", c.join("."))).collect::<Vec<_>>().join(", "),
                    p.as_str()
                ));
            } else if hints.is_empty() {
                for chain in &chains {
                    let values: Vec<String> = find_chain(root, chain, false)
                        .into_iter()
                        .take(5)
                        .map(|(_, v)| preview(v, 40))
                        .collect();
                    hints.push(format!(
                        "'{}' exists, but the filter of {} is false for every object (values seen: {})",
                        chain.join("."),
                        p.as_str(),
                        values.join(", ")
                    ));
                }
            }
        }
        ExpressionKind::JmesPath(p) => {
            hints.push(format!(
                "the JMESPath expression {} returned null or an empty projection",
                p.as_str()
            ));
            if has_body {
                hints.push("JMESPath expressions see the whole event: message fields are under Body (for example Body.heartRate, or to_array(@.Body)[?heartRate])".into());
            }
        }
    }
    hints
}

fn explain_chain(chain: &[String], root: &Value, has_body: bool) -> Vec<String> {
    let dotted = chain.join(".");
    if !find_chain(root, chain, false).is_empty() {
        return Vec::new();
    }
    let mut hints = Vec::new();
    let envelope_names = ["Body", "Properties", "SystemProperties"];
    if envelope_names.contains(&chain[0].as_str()) && !has_body {
        hints.push(format!(
            "'{dotted}' refers to the event envelope, but this document has no Body member: pass the message with --message so it is wrapped as {{Body, Properties, SystemProperties}}"
        ));
        return hints;
    }
    let near = find_chain(root, chain, true);
    if let Some((path, _)) = near.first() {
        hints.push(format!("no object has the member '{dotted}'; {path} differs only in case (JSONPath names are case-sensitive)"));
        return hints;
    }
    if let Some(last) = chain.last() {
        let elsewhere = find_chain(root, std::slice::from_ref(last), false);
        if let Some((path, _)) = elsewhere.first()
            && chain.len() > 1
        {
            hints.push(format!(
                "no object has the member path '{dotted}', but '{last}' exists at {path}"
            ));
            return hints;
        }
    }
    hints.push(format!("no object in the message has a member '{dotted}'"));
    hints
}

/// Every place where `chain` resolves from some object, as (JSONPath of the value, value).
fn find_chain<'a>(
    root: &'a Value,
    chain: &[String],
    ignore_case: bool,
) -> Vec<(String, &'a Value)> {
    fn resolve<'a>(
        node: &'a Value,
        chain: &[String],
        ignore_case: bool,
        path: &mut String,
    ) -> Option<&'a Value> {
        let mut cur = node;
        for name in chain {
            let Value::Object(m) = cur else { return None };
            let (key, value) = if ignore_case {
                m.iter().find(|(k, _)| k.eq_ignore_ascii_case(name))?
            } else {
                m.get_key_value(name.as_str())?
            };
            path.push_str(&format!("['{key}']"));
            cur = value;
        }
        Some(cur)
    }
    fn walk<'a>(
        node: &'a Value,
        chain: &[String],
        ignore_case: bool,
        path: &str,
        out: &mut Vec<(String, &'a Value)>,
    ) {
        let mut found_path = path.to_owned();
        if let Some(v) = resolve(node, chain, ignore_case, &mut found_path) {
            out.push((found_path, v));
        }
        match node {
            Value::Object(m) => m
                .iter()
                .for_each(|(k, v)| walk(v, chain, ignore_case, &format!("{path}['{k}']"), out)),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, v)| walk(v, chain, ignore_case, &format!("{path}[{i}]"), out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(root, chain, ignore_case, "$", &mut out);
    out
}

/// A JSON value as compact text, cut at `max_chars` characters with an ellipsis, for reports
/// that must stay readable whatever the message holds.
pub fn preview(v: &Value, max_chars: usize) -> String {
    let text = v.to_string();
    if text.chars().count() > max_chars {
        format!("{}…", text.chars().take(max_chars).collect::<String>())
    } else {
        text
    }
}
