//! How far along a record is: the one definition of "older" for snapshots that arrive out of order.
//!
//! Agents send full snapshots of records, and some (opencode's share client)
//! send them concurrently, so an older snapshot can land after a newer one.
//! A snapshot that would move a record back is refused as a stale
//! transition, whoever sent it:
//!
//! | record | further along | so refused |
//! |---|---|---|
//! | message | finished: `time.completed` is a number, or `error` is set | an unfinished snapshot over a finished one |
//! | tool part | `state.status` is `completed` or `error` | `pending` or `running` over a finished one |
//! | text or reasoning part | `time.end` is a number | one without `time.end` over one with it |
//! | session | a larger `time.updated` | a smaller `time.updated` |
//!
//! A `part.delta` to a finished part is refused the same way: the finished
//! snapshot holds the whole text, and the delta would add its piece twice.
//!
//! Snapshots equally far along replace each other (the newest arrival wins),
//! and a record without the field never counts as older or newer.

use serde_json::Value;

/// Whether a message is finished: completed (`time.completed`) or failed (`error`).
/// A finished message only takes finished snapshots.
pub fn message_finished(time_completed: Option<&Value>, error: Option<&Value>) -> bool {
    time_completed.is_some_and(Value::is_number) || error.is_some_and(|e| !e.is_null())
}

/// Whether a part is finished: a tool call that completed or failed, or a text
/// or reasoning part whose `time.end` is set. Other part types never finish:
/// any snapshot of them replaces the stored one.
pub fn part_finished(part_type: &str, status: Option<&str>, time_end: Option<&Value>) -> bool {
    match part_type {
        "tool" => matches!(status, Some("completed" | "error")),
        "text" | "reasoning" => time_end.is_some_and(Value::is_number),
        _ => false,
    }
}

/// A session's `time.updated` in ms, if it has one.
pub fn session_updated(time_updated: Option<&Value>) -> Option<i64> {
    let updated = time_updated?;
    updated.as_i64().or_else(|| {
        // Whole milliseconds; a fraction or an out-of-range float carries no order.
        updated
            .as_f64()
            .filter(|ms| ms.is_finite() && ms.fract() == 0.0 && ms.abs() < 9.0e15)
            .map(|ms| ms as i64)
    })
}

/// Whether a snapshot with progress `new` is older than the stored one with `stored`.
/// `None` is "unknown": never older, and never makes another snapshot older.
pub fn is_older<T: Ord>(new: Option<T>, stored: Option<T>) -> bool {
    matches!((new, stored), (Some(new), Some(stored)) if new < stored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_finish_by_completing_or_failing() {
        assert!(message_finished(Some(&json!(5)), None));
        assert!(message_finished(None, Some(&json!({"name": "APIError"}))));
        assert!(!message_finished(None, Some(&Value::Null)));
        assert!(!message_finished(Some(&json!("soon")), None));
        assert!(!message_finished(None, None));
    }

    #[test]
    fn parts_finish_by_type() {
        assert!(part_finished("tool", Some("completed"), None));
        assert!(part_finished("tool", Some("error"), None));
        assert!(!part_finished("tool", Some("running"), Some(&json!(3))));
        assert!(!part_finished("tool", Some("pending"), None));
        assert!(part_finished("text", None, Some(&json!(3))));
        assert!(part_finished("reasoning", None, Some(&json!(3.0))));
        assert!(!part_finished("text", None, None));
        assert!(!part_finished(
            "text",
            Some("completed"),
            Some(&Value::Null)
        ));
        // Other types have no order: every snapshot replaces the last.
        assert!(!part_finished("step-finish", None, Some(&json!(3))));
        assert!(!part_finished("file", Some("completed"), None));
    }

    #[test]
    fn sessions_order_by_time_updated() {
        assert_eq!(
            session_updated(Some(&json!(1700000000123_i64))),
            Some(1700000000123)
        );
        assert_eq!(
            session_updated(Some(&json!(1700000000123.0))),
            Some(1700000000123)
        );
        assert_eq!(session_updated(Some(&json!(1.5))), None);
        assert_eq!(session_updated(Some(&json!("x"))), None);
        assert_eq!(session_updated(None), None);
    }

    #[test]
    fn only_known_smaller_progress_is_older() {
        assert!(is_older(Some(1), Some(2)));
        assert!(!is_older(Some(2), Some(2)));
        assert!(!is_older(Some(3), Some(2)));
        assert!(!is_older(None, Some(2)));
        assert!(!is_older(Some(1), None));
        assert!(is_older(Some(false), Some(true)));
        assert!(!is_older(Some(true), Some(false)));
    }
}
