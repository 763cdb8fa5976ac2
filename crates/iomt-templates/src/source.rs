//! Reading template files with positions, and collecting every error in one pass.
//!
//! Newtonsoft.Json, which reads MedTech templates, is lenient: it accepts comments, single
//! quotes, unquoted member names and trailing commas, and matches member names without regard
//! to case. Templates written against it must keep loading, so the reader here is equally
//! lenient (jsonc-parser with those options) and member lookup ignores case.

use jsonc_parser::ast::{Object, ObjectProp, Value as Node};

use jsonc_parser::{CollectOptions, ParseOptions};

use crate::error::{TemplateError, TemplateErrorKind};

/// Deepest nesting accepted in a template file; real templates stay under ten.
const MAX_DEPTH: usize = 128;

/// A template file's text with a line index.
pub(crate) struct Source<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self { text, line_starts }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub(crate) fn position(&self, offset: usize) -> (usize, usize) {
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let start = self.line_starts[line - 1];
        let column = self
            .text
            .get(start..offset.min(self.text.len()))
            .map_or(1, |s| s.chars().count() + 1);
        (line, column)
    }

    /// Parses the file; a syntax error comes back as one template error with its position.
    pub(crate) fn parse(&self) -> Result<Node<'a>, TemplateError> {
        if let Some(offset) = too_deep(self.text) {
            let (line, column) = self.position(offset);
            return Err(TemplateError {
                message: format!("the file nests deeper than {MAX_DEPTH} levels"),
                path: String::new(),
                line: Some(line),
                column: Some(column),
                template: None,
                kind: TemplateErrorKind::Syntax,
            });
        }
        let options = ParseOptions {
            allow_comments: true,
            allow_loose_object_property_names: true,
            allow_trailing_commas: true,
            allow_missing_commas: false,
            allow_single_quoted_strings: true,
            allow_hexadecimal_numbers: false,
            allow_unary_plus_numbers: false,
            allow_bare_decimal_point_numbers: false,
            allow_non_finite_numbers: false,
            allow_extended_string_escapes: false,
        };
        let parsed = jsonc_parser::parse_to_ast(self.text, &CollectOptions::default(), &options)
            .map_err(|e| {
                let (line, column) = self.position(e.range().start);
                TemplateError {
                    message: format!("the file is not valid JSON: {}", e.kind()),
                    path: String::new(),
                    line: Some(line),
                    column: Some(column),
                    template: None,
                    kind: TemplateErrorKind::Syntax,
                }
            })?;
        parsed.value.ok_or_else(|| TemplateError {
            message: "the file is empty".into(),
            path: String::new(),
            line: None,
            column: None,
            template: None,
            kind: TemplateErrorKind::Syntax,
        })
    }
}

