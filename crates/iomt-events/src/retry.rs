//! Event Grid's delivery policy: which answers count as delivered, which are retried and when,
//! and when an event is given up and dead-lettered. Consumers that know Event Grid get the
//! behaviour they expect from iomt's deliveries.

use std::time::Duration;

/// Event Grid's retry steps after the first failure; after the last, every 12 hours.
const SCHEDULE: [u64; 9] = [10, 30, 60, 300, 600, 1800, 3600, 10_800, 21_600];
const LATER: u64 = 43_200;

/// How long and how often an event is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1–30; Event Grid's default 30).
    pub max_delivery_attempts: u32,
    /// How long after the change an event may still be delivered (Event Grid's default
    /// 24 hours); checked when the next attempt is due.
    #[serde(with = "humantime_serde")]
    pub event_time_to_live: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_delivery_attempts: 30,
            event_time_to_live: Duration::from_secs(24 * 3600),
        }
    }
}

/// What one delivery attempt got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// An HTTP answer (or a broker's, mapped to one), with its `Retry-After`.
    Status {
        /// The status code.
        code: u16,
        /// The wait the receiver asked for.
        retry_after: Option<Duration>,
    },
    /// No answer in time.
    TimedOut,
    /// The connection failed (refused, reset, name not resolved).
    SocketError,
}

/// What to do after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered.
    Delivered,
    /// Try again after this wait.
    Retry(Duration),
    /// Give up: dead-letter with this reason.
    DeadLetter(&'static str),
    /// The receiver is gone (410): stop the subscription; the event is dead-lettered.
    Disable,
}

impl Attempt {
    /// Event Grid's `lastDeliveryOutcome` for the attempt.
    pub fn outcome(&self) -> &'static str {
        match self {
            Attempt::TimedOut => "TimedOut",
            Attempt::SocketError => "SocketError",
            Attempt::Status { code, .. } => match code {
                200..=204 => "Delivered",
                400 => "BadRequest",
                401 => "Unauthorized",
                403 => "Forbidden",
                404 => "NotFound",
                408 => "TimedOut",
                410 => "Disabled",
                413 => "PayloadTooLarge",
                429 | 503 => "Busy",
                _ => "Aborted",
            },
        }
    }

    /// The status code, for `lastHttpStatusCode`.
    pub fn status(&self) -> Option<u16> {
        match self {
            Attempt::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl RetryPolicy {
    /// Checks the ranges Event Grid allows.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=30).contains(&self.max_delivery_attempts) {
            return Err(format!(
                "max_delivery_attempts must be 1 to 30, found {}",
                self.max_delivery_attempts
            ));
        }
        if self.event_time_to_live < Duration::from_secs(60)
            || self.event_time_to_live > Duration::from_secs(24 * 3600)
        {
            return Err("event_time_to_live must be 1 minute to 24 hours".to_owned());
        }
        Ok(())
    }

    /// The verdict on the `attempts`-th attempt (1 for the first) of an event that is `age`
    /// old now.
    pub fn after(&self, attempts: u32, attempt: &Attempt, age: Duration) -> Verdict {
        let code = attempt.status();
        match code {
            Some(200..=204) => return Verdict::Delivered,
            Some(400) => return Verdict::DeadLetter("UndeliverableDueToHttpBadRequest"),
            Some(401) => return Verdict::DeadLetter("UndeliverableDueToHttpUnauthorized"),
            Some(403) => return Verdict::DeadLetter("UndeliverableDueToHttpForbidden"),
            Some(413) => return Verdict::DeadLetter("UndeliverableDueToHttpPayloadTooLarge"),
            Some(410) => return Verdict::Disable,
            _ => {}
        }
        if attempts >= self.max_delivery_attempts {
            return Verdict::DeadLetter("MaxDeliveryAttemptsExceeded");
        }
        let step = SCHEDULE
            .get(attempts.saturating_sub(1) as usize)
            .copied()
            .unwrap_or(LATER);
        let mut wait = Duration::from_secs(step);
        // Event Grid's floors per answer; a receiver's Retry-After is honoured on 429 and 503.
        let floor = match code {
            Some(408) => Duration::from_secs(120),
            Some(503) => Duration::from_secs(30),
            _ => Duration::ZERO,
        };
        wait = wait.max(floor);
        if let Attempt::Status {
            code: 429 | 503,
            retry_after: Some(asked),
        } = attempt
        {
            wait = (*asked).min(Duration::from_secs(LATER));
        }
        if age + wait > self.event_time_to_live {
            return Verdict::DeadLetter("TimeToLiveExceeded");
        }
        Verdict::Retry(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Attempt {
        Attempt::Status {
            code,
            retry_after: None,
        }
    }

    #[test]
    fn event_grid_schedule_and_codes() {
        let p = RetryPolicy::default();
        let young = Duration::ZERO;
        assert_eq!(p.after(1, &status(204), young), Verdict::Delivered);
        let waits: Vec<Verdict> = (1..=11).map(|n| p.after(n, &status(500), young)).collect();
        let secs = [
            10, 30, 60, 300, 600, 1800, 3600, 10_800, 21_600, 43_200, 43_200,
        ];
        for (w, s) in waits.iter().zip(secs) {
            assert_eq!(*w, Verdict::Retry(Duration::from_secs(s)));
        }
        for (code, reason) in [
            (400, "UndeliverableDueToHttpBadRequest"),
            (401, "UndeliverableDueToHttpUnauthorized"),
            (403, "UndeliverableDueToHttpForbidden"),
            (413, "UndeliverableDueToHttpPayloadTooLarge"),
        ] {
            assert_eq!(
                p.after(1, &status(code), young),
                Verdict::DeadLetter(reason)
            );
        }
        assert_eq!(p.after(1, &status(410), young), Verdict::Disable);
        assert_eq!(
            p.after(1, &status(408), young),
            Verdict::Retry(Duration::from_secs(120))
        );
        assert_eq!(
            p.after(1, &status(503), young),
            Verdict::Retry(Duration::from_secs(30))
        );
        let asked = Attempt::Status {
            code: 429,
            retry_after: Some(Duration::from_secs(3)),
        };
        assert_eq!(
            p.after(4, &asked, young),
            Verdict::Retry(Duration::from_secs(3))
        );
        assert_eq!(
            p.after(2, &Attempt::TimedOut, young),
            Verdict::Retry(Duration::from_secs(30))
        );
    }

    #[test]
    fn attempts_and_time_to_live_end_delivery() {
        let p = RetryPolicy {
            max_delivery_attempts: 3,
            event_time_to_live: Duration::from_secs(30 * 60),
        };
        assert_eq!(
            p.after(3, &Attempt::SocketError, Duration::ZERO),
            Verdict::DeadLetter("MaxDeliveryAttemptsExceeded")
        );
        assert_eq!(
            p.after(2, &status(500), Duration::from_secs(29 * 60 + 40)),
            Verdict::DeadLetter("TimeToLiveExceeded")
        );
        assert!(p.validate().is_ok());
        assert!(
            RetryPolicy {
                max_delivery_attempts: 31,
                ..p
            }
            .validate()
            .is_err()
        );
        assert_eq!(status(429).outcome(), "Busy");
        assert_eq!(Attempt::SocketError.status(), None);
    }
}
