//! Expiry arguments (`--expires 30d`) and their conversion to the wire's Unix milliseconds.

use std::time::{Duration, UNIX_EPOCH};

use crate::error::ClientError;

/// When something should expire, as a person types it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Never (`never`, `none` or `0`).
    Never,
    /// This long from now (`30d`, `12h`, `1h 30m`: humantime's syntax).
    In(Duration),
    /// At this moment (`2030-01-31T12:00:00Z` or `2030-01-31 12:00:00`, UTC).
    At(i64),
}

impl std::str::FromStr for Expiry {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if matches!(s, "never" | "none" | "0") {
            return Ok(Self::Never);
        }
        if let Ok(duration) = humantime::parse_duration(s) {
            if duration.is_zero() {
                return Ok(Self::Never);
            }
            return Ok(Self::In(duration));
        }
        if let Ok(time) = humantime::parse_rfc3339_weak(s) {
            let ms = time
                .duration_since(UNIX_EPOCH)
                .map_err(|_| ClientError::invalid(format!("expiry {s:?} is before 1970")))?
                .as_millis();
            return Ok(Self::At(i64::try_from(ms).unwrap_or(i64::MAX)));
        }
        Err(ClientError::invalid(format!(
            "expiry {s:?} is neither a duration (30d, 12h, 1h 30m), a time (2030-01-31T12:00:00Z) nor \"never\""
        )))
    }
}

impl Expiry {
    /// The wire's expiry: Unix milliseconds, `None` for never. `now_ms` is passed in so
    /// tests need no clock.
    pub fn expires_at(self, now_ms: i64) -> Option<i64> {
        match self {
            Self::Never => None,
            Self::In(duration) => {
                let ms = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
                Some(now_ms.saturating_add(ms))
            }
            Self::At(ms) => Some(ms),
        }
    }
}

/// Parses an expiry argument and resolves it against the current time.
pub fn parse_expires_at(s: &str) -> Result<Option<i64>, ClientError> {
    Ok(s.parse::<Expiry>()?
        .expires_at(capsync_shared::now_millis()))
}

/// Unix milliseconds as an RFC 3339 time (UTC, seconds), for people.
pub fn format_time(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        Err(_) => format!("{ms} ms"),
    }
}

/// An optional expiry for people: the time, or "never".
pub fn format_expiry(expires_at: Option<i64>) -> String {
    expires_at.map_or_else(|| "never".to_owned(), format_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;
    const DAY: i64 = 86_400_000;

    #[test]
    fn durations_count_from_now() {
        for (text, ms) in [
            ("30d", 30 * DAY),
            ("7days", 7 * DAY),
            ("12h", DAY / 2),
            ("1h 30m", 90 * 60_000),
            ("90s", 90_000),
        ] {
            let expiry: Expiry = text.parse().unwrap();
            assert_eq!(expiry.expires_at(NOW), Some(NOW + ms), "{text}");
        }
    }

    #[test]
    fn never_means_no_expiry() {
        for text in ["never", "none", "0", " never ", "0s"] {
            assert_eq!(text.parse::<Expiry>().unwrap(), Expiry::Never, "{text}");
            assert_eq!(text.parse::<Expiry>().unwrap().expires_at(NOW), None);
        }
    }

    #[test]
    fn absolute_times_are_taken_as_they_are() {
        let expiry: Expiry = "2030-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(expiry, Expiry::At(1_893_456_000_000));
        assert_eq!(expiry.expires_at(NOW), Some(1_893_456_000_000));
        assert_eq!(format_time(1_893_456_000_000), "2030-01-01T00:00:00Z");
    }

    #[test]
    fn nonsense_is_refused_with_a_hint() {
        for text in ["soon", "30x", "-1d", ""] {
            let err = text.parse::<Expiry>().unwrap_err().to_string();
            assert!(err.contains("duration"), "{text}: {err}");
        }
    }

    #[test]
    fn formatting_for_people() {
        assert_eq!(format_expiry(None), "never");
        assert_eq!(format_expiry(Some(0)), "1970-01-01T00:00:00Z");
    }
}