/// Offset of the first bracket past [`MAX_DEPTH`], so the recursive parser never sees it.
fn too_deep(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut quote: Option<u8> = None;
    let mut escaped = false;
    for (i, b) in text.bytes().enumerate() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == q {
                quote = None;
            }
            continue;
        }
        match b {
            b'"' | b'\'' => quote = Some(b),
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some(i);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// The JSON type name of a node, for error messages.
pub(crate) fn type_name(node: &Node<'_>) -> &'static str {
    match node {
        Node::StringLit(_) => "a string",
        Node::NumberLit(_) => "a number",
        Node::BooleanLit(_) => "a boolean",
        Node::Object(_) => "an object",
        Node::Array(_) => "an array",
        Node::NullKeyword(_) => "null",
    }
}

/// Byte offset where a node starts.
pub(crate) fn start(node: &Node<'_>) -> usize {
    match node {
        Node::StringLit(n) => n.range.start,
        Node::NumberLit(n) => n.range.start,
        Node::BooleanLit(n) => n.range.start,
        Node::Object(n) => n.range.start,
        Node::Array(n) => n.range.start,
        Node::NullKeyword(n) => n.range.start,
    }
}

/// Collects errors while walking a template file.
pub(crate) struct Checker<'s, 'a> {
    pub(crate) source: &'s Source<'a>,
    pub(crate) errors: Vec<TemplateError>,
    /// Label of the template being checked, attached to each error.
    pub(crate) template: Option<String>,
}

impl<'s, 'a> Checker<'s, 'a> {
    pub(crate) fn new(source: &'s Source<'a>) -> Self {
        Self {
            source,
            errors: Vec::new(),
            template: None,
        }
    }

    pub(crate) fn line(&self, offset: usize) -> usize {
        self.source.position(offset).0
    }

    pub(crate) fn error(
        &mut self,
        kind: TemplateErrorKind,
        offset: usize,
        path: &str,
        message: String,
    ) {
        let (line, column) = self.source.position(offset);
        self.errors.push(TemplateError {
            message,
            path: path.to_owned(),
            line: Some(line),
            column: Some(column),
            template: self.template.clone(),
            kind,
        });
    }

    /// Splits an object's members into the known ones (matched without regard to case) and
    /// reports every unknown one. `ignored` members are accepted and skipped.
    pub(crate) fn members<'o, 'n>(
        &mut self,
        object: &'o Object<'n>,
        path: &str,
        known: &[&'static str],
        ignored: &[&str],
    ) -> Members<'o, 'n> {
        let mut members = Members::empty(object.range.start, path.to_owned());
        for prop in &object.properties {
            let name = prop.name.as_str();
            if let Some(k) = known.iter().find(|k| k.eq_ignore_ascii_case(name)) {
                members.push(k, prop);
            } else if !ignored.iter().any(|i| i.eq_ignore_ascii_case(name)) {
                let message = match closest(name, known) {
                    Some(k) => format!("unknown member '{name}'; did you mean '{k}'?"),
                    None => format!(
                        "unknown member '{name}'; expected one of: {}",
                        known.join(", ")
                    ),
                };
                self.error(
                    TemplateErrorKind::UnknownMember,
                    prop.range.start,
                    &format!("{path}.{name}"),
                    message,
                );
            }
        }
        members
    }

    /// A required member that must be a non-empty string.
    pub(crate) fn required_string(
        &mut self,
        m: &Members<'_, '_>,
        name: &'static str,
    ) -> Option<(String, usize)> {
        match m.get(name) {
            None => {
                self.missing(m, name);
                None
            }
            Some(Node::NullKeyword(n)) => {
                self.error(
                    TemplateErrorKind::MissingMember,
                    n.range.start,
                    &m.child(name),
                    format!("required member '{name}' must not be null"),
                );
                None
            }
            Some(Node::StringLit(s)) => Some((s.value.to_string(), s.range.start)),
            Some(other) => {
                self.error(
                    TemplateErrorKind::InvalidValue,
                    start(other),
                    &m.child(name),
                    format!("'{name}' must be a string, found {}", type_name(other)),
                );
                None
            }
        }
    }

    /// The members of `node`, which must be an object (a `what` object); `None` after
    /// reporting that it is not.
    pub(crate) fn object<'o, 'n>(
        &mut self,
        node: &'o Node<'n>,
        path: &str,
        what: &str,
        known: &[&'static str],
    ) -> Option<Members<'o, 'n>> {
        let Node::Object(obj) = node else {
            self.error(
                TemplateErrorKind::InvalidValue,
                start(node),
                path,
                format!("expected {what} object, found {}", type_name(node)),
            );
            return None;
        };
        Some(self.members(obj, path, known, &["lineNumber", "linePosition"]))
    }

    /// The `template` array of a collection document whose `templateType` must be `root_type`
    /// (or `root_type` + `Template`, in any case). Empty after reporting an error.
    pub(crate) fn collection_items<'r, 'n>(
        &mut self,
        root: &'r Node<'n>,
        root_type: &str,
    ) -> &'r [Node<'n>] {
        let Node::Object(obj) = root else {
            self.error(
                TemplateErrorKind::TemplateType,
                start(root),
                "$",
                format!(
                    "the mapping must be an object with templateType {root_type}, found {}",
                    type_name(root)
                ),
            );
            return &[];
        };
        // What Azure exports (an ARM resource or template, or az CLI output) holds the
        // templates a level or more down: say so, rather than list its members.
        let export = obj.properties.iter().find(|p| {
            ["properties", "resources", "deviceMapping", "fhirMapping"]
                .iter()
                .any(|k| k.eq_ignore_ascii_case(p.name.as_str()))
        });
        if let Some(member) = export
            && !obj
                .properties
                .iter()
                .any(|p| p.name.as_str().eq_ignore_ascii_case("templateType"))
        {
            self.error(
                TemplateErrorKind::TemplateType,
                member.range.start,
                &format!("$.{}", member.name.as_str()),
                "this is a MedTech service exported from Azure, not a template: write its templates with `iomt mapping import FILE`".to_owned(),
            );
            return &[];
        }
        let m = self.members(obj, "$", &["templateType", "template"], &[]);
        let with_suffix = format!("{root_type}Template");
        let type_ok = match m.get("templateType") {
            Some(Node::StringLit(s))
                if s.value.eq_ignore_ascii_case(root_type)
                    || s.value.eq_ignore_ascii_case(&with_suffix) =>
            {
                true
            }
            other => {
                let actual = match other {
                    Some(Node::StringLit(s)) => format!("'{}'", s.value),
                    Some(n) => type_name(n).to_owned(),
                    None => "Not Found".to_owned(),
                };
                self.error(
                    TemplateErrorKind::TemplateType,
                    other.map_or(obj.range.start, start),
                    "$.templateType",
                    format!("expected templateType {root_type} ({with_suffix}), actual {actual}"),
                );
                false
            }
        };
        if !type_ok {
            // A document of another type: its contents mean something else, so only the type
            // is reported (as MedTech does).
            return &[];
        }
        match m.get("template") {
            Some(Node::Array(a)) => &a.elements,
            other => {
                self.error(
                    TemplateErrorKind::InvalidValue,
                    other.map_or(obj.range.start, start),
                    "$.template",
                    format!(
                        "expected an array for the template property of {root_type}, found {}",
                        other.map_or("nothing", type_name)
                    ),
                );
                &[]
            }
        }
    }

    /// One `{templateType, template}` entry of a collection: its resolved kind, its template
    /// object and that object's JSON path. `None` after reporting an error.
    pub(crate) fn entry<'r, 'n, K>(
        &mut self,
        index: usize,
        item: &'r Node<'n>,
        resolve: impl Fn(&str) -> Option<K>,
        name: impl Fn(K) -> &'static str,
        expected: &str,
    ) -> Option<(K, &'r Object<'n>, String)>
    where
        K: Copy,
    {
        let path = format!("$.template[{index}]");
        self.template = Some(format!("template[{index}]"));
        let Node::Object(obj) = item else {
            self.error(
                TemplateErrorKind::InvalidValue,
                start(item),
                &path,
                format!("expected a template object, found {}", type_name(item)),
            );
            return None;
        };
        // The container accepts any other member (MedTech ignores them).
        let m = self.members(obj, &path, &["templateType", "template"], &[]);
        let kind = match m.get("templateType") {
            Some(Node::StringLit(s)) => match resolve(&s.value) {
                Some(kind) => kind,
                None => {
                    self.error(
                        TemplateErrorKind::TemplateType,
                        s.range.start,
                        &m.child("templateType"),
                        format!(
                            "no match found for template type '{}'; expected {expected}",
                            s.value
                        ),
                    );
                    return None;
                }
            },
            Some(other) => {
                self.error(
                    TemplateErrorKind::TemplateType,
                    start(other),
                    &m.child("templateType"),
                    format!("templateType must be a string, found {}", type_name(other)),
                );
                return None;
            }
            None => {
                self.missing(&m, "templateType");
                return None;
            }
        };
        self.template = Some(format!("template[{index}] {}", name(kind)));
        match m.get("template") {
            Some(Node::Object(body)) => Some((kind, body, m.child("template"))),
            other => {
                self.error(
                    TemplateErrorKind::InvalidValue,
                    other.map_or(obj.range.start, start),
                    &m.child("template"),
                    format!(
                        "expected an object for the template property of template type {}, found {}",
                        name(kind),
                        other.map_or("nothing", type_name)
                    ),
                );
                None
            }
        }
    }

    /// Reports a required member that is absent, at the line of its object (as MedTech does).
    pub(crate) fn missing(&mut self, m: &Members<'_, '_>, name: &'static str) {
        self.error(
            TemplateErrorKind::MissingMember,
            m.object_start,
            &m.child(name),
            format!("required member '{name}' not found"),
        );
    }
}

/// The known member an unknown one was most likely meant to be.
pub(crate) fn closest<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    let lower = name.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (k, edit_distance(&lower, &k.to_ascii_lowercase())))
        .filter(|(k, d)| *d <= 3.max(k.len() / 4) || lower.contains(&k.to_ascii_lowercase()))
        .min_by_key(|(_, d)| *d)
        .map(|(k, _)| *k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The recognised members of one object.
pub(crate) struct Members<'o, 'a> {
    pub(crate) object_start: usize,
    pub(crate) path: String,
    found: Vec<(&'static str, &'o ObjectProp<'a>)>,
}

impl<'o, 'a> Members<'o, 'a> {
    pub(crate) fn empty(object_start: usize, path: String) -> Self {
        Self {
            object_start,
            path,
            found: Vec::new(),
        }
    }

    /// Records a member; a later duplicate replaces an earlier one, as in Newtonsoft.
    pub(crate) fn push(&mut self, name: &'static str, prop: &'o ObjectProp<'a>) {
        self.found.retain(|(f, _)| *f != name);
        self.found.push((name, prop));
    }

    pub(crate) fn get(&self, name: &str) -> Option<&'o Node<'a>> {
        self.found
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, p)| &p.value)
    }

    pub(crate) fn child(&self, name: &str) -> String {
        format!("{}.{name}", self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        let s = Source::new("{\n  \"a\": 1,\n  \"b\": 2\n}");
        assert_eq!(s.position(0), (1, 1));
        assert_eq!(s.position(4), (2, 3));
        assert_eq!(s.position(15), (3, 4));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let text = "[".repeat(10_000) + &"]".repeat(10_000);
        let err = Source::new(&text).parse().unwrap_err();
        assert_eq!(err.kind, TemplateErrorKind::Syntax);
        let quoted = format!("{{\"a\": \"{}\"}}", "[".repeat(500));
        assert!(Source::new(&quoted).parse().is_ok());
    }

    #[test]
    fn lenient_like_newtonsoft() {
        let text = "// comment\n{ templateType: 'CollectionContent', \"template\": [1, 2,], }";
        assert!(Source::new(text).parse().is_ok());
        let err = Source::new("{\"a\": }").parse().unwrap_err();
        assert_eq!((err.line, err.column), (Some(1), Some(7)));
    }
}
