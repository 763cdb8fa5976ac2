//! JSONPath with Newtonsoft.Json's semantics, compiled once and evaluated without allocation
//! on the common paths.
//!
//! Parsing goes through [`super::newtonsoft::to_rfc9535`] and jsonpath-rust's RFC 9535 parser;
//! the parsed query is then lowered into [`JsonPath`] steps that this module evaluates itself,
//! because Newtonsoft and the RFC disagree on what MedTech templates rely on:
//!
//! * `..[?(expr)]` tests **every node of the subtree, including the node it starts from**, in
//!   document pre-order (Newtonsoft's `QueryScanFilter` walks `DescendantsAndSelf`). The RFC
//!   applies the filter to children only, so `$..[?(@Body.hr)]` would never match the envelope
//!   itself, and nested matches would come out in another order.
//! * A bare path in a filter is an existence test: it is true when the path yields any token,
//!   even `null` or `false`.
//! * Value expressions use `SelectToken`, which fails when a path yields more than one token.
//! * `==` between an integer and a float compares numerically; a number never equals a string.
//!
//! Evaluation builds no path strings (jsonpath-rust's own engine does, and costs ~20 µs per
//! message for five templates); simple dotted paths are plain map lookups.

use std::borrow::Cow;
use std::cmp::Ordering;

use jsonpath_rust::parser::model::{
    Comparable, Comparison, FilterAtom, FnArg, JpQuery, Literal, Segment, Selector as RfcSelector,
    SingularQuery, SingularQuerySegment, Test, TestFunction,
};
use regex::Regex;
use serde_json::{Map, Value};

use super::newtonsoft;
use super::token::{CompareError, Kind, Token, compare_kinds, values_equal};

/// A compiled JSONPath expression.
#[derive(Debug, Clone)]
pub struct JsonPath {
    source: String,
    steps: Vec<Step>,
    /// Whether a filter refers to `$`, so the evaluation root must be a real value.
    uses_root_in_filter: bool,
    /// Member names that must occur somewhere in a document for the path to select anything,
    /// as [`KeyFilter`] bits.
    required_keys: Vec<(usize, u64)>,
}

#[derive(Debug, Clone)]
enum Step {
    Child(Sel),
    Descendant(Sel),
}

#[derive(Debug, Clone)]
enum Sel {
    Name(String),
    Index(i64),
    Wildcard,
    Slice(Option<i64>, Option<i64>, Option<i64>),
    Filter(Box<Filter>),
    Union(Vec<Sel>),
}

#[derive(Debug, Clone)]
enum Filter {
    Or(Vec<Filter>),
    And(Vec<Filter>),
    Not(Box<Filter>),
    Exists(Query),
    Compare(Operand, CmpOp, Operand),
    Regex(Operand, Regex),
}

#[derive(Debug, Clone)]
struct Query {
    absolute: bool,
    steps: Vec<Step>,
}

#[derive(Debug, Clone)]
enum Operand {
    Literal(Value),
    Query(Query),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A JSONPath expression that could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSONPath expression '{expression}': {reason}")]
pub struct JsonPathError {
    /// The expression as written in the template.
    pub expression: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Why evaluating a JSONPath selected nothing usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// `SelectToken` found more than one token where the template needs exactly one value.
    #[error("path returned multiple tokens")]
    MultipleTokens,
    /// A filter compared tokens .NET cannot compare (a date with a number, say); Newtonsoft
    /// throws, so the template fails for this event.
    #[error("a filter comparison failed: {0}")]
    Compare(#[from] CompareError),
}

type Eval<T> = Result<T, CompareError>;

/// What a JSONPath is evaluated against.
///
/// CalculatedContent templates evaluate every expression but `typeMatchExpression` against the
/// whole event with the matched token added as a top-level `matchedToken` member. Copying the
/// event for every match would dominate the cost of normalization, so the overlay is virtual:
/// `$.matchedToken…` and `$.Body…` resolve directly, and only unusual expressions (a wildcard
/// or descent over the root itself) pay for a materialized copy.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// A plain JSON document.
    Value(&'a Value),
    /// `envelope` with `matchedToken` set to `token` (replacing any existing member).
    Matched {
        /// The event envelope.
        envelope: &'a Value,
        /// The token `typeMatchExpression` selected.
        token: &'a Value,
    },
}

impl<'a> Scope<'a> {
    /// A copy of the scope as one JSON value (what MedTech builds for every match).
    pub fn materialize(&self) -> Cow<'a, Value> {
        match *self {
            Scope::Value(v) => Cow::Borrowed(v),
            Scope::Matched { envelope, token } => {
                let mut map = match envelope {
                    Value::Object(m) => m.clone(),
                    _ => Map::new(),
                };
                // MedTech removes `matchedToken` and adds it again: it is always last.
                map.shift_remove("matchedToken");
                map.insert("matchedToken".to_owned(), token.clone());
                Cow::Owned(Value::Object(map))
            }
        }
    }
}

impl JsonPath {
    /// Compiles a Newtonsoft-dialect expression.
    pub fn compile(source: &str) -> Result<Self, JsonPathError> {
        let error = |reason: String| JsonPathError {
            expression: source.to_owned(),
            reason,
        };
        super::jmespath::check_shape(source, false).map_err(error)?;
        let rfc = newtonsoft::to_rfc9535(source).map_err(|e| error(e.0))?;
        let parsed = jsonpath_rust::parser::parse_json_path(&rfc)
            .map_err(|e| error(describe_parse_error(&e)))?;
        let mut lowering = Lowering {
            uses_root_in_filter: false,
        };
        let steps = lowering.query(&parsed).map_err(error)?;
        let mut names = Vec::new();
        step_requirements(&steps, &mut names);
        let required_keys = names.iter().map(|n| KeyFilter::bit(n)).collect();
        Ok(Self {
            source: source.to_owned(),
            steps,
            uses_root_in_filter: lowering.uses_root_in_filter,
            required_keys,
        })
    }

