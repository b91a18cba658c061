//! Exponential backoff with jitter, for event retries and for outages.

use std::time::Duration;

/// Delays that double from `initial` up to `max`, each drawn at random from
/// its upper half so that many failures do not retry in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The largest delay.
    pub max: Duration,
}

impl Backoff {
    /// The upper bound of the delay after `failures` consecutive failures (at least 1).
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.initial.saturating_mul(1 << doublings).min(self.max)
    }

    /// The delay after `failures` consecutive failures: between half the ceiling and the ceiling.
    pub fn delay(&self, failures: u32) -> Duration {
        let ceiling = self.ceiling(failures);
        ceiling / 2 + ceiling.mul_f64(fastrand::f64() / 2.0)
    }

    /// The longest total time `attempts` failures can be spread over.
    pub fn horizon(&self, attempts: u32) -> Duration {
        (1..=attempts).map(|n| self.ceiling(n)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        assert_eq!(B.ceiling(1), Duration::from_millis(100));
        assert_eq!(B.ceiling(3), Duration::from_millis(400));
        assert_eq!(B.ceiling(10), Duration::from_secs(1));
        assert_eq!(B.ceiling(u32::MAX), Duration::from_secs(1));
        for failures in 1..12 {
            let delay = B.delay(failures);
            assert!(
                delay >= B.ceiling(failures) / 2 && delay <= B.ceiling(failures),
                "{delay:?}"
            );
        }
        assert_eq!(B.horizon(3), Duration::from_millis(700));
    }
}
