//! Where the CLI's results go: readable text, or JSON on stdout with `--json`.

use std::cell::RefCell;
use std::rc::Rc;

use serde::Serialize;

use capsync_client::error::ClientError;

/// Text a run printed, when its output is captured instead of written to the terminal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    pub stdout: String,
    pub stderr: String,
}

/// The output mode of one run.
#[derive(Debug, Clone)]
pub struct Output {
    /// `--json`: results and errors as JSON documents on stdout.
    json: bool,
    /// `Some` to collect the text instead of printing it (in-process CLI tests).
    capture: Option<Rc<RefCell<Captured>>>,
}

impl Output {
    /// Output to the process's stdout and stderr.
    pub fn new(json: bool) -> Self {
        Self {
            json,
            capture: None,
        }
    }

    /// Output collected in memory; read it from the returned handle after the run.
    pub fn captured(json: bool) -> (Self, Rc<RefCell<Captured>>) {
        let capture = Rc::new(RefCell::new(Captured::default()));
        (
            Self {
                json,
                capture: Some(capture.clone()),
            },
            capture,
        )
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Whether live progress may be drawn: readable output (not `--json`), not captured,
    /// and stderr is a terminal. Scripts and pipes get only the final result.
    pub fn shows_progress(&self) -> bool {
        use std::io::IsTerminal as _;
        !self.json && self.capture.is_none() && std::io::stderr().is_terminal()
    }

    /// Prints `value` as JSON, or the text `human` renders, on stdout.
    pub fn result<T: Serialize>(&self, value: &T, human: impl FnOnce() -> String) {
        if self.json {
            self.stdout_line(&to_json(value));
        } else {
            self.stdout_line(human().trim_end_matches('\n'));
        }
    }

    /// Text on stdout exactly as given (no newline added), flushed at once: live output
    /// that continues a line, such as streamed text. Fails when stdout is gone (a closed
    /// pipe), so a long-running command can stop.
    pub fn text(&self, text: &str) -> std::io::Result<()> {
        match &self.capture {
            Some(capture) => {
                capture.borrow_mut().stdout.push_str(text);
                Ok(())
            }
            None => {
                use std::io::Write as _;
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(text.as_bytes())?;
                stdout.flush()
            }
        }
    }

    /// Text on stderr exactly as given (no newline added), flushed at once: a status
    /// line redrawn in place. Only for terminals ([`Output::shows_progress`]); a failure
    /// to write it is ignored, like any note's.
    pub fn stderr_text(&self, text: &str) {
        match &self.capture {
            Some(capture) => capture.borrow_mut().stderr.push_str(text),
            None => {
                use std::io::Write as _;
                let mut stderr = std::io::stderr().lock();
                let _ = stderr.write_all(text.as_bytes());
                let _ = stderr.flush();
            }
        }
    }

    /// A remark for people (stderr), silent with `--json` so stdout stays one document.
    pub fn note(&self, text: impl AsRef<str>) {
        if !self.json {
            self.stderr_line(text.as_ref());
        }
    }

    /// Reports an error: one line on stderr, and with `--json` also
    /// `{"error": {"code": ..., "message": ...}}` on stdout.
    pub fn error(&self, error: &ClientError) {
        self.stderr_line(&format!("error: {error}"));
        if self.json {
            self.stdout_line(&to_json(&error_json(error)));
        }
    }

    /// [`Output::error`] for commands whose `--json` output is JSON Lines: the error's
    /// JSON document takes one line.
    pub fn error_line(&self, error: &ClientError) {
        self.stderr_line(&format!("error: {error}"));
        if self.json {
            self.stdout_line(&error_json(error).to_string());
        }
    }

    fn stdout_line(&self, line: &str) {
        match &self.capture {
            Some(capture) => {
                let mut capture = capture.borrow_mut();
                capture.stdout.push_str(line);
                capture.stdout.push('\n');
            }
            None => println!("{line}"),
        }
    }

    fn stderr_line(&self, line: &str) {
        match &self.capture {
            Some(capture) => {
                let mut capture = capture.borrow_mut();
                capture.stderr.push_str(line);
                capture.stderr.push('\n');
            }
            None => eprintln!("{line}"),
        }
    }
}

/// The JSON form of an error.
pub fn error_json(error: &ClientError) -> serde_json::Value {
    let mut body = serde_json::json!({
        "code": error.code_str(),
        "message": error.to_string(),
    });
    // The cursor is part of the answer for these two: the current cursor to retry
    // at, or the compaction point to take a snapshot past.
    if let ClientError::Remote {
        code:
            capsync_shared::ErrorCode::CursorConflict | capsync_shared::ErrorCode::SnapshotRequired,
        cursor,
        ..
    } = error
    {
        body["cursor"] = (*cursor).into();
    }
    // A script that retries should wait at least this long.
    if let Some(wait) = error.retry_after() {
        body["retryAfterMs"] = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).into();
    }
    serde_json::json!({ "error": body })
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| {
        format!("{{\"error\": {{\"code\": \"internal\", \"message\": \"{e}\"}}}}")
    })
}

/// Exact bytes, with a binary-unit approximation once that is easier to read.
pub(super) fn bytes(n: u64) -> String {
    if n < 1024 {
        return format!("{n} B");
    }
    format!("{n} B ({})", short_bytes(n))
}

/// Bytes in a table cell: exact below a KiB, one decimal in binary units above.
pub(super) fn short_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsync_shared::ErrorCode;

    #[test]
    fn errors_have_a_stable_json_form() {
        let e = ClientError::Remote {
            code: ErrorCode::Revoked,
            message: "share revoked".into(),
            cursor: 0,
            retry_after: None,
        };
        assert_eq!(
            error_json(&e),
            serde_json::json!({"error": {"code": "revoked", "message": "revoked: share revoked"}})
        );
        let e = ClientError::Remote {
            code: ErrorCode::CursorConflict,
            message: String::new(),
            cursor: 4,
            retry_after: None,
        };
        assert_eq!(error_json(&e)["error"]["cursor"], 4);
        let e = ClientError::Remote {
            code: ErrorCode::SnapshotRequired,
            message: "ops were compacted".into(),
            cursor: 9,
            retry_after: None,
        };
        assert_eq!(
            error_json(&e),
            serde_json::json!({"error": {
                "code": "snapshotRequired",
                "message": "snapshot required: ops were compacted (compaction point 9)",
                "cursor": 9
            }})
        );
        let e = ClientError::invalid("line 3: bad");
        assert_eq!(error_json(&e)["error"]["code"], "invalidInput");
        let e = ClientError::Remote {
            code: ErrorCode::RateLimited,
            message: "too many failed redeems".into(),
            cursor: 0,
            retry_after: Some(std::time::Duration::from_millis(6_000)),
        };
        assert_eq!(
            error_json(&e),
            serde_json::json!({"error": {
                "code": "rateLimited",
                "message": "rate limited: too many failed redeems (retry in 6s)",
                "retryAfterMs": 6000
            }})
        );
    }
}