    /// The expression as written in the template.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Member names this expression tests or compares inside filters, for "why did nothing
    /// match" explanations.
    pub fn filter_member_paths(&self) -> Vec<Vec<String>> {
        fn visit_filter(f: &Filter, out: &mut Vec<Vec<String>>) {
            match f {
                Filter::Or(fs) | Filter::And(fs) => fs.iter().for_each(|f| visit_filter(f, out)),
                Filter::Not(f) => visit_filter(f, out),
                Filter::Exists(q) => push_query(q, out),
                Filter::Compare(a, _, b) => {
                    for op in [a, b] {
                        if let Operand::Query(q) = op {
                            push_query(q, out);
                        }
                    }
                }
                Filter::Regex(Operand::Query(q), _) => push_query(q, out),
                Filter::Regex(..) => {}
            }
        }
        fn push_query(q: &Query, out: &mut Vec<Vec<String>>) {
            let names: Vec<String> = q
                .steps
                .iter()
                .map_while(|s| match s {
                    Step::Child(Sel::Name(n)) => Some(n.clone()),
                    _ => None,
                })
                .collect();
            if !q.absolute && !names.is_empty() {
                out.push(names);
            }
        }
        let mut out = Vec::new();
        for step in &self.steps {
            if let Step::Child(Sel::Filter(f)) | Step::Descendant(Sel::Filter(f)) = step {
                visit_filter(f, &mut out);
            }
        }
        out
    }

    /// Whether the expression is a chain of member names (`$.a.b`), the shape that can point
    /// at a missing member by name.
    pub fn member_chain(&self) -> Option<Vec<&str>> {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Child(Sel::Name(n)) => Some(n.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Every token the expression selects, in Newtonsoft's order (`SelectTokens`).
    pub fn select<'a>(
        &self,
        root: &'a Value,
        out: &mut Vec<&'a Value>,
    ) -> Result<(), CompareError> {
        eval_steps(&self.steps, root, root, out)
    }

    /// The single token the expression selects, if any (`SelectToken`).
    pub fn select_one<'a>(&self, root: &'a Value) -> Result<Option<&'a Value>, SelectError> {
        select_one_from(&self.steps, root)
    }

    /// Runs `f` on the single token selected in `scope`, materializing the scope only when the
    /// expression cannot be answered from the overlay directly.
    pub fn with_one_in<R>(
        &self,
        scope: Scope<'_>,
        f: impl FnOnce(Result<Option<&Value>, SelectError>) -> R,
    ) -> R {
        match scope {
            Scope::Value(root) => f(self.select_one(root)),
            Scope::Matched { envelope, token } => {
                if !self.uses_root_in_filter
                    && let Some((Step::Child(Sel::Name(first)), rest)) = self.steps.split_first()
                {
                    let start = if first == "matchedToken" {
                        Some(token)
                    } else {
                        envelope.as_object().and_then(|m| member(m, first))
                    };
                    let Some(start) = start else {
                        return f(Ok(None));
                    };
                    return f(select_one_from(rest, start));
                }
                let owned = scope.materialize();
                f(self.select_one(&owned))
            }
        }
    }

    /// Whether the path can select anything in a document with these member names: a cheap
    /// test that lets a collection skip templates whose members the message does not have.
    pub fn may_select(&self, keys: &KeyFilter) -> bool {
        self.required_keys
            .iter()
            .all(|&(word, bit)| keys.0[word] & bit != 0)
    }
}

/// `SelectToken` of `steps` from `start`, without allocating for name/index chains.
fn select_one_from<'a>(steps: &[Step], start: &'a Value) -> Result<Option<&'a Value>, SelectError> {
    if let Some(v) = simple_walk(steps, start) {
        return Ok(v);
    }
    let mut out = Vec::new();
    eval_steps(steps, start, start, &mut out)?;
    match out.len() {
        0 => Ok(None),
        1 => Ok(Some(out[0])),
        _ => Err(SelectError::MultipleTokens),
    }
}

