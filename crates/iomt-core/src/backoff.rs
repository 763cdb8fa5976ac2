//! The one retry policy every retry loop of iomt uses: exponential backoff, capped, with
//! jitter so that processes retrying together spread out.
//!
//! Retries happen against FHIR servers, Blob storage, Event Hubs and the local disk; they
//! differ only in their base and cap, so they share this arithmetic. A `Retry-After` from a
//! server takes precedence where the caller has one (capped the same way).

use std::time::Duration;

/// Exponential backoff: the `n`-th wait is about `base × 2^(n-1)`, at most `cap`, drawn from
/// its upper half so that waits keep growing while retries of several processes spread out.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A policy whose first wait is about `base`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The wait before the `attempt`-th retry (1 for the first).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponential = self
            .base
            .saturating_mul(1_u32 << attempt.saturating_sub(1).min(16))
            .min(self.cap);
        exponential.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    /// The wait before the next retry; each call counts one.
    pub fn next_delay(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        self.delay(self.attempt)
    }

    /// Starts over after a success: the next wait is about `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The longest wait, also the cap on a wait a server asks for.
    pub fn cap(&self) -> Duration {
        self.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_is_capped_and_starts_over() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        for (i, w) in waits.iter().enumerate() {
            let full = Duration::from_millis(100 * (1 << i)).min(Duration::from_secs(1));
            assert!(*w >= full / 2 && *w <= full, "wait {i}: {w:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        // A huge attempt number neither overflows nor passes the cap.
        assert!(b.delay(u32::MAX) <= Duration::from_secs(1));
    }
}
