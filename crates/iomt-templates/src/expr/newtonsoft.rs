//! Rewrites Newtonsoft.Json JSONPath text into RFC 9535 text.
//!
//! MedTech evaluates JSONPath with Newtonsoft.Json's `SelectToken`, whose dialect predates
//! RFC 9535. Templates written for it use forms the RFC grammar rejects:
//!
//! | Newtonsoft form | RFC 9535 form produced here |
//! |---|---|
//! | `@heartRate` (no dot after `@`) | `@.heartRate` |
//! | `$.SystemProperties.iothub-connection-device-id` (`-` in a dotted name) | `$.SystemProperties['iothub-connection-device-id']` |
//! | `$.['My Property']` (dot before a bracket) | `$['My Property']` |
//! | `Body.hr` (no leading `$`) | `$.Body.hr` |
//! | `@.unit =~ /^in/i` (regex operator) | `search(@.unit, '(?i)^in')` |
//! | `@a && @b \|\| @c` (no precedence: each change of operator nests the rest) | `@.a && (@.b \|\| @.c)` |
//! | `$..[0]`, `$..[*]` (Newtonsoft ignores `..` before an index) | `$[0]`, `$[*]` |
//!
//! The rewritten text is then parsed by jsonpath-rust; evaluation with Newtonsoft's semantics
//! (root self-match of `..[?()]`, existence tests, single-token selection) lives in
//! [`super::jsonpath`]. Everything here is text-to-text so the rules stay easy to audit.

/// Characters that end a dotted member name in the main path (outside filters).
fn ends_main_name(c: char) -> bool {
    matches!(c, '.' | '[' | ']' | '(' | ')') || c.is_whitespace()
}

/// Characters that end a member name inside a filter expression.
fn ends_filter_name(c: char) -> bool {
    ends_main_name(c) || matches!(c, '=' | '!' | '<' | '>' | '&' | '|' | ',' | '\'' | '"')
}

/// Whether `name` can be written after a dot in RFC 9535 (`member-name-shorthand`).
fn is_rfc_shorthand(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = |c: char| c.is_ascii_alphabetic() || c == '_' || !c.is_ascii();
    match chars.next() {
        Some(c) if first_ok(c) => chars.all(|c| first_ok(c) || c.is_ascii_digit()),
        _ => false,
    }
}

fn push_member(out: &mut String, name: &str) {
    if name == "*" {
        out.push_str(".*");
    } else if is_rfc_shorthand(name) {
        out.push('.');
        out.push_str(name);
    } else {
        push_quoted_member(out, name);
    }
}

fn push_quoted_member(out: &mut String, name: &str) {
    out.push_str("['");
    for c in name.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push_str("']");
}

/// Why a Newtonsoft expression could not be rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RewriteError(pub(crate) String);

struct Rewriter<'a> {
    chars: Vec<char>,
    pos: usize,
    out: String,
    source: &'a str,
}

/// Rewrites one Newtonsoft JSONPath expression into RFC 9535 syntax.
pub(crate) fn to_rfc9535(source: &str) -> Result<String, RewriteError> {
    let trimmed = source.trim();
    let mut w = Rewriter {
        chars: trimmed.chars().collect(),
        pos: 0,
        out: String::new(),
        source,
    };
    match w.peek() {
        Some('$') => {
            w.pos += 1;
            w.out.push('$');
        }
        Some('[') | Some('.') => w.out.push('$'),
        Some(_) => {
            // Newtonsoft accepts a path that starts with a member name.
            w.out.push('$');
            let name = w.take_name(ends_main_name);
            push_member(&mut w.out, &name);
        }
        None => return Err(RewriteError("the expression is empty".into())),
    }
    w.path_tail(false)?;
    if w.pos != w.chars.len() {
        return Err(w.error("unexpected character"));
    }
    Ok(w.out)
}