/// Fast path for `$.a.b[0]` chains: `Some(result)` when every step is a name or index.
fn simple_walk<'a>(steps: &[Step], start: &'a Value) -> Option<Option<&'a Value>> {
    let mut cur = start;
    for step in steps {
        cur = match step {
            Step::Child(Sel::Name(n)) => match cur {
                Value::Object(m) => match member(m, n) {
                    Some(v) => v,
                    None => return Some(None),
                },
                _ => return Some(None),
            },
            Step::Child(Sel::Index(i)) => match cur {
                Value::Array(a) => match index(a.len(), *i).and_then(|i| a.get(i)) {
                    Some(v) => v,
                    None => return Some(None),
                },
                _ => return Some(None),
            },
            _ => return None,
        };
    }
    Some(Some(cur))
}

/// The member names that occur anywhere in a document, as a 256-bit Bloom filter.
///
/// Built in one walk per event; [`JsonPath::may_select`] then rules out, with a few bit
/// tests, every template whose `typeMatchExpression` needs a member the message lacks. In a
/// mixed fleet most templates miss most messages, so this removes most of the filter scans.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyFilter([u64; 4]);

impl KeyFilter {
    /// Collects the member names of every object in `doc`.
    pub fn of(doc: &Value) -> Self {
        let mut filter = Self::default();
        walk_self_and_descendants(doc, &mut |node| {
            if let Value::Object(m) = node {
                for key in m.keys() {
                    let (word, bit) = Self::bit(key);
                    filter.0[word] |= bit;
                }
            }
        });
        filter
    }

    fn bit(name: &str) -> (usize, u64) {
        // FNV-1a: short keys, no need for a strong hash.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        (((h >> 6) & 3) as usize, 1u64 << (h & 63))
    }
}

/// Names that must be members somewhere in the document for `steps` to select anything.
/// Only certain requirements are collected: a name step, and the tests a filter cannot pass
/// without (every branch of `&&`; none for `||` and `!`).
fn step_requirements(steps: &[Step], out: &mut Vec<String>) {
    for step in steps {
        match step {
            Step::Child(Sel::Name(n)) | Step::Descendant(Sel::Name(n)) => out.push(n.clone()),
            Step::Child(Sel::Filter(f)) | Step::Descendant(Sel::Filter(f)) => {
                filter_requirements(f, out)
            }
            _ => {}
        }
    }
}

fn filter_requirements(f: &Filter, out: &mut Vec<String>) {
    match f {
        Filter::And(fs) => fs.iter().for_each(|f| filter_requirements(f, out)),
        Filter::Or(_) | Filter::Not(_) => {}
        Filter::Exists(q) => step_requirements(&q.steps, out),
        // A comparison or regex with an empty side is false.
        Filter::Compare(a, _, b) => {
            for op in [a, b] {
                if let Operand::Query(q) = op {
                    step_requirements(&q.steps, out);
                }
            }
        }
        Filter::Regex(subject, _) => {
            if let Operand::Query(q) = subject {
                step_requirements(&q.steps, out);
            }
        }
    }
}

/// Member lookup tuned for device messages: their objects are small, and comparing a handful
/// of short keys is several times cheaper than hashing the name with SipHash.
#[inline]
pub fn member<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if map.len() <= 16 {
        // Length and first byte rule out almost every key without a memcmp call.
        let first = name.as_bytes().first();
        map.iter().find_map(|(k, v)| {
            (k.len() == name.len() && k.as_bytes().first() == first && k == name).then_some(v)
        })
    } else {
        map.get(name)
    }
}

fn index(len: usize, i: i64) -> Option<usize> {
    if i >= 0 {
        usize::try_from(i).ok()
    } else {
        len.checked_sub(usize::try_from(i.unsigned_abs()).ok()?)
    }
}

fn describe_parse_error(e: &jsonpath_rust::parser::errors::JsonPathError) -> String {
    // Pest renders a multi-line diagram of the rewritten text; its last line names what was
    // expected, which is the part that helps a template author.
    let text = e.to_string();
    let expected = text.lines().rev().find_map(|l| l.trim().strip_prefix("= "));
    match expected {
        Some(what) => format!("syntax error: {what}"),
        None => text.lines().next().unwrap_or("syntax error").to_owned(),
    }
}

struct Lowering {
    uses_root_in_filter: bool,
}

impl Lowering {
    fn query(&mut self, q: &JpQuery) -> Result<Vec<Step>, String> {
        self.segments(&q.segments)
    }

    fn segments(&mut self, segs: &[Segment]) -> Result<Vec<Step>, String> {
        segs.iter().map(|s| self.segment(s)).collect()
    }

