//! Limits on what iomt accepts: they keep a hostile template or message from exhausting memory,
//! time or a thread's stack. An operator may move them (`[limits]`); the ones that guard the
//! stack have a ceiling, because past it a recursive parser could overflow it whatever the
//! setting says.
//!
//! They are set once per process, before templates are loaded, from the configuration
//! ([`set_limits`]); the stages read them where they check ([`limits`]).

use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

/// `[limits]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// The largest event body (and input record) accepted; the Event Hubs event size limit.
    pub message_bytes: usize,
    /// The largest mapping file loaded.
    pub template_file_bytes: usize,
    /// The longest JSONPath or JMESPath expression compiled.
    pub expression_bytes: usize,
    /// The deepest nesting of parentheses, brackets and braces in an expression.
    pub expression_nesting: usize,
    /// The most operators in one JMESPath expression (with the nesting, it bounds the depth of
    /// the parsed tree, which is walked recursively).
    pub expression_operators: usize,
    /// The longest handlebars template loaded.
    pub handlebars_bytes: usize,
    /// The deepest nesting of handlebars blocks.
    pub handlebars_nesting: usize,
    /// The most measurements one event may produce; an event over it is refused whole.
    pub measurements_per_event: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Limits {
    /// The limits of a process that sets none.
    pub const DEFAULT: Self = Self {
        message_bytes: 1024 * 1024,
        template_file_bytes: 4 * 1024 * 1024,
        expression_bytes: 16 * 1024,
        expression_nesting: 32,
        expression_operators: 128,
        handlebars_bytes: 64 * 1024,
        handlebars_nesting: 32,
        measurements_per_event: 10_000,
    };

    const fn to_array(self) -> [usize; 8] {
        [
            self.message_bytes,
            self.template_file_bytes,
            self.expression_bytes,
            self.expression_nesting,
            self.expression_operators,
            self.handlebars_bytes,
            self.handlebars_nesting,
            self.measurements_per_event,
        ]
    }

    fn from_array(a: [usize; 8]) -> Self {
        Self {
            message_bytes: a[0],
            template_file_bytes: a[1],
            expression_bytes: a[2],
            expression_nesting: a[3],
            expression_operators: a[4],
            handlebars_bytes: a[5],
            handlebars_nesting: a[6],
            measurements_per_event: a[7],
        }
    }

    /// The ceilings of the limits that guard a thread's stack (2 MiB for a worker), with
    /// room to spare: `(key, ceiling)`.
    pub const CEILINGS: [(&'static str, usize); 3] = [
        ("expression_nesting", 64),
        ("expression_operators", 256),
        ("handlebars_nesting", 64),
    ];

    /// Each limit that is zero or above its ceiling: `(key, why)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let values = [
            ("message_bytes", self.message_bytes),
            ("template_file_bytes", self.template_file_bytes),
            ("expression_bytes", self.expression_bytes),
            ("expression_nesting", self.expression_nesting),
            ("expression_operators", self.expression_operators),
            ("handlebars_bytes", self.handlebars_bytes),
            ("handlebars_nesting", self.handlebars_nesting),
            ("measurements_per_event", self.measurements_per_event),
        ];
        let mut problems = Vec::new();
        for (key, value) in values {
            let ceiling = Self::CEILINGS
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, c)| *c);
            if value == 0 {
                problems.push((key, "must be at least 1".to_owned()));
            } else if let Some(ceiling) = ceiling.filter(|c| value > *c) {
                problems.push((
                    key,
                    format!("is at most {ceiling}: deeper input could overflow a thread's stack"),
                ));
            }
        }
        problems
    }
}

/// The limits in effect, one atomic each: the normalize stage reads them for every event, so
/// a read is a few plain loads rather than a lock.
static CURRENT: [AtomicUsize; 8] = {
    const D: [usize; 8] = Limits::DEFAULT.to_array();
    [
        AtomicUsize::new(D[0]),
        AtomicUsize::new(D[1]),
        AtomicUsize::new(D[2]),
        AtomicUsize::new(D[3]),
        AtomicUsize::new(D[4]),
        AtomicUsize::new(D[5]),
        AtomicUsize::new(D[6]),
        AtomicUsize::new(D[7]),
    ]
};

/// Sets the limits of this process; a limit over its ceiling is held at the ceiling.
pub fn set_limits(limits: Limits) {
    let mut held = limits;
    for (key, ceiling) in Limits::CEILINGS {
        let value = match key {
            "expression_nesting" => &mut held.expression_nesting,
            "expression_operators" => &mut held.expression_operators,
            _ => &mut held.handlebars_nesting,
        };
        *value = (*value).clamp(1, ceiling);
    }
    for (slot, value) in CURRENT.iter().zip(held.to_array()) {
        slot.store(value, Ordering::Relaxed);
    }
}

/// The limits in effect.
pub fn limits() -> Limits {
    Limits::from_array(CURRENT.each_ref().map(|slot| slot.load(Ordering::Relaxed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_static_default_is_the_default_and_ceilings_hold() {
        assert_eq!(limits(), Limits::default());
        assert!(Limits::default().problems().is_empty());
        let deep = Limits {
            expression_nesting: 10_000,
            measurements_per_event: 0,
            ..Limits::default()
        };
        let keys: Vec<&str> = deep.problems().iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["expression_nesting", "measurements_per_event"]);
    }
}