impl Rewriter<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, offset: usize) -> Option<char> {
        self.chars.get(self.pos + offset).copied()
    }

    fn error(&self, what: &str) -> RewriteError {
        let found = self
            .peek()
            .map_or_else(|| "end of expression".to_owned(), |c| format!("'{c}'"));
        RewriteError(format!(
            "{what} at position {} ({found}) in '{}'",
            self.pos + 1,
            self.source
        ))
    }

    fn take_name(&mut self, ends: fn(char) -> bool) -> String {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if ends(c) {
                break;
            }
            self.pos += 1;
        }
        self.chars[start..self.pos].iter().collect()
    }

    /// Segments after `$` or `@`: `.name`, `..name`, `[...]`, `.*`.
    fn path_tail(&mut self, in_filter: bool) -> Result<(), RewriteError> {
        let ends = if in_filter {
            ends_filter_name
        } else {
            ends_main_name
        };
        loop {
            match self.peek() {
                Some('.') if self.peek_at(1) == Some('.') => {
                    self.pos += 2;
                    match self.peek() {
                        Some('[') => {
                            // Only `..[?()]` and `..['name']` scan; Newtonsoft parses
                            // `..[0]`, `..[*]` and `..[1:2]` as if the `..` were absent.
                            let next = self.chars[self.pos + 1..]
                                .iter()
                                .find(|c| !c.is_whitespace());
                            if matches!(next, Some('?' | '\'' | '"')) {
                                self.out.push_str("..");
                            }
                            self.bracket()?;
                        }
                        Some('*') => {
                            self.pos += 1;
                            self.out.push_str("..*");
                        }
                        _ => {
                            self.out.push_str("..");
                            let name = self.take_name(ends);
                            if name.is_empty() {
                                return Err(self.error("expected a member name after '..'"));
                            }
                            if is_rfc_shorthand(&name) {
                                self.out.push_str(&name);
                            } else {
                                // `..['x-y']` is the RFC spelling of a quoted descendant name.
                                push_quoted_member(&mut self.out, &name);
                            }
                        }
                    }
                }
                Some('.') => {
                    self.pos += 1;
                    if self.peek() == Some('[') {
                        self.bracket()?;
                    } else {
                        let name = self.take_name(ends);
                        if name.is_empty() {
                            return Err(self.error("expected a member name after '.'"));
                        }
                        push_member(&mut self.out, &name);
                    }
                }
                Some('[') => self.bracket()?,
                _ => return Ok(()),
            }
        }
    }

    /// A bracketed selection; filters are rewritten, everything else is copied.
    fn bracket(&mut self) -> Result<(), RewriteError> {
        self.pos += 1; // '['
        self.out.push('[');
        self.skip_spaces();
        if self.peek() == Some('?') {
            self.pos += 1;
            self.out.push('?');
            self.filter_expression()?;
            self.skip_spaces();
            if self.peek() != Some(']') {
                return Err(self.error("expected ']' after the filter"));
            }
            self.pos += 1;
            self.out.push(']');
            return Ok(());
        }
        loop {
            match self.peek() {
                None => return Err(self.error("unclosed '['")),
                Some(']') => {
                    self.pos += 1;
                    self.out.push(']');
                    return Ok(());
                }
                Some(q @ ('\'' | '"')) => self.string(q)?,
                Some(c) => {
                    self.pos += 1;
                    self.out.push(c);
                }
            }
        }
    }

    fn skip_spaces(&mut self) {
        while let Some(c) = self.peek() {
            if !c.is_whitespace() {
                break;
            }
            self.out.push(c);
            self.pos += 1;
        }
    }

    fn string(&mut self, quote: char) -> Result<(), RewriteError> {
        self.out.push(quote);
        self.pos += 1;
        loop {
            match self.peek() {
                None => return Err(self.error("unclosed string")),
                Some('\\') => {
                    self.out.push('\\');
                    self.pos += 1;
                    if let Some(c) = self.peek() {
                        self.out.push(c);
                        self.pos += 1;
                    }
                }
                Some(c) => {
                    self.out.push(c);
                    self.pos += 1;
                    if c == quote {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// The body of `[?...]`, up to (not including) the closing `]`.
    ///
    /// Newtonsoft gives `&&` and `||` no precedence: when the operator changes, the previous
    /// operand and everything after it become one nested group (`a && b || c` is
    /// `a && (b || c)`). That is emulated by opening a parenthesis before the previous atom
    /// and closing it where the enclosing group ends.
    fn filter_expression(&mut self) -> Result<(), RewriteError> {
        struct Group {
            op: Option<char>,
            extra_opens: usize,
        }
        let mut groups = vec![Group {
            op: None,
            extra_opens: 0,
        }];
        // Start of the current boolean atom in `out`, and of the current operand (for `=~`).
        let mut atom_start = self.out.len();
        let mut operand_start = self.out.len();
        loop {
            match self.peek() {
                None => return Err(self.error("unclosed filter")),
                Some(']') if groups.len() == 1 => {
                    let group = groups.pop().unwrap_or(Group {
                        op: None,
                        extra_opens: 0,
                    });
                    self.out.extend(std::iter::repeat_n(')', group.extra_opens));
                    return Ok(());
                }
                Some('(') => {
                    groups.push(Group {
                        op: None,
                        extra_opens: 0,
                    });
                    self.pos += 1;
                    self.out.push('(');
                    atom_start = self.out.len();
                    operand_start = self.out.len();
                }
                Some(')') => {
                    if groups.len() == 1 {
                        return Err(self.error("unbalanced ')'"));
                    }
                    let group = groups.pop().unwrap_or(Group {
                        op: None,
                        extra_opens: 0,
                    });
                    self.out.extend(std::iter::repeat_n(')', group.extra_opens));
                    self.pos += 1;
                    self.out.push(')');
                }
                Some(c @ ('&' | '|')) if self.peek_at(1) == Some(c) => {
                    self.pos += 2;
                    let group = groups
                        .last_mut()
                        .ok_or_else(|| self.error("unbalanced ')'"))?;
                    if group.op.is_some_and(|prev| prev != c) {
                        let at = atom_start + self.out[atom_start..].len()
                            - self.out[atom_start..].trim_start().len();
                        self.out.insert(at, '(');
                        group.extra_opens += 1;
                    }
                    group.op = Some(c);
                    self.out.push(c);
                    self.out.push(c);
                    atom_start = self.out.len();
                    operand_start = self.out.len();
                }
                Some(c @ ('@' | '$')) => {
                    operand_start = self.out.len();
                    self.pos += 1;
                    self.out.push(c);
                    if let Some(next) = self.peek()
                        && !ends_filter_name(next)
                    {
                        // `@heartRate`: Newtonsoft's shorthand for `@.heartRate`.
                        let name = self.take_name(ends_filter_name);
                        push_member(&mut self.out, &name);
                    }
                    self.path_tail(true)?;
                }
                Some(q @ ('\'' | '"')) => {
                    operand_start = self.out.len();
                    self.string(q)?;
                }
                Some('=') if self.peek_at(1) == Some('~') => {
                    self.pos += 2;
                    self.regex_operator(operand_start)?;
                }
                Some(c @ ('=' | '!' | '<' | '>')) => {
                    self.pos += 1;
                    self.out.push(c);
                    operand_start = self.out.len();
                }
                Some(c) => {
                    self.pos += 1;
                    self.out.push(c);
                }
            }
        }
    }

    /// `LHS =~ /pattern/flags` → `search(LHS, 'pattern')`.
    fn regex_operator(&mut self, operand_start: usize) -> Result<(), RewriteError> {
        let lhs = self.out[operand_start..].trim().to_owned();
        if lhs.is_empty() {
            return Err(self.error("'=~' needs a path on its left"));
        }
        self.out.truncate(operand_start);
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
        if self.peek() != Some('/') {
            return Err(self.error("expected a /regex/ after '=~'"));
        }
        self.pos += 1;
        let mut pattern = String::new();
        loop {
            match self.peek() {
                None => return Err(self.error("unclosed /regex/")),
                Some('\\') if self.peek_at(1) == Some('/') => {
                    pattern.push('/');
                    self.pos += 2;
                }
                Some('/') => {
                    self.pos += 1;
                    break;
                }
                Some(c) => {
                    pattern.push(c);
                    self.pos += 1;
                }
            }
        }
        let mut flags = String::new();
        while let Some(c) = self.peek() {
            if !c.is_ascii_alphabetic() {
                break;
            }
            match c {
                'i' | 'm' | 's' | 'x' => flags.push(c),
                _ => return Err(self.error("unsupported regex flag")),
            }
            self.pos += 1;
        }
        if !flags.is_empty() {
            pattern = format!("(?{flags}){pattern}");
        }
        self.out.push_str("search(");
        self.out.push_str(&lhs);
        self.out.push_str(", '");
        for c in pattern.chars() {
            match c {
                '\'' => self.out.push_str("\\'"),
                '\\' => self.out.push_str("\\\\"),
                c => self.out.push(c),
            }
        }
        self.out.push_str("')");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::to_rfc9535;

    #[test]
    fn rewrites() {
        let cases = [
            ("$..[?(@heartRate)]", "$..[?(@.heartRate)]"),
            (
                "$..[?(@Body.systolic && @Body.diastolic)]",
                "$..[?(@.Body.systolic && @.Body.diastolic)]",
            ),
            (
                "$.SystemProperties.iothub-connection-device-id",
                "$.SystemProperties['iothub-connection-device-id']",
            ),
            ("$.['My Property']", "$['My Property']"),
            ("$..[?(@['My Property'])]", "$..[?(@['My Property'])]"),
            ("Body.hr", "$.Body.hr"),
            ("$.matchedToken.date", "$.matchedToken.date"),
            ("$..[?(@unit == 'inches')]", "$..[?(@.unit == 'inches')]"),
            (
                "$..[?(@.deviceType == 'deviceTypeA')]",
                "$..[?(@.deviceType == 'deviceTypeA')]",
            ),
            ("$.Body[0].x", "$.Body[0].x"),
            ("$..hr", "$..hr"),
            ("$..[?(@x-y)]", "$..[?(@['x-y'])]"),
            (
                "$..[?(@.unit =~ /^in.*/i)]",
                "$..[?(search(@.unit, '(?i)^in.*'))]",
            ),
            ("$.a.*", "$.a.*"),
            ("$.telemetry.bp.0", "$.telemetry.bp['0']"),
            ("$..[?(@a && @b || @c)]", "$..[?(@.a && (@.b || @.c))]"),
            (
                "$..[?(@a || @b && @c || @d)]",
                "$..[?(@.a || (@.b && (@.c || @.d)))]",
            ),
            ("$..[?(@a && @b && @c)]", "$..[?(@.a && @.b && @.c)]"),
            ("$..[0]", "$[0]"),
            ("$..['x']", "$..['x']"),
            ("$..*", "$..*"),
        ];
        for (input, expected) in cases {
            assert_eq!(to_rfc9535(input).unwrap(), expected, "{input}");
        }
    }

    #[test]
    fn errors() {
        for bad in ["", "$.", "$[?(@.a)", "$['a", "$..[?(@.a =~ 'x')]"] {
            assert!(to_rfc9535(bad).is_err(), "{bad}");
        }
    }
}