    fn segment(&mut self, seg: &Segment) -> Result<Step, String> {
        Ok(match seg {
            Segment::Selector(s) => Step::Child(self.selector(s)?),
            Segment::Selectors(ss) => Step::Child(self.union(ss)?),
            Segment::Descendant(inner) => match inner.as_ref() {
                Segment::Selector(s) => Step::Descendant(self.selector(s)?),
                Segment::Selectors(ss) => Step::Descendant(self.union(ss)?),
                Segment::Descendant(_) => return Err("'....' is not a valid segment".into()),
            },
        })
    }

    fn union(&mut self, ss: &[RfcSelector]) -> Result<Sel, String> {
        let mut sels = ss
            .iter()
            .map(|s| self.selector(s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(if sels.len() == 1 {
            sels.remove(0)
        } else {
            Sel::Union(sels)
        })
    }

    fn selector(&mut self, s: &RfcSelector) -> Result<Sel, String> {
        Ok(match s {
            RfcSelector::Name(n) => Sel::Name(unquote_name(n)),
            RfcSelector::Wildcard => Sel::Wildcard,
            RfcSelector::Index(i) => Sel::Index(*i),
            RfcSelector::Slice(a, b, c) => Sel::Slice(*a, *b, *c),
            RfcSelector::Filter(f) => Sel::Filter(Box::new(self.filter(f)?)),
        })
    }

    fn filter(&mut self, f: &jsonpath_rust::parser::model::Filter) -> Result<Filter, String> {
        use jsonpath_rust::parser::model::Filter as F;
        Ok(match f {
            F::Or(fs) => Filter::Or(
                fs.iter()
                    .map(|f| self.filter(f))
                    .collect::<Result<_, _>>()?,
            ),
            F::And(fs) => Filter::And(
                fs.iter()
                    .map(|f| self.filter(f))
                    .collect::<Result<_, _>>()?,
            ),
            F::Atom(atom) => self.atom(atom)?,
        })
    }

    fn atom(&mut self, atom: &FilterAtom) -> Result<Filter, String> {
        let (inner, not) = match atom {
            FilterAtom::Filter { expr, not } => (self.filter(expr)?, *not),
            FilterAtom::Test { expr, not } => (self.test(expr)?, *not),
            FilterAtom::Comparison(c) => (self.comparison(c)?, false),
        };
        Ok(if not {
            Filter::Not(Box::new(inner))
        } else {
            inner
        })
    }

    fn test(&mut self, t: &Test) -> Result<Filter, String> {
        Ok(match t {
            Test::RelQuery(segs) => Filter::Exists(Query {
                absolute: false,
                steps: self.segments(segs)?,
            }),
            Test::AbsQuery(q) => {
                self.uses_root_in_filter = true;
                Filter::Exists(Query {
                    absolute: true,
                    steps: self.query(q)?,
                })
            }
            Test::Function(func) => match func.as_ref() {
                TestFunction::Search(subject, pattern) => {
                    let subject = match subject {
                        FnArg::Test(t) => match t.as_ref() {
                            Test::RelQuery(segs) => Operand::Query(Query {
                                absolute: false,
                                steps: self.segments(segs)?,
                            }),
                            Test::AbsQuery(q) => {
                                self.uses_root_in_filter = true;
                                Operand::Query(Query {
                                    absolute: true,
                                    steps: self.query(q)?,
                                })
                            }
                            Test::Function(_) => {
                                return Err("a regex needs a path on its left".into());
                            }
                        },
                        FnArg::Literal(l) => Operand::Literal(literal(l)),
                        FnArg::Filter(_) => return Err("a regex needs a path on its left".into()),
                    };
                    let FnArg::Literal(Literal::String(pattern)) = pattern else {
                        return Err("a regex pattern must be a string".into());
                    };
                    let regex = Regex::new(pattern)
                        .map_err(|e| format!("invalid regex /{pattern}/: {e}"))?;
                    Filter::Regex(subject, regex)
                }
                other => {
                    return Err(format!(
                        "the function {other} is not supported by MedTech templates"
                    ));
                }
            },
        })
    }

    fn comparison(&mut self, c: &Comparison) -> Result<Filter, String> {
        let (op, l, r) = match c {
            Comparison::Eq(l, r) => (CmpOp::Eq, l, r),
            Comparison::Ne(l, r) => (CmpOp::Ne, l, r),
            Comparison::Lt(l, r) => (CmpOp::Lt, l, r),
            Comparison::Lte(l, r) => (CmpOp::Le, l, r),
            Comparison::Gt(l, r) => (CmpOp::Gt, l, r),
            Comparison::Gte(l, r) => (CmpOp::Ge, l, r),
        };
        Ok(Filter::Compare(
            self.comparable(l)?,
            op,
            self.comparable(r)?,
        ))
    }

    fn comparable(&mut self, c: &Comparable) -> Result<Operand, String> {
        Ok(match c {
            Comparable::Literal(l) => Operand::Literal(literal(l)),
            Comparable::SingularQuery(q) => {
                let (absolute, segs) = match q {
                    SingularQuery::Current(s) => (false, s),
                    SingularQuery::Root(s) => (true, s),
                };
                self.uses_root_in_filter |= absolute;
                let steps = segs
                    .iter()
                    .map(|s| match s {
                        SingularQuerySegment::Name(n) => Step::Child(Sel::Name(unquote_name(n))),
                        SingularQuerySegment::Index(i) => Step::Child(Sel::Index(*i)),
                    })
                    .collect();
                Operand::Query(Query { absolute, steps })
            }
            Comparable::Function(f) => {
                return Err(format!(
                    "the function {f} is not supported by MedTech templates"
                ));
            }
        })
    }
}

/// jsonpath-rust keeps the quotes of bracketed names; strip them and resolve escapes.
fn unquote_name(name: &str) -> String {
    let bytes = name.as_bytes();
    if bytes.len() >= 2
        && (bytes[0] == b'\'' || bytes[0] == b'"')
        && bytes[bytes.len() - 1] == bytes[0]
    {
        let inner = &name[1..name.len() - 1];
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('b') => out.push('\u{8}'),
                Some('f') => out.push('\u{c}'),
                Some('n') => out.push('\n'),
                Some('r') => out.push('\r'),
                Some('t') => out.push('\t'),
                Some('u') => {
                    let hex: String = chars.by_ref().take(4).collect();
                    if let Some(c) = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                        out.push(c);
                    }
                }
                Some(other) => out.push(other),
                None => {}
            }
        }
        out
    } else {
        name.to_owned()
    }
}

