//! When and how long to wait before trying again.
//!
//! Transient failures (the connection dropped or never opened, a 5xx, a 429) are retried up to
//! [`Policy::retries`] times with exponential backoff and "equal jitter": half the doubled delay
//! is fixed and half is random, so many clients that failed together do not come back together,
//! and no wait collapses to zero. A `Retry-After` from the server is a floor for that wait.
//!
//! A `409 idempotency_key_in_use` is different: our own earlier request (or another copy of this
//! command) is still being processed, so waiting is the right thing to do for as long as the
//! server might keep that claim. It does not use up retries; [`Policy::in_flight_wait`] bounds it.

use std::time::{Duration, SystemTime};

use rand::Rng as _;
use reqwest::header::{HeaderMap, RETRY_AFTER};

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Retries after the first attempt, for transient failures.
    pub retries: u32,
    /// The first backoff; each retry doubles it.
    pub base: Duration,
    /// The longest single wait, backoff or `Retry-After`.
    pub cap: Duration,
    /// How long a `409 idempotency_key_in_use` is waited out in total.
    pub in_flight_wait: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            retries: 5,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(60),
            in_flight_wait: Duration::from_secs(3600),
        }
    }
}

impl Policy {
    /// The wait before retry number `retry` (1 for the first retry).
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20))
            .min(self.cap);
        let half = exp / 2;
        let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter)
    }

    /// The wait before retry number `retry`, at least what the server asked for (capped).
    pub fn wait(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = self.backoff(retry);
        match retry_after {
            Some(asked) => asked.min(self.cap).max(backoff),
            None => backoff,
        }
    }
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Statuses worth sending again: the server or something in front of it was briefly unable.
pub fn transient_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn backoff_doubles_within_jitter_and_stops_at_the_cap() {
        let policy = Policy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
            ..Policy::default()
        };
        for _ in 0..50 {
            let first = policy.backoff(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = policy.backoff(3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = policy.backoff(30);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1));
        }
    }

    #[test]
    fn retry_after_is_a_floor_but_capped() {
        let policy = Policy {
            base: Duration::from_millis(10),
            cap: Duration::from_secs(30),
            ..Policy::default()
        };
        assert!(policy.wait(1, Some(Duration::from_secs(5))) >= Duration::from_secs(5));
        assert_eq!(
            policy.wait(1, Some(Duration::from_secs(86_400))),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let later = SystemTime::now() + Duration::from_secs(120);
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap(),
        );
        let got = retry_after(&headers).unwrap();
        assert!(got > Duration::from_secs(100) && got <= Duration::from_secs(120));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }
}
