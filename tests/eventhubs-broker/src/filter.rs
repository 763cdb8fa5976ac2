//! The start-position selector a consumer sends with its receiver link.
//!
//! Event Hubs receives the start position as an SQL-like selector in the link's source filter
//! (`apache.org:selector-filter:string`). The SDK 0.16 builds exactly these shapes
//! (`azure_messaging_eventhubs/src/consumer/mod.rs`, `StartPosition::start_expression`):
//!
//! | Start location | Expression |
//! |---|---|
//! | Earliest | `amqp.annotation.x-opt-offset > '-1'` |
//! | Latest | `amqp.annotation.x-opt-offset > '@latest'` |
//! | Offset | `amqp.annotation.x-opt-offset >'N'` or `>='N'` |
//! | Sequence number | `amqp.annotation.x-opt-sequence-number >'N'` or `>='N'` |
//! | Enqueued time | `amqp.annotation.x-opt-enqueued-time >'ms'` or `>='ms'` |
//!
//! Spaces around the operator are optional, as the two spellings above show.

use std::fmt;

/// The annotation a selector compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SelectorField {
    /// `x-opt-offset`.
    Offset,
    /// `x-opt-sequence-number`.
    SequenceNumber,
    /// `x-opt-enqueued-time`, in milliseconds since the Unix epoch.
    EnqueuedTime,
}

/// The value a selector compares with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SelectorValue {
    /// `'@latest'`: only events enqueued after the link attaches.
    Latest,
    /// A number (an offset, a sequence number or milliseconds).
    Number(i64),
}

/// A parsed start-position selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StartSelector {
    /// What is compared.
    pub(crate) field: SelectorField,
    /// `>=` rather than `>`.
    pub(crate) inclusive: bool,
    /// What it is compared with.
    pub(crate) value: SelectorValue,
}

/// A selector this broker cannot evaluate; the link is refused with `amqp:invalid-field`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported selector filter {expression:?}: {reason}")]
pub(crate) struct SelectorError {
    /// The expression as received.
    pub(crate) expression: String,
    /// What is wrong with it.
    pub(crate) reason: &'static str,
}

impl StartSelector {
    /// The selector the service assumes when a receiver sends no filter: the end of the stream.
    pub(crate) const LATEST: Self = Self {
        field: SelectorField::Offset,
        inclusive: false,
        value: SelectorValue::Latest,
    };

    /// Parses one of the expressions in the module table.
    pub(crate) fn parse(expression: &str) -> Result<Self, SelectorError> {
        let error = |reason| SelectorError {
            expression: expression.to_owned(),
            reason,
        };
        let rest = expression.trim();
        let rest = strip_prefix_ignore_case(rest, "amqp.annotation.")
            .ok_or_else(|| error("expected amqp.annotation.<name>"))?;
        let (field, rest) = [
            ("x-opt-offset", SelectorField::Offset),
            ("x-opt-sequence-number", SelectorField::SequenceNumber),
            ("x-opt-enqueued-time", SelectorField::EnqueuedTime),
        ]
        .into_iter()
        .find_map(|(name, field)| strip_prefix_ignore_case(rest, name).map(|rest| (field, rest)))
        .ok_or_else(|| {
            error("expected x-opt-offset, x-opt-sequence-number or x-opt-enqueued-time")
        })?;
        let rest = rest.trim_start();
        let (inclusive, rest) = if let Some(rest) = rest.strip_prefix(">=") {
            (true, rest)
        } else if let Some(rest) = rest.strip_prefix('>') {
            (false, rest)
        } else {
            return Err(error("expected > or >="));
        };
        let quoted = rest.trim();
        let literal = quoted
            .strip_prefix('\'')
            .and_then(|q| q.strip_suffix('\''))
            .ok_or_else(|| error("expected a quoted value"))?;
        let value = if literal.eq_ignore_ascii_case("@latest") {
            if field != SelectorField::Offset {
                return Err(error("'@latest' only applies to x-opt-offset"));
            }
            SelectorValue::Latest
        } else {
            SelectorValue::Number(
                literal
                    .parse::<i64>()
                    .map_err(|_| error("expected an integer value"))?,
            )
        };
        Ok(Self {
            field,
            inclusive,
            value,
        })
    }
}

impl fmt::Display for StartSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = match self.field {
            SelectorField::Offset => "x-opt-offset",
            SelectorField::SequenceNumber => "x-opt-sequence-number",
            SelectorField::EnqueuedTime => "x-opt-enqueued-time",
        };
        let op = if self.inclusive { ">=" } else { ">" };
        match self.value {
            SelectorValue::Latest => write!(f, "amqp.annotation.{field} {op} '@latest'"),
            SelectorValue::Number(n) => write!(f, "amqp.annotation.{field} {op} '{n}'"),
        }
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(expression: &str) -> StartSelector {
        StartSelector::parse(expression).unwrap()
    }

    #[test]
    fn parses_every_shape_the_sdk_sends() {
        assert_eq!(
            parse("amqp.annotation.x-opt-offset > '-1'"),
            StartSelector {
                field: SelectorField::Offset,
                inclusive: false,
                value: SelectorValue::Number(-1)
            }
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-offset > '@latest'"),
            StartSelector::LATEST
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-offset >='12345'"),
            StartSelector {
                field: SelectorField::Offset,
                inclusive: true,
                value: SelectorValue::Number(12345)
            }
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-sequence-number >'41'"),
            StartSelector {
                field: SelectorField::SequenceNumber,
                inclusive: false,
                value: SelectorValue::Number(41)
            }
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-enqueued-time >='1700000000000'"),
            StartSelector {
                field: SelectorField::EnqueuedTime,
                inclusive: true,
                value: SelectorValue::Number(1_700_000_000_000)
            }
        );
    }

    #[test]
    fn display_round_trips() {
        for expression in [
            "amqp.annotation.x-opt-offset > '-1'",
            "amqp.annotation.x-opt-offset > '@latest'",
            "amqp.annotation.x-opt-sequence-number >= '7'",
        ] {
            assert_eq!(parse(expression).to_string(), expression);
        }
    }

    #[test]
    fn rejects_what_it_cannot_evaluate() {
        for expression in [
            "",
            "x-opt-offset > '1'",
            "amqp.annotation.x-opt-offset < '1'",
            "amqp.annotation.x-opt-offset > 1",
            "amqp.annotation.x-opt-offset > 'abc'",
            "amqp.annotation.x-opt-sequence-number > '@latest'",
            "amqp.annotation.x-opt-partition-key > '1'",
        ] {
            assert!(
                StartSelector::parse(expression).is_err(),
                "{expression:?} should be rejected"
            );
        }
    }
}