fn literal(l: &Literal) -> Value {
    match l {
        Literal::Int(i) => Value::from(*i),
        Literal::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Literal::String(s) => Value::String(unquote_name(s)),
        Literal::Bool(b) => Value::Bool(*b),
        Literal::Null => Value::Null,
    }
}

fn eval_steps<'a>(
    steps: &[Step],
    root: &'a Value,
    start: &'a Value,
    out: &mut Vec<&'a Value>,
) -> Eval<()> {
    let Some((step, rest)) = steps.split_first() else {
        out.push(start);
        return Ok(());
    };
    if rest.is_empty() {
        return match step {
            Step::Child(sel) => apply_child(sel, root, start, out),
            Step::Descendant(sel) => apply_descendant(sel, root, start, out),
        };
    }
    let mut next = Vec::new();
    match step {
        Step::Child(sel) => apply_child(sel, root, start, &mut next)?,
        Step::Descendant(sel) => apply_descendant(sel, root, start, &mut next)?,
    }
    for node in next {
        eval_steps(rest, root, node, out)?;
    }
    Ok(())
}

fn apply_child<'a>(
    sel: &Sel,
    root: &'a Value,
    node: &'a Value,
    out: &mut Vec<&'a Value>,
) -> Eval<()> {
    match sel {
        Sel::Name(n) => {
            if let Value::Object(m) = node
                && let Some(v) = member(m, n)
            {
                out.push(v);
            }
        }
        Sel::Index(i) => {
            if let Value::Array(a) = node
                && let Some(v) = index(a.len(), *i).and_then(|i| a.get(i))
            {
                out.push(v);
            }
        }
        Sel::Wildcard => match node {
            Value::Object(m) => out.extend(m.values()),
            Value::Array(a) => out.extend(a.iter()),
            _ => {}
        },
        Sel::Slice(start, end, step) => {
            if let Value::Array(a) = node {
                slice(a, *start, *end, *step, out);
            }
        }
        Sel::Filter(f) => {
            // Newtonsoft's QueryFilter tests the children of each node: array elements, and
            // for objects their property entries, which no member test can match.
            if let Value::Array(a) = node {
                for v in a {
                    if filter(f, root, v)? {
                        out.push(v);
                    }
                }
            }
        }
        Sel::Union(sels) => {
            for s in sels {
                apply_child(s, root, node, out)?;
            }
        }
    }
    Ok(())
}

fn slice<'a>(
    a: &'a [Value],
    start: Option<i64>,
    end: Option<i64>,
    step: Option<i64>,
    out: &mut Vec<&'a Value>,
) {
    let len = a.len() as i64;
    let step = step.unwrap_or(1);
    if step == 0 {
        return;
    }
    let norm = |i: i64| if i < 0 { (len + i).max(0) } else { i.min(len) };
    if step > 0 {
        let (mut i, end) = (norm(start.unwrap_or(0)), norm(end.unwrap_or(len)));
        while i < end {
            out.push(&a[i as usize]);
            i += step;
        }
    } else {
        let mut i = start.map_or(len - 1, |s| if s < 0 { len + s } else { s.min(len - 1) });
        let end = end.map_or(-1, |e| if e < 0 { (len + e).max(-1) } else { e });
        while i > end && i >= 0 {
            out.push(&a[i as usize]);
            i += step;
        }
    }
}

/// Pre-order walk of `node` and everything under it; stops at the first error.
fn try_walk<'a>(node: &'a Value, visit: &mut impl FnMut(&'a Value) -> Eval<()>) -> Eval<()> {
    visit(node)?;
    match node {
        Value::Object(m) => m.values().try_for_each(|v| try_walk(v, visit)),
        Value::Array(a) => a.iter().try_for_each(|v| try_walk(v, visit)),
        _ => Ok(()),
    }
}

/// Pre-order walk of `node` and everything under it.
fn walk_self_and_descendants<'a>(node: &'a Value, visit: &mut impl FnMut(&'a Value)) {
    visit(node);
    match node {
        Value::Object(m) => m.values().for_each(|v| walk_self_and_descendants(v, visit)),
        Value::Array(a) => a.iter().for_each(|v| walk_self_and_descendants(v, visit)),
        _ => {}
    }
}

fn apply_descendant<'a>(
    sel: &Sel,
    root: &'a Value,
    node: &'a Value,
    out: &mut Vec<&'a Value>,
) -> Eval<()> {
    match sel {
        // QueryScanFilter: the filter runs on the node itself and on every descendant.
        Sel::Filter(f) => try_walk(node, &mut |n| {
            if filter(f, root, n)? {
                out.push(n);
            }
            Ok(())
        }),
        // ScanFilter: values of members with this name, anywhere below the node.
        Sel::Name(name) => {
            fn scan<'a>(node: &'a Value, name: &str, out: &mut Vec<&'a Value>) {
                match node {
                    Value::Object(m) => {
                        for (k, v) in m {
                            if k == name {
                                out.push(v);
                            }
                            scan(v, name, out);
                        }
                    }
                    Value::Array(a) => a.iter().for_each(|v| scan(v, name, out)),
                    _ => {}
                }
            }
            scan(node, name, out);
            Ok(())
        }
        // `..*` yields the node itself, then every value below it.
        Sel::Wildcard => {
            walk_self_and_descendants(node, &mut |n| out.push(n));
            Ok(())
        }
        other => try_walk(node, &mut |n| apply_child(other, root, n, out)),
    }
}

fn filter(f: &Filter, root: &Value, current: &Value) -> Eval<bool> {
    Ok(match f {
        Filter::Or(fs) => {
            for f in fs {
                if filter(f, root, current)? {
                    return Ok(true);
                }
            }
            false
        }
        Filter::And(fs) => {
            for f in fs {
                if !filter(f, root, current)? {
                    return Ok(false);
                }
            }
            true
        }
        Filter::Not(f) => !filter(f, root, current)?,
        Filter::Exists(q) => query_exists(q, root, current)?,
        Filter::Compare(l, op, r) => {
            let (mut lv, mut rv) = (Vec::new(), Vec::new());
            operand(l, root, current, &mut lv)?;
            operand(r, root, current, &mut rv)?;
            for a in &lv {
                for b in &rv {
                    if compare(a, *op, b)? {
                        return Ok(true);
                    }
                }
            }
            false
        }
        Filter::Regex(subject, re) => {
            let mut values = Vec::new();
            operand(subject, root, current, &mut values)?;
            // Newtonsoft matches string tokens only: a date token never matches.
            values
                .iter()
                .any(|v| matches!(v.kind(), Kind::Str(s) if re.is_match(s)))
        }
    })
}

fn query_exists(q: &Query, root: &Value, current: &Value) -> Eval<bool> {
    let start = if q.absolute { root } else { current };
    // `@.a.b` is by far the most common test; answer it without collecting.
    let mut cur = start;
    let mut simple = true;
    for step in &q.steps {
        match (step, cur) {
            (Step::Child(Sel::Name(n)), Value::Object(m)) => match member(m, n) {
                Some(v) => cur = v,
                None => return Ok(false),
            },
            (Step::Child(Sel::Name(_)), _) => return Ok(false),
            _ => {
                simple = false;
                break;
            }
        }
    }
    if simple {
        return Ok(true);
    }
    let mut out = Vec::new();
    eval_steps(&q.steps, root, start, &mut out)?;
    Ok(!out.is_empty())
}

/// The tokens an operand stands for: a literal string is a string token (never a date), the
/// document's values are themselves.
fn operand<'a>(
    op: &'a Operand,
    root: &'a Value,
    current: &'a Value,
    out: &mut Vec<Token<'a>>,
) -> Eval<()> {
    match op {
        Operand::Literal(Value::String(s)) => out.push(Token::Str(s)),
        Operand::Literal(v) => out.push(Token::Json(v)),
        Operand::Query(q) => {
            let mut found = Vec::new();
            eval_steps(
                &q.steps,
                root,
                if q.absolute { root } else { current },
                &mut found,
            )?;
            out.extend(found.into_iter().map(Token::Json));
        }
    }
    Ok(())
}

/// Newtonsoft's `BooleanQueryExpression` comparison of two tokens.
fn compare(a: &Token<'_>, op: CmpOp, b: &Token<'_>) -> Eval<bool> {
    let (ka, kb) = (a.kind(), b.kind());
    if matches!(ka, Kind::Array | Kind::Object) || matches!(kb, Kind::Array | Kind::Object) {
        // Containers never compare equal to anything; `!=` is true for them.
        return Ok(op == CmpOp::Ne);
    }
    let ord = || compare_kinds(ka, kb);
    Ok(match op {
        CmpOp::Eq => equals_with_string_coercion(ka, kb),
        CmpOp::Ne => !equals_with_string_coercion(ka, kb),
        CmpOp::Lt => ord()? == Ordering::Less,
        CmpOp::Le => ord()? != Ordering::Greater,
        CmpOp::Gt => ord()? == Ordering::Greater,
        CmpOp::Ge => ord()? != Ordering::Less,
    })
}

/// `QueryExpression.EqualsWithStringCoercion(value, queryValue)`: equal tokens, an integer
/// and a double of the same value, or a date on the left whose ISO text (trailing fraction
/// zeros dropped, `Z` for UTC) is the string on the right. A string on the left never equals a
/// date on the right.
fn equals_with_string_coercion(value: Kind<'_>, query: Kind<'_>) -> bool {
    if values_equal(value, query) {
        return true;
    }
    match (value, query) {
        (Kind::Int(_), Kind::Float(_)) | (Kind::Float(_), Kind::Int(_)) => {
            compare_kinds(value, query) == Ok(Ordering::Equal)
        }
        (Kind::Date(d), Kind::Str(text)) => d.to_iso_string() == text,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sel(path: &str, doc: &Value) -> Vec<Value> {
        let p = JsonPath::compile(path).unwrap();
        let mut out = Vec::new();
        p.select(doc, &mut out).unwrap();
        out.into_iter().cloned().collect()
    }

    #[test]
    fn scan_filter_includes_root_in_pre_order() {
        let doc = json!({"Body": {"hr": 1, "inner": {"hr": 2}}, "hr": 0});
        let got = sel("$..[?(@hr)]", &doc);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], doc);
        assert_eq!(got[1], doc["Body"]);
        assert_eq!(got[2], doc["Body"]["inner"]);
    }

    #[test]
    fn existence_is_true_for_null_and_false() {
        let doc = json!([{"a": null}, {"a": false}, {"b": 1}]);
        assert_eq!(sel("$..[?(@a)]", &doc).len(), 2);
    }

    #[test]
    fn compound_and_comparisons() {
        let doc = json!({"Body": [{"systolic": 120, "diastolic": 80}, {"systolic": 1}], "unit": "inches", "n": 2});
        assert_eq!(sel("$..[?(@systolic && @diastolic)]", &doc).len(), 1);
        assert_eq!(sel("$..[?(@unit == 'inches')]", &doc).len(), 1);
        assert_eq!(sel("$..[?(@n == 2.0)]", &doc).len(), 1);
        assert_eq!(sel("$..[?(@n == '2')]", &doc).len(), 0);
        assert_eq!(sel("$..[?(@systolic > 100)]", &doc).len(), 1);
        assert_eq!(sel("$..[?(@systolic || @n)]", &doc).len(), 3);
        assert_eq!(sel("$..[?(@unit =~ /^IN/i)]", &doc).len(), 1);
    }

    #[test]
    fn body_dates_compare_as_dates() {
        let doc = json!({"r": [
            {"at": "2024-03-05T09:00:00Z"},
            {"at": "2024-03-05T09:00:00.000Z"},
            {"at": "2024-03-05T09:30:00Z"},
            {"at": "2024-03-05T10:00:00+01:00"},
            {"at": "2024-03-05T09:00:00"},
            {"at": "not a date"}
        ]});
        let count = |path: &str| sel(path, &doc).len();
        // `==` compares the literal with the date's canonical ISO text, kind included.
        assert_eq!(count("$.r[?(@.at == '2024-03-05T09:00:00Z')]"), 2);
        assert_eq!(count("$.r[?(@.at == '2024-03-05T09:00:00.000Z')]"), 0);
        assert_eq!(count("$.r[?(@.at == '2024-03-05T09:00:00+00:00')]"), 1);
        assert_eq!(count("$.r[?(@.at == '2024-03-05T09:00:00')]"), 1);
        assert_eq!(count("$.r[?(@.at != '2024-03-05T09:00:00Z')]"), 4);
        // A string on the left never equals a date.
        assert_eq!(count("$.r[?('2024-03-05T09:00:00Z' == @.at)]"), 0);
        // Regular expressions see string tokens only.
        assert_eq!(count("$.r[?(@.at =~ /2024/)]"), 0);
        assert_eq!(count("$.r[?(@.at =~ /date/)]"), 1);
        let p = JsonPath::compile("$.r[?(@.at < '2024-03-05 09:20')]").unwrap();
        let mut out = Vec::new();
        let ok = json!({"r": [{"at": "2024-03-05T09:00:00Z"}, {"at": "2024-03-05T09:30:00Z"}, {"at": null}]});
        p.select(&ok, &mut out).unwrap();
        assert_eq!(out.len(), 2, "{out:?}");
        // Two strings compare ordinally; .NET throws when it cannot convert one side to the
        // other's type, and the whole selection fails.
        assert!(p.select(&doc, &mut Vec::new()).is_ok());
        for bad in [
            "$.r[?(@.at > 5)]",
            "$.r[?(@.at < 'soon')]",
            "$.r[?('x' < @.at)]",
        ] {
            let p = JsonPath::compile(bad).unwrap();
            assert!(p.select(&ok, &mut Vec::new()).is_err(), "{bad}");
        }
    }

    #[test]
    fn mixed_type_comparisons_follow_newtonsoft() {
        let doc = json!([{"v": 26}, {"v": "26"}, {"v": 2.5}, {"v": true}]);
        assert_eq!(
            sel("$[?(@.v > 3)]", &json!([{"v": "26"}, {"v": 2}])).len(),
            1
        );
        assert_eq!(sel("$[?(@.v == 26.0)]", &doc).len(), 1);
        let p = JsonPath::compile("$[?(@.v > 'x')]").unwrap();
        assert!(p.select(&json!([{"v": 1}]), &mut Vec::new()).is_err());
    }

    #[test]
    fn select_one_rejects_multiple() {
        let doc = json!({"a": [1, 2]});
        let p = JsonPath::compile("$.a[*]").unwrap();
        assert_eq!(p.select_one(&doc), Err(SelectError::MultipleTokens));
        let p = JsonPath::compile("$.a[1]").unwrap();
        assert_eq!(p.select_one(&doc), Ok(Some(&json!(2))));
        let p = JsonPath::compile("$.b.c").unwrap();
        assert_eq!(p.select_one(&doc), Ok(None));
    }

    #[test]
    fn matched_scope_overlay() {
        let env = json!({"Body": {"deviceId": "d1"}, "matchedToken": "old"});
        let token = json!({"date": "x"});
        let scope = Scope::Matched {
            envelope: &env,
            token: &token,
        };
        let get = |p: &str| {
            JsonPath::compile(p)
                .unwrap()
                .with_one_in(scope, |r| r.unwrap().cloned())
        };
        assert_eq!(get("$.matchedToken.date"), Some(json!("x")));
        assert_eq!(get("$.Body.deviceId"), Some(json!("d1")));
        assert_eq!(get("$..deviceId"), Some(json!("d1")));
        assert_eq!(get("$..date"), Some(json!("x")));
        assert_eq!(get("$.missing"), None);
    }

    #[test]
    fn hyphenated_and_bracketed_names() {
        let doc =
            json!({"SystemProperties": {"iothub-connection-device-id": "dev"}, "My Property": "v"});
        assert_eq!(
            sel("$.SystemProperties.iothub-connection-device-id", &doc),
            vec![json!("dev")]
        );
        assert_eq!(sel("$.['My Property']", &doc), vec![json!("v")]);
        assert_eq!(sel("$..[?(@['My Property'])]", &doc).len(), 1);
    }

    #[test]
    fn invalid_expressions_are_errors() {
        for bad in ["$..[?(@a ==)]", "$[", "$.a b", "$..[?(length(@.a) > 1)]"] {
            assert!(JsonPath::compile(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_filter_never_rules_out_a_possible_match() {
        let doc = json!({"Body": {"hr": 1, "inner": [{"spo2": 2}]}, "SystemProperties": {"iothub-connection-device-id": "d"}});
        let keys = KeyFilter::of(&doc);
        for path in [
            "$..[?(@hr)]",
            "$..[?(@Body.hr && @SystemProperties)]",
            "$..spo2",
            "$.Body.inner[0].spo2",
            "$..[?(@hr || @nothing)]",
            "$..[?(@.hr > 0)]",
        ] {
            let p = JsonPath::compile(path).unwrap();
            assert!(p.may_select(&keys), "{path}");
            let mut out = Vec::new();
            p.select(&doc, &mut out).unwrap();
            assert!(!out.is_empty(), "{path}");
        }
        let p = JsonPath::compile("$..[?(@heartRate && @hr)]").unwrap();
        assert!(!p.may_select(&keys));
    }

    #[test]
    fn slices_and_unions() {
        let doc = json!({"a": [0, 1, 2, 3]});
        assert_eq!(sel("$.a[1:3]", &doc), vec![json!(1), json!(2)]);
        assert_eq!(sel("$.a[-1]", &doc), vec![json!(3)]);
        assert_eq!(sel("$.a[0,2]", &doc), vec![json!(0), json!(2)]);
        assert_eq!(
            sel("$.a[::-1]", &doc),
            vec![json!(3), json!(2), json!(1), json!(0)]
        );
    }
}
